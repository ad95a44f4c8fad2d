#include "data/plan.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>

#include "core/error.h"
#include "core/log.h"
#include "data/locate.h"
#include "data/records.h"
#include "data/selection.h"

namespace moetrace {

namespace {

struct Candidate {
  uint64_t key;
  int64_t row;
  std::string text;
};
bool key_less(const Candidate& a, const Candidate& b) {
  return a.key != b.key ? a.key < b.key : a.row < b.row;
}

uint64_t fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

struct DatasetResult {
  DatasetPlanStats stats;
  std::vector<PlannedSample> samples;  // key order
};

DatasetResult sample_dataset(const data::DatasetSpec& spec, const std::string& prompt,
                             const PlanOptions& options) {
  DatasetResult r;
  auto& st = r.stats;
  st.dataset = spec.name;
  st.quota = spec.quota;
  auto located = data::locate(spec, options.data_roots, options.search_hf_cache);
  if (!located) {
    st.status = "missing";
    return r;
  }
  st.repo_dir = located->repo_dir;
  st.files = located->files;
  const size_t min_chars = std::max(options.min_chars, spec.min_chars);
  const uint64_t dataset_key = mix64(options.seed ^ mix64(fnv1a(spec.name)));
  std::vector<Candidate> heap;  // max-heap on key: the worst kept candidate on top
  int logged = 0;
  std::string first_columns;  // a user's file: the columns of its first row, for the error
  auto skip = [&](const std::string& file, int64_t row, const std::string& reason) {
    ++st.skipped[reason];
    if (logged++ < 5) log_debug(file, ": row ", row, " skipped: ", reason);
  };
  int64_t row_offset = 0;
  try {
    for (const auto& file : located->files) {
      auto reader = data::open_records(file, spec.read_options());
      data::Record rec;
      while (reader->next(&rec)) {
        const int64_t row = row_offset + rec.row;
        ++st.rows;
        if (st.rows == 1 && rec.fields.is_object()) {
          for (const auto& [k, v] : rec.fields.items())
            first_columns += (first_columns.empty() ? "" : ", ") + k;
        }
        data::Rendered rd = data::render_prompt(spec, prompt, rec.fields);
        if (!rd.missing_field.empty()) {
          skip(file.string(), rec.row, "missing field " + rd.missing_field);
          continue;
        }
        if (rd.content_chars == 0) {
          skip(file.string(), rec.row, "empty");
          continue;
        }
        if (rd.content_chars < min_chars) {
          skip(file.string(), rec.row, "too short");
          continue;
        }
        ++st.eligible;
        const uint64_t key = mix64(dataset_key + mix64(static_cast<uint64_t>(row)));
        Candidate c{key, row, std::move(rd.text)};
        if (static_cast<int64_t>(heap.size()) < spec.quota) {
          heap.push_back(std::move(c));
          std::push_heap(heap.begin(), heap.end(), key_less);
        } else if (key_less(c, heap.front())) {
          std::pop_heap(heap.begin(), heap.end(), key_less);
          heap.back() = std::move(c);
          std::push_heap(heap.begin(), heap.end(), key_less);
        }
      }
      const auto& counters = reader->counters();
      for (const auto& [reason, n] : counters.skipped) st.skipped[reason] += n;
      row_offset += counters.rows + counters.total_skipped();
    }
  } catch (const std::exception& e) {
    st.status = "error";
    st.error = e.what();
    return r;
  }
  if (!spec.local_path.empty() && st.eligible == 0 && st.rows > 0) {
    const std::string& column = spec.fields.front().name;
    if (st.skipped["missing field " + column] == st.rows) {
      st.status = "error";
      st.error = spec.local_path.string() + ": no row has the column \"" + column +
                 "\" (the first has: " + first_columns + "); name one as " +
                 spec.local_path.string() + ":COLUMN";
      return r;
    }
  }
  std::sort(heap.begin(), heap.end(), key_less);
  const std::string prefix = spec.id_prefix() + "/";
  for (auto& c : heap) {
    r.samples.push_back({prefix + std::to_string(c.row), spec.name, c.row, std::move(c.text)});
  }
  st.planned = static_cast<int64_t>(r.samples.size());
  st.status = "planned";
  return r;
}

// The command that downloads `selection` into the Hugging Face cache, quoted for a POSIX shell
// where needed.
std::string fetch_command(const std::string& selection, const std::filesystem::path& catalog) {
  auto quoted = [](const std::string& s) {
    if (!s.empty() && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                          "0123456789-_./,:@+=") == std::string::npos)
      return s;
    std::string out = "'";
    for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return out + "'";
  };
  std::string cmd = "moetrace fetch --datasets " + quoted(selection);
  if (!catalog.empty()) cmd += " --catalog " + quoted(catalog.string());
  return cmd;
}

}  // namespace

uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

data::Catalog load_catalog(const std::filesystem::path& extra_catalog) {
  data::Catalog catalog = data::Catalog::builtin();
  if (!extra_catalog.empty()) catalog.merge(data::Catalog::load(extra_catalog));
  return catalog;
}

