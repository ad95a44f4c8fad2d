// `moetrace datasets list|check|plan`: the catalog, which datasets a data root holds, and the
// sampling plan a collection run would use.
#include <algorithm>
#include <iostream>
#include <limits>
#include <nlohmann/json.hpp>

#include "command.h"
#include "core/error.h"
#include "data/catalog.h"
#include "data/locate.h"
#include "data/plan.h"
#include "data/records.h"
#include "data/selection.h"

namespace moetrace::cli {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct DatasetsOptions {
  std::string catalog;
  std::string datasets = "maximum";
  std::string plan_datasets;  // plan: "" is collect's default (every catalog dataset present)
  std::string split = "catalog";
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

data::SelectOptions select_options(const DatasetsOptions& o) {
  data::SelectOptions so;
  so.split = o.split;
  return so;
}

void list(const DatasetsOptions& o) {
  const data::Catalog catalog = load_catalog(o.catalog);
  const auto selected = data::resolve_selection(catalog, o.datasets, select_options(o));
  if (o.as_json) {
    for (const auto& d : selected) {
      json fields = json::object();
      for (const auto& f : d.fields) fields[f.name] = f.candidates;
      json row{{"name", d.name},       {"hub", d.hub},           {"config", d.config},
               {"split", d.split},     {"category", d.category}, {"quota", d.quota},
               {"template", d.prompt}, {"fields", fields},       {"groups", d.groups}};
      if (!d.local_path.empty()) row["path"] = d.local_path.string();
      std::cout << row.dump() << '\n';
    }
    return;
  }
  // Columns as wide as their widest cell, two spaces apart; the template last, unpadded.
  std::vector<std::vector<std::string>> rows{
      {"name", "hub", "config", "split", "category", "quota", "template"}};
  int64_t total = 0;
  for (const auto& d : selected) {
    const bool file = !d.local_path.empty();
    rows.push_back(
        {d.name, file ? d.local_path.string() : d.hub, d.config.empty() ? "-" : d.config, d.split,
         d.category,
         file && d.quota == std::numeric_limits<int64_t>::max() ? "all" : std::to_string(d.quota),
         d.prompt});
    if (!file) total += d.quota;
  }
  std::vector<size_t> width(rows[0].size() - 1, 0);
  for (const auto& r : rows) {
    for (size_t c = 0; c < width.size(); ++c) width[c] = std::max(width[c], r[c].size());
  }
  for (const auto& r : rows) {
    std::string line;
    for (size_t c = 0; c < width.size(); ++c)
      line += r[c] + std::string(width[c] - r[c].size() + 2, ' ');
    std::cout << line << r.back() << '\n';
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
  const auto specs = data::resolve_selection(catalog, o.datasets, select_options(o));
  for (const auto& spec : specs) {
    const auto* d = &spec;
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
      std::cout << " (looked for " << d->hub << (d->config.empty() ? "" : " " + d->config) << " "
                << d->split << "; `moetrace fetch --datasets " << d->name << "`)\n";
    }
  }
  if (!o.as_json) std::cout << present << " of " << specs.size() << " datasets present\n";
}

void plan(const DatasetsOptions& o) {
  PlanOptions p;
  p.datasets = o.plan_datasets;
  p.split = o.split;
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
  auto common = [o](CLI::App* sub, bool plan) {
    sub->add_option("--catalog", o->catalog,
                    "extra dataset spec file (same schema as the built-in)");
    const char* what =
        "core, maximum, demo, a category, dataset names, files or folders "
        "(path/to/file.jsonl[:field]), comma-separated";
    if (plan) {
      sub->add_option("--datasets", o->plan_datasets,
                      std::string(what) +
                          "; default: as collect's, every catalog dataset present "
                          "(else the bundled rows)");
    } else {
      sub->add_option("--datasets", o->datasets, what)->capture_default_str();
    }
    sub->add_option("--split", o->split,
                    "train | validation | test | catalog (each dataset's split in the catalog)")
        ->capture_default_str();
    sub->add_flag("--json", o->as_json, "JSON lines output");
  };
  auto roots = [o](CLI::App* sub) {
    sub->add_option("--data-root", o->data_roots,
                    "folder of Hub dataset repos (<org>/<name>/...); repeatable");
    sub->add_flag("--no-hf-cache", o->no_hf_cache, "do not search the Hugging Face hub cache");
  };
  auto* ls = cmd->add_subcommand("list", "show the catalog");
  common(ls, false);
  ls->callback([o] { list(*o); });

  auto* ck = cmd->add_subcommand(
      "check", "which datasets are present, their files, rows and missing fields");
  common(ck, false);
  roots(ck);
  ck->add_option("--check-rows", o->check_rows,
                 "rows per dataset checked for the template's fields")
      ->capture_default_str();
  ck->callback([o] { check(*o); });

  auto* pl = cmd->add_subcommand("plan", "print the sampling plan as JSON lines");
  common(pl, true);
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
