// Format version 2 (docs/TRACE_FORMAT.md): top-k routing (expert/gate [T, k]), stores without
// `dropped`, the lm./gen. stacks of a language model's store, and --logits topk:K
// (router_topk_logits / router_topk_ids / router_lse), written through TraceWriter by synthetic
// records as the LM capture path will hand them over.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <sstream>

#include "core/error.h"
#include "core/sha256.h"
#include "io/safetensors.h"
#include "trace/store.h"

namespace moetrace {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

class Tmp {
 public:
  Tmp() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = fs::temp_directory_path() / (std::string("mt_topk_") + info->test_suite_name() + "_" +
                                         info->name() + "_" + std::to_string(::getpid()));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~Tmp() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  fs::path operator/(const std::string& s) const { return path_ / s; }

 private:
  fs::path path_;
};

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += x + "\n";
  return s;
}

// An OLMoE-like store: top-2 of 6 experts, no capacity, prompt layers 0 and 2, generation steps.
StoreSettings lm_settings(int top_k = 2, int logits_topk = 0, bool decoder = true) {
  StoreSettings s;
  s.settings = {{"mode", "real"}, {"seed", 3}};
  s.model = {{"id", "test/olmoe-tiny"}};
  s.command_line = {"test"};
  s.enc_layers = {0, 2};
  if (decoder) s.dec_layers = {1};
  s.num_experts = 6;
  s.d_model = 4;
  s.logits_dtype = DType::kF16;
  s.hidden_dtype = DType::kF32;
  s.decoder = decoder;
  s.samples_per_shard = 3;
  s.device = "cpu (test)";
  s.family = "olmoe";
  s.top_k = top_k;
  s.dropped = false;
  s.logits_topk = logits_topk;
  return s;
}

// One layer of one sample as an LM capture would fill it: the router's top-k (descending, ties to
// the lowest index) with softmax weights, and with logits_topk the top-K of the logits.
struct Layer {
  std::vector<float> logits, gate, hidden, topk_values, lse;
  std::vector<int32_t> expert, topk_ids;
  Layer(std::mt19937& rng, int rows, const StoreSettings& s) {
    std::normal_distribution<float> nd(0.f, 2.f);
    const int E = static_cast<int>(s.num_experts), k = s.top_k;
    for (int i = 0; i < rows * E; ++i) logits.push_back(nd(rng));
    if (rows > 0) logits[1] = logits[0];  // an exact tie in the first row
    for (int i = 0; i < rows * s.d_model; ++i) hidden.push_back(nd(rng));
    for (int r = 0; r < rows; ++r) {
      std::vector<int32_t> order(static_cast<size_t>(E));
      std::iota(order.begin(), order.end(), 0);
      const float* x = logits.data() + r * E;
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return x[a] > x[b]; });
      float sum = 0;
      for (int j = 0; j < k; ++j) sum += std::exp(x[order[j]]);
      for (int j = 0; j < k; ++j) {
        expert.push_back(order[j]);
        gate.push_back(std::exp(x[order[j]]) / sum);
      }
    }
    if (s.logits_topk > 0) {
      topk_values.resize(static_cast<size_t>(rows * s.logits_topk));
      topk_ids.resize(topk_values.size());
      lse.resize(static_cast<size_t>(rows));
      router_topk(logits.data(), rows, E, s.logits_topk, topk_values.data(), topk_ids.data(),
                  lse.data());
    }
  }
  LayerRecord record() const {
    LayerRecord r;
    r.router_logits = logits.data();
    r.expert = expert.data();
    r.gate = gate.data();
    r.hidden = hidden.data();
    if (!lse.empty()) {
      r.topk_logits = topk_values.data();
      r.topk_ids = topk_ids.data();
      r.lse = lse.data();
    }
    return r;
  }
};

