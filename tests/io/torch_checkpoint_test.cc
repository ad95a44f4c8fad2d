// torch.save checkpoints against safetensors files holding the same tensors.
#include <gtest/gtest.h>
#include <unistd.h>

#include <set>

#include "io/checkpoint.h"
#include "io/io_test_util.h"
#include "io/safetensors.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;
using testing::expect_same_tensor;
using testing::kData;

// The .bin holds every tensor of the safetensors file, plus the tied aliases of shared.weight that
// save_pretrained leaves out of safetensors; those share shared.weight's storage.
void expect_matches_safetensors(const TensorSource& pt, const fs::path& st_file) {
  auto st = open_safetensors(st_file);
  std::set<std::string> extra;
  for (const std::string& n : pt.names()) extra.insert(n);
  for (const std::string& n : st->names()) {
    const CheckpointTensor* t = pt.find(n);
    ASSERT_NE(t, nullptr) << n;
    expect_same_tensor(*t, st->find(n)->view);
    extra.erase(n);
  }
  const CheckpointTensor* shared = st->find("shared.weight");
  ASSERT_NE(shared, nullptr);
  for (const std::string& n : extra) {
    EXPECT_TRUE(n == "encoder.embed_tokens.weight" || n == "decoder.embed_tokens.weight" ||
                n == "lm_head.weight")
        << "unexpected tensor " << n;
    expect_same_tensor(*pt.find(n), shared->view);
  }
}

TEST(TorchCheckpoint, TinyAFloat32MatchesSafetensors) {
  const fs::path dir = kData / "fixtures/tiny-a/model";
  auto pt = open_torch_checkpoint(dir / "pytorch_model.bin");
  EXPECT_EQ(pt->format(), "pytorch");
  EXPECT_EQ(pt->names().size(), 152u);
  expect_matches_safetensors(*pt, dir / "model.safetensors");
  // Tied weights are one storage in the file: the views alias it rather than copy it.
  EXPECT_EQ(pt->find("shared.weight")->view.data, pt->find("lm_head.weight")->view.data);
  EXPECT_EQ(pt->find("shared.weight")->view.data,
            pt->find("encoder.embed_tokens.weight")->view.data);
  EXPECT_EQ(pt->find("shared.weight")->file, dir / "pytorch_model.bin");
}

TEST(TorchCheckpoint, TinyABf16ShardsMatchSafetensors) {
  const fs::path dir = kData / "fixtures/tiny-a-bf16/model";
  auto pt = open_torch_index(dir / "pytorch_model.bin.index.json");
  EXPECT_EQ(pt->format(), "pytorch (sharded)");
  EXPECT_EQ(pt->files().size(), 2u);
  EXPECT_EQ(pt->find("shared.weight")->view.dtype, DType::kBF16);
  expect_matches_safetensors(*pt, dir / "model.safetensors");
}

TEST(TorchCheckpoint, OpenCheckpointOnModelDirectories) {
  // Both fixtures hold safetensors too, which open_checkpoint prefers.
  EXPECT_EQ(open_checkpoint(kData / "fixtures/tiny-a/model")->format(), "safetensors");
  EXPECT_EQ(open_checkpoint(kData / "fixtures/tiny-a-bf16/model")->format(), "safetensors");
  // Directories with only the .bin files.
  testing::TempDir tmp("ckpt_dirs");
  fs::create_directories(tmp / "a");
  fs::create_directories(tmp / "b");
  fs::create_symlink(kData / "fixtures/tiny-a/model/pytorch_model.bin",
                     tmp / "a/pytorch_model.bin");
  for (const char* f : {"pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
                        "pytorch_model-00002-of-00002.bin"}) {
    fs::create_symlink(kData / "fixtures/tiny-a-bf16/model" / f, tmp / "b" / f);
  }
  auto a = open_checkpoint(tmp / "a");
  EXPECT_EQ(a->format(), "pytorch");
  expect_matches_safetensors(*a, kData / "fixtures/tiny-a/model/model.safetensors");
  auto b = open_checkpoint(tmp / "b");
  EXPECT_EQ(b->format(), "pytorch (sharded)");
  expect_matches_safetensors(*b, kData / "fixtures/tiny-a-bf16/model/model.safetensors");
}

