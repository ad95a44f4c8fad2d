// TraceWriter: buffers one shard in memory, commits full shards on commit threads (written in
// parallel, listed in order), and rewrites manifest.json after every commit so that a kill at any
// point leaves a valid store of the committed shards.
#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <set>
#include <span>
#include <sstream>
#include <thread>
#include <unordered_set>

#include "core/error.h"
#include "core/log.h"
#include "core/sha256.h"
#include "io/safetensors.h"
#include "trace/schema.h"
#include "trace/store.h"

namespace moetrace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;
using trace::Layout;
using trace::ShardEntry;
using trace::Stats;

namespace {

// Full shards are written by kCommitThreads threads at once (half the cores, 2 to 8) (serializing,
// fsync and SHA-256 of a 400 MB shard take one core about half a second, and the GPU fills one
// every quarter second); they are listed in the manifest strictly in order. add() waits while
// kCommitThreads + 1 shards, or more than kMaxQueuedBytes (at least one shard), are queued.
const size_t kCommitThreads = std::clamp<size_t>(std::thread::hardware_concurrency() / 2, 2, 8);
constexpr size_t kMaxQueuedBytes = size_t{3} << 30;

// Leaves grown elements uninitialized (resize() then overwrite: one pass over the logits, not two).
template <class T>
struct NoInitAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = NoInitAllocator<U>;
  };
  using std::allocator<T>::allocator;
  template <class U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
using Bytes = std::vector<uint8_t, NoInitAllocator<uint8_t>>;

struct LayerBuf {
  Bytes logits;                  // [T, E] in the store's logits dtype (empty with topk logits)
  std::vector<int32_t> expert;   // [T, k]
  std::vector<uint8_t> dropped;  // [T] (empty without capacity)
  std::vector<float> gate;       // [T, k]
  Bytes hidden;                  // [T, d_model] in the hidden dtype (empty without hidden)
  // --logits topk:K only: [T, K] F16 values, [T, K] ids, [T] log-sum-exp.
  std::vector<uint16_t> topk_values;
  std::vector<int32_t> topk_ids;
  std::vector<float> lse;
};

// The samples of one shard, laid out as the shard's tensors.
struct ShardBuf {
  int64_t index = 0, first_sample = 0;
  std::vector<int32_t> token_ids;
  std::vector<int64_t> offsets{0};
  std::vector<uint8_t> kind;
  std::vector<LayerBuf> enc, dec;
  std::vector<int32_t> dec_in, dec_out;
  std::vector<int64_t> dec_offsets{0};
  std::vector<std::string> ids, datasets;
  std::vector<int64_t> rows;
  Stats stats;

  int64_t num_samples() const { return static_cast<int64_t>(kind.size()); }
  // Empty again, keeping every buffer's capacity (index, first_sample and stats are set anew).
  void clear() {
    token_ids.clear();
    offsets.assign(1, 0);
    kind.clear();
    for (auto* ls : {&enc, &dec}) {
      for (LayerBuf& l : *ls) {
        l.logits.clear();
        l.expert.clear();
        l.dropped.clear();
        l.gate.clear();
        l.hidden.clear();
        l.topk_values.clear();
        l.topk_ids.clear();
        l.lse.clear();
      }
    }
    dec_in.clear();
    dec_out.clear();
    dec_offsets.assign(1, 0);
    ids.clear();
    datasets.clear();
    rows.clear();
  }
  size_t bytes() const {
    size_t n = token_ids.size() * 4 + dec_in.size() * 8;
    for (const auto* ls : {&enc, &dec}) {
      for (const LayerBuf& l : *ls) {
        n += l.logits.size() + l.expert.size() * 8 + l.dropped.size() + l.hidden.size() +
             l.topk_values.size() * 6 + l.lse.size() * 4;
      }
    }
    return n;
  }
};

template <class V>
TensorView view_of(const V& v, DType dtype, Shape shape) {
  return TensorView{dtype, std::move(shape), v.data()};
}

template <class V>
void append_raw(V* dst, const TensorView& v) {
  const size_t n = v.nbytes() / sizeof(typename V::value_type);
  const size_t old = dst->size();
  dst->resize(old + n);
  if (n > 0) std::memcpy(dst->data() + old, v.data, v.nbytes());
}

std::string dtype_str(DType t) { return std::string(dtype_name(t)); }

// The first place where two JSON values differ, as "path: stored vs new", or "" when equal.
std::string first_difference(const json& a, const json& b, const std::string& path) {
  if (a.is_object() && b.is_object()) {
    std::set<std::string> keys;
    for (auto it = a.begin(); it != a.end(); ++it) keys.insert(it.key());
    for (auto it = b.begin(); it != b.end(); ++it) keys.insert(it.key());
    for (const auto& k : keys) {
      if (!a.contains(k)) return path + "." + k + ": absent in the store, " + b[k].dump() + " now";
      if (!b.contains(k)) return path + "." + k + ": " + a[k].dump() + " in the store, absent now";
      std::string d = first_difference(a[k], b[k], path + "." + k);
      if (!d.empty()) return d;
    }
    return "";
  }
  if (a.is_array() && b.is_array() && a.size() == b.size()) {
    for (size_t i = 0; i < a.size(); ++i) {
      std::string d = first_difference(a[i], b[i], path + "[" + std::to_string(i) + "]");
      if (!d.empty()) return d;
    }
    return "";
  }
  if (a == b) return "";
  std::string sa = a.dump(), sb = b.dump();
  if (sa.size() > 80) sa = sa.substr(0, 77) + "...";
  if (sb.size() > 80) sb = sb.substr(0, 77) + "...";
  return path + ": " + sa + " in the store, " + sb + " now";
}

