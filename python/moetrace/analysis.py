"""`moetrace analyze STORE [-o DIR]`: expert-usage, load-balance, router-confidence, layer-to-layer,
token-level and dataset analysis of a trace store, written as stats.json and report.html (+ PNGs).

Layout: pure functions over numpy arrays first (each statistic, each testable on hand-made input),
then streaming accumulators fed one shard (and one row chunk) at a time so memory stays bounded,
then the thin store-reading loop, the report and the command line. Keys of stats.json are
documented in docs/ANALYSIS.md.
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import os
import sys
import time

import numpy as np

ANALYSIS_VERSION = 1
GATE_BINS = np.linspace(0.0, 1.0, 51)      # top-1 router probability
MARGIN_BINS = np.linspace(0.0, 12.0, 61)   # top-1 minus top-2 logit; the last bin takes the overflow
TOPK = (1, 2, 4, 8, 16)
CHUNK_ROWS = 1 << 18                        # token rows per chunk when logits are read

# --------------------------------------------------------------------------------------------------
# Statistics of one vector or matrix (pure functions)
# --------------------------------------------------------------------------------------------------


def entropy_bits(counts) -> float:
    """Shannon entropy (bits) of the distribution proportional to `counts` (zeros ignored)."""
    c = np.asarray(counts, np.float64).ravel()
    total = c.sum()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * np.log2(p)).sum())


def gini(counts) -> float:
    """Gini coefficient of the load: 0 when every expert gets the same, (E-1)/E when one gets all."""
    x = np.sort(np.asarray(counts, np.float64).ravel())
    n, total = x.size, x.sum()
    if n == 0 or total <= 0:
        return 0.0
    k = np.arange(1, n + 1)
    return float((2.0 * (k * x).sum() / (n * total)) - (n + 1.0) / n)


def jsd_bits(p, q) -> float:
    """Jensen-Shannon divergence (bits, in [0, 1]) of two count or probability vectors."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)

    def kl(a):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / m[nz])).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def usage_stats(counts) -> dict:
    """The seed's per-layer statistics of a top-1 count vector (key names kept), plus load balance.

    Moments are over the E per-expert counts: std is the population std (ddof 0), skewness and
    kurtosis are the biased Fisher ones (kurtosis of a normal = 0); both are 0 when all counts are
    equal. Quartiles use linear interpolation (numpy's default)."""
    c = np.asarray(counts, np.float64).ravel()
    e = c.size
    mean = float(c.mean()) if e else 0.0
    std = float(c.std()) if e else 0.0
    d = c - mean
    m2 = float((d ** 2).mean()) if e else 0.0
    skew = float((d ** 3).mean() / m2 ** 1.5) if m2 > 0 else 0.0
    kurt = float((d ** 4).mean() / m2 ** 2 - 3.0) if m2 > 0 else 0.0
    q25, med, q75 = (float(v) for v in np.percentile(c, [25, 50, 75])) if e else (0.0, 0.0, 0.0)
    active = int(np.count_nonzero(c))
    total = float(c.sum())
    return {
        "mean": mean, "std": std, "cv": std / mean if mean > 0 else 0.0,
        "entropy_bits": entropy_bits(c),
        "normalized_entropy": entropy_bits(c) / np.log2(e) if e > 1 else 0.0,
        "min": float(c.min()) if e else 0.0, "max": float(c.max()) if e else 0.0,
        "skewness": skew, "kurtosis": kurt,
        "median": med, "q25": q25, "q75": q75, "iqr": q75 - q25,
        "active_experts": active, "expert_diversity": active / e if e else 0.0,
        "total_usage": int(total), "zero_usage_experts": e - active,
        "unused_expert_ids": [int(i) for i in np.flatnonzero(c == 0)],
        "max_mean_load": float(c.max() / mean) if mean > 0 else 0.0,
        "gini": gini(c),
    }


def joint_stats(joint) -> dict:
    """Entropies and mutual information (bits) of a joint count matrix C[a, b] (rows: condition)."""
    c = np.asarray(joint, np.float64)
    h_a = entropy_bits(c.sum(axis=1))
    h_b = entropy_bits(c.sum(axis=0))
    h_ab = entropy_bits(c)
    mi = max(0.0, h_a + h_b - h_ab)
    return {"h_from_bits": h_a, "h_to_bits": h_b, "conditional_entropy_bits": h_ab - h_a,
            "mutual_information_bits": mi, "normalized_mi": mi / h_b if h_b > 0 else 0.0}


def table_topk_accuracy(joint, ks=TOPK) -> dict:
    """Share of pairs whose `b` is among the k most frequent b of their row: the accuracy a lookup
    table built on these very counts reaches (in-sample, an upper bound for that predictor)."""
    c = np.asarray(joint, np.float64)
    total = c.sum()
    srt = -np.sort(-c, axis=1)
    cum = np.cumsum(srt, axis=1)
    out = {}
    for k in ks:
        kk = min(k, c.shape[1])
        out[str(k)] = float(cum[:, kk - 1].sum() / total) if total > 0 else 0.0
    return out


