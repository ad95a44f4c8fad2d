// The names of observed tensors: one vocabulary for the engines' observation keys, the trace
// store's tensors and the manifest's per_layer entries. python/moetrace/keys.py mirrors it.
//
// One meaning of "layer": a MoE layer, named by its stack and the index of the transformer block
// that holds it ("enc.3" = the MoE layer of encoder block 3). "block" is always a transformer block
// index (0 .. num_layers-1 of its stack); a position among the MoE layers only (0, 1, 2, ... in
// block order) is called a moe index and never appears in a key.
//
//   enc.{i}.input          [B,S,d]  f32  input of encoder block i
//   enc.{i}.hidden         [B,S,d]  f32  router input (RMS-normed) of sparse block i
//   enc.{i}.router_logits  [B,S,E]  f32
//   enc.{i}.expert         [B,S]    I32  top-1 choice (ties -> lowest index), also when dropped
//   enc.{i}.dropped        [B,S]    U8   1 = over expert capacity, expert skipped
//   enc.{i}.gate           [B,S]    f32  top-1 probability
//   enc.output             [B,S,d]  f32  after the final RMS norm
//   dec.{i}.*              the same for decoder blocks: [B,T,...] in a teacher-forced pass,
//                          [B,1,...] per generation step
//
// Decoder-only MoE language models (olmoe, mixtral, qwen2_moe, qwen3_moe: top-k routing, no
// capacity, so no `dropped`); k = the config's experts per token:
//   lm.{i}.hidden          [B,S,d]  f32  router input (the post-attention-norm output) of block i
//   lm.{i}.router_logits   [B,S,E]  f32
//   lm.{i}.expert          [B,S,k]  I32  top-k experts, descending weight, ties -> lowest index
//   lm.{i}.gate            [B,S,k]  f32  their routing weights (renormalized where the family does)
//   lm.output              [B,S,d]  f32  after the final norm (optional)
//   gen.{i}.*              the same for greedy generation steps ([B,1,...] per step)
#pragma once

#include <charconv>
#include <optional>
#include <string>
#include <string_view>

namespace moetrace::keys {

// kEncoder/kDecoder: Switch's two stacks. kLm: a language model's prompt (prefill) pass, kGen its
// greedy generation steps; a trace store keeps them where it keeps Switch's encoder / decoder.
enum class Stack { kEncoder, kDecoder, kLm, kGen };

inline constexpr std::string_view kInput = "input";
inline constexpr std::string_view kHidden = "hidden";
inline constexpr std::string_view kRouterLogits = "router_logits";
inline constexpr std::string_view kExpert = "expert";
inline constexpr std::string_view kDropped = "dropped";
inline constexpr std::string_view kGate = "gate";
// Stored instead of router_logits by `collect --logits topk:K` (docs/TRACE_FORMAT.md): per token the
// K largest logits (F16, descending, ties -> lowest index), their experts (I32) and the log-sum-exp
// over all E logits (F32), so that those K probabilities exp(l - lse) stay exact.
inline constexpr std::string_view kRouterTopkLogits = "router_topk_logits";
inline constexpr std::string_view kRouterTopkIds = "router_topk_ids";
inline constexpr std::string_view kRouterLse = "router_lse";
inline constexpr std::string_view kEncoderOutput = "enc.output";
inline constexpr std::string_view kLmOutput = "lm.output";

inline std::string_view stack_prefix(Stack s) {
  switch (s) {
    case Stack::kEncoder:
      return "enc";
    case Stack::kDecoder:
      return "dec";
    case Stack::kLm:
      return "lm";
    case Stack::kGen:
      return "gen";
  }
  return "enc";
}
// Switch: enc / dec. lm = true (a decoder-only language model): lm / gen.
inline Stack stack_of(bool decoder, bool lm = false) {
  if (lm) return decoder ? Stack::kGen : Stack::kLm;
  return decoder ? Stack::kDecoder : Stack::kEncoder;
}

// "enc.3": a MoE layer's name (the prefix of its tensors, its per_layer key).
inline std::string layer(Stack s, int block) {
  std::string k(stack_prefix(s));
  k += '.';
  k += std::to_string(block);
  return k;
}

// "enc.3.router_logits": one observed tensor of block `block`.
inline std::string tensor(Stack s, int block, std::string_view field) {
  std::string k = layer(s, block);
  k += '.';
  k += field;
  return k;
}

// The parts of "enc.3.router_logits" (or "lm.3.gate"); nullopt for anything else (e.g.
// "enc.output").
struct Parsed {
  Stack stack = Stack::kEncoder;
  int block = 0;
  std::string field;  // owned: parse(tensor(...)) of a temporary stays valid
};
inline std::optional<Parsed> parse(std::string_view key) {
  Parsed p;
  size_t head = 0;
  for (Stack s : {Stack::kEncoder, Stack::kDecoder, Stack::kLm, Stack::kGen}) {
    const std::string_view pre = stack_prefix(s);
    if (key.size() > pre.size() && key.substr(0, pre.size()) == pre && key[pre.size()] == '.') {
      p.stack = s;
      head = pre.size() + 1;
      break;
    }
  }
  if (head == 0) return std::nullopt;
  const std::string_view rest = key.substr(head);
  const size_t dot = rest.find('.');
  if (dot == 0 || dot == std::string_view::npos || dot + 1 == rest.size()) return std::nullopt;
  const auto [end, ec] = std::from_chars(rest.data(), rest.data() + dot, p.block);
  if (ec != std::errc() || end != rest.data() + dot || p.block < 0) return std::nullopt;
  p.field = std::string(rest.substr(dot + 1));
  return p;
}

}  // namespace moetrace::keys