Layout layout_of(const StoreSettings& s) {
  Layout l;
  l.enc_layers = s.enc_layers;
  l.dec_layers = s.dec_layers;
  l.num_experts = s.num_experts;
  l.d_model = s.d_model;
  l.logits_dtype = s.logits_dtype;
  l.hidden_dtype = s.hidden_dtype;
  l.decoder = s.decoder;
  l.samples_per_shard = s.samples_per_shard;
  l.family = s.family;
  l.top_k = s.top_k;
  l.dropped = s.dropped;
  l.logits_topk = s.logits_topk;
  return l;
}

void check_settings(const StoreSettings& s) {
  if (s.num_experts < 1) fail("trace store: num_experts must be >= 1, got ", s.num_experts);
  if (s.d_model < 1) fail("trace store: d_model must be >= 1, got ", s.d_model);
  if (s.samples_per_shard < 1) {
    fail("trace store: samples_per_shard must be >= 1, got ", s.samples_per_shard);
  }
  if (s.logits_dtype != DType::kF32 && s.logits_dtype != DType::kF16 &&
      s.logits_dtype != DType::kBF16) {
    fail("trace store: logits dtype must be F32, F16 or BF16, got ", dtype_name(s.logits_dtype));
  }
  if (s.hidden_dtype && *s.hidden_dtype != DType::kF32 && *s.hidden_dtype != DType::kBF16) {
    fail("trace store: hidden dtype must be BF16 or F32, got ", dtype_name(*s.hidden_dtype));
  }
  if (!s.decoder && !s.dec_layers.empty())
    fail("trace store: decoder layers given without decoder");
  if (!is_routing_family(s.family)) fail("trace store: unknown routing family '", s.family, "'");
  if (s.top_k < 1 || s.top_k > s.num_experts) {
    fail("trace store: top_k must be in [1, num_experts = ", s.num_experts, "], got ", s.top_k);
  }
  if (s.logits_topk < 0 || s.logits_topk > s.num_experts) {
    fail("--logits topk:", s.logits_topk, ": K must be in [1, ", s.num_experts,
         "] (the model's experts)");
  }
  if (s.logits_topk > 0 && s.logits_dtype != DType::kF16) {
    fail("trace store: --logits topk:K stores its values as F16, got logits dtype ",
         dtype_name(s.logits_dtype));
  }
  if (s.part) {
    const StorePart& p = *s.part;
    if (p.world_size < 1 || p.rank < 0 || p.rank >= p.world_size || p.first_sample < 0 ||
        p.num_samples < 0 || p.first_sample + p.num_samples > p.total_samples ||
        p.first_sample % s.samples_per_shard != 0) {
      fail("trace store: part rank ", p.rank, " of ", p.world_size, ", samples [", p.first_sample,
           ", ", p.first_sample + p.num_samples, ") of ", p.total_samples,
           " is inconsistent (the first sample must start a shard)");
    }
  }
  for (const auto* layers : {&s.enc_layers, &s.dec_layers}) {
    std::set<int> uniq(layers->begin(), layers->end());
    if (uniq.size() != layers->size()) fail("trace store: a MoE layer index is repeated");
    for (int b : *layers) {
      if (b < 0) fail("trace store: negative block index ", b);
    }
  }
}

// True when `now` asks for at least the samples the store's settings planned; refuses fewer.
template <class Refuse>
bool growth_allowed(const json& had, const json& now, const Refuse& refuse) {
  auto count = [](const json& j) -> int64_t {
    return j.is_object() && j.contains("num_samples") && j["num_samples"].is_number_integer()
               ? j["num_samples"].get<int64_t>()
               : -1;
  };
  const int64_t a = count(had), b = count(now);
  if (a < 0 || b < 0) return false;
  if (b < a) {
    refuse("settings.traces: " + had.value("traces", json()).dump() + " (" + std::to_string(a) +
           " samples) in the store, " + now.value("traces", json()).dump() + " (" +
           std::to_string(b) + " samples) now; a store can be extended, not shrunk");
  }
  return true;
}

// Everything a resume must agree on: layers, dtypes, shard size, part, settings and model ("engine"
// is the caller's: it knows the options). settings.traces and settings.num_samples may grow: a
// resume with more traces extends the store with the next samples of the same plan.
void check_resume_against(const fs::path& dir, const json& m, const Layout& stored,
                          const StoreSettings& s, const Layout& layout) {
  auto refuse = [&](const std::string& diff) {
    fail(dir.string(), ": cannot resume: the store was collected with other settings (", diff,
         "); use --overwrite to start again");
  };
  auto layers_str = [](const std::vector<int>& v) { return json(v).dump(); };
  if (stored.enc_layers != layout.enc_layers) {
    refuse("layers.encoder: " + layers_str(stored.enc_layers) + " in the store, " +
           layers_str(layout.enc_layers) + " now");
  }
  if (stored.dec_layers != layout.dec_layers) {
    refuse("layers.decoder: " + layers_str(stored.dec_layers) + " in the store, " +
           layers_str(layout.dec_layers) + " now");
  }
  auto num = [&](const char* name, int64_t a, int64_t b) {
    if (a != b)
      refuse(std::string(name) + ": " + std::to_string(a) + " in the store, " + std::to_string(b) +
             " now");
  };
  num("num_experts", stored.num_experts, layout.num_experts);
  num("d_model", stored.d_model, layout.d_model);
  num("samples_per_shard", stored.samples_per_shard, layout.samples_per_shard);
  if (stored.logits_dtype != layout.logits_dtype) {
    refuse("logits_dtype: " + dtype_str(stored.logits_dtype) + " in the store, " +
           dtype_str(layout.logits_dtype) + " now");
  }
  if (stored.hidden_dtype != layout.hidden_dtype) {
    refuse("hidden_dtype: " + trace::hidden_dtype_name(stored.hidden_dtype) + " in the store, " +
           trace::hidden_dtype_name(layout.hidden_dtype) + " now");
  }
  if (stored.decoder != layout.decoder) {
    refuse(std::string("decoder: ") + (stored.decoder ? "true" : "false") + " in the store, " +
           (layout.decoder ? "true" : "false") + " now");
  }
  if (stored.family != layout.family) {
    refuse("routing.family: " + stored.family + " in the store, " + layout.family + " now");
  }
  num("routing.top_k", stored.top_k, layout.top_k);
  if (stored.dropped != layout.dropped) {
    refuse(std::string("routing.dropped: ") + (stored.dropped ? "true" : "false") +
           " in the store, " + (layout.dropped ? "true" : "false") + " now");
  }
  num("logits_topk", stored.logits_topk, layout.logits_topk);
  const json had_part = m.contains("part") ? m["part"] : json();
  const json now_part = s.part ? trace::part_json(*s.part) : json();
  if (had_part != now_part) {
    refuse("part: " + (had_part.is_null() ? std::string("none") : had_part.dump()) +
           " in the store, " + (now_part.is_null() ? std::string("none") : now_part.dump()) +
           " now");
  }
  for (const char* key : {"settings", "model"}) {
    json now = std::string(key) == "settings" ? s.settings : s.model;
    json had = m.contains(key) ? m[key] : json();
    if (std::string(key) == "settings" && growth_allowed(had, now, refuse)) {
      for (const char* k : {"traces", "num_samples"}) {
        had.erase(k);
        now.erase(k);
      }
    }
    const std::string d = first_difference(had.is_null() ? json::object() : had,
                                           now.is_null() ? json::object() : now, key);
    if (!d.empty()) refuse(d);
  }
}

}  // namespace

