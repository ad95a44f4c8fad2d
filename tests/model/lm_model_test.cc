// LmWeights' layout errors (each missing or mis-shaped tensor: one error naming it and its expected
// shape) and properties of the LM CPU engine the fixtures alone do not pin down: the top-k tie rule,
// greedy generation that never picks eos, and the KV-cached steps against a full forward pass.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "core/error.h"
#include "io/checkpoint.h"
#include "model/lm/lm_forward.h"
#include "model/recording_observer.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
const fs::path kFixtures = fs::path(MOETRACE_TEST_DATA) / "fixtures_lm";

// A checkpoint's tensors with edits: some removed, some replaced by owned F32 tensors.
class EditedSource : public MapTensorSource {
 public:
  explicit EditedSource(const fs::path& dir) : base_(open_checkpoint(dir)) {
    for (const std::string& n : base_->names()) by_name_[n] = *base_->find(n);
  }
  void remove(const std::string& name) { ASSERT_EQ(by_name_.erase(name), 1u) << name; }
  // (Re)places `name` by a zero F32 tensor of `shape`; returns its data.
  float* put(const std::string& name, Shape shape) {
    owned_.push_back(std::make_unique<Tensor>(DType::kF32, std::move(shape)));
    by_name_[name] = CheckpointTensor{name, owned_.back()->view(), "edited.safetensors"};
    return owned_.back()->data<float>();
  }
  std::vector<fs::path> files() const override { return base_->files(); }
  std::string format() const override { return "edited"; }

 private:
  std::unique_ptr<TensorSource> base_;
  std::vector<std::unique_ptr<Tensor>> owned_;
};

