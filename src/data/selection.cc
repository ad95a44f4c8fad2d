#include "data/selection.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <set>
#include <system_error>

#include "core/error.h"
#include "data/locate.h"

namespace moetrace::data {

namespace fs = std::filesystem;

namespace {

std::string trim(std::string_view s) {
  size_t b = s.find_first_not_of(" \t");
  if (b == std::string_view::npos) return {};
  return std::string(s.substr(b, s.find_last_not_of(" \t") - b + 1));
}

bool path_exists(const fs::path& p) {
  std::error_code ec;
  return !p.empty() && fs::exists(p, ec);
}

// The dataset name of a file or folder: its name without the format and compression extensions.
std::string name_of(const fs::path& path) {
  fs::path p = path.filename();
  if (p.empty() || p == "." || p == "..") {
    std::error_code ec;
    p = fs::weakly_canonical(path, ec).filename();
  }
  std::string name = p.string();
  if (format_from_name(p) != Format::kAuto) {
    for (int k = 0; k < 2 && p.has_extension(); ++k) {
      const std::string ext = p.extension().string();
      p = p.stem();
      if (ext != ".gz" && ext != ".zst" && ext != ".zstd") break;
    }
    name = p.string();
  }
  for (char& c : name) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') c = '_';
  }
  if (name.empty() || name == "." || name == "..") name = "file";
  return name;
}

// A selection token that is not a catalog name: a file or folder, optionally `:FIELD`.
DatasetSpec file_token(const std::string& token, int64_t quota) {
  fs::path path = token;
  std::string field;
  bool has_field = false;
  if (!path_exists(path)) {
    const size_t colon = token.rfind(':');
    if (colon != std::string::npos && colon > 0 && path_exists(token.substr(0, colon))) {
      path = token.substr(0, colon);
      field = trim(std::string_view(token).substr(colon + 1));
      has_field = true;
    }
  }
  if (!path_exists(path)) {
    const std::string before_colon = token.substr(0, token.rfind(':'));
    if (token.find('/') != std::string::npos || format_from_name(before_colon) != Format::kAuto) {
      fail("--datasets ", token, ": no such file or folder (nor a catalog dataset or group)");
    }
    fail("unknown dataset or group \"", token,
         "\" (see `moetrace datasets list`; a file or folder must exist)");
  }
  if (has_field && field.empty()) fail("--datasets ", token, ": no column name after ':'");
  std::error_code ec;
  if (!fs::is_directory(path, ec) && format_from_name(path) == Format::kAuto) {
    fail("--datasets ", path.string(),
         ": unknown data format (expected .parquet, .jsonl, .json, .csv, .tsv or .txt, optionally "
         ".gz/.zst)");
  }
  DatasetSpec d = file_dataset(path, field, quota);
  if (!locate(d, {}, false)) {
    fail("--datasets ", path.string(),
         ": no data files (.parquet, .jsonl, .json, .csv, .tsv, .txt) in the folder");
  }
  return d;
}

}  // namespace

DatasetSpec file_dataset(const fs::path& path, const std::string& field, int64_t quota) {
  DatasetSpec d;
  d.name = name_of(path);
  d.hub = d.name;
  d.split = "file";
  d.category = "file";
  d.quota = quota > 0 ? quota : std::numeric_limits<int64_t>::max();
  const std::string column = field.empty() ? "text" : field;
  d.fields.push_back({column, {column}});
  d.prompt = "{" + column + "}";
  // A CSV/TSV of one's own has a header row, unless the column is named by its index.
  const bool index = std::all_of(column.begin(), column.end(), [](char c) {
    return std::isdigit(static_cast<unsigned char>(c));
  });
  d.header = index ? Header::kNo : Header::kYes;
  d.local_path = path;
  return d;
}

void check_split_option(const std::string& split) {
  if (split != "train" && split != "validation" && split != "test" && split != "catalog") {
    fail("--split '", split, "': expected train, validation, test or catalog");
  }
}

std::vector<DatasetSpec> resolve_selection(const Catalog& catalog, const std::string& selection,
                                           const SelectOptions& options) {
  check_split_option(options.split);
  std::string catalog_tokens;
  std::vector<DatasetSpec> files;
  size_t start = 0;
  while (start <= selection.size()) {
    size_t comma = selection.find(',', start);
    if (comma == std::string::npos) comma = selection.size();
    const std::string token = trim(std::string_view(selection).substr(start, comma - start));
    start = comma + 1;
    if (token.empty()) continue;
    if (catalog.knows(token)) {
      catalog_tokens += (catalog_tokens.empty() ? "" : ",") + token;
    } else {
      files.push_back(file_token(token, options.file_quota));
    }
  }
  std::vector<DatasetSpec> out;
  if (!catalog_tokens.empty()) {
    for (const auto* d : catalog.select(catalog_tokens))
      out.push_back(d->with_split(options.split));
  }
  out.insert(out.end(), files.begin(), files.end());
  if (out.empty()) fail("no datasets selected by \"", selection, "\"");
  std::set<std::string> names, prefixes;
  for (const auto& d : out) {
    if (!names.insert(d.name).second) {
      fail("--datasets ", selection, ": two datasets are named \"", d.name,
           "\" (a file is named after itself: rename one)");
    }
    if (!prefixes.insert(d.id_prefix()).second) {
      fail("--datasets ", selection, " --split ", options.split, ": dataset \"", d.name,
           "\" reads the same hub/config/split as another (", d.id_prefix(), ")");
    }
  }
  return out;
}

}  // namespace moetrace::data