struct TraceWriter::Impl {
  fs::path dir;
  StoreSettings settings;
  Layout layout;
  // A rank's part of a data-parallel store starts at global shard first_shard = sample base.
  int64_t first_shard = 0, base = 0;
  double prior_time = 0;  // collection_time of earlier runs, seconds
  std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();

  // Main thread only.
  std::unordered_set<std::string> ids;  // every sample id in the store or added
  int64_t added = 0;                    // samples in the store at open + add() calls since
  std::unique_ptr<ShardBuf> cur;        // the shard being filled
  int64_t cur_durable = 0;              // samples of cur already committed (a partial shard)
  bool finished = false;

  // Shared with the commit threads, under mu. Shards are written in parallel and published
  // (renamed into place, listed) in order by one thread at a time (publish_mu); the main thread
  // commits itself only after the queue has drained.
  struct Job {
    std::unique_ptr<ShardBuf> buf;
    bool claimed = false, prepared = false;
    ShardEntry entry;
    std::exception_ptr error;
  };
  mutable std::mutex mu;
  std::condition_variable cv;
  std::deque<Job> queue;  // oldest first; references stay valid (push_back / pop_front only)
  size_t queued_bytes = 0;
  bool stop = false;
  std::exception_ptr error;
  std::vector<ShardEntry> shards;  // committed, listed in the manifest
  std::vector<Stats> shard_stats;  // counts of each committed shard
  std::mutex publish_mu;
  std::vector<std::thread> threads;

  // Committed shard buffers, emptied but with their capacity: reusing them spares the kernel
  // faulting in and zeroing hundreds of MB of fresh pages per shard (the bulk of a GPU run's
  // store time before).
  std::vector<std::unique_ptr<ShardBuf>> spare;  // under mu

