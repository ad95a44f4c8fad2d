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

Keys of speculation.json are documented in docs/ANALYSIS.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from .analysis import SparseCounts, rows_f32
from .logopts import add_log_options, is_quiet
from .text import model_dir_of  # noqa: F401 (also speculate.model_dir_of, as before)
from .cachesim import TimeModel, next_uses, simulate_cache  # noqa: F401 (re-exported)

SPECULATION_VERSION = 1
KS = (1, 2, 4, 8, 16)
CHUNK_ROWS = 1 << 16
DENSE_LIMIT = 1 << 23          # count tables with more cells than this are kept sparse
Z95 = 1.959963984540054
ALL_PREDICTORS = ("frequency", "transition", "history", "token", "pregate", "learned", "temporal")
POLICIES = ("lru", "lfu", "belady")

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
# Count tables and ranking
# --------------------------------------------------------------------------------------------------


class CountTable:
    """counts[key, expert] for keys in [0, num_keys): dense when small, else sparse sorted keys."""

    def __init__(self, num_keys: int, num_experts: int):
        self.k, self.e = int(num_keys), num_experts
        self.dense = self.k * self.e <= DENSE_LIMIT
        self.table = np.zeros(self.k * self.e, np.int64) if self.dense else None
        self.sparse = None if self.dense else SparseCounts()
        self.keys = self.counts = None

    def add(self, keys: np.ndarray, experts: np.ndarray) -> None:
        ok = (keys >= 0) & (keys < self.k)
        flat = keys[ok].astype(np.int64) * self.e + experts[ok]
        if self.dense:
            self.table += np.bincount(flat, minlength=self.table.size)
        else:
            self.sparse.add(flat)

    def finish(self) -> None:
        if self.dense:
            self.table = self.table.reshape(self.k, self.e)
        else:
            self.keys, self.counts = self.sparse.finish()
            self.sparse = None

    def rows(self, keys: np.ndarray) -> np.ndarray:
        """[n, E] float64 counts of each key's row (0 for unseen or out-of-range keys)."""
        keys = keys.astype(np.int64)
        ok = (keys >= 0) & (keys < self.k)
        out = np.zeros((keys.size, self.e), np.float64)
        if self.dense:
            out = self.table.take(np.clip(keys, 0, self.k - 1), axis=0).astype(np.float64)
            if not ok.all():
                out[~ok] = 0.0
        elif self.keys.size:
            q = keys[ok][:, None] * self.e + np.arange(self.e)
            pos = np.minimum(np.searchsorted(self.keys, q), self.keys.size - 1)
            out[ok] = np.where(self.keys[pos] == q, self.counts[pos], 0)
        return out