std::vector<PlannedSample> build_plan(const PlanOptions& options_in, PlanStats* stats) {
  const data::Catalog catalog = load_catalog(options_in.extra_catalog);
  PlanOptions options = options_in;
  PlanStats local;
  PlanStats& s = stats ? *stats : local;
  s = PlanStats{};
  data::SelectOptions so;
  so.split = options.split;
  so.file_quota = options.max_samples;
  std::vector<data::DatasetSpec> selected;
  const bool by_default = options.datasets.empty();
  if (by_default) {
    // The seed's job: every catalog dataset that is here, each with its quota.
    data::check_split_option(options.split);
    for (const auto& d : catalog.datasets()) {
      data::DatasetSpec spec = d.with_split(options.split);
      if (data::locate(spec, options.data_roots, options.search_hf_cache)) {
        s.selection += (s.selection.empty() ? "" : ",") + spec.name;
        selected.push_back(std::move(spec));
      }
    }
    const size_t n = catalog.datasets().size();
    if (!selected.empty()) {
      log_info("datasets: the ", selected.size(), " of ", n,
               " catalog datasets found in the data roots and the Hugging Face cache");
    } else if (!options.bundled_fallback || options.split != "catalog") {
      // The bundled rows hold the catalog's splits only.
      fail("none of the ", n, " catalog datasets ",
           options.split == "catalog" ? "is" : "has its " + options.split + " split",
           " in the data roots or the Hugging Face cache; fetch them with `moetrace fetch ",
           "--datasets maximum` (or pass --data-root DIR)");
    } else {
      selected = data::resolve_selection(catalog, "demo", so);
      options.data_roots = {data::demo_data_root()};
      options.search_hf_cache = false;
      s.selection = "demo";
      s.bundled = true;
      log_warn("none of the ", n, " catalog datasets is in the data roots or the Hugging Face ",
               "cache: using the bundled real rows of ", selected.size(), " datasets (",
               options.data_roots[0].string(), "); fetch the rest with `moetrace fetch --datasets ",
               "maximum`");
    }
  } else {
    selected = data::resolve_selection(catalog, options.datasets, so);
    s.selection = options.datasets;
  }

  for (const auto& [name, prompt] : options.template_overrides) {
    const std::string& wanted = name;  // C++20 lambdas cannot capture a structured binding (clang)
    if (std::none_of(selected.begin(), selected.end(),
                     [&](const data::DatasetSpec& d) { return d.name == wanted; }) &&
        !catalog.find(name)) {
      fail("template override for unknown dataset \"", name, "\"");
    }
    data::template_fields(prompt);  // Error when malformed
  }

  // Portable Fisher-Yates: the order depends on the seed only.
  uint64_t state = mix64(options.seed ^ 0x6d6f657472616365ull);
  for (size_t i = selected.size(); i > 1; --i) {
    state = mix64(state);
    std::swap(selected[i - 1], selected[state % i]);
  }

  std::vector<DatasetResult> results(selected.size());
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i; (i = next++) < selected.size();) {
      const auto* spec = &selected[i];
      auto it = options.template_overrides.find(spec->name);
      const std::string& prompt =
          it != options.template_overrides.end() ? it->second : spec->prompt;
      try {
        results[i] = sample_dataset(*spec, prompt, options);
      } catch (const std::exception& e) {
        results[i].stats.dataset = spec->name;
        results[i].stats.status = "error";
        results[i].stats.error = e.what();
      }
    }
  };
  size_t n_threads = options.threads > 0 ? static_cast<size_t>(options.threads)
                                         : std::max(1u, std::thread::hardware_concurrency());
  n_threads = std::min(n_threads, selected.size());
  if (n_threads <= 1) {
    worker();
  } else {
    std::vector<std::thread> pool;
    for (size_t t = 0; t < n_threads; ++t) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
  }

  size_t present = 0;
  std::string first_error;
  for (auto& r : results) {
    auto& st = r.stats;
    if (st.status == "missing") {
      s.missing.push_back(st.dataset);
      log_warn("dataset ", st.dataset,
               " not found in the data roots or the Hugging Face cache; skipped (fetch it: `",
               fetch_command(st.dataset, options.extra_catalog), "`)");
    } else if (st.status == "error") {
      ++present;
      log_warn("dataset ", st.dataset, " skipped: ", st.error);
      if (first_error.empty()) first_error = st.error;
    } else {
      ++present;
      int64_t skipped = 0;
      for (const auto& [reason, n] : st.skipped) skipped += n;
      s.skipped += skipped;
      log_info("dataset ", st.dataset, ": ", st.planned, " of ", st.eligible,
               " eligible rows planned (", st.rows, " read, ", skipped, " skipped)");
    }
    s.datasets.push_back(st);
  }
  if (present == 0) {
    fail("none of the ", selected.size(), " selected datasets (", s.selection,
         ") was found in the data roots or the Hugging Face cache; fetch them with `",
         fetch_command(s.selection, options.extra_catalog),
         "` (or pass --data-root DIR; see `moetrace datasets check`)");
  }

  // Round-robin over the datasets in the shuffled order.
  std::vector<PlannedSample> plan;
  for (size_t k = 0;; ++k) {
    bool any = false;
    for (auto& r : results) {
      if (k < r.samples.size()) {
        plan.push_back(std::move(r.samples[k]));
        any = true;
      }
    }
    if (!any) break;
  }
  if (plan.empty()) {
    if (!first_error.empty()) fail(first_error);
    fail("the sampling plan is empty: no selected dataset has an eligible row");
  }
  if (options.max_samples >= 0 && static_cast<int64_t>(plan.size()) > options.max_samples) {
    plan.resize(static_cast<size_t>(options.max_samples));
  }
  s.planned = static_cast<int64_t>(plan.size());
  return plan;
}

}  // namespace moetrace