std::string load_error(const char* family, const char* layout,
                       const std::function<void(EditedSource&)>& edit) {
  const fs::path dir = kFixtures / family / layout;
  EditedSource src(dir);
  edit(src);
  try {
    map_lm_weights(load_lm_config(dir / "config.json"), src, WeightOptions{});
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

void expect_has(const std::string& msg, const std::string& piece) {
  EXPECT_NE(msg.find(piece), std::string::npos) << "message: " << msg << "\nlacks: " << piece;
}

TEST(LmWeights, EveryLayoutOfEveryFixtureLoads) {
  for (const char* f : {"olmoe", "mixtral", "qwen2_moe", "qwen3_moe"}) {
    for (const char* l : {"model", "model_hub", "model_fused"}) {
      EXPECT_EQ(load_error(f, l, [](EditedSource&) {}), "") << f << "/" << l;
    }
  }
}

TEST(LmWeights, LayoutIsNamed) {
  const auto cfg = load_lm_config(kFixtures / "mixtral/model/config.json");
  EXPECT_EQ(map_lm_weights(cfg, *open_checkpoint(kFixtures / "mixtral/model"), {}).expert_layout,
            "per-expert");
  EXPECT_EQ(
      map_lm_weights(cfg, *open_checkpoint(kFixtures / "mixtral/model_fused"), {}).expert_layout,
      "fused");
}

TEST(LmWeights, MissingPerExpertTensorNamesItAndItsShape) {
  // olmoe: d 64, expert width 16.
  const std::string msg = load_error("olmoe", "model_hub", [](EditedSource& s) {
    s.remove("model.layers.1.mlp.experts.3.up_proj.weight");
  });
  expect_has(msg, "tensor 'model.layers.1.mlp.experts.3.up_proj.weight' is missing");
  expect_has(msg, "[16, 64]");
}

TEST(LmWeights, MissingExpertsMentionBothLayouts) {
  const std::string msg = load_error("mixtral", "model", [](EditedSource& s) {
    for (int e = 0; e < 8; ++e)
      s.remove("model.layers.0.block_sparse_moe.experts." + std::to_string(e) + ".w1.weight");
  });
  expect_has(msg, "'model.layers.0.block_sparse_moe.experts.0.w1.weight' is missing");
  expect_has(msg, "fused 'model.layers.0.block_sparse_moe.experts.gate_up_proj' [8, 32, 48]");
}

TEST(LmWeights, FusedTensorsAreChecked) {
  std::string msg = load_error("qwen3_moe", "model_fused", [](EditedSource& s) {
    s.remove("model.layers.2.mlp.experts.down_proj");
  });
  expect_has(msg, "'model.layers.2.mlp.experts.down_proj' is missing");
  expect_has(msg, "[8, 48, 16]");
  msg = load_error("qwen3_moe", "model_fused", [](EditedSource& s) {
    s.put("model.layers.1.mlp.experts.gate_up_proj", {8, 48, 32});  // transposed [E, d, 2F]
  });
  expect_has(msg, "'model.layers.1.mlp.experts.gate_up_proj' has shape [8, 48, 32]");
  expect_has(msg, "implies [8, 32, 48]");
}

TEST(LmWeights, MisShapedAndMissingDenseTensors) {
  std::string msg = load_error("qwen2_moe", "model", [](EditedSource& s) {
    s.put("model.layers.0.self_attn.k_proj.weight", {64, 64});
  });
  expect_has(msg, "'model.layers.0.self_attn.k_proj.weight' has shape [64, 64]");
  expect_has(msg, "implies [32, 64]");
  msg = load_error("qwen2_moe", "model",
                   [](EditedSource& s) { s.remove("model.layers.0.self_attn.q_proj.bias"); });
  expect_has(msg, "'model.layers.0.self_attn.q_proj.bias' is missing (expected shape [64]");
  msg = load_error("qwen2_moe", "model", [](EditedSource& s) {
    s.remove("model.layers.2.mlp.shared_expert_gate.weight");
  });
  expect_has(msg, "'model.layers.2.mlp.shared_expert_gate.weight' is missing");
  msg = load_error("qwen2_moe", "model", [](EditedSource& s) {
    s.remove("model.layers.1.mlp.down_proj.weight");  // the dense layer
  });
  expect_has(msg, "'model.layers.1.mlp.down_proj.weight' is missing (expected shape [64, 32]");
  msg = load_error("olmoe", "model",
                   [](EditedSource& s) { s.remove("model.layers.0.self_attn.k_norm.weight"); });
  expect_has(msg, "'model.layers.0.self_attn.k_norm.weight' is missing (expected shape [32]");
  msg = load_error("qwen3_moe", "model", [](EditedSource& s) { s.remove("lm_head.weight"); });
  expect_has(msg, "'lm_head.weight' is missing");
}

// ---- the engine ---------------------------------------------------------------------------------

Batch batch_of(const ForwardInputs& in) { return in.batch; }

// A router of zeros gives every expert the same logit: the top k are experts 0..k-1 (lowest index
// first), each weighted 1/k when renormalized, else 1/E.
TEST(LmModel, TiedRouterLogitsPickTheLowestIndices) {
  for (const char* f : {"mixtral", "olmoe"}) {
    const fs::path dir = kFixtures / f / "model";
    const LmConfig c = load_lm_config(dir / "config.json");
    auto src = std::make_shared<EditedSource>(dir);
    src->put(std::string("model.layers.1.") +
                 (c.family == LmFamily::kMixtral ? "block_sparse_moe" : "mlp") + ".gate.weight",
             {c.num_experts, c.hidden_size});
    const auto model = LmModel::from_source(c, src);
    RecordingObserver rec;
    const ForwardInputs in = read_forward_inputs(kFixtures / f / "inputs.safetensors");
    model->forward(batch_of(in), &rec);
    const Tensor& ids = rec.last("lm.1.expert");
    const Tensor& w = rec.last("lm.1.gate");
    const float expect = c.norm_topk_prob ? 1.0f / static_cast<float>(c.top_k)
                                          : 1.0f / static_cast<float>(c.num_experts);
    for (int64_t t = 0; t < ids.numel(); ++t) {
      ASSERT_EQ(ids.data<int32_t>()[t], t % c.top_k) << f << " slot " << t;
      ASSERT_FLOAT_EQ(w.data<float>()[t], expect) << f;
    }
    // Layer 0 keeps real routing: not everything is tied.
    EXPECT_NE(
        rec.last("lm.0.expert").data<int32_t>()[0] + rec.last("lm.0.expert").data<int32_t>()[1], 1);
  }
}

// Exactly N tokens; a banned id (eos) is never chosen even where it is the argmax.
TEST(LmModel, GenerationNeverPicksBannedIds) {
  const fs::path dir = kFixtures / "qwen3_moe/model";
  auto model = LmModel::load(dir);
  EXPECT_EQ(model->banned_ids(), (std::vector<int64_t>{2}));  // generation_config.json's eos
  const ForwardInputs in = read_forward_inputs(kFixtures / "qwen3_moe/inputs.safetensors");
  const int64_t B = in.batch.B, S = in.batch.S, N = 4;
  const LmGenerateResult free = model->generate(in.batch, N, nullptr);
  ASSERT_EQ(free.ids.size(), static_cast<size_t>(B * (S + N)));
  // Ban every token the free run chose: none may appear, and the run still gives N tokens.
  std::vector<int64_t> banned;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = S; t < S + N; ++t)
      banned.push_back(free.ids[static_cast<size_t>(b * (S + N) + t)]);
  }
  model->set_banned_ids(banned);
  const LmGenerateResult r = model->generate(in.batch, N, nullptr);
  ASSERT_EQ(r.ids.size(), free.ids.size());
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < S; ++t)
      EXPECT_EQ(r.ids[static_cast<size_t>(b * (S + N) + t)],
                in.batch.input_ids[static_cast<size_t>(b * S + t)]);
    for (int64_t t = S; t < S + N; ++t) {
      const int64_t id = r.ids[static_cast<size_t>(b * (S + N) + t)];
      EXPECT_EQ(std::count(banned.begin(), banned.end(), id), 0) << "row " << b << " picked " << id;
    }
  }
}

