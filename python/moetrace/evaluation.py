"""How `moetrace speculate` scores predictors: the train/test split (by sample, never by token),
ranks of the true expert, recall@k with sample-clustered 95% confidence intervals, and the summary
over target layers. Pure functions and accumulators over numpy arrays; no store, no predictors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

KS = (1, 2, 4, 8, 16)
Z95 = 1.959963984540054

# --------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------


def hash_unit(sample_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, sample id): the split never depends on order."""
    h = hashlib.blake2b(f"{seed}\x00{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


@dataclass
class Split:
    """Which samples train and which test. test_datasets / train_datasets: split by dataset instead."""
    seed: int = 0
    test_fraction: float = 0.2
    test_datasets: tuple = ()
    train_datasets: tuple = ()

    def assign(self, sample_ids: list[str], datasets: list[str]) -> np.ndarray:
        """int8 per sample: 0 train, 1 test, -1 neither (a dataset in no list)."""
        out = np.empty(len(sample_ids), np.int8)
        for k, (sid, ds) in enumerate(zip(sample_ids, datasets)):
            if self.test_datasets:
                if ds in self.test_datasets:
                    out[k] = 1
                elif not self.train_datasets or ds in self.train_datasets:
                    out[k] = 0
                else:
                    out[k] = -1
            else:
                out[k] = 1 if hash_unit(sid, self.seed) < self.test_fraction else 0
        return out

    def describe(self) -> dict:
        if self.test_datasets:
            return {"by": "dataset", "test_datasets": list(self.test_datasets),
                    "train_datasets": list(self.train_datasets) or "all others"}
        return {"by": "sample", "seed": self.seed, "test_fraction": self.test_fraction,
                "hash": "blake2b-64 of '<seed>\\0<sample_id>' / 2^64 < test_fraction -> test"}


# --------------------------------------------------------------------------------------------------
# Ranking
# --------------------------------------------------------------------------------------------------


def true_ranks(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """0-based rank of the true expert y [n] among scores [n, E] -> [n]; or of each of a token's k
    true experts y [n, k] -> [n, k] (top-k routing). Ties go to the lower expert index."""
    if y.ndim == 2:
        s = np.take_along_axis(scores, y, axis=1)[:, :, None]  # [n, k, 1]
        idx = np.arange(scores.shape[1])
        sc = scores[:, None, :]
        return ((sc > s) | ((sc == s) & (idx < y[:, :, None]))).sum(axis=2)
    s = scores[np.arange(y.size), y][:, None]
    idx = np.arange(scores.shape[1])
    return ((scores > s) | ((scores == s) & (idx < y[:, None]))).sum(axis=1)


def topk_experts(scores: np.ndarray, k: int) -> np.ndarray:
    """[n, k] experts in rank order (ties to the lower index), consistent with true_ranks."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


# --------------------------------------------------------------------------------------------------
# Metrics with sample-clustered confidence intervals
# --------------------------------------------------------------------------------------------------


class RecallCell:
    """recall@k of one (predictor, lookahead, target layer, dataset). Tokens of a sample are
    correlated, so the 95% interval uses the cluster (ratio-estimator) variance over samples."""

    def __init__(self, num_experts: int, ks=KS, choices: int = 1):
        """choices: the true experts per token (the store's top_k): add() then takes the ranks of all of
        them, and recall@k is the share of a token's true experts among the predictor's k best."""
        self.ks = tuple(ks)
        self.choices = int(choices)
        self.rank_hist = np.zeros(num_experts, np.int64)
        self.samples = 0
        self.sums = np.zeros((len(self.ks), 4))  # per k: sum h, sum h^2, sum h*n, (sum n^2 shared)
        self.n2 = 0.0

    def add(self, ranks: np.ndarray, inv: np.ndarray, nsamp: int) -> None:
        """ranks [n] of the true expert; inv [n] the token's sample as an index in [0, nsamp)."""
        if ranks.size == 0:
            return
        self.rank_hist += np.bincount(ranks, minlength=self.rank_hist.size)
        nk = len(self.ks)
        # b = how many of ks are <= rank: the token is a hit for ks[i] exactly when i >= b
        b = np.searchsorted(np.asarray(self.ks), ranks, side="right")
        per = np.bincount(inv * (nk + 1) + b, minlength=nsamp * (nk + 1)).reshape(nsamp, nk + 1)
        n_s = per.sum(axis=1)
        keep = n_s > 0
        per, n_s = per[keep].astype(np.float64), n_s[keep].astype(np.float64)
        hits = np.cumsum(per, axis=1)[:, :nk]  # [samples, k]
        self.samples += int(n_s.size)
        self.n2 += float((n_s * n_s).sum())
        self.sums[:, 0] += hits.sum(axis=0)
        self.sums[:, 1] += (hits * hits).sum(axis=0)
        self.sums[:, 2] += (hits * n_s[:, None]).sum(axis=0)

    def result(self) -> dict:
        n = int(self.rank_hist.sum())
        cum = np.cumsum(self.rank_hist)
        rec, ci = {}, {}
        for i, k in enumerate(self.ks):
            p = float(cum[min(k, cum.size) - 1] / n) if n else 0.0
            rec[str(k)] = p
            s = self.samples
            if s >= 2 and n:
                sh, shh, shn, _ = self.sums[i]
                var = s / (s - 1) * max(0.0, shh - 2 * p * shn + p * p * self.n2) / (n * n)
                half = Z95 * np.sqrt(var)
                ci[str(k)] = [max(0.0, p - half), min(1.0, p + half)]
            else:
                ci[str(k)] = None
        return {"tokens": n // self.choices, "samples": self.samples, "top1": rec["1"] if "1" in rec else None,
                "recall": rec,
                "ci95": ci}


def summarize(results: list[dict]) -> list[dict]:
    """Per (predictor, lookahead): token-weighted recall@k over its target layers, all datasets, and
    `ci95`: the token-weighted mean of the target layers' 95% bounds (the layers' tokens are the same
    samples, so their errors are correlated; averaging the bounds, rather than pooling as if they
    were independent, keeps the band from looking narrower than it is)."""
    rows = {}
    for r in results:
        if r["dataset"] != "all":
            continue
        k = (r["predictor"], r["lookahead"])
        row = rows.setdefault(k, {"predictor": r["predictor"], "lookahead": r["lookahead"], "targets": [],
                                  "tokens": 0, "_w": {kk: 0.0 for kk in r["recall"]},
                                  "_lo": {kk: 0.0 for kk in r["recall"]}, "_hi": {kk: 0.0 for kk in r["recall"]},
                                  "_ci_ok": {kk: True for kk in r["recall"]}})
        row["targets"].append(r["target"])
        row["tokens"] += r["tokens"]
        for kk, v in r["recall"].items():
            row["_w"][kk] += v * r["tokens"]
            ci = (r.get("ci95") or {}).get(kk)
            if ci is None:
                row["_ci_ok"][kk] = False
            else:
                row["_lo"][kk] += ci[0] * r["tokens"]
                row["_hi"][kk] += ci[1] * r["tokens"]
    out = []
    for row in rows.values():
        w, lo, hi, ok = row.pop("_w"), row.pop("_lo"), row.pop("_hi"), row.pop("_ci_ok")
        n = row["tokens"]
        row["recall"] = {kk: v / n if n else 0.0 for kk, v in w.items()}
        row["ci95"] = {kk: [lo[kk] / n, hi[kk] / n] if n and ok[kk] else None for kk in w}
        row["top1"] = row["recall"]["1"]
        out.append(row)
    out.sort(key=lambda r: (-r["top1"], r["lookahead"], r["predictor"]))
    for i, row in enumerate(out):
        row["rank"] = i + 1
    return out
