// The fidelity audit (collect/audit.h): which samples it re-runs, its comparison against fake
// engines (exact, perturbed, malformed) and the CPU engine, and the manifest object it writes.
#include "collect/audit.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "model/random_weights.h"
#include "model/recording_observer.h"
#include "model/switch_model.h"
#include "trace/store.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() /
            ("mt_audit_" + std::string(info->name()) + "_" + std::to_string(::getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

constexpr int64_t kExperts = 6;
const std::vector<int> kLayers = {1, 3};

// The "model" of the fake engines: logit of expert e for token id v in MoE layer (block) blk, in
// thirds (exact in float32 however the compiler evaluates it; not in F16), |logit| <= 16/3.
float fake_logit(int32_t v, int blk, int64_t e) {
  return static_cast<float>((v * 7 + e * 13 + blk * 5) % 33 - 16) / 3.f;
}
int32_t argmax(const float* l, int64_t E) {
  return static_cast<int32_t>(std::max_element(l, l + E) - l);
}

// Token ids of sample k: lengths 3..17, ids from 2 on.
std::vector<int32_t> sample_ids(int64_t k) {
  std::vector<int32_t> ids(static_cast<size_t>(3 + (k * 7) % 15));
  for (size_t t = 0; t < ids.size(); ++t) ids[t] = static_cast<int32_t>(2 + (k * 31 + t * 5) % 97);
  return ids;
}

// A complete store of n samples whose routing is the fake model's (every synthetic_every-th
// sample synthetic, with garbage routing); logits_topk > 0: a --logits topk:K store. top_k 2: a
// language model's store (issue 20): top-2 experts [S, 2] (the fake model's best, then any other),
// no `dropped`; its reference is offered under lm.* keys with [B, S, 2] experts.
void write_fake_store(const fs::path& dir, int64_t n, DType logits_dtype, int synthetic_every = 0,
                      int logits_topk = 0, int top_k = 1) {
  const bool lm = top_k == 2;
  StoreSettings s;
  s.settings = {{"mode", "real"}};
  s.model = {{"id", lm ? "test/fake-lm" : "test/fake"}};
  s.enc_layers = kLayers;
  s.num_experts = kExperts;
  s.d_model = 4;
  s.logits_dtype = logits_dtype;
  s.samples_per_shard = 4;
  s.device = "test";
  s.logits_topk = logits_topk;
  if (lm) {
    s.family = "olmoe";
    s.top_k = 2;
    s.dropped = false;
  }
  auto w = TraceWriter::open(dir, s, OpenMode::kCreate);
  for (int64_t k = 0; k < n; ++k) {
    SampleRecord r;
    r.sample_id = "fake/default/test/" + std::to_string(k);
    r.dataset = std::string("fake");
    r.row = k;
    r.synthetic = synthetic_every > 0 && k % synthetic_every == 0;
    r.token_ids = sample_ids(k);
    const size_t S = r.token_ids.size();
    std::vector<std::vector<float>> logits(kLayers.size()), gate(kLayers.size());
    std::vector<std::vector<int32_t>> expert(kLayers.size());
    std::vector<uint8_t> dropped(S, 0);
    std::vector<std::vector<float>> topk(kLayers.size()), lse(kLayers.size());
    std::vector<std::vector<int32_t>> ids(kLayers.size());
    for (size_t l = 0; l < kLayers.size(); ++l) {
      for (size_t t = 0; t < S; ++t) {
        for (int64_t e = 0; e < kExperts; ++e) {
          logits[l].push_back(r.synthetic ? 0.f : fake_logit(r.token_ids[t], kLayers[l], e));
        }
        const int32_t first = r.synthetic ? static_cast<int32_t>(t % kExperts)
                                          : argmax(logits[l].data() + t * kExperts, kExperts);
        expert[l].push_back(first);
        if (lm) {
          expert[l].push_back(first == 0 ? 1 : 0);  // any distinct second choice
          gate[l].insert(gate[l].end(), {0.75f, 0.25f});
        } else {
          gate[l].push_back(0.5f);
        }
      }
      r.enc.push_back(LayerRecord{logits[l].data(), expert[l].data(), lm ? nullptr : dropped.data(),
                                  gate[l].data(), nullptr});
      if (logits_topk > 0) {
        topk[l].resize(S * static_cast<size_t>(logits_topk));
        ids[l].resize(topk[l].size());
        lse[l].resize(S);
        router_topk(logits[l].data(), static_cast<int64_t>(S), kExperts, logits_topk,
                    topk[l].data(), ids[l].data(), lse[l].data());
        r.enc.back().topk_logits = topk[l].data();
        r.enc.back().topk_ids = ids[l].data();
        r.enc.back().lse = lse[l].data();
      }
    }
    w->add(r);
  }
  w->finish(1.0);
}

// A fake fp32 engine: the fake model, its logits moved by `shift` on expert 0 (which changes the
// top-1 of tokens whose expert 0 comes within `shift` of their best), batches recorded.
struct FakeEngine {
  float shift = 0;
  std::vector<int64_t> batch_sizes;
  std::vector<std::vector<int32_t>> seen;  // real token ids of every sequence run
  void operator()(const Batch& b, Observer* obs) {
    batch_sizes.push_back(b.B);
    Tensor logits(DType::kF32, {b.B, b.S, kExperts});
    Tensor expert(DType::kI32, {b.B, b.S});
    for (int64_t i = 0; i < b.B; ++i) {
      std::vector<int32_t> ids;
      for (int64_t t = 0; t < b.S; ++t) {
        if (b.attention_mask[i * b.S + t]) ids.push_back(b.input_ids[i * b.S + t]);
      }
      seen.push_back(ids);
    }
    for (int blk : kLayers) {
      float* l = logits.data<float>();
      int32_t* e = expert.data<int32_t>();
      for (int64_t t = 0; t < b.B * b.S; ++t) {
        for (int64_t x = 0; x < kExperts; ++x)
          l[t * kExperts + x] = fake_logit(b.input_ids[t], blk, x) + (x == 0 ? shift : 0.f);
        e[t] = argmax(l + t * kExperts, kExperts);
      }
      const std::string p = "enc." + std::to_string(blk) + ".";
      if (obs->wants(p + "router_logits")) obs->observe(p + "router_logits", logits.view());
      if (obs->wants(p + "expert")) obs->observe(p + "expert", expert.view());
      EXPECT_FALSE(obs->wants(p + "hidden")) << "the audit asks for logits and experts only";
    }
  }
};

FakeEngine shifted_by(float shift) {
  FakeEngine f;
  f.shift = shift;
  return f;
}

AuditOptions options(double fraction, int64_t batch_tokens = 8192, std::string precision = "",
                     std::string skip_reason = "") {
  AuditOptions o;
  o.fraction = fraction;
  o.batches.tokens = batch_tokens;
  o.precision = std::move(precision);
  o.skip_reason = std::move(skip_reason);
  return o;
}

AuditEncode encode_with(FakeEngine* f) {
  return [f](const Batch& b, Observer* obs) { (*f)(b, obs); };
}

TEST(AuditPositions, EvenlySpreadDeterministicAndBounded) {
  EXPECT_EQ(audit_positions(10, 1.0, 1), (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(audit_positions(1000, 0.01, 1),
            (std::vector<int64_t>{0, 100, 200, 300, 400, 500, 600, 700, 800, 900}));
  EXPECT_EQ(audit_positions(1000, 0.01, 4).size(), 10u);
  EXPECT_EQ(audit_positions(1000, 0.001, 4), (std::vector<int64_t>{0, 250, 500, 750}));  // a batch
  EXPECT_EQ(audit_positions(3, 0.01, 128), (std::vector<int64_t>{0, 1, 2}));  // at most all
  EXPECT_EQ(audit_positions(7, 0.5, 1).size(), 4u);                           // ceil(3.5)
  EXPECT_TRUE(audit_positions(0, 0.5, 1).empty());
  EXPECT_EQ(audit_positions(12345, 0.03, 7), audit_positions(12345, 0.03, 7));
  EXPECT_THROW(audit_positions(10, 0.0, 1), Error);
  EXPECT_THROW(audit_positions(10, 1.5, 1), Error);
  EXPECT_THROW(audit_positions(10, std::nan(""), 1), Error);
}

TEST(Audit, AnExactEngineAgreesEverywhere) {
  TempDir tmp;
  write_fake_store(tmp.path(), 11, DType::kF32);
  FakeEngine exact;
  const Fidelity f = run_audit(tmp.path(), options(1.0, 40, "bf16"), encode_with(&exact));
  EXPECT_TRUE(f.measured);
  EXPECT_EQ(f.precision, "bf16");
  EXPECT_EQ(f.reference, "fp32");
  EXPECT_EQ(f.samples, 11);
  int64_t tokens = 0;
  for (int64_t k = 0; k < 11; ++k) tokens += static_cast<int64_t>(sample_ids(k).size());
  ASSERT_EQ(f.per_layer.size(), 2u);
  EXPECT_EQ(f.per_layer[0].first, "enc.1");
  EXPECT_EQ(f.per_layer[1].first, "enc.3");
  for (const auto& [key, c] : f.per_layer) {
    EXPECT_EQ(c.tokens, tokens) << key;
    EXPECT_EQ(c.top1_agree, tokens) << key;
    EXPECT_EQ(c.max_logit_error, 0.0) << key;
  }
  EXPECT_EQ(f.total.tokens, 2 * tokens);
  EXPECT_EQ(f.total.top1_agreement(), 1.0);
  // Every sample went through exactly once, in batches within the budget.
  std::multiset<std::vector<int32_t>> want, got(exact.seen.begin(), exact.seen.end());
  for (int64_t k = 0; k < 11; ++k) want.insert(sample_ids(k));
  EXPECT_EQ(got, want);
  EXPECT_GT(exact.batch_sizes.size(), 1u);
}

TEST(Audit, APerturbedEngineAgreesLessAndItsErrorIsThePerturbation) {
  TempDir tmp;
  write_fake_store(tmp.path(), 16, DType::kF32);
  FakeEngine shifted = shifted_by(2.5f);
  const Fidelity f = run_audit(tmp.path(), options(1.0, 64), encode_with(&shifted));
  for (const auto& [key, c] : f.per_layer) {
    EXPECT_GT(c.tokens, 0) << key;
    EXPECT_LT(c.top1_agree, c.tokens) << key;  // some top-1s moved to expert 0
    EXPECT_GT(c.top1_agree, 0) << key;
    EXPECT_NEAR(c.max_logit_error, 2.5, 1e-6) << key;
  }
  EXPECT_LT(f.total.top1_agreement(), 1.0);
  EXPECT_GT(f.total.top1_agreement(), 0.0);
}

TEST(Audit, Fp16StorageRoundingIsPartOfTheError) {
  TempDir tmp;
  write_fake_store(tmp.path(), 6, DType::kF16);
  FakeEngine exact;
  const Fidelity f = run_audit(tmp.path(), options(1.0), encode_with(&exact));
  EXPECT_EQ(f.total.top1_agreement(), 1.0);
  EXPECT_GT(f.total.max_logit_error, 0.0);  // thirds are not F16 values; rounding them moves
  EXPECT_LE(f.total.max_logit_error, 1.0 / 512 + 1e-7);  // half an ulp at most: 2^-9 below 8
}

// --logits topk:K: the error is over the K stored logits, each against the reference's logit of the
// same expert (the others are not stored).
TEST(Audit, ATopkStoreComparesItsStoredLogits) {
  TempDir tmp;
  write_fake_store(tmp.path(), 16, DType::kF16, 0, 2);
  FakeEngine exact;
  const Fidelity f = run_audit(tmp.path(), options(1.0), encode_with(&exact));
  EXPECT_EQ(f.total.top1_agreement(), 1.0);
  EXPECT_GT(f.total.max_logit_error, 0.0);  // F16 rounding of the stored top-2
  EXPECT_LE(f.total.max_logit_error, 1.0 / 512 + 1e-7);
  FakeEngine shifted = shifted_by(2.5f);  // moves expert 0: seen where it is among a token's top 2
  const Fidelity g = run_audit(tmp.path(), options(1.0), encode_with(&shifted));
  EXPECT_NEAR(g.total.max_logit_error, 2.5, 1.0 / 512 + 1e-6);
}

TEST(Audit, SyntheticSamplesAreNotRerun) {
  TempDir tmp;
  write_fake_store(tmp.path(), 9, DType::kF32, /*synthetic_every=*/3);  // 0, 3, 6 synthetic
  FakeEngine exact;
  const Fidelity f = run_audit(tmp.path(), options(1.0), encode_with(&exact));
  EXPECT_EQ(f.samples, 6);
  EXPECT_EQ(f.total.top1_agreement(), 1.0);  // the synthetic routing would disagree
  for (const auto& ids : exact.seen) {
    EXPECT_NE(ids, sample_ids(0));
    EXPECT_NE(ids, sample_ids(3));
  }
  // A small fraction starting on a synthetic sample moves on to the next real one.
  FakeEngine one;
  const Fidelity g = run_audit(tmp.path(), options(0.1), encode_with(&one));
  EXPECT_EQ(g.samples, 1);
  ASSERT_EQ(one.seen.size(), 1u);
  EXPECT_EQ(one.seen[0], sample_ids(1));
}

TEST(Audit, AReferenceThatDoesNotFitTheStoreIsOneLine) {
  TempDir tmp;
  write_fake_store(tmp.path(), 3, DType::kF32);
  auto wrong_experts = [](const Batch& b, Observer* obs) {
    Tensor l(DType::kF32, {b.B, b.S, kExperts + 1});
    Tensor e(DType::kI32, {b.B, b.S});
    for (int blk : kLayers) {
      obs->observe("enc." + std::to_string(blk) + ".router_logits", l.view());
      obs->observe("enc." + std::to_string(blk) + ".expert", e.view());
    }
  };
  try {
    run_audit(tmp.path(), options(1.0), wrong_experts);
    FAIL() << "7 experts accepted for a 6-expert store";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("enc.1.router_logits"), std::string::npos) << e.what();
  }
  auto silent = [](const Batch&, Observer*) {};
  EXPECT_THROW(run_audit(tmp.path(), options(1.0), silent), Error);
}

TEST(Audit, AuditStoreWritesTheManifestObject) {
  TempDir tmp;
  write_fake_store(tmp.path(), 8, DType::kF16);
  FakeEngine shifted = shifted_by(1.0f);
  int loads = 0;
  const Fidelity f = audit_store(tmp.path(), options(0.5, 8192, "mixed"), [&]() -> AuditEncode {
    ++loads;
    return encode_with(&shifted);
  });
  EXPECT_EQ(loads, 1);
  const std::optional<Fidelity> back =
      manifest_fidelity(TraceStore::open(tmp.path()).manifest(), "test");
  ASSERT_TRUE(back.has_value());
  EXPECT_TRUE(back->measured);
  EXPECT_EQ(back->precision, "mixed");
  EXPECT_EQ(back->samples, 4);
  EXPECT_EQ(back->total.tokens, f.total.tokens);
  EXPECT_EQ(back->total.top1_agree, f.total.top1_agree);
  EXPECT_EQ(back->total.max_logit_error, f.total.max_logit_error);
  EXPECT_TRUE(verify_store(tmp.path()).empty());

  // Skipped: recorded with its reason, and no engine is loaded.
  audit_store(tmp.path(), options(0.5, 8192, "fp32", "why"), [&]() -> AuditEncode {
    ++loads;
    return encode_with(&shifted);
  });
  EXPECT_EQ(loads, 1);
  const std::optional<Fidelity> skipped =
      manifest_fidelity(TraceStore::open(tmp.path()).manifest(), "test");
  ASSERT_TRUE(skipped.has_value());
  EXPECT_FALSE(skipped->measured);
  EXPECT_EQ(skipped->reason, "why");
  EXPECT_TRUE(verify_store(tmp.path()).empty());
}

TEST(Audit, ALanguageModelStoreIsAuditedOnItsLmLayers) {
  TempDir tmp;
  write_fake_store(tmp.path(), 6, DType::kF32, 0, 0, /*top_k=*/2);
  const AuditEncode lm_reference = [](const Batch& b, Observer* obs) {
    Tensor logits(DType::kF32, {b.B, b.S, kExperts});
    Tensor expert(DType::kI32, {b.B, b.S, 2});
    for (int blk : kLayers) {
      float* l = logits.data<float>();
      int32_t* e = expert.data<int32_t>();
      for (int64_t t = 0; t < b.B * b.S; ++t) {
        for (int64_t x = 0; x < kExperts; ++x)
          l[t * kExperts + x] = fake_logit(b.input_ids[t], blk, x);
        e[2 * t] = argmax(l + t * kExperts, kExperts);
        e[2 * t + 1] = e[2 * t] == 0 ? 1 : 0;
      }
      const std::string p = "lm." + std::to_string(blk) + ".";
      ASSERT_TRUE(obs->wants(p + "router_logits") && obs->wants(p + "expert")) << p;
      EXPECT_FALSE(obs->wants("enc." + std::to_string(blk) + ".expert"));
      obs->observe(p + "router_logits", logits.view());
      obs->observe(p + "expert", expert.view());
    }
  };
  const Fidelity f =
      audit_store(tmp.path(), options(1.0, 8192, "bf16"), [&] { return lm_reference; });
  ASSERT_TRUE(f.measured) << f.reason;
  ASSERT_EQ(f.per_layer.size(), 2u);
  EXPECT_EQ(f.per_layer[0].first, "lm.1");
  EXPECT_EQ(f.per_layer[1].first, "lm.3");
  EXPECT_EQ(f.total.top1_agree, f.total.tokens);
  EXPECT_EQ(f.total.max_logit_error, 0.0);
  const std::optional<Fidelity> back =
      manifest_fidelity(TraceStore::open(tmp.path()).manifest(), "test");
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(back->per_layer[0].first, "lm.1");
  EXPECT_TRUE(verify_store(tmp.path()).empty());
}

TEST(Audit, AReferenceThatCannotBeLoadedIsRecordedAsTheReason) {
  TempDir tmp;
  write_fake_store(tmp.path(), 4, DType::kF16);
  const Fidelity f = audit_store(tmp.path(), options(1.0, 8192, "bf16"), []() -> AuditEncode {
    fail("CudaLmModel: the weights need 174 GiB in fp32 but the GPU has 139 GiB free");
  });
  EXPECT_FALSE(f.measured);
  EXPECT_NE(f.reason.find("the fp32 reference could not be loaded: CudaLmModel: the weights need"),
            std::string::npos)
      << f.reason;
  const std::optional<Fidelity> back =
      manifest_fidelity(TraceStore::open(tmp.path()).manifest(), "test");
  ASSERT_TRUE(back.has_value());
  EXPECT_FALSE(back->measured);
  EXPECT_TRUE(verify_store(tmp.path()).empty());
}

TEST(Audit, AStoreOfSyntheticSamplesOnlyLoadsNoEngine) {
  TempDir tmp;
  write_fake_store(tmp.path(), 4, DType::kF32, /*synthetic_every=*/1);
  const Fidelity f = audit_store(tmp.path(), options(1.0), []() -> AuditEncode {
    ADD_FAILURE() << "an engine loaded for synthetic samples";
    return {};
  });
  EXPECT_FALSE(f.measured);
  EXPECT_NE(f.reason.find("synthetic"), std::string::npos);
}

// The real CPU engine (fp32) re-running what it stored: the audit's own batching changes nothing.
TEST(Audit, TheCpuEngineReproducesItsOwnStore) {
  TempDir tmp;
  SwitchConfig c = demo_config();
  auto model = SwitchModel::from_source(
      c, make_random_weights(c, RandomWeightOptions{kDemoSeed, DType::kF32, true}),
      LoadOptions{true});
  const std::vector<int> layers = c.sparse_encoder_blocks();
  StoreSettings s;
  s.model = {{"id", "demo"}};
  s.enc_layers = layers;
  s.num_experts = c.num_experts;
  s.d_model = c.d_model;
  s.logits_dtype = DType::kF32;
  s.samples_per_shard = 8;
  {
    auto w = TraceWriter::open(tmp.path(), s, OpenMode::kCreate);
    for (int64_t k = 0; k < 5; ++k) {  // one sample per batch
      Batch b;
      const std::vector<int32_t> ids = sample_ids(k);
      b.B = 1;
      b.S = static_cast<int64_t>(ids.size());
      b.input_ids = ids;
      b.attention_mask.assign(ids.size(), 1);
      RecordingObserver rec;
      model->encode(b, &rec);
      SampleRecord r;
      r.sample_id = "demo/default/test/" + std::to_string(k);
      r.dataset = std::string("demo");
      r.row = k;
      r.token_ids = ids;
      for (int blk : layers) {
        const std::string p = "enc." + std::to_string(blk) + ".";
        r.enc.push_back(LayerRecord{
            rec.last(p + "router_logits").data<float>(), rec.last(p + "expert").data<int32_t>(),
            rec.last(p + "dropped").data<uint8_t>(), rec.last(p + "gate").data<float>(), nullptr});
      }
      w->add(r);
    }
    w->finish(1.0);
  }
  // The audit batches all five together (padded): the routing must not notice.
  const Fidelity f = run_audit(tmp.path(), options(1.0, 4096), [&](const Batch& b, Observer* obs) {
    EXPECT_EQ(b.B, 5);
    model->encode(b, obs);
  });
  EXPECT_EQ(f.samples, 5);
  EXPECT_EQ(f.total.top1_agreement(), 1.0);
  EXPECT_LT(f.total.max_logit_error, 1e-4);
}

TEST(AuditFraction, ParsesFractionsAndRefusesTheRestInOneLine) {
  EXPECT_EQ(parse_audit_fraction("0"), 0.0);
  EXPECT_EQ(parse_audit_fraction("0.01"), 0.01);
  EXPECT_EQ(parse_audit_fraction("1"), 1.0);
  EXPECT_EQ(parse_audit_fraction("5e-3"), 0.005);
  for (const char* bad : {"2", "x", "", "-0.1", "0.5x", "nan", "inf", " 0.1", "1.0001"}) {
    try {
      parse_audit_fraction(bad);
      FAIL() << bad;
    } catch (const Error& e) {
      const std::string m = e.what();
      EXPECT_EQ(m.rfind(std::string("--audit '") + bad + "': expected a fraction", 0), 0u) << m;
      EXPECT_EQ(m.find('\n'), std::string::npos);
    }
  }
}

}  // namespace
}  // namespace moetrace