def transition_probs(joint) -> np.ndarray:
    """Row-normalised P(b | a); rows without counts stay 0."""
    c = np.asarray(joint, np.float64)
    r = c.sum(axis=1, keepdims=True)
    return np.divide(c, r, out=np.zeros_like(c), where=r > 0)


def hist_summary(counts, edges, total_sum: float, total_sq: float, vmin: float, vmax: float) -> dict:
    """Mean/std exact (from sums), percentiles from the fixed-bin histogram (bin resolution)."""
    h = np.asarray(counts, np.float64)
    n = h.sum()
    if n <= 0:
        return {"count": 0}
    mean = total_sum / n
    var = max(0.0, total_sq / n - mean * mean)
    cdf = np.cumsum(h) / n
    e = np.asarray(edges, np.float64)

    def q(p):
        i = int(np.searchsorted(cdf, p))
        i = min(i, len(h) - 1)
        lo = cdf[i - 1] if i > 0 else 0.0
        frac = (p - lo) / (cdf[i] - lo) if cdf[i] > lo else 0.5
        return float(e[i] + frac * (e[i + 1] - e[i]))

    return {"count": int(n), "mean": float(mean), "std": float(np.sqrt(var)), "min": float(vmin),
            "max": float(vmax), "p10": q(0.10), "p50": q(0.50), "p90": q(0.90),
            "hist": {"edges": [float(x) for x in e], "counts": [int(x) for x in h]}}


# --------------------------------------------------------------------------------------------------
# Streaming accumulators
# --------------------------------------------------------------------------------------------------


class SparseCounts:
    """Counts of int64 keys, merged chunk by chunk (np.unique per chunk, then one merge)."""

    def __init__(self):
        self._parts_k: list[np.ndarray] = []
        self._parts_c: list[np.ndarray] = []
        self._pending = 0
        self.keys = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)

    def add(self, keys: np.ndarray, weights: np.ndarray | None = None) -> None:
        if keys.size == 0:
            return
        k, inv = np.unique(keys.astype(np.int64, copy=False), return_inverse=True)
        c = np.bincount(inv.ravel(), weights=weights, minlength=k.size)
        self._parts_k.append(k)
        self._parts_c.append(c.astype(np.int64) if weights is None else c)
        self._pending += k.size
        if self._pending > 4 * max(1 << 16, self.keys.size):
            self._merge()

    def _merge(self) -> None:
        if not self._parts_k:
            return
        k = np.concatenate([self.keys] + self._parts_k)
        c = np.concatenate([self.counts] + self._parts_c)
        uk, inv = np.unique(k, return_inverse=True)
        self.keys = uk
        self.counts = np.bincount(inv.ravel(), weights=c, minlength=uk.size).astype(c.dtype)
        self._parts_k, self._parts_c, self._pending = [], [], 0

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
        return self.keys, self.counts


def token_expert_stats(keys: np.ndarray, counts: np.ndarray, num_experts: int, min_count: int = 10) -> dict:
    """From counts of (token * E + expert): how consistently a token id routes to one expert.

    consistency = sum over token ids of its most frequent expert's count / all tokens (the in-sample
    accuracy of a token-id -> expert table); mi_bits = I(token id; expert); explained_fraction =
    mi / H(expert), the share of the routing's uncertainty that the token id alone removes."""
    if keys.size == 0:
        return {"unique_tokens": 0, "consistency": 0.0, "consistency_min_count": 0.0, "min_count": min_count,
                "mi_bits": 0.0, "explained_fraction": 0.0}
    tok = keys // num_experts
    ex = keys % num_experts
    c = counts.astype(np.float64)
    ut, tinv = np.unique(tok, return_inverse=True)
    n_t = np.bincount(tinv, weights=c)
    max_t = np.zeros(ut.size)
    np.maximum.at(max_t, tinv, c)
    total = c.sum()
    h_e = entropy_bits(np.bincount(ex, weights=c, minlength=num_experts))
    h_e_given_t = float(-(c / total * np.log2(c / n_t[tinv])).sum())
    mi = max(0.0, h_e - h_e_given_t)
    frequent = n_t >= min_count
    return {
        "unique_tokens": int(ut.size),
        "consistency": float(max_t.sum() / total),
        "consistency_min_count": float(max_t[frequent].sum() / n_t[frequent].sum()) if frequent.any() else 0.0,
        "min_count": min_count,
        "tokens_with_min_count": float(n_t[frequent].sum() / total),
        "mi_bits": mi,
        "explained_fraction": mi / h_e if h_e > 0 else 0.0,
    }


