#include "io/hf_cache.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/log.h"

namespace moetrace {

namespace fs = std::filesystem;

namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

// Where the cache folder came from, for error messages.
std::string cache_origin() {
  if (!env("HF_HUB_CACHE").empty()) return "$HF_HUB_CACHE";
  if (!env("HUGGINGFACE_HUB_CACHE").empty()) return "$HUGGINGFACE_HUB_CACHE";
  if (!env("HF_HOME").empty()) return "$HF_HOME/hub";
  if (!env("XDG_CACHE_HOME").empty()) return "$XDG_CACHE_HOME/huggingface/hub";
  return "~/.cache/huggingface/hub";
}

// "google/switch-base-8" -> true. Hub ids are [org/]name of letters, digits, '-', '_', '.'.
bool looks_like_hub_id(const std::string& s) {
  if (s.empty() || s.front() == '/' || s.front() == '.' || s.back() == '/') return false;
  int slashes = 0;
  for (char c : s) {
    if (c == '/') {
      ++slashes;
    } else if (!std::isalnum(static_cast<unsigned char>(c)) && c != '-' && c != '_' && c != '.') {
      return false;
    }
  }
  return slashes <= 1 && s.find("--") == std::string::npos && s.find("..") == std::string::npos;
}

std::string repo_folder_name(const std::string& id) {
  std::string out = "models--";
  for (char c : id) {
    if (c == '/') {
      out += "--";
    } else {
      out += c;
    }
  }
  return out;
}

// The first line of a small file, trimmed; empty when unreadable.
std::string read_ref(const fs::path& p) {
  std::ifstream in(p);
  std::string line;
  std::getline(in, line);
  while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) line.pop_back();
  return line;
}

std::vector<std::string> snapshot_names(const fs::path& repo) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(repo / "snapshots", ec)) {
    if (e.is_directory()) out.push_back(e.path().filename().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

bool has_checkpoint(const fs::path& dir) {
  for (const char* f : {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json"}) {
    if (fs::exists(dir / f)) return true;
  }
  return false;
}

// Digit runs compare as numbers: "switch-base-16" < "switch-base-128".
bool natural_less(const std::string& a, const std::string& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (std::isdigit(static_cast<unsigned char>(a[i])) &&
        std::isdigit(static_cast<unsigned char>(b[j]))) {
      size_t i2 = i, j2 = j;
      while (i2 < a.size() && std::isdigit(static_cast<unsigned char>(a[i2]))) ++i2;
      while (j2 < b.size() && std::isdigit(static_cast<unsigned char>(b[j2]))) ++j2;
      std::string x = a.substr(i, i2 - i), y = b.substr(j, j2 - j);
      x.erase(0, std::min(x.find_first_not_of('0'), x.size()));
      y.erase(0, std::min(y.find_first_not_of('0'), y.size()));
      if (x.size() != y.size()) return x.size() < y.size();
      if (x != y) return x < y;
      i = i2;
      j = j2;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

// Resolves id@rev inside the cache; returns false with *why set when it cannot.
bool resolve_in_cache(const std::string& id, const std::string& rev, ResolvedModel* out,
                      std::string* why) {
  const fs::path repo = hf_hub_cache_dir() / repo_folder_name(id);
  if (!fs::is_directory(repo)) {
    *why = "no " + repo.string();
    return false;
  }
  const std::string branch = rev.empty() ? "main" : rev;
  const fs::path ref = repo / "refs" / branch;
  std::string revision;
  if (fs::is_regular_file(ref)) {
    revision = read_ref(ref);
    if (revision.empty()) {
      *why = ref.string() + " is empty";
      return false;
    }
  } else if (!rev.empty() && fs::is_directory(repo / "snapshots" / rev)) {
    revision = rev;  // a snapshot named directly
  } else {
    const std::vector<std::string> snaps = snapshot_names(repo);
    if (!rev.empty() || snaps.size() != 1) {
      std::ostringstream os;
      os << "no " << ref.string();
      if (snaps.empty()) {
        os << " and no snapshot in " << (repo / "snapshots").string();
      } else if (rev.empty()) {
        os << " and " << snaps.size() << " snapshots to choose from (";
        for (size_t i = 0; i < snaps.size(); ++i) os << (i ? ", " : "") << snaps[i];
        os << "; name one as " << id << "@<revision>)";
      } else {
        os << " and no snapshot " << rev;
      }
      *why = os.str();
      return false;
    }
    revision = snaps.front();
  }
  const fs::path dir = repo / "snapshots" / revision;
  if (!fs::is_directory(dir)) {
    *why = ref.string() + " names revision " + revision + " but " + dir.string() + " is missing";
    return false;
  }
  *out = ResolvedModel{dir, id, revision};
  return true;
}

}  // namespace

fs::path hf_hub_cache_dir() {
  if (std::string v = env("HF_HUB_CACHE"); !v.empty()) return v;
  if (std::string v = env("HUGGINGFACE_HUB_CACHE"); !v.empty()) return v;
  if (std::string v = env("HF_HOME"); !v.empty()) return fs::path(v) / "hub";
  if (std::string v = env("XDG_CACHE_HOME"); !v.empty()) return fs::path(v) / "huggingface" / "hub";
  return fs::path(env("HOME")) / ".cache" / "huggingface" / "hub";
}

ResolvedModel resolve_model(const std::string& spec) {
  if (spec.empty())
    fail("empty model name (expected a directory or a Hub id such as google/switch-base-8)");
  if (fs::is_directory(spec)) return ResolvedModel{fs::path(spec), spec, ""};
  const size_t at = spec.find('@');
  const std::string id = spec.substr(0, at);
  const std::string rev = at == std::string::npos ? "" : spec.substr(at + 1);
  if (!looks_like_hub_id(id) || (at != std::string::npos && !looks_like_hub_id(rev))) {
    fail(spec, ": no such model directory");
  }
  ResolvedModel out;
  std::string why;
  if (resolve_in_cache(id, rev, &out, &why)) return out;
  fail(spec, ": neither a directory nor a model in the Hugging Face cache (", why, "; cache ",
       hf_hub_cache_dir().string(), " from ", cache_origin(),
       "); download it first: moetrace fetch --model ", id, rev.empty() ? "" : " --revision " + rev,
       " (or hf download ", id, rev.empty() ? "" : " --revision " + rev, ")");
}

std::vector<ResolvedModel> list_cached_models(const std::string& prefix) {
  std::vector<ResolvedModel> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(hf_hub_cache_dir(), ec)) {
    const std::string folder = e.path().filename().string();
    if (!e.is_directory() || folder.rfind("models--", 0) != 0) continue;
    // models--<org>--<name> -> org/name (Hub names never hold "--")
    std::string id = folder.substr(8);
    const size_t sep = id.find("--");
    if (sep != std::string::npos) id = id.substr(0, sep) + '/' + id.substr(sep + 2);
    if (id.rfind(prefix, 0) != 0) continue;
    ResolvedModel m;
    std::string why;
    if (!resolve_in_cache(id, "", &m, &why)) {
      log_debug("hf cache: skipping ", id, ": ", why);
      continue;
    }
    if (!has_checkpoint(m.dir)) {
      log_debug("hf cache: skipping ", id, ": no checkpoint in ", m.dir.string());
      continue;
    }
    out.push_back(std::move(m));
  }
  std::sort(out.begin(), out.end(), [](const ResolvedModel& a, const ResolvedModel& b) {
    return natural_less(a.id, b.id);
  });
  return out;
}

}  // namespace moetrace
