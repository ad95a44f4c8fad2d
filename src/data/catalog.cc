#include "data/catalog.h"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <set>

#include "core/error.h"

namespace moetrace::data {

namespace {

using nlohmann::json;

std::string trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return std::string(s.substr(b, e - b));
}

std::vector<std::string> split_list(std::string_view s, std::string_view sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    size_t pos = s.find(sep, start);
    out.push_back(trim(s.substr(start, pos == std::string_view::npos ? pos : pos - start)));
    if (pos == std::string_view::npos) break;
    start = pos + sep.size();
  }
  return out;
}

// One template piece: literal text or a placeholder.
struct Piece {
  std::string text;
  bool placeholder = false;
  bool optional = false;
};

std::vector<Piece> parse_template(const std::string& prompt) {
  std::vector<Piece> pieces;
  std::string lit;
  for (size_t i = 0; i < prompt.size(); ++i) {
    char c = prompt[i];
    if ((c == '{' || c == '}') && i + 1 < prompt.size() && prompt[i + 1] == c) {
      lit += c;
      ++i;
      continue;
    }
    if (c != '{') {
      lit += c;
      continue;
    }
    size_t close = prompt.find('}', i);
    if (close == std::string::npos) fail("template \"", prompt, "\": unclosed '{'");
    std::string name = trim(std::string_view(prompt).substr(i + 1, close - i - 1));
    Piece p;
    p.placeholder = true;
    if (!name.empty() && name.back() == '?') {
      p.optional = true;
      name.pop_back();
    }
    if (name.empty()) fail("template \"", prompt, "\": empty placeholder");
    p.text = name;
    if (!lit.empty()) pieces.push_back({std::move(lit), false, false});
    lit.clear();
    pieces.push_back(std::move(p));
    i = close;
  }
  if (!lit.empty()) pieces.push_back({std::move(lit), false, false});
  return pieces;
}

// The text of a JSON value: strings as they are, numbers and booleans printed, lists joined with
// spaces (nested ones flattened), objects' values joined, null empty.
void append_text(const json& v, std::string* out) {
  std::string piece;
  if (v.is_string()) {
    piece = trim(v.get_ref<const std::string&>());
  } else if (v.is_boolean() || v.is_number()) {
    piece = v.dump();
  } else if (v.is_array() || v.is_object()) {
    for (const auto& e : v) append_text(e, out);
    return;
  }
  if (piece.empty()) return;
  if (!out->empty()) *out += ' ';
  *out += piece;
}

// Follows a dotted path; through lists it maps over the elements. False when the first key is
// absent (a column the file does not have).
bool resolve(const json& record, const std::string& path, json* out) {
  std::vector<std::string> keys = split_list(path, ".");
  if (!record.is_object() || !record.contains(keys[0])) return false;
  json cur = record.at(keys[0]);
  for (size_t k = 1; k < keys.size(); ++k) {
    const std::string& key = keys[k];
    auto step = [&](const json& v, auto& self) -> json {
      if (v.is_object()) return v.contains(key) ? v.at(key) : json(nullptr);
      if (v.is_array()) {
        json mapped = json::array();
        for (const auto& e : v) mapped.push_back(self(e, self));
        return mapped;
      }
      return nullptr;
    };
    cur = step(cur, step);
  }
  *out = std::move(cur);
  return true;
}

Header parse_header(const json& v, const std::string& where) {
  if (v.is_boolean()) return v.get<bool>() ? Header::kYes : Header::kNo;
  if (v == "auto") return Header::kAuto;
  fail(where, ": \"header\" must be true, false or \"auto\"");
}

// A name used as one folder or file name under a data root: no separators, not "." or "..".
bool safe_component(std::string_view s) {
  return !s.empty() && s != "." && s != ".." &&
         s.find_first_of(std::string_view("/\\\0", 3)) == std::string_view::npos;
}

// A relative path that stays below its base: safe components joined with '/'.
bool safe_relative_path(const std::string& p) {
  if (p.empty()) return false;
  for (const auto& part : split_list(p, "/")) {
    if (!safe_component(part) || part != trim(part)) return false;
  }
  return true;
}