class LayerAcc:
    """Everything accumulated for one (MoE layer, dataset). A layer's "all" is the merge of its
    datasets' accumulators, so every token is processed once."""

    def __init__(self, num_experts: int):
        e = num_experts
        self.e = e
        self.counts = np.zeros(e, np.int64)
        self.dropped = 0
        self.tokens = 0
        self.logit_tokens = 0
        self.prob_sum = np.zeros(e, np.float64)   # sum over tokens of softmax probabilities
        self.z_sum = 0.0                          # sum of logsumexp(logits)^2
        self.gate_hist = np.zeros(len(GATE_BINS) - 1, np.int64)
        self.gate_stats = [0.0, 0.0, np.inf, -np.inf]   # sum, sum of squares, min, max
        self.margin_hist = np.zeros(len(MARGIN_BINS) - 1, np.int64)
        self.margin_stats = [0.0, 0.0, np.inf, -np.inf]

    @staticmethod
    def merge(accs: list["LayerAcc"]) -> "LayerAcc":
        out = LayerAcc(accs[0].e)
        for a in accs:
            out.counts += a.counts
            out.dropped += a.dropped
            out.tokens += a.tokens
            out.logit_tokens += a.logit_tokens
            out.prob_sum += a.prob_sum
            out.z_sum += a.z_sum
            out.gate_hist += a.gate_hist
            out.margin_hist += a.margin_hist
            for mine, theirs in ((out.gate_stats, a.gate_stats), (out.margin_stats, a.margin_stats)):
                mine[0] += theirs[0]
                mine[1] += theirs[1]
                mine[2] = min(mine[2], theirs[2])
                mine[3] = max(mine[3], theirs[3])
        return out

    def summary(self) -> dict:
        out = usage_stats(self.counts)
        out["expert_counts"] = [int(x) for x in self.counts]
        out["tokens"] = self.tokens
        out["dropped"] = self.dropped
        out["drop_rate"] = self.dropped / self.tokens if self.tokens else 0.0
        if self.logit_tokens:
            f = self.counts / max(1, self.counts.sum())
            p = self.prob_sum / self.logit_tokens
            out["aux_loss"] = float(self.e * (f * p).sum())
            out["z_loss"] = self.z_sum / self.logit_tokens
            out["mean_router_prob"] = [float(x) for x in p]
        else:
            out["aux_loss"] = out["z_loss"] = None
        out["gate"] = hist_summary(self.gate_hist, GATE_BINS, *self.gate_stats)
        out["margin"] = hist_summary(self.margin_hist, MARGIN_BINS, *self.margin_stats)
        return out


def logit_features(logits: np.ndarray):
    """[T, E] float32 logits -> softmax probs [T, E], logsumexp [T], top1-top2 margin [T]."""
    mx = logits.max(axis=1, keepdims=True)
    z = np.exp(logits - mx)
    s = z.sum(axis=1, keepdims=True)
    z /= s
    lse = (mx + np.log(s))[:, 0]
    if logits.shape[1] >= 2:
        top2 = np.partition(logits, logits.shape[1] - 2, axis=1)[:, -2]
        margin = mx[:, 0] - top2
    else:
        margin = np.zeros(logits.shape[0], np.float32)
    return z, lse, margin


def grouped_hist(values: np.ndarray, g: np.ndarray, ng: int, edges: np.ndarray) -> tuple:
    """Per group: histogram counts [G, bins] (values outside the edges go to the end bins), sum,
    sum of squares, min and max."""
    v = values.astype(np.float64)
    nb = len(edges) - 1
    idx = np.clip(((v - edges[0]) * (nb / (edges[-1] - edges[0]))).astype(np.int64), 0, nb - 1)
    hist = np.bincount(g * nb + idx, minlength=ng * nb).reshape(ng, nb)
    sums = np.bincount(g, weights=v, minlength=ng)
    sq = np.bincount(g, weights=v * v, minlength=ng)
    if ng == 1:
        mins, maxs = np.array([v.min()]), np.array([v.max()])
    else:
        mins, maxs = np.full(ng, np.inf), np.full(ng, -np.inf)
        np.minimum.at(mins, g, v)
        np.maximum.at(maxs, g, v)
    return hist, sums, sq, mins, maxs


def rows_f32(arr: np.ndarray, a: int, b: int, dtype: str | None = None) -> np.ndarray:
    """Rows a:b of a stored tensor as float32 (BF16 arrives as uint16 bits)."""
    x = np.asarray(arr[a:b])
    if x.dtype == np.uint16:
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32, copy=False)


