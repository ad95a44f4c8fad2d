// collect's default batching window (docs/TRACE_FORMAT.md, "Batching windows"): one shard on the
// CPU; on CUDA whole shards up to 4,096 samples while a window's captured data stays within 2 GiB.
#include <gtest/gtest.h>

#include "collect/pipeline.h"

namespace moetrace::pipeline {
namespace {

// switch-base-N's capture: 6 sparse encoder layers of 128 experts (d_model 768).
CaptureLayout switch_base(int64_t experts = 128, int layers = 6) {
  CaptureLayout c;
  for (int i = 0; i < layers; ++i) c.enc_layers.push_back(2 * i + 1);
  c.E = experts;
  c.d = 768;
  return c;
}

TEST(BatchWindow, OneShardOnTheCpu) {
  CollectOptions o;
  EXPECT_EQ(default_batch_window(o, switch_base(), false), 1024);
  o.samples_per_shard = 16;
  EXPECT_EQ(default_batch_window(o, switch_base(), false), 16);
}

TEST(BatchWindow, CudaTakesWholeShardsUpTo4096SamplesAnd2GiB) {
  CollectOptions o;  // --max-length 256, F16 logits, no hidden states
  // 6 layers x 256 tokens x (128 F16 logits + expert, gate, dropped) + ids: 408 KiB a sample.
  EXPECT_EQ(sample_bytes_bound(o, switch_base()), 6 * 256 * (256 + 9) + 256 * 4);
  EXPECT_EQ(default_batch_window(o, switch_base(), true), 4096);
  o.samples_per_shard = 1000;  // whole shards: 4 of 1,000
  EXPECT_EQ(default_batch_window(o, switch_base(), true), 4000);
  o.samples_per_shard = 5000;  // one shard even when it is larger
  EXPECT_EQ(default_batch_window(o, switch_base(), true), 5000);
  o.samples_per_shard = 1024;
  // 256 experts (~800 KiB a sample) or 12 sparse layers (switch-large-128): two shards fit 2 GiB.
  EXPECT_EQ(default_batch_window(o, switch_base(256), true), 2048);
  EXPECT_EQ(default_batch_window(o, switch_base(128, 12), true), 2048);
  // Hidden states (768 bf16 per row, ~2.7 MiB a sample): one shard.
  o.hidden_dtype = DType::kBF16;
  EXPECT_EQ(default_batch_window(o, switch_base(), true), 1024);
  // --logits topk:8 holds less than every logit: back to 4,096 at 512 tokens.
  o.hidden_dtype.reset();
  o.logits_topk = 8;
  o.max_length = 512;
  EXPECT_EQ(default_batch_window(o, switch_base(256), true), 4096);
}

}  // namespace
}  // namespace moetrace::pipeline
