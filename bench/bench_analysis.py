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


class Phase:
    """Wall and CPU seconds of a block: on a shared machine CPU time shows the code's own cost."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


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
    rows = []  # (phase, wall s, cpu s, tokens)
    load_before = os.getloadavg()[0]
    try:
        with Phase() as p:
            info = synthetic_store(store_path, args.tokens, args.experts, args.layers, args.seed)
        rows.append(("build synthetic store", p.wall, p.cpu, info["tokens"]))
        store = open_store(store_path)
        with Phase() as p:
            stats = analysis.analyze_store(store)
        rows.append(("analyze: statistics (stats.json)", p.wall, p.cpu, info["tokens"]))
        with Phase() as p:
            analysis.write_report(stats, os.path.join(tmp, "analysis"))
        rows.append(("analyze: report (PNG charts + HTML)", p.wall, p.cpu, None))
        opt = speculate.Options(split=speculate.Split(seed=0, test_fraction=0.2), simulate=False)
        with Phase() as p:
            res = speculate.speculate_store(store, opt)
        enc = res["encoder"]
        rows.append(("speculate: fit all predictors (train split)", enc["fit_s"], None, enc["train"]["tokens"]))
        rows.append(("speculate: evaluate all predictors (test split)", enc["eval_s"], None, enc["test"]["tokens"]))
        rows.append(("speculate: predictors total (incl. learned training)", p.wall, p.cpu, info["tokens"]))
        opt = speculate.Options(split=speculate.Split(seed=0, test_fraction=0.2), predictors=("frequency", "transition"))
        with Phase() as p:
            res2 = speculate.speculate_store(store, opt)
        c = res2["encoder"]["cache"]
        rows.append((f"speculate: cache simulation ({len(c['runs'])} runs, prefill)", c["elapsed_s"], None, c["tokens"]))
        with Phase() as p:
            speculate.write_outputs(res, os.path.join(tmp, "speculation"))
        rows.append(("speculate: summary + plots", p.wall, p.cpu, None))
        summary = [{"predictor": r["predictor"], "lookahead": r["lookahead"], "top1": r["top1"]} for r in enc["summary"]]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()[0]
    print(f"\nmoetrace analyze/speculate benchmark: {info['tokens']} tokens, {info['samples']} samples, "
          f"{args.experts} experts, {args.layers} MoE layers\n{machine()}; load average {load_before:.1f} -> "
          f"{load_after:.1f}\n")
    print(f"{'phase':<56} {'wall s':>8} {'cpu s':>8} {'tokens/s (wall)':>16}")
    for name, sec, cpu, tok in rows:
        print(f"{name:<56} {sec:>8.2f} {(f'{cpu:.2f}' if cpu is not None else '–'):>8} "
              f"{(f'{tok / sec:,.0f}' if tok and sec > 0 else '–'):>16}")
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "load_average": [load_before, load_after],
           "tokens": info["tokens"], "samples": info["samples"], "experts": args.experts, "layers": args.layers,
           "phases": [{"phase": n, "seconds": s, "cpu_seconds": c, "tokens": t,
                       "tokens_per_s": (t / s if t and s > 0 else None)} for n, s, c, t in rows],
           "predictor_top1": summary}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
