// Element types of checkpoints, activations and trace stores, and the float conversions between
// them.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <string_view>

namespace moetrace {

enum class DType : uint8_t { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool };

size_t dtype_size(DType t);
// Safetensors spelling: "F32", "BF16", "I64", "BOOL", ...
std::string_view dtype_name(DType t);
// Parses the safetensors spelling; returns false for an unknown name.
bool parse_dtype(std::string_view name, DType* out);

// The one vocabulary of float dtype names that options accept (--logits, --hidden, --precision),
// case-insensitive: f32 | fp32 | float32, f16 | fp16 | float16 | half, bf16 | bfloat16 (the
// safetensors spellings F32/F16/BF16 are among them). Returns false for anything else.
bool parse_dtype_name(std::string_view name, DType* out);
// The options' spelling of F32/F16/BF16: "f32", "f16", "bf16".
std::string_view dtype_option_name(DType t);
// parse_dtype_name() for the value of `option` (e.g. "--logits"), which allows the dtypes in
// `allowed` only; `others` lists further words the option takes ("none"). Error otherwise, e.g.
// "--hidden 'f16': expected none, bf16 or f32 (also bfloat16, fp32, float32)".
DType parse_dtype_option(std::string_view option, std::string_view value,
                         std::initializer_list<DType> allowed,
                         std::initializer_list<std::string_view> others = {});

// The --precision vocabulary of the engines (collect, forward, bench_gpu): the GEMM operand dtypes
// bf16, f16 and f32 in parse_dtype_name's spellings, "mixed": fp16 GEMM operands (11-bit
// significands; bf16 checkpoints convert exactly) with everything that decides and scales the
// routing in float32, or "faithful": mixed with the encoder attention's probabilities and output
// (the o-projection's operand) as fp16 pairs hi + lo (docs/GPU.md, "Precision"). Returns the
// spelling the manifest records: "bf16", "fp16", "fp32", "mixed" or "faithful". Error naming
// `option` otherwise.
std::string parse_precision_option(std::string_view option, std::string_view value);

// What a precision name (parse_precision_option's spelling) means for the GPU engine: the dtype of
// the GEMM operands, whether the top-1 and the gate come from the float32 probabilities instead
// of the probabilities rounded to the operand dtype (SWITCH_SPEC.md's rule, as transformers
// computes it), and whether the encoder's attention keeps its probabilities and output as pairs
// of the operand dtype (~22 significant bits; a second MMA over the same values). The one mapping:
// collect, forward, bench_gpu and the engine all use it.
struct PrecisionMode {
  DType operands = DType::kBF16;
  bool fp32_routing = false;
  bool attention_pairs = false;
  // The name asks for more than its operand dtype (mixed, faithful): what the CPU engine, which
  // computes in fp32, says it ignores, and what bench_gpu records by name.
  bool beyond_operands() const { return fp32_routing || attention_pairs; }
};
// Error "<what> '<name>': expected bf16, fp16, fp32, mixed or faithful" for any other name.
PrecisionMode precision_mode(std::string_view name, std::string_view what = "precision");

inline float bf16_to_f32(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as torch does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Rounds v to the activation dtype t and back to float32 (F32 and every other dtype: unchanged):
// how the CPU ops model the GPU's bf16/fp16 activations.
inline float round_to(float v, DType t) {
  if (t == DType::kBF16) return bf16_to_f32(f32_to_bf16(v));
  if (t == DType::kF16) return f16_to_f32(f32_to_f16(v));
  return v;
}

// Converts n elements of src (F32, F16 or BF16) to float32.
void convert_to_f32(DType src_type, const void* src, float* dst, size_t n);
// Converts n float32 elements to dst_type (F32, F16 or BF16).
void convert_from_f32(const float* src, DType dst_type, void* dst, size_t n);

}  // namespace moetrace