struct Sample {
  std::string id;
  std::vector<int32_t> tokens, gen_in, gen_out;
  std::vector<Layer> lm, gen;
  Sample(const StoreSettings& s, int i) {
    std::mt19937 rng(static_cast<uint32_t>(77 + i));
    id = "demo/default/test/" + std::to_string(i);
    const int n = 1 + i % 5, g = s.decoder ? i % 3 : 0;  // some samples generate nothing
    for (int t = 0; t < n; ++t) tokens.push_back(static_cast<int32_t>(rng() % 1000));
    for (int t = 0; t < g; ++t) {
      gen_in.push_back(static_cast<int32_t>(rng() % 1000));
      gen_out.push_back(static_cast<int32_t>(rng() % 1000));
    }
    for (size_t l = 0; l < s.enc_layers.size(); ++l) lm.emplace_back(rng, n, s);
    for (size_t l = 0; l < s.dec_layers.size(); ++l) gen.emplace_back(rng, g, s);
  }
  SampleRecord record() const {
    SampleRecord r;
    r.sample_id = id;
    r.dataset = "demo";
    r.token_ids = tokens;
    r.dec_input_ids = gen_in;
    r.dec_output_ids = gen_out;
    for (const Layer& l : lm) r.enc.push_back(l.record());
    for (const Layer& l : gen) r.dec.push_back(l.record());
    return r;
  }
};

void write(const fs::path& dir, const StoreSettings& s, int n) {
  auto w = TraceWriter::open(dir, s, OpenMode::kCreate);
  for (int i = 0; i < n; ++i) w->add(Sample(s, i).record());
  w->finish(1.0);
}

TEST(RouterTopk, DescendingTiesToTheLowestIndexAndAnExactLse) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> x = {1.f, 3.f,  3.f,  -2.f, 0.5f, 3.f,  // a three-way tie at the top
                                nan, -1.f, -1.f, 4.f,  2.f,  0.f};
  std::vector<float> v(6), lse(2);
  std::vector<int32_t> id(6);
  router_topk(x.data(), 2, 6, 3, v.data(), id.data(), lse.data());
  EXPECT_EQ(id, (std::vector<int32_t>{1, 2, 5, 3, 4, 5}));  // NaN sorts below every number
  EXPECT_EQ(v, (std::vector<float>{3.f, 3.f, 3.f, 4.f, 2.f, 0.f}));
  const double want = std::log(std::exp(1.0) + 3 * std::exp(3.0) + std::exp(-2.0) + std::exp(0.5));
  EXPECT_FLOAT_EQ(lse[0], static_cast<float>(want));
  EXPECT_TRUE(std::isnan(lse[1]));  // a NaN logit makes the row's normalizer NaN, honestly
  // -0 and +0 tie (lowest index first); -inf is above NaN; K > 32 takes the sorting path.
  const std::vector<float> z = {nan, -0.f, 0.f, -std::numeric_limits<float>::infinity(), -1.f};
  std::vector<float> zv(5), zl(1);
  std::vector<int32_t> zi(5);
  router_topk(z.data(), 1, 5, 5, zv.data(), zi.data(), zl.data());
  EXPECT_EQ(zi, (std::vector<int32_t>{1, 2, 4, 3, 0}));
  std::vector<float> wide(100);
  for (int e = 0; e < 100; ++e) wide[e] = static_cast<float>((e * 37) % 50);  // pairs of ties
  std::vector<float> wv(40), wl(1), nv(40), nl(1);
  std::vector<int32_t> wi(40), ni(40);
  router_topk(wide.data(), 1, 100, 40, wv.data(), wi.data(), wl.data());
  for (int j = 0; j < 40; ++j) {
    ASSERT_EQ(wide[wi[j]], 49.f - static_cast<float>(j / 2)) << j;
    if (j % 2 == 1) {
      EXPECT_LT(wi[j - 1], wi[j]) << j;  // a tie: the lower index first
    }
  }
  router_topk(wide.data(), 1, 100, 20, nv.data(), ni.data(), nl.data());  // the small-K path
  EXPECT_EQ(std::vector<int32_t>(wi.begin(), wi.begin() + 20),
            std::vector<int32_t>(ni.begin(), ni.end() - 20));
  EXPECT_EQ(wl, nl);
  // K = E: every expert, sorted; large logits do not overflow the lse.
  const std::vector<float> big = {1000.f, 999.f};
  std::vector<float> bv(2), bl(1);
  std::vector<int32_t> bi(2);
  router_topk(big.data(), 1, 2, 2, bv.data(), bi.data(), bl.data());
  EXPECT_EQ(bi, (std::vector<int32_t>{0, 1}));
  EXPECT_FLOAT_EQ(bl[0], static_cast<float>(1000.0 + std::log(1.0 + std::exp(-1.0))));
}

