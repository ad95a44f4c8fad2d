#include "text/tokenizer.h"

#include <sentencepiece_processor.h>

#include "core/error.h"
#include "text/text_util.h"

namespace moetrace {

struct T5Tokenizer::Impl {
  sentencepiece::SentencePieceProcessor sp;
  std::string sha256;
  int n_pieces = 0;
};

namespace {

// If a special token starts at text[pos] (text[pos] == '<'), returns its id and sets *len.
// Only the exact spellings count: `<extra_id_7>`, not `<extra_id_07>`.
int32_t match_special(std::string_view text, size_t pos, size_t* len) {
  std::string_view rest = text.substr(pos);
  struct Literal {
    std::string_view s;
    int32_t id;
  };
  static constexpr Literal kLiterals[] = {
      {"</s>", T5Tokenizer::kEos}, {"<pad>", T5Tokenizer::kPad}, {"<unk>", T5Tokenizer::kUnk}};
  for (const auto& l : kLiterals) {
    if (rest.starts_with(l.s)) {
      *len = l.s.size();
      return l.id;
    }
  }
  constexpr std::string_view kExtra = "<extra_id_";
  if (!rest.starts_with(kExtra)) return -1;
  size_t i = kExtra.size();
  int n = 0;
  size_t digits = 0;
  while (i < rest.size() && rest[i] >= '0' && rest[i] <= '9' && digits < 3) {
    n = n * 10 + (rest[i] - '0');
    ++i;
    ++digits;
  }
  if (digits == 0 || i >= rest.size() || rest[i] != '>') return -1;
  if (digits > 1 && rest[kExtra.size()] == '0') return -1;
  if (n >= T5Tokenizer::kExtraIds) return -1;
  *len = i + 1;
  return 32099 - n;
}

}  // namespace

T5Tokenizer::T5Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
T5Tokenizer::T5Tokenizer(T5Tokenizer&&) noexcept = default;
T5Tokenizer& T5Tokenizer::operator=(T5Tokenizer&&) noexcept = default;
T5Tokenizer::~T5Tokenizer() = default;

T5Tokenizer T5Tokenizer::load(const std::filesystem::path& spiece_model) {
  std::string bytes = text::read_file_bytes(spiece_model, "the SentencePiece model");
  auto impl = std::make_unique<Impl>();
  auto status = impl->sp.LoadFromSerializedProto(bytes);
  if (!status.ok()) {
    fail(spiece_model.string(), ": not a SentencePiece model (", status.ToString(), ")");
  }
  impl->n_pieces = impl->sp.GetPieceSize();
  if (impl->sp.pad_id() != kPad || impl->sp.eos_id() != kEos || impl->sp.unk_id() != kUnk) {
    fail(spiece_model.string(),
         ": not a T5 vocabulary (expected pad=0 eos=1 unk=2, got pad=", impl->sp.pad_id(),
         " eos=", impl->sp.eos_id(), " unk=", impl->sp.unk_id(), ")");
  }
  impl->sha256 = text::hex_sha256(bytes);
  return T5Tokenizer(std::move(impl));
}

std::vector<int32_t> T5Tokenizer::encode(std::string_view text, int max_length) const {
  std::vector<int32_t> ids;
  std::vector<int> piece_ids;
  auto encode_plain = [&](std::string_view segment) {
    if (segment.empty()) return;
    piece_ids.clear();
    auto status = impl_->sp.Encode(segment, &piece_ids);
    if (!status.ok()) fail("tokenizer: SentencePiece failed: ", status.ToString());
    ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
  };
  size_t start = 0;
  for (size_t pos = text.find('<'); pos != std::string_view::npos; pos = text.find('<', pos)) {
    size_t len = 0;
    int32_t id = match_special(text, pos, &len);
    if (id < 0) {
      ++pos;
      continue;
    }
    encode_plain(text.substr(start, pos - start));
    ids.push_back(id);
    pos += len;
    start = pos;
  }
  encode_plain(text.substr(start));
  if (max_length > 0 && ids.size() + 1 > static_cast<size_t>(max_length)) {
    ids.resize(static_cast<size_t>(max_length) - 1);
  }
  ids.push_back(kEos);
  return ids;
}

std::string T5Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  std::vector<int> run;
  std::string piece_text;
  auto flush = [&] {
    if (run.empty()) return;
    piece_text.clear();
    auto status = impl_->sp.Decode(run, &piece_text);
    if (!status.ok()) fail("tokenizer: SentencePiece decode failed: ", status.ToString());
    if (!out.empty() && !piece_text.empty()) out += ' ';
    out += piece_text;
    run.clear();
  };
  size_t n = ids.size();
  while (n > 0 && (ids[n - 1] == kPad || ids[n - 1] == kEos)) --n;
  for (size_t i = 0; i < n; ++i) {
    int32_t id = ids[i];
    std::string literal;
    if (id == kPad) {
      literal = "<pad>";
    } else if (id == kEos) {
      literal = "</s>";
    } else if (id == kUnk) {
      literal = "<unk>";
    } else if (id >= impl_->n_pieces && id < impl_->n_pieces + kExtraIds) {
      literal = "<extra_id_" + std::to_string(32099 - id) + ">";
    } else if (id < 0 || id >= impl_->n_pieces) {
      fail("tokenizer: id ", id, " is outside the vocabulary (", vocab_size(), ")");
    } else {
      run.push_back(id);
      continue;
    }
    flush();
    if (!out.empty()) out += ' ';
    out += literal;
  }
  flush();
  return out;
}

std::string T5Tokenizer::sha256() const { return impl_->sha256; }

int T5Tokenizer::vocab_size() const { return impl_->n_pieces + kExtraIds; }

}  // namespace moetrace
