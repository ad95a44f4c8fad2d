#include "text/hf_tokenizer.h"

#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/utext.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "core/error.h"
#include "text/text_util.h"

namespace moetrace {

namespace {

using nlohmann::json;

// Heterogeneous lookup: find a std::string key with a std::string_view.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

// The GPT-2 pre-tokenizer pattern ByteLevel uses when use_regex is true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Unicode White_Space (what Rust's char::is_whitespace and Oniguruma's \s match).
bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0d) || c == 0x20 || c == 0x85 || c == 0xa0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f ||
         c == 0x3000;
}

// The code point at s[i] (valid UTF-8 assumed; invalid bytes read as themselves).
char32_t decode_at(std::string_view s, size_t i, size_t* len) {
  auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  size_t n = text::utf8_length(b(i));
  if (i + n > s.size()) n = 1;
  *len = n;
  if (n == 1) return b(i);
  char32_t cp = b(i) & (0xff >> (n + 1));
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (b(i + k) & 0x3f);
  return cp;
}

// The byte-level alphabet of GPT-2: byte b is written as one printable code point.
struct ByteLevelMap {
  std::array<std::string, 256> byte_to_utf8;
  std::unordered_map<char32_t, uint8_t> char_to_byte;
  ByteLevelMap() {
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      char32_t cp = printable ? static_cast<char32_t>(b) : next++;
      text::append_utf8(byte_to_utf8[b], cp);
      char_to_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};
const ByteLevelMap& byte_level_map() {
  static const ByteLevelMap m;
  return m;
}

struct AddedToken {
  std::string content;
  std::string match;  // what is looked for: content, normalized for normalized=true tokens
  int32_t id = 0;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool special = false;
};

// Leftmost-longest matching of a set of added tokens (what `tokenizers` does with its
// Aho-Corasick automaton), with lstrip/rstrip widening a match over the white space beside it.
class AddedMatcher {
 public:
  void add(const AddedToken* t) {
    if (t->match.empty()) return;
    by_first_[static_cast<unsigned char>(t->match[0])].push_back(t);
  }
  bool empty() const {
    return std::all_of(by_first_.begin(), by_first_.end(), [](auto& v) { return v.empty(); });
  }
  // Calls plain(piece) for text between tokens and token(id) for each token, in order.
  template <class Plain, class Token>
  void split(std::string_view s, Plain&& plain, Token&& token) const {
    size_t start = 0;  // start of the pending plain text
    size_t pos = 0;
    while (pos < s.size()) {
      const AddedToken* best = nullptr;
      for (const AddedToken* t : by_first_[static_cast<unsigned char>(s[pos])]) {
        if (s.substr(pos).starts_with(t->match) &&
            (!best || t->match.size() > best->match.size())) {
          best = t;
        }
      }
      if (!best) {
        ++pos;
        continue;
      }
      size_t a = pos, b = pos + best->match.size();
      if (best->lstrip) {
        while (a > start) {
          size_t k = a - 1;
          while (k > start && (static_cast<unsigned char>(s[k]) & 0xc0) == 0x80) --k;
          size_t len = 0;
          if (!is_white_space(decode_at(s, k, &len))) break;
          a = k;
        }
      }
      if (best->rstrip) {
        while (b < s.size()) {
          size_t len = 0;
          if (!is_white_space(decode_at(s, b, &len))) break;
          b += len;
        }
      }
      if (a > start) plain(s.substr(start, a - start));
      token(best->id);
      start = pos = b;
    }
    if (start < s.size()) plain(s.substr(start));
  }