  std::unique_ptr<ShardBuf> new_buf(int64_t index) {
    std::unique_ptr<ShardBuf> b;
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!spare.empty()) {
        b = std::move(spare.back());
        spare.pop_back();
      }
    }
    if (b) {
      b->clear();
    } else {
      b = std::make_unique<ShardBuf>();
    }
    b->index = index;
    b->first_sample = index * layout.samples_per_shard;
    b->enc.resize(layout.enc_layers.size());
    b->dec.resize(layout.dec_layers.size());
    b->stats = trace::empty_stats(layout);
    return b;
  }

  void rethrow_error() {
    std::lock_guard<std::mutex> lock(mu);
    if (error) std::rethrow_exception(error);
  }

  ordered_json manifest(bool complete, double collection_time) const {
    trace::ManifestFields f;
    f.totals = trace::empty_stats(layout);
    {
      std::lock_guard<std::mutex> lock(mu);
      f.shards = shards;
      for (const auto& st : shard_stats) f.totals.add(st);
    }
    f.complete = complete;
    f.command_line = settings.command_line;
    f.settings = settings.settings;
    f.model = settings.model;
    f.layout = layout;
    f.part = settings.part;
    f.collection_time = collection_time;
    f.device = settings.device;
    f.engine = settings.engine;
    return trace::build_manifest(f);
  }

  double elapsed() const {
    return prior_time +
           std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }

  void write_manifest(bool complete, double collection_time) {
    trace::atomic_write_file(dir, trace::kManifestName,
                             manifest(complete, collection_time).dump(2) + "\n");
  }

  // Writes buf as shard buf.index: .tmp- file, fsync, rename, manifest. A shard that replaces
  // committed ones (the partial shard of the same index, or the shards of a window computed again:
  // redo_from_sample) first drops them from the manifest, so a crash in between leaves a valid
  // (shorter) store rather than a manifest naming a changed file.
  void commit(const ShardBuf& b) { publish(b, prepare(b)); }

  // Samples listed from shard `index` on: what publishing a shard of that index replaces.
  int64_t listed_from(int64_t index) const {
    std::lock_guard<std::mutex> lock(mu);
    int64_t n = 0;
    for (size_t k = static_cast<size_t>(std::max<int64_t>(0, index - first_shard));
         k < shards.size(); ++k)
      n += shards[k].num_samples;
    return n;
  }

  // Writes buf to its .tmp- file, fsync'ed, and returns its manifest entry (any thread).
  ShardEntry prepare(const ShardBuf& b) const {
    const std::string name = trace::shard_file_name(b.index);
    const fs::path tmp = dir / (trace::kTmpPrefix + name);
    const int64_t n = b.num_samples();
    const int64_t t = static_cast<int64_t>(b.token_ids.size());
    const int64_t g = static_cast<int64_t>(b.dec_in.size());
    const int64_t e = layout.num_experts, d = layout.d_model, kk = layout.top_k;
    const int64_t K = layout.logits_topk;
    std::vector<NamedView> views;
    views.push_back({"token_ids", view_of(b.token_ids, DType::kI32, {t})});
    views.push_back({"sample_offsets", view_of(b.offsets, DType::kI64, {n + 1})});
    views.push_back({"sample_kind", view_of(b.kind, DType::kU8, {n})});
    auto add_layer = [&](const LayerBuf& l, bool dec, int block, int64_t rows) {
      const std::string p = trace::layer_key(layout, dec, block) + ".";
      if (K > 0) {
        views.push_back({p + "router_topk_logits", view_of(l.topk_values, DType::kF16, {rows, K})});
        views.push_back({p + "router_topk_ids", view_of(l.topk_ids, DType::kI32, {rows, K})});
        views.push_back({p + "router_lse", view_of(l.lse, DType::kF32, {rows})});
      } else {
        views.push_back({p + "router_logits", view_of(l.logits, layout.logits_dtype, {rows, e})});
      }
      // [T] for top-1 (Switch, as in version 1), [T, k] above.
      const Shape per_choice = kk == 1 ? Shape{rows} : Shape{rows, kk};
      views.push_back({p + "expert", view_of(l.expert, DType::kI32, per_choice)});
      if (layout.dropped) views.push_back({p + "dropped", view_of(l.dropped, DType::kU8, {rows})});
      views.push_back({p + "gate", view_of(l.gate, DType::kF32, per_choice)});
      if (layout.hidden_dtype) {
        views.push_back({p + "hidden", view_of(l.hidden, *layout.hidden_dtype, {rows, d})});
      }
    };
    for (size_t i = 0; i < layout.enc_layers.size(); ++i) {
      add_layer(b.enc[i], false, layout.enc_layers[i], t);
    }
    if (layout.decoder) {
      views.push_back(
          {trace::gen_tensor(layout, "input_ids"), view_of(b.dec_in, DType::kI32, {g})});
      views.push_back(
          {trace::gen_tensor(layout, "output_ids"), view_of(b.dec_out, DType::kI32, {g})});
      views.push_back({trace::gen_tensor(layout, "sample_offsets"),
                       view_of(b.dec_offsets, DType::kI64, {n + 1})});
      for (size_t i = 0; i < layout.dec_layers.size(); ++i) {
        add_layer(b.dec[i], true, layout.dec_layers[i], g);
      }
    }
    const std::map<std::string, std::string> meta = {
        {"format", kTraceFormat},
        {"format_version", std::to_string(layout.format_version())},
        {"first_sample", std::to_string(b.first_sample)},
        {"sample_ids", json(b.ids).dump()},
        {"datasets", json(b.datasets).dump()},
        {"rows", json(b.rows).dump()},
    };
    ShardEntry entry;
    entry.file = name;
    entry.first_sample = b.first_sample;
    entry.num_samples = n;
    entry.num_tokens = t;
    entry.num_decoder_tokens = g;
    try {
      write_safetensors(tmp, views, meta, &entry.sha256);
      trace::fsync_file(tmp);
      entry.bytes = static_cast<int64_t>(fs::file_size(tmp));
    } catch (...) {
      std::error_code ec;
      fs::remove(tmp, ec);
      throw;
    }
    return entry;
  }

  // Renames a prepared shard into place and lists it (shards in index order, one at a time).
  void publish(const ShardBuf& b, const ShardEntry& entry) {
    const fs::path tmp = dir / (trace::kTmpPrefix + entry.file);
    const fs::path dst = dir / entry.file;
    const int64_t n = entry.num_samples;
    bool replaces = false;
    {
      std::lock_guard<std::mutex> lock(mu);
      const auto committed = static_cast<int64_t>(shards.size());
      const int64_t k = b.index - first_shard;  // position in this store's shard list
      MT_ASSERT(k >= 0 && k <= committed);
      replaces = k < committed;
      if (replaces) {
        shards.resize(static_cast<size_t>(k));
        shard_stats.resize(static_cast<size_t>(k));
      }
    }
    if (replaces) write_manifest(false, elapsed());
    if (::rename(tmp.c_str(), dst.c_str()) != 0) {
      const int err = errno;
      std::error_code ec;
      fs::remove(tmp, ec);
      fail(dst.string(), ": cannot rename ", tmp.filename().string(),
           " into place: ", std::strerror(err));
    }
    trace::fsync_dir(dir);
    {
      std::lock_guard<std::mutex> lock(mu);
      shards.push_back(entry);
      shard_stats.push_back(b.stats);
    }
    write_manifest(false, elapsed());
    log_debug("trace store: committed ", dst.string(), " (", n, " samples, ", entry.bytes,
              " bytes)");
  }

  void thread_main() {
    while (true) {
      Job* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu);
        auto unclaimed = [&] {
          for (Job& j : queue) {
            if (!j.claimed) return &j;
          }
          return static_cast<Job*>(nullptr);
        };
        cv.wait(lock, [&] { return stop || unclaimed() != nullptr; });
        job = unclaimed();
        if (job == nullptr) return;  // stop, and nothing left to write
        job->claimed = true;
      }
      try {
        job->entry = prepare(*job->buf);
      } catch (...) {
        job->error = std::current_exception();
      }
      {
        std::lock_guard<std::mutex> lock(mu);
        job->prepared = true;
      }
      publish_ready();
    }
  }

  // Publishes the prepared shards at the front of the queue, in order. After a failure nothing
  // more is listed (shards must stay contiguous); prepared files are removed.
  void publish_ready() {
    std::lock_guard<std::mutex> publishing(publish_mu);
    while (true) {
      Job* job = nullptr;
      bool failed = false;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (queue.empty() || !queue.front().prepared) return;
        job = &queue.front();
        if (job->error && !error) error = job->error;
        failed = error != nullptr;
      }
      if (failed) {
        std::error_code ec;
        if (!job->entry.file.empty()) fs::remove(dir / (trace::kTmpPrefix + job->entry.file), ec);
      } else {
        try {
          publish(*job->buf, job->entry);
        } catch (...) {
          std::lock_guard<std::mutex> lock(mu);
          error = std::current_exception();
        }
      }
      std::lock_guard<std::mutex> lock(mu);
      queued_bytes -= job->buf->bytes();
      if (spare.size() < kCommitThreads + 2) spare.push_back(std::move(job->buf));
      queue.pop_front();
      cv.notify_all();
    }
  }

  void drain() {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return queue.empty(); });
    if (error) std::rethrow_exception(error);
  }

  void enqueue(std::unique_ptr<ShardBuf> b) {
    const size_t bytes = b->bytes();
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] {
      return error || queue.empty() ||
             (queue.size() <= kCommitThreads && queued_bytes + bytes <= kMaxQueuedBytes);
    });
    if (error) std::rethrow_exception(error);
    queued_bytes += bytes;
    queue.emplace_back().buf = std::move(b);
    cv.notify_all();
  }

  void start_threads() {
    for (size_t i = 0; i < kCommitThreads; ++i) threads.emplace_back([this] { thread_main(); });
  }
  void stop_threads() {
    {
      std::lock_guard<std::mutex> lock(mu);
      stop = true;
    }
    cv.notify_all();
    for (auto& t : threads) {
      if (t.joinable()) t.join();
    }
    threads.clear();
  }

  void validate(const SampleRecord& s) const {
    const std::string& id = s.sample_id;
    if (id.empty()) fail("trace store: a sample has an empty sample_id");
    if (ids.count(id)) fail("trace store: sample ", id, " is already in the store");
    if (s.enc.size() != layout.enc_layers.size()) {
      fail("trace store: sample ", id, " has ", s.enc.size(), " encoder layer records, expected ",
           layout.enc_layers.size());
    }
    if (!layout.decoder &&
        (!s.dec.empty() || !s.dec_input_ids.empty() || !s.dec_output_ids.empty())) {
      fail("trace store: sample ", id, " has decoder records but the store has no decoder");
    }
    if (layout.decoder) {
      if (s.dec.size() != layout.dec_layers.size()) {
        fail("trace store: sample ", id, " has ", s.dec.size(), " decoder layer records, expected ",
             layout.dec_layers.size());
      }
      if (s.dec_input_ids.size() != s.dec_output_ids.size()) {
        fail("trace store: sample ", id, ": dec_input_ids has ", s.dec_input_ids.size(),
             " entries but dec_output_ids ", s.dec_output_ids.size());
      }
    }
    auto check = [&](const LayerRecord& l, bool dec, int block, size_t rows) {
      if (rows == 0) return;
      const std::string key = trace::layer_key(layout, dec, block);
      auto null = [&](const char* what) {
        fail("trace store: sample ", id, " layer ", key, ": ", what, " is null");
      };
      if (layout.logits_topk > 0) {
        if (l.topk_logits == nullptr || l.topk_ids == nullptr || l.lse == nullptr)
          null("topk_logits, topk_ids or lse (a --logits topk:K store)");
        const size_t nk = rows * static_cast<size_t>(layout.logits_topk);
        for (size_t r = 0; r < nk; ++r) {
          if (l.topk_ids[r] < 0 || l.topk_ids[r] >= layout.num_experts) {
            fail("trace store: sample ", id, " ", key, ".router_topk_ids[", r,
                 "] = ", l.topk_ids[r], " is outside [0, ", layout.num_experts, ")");
          }
        }
      } else if (l.router_logits == nullptr && l.router_logits_raw == nullptr) {
        null("router_logits");
      }
      if (l.expert == nullptr) null("expert");
      if (l.gate == nullptr) null("gate");
      if (layout.dropped && l.dropped == nullptr) null("dropped (the store has capacity)");
      const size_t nk = rows * static_cast<size_t>(layout.top_k);
      for (size_t r = 0; r < nk; ++r) {
        if (l.expert[r] < 0 || l.expert[r] >= layout.num_experts) {
          fail("trace store: sample ", id, " ", key, ".expert[", r, "] = ", l.expert[r],
               " is outside [0, ", layout.num_experts, ")");
        }
      }
      if (layout.dropped) {
        for (size_t r = 0; r < rows; ++r) {
          if (l.dropped[r] > 1) {
            fail("trace store: sample ", id, " ", key, ".dropped[", r, "] is not 0 or 1");
          }
        }
      }
    };
    for (size_t i = 0; i < s.enc.size(); ++i) {
      check(s.enc[i], false, layout.enc_layers[i], s.token_ids.size());
    }
    for (size_t i = 0; i < s.dec.size(); ++i) {
      check(s.dec[i], true, layout.dec_layers[i], s.dec_input_ids.size());
    }
  }

  // Writes n values to dst in the store's dtype, from f32 or from raw values of another dtype
  // (raw values of the store's dtype are copied as they are).
  static void put_values(uint8_t* dst, const float* f32, const void* raw, DType raw_dtype,
                         DType dst_dtype, size_t n) {
    if (raw != nullptr && raw_dtype == dst_dtype) {
      std::memcpy(dst, raw, n * dtype_size(dst_dtype));
    } else if (raw == nullptr) {
      convert_from_f32(f32, dst_dtype, dst, n);
    } else {
      std::vector<float> tmp(n);
      convert_to_f32(raw_dtype, raw, tmp.data(), n);
      convert_from_f32(tmp.data(), dst_dtype, dst, n);
    }
  }

  // Appends layer `layer` of k samples (rows[j] rows each) to l: the buffers grow once, then the
  // samples are copied in parallel (a GPU run hands over ~1.5 KB of logits per token).
  void append_layer(LayerBuf* l, trace::LayerStats* st, const SampleRecord* s, size_t k, bool dec,
                    size_t layer, const std::vector<size_t>& rows) {
    const size_t e = static_cast<size_t>(layout.num_experts);
    const size_t d = static_cast<size_t>(layout.d_model);
    const size_t ls = dtype_size(layout.logits_dtype);
    const size_t hs = layout.hidden_dtype ? dtype_size(*layout.hidden_dtype) : 0;
    const size_t kk = static_cast<size_t>(layout.top_k);
    const size_t K = static_cast<size_t>(layout.logits_topk);
    std::vector<size_t> at(k + 1, l->expert.size() / kk);  // first row of each sample
    for (size_t j = 0; j < k; ++j) at[j + 1] = at[j] + rows[j];
    const size_t end = at[k];
    if (K == 0) {
      l->logits.resize(end * e * ls);
    } else {
      l->topk_values.resize(end * K);
      l->topk_ids.resize(end * K);
      l->lse.resize(end);
    }
    l->expert.resize(end * kk);
    if (layout.dropped) l->dropped.resize(end);
    l->gate.resize(end * kk);
    if (hs > 0) l->hidden.resize(end * d * hs);
    auto record = [&](size_t j) -> const LayerRecord& {
      return dec ? s[j].dec[layer] : s[j].enc[layer];
    };
#pragma omp parallel for schedule(dynamic, 16) if (k > 1)
    for (size_t j = 0; j < k; ++j) {
      const LayerRecord& r = record(j);
      const size_t n = rows[j], r0 = at[j];
      if (n == 0) continue;
      if (K == 0) {
        put_values(l->logits.data() + r0 * e * ls, r.router_logits, r.router_logits_raw,
                   r.router_logits_raw_dtype, layout.logits_dtype, n * e);
      } else {
        convert_from_f32(r.topk_logits, DType::kF16, l->topk_values.data() + r0 * K, n * K);
        std::memcpy(l->topk_ids.data() + r0 * K, r.topk_ids, n * K * sizeof(int32_t));
        std::memcpy(l->lse.data() + r0, r.lse, n * sizeof(float));
      }
      std::memcpy(l->expert.data() + r0 * kk, r.expert, n * kk * sizeof(int32_t));
      if (layout.dropped) std::memcpy(l->dropped.data() + r0, r.dropped, n);
      std::memcpy(l->gate.data() + r0 * kk, r.gate, n * kk * sizeof(float));
      if (hs > 0 && (r.hidden != nullptr || r.hidden_raw != nullptr)) {
        put_values(l->hidden.data() + r0 * d * hs, r.hidden, r.hidden_raw, r.hidden_raw_dtype,
                   *layout.hidden_dtype, n * d);
      } else if (hs > 0) {  // zeros where a record has no hidden state
        std::memset(l->hidden.data() + r0 * d * hs, 0, n * d * hs);
      }
    }
    for (size_t j = 0; j < k; ++j) {
      if (rows[j] > 0) {
        const LayerRecord& r = record(j);
        trace::count_rows(st, r.expert, layout.top_k, layout.dropped ? r.dropped : nullptr,
                          static_cast<int64_t>(rows[j]));
      }
    }
  }

  // Appends k validated samples to the current shard (which has room for them).
  void append(const SampleRecord* s, size_t k) {
    ShardBuf& b = *cur;
    std::vector<size_t> tokens(k), steps(k);
    for (size_t j = 0; j < k; ++j) {
      tokens[j] = s[j].token_ids.size();
      steps[j] = s[j].dec_input_ids.size();
    }
    for (size_t i = 0; i < layout.enc_layers.size(); ++i) {
      append_layer(&b.enc[i],
                   &b.stats.layers[trace::layer_key(layout, false, layout.enc_layers[i])], s, k,
                   false, i, tokens);
    }
    if (layout.decoder) {
      for (size_t i = 0; i < layout.dec_layers.size(); ++i) {
        append_layer(&b.dec[i],
                     &b.stats.layers[trace::layer_key(layout, true, layout.dec_layers[i])], s, k,
                     true, i, steps);
      }
    }
    for (size_t j = 0; j < k; ++j) {
      const SampleRecord& r = s[j];
      b.token_ids.insert(b.token_ids.end(), r.token_ids.begin(), r.token_ids.end());
      b.offsets.push_back(static_cast<int64_t>(b.token_ids.size()));
      b.kind.push_back(r.synthetic ? 1 : 0);
      b.ids.push_back(r.sample_id);
      b.datasets.push_back(r.dataset);
      b.rows.push_back(r.row);
      if (layout.decoder) {
        b.dec_in.insert(b.dec_in.end(), r.dec_input_ids.begin(), r.dec_input_ids.end());
        b.dec_out.insert(b.dec_out.end(), r.dec_output_ids.begin(), r.dec_output_ids.end());
        b.dec_offsets.push_back(static_cast<int64_t>(b.dec_in.size()));
        b.stats.num_decoder_tokens += static_cast<int64_t>(r.dec_input_ids.size());
      }
      b.stats.num_samples += 1;
      b.stats.num_tokens += static_cast<int64_t>(r.token_ids.size());
      b.stats.dataset_samples[r.dataset] += 1;
    }
  }

  // Loads a committed partial shard back into cur, byte for byte (logits stay in their dtype).
  void load_partial(const SafetensorsFile& f, const Stats& stats, trace::ShardMeta meta) {
    ShardBuf& b = *cur;
    auto get = [&](const std::string& name) -> const TensorView& { return f.find(name)->view; };
    b.token_ids.clear();
    append_raw(&b.token_ids, get("token_ids"));
    b.offsets.clear();
    append_raw(&b.offsets, get("sample_offsets"));
    append_raw(&b.kind, get("sample_kind"));
    auto load_layer = [&](LayerBuf* l, bool dec, int block) {
      const std::string p = trace::layer_key(layout, dec, block) + ".";
      if (layout.logits_topk > 0) {
        append_raw(&l->topk_values, get(p + "router_topk_logits"));
        append_raw(&l->topk_ids, get(p + "router_topk_ids"));
        append_raw(&l->lse, get(p + "router_lse"));
      } else {
        append_raw(&l->logits, get(p + "router_logits"));
      }
      append_raw(&l->expert, get(p + "expert"));
      if (layout.dropped) append_raw(&l->dropped, get(p + "dropped"));
      append_raw(&l->gate, get(p + "gate"));
      if (layout.hidden_dtype) append_raw(&l->hidden, get(p + "hidden"));
    };
    for (size_t i = 0; i < layout.enc_layers.size(); ++i)
      load_layer(&b.enc[i], false, layout.enc_layers[i]);
    if (layout.decoder) {
      append_raw(&b.dec_in, get(trace::gen_tensor(layout, "input_ids")));
      append_raw(&b.dec_out, get(trace::gen_tensor(layout, "output_ids")));
      b.dec_offsets.clear();
      append_raw(&b.dec_offsets, get(trace::gen_tensor(layout, "sample_offsets")));
      for (size_t i = 0; i < layout.dec_layers.size(); ++i)
        load_layer(&b.dec[i], true, layout.dec_layers[i]);
    }
    b.ids = std::move(meta.sample_ids);
    b.datasets = std::move(meta.datasets);
    b.rows = std::move(meta.rows);
    b.stats = stats;
    cur_durable = b.num_samples();
  }

  void create() {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) fail(dir.string(), ": cannot create the store directory: ", ec.message());
    cur = new_buf(first_shard);
    write_manifest(false, 0.0);
  }

  void resume() {
    const std::string what = (dir / trace::kManifestName).string();
    const json m = trace::read_manifest(dir);
    const Layout stored = trace::layout_from_manifest(m, what);
    check_resume_against(dir, m, stored, settings, layout);
    if (!m.contains("shards") || !m["shards"].is_array())
      fail(what, ": \"shards\" must be an array");
    const json& tm = m.contains("collection_time") ? m["collection_time"] : json();
    if (!tm.is_number() || tm.get<double>() < 0)
      fail(what, ": collection_time must be a number >= 0");
    prior_time = tm.get<double>();

    // Every committed shard must be intact: resuming on top of a damaged one would hide it.
    std::set<std::string> listed;
    const size_t n_shards = m["shards"].size();
    int64_t next = base;        // the first sample not kept
    int64_t listed_end = base;  // the first sample after the shards checked so far
    for (size_t k = 0; k < n_shards; ++k) {
      const std::string ew = what + ": shards[" + std::to_string(k) + "]";
      ShardEntry e = trace::shard_entry_from_json(m["shards"][k], ew);
      const std::string want = trace::shard_file_name(first_shard + static_cast<int64_t>(k));
      if (e.file != want || e.first_sample != listed_end) {
        fail(ew, ": expected ", want, " starting at sample ", listed_end);
      }
      listed_end += e.num_samples;
      if (k + 1 < n_shards && e.num_samples != layout.samples_per_shard) {
        fail(ew, ": holds ", e.num_samples, " samples; only the last shard may hold fewer than ",
             layout.samples_per_shard);
      }
      const fs::path p = dir / e.file;
      std::error_code ec;
      const auto size = fs::file_size(p, ec);
      auto damaged = [&](const std::string& why) {
        fail(p.string(), ": ", why, "; the store is damaged (run `moetrace verify ", dir.string(),
             "`), use --overwrite to start again");
      };
      if (ec) damaged("missing (" + ec.message() + ")");
      if (static_cast<int64_t>(size) != e.bytes) {
        damaged("has " + std::to_string(size) + " bytes, the manifest says " +
                std::to_string(e.bytes));
      }
      if (sha256_file(p) != e.sha256) damaged("sha256 differs from the manifest");
      const SafetensorsFile f = SafetensorsFile::open(p);
      trace::ShardMeta meta;
      const Stats st = trace::check_shard(f, layout, e.first_sample, &meta);
      if (st.num_samples != e.num_samples || st.num_tokens != e.num_tokens ||
          st.num_decoder_tokens != e.num_decoder_tokens) {
        damaged("its sample or token counts differ from the manifest");
      }
      const bool partial = k + 1 == n_shards && e.num_samples < layout.samples_per_shard;
      // Redone: the shard stays listed until the first new shard replaces it and those after it
      // (publish()), but its samples are added again.
      const bool redo =
          settings.redo_from_sample >= 0 && e.first_sample >= settings.redo_from_sample;
      if (!redo) {
        for (const auto& id : meta.sample_ids) {
          if (!ids.insert(id).second) damaged("sample id " + id + " appears twice in the store");
        }
      }
      listed.insert(e.file);
      shards.push_back(e);
      shard_stats.push_back(st);
      if (redo) {
        if (!cur) cur = new_buf(first_shard + static_cast<int64_t>(k));
        log_info("trace store: ", e.file, " (", e.num_samples,
                 " samples) is computed again with the samples after it");
      } else {
        next += e.num_samples;
        if (partial) {
          cur = new_buf(first_shard + static_cast<int64_t>(k));
          load_partial(f, st, std::move(meta));
        }
      }
    }
    added = next - base;
    if (!cur) cur = new_buf(first_shard + static_cast<int64_t>(n_shards));
    // Leftovers of an interrupted commit: never listed, so never part of the store.
    for (const auto& ent : fs::directory_iterator(dir)) {
      const std::string name = ent.path().filename().string();
      int64_t index;
      const bool leftover = name.rfind(trace::kTmpPrefix, 0) == 0 ||
                            (trace::parse_shard_file_name(name, &index) && !listed.count(name));
      if (leftover) {
        std::error_code ec;
        fs::remove(ent.path(), ec);
        if (ec)
          fail(ent.path().string(), ": cannot remove an uncommitted leftover: ", ec.message());
        log_info("trace store: removed uncommitted ", ent.path().string());
      }
    }
    log_info("trace store: resuming ", dir.string(), " at sample ", added, " (", shards.size(),
             " committed shards)");
  }
};