// Catalog values become paths under the data roots: refuse what would leave them.
void check_paths(const DatasetSpec& d, const std::string& at) {
  const char* why =
      " (catalog values are paths below a data root: no \"..\", \".\" or absolute parts)";
  const auto parts = split_list(d.hub, "/");
  if (d.hub.empty() || d.hub != trim(d.hub) || parts.size() > 2 ||
      !std::all_of(parts.begin(), parts.end(),
                   [](const std::string& x) { return safe_component(x) && x == trim(x); })) {
    fail(at, ": \"hub\" \"", d.hub, "\" must be a Hub id NAME or ORG/NAME", why);
  }
  if (!d.config.empty() && !safe_component(d.config)) {
    fail(at, ": \"config\" \"", d.config, "\" must be one folder name", why);
  }
  if (!safe_component(d.split))
    fail(at, ": \"split\" \"", d.split, "\" must be one folder name", why);
  for (const auto& f : d.files) {
    if (!safe_relative_path(f))
      fail(at, ": \"files\" entry \"", f, "\" must be a relative path", why);
  }
}

DatasetSpec parse_entry(const json& e, const std::string& where) {
  if (!e.is_object()) fail(where, ": expected an object");
  DatasetSpec d;
  auto str = [&](const char* key, bool required) -> std::string {
    if (!e.contains(key)) {
      if (required) fail(where, ": missing \"", key, "\"");
      return {};
    }
    if (!e.at(key).is_string()) fail(where, ": \"", key, "\" must be a string");
    return e.at(key).get<std::string>();
  };
  d.name = str("name", true);
  const std::string at = where + " (" + d.name + ")";
  d.hub = str("hub", true);
  d.config = str("config", false);
  d.split = str("split", true);
  d.category = str("category", true);
  d.prompt = str("template", true);
  if (e.contains("quota")) {
    if (!e.at("quota").is_number_integer() || e.at("quota").get<int64_t>() <= 0) {
      fail(at, ": \"quota\" must be a positive integer");
    }
    d.quota = e.at("quota").get<int64_t>();
  }
  if (e.contains("min_chars")) {
    if (!e.at("min_chars").is_number_unsigned()) fail(at, ": \"min_chars\" must be >= 0");
    d.min_chars = e.at("min_chars").get<size_t>();
  }
  if (e.contains("fields")) {
    if (!e.at("fields").is_object()) fail(at, ": \"fields\" must be an object");
    for (const auto& [name, v] : e.at("fields").items()) {
      FieldSpec f{name, {}};
      if (v.is_string()) {
        f.candidates.push_back(v.get<std::string>());
      } else if (v.is_array() && !v.empty()) {
        for (const auto& c : v) {
          if (!c.is_string()) fail(at, ": field \"", name, "\" candidates must be strings");
          f.candidates.push_back(c.get<std::string>());
        }
      } else {
        fail(at, ": field \"", name, "\" must be a column name or a list of them");
      }
      d.fields.push_back(std::move(f));
    }
  }
  if (e.contains("groups")) {
    for (const auto& g : e.at("groups")) {
      if (!g.is_string()) fail(at, ": \"groups\" must be strings");
      d.groups.push_back(g.get<std::string>());
    }
  }
  if (e.contains("header")) d.header = parse_header(e.at("header"), at);
  if (e.contains("columns")) {
    for (const auto& c : e.at("columns")) {
      if (!c.is_string()) fail(at, ": \"columns\" must be strings");
      d.columns.push_back(c.get<std::string>());
    }
  }
  if (e.contains("text_mode")) {
    std::string m = e.at("text_mode").is_string() ? e.at("text_mode").get<std::string>() : "";
    if (m == "lines") {
      d.text_mode = TextMode::kLines;
    } else if (m == "paragraphs") {
      d.text_mode = TextMode::kParagraphs;
    } else {
      fail(at, ": \"text_mode\" must be \"lines\" or \"paragraphs\"");
    }
  }
  if (e.contains("text_delimiter")) {
    const json& v = e.at("text_delimiter");
    if (!v.is_string() || v.get<std::string>().size() != 1) {
      fail(at, ": \"text_delimiter\" must be one character");
    }
    d.text_delimiter = v.get<std::string>()[0];
    if (d.columns.size() < 2) fail(at, ": \"text_delimiter\" needs \"columns\" (two or more)");
  }
  if (e.contains("encoding")) {
    const json& v = e.at("encoding");
    if (v == "utf-8") {
      d.encoding = Encoding::kUtf8;
    } else if (v == "latin-1") {
      d.encoding = Encoding::kLatin1;
    } else {
      fail(at, ": \"encoding\" must be \"utf-8\" or \"latin-1\"");
    }
  }
  if (e.contains("files")) {
    if (!e.at("files").is_array()) fail(at, ": \"files\" must be a list of paths");
    for (const auto& f : e.at("files")) {
      if (!f.is_string()) fail(at, ": \"files\" must be strings");
      d.files.push_back(f.get<std::string>());
    }
  }
  check_paths(d, at);
  // Placeholders without a fields entry read the column of the same name.
  try {
    for (const std::string& name : template_fields(d.prompt)) {
      if (!d.field(name)) d.fields.push_back({name, {name}});
    }
  } catch (const Error& err) {
    fail(at, ": ", err.what());
  }
  return d;
}

}  // namespace

