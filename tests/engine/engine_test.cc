// The Engine interface on the CPU (make_engine({cpu})): the collection pipeline (submit/poll)
// hands back exactly what encode()/generate() offer an observer, with decoder keys stacked over the
// steps; a malformed batch or encoder output is one Error; the CPU refuses other precisions.
#include "engine/engine.h"

#include <gtest/gtest.h>

#include <cstring>
#include <functional>
#include <random>

#include "common/random_batch.h"
#include "core/error.h"
#include "core/keys.h"
#include "model/random_weights.h"
#include "model/recording_observer.h"

namespace moetrace {
namespace {

SwitchConfig small_config() {
  SwitchConfig c = demo_config();
  c.num_layers = c.num_decoder_layers = 4;
  c.num_sparse_encoder_layers = c.num_sparse_decoder_layers = 2;
  c.encoder_sparse_step = c.decoder_sparse_step = -1;
  c.derive_and_validate("test");
  return c;
}

using test::random_batch;  // tests/common/random_batch.h

bool same_bytes(const TensorView& a, const TensorView& b) {
  return a.dtype == b.dtype && a.shape == b.shape &&
         std::memcmp(a.data, b.data, static_cast<size_t>(a.numel()) * dtype_size(a.dtype)) == 0;
}

std::unique_ptr<Engine> cpu_engine_of(const SwitchConfig& c, bool encoder_only) {
  EngineOptions o;
  o.load.encoder_only = encoder_only;
  return make_engine(o, c, make_random_weights(c, RandomWeightOptions{5, DType::kF32, false}));
}

KeyRequest request_of(const SwitchConfig& c, bool decoder) {
  KeyRequest r;
  for (int i : c.sparse_encoder_blocks())
    for (std::string_view f : {keys::kRouterLogits, keys::kExpert, keys::kDropped, keys::kGate})
      r.add(keys::tensor(keys::Stack::kEncoder, i, f), DType::kF16);  // a hint the CPU ignores
  if (decoder)
    for (int i : c.sparse_decoder_blocks())
      for (std::string_view f : {keys::kRouterLogits, keys::kExpert, keys::kHidden})
        r.add(keys::tensor(keys::Stack::kDecoder, i, f));
  return r;
}

TEST(CpuEngine, PipelineHandsBackWhatEncodeObserves) {
  const SwitchConfig c = small_config();
  auto engine = cpu_engine_of(c, true);
  EXPECT_EQ(engine->device(), "cpu");
  EXPECT_EQ(engine->slots(), 1);
  const KeyRequest request = request_of(c, false);
  const Batch a = random_batch(3, 11, c.vocab_size, 1), b = random_batch(2, 7, c.vocab_size, 2);
  EXPECT_EQ(engine->submit(a, request, 0), 0u);
  EXPECT_EQ(engine->in_flight(), 1);
  EXPECT_THROW(engine->submit(b, request, 0), Error);  // one slot: poll first
  auto ra = engine->poll(false);
  ASSERT_NE(ra, nullptr);
  EXPECT_EQ(engine->poll(true), nullptr);
  EXPECT_EQ(engine->submit(b, request, 0), 1u);
  auto rb = engine->poll(true);
  ASSERT_NE(rb, nullptr);
  EXPECT_EQ(rb->ticket, 1u);
  for (const auto& [batch, r] : {std::pair{&a, ra.get()}, std::pair{&b, rb.get()}}) {
    RecordingObserver want;
    engine->encode(*batch, &want);
    EXPECT_EQ(r->B, batch->B);
    EXPECT_EQ(r->S, batch->S);
    EXPECT_EQ(r->tensors.size(), 4 * c.sparse_encoder_blocks().size());
    for (const auto& [key, view] : r->tensors) {
      ASSERT_TRUE(request.wants(key)) << key;
      EXPECT_TRUE(same_bytes(view, want.last(key).view())) << key;
    }
    EXPECT_EQ(r->generated.steps, 0);
  }
}

TEST(CpuEngine, PipelineStacksDecoderStepsAsGenerateOffersThem) {
  const SwitchConfig c = small_config();
  auto engine = cpu_engine_of(c, false);
  ASSERT_TRUE(engine->has_decoder());
  const Batch a = random_batch(3, 9, c.vocab_size, 3);
  engine->submit(a, request_of(c, true), 5);
  auto r = engine->poll(true);
  ASSERT_NE(r, nullptr);
  RecordingObserver want;
  const Encoded enc = engine->encode(a, nullptr);
  const GenerateResult g = engine->generate(enc, a, 5, 0, &want);
  EXPECT_EQ(r->generated.ids, g.ids);
  ASSERT_GE(g.steps, 1);
  for (int i : c.sparse_decoder_blocks()) {
    for (std::string_view f : {keys::kRouterLogits, keys::kExpert, keys::kHidden}) {
      const std::string key = keys::tensor(keys::Stack::kDecoder, i, f);
      const TensorView* v = r->find(key);
      ASSERT_NE(v, nullptr) << key;
      ASSERT_EQ(v->shape[0], a.B);
      ASSERT_EQ(v->shape[1], g.steps) << key;
      const auto& steps = want.all(key);
      const size_t row = dtype_size(v->dtype) * static_cast<size_t>(v->numel() / (a.B * g.steps));
      for (int64_t t = 0; t < g.steps; ++t)
        for (int64_t b = 0; b < a.B; ++b)
          EXPECT_EQ(std::memcmp(static_cast<const char*>(v->data) + (b * g.steps + t) * row,
                                static_cast<const char*>(steps[t].raw()) + b * row, row),
                    0)
              << key << " step " << t << " sequence " << b;
    }
  }
}

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(CpuEngine, AMalformedBatchIsOneError) {
  const SwitchConfig c = small_config();
  auto engine = cpu_engine_of(c, false);
  Batch short_ids = random_batch(2, 5, c.vocab_size, 4);
  short_ids.input_ids.pop_back();
  EXPECT_NE(message_of([&] { engine->encode(short_ids, nullptr); }).find("batch of 2x5 has 9 ids"),
            std::string::npos);
  Batch out_of_vocab = random_batch(2, 5, c.vocab_size, 4);
  out_of_vocab.input_ids[3] = static_cast<int32_t>(c.vocab_size);
  EXPECT_NE(message_of([&] {
              engine->submit(out_of_vocab, KeyRequest{}, 0);
            }).find("input_ids[3] = " + std::to_string(c.vocab_size) + " is outside"),
            std::string::npos);
  EXPECT_EQ(engine->in_flight(), 0);
  Batch empty;
  EXPECT_NE(message_of([&] { engine->encode(empty, nullptr); }).find("at least one"),
            std::string::npos);
  const Batch a = random_batch(2, 5, c.vocab_size, 4);
  const Encoded wrong{Tensor(DType::kF32, {2, 4, c.d_model})};
  EXPECT_NE(message_of([&] {
              engine->generate(wrong, a, 3, 0, nullptr);
            }).find("encoder output is F32 [2, 4, " + std::to_string(c.d_model) + "]"),
            std::string::npos);
  const Encoded enc = engine->encode(a, nullptr);
  EXPECT_NE(message_of([&] {
              engine->decode(enc, a, {0, 1, 2}, 2, nullptr);
            }).find("3 decoder ids for 2x2"),
            std::string::npos);
  auto enc_only = cpu_engine_of(c, true);
  EXPECT_NE(message_of([&] { enc_only->generate(enc, a, 3, 0, nullptr); }).find("encoder-only"),
            std::string::npos);
}

TEST(MakeEngine, TheCpuComputesInFp32Only) {
  const SwitchConfig c = small_config();
  EngineOptions o;
  o.precision = DType::kBF16;
  const std::string m = message_of([&] {
    make_engine(o, c, make_random_weights(c, RandomWeightOptions{5, DType::kF32, true}));
  });
  EXPECT_NE(m.find("--precision bf16"), std::string::npos) << m;
}

}  // namespace
}  // namespace moetrace