TraceWriter::TraceWriter(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

json check_resume(const fs::path& dir, const StoreSettings& s) {
  check_settings(s);
  const std::string what = (dir / trace::kManifestName).string();
  const json m = trace::read_manifest(dir);
  const Layout stored = trace::layout_from_manifest(m, what);
  check_resume_against(dir, m, stored, s, layout_of(s));
  return m;
}

std::unique_ptr<TraceWriter> TraceWriter::open(const fs::path& dir, const StoreSettings& s,
                                               OpenMode mode) {
  check_settings(s);
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->settings = s;
  impl->layout = layout_of(s);
  if (s.part) {
    impl->base = s.part->first_sample;
    impl->first_shard = s.part->first_sample / s.samples_per_shard;
  }

  std::vector<std::string> store_files, other_files;
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    if (!fs::is_directory(dir, ec)) fail(dir.string(), ": exists and is not a directory");
    for (const auto& ent : fs::directory_iterator(dir)) {
      const std::string name = ent.path().filename().string();
      if (name == kStoreLockName) continue;  // held by this run (StoreLock), never removed
      (trace::is_store_file(name) ? store_files : other_files).push_back(name);
    }
  }
  const bool has_manifest = fs::exists(dir / trace::kManifestName, ec);
  const bool empty = store_files.empty() && other_files.empty();
  switch (mode) {
    case OpenMode::kCreate:
      if (!empty) {
        fail(dir.string(), ": is not empty (",
             has_manifest ? "it holds a trace store" : "it holds files",
             "); use --resume or --overwrite");
      }
      impl->create();
      break;
    case OpenMode::kOverwrite:
      if (!other_files.empty()) {
        fail(dir.string(), ": holds files that are not part of a trace store (",
             other_files.front(), "); refusing to overwrite");
      }
      for (const auto& name : store_files) {
        fs::remove(dir / name, ec);
        if (ec) fail((dir / name).string(), ": cannot remove: ", ec.message());
      }
      impl->create();
      break;
    case OpenMode::kResume:
      if (has_manifest) {
        impl->resume();
      } else if (other_files.empty()) {
        // Nothing committed yet (or only leftovers of a first commit): start afresh.
        for (const auto& name : store_files) fs::remove(dir / name, ec);
        impl->create();
      } else {
        fail(dir.string(), ": holds no manifest.json and other files (", other_files.front(),
             "); nothing to resume");
      }
      break;
  }
  impl->start_threads();
  return std::unique_ptr<TraceWriter>(new TraceWriter(std::move(impl)));
}