 private:
  std::array<std::vector<const AddedToken*>, 256> by_first_;
};

struct PreTokenizer {
  enum class Kind { kSplit, kByteLevel } kind = Kind::kSplit;
  std::unique_ptr<icu::RegexPattern> regex;  // Split's pattern, or ByteLevel's GPT-2 pattern
  bool add_prefix_space = false;
};

enum class DecodeStep { kByteLevel, kByteFallback, kFuse };

// s through the normalizers in order (ASCII text is left alone: the Unicode normal forms keep it).
std::string_view normalize(const std::vector<const icu::Normalizer2*>& normalizers,
                           std::string_view s, std::string& buffer, const std::string& name) {
  bool ascii =
      std::all_of(s.begin(), s.end(), [](char c) { return static_cast<unsigned char>(c) < 0x80; });
  if (normalizers.empty() || ascii) return s;
  UErrorCode st = U_ZERO_ERROR;
  icu::UnicodeString u = icu::UnicodeString::fromUTF8(icu::StringPiece(s.data(), s.size()));
  for (const icu::Normalizer2* n : normalizers) u = n->normalize(u, st);
  if (U_FAILURE(st)) fail(name, ": normalization failed: ", u_errorName(st));
  buffer.clear();
  u.toUTF8String(buffer);
  return buffer;
}

// Splits s at the matches of pattern, every match and every gap its own piece (behavior Isolated).
void split_isolated(const icu::RegexPattern& pattern, std::string_view s,
                    std::vector<std::string>& out, const std::string& name) {
  UErrorCode st = U_ZERO_ERROR;
  UText* ut = utext_openUTF8(nullptr, s.data(), static_cast<int64_t>(s.size()), &st);
  std::unique_ptr<icu::RegexMatcher> m(pattern.matcher(st));
  if (U_FAILURE(st)) fail(name, ": ICU regex matcher: ", u_errorName(st));
  m->reset(ut);
  int64_t last = 0;
  while (m->find(st)) {
    int64_t a = m->start64(st), b = m->end64(st);
    if (a > last) out.emplace_back(s.substr(last, a - last));
    if (b > a) out.emplace_back(s.substr(a, b - a));
    last = b;
  }
  utext_close(ut);
  if (U_FAILURE(st)) fail(name, ": ICU regex match failed: ", u_errorName(st));
  if (static_cast<size_t>(last) < s.size()) out.emplace_back(s.substr(last));
}

}  // namespace

struct HfBpeTokenizer::Impl {
  std::string name;  // the file, for errors
  std::vector<TokenizerFile> files;
  std::vector<const icu::Normalizer2*> normalizers;
  std::vector<PreTokenizer> pre_tokenizers;
  bool has_decoder = false;
  std::vector<DecodeStep> decode_steps;

  // BPE model.
  StringMap<int32_t> vocab;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a << 32 | b) -> (rank, a+b)
  int32_t unk_id = -1;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  std::array<int32_t, 256> byte_ids{};  // <0xXX> ids for byte_fallback, -1 where missing

  std::vector<AddedToken> added;
  AddedMatcher raw_matcher;         // normalized=false tokens, matched on the input text
  AddedMatcher normalized_matcher;  // normalized=true tokens, matched on the normalized text
  std::vector<std::string> id_to_token;

  std::vector<int32_t> template_prefix, template_suffix;  // post-processor ids around $A
  int32_t bos = -1, eos = -1, pad = -1;

  // Cache of BPE ids per pre-token (the byte-level word): one per thread and tokenizer, so the
  // threads that share a tokenizer never wait for each other. A thread's caches of tokenizers
  // that are gone are dropped when that thread next makes one.
  static constexpr size_t kCacheCapacity = 1 << 16;  // words per thread; cleared when full
  static constexpr size_t kMaxCachedWord = 128;      // bytes
  using WordCache = StringMap<std::vector<int32_t>>;
  std::shared_ptr<const int> alive = std::make_shared<const int>(0);  // identity for the caches
  WordCache& thread_cache() const;

  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  void bpe_cached(std::string_view word, std::vector<int32_t>& out, WordCache& cache) const;
  void encode_plain(std::string_view normalized, std::vector<int32_t>& out, WordCache& cache) const;
};

void HfBpeTokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    auto it = vocab.find(word);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  struct Symbol {
    int32_t id;
    int prev, next;
  };
  std::vector<Symbol> syms;
  syms.reserve(word.size());
  bool last_unk = false;
  for (size_t i = 0; i < word.size();) {
    size_t n = std::min(text::utf8_length(static_cast<unsigned char>(word[i])), word.size() - i);
    std::string_view ch = word.substr(i, n);
    i += n;
    auto push = [&](int32_t id) {
      int k = static_cast<int>(syms.size());
      syms.push_back({id, k - 1, -1});
      if (k > 0) syms[k - 1].next = k;
    };
    auto it = vocab.find(ch);
    if (it != vocab.end()) {
      push(it->second);
      last_unk = false;
      continue;
    }
    if (byte_fallback && std::all_of(ch.begin(), ch.end(), [&](char c) {
          return byte_ids[static_cast<unsigned char>(c)] >= 0;
        })) {
      for (char c : ch) push(byte_ids[static_cast<unsigned char>(c)]);
      last_unk = false;
      continue;
    }
    if (unk_id >= 0) {
      if (!(fuse_unk && last_unk)) push(unk_id);
      last_unk = true;
    }
    // Without an unk_token, `tokenizers` drops a character it cannot spell.
  }
  if (syms.empty()) return;

  struct Candidate {
    int32_t rank;
    int pos;
    int32_t left, right;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  // Lowest rank first, leftmost among equal ranks (the order `tokenizers` merges in).
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  auto consider = [&](int pos) {
    if (pos < 0) return;
    int nx = syms[pos].next;
    if (nx < 0) return;
    uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(syms[pos].id)) << 32) |
                   static_cast<uint32_t>(syms[nx].id);
    auto it = merges.find(key);
    if (it != merges.end()) queue.push({it->second.first, pos, syms[pos].id, syms[nx].id});
  };
  for (int k = 0; k + 1 < static_cast<int>(syms.size()); ++k) consider(k);
  while (!queue.empty()) {
    Candidate c = queue.top();
    queue.pop();
    Symbol& s = syms[c.pos];
    if (s.id != c.left || s.next < 0 || syms[s.next].id != c.right) continue;  // stale
    int nx = s.next;
    s.id = merges
               .at((static_cast<uint64_t>(static_cast<uint32_t>(c.left)) << 32) |
                   static_cast<uint32_t>(c.right))
               .second;
    s.next = syms[nx].next;
    if (s.next >= 0) syms[s.next].prev = c.pos;
    syms[nx].id = -1;  // dead
    consider(s.prev);
    consider(c.pos);
  }
  for (int k = 0; k >= 0; k = syms[k].next) out.push_back(syms[k].id);
}

