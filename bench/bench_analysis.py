"""Throughput of `moetrace analyze` and `moetrace speculate` on a synthetic trace store.

    .venv/bin/python bench/bench_analysis.py [--tokens 1000000] [--experts 8] [--out bench_analysis.json]
        [--keep DIR | --store DIR] [--libraries]

Builds a store of about --tokens encoder tokens (switch-base-like: 6 MoE layers, F16 logits, three
datasets, 512 samples per shard) whose routing has structure (token-id preferences and layer-to-layer
transitions) so that every predictor has something to find, then times each phase. Prints a table and
writes JSON with the date and machine. Numbers go to docs/PERFORMANCE.md; no test asserts on them.
--store reuses a store built before with --keep (so that two versions of the code time the same bytes).

--libraries also times the scipy / scikit-learn functions that do what moetrace.stats and the learned
predictor do (entropy, skewness, kurtosis, Jensen-Shannon, top-k accuracy, logistic regression) on this
store's numbers, import cost included, and says whether their results are the same bits: the measurement
behind the choice documented in docs/ANALYSIS.md ("Library equivalents").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
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


def _import_cpu(module: str) -> float:
    """CPU seconds a fresh interpreter spends importing `module` after numpy."""
    code = ("import time, numpy; t = time.process_time(); import " + module + "; print(time.process_time() - t)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _timed(fn, items) -> tuple[list, float]:
    t = time.process_time()
    out = [fn(x) for x in items]
    return out, time.process_time() - t


def compare_libraries(store, stats: dict) -> list[dict]:
    """moetrace's own code vs the library function that does the same job, on this store's numbers."""
    from moetrace import stats as ms
    try:
        import scipy.stats as ss
        from scipy.spatial.distance import jensenshannon
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import top_k_accuracy_score
    except ImportError as e:
        print(f"--libraries: {e.name} is not installed; skipped", file=sys.stderr)
        return []
    enc = stats["encoder"]
    vecs = [np.asarray(pl["expert_counts"], np.float64) for pl in enc["per_layer"].values()]
    vecs += [np.asarray(d["expert_counts"], np.float64) for pl in enc["per_layer"].values()
             for d in pl["per_dataset"].values()]
    vecs = [v for v in vecs if v.std() > 0]
    pairs = [(a, b) for a in vecs for b in vecs]

    def skew_ours(c):
        return ms.usage_stats(c)["skewness"]

    def kurt_ours(c):
        return ms.usage_stats(c)["kurtosis"]

    cases = [("entropy (bits)", "scipy.stats", vecs, ms.entropy_bits, lambda c: float(ss.entropy(c, base=2))),
             ("skewness (whole usage_stats)", "scipy.stats", vecs, skew_ours,
              lambda c: float(ss.skew(c, bias=True))),
             ("kurtosis (whole usage_stats)", "scipy.stats", vecs, kurt_ours,
              lambda c: float(ss.kurtosis(c, fisher=True, bias=True))),
             ("Jensen-Shannon divergence", "scipy.spatial.distance", pairs, lambda ab: ms.jsd_bits(*ab),
              lambda ab: float(jensenshannon(*ab, base=2) ** 2))]
    out = []
    for name, module, items, ours, theirs in cases:
        a, ta = _timed(ours, items)
        b, tb = _timed(theirs, items)
        out.append({"job": name, "library": module, "calls": len(items), "ours_cpu_s": ta, "library_cpu_s": tb,
                    "library_import_cpu_s": _import_cpu(module), "same_bits": sum(x == y for x, y in zip(a, b)),
                    "max_abs_diff": max(abs(x - y) for x, y in zip(a, b))})
    # recall@k of speculate (one rank histogram for every k, ties to the lower expert) vs top_k_accuracy_score
    rng = np.random.default_rng(0)
    e = store.num_experts
    n = 200_000
    scores = rng.integers(0, 50, (n, e)).astype(np.float64)  # integer counts, as the table predictors give: ties
    y = rng.integers(0, e, n)
    from moetrace.evaluation import true_ranks
    t = time.process_time()
    hist = np.bincount(true_ranks(scores, y), minlength=e)
    ours = {k: float(np.cumsum(hist)[k - 1] / n) for k in (1, 2, 4) if k < e}
    ta = time.process_time() - t
    t = time.process_time()
    theirs = {k: float(top_k_accuracy_score(y, scores, k=k, labels=np.arange(e))) for k in ours}
    tb = time.process_time() - t
    out.append({"job": f"recall@k, k in {list(ours)}, {n} tokens with tied scores", "library": "sklearn.metrics",
                "calls": len(ours), "ours_cpu_s": ta, "library_cpu_s": tb,
                "library_import_cpu_s": _import_cpu("sklearn.metrics"),
                "same_bits": sum(ours[k] == theirs[k] for k in ours),
                "max_abs_diff": max(abs(ours[k] - theirs[k]) for k in ours)})
    out.append(_compare_logistic(store, LogisticRegression))
    print(f"\n{'job':<44} {'library':<24} {'ours cpu s':>10} {'lib cpu s':>10} {'lib import':>10} {'same bits':>10}")
    for r in out:
        same = "–" if r["same_bits"] is None else f"{r['same_bits']}/{r['calls']}"
        print(f"{r['job'][:44]:<44} {r['library']:<24} {r['ours_cpu_s']:>10.3f} {r['library_cpu_s']:>10.3f} "
              f"{r['library_import_cpu_s']:>10.2f} {same:>10}")
    return out


def _compare_logistic(store, LogisticRegression) -> dict:
    """The learned predictor's Adam loop vs LogisticRegression(lbfgs) on the very same sampled tokens
    and features, evaluated on the same test split (top-1)."""
    from moetrace import speculate
    from moetrace.predictors import Learned
    captured: dict = {}
    finish = Learned.finish

    def capture(self, freq):
        captured["parts"] = {t: [tuple(x for x in p) for p in parts] for t, parts in self.data.items()}
        t = time.process_time()
        finish(self, freq)
        captured["cpu"], captured["self"] = time.process_time() - t, self

    Learned.finish = capture
    try:
        opt = speculate.Options(split=speculate.Split(seed=0, test_fraction=0.2), simulate=False,
                                predictors=("frequency", "learned"))
        res = speculate.speculate_store(store, opt)
    finally:
        Learned.finish = finish
    learned = captured["self"]
    e = learned.e
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency
    limits = threadpool_limits(limits=1)  # BLAS threads spin on a busy 2-core machine: give it its best case
    t = time.process_time()
    models = {}
    for target, parts in captured["parts"].items():
        prev = np.concatenate([p[1] for p in parts])
        y = np.concatenate([p[2] for p in parts])
        x = np.zeros((y.size, 2 * (e + 1)), np.float32)
        x[np.arange(y.size), prev[:, 0]] = 1.0
        x[np.arange(y.size), e + 1 + prev[:, 1]] = 1.0
        models[target] = LogisticRegression(max_iter=300).fit(x, y)
    fit_s = time.process_time() - t
    limits.restore_original_limits()
    hits = total = 0
    for shard in store.iter_shards():  # the test split's tokens, scored by the library's models
        role = opt.split.assign(shard.metadata["sample_ids"], shard.metadata["datasets"])
        spec = speculate.StackSpec("encoder", store.layers[:len(store.encoder_layers)], "sample_offsets", "token_ids")
        for c in speculate.stack_chunks(shard, spec, role, 1, {d: 0 for d in shard.metadata["datasets"]}, False):
            for target, m in models.items():
                prev = np.stack([c.experts[:, target - 1],
                                 c.experts[:, target - 2] if target >= 2 else np.full(len(c.experts), e)], axis=1)
                x = np.zeros((prev.shape[0], 2 * (e + 1)), np.float32)
                x[np.arange(prev.shape[0]), prev[:, 0]] = 1.0
                x[np.arange(prev.shape[0]), e + 1 + prev[:, 1]] = 1.0
                hits += int((m.predict(x) == c.experts[:, target]).sum())
                total += prev.shape[0]
    ours = next(r["top1"] for r in res["encoder"]["summary"] if r["predictor"] == "learned")
    return {"job": "learned predictor fit (1 BLAS thread)", "library": "sklearn.linear_model",
            "calls": len(models), "ours_cpu_s": captured["cpu"], "library_cpu_s": fit_s,
            "library_import_cpu_s": _import_cpu("sklearn.linear_model"), "same_bits": None,
            "max_abs_diff": abs(ours - hits / max(1, total)), "top1_ours": ours, "top1_library": hits / max(1, total)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_analysis.json")
    ap.add_argument("--keep", help="build the store here and keep it (default: a temporary directory)")
    ap.add_argument("--store", help="time this existing store (from an earlier --keep) instead of building one")
    ap.add_argument("--libraries", action="store_true", help="also compare with scipy / scikit-learn equivalents")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="moetrace-bench-")
    store_path = args.keep or os.path.join(tmp, "store")
    rows = []  # (phase, wall s, cpu s, tokens)
    load_before = os.getloadavg()[0]
    try:
        if args.store:
            store = open_store(args.store)
            info = {"samples": len(store), "tokens": int(store.manifest["num_tokens"])}
            args.experts, args.layers = store.num_experts, len(store.encoder_layers)
        else:
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
        if enc.get("learned"):
            rows.append(("speculate: learned predictor training (in the fit)", enc["learned"]["train_s"], None, None))
        libraries = compare_libraries(store, stats) if args.libraries else None
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
           "predictor_top1": summary, "libraries": libraries}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