TraceWriter::~TraceWriter() { impl_->stop_threads(); }

int64_t TraceWriter::committed_samples() const { return impl_->added; }

int64_t TraceWriter::durable_samples() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  int64_t n = 0;
  for (const auto& e : impl_->shards) n += e.num_samples;
  return n;
}

void TraceWriter::add(const SampleRecord& sample) {
  add(std::span<const SampleRecord>(&sample, 1));
}

void TraceWriter::add(std::span<const SampleRecord> samples) {
  Impl& m = *impl_;
  if (m.finished) fail(m.dir.string(), ": add() after finish()");
  m.rethrow_error();
  for (size_t i = 0; i < samples.size();) {
    // The samples that fit into the current shard go in together.
    const size_t room = static_cast<size_t>(m.layout.samples_per_shard - m.cur->num_samples());
    const size_t k = std::min(room, samples.size() - i);
    for (size_t j = i; j < i + k; ++j) {
      try {
        m.validate(samples[j]);
      } catch (...) {
        for (size_t u = i; u < j; ++u) m.ids.erase(samples[u].sample_id);
        throw;
      }
      m.ids.insert(samples[j].sample_id);
    }
    m.append(samples.data() + i, k);
    m.added += static_cast<int64_t>(k);
    i += k;
    if (m.cur->num_samples() == m.layout.samples_per_shard) {
      const int64_t next = m.cur->index + 1;
      auto full = std::move(m.cur);
      m.cur = m.new_buf(next);
      m.cur_durable = 0;
      m.enqueue(std::move(full));
    }
  }
}

