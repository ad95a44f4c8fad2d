"""moetrace.predictors and moetrace.evaluation on hand-made Chunks: no store, no files."""

import numpy as np
import pytest

from moetrace import evaluation, predictors
from moetrace.predictors import Chunk

E = 4


def chunk(experts, tokens=None, sample=None, prev_step=None, hidden=None):
    ex = np.asarray(experts, np.int64)
    n = ex.shape[0]
    return Chunk(experts=ex, tokens=np.asarray(tokens if tokens is not None else np.zeros(n), np.int64),
                 sample=np.asarray(sample if sample is not None else np.arange(n), np.int64),
                 dataset=np.zeros(n, np.int64), prev_step=prev_step,
                 hidden_fn=None if hidden is None else (lambda j: hidden[j]))


def fitted(p, c, freq=None):
    freq = freq or predictors.Frequency(p.L, p.e)
    if freq is not p:
        freq.fit(c)
    p.fit(c)
    p.finish(freq)
    return p


def top1(p, c, t):
    return evaluation.topk_experts(p.scores(c, t), 1)[:, 0]


def test_frequency_ranks_the_most_used_first():
    c = chunk([[2, 0], [2, 1], [1, 1], [2, 1]])
    f = predictors.Frequency(2, E)
    f.fit(c)
    f.finish(f)
    assert top1(f, c, 0).tolist() == [2, 2, 2, 2] and top1(f, c, 1).tolist() == [1, 1, 1, 1]
    assert f.prob(0).tolist() == [0.0, 0.25, 0.75, 0.0]


def test_transition_learns_a_map_and_backs_off_for_unseen_rows():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, 200)  # expert 3 never seen at layer 0
    c = chunk(np.stack([a, (a + 1) % E], axis=1))
    p = fitted(predictors.Transition(2, E, 1), c)
    assert np.array_equal(top1(p, c, 1), (a + 1) % E)
    unseen = chunk([[3, 0]])
    assert top1(p, unseen, 1)[0] == np.argmax(np.bincount((a + 1) % E, minlength=E))  # the frequency top-1


def test_history_uses_two_layers_where_one_is_ambiguous():
    # expert at layer 2 = (layer0 + layer1) % E: one previous layer cannot tell, two can
    rng = np.random.default_rng(1)
    x = rng.integers(0, E, (400, 2))
    c = chunk(np.column_stack([x, x.sum(axis=1) % E]))
    p = fitted(predictors.History(3, E, 2), c)
    assert p.name == "history-2" and p.targets() == [1, 2]
    assert np.array_equal(top1(p, c, 2), x.sum(axis=1) % E)


@pytest.mark.parametrize("dense_limit", [predictors.DENSE_LIMIT, 1])
def test_count_table_dense_and_sparse_agree(monkeypatch, dense_limit):
    monkeypatch.setattr(predictors, "DENSE_LIMIT", dense_limit)
    t = predictors.CountTable(10, E)
    assert t.dense == (dense_limit > 10 * E)
    t.add(np.array([1, 1, 3, 9, 11, -1]), np.array([2, 2, 0, 3, 1, 1]))  # 11 and -1 are out of range
    t.finish()
    rows = t.rows(np.array([1, 3, 5, 11, -2]))
    want = np.zeros((5, E))
    want[0, 2] = 2
    want[1, 0] = 1
    assert np.array_equal(rows, want)


def test_backoff_never_reorders_different_counts():
    counts = np.array([[3.0, 2.0, 2.0, 0.0]])
    fallback = np.array([0.0, 0.1, 0.9, 1.0])
    s = predictors.backoff(counts, fallback)
    assert evaluation.topk_experts(s, 4)[0].tolist() == [0, 2, 1, 3]


def test_token_id_predictor():
    tokens = np.array([5, 5, 7, 7, 7, 9])
    c = chunk(np.array([[1], [1], [3], [3], [2], [0]]), tokens=tokens)
    p = fitted(predictors.TokenId(1, E, vocab=10), c)
    assert top1(p, c, 0).tolist() == [1, 1, 3, 3, 3, 0]


