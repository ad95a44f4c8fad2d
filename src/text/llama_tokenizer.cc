#include "text/llama_tokenizer.h"

#include <sentencepiece_processor.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "text/text_util.h"

namespace moetrace {

namespace {

// Minimal protobuf wire reading of the SentencePiece ModelProto (sentencepiece_model.proto): the
// Debian package ships no generated header, and only a few fields matter here.
struct WireField {
  uint32_t number = 0;
  uint32_t wire_type = 0;
  uint64_t varint = 0;       // wire type 0
  std::string_view payload;  // wire type 2
  std::string_view raw;      // the whole field, tag included
};

bool read_varint(std::string_view s, size_t* pos, uint64_t* v) {
  *v = 0;
  for (int shift = 0; shift < 64 && *pos < s.size(); shift += 7) {
    auto b = static_cast<unsigned char>(s[(*pos)++]);
    *v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (!(b & 0x80)) return true;
  }
  return false;
}

// The fields of one message; error naming `file` when the bytes are not protobuf.
std::vector<WireField> read_fields(std::string_view s, const std::string& file) {
  std::vector<WireField> out;
  size_t pos = 0;
  auto bad = [&] { fail(file, ": not a SentencePiece model (bad protobuf at byte ", pos, ")"); };
  while (pos < s.size()) {
    size_t start = pos;
    uint64_t tag = 0;
    if (!read_varint(s, &pos, &tag)) bad();
    WireField f;
    f.number = static_cast<uint32_t>(tag >> 3);
    f.wire_type = static_cast<uint32_t>(tag & 7);
    if (f.wire_type == 0) {
      if (!read_varint(s, &pos, &f.varint)) bad();
    } else if (f.wire_type == 1 || f.wire_type == 5) {
      pos += f.wire_type == 1 ? 8 : 4;
      if (pos > s.size()) bad();
    } else if (f.wire_type == 2) {
      uint64_t len = 0;
      if (!read_varint(s, &pos, &len) || len > s.size() - pos) bad();
      f.payload = s.substr(pos, len);
      pos += len;
    } else {
      bad();
    }
    f.raw = s.substr(start, pos - start);
    out.push_back(f);
  }
  return out;
}

void write_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7f) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}

struct SpmFacts {
  int model_type = 1;  // TrainerSpec.model_type: 1 UNIGRAM, 2 BPE
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
  bool has_charsmap = false;
  bool has_user_defined = false;
  std::string proto_without_dummy_prefix;  // the model with NormalizerSpec.add_dummy_prefix = false
};

SpmFacts read_spm(std::string_view proto, const std::string& file) {
  SpmFacts facts;
  std::string& out = facts.proto_without_dummy_prefix;
  for (const WireField& f : read_fields(proto, file)) {
    if (f.number == 1 && f.wire_type == 2) {  // pieces
      for (const WireField& p : read_fields(f.payload, file)) {
        if (p.number == 3 && p.wire_type == 0 && p.varint == 4) facts.has_user_defined = true;
      }
    } else if (f.number == 2 && f.wire_type == 2) {  // trainer_spec
      for (const WireField& t : read_fields(f.payload, file)) {
        if (t.number == 3 && t.wire_type == 0) facts.model_type = static_cast<int>(t.varint);
      }
    } else if (f.number == 3 && f.wire_type == 2) {  // normalizer_spec
      std::string spec;
      for (const WireField& n : read_fields(f.payload, file)) {
        if (n.number == 2 && n.wire_type == 2 && !n.payload.empty()) facts.has_charsmap = true;
        if (n.number == 3 && n.wire_type == 0) {
          facts.add_dummy_prefix = n.varint != 0;
          continue;  // rewritten below
        }
        if (n.number == 4 && n.wire_type == 0) facts.remove_extra_whitespaces = n.varint != 0;
        if (n.number == 5 && n.wire_type == 0) facts.escape_whitespaces = n.varint != 0;
        spec += n.raw;
      }
      spec += '\x18';  // field 3, varint
      spec += '\x00';  // add_dummy_prefix = false
      out += '\x1a';   // field 3, length-delimited
      write_varint(out, spec.size());
      out += spec;
      continue;
    } else if (f.number == 4) {
      continue;  // self_test_data: its samples were encoded with the dummy prefix
    }
    out += f.raw;
  }
  return facts;
}

const std::string kMeta = "\xe2\x96\x81";  // "▁", SentencePiece's space

}  // namespace