void TraceWriter::wait_for_commits() { impl_->drain(); }

void TraceWriter::commit_partial() {
  Impl& m = *impl_;
  if (m.finished) return;
  m.drain();
  // Shards being computed again (redo_from_sample) stay as they are until the new ones hold at
  // least their samples: an interrupted redo loses nothing, and the next resume redoes them.
  if (m.cur->num_samples() < m.listed_from(m.cur->index)) return;
  commit_cur();
}

void TraceWriter::commit_cur() {
  Impl& m = *impl_;
  m.drain();
  if (m.cur->num_samples() > m.cur_durable) {
    m.commit(*m.cur);
    m.cur_durable = m.cur->num_samples();
  }
}

void set_store_fidelity(const fs::path& dir, const Fidelity& f) {
  const std::string what = (dir / trace::kManifestName).string();
  const json m = trace::read_manifest(dir);
  if (!m.value("complete", false)) fail(what, ": the store is not complete; no fidelity to record");
  // Checked as every reader will check it, before anything is written.
  trace::fidelity_from_json(json::parse(trace::fidelity_json(f).dump()),
                            trace::layout_from_manifest(m, what), what);
  // The manifest again in its own field order: only "fidelity" changes (it goes last).
  std::ifstream in(dir / trace::kManifestName, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  ordered_json om = ordered_json::parse(text.str());
  om.erase("fidelity");
  om["fidelity"] = trace::fidelity_json(f);
  trace::atomic_write_file(dir, trace::kManifestName, om.dump(2) + "\n");
}

void TraceWriter::finish(double collection_seconds_this_run) {
  Impl& m = *impl_;
  if (m.finished) fail(m.dir.string(), ": finish() called twice");
  commit_cur();
  m.stop_threads();
  m.write_manifest(true, m.prior_time + std::max(0.0, collection_seconds_this_run));
  m.finished = true;
}

}  // namespace moetrace
