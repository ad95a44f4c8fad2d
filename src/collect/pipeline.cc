#include "collect/pipeline.h"

#include <cstring>

#include "core/error.h"
#include "core/log.h"
#include "data/catalog.h"

namespace moetrace::pipeline {

namespace {

template <class T>
void copy_rows(const TensorView& t, int64_t row0, int64_t rows, int64_t width,
               std::vector<T>& out) {
  const T* src = t.as<T>() + row0 * width;
  out.assign(src, src + rows * width);
}

// Rows of a tensor of any dtype, as raw bytes.
void copy_raw_rows(const TensorView& t, int64_t row0, int64_t rows, int64_t width,
                   std::vector<uint8_t>& out, DType* dtype) {
  const size_t es = dtype_size(t.dtype);
  const auto* src = static_cast<const uint8_t*>(t.data) + static_cast<size_t>(row0 * width) * es;
  out.assign(src, src + static_cast<size_t>(rows * width) * es);
  *dtype = t.dtype;
}

// The views of one stack's layers in a captured batch, looked up (and checked) once.
struct LayerViews {
  TensorView logits, expert, dropped, gate, hidden;
};
std::vector<LayerViews> layer_views(const CapturedBatch& r, keys::Stack s,
                                    const std::vector<int>& blocks, bool hidden, bool dropped) {
  std::vector<LayerViews> out;
  for (int i : blocks) {
    auto get = [&](std::string_view field) {
      const std::string key = keys::tensor(s, i, field);
      const TensorView* v = r.find(key);
      if (v == nullptr) fail("engine: no captured tensor ", key);
      return *v;
    };
    LayerViews& l = out.emplace_back();
    l.logits = get(keys::kRouterLogits);
    l.expert = get(keys::kExpert);
    if (dropped) l.dropped = get(keys::kDropped);
    l.gate = get(keys::kGate);
    if (hidden) l.hidden = get(keys::kHidden);
  }
  return out;
}

// Rows [b*S, b*S+len) of one layer's [B,S,...] tensors (decoder: S = steps, len = the sample's);
// expert and gate are [B,S,k]. logits_topk > 0: the top-K of the logits instead of the logits.
LayerData layer_slice(const LayerViews& v, int64_t b, int64_t S, int64_t len,
                      const CaptureLayout& c) {
  const int64_t E = c.E, d = c.d, k = c.top_k;
  const int logits_topk = c.logits_topk;
  LayerData l;
  if (logits_topk > 0) {
    std::vector<float> rows(static_cast<size_t>(len * E));
    const size_t es = dtype_size(v.logits.dtype);
    convert_to_f32(v.logits.dtype,
                   static_cast<const uint8_t*>(v.logits.data) + static_cast<size_t>(b * S * E) * es,
                   rows.data(), rows.size());
    topk_of(rows.data(), len, E, logits_topk, &l);
  } else {
    copy_raw_rows(v.logits, b * S, len, E, l.logits, &l.logits_dtype);
  }
  copy_rows(v.expert, b * S, len, k, l.expert);
  if (c.dropped) copy_rows(v.dropped, b * S, len, 1, l.dropped);
  copy_rows(v.gate, b * S, len, k, l.gate);
  if (c.hidden) copy_raw_rows(v.hidden, b * S, len, d, l.hidden, &l.hidden_dtype);
  return l;
}

// Each group of length_batches (longest first) cut where the length changes: batches without
// padding.
std::vector<std::vector<size_t>> split_by_length(const std::vector<std::vector<size_t>>& groups,
                                                 const std::vector<int64_t>& lengths) {
  std::vector<std::vector<size_t>> out;
  for (const auto& g : groups) {
    for (size_t i = 0; i < g.size(); ++i) {
      if (i == 0 || lengths[g[i]] != lengths[g[i - 1]]) out.emplace_back();
      out.back().push_back(g[i]);
    }
  }
  return out;
}

}  // namespace

Plan plan_samples(const CollectOptions& o, const ModelChoice& mc, int64_t L) {
  Plan p;
  int64_t n_total = (o.traces + L - 1) / L;
  auto is_real = [&](int64_t k) {
    return o.mode == "real" || (o.mode == "mixed" && mixed_is_real(k, o.real_ratio));
  };
  int64_t n_real_wanted = 0;
  for (int64_t k = 0; k < n_total; ++k) n_real_wanted += is_real(k);
  // What the manifest records: the selection that reproduces the plan (the default's datasets).
  p.datasets_setting = !o.datasets.empty() ? o.datasets : mc.demo ? "demo" : "default";
  if (o.mode != "synthetic" && n_real_wanted > 0) {
    PlanOptions po;
    // The demo model reads the bundled rows unless told otherwise.
    po.datasets = o.datasets.empty() && mc.demo ? "demo" : o.datasets;
    po.split = o.split;
    po.data_roots = o.data_roots;
    if (mc.demo && po.data_roots.empty()) po.data_roots.push_back(data::demo_data_root());
    po.extra_catalog = o.catalog;
    po.seed = o.seed;
    po.max_samples = n_real_wanted;
    po.threads = o.threads;
    PlanStats stats;
    p.rows = build_plan(po, &stats);
    p.datasets_setting = stats.selection;
    if (static_cast<int64_t>(p.rows.size()) < n_real_wanted) {
      log_warn("the selected datasets hold ", p.rows.size(), " usable samples, fewer than the ",
               n_real_wanted, " real samples asked for; collecting those");
      if (o.mode == "real") n_total = static_cast<int64_t>(p.rows.size());
    }
  }
  int64_t real_i = 0, synth_i = 0;
  for (int64_t k = 0; k < n_total; ++k) {
    WorkItem w;
    if (is_real(k)) {
      if (real_i >= static_cast<int64_t>(p.rows.size())) continue;  // data ran out
      const PlannedSample& row = p.rows[static_cast<size_t>(real_i++)];
      w.sample_id = row.sample_id;
      w.dataset = row.dataset;
      w.row = row.row;
      w.text = &row.text;
    } else {
      w.synthetic = true;
      w.synthetic_index = synth_i;
      w.sample_id = "synthetic/" + std::to_string(synth_i);
      w.dataset = "synthetic";
      w.row = synth_i++;
    }
    w.index = static_cast<int64_t>(p.items.size());
    p.items.push_back(std::move(w));
  }
  return p;
}

std::vector<WindowBatch> window_batches(const Window& win, const BatchBudget& budget, int32_t pad,
                                        bool same_length) {
  std::vector<size_t> real;
  std::vector<int64_t> lengths;
  for (size_t j = 0; j < win.items.size(); ++j) {
    if (win.items[j].synthetic) continue;
    real.push_back(j);
    lengths.push_back(static_cast<int64_t>(win.items[j].ids.size()));
  }
  std::vector<std::vector<size_t>> groups = length_batches(lengths, budget);
  if (same_length) groups = split_by_length(groups, lengths);
  for (auto& g : groups) {
    for (size_t& j : g) j = real[j];
  }
  std::sort(groups.begin(), groups.end(), [](const auto& a, const auto& b) {
    return *std::min_element(a.begin(), a.end()) < *std::min_element(b.begin(), b.end());
  });
  std::vector<WindowBatch> out;
  for (auto& members : groups) {
    WindowBatch& wb = out.emplace_back();
    Batch& batch = wb.batch;
    batch.B = static_cast<int64_t>(members.size());
    batch.S = static_cast<int64_t>(win.items[members.front()].ids.size());
    batch.input_ids.assign(static_cast<size_t>(batch.B * batch.S), pad);
    batch.attention_mask.assign(static_cast<size_t>(batch.B * batch.S), 0);
    for (int64_t b = 0; b < batch.B; ++b) {
      const auto& ids = win.items[members[static_cast<size_t>(b)]].ids;
      std::copy(ids.begin(), ids.end(), batch.input_ids.begin() + b * batch.S);
      std::fill_n(batch.attention_mask.begin() + b * batch.S, ids.size(), 1);
    }
    wb.members = std::move(members);
  }
  return out;
}

int64_t sample_bytes_bound(const CollectOptions& o, const CaptureLayout& c) {
  int64_t row = c.top_k * 8 + 1;  // expert, gate, dropped
  if (o.logits_topk > 0)
    row += o.logits_topk * 8 + 4;  // F32 values and I32 ids, F32 log-sum-exp
  else
    row += c.E * static_cast<int64_t>(dtype_size(c.captured_logits(o.logits_dtype)));
  if (o.hidden_dtype) row += c.d * static_cast<int64_t>(dtype_size(*o.hidden_dtype));
  int64_t rows = o.max_length * static_cast<int64_t>(c.enc_layers.size());
  if (o.decoder) rows += o.max_new_tokens * static_cast<int64_t>(c.dec_layers.size());
  return rows * row + o.max_length * 4;  // + the token ids
}

int64_t default_batch_window(const CollectOptions& o, const CaptureLayout& c, bool cuda) {
  const int64_t shard = o.samples_per_shard;
  if (!cuda) return shard;
  int64_t shards = std::max<int64_t>(1, kCudaWindowSamples / shard);
  while (shards > 1 && shards * shard * sample_bytes_bound(o, c) > kCudaWindowBytes) --shards;
  return shards * shard;
}

void capture_samples(const CapturedBatch& r, const CaptureLayout& c, Window& win,
                     const std::vector<size_t>& members) {
  const auto enc = layer_views(r, c.prompt_stack, c.enc_layers, c.hidden, c.dropped);
  const auto dec = layer_views(r, c.gen_stack, c.dec_layers, c.hidden, c.dropped);
  const GenerateResult& gen = r.generated;
#pragma omp parallel for schedule(dynamic, 8)
  for (int64_t b = 0; b < r.B; ++b) {
    const size_t j = members[static_cast<size_t>(b)];
    const auto len = static_cast<int64_t>(win.items[j].ids.size());
    SampleData& sd = win.data[j];
    for (const LayerViews& v : enc) sd.enc.push_back(layer_slice(v, b, r.S, len, c));
    if (c.dec_layers.empty()) continue;
    // Steps until this sequence produced eos (inclusive), else all steps run.
    const int32_t* ids = gen.ids.data() + b * (gen.steps + 1);
    int64_t G = gen.steps;
    for (int64_t t = 1; t <= gen.steps; ++t) {
      if (ids[t] == c.eos) {
        G = t;
        break;
      }
    }
    sd.dec_in.assign(ids, ids + G);
    sd.dec_out.assign(ids + 1, ids + G + 1);
    for (const LayerViews& v : dec) sd.dec.push_back(layer_slice(v, b, gen.steps, G, c));
  }
}

void topk_of(const float* logits, int64_t rows, int64_t E, int K, LayerData* l) {
  l->topk_values.resize(static_cast<size_t>(rows * K));
  l->topk_ids.resize(static_cast<size_t>(rows * K));
  l->lse.resize(static_cast<size_t>(rows));
  router_topk(logits, rows, E, K, l->topk_values.data(), l->topk_ids.data(), l->lse.data());
}

LayerRecord record_of(const LayerData& l) {
  LayerRecord r;
  r.router_logits_raw = l.logits.data();
  r.router_logits_raw_dtype = l.logits_dtype;
  if (!l.topk_ids.empty() || !l.lse.empty()) {
    r.topk_logits = l.topk_values.data();
    r.topk_ids = l.topk_ids.data();
    r.lse = l.lse.data();
  }
  r.expert = l.expert.data();
  r.dropped = l.dropped.data();
  r.gate = l.gate.data();
  if (!l.hidden.empty()) {
    r.hidden_raw = l.hidden.data();
    r.hidden_raw_dtype = l.hidden_dtype;
  }
  return r;
}

LoopResult run_windows(std::vector<WorkItem>& items, TokenizeStage& tokenize, EngineStage& engine,
                       StoreStage& store, Progress& progress, const BatchBudget& budget,
                       int32_t pad, bool same_length, int64_t start, const std::atomic<int>& stop) {
  LoopResult lr;
  std::deque<Window> windows;  // references stay valid: only push_back and pop_front
  auto store_finished_windows = [&] {
    while (!windows.empty() && windows.front().submitted && windows.front().outstanding == 0) {
      Window& win = windows.front();
      int64_t synthetic = 0;
      for (size_t j = 0; j < win.items.size(); ++j)
        synthetic += win.items[j].synthetic && win.begin + j >= static_cast<size_t>(start);
      store.push(std::move(win));
      windows.pop_front();
      progress.samples_skipped(synthetic);
    }
  };
  while (true) {
    const double t0 = progress_clock();
    const std::optional<TokenizeStage::Span> span = tokenize.next();
    lr.wait_seconds += progress_clock() - t0;
    if (!span) break;  // all windows done, or the tokenizer failed (rethrown by the caller)
    Window& win = windows.emplace_back();
    win.begin = span->first;
    win.items.assign(
        std::make_move_iterator(items.begin() + static_cast<std::ptrdiff_t>(span->first)),
        std::make_move_iterator(items.begin() + static_cast<std::ptrdiff_t>(span->second)));
    win.data.resize(win.items.size());
    for (WindowBatch& wb : window_batches(win, budget, pad, same_length)) {
      if (stop != 0) break;
      engine.submit(win, std::move(wb));
    }
    if (stop != 0) break;
    win.submitted = true;
    engine.drain(false);  // whatever the engine has finished meanwhile, without waiting
    store_finished_windows();
  }
  // The rest of the engine's work, then every window that is complete (after Ctrl-C the partly
  // submitted window stays unwritten: a resumed run redoes it).
  engine.drain(true);
  store_finished_windows();
  if (stop != 0 && !windows.empty()) {
    // Stopped inside a window: its samples up to the first one still missing are complete
    // (batches run in the order of their first sample); they are committed, and a resumed run
    // recomputes the window's batches and writes from the next sample on.
    Window& win = windows.front();
    size_t done = 0;
    while (done < win.items.size() && (win.items[done].synthetic || !win.data[done].enc.empty()))
      ++done;
    win.items.resize(done);
    win.data.resize(done);
    win.submitted = true;
    store_finished_windows();
  }
  lr.engine_seconds = engine.seconds();
  return lr;
}

}  // namespace moetrace::pipeline