HfBpeTokenizer::Impl::WordCache& HfBpeTokenizer::Impl::thread_cache() const {
  struct Entry {
    std::weak_ptr<const int> owner;
    WordCache words;
  };
  thread_local std::vector<Entry> caches;
  for (Entry& e : caches) {
    if (!e.owner.owner_before(alive) && !alive.owner_before(e.owner)) return e.words;
  }
  std::erase_if(caches, [](const Entry& e) { return e.owner.expired(); });
  caches.push_back({alive, {}});
  return caches.back().words;
}

void HfBpeTokenizer::Impl::bpe_cached(std::string_view word, std::vector<int32_t>& out,
                                      WordCache& cache) const {
  if (word.size() > kMaxCachedWord) {
    bpe(word, out);
    return;
  }
  auto it = cache.find(word);
  if (it != cache.end()) {
    out.insert(out.end(), it->second.begin(), it->second.end());
    return;
  }
  size_t begin = out.size();
  bpe(word, out);
  if (cache.size() >= kCacheCapacity) cache.clear();
  cache.emplace(std::string(word),
                std::vector<int32_t>(out.begin() + static_cast<std::ptrdiff_t>(begin), out.end()));
}

// Pre-tokenizers and BPE over one piece of normalized text that holds no added token.
void HfBpeTokenizer::Impl::encode_plain(std::string_view normalized, std::vector<int32_t>& out,
                                        WordCache& cache) const {
  std::vector<std::string> pieces{std::string(normalized)};
  std::vector<std::string> next;
  for (const PreTokenizer& p : pre_tokenizers) {
    next.clear();
    for (std::string& piece : pieces) {
      if (p.kind == PreTokenizer::Kind::kSplit) {
        split_isolated(*p.regex, piece, next, name);
        continue;
      }
      // ByteLevel: the prefix space, the GPT-2 split, then every byte as its printable character.
      if (p.add_prefix_space && !piece.starts_with(' ')) piece = ' ' + piece;
      size_t first = next.size();
      if (p.regex) {
        split_isolated(*p.regex, piece, next, name);
      } else {
        next.push_back(std::move(piece));
      }
      const auto& map = byte_level_map();
      for (size_t k = first; k < next.size(); ++k) {
        std::string mapped;
        mapped.reserve(next[k].size() * 2);
        for (char c : next[k]) mapped += map.byte_to_utf8[static_cast<unsigned char>(c)];
        next[k] = std::move(mapped);
      }
    }
    std::swap(pieces, next);
  }
  for (const std::string& word : pieces) {
    if (!word.empty()) bpe_cached(word, out, cache);
  }
}

HfBpeTokenizer::HfBpeTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
HfBpeTokenizer::~HfBpeTokenizer() = default;

namespace {

// Reading tokenizer.json: every error names the file and the field.
struct Reader {
  const std::string& name;

