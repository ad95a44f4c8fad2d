// Finding a catalog dataset's files offline: in data roots laid out as
// `huggingface-cli download --repo-type dataset` leaves them (DIR/<org>/<name>/...), and in the
// Hugging Face hub cache (datasets--<org>--<name>/snapshots/<rev>/).
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

// Candidate repo folders for a hub id under one root, existing ones only, best first:
// ROOT/<org>/<name>, ROOT/<name>, ROOT/datasets--<org>--<name>/snapshots/<rev> (refs/main's rev,
// else the newest snapshot).
std::vector<std::filesystem::path> repo_dirs(const std::filesystem::path& root,
                                             const std::string& hub);

// The split's files inside a repo folder. Looked for, in this order, in <config>/, data/<config>/,
// data/ and the repo root: files named <split>.<ext> or <split>-*.<ext>, or every data file in a
// <split>/ folder. Split aliases: validation = valid, val, dev; validation_matched = dev_matched.
// A config folder matches in any case (GLUE's `CoLA/` for `cola`). Then the first of `files`
// (paths relative to repo_dir: the publisher's names, e.g. `Sentences_AllAgree.txt`) that exists.
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
