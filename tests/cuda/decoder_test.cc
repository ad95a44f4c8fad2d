// The GPU decoder (teacher-forced decode() and greedy generate() with the KV cache) against the
// fixtures' transformers reference (fp32 mode) and against the CPU engine: every dec.* key of every
// step, the generated ids and the LM logits.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "core/error.h"
#include "cuda_test_util.h"
#include "io/checkpoint.h"
#include "model/cuda/cuda_switch_model.h"
#include "model/cuda/hf_init_weights.h"
#include "model/random_weights.h"
#include "model/recording_observer.h"
#include "model/switch_model.h"
#include "model_test_util.h"

namespace moetrace::cuda::test {
namespace {

bool is_dec_key(std::string_view k) { return k.rfind("dec.", 0) == 0; }

std::vector<std::string> dec_keys(const SwitchConfig& c) {
  std::vector<std::string> keys;
  for (int64_t i = 0; i < c.num_decoder_layers; ++i) {
    const std::string p = "dec." + std::to_string(i) + ".";
    keys.push_back(p + "input");
    if (c.decoder_block_sparse(i))
      for (const char* n : {"hidden", "router_logits", "expert", "dropped", "gate"})
        keys.push_back(p + n);
  }
  return keys;
}

// Prints where two equal-length integer vectors first differ (the step/sequence of a flip).
std::string first_diff(const std::vector<float>& a, const std::vector<float>& b) {
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    if (a[i] != b[i])
      return "first difference at flat index " + std::to_string(i) + ": " + std::to_string(a[i]) +
             " vs " + std::to_string(b[i]);
  return a.size() == b.size() ? "equal" : "different lengths";
}

// Every dec.* key of two recordings: the same number of offers with the same shapes and dtypes;
// floats within tol (relative), integers identical.
void expect_same_decoder_keys(const SwitchConfig& c, const RecordingObserver& got,
                              const RecordingObserver& want, double tol, const std::string& what) {
  for (const std::string& k : dec_keys(c)) {
    ASSERT_TRUE(want.has(k)) << what << ": the CPU engine offered no " << k;
    ASSERT_TRUE(got.has(k)) << what << ": the GPU engine offered no " << k;
    const auto& g = got.all(k);
    const auto& w = want.all(k);
    ASSERT_EQ(g.size(), w.size()) << what << " " << k << ": offers (steps)";
    for (size_t t = 0; t < g.size(); ++t) {
      ASSERT_EQ(g[t].shape(), w[t].shape()) << what << " " << k << " offer " << t;
      ASSERT_EQ(g[t].dtype(), w[t].dtype()) << what << " " << k << " offer " << t;
      const auto gv = as_f32(g[t].view()), wv = as_f32(w[t].view());
      if (g[t].dtype() == DType::kF32)
        EXPECT_LT(rel_err(gv, wv), tol) << what << " " << k << " offer " << t;
      else
        EXPECT_EQ(gv, wv) << what << " " << k << " offer " << t << ": " << first_diff(gv, wv);
    }
  }
}

std::vector<float> stack_steps(const std::vector<Tensor>& steps, int64_t B, int64_t per) {
  // [steps][B, 1, per] -> [B, steps, per]
  std::vector<float> out(static_cast<size_t>(B) * steps.size() * static_cast<size_t>(per));
  for (size_t t = 0; t < steps.size(); ++t) {
    const auto v = as_f32(steps[t].view());
    for (int64_t b = 0; b < B; ++b)
      std::copy_n(
          v.begin() + b * per, per,
          out.begin() + (b * static_cast<int64_t>(steps.size()) + static_cast<int64_t>(t)) * per);
  }
  return out;
}

class CudaDecoderFixture : public CudaTest, public ::testing::WithParamInterface<const char*> {};

// fp32 mode against transformers: the teacher-forced pass (LM logits, decoder routers) and greedy
// generation of 8 tokens with eos suppressed (ids, routers per step).
TEST_P(CudaDecoderFixture, Fp32MatchesTransformersReference) {
  const std::string dir = kFixtures + GetParam();
  auto ref = open_safetensors(dir + "/reference.safetensors");
  auto model = CudaSwitchModel::load(dir + "/model", LoadOptions{false}, CudaOptions{DType::kF32});
  ASSERT_TRUE(model->has_decoder());
  const SwitchConfig& c = model->config();
  const Batch batch = fixture_batch(*ref);
  const Encoded enc = model->encode(batch, nullptr);

  const TensorView& dec_in = ref->find("decoder_input_ids")->view;
  const int64_t T = dec_in.shape[1];
  RecordingObserver drec(is_dec_key);
  const Tensor logits = model->decode(enc, batch, as_i32(dec_in), T, &drec);
  EXPECT_LT(rel_err(as_f32(logits.view()), as_f32(ref->find("logits")->view)), 1e-4);
  const auto sparse = c.sparse_decoder_blocks();
  for (size_t n = 0; n < sparse.size(); ++n) {
    const std::string r = "decoder_router." + std::to_string(n) + ".";
    const std::string k = "dec." + std::to_string(sparse[n]) + ".";
    EXPECT_LT(rel_err(as_f32(drec.last(k + "hidden").view()),
                      as_f32(ref->find(r + "router_input")->view)),
              1e-4)
        << k;
    EXPECT_LT(rel_err(as_f32(drec.last(k + "router_logits").view()),
                      as_f32(ref->find(r + "router_logits")->view)),
              1e-4)
        << k;
    EXPECT_LT(
        rel_err(as_f32(drec.last(k + "gate").view()), as_f32(ref->find(r + "max_prob")->view)),
        1e-4)
        << k;
    EXPECT_EQ(as_f32(drec.last(k + "expert").view()), as_f32(ref->find(r + "top1")->view)) << k;
    auto kept = as_f32(drec.last(k + "dropped").view());
    for (auto& v : kept) v = 1.f - v;
    EXPECT_EQ(kept, as_f32(ref->find(r + "kept")->view)) << k;
  }

  const TensorView& gen_ids = ref->find("generated_ids")->view;
  const int64_t steps = gen_ids.shape[1] - 1;
  RecordingObserver grec(is_dec_key);
  const GenerateResult g = model->generate(enc, batch, steps, steps, &grec);
  EXPECT_EQ(g.B, batch.B);
  EXPECT_EQ(g.steps, steps);
  EXPECT_EQ(g.ids, as_i32(gen_ids));
  for (size_t n = 0; n < sparse.size(); ++n) {
    const std::string r = "generate_decoder_router." + std::to_string(n) + ".";
    const std::string k = "dec." + std::to_string(sparse[n]) + ".";
    ASSERT_EQ(static_cast<int64_t>(grec.all(k + "router_logits").size()), steps) << k;
    EXPECT_LT(rel_err(stack_steps(grec.all(k + "router_logits"), batch.B, c.num_experts),
                      as_f32(ref->find(r + "router_logits")->view)),
              1e-4)
        << k;
    const auto top1 = stack_steps(grec.all(k + "expert"), batch.B, 1);
    const auto want = as_f32(ref->find(r + "top1")->view);
    EXPECT_EQ(top1, want) << k << ": " << first_diff(top1, want);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CudaDecoderFixture, ::testing::Values("tiny-a", "tiny-a-bf16"));

// The GPU decoder in fp32 against the CPU engine on generate()/decode() runs, every dec.* key of
// every step (with eos free: sequences finish at different steps).
void expect_generate_matches_cpu(const SwitchConfig& c, std::shared_ptr<TensorSource> src,
                                 const Batch& batch, int64_t max_new, int64_t min_new,
                                 const std::string& what) {
  auto cpu = SwitchModel::from_source(c, src, LoadOptions{false});
  auto gpu = CudaSwitchModel::from_source(c, src, LoadOptions{false}, CudaOptions{DType::kF32});
  RecordingObserver want(is_dec_key), got(is_dec_key);
  const Tensor enc = cpu->encode(batch, nullptr);
  const GenerateResult w = cpu->generate(enc, batch, max_new, min_new, &want);
  const Encoded genc = gpu->encode(batch, nullptr);
  const GenerateResult g = gpu->generate(genc, batch, max_new, min_new, &got);
  EXPECT_EQ(g.B, w.B) << what;
  EXPECT_EQ(g.steps, w.steps) << what;
  EXPECT_EQ(g.ids, w.ids) << what;
  if (w.steps == 0) {  // nothing ran, nothing offered
    for (const std::string& k : dec_keys(c)) EXPECT_FALSE(got.has(k)) << what << " " << k;
    return;
  }
  expect_same_decoder_keys(c, got, want, 1e-4, what + " generate");
}

TEST_F(CudaTest, DecoderFp32MatchesCpuEngineOnFixture) {
  const std::string dir = kFixtures + "tiny-a";
  auto ref = open_safetensors(dir + "/reference.safetensors");
  SwitchConfig c = load_config(dir + "/model/config.json");
  std::shared_ptr<TensorSource> src = open_checkpoint(dir + "/model");
  const Batch batch = fixture_batch(*ref);
  expect_generate_matches_cpu(c, src, batch, 10, 0, "tiny-a");

  // Teacher-forced, all keys.
  auto cpu = SwitchModel::from_source(c, src, LoadOptions{false});
  auto gpu = CudaSwitchModel::from_source(c, src, LoadOptions{false}, CudaOptions{DType::kF32});
  const TensorView& dec_in = ref->find("decoder_input_ids")->view;
  const int64_t T = dec_in.shape[1];
  RecordingObserver want(is_dec_key), got(is_dec_key);
  const Tensor enc = cpu->encode(batch, nullptr);
  const Tensor wl = cpu->decode(enc, batch, as_i32(dec_in), T, &want);
  const Encoded genc = gpu->encode(batch, nullptr);
  const Tensor gl = gpu->decode(genc, batch, as_i32(dec_in), T, &got);
  EXPECT_LT(rel_err(as_f32(gl.view()), as_f32(wl.view())), 1e-4);
  expect_same_decoder_keys(c, got, want, 1e-4, "tiny-a decode");

  // eos = the first token sequence 0 generates: it finishes after one step and gets pad tokens
  // (still routed) while the others go on; with min_new_tokens the eos logit is masked first.
  GenerateResult first = cpu->generate(enc, batch, 1, 0, nullptr);
  SwitchConfig c2 = c;
  c2.eos_token_id = first.ids[1];
  expect_generate_matches_cpu(c2, src, batch, 8, 0, "eos = " + std::to_string(c2.eos_token_id));
  expect_generate_matches_cpu(c2, src, batch, 8, 3,
                              "eos = " + std::to_string(c2.eos_token_id) + ", min 3");
  expect_generate_matches_cpu(c2, src, batch, 0, 0, "no steps");
}

// A TensorSource with an untied LM head added to another source's tensors.
class WithLmHead : public TensorSource {
 public:
  WithLmHead(std::shared_ptr<TensorSource> base, int64_t V, int64_t d)
      : base_(std::move(base)), weight_(DType::kF32, {V, d}) {
    const auto v = random_vec(static_cast<size_t>(V * d), 99, -0.1f, 0.1f);
    std::copy(v.begin(), v.end(), weight_.data<float>());
    head_ = CheckpointTensor{"lm_head.weight", weight_.view(), "random"};
  }
  std::vector<std::string> names() const override {
    auto n = base_->names();
    n.push_back(head_.name);
    return n;
  }
  const CheckpointTensor* find(const std::string& name) const override {
    return name == head_.name ? &head_ : base_->find(name);
  }
  std::vector<std::filesystem::path> files() const override { return base_->files(); }
  std::string format() const override { return base_->format(); }

 private:
  std::shared_ptr<TensorSource> base_;
  Tensor weight_;
  CheckpointTensor head_;
};

// Random weights, fp32: capacity 3 so that the teacher-forced pass drops tokens (per sequence)
// while generation steps (one token per sequence) never do; the encoder output passed explicitly;
// an untied LM head.
TEST_F(CudaTest, DecoderFp32CapacityAndUntiedHead) {
  SwitchConfig c = demo_config();
  c.expert_capacity = 3;
  auto src = make_hf_init_random_weights(c, RandomWeightOptions{5, DType::kBF16, false});
  const Batch batch = random_batch(5, 23, c.vocab_size, 9);
  auto cpu = SwitchModel::from_source(c, src, LoadOptions{false});
  auto gpu = CudaSwitchModel::from_source(c, src, LoadOptions{false}, CudaOptions{DType::kF32});
  const Tensor enc = cpu->encode(batch, nullptr);
  RecordingObserver want(is_dec_key), got(is_dec_key);
  const GenerateResult w = cpu->generate(enc, batch, 12, 0, &want);
  const GenerateResult g =
      gpu->generate(Encoded{Tensor::from_view(enc.view())}, batch, 12, 0, &got);  // no GPU encode()
  EXPECT_EQ(g.steps, w.steps);
  EXPECT_EQ(g.ids, w.ids);
  expect_same_decoder_keys(c, got, want, 1e-4, "random generate");
  for (const auto& blk : c.sparse_decoder_blocks())
    for (const Tensor& t : got.all("dec." + std::to_string(blk) + ".dropped"))
      for (float v : as_f32(t.view())) ASSERT_EQ(v, 0.f) << "a generation step dropped a token";

  // Teacher-forced over 12 positions: capacity 3 drops.
  const int64_t T = 12;
  std::vector<int32_t> dec_ids;
  for (int64_t b = 0; b < batch.B; ++b)
    for (int64_t t = 0; t < T; ++t)
      dec_ids.push_back(t == 0 ? 0 : static_cast<int32_t>(2 + (b * 7 + t * 13) % 50));
  want.clear();
  got.clear();
  const Tensor wl = cpu->decode(enc, batch, dec_ids, T, &want);
  const Tensor gl = gpu->decode(Encoded{Tensor::from_view(enc.view())}, batch, dec_ids, T, &got);
  EXPECT_LT(rel_err(as_f32(gl.view()), as_f32(wl.view())), 1e-4);
  expect_same_decoder_keys(c, got, want, 1e-4, "random decode");
  int64_t dropped = 0;
  for (const auto& blk : c.sparse_decoder_blocks())
    for (float v : as_f32(got.last("dec." + std::to_string(blk) + ".dropped").view()))
      dropped += v > 0;
  EXPECT_GT(dropped, 0) << "capacity 3 over 12 positions should drop tokens";

  // Untied LM head (no d_model^-0.5 scale).
  SwitchConfig cu = c;
  cu.tie_word_embeddings = false;
  auto usrc = std::make_shared<WithLmHead>(src, c.vocab_size, c.d_model);
  auto ucpu = SwitchModel::from_source(cu, usrc, LoadOptions{false});
  auto ugpu = CudaSwitchModel::from_source(cu, usrc, LoadOptions{false}, CudaOptions{DType::kF32});
  const Tensor uw = ucpu->decode(enc, batch, dec_ids, T, nullptr);
  const Tensor ug =
      ugpu->decode(Encoded{Tensor::from_view(enc.view())}, batch, dec_ids, T, nullptr);
  EXPECT_LT(rel_err(as_f32(ug.view()), as_f32(uw.view())), 1e-4) << "untied LM head";
  const GenerateResult uwg = ucpu->generate(enc, batch, 6, 0, nullptr);
  const GenerateResult ugg =
      ugpu->generate(Encoded{Tensor::from_view(enc.view())}, batch, 6, 0, nullptr);
  EXPECT_EQ(ugg.ids, uwg.ids) << "untied LM head";
}

// bf16/fp16 on the GPU vs the float32 CPU engine (HF-init random weights): teacher-forced LM and
// router logits within 2e-2; in generation, the next token agrees for >= 90% of the steps whose
// prefix agrees, and the router logits of those steps are within 2e-2.
TEST_F(CudaTest, DecoderBf16MatchesCpuFp32) {
  SwitchConfig c = demo_config();
  auto src = make_hf_init_random_weights(c, RandomWeightOptions{7, DType::kBF16, false});
  auto cpu = SwitchModel::from_source(c, src, LoadOptions{false});
  const Batch batch = random_batch(8, 45, c.vocab_size, 3);
  const int64_t max_new = 16, B = batch.B, E = c.num_experts;
  const Tensor enc = cpu->encode(batch, nullptr);
  RecordingObserver want(is_dec_key);
  const GenerateResult w = cpu->generate(enc, batch, max_new, 0, &want);
  std::vector<int32_t> dec_ids;  // the CPU's generated ids, teacher-forced
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < w.steps; ++t) dec_ids.push_back(w.ids[b * (w.steps + 1) + t]);
  RecordingObserver dwant(is_dec_key);
  const Tensor wl = cpu->decode(enc, batch, dec_ids, w.steps, &dwant);

  for (DType prec : {DType::kBF16, DType::kF16}) {
    const std::string p(dtype_name(prec));
    auto gpu = CudaSwitchModel::from_source(c, src, LoadOptions{false}, CudaOptions{prec});
    const Encoded genc = gpu->encode(batch, nullptr);
    RecordingObserver got(is_dec_key), dgot(is_dec_key);
    const Tensor gl = gpu->decode(genc, batch, dec_ids, w.steps, &dgot);
    EXPECT_LT(rel_err(as_f32(gl.view()), as_f32(wl.view())), 2e-2) << p << " LM logits";
    for (int blk : c.sparse_decoder_blocks()) {
      const std::string k = "dec." + std::to_string(blk) + ".router_logits";
      EXPECT_LT(rel_err(as_f32(dgot.last(k).view()), as_f32(dwant.last(k).view())), 2e-2)
          << p << " decode " << k;
    }

    const GenerateResult g = gpu->generate(genc, batch, max_new, 0, &got);
    ASSERT_EQ(g.B, B);
    // Steps t whose prefix ids[0..t] agree (the same decoder input), per sequence.
    int64_t comparable = 0, agree = 0, same_seqs = 0;
    std::vector<float> gr, wr;  // router logits of the comparable steps
    const int64_t steps = std::min(g.steps, w.steps);
    for (int64_t b = 0; b < B; ++b) {
      const int32_t* gi = g.ids.data() + b * (g.steps + 1);
      const int32_t* wi = w.ids.data() + b * (w.steps + 1);
      bool same = g.steps == w.steps;
      for (int64_t t = 0; t < steps; ++t) {
        if (gi[t] != wi[t]) {
          same = false;
          break;
        }
        ++comparable;
        agree += gi[t + 1] == wi[t + 1];
        for (int blk : c.sparse_decoder_blocks()) {
          const std::string k = "dec." + std::to_string(blk) + ".router_logits";
          const auto gv = as_f32(got.all(k)[static_cast<size_t>(t)].view());
          const auto wv = as_f32(want.all(k)[static_cast<size_t>(t)].view());
          gr.insert(gr.end(), gv.begin() + b * E, gv.begin() + (b + 1) * E);
          wr.insert(wr.end(), wv.begin() + b * E, wv.begin() + (b + 1) * E);
        }
      }
      same = same && std::equal(gi, gi + g.steps + 1, wi);
      same_seqs += same;
    }
    std::printf(
        "[ %s ] generation: %lld/%lld comparable steps agree, %lld/%lld sequences identical\n",
        p.c_str(), static_cast<long long>(agree), static_cast<long long>(comparable),
        static_cast<long long>(same_seqs), static_cast<long long>(B));
    ASSERT_GT(comparable, 0);
    EXPECT_GE(static_cast<double>(agree) / static_cast<double>(comparable), 0.9) << p;
    EXPECT_GE(same_seqs * 2, B) << p << ": most sequences should generate identical ids";
    EXPECT_LT(rel_err(gr, wr), 2e-2) << p << " generation router logits";
  }
}

// One shape for both engines: generate()/decode() continue from an Encoded. The GPU uses the
// output it still holds only for its latest encode() of the same batch; any other Encoded (an
// older one, another batch's, the CPU engine's) is uploaded, with the same result. Refused: an
// encoder-only model, an encoder output of the wrong shape or dtype, a malformed batch.
TEST_F(CudaTest, DecoderContinuesFromAnyEncodedOutput) {
  SwitchConfig c = demo_config();
  c.num_layers = c.num_decoder_layers = 2;
  c.encoder_sparse_step = c.decoder_sparse_step = -1;
  c.num_sparse_encoder_layers = c.num_sparse_decoder_layers = 1;
  c.derive_and_validate("test");
  auto src = make_random_weights(c, RandomWeightOptions{3, DType::kF32, false});
  const Batch a = random_batch(2, 9, c.vocab_size, 1), b = random_batch(2, 9, c.vocab_size, 2);
  auto enc_only = CudaSwitchModel::from_source(c, src, LoadOptions{true}, CudaOptions{});
  EXPECT_FALSE(enc_only->has_decoder());
  const Encoded ea0 = enc_only->encode(a, nullptr);
  EXPECT_THROW(enc_only->generate(ea0, a, 4, 0, nullptr), Error);

  auto gpu = CudaSwitchModel::from_source(c, src, LoadOptions{false}, CudaOptions{});
  const Encoded ea = gpu->encode(a, nullptr);
  const GenerateResult r = gpu->generate(ea, a, 4, 0, nullptr);  // on the device
  EXPECT_EQ(r.B, 2);
  EXPECT_EQ(static_cast<int64_t>(r.ids.size()), 2 * (r.steps + 1));
  EXPECT_EQ(r.ids[0], c.decoder_start_token_id);
  EXPECT_EQ(gpu->generate(ea, a, 4, 0, nullptr).ids, r.ids);  // again, without re-encoding
  const Encoded eb = gpu->encode(b, nullptr);
  const GenerateResult rb = gpu->generate(eb, b, 4, 0, nullptr);
  EXPECT_EQ(gpu->generate(ea, a, 4, 0, nullptr).ids, r.ids);  // `ea` is uploaded now
  EXPECT_EQ(gpu->generate(Encoded{Tensor::from_view(eb.output.view())}, b, 4, 0, nullptr).ids,
            rb.ids);  // no id: uploaded
  EXPECT_THROW(gpu->generate(Encoded{Tensor(DType::kF32, {2, 8, c.d_model})}, a, 4, 0, nullptr),
               Error);
  Batch bad = a;
  bad.input_ids.pop_back();
  EXPECT_THROW(gpu->generate(ea, bad, 4, 0, nullptr), Error);
  EXPECT_THROW(gpu->encode(bad, nullptr), Error);
  EXPECT_THROW(gpu->decode(ea, a, std::vector<int32_t>(2 * 3, 0), 2, nullptr), Error);
}

}  // namespace
}  // namespace moetrace::cuda::test
