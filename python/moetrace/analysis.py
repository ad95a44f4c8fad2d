"""`moetrace analyze STORE [-o DIR]`: expert-usage, load-balance, router-confidence, layer-to-layer,
token-level and dataset analysis of a trace store, written as stats.json and report.html (+ PNGs).

The package is split by concern; this module is the store-reading loop and the public face:

    moetrace.stats            statistics of one vector or matrix (pure functions)
    moetrace.accumulate       streaming accumulators fed one shard at a time (StackAnalysis)
    moetrace.analysis         analyze_store(): one pass over the shards -> the stats.json dictionary
    moetrace.analysis_report  report.html and its charts (moetrace.plots, moetrace.report)
    moetrace.cli.analyze      the command line (build_parser, main)

Every name that lived here before the split is still importable from here. Keys of stats.json are
documented in docs/ANALYSIS.md.
"""

from __future__ import annotations

import datetime
import os
import time

import numpy as np

from .accumulate import (CHUNK_ROWS, GATE_BINS, MARGIN_BINS, LayerAcc, SparseCounts,  # re-exported
                         StackAnalysis, TokenCounts, grouped_hist)
from .keys import EXPERT, layer_tensor, layers
from .stats import (NOISE_DRAWS, TOPK, entropy_bits, gini, hist_summary, joint_stats,  # re-exported
                    jsd_bits, jsd_noise_floor, logit_features, order_for_heatmap, table_topk_accuracy,
                    token_expert_stats, transition_probs, usage_stats)
from .store import rows_f32  # re-exported

ANALYSIS_VERSION = 1

__all__ = [  # this module's own names and those it re-exports from before the split
    "ANALYSIS_VERSION", "analyze_store", "pick_examples",
    "CHUNK_ROWS", "GATE_BINS", "MARGIN_BINS", "LayerAcc", "SparseCounts", "StackAnalysis", "TokenCounts",
    "grouped_hist", "NOISE_DRAWS", "TOPK", "entropy_bits", "gini", "hist_summary", "joint_stats", "jsd_bits",
    "jsd_noise_floor", "logit_features", "order_for_heatmap", "table_topk_accuracy", "token_expert_stats",
    "transition_probs", "usage_stats", "rows_f32", "TRANSITION_MIN_ROW", "make_plots", "render_html",
    "write_report", "build_parser", "main"]


def pick_examples(num_samples: int, n: int, seed: int) -> list[int]:
    if num_samples <= 0 or n <= 0:
        return []
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(num_samples, size=min(n, num_samples), replace=False))


def _example(shard, k: int, enc_layers: list[str], dec_layers: list[str], max_tokens: int) -> dict:
    md = shard.metadata
    off = shard.sample_offsets
    a, b = int(off[k]), int(off[k + 1])
    b2 = min(b, a + max_tokens)
    ex = {"index": shard.first_sample + k, "sample_id": md["sample_ids"][k], "dataset": md["datasets"][k],
          "tokens": int(b - a), "token_ids": [int(x) for x in shard.tensor("token_ids")[a:b2]],
          "layers": [n for n in enc_layers if shard.has(layer_tensor(n, EXPERT))]}
    top1 = lambda n, a, b: np.asarray(shard.tensor(layer_tensor(n, EXPERT))[a:b]).reshape(b - a, -1)[:, 0]  # noqa: E731
    ex["paths"] = (np.stack([top1(n, a, b2) for n in ex["layers"]], axis=1).tolist() if ex["layers"] else [])
    doff = shard.dec_sample_offsets
    if dec_layers and doff is not None:
        da, db = int(doff[k]), int(doff[k + 1])
        db2 = min(db, da + max_tokens)
        dl = [n for n in dec_layers if shard.has(layer_tensor(n, EXPERT))]
        ex["decoder"] = {"steps": int(db - da),
                         "input_ids": [int(x) for x in shard.tensor(shard.gen_name("input_ids"))[da:db2]],
                         "layers": dl,
                         "paths": np.stack([top1(n, da, db2) for n in dl], axis=1).tolist() if dl else []}
    return ex


