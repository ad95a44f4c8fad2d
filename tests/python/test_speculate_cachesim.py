"""moetrace.cachesim's replay pieces (layer_requests, replay) on hand-made routing: no store."""

import numpy as np
import pytest

from moetrace.cachesim import TimeModel, layer_requests, replay


def test_layer_requests_group_rows_and_order_predictions():
    ex = np.array([[0, 3], [2, 3], [0, 1], [1, 1]])  # 4 tokens, 2 MoE layers
    groups = [np.array([0, 1, 2]), np.array([3])]  # two prefill sequences
    top = np.array([[[1]], [[2]], [[2]], [[0]]])[:, [0, 0], :]  # [n, L, k=1]: same prediction for both layers
    reqs, pre = layer_requests(ex, groups, top)
    assert reqs == [[[0, 2], [1]], [[1, 3], [1]]]
    assert pre[0] == [[2, 1], [0]]  # expert 2 predicted twice in the first sequence: first
    assert layer_requests(ex, groups)[1] is None


def test_replay_counts_hits_bytes_and_time():
    reqs = [[[0], [1], [0]]]  # one layer, three decode steps
    tm = TimeModel(expert_bytes=1e9, bandwidth_gbs=1.0, layer_ms=2.0)  # 1 s (1000 ms) per expert moved
    runs = replay(reqs, [[[2], [2], [2]]], sizes=[1, 2], policies=["lru"], num_experts=3, tm=tm, tokens=3)
    by = {(r["cache_experts_per_layer"], r["prefetch"]): r for r in runs}
    assert set(by) == {(1, False), (1, True), (2, False), (2, True)}
    assert by[(1, False)]["hits"] == 0 and by[(2, False)]["hits"] == 1
    assert by[(1, False)]["bytes_transferred"] == 3e9 and by[(1, False)]["cache_bytes"] == 1e9
    assert by[(1, False)]["ms_per_token"] == pytest.approx((3 * 2.0 + 3 * 1000.0) / 3)
    wrong = by[(1, True)]  # prefetches an expert never needed, evicting the one that is: every access misses
    assert wrong["hits"] == 0 and wrong["prefetch_loads"] == 3 and wrong["experts_transferred"] == 6
    right = replay(reqs, [[[0], [1], [0]]], [1], ["lru"], 2, tm, 3)
    assert [r["hit_rate"] for r in right] == [0.0, 1.0]
