#include "core/dtype.h"

#include <vector>

#include "core/error.h"

namespace moetrace {

namespace {
struct DTypeInfo {
  DType type;
  std::string_view name;
  size_t size;
};
constexpr DTypeInfo kInfos[] = {
    {DType::kF32, "F32", 4},   {DType::kF16, "F16", 2}, {DType::kBF16, "BF16", 2},
    {DType::kF64, "F64", 8},   {DType::kI64, "I64", 8}, {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},   {DType::kI8, "I8", 1},   {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},
};
}  // namespace

size_t dtype_size(DType t) { return kInfos[static_cast<int>(t)].size; }
std::string_view dtype_name(DType t) { return kInfos[static_cast<int>(t)].name; }

bool parse_dtype(std::string_view name, DType* out) {
  for (const auto& info : kInfos) {
    if (info.name == name) {
      *out = info.type;
      return true;
    }
  }
  return false;
}

namespace {
// Every spelling of the option vocabulary, lower case; the first of each dtype is its option name.
struct DTypeAlias {
  DType type;
  std::string_view name;
};
constexpr DTypeAlias kAliases[] = {
    {DType::kF32, "f32"},  {DType::kF32, "fp32"},  {DType::kF32, "float32"},
    {DType::kF16, "f16"},  {DType::kF16, "fp16"},  {DType::kF16, "float16"},
    {DType::kF16, "half"}, {DType::kBF16, "bf16"}, {DType::kBF16, "bfloat16"},
};

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return out;
}
}  // namespace

bool parse_dtype_name(std::string_view name, DType* out) {
  const std::string l = lower(name);
  for (const auto& a : kAliases) {
    if (a.name == l) {
      *out = a.type;
      return true;
    }
  }
  return false;
}

std::string_view dtype_option_name(DType t) {
  for (const auto& a : kAliases) {
    if (a.type == t) return a.name;
  }
  return dtype_name(t);
}

DType parse_dtype_option(std::string_view option, std::string_view value,
                         std::initializer_list<DType> allowed,
                         std::initializer_list<std::string_view> others) {
  DType t;
  if (parse_dtype_name(value, &t)) {
    for (DType a : allowed) {
      if (a == t) return t;
    }
  }
  std::vector<std::string> names(others.begin(), others.end());
  std::string aliases;
  for (DType a : allowed) {
    names.emplace_back(dtype_option_name(a));
    for (const auto& al : kAliases) {
      if (al.type == a && al.name != dtype_option_name(a))
        aliases += (aliases.empty() ? "" : ", ") + std::string(al.name);
    }
  }
  std::string expected;
  for (size_t i = 0; i < names.size(); ++i)
    expected += (i == 0 ? "" : i + 1 == names.size() ? " or " : ", ") + names[i];
  fail(option, " '", value, "': expected ", expected, " (also ", aliases, ")");
}

std::string parse_precision_option(std::string_view option, std::string_view value) {
  if (lower(value) == "mixed") return "mixed";
  if (lower(value) == "faithful") return "faithful";
  DType t;
  try {
    t = parse_dtype_option(option, value, {DType::kBF16, DType::kF16, DType::kF32});
  } catch (const Error& e) {
    fail(e.what(),
         ", or mixed (fp16 GEMM operands, fp32 routing) or faithful (mixed with the "
         "attention in fp16 pairs)");
  }
  return t == DType::kF32 ? "fp32" : t == DType::kF16 ? "fp16" : "bf16";
}

PrecisionMode precision_mode(std::string_view name, std::string_view what) {
  if (name == "fp32") return {DType::kF32, false};
  if (name == "fp16") return {DType::kF16, false};
  if (name == "bf16") return {DType::kBF16, false};
  if (name == "mixed") return {DType::kF16, true, false};
  if (name == "faithful") return {DType::kF16, true, true};
  fail(what, " '", name, "': expected bf16, fp16, fp32, mixed or faithful");
}

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // overflow (incl. inf) after rounding
  if (abs < 0x33000001u) return sign;             // underflow to zero
  int exp = static_cast<int>(abs >> 23) - 127 + 15;
  uint32_t mant = abs & 0x7fffffu;
  if (exp <= 0) {  // subnormal half
    mant |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t half = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t half = (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;  // may carry into exponent: fine
  return sign | static_cast<uint16_t>(half);
}

void convert_to_f32(DType src_type, const void* src, float* dst, size_t n) {
  switch (src_type) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::kF16: {
      const auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    default:
      fail("cannot convert ", dtype_name(src_type), " to F32: expected F32, F16 or BF16");
  }
}

void convert_from_f32(const float* src, DType dst_type, void* dst, size_t n) {
  switch (dst_type) {
    case DType::kF32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::kBF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case DType::kF16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    default:
      fail("cannot convert F32 to ", dtype_name(dst_type), ": expected F32, F16 or BF16");
  }
}

}  // namespace moetrace