std::string DatasetSpec::id_prefix() const {
  std::string base = hub.substr(hub.find('/') == std::string::npos ? 0 : hub.find('/') + 1);
  return base + "/" + (config.empty() ? "default" : config) + "/" + split;
}

std::vector<std::string> DatasetSpec::column_names() const {
  std::vector<std::string> out;
  for (const auto& f : fields) {
    for (const auto& c : f.candidates) {
      for (const auto& part : split_list(c, "+")) {
        std::string top = part.substr(0, part.find('.'));
        if (std::find(out.begin(), out.end(), top) == out.end()) out.push_back(top);
      }
    }
  }
  return out;
}

const FieldSpec* DatasetSpec::field(std::string_view n) const {
  for (const auto& f : fields) {
    if (f.name == n) return &f;
  }
  return nullptr;
}

ReadOptions DatasetSpec::read_options() const {
  ReadOptions o;
  o.header = header;
  o.header_hints = column_names();
  o.columns = columns;
  o.text_mode = text_mode;
  o.wanted_columns = column_names();
  o.text_delimiter = text_delimiter;
  o.encoding = encoding;
  return o;
}

DatasetSpec DatasetSpec::with_split(const std::string& s) const {
  if (s.empty() || s == "catalog" || !local_path.empty() || s == split ||
      split.starts_with(s + "_")) {
    return *this;
  }
  DatasetSpec d = *this;
  d.split = s;
  d.files.clear();
  return d;
}

std::vector<std::string> template_fields(const std::string& prompt) {
  std::vector<std::string> out;
  for (const auto& p : parse_template(prompt)) {
    if (p.placeholder) out.push_back(p.text);
  }
  return out;
}

Rendered render_prompt(const DatasetSpec& spec, const std::string& prompt, const json& record) {
  Rendered r;
  for (const auto& piece : parse_template(prompt)) {
    if (!piece.placeholder) {
      r.text += piece.text;
      continue;
    }
    const FieldSpec* f = spec.field(piece.text);
    const std::vector<std::string> own{piece.text};
    const auto& candidates = f ? f->candidates : own;
    std::string value;
    bool found = false;
    for (const auto& cand : candidates) {
      std::string joined;
      bool any = false;
      for (const auto& part : split_list(cand, "+")) {
        json v;
        if (resolve(record, part, &v)) {
          any = true;
          append_text(v, &joined);
        }
      }
      if (any) {
        value = std::move(joined);
        found = true;
        break;
      }
    }
    if (!found && !piece.optional && r.missing_field.empty()) r.missing_field = piece.text;
    r.content_chars += value.size();
    r.text += value;
  }
  return r;
}