// A k = 2, no-capacity language-model store reads back exactly and verifies; its tensors are
// [T, 2], named lm.{i} / gen.{i}, without `dropped`, and the manifest says so (version 2).
TEST(TopkStore, RoundTripOfALanguageModelStore) {
  Tmp tmp;
  const fs::path dir = tmp / "store";
  const StoreSettings s = lm_settings();
  write(dir, s, 7);
  EXPECT_TRUE(verify_store(dir).empty()) << joined(verify_store(dir));

  const json m = json::parse(read_file(dir / "manifest.json"));
  EXPECT_EQ(m["format_version"], 2);
  EXPECT_EQ(m["routing"], (json{{"family", "olmoe"}, {"top_k", 2}, {"dropped", false}}));
  EXPECT_FALSE(m.contains("logits_topk"));
  ASSERT_TRUE(m["per_layer"].contains("lm.0") && m["per_layer"].contains("gen.1"));
  // Each of a token's k choices counts once.
  int64_t counted = 0;
  for (const json& c : m["per_layer"]["lm.2"]["expert_counts"]) counted += c.get<int64_t>();
  EXPECT_EQ(counted, 2 * m["per_layer"]["lm.2"]["tokens"].get<int64_t>());
  EXPECT_EQ(m["per_layer"]["lm.2"]["dropped"], 0);

  const SafetensorsFile f = SafetensorsFile::open(dir / "shard-00000.safetensors");
  EXPECT_EQ(f.metadata().at("format_version"), "2");
  const int64_t T = f.find("token_ids")->view.shape[0];
  const int64_t G = f.find("gen.input_ids")->view.shape[0];
  EXPECT_EQ(f.find("lm.0.expert")->view.shape, (Shape{T, 2}));
  EXPECT_EQ(f.find("lm.0.gate")->view.shape, (Shape{T, 2}));
  EXPECT_EQ(f.find("lm.0.router_logits")->view.shape, (Shape{T, 6}));
  EXPECT_EQ(f.find("gen.1.expert")->view.shape, (Shape{G, 2}));
  EXPECT_NE(f.find("gen.sample_offsets"), nullptr);
  EXPECT_EQ(f.find("lm.0.dropped"), nullptr);
  EXPECT_EQ(f.find("enc.0.expert"), nullptr);
  EXPECT_EQ(f.find("dec.input_ids"), nullptr);

  const TraceStore store = TraceStore::open(dir);
  ASSERT_EQ(store.num_samples(), 7);
  for (int i = 0; i < 7; ++i) {
    const Sample want(s, i);
    const SampleRecordOwned got = store.sample(i);
    ASSERT_EQ(got.enc.size(), 2u);
    for (size_t l = 0; l < 2; ++l) {
      EXPECT_EQ(got.enc[l].expert, want.lm[l].expert) << i;
      EXPECT_EQ(got.enc[l].gate, want.lm[l].gate) << i;
      EXPECT_TRUE(got.enc[l].dropped.empty());
      EXPECT_EQ(got.enc[l].hidden, want.lm[l].hidden);
      ASSERT_EQ(got.enc[l].router_logits.size(), want.lm[l].logits.size());
      for (size_t j = 0; j < want.lm[l].logits.size(); ++j)
        EXPECT_EQ(got.enc[l].router_logits[j], f16_to_f32(f32_to_f16(want.lm[l].logits[j])));
    }
    EXPECT_EQ(got.dec_input_ids, want.gen_in);
    EXPECT_EQ(got.dec_output_ids, want.gen_out);
    EXPECT_EQ(got.dec[0].expert, want.gen[0].expert);
  }
  const json summary = store_summary_json(dir);
  EXPECT_EQ(summary["format_version"], 2);
  EXPECT_EQ(summary["routing"]["top_k"], 2);
  EXPECT_TRUE(summary["per_layer"].contains("gen.1"));
  std::ostringstream text;
  print_store_summary(dir, text);
  EXPECT_NE(text.str().find("olmoe, top-2, no expert capacity"), std::string::npos) << text.str();
}