// mixed.pt: every dtype, strided views, storage offsets, stride 0, 0-d, empty, tied storages and an
// nn.Parameter, as torch.save wrote them; expected.safetensors holds what torch.load returns.
TEST(TorchCheckpoint, MixedDtypesAndLayoutsMatchTorch) {
  auto pt = open_torch_checkpoint(kData / "io/mixed.pt");
  auto want = open_safetensors(kData / "io/expected.safetensors");
  size_t n = 0;
  for (const std::string& name : pt->names()) {
    const CheckpointTensor* w = want->find(name);
    ASSERT_NE(w, nullptr) << name;
    expect_same_tensor(*pt->find(name), w->view);
    ++n;
  }
  EXPECT_EQ(n, 21u);
  EXPECT_EQ(pt->find("f16")->view.dtype, DType::kF16);
  EXPECT_EQ(pt->find("bool")->view.dtype, DType::kBool);
  EXPECT_EQ(pt->find("scalar")->view.shape, Shape{});
  EXPECT_EQ(pt->find("expanded")->view.shape, (Shape{4, 3}));
  EXPECT_EQ(pt->find("empty")->view.shape, (Shape{0, 3}));
  // Tied names share memory; a dense slice points into its storage; a strided view is a copy.
  EXPECT_EQ(pt->find("tied_a")->view.data, pt->find("tied_b")->view.data);
  const auto* f32 = static_cast<const float*>(pt->find("f32")->view.data);
  EXPECT_EQ(pt->find("row_slice")->view.data, f32 + 10);
  EXPECT_EQ(pt->find("tied_view")->view.data,
            static_cast<const float*>(pt->find("tied_a")->view.data) + 4);
  EXPECT_NE(pt->find("transposed")->view.data, pt->find("f32")->view.data);
}

TEST(TorchCheckpoint, Protocol4Pickle) {
  auto pt = open_torch_checkpoint(kData / "io/proto4.pt");
  auto want = open_safetensors(kData / "io/expected.safetensors");
  ASSERT_EQ(pt->names(), (std::vector<std::string>{"a", "b"}));
  expect_same_tensor(*pt->find("a"), want->find("proto4.a")->view);
  expect_same_tensor(*pt->find("b"), want->find("proto4.b")->view);
}

TEST(TorchCheckpoint, NestedDictsAreFlattenedAndNonTensorsSkipped) {
  auto pt = open_torch_checkpoint(kData / "io/nested.pt");
  auto want = open_safetensors(kData / "io/expected.safetensors");
  ASSERT_EQ(pt->names(), (std::vector<std::string>{"model.a", "model.b"}));
  expect_same_tensor(*pt->find("model.a"), want->find("proto4.a")->view);
}

// w [3, 4] = 0..11 and its transpose w_t on one storage.
void expect_crafted_w(const TensorSource& pt) {
  const CheckpointTensor* w = pt.find("w");
  const CheckpointTensor* wt = pt.find("w_t");
  ASSERT_TRUE(w != nullptr && wt != nullptr);
  EXPECT_EQ(w->view.shape, (Shape{3, 4}));
  EXPECT_EQ(wt->view.shape, (Shape{4, 3}));
  for (int r = 0; r < 3; ++r) {
    for (int c = 0; c < 4; ++c) {
      EXPECT_EQ(w->view.as<float>()[r * 4 + c], static_cast<float>(r * 4 + c));
      EXPECT_EQ(wt->view.as<float>()[c * 3 + r], static_cast<float>(r * 4 + c));
    }
  }
}

TEST(TorchCheckpoint, Zip64Fields) {
  // Sizes and offsets all 0xFFFFFFFF in the central directory, the real values in ZIP64 extras.
  expect_crafted_w(*open_torch_checkpoint(kData / "io/crafted_zip64.pt"));
}

TEST(TorchCheckpoint, UnalignedStorageIsCopied) {
  // Storage bytes at 2 mod 64: reading floats in place would be misaligned, so the reader copies.
  auto pt = open_torch_checkpoint(kData / "io/crafted_unaligned.pt");
  expect_crafted_w(*pt);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(pt->find("w")->view.data) % alignof(float), 0u);
}

// ---- bad inputs: one-line Errors naming the file and the tensor, never a crash ----

TEST(TorchCheckpointErrors, ForbiddenGlobals) {
  const fs::path os_system = kData / "io/crafted_os_system.pt";
  expect_error([&] { open_torch_checkpoint(os_system); },
               {os_system.string(), "'os.system'", "data.pkl"});
  const fs::path eval = kData / "io/crafted_eval.pt";
  expect_error([&] { open_torch_checkpoint(eval); }, {eval.string(), "'builtins.eval'"});
}