  [[noreturn]] void bad(std::string_view field, std::string_view what) const {
    fail(name, ": field '", field, "': ", what);
  }
  const json& at(const json& obj, const char* key, std::string_view field) const {
    if (!obj.is_object() || !obj.contains(key)) bad(field, "missing");
    return obj.at(key);
  }
  std::string string_at(const json& obj, const char* key, std::string_view field) const {
    const json& v = at(obj, key, field);
    if (!v.is_string()) bad(field, "expected a string");
    return v.get<std::string>();
  }
  bool bool_or(const json& obj, const char* key, bool dflt, std::string_view field) const {
    if (!obj.contains(key) || obj.at(key).is_null()) return dflt;
    if (!obj.at(key).is_boolean()) bad(field, "expected true or false");
    return obj.at(key).get<bool>();
  }
  std::string type_of(const json& obj, std::string_view field) const {
    if (!obj.is_object()) bad(field, "expected an object");
    return string_at(obj, "type", std::string(field) + ".type");
  }
};

std::unique_ptr<icu::RegexPattern> compile(const std::string& pattern, const Reader& r,
                                           std::string_view field) {
  // `tokenizers` compiles patterns with Oniguruma. ICU reads the constructs these patterns use the
  // same way: \p{L}, \p{N}, (?i:...), (?!...), and \s as Unicode White_Space (with \v and U+0085,
  // without U+001C..U+001F); the reference texts hold those characters.
  const std::string& icu_pattern = pattern;
  UErrorCode st = U_ZERO_ERROR;
  UParseError pe{};
  std::unique_ptr<icu::RegexPattern> p(
      icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(icu_pattern), 0, pe, st));
  if (U_FAILURE(st)) {
    r.bad(field, "regex does not compile (" + std::string(u_errorName(st)) + " at offset " +
                     std::to_string(pe.offset) + "): " + pattern);
  }
  return p;
}

void read_normalizer(const json& j, const Reader& r, const std::string& field,
                     HfBpeTokenizer::Impl& impl) {
  if (j.is_null()) return;
  std::string type = r.type_of(j, field);
  UErrorCode st = U_ZERO_ERROR;
  const icu::Normalizer2* n = nullptr;
  if (type == "Sequence") {
    const json& list = r.at(j, "normalizers", field + ".normalizers");
    if (!list.is_array()) r.bad(field + ".normalizers", "expected an array");
    for (size_t i = 0; i < list.size(); ++i) {
      read_normalizer(list[i], r, field + ".normalizers[" + std::to_string(i) + "]", impl);
    }
    return;
  } else if (type == "NFC") {
    n = icu::Normalizer2::getNFCInstance(st);
  } else if (type == "NFD") {
    n = icu::Normalizer2::getNFDInstance(st);
  } else if (type == "NFKC") {
    n = icu::Normalizer2::getNFKCInstance(st);
  } else if (type == "NFKD") {
    n = icu::Normalizer2::getNFKDInstance(st);
  } else {
    r.bad(field + ".type", "normalizer type '" + type +
                               "' is not supported (supported: NFC, NFD, NFKC, NFKD, Sequence)");
  }
  if (U_FAILURE(st) || !n) r.bad(field, "ICU normalizer unavailable");
  impl.normalizers.push_back(n);
}

