"""moetrace.stats: the statistics of one vector or matrix, against independent references (scipy where
it has the same function, brute force elsewhere), and the package's one softmax."""

import numpy as np
import pytest

import moetrace
from moetrace import stats
from moetrace.store import LayerView

scipy_stats = pytest.importorskip("scipy.stats")  # scripts/requirements.txt installs it
from scipy.spatial.distance import jensenshannon  # noqa: E402


def count_vectors(seed=0, n=40):
    rng = np.random.default_rng(seed)
    out = [rng.integers(0, 1000, size=int(rng.choice([2, 8, 64, 128]))).astype(np.int64) for _ in range(n)]
    out[0][:] = 7                  # all equal
    out[1][:] = 0
    out[1][3] = 5                  # one expert takes all
    return out


def test_one_softmax_everywhere():
    assert moetrace.softmax is stats.softmax
    assert moetrace.store.softmax is stats.softmax
    assert LayerView.probs.fget.__globals__["softmax"] is stats.softmax


def test_softmax_matches_the_definition_and_is_stable():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 7, 9)).astype(np.float32) * 30
    p, lse = stats.softmax(x, with_logsumexp=True)
    x64 = x.astype(np.float64)
    want_lse = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1)) + x64.max(-1)
    assert p.dtype == np.float32 and p.shape == x.shape
    np.testing.assert_allclose(p, np.exp(x64 - want_lse[..., None]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    assert np.array_equal(stats.softmax(x), p)  # the same numbers with or without the logsumexp
    big = np.array([[1e4, 0.0, -1e4]], np.float32)
    assert np.isfinite(stats.softmax(big)).all() and stats.softmax(big)[0, 0] == 1.0
    empty, lse0 = stats.softmax(np.zeros((0, 4), np.float32), with_logsumexp=True)
    assert empty.shape == (0, 4) and lse0.shape == (0,)


def test_logit_features_margin_is_top1_minus_top2():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    probs, lse, margin = stats.logit_features(x)
    s = np.sort(x, axis=1)
    assert np.array_equal(margin, s[:, -1] - s[:, -2])
    assert np.array_equal(probs, stats.softmax(x))
    _, _, m1 = stats.logit_features(x[:, :1])
    assert np.array_equal(m1, np.zeros(50, np.float32))


def test_entropy_and_jsd_agree_with_scipy():
    vs = count_vectors()
    for c in vs:
        assert stats.entropy_bits(c) == pytest.approx(scipy_stats.entropy(c, base=2) if c.sum() else 0.0, abs=1e-12)
    for a, b in zip(vs[2:], vs[3:]):
        if a.size != b.size:
            continue
        assert stats.jsd_bits(a, b) == pytest.approx(jensenshannon(a, b, base=2) ** 2, abs=1e-12)
    assert stats.jsd_bits([1, 0], [0, 1]) == pytest.approx(1.0)
    assert stats.jsd_bits([0, 0], [1, 2]) == 0.0


def test_usage_moments_are_scipys():
    """Population std, biased Fisher skewness and kurtosis: scipy.stats' numbers (0 for equal counts,
    where scipy says nan)."""
    for c in count_vectors():
        u = stats.usage_stats(c)
        assert u["std"] == pytest.approx(np.std(c), rel=1e-12)
        if np.all(c == c[0]):
            assert u["skewness"] == 0.0 and u["kurtosis"] == 0.0
            continue
        assert u["skewness"] == pytest.approx(scipy_stats.skew(c, bias=True), rel=1e-9, abs=1e-12)
        assert u["kurtosis"] == pytest.approx(scipy_stats.kurtosis(c, fisher=True, bias=True), rel=1e-9, abs=1e-12)
        assert u["q25"] == pytest.approx(np.percentile(c, 25))


def test_gini_extremes():
    assert stats.gini([5, 5, 5, 5]) == pytest.approx(0.0)
    assert stats.gini([0, 0, 0, 8]) == pytest.approx(3 / 4)
    assert stats.gini([]) == 0.0


def test_joint_stats_mutual_information():
    indep = np.outer([1, 3], [2, 2, 4]) * 10
    assert stats.joint_stats(indep)["mutual_information_bits"] == pytest.approx(0.0, abs=1e-12)
    ident = np.diag([4, 4, 4, 4])
    j = stats.joint_stats(ident)
    assert j["mutual_information_bits"] == pytest.approx(2.0) and j["normalized_mi"] == pytest.approx(1.0)
    assert j["conditional_entropy_bits"] == pytest.approx(0.0, abs=1e-12)


def test_table_topk_accuracy_by_brute_force():
    rng = np.random.default_rng(3)
    c = rng.integers(0, 20, size=(6, 5))
    got = stats.table_topk_accuracy(c, ks=(1, 2, 5, 9))
    for k in (1, 2, 5, 9):
        hits = sum(sum(sorted(row, reverse=True)[:k]) for row in c.tolist())
        assert got[str(k)] == pytest.approx(hits / c.sum())


def test_hist_summary_percentiles_within_a_bin():
    edges = np.linspace(0.0, 1.0, 101)
    v = np.random.default_rng(4).random(10_000)
    h, _ = np.histogram(v, edges)
    s = stats.hist_summary(h, edges, float(v.sum()), float((v * v).sum()), float(v.min()), float(v.max()))
    assert s["mean"] == pytest.approx(v.mean()) and s["std"] == pytest.approx(v.std())
    for p in (10, 50, 90):
        assert abs(s[f"p{p}"] - np.percentile(v, p)) <= 0.01
    assert stats.hist_summary(np.zeros(3), np.arange(4.0), 0, 0, 0, 0) == {"count": 0}


def test_token_expert_stats_consistency():
    # token 1 always expert 0, token 2 half 0 / half 1
    e = 2
    keys = np.array([1 * e + 0, 2 * e + 0, 2 * e + 1])
    counts = np.array([10, 5, 5])
    s = stats.token_expert_stats(keys, counts, e, min_count=10)
    assert s["unique_tokens"] == 2
    assert s["consistency"] == pytest.approx((10 + 5) / 20)
    assert 0.0 < s["explained_fraction"] < 1.0


def test_log_softmax_is_the_log_of_softmax_without_underflow():
    x = np.array([[0.0, 1.0, 2.0], [1e3, 0.0, -1e3]], np.float32)
    ls = stats.log_softmax(x)
    np.testing.assert_allclose(ls[0], np.log(stats.softmax(x)[0]), rtol=1e-6)
    assert np.isfinite(ls).all() and ls[1, 2] == pytest.approx(-2e3)  # log(softmax) would be -inf
    assert stats.log_softmax(np.zeros((0, 3), np.float32)).shape == (0, 3)