def test_temporal_predictor_reads_the_previous_step():
    ex = np.array([[0], [1], [2], [3], [0]])
    prev = np.array([[-1], [0], [1], [2], [3]])
    c = chunk(ex, prev_step=prev)
    p = fitted(predictors.Temporal(1, E), c)
    assert top1(p, c, 0)[1:].tolist() == [1, 2, 3, 0]


def test_pregate_applies_the_next_router_to_the_current_hidden_state():
    rng = np.random.default_rng(2)
    w = [rng.normal(size=(E, 6)).astype(np.float32) for _ in range(2)]
    h = [rng.normal(size=(30, 6)).astype(np.float32) for _ in range(2)]
    c = chunk(np.zeros((30, 2)), hidden=h)
    p = predictors.Pregate(2, E, 1, w, [None, np.ones(E, np.float32)])
    assert p.needs_hidden and p.targets() == [1]
    assert np.allclose(p.scores(c, 1), h[0] @ w[1].T + 1.0)


def test_learned_predictor_learns_a_deterministic_map_and_reports_curves():
    rng = np.random.default_rng(3)
    a = rng.integers(0, E, 3000)
    c = chunk(np.stack([a, (a * 3 + 1) % E], axis=1), sample=np.arange(3000) // 10)
    p = fitted(predictors.Learned(2, E, use_hidden=False, keep_prob=1.0, steps=60, seed=0), c)
    assert p.targets() == [1]
    assert (top1(p, c, 1) == (a * 3 + 1) % E).mean() == 1.0
    d = p.describe()
    assert d["steps"] == 60 and d["train_tokens"]["1"] + d["val_tokens"]["1"] == 3000
    curve = d["loss_curves"]["1"]
    assert [pt["step"] for pt in curve] == list(range(10, 61, 10))
    assert curve[-1]["loss"] < curve[0]["loss"] and curve[-1]["val_loss"] < np.log(E)


def test_predictor_key_names_predictor_and_lookahead():
    assert predictors.predictor_key(predictors.Transition(4, E, 2)) == "transition@2"
    assert predictors.predictor_key(predictors.Frequency(4, E)) == "frequency@0"


def test_ranks_and_topk_share_the_tie_rule():
    rng = np.random.default_rng(4)
    s = rng.integers(0, 3, (200, 6)).astype(np.float64)  # many ties
    y = rng.integers(0, 6, 200)
    ranks = evaluation.true_ranks(s, y)
    order = evaluation.topk_experts(s, 6)
    assert np.array_equal(ranks, np.argmax(order == y[:, None], axis=1))


def test_split_by_dataset():
    sp = evaluation.Split(test_datasets=("b",), train_datasets=("a",))
    assert sp.assign(["x", "y", "z"], ["a", "b", "c"]).tolist() == [0, 1, -1]
    assert sp.describe()["by"] == "dataset"
    u = [evaluation.hash_unit(f"s{i}", 7) for i in range(1000)]
    assert all(0.0 <= x < 1.0 for x in u) and abs(np.mean(u) - 0.5) < 0.05
    assert evaluation.hash_unit("s1", 7) == evaluation.hash_unit("s1", 7) != evaluation.hash_unit("s1", 8)


def test_summarize_weights_target_layers_by_tokens():
    def row(target, tokens, r1):
        return {"predictor": "p", "lookahead": 1, "target": target, "dataset": "all", "tokens": tokens,
                "recall": {"1": r1}, "ci95": {"1": [r1 - 0.1, r1 + 0.1]}}
    out = evaluation.summarize([row("enc.3", 100, 0.5), row("enc.5", 300, 0.9),
                                {**row("enc.5", 50, 0.0), "dataset": "other"}])
    assert len(out) == 1 and out[0]["targets"] == ["enc.3", "enc.5"] and out[0]["tokens"] == 400
    assert out[0]["top1"] == pytest.approx((0.5 * 100 + 0.9 * 300) / 400)
    assert out[0]["ci95"]["1"] == pytest.approx([out[0]["top1"] - 0.1, out[0]["top1"] + 0.1])
    assert out[0]["rank"] == 1
