#include "collect/audit.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <iomanip>
#include <sstream>

#include "collect/collect.h"
#include "core/error.h"
#include "core/keys.h"
#include "core/log.h"
#include "model/engine_io.h"
#include "model/recording_observer.h"

namespace moetrace {

namespace fs = std::filesystem;

namespace {

// Samples loaded at once: bounds the memory of the stored logits held for comparison.
constexpr size_t kChunkSamples = 256;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Comparison {
  std::vector<int> layers;                    // encoder blocks with a MoE layer, the store's order
  keys::Stack stack = keys::Stack::kEncoder;  // Switch: enc.; a language model's prompt: lm.
  int64_t k =
      1;  // experts per token: the stored and the reference's expert are [.., k], top-1 first
  std::vector<FidelityCounts> counts;  // per layer
  int64_t experts = 0;
  int64_t samples = 0;
};

// Re-runs chunk (real samples) with encode and adds the comparison to c.
void compare_chunk(const std::vector<SampleRecordOwned>& chunk, const AuditOptions& o,
                   const AuditEncode& encode, Comparison* c) {
  std::vector<int64_t> lengths;
  for (const auto& s : chunk) lengths.push_back(static_cast<int64_t>(s.token_ids.size()));
  const int64_t E = c->experts;
  for (const std::vector<size_t>& members : length_batches(lengths, o.batches)) {
    Batch batch;
    batch.B = static_cast<int64_t>(members.size());
    for (size_t j : members) batch.S = std::max(batch.S, lengths[j]);
    batch.input_ids.assign(static_cast<size_t>(batch.B * batch.S), o.pad_token_id);
    batch.attention_mask.assign(static_cast<size_t>(batch.B * batch.S), 0);
    for (int64_t b = 0; b < batch.B; ++b) {
      const auto& ids = chunk[members[static_cast<size_t>(b)]].token_ids;
      std::copy(ids.begin(), ids.end(), batch.input_ids.begin() + b * batch.S);
      std::fill_n(batch.attention_mask.begin() + b * batch.S, ids.size(), 1);
    }
    RecordingObserver ref([stack = c->stack](std::string_view key) {
      const auto p = keys::parse(key);
      return p && p->stack == stack &&
             (p->field == keys::kRouterLogits || p->field == keys::kExpert);
    });
    encode(batch, &ref);
    for (size_t l = 0; l < c->layers.size(); ++l) {
      const int block = c->layers[l];
      const std::string lk = keys::tensor(c->stack, block, keys::kRouterLogits);
      const std::string ek = keys::tensor(c->stack, block, keys::kExpert);
      const int64_t k = c->k;
      const Shape expert_shape = k == 1 && c->stack == keys::Stack::kEncoder
                                     ? Shape{batch.B, batch.S}
                                     : Shape{batch.B, batch.S, k};
      if (!ref.has(lk) || !ref.has(ek))
        fail("audit: the fp32 reference offered no ", ref.has(lk) ? ek : lk);
      const Tensor& rl = ref.last(lk);
      const Tensor& re = ref.last(ek);
      if (rl.dtype() != DType::kF32 || rl.shape() != Shape{batch.B, batch.S, E} ||
          re.dtype() != DType::kI32 || re.shape() != expert_shape) {
        fail("audit: the fp32 reference's ", lk, " is ", dtype_name(rl.dtype()), " ",
             shape_str(rl.shape()), " and ", ek, " ", dtype_name(re.dtype()), " ",
             shape_str(re.shape()), "; the store needs F32 [", batch.B, ", ", batch.S, ", ", E,
             "] and I32 ", shape_str(expert_shape), " (another model than the store's?)");
      }
      const float* ref_logits = rl.view().as<float>();
      const int32_t* ref_expert = re.view().as<int32_t>();
      FidelityCounts& n = c->counts[l];
      for (int64_t b = 0; b < batch.B; ++b) {
        const SampleRecordOwned& s = chunk[members[static_cast<size_t>(b)]];
        const LayerRecordOwned& stored = s.enc[l];
        const int64_t len = lengths[members[static_cast<size_t>(b)]];
        for (int64_t t = 0; t < len; ++t) {
          // The top-1 (for top-k routing the first, highest-weight choice).
          n.top1_agree +=
              stored.expert[static_cast<size_t>(t * k)] == ref_expert[(b * batch.S + t) * k];
          const float* want = ref_logits + (b * batch.S + t) * E;
          auto track = [&](float got, float ref) {
            const double d = std::fabs(static_cast<double>(got) - static_cast<double>(ref));
            // NaN or inf on either side: the largest recordable error (JSON has no inf).
            n.max_logit_error = std::isfinite(d)
                                    ? std::max(n.max_logit_error, std::min(d, kFidelityNonFinite))
                                    : kFidelityNonFinite;
          };
          if (stored.topk_ids.empty()) {
            const float* got = stored.router_logits.data() + t * E;
            for (int64_t e = 0; e < E; ++e) track(got[e], want[e]);
          } else {  // --logits topk:K: the K stored logits against the reference's of those experts
            const size_t K = stored.topk_ids.size() / static_cast<size_t>(len);
            for (size_t j = 0; j < K; ++j) {
              const size_t at = static_cast<size_t>(t) * K + j;
              track(stored.topk_logits[at], want[stored.topk_ids[at]]);
            }
          }
        }
        n.tokens += len;
      }
    }
  }
  c->samples += static_cast<int64_t>(chunk.size());
}

std::string percent(double fraction) {
  std::ostringstream s;
  s << std::fixed << std::setprecision(3) << 100.0 * fraction << "%";
  return s.str();
}

}  // namespace

std::vector<int64_t> audit_positions(int64_t n, double fraction, int64_t min_samples) {
  if (!(fraction > 0 && fraction <= 1)) fail("audit: fraction ", fraction, " is not in (0, 1]");
  if (n <= 0) return {};
  const auto wanted = static_cast<int64_t>(std::ceil(fraction * static_cast<double>(n) - 1e-9));
  const int64_t k = std::min(n, std::max({wanted, min_samples, int64_t{1}}));
  std::vector<int64_t> out(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) out[static_cast<size_t>(j)] = j * n / k;
  return out;
}

Fidelity run_audit(const fs::path& dir, const AuditOptions& o, const AuditEncode& encode) {
  const auto t0 = std::chrono::steady_clock::now();
  const TraceStore store = TraceStore::open(dir);
  Comparison c;
  c.layers = store.enc_layers();
  c.counts.assign(c.layers.size(), FidelityCounts{});
  c.experts = store.manifest().value("num_experts", int64_t{0});
  const nlohmann::json routing = store.manifest().value("routing", nlohmann::json::object());
  if (is_lm_family(routing.value("family", std::string("switch")))) c.stack = keys::Stack::kLm;
  c.k = routing.value("top_k", int64_t{1});
  const int64_t n = store.num_samples();
  std::vector<SampleRecordOwned> chunk;
  int64_t next = 0;  // the first sample not looked at yet: each sample is chosen once
  for (int64_t p : audit_positions(n, o.fraction, o.min_samples)) {
    for (int64_t i = std::max(p, next); i < n; ++i) {
      next = i + 1;
      SampleRecordOwned s = store.sample(i);
      if (s.synthetic || s.token_ids.empty()) continue;
      chunk.push_back(std::move(s));
      break;
    }
    if (chunk.size() == kChunkSamples) {
      compare_chunk(chunk, o, encode, &c);
      chunk.clear();
    }
    if (next >= n) break;
  }
  if (!chunk.empty()) compare_chunk(chunk, o, encode, &c);

  Fidelity f;
  f.measured = true;
  f.precision = o.precision;
  f.fraction = o.fraction;
  f.samples = c.samples;
  for (size_t l = 0; l < c.layers.size(); ++l) {
    const FidelityCounts& k = c.counts[l];
    f.per_layer.emplace_back(keys::layer(c.stack, c.layers[l]), k);
    f.total.tokens += k.tokens;
    f.total.top1_agree += k.top1_agree;
    f.total.max_logit_error = std::max(f.total.max_logit_error, k.max_logit_error);
  }
  f.seconds = seconds_since(t0);
  return f;
}

Fidelity audit_store(const fs::path& dir, const AuditOptions& o,
                     const std::function<AuditEncode()>& make_encode) {
  const auto t0 = std::chrono::steady_clock::now();
  Fidelity f;
  f.precision = o.precision;
  f.fraction = o.fraction;
  f.reason = o.skip_reason;
  if (f.reason.empty()) {
    // A store without real samples (--mode synthetic) has nothing to re-run: no engine is loaded.
    const TraceStore store = TraceStore::open(dir);
    bool any_real = false;
    for (int64_t i = 0; i < store.num_samples() && !any_real; ++i)
      any_real = !store.sample(i).synthetic;
    if (!any_real) f.reason = "no real samples: synthetic samples have no model computation";
  }
  AuditEncode encode;
  if (f.reason.empty()) {
    log_info("audit: re-running ", o.fraction * 100.0, "% of the samples (at least ", o.min_samples,
             ") at fp32 to compare the stored ", o.precision, " routing");
    try {
      encode = make_encode();
    } catch (const Error& e) {
      // The store is complete: a reference that cannot be had (e.g. an fp32 copy larger than the
      // GPU) is recorded as the reason, not an error of the run.
      f.reason = std::string("the fp32 reference could not be loaded: ") + e.what();
    }
  }
  if (f.reason.empty()) {
    f = run_audit(dir, o, encode);
    f.seconds = seconds_since(t0);
    std::string worst;
    double lowest = 2;
    for (const auto& [key, k] : f.per_layer) {
      if (k.top1_agreement() < lowest) {
        lowest = k.top1_agreement();
        worst = key;
      }
    }
    log_info("audit: ", o.precision, " vs fp32 over ", f.samples, " samples (", f.total.tokens,
             " tokens): top-1 agreement ", percent(f.total.top1_agreement()), " (lowest ", worst,
             ": ", percent(lowest), "), max |logit error| ", f.total.max_logit_error, ", ",
             f.seconds, " s");
  } else {
    log_info("audit skipped: ", f.reason);
  }
  set_store_fidelity(dir, f);
  return f;
}

double parse_audit_fraction(const std::string& value) {
  const char* s = value.c_str();
  char* end = nullptr;
  const double v = std::strtod(s, &end);
  if (value.empty() || end != s + value.size() || !(v >= 0 && v <= 1) ||
      value.find_first_not_of("0123456789.eE+-") != std::string::npos) {
    fail("--audit '", value,
         "': expected a fraction of the samples in [0, 1], e.g. 0.01 (0 turns the audit off)");
  }
  return v;
}

}  // namespace moetrace