// A Switch store with the default options is still version 1: no routing field, no new tensor.
TEST(TopkStore, SwitchDefaultsStayVersionOne) {
  Tmp tmp;
  StoreSettings s = lm_settings(1, 0, false);
  s.family = "switch";
  s.dropped = true;
  auto w = TraceWriter::open(tmp / "store", s, OpenMode::kCreate);
  const Sample x(s, 2);
  SampleRecord r = x.record();
  const std::vector<uint8_t> dropped(x.tokens.size(), 0);
  for (auto& l : r.enc) l.dropped = dropped.data();
  w->add(r);
  w->finish(1.0);
  const json m = json::parse(read_file(tmp / "store" / "manifest.json"));
  EXPECT_EQ(m["format_version"], 1);
  EXPECT_FALSE(m.contains("routing"));
  const SafetensorsFile f = SafetensorsFile::open(tmp / "store" / "shard-00000.safetensors");
  EXPECT_EQ(f.metadata().at("format_version"), "1");
  EXPECT_EQ(f.find("enc.0.expert")->view.shape, (Shape{static_cast<int64_t>(x.tokens.size())}));
  EXPECT_NE(f.find("enc.0.dropped"), nullptr);
  EXPECT_TRUE(verify_store(tmp / "store").empty());
  // k = 1 without capacity is a version-2 store whose expert stays [T].
  StoreSettings s1 = lm_settings(1, 0, false);
  write(tmp / "k1", s1, 2);
  const json m1 = json::parse(read_file(tmp / "k1" / "manifest.json"));
  EXPECT_EQ(m1["format_version"], 2);
  const SafetensorsFile f1 = SafetensorsFile::open(tmp / "k1" / "shard-00000.safetensors");
  EXPECT_EQ(f1.find("lm.0.expert")->view.shape.size(), 1u);
  EXPECT_TRUE(verify_store(tmp / "k1").empty()) << joined(verify_store(tmp / "k1"));
}

// A partial shard of a k > 1 store is loaded back on resume: the shards equal an uninterrupted
// run's. A resume with another k or family is refused naming it.
TEST(TopkStore, ResumeReproducesAndRefusesOtherRouting) {
  Tmp tmp;
  const StoreSettings s = lm_settings(2, 3);
  write(tmp / "whole", s, 7);
  {
    auto w = TraceWriter::open(tmp / "cut", s, OpenMode::kCreate);
    for (int i = 0; i < 4; ++i) w->add(Sample(s, i).record());
    w->commit_partial();
  }
  {
    auto w = TraceWriter::open(tmp / "cut", s, OpenMode::kResume);
    ASSERT_EQ(w->committed_samples(), 4);
    for (int i = 4; i < 7; ++i) w->add(Sample(s, i).record());
    w->finish(1.0);
  }
  for (const char* shard :
       {"shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"}) {
    EXPECT_EQ(read_file(tmp / "cut" / shard), read_file(tmp / "whole" / shard)) << shard;
  }
  StoreSettings other = s;
  other.top_k = 3;
  EXPECT_NE(error_of([&] { check_resume(tmp / "whole", other); }).find("routing.top_k: 2 in the"),
            std::string::npos);
  other = s;
  other.family = "mixtral";
  EXPECT_NE(error_of([&] {
              check_resume(tmp / "whole", other);
            }).find("routing.family: olmoe in the store, mixtral now"),
            std::string::npos);
  other = s;
  other.logits_topk = 2;
  EXPECT_NE(error_of([&] { check_resume(tmp / "whole", other); }).find("logits_topk: 3 in the"),
            std::string::npos);
}