void read_pre_tokenizer(const json& j, const Reader& r, const std::string& field,
                        HfBpeTokenizer::Impl& impl) {
  if (j.is_null()) return;
  std::string type = r.type_of(j, field);
  if (type == "Sequence") {
    const json& list = r.at(j, "pretokenizers", field + ".pretokenizers");
    if (!list.is_array()) r.bad(field + ".pretokenizers", "expected an array");
    for (size_t i = 0; i < list.size(); ++i) {
      read_pre_tokenizer(list[i], r, field + ".pretokenizers[" + std::to_string(i) + "]", impl);
    }
    return;
  }
  PreTokenizer p;
  if (type == "Split") {
    p.kind = PreTokenizer::Kind::kSplit;
    const json& pat = r.at(j, "pattern", field + ".pattern");
    if (pat.is_object() && pat.contains("Regex") && pat.at("Regex").is_string()) {
      p.regex = compile(pat.at("Regex").get<std::string>(), r, field + ".pattern.Regex");
    } else if (pat.is_object() && pat.contains("String") && pat.at("String").is_string()) {
      std::string lit = pat.at("String").get<std::string>();
      if (lit.empty()) r.bad(field + ".pattern.String", "empty");
      std::string quoted = "\\Q" + lit + "\\E";
      if (lit.find("\\E") != std::string::npos) r.bad(field + ".pattern.String", "holds \\E");
      UErrorCode st = U_ZERO_ERROR;
      UParseError pe{};
      p.regex.reset(icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(quoted), 0, pe, st));
      if (U_FAILURE(st)) r.bad(field + ".pattern.String", "cannot be matched");
    } else {
      r.bad(field + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    std::string behavior = r.string_at(j, "behavior", field + ".behavior");
    if (behavior != "Isolated") {
      r.bad(field + ".behavior", "'" + behavior + "' is not supported (supported: Isolated)");
    }
    if (r.bool_or(j, "invert", false, field + ".invert")) {
      r.bad(field + ".invert", "true is not supported");
    }
  } else if (type == "ByteLevel") {
    p.kind = PreTokenizer::Kind::kByteLevel;
    p.add_prefix_space = r.bool_or(j, "add_prefix_space", true, field + ".add_prefix_space");
    if (r.bool_or(j, "use_regex", true, field + ".use_regex")) {
      p.regex = compile(std::string(kGpt2Pattern), r, field + " (GPT-2 pattern)");
    }
  } else {
    r.bad(field + ".type", "pre-tokenizer type '" + type +
                               "' is not supported (supported: Split, ByteLevel, Sequence)");
  }
  impl.pre_tokenizers.push_back(std::move(p));
}

void read_decoder(const json& j, const Reader& r, const std::string& field,
                  HfBpeTokenizer::Impl& impl) {
  std::string type = r.type_of(j, field);
  if (type == "Sequence") {
    const json& list = r.at(j, "decoders", field + ".decoders");
    if (!list.is_array()) r.bad(field + ".decoders", "expected an array");
    for (size_t i = 0; i < list.size(); ++i) {
      read_decoder(list[i], r, field + ".decoders[" + std::to_string(i) + "]", impl);
    }
  } else if (type == "ByteLevel") {
    impl.decode_steps.push_back(DecodeStep::kByteLevel);
  } else if (type == "ByteFallback") {
    impl.decode_steps.push_back(DecodeStep::kByteFallback);
  } else if (type == "Fuse") {
    impl.decode_steps.push_back(DecodeStep::kFuse);
  } else {
    r.bad(field + ".type", "decoder type '" + type +
                               "' is not supported (supported: ByteLevel, ByteFallback, Fuse, "
                               "Sequence)");
  }
}

void read_post_processor(const json& j, const Reader& r, const std::string& field,
                         HfBpeTokenizer::Impl& impl, bool* seen_template) {
  if (j.is_null()) return;
  std::string type = r.type_of(j, field);
  if (type == "ByteLevel") return;  // offsets only: no ids
  if (type == "Sequence") {
    const json& list = r.at(j, "processors", field + ".processors");
    if (!list.is_array()) r.bad(field + ".processors", "expected an array");
    for (size_t i = 0; i < list.size(); ++i) {
      read_post_processor(list[i], r, field + ".processors[" + std::to_string(i) + "]", impl,
                          seen_template);
    }
    return;
  }
  if (type != "TemplateProcessing") {
    r.bad(field + ".type",
          "post-processor type '" + type +
              "' is not supported (supported: ByteLevel, TemplateProcessing, Sequence)");
  }
  if (*seen_template) r.bad(field, "a second TemplateProcessing");
  *seen_template = true;
  const json& single = r.at(j, "single", field + ".single");
  const json& specials = r.at(j, "special_tokens", field + ".special_tokens");
  if (!single.is_array()) r.bad(field + ".single", "expected an array");
  bool seen_a = false;
  for (size_t i = 0; i < single.size(); ++i) {
    std::string f = field + ".single[" + std::to_string(i) + "]";
    const json& item = single[i];
    if (item.is_object() && item.contains("Sequence")) {
      std::string id = r.string_at(item.at("Sequence"), "id", f + ".Sequence.id");
      if (id != "A" || seen_a) r.bad(f + ".Sequence.id", "expected one sequence A");
      seen_a = true;
    } else if (item.is_object() && item.contains("SpecialToken")) {
      std::string id = r.string_at(item.at("SpecialToken"), "id", f + ".SpecialToken.id");
      std::string sf = field + ".special_tokens." + id;
      if (!specials.is_object() || !specials.contains(id)) r.bad(sf, "missing");
      const json& ids = r.at(specials.at(id), "ids", sf + ".ids");
      if (!ids.is_array()) r.bad(sf + ".ids", "expected an array of ids");
      for (const json& v : ids) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0) r.bad(sf + ".ids", "expected ids");
        (seen_a ? impl.template_suffix : impl.template_prefix).push_back(v.get<int32_t>());
      }
    } else {
      r.bad(f, "expected {\"Sequence\": ...} or {\"SpecialToken\": ...}");
    }
  }
  if (!seen_a) r.bad(field + ".single", "has no sequence A");
}

int32_t read_id(const json& v, const Reader& r, const std::string& field) {
  if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX) {
    r.bad(field, "expected a non-negative id");
  }
  return v.get<int32_t>();
}

