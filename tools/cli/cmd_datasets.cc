// `moetrace datasets list|check|plan`: the catalog, which datasets a data root holds, and the
// sampling plan a collection run would use.
#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>

#include "command.h"
#include "core/error.h"
#include "data/catalog.h"
#include "data/locate.h"
#include "data/plan.h"
#include "data/records.h"

namespace moetrace::cli {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct DatasetsOptions {
  std::string catalog;
  std::string datasets = "maximum";
  std::vector<std::string> data_roots;
  bool no_hf_cache = false;
  bool as_json = false;
  int64_t check_rows = 1000;
  // plan
  uint64_t seed = 0;
  int64_t max_samples = -1;
  size_t min_chars = 1;
  int threads = 0;
  std::vector<std::string> templates;
};

void list(const DatasetsOptions& o) {
  const data::Catalog catalog = load_catalog(o.catalog);
  auto selected = catalog.select(o.datasets);
  if (o.as_json) {
    for (const auto* d : selected) {
      json fields = json::object();
      for (const auto& f : d->fields) fields[f.name] = f.candidates;
      json row{{"name", d->name},       {"hub", d->hub},           {"config", d->config},
               {"split", d->split},     {"category", d->category}, {"quota", d->quota},
               {"template", d->prompt}, {"fields", fields},        {"groups", d->groups}};
      std::cout << row.dump() << '\n';
    }
    return;
  }
  std::cout << std::left << std::setw(24) << "name" << std::setw(50) << "hub (config) split"
            << std::setw(16) << "category" << std::setw(6) << "quota"
            << "template\n";
  int64_t total = 0;
  for (const auto* d : selected) {
    std::string where = d->hub + (d->config.empty() ? "" : " (" + d->config + ")") + " " + d->split;
    std::cout << std::setw(24) << d->name << std::setw(50) << where << std::setw(16) << d->category
              << std::setw(6) << d->quota << d->prompt << '\n';
    total += d->quota;
  }
  std::cout << selected.size() << " datasets, quotas total " << total << "; groups:";
  for (const auto& g : catalog.group_names()) std::cout << ' ' << g;
  std::cout << '\n';
}

std::vector<fs::path> roots_of(const DatasetsOptions& o) {
  std::vector<fs::path> roots;
  for (const auto& r : o.data_roots) {
    if (!fs::is_directory(r)) fail("--data-root ", r, ": not a folder");
    roots.emplace_back(r);
  }
  return roots;
}

void check(const DatasetsOptions& o) {
  const data::Catalog catalog = load_catalog(o.catalog);
  const auto roots = roots_of(o);
  int present = 0;
  auto selected = catalog.select(o.datasets);
  for (const auto* d : selected) {
    json report{{"dataset", d->name}, {"hub", d->hub}, {"config", d->config}, {"split", d->split}};
    auto located = data::locate(*d, roots, !o.no_hf_cache);
    if (!located) {
      report["status"] = "missing";
    } else {
      ++present;
      report["status"] = "present";
      report["repo_dir"] = located->repo_dir.string();
      json files = json::array();
      std::map<std::string, int64_t> missing;  // field -> rows lacking it among the checked
      int64_t checked = 0;
      for (const auto& file : located->files) {
        json jf{{"path", file.string()}};
        try {
          auto reader = data::open_records(file, d->read_options());
          data::Record rec;
          const bool counted = reader->declared_rows() >= 0;
          int64_t rows = 0;
          while ((!counted || checked < o.check_rows) && reader->next(&rec)) {
            ++rows;
            if (checked < o.check_rows) {
              ++checked;
              for (const auto& f : data::template_fields(d->prompt)) {
                auto r1 = data::render_prompt(*d, "{" + f + "}", rec.fields);
                if (!r1.missing_field.empty()) ++missing[f];
              }
            }
          }
          jf["rows"] = counted ? reader->declared_rows() : rows;
          if (!counted && reader->counters().total_skipped() > 0) {
            jf["skipped"] = reader->counters().skipped;
          }
        } catch (const Error& e) {
          jf["error"] = e.what();
        }
        files.push_back(jf);
      }
      report["files"] = files;
      json missing_fields = json::array();
      for (const auto& [f, n] : missing) {
        if (n == checked) missing_fields.push_back(f);
      }
      report["missing_fields"] = missing_fields;
      report["rows_checked"] = checked;
    }
    if (o.as_json) {
      std::cout << report.dump() << '\n';
      continue;
    }
    std::cout << d->name << ": " << report["status"].get<std::string>();
    if (located) {
      int64_t rows = 0;
      for (const auto& f : report["files"]) rows += f.value("rows", int64_t{0});
      std::cout << ", " << rows << " rows in " << report["files"].size() << " file(s) under "
                << report["repo_dir"].get<std::string>();
      if (!report["missing_fields"].empty()) {
        std::cout << "; MISSING FIELDS:";
        for (const auto& f : report["missing_fields"]) std::cout << ' ' << f.get<std::string>();
      }
      std::cout << '\n';
      for (const auto& f : report["files"]) {
        std::cout << "    " << f["path"].get<std::string>();
        if (f.contains("rows")) std::cout << "  " << f["rows"].get<int64_t>() << " rows";
        if (f.contains("skipped")) std::cout << "  skipped " << f["skipped"].dump();
        if (f.contains("error")) std::cout << "  ERROR " << f["error"].get<std::string>();
        std::cout << '\n';
      }
    } else {
      std::cout << " (looked for " << d->hub << " " << d->config << " " << d->split << ")\n";
    }
  }
  if (!o.as_json) std::cout << present << " of " << selected.size() << " datasets present\n";
}

void plan(const DatasetsOptions& o) {
  PlanOptions p;
  p.datasets = o.datasets;
  for (const auto& r : roots_of(o)) p.data_roots.push_back(r);
  p.extra_catalog = o.catalog;
  p.seed = o.seed;
  p.max_samples = o.max_samples;
  p.min_chars = o.min_chars;
  p.threads = o.threads;
  p.search_hf_cache = !o.no_hf_cache;
  for (const auto& t : o.templates) {
    auto eq = t.find('=');
    if (eq == std::string::npos) fail("--template ", t, ": expected NAME=TEMPLATE");
    p.template_overrides[t.substr(0, eq)] = t.substr(eq + 1);
  }
  PlanStats stats;
  for (const auto& s : build_plan(p, &stats)) {
    std::cout << json{{"sample_id", s.sample_id},
                      {"dataset", s.dataset},
                      {"row", s.row},
                      {"text", s.text}}
                     .dump()
              << '\n';
  }
}

RegisterCommand reg([](CLI::App& app) {
  auto o = std::make_shared<DatasetsOptions>();
  auto* cmd =
      app.add_subcommand("datasets", "the dataset catalog, local data roots, sampling plans");
  cmd->require_subcommand(1);
  auto common = [o](CLI::App* sub) {
    sub->add_option("--catalog", o->catalog,
                    "extra dataset spec file (same schema as the built-in)");
    sub->add_option("--datasets", o->datasets,
                    "core, maximum, demo, a category or dataset names, comma-separated")
        ->capture_default_str();
    sub->add_flag("--json", o->as_json, "JSON lines output");
  };
  auto roots = [o](CLI::App* sub) {
    sub->add_option("--data-root", o->data_roots,
                    "folder of Hub dataset repos (<org>/<name>/...); repeatable");
    sub->add_flag("--no-hf-cache", o->no_hf_cache, "do not search the Hugging Face hub cache");
  };
  auto* ls = cmd->add_subcommand("list", "show the catalog");
  common(ls);
  ls->callback([o] { list(*o); });

  auto* ck = cmd->add_subcommand(
      "check", "which datasets are present, their files, rows and missing fields");
  common(ck);
  roots(ck);
  ck->add_option("--check-rows", o->check_rows,
                 "rows per dataset checked for the template's fields")
      ->capture_default_str();
  ck->callback([o] { check(*o); });

  auto* pl = cmd->add_subcommand("plan", "print the sampling plan as JSON lines");
  common(pl);
  roots(pl);
  pl->add_option("--seed", o->seed, "sampling seed")->capture_default_str();
  pl->add_option("--max-samples", o->max_samples, "stop after N samples (-1: all quotas)")
      ->capture_default_str();
  pl->add_option("--min-chars", o->min_chars, "skip texts whose fields fill fewer characters")
      ->capture_default_str();
  pl->add_option("--threads", o->threads, "datasets read in parallel (0: all cores)");
  pl->add_option("--template", o->templates,
                 "NAME=TEMPLATE override, e.g. 'glue/mrpc=paraphrase: {sentence1}'");
  pl->callback([o] { plan(*o); });
});

}  // namespace

}  // namespace moetrace::cli
