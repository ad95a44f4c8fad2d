// length_batches (model/engine_io.h): collect's batches of a window. Each case states the partition
// the cost model must choose and why, and a brute force over every partition of a small set checks
// that it is the least-cost one.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "model/engine_io.h"

namespace moetrace {
namespace {

using Batches = std::vector<std::vector<size_t>>;

int64_t cost_of(const Batches& batches, const std::vector<int64_t>& lengths, int64_t overhead) {
  int64_t c = 0;
  for (const auto& b : batches) {
    int64_t longest = 0;
    for (size_t i : b) longest = std::max(longest, lengths[i]);
    c += overhead + static_cast<int64_t>(b.size()) * longest;
  }
  return c;
}

// Every sample exactly once, each batch within the budget (or a single row), longest first.
void expect_valid(const Batches& batches, const std::vector<int64_t>& lengths, int64_t budget) {
  std::vector<size_t> seen;
  for (const auto& b : batches) {
    ASSERT_FALSE(b.empty());
    if (b.size() > 1) {
      EXPECT_LE(static_cast<int64_t>(b.size()) * lengths[b.front()], budget);
    }
    for (size_t k = 1; k < b.size(); ++k) EXPECT_GE(lengths[b[k - 1]], lengths[b[k]]);
    seen.insert(seen.end(), b.begin(), b.end());
  }
  std::sort(seen.begin(), seen.end());
  std::vector<size_t> all(lengths.size());
  std::iota(all.begin(), all.end(), size_t{0});
  EXPECT_EQ(seen, all);
}

TEST(LengthBatches, EqualLengthsFillTheBudget) {
  const std::vector<int64_t> lengths(10, 100);
  const Batches b = length_batches(lengths, {400, 50});
  expect_valid(b, lengths, 400);
  ASSERT_EQ(b.size(), 3u);  // 4 + 4 + 2 rows
  EXPECT_EQ(b[0].size(), 4u);
  EXPECT_EQ(b[1].size(), 4u);
  EXPECT_EQ(b[2].size(), 2u);
}

// Two long rows and six short ones: one batch would pad the short rows to 100 (800 tokens); two
// batches cost one overhead more but compute 200 + 60 tokens.
TEST(LengthBatches, PaddingIsTradedAgainstOneMoreBatch) {
  const std::vector<int64_t> lengths = {10, 100, 10, 10, 100, 10, 10, 10};
  const Batches cheap_batches = length_batches(lengths, {1000, 100});
  expect_valid(cheap_batches, lengths, 1000);
  ASSERT_EQ(cheap_batches.size(), 2u);
  EXPECT_EQ(cheap_batches[0], (std::vector<size_t>{1, 4}));
  EXPECT_EQ(cheap_batches[1],
            (std::vector<size_t>{0, 2, 3, 5, 6, 7}));  // equal lengths: input order
  // A batch that costs more than the padding it saves: everything in one.
  const Batches costly_batches = length_batches(lengths, {1000, 600});
  ASSERT_EQ(costly_batches.size(), 1u);
  EXPECT_EQ(costly_batches[0].front(), 1u);
}

TEST(LengthBatches, NoOverheadMeansNoPadding) {
  const std::vector<int64_t> lengths = {5, 7, 5, 9, 7, 7};
  const Batches b = length_batches(lengths, {1000, 0});
  expect_valid(b, lengths, 1000);
  for (const auto& batch : b)
    for (size_t i : batch) EXPECT_EQ(lengths[i], lengths[batch.front()]);
  EXPECT_EQ(b.size(), 3u);
}

TEST(LengthBatches, ARowLongerThanTheBudgetIsABatchOfItsOwn) {
  const std::vector<int64_t> lengths = {300, 20, 20};
  const Batches b = length_batches(lengths, {100, 10});
  expect_valid(b, lengths, 100);
  ASSERT_EQ(b.size(), 2u);
  EXPECT_EQ(b[0], (std::vector<size_t>{0}));
}

TEST(LengthBatches, EmptyInputHasNoBatches) { EXPECT_TRUE(length_batches({}, {100, 10}).empty()); }

// Contiguous runs of the length-sorted samples, enumerated by their cut points: none cheaper.
TEST(LengthBatches, NoPartitionOfTheSortedSamplesCostsLess) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<int64_t> lengths(1 + rng() % 11);
    for (auto& l : lengths) l = 1 + static_cast<int64_t>(rng() % 40);
    const int64_t budget = 40 + static_cast<int64_t>(rng() % 120);
    const int64_t overhead = static_cast<int64_t>(rng() % 60);
    const Batches got = length_batches(lengths, {budget, overhead});
    expect_valid(got, lengths, budget);
    std::vector<size_t> order(lengths.size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return lengths[a] > lengths[b]; });
    const size_t n = order.size();
    int64_t best = INT64_MAX;
    for (uint32_t cuts = 0; cuts < (1u << (n - 1)); ++cuts) {
      Batches p(1);
      for (size_t k = 0; k < n; ++k) {
        if (k > 0 && (cuts >> (k - 1) & 1u)) p.emplace_back();
        p.back().push_back(order[k]);
      }
      bool fits = true;
      for (const auto& b : p)
        fits = fits && (b.size() == 1 || static_cast<int64_t>(b.size()) * lengths[b[0]] <= budget);
      if (fits) best = std::min(best, cost_of(p, lengths, overhead));
    }
    EXPECT_EQ(cost_of(got, lengths, overhead), best) << "trial " << trial;
  }
}

}  // namespace
}  // namespace moetrace
