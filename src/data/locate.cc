#include "data/locate.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <system_error>
#include <utility>

#include "data/records.h"

namespace moetrace::data {

namespace fs = std::filesystem;

namespace {

bool is_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}

bool is_data_file(const fs::path& p) {
  std::error_code ec;
  return fs::is_regular_file(p, ec) && format_from_name(p) != Format::kAuto;
}

std::vector<std::string> split_aliases(const std::string& split) {
  std::vector<std::string> out{split};
  if (split == "validation") out.insert(out.end(), {"valid", "val", "dev"});
  if (split == "validation_matched") out.push_back("dev_matched");
  if (split == "validation_mismatched") out.push_back("dev_mismatched");
  return out;
}

std::vector<fs::path> sorted_files_in(const fs::path& dir) {
  std::vector<fs::path> out;
  std::error_code ec;
  for (const auto& e : fs::recursive_directory_iterator(dir, ec)) {
    if (is_data_file(e.path())) out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// dir/name, and every other child folder of dir named so in another case (GLUE's `CoLA/`,
// SuperGLUE's `BoolQ/` for the configs `cola`, `boolq`), the exact name first.
std::vector<fs::path> folders_named(const fs::path& dir, const std::string& name) {
  std::vector<fs::path> out;
  if (is_dir(dir / name)) out.push_back(dir / name);
  std::vector<fs::path> other;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string file = e.path().filename().string();
    if (file != name && lower(file) == lower(name) && is_dir(e.path())) other.push_back(e.path());
  }
  std::sort(other.begin(), other.end());
  out.insert(out.end(), other.begin(), other.end());
  return out;
}

}  // namespace

std::vector<fs::path> hf_cache_dirs() {
  std::vector<fs::path> out;
  if (const char* v = std::getenv("HF_HUB_CACHE"); v && *v) {
    out.emplace_back(v);
  } else if (const char* h = std::getenv("HF_HOME"); h && *h) {
    out.push_back(fs::path(h) / "hub");
  } else if (const char* home = std::getenv("HOME"); home && *home) {
    out.push_back(fs::path(home) / ".cache/huggingface/hub");
  }
  std::erase_if(out, [](const fs::path& p) { return !is_dir(p); });
  return out;
}

std::vector<fs::path> cached_snapshots(const fs::path& repo_cache) {
  std::vector<fs::path> out;
  const fs::path snapshots = repo_cache / "snapshots";
  if (!is_dir(snapshots)) return out;
  auto add = [&](const fs::path& p) {
    if (is_dir(p) && std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
  };
  // A ref file holds a commit hash: one plain folder name under snapshots/, nothing else.
  auto add_ref = [&](const fs::path& ref) {
    std::ifstream in(ref);
    std::string rev;
    std::getline(in, rev);
    while (!rev.empty() && std::isspace(static_cast<unsigned char>(rev.back()))) rev.pop_back();
    if (rev.empty() || rev == "." || rev == ".." || rev.find('/') != std::string::npos ||
        rev.find('\\') != std::string::npos)
      return;
    add(snapshots / rev);
  };
  add_ref(repo_cache / "refs/main");
  // Other refs (refs/refs/convert/parquet after `moetrace fetch` of a script-only dataset, tags,
  // other branches), in path order.
  std::vector<fs::path> refs;
  std::error_code ec;
  for (const auto& e : fs::recursive_directory_iterator(repo_cache / "refs", ec)) {
    if (e.is_regular_file(ec) && e.path() != repo_cache / "refs/main") refs.push_back(e.path());
  }
  std::sort(refs.begin(), refs.end());
  for (const auto& r : refs) add_ref(r);
  // Snapshots no ref names, the most recently written first.
  std::vector<std::pair<fs::file_time_type, fs::path>> rest;
  for (const auto& e : fs::directory_iterator(snapshots, ec)) {
    if (!is_dir(e.path())) continue;
    if (std::find(out.begin(), out.end(), e.path()) != out.end()) continue;
    rest.emplace_back(fs::last_write_time(e.path(), ec), e.path());
  }
  std::sort(rest.begin(), rest.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  for (auto& r : rest) out.push_back(std::move(r.second));
  return out;
}

std::vector<fs::path> repo_dirs(const fs::path& root, const std::string& hub) {
  std::vector<fs::path> out;
  const size_t slash = hub.find('/');
  const std::string name = slash == std::string::npos ? hub : hub.substr(slash + 1);
  for (const fs::path& p : {root / hub, root / name}) {
    if (is_dir(p) && std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
  }
  const std::string cache_name =
      "datasets--" + (slash == std::string::npos ? hub : hub.substr(0, slash) + "--" + name);
  for (auto& p : cached_snapshots(root / cache_name)) out.push_back(std::move(p));
  return out;
}

std::vector<fs::path> split_files(const fs::path& repo_dir, const std::string& config,
                                  const std::string& split, const std::vector<std::string>& files) {
  std::vector<fs::path> dirs;
  if (!config.empty()) {
    for (const auto& d : folders_named(repo_dir, config)) dirs.push_back(d);
    if (is_dir(repo_dir / "data")) {
      for (const auto& d : folders_named(repo_dir / "data", config)) dirs.push_back(d);
    }
  } else {
    dirs.push_back(repo_dir / "default");  // refs/convert/parquet's name for an unnamed config
  }
  dirs.push_back(repo_dir / "data");
  dirs.push_back(repo_dir);
  for (const auto& dir : dirs) {
    if (!is_dir(dir)) continue;
    for (const auto& alias : split_aliases(split)) {
      std::vector<fs::path> found;
      if (is_dir(dir / alias)) found = sorted_files_in(dir / alias);
      // refs/convert/parquet's folder for a split it converted only in part (big datasets).
      if (found.empty() && is_dir(dir / ("partial-" + alias))) {
        found = sorted_files_in(dir / ("partial-" + alias));
      }
      std::error_code ec;
      for (const auto& e : fs::directory_iterator(dir, ec)) {
        if (!is_data_file(e.path())) continue;
        std::string file = e.path().filename().string();
        std::string stem = file.substr(0, file.find('.'));
        if (stem == alias || stem.starts_with(alias + "-")) found.push_back(e.path());
      }
      if (!found.empty()) {
        std::sort(found.begin(), found.end());
        return found;
      }
    }
  }
  // The publisher's own file names (catalog `files`, relative paths checked when it was loaded).
  for (const auto& f : files) {
    if (is_data_file(repo_dir / f)) return {repo_dir / f};
  }
  return {};
}

std::optional<LocatedDataset> locate(const DatasetSpec& spec, const std::vector<fs::path>& roots,
                                     bool search_hf_cache) {
  if (!spec.local_path.empty()) {  // a user's file or folder (--datasets my.jsonl)
    const fs::path& p = spec.local_path;
    std::vector<fs::path> files = is_dir(p) ? sorted_files_in(p) : std::vector<fs::path>{p};
    if (files.empty() || (!is_dir(p) && !is_data_file(p))) return std::nullopt;
    return LocatedDataset{is_dir(p) ? p : p.parent_path(), std::move(files)};
  }
  std::vector<fs::path> all = roots;
  if (search_hf_cache) {
    for (const auto& c : hf_cache_dirs()) all.push_back(c);
  }
  for (const auto& root : all) {
    for (const auto& repo : repo_dirs(root, spec.hub)) {
      auto files = split_files(repo, spec.config, spec.split, spec.files);
      if (!files.empty()) return LocatedDataset{repo, std::move(files)};
    }
  }
  return std::nullopt;
}

}  // namespace moetrace::data