Catalog Catalog::from_json(const json& doc, const std::string& source) {
  const json* list = &doc;
  if (doc.is_object()) {
    if (!doc.contains("datasets")) fail(source, ": expected {\"datasets\": [...]}");
    if (doc.contains("version") && doc.at("version") != 1) {
      fail(source, ": catalog version ", doc.at("version").dump(),
           " is not supported (expected 1)");
    }
    list = &doc.at("datasets");
  }
  if (!list->is_array()) fail(source, ": \"datasets\" must be a list");
  Catalog c;
  for (size_t i = 0; i < list->size(); ++i) {
    c.datasets_.push_back(
        parse_entry(list->at(i), source + ": datasets[" + std::to_string(i) + "]"));
  }
  c.validate(source);
  return c;
}

Catalog Catalog::load(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) fail(path.string(), ": cannot open the dataset catalog");
  json doc = json::parse(in, nullptr, false);
  if (doc.is_discarded()) fail(path.string(), ": not valid JSON");
  return from_json(doc, path.string());
}

Catalog Catalog::builtin() { return load(assets_dir() / "catalog/datasets.json"); }

void Catalog::validate(const std::string& source) const {
  std::set<std::string> names, prefixes;
  for (const auto& d : datasets_) {
    if (!names.insert(d.name).second) fail(source, ": dataset \"", d.name, "\" listed twice");
    if (!prefixes.insert(d.id_prefix()).second) {
      fail(source, ": dataset \"", d.name, "\" has the same hub/config/split as another (",
           d.id_prefix(), "): sample ids would collide");
    }
  }
}

void Catalog::merge(const Catalog& extra) {
  for (const auto& d : extra.datasets_) {
    auto it = std::find_if(datasets_.begin(), datasets_.end(),
                           [&](const DatasetSpec& x) { return x.name == d.name; });
    if (it != datasets_.end()) {
      *it = d;
    } else {
      datasets_.push_back(d);
    }
  }
  validate("catalog after merging the extra spec file");
}

const DatasetSpec* Catalog::find(std::string_view name) const {
  for (const auto& d : datasets_) {
    if (d.name == name) return &d;
  }
  return nullptr;
}

std::vector<std::string> Catalog::group_names() const {
  std::vector<std::string> out{"maximum"};
  auto add = [&](const std::string& g) {
    if (std::find(out.begin(), out.end(), g) == out.end()) out.push_back(g);
  };
  for (const auto& d : datasets_) {
    add(d.category);
    for (const auto& g : d.groups) add(g);
  }
  return out;
}

bool Catalog::knows(std::string_view token) const {
  if (token == "maximum" || token == "all") return true;
  return std::any_of(datasets_.begin(), datasets_.end(), [&](const DatasetSpec& d) {
    return d.name == token || d.category == token ||
           std::find(d.groups.begin(), d.groups.end(), token) != d.groups.end();
  });
}

std::vector<const DatasetSpec*> Catalog::select(const std::string& selection) const {
  std::set<const DatasetSpec*> chosen;
  for (const std::string& token : split_list(selection, ",")) {
    if (token.empty()) continue;
    bool matched = false;
    for (const auto& d : datasets_) {
      bool in = token == "maximum" || token == "all" || d.name == token || d.category == token ||
                std::find(d.groups.begin(), d.groups.end(), token) != d.groups.end();
      if (in) {
        chosen.insert(&d);
        matched = true;
      }
    }
    if (!matched) fail("unknown dataset or group \"", token, "\" (see `moetrace datasets list`)");
  }
  std::vector<const DatasetSpec*> out;
  for (const auto& d : datasets_) {
    if (chosen.count(&d)) out.push_back(&d);
  }
  if (out.empty()) fail("no datasets selected by \"", selection, "\"");
  return out;
}

std::filesystem::path assets_dir() {
  namespace fs = std::filesystem;
  if (const char* env = std::getenv("MOETRACE_ASSETS"); env && *env) return env;
  // Next to the executable first (a relocated checkout), then the source tree it was built from.
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    for (fs::path p = exe.parent_path(); !p.empty() && p != p.root_path(); p = p.parent_path()) {
      if (fs::exists(p / "assets/demo/spiece.model", ec)) return p / "assets";
    }
  }
  return MOETRACE_ASSETS_DIR;
}

std::filesystem::path demo_data_root() { return assets_dir() / "demo/data"; }
std::filesystem::path demo_spiece_model() { return assets_dir() / "demo/spiece.model"; }

}  // namespace moetrace::data
