"""Throughput of `moetrace analyze` and `moetrace speculate` on a synthetic trace store.

    .venv/bin/python bench/bench_analysis.py [--tokens 1000000] [--experts 8] [--out bench_analysis.json]

Builds a store of about --tokens encoder tokens (switch-base-like: 6 MoE layers, F16 logits, three
datasets, 512 samples per shard) whose routing has structure (token-id preferences and layer-to-layer
transitions) so that every predictor has something to find, then times each phase. Prints a table and
writes JSON with the date and machine. Numbers go to docs/PERFORMANCE.md; no test asserts on them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "python"), os.path.join(ROOT, "tests", "python")]

from analysis_testutil import make_store  # noqa: E402
from moetrace import analysis, open_store, speculate  # noqa: E402


def synthetic_store(path: str, tokens: int, num_experts: int, layers: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(rng.integers(16, 240)))
    lengths[-1] -= sum(lengths) - tokens
    lengths = [x for x in lengths if x > 0]
    n = len(lengths)
    t = int(sum(lengths))
    vocab = 32128
    tok = np.minimum(rng.zipf(1.3, size=t), vocab - 1).astype(np.int32)
    pref = rng.integers(0, num_experts, size=(layers, vocab))
    experts, prev = {}, None
    for li in range(layers):
        trans = rng.permutation(num_experts)
        choice = rng.random(t)
        e = rng.integers(0, num_experts, size=t)
        e = np.where(choice < 0.45, pref[li, tok], e)
        if prev is not None:
            e = np.where((choice >= 0.45) & (choice < 0.75), trans[prev], e)
        experts[f"enc.{2 * li + 1}"] = e.astype(np.int32)
        prev = e
    datasets = [("glue/mrpc", "glue/sst2", "squad")[k % 3] for k in range(n)]
    make_store(path, lengths=lengths, experts=experts, num_experts=num_experts, token_ids=tok, datasets=datasets,
               samples_per_shard=512, d_model=768, logits_dtype=np.float16, seed=seed)
    return {"samples": n, "tokens": t}


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, numpy {np.__version__}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_analysis.json")
    ap.add_argument("--keep", help="build the store here and keep it (default: a temporary directory)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="moetrace-bench-")
    store_path = args.keep or os.path.join(tmp, "store")
    rows = []
    try:
        t0 = time.perf_counter()
        info = synthetic_store(store_path, args.tokens, args.experts, args.layers, args.seed)
        rows.append(("build synthetic store", time.perf_counter() - t0, info["tokens"]))
        store = open_store(store_path)

        t0 = time.perf_counter()
        stats = analysis.analyze_store(store)
        rows.append(("analyze: statistics (stats.json)", time.perf_counter() - t0, info["tokens"]))
        t0 = time.perf_counter()
        analysis.write_report(stats, os.path.join(tmp, "analysis"))
        rows.append(("analyze: report (PNG charts + HTML)", time.perf_counter() - t0, None))

        opt = speculate.Options(split=speculate.Split(seed=0, test_fraction=0.2), simulate=False)
        t0 = time.perf_counter()
        res = speculate.speculate_store(store, opt)
        enc = res["encoder"]
        rows.append(("speculate: fit all predictors (train split)", enc["fit_s"], enc["train"]["tokens"]))
        rows.append(("speculate: evaluate all predictors (test split)", enc["eval_s"], enc["test"]["tokens"]))
        rows.append(("speculate: predictors total", time.perf_counter() - t0, info["tokens"]))
        opt = speculate.Options(split=speculate.Split(seed=0, test_fraction=0.2), predictors=("frequency", "transition"))
        t0 = time.perf_counter()
        res2 = speculate.speculate_store(store, opt)
        c = res2["encoder"]["cache"]
        rows.append((f"speculate: cache simulation ({len(c['runs'])} runs, prefill)", c["elapsed_s"], c["tokens"]))
        t0 = time.perf_counter()
        speculate.write_outputs(res, os.path.join(tmp, "speculation"))
        rows.append(("speculate: summary + plots", time.perf_counter() - t0, None))
        summary = [{"predictor": r["predictor"], "lookahead": r["lookahead"], "top1": r["top1"]} for r in enc["summary"]]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nmoetrace analyze/speculate benchmark: {info['tokens']} tokens, {info['samples']} samples, "
          f"{args.experts} experts, {args.layers} MoE layers\n{machine()}\n")
    print(f"{'phase':<52} {'seconds':>9} {'tokens/s':>12}")
    for name, sec, tok in rows:
        print(f"{name:<52} {sec:>9.2f} {(f'{tok / sec:,.0f}' if tok and sec > 0 else '–'):>12}")
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "tokens": info["tokens"], "samples": info["samples"], "experts": args.experts, "layers": args.layers,
           "phases": [{"phase": n, "seconds": s, "tokens": t, "tokens_per_s": (t / s if t and s > 0 else None)}
                      for n, s, t in rows], "predictor_top1": summary}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