class TokenCounts:
    """Counts of (token id * E + expert): a dense bincount while the keys stay below 2^24, sparse
    (SparseCounts) beyond."""

    DENSE_MAX = 1 << 24

    def __init__(self):
        self.dense = np.zeros(0, np.int32)
        self.sparse: SparseCounts | None = None

    def add(self, keys: np.ndarray) -> None:
        if keys.size == 0:
            return
        if self.sparse is None:
            top = int(keys.max()) + 1
            if top <= self.DENSE_MAX:
                if top > self.dense.size:
                    grown = min(self.DENSE_MAX, max(top, 2 * self.dense.size))
                    self.dense = np.concatenate([self.dense, np.zeros(grown - self.dense.size, np.int32)])
                self.dense[:top] += np.bincount(keys, minlength=top).astype(np.int32)
                return
            self.sparse = SparseCounts()
            nz = np.flatnonzero(self.dense)
            self.sparse.add(nz, weights=self.dense[nz].astype(np.float64))
            self.dense = np.zeros(0, np.int32)
        self.sparse.add(keys)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if self.sparse is not None:
            return self.sparse.finish()
        nz = np.flatnonzero(self.dense)
        return nz.astype(np.int64), self.dense[nz]


class StackAnalysis:
    """Accumulates one stack (encoder or decoder) of MoE layers over shards."""

    def __init__(self, prefix: str, layers: list[str], num_experts: int, token_stats: bool = True):
        self.prefix = prefix
        self.layers = layers
        self.e = num_experts
        self.acc: dict[str, dict[str, LayerAcc]] = {name: {} for name in layers}  # layer -> dataset -> acc
        self.trans: list[dict[str, np.ndarray]] = [{} for _ in layers[1:]]  # per pair: dataset -> [E, E]
        self.token_counts = {name: TokenCounts() for name in layers} if token_stats else None
        self.ds_tokens: dict[str, int] = {}

    def _accs(self, layer: str, names: list[str]) -> list[LayerAcc]:
        d = self.acc[layer]
        return [d.setdefault(n, LayerAcc(self.e)) for n in names]

    def add_shard(self, shard, offsets: np.ndarray, datasets: list[str], token_ids: np.ndarray) -> None:
        """offsets: this stack's per-sample row offsets in the shard; token_ids: [rows] ids."""
        e = self.e
        lengths = np.diff(offsets)
        names = sorted(set(datasets))
        ng = len(names)
        ds_index = np.array([names.index(d) for d in datasets], np.int64)
        g_all = np.repeat(ds_index, lengths)  # [rows] dataset of each token
        for d, n in zip(names, np.bincount(g_all, minlength=ng)):
            self.ds_tokens[d] = self.ds_tokens.get(d, 0) + int(n)
        rows = int(offsets[-1])
        tok_keys = token_ids.astype(np.int64) * e
        prev = None
        for li, name in enumerate(self.layers):
            if not shard.has(f"{name}.expert"):
                prev = None
                continue
            accs = self._accs(name, names)
            expert = np.asarray(shard.tensor(f"{name}.expert"), np.int64)
            counts = np.bincount(g_all * e + expert, minlength=ng * e).reshape(ng, e)
            tokens = np.bincount(g_all, minlength=ng)
            dropped = (np.bincount(g_all, weights=np.asarray(shard.tensor(f"{name}.dropped"), np.float64),
                                   minlength=ng) if shard.has(f"{name}.dropped") else np.zeros(ng))
            for k, acc in enumerate(accs):
                acc.counts += counts[k]
                acc.tokens += int(tokens[k])
                acc.dropped += int(round(dropped[k]))
            if prev is not None:
                joint = np.bincount((g_all * e + prev) * e + expert, minlength=ng * e * e).reshape(ng, e, e)
                for k, d in enumerate(names):
                    tr = self.trans[li - 1]
                    tr[d] = tr[d] + joint[k] if d in tr else joint[k]
            prev = expert
            if self.token_counts is not None:
                self.token_counts[name].add(tok_keys + expert)
            if not shard.has(f"{name}.router_logits"):
                continue
            lg_all = shard.tensor(f"{name}.router_logits")
            gate_all = shard.tensor(f"{name}.gate") if shard.has(f"{name}.gate") else None
            for a in range(0, rows, CHUNK_ROWS):
                b = min(rows, a + CHUNK_ROWS)
                g = g_all[a:b]
                probs, lse, margin = logit_features(rows_f32(lg_all, a, b))
                gate = np.asarray(gate_all[a:b], np.float32) if gate_all is not None else probs.max(axis=1)
                if ng == 1:
                    psum = probs.sum(axis=0, dtype=np.float64)[None]
                else:  # a masked sum per dataset: faster than a one-hot GEMM, which BLAS runs badly
                    psum = np.stack([probs[g == k].sum(axis=0, dtype=np.float64) for k in range(ng)])
                zs = np.bincount(g, weights=lse.astype(np.float64) ** 2, minlength=ng)
                gh = grouped_hist(gate, g, ng, GATE_BINS)
                mh = grouped_hist(margin, g, ng, MARGIN_BINS)
                nt = np.bincount(g, minlength=ng)
                for k, acc in enumerate(accs):
                    if nt[k] == 0:
                        continue
                    acc.logit_tokens += int(nt[k])
                    acc.prob_sum += psum[k]
                    acc.z_sum += float(zs[k])
                    for (hist, sums, sq, mins, maxs), h, st in ((gh, acc.gate_hist, acc.gate_stats),
                                                                (mh, acc.margin_hist, acc.margin_stats)):
                        h += hist[k]
                        st[0] += float(sums[k])
                        st[1] += float(sq[k])
                        st[2] = min(st[2], float(mins[k]))
                        st[3] = max(st[3], float(maxs[k]))

    def result(self) -> dict:
        per_layer = {}
        overall_counts: dict[str, np.ndarray] = {}
        for name in self.layers:
            groups = self.acc[name]
            if not groups:
                continue
            groups = {"all": LayerAcc.merge(list(groups.values())), **groups}
            s = groups["all"].summary()
            s["per_dataset"] = {}
            for g, acc in sorted(groups.items()):
                if g == "all":
                    continue
                gs = acc.summary()
                for k in ("hist",):
                    gs["gate"].pop(k, None)
                    gs["margin"].pop(k, None)
                s["per_dataset"][g] = gs
            if self.token_counts is not None:
                keys, counts = self.token_counts[name].finish()
                s["token"] = token_expert_stats(keys, counts, self.e)
            per_layer[name] = s
            for g, acc in groups.items():
                overall_counts[g] = overall_counts.get(g, np.zeros(self.e, np.int64)) + acc.counts
        present = [n for n in self.layers if n in per_layer]
        transitions = []
        for li in range(1, len(self.layers)):
            a, b = self.layers[li - 1], self.layers[li]
            if a not in per_layer or b not in per_layer:
                continue
            by_ds = self.trans[li - 1]
            if not by_ds:
                continue
            j = sum(by_ds.values())
            t = {"from": a, "to": b, **joint_stats(j), "topk_accuracy": table_topk_accuracy(j),
                 "counts": j.tolist(),
                 "per_dataset": {d: {**joint_stats(m), "topk_accuracy": table_topk_accuracy(m)}
                                 for d, m in sorted(by_ds.items())}}
            transitions.append(t)
        datasets = sorted(self.ds_tokens)
        divergence = {"datasets": datasets, "per_layer": {}, "mean_over_layers": None, "overall": None}
        if len(datasets) > 1:
            for name in present:
                c = {d: self.acc[name][d].counts for d in datasets if d in self.acc[name]}
                divergence["per_layer"][name] = [[jsd_bits(c[x], c[y]) if x in c and y in c else None
                                                  for y in datasets] for x in datasets]
            if present:
                mats = np.array([[[v if v is not None else np.nan for v in row] for row in divergence["per_layer"][n]]
                                 for n in present])
                divergence["mean_over_layers"] = np.nanmean(mats, axis=0).tolist()
            divergence["overall"] = [[jsd_bits(overall_counts.get(x, 0), overall_counts.get(y, 0))
                                      for y in datasets] for x in datasets]
        overall = usage_stats(overall_counts.get("all", np.zeros(self.e)))
        overall["expert_counts"] = [int(x) for x in overall_counts.get("all", np.zeros(self.e, np.int64))]
        overall["per_dataset"] = {d: {**usage_stats(overall_counts[d]),
                                      "expert_counts": [int(x) for x in overall_counts[d]]}
                                  for d in datasets if d in overall_counts}
        return {"layers": present, "tokens": int(sum(self.ds_tokens.values())),
                "dataset_tokens": dict(sorted(self.ds_tokens.items())), "per_layer": per_layer,
                "overall": overall, "transitions": transitions, "dataset_divergence": divergence}


