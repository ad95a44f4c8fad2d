#include "model/random_weights.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>

#include "core/error.h"

namespace moetrace {

namespace {

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t hash_name(const std::string& s) {
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

class RandomSource : public MapTensorSource {
 public:
  std::vector<std::filesystem::path> files() const override { return {}; }
  std::string format() const override { return "random (in memory)"; }

  // Uniform in [-a, a] with a = std·√3 (the given standard deviation), or the constant `fill`.
  void add(const std::string& name, Shape shape, DType dtype, uint64_t seed, float stddev,
           float fill = 0.f) {
    Tensor t(dtype, shape);
    const auto n = static_cast<int64_t>(t.numel());
    const uint64_t s0 = seed ^ hash_name(name);
    const float a = stddev * std::sqrt(3.0f);
    const float scale = 2.0f * a / 16777216.0f;
    const size_t es = dtype_size(dtype);
    auto* out = static_cast<uint8_t*>(t.raw());
    // Value i is splitmix64's (i+1)-th output from s0, so chunks fill in parallel, bit-identical to
    // one sequential pass (random:switch-base-128's encoder is 3.6e9 values).
    constexpr int64_t kChunk = 1 << 16;
#pragma omp parallel for schedule(static)
    for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
      const int64_t m = std::min(kChunk, n - c0);
      std::vector<float> f(static_cast<size_t>(m), fill);
      if (stddev > 0.f) {
        uint64_t st = s0 + static_cast<uint64_t>(c0) * 0x9e3779b97f4a7c15ull;
        for (auto& v : f) v = static_cast<float>(splitmix64(st) >> 40) * scale - a;
      }
      convert_from_f32(f.data(), dtype, out + static_cast<size_t>(c0) * es, static_cast<size_t>(m));
    }
    by_name_[name] = CheckpointTensor{name, t.view(), {}};
    tensors_[name] = std::move(t);
  }

 private:
  std::map<std::string, Tensor> tensors_;
};

void add_block(RandomSource& src, const SwitchConfig& c, const std::string& stack, int64_t i,
               bool decoder, bool sparse, const RandomWeightOptions& o) {
  const int64_t d = c.d_model, inner = c.num_heads * c.d_kv;
  const std::string p = stack + ".block." + std::to_string(i) + ".layer.";
  const DType t = o.dtype;
  const float sd = 1.0f / std::sqrt(static_cast<float>(d));
  const float si = 1.0f / std::sqrt(static_cast<float>(inner));
  const float sf = 1.0f / std::sqrt(static_cast<float>(c.d_ff));
  auto attn = [&](const std::string& name) {
    for (const char* m : {"q", "k", "v"})
      src.add(p + name + "." + m + ".weight", {inner, d}, t, o.seed, sd);
    src.add(p + name + ".o.weight", {d, inner}, t, o.seed, si);
  };
  src.add(p + "0.layer_norm.weight", {d}, t, o.seed, 0.f, 1.0f);
  attn("0.SelfAttention");
  if (i == 0) {
    src.add(p + "0.SelfAttention.relative_attention_bias.weight",
            {c.relative_attention_num_buckets, c.num_heads}, t, o.seed, sd);
  }
  std::string ff = p + "1.";
  if (decoder) {
    src.add(p + "1.layer_norm.weight", {d}, t, o.seed, 0.f, 1.0f);
    attn("1.EncDecAttention");
    ff = p + "2.";
  }
  src.add(ff + "layer_norm.weight", {d}, t, o.seed, 0.f, 1.0f);
  if (!sparse) {
    src.add(ff + "mlp.wi.weight", {c.d_ff, d}, t, o.seed, sd);
    src.add(ff + "mlp.wo.weight", {d, c.d_ff}, t, o.seed, sf);
    return;
  }
  src.add(ff + "mlp.router.classifier.weight", {c.num_experts, d}, t, o.seed, sd);
  if (c.router_bias) src.add(ff + "mlp.router.classifier.bias", {c.num_experts}, t, o.seed, 0.f);
  for (int64_t e = 0; e < c.num_experts; ++e) {
    const std::string ep = ff + "mlp.experts.expert_" + std::to_string(e) + ".";
    src.add(ep + "wi.weight", {c.d_ff, d}, t, o.seed, sd);
    src.add(ep + "wo.weight", {d, c.d_ff}, t, o.seed, sf);
  }
}

}  // namespace

std::shared_ptr<TensorSource> make_random_weights(const SwitchConfig& c,
                                                  const RandomWeightOptions& o) {
  if (o.dtype != DType::kF32 && o.dtype != DType::kF16 && o.dtype != DType::kBF16) {
    fail("random weights: dtype ", dtype_name(o.dtype), " unsupported (expected F32, F16 or BF16)");
  }
  auto src = std::make_shared<RandomSource>();
  src->add("shared.weight", {c.vocab_size, c.d_model}, o.dtype, o.seed, 1.0f);
  for (int64_t i = 0; i < c.num_layers; ++i)
    add_block(*src, c, "encoder", i, false, c.encoder_block_sparse(i), o);
  src->add("encoder.final_layer_norm.weight", {c.d_model}, o.dtype, o.seed, 0.f, 1.0f);
  if (!o.encoder_only) {
    for (int64_t i = 0; i < c.num_decoder_layers; ++i) {
      add_block(*src, c, "decoder", i, true, c.decoder_block_sparse(i), o);
    }
    src->add("decoder.final_layer_norm.weight", {c.d_model}, o.dtype, o.seed, 0.f, 1.0f);
  }
  return src;
}

namespace {

// A published Switch shape (SWITCH_SPEC.md's config table): d_kv 64, capacity 64, the same depth and
// number of MoE layers in encoder and decoder (every second block sparse).
SwitchConfig published_shape(const std::string& name, int64_t d_model, int64_t heads,
                             int64_t blocks, int64_t num_experts) {
  SwitchConfig c;
  c.d_model = d_model;
  c.d_ff = 4 * d_model;
  c.d_kv = 64;
  c.num_heads = heads;
  c.num_layers = c.num_decoder_layers = blocks;
  c.num_sparse_encoder_layers = c.num_sparse_decoder_layers = blocks / 2;
  c.num_experts = num_experts;
  c.expert_capacity = 64;
  c.derive_and_validate(name + std::to_string(num_experts));
  return c;
}

}  // namespace

SwitchConfig switch_base_config(int64_t num_experts) {
  return published_shape("switch-base-", 768, 12, 12, num_experts);
}

SwitchConfig switch_large_config(int64_t num_experts) {
  return published_shape("switch-large-", 1024, 16, 24, num_experts);
}

std::optional<SwitchConfig> published_config(std::string_view name) {
  const auto experts_after = [&](std::string_view prefix) -> int64_t {
    if (name.rfind(prefix, 0) != 0) return -1;
    const std::string_view digits = name.substr(prefix.size());
    int64_t e = -1;
    const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), e);
    if (ec != std::errc() || end != digits.data() + digits.size() || e < 1 || e > 4096) return -1;
    return e;
  };
  if (const int64_t e = experts_after("switch-base-"); e > 0) return switch_base_config(e);
  if (const int64_t e = experts_after("switch-large-"); e > 0) return switch_large_config(e);
  return std::nullopt;
}

SwitchConfig demo_config() {
  SwitchConfig c = switch_base_config(8);
  c.d_model = 64;
  c.d_ff = 256;
  c.d_kv = 16;
  c.num_heads = 4;
  c.encoder_sparse_step = -1;
  c.decoder_sparse_step = -1;
  c.derive_and_validate("moetrace-demo");
  return c;
}

}  // namespace moetrace
