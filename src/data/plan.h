// The sampling plan: which rows of which datasets become the prompts of a collection run.
//
// Datasets are taken from the catalog selection, shuffled with the seed (a portable Fisher-Yates
// over splitmix64, not std::shuffle, whose algorithm differs between standard libraries). Within a
// dataset every row gets a pseudo-random key from (seed, dataset name, row); the `quota` eligible
// rows with the smallest keys are kept (bottom-k sampling: a uniform random sample without
// replacement, found in one streaming pass with memory for `quota` texts). Rows that are empty or
// too short after the template, or miss a field, are skipped and counted. The plan then interleaves
// the datasets round-robin in the shuffled order (each dataset's samples in key order), so a
// max_samples cut still spreads over all datasets. Same options and files -> the same plan,
// whatever the thread count.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "data/catalog.h"

namespace moetrace {

struct PlannedSample {
  std::string sample_id;  // "<hub name>/<config>/<split>/<row>", e.g. "glue/mrpc/validation/17"
  std::string dataset;    // catalog name, e.g. "glue/mrpc"
  int64_t row = 0;        // row within the split (files in sorted order, bad rows counted)
  std::string text;       // the filled-in prompt
};

struct PlanOptions {
  // "" (the default: every catalog dataset present locally) | "core" | "maximum" | "demo" |
  // "name,group,path/to/file.jsonl[:field],folder,..." (data/selection.h)
  std::string datasets;
  std::string split = "catalog";                  // --split: train | validation | test | catalog
  std::vector<std::filesystem::path> data_roots;  // --data-root (the HF hub cache is searched too)
  std::filesystem::path extra_catalog;            // user's spec file, optional
  std::map<std::string, std::string> template_overrides;  // dataset name -> template
  uint64_t seed = 0;
  int64_t max_samples = -1;  // stop after this many planned samples (-1: all quotas)
  size_t min_chars = 1;      // texts whose fields fill fewer characters are skipped
  int threads = 0;           // datasets read in parallel; 0: hardware threads
  bool search_hf_cache = true;
  // The default selection finding nothing plans the bundled rows (assets/demo/data, the "demo"
  // group) with a warning instead of failing.
  bool bundled_fallback = true;
};

struct DatasetPlanStats {
  std::string dataset;
  std::string status;  // "planned", "missing" (no files found) or "error" (unreadable file)
  std::string error;
  std::filesystem::path repo_dir;
  std::vector<std::filesystem::path> files;
  int64_t quota = 0;
  int64_t rows = 0;      // rows read (good records)
  int64_t eligible = 0;  // rows that passed the template checks
  int64_t planned = 0;
  std::map<std::string, int64_t> skipped;  // reason -> rows
};

struct PlanStats {
  // What was planned, as a --datasets value giving the same plan: the selection as given, or for
  // the default the catalog datasets found (comma-separated), or "demo" for the bundled rows.
  std::string selection;
  bool bundled = false;                    // the default found nothing: the bundled rows
  std::vector<DatasetPlanStats> datasets;  // in the shuffled dataset order
  std::vector<std::string> missing;
  int64_t planned = 0;
  int64_t skipped = 0;
};

// The built-in catalog plus, when given, the user's spec file.
data::Catalog load_catalog(const std::filesystem::path& extra_catalog = {});

// Error when the selection names unknown datasets, a template override is malformed, or none of
// the selected datasets yields a sample (the error names the `moetrace fetch` command). Missing or
// unreadable datasets are logged and skipped.
std::vector<PlannedSample> build_plan(const PlanOptions& options, PlanStats* stats);

// splitmix64: the plan's only source of randomness (portable, stateless).
uint64_t mix64(uint64_t x);

}  // namespace moetrace