def analyze_store(store, *, seed: int = 0, examples: int = 5, example_tokens: int = 24,
                  token_stats: bool = True, progress=None, real_only: bool = False, bar: bool = False,
                  tokenizer: str | None = None) -> dict:
    """Streams every shard once and returns the stats.json dictionary. real_only leaves out synthetic
    samples; bar shows a tqdm progress bar; tokenizer: a spiece.model for the examples' token text
    (default: the store's, see moetrace.text)."""
    from .progress import bar as progress_bar
    e = store.num_experts
    enc_layers = layers(store.encoder_stack, store.encoder_layers)
    dec_layers = layers(store.decoder_stack, store.decoder_layers)
    enc = StackAnalysis(store.encoder_stack, enc_layers, e, token_stats)
    dec = StackAnalysis(store.decoder_stack, dec_layers, e, token_stats) if dec_layers else None
    if real_only:
        candidates = [i for i, k in enumerate(np.concatenate(
            [np.asarray(s.tensor("sample_kind")) for s in store.shards if s.num_samples] or [np.zeros(0)]))
            if k == 0]
        chosen = {candidates[i] for i in pick_examples(len(candidates), examples, seed)}
    else:
        chosen = set(pick_examples(len(store), examples, seed))
    ex_out = []
    t0 = time.perf_counter()
    done_tokens = done_dec = 0
    n_shards = len(store.manifest.get("shards", []))
    ds_samples: dict[str, int] = {}
    skipped = 0
    for si, shard in enumerate(progress_bar(store.iter_shards(), total=n_shards, desc="analyze", enabled=bar)):
        if shard.num_samples == 0:
            continue
        md = shard.metadata
        keep = np.asarray(shard.tensor("sample_kind")) == 0 if real_only else np.ones(shard.num_samples, bool)
        skipped += int(np.count_nonzero(~keep))
        for d, k in zip(md["datasets"], keep):
            if k:
                ds_samples[d] = ds_samples.get(d, 0) + 1
        off = shard.sample_offsets
        enc.add_shard(shard, off, md["datasets"], np.asarray(shard.tensor("token_ids")), keep)
        done_tokens += int(np.diff(off)[keep].sum())
        doff = shard.dec_sample_offsets
        if dec is not None and doff is not None:
            dec.add_shard(shard, doff, md["datasets"], np.asarray(shard.tensor(shard.gen_name("input_ids"))), keep)
            done_dec += int(np.diff(doff)[keep].sum())
        for k in range(shard.num_samples):
            if shard.first_sample + k in chosen:
                ex_out.append(_example(shard, k, enc_layers, dec_layers, example_tokens))
        if progress:
            dt = time.perf_counter() - t0
            progress(f"analyze: shard {si + 1}/{n_shards}, {done_tokens} tokens, "
                     f"{done_tokens / dt if dt > 0 else 0:.0f} tokens/s")
    elapsed = time.perf_counter() - t0
    from .text import tokenizer_for
    tok = tokenizer_for(store, tokenizer) if ex_out else None
    for ex in ex_out:
        if tok:
            ex["token_pieces"] = tok.pieces(ex["token_ids"])
            if "decoder" in ex:
                ex["decoder"]["input_pieces"] = tok.pieces(ex["decoder"]["input_ids"])
    m = store.manifest
    model = m.get("model", {}) or {}
    cfg = model.get("config", {}) or {}
    notices = []
    if store.logits_topk:
        notices.append(f"aux_loss and mean_router_prob not computed: they need every expert's router probability and "
                       f"the store keeps the {store.logits_topk} largest logits per token (--logits topk:"
                       f"{store.logits_topk}); z_loss comes from the stored log-sum-exp"
                       + (", margin from the top two stored logits" if store.logits_topk >= 2 else
                          "; margin (top-1 minus top-2 logit) needs K >= 2 and is empty"))
    return {
        "moetrace_analysis_version": ANALYSIS_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "store": os.path.abspath(getattr(store, "path", "")),
        "model": model.get("id"),
        "num_experts": e,
        "routing": {"family": store.family, "top_k": store.top_k, "dropped": store.has_dropped},
        "logits_topk": store.logits_topk,
        "notices": notices,
        "num_samples": len(store) - skipped,
        "real_only": real_only, "skipped_synthetic_samples": skipped,
        "demo_model": bool(model.get("demo")),
        "num_tokens": done_tokens,
        "num_decoder_tokens": done_dec,
        "datasets": {d: {"samples": ds_samples[d], "tokens": enc.ds_tokens.get(d, 0)} for d in sorted(ds_samples)},
        "router_aux_loss_coef": cfg.get("router_aux_loss_coef"),
        "router_z_loss_coef": cfg.get("router_z_loss_coef"),
        "seed": seed,
        "elapsed_s": elapsed,
        "tokens_per_s": (done_tokens + done_dec) / elapsed if elapsed > 0 else None,
        "encoder": enc.result(),
        "decoder": dec.result() if dec is not None else None,
        "examples": ex_out,
        "token_text": ({"tokenizer": tok.path} if tok else {"tokenizer": None, "note": tok.reason}) if tok is not None
        else None,
    }


# The report (report.html, charts) lives in analysis_report.py, the command line in cli/analyze.py
# (re-exported last: the command line imports this module when it runs).
from .analysis_report import TRANSITION_MIN_ROW, make_plots, render_html, write_report  # noqa: E402
from .cli.analyze import build_parser, main  # noqa: E402

if __name__ == "__main__":  # python -m moetrace.analysis, as before the split
    import sys
    sys.exit(main())