TEST(TorchCheckpointErrors, CompressedStorage) {
  const fs::path p = kData / "io/crafted_compressed.pt";
  expect_error([&] { open_torch_checkpoint(p); },
               {p.string(), "tensor 'w'", "archive/data/0", "compressed"});
}

TEST(TorchCheckpointErrors, MissingStorageEntry) {
  const fs::path p = kData / "io/crafted_missing_storage.pt";
  expect_error([&] { open_torch_checkpoint(p); },
               {p.string(), "tensor 'w'", "'archive/data/0'", "missing"});
}

TEST(TorchCheckpointErrors, TensorExtentBeyondStorage) {
  const fs::path p = kData / "io/crafted_extent.pt";
  expect_error([&] { open_torch_checkpoint(p); }, {p.string(), "tensor 'w'", "past its storage"});
}

TEST(TorchCheckpointErrors, StorageEntryShorterThanDeclared) {
  const fs::path p = kData / "io/crafted_short_storage.pt";
  expect_error([&] { open_torch_checkpoint(p); }, {p.string(), "tensor 'w", "declares 12"});
}

TEST(TorchCheckpointErrors, TruncatedZipAtEveryLength) {
  const std::string bytes = testing::read_bytes(kData / "io/mixed.pt");
  testing::TempDir tmp("trunc");
  const fs::path p = tmp / "t.pt";
  for (size_t n = 0; n < bytes.size(); n += 37) {
    testing::write_bytes(p, bytes.substr(0, n));
    expect_error([&] { open_torch_checkpoint(p); }, {p.string()});
  }
}

TEST(TorchCheckpointErrors, GarbageCentralDirectory) {
  std::string bytes = testing::read_bytes(kData / "io/mixed.pt");
  const size_t cd = bytes.find("PK\x01\x02");
  ASSERT_NE(cd, std::string::npos);
  testing::TempDir tmp("garbage_cd");
  const fs::path p = tmp / "g.pt";
  std::string g = bytes;
  for (size_t i = cd; i < cd + 200; ++i) g[i] = static_cast<char>(0xab);
  testing::write_bytes(p, g);
  expect_error([&] { open_torch_checkpoint(p); }, {p.string(), "central directory"});
  // Offsets in the end record pointing past the file.
  g = bytes;
  const size_t end = g.rfind("PK\x05\x06");
  const size_t end64 = g.rfind("PK\x06\x06");
  ASSERT_NE(end64, std::string::npos);
  for (size_t i = end64 + 48; i < end64 + 56; ++i) g[i] = static_cast<char>(0x7f);  // cd offset
  testing::write_bytes(p, g);
  expect_error([&] { open_torch_checkpoint(p); }, {p.string(), "passes the end"});
  g = bytes;
  for (size_t i = end; i < g.size(); ++i) g[i] = 'x';
  testing::write_bytes(p, g);
  expect_error([&] { open_torch_checkpoint(p); }, {p.string(), "not a zip archive"});
}

// Any single corrupted byte either loads (it was tensor data) or fails with an Error.
TEST(TorchCheckpointErrors, ByteFlipsNeverCrash) {
  const std::string bytes = testing::read_bytes(kData / "io/mixed.pt");
  testing::TempDir tmp("flips");
  const fs::path p = tmp / "f.pt";
  int failures = 0;
  for (size_t i = 0; i < bytes.size(); i += 7) {
    std::string g = bytes;
    g[i] = static_cast<char>(g[i] ^ 0x5a);
    testing::write_bytes(p, g);
    try {
      open_torch_checkpoint(p);
    } catch (const Error&) {
      ++failures;
    }
  }
  EXPECT_GT(failures, 0);
}

TEST(TorchCheckpointErrors, LegacyAndNonZipFiles) {
  testing::TempDir tmp("legacy");
  testing::write_bytes(tmp / "legacy.bin", std::string("\x80\x02\x8a\x0a", 4) + "junk");
  expect_error([&] { open_torch_checkpoint(tmp / "legacy.bin"); }, {"legacy", "legacy.bin"});
  testing::write_bytes(tmp / "text.bin", std::string(100, 'a'));
  expect_error([&] { open_torch_checkpoint(tmp / "text.bin"); }, {"text.bin", "not a zip archive"});
}

}  // namespace
}  // namespace moetrace
