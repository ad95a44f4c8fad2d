#include "model/engine_io.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <utility>

#include "core/error.h"

namespace moetrace {

void check_batch(const Batch& batch, int64_t vocab_size, std::string_view what) {
  const int64_t B = batch.B, S = batch.S;
  if (B < 1 || S < 1)
    fail(what, ": batch of ", B, "x", S, ": expected at least one sequence of at least one token");
  const auto n = static_cast<size_t>(B * S);
  if (batch.input_ids.size() != n || batch.attention_mask.size() != n)
    fail(what, ": batch of ", B, "x", S, " has ", batch.input_ids.size(), " ids and ",
         batch.attention_mask.size(), " mask values, expected ", n, " of each");
  for (size_t i = 0; i < n; ++i)
    if (batch.input_ids[i] < 0 || batch.input_ids[i] >= vocab_size)
      fail("input_ids[", i, "] = ", batch.input_ids[i], " is outside the vocabulary [0, ",
           vocab_size, ")");
}

void check_encoded(const Encoded& enc, const Batch& batch, int64_t d_model, std::string_view what) {
  const Tensor& o = enc.output;
  if (o.dtype() != DType::kF32 || o.shape() != Shape{batch.B, batch.S, d_model})
    fail(what, ": encoder output is ", dtype_name(o.dtype()), " ", shape_str(o.shape()),
         ", expected F32 [", batch.B, ", ", batch.S, ", ", d_model, "]");
}

void check_decoder_ids(const std::vector<int32_t>& dec_ids, int64_t B, int64_t T,
                       int64_t vocab_size, std::string_view what) {
  if (T < 1) fail(what, ": decoder length ", T, ": expected at least 1");
  if (static_cast<int64_t>(dec_ids.size()) != B * T)
    fail(what, ": ", dec_ids.size(), " decoder ids for ", B, "x", T);
  for (size_t i = 0; i < dec_ids.size(); ++i)
    if (dec_ids[i] < 0 || dec_ids[i] >= vocab_size)
      fail("decoder_input_ids[", i, "] = ", dec_ids[i], " is outside the vocabulary [0, ",
           vocab_size, ")");
}

Tensor stack_steps(const std::vector<Tensor>& steps) {
  MT_ASSERT(!steps.empty());
  const Tensor& first = steps.front();
  const int64_t B = first.dim(0);
  const int64_t per = first.numel() / B;  // elements per sequence per step
  Shape shape = first.shape();
  shape[1] = static_cast<int64_t>(steps.size());
  Tensor out(first.dtype(), shape);
  const size_t es = dtype_size(first.dtype());
  auto* dst = static_cast<std::byte*>(out.raw());
  for (size_t t = 0; t < steps.size(); ++t) {
    const auto* src = static_cast<const std::byte*>(steps[t].raw());
    for (int64_t b = 0; b < B; ++b) {
      std::copy_n(src + b * per * es, per * es,
                  dst + (b * static_cast<int64_t>(steps.size()) + t) * per * es);
    }
  }
  return out;
}

std::vector<std::vector<size_t>> length_batches(const std::vector<int64_t>& lengths,
                                                const BatchBudget& budget) {
  std::vector<size_t> order(lengths.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return lengths[a] > lengths[b]; });
  // cost[i]: the least (cost, batch count) of batching order[0, i); from[i]: where its last batch
  // starts. A batch order[j, i) holds i - j rows of the length of order[j] (the longest); one row
  // always fits. Among equal costs the fewest batches, then the fullest first batches win.
  const size_t n = order.size();
  std::vector<std::pair<int64_t, int64_t>> cost(n + 1, {0, 0});
  std::vector<size_t> from(n + 1, 0);
  for (size_t i = 1; i <= n; ++i) {
    cost[i] = {INT64_MAX, 0};
    for (size_t j = i; j-- > 0;) {
      const int64_t tokens = static_cast<int64_t>(i - j) * lengths[order[j]];
      if (j + 1 < i && tokens > budget.tokens) break;  // longer rows only make it larger
      const std::pair<int64_t, int64_t> c{cost[j].first + budget.overhead_tokens + tokens,
                                          cost[j].second + 1};
      if (c < cost[i]) {
        cost[i] = c;
        from[i] = j;
      }
    }
  }
  std::vector<std::vector<size_t>> batches;
  for (size_t i = n; i > 0; i = from[i])
    batches.emplace_back(order.begin() + static_cast<std::ptrdiff_t>(from[i]),
                         order.begin() + static_cast<std::ptrdiff_t>(i));
  std::reverse(batches.begin(), batches.end());
  return batches;
}

}  // namespace moetrace
