"""Statistics of one vector or matrix: pure functions over numpy arrays, no store, no I/O.

Expert-usage moments and load balance (usage_stats, gini), entropies and mutual information of count
tables (entropy_bits, joint_stats, token_expert_stats), the Jensen-Shannon divergence of two routing
distributions and its sampling noise floor, lookup-table top-k accuracy, histogram summaries, and the
package's one softmax (router probabilities, with the logsumexp the z-loss needs).

Counts are [E] (one per expert) or [A, B] joint tables; entropies are in bits. Used by `analyze`
(moetrace.analysis) and by anyone holding counts from a store (docs/ANALYSIS.md names the keys).
"""

from __future__ import annotations

import numpy as np

NOISE_DRAWS = 4                             # random splits averaged for the JSD noise floor
TOPK = (1, 2, 4, 8, 16)


def _shifted_exp(x: np.ndarray):
    """The core of the package's softmax: x - max(x) over the last axis, exp of that and its sum,
    all float32 (the engine's routing math is fp32): (shifted [..., E], exp [..., E], sum [..., 1],
    max [..., 1])."""
    mx = x.max(axis=-1, keepdims=True)
    shifted = x - mx
    z = np.exp(shifted)
    return shifted, z, z.sum(axis=-1, keepdims=True), mx


def softmax(logits: np.ndarray, with_logsumexp: bool = False):
    """Row softmax in float32 over the last axis: probabilities [..., E]; with_logsumexp also returns
    logsumexp(logits) [...] (for the router z-loss).

    The one softmax of the package: moetrace.softmax, LayerView.probs, analyze's router statistics and
    the learned predictor's training all call it (log_softmax shares its core)."""
    x = np.asarray(logits, dtype=np.float32)
    if x.size == 0:
        return (x.copy(), np.zeros(x.shape[:-1], np.float32)) if with_logsumexp else x.copy()
    _, z, s, mx = _shifted_exp(x)
    z /= s
    if with_logsumexp:
        return z, (mx + np.log(s))[..., 0]
    return z


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log(softmax(logits)) [..., E] in float32, computed without the exp's underflow: the
    cross-entropy of the learned predictor is -log_softmax(z)[i, y_i]."""
    x = np.asarray(logits, dtype=np.float32)
    if x.size == 0:
        return x.copy()
    shifted, _, s, _ = _shifted_exp(x)
    return shifted - np.log(s)


def logit_features(logits: np.ndarray):
    """[T, E] float32 logits -> softmax probs [T, E], logsumexp [T], top1-top2 margin [T]."""
    probs, lse = softmax(logits, with_logsumexp=True)
    e = logits.shape[1]
    if e >= 2:
        top = np.partition(logits, e - 2, axis=1)  # [:, -1] the largest logit, [:, -2] the second
        margin = top[:, -1] - top[:, -2]
    else:
        margin = np.zeros(logits.shape[0], np.float32)
    return probs, lse, margin


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