def backoff(counts: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Ranks by counts first, ties (and unseen rows) by fallback: counts + 0.5 * fallback / rowmax.
    Counts are integers, so the added term (< 1) never reorders experts with different counts."""
    if fallback.ndim == 1:  # one vector for every row (frequency): scale it once
        mx = fallback.max()
        return counts + (0.5 / mx if mx > 0 else 0.5) * fallback
    mx = fallback.max(axis=1, keepdims=True)
    return counts + 0.5 * fallback / np.where(mx > 0, mx, 1.0)


def true_ranks(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """0-based rank of the true expert y among scores [n, E]; ties go to the lower expert index."""
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

    def __init__(self, num_experts: int, ks=KS):
        self.ks = tuple(ks)
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
        return {"tokens": n, "samples": self.samples, "top1": rec["1"] if "1" in rec else None, "recall": rec,
                "ci95": ci}


# --------------------------------------------------------------------------------------------------
# Data of one chunk of rows of one stack
# --------------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    experts: np.ndarray         # [n, L] int64: the stack's MoE layers in order
    tokens: np.ndarray          # [n] token id (decoder: the step's input id)
    sample: np.ndarray          # [n] global sample index
    dataset: np.ndarray         # [n] index into the run's dataset names
    prev_step: np.ndarray | None  # [n, L] experts at the previous decoder step of the sample, -1 at step 0
    hidden_fn: object = None    # j -> [n, d] float32 router input at MoE layer j, or None

    def hidden(self, j: int):
        return None if self.hidden_fn is None else self.hidden_fn(j)


# --------------------------------------------------------------------------------------------------
# Predictors: fit(chunk) on train rows, scores(chunk, t) -> [n, E] on test rows
# --------------------------------------------------------------------------------------------------


class Predictor:
    name = "?"
    lookahead = 0
    needs_hidden = False

    def __init__(self, num_layers: int, num_experts: int):
        self.L, self.e = num_layers, num_experts

    def targets(self) -> list[int]:
        return list(range(self.lookahead, self.L))

    def fit(self, c: Chunk) -> None:
        pass

    def finish(self, freq: "Frequency") -> None:
        self.freq = freq

    def scores(self, c: Chunk, t: int) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict:
        return {}


class Frequency(Predictor):
    name = "frequency"

    def __init__(self, L, E):
        super().__init__(L, E)
        self.counts = np.zeros((L, E), np.int64)

    def fit(self, c):
        for t in range(self.L):
            self.counts[t] += np.bincount(c.experts[:, t], minlength=self.e)

    def prob(self, t: int) -> np.ndarray:
        s = self.counts[t].sum()
        return self.counts[t] / s if s else np.full(self.e, 1.0 / self.e)

    def scores(self, c, t):
        return np.broadcast_to(self.counts[t].astype(np.float64) + 0.5 * self.prob(t), (c.experts.shape[0], self.e))


class Transition(Predictor):
    """P(expert at layer t | expert at layer t - d), falling back to frequency for unseen rows."""
    name = "transition"

    def __init__(self, L, E, d):
        super().__init__(L, E)
        self.lookahead = d
        self.counts = np.zeros((L, E, E), np.int64)

    def fit(self, c):
        d, e = self.lookahead, self.e
        for t in range(d, self.L):
            self.counts[t] += np.bincount(c.experts[:, t - d] * e + c.experts[:, t], minlength=e * e).reshape(e, e)

    def scores(self, c, t):
        return backoff(self.counts[t][c.experts[:, t - self.lookahead]].astype(np.float64), self.freq.prob(t))


class History(Predictor):
    """Conditioned on the experts of the previous h MoE layers (lookahead 1), backing off to h-1, ...,
    1 previous layers and then to frequency."""
    lookahead = 1

    def __init__(self, L, E, h):
        super().__init__(L, E)
        self.h = h
        self.name = f"history-{h}"
        self.tables = {(t, g): CountTable(E ** g, E) for t in range(1, L) for g in range(1, min(h, t) + 1)}

    def _key(self, c, t, g):
        k = np.zeros(c.experts.shape[0], np.int64)
        for j in range(t - g, t):
            k = k * self.e + c.experts[:, j]
        return k

    def fit(self, c):
        for (t, g), tab in self.tables.items():
            tab.add(self._key(c, t, g), c.experts[:, t])

    def finish(self, freq):
        super().finish(freq)
        for tab in self.tables.values():
            tab.finish()

    def scores(self, c, t):
        s = self.freq.prob(t)  # 1-D: backoff broadcasts it
        for g in range(1, min(self.h, t) + 1):
            s = backoff(self.tables[(t, g)].rows(self._key(c, t, g)), s)
        return s


class TokenId(Predictor):
    """The expert a token id chose most often in training at that layer (SiDA-style); frequency for
    ids never seen."""
    name = "token"

    def __init__(self, L, E, vocab):
        super().__init__(L, E)
        self.tables = [CountTable(vocab, E) for _ in range(L)]

    def fit(self, c):
        for t in range(self.L):
            self.tables[t].add(c.tokens, c.experts[:, t])

    def finish(self, freq):
        super().finish(freq)
        for tab in self.tables:
            tab.finish()

    def scores(self, c, t):
        return backoff(self.tables[t].rows(c.tokens), self.freq.prob(t))


class Temporal(Predictor):
    """Decoder: the same layer's expert at the sample's previous generated token."""
    name = "temporal"

    def __init__(self, L, E):
        super().__init__(L, E)
        self.counts = np.zeros((L, E, E), np.int64)

    def fit(self, c):
        ok = c.prev_step[:, 0] >= 0
        e = self.e
        for t in range(self.L):
            self.counts[t] += np.bincount(c.prev_step[ok, t] * e + c.experts[ok, t], minlength=e * e).reshape(e, e)

    def scores(self, c, t):
        prev = c.prev_step[:, t]
        rows = np.where((prev >= 0)[:, None], self.counts[t][np.maximum(prev, 0)], 0).astype(np.float64)
        return backoff(rows, self.freq.prob(t))


class Pregate(Predictor):
    """The router of layer t applied to the router input (hidden state) of layer t - d."""
    needs_hidden = True
    name = "pregate"

    def __init__(self, L, E, d, weights: list[np.ndarray], biases: list):
        super().__init__(L, E)
        self.lookahead = d
        self.w, self.b = weights, biases

    def scores(self, c, t):
        h = c.hidden(t - self.lookahead)
        s = h @ self.w[t].T
        return (s + self.b[t] if self.b[t] is not None else s).astype(np.float64)


class Learned(Predictor):
    """Softmax regression trained by moetrace on a subsample of the train split: features are the
    (standardised) router input at layer t-1 when the store has hidden states, plus one-hot experts
    of layers t-1 and t-2 (kept as indices: their weights are rows looked up, not a GEMM). Trained
    with Adam on minibatches of 512 on 90% of the sampled tokens; the other 10% (by sample) give the
    validation loss, logged beside the training loss."""
    name = "learned"
    lookahead = 1

    def __init__(self, L, E, use_hidden: bool, keep_prob: float, steps: int, seed: int, lr: float = 0.05):
        super().__init__(L, E)
        self.use_hidden, self.keep_prob, self.steps, self.lr = use_hidden, keep_prob, steps, lr
        self.rng = np.random.default_rng(seed)
        self.data = {t: [] for t in range(1, L)}
        self.models, self.curves, self.train_tokens, self.val_tokens = {}, {}, {}, {}
        self.needs_hidden = use_hidden
        self.train_s = 0.0
        self.bar = False

    def _inputs(self, c, t, rows=None):
        """(hidden [n, d] or None, previous experts [n, 2] with E for 'no such layer')."""
        ex = c.experts if rows is None else c.experts[rows]
        prev = np.stack([ex[:, t - 1], ex[:, t - 2] if t >= 2 else np.full(ex.shape[0], self.e)], axis=1)
        h = None
        if self.use_hidden:
            h = c.hidden(t - 1)
            h = h if rows is None else h[rows]
        return h, prev

    def fit(self, c):
        keep = np.flatnonzero(self.rng.random(c.experts.shape[0]) < self.keep_prob)
        if keep.size == 0:
            return
        val = (c.sample[keep] * 2654435761 % 10) == 0  # 10% of the samples, fixed by the sample index
        for t in self.data:
            h, prev = self._inputs(c, t, keep)
            self.data[t].append((None if h is None else h.astype(np.float16), prev, c.experts[keep, t].copy(), val))

    def finish(self, freq):
        super().finish(freq)
        t0 = time.perf_counter()
        from .progress import bar
        for t in bar(list(self.data), total=len(self.data), desc="learned predictor", unit="layer",
                     enabled=self.bar):
            parts = self.data[t]
            if not parts:
                continue
            prev = np.concatenate([p[1] for p in parts])
            y = np.concatenate([p[2] for p in parts])
            val = np.concatenate([p[3] for p in parts])
            if val.all():  # too few samples to hold some out: validate on the training data
                val[:] = False
            h, mu, sd = None, None, None
            if self.use_hidden:
                h = np.concatenate([p[0] for p in parts]).astype(np.float32)
                mu, sd = h[~val].mean(axis=0), h[~val].std(axis=0) + 1e-6
                h = (h - mu) / sd
            tr = ~val
            held = (None if h is None else h[val], prev[val], y[val]) if val.any() else None
            params, curve = self._train(None if h is None else h[tr], prev[tr], y[tr], held)
            self.models[t] = (params, mu, sd)
            self.curves[t] = curve
            self.train_tokens[t] = int(tr.sum())
            self.val_tokens[t] = int(val.sum())
        self.data = {}
        self.train_s = time.perf_counter() - t0

    def _logits(self, params, h, prev):
        wh, emb, b = params  # [d, E] or None, [2, E+1, E], [E]
        z = b + emb[0][prev[:, 0]] + emb[1][prev[:, 1]]
        if wh is not None:
            z = z + h @ wh
        return z

    def _loss(self, params, h, prev, y) -> float:
        z = self._logits(params, h, prev)
        z = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        return float((lse - z[np.arange(y.size), y]).mean())

    def _train(self, h, prev, y, held=None):
        """Adam on the mean cross-entropy (L2 1e-4 on the weights); returns (params, curve). held:
        (h, prev, y) of the validation tokens, whose loss is logged as val_loss."""
        n, e = y.size, self.e
        b = np.log(np.bincount(y, minlength=e) + 1.0).astype(np.float32)
        params = [None if h is None else np.zeros((h.shape[1], e), np.float32), np.zeros((2, e + 1, e), np.float32),
                  b - b.mean()]
        m = [None if x is None else np.zeros_like(x) for x in params]
        v = [None if x is None else np.zeros_like(x) for x in params]
        curve, run = [], []
        b1, b2 = 0.9, 0.999
        cols = np.arange(e)
        for step in range(1, self.steps + 1):
            idx = self.rng.integers(0, n, size=min(512, n))
            hb = None if h is None else h[idx]
            pb, yb = prev[idx], y[idx]
            z = self._logits(params, hb, pb)
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            run.append(float(-np.log(p[np.arange(yb.size), yb] + 1e-12).mean()))
            p[np.arange(yb.size), yb] -= 1.0
            p /= yb.size  # d loss / d z
            g_emb = np.stack([  # rows of p summed per previous expert (a bincount beats np.add.at)
                np.bincount((pb[:, j, None] * e + cols).ravel(), weights=p.ravel(), minlength=(e + 1) * e)
                .reshape(e + 1, e) for j in (0, 1)]).astype(np.float32)
            grads = [None if hb is None else hb.T @ p + 1e-4 * params[0], g_emb + 1e-4 * params[1], p.sum(axis=0)]
            for i, g in enumerate(grads):
                if g is None:
                    continue
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                params[i] -= self.lr * (m[i] / (1 - b1 ** step)) / (np.sqrt(v[i] / (1 - b2 ** step)) + 1e-8)
            if step % 10 == 0 or step == self.steps:
                point = {"step": step, "loss": float(np.mean(run))}
                if held is not None:
                    point["val_loss"] = self._loss(params, *held)
                curve.append(point)
                run = []
        return params, curve

    def targets(self):
        return sorted(self.models)

    def scores(self, c, t):
        params, mu, sd = self.models[t]
        h, prev = self._inputs(c, t)
        if h is not None:
            h = (h - mu) / sd
        return self._logits(params, h, prev).astype(np.float64)

    def describe(self):
        return {"features": ("standardised hidden state at t-1 + " if self.use_hidden else "")
                + "one-hot experts at t-1 and t-2",
                "model": "softmax regression (Adam, lr 0.05, minibatch 512, L2 1e-4)",
                "steps": self.steps, "train_s": self.train_s,
                "train_tokens": {str(t): n for t, n in self.train_tokens.items()},
                "val_tokens": {str(t): n for t, n in self.val_tokens.items()},
                "loss_curves": {str(t): c for t, c in self.curves.items()}}


# The expert cache simulator lives in cachesim.py (re-exported here).


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
    if off is None or not all(shard.has(f"{n}.expert") for n in spec.layers):
        return
    lengths = np.diff(off)
    rows_role = np.repeat(role, lengths)
    sample = np.repeat(np.arange(shard.num_samples) + shard.first_sample, lengths)
    ds = np.repeat(np.array([ds_index[d] for d in shard.metadata["datasets"]], np.int64), lengths)
    total = int(off[-1])
    exp_all = [shard.tensor(f"{n}.expert") for n in spec.layers]
    tok_all = shard.tensor(spec.tokens)
    hid_all = ([shard.tensor(f"{n}.hidden") if shard.has(f"{n}.hidden") else None for n in spec.layers]
               if with_hidden else None)
    decoder = spec.key == "decoder"
    step0 = np.zeros(total, bool)
    step0[off[:-1][lengths > 0]] = True
    for a in range(0, total, CHUNK_ROWS):
        b = min(total, a + CHUNK_ROWS)
        m = rows_role[a:b] == want
        if not m.any():
            continue
        ex = np.stack([np.asarray(x[a:b], np.int64) for x in exp_all], axis=1)
        prev = None
        if decoder:
            prev_full = np.full_like(ex, -1)
            if a > 0:
                prev_full[0] = np.stack([np.asarray(x[a - 1], np.int64) for x in exp_all])
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
                    dataset=ds[a:b][m], prev_step=prev, hidden_fn=hidden_fn)


def load_routers(path: str, spec: StackSpec, num_experts: int, d_model: int):
    """Router weights [E, d] (and bias or None) per layer of the stack from `moetrace routers` output."""
    from .safetensors_io import SafetensorsFile
    st = SafetensorsFile(path)
    ws, bs = [], []
    for n in spec.layers:
        w = np.array(st.tensor(f"{n}.router.weight", float32=True), np.float32)
        if w.shape != (num_experts, d_model):
            raise ValueError(f"{path}: {n}.router.weight has shape {list(w.shape)}, expected [{num_experts}, {d_model}]")
        ws.append(w)
        bs.append(np.array(st.tensor(f"{n}.router.bias", float32=True)) if f"{n}.router.bias" in st.infos else None)
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


def _predictor_key(p: Predictor) -> str:
    return f"{p.name}@{p.lookahead}"


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
    return first is not None and all(first.has(f"{n}.hidden") for n in spec.layers)


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
        sim_pred = next((p for p in preds if p.name == opt.prefetch_predictor or _predictor_key(p) == opt.prefetch_predictor),
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
            if opt.simulate:
                routing.append((c.experts.astype(np.int16), c.sample.astype(np.int32)))
                top = np.empty((n, L, kpre), np.int16)
            for p in preds:
                for t in p.targets():
                    sc = p.scores(c, t)
                    r = true_ranks(sc, c.experts[:, t])
                    key = (_predictor_key(p), t)
                    cell = cells.setdefault(key, {"all": RecallCell(E, opt.ks)})
                    cell["all"].add(r, inv, nsamp)
                    if len(ds_names) > 1:
                        for d, m in ds_masks:
                            cell.setdefault(ds_names[d], RecallCell(E, opt.ks)).add(r[m], inv[m], nsamp)
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
    reqs = [[sorted(set(ex[g, t].tolist())) for g in groups] for t in range(L)]
    pre = None
    if top is not None:
        pre = []
        for t in range(L):
            lst = []
            for g in groups:  # the predicted experts of the request's tokens, most often predicted first
                v, c = np.unique(top[g, t], return_counts=True)
                lst.append(v[np.argsort(-c, kind="stable")].tolist())
            pre.append(lst)
    tokens = int(ex.shape[0])
    all_gpu_ms = tm.layer_ms * len(groups) * L
    no_cache_ms = sum(tm.request_ms([len(r) for r in reqs[t]], np.zeros(len(groups))) for t in range(L))
    runs = []
    for size in sizes:
        for policy in opt.policies:
            for prefetch in ([False, True] if pre is not None else [False]):
                acc = hit = dem = pf = 0
                ms = 0.0
                for t in range(L):
                    p_t = [x[:size] for x in pre[t]] if prefetch else None
                    r = simulate_cache(reqs[t], size, policy, E, p_t)
                    acc += r["accesses"]
                    hit += r["hits"]
                    dem += r["demand_loads"]
                    pf += r["prefetch_loads"]
                    ms += tm.request_ms(r["demand_per_request"], r["prefetch_per_request"])
                runs.append({"cache_experts_per_layer": size, "cache_bytes": size * L * ebytes, "policy": policy,
                             "prefetch": prefetch, "accesses": acc, "hits": hit, "hit_rate": hit / acc if acc else 0.0,
                             "experts_transferred": dem + pf, "demand_loads": dem, "prefetch_loads": pf,
                             "bytes_transferred": (dem + pf) * ebytes, "ms_per_token": ms / tokens})
    return {"mode": "decode" if per_token else "prefill", "requests_per_layer": len(groups), "tokens": tokens,
            "truncated": truncated,
            "expert_bytes": ebytes, "bandwidth_gbs": tm.bandwidth_gbs, "layer_ms": tm.layer_ms,
            "prefetch_predictor": _predictor_key(sim_pred) if sim_pred is not None else None,
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
    specs = [StackSpec("encoder", [f"enc.{i}" for i in store.encoder_layers], "sample_offsets", "token_ids")]
    if store.decoder_layers:
        specs.append(StackSpec("decoder", [f"dec.{i}" for i in store.decoder_layers], "dec.sample_offsets",
                               "dec.input_ids"))
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
        "num_experts": store.num_experts, "ks": list(opt.ks), "datasets": ds_names,
        "real_only": opt.real_only, "demo_model": bool((store.manifest.get("model", {}) or {}).get("demo")),
        "split": opt.split.describe(),
        "predictors": list(opt.predictors), "unavailable": unavailable,
        "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "encoder": stacks.get("encoder"), "decoder": stacks.get("decoder"),
    }


# Rendering (speculation.html, .md, charts) lives in speculate_report.py (re-exported here).


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _csv(s: str) -> list[str]:
    return [x for x in s.replace(" ", ",").split(",") if x]


def parse_bytes(s: str) -> float:
    s = s.strip().upper()
    for suf, m in (("GIB", 2 ** 30), ("MIB", 2 ** 20), ("KIB", 2 ** 10), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3),
                   ("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10), ("B", 1)):
        if s.endswith(suf):
            return float(s[:-len(suf)]) * m
    return float(s)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moetrace speculate", description=(
        "Expert-prediction baselines trained on a train split and evaluated on held-out samples, and an "
        "expert cache simulator. Writes DIR/speculation.json (keys in docs/ANALYSIS.md), DIR/speculation.md "
        "and PNG plots."))
    ap.add_argument("store", help="trace store directory (or its manifest.json)")
    ap.add_argument("-o", "--output", default="speculation", help="output directory (default: ./speculation)")
    ap.add_argument("--predictors", default=",".join(ALL_PREDICTORS),
                    help=f"comma-separated subset of {','.join(ALL_PREDICTORS)} (default: all)")
    ap.add_argument("--lookaheads", default="1,2,3", help="transition lookaheads in MoE layers (default 1,2,3)")
    ap.add_argument("--histories", default="2,3", help="history lengths of the history predictor (default 2,3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample split (and the learned model)")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="share of samples held out (default 0.2)")
    ap.add_argument("--test-datasets", default="", help="split by dataset: these datasets are the test set")
    ap.add_argument("--train-datasets", default="", help="with --test-datasets: train only on these (default: all others)")
    ap.add_argument("--cache-sizes", default="", help="cache sizes in experts per layer, e.g. 1,2,4 (default: E/8, E/4, E/2, 3E/4)")
    ap.add_argument("--cache-bytes", default="", help="cache budgets for all MoE layers together, e.g. 2GiB,4GiB")
    ap.add_argument("--policies", default=",".join(POLICIES), help="cache policies (default lru,lfu,belady)")
    ap.add_argument("--prefetch-predictor", default="transition",
                    help="predictor whose top-k is prefetched before each layer, as name or name@lookahead "
                         "(default transition, i.e. lookahead 1)")
    ap.add_argument("--prefetch-k", type=int, default=1, help="experts prefetched per token and layer (default 1)")
    ap.add_argument("--expert-dtype", choices=("f32", "bf16", "f16"), default="f32",
                    help="dtype of the offloaded expert weights (default f32, as the engine runs)")
    ap.add_argument("--bandwidth-gbs", type=float, default=24.0, help="host-to-device bandwidth, GB/s (default 24)")
    ap.add_argument("--layer-ms", type=float, default=0.2,
                    help="compute time of one MoE layer per request (decode token or prefill sequence), ms (default 0.2)")
    ap.add_argument("--encoder-replay", choices=("prefill", "token"), default="prefill",
                    help="encoder replay: per sequence (prefill, default) or one token at a time")
    ap.add_argument("--routers", help="router weights from `moetrace routers` (for pregate)")
    ap.add_argument("--model", help="model directory, to extract router weights (default: the store's model)")
    ap.add_argument("--learned-tokens", type=int, default=20000, help="train tokens sampled for the learned model")
    ap.add_argument("--learned-steps", type=int, default=300, help="Adam steps of the learned model")
    ap.add_argument("--max-replay", type=int, default=50000,
                    help="replay at most this many requests per layer (the first test samples; default 50000)")
    ap.add_argument("--no-cache", action="store_true", help="skip the cache simulation")
    ap.add_argument("--no-plots", action="store_true", help="no charts: speculation.json, .md and .html only")
    ap.add_argument("--k", default=",".join(str(k) for k in KS),
                    help="the k of recall@k, any comma-separated list, e.g. 1,3,5,10 (default 1,2,4,8,16; 1 is "
                         "always included)")
    ap.add_argument("--real-only", action="store_true", help="leave out synthetic samples (of a mixed store)")
    ap.add_argument("--format", choices=("png", "svg", "pdf"), default="png",
                    help="chart files: png (default), svg, pdf (beside PNGs the report shows)")
    ap.add_argument("--dpi", type=int, default=100, help="PNG resolution (default 100; 300 for print)")
    ap.add_argument("--link-images", action="store_true",
                    help="link the chart files from speculation.html instead of embedding them")
    add_log_options(ap)
    return ap


def options_from_args(args) -> Options:
    preds = tuple(_csv(args.predictors))
    bad = [p for p in preds if p not in ALL_PREDICTORS]
    if bad:
        raise ValueError(f"unknown predictor(s) {', '.join(bad)}; choose from {', '.join(ALL_PREDICTORS)}")
    pols = tuple(_csv(args.policies))
    if any(p not in POLICIES for p in pols):
        raise ValueError(f"unknown policy in {args.policies!r}; choose from {', '.join(POLICIES)}")
    if not 0.0 < args.test_fraction < 1.0:
        raise ValueError("--test-fraction must be between 0 and 1")
    try:
        ks = tuple(int(x) for x in _csv(args.k))
    except ValueError:
        raise ValueError(f"--k {args.k!r}: expected a comma-separated list of integers, e.g. 1,3,5,10") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--k {args.k!r}: expected integers of at least 1, e.g. 1,3,5,10")
    return Options(
        predictors=preds, lookaheads=tuple(int(x) for x in _csv(args.lookaheads)),
        histories=tuple(int(x) for x in _csv(args.histories)),
        split=Split(args.seed, args.test_fraction, tuple(_csv(args.test_datasets)), tuple(_csv(args.train_datasets))),
        cache_sizes=tuple(int(x) for x in _csv(args.cache_sizes)),
        cache_bytes=tuple(parse_bytes(x) for x in _csv(args.cache_bytes)), policies=pols,
        prefetch_predictor=args.prefetch_predictor, prefetch_k=args.prefetch_k,
        expert_dtype_bytes={"f32": 4, "bf16": 2, "f16": 2}[args.expert_dtype],
        bandwidth_gbs=args.bandwidth_gbs, layer_ms=args.layer_ms, routers=args.routers, model=args.model,
        learned_tokens=args.learned_tokens, learned_steps=args.learned_steps, encoder_replay=args.encoder_replay,
        simulate=not args.no_cache, max_replay=max(1, args.max_replay), ks=ks, real_only=args.real_only,
        bar=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.quiet = is_quiet(args)
    from .errors import StoreError
    from .store import open_store
    try:
        opt = options_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    if not args.no_plots:
        try:
            from . import plots
        except ModuleNotFoundError as e:
            print(f"moetrace: error: the charts need {e.name}, which is not installed: pip install "
                  "'moetrace[analysis]' (or pass --no-plots)", file=sys.stderr)
            return 1
    try:
        store = open_store(args.store)
        progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        if not args.no_plots:
            plots.configure(dpi=args.dpi, fmt=args.format)
        res = speculate_store(store, opt, progress)
    except (StoreError, KeyError, ValueError) as e:
        print(f"moetrace: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    write_outputs(res, args.output, plots_on=not args.no_plots, embed=not args.link_images)
    if not args.quiet:
        print(f"speculate: done in {res['elapsed_s']:.2f} s; wrote {args.output}/speculation.json, "
              f"{args.output}/speculation.html and {args.output}/speculation.md", file=sys.stderr)
    return 0


from .speculate_report import (_jsonable, make_plots, render_html, render_markdown,  # noqa: E402,F401
                               write_outputs)

if __name__ == "__main__":
    sys.exit(main())