// Unpadded rows: each cached generation step must see what a full forward pass over the prompt
// and the tokens generated so far computes at that column (same positions, same keys).
TEST(LmModel, CachedStepsEqualAFullForwardPass) {
  for (const char* f : {"olmoe", "mixtral", "qwen2_moe", "qwen3_moe"}) {
    const auto model = LmModel::load(kFixtures / f / "model");
    const ForwardInputs in = read_forward_inputs(kFixtures / f / "inputs.safetensors");
    Batch p;  // row 0 of the fixture, unpadded
    p.B = 1;
    p.S = in.batch.S;
    p.input_ids.assign(in.batch.input_ids.begin(), in.batch.input_ids.begin() + p.S);
    p.attention_mask.assign(static_cast<size_t>(p.S), 1);
    const int64_t N = 4, S = p.S;
    RecordingObserver grec([](std::string_view k) { return k.rfind("gen.", 0) == 0; });
    const LmGenerateResult g = model->generate(p, N, &grec);
    Batch full;
    full.B = 1;
    full.S = S + N - 1;
    full.input_ids.assign(g.ids.begin(), g.ids.end() - 1);
    full.attention_mask.assign(static_cast<size_t>(full.S), 1);
    RecordingObserver rec;
    const Tensor logits = model->forward(full, &rec);
    const int64_t V = model->config().vocab_size;
    for (int64_t t = 0; t < N; ++t) {  // token S + t is the argmax of column S - 1 + t
      const float* l = logits.data<float>() + (S - 1 + t) * V;
      EXPECT_EQ(std::max_element(l, l + V) - l, g.ids[static_cast<size_t>(S + t)])
          << f << " t=" << t;
    }
    const int block = model->config().sparse_layers().back();
    const auto& steps = grec.all(lm_key(true, block, "router_logits"));
    ASSERT_EQ(steps.size(), static_cast<size_t>(N - 1)) << f;
    const Tensor& all = rec.last(lm_key(false, block, "router_logits"));
    const int64_t E = model->config().num_experts;
    for (int64_t j = 0; j < N - 1; ++j) {
      for (int64_t e = 0; e < E; ++e) {
        EXPECT_NEAR(steps[static_cast<size_t>(j)].data<float>()[e],
                    all.data<float>()[(S + j) * E + e], 1e-4)
            << f << " step " << j;
      }
    }
  }
}

// Mixtral's sliding window: key j is visible from query i iff i - j < W. With W = 2 and 2 layers
// the last column depends on the last 3 tokens only: changing any earlier token leaves its logits
// as they are, changing the third-last changes them (an off-by-one window would not).
TEST(LmModel, SlidingWindowBoundsTheReceptiveField) {
  const fs::path dir = kFixtures / "mixtral/model";
  LmConfig c = load_lm_config(dir / "config.json");
  ASSERT_EQ(c.sliding_window, 0);
  ASSERT_EQ(c.num_hidden_layers, 2);
  const ForwardInputs in = read_forward_inputs(kFixtures / "mixtral/inputs.safetensors");
  const int64_t S = in.batch.S, V = c.vocab_size;
  std::shared_ptr<TensorSource> src = open_checkpoint(dir);
  auto last_logits = [&](int64_t window, int64_t changed) {  // changed < 0: none
    LmConfig cw = c;
    cw.sliding_window = window;
    Batch b;
    b.B = 1;
    b.S = S;
    b.input_ids.assign(in.batch.input_ids.begin(), in.batch.input_ids.begin() + S);
    b.attention_mask.assign(static_cast<size_t>(S), 1);
    if (changed >= 0) {
      int32_t& id = b.input_ids[static_cast<size_t>(changed)];
      id = static_cast<int32_t>((id + 17) % V);
    }
    const Tensor l = LmModel::from_source(cw, src)->forward(b, nullptr);
    return std::vector<float>(l.data<float>() + (S - 1) * V, l.data<float>() + S * V);
  };
  auto max_diff = [](const std::vector<float>& a, const std::vector<float>& b) {
    float m = 0;
    for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
    return m;
  };
  const auto base = last_logits(2, -1);
  for (int64_t t = 0; t < S - 3; ++t) EXPECT_LT(max_diff(base, last_logits(2, t)), 1e-5) << t;
  EXPECT_GT(max_diff(base, last_logits(2, S - 3)), 1e-3);
  // A window as long as the sequence is no window; no window sees everything.
  EXPECT_EQ(max_diff(last_logits(S, -1), last_logits(0, -1)), 0.0f);
  EXPECT_GT(max_diff(last_logits(0, -1), last_logits(0, 0)), 1e-3);
}

