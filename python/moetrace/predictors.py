"""The expert predictors of `moetrace speculate`: each is fitted on chunks of train rows and then
scores the E experts of a target MoE layer for chunks of test rows.

    fit(chunk)          count / collect on train rows (one streaming pass)
    finish(freq)        turn the counts into tables, train the learned model
    scores(chunk, t)    [n, E] float64, higher = more likely; ranked by moetrace.evaluation

t is a moe index (the position of the target among the stack's MoE layers, 0 .. L-1), never a
block index; `Chunk.experts[:, t]` is that layer's top-1 expert. No store access here: moetrace.speculate
reads the shards and builds the Chunks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .accumulate import SparseCounts
from .stats import log_softmax, softmax

DENSE_LIMIT = 1 << 23          # count tables with more cells than this are kept sparse
ALL_PREDICTORS = ("frequency", "transition", "history", "token", "pregate", "learned", "temporal")

# --------------------------------------------------------------------------------------------------
# Count tables
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
    hidden_fn: object = None    # j -> [n, d] float32 router input of the MoE layer at moe index j, or None
    # [n, L, k] int64: every expert of a top-k store's tokens (k > 1; experts is choices[:, :, 0]),
    # None for top-1 routing
    choices: np.ndarray | None = None

    def hidden(self, j: int):
        return None if self.hidden_fn is None else self.hidden_fn(j)

    def targets(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows [m], experts [m]): the experts the tokens used at moe index t, one entry per choice
        (m = n for top-1, n * k for top-k), so that count tables learn every expert a token needs."""
        if self.choices is None:
            return np.arange(self.experts.shape[0]), self.experts[:, t]
        n, _, k = self.choices.shape
        return np.repeat(np.arange(n), k), self.choices[:, t, :].ravel()


# --------------------------------------------------------------------------------------------------
# Predictors: fit(chunk) on train rows, scores(chunk, t) -> [n, E] on test rows
# --------------------------------------------------------------------------------------------------


class Predictor:
    name = "?"
    lookahead = 0
    needs_hidden = False

    def __init__(self, num_layers: int, num_experts: int):
        self.L, self.e = num_layers, num_experts  # L: the stack's MoE layers (moe indices 0 .. L-1)

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
            self.counts[t] += np.bincount(c.targets(t)[1], minlength=self.e)

    def prob(self, t: int) -> np.ndarray:
        s = self.counts[t].sum()
        return self.counts[t] / s if s else np.full(self.e, 1.0 / self.e)

    def scores(self, c, t):
        return np.broadcast_to(self.counts[t].astype(np.float64) + 0.5 * self.prob(t), (c.experts.shape[0], self.e))


class Transition(Predictor):
    """P(expert at MoE layer t | expert at MoE layer t - d) (t, d in moe indices: d MoE layers back),
    falling back to frequency for unseen rows."""
    name = "transition"

    def __init__(self, L, E, d):
        super().__init__(L, E)
        self.lookahead = d
        self.counts = np.zeros((L, E, E), np.int64)

    def fit(self, c):
        d, e = self.lookahead, self.e
        for t in range(d, self.L):
            rows, y = c.targets(t)
            self.counts[t] += np.bincount(c.experts[rows, t - d] * e + y, minlength=e * e).reshape(e, e)

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
            rows, y = c.targets(t)
            tab.add(self._key(c, t, g)[rows], y)

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
            rows, y = c.targets(t)
            self.tables[t].add(c.tokens[rows], y)

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
        e = self.e
        for t in range(self.L):
            rows, y = c.targets(t)
            ok = c.prev_step[rows, 0] >= 0
            self.counts[t] += np.bincount(c.prev_step[rows[ok], t] * e + y[ok], minlength=e * e).reshape(e, e)

    def scores(self, c, t):
        prev = c.prev_step[:, t]
        rows = np.where((prev >= 0)[:, None], self.counts[t][np.maximum(prev, 0)], 0).astype(np.float64)
        return backoff(rows, self.freq.prob(t))


class Pregate(Predictor):
    """The router of MoE layer t applied to the router input (hidden state) of MoE layer t - d (moe
    indices)."""
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
        return float(-log_softmax(self._logits(params, h, prev))[np.arange(y.size), y].mean())

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
            p = softmax(self._logits(params, hb, pb))  # [n, E] float32
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


def predictor_key(p: Predictor) -> str:
    """'transition@2': the name and lookahead that identify a predictor in speculation.json."""
    return f"{p.name}@{p.lookahead}"