struct LlamaSpTokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  std::string name;
  std::vector<TokenizerFile> files;
  enum class Prepend { kAlways, kFirst, kNever } prepend = Prepend::kFirst;
  bool add_bos = true;
  bool add_eos = false;
  int32_t bos = -1, eos = -1, pad = -1;
  std::vector<std::pair<std::string, int32_t>> specials;  // control pieces and <unk>, longest first
};

LlamaSpTokenizer::LlamaSpTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LlamaSpTokenizer::~LlamaSpTokenizer() = default;

std::unique_ptr<LlamaSpTokenizer> LlamaSpTokenizer::load(
    const std::filesystem::path& tokenizer_model, const std::filesystem::path& tokenizer_config) {
  const std::string file = tokenizer_model.string();
  std::string bytes = text::read_file_bytes(tokenizer_model, "the SentencePiece model");
  SpmFacts facts = read_spm(bytes, file);
  if (facts.model_type != 2) {
    fail(file, ": trainer_spec.model_type is ", facts.model_type,
         ", expected 2 (BPE, as Llama's and Mixtral's tokenizer.model)");
  }
  if (facts.has_charsmap) {
    fail(file,
         ": normalizer_spec has a precompiled charsmap; expected the identity normalization "
         "of Llama's tokenizer.model");
  }
  if (facts.remove_extra_whitespaces || !facts.escape_whitespaces) {
    fail(file,
         ": normalizer_spec expected remove_extra_whitespaces=false and "
         "escape_whitespaces=true (Llama's settings)");
  }
  if (facts.has_user_defined) fail(file, ": user-defined pieces are not supported");
  auto impl = std::make_unique<Impl>();
  impl->name = file;
  auto status = impl->sp.LoadFromSerializedProto(facts.proto_without_dummy_prefix);
  if (!status.ok()) fail(file, ": not a SentencePiece model (", status.ToString(), ")");
  impl->files.push_back({tokenizer_model.filename().string(), text::hex_sha256(bytes)});
  impl->prepend = facts.add_dummy_prefix ? Impl::Prepend::kFirst : Impl::Prepend::kNever;
  impl->bos = impl->sp.bos_id();
  impl->eos = impl->sp.eos_id();
  impl->pad = impl->sp.pad_id();
  for (int id = 0; id < impl->sp.GetPieceSize(); ++id) {
    if (impl->sp.IsControl(id) || impl->sp.IsUnknown(id)) {
      impl->specials.emplace_back(impl->sp.IdToPiece(id), id);
    }
  }
  std::stable_sort(impl->specials.begin(), impl->specials.end(),
                   [](auto& a, auto& b) { return a.first.size() > b.first.size(); });

  if (!tokenizer_config.empty()) {
    const std::string cfg_name = tokenizer_config.string();
    std::string cfg_bytes = text::read_file_bytes(tokenizer_config, "tokenizer_config.json");
    nlohmann::json cfg;
    try {
      cfg = nlohmann::json::parse(cfg_bytes);
    } catch (const nlohmann::json::exception& e) {
      fail(cfg_name, ": not JSON (", e.what(), ")");
    }
    if (!cfg.is_object()) fail(cfg_name, ": expected a JSON object");
    auto flag = [&](const char* key, bool dflt) {
      if (!cfg.contains(key) || cfg.at(key).is_null()) return dflt;
      if (!cfg.at(key).is_boolean()) fail(cfg_name, ": field '", key, "': expected true or false");
      return cfg.at(key).get<bool>();
    };
    impl->add_bos = flag("add_bos_token", true);
    impl->add_eos = flag("add_eos_token", false);
    bool legacy = flag("legacy", false);
    bool prefix = flag("add_prefix_space", true);
    if (!prefix || !facts.add_dummy_prefix) {
      impl->prepend = Impl::Prepend::kNever;
    } else {
      impl->prepend = legacy ? Impl::Prepend::kAlways : Impl::Prepend::kFirst;
    }
    auto token = [&](const char* key, int32_t dflt) -> int32_t {
      if (!cfg.contains(key)) return dflt;
      const nlohmann::json& v = cfg.at(key);
      if (v.is_null()) return -1;
      std::string content;
      if (v.is_string()) {
        content = v.get<std::string>();
      } else if (v.is_object() && v.contains("content") && v.at("content").is_string()) {
        content = v.at("content").get<std::string>();
      } else {
        fail(cfg_name, ": field '", key, "': expected a token string, {\"content\": ...} or null");
      }
      int id = impl->sp.PieceToId(content);
      if (id == impl->sp.unk_id() && content != impl->sp.IdToPiece(id)) {
        fail(cfg_name, ": field '", key, "': '", content, "' is not a piece of ", file);
      }
      return id;
    };
    impl->bos = token("bos_token", impl->bos);
    impl->eos = token("eos_token", impl->eos);
    impl->pad = token("pad_token", impl->pad);
    impl->files.push_back({tokenizer_config.filename().string(), text::hex_sha256(cfg_bytes)});
  }
  if (impl->add_bos && impl->bos < 0) fail(file, ": add_bos_token is set but there is no <s>");
  if (impl->add_eos && impl->eos < 0) fail(file, ": add_eos_token is set but there is no </s>");
  return std::unique_ptr<LlamaSpTokenizer>(new LlamaSpTokenizer(std::move(impl)));
}

