"""`moetrace speculate STORE -o DIR`: how well can the experts a token will need be predicted early
enough to prefetch them, and what does that buy an offloading runtime?

1. Split by sample (seeded hash of the sample id; optionally by dataset), never by token.
2. One streaming pass over the train samples fits every predictor (frequency, transition for
   lookahead 1-3, history with backoff, token id, learned softmax regression, decoder temporal);
   pregate needs no training (the next router applied to the current hidden state).
3. One streaming pass over the test samples ranks the E experts per token, per predictor and target
   layer, and accumulates recall@k with sample-clustered 95% confidence intervals.
4. The test samples' routing is replayed through a per-layer GPU expert cache (LRU, LFU, Belady's
   optimum; each with or without prefetching a predictor's top-k) for hit rate, bytes and a modeled
   time per token.

The package is split by concern; this module reads the store and runs the steps:

    moetrace.evaluation         the split, ranks, recall@k with confidence intervals, the summary
    moetrace.predictors         the predictors (fit on train chunks, score test chunks)
    moetrace.cachesim           the expert cache simulator and time model
    moetrace.speculate          chunks of a store, router weights, run_stack(), speculate_store()
    moetrace.speculate_report   speculation.md / .html and the charts
    moetrace.cli.speculate      the command line (build_parser, options_from_args, main)

Every name that lived here before the split is still importable from here. Keys of speculation.json
are documented in docs/ANALYSIS.md.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from .accumulate import SparseCounts  # re-exported
from .cachesim import POLICIES, TimeModel, layer_requests, next_uses, replay, simulate_cache  # re-exported
from .evaluation import KS, Z95, RecallCell, Split, hash_unit, summarize, topk_experts, true_ranks
from .keys import EXPERT, HIDDEN, layer_tensor, layers
from .predictors import (ALL_PREDICTORS, DENSE_LIMIT, Chunk, CountTable, Frequency, History,
                         Learned, Predictor, Pregate, Temporal, TokenId, Transition, backoff, predictor_key)
from .store import rows_f32
from .text import model_dir_of  # also speculate.model_dir_of, as before

SPECULATION_VERSION = 1
CHUNK_ROWS = 1 << 16

__all__ = [  # this module's own names and those it re-exported before the split
    "SPECULATION_VERSION", "CHUNK_ROWS", "StackSpec", "stack_chunks", "load_routers", "extract_routers", "Options",
    "build_predictors", "stack_has_hidden", "run_stack", "expert_bytes", "simulate_stack", "speculate_store",
    "POLICIES", "TimeModel", "layer_requests", "next_uses", "replay", "simulate_cache", "KS", "Z95",
    "RecallCell", "Split", "hash_unit", "summarize", "topk_experts", "true_ranks", "ALL_PREDICTORS",
    "DENSE_LIMIT", "Chunk", "CountTable", "Frequency", "History", "Learned", "Predictor", "Pregate", "Temporal",
    "TokenId", "Transition", "backoff", "predictor_key", "model_dir_of", "make_plots", "render_html",
    "render_markdown", "write_outputs", "build_parser", "main", "options_from_args", "parse_bytes", "rows_f32",
    "SparseCounts"]

# --------------------------------------------------------------------------------------------------
# Reading a store
# --------------------------------------------------------------------------------------------------


@dataclass
class StackSpec:
    key: str            # "encoder" / "decoder"
    layers: list        # ["enc.1", ...]
    offsets: str        # "sample_offsets" / "dec.sample_offsets"
    tokens: str         # "token_ids" / "dec.input_ids"


def stack_chunks(shard, spec: StackSpec, role: np.ndarray, want: int, ds_index: dict, with_hidden: bool):
    """Yields Chunks of the rows of samples whose role == want, at most CHUNK_ROWS rows each."""
    off = shard.sample_offsets if spec.offsets == "sample_offsets" else shard.dec_sample_offsets
    if off is None or not all(shard.has(layer_tensor(n, EXPERT)) for n in spec.layers):
        return
    lengths = np.diff(off)
    rows_role = np.repeat(role, lengths)
    sample = np.repeat(np.arange(shard.num_samples) + shard.first_sample, lengths)
    ds = np.repeat(np.array([ds_index[d] for d in shard.metadata["datasets"]], np.int64), lengths)
    total = int(off[-1])
    exp_all = [shard.tensor(layer_tensor(n, EXPERT)) for n in spec.layers]
    tok_all = shard.tensor(spec.tokens)
    hid_keys = [layer_tensor(n, HIDDEN) for n in spec.layers]
    hid_all = [shard.tensor(k) if shard.has(k) else None for k in hid_keys] if with_hidden else None
    decoder = spec.key == "decoder"
    step0 = np.zeros(total, bool)
    step0[off[:-1][lengths > 0]] = True
    for a in range(0, total, CHUNK_ROWS):
        b = min(total, a + CHUNK_ROWS)
        m = rows_role[a:b] == want
        if not m.any():
            continue
        allk = np.stack([np.asarray(x[a:b], np.int64).reshape(b - a, -1) for x in exp_all], axis=1)  # [n, L, k]
        ex = allk[:, :, 0]  # the top-1: what the predictors condition on
        choices = allk[m] if allk.shape[2] > 1 else None
        prev = None
        if decoder:
            prev_full = np.full_like(ex, -1)
            if a > 0:
                prev_full[0] = np.stack([np.asarray(x[a - 1], np.int64).reshape(-1)[0] for x in exp_all])
            prev_full[1:] = ex[:-1]
            prev_full[step0[a:b]] = -1
            prev = prev_full[m]
        hidden_fn = None
        if hid_all is not None:
            cache = {}

            def hidden_fn(j, a=a, b=b, m=m, cache=cache):
                if j not in cache:
                    h = hid_all[j]
                    cache[j] = None if h is None else rows_f32(h, a, b)[m]
                return cache[j]
        yield Chunk(experts=ex[m], tokens=np.asarray(tok_all[a:b], np.int64)[m], sample=sample[a:b][m],
                    dataset=ds[a:b][m], prev_step=prev, hidden_fn=hidden_fn, choices=choices)


def load_routers(path: str, spec: StackSpec, num_experts: int, d_model: int):
    """Router weights [E, d] (and bias or None) per layer of the stack from `moetrace routers` output."""
    from .safetensors_io import SafetensorsFile
    st = SafetensorsFile(path)
    ws, bs = [], []
    for n in spec.layers:
        w = np.array(st.tensor(layer_tensor(n, "router.weight"), float32=True), np.float32)
        if w.shape != (num_experts, d_model):
            raise ValueError(f"{path}: {n}.router.weight has shape {list(w.shape)}, expected [{num_experts}, {d_model}]")
        ws.append(w)
        bias = layer_tensor(n, "router.bias")
        bs.append(np.array(st.tensor(bias, float32=True)) if bias in st.infos else None)
    return ws, bs


def extract_routers(model_dir: str, out_path: str) -> None:
    """Runs `moetrace routers` (the executable that started us, or moetrace on PATH)."""
    exe = os.environ.get("MOETRACE_EXE") or "moetrace"
    r = subprocess.run([exe, "routers", "--model", model_dir, "-o", out_path], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`{exe} routers --model {model_dir}` failed: {r.stderr.strip() or r.stdout.strip()}")


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class Options:
    predictors: tuple = ALL_PREDICTORS
    lookaheads: tuple = (1, 2, 3)
    histories: tuple = (2, 3)
    split: Split = None
    cache_sizes: tuple = ()
    cache_bytes: tuple = ()
    policies: tuple = POLICIES
    prefetch_predictor: str = "transition"
    prefetch_k: int = 1
    expert_dtype_bytes: int = 4
    bandwidth_gbs: float = 24.0
    layer_ms: float = 0.2
    routers: str | None = None
    model: str | None = None
    learned_tokens: int = 20000
    learned_steps: int = 300
    encoder_replay: str = "prefill"
    simulate: bool = True
    max_replay: int = 50000
    ks: tuple = KS                # recall@k reported (1 is always added)
    real_only: bool = False       # leave out synthetic samples
    bar: bool = False             # tqdm progress bars


def build_predictors(opt: Options, spec: StackSpec, store, has_hidden: bool, routers, keep_prob: float,
                     seed: int, unavailable: dict) -> list[Predictor]:
    L, E = len(spec.layers), store.num_experts
    cfg = (store.manifest.get("model", {}) or {}).get("config", {}) or {}
    vocab = int(cfg.get("vocab_size") or 32128)
    preds: list[Predictor] = []
    want = set(opt.predictors)
    if "frequency" in want:
        preds.append(Frequency(L, E))
    if "transition" in want:
        preds += [Transition(L, E, d) for d in opt.lookaheads if d < L]
    if "history" in want:
        preds += [History(L, E, h) for h in opt.histories if 2 <= h and h - 1 < L]
    if "token" in want:
        preds.append(TokenId(L, E, vocab))
    if "temporal" in want and spec.key == "decoder":
        preds.append(Temporal(L, E))
    if "pregate" in want:
        if not has_hidden:
            unavailable[f"{spec.key}/pregate"] = "the store has no hidden states (collect with --hidden)"
        elif routers is None:
            unavailable[f"{spec.key}/pregate"] = unavailable.get("routers", "no router weights (--routers or --model)")
        else:
            preds += [Pregate(L, E, d, *routers) for d in (1, 2) if d < L]
    if "learned" in want and L > 1:
        preds.append(Learned(L, E, has_hidden, keep_prob, opt.learned_steps, seed))
    return preds


def stack_has_hidden(store, spec: StackSpec) -> bool:
    """True when the store holds the router inputs of every layer of the stack (and they are not the
    zero rows of a purely synthetic collection)."""
    if (store.manifest.get("settings", {}) or {}).get("mode") == "synthetic":
        return False
    first = next((s for s in store.shards if s.num_samples), None)
    return first is not None and all(first.has(layer_tensor(n, HIDDEN)) for n in spec.layers)


def run_stack(store, spec: StackSpec, opt: Options, routers, progress, ds_names: list[str], unavailable: dict) -> dict:
    E, L = store.num_experts, len(spec.layers)
    ds_index = {d: k for k, d in enumerate(ds_names)}
    has_hidden = stack_has_hidden(store, spec)
    total_tokens = int(store.manifest.get("num_tokens") or 1) if spec.key == "encoder" else \
        int(sum(int(s.entry.get("num_decoder_tokens") or 0) for s in store.shards) or 1)
    train_share = 1.0 - opt.split.test_fraction if not opt.split.test_datasets else 0.5
    keep_prob = min(1.0, opt.learned_tokens / max(1.0, total_tokens * train_share))
    preds = build_predictors(opt, spec, store, has_hidden, routers, keep_prob, opt.split.seed, unavailable)
    freq = next((p for p in preds if isinstance(p, Frequency)), None) or Frequency(L, E)
    need_hidden = any(p.needs_hidden for p in preds)
    roles = {}
    t0 = time.perf_counter()
    counts = {"train": [0, 0], "test": [0, 0]}  # samples, tokens
    from .progress import bar
    n_shards = len(store.shards)
    for shard in bar(store.iter_shards(), total=n_shards, desc=f"{spec.key}: fit", enabled=opt.bar):
        if not shard.num_samples:
            continue
        md = shard.metadata
        role = opt.split.assign(md["sample_ids"], md["datasets"])
        if opt.real_only:
            role[np.asarray(shard.tensor("sample_kind")) != 0] = -1
        roles[shard.first_sample] = role
        for c in stack_chunks(shard, spec, role, 0, ds_index, need_hidden):
            counts["train"][1] += c.experts.shape[0]
            if freq not in preds:
                freq.fit(c)
            for p in preds:
                p.fit(c)
        counts["train"][0] += int(np.count_nonzero(role == 0))
        counts["test"][0] += int(np.count_nonzero(role == 1))
    pass_s = time.perf_counter() - t0
    learned = next((p for p in preds if isinstance(p, Learned)), None)
    if progress and learned is not None:
        progress(f"speculate: {spec.key}: counted {counts['train'][1]} train tokens in {pass_s:.2f} s; training the "
                 f"learned predictor ({opt.learned_steps} steps per target layer)")
    for p in preds:
        p.bar = opt.bar
        p.finish(freq)
    fit_s = time.perf_counter() - t0  # the whole fit: the counting pass and every predictor's training
    if progress:
        progress(f"speculate: {spec.key}: fitted {len(preds)} predictors on {counts['train'][1]} train tokens "
                 f"in {fit_s:.2f} s" + (f" (learned predictor: {learned.train_s:.2f} s)" if learned else ""))
    cells: dict = {}
    sim_pred = None
    if opt.simulate:
        sim_pred = next((p for p in preds if p.name == opt.prefetch_predictor or predictor_key(p) == opt.prefetch_predictor),
                        None)
    kpre = max(1, opt.prefetch_k)
    pred_top: list = []   # per test chunk: [n, L, k] prefetch predictions
    routing: list = []    # per test chunk: (experts [n, L], sample [n])
    t1 = time.perf_counter()
    for shard in bar(store.iter_shards(), total=n_shards, desc=f"{spec.key}: evaluate", enabled=opt.bar):
        if not shard.num_samples:
            continue
        role = roles[shard.first_sample]
        for c in stack_chunks(shard, spec, role, 1, ds_index, need_hidden):
            n = c.experts.shape[0]
            counts["test"][1] += n
            inv = np.concatenate([[0], np.cumsum(np.diff(c.sample) != 0)]).astype(np.int64)  # rows are in sample order
            nsamp = int(inv[-1]) + 1
            ds_masks = [(d, c.dataset == d) for d in np.unique(c.dataset)] if len(ds_names) > 1 else []
            if opt.simulate:  # top-k: every expert of a token is loaded
                routing.append(((c.experts if c.choices is None else c.choices).astype(np.int16),
                                c.sample.astype(np.int32)))
                top = np.empty((n, L, kpre), np.int16)
            for p in preds:
                for t in p.targets():
                    sc = p.scores(c, t)
                    # recall@k against the set of a token's true experts: the rank of each of them, so
                    # a token counts the share of its experts within the predictor's k best
                    rows, _ = c.targets(t)
                    r = true_ranks(sc, c.experts[:, t] if c.choices is None else c.choices[:, t, :]).ravel()
                    key = (predictor_key(p), t)
                    cell = cells.setdefault(key, {"all": RecallCell(E, opt.ks, store.top_k)})
                    cell["all"].add(r, inv[rows], nsamp)
                    if len(ds_names) > 1:
                        for d, m in ds_masks:
                            mr = m[rows]
                            cell.setdefault(ds_names[d], RecallCell(E, opt.ks, store.top_k)).add(r[mr], inv[rows][mr], nsamp)
                    if p is sim_pred:
                        top[:, t] = topk_experts(sc, kpre)
            if opt.simulate:
                if sim_pred is not None:  # layers the predictor cannot reach get the train frequency top-k
                    for t in set(range(L)) - set(sim_pred.targets()):
                        top[:, t] = topk_experts(freq.scores(c, t), kpre)
                    pred_top.append(top)
    eval_s = time.perf_counter() - t1
    if progress:
        progress(f"speculate: {spec.key}: evaluated on {counts['test'][1]} test tokens in {eval_s:.2f} s")
    results = []
    for (pk, t), by_ds in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        name, la = pk.split("@")
        for d, cell in by_ds.items():
            results.append({"predictor": name, "lookahead": int(la), "target": spec.layers[t], "dataset": d,
                            **cell.result()})
    out = {"layers": spec.layers, "has_hidden": has_hidden,
           "train": {"samples": counts["train"][0], "tokens": counts["train"][1]},
           "test": {"samples": counts["test"][0], "tokens": counts["test"][1]},
           "fit_s": fit_s, "fit_pass_s": pass_s, "eval_s": eval_s, "results": results, "summary": summarize(results),
           "learned": next((p.describe() for p in preds if isinstance(p, Learned)), None)}
    if opt.simulate and routing:
        t2 = time.perf_counter()
        out["cache"] = simulate_stack(spec, opt, store, routing, pred_top if sim_pred is not None else None,
                                      freq, sim_pred)
        out["cache"]["elapsed_s"] = time.perf_counter() - t2
        if progress:
            progress(f"speculate: {spec.key}: cache simulation in {out['cache']['elapsed_s']:.2f} s")
    return out


def expert_bytes(store, dtype_bytes: int) -> int:
    cfg = (store.manifest.get("model", {}) or {}).get("config", {}) or {}
    d = int(cfg.get("d_model") or store.d_model)
    ff = int(cfg.get("d_ff") or 4 * d)
    return 2 * d * ff * dtype_bytes  # wi [d_ff, d] + wo [d, d_ff]


def simulate_stack(spec, opt: Options, store, routing, pred_top, freq, sim_pred) -> dict:
    E, L = store.num_experts, len(spec.layers)
    ex = np.concatenate([r[0] for r in routing])
    sample = np.concatenate([r[1] for r in routing])
    top = np.concatenate(pred_top)[:, :, :opt.prefetch_k] if pred_top else None
    per_token = spec.key == "decoder" or opt.encoder_replay == "token"
    if per_token:
        groups = [np.array([i]) for i in range(ex.shape[0])]
    else:
        cut = np.flatnonzero(np.diff(sample)) + 1
        groups = np.split(np.arange(ex.shape[0]), cut)
    truncated = len(groups) > opt.max_replay
    if truncated:  # the simulator is a per-request Python loop: bound its cost, say so in the output
        groups = groups[:opt.max_replay]
        ex = ex[:int(groups[-1][-1]) + 1]
    ebytes = expert_bytes(store, opt.expert_dtype_bytes)
    tm = TimeModel(ebytes, opt.bandwidth_gbs, opt.layer_ms)
    sizes = sorted(set(int(s) for s in opt.cache_sizes if 0 < int(s) <= E) |
                   {max(1, min(E, int(b // (L * ebytes)))) for b in opt.cache_bytes})
    if not sizes:
        sizes = sorted({max(1, E // 8), max(1, E // 4), max(1, E // 2), max(1, 3 * E // 4)})
    reqs, pre = layer_requests(ex, groups, top)
    tokens = int(ex.shape[0])
    all_gpu_ms = tm.layer_ms * len(groups) * L
    no_cache_ms = sum(tm.request_ms([len(r) for r in reqs[t]], np.zeros(len(groups))) for t in range(L))
    runs = replay(reqs, pre, sizes, opt.policies, E, tm, tokens)
    return {"mode": "decode" if per_token else "prefill", "requests_per_layer": len(groups), "tokens": tokens,
            "truncated": truncated,
            "expert_bytes": ebytes, "bandwidth_gbs": tm.bandwidth_gbs, "layer_ms": tm.layer_ms,
            "prefetch_predictor": predictor_key(sim_pred) if sim_pred is not None else None,
            "prefetch_k": opt.prefetch_k, "cache_sizes": sizes,
            "all_on_gpu_ms_per_token": all_gpu_ms / tokens, "no_cache_ms_per_token": no_cache_ms / tokens,
            "no_cache_bytes": int(sum(len(r) for t in range(L) for r in reqs[t])) * ebytes,
            "runs": runs}


def speculate_store(store, opt: Options, progress=None) -> dict:
    t0 = time.perf_counter()
    ds_names = sorted({d for s in store.shards if s.num_samples for d in s.metadata["datasets"]})
    for option, names in (("--test-datasets", opt.split.test_datasets), ("--train-datasets", opt.split.train_datasets)):
        missing = [d for d in names if d not in ds_names]
        if missing:
            raise ValueError(f"{option}: no dataset {', '.join(repr(d) for d in missing)} in {store.path} "
                             f"(its datasets: {', '.join(ds_names) or 'none'})")
    if opt.split.test_datasets and set(opt.split.train_datasets) & set(opt.split.test_datasets):
        raise ValueError("--train-datasets and --test-datasets overlap: "
                         + ", ".join(sorted(set(opt.split.train_datasets) & set(opt.split.test_datasets))))
    if any(int(k) < 1 for k in opt.ks):
        raise ValueError(f"--k {','.join(str(k) for k in opt.ks)}: every k must be at least 1")
    opt.ks = tuple(sorted(set(int(k) for k in opt.ks) | {1}))  # top-1 is always reported
    unavailable: dict = {}
    specs = [StackSpec("encoder", layers(store.encoder_stack, store.encoder_layers), "sample_offsets", "token_ids")]
    if store.decoder_layers:
        specs.append(StackSpec("decoder", layers(store.decoder_stack, store.decoder_layers),
                               store.gen_name("sample_offsets"), store.gen_name("input_ids")))
    specs = [s for s in specs if s.layers]
    routers_path = opt.routers
    tmpdir = None
    want_routers = "pregate" in opt.predictors and any(stack_has_hidden(store, s) for s in specs)
    if want_routers and routers_path is None:
        model = opt.model or model_dir_of(store.manifest, getattr(store, "path", ""))
        if model is None:
            unavailable["routers"] = "no router weights: pass --routers FILE (from `moetrace routers`) or --model DIR"
        else:
            tmpdir = tempfile.TemporaryDirectory(prefix="moetrace-routers-")
            routers_path = os.path.join(tmpdir.name, "routers.safetensors")
            try:
                extract_routers(model, routers_path)
            except (RuntimeError, OSError) as e:
                unavailable["routers"] = str(e)
                routers_path = None
    stacks = {}
    for spec in specs:
        routers = None
        if routers_path is not None and stack_has_hidden(store, spec):
            from .errors import StoreError
            try:
                routers = load_routers(routers_path, spec, store.num_experts, store.d_model)
            except (KeyError, ValueError, OSError, StoreError) as e:
                unavailable[f"{spec.key}/pregate"] = f"router weights unusable: {e}"
        stacks[spec.key] = run_stack(store, spec, opt, routers, progress, ds_names, unavailable)
    if tmpdir is not None:
        tmpdir.cleanup()
    if "routers" in unavailable:  # say it once per stack that could have used them
        reason = unavailable.pop("routers")
        for spec in specs:
            if stack_has_hidden(store, spec):
                unavailable.setdefault(f"{spec.key}/pregate", reason)
    elapsed = time.perf_counter() - t0
    tokens = sum(s["train"]["tokens"] + s["test"]["tokens"] for s in stacks.values())
    return {
        "moetrace_speculation_version": SPECULATION_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "store": os.path.abspath(getattr(store, "path", "")),
        "model": (store.manifest.get("model", {}) or {}).get("id"),
        "num_experts": store.num_experts, "top_k": store.top_k, "ks": list(opt.ks), "datasets": ds_names,
        "routing": {"family": store.family, "top_k": store.top_k, "dropped": store.has_dropped},
        "real_only": opt.real_only, "demo_model": bool((store.manifest.get("model", {}) or {}).get("demo")),
        "split": opt.split.describe(),
        "predictors": list(opt.predictors), "unavailable": unavailable,
        "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "encoder": stacks.get("encoder"), "decoder": stacks.get("decoder"),
    }


# Rendering (speculation.html, .md, charts) lives in speculate_report.py, the command line in
# cli/speculate.py; both import this module, so they are re-exported last.
from .speculate_report import make_plots, render_html, render_markdown, write_outputs  # noqa: E402
from .cli.speculate import build_parser, main, options_from_args, parse_bytes  # noqa: E402

if __name__ == "__main__":  # python -m moetrace.speculate, as before the split
    import sys
    sys.exit(main())