void read_model(const json& m, const Reader& r, HfBpeTokenizer::Impl& impl) {
  std::string type = r.type_of(m, "model");
  if (type != "BPE") {
    r.bad("model.type", "model type '" + type + "' is not supported (supported: BPE)");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (m.contains(key) && !m.at(key).is_null() &&
        !(m.at(key).is_string() && m.at(key).get<std::string>().empty())) {
      r.bad(std::string("model.") + key, "must be null or empty (these tokenizers have none)");
    }
  }
  if (m.contains("dropout") && !m.at("dropout").is_null() &&
      !(m.at("dropout").is_number() && m.at("dropout").get<double>() == 0.0)) {
    r.bad("model.dropout", "BPE dropout is random: must be null");
  }
  const json& vocab = r.at(m, "vocab", "model.vocab");
  if (!vocab.is_object()) r.bad("model.vocab", "expected an object of token -> id");
  for (const auto& [token, id] : vocab.items()) {
    impl.vocab[token] = read_id(id, r, "model.vocab." + token);
  }
  impl.fuse_unk = r.bool_or(m, "fuse_unk", false, "model.fuse_unk");
  impl.byte_fallback = r.bool_or(m, "byte_fallback", false, "model.byte_fallback");
  impl.ignore_merges = r.bool_or(m, "ignore_merges", false, "model.ignore_merges");
  if (m.contains("unk_token") && !m.at("unk_token").is_null()) {
    std::string unk = r.string_at(m, "unk_token", "model.unk_token");
    auto it = impl.vocab.find(unk);
    if (it == impl.vocab.end()) r.bad("model.unk_token", "'" + unk + "' is not in model.vocab");
    impl.unk_id = it->second;
  }
  impl.byte_ids.fill(-1);
  if (impl.byte_fallback) {
    static constexpr char kHex[] = "0123456789ABCDEF";
    for (int b = 0; b < 256; ++b) {
      std::string tok = std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">";
      auto it = impl.vocab.find(tok);
      if (it != impl.vocab.end()) impl.byte_ids[b] = it->second;
    }
  }
  const json& merges = r.at(m, "merges", "model.merges");
  if (!merges.is_array()) r.bad("model.merges", "expected an array");
  for (size_t i = 0; i < merges.size(); ++i) {
    std::string f = "model.merges[" + std::to_string(i) + "]";
    const json& e = merges[i];
    std::string a, b;
    if (e.is_string()) {  // "a b" (older files)
      std::string s = e.get<std::string>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        r.bad(f, "expected \"a b\" (two tokens and one space)");
      }
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      r.bad(f, "expected \"a b\" or [\"a\", \"b\"]");
    }
    auto ia = impl.vocab.find(a), ib = impl.vocab.find(b), iab = impl.vocab.find(a + b);
    if (ia == impl.vocab.end() || ib == impl.vocab.end() || iab == impl.vocab.end()) {
      r.bad(f, "'" + a + "', '" + b + "' or their merge is not in model.vocab");
    }
    uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) |
                   static_cast<uint32_t>(ib->second);
    impl.merges.emplace(key, std::make_pair(static_cast<int32_t>(i), iab->second));
  }
}

// A token named in tokenizer_config.json: a string, {"content": ...} or null.
int32_t config_token(const json& cfg, const char* key, const std::string& config_name,
                     const HfBpeTokenizer& tok) {
  if (!cfg.contains(key) || cfg.at(key).is_null()) return -1;
  const json& v = cfg.at(key);
  std::string content;
  if (v.is_string()) {
    content = v.get<std::string>();
  } else if (v.is_object() && v.contains("content") && v.at("content").is_string()) {
    content = v.at("content").get<std::string>();
  } else {
    fail(config_name, ": field '", key, "': expected a token string, {\"content\": ...} or null");
  }
  auto id = tok.token_to_id(content);
  if (!id)
    fail(config_name, ": field '", key, "': '", content, "' is not a token of the tokenizer");
  return *id;
}

}  // namespace

