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
import json
import os
import sys
import time

import numpy as np

from .logopts import add_log_options, is_quiet

ANALYSIS_VERSION = 1
# Fine fixed bins (exact streaming merge); charts re-bin them onto the range the data occupies.
GATE_BINS = np.linspace(0.0, 1.0, 1001)     # top-1 router probability
MARGIN_BINS = np.linspace(0.0, 20.0, 1001)  # top-1 minus top-2 logit; the last bin takes the overflow
TRANSITION_MIN_ROW = 10                     # transition-map rows with fewer tokens are masked in the chart
NOISE_DRAWS = 4                             # random splits averaged for the JSD noise floor
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


def jsd_noise_floor(a, b, rng: np.random.Generator, draws: int = NOISE_DRAWS) -> float:
    """The JSD (bits) two datasets with these token counts show when their routing is the same: the
    pooled counts a + b split at random (a multivariate hypergeometric draw, i.e. a permutation of the
    tokens) into parts of sum(a) and sum(b) tokens, JSD averaged over `draws` splits. Tokens of one
    sample are correlated, so this token-level floor is a lower bound of the sample-level one."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    na, nb = int(a.sum()), int(b.sum())
    if na == 0 or nb == 0:
        return 0.0
    pool = a + b
    vals = []
    for _ in range(draws):
        x = rng.multivariate_hypergeometric(pool, na, method="marginals")
        vals.append(jsd_bits(x, pool - x))
    return float(np.mean(vals))


def order_for_heatmap(d: np.ndarray) -> list[int]:
    """A row/column order that puts similar datasets together: average-linkage hierarchical
    clustering of the (symmetric, zero-diagonal) distance matrix with scipy when it is installed,
    else by mean distance to the others."""
    d = np.nan_to_num(np.asarray(d, np.float64))
    n = d.shape[0]
    if n < 3:
        return list(range(n))
    try:
        from scipy.cluster.hierarchy import leaves_list, linkage, optimal_leaf_ordering
        from scipy.spatial.distance import squareform
        sym = np.maximum(0.5 * (d + d.T), 0.0)
        np.fill_diagonal(sym, 0.0)
        y = squareform(sym, checks=False)
        z = optimal_leaf_ordering(linkage(y, "average"), y)
        return [int(i) for i in leaves_list(z)]
    except ImportError:
        return [int(i) for i in np.argsort(d.mean(axis=1), kind="stable")]


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
    cv = std / mean if mean > 0 else 0.0
    lo, hi = (float(c.min()), float(c.max())) if e else (0.0, 0.0)
    return {
        "mean": mean, "std": std, "cv": cv,
        # the seed's names for cv/min/max, written too (aliases, same values)
        "coefficient_of_variation": cv, "min_usage": lo, "max_usage": hi,
        "entropy_bits": entropy_bits(c),
        "normalized_entropy": entropy_bits(c) / np.log2(e) if e > 1 else 0.0,
        "min": lo, "max": hi,
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

    def add_shard(self, shard, offsets: np.ndarray, datasets: list[str], token_ids: np.ndarray,
                  keep: np.ndarray | None = None) -> None:
        """offsets: this stack's per-sample row offsets in the shard; token_ids: [rows] ids; keep: bool
        per sample (None: all), the samples to count (--real-only leaves out the synthetic ones)."""
        e = self.e
        lengths = np.diff(offsets)
        tensor = shard.tensor
        if keep is not None and not keep.all():
            if not keep.any():
                return
            rm = np.repeat(keep, lengths)  # [rows] rows of the kept samples
            lengths = lengths[keep]
            datasets = [d for d, k in zip(datasets, keep) if k]
            token_ids = np.asarray(token_ids)[rm]

            def tensor(name, rm=rm):
                return np.asarray(shard.tensor(name))[rm]
            offsets = np.concatenate([[0], np.cumsum(lengths)])
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
            expert = np.asarray(tensor(f"{name}.expert"), np.int64)
            counts = np.bincount(g_all * e + expert, minlength=ng * e).reshape(ng, e)
            tokens = np.bincount(g_all, minlength=ng)
            dropped = (np.bincount(g_all, weights=np.asarray(tensor(f"{name}.dropped"), np.float64),
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
            lg_all = tensor(f"{name}.router_logits")
            gate_all = tensor(f"{name}.gate") if shard.has(f"{name}.gate") else None
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
        divergence = {"datasets": datasets, "per_layer": {}, "mean_over_layers": None, "overall": None,
                      "noise_floor_per_layer": {}, "noise_floor_mean_over_layers": None,
                      "excess_mean_over_layers": None, "order": list(range(len(datasets))), "pairs": []}
        if len(datasets) > 1:
            rng = np.random.default_rng(12345)
            nd = len(datasets)
            for name in present:
                c = {d: self.acc[name][d].counts for d in datasets if d in self.acc[name]}
                jm = [[None] * nd for _ in range(nd)]
                fm = [[None] * nd for _ in range(nd)]
                for i, x in enumerate(datasets):
                    for j, y in enumerate(datasets):
                        if x not in c or y not in c:
                            continue
                        if j < i:
                            jm[i][j], fm[i][j] = jm[j][i], fm[j][i]
                        elif i == j:
                            jm[i][j], fm[i][j] = 0.0, 0.0
                        else:
                            jm[i][j] = jsd_bits(c[x], c[y])
                            fm[i][j] = jsd_noise_floor(c[x], c[y], rng)
                divergence["per_layer"][name] = jm
                divergence["noise_floor_per_layer"][name] = fm
            if present:
                nan = lambda m: np.array([[v if v is not None else np.nan for v in row] for row in m])  # noqa: E731
                with np.errstate(all="ignore"):
                    import warnings
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        mean = np.nanmean(np.array([nan(divergence["per_layer"][n]) for n in present]), axis=0)
                        floor = np.nanmean(np.array([nan(divergence["noise_floor_per_layer"][n]) for n in present]),
                                           axis=0)
                excess = np.maximum(0.0, mean - floor)
                divergence["mean_over_layers"] = mean.tolist()
                divergence["noise_floor_mean_over_layers"] = floor.tolist()
                divergence["excess_mean_over_layers"] = excess.tolist()
                divergence["order"] = order_for_heatmap(excess)
                pairs = [{"a": datasets[i], "b": datasets[j], "jsd": float(mean[i, j]),
                          "noise_floor": float(floor[i, j]), "excess": float(excess[i, j])}
                         for i in range(nd) for j in range(i + 1, nd) if np.isfinite(mean[i, j])]
                pairs.sort(key=lambda r: (-r["jsd"], r["a"], r["b"]))
                divergence["pairs"] = pairs
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
                  token_stats: bool = True, progress=None, real_only: bool = False, bar: bool = False,
                  tokenizer: str | None = None) -> dict:
    """Streams every shard once and returns the stats.json dictionary. real_only leaves out synthetic
    samples; bar shows a tqdm progress bar; tokenizer: a spiece.model for the examples' token text
    (default: the store's, see moetrace.text)."""
    from .progress import bar as progress_bar
    e = store.num_experts
    enc_layers = [f"enc.{i}" for i in store.encoder_layers]
    dec_layers = [f"dec.{i}" for i in store.decoder_layers]
    enc = StackAnalysis("enc", enc_layers, e, token_stats)
    dec = StackAnalysis("dec", dec_layers, e, token_stats) if dec_layers else None
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
            dec.add_shard(shard, doff, md["datasets"], np.asarray(shard.tensor("dec.input_ids")), keep)
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
    return {
        "moetrace_analysis_version": ANALYSIS_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "store": os.path.abspath(getattr(store, "path", "")),
        "model": model.get("id"),
        "num_experts": e,
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


# The report (report.html, charts) lives in analysis_report.py (re-exported here).


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moetrace analyze", description=(
        "Expert usage, load balance, router confidence, layer-to-layer and token structure, and dataset "
        "differences of a trace store. Writes DIR/stats.json (keys in docs/ANALYSIS.md) and DIR/report.html "
        "(self-contained: its charts are embedded; the chart files are written beside it too)."))
    ap.add_argument("store", help="trace store directory (or its manifest.json)")
    ap.add_argument("-o", "--output", default="analysis", help="output directory (default: ./analysis)")
    ap.add_argument("--seed", type=int, default=0, help="seed for picking the example samples")
    ap.add_argument("--examples", type=int, default=5, help="number of example expert paths")
    ap.add_argument("--no-token-stats", action="store_true", help="skip the token-id statistics (saves memory)")
    ap.add_argument("--no-plots", action="store_true", help="write stats.json only")
    ap.add_argument("--per-layer-charts", action="store_true",
                    help="also draw one expert-usage bar chart per layer (usage_<layer>.png)")
    ap.add_argument("--real-only", action="store_true", help="leave out synthetic samples (of a mixed store)")
    ap.add_argument("--format", choices=("png", "svg", "pdf"), default="png",
                    help="chart files: png (default), svg (embedded as vector), pdf (written beside PNGs the report "
                         "shows)")
    ap.add_argument("--dpi", type=int, default=100, help="PNG resolution (default 100; 300 for print)")
    ap.add_argument("--link-images", action="store_true",
                    help="link the chart files from report.html instead of embedding them")
    ap.add_argument("--jsd-scale", choices=("auto", "fixed"), default="auto",
                    help="dataset-JSD heatmap colour scale: auto (the data's range, default) or fixed 0..1 bits")
    ap.add_argument("--top-pairs", type=int, default=30,
                    help="dataset pairs listed in the report, most divergent first (default 30; all in stats.json)")
    ap.add_argument("--tokenizer", help="spiece.model for the examples' token text (default: the store's model's)")
    add_log_options(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet = is_quiet(args)
    from .store import open_store
    from .errors import StoreError
    if args.no_plots is False:
        try:
            from . import plots
        except ModuleNotFoundError as e:
            print(f"moetrace: error: the report's charts need {e.name}, which is not installed: "
                  "pip install 'moetrace[analysis]' (or pass --no-plots for stats.json only)", file=sys.stderr)
            return 1
        plots.configure(dpi=args.dpi, fmt=args.format)
    try:
        store = open_store(args.store)
        progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        stats = analyze_store(store, seed=args.seed, examples=args.examples,
                              token_stats=not args.no_token_stats, progress=None if sys.stderr.isatty() else progress,
                              real_only=args.real_only, bar=not args.quiet, tokenizer=args.tokenizer)
    except (StoreError, KeyError) as e:
        print(f"moetrace: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    os.makedirs(args.output, exist_ok=True)
    if args.no_plots:
        with open(os.path.join(args.output, "stats.json"), "w") as f:
            json.dump(stats, f, indent=1)
    else:
        write_report(stats, args.output, args.per_layer_charts, embed=not args.link_images,
                     jsd_vmax=1.0 if args.jsd_scale == "fixed" else None, top_pairs=args.top_pairs)
    if not args.quiet:
        print(f"analyze: {stats['num_tokens']} tokens in {stats['elapsed_s']:.2f} s "
              f"({stats['tokens_per_s'] or 0:.0f} tokens/s); wrote {args.output}/stats.json"
              + ("" if args.no_plots else f" and {args.output}/report.html"), file=sys.stderr)
    return 0


from .analysis_report import make_plots, render_html, write_report  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