# --------------------------------------------------------------------------------------------------
# Reading a store
# --------------------------------------------------------------------------------------------------


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
          "layers": [n for n in enc_layers if shard.has(f"{n}.expert")]}
    ex["paths"] = np.stack([np.asarray(shard.tensor(f"{n}.expert")[a:b2]) for n in ex["layers"]], axis=1).tolist() \
        if ex["layers"] else []
    doff = shard.dec_sample_offsets
    if dec_layers and doff is not None:
        da, db = int(doff[k]), int(doff[k + 1])
        db2 = min(db, da + max_tokens)
        dl = [n for n in dec_layers if shard.has(f"{n}.expert")]
        ex["decoder"] = {"steps": int(db - da), "input_ids": [int(x) for x in shard.tensor("dec.input_ids")[da:db2]],
                         "layers": dl,
                         "paths": np.stack([np.asarray(shard.tensor(f"{n}.expert")[da:db2]) for n in dl],
                                           axis=1).tolist() if dl else []}
    return ex


def analyze_store(store, *, seed: int = 0, examples: int = 5, example_tokens: int = 24,
                  token_stats: bool = True, progress=None) -> dict:
    """Streams every shard once and returns the stats.json dictionary."""
    e = store.num_experts
    enc_layers = [f"enc.{i}" for i in store.encoder_layers]
    dec_layers = [f"dec.{i}" for i in store.decoder_layers]
    enc = StackAnalysis("enc", enc_layers, e, token_stats)
    dec = StackAnalysis("dec", dec_layers, e, token_stats) if dec_layers else None
    chosen = set(pick_examples(len(store), examples, seed))
    ex_out = []
    t0 = time.perf_counter()
    done_tokens = done_dec = 0
    n_shards = len(store.manifest.get("shards", []))
    ds_samples: dict[str, int] = {}
    for si, shard in enumerate(store.iter_shards()):
        if shard.num_samples == 0:
            continue
        md = shard.metadata
        for d in md["datasets"]:
            ds_samples[d] = ds_samples.get(d, 0) + 1
        off = shard.sample_offsets
        enc.add_shard(shard, off, md["datasets"], np.asarray(shard.tensor("token_ids")))
        done_tokens += int(off[-1])
        doff = shard.dec_sample_offsets
        if dec is not None and doff is not None:
            dec.add_shard(shard, doff, md["datasets"], np.asarray(shard.tensor("dec.input_ids")))
            done_dec += int(doff[-1])
        for k in range(shard.num_samples):
            if shard.first_sample + k in chosen:
                ex_out.append(_example(shard, k, enc_layers, dec_layers, example_tokens))
        if progress:
            dt = time.perf_counter() - t0
            progress(f"analyze: shard {si + 1}/{n_shards}, {done_tokens} tokens, "
                     f"{done_tokens / dt if dt > 0 else 0:.0f} tokens/s")
    elapsed = time.perf_counter() - t0
    m = store.manifest
    model = m.get("model", {}) or {}
    cfg = model.get("config", {}) or {}
    return {
        "moetrace_analysis_version": ANALYSIS_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "store": os.path.abspath(getattr(store, "path", "")),
        "model": model.get("id"),
        "num_experts": e,
        "num_samples": len(store),
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
    }


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _fmt(v, digits=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(headers: list[str], rows: list[list]) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def make_plots(stats: dict, out_dir: str, per_layer_charts: bool = False) -> dict[str, list[str]]:
    """Draws every chart of the report into out_dir; returns {section: [file names]}."""
    from . import plots

    files: dict[str, list[str]] = {}
    for stack_key, title in (("encoder", "encoder"), ("decoder", "decoder")):
        st = stats.get(stack_key)
        if not st or not st["layers"]:
            continue
        tag = "enc" if stack_key == "encoder" else "dec"
        names = st["layers"]
        pl = st["per_layer"]
        f = files.setdefault(stack_key, [])
        f.append(plots.usage_grid(os.path.join(out_dir, f"{tag}_usage_grid.png"), names,
                                  [pl[n]["expert_counts"] for n in names], f"{title}: top-1 expert usage per layer"))
        if per_layer_charts:
            for n in names:
                f.append(plots.usage_bars(os.path.join(out_dir, f"usage_{n}.png"), pl[n]["expert_counts"],
                                          f"{n}: top-1 expert usage ({pl[n]['tokens']} tokens)"))
        share = np.array([np.asarray(pl[n]["expert_counts"], float) / max(1, pl[n]["tokens"]) * 100 for n in names])
        f.append(plots.heatmap(os.path.join(out_dir, f"{tag}_layer_expert_heatmap.png"), share,
                               f"{title}: share of tokens per expert (%)", "expert", "MoE layer",
                               "share of tokens (%)", yticklabels=names))
        x = list(range(len(names)))
        mi = {t["to"]: t["normalized_mi"] for t in st["transitions"]}
        f.append(plots.lines(os.path.join(out_dir, f"{tag}_balance.png"), x, {
            "normalized entropy": [pl[n]["normalized_entropy"] for n in names],
            "Gini": [pl[n]["gini"] for n in names],
            "drop rate": [pl[n]["drop_rate"] for n in names],
            "MI(prev layer) / H": [mi.get(n) for n in names],
            "token-id consistency": [pl[n].get("token", {}).get("consistency") for n in names],
        }, f"{title}: balance and predictability across layers", "MoE layer", "value (0..1)",
            xticklabels=names, ylim=(0, 1.05)))
        f.append(plots.lines(os.path.join(out_dir, f"{tag}_loads.png"), x, {
            "max/mean load": [pl[n]["max_mean_load"] for n in names],
            "aux loss (1 = balanced)": [pl[n]["aux_loss"] for n in names],
            "z-loss": [pl[n]["z_loss"] for n in names],
        }, f"{title}: load-balance losses across layers", "MoE layer", "value", xticklabels=names))
        if any(pl[n]["gate"].get("count") for n in names):
            f.append(plots.histogram_pair(
                os.path.join(out_dir, f"{tag}_confidence.png"),
                (GATE_BINS, {n: pl[n]["gate"]["hist"]["counts"] for n in names if pl[n]["gate"].get("count")},
                 "top-1 gate probability"),
                (MARGIN_BINS, {n: pl[n]["margin"]["hist"]["counts"] for n in names if pl[n]["margin"].get("count")},
                 f"top-1 minus top-2 logit (last bin: ≥ {MARGIN_BINS[-2]:g})"),
                f"{title}: router confidence"))
        if st["transitions"]:
            f.append(plots.heatmap_grid(
                os.path.join(out_dir, f"{tag}_transitions.png"), [transition_probs(t["counts"]) for t in st["transitions"]],
                [f"{t['from']} → {t['to']}: MI {t['mutual_information_bits']:.2f} bits" for t in st["transitions"]],
                f"{title}: P(expert at next MoE layer | expert at this layer)", "expert at next layer",
                "expert at this layer", "probability"))
        dv = st["dataset_divergence"]
        ds = dv["datasets"]
        if len(ds) > 1:
            f.append(plots.lines(os.path.join(out_dir, f"{tag}_datasets_entropy.png"), x,
                                 {d: [pl[n]["per_dataset"].get(d, {}).get("normalized_entropy") for n in names] for d in ds},
                                 f"{title}: normalized routing entropy per dataset", "MoE layer",
                                 "entropy / log2(E)", xticklabels=names, ylim=(0, 1.05)))
            f.append(plots.heatmap(os.path.join(out_dir, f"{tag}_datasets_jsd.png"), dv["mean_over_layers"],
                                   f"{title}: Jensen-Shannon divergence between datasets (mean over layers)",
                                   "dataset", "dataset", "JSD (bits)", yticklabels=ds, xticklabels=ds,
                                   figsize=(7.0, 6.0), vmin=0, annotate=True))
            share = np.array([np.asarray(st["overall"]["per_dataset"][d]["expert_counts"], float) for d in ds])
            share = share / np.maximum(1, share.sum(axis=1, keepdims=True)) * 100
            f.append(plots.heatmap(os.path.join(out_dir, f"{tag}_datasets_usage.png"), share,
                                   f"{title}: expert usage per dataset, all layers (%)", "expert", "dataset",
                                   "share of tokens (%)", yticklabels=ds))
    return files


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;
font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#eee}
img{max-width:100%;border:1px solid #ddd;margin:4px 0}code{background:#f4f4f4}"""


def render_html(stats: dict, files: dict[str, list[str]]) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>moetrace analyze</title><style>{CSS}</style>"
           "</head><body>", "<h1>moetrace analyze</h1>",
           f"<p>Store <code>{html.escape(stats['store'])}</code>, model {html.escape(str(stats['model']))}, "
           f"{stats['num_experts']} experts, {stats['num_samples']} samples, {stats['num_tokens']} encoder tokens, "
           f"{stats['num_decoder_tokens']} decoder tokens; analysed in {stats['elapsed_s']:.2f} s. "
           "All numbers are in <code>stats.json</code> (keys in docs/ANALYSIS.md).</p>"]
    out.append("<h2>Datasets</h2>" + _table(["dataset", "samples", "encoder tokens"],
                                              [[d, v["samples"], v["tokens"]] for d, v in stats["datasets"].items()]))
    for stack_key in ("encoder", "decoder"):
        st = stats.get(stack_key)
        if not st or not st["layers"]:
            continue
        pl = st["per_layer"]
        imgs = files.get(stack_key, [])
        img = lambda name: f"<img src='{html.escape(name)}' alt='{html.escape(name)}'>"  # noqa: E731
        out.append(f"<h2>{stack_key.capitalize()}</h2>")
        out.append("<h3>Expert usage</h3>")
        out.append(_table(["layer", "tokens", "mean", "std", "cv", "entropy (bits)", "min", "max", "skew", "kurt",
                           "median", "IQR", "active", "unused", "drop rate"],
                          [[n, pl[n]["tokens"], pl[n]["mean"], pl[n]["std"], pl[n]["cv"], pl[n]["entropy_bits"],
                            pl[n]["min"], pl[n]["max"], pl[n]["skewness"], pl[n]["kurtosis"], pl[n]["median"],
                            pl[n]["iqr"], pl[n]["active_experts"], pl[n]["zero_usage_experts"], pl[n]["drop_rate"]]
                           for n in st["layers"]]))
        out += [img(x) for x in imgs if "usage_grid" in x or "layer_expert_heatmap" in x]
        out.append("<h3>Load balance and router confidence</h3>")
        out.append(_table(["layer", "max/mean", "Gini", "aux loss", "z-loss", "gate mean", "gate p10", "margin mean",
                           "margin p50"],
                          [[n, pl[n]["max_mean_load"], pl[n]["gini"], pl[n]["aux_loss"], pl[n]["z_loss"],
                            pl[n]["gate"].get("mean"), pl[n]["gate"].get("p10"), pl[n]["margin"].get("mean"),
                            pl[n]["margin"].get("p50")] for n in st["layers"]]))
        out += [img(x) for x in imgs if any(s in x for s in ("_balance", "_loads", "_confidence"))]
        out.append("<h3>Layer to layer</h3><p>In-sample top-k accuracy of a transition table (an upper bound of "
                   "what the <code>transition</code> predictor reaches on held-out samples).</p>")
        out.append(_table(["from", "to", "H(to)", "H(to|from)", "MI (bits)", "MI/H", "top-1", "top-2", "top-4"],
                          [[t["from"], t["to"], t["h_to_bits"], t["conditional_entropy_bits"],
                            t["mutual_information_bits"], t["normalized_mi"], t["topk_accuracy"]["1"],
                            t["topk_accuracy"]["2"], t["topk_accuracy"]["4"]] for t in st["transitions"]]))
        out += [img(x) for x in imgs if x.endswith("_transitions.png")]
        if any("token" in pl[n] for n in st["layers"]):
            out.append("<h3>Token ids</h3><p>consistency: share of tokens whose id's most frequent expert is the one "
                       "chosen (SiDA-style); explained: I(token id; expert) / H(expert).</p>")
            out.append(_table(["layer", "unique ids", "consistency", "consistency (ids seen ≥ 10×)", "MI (bits)",
                               "explained"],
                              [[n, pl[n]["token"]["unique_tokens"], pl[n]["token"]["consistency"],
                                pl[n]["token"]["consistency_min_count"], pl[n]["token"]["mi_bits"],
                                pl[n]["token"]["explained_fraction"]] for n in st["layers"] if "token" in pl[n]]))
        dv = st["dataset_divergence"]
        if len(dv["datasets"]) > 1:
            out.append("<h3>Datasets</h3>")
            out.append(_table(["layer"] + [f"{a} vs {b}" for i, a in enumerate(dv["datasets"])
                                           for b in dv["datasets"][i + 1:]],
                              [[n] + [dv["per_layer"][n][i][j] for i in range(len(dv["datasets"]))
                                      for j in range(i + 1, len(dv["datasets"]))] for n in st["layers"]]))
            out += [img(x) for x in imgs if "_datasets_" in x]
        if any(x.startswith("usage_") for x in imgs):
            out.append("<h3>Per-layer charts</h3>")
            out += [img(x) for x in imgs if x.startswith("usage_")]
    if stats["examples"]:
        out.append("<h2>Example expert paths</h2><p>One row per token: token id, then the expert at each MoE "
                   "layer.</p>")
        for ex in stats["examples"]:
            out.append(f"<h4>{html.escape(ex['sample_id'])} ({html.escape(ex['dataset'])}, {ex['tokens']} tokens)</h4>")
            out.append(_table(["token id"] + ex["layers"], [[t] + p for t, p in zip(ex["token_ids"], ex["paths"])]))
    out.append("</body></html>")
    return "\n".join(out)


def write_report(stats: dict, out_dir: str, per_layer_charts: bool = False) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    files = make_plots(stats, out_dir, per_layer_charts)
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(render_html(stats, files))


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moetrace analyze", description=(
        "Expert usage, load balance, router confidence, layer-to-layer and token structure, and dataset "
        "differences of a trace store. Writes DIR/stats.json (keys in docs/ANALYSIS.md) and DIR/report.html "
        "with its PNG charts."))
    ap.add_argument("store", help="trace store directory (or its manifest.json)")
    ap.add_argument("-o", "--output", default="analysis", help="output directory (default: ./analysis)")
    ap.add_argument("--seed", type=int, default=0, help="seed for picking the example samples")
    ap.add_argument("--examples", type=int, default=5, help="number of example expert paths")
    ap.add_argument("--no-token-stats", action="store_true", help="skip the token-id statistics (saves memory)")
    ap.add_argument("--no-plots", action="store_true", help="write stats.json only")
    ap.add_argument("--per-layer-charts", action="store_true",
                    help="also draw one expert-usage bar chart per layer (usage_<layer>.png)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .store import open_store
    from .errors import StoreError
    try:
        store = open_store(args.store)
        progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        stats = analyze_store(store, seed=args.seed, examples=args.examples,
                              token_stats=not args.no_token_stats, progress=progress)
    except (StoreError, KeyError) as e:
        print(f"moetrace: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    os.makedirs(args.output, exist_ok=True)
    if args.no_plots:
        with open(os.path.join(args.output, "stats.json"), "w") as f:
            json.dump(stats, f, indent=1)
    else:
        write_report(stats, args.output, args.per_layer_charts)
    if not args.quiet:
        print(f"analyze: {stats['num_tokens']} tokens in {stats['elapsed_s']:.2f} s "
              f"({stats['tokens_per_s'] or 0:.0f} tokens/s); wrote {args.output}/stats.json"
              + ("" if args.no_plots else f" and {args.output}/report.html"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