std::unique_ptr<HfBpeTokenizer> HfBpeTokenizer::parse(const std::string& json_text,
                                                      const std::string& name) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    fail(name, ": not JSON (", e.what(), ")");
  }
  auto impl = std::make_unique<Impl>();
  impl->name = name;
  Reader r{impl->name};
  if (!j.is_object()) r.bad("(top level)", "expected an object");
  for (const char* key : {"truncation", "padding"}) {
    if (j.contains(key) && !j.at(key).is_null()) {
      r.bad(key, "must be null (moetrace truncates with max_length and never pads here)");
    }
  }
  read_model(r.at(j, "model", "model"), r, *impl);
  read_normalizer(j.value("normalizer", json()), r, "normalizer", *impl);
  read_pre_tokenizer(j.value("pre_tokenizer", json()), r, "pre_tokenizer", *impl);
  bool seen_template = false;
  read_post_processor(j.value("post_processor", json()), r, "post_processor", *impl,
                      &seen_template);
  if (j.contains("decoder") && !j.at("decoder").is_null()) {
    impl->has_decoder = true;
    read_decoder(j.at("decoder"), r, "decoder", *impl);
  }

  if (j.contains("added_tokens")) {
    const json& list = j.at("added_tokens");
    if (!list.is_array()) r.bad("added_tokens", "expected an array");
    impl->added.reserve(list.size());
    for (size_t i = 0; i < list.size(); ++i) {
      std::string f = "added_tokens[" + std::to_string(i) + "]";
      AddedToken t;
      t.id = read_id(r.at(list[i], "id", f + ".id"), r, f + ".id");
      t.content = r.string_at(list[i], "content", f + ".content");
      if (t.content.empty()) r.bad(f + ".content", "empty");
      if (r.bool_or(list[i], "single_word", false, f + ".single_word")) {
        r.bad(f + ".single_word", "true is not supported");
      }
      t.lstrip = r.bool_or(list[i], "lstrip", false, f + ".lstrip");
      t.rstrip = r.bool_or(list[i], "rstrip", false, f + ".rstrip");
      t.normalized = r.bool_or(list[i], "normalized", false, f + ".normalized");
      t.special = r.bool_or(list[i], "special", false, f + ".special");
      impl->added.push_back(std::move(t));
    }
    // `tokenizers` looks for a normalized=true token's content as the normalizer writes it.
    std::string buffer;
    for (AddedToken& t : impl->added) {
      t.match = t.normalized ? std::string(normalize(impl->normalizers, t.content, buffer, name))
                             : t.content;
    }
    for (const AddedToken& t : impl->added) {
      (t.normalized ? impl->normalized_matcher : impl->raw_matcher).add(&t);
    }
  }

  int32_t max_id = -1;
  for (const auto& [tok, id] : impl->vocab) max_id = std::max(max_id, id);
  for (const AddedToken& t : impl->added) max_id = std::max(max_id, t.id);
  impl->id_to_token.assign(static_cast<size_t>(max_id + 1), std::string());
  for (const auto& [tok, id] : impl->vocab) impl->id_to_token[static_cast<size_t>(id)] = tok;
  // `tokenizers` gives a normalized=true token back as the normalizer wrote it.
  for (const AddedToken& t : impl->added) impl->id_to_token[static_cast<size_t>(t.id)] = t.match;
  for (int32_t id : impl->template_prefix) {
    if (id > max_id) r.bad("post_processor", "template id " + std::to_string(id) + " unknown");
  }
  for (int32_t id : impl->template_suffix) {
    if (id > max_id) r.bad("post_processor", "template id " + std::to_string(id) + " unknown");
  }
  return std::unique_ptr<HfBpeTokenizer>(new HfBpeTokenizer(std::move(impl)));
}

std::unique_ptr<HfBpeTokenizer> HfBpeTokenizer::load(
    const std::filesystem::path& tokenizer_json, const std::filesystem::path& tokenizer_config) {
  std::string bytes = text::read_file_bytes(tokenizer_json, "tokenizer.json");
  auto tok = parse(bytes, tokenizer_json.string());
  tok->impl_->files.push_back({tokenizer_json.filename().string(), text::hex_sha256(bytes)});
  if (!tokenizer_config.empty()) {
    std::string cfg_bytes = text::read_file_bytes(tokenizer_config, "tokenizer_config.json");
    json cfg;
    try {
      cfg = json::parse(cfg_bytes);
    } catch (const json::exception& e) {
      fail(tokenizer_config.string(), ": not JSON (", e.what(), ")");
    }
    if (!cfg.is_object()) fail(tokenizer_config.string(), ": expected a JSON object");
    tok->impl_->bos = config_token(cfg, "bos_token", tokenizer_config.string(), *tok);
    tok->impl_->eos = config_token(cfg, "eos_token", tokenizer_config.string(), *tok);
    tok->impl_->pad = config_token(cfg, "pad_token", tokenizer_config.string(), *tok);
    tok->impl_->files.push_back(
        {tokenizer_config.filename().string(), text::hex_sha256(cfg_bytes)});
  }
  return tok;
}

