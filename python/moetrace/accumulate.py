"""Streaming accumulators of `moetrace analyze`: fed one shard (and one row chunk) at a time so memory
stays bounded, merged across datasets at the end. StackAnalysis is the per-stack driver; its result()
turns the sums into the stats.json dictionaries with moetrace.stats.

Shapes: E experts, G datasets of the shard, rows = tokens of the stack (encoder tokens or decoder
steps) in the shard, in sample order.
"""

from __future__ import annotations

import numpy as np

from .keys import DROPPED, EXPERT, GATE, ROUTER_LOGITS, ROUTER_LSE, ROUTER_TOPK_LOGITS, layer_tensor
from .stats import (hist_summary, jsd_bits, jsd_noise_floor, joint_stats, logit_features, order_for_heatmap,
                    table_topk_accuracy, token_expert_stats, usage_stats)
from .store import rows_f32

# Fine fixed bins (exact streaming merge); charts re-bin them onto the range the data occupies.
GATE_BINS = np.linspace(0.0, 1.0, 1001)     # top-1 router probability
MARGIN_BINS = np.linspace(0.0, 20.0, 1001)  # top-1 minus top-2 logit; the last bin takes the overflow
CHUNK_ROWS = 1 << 18                        # token rows per chunk when logits are read


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


class LayerAcc:
    """Everything accumulated for one (MoE layer, dataset). A layer's "all" is the merge of its
    datasets' accumulators, so every token is processed once."""

    def __init__(self, num_experts: int):
        e = num_experts
        self.e = e
        self.counts = np.zeros(e, np.int64)
        self.dropped = 0
        self.tokens = 0
        self.logit_tokens = 0                     # tokens with a log-sum-exp (full or top-K logits)
        self.prob_tokens = 0                      # tokens with every expert's probability (full logits)
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
            out.prob_tokens += a.prob_tokens
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
        out["aux_loss"] = out["z_loss"] = None
        if self.prob_tokens:  # needs every expert's probability: not in a --logits topk:K store
            f = self.counts / max(1, self.counts.sum())
            p = self.prob_sum / self.prob_tokens
            out["aux_loss"] = float(self.e * (f * p).sum())
            out["mean_router_prob"] = [float(x) for x in p]
        if self.logit_tokens:
            out["z_loss"] = self.z_sum / self.logit_tokens
        out["gate"] = hist_summary(self.gate_hist, GATE_BINS, *self.gate_stats)
        out["margin"] = hist_summary(self.margin_hist, MARGIN_BINS, *self.margin_stats)
        return out


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
        for li, name in enumerate(self.layers):  # li: moe index in the stack
            k_expert, k_dropped, k_logits, k_gate = (layer_tensor(name, f)
                                                     for f in (EXPERT, DROPPED, ROUTER_LOGITS, GATE))
            if not shard.has(k_expert):
                prev = None
                continue
            accs = self._accs(name, names)
            choices = np.asarray(tensor(k_expert), np.int64).reshape(rows, -1)  # [rows, k]
            expert = choices[:, 0]  # the top-1: transitions and token statistics
            # usage counts each of a token's k choices
            counts = np.bincount((g_all[:, None] * e + choices).ravel(), minlength=ng * e).reshape(ng, e)
            tokens = np.bincount(g_all, minlength=ng)
            dropped = (np.bincount(g_all, weights=np.asarray(tensor(k_dropped), np.float64), minlength=ng)
                       if shard.has(k_dropped) else np.zeros(ng))
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
            k_topk, k_lse = layer_tensor(name, ROUTER_TOPK_LOGITS), layer_tensor(name, ROUTER_LSE)
            full = shard.has(k_logits)
            if not full and not shard.has(k_lse):
                continue
            # --logits topk:K: z-loss from the stored log-sum-exp and the margin from the top two
            # stored logits are exact; every expert's probability (aux loss) is not stored.
            lg_all = tensor(k_logits) if full else tensor(k_topk)
            lse_all = None if full else tensor(k_lse)
            gate_all = tensor(k_gate) if shard.has(k_gate) else None
            for a in range(0, rows, CHUNK_ROWS):
                b = min(rows, a + CHUNK_ROWS)
                g = g_all[a:b]
                if full:
                    probs, lse, margin = logit_features(rows_f32(lg_all, a, b))
                    top_p = probs.max(axis=1)
                else:
                    vals = rows_f32(lg_all, a, b)
                    lse = np.asarray(lse_all[a:b], np.float32)
                    margin = vals[:, 0] - vals[:, 1] if vals.shape[1] >= 2 else None
                    top_p = np.exp(vals[:, 0] - lse)
                gate = (np.asarray(gate_all[a:b], np.float32).reshape(b - a, -1)[:, 0] if gate_all is not None
                        else top_p)  # k > 1: the top choice's weight
                if full and ng == 1:
                    psum = probs.sum(axis=0, dtype=np.float64)[None]
                elif full:  # a masked sum per dataset: faster than a one-hot GEMM, which BLAS runs badly
                    psum = np.stack([probs[g == k].sum(axis=0, dtype=np.float64) for k in range(ng)])
                zs = np.bincount(g, weights=lse.astype(np.float64) ** 2, minlength=ng)
                gh = grouped_hist(gate, g, ng, GATE_BINS)
                mh = grouped_hist(margin, g, ng, MARGIN_BINS) if margin is not None else None
                nt = np.bincount(g, minlength=ng)
                for k, acc in enumerate(accs):
                    if nt[k] == 0:
                        continue
                    acc.logit_tokens += int(nt[k])
                    if full:
                        acc.prob_tokens += int(nt[k])
                        acc.prob_sum += psum[k]
                    acc.z_sum += float(zs[k])
                    hists = [(gh, acc.gate_hist, acc.gate_stats)]
                    if mh is not None:
                        hists.append((mh, acc.margin_hist, acc.margin_stats))
                    for (hist, sums, sq, mins, maxs), h, st in hists:
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

