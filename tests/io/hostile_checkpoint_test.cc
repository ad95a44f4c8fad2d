// Small hostile torch checkpoints and pickles (issue 15 items 1-3): each must fail with one line
// quickly and with bounded memory, or load, never hang or allocate gigabytes.
#include <gtest/gtest.h>

#include "io/checkpoint.h"
#include "io/io_test_util.h"
#include "io/pickle.h"
#include "io/torch_zip_writer.h"

namespace moetrace {
namespace {

using testing::expect_error;
using testing::PickleBuilder;
using testing::TempDir;
using testing::torch_zip;
using testing::write_bytes;

// "k7" (built by appending: GCC 12 warns (-Wrestrict) on "k" + std::to_string(7) once inlined).
std::string numbered(const char* prefix, int i) {
  std::string s(prefix);
  s.append(std::to_string(i));
  return s;
}

// Dicts nested `depth` deep, each of `keys` keys whose values are all the same dict of the level
// below (memoized): a few KB whose paths number keys^depth.
std::string shared_dict_pickle(int depth, int keys) {
  PickleBuilder b;
  b.op('}').put(0);  // the innermost dict: {"w": tensor}
  b.str("w").tensor("0", 4, {4}, {1}).op('s').op('0');
  for (int level = 1; level <= depth; ++level) {
    b.op('}').put(static_cast<uint32_t>(level)).op('(');
    for (int k = 0; k < keys; ++k) b.str(numbered("k", k)).get(level - 1);
    b.op('u').op('0');
  }
  b.get(static_cast<uint32_t>(depth));
  return b.stop();
}

TEST(HostileCheckpoint, SharedNestedDictsFailFast) {
  TempDir tmp("hostile_shared");
  const std::string pkl = shared_dict_pickle(16, 16);
  const std::string zip = torch_zip(pkl, {{"0", std::string(16, '\0')}});
  EXPECT_LT(zip.size(), 8000u);
  write_bytes(tmp / "pytorch_model.bin", zip);
  expect_error([&] { open_torch_checkpoint(tmp / "pytorch_model.bin"); },
               {"pytorch_model.bin", "same dict again"});
}

TEST(HostileCheckpoint, DictContainingItselfFails) {
  TempDir tmp("hostile_cycle");
  PickleBuilder b;
  b.op('}').put(0).str("self").get(0).op('s');
  write_bytes(tmp / "c.bin", torch_zip(b.stop(), {}));
  expect_error([&] { open_torch_checkpoint(tmp / "c.bin"); }, {"c.bin", "same dict again"});
}

TEST(HostileCheckpoint, UnsharedNestedDictsStillLoad) {
  TempDir tmp("hostile_nested_ok");
  PickleBuilder b;
  b.op('}').str("a").op('}').str("w").tensor("0", 4, {4}, {1}).op('s').op('s');
  b.str("b").op('}').str("w").tensor("0", 4, {2}, {1}).op('s').op('s');
  write_bytes(tmp / "n.bin", torch_zip(b.stop(), {{"0", std::string(16, '\0')}}));
  auto src = open_torch_checkpoint(tmp / "n.bin");
  EXPECT_EQ(src->names(), (std::vector<std::string>{"a.w", "b.w"}));
}

TEST(HostileCheckpoint, LongKeysAreRefused) {
  TempDir tmp("hostile_longkey");
  PickleBuilder b;
  b.op('}').str(std::string(5000, 'k')).tensor("0", 4, {4}, {1}).op('s');
  write_bytes(tmp / "k.bin", torch_zip(b.stop(), {{"0", std::string(16, '\0')}}));
  expect_error([&] { open_torch_checkpoint(tmp / "k.bin"); }, {"k.bin", "5000 bytes"});
}

// 100 zero-stride views of one 4-byte storage, each asking for 256 MiB: one budget for the
// checkpoint refuses them long before 25.6 GiB are allocated.
TEST(HostileCheckpoint, ExpandedViewsShareOneBudget) {
  TempDir tmp("hostile_expand");
  PickleBuilder b;
  b.op('}').op('(');
  for (int i = 0; i < 100; ++i) b.str(numbered("t", i)).tensor("0", 1, {8192, 8192}, {0, 0});
  b.op('u');
  write_bytes(tmp / "e.bin", torch_zip(b.stop(), {{"0", std::string(4, '\0')}}));
  expect_error([&] { open_torch_checkpoint(tmp / "e.bin"); },
               {"e.bin", "would copy its 4-byte storage", "exceed"});
}

// A few small expanded views still load.
TEST(HostileCheckpoint, SmallExpandedViewsLoad) {
  TempDir tmp("hostile_expand_ok");
  PickleBuilder b;
  b.op('}').op('(');
  for (int i = 0; i < 3; ++i) b.str(numbered("t", i)).tensor("0", 1, {16, 16}, {0, 0});
  b.op('u');
  write_bytes(tmp / "e.bin", torch_zip(b.stop(), {{"0", std::string(4, '\0')}}));
  auto src = open_torch_checkpoint(tmp / "e.bin");
  EXPECT_EQ(src->names().size(), 3u);
  EXPECT_EQ(src->find("t2")->view.shape, (Shape{16, 16}));
}

// Values cost far more than the opcodes that make them (an EMPTY_DICT byte builds a ~200-byte
// value): parsing stops at a budget relative to the pickle's size.
TEST(HostilePickle, ValueMemoryIsBoundedByPickleSize) {
  const size_t n = size_t{2} << 20;  // 2 MiB of '}' would make 2M values, ~430 MB
  std::string p("\x80\x02");
  p.append(n, '}').append(".");
  expect_error([&] { Pickle::parse(p, "big.pkl"); }, {"big.pkl", "more than", "bytes of memory"});
}

TEST(HostilePickle, ManyNonesShareOneValue) {
  std::string p("\x80\x02(");
  p.append(100000, 'N').append("l.");
  const Pickle pk = Pickle::parse(p, "nones.pkl");
  EXPECT_EQ(pk.root()->items.size(), 100000u);
  EXPECT_LE(pk.value_count(), 2u);
}

}  // namespace
}  // namespace moetrace