std::vector<int32_t> HfBpeTokenizer::encode(std::string_view text, int max_length) const {
  const Impl& m = *impl_;
  std::vector<int32_t> ids;
  std::string normalized;
  Impl::WordCache& cache = m.thread_cache();
  auto plain_normalized = [&](std::string_view piece) { m.encode_plain(piece, ids, cache); };
  auto token = [&](int32_t id) { ids.push_back(id); };
  auto plain_raw = [&](std::string_view piece) {
    std::string_view norm = normalize(m.normalizers, piece, normalized, m.name);
    if (m.normalized_matcher.empty()) {
      m.encode_plain(norm, ids, cache);
    } else {
      std::string copy(norm);  // `normalized` is reused by the next piece
      m.normalized_matcher.split(copy, plain_normalized, token);
    }
  };
  m.raw_matcher.split(text, plain_raw, token);

  if (max_length > 0) {
    size_t extra = m.template_prefix.size() + m.template_suffix.size();
    size_t budget = static_cast<size_t>(max_length) > extra ? max_length - extra : 0;
    if (ids.size() > budget) ids.resize(budget);
  }
  if (!m.template_prefix.empty())
    ids.insert(ids.begin(), m.template_prefix.begin(), m.template_prefix.end());
  ids.insert(ids.end(), m.template_suffix.begin(), m.template_suffix.end());
  if (max_length > 0 && ids.size() > static_cast<size_t>(max_length)) ids.resize(max_length);
  return ids;
}

std::string HfBpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  const Impl& m = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= m.id_to_token.size() ||
        m.id_to_token[static_cast<size_t>(id)].empty()) {
      fail("tokenizer: id ", id, " is outside the vocabulary of ", m.name);
    }
    tokens.push_back(m.id_to_token[static_cast<size_t>(id)]);
  }
  if (!m.has_decoder) {  // `tokenizers` joins the tokens with spaces when there is no decoder
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
    return out;
  }
  for (DecodeStep step : m.decode_steps) {
    if (step == DecodeStep::kByteLevel) {
      // Each token's characters back to bytes (a token with a character outside the byte
      // alphabet, e.g. an added token, stays as it is), then UTF-8 with U+FFFD for bad bytes.
      const auto& map = byte_level_map();
      std::string bytes;
      for (const std::string& t : tokens) {
        std::string tb;
        bool all = true;
        for (size_t i = 0; i < t.size();) {
          size_t len = 0;
          char32_t cp = decode_at(t, i, &len);
          auto it = map.char_to_byte.find(cp);
          if (it == map.char_to_byte.end()) {
            all = false;
            break;
          }
          tb += static_cast<char>(it->second);
          i += len;
        }
        bytes += all ? tb : t;
      }
      tokens.assign(1, text::utf8_lossy(bytes));
    } else if (step == DecodeStep::kByteFallback) {
      // Runs of <0xXX> tokens become their bytes when valid UTF-8, else one U+FFFD per byte.
      std::vector<std::string> out;
      std::string run;
      size_t run_len = 0;
      auto flush = [&] {
        if (run_len == 0) return;
        if (text::utf8_valid(run)) {
          out.push_back(run);
        } else {
          for (size_t i = 0; i < run_len; ++i) out.emplace_back("\xef\xbf\xbd");
        }
        run.clear();
        run_len = 0;
      };
      for (const std::string& t : tokens) {
        if (t.size() == 6 && t.starts_with("<0x") && t[5] == '>' &&
            std::isxdigit(static_cast<unsigned char>(t[3])) &&
            std::isxdigit(static_cast<unsigned char>(t[4]))) {
          run += static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16));
          ++run_len;
        } else {
          flush();
          out.push_back(t);
        }
      }
      flush();
      tokens = std::move(out);
    } else {  // kFuse
      std::string all;
      for (const std::string& t : tokens) all += t;
      tokens.assign(1, all);
    }
  }
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

std::optional<int32_t> HfBpeTokenizer::token_to_id(std::string_view token) const {
  for (const AddedToken& t : impl_->added) {
    if (t.content == token) return t.id;
  }
  auto it = impl_->vocab.find(token);
  if (it == impl_->vocab.end()) return std::nullopt;
  return it->second;
}

std::string HfBpeTokenizer::sha256() const {
  return impl_->files.empty() ? std::string() : impl_->files.front().sha256;
}
std::vector<TokenizerFile> HfBpeTokenizer::files() const { return impl_->files; }
int HfBpeTokenizer::vocab_size() const { return static_cast<int>(impl_->id_to_token.size()); }
int32_t HfBpeTokenizer::bos_id() const { return impl_->bos; }
int32_t HfBpeTokenizer::eos_id() const { return impl_->eos; }
int32_t HfBpeTokenizer::pad_id() const { return impl_->pad; }

}  // namespace moetrace