std::vector<int32_t> LlamaSpTokenizer::encode(std::string_view text, int max_length) const {
  const Impl& m = *impl_;
  std::vector<int32_t> ids;
  std::vector<int> piece_ids;
  std::string piece;
  auto plain = [&](std::string_view segment, size_t offset) {
    piece.clear();
    for (char c : segment) {
      if (c == ' ') {
        piece += kMeta;
      } else {
        piece += c;
      }
    }
    bool prepend =
        m.prepend == Impl::Prepend::kAlways || (m.prepend == Impl::Prepend::kFirst && offset == 0);
    if (prepend && !piece.starts_with(kMeta)) piece.insert(0, kMeta);
    piece_ids.clear();
    auto status = m.sp.Encode(piece, &piece_ids);
    if (!status.ok()) fail("tokenizer: SentencePiece failed: ", status.ToString());
    ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
  };
  // Leftmost-longest match of the special pieces written in the text.
  size_t start = 0, pos = 0;
  while (pos < text.size()) {
    const std::pair<std::string, int32_t>* hit = nullptr;
    for (const auto& s : m.specials) {
      if (text.substr(pos).starts_with(s.first)) {
        hit = &s;
        break;  // longest first
      }
    }
    if (!hit) {
      ++pos;
      continue;
    }
    if (pos > start) plain(text.substr(start, pos - start), start);
    ids.push_back(hit->second);
    pos += hit->first.size();
    start = pos;
  }
  if (start < text.size()) plain(text.substr(start), start);

  size_t extra = (m.add_bos ? 1 : 0) + (m.add_eos ? 1 : 0);
  if (max_length > 0) {
    size_t budget = static_cast<size_t>(max_length) > extra ? max_length - extra : 0;
    if (ids.size() > budget) ids.resize(budget);
  }
  if (m.add_bos) ids.insert(ids.begin(), m.bos);
  if (m.add_eos) ids.push_back(m.eos);
  if (max_length > 0 && ids.size() > static_cast<size_t>(max_length)) ids.resize(max_length);
  return ids;
}

std::string LlamaSpTokenizer::decode(const std::vector<int32_t>& ids) const {
  const Impl& m = *impl_;
  std::string out;
  std::string bytes;  // a run of byte pieces
  size_t n_bytes = 0;
  auto flush = [&] {
    if (n_bytes == 0) return;
    if (text::utf8_valid(bytes)) {
      out += bytes;
    } else {
      for (size_t i = 0; i < n_bytes; ++i) out += "\xef\xbf\xbd";
    }
    bytes.clear();
    n_bytes = 0;
  };
  for (int32_t id : ids) {
    if (id < 0 || id >= m.sp.GetPieceSize()) {
      fail("tokenizer: id ", id, " is outside the vocabulary (", m.sp.GetPieceSize(), ") of ",
           m.name);
    }
    if (m.sp.IsControl(id) || m.sp.IsUnknown(id)) continue;
    const std::string& p = m.sp.IdToPiece(id);
    if (m.sp.IsByte(id)) {  // "<0xXX>"
      bytes += static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16));
      ++n_bytes;
      continue;
    }
    flush();
    for (size_t i = 0; i < p.size();) {
      if (p.compare(i, kMeta.size(), kMeta) == 0) {
        out += ' ';
        i += kMeta.size();
      } else {
        out += p[i++];
      }
    }
  }
  flush();
  if (m.prepend != Impl::Prepend::kNever && out.starts_with(' ')) out.erase(0, 1);
  return out;
}

std::string LlamaSpTokenizer::sha256() const { return impl_->files.front().sha256; }
std::vector<TokenizerFile> LlamaSpTokenizer::files() const { return impl_->files; }
int LlamaSpTokenizer::vocab_size() const { return impl_->sp.GetPieceSize(); }
int32_t LlamaSpTokenizer::bos_id() const { return impl_->bos; }
int32_t LlamaSpTokenizer::eos_id() const { return impl_->eos; }
int32_t LlamaSpTokenizer::pad_id() const { return impl_->pad; }

}  // namespace moetrace