// tie_word_embeddings: no lm_head.weight needed, and the logits are those of an lm_head equal to
// the embedding.
TEST(LmModel, TiedEmbeddingsAreTheLmHead) {
  const fs::path dir = kFixtures / "olmoe/model";
  LmConfig c = load_lm_config(dir / "config.json");
  ASSERT_FALSE(c.tie_word_embeddings);
  auto untied = std::make_shared<EditedSource>(dir);
  const CheckpointTensor* emb = untied->find("model.embed_tokens.weight");
  float* head = untied->put("lm_head.weight", emb->view.shape);
  std::copy_n(emb->view.as<float>(), emb->view.numel(), head);
  auto tied = std::make_shared<EditedSource>(dir);
  tied->remove("lm_head.weight");
  LmConfig ct = c;
  ct.tie_word_embeddings = true;
  const ForwardInputs in = read_forward_inputs(kFixtures / "olmoe/inputs.safetensors");
  const Tensor a = LmModel::from_source(c, untied)->forward(in.batch, nullptr);
  const Tensor b = LmModel::from_source(ct, tied)->forward(in.batch, nullptr);
  EXPECT_EQ(std::memcmp(a.raw(), b.raw(), a.nbytes()), 0);
  const Tensor orig = LmModel::load(dir)->forward(in.batch, nullptr);
  EXPECT_NE(std::memcmp(a.raw(), orig.raw(), a.nbytes()), 0);  // the fixture's own head differs
}

TEST(LmRoute, DescendingOrderTiesToTheLowestIndexAndRenormalization) {
  // Row 0 distinct; row 1 three-way tie for the top: experts 1 and 2 (lowest indices) win.
  const float logits[2][5] = {{0.1f, 2.0f, -1.0f, 1.5f, 0.0f}, {1.0f, 3.0f, 3.0f, 0.0f, 3.0f}};
  int32_t ids[2][3];
  float w[2][3];
  lm_topk_route(&logits[0][0], 2, 5, 3, false, &ids[0][0], &w[0][0]);
  EXPECT_EQ((std::vector<int32_t>(ids[0], ids[0] + 3)), (std::vector<int32_t>{1, 3, 0}));
  EXPECT_EQ((std::vector<int32_t>(ids[1], ids[1] + 3)), (std::vector<int32_t>{1, 2, 4}));
  double z = 0;
  for (float l : logits[0]) z += std::exp(static_cast<double>(l));
  EXPECT_NEAR(w[0][0], std::exp(2.0) / z, 1e-6);  // plain softmax probabilities
  EXPECT_NEAR(w[0][2], std::exp(0.1) / z, 1e-6);
  int32_t ids2[2][2];
  float w2[2][2];
  lm_topk_route(&logits[0][0], 2, 5, 2, true, &ids2[0][0], &w2[0][0]);
  EXPECT_NEAR(w2[0][0] + w2[0][1], 1.0f, 1e-6);  // renormalized over the k chosen
  EXPECT_NEAR(w2[0][0] / w2[0][1], std::exp(0.5), 1e-5);
  EXPECT_EQ(ids2[1][0], 1);
  EXPECT_EQ(ids2[1][1], 2);
  EXPECT_FLOAT_EQ(w2[1][0], 0.5f);
}

TEST(LmRope, InverseFrequencies) {
  LmConfig c;
  c.head_dim = 8;
  c.rope_theta = 10000.0;
  std::vector<float> f = rope_inv_freq(c);
  ASSERT_EQ(f.size(), 4u);
  EXPECT_FLOAT_EQ(f[0], 1.0f);
  EXPECT_NEAR(f[1], 0.1f, 1e-7);  // 10000^(-2/8)
  EXPECT_NEAR(f[3], 0.001f, 1e-9);
  c.rope_type = RopeType::kLinear;
  c.rope_factor = 4.0;
  EXPECT_NEAR(rope_inv_freq(c)[1], 0.025f, 1e-8);
}

}  // namespace
}  // namespace moetrace
