// What `--datasets` names: catalog datasets and groups, and a user's own files and folders
// (`path/to/file.jsonl[:field]`, `path/to/folder`), each of which becomes a dataset named after it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "data/catalog.h"

namespace moetrace::data {

struct SelectOptions {
  std::string split = "catalog";  // --split: train | validation | test | catalog
  int64_t file_quota = -1;        // samples a user's file or folder may give (-1: every row)
};

// The comma-separated tokens of a selection: catalog names and groups first (catalog order, the
// split overridden), then files and folders in the order given. A token the catalog does not know
// is a path, optionally followed by `:FIELD`. Error on an unknown name, a missing file, a file of
// no known format, a folder without data files, or two datasets of one name.
std::vector<DatasetSpec> resolve_selection(const Catalog& catalog, const std::string& selection,
                                           const SelectOptions& options = {});

// A user's file or folder as a dataset: named after it (file name without its format and
// compression extensions, characters other than [A-Za-z0-9._-] as '_'), sample ids
// `<name>/default/file/<row>`, the prompt the field's text. field "": the column `text` (every
// row of a .txt has it); all digits: the column of that index of a headerless CSV/TSV.
DatasetSpec file_dataset(const std::filesystem::path& path, const std::string& field,
                         int64_t quota);

// --split: Error unless train, validation, test or catalog.
void check_split_option(const std::string& split);

}  // namespace moetrace::data
