// Finding a catalog dataset's files offline: in data roots laid out as
// `hf download --repo-type dataset --local-dir DIR/<org>/<name>` leaves them, and in the Hugging
// Face hub cache (datasets--<org>--<name>/snapshots/<rev>/, where `moetrace fetch` puts them).
// python/moetrace/fetch.py mirrors split_files() on the Hub's file listings: change both together.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "data/catalog.h"

namespace moetrace::data {

struct LocatedDataset {
  std::filesystem::path repo_dir;            // the dataset repo's root
  std::vector<std::filesystem::path> files;  // the split's data files, sorted
};

// The hub caches to search: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub
// (only those that exist).
std::vector<std::filesystem::path> hf_cache_dirs();

// Snapshot folders of one hub-cache repo folder (ROOT/datasets--<org>--<name>), best first: the
// one refs/main names, then those other refs name (refs/refs/convert/parquet, tags, branches; in
// path order), then the others, newest first. Empty when it has no snapshots/.
std::vector<std::filesystem::path> cached_snapshots(const std::filesystem::path& repo_cache);

// Candidate repo folders for a hub id under one root, existing ones only, best first:
// ROOT/<org>/<name>, ROOT/<name>, then every snapshot of ROOT/datasets--<org>--<name>
// (cached_snapshots order). locate() takes the first holding the split's files, so a script-only
// `main` snapshot does not hide the refs/convert/parquet one cached beside it.
std::vector<std::filesystem::path> repo_dirs(const std::filesystem::path& root,
                                             const std::string& hub);

// The split's files inside a repo folder. Looked for, in this order, in <config>/ (default/ when
// the config is unnamed), data/<config>/, data/ and the repo root: files named <split>.<ext> or
// <split>-*.<ext>, or every data file in a <split>/ folder (else a partial-<split>/ folder, the
// Parquet conversion's name for a split converted in part). Split aliases: validation = valid,
// val, dev; validation_matched = dev_matched. A config folder matches in any case (GLUE's `CoLA/`
// for `cola`). Then the first of `files` (paths relative to repo_dir: the publisher's names, e.g.
// `Sentences_AllAgree.txt`) that exists.
std::vector<std::filesystem::path> split_files(const std::filesystem::path& repo_dir,
                                               const std::string& config, const std::string& split,
                                               const std::vector<std::string>& files = {});

// The first root (then hub cache) holding files of the dataset's split. A user's file or folder
// (spec.local_path) is its own location: the file, or the folder's data files (recursively,
// sorted).
std::optional<LocatedDataset> locate(const DatasetSpec& spec,
                                     const std::vector<std::filesystem::path>& roots,
                                     bool search_hf_cache = true);

}  // namespace moetrace::data