// --logits topk:K: the K largest logits (F16), their ids and the lse replace router_logits; the
// K probabilities exp(l - lse) are those of the full softmax up to the F16 rounding of l.
TEST(TopkStore, LogitsTopkRoundTrip) {
  Tmp tmp;
  const fs::path dir = tmp / "store";
  const StoreSettings s = lm_settings(2, 3);
  write(dir, s, 5);
  EXPECT_TRUE(verify_store(dir).empty()) << joined(verify_store(dir));
  const json m = json::parse(read_file(dir / "manifest.json"));
  EXPECT_EQ(m["logits_topk"], 3);
  EXPECT_EQ(m["logits_dtype"], "F16");
  const SafetensorsFile f = SafetensorsFile::open(dir / "shard-00000.safetensors");
  const int64_t T = f.find("token_ids")->view.shape[0];
  EXPECT_EQ(f.find("lm.0.router_logits"), nullptr);
  EXPECT_EQ(f.find("lm.0.router_topk_logits")->view.dtype, DType::kF16);
  EXPECT_EQ(f.find("lm.0.router_topk_logits")->view.shape, (Shape{T, 3}));
  EXPECT_EQ(f.find("lm.0.router_topk_ids")->view.dtype, DType::kI32);
  EXPECT_EQ(f.find("lm.0.router_lse")->view.shape, (Shape{T}));
  const TraceStore store = TraceStore::open(dir);
  for (int i = 0; i < 5; ++i) {
    const Sample want(s, i);
    const LayerRecordOwned got = store.sample(i).enc[1];
    const Layer& w = want.lm[1];
    EXPECT_TRUE(got.router_logits.empty());
    EXPECT_EQ(got.topk_ids, w.topk_ids);
    EXPECT_EQ(got.lse, w.lse);
    const size_t rows = want.tokens.size();
    for (size_t r = 0; r < rows; ++r) {
      double z = 0;
      for (int e = 0; e < 6; ++e) z += std::exp(static_cast<double>(w.logits[r * 6 + e]));
      for (size_t j = 0; j < 3; ++j) {
        const float v = got.topk_logits[r * 3 + j];
        EXPECT_EQ(v, f16_to_f32(f32_to_f16(w.logits[r * 6 + got.topk_ids[r * 3 + j]])));
        const double p = std::exp(static_cast<double>(v) - got.lse[r]);
        const double exact =
            std::exp(static_cast<double>(w.logits[r * 6 + got.topk_ids[r * 3 + j]])) / z;
        EXPECT_NEAR(p, exact, 4e-3 * exact) << i << " " << r << " " << j;
      }
    }
  }
  // A record without the top-K is refused, naming what is missing.
  auto w = TraceWriter::open(tmp / "other", s, OpenMode::kCreate);
  Sample x(s, 1);
  SampleRecord r = x.record();
  r.enc[0].topk_ids = nullptr;
  EXPECT_NE(error_of([&] { w->add(r); }).find("topk_logits, topk_ids or lse"), std::string::npos);
  // K beyond the experts names the option.
  StoreSettings big = s;
  big.logits_topk = 7;
  EXPECT_NE(error_of([&] {
              TraceWriter::open(tmp / "big", big, OpenMode::kCreate);
            }).find("--logits topk:7: K must be in [1, 6]"),
            std::string::npos);
}

// Rewrites tensor `name` of a shard in place (same dtype and shape) and fixes the manifest's
// size and checksum, so that only the contents check can catch it.
template <class T>
void patch(const fs::path& dir, const std::string& name, const std::function<void(T*)>& edit) {
  const fs::path p = dir / "shard-00000.safetensors";
  std::string bytes = read_file(p);
  const SafetensorsFile f = SafetensorsFile::open(p);
  const size_t at = static_cast<size_t>(static_cast<const std::byte*>(f.find(name)->view.data) -
                                        f.file()->data());
  T value;
  std::memcpy(&value, bytes.data() + at, sizeof(T));
  edit(&value);
  std::memcpy(bytes.data() + at, &value, sizeof(T));
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
  json m = json::parse(read_file(dir / "manifest.json"));
  m["shards"][0]["sha256"] = sha256_hex(bytes.data(), bytes.size());
  std::ofstream(dir / "manifest.json", std::ios::binary | std::ios::trunc) << m.dump(2);
}

// verify (and every reader, through the same shard check) catches what a k > 1 or topk:K store
// must not hold.
TEST(TopkStore, VerifyCatchesBadTopkContents) {
  Tmp tmp;
  const StoreSettings s = lm_settings(2, 3);
  auto fresh = [&](const std::string& name) {
    write(tmp / name, s, 3);
    EXPECT_TRUE(verify_store(tmp / name).empty()) << joined(verify_store(tmp / name));
    return tmp / name;
  };
  auto expect_problem = [&](const fs::path& dir, const std::string& needle) {
    const std::string all = joined(verify_store(dir));
    EXPECT_NE(all.find(needle), std::string::npos) << all;
  };
  // A token's two experts must differ.
  fs::path d = fresh("dup");
  patch<int64_t>(d, "lm.0.expert", [](int64_t* two) {  // [e0, e1] of row 0 -> [e0, e0]
    int32_t e[2];
    std::memcpy(e, two, 8);
    e[1] = e[0];
    std::memcpy(two, e, 8);
  });
  expect_problem(d, "lm.0.expert[0] holds expert");
  d = fresh("range");
  patch<int32_t>(d, "gen.1.expert", [](int32_t* e) { *e = 6; });
  expect_problem(d, "gen.1.expert[0][0] = 6 is outside [0, 6)");
  d = fresh("ids");
  patch<int32_t>(d, "lm.2.router_topk_ids", [](int32_t* e) { *e = -1; });
  expect_problem(d, "lm.2.router_topk_ids[0][0] = -1 is outside [0, 6)");
  d = fresh("order");  // the first value raised to the F16 maximum's negative: values increase
  patch<uint16_t>(d, "lm.0.router_topk_logits", [](uint16_t* v) { *v = 0xfbff; });
  expect_problem(d, "lm.0.router_topk_logits[0] increases at 1");
  d = fresh("lse");  // an lse far below the stored logits: probabilities above 1
  patch<float>(d, "lm.0.router_lse", [](float* l) { *l -= 5.f; });
  expect_problem(d, "lm.0.router_lse[0] = ");
}

