// LmWeights' layout errors (each missing or mis-shaped tensor: one error naming it and its expected
// shape) and properties of the LM CPU engine the fixtures alone do not pin down: the top-k tie rule,
// greedy generation that never picks eos, and the KV-cached steps against a full forward pass.
#include <gtest/gtest.h>

#include <cmath>
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

}  // namespace
}  // namespace moetrace