// A data-parallel v2 store: the ranks' parts merge into a manifest with the routing, whose shards are
// byte for byte a single process's; ranks with another routing are refused.
TEST(TopkStore, RanksMergeWithTheirRouting) {
  Tmp tmp;
  const StoreSettings s = lm_settings(2, 3);
  write(tmp / "single", s, 7);
  const fs::path store = tmp / "dp";
  auto rank = [&](int r, int64_t first, int64_t n, const StoreSettings& base) {
    StoreSettings rs = base;
    rs.part = StorePart{r, 2, first, n, 7};
    prepare_parallel_store(store, r, 2, OpenMode::kCreate);
    auto w = TraceWriter::open(rank_store_dir(store, r, 2), rs, OpenMode::kCreate);
    for (int64_t i = first; i < first + n; ++i) w->add(Sample(s, static_cast<int>(i)).record());
    w->finish(1.0);
  };
  rank(0, 0, 3, s);
  rank(1, 3, 4, s);
  const MergeResult m = merge_store(store);
  ASSERT_TRUE(m.merged);
  EXPECT_TRUE(verify_store(store).empty()) << joined(verify_store(store));
  const json mm = json::parse(read_file(store / "manifest.json"));
  EXPECT_EQ(mm["routing"]["top_k"], 2);
  EXPECT_EQ(mm["logits_topk"], 3);
  EXPECT_EQ(mm["format_version"], 2);
  EXPECT_EQ(read_file(store / mm["shards"][2]["file"].get<std::string>()),
            read_file(tmp / "single" / "shard-00002.safetensors"));
  // rank 1 again with top-3 routing: the merge names the field
  fs::remove_all(rank_store_dir(store, 1, 2));
  fs::remove(store / "manifest.json");
  StoreSettings other = s;
  other.top_k = 3;
  {
    StoreSettings rs = other;
    rs.part = StorePart{1, 2, 3, 4, 7};
    auto w = TraceWriter::open(rank_store_dir(store, 1, 2), rs, OpenMode::kCreate);
    for (int i = 3; i < 7; ++i) w->add(Sample(other, i).record());
    w->finish(1.0);
  }
  EXPECT_NE(error_of([&] { merge_store(store); }).find("other settings than rank 0 (routing:"),
            std::string::npos);
}

// The manifest's version must match what it describes: a version-1 manifest cannot declare a
// top-k routing, and version 3 is unknown.
TEST(TopkStore, FormatVersionMustMatchTheLayout) {
  Tmp tmp;
  const fs::path dir = tmp / "store";
  write(dir, lm_settings(), 2);
  json m = json::parse(read_file(dir / "manifest.json"));
  m["format_version"] = 1;
  std::ofstream(dir / "manifest.json", std::ios::trunc) << m.dump();
  EXPECT_NE(joined(verify_store(dir)).find("format_version 1 does not match its layout"),
            std::string::npos);
  m["format_version"] = 3;
  std::ofstream(dir / "manifest.json", std::ios::trunc) << m.dump();
  EXPECT_NE(joined(verify_store(dir)).find("reads versions 1 and 2"), std::string::npos);
  m["format_version"] = 2;
  m["routing"]["family"] = "gpt";
  std::ofstream(dir / "manifest.json", std::ios::trunc) << m.dump();
  EXPECT_NE(joined(verify_store(dir)).find("family must be one of switch, olmoe"),
            std::string::npos);
}

}  // namespace
}  // namespace moetrace
