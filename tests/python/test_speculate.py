"""moetrace speculate: known-answer predictor tests on hand-made stores, the split's leakage test, and
the cache simulator against brute force (Belady never below LRU/LFU, LRU against a plain model)."""

import itertools
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))

from analysis_testutil import make_store, png_size, write_safetensors  # noqa: E402
from moetrace import open_store, speculate  # noqa: E402
from moetrace.speculate import Options, Split  # noqa: E402

E = 8


def opts(**kw):
    base = dict(split=Split(seed=0, test_fraction=0.3), learned_steps=150, cache_sizes=(1, 2, 4))
    base.update(kw)
    return Options(**base)


def summary_of(res, stack="encoder"):
    return {(r["predictor"], r["lookahead"]): r for r in res[stack]["summary"]}


def cells(res, predictor, lookahead, stack="encoder", dataset="all"):
    return [r for r in res[stack]["results"]
            if r["predictor"] == predictor and r["lookahead"] == lookahead and r["dataset"] == dataset]


def random_tokens(t, seed=99):
    return np.random.default_rng(seed).integers(2, 120, size=t).astype(np.int32)


# ---------------------------------------------------------------- splits and leakage


def test_split_is_by_sample_seeded_and_disjoint():
    ids = [f"glue/mrpc/default/train/{k}" for k in range(2000)]
    sp = Split(seed=3, test_fraction=0.25)
    a = sp.assign(ids, ["glue/mrpc"] * 2000)
    assert set(np.unique(a)) == {0, 1}
    assert 0.2 < a.mean() < 0.3
    assert np.array_equal(a, sp.assign(ids, ["glue/mrpc"] * 2000))  # deterministic
    rev = sp.assign(ids[::-1], ["glue/mrpc"] * 2000)[::-1]
    assert np.array_equal(a, rev)  # independent of order: a sample's role depends on its id only
    assert not np.array_equal(a, Split(seed=4, test_fraction=0.25).assign(ids, ["glue/mrpc"] * 2000))
    b = Split(test_datasets=("squad",)).assign(["x", "y", "z"], ["glue/mrpc", "squad", "glue/sst2"])
    assert b.tolist() == [0, 1, 0]
    c = Split(test_datasets=("squad",), train_datasets=("glue/mrpc",)).assign(
        ["x", "y", "z"], ["glue/mrpc", "squad", "glue/sst2"])
    assert c.tolist() == [0, 1, -1]


def test_no_leakage_between_train_and_test(tmp_path):
    """Train samples follow one permutation between layers, test samples another that differs for
    every expert: any test sample seen in training would make `transition` right sometimes."""
    n, length = 120, 20
    ids = [f"ds/a/default/train/{k}" for k in range(n)]
    role = Split(seed=0, test_fraction=0.3).assign(ids, ["ds/a"] * n)
    assert 0 < role.sum() < n
    rng = np.random.default_rng(0)
    e1 = rng.integers(0, E, size=n * length)
    tok_role = np.repeat(role, length)
    e3 = np.where(tok_role == 1, (e1 + 1) % E, e1)
    path = make_store(str(tmp_path / "s"), lengths=[length] * n, experts={"enc.1": e1, "enc.3": e3},
                      num_experts=E, sample_ids=ids, datasets=["ds/a"] * n, token_ids=random_tokens(n * length))
    res = speculate.speculate_store(open_store(path), opts(predictors=("transition", "history")))
    st = res["encoder"]
    assert st["train"]["samples"] == int((role == 0).sum()) and st["test"]["samples"] == int(role.sum())
    assert st["train"]["tokens"] + st["test"]["tokens"] == n * length
    assert cells(res, "transition", 1)[0]["top1"] == 0.0
    assert cells(res, "history-2", 1)[0]["top1"] == 0.0


# ---------------------------------------------------------------- known-answer predictors


def test_deterministic_map_gives_full_accuracy(tmp_path):
    n, length = 80, 25
    rng = np.random.default_rng(1)
    e = rng.integers(0, E, size=n * length)
    experts = {}
    for i in (1, 3, 5, 7):
        experts[f"enc.{i}"] = e
        e = rng.permutation(E)[e]
    path = make_store(str(tmp_path / "s"), lengths=[length] * n, experts=experts, num_experts=E,
                      token_ids=random_tokens(n * length))
    res = speculate.speculate_store(open_store(path), opts())
    s = summary_of(res)
    for d in (1, 2, 3):
        assert s[("transition", d)]["top1"] == 1.0
        for r in cells(res, "transition", d):
            assert r["top1"] == 1.0 and r["ci95"]["1"] == [1.0, 1.0]
    assert s[("history-2", 1)]["top1"] == 1.0 and s[("history-3", 1)]["top1"] == 1.0
    assert s[("learned", 1)]["top1"] > 0.95
    curve = next(iter(res["encoder"]["learned"]["loss_curves"].values()))
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert s[("frequency", 0)]["top1"] < 0.3
    assert [r["rank"] for r in res["encoder"]["summary"]] == list(range(1, len(res["encoder"]["summary"]) + 1))


def test_uniform_routing_gives_k_over_e(tmp_path):
    n, length, e = 300, 40, 16
    rng = np.random.default_rng(5)
    experts = {f"enc.{i}": rng.integers(0, e, size=n * length) for i in (1, 3, 5)}
    path = make_store(str(tmp_path / "s"), lengths=[length] * n, experts=experts, num_experts=e,
                      token_ids=random_tokens(n * length), samples_per_shard=50)
    res = speculate.speculate_store(open_store(path), opts(predictors=("frequency", "transition", "token"),
                                                           simulate=False))
    for row in res["encoder"]["summary"]:
        for k in (1, 2, 4, 8, 16):
            p = k / e
            sigma = np.sqrt(p * (1 - p) / row["tokens"])
            assert abs(row["recall"][str(k)] - p) < 4 * sigma + 1e-9, (row["predictor"], k)
    for r in res["encoder"]["results"]:  # the intervals are sensible and cover k/E almost always
        lo, hi = r["ci95"]["1"]
        assert lo <= r["top1"] <= hi and hi - lo < 0.1


def test_token_predictor_and_per_dataset_cells(tmp_path):
    n, length = 60, 30
    rng = np.random.default_rng(2)
    tokens = rng.integers(2, 50, size=n * length).astype(np.int32)
    table = rng.integers(0, E, size=60)
    ds = ["glue/mrpc" if k % 2 else "squad" for k in range(n)]
    path = make_store(str(tmp_path / "s"), lengths=[length] * n, experts={"enc.1": table[tokens],
                      "enc.3": rng.integers(0, E, size=n * length)}, num_experts=E, token_ids=tokens, datasets=ds)
    res = speculate.speculate_store(open_store(path), opts(predictors=("token", "frequency"), simulate=False))
    tok = {r["target"]: r for r in cells(res, "token", 0)}
    assert tok["enc.1"]["top1"] == 1.0
    assert tok["enc.3"]["top1"] < 0.4
    by_ds = cells(res, "token", 0, dataset="squad") + cells(res, "token", 0, dataset="glue/mrpc")
    assert len(by_ds) == 4
    assert sum(r["tokens"] for r in by_ds) == 2 * sum(r["tokens"] for r in cells(res, "token", 0)) / 2 * 1


def test_pregate_uses_router_weights(tmp_path):
    n, length, d = 60, 20, 12
    rng = np.random.default_rng(4)
    t = n * length
    h1 = rng.normal(size=(t, d)).astype(np.float32)
    h3 = rng.normal(size=(t, d)).astype(np.float32)
    w = {i: rng.normal(size=(E, d)).astype(np.float32) for i in (1, 3, 5)}
    experts = {"enc.1": (h1 @ w[1].T).argmax(1), "enc.3": (h1 @ w[3].T).argmax(1), "enc.5": (h3 @ w[5].T).argmax(1)}
    path = make_store(str(tmp_path / "s"), lengths=[length] * n, experts=experts, num_experts=E, d_model=d,
                      hidden={"enc.1": h1, "enc.3": h3, "enc.5": h3}, token_ids=random_tokens(t))
    routers = str(tmp_path / "routers.safetensors")
    write_safetensors(routers, {f"enc.{i}.router.weight": w[i] for i in w}, {"format": "moetrace-routers"})
    res = speculate.speculate_store(open_store(path), opts(predictors=("pregate", "learned"), routers=routers,
                                                           simulate=False))
    pg = {r["target"]: r["top1"] for r in cells(res, "pregate", 1)}
    assert pg == {"enc.3": 1.0, "enc.5": 1.0}
    assert summary_of(res)[("learned", 1)]["top1"] > 0.5  # hidden states are features of the learned model
    # without router weights or hidden states pregate is reported unavailable, not faked
    res = speculate.speculate_store(open_store(path), opts(predictors=("pregate",), simulate=False))
    assert "encoder/pregate" in res["unavailable"] and not res["encoder"]["results"]


def test_pregate_unavailable_without_hidden(tmp_path):
    path = make_store(str(tmp_path / "s"), lengths=[5] * 10, experts={"enc.1": np.zeros(50, int), "enc.3": np.zeros(50, int)},
                      num_experts=E)
    res = speculate.speculate_store(open_store(path), opts(predictors=("pregate", "frequency"), routers="x"))
    assert "hidden" in res["unavailable"]["encoder/pregate"]


def test_decoder_temporal(tmp_path):
    n, glen = 50, 12
    rng = np.random.default_rng(6)
    perm = rng.permutation(E)
    dec = np.zeros(n * glen, np.int64)
    for k in range(n):  # each step's expert is a fixed permutation of the previous step's
        x = rng.integers(0, E)
        for s in range(glen):
            dec[k * glen + s] = x
            x = perm[x]
    path = make_store(str(tmp_path / "s"), lengths=[6] * n, experts={"enc.1": rng.integers(0, E, 6 * n)},
                      num_experts=E, dec_lengths=[glen] * n, dec_experts={"dec.1": dec, "dec.3": rng.integers(0, E, n * glen)})
    res = speculate.speculate_store(open_store(path), opts())
    tmp = {r["target"]: r for r in cells(res, "temporal", 0, stack="decoder")}
    first_steps = res["decoder"]["test"]["samples"]
    # every step but the first of each sample is predicted exactly
    assert tmp["dec.1"]["top1"] * tmp["dec.1"]["tokens"] >= tmp["dec.1"]["tokens"] - first_steps
    assert res["decoder"]["cache"]["mode"] == "decode"


# ---------------------------------------------------------------- cache simulator


def lru_reference(seq, cap):
    cache, hits = [], 0
    for e in seq:
        if e in cache:
            hits += 1
            cache.remove(e)
        elif len(cache) == cap:
            cache.pop(0)
        cache.append(e)
    return hits


def optimal_hits(seq, cap, num_experts):
    """Exhaustive optimum over every choice of what to keep after each request (tiny inputs)."""
    best = {frozenset(): 0}
    for r in seq:
        nxt = {}
        for cache, h in best.items():
            h2 = h + len(set(r) & cache)
            pool = sorted(cache | set(r))
            for keep in itertools.chain.from_iterable(itertools.combinations(pool, m) for m in range(min(cap, len(pool)) + 1)):
                key = frozenset(keep)
                if nxt.get(key, -1) < h2:
                    nxt[key] = h2
        best = nxt
    return max(best.values())


@pytest.mark.parametrize("seed", range(6))
def test_lru_matches_reference_on_single_requests(seed):
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, E, size=400).tolist()
    for cap in (1, 3, 6):
        r = speculate.simulate_cache([[e] for e in seq], cap, "lru", E)
        assert r["hits"] == lru_reference(seq, cap)
        assert r["demand_loads"] == len(seq) - r["hits"]


@pytest.mark.parametrize("seed", range(8))
def test_belady_is_optimal_on_tiny_inputs(seed):
    rng = np.random.default_rng(seed)
    ne = 5
    seq = [sorted(set(rng.integers(0, ne, size=rng.integers(1, 3)).tolist())) for _ in range(9)]
    for cap in (1, 2, 3):
        r = speculate.simulate_cache(seq, cap, "belady", ne)
        assert r["hits"] == optimal_hits(seq, cap, ne)


@pytest.mark.parametrize("seed", range(10))
def test_belady_never_below_lru_lfu(seed):
    rng = np.random.default_rng(seed)
    # skewed, bursty requests of 1-5 experts
    p = rng.dirichlet(np.ones(E) * 0.5)
    seq = [sorted(set(rng.choice(E, size=rng.integers(1, 6), p=p).tolist())) for _ in range(300)]
    for cap in (1, 2, 4, 6):
        b = speculate.simulate_cache(seq, cap, "belady", E)["hits"]
        for pol in ("lru", "lfu"):
            assert b >= speculate.simulate_cache(seq, cap, pol, E)["hits"], (pol, cap)


def test_prefetch_of_the_right_experts_gives_full_hits():
    rng = np.random.default_rng(0)
    seq = [[int(e)] for e in rng.integers(0, E, size=200)]
    r = speculate.simulate_cache(seq, 1, "lru", E, prefetch=seq)
    assert r["hit_rate"] == 1.0 and r["demand_loads"] == 0 and r["prefetch_loads"] > 0
    tm = speculate.TimeModel(expert_bytes=24e6, bandwidth_gbs=24.0, layer_ms=0.5)
    assert tm.transfer_ms([1])[0] == pytest.approx(1.0)
    assert tm.request_ms([1], [0]) == pytest.approx(1.5)   # demand load stalls
    assert tm.request_ms([0], [1]) == pytest.approx(1.0)   # prefetch overlaps 0.5 ms of compute


def test_store_cache_runs_respect_belady_bound(tmp_path):
    rng = np.random.default_rng(8)
    n = 80
    lengths = rng.integers(1, 6, size=n)
    t = int(lengths.sum())
    p = rng.dirichlet(np.ones(E))
    experts = {f"enc.{i}": rng.choice(E, size=t, p=p) for i in (1, 3, 5)}
    path = make_store(str(tmp_path / "s"), lengths=lengths, experts=experts, num_experts=E, token_ids=random_tokens(t))
    res = speculate.speculate_store(open_store(path), opts(predictors=("frequency", "transition")))
    c = res["encoder"]["cache"]
    for size in c["cache_sizes"]:
        runs = {(r["policy"], r["prefetch"]): r for r in c["runs"] if r["cache_experts_per_layer"] == size}
        assert runs[("belady", False)]["hit_rate"] >= max(runs[("lru", False)]["hit_rate"], runs[("lfu", False)]["hit_rate"])
        for r in runs.values():
            assert c["all_on_gpu_ms_per_token"] <= r["ms_per_token"] + 1e-12
            assert r["bytes_transferred"] == r["experts_transferred"] * c["expert_bytes"]
    assert c["no_cache_bytes"] >= max(r["bytes_transferred"] for r in c["runs"] if not r["prefetch"])


# ---------------------------------------------------------------- command line


def test_cli_end_to_end(tmp_path):
    rng = np.random.default_rng(9)
    n = 40
    experts = {f"enc.{i}": rng.integers(0, E, size=n * 10) for i in (1, 3, 5)}
    path = make_store(str(tmp_path / "s"), lengths=[10] * n, experts=experts, num_experts=E,
                      datasets=["a" if k % 2 else "b" for k in range(n)])
    out = tmp_path / "out"
    rc = speculate.main([path, "-o", str(out), "-q", "--cache-sizes", "1,2,4", "--cache-bytes", "2MiB",
                         "--predictors", "frequency,transition,token,pregate", "--learned-steps", "20"])
    assert rc == 0
    res = json.loads((out / "speculation.json").read_text())
    assert res["encoder"]["cache"]["cache_sizes"][0] >= 1
    assert "encoder/pregate" in res["unavailable"]
    md = (out / "speculation.md").read_text()
    assert "| rank | predictor" in md
    assert png_size(out / "encoder_recall_at_k.png") == (1000, 450)
    assert png_size(out / "encoder_cache_hit_rate.png") == (1000, 450)
    res = json.loads((out / "speculation.json").read_text())
    rc = speculate.main([path, "-o", str(tmp_path / "o2"), "-q", "--test-datasets", "a", "--no-plots", "--no-cache"])
    assert rc == 0
    r2 = json.loads((tmp_path / "o2" / "speculation.json").read_text())
    assert r2["split"]["by"] == "dataset" and r2["encoder"]["test"]["samples"] == n // 2
    with pytest.raises(SystemExit):
        speculate.main([path, "--predictors", "oracle"])


def test_recall_cell_matches_cluster_formula():
    rng = np.random.default_rng(11)
    sizes = rng.integers(1, 30, size=40)
    sample = np.repeat(np.arange(40), sizes)
    ranks = rng.integers(0, E, size=sample.size)
    cell = speculate.RecallCell(E)
    half = sample.size // 2  # two chunks, the cut inside a sample
    for part in (slice(0, half), slice(half, None)):
        s = sample[part]
        inv = np.concatenate([[0], np.cumsum(np.diff(s) != 0)])
        cell.add(ranks[part], inv, int(inv[-1]) + 1)
    r = cell.result()
    for k in (1, 2, 4):
        hit = (ranks < k).astype(float)
        p = hit.mean()
        assert r["recall"][str(k)] == pytest.approx(p)
        # the cut sample counts as two clusters, exactly as the streaming cell sees it
        cl = np.concatenate([sample[:half], sample[half:] + 1000])
        ids = np.unique(cl)
        h = np.array([hit[cl == i].sum() for i in ids])
        n = np.array([(cl == i).sum() for i in ids], float)
        var = len(ids) / (len(ids) - 1) * np.sum((h - p * n) ** 2) / n.sum() ** 2
        assert r["ci95"][str(k)][0] == pytest.approx(max(0, p - 1.959963984540054 * np.sqrt(var)))


def test_torch_example_loads_the_same_split(tmp_path):
    from moetrace.examples import train_predictor
    n, length = 30, 10
    rng = np.random.default_rng(12)
    experts = {f"enc.{i}": rng.integers(0, E, size=n * length) for i in (1, 3, 5)}
    path = make_store(str(tmp_path / "s"), lengths=[length] * n, experts=experts, num_experts=E)
    split = Split(seed=0, test_fraction=0.3)
    xtr, ytr, xte, yte = train_predictor.load_split(open_store(path), "enc.5", split, 10 ** 9)
    role = split.assign([f"ds/a/default/train/{k}" for k in range(n)], ["ds/a"] * n)
    assert len(yte) == role.sum() * length and len(ytr) == (n - role.sum()) * length
    assert xtr.shape[1] == 2 * E  # one-hot experts of enc.3 and enc.1 (no hidden states stored)
    tok_role = np.repeat(role, length)
    assert np.array_equal(ytr, experts["enc.5"][tok_role == 0])
    assert np.array_equal(xte[:, :E].argmax(1), experts["enc.3"][tok_role == 1])
    pytest.importorskip("torch")
    assert train_predictor.main([path, "--epochs", "1"]) == 0


def test_replay_can_be_bounded(tmp_path):
    rng = np.random.default_rng(13)
    n = 30
    experts = {f"enc.{i}": rng.integers(0, E, size=n * 4) for i in (1, 3)}
    path = make_store(str(tmp_path / "s"), lengths=[4] * n, experts=experts, num_experts=E)
    res = speculate.speculate_store(open_store(path), opts(predictors=("frequency",), encoder_replay="token",
                                                           max_replay=7))
    c = res["encoder"]["cache"]
    assert c["truncated"] and c["requests_per_layer"] == 7 and c["tokens"] == 7
    assert all(r["accesses"] == 7 * 2 for r in c["runs"])


@pytest.mark.parametrize("n,layers", [(1, (1,)), (3, (1,)), (2, (1, 3))])
def test_tiny_stores_do_not_break(tmp_path, n, layers):
    rng = np.random.default_rng(14)
    experts = {f"enc.{i}": rng.integers(0, E, size=n * 3) for i in layers}
    path = make_store(str(tmp_path / "s"), lengths=[3] * n, experts=experts, num_experts=E)
    out = tmp_path / "o"
    assert speculate.main([path, "-o", str(out), "-q", "--test-fraction", "0.5", "--learned-steps", "5"]) == 0
    from moetrace import analysis
    assert analysis.main([path, "-o", str(tmp_path / "a"), "-q"]) == 0
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["encoder"]["transitions"] == [] or len(layers) > 1


def test_pregate_on_bf16_hidden_states(tmp_path):
    from analysis_testutil import from_bf16_bits, to_bf16_bits
    n, length, d = 30, 10, 16
    rng = np.random.default_rng(15)
    bits = to_bf16_bits(rng.normal(size=(n * length, d)).astype(np.float32))
    h = from_bf16_bits(bits)
    w = {i: rng.normal(size=(E, d)).astype(np.float32) for i in (1, 3)}
    experts = {f"enc.{i}": (h @ w[i].T).argmax(1) for i in (1, 3)}
    path = make_store(str(tmp_path / "s"), lengths=[length] * n, experts=experts, num_experts=E, d_model=d,
                      hidden={"enc.1": bits, "enc.3": bits}, token_ids=random_tokens(n * length))
    routers = str(tmp_path / "r.safetensors")
    write_safetensors(routers, {f"enc.{i}.router.weight": w[i] for i in w}, {})
    res = speculate.speculate_store(open_store(path), opts(predictors=("pregate",), routers=routers, simulate=False))
    assert [r["top1"] for r in cells(res, "pregate", 1)] == [1.0]


def test_pregate_reports_failed_router_extraction(tmp_path, monkeypatch):
    rng = np.random.default_rng(16)
    h = rng.normal(size=(40, 8)).astype(np.float32)
    path = make_store(str(tmp_path / "s"), lengths=[4] * 10, experts={"enc.1": h.argmax(1) % E, "enc.3": h.argmax(1) % E},
                      num_experts=E, d_model=8, hidden={"enc.1": h, "enc.3": h})
    monkeypatch.setenv("MOETRACE_EXE", str(tmp_path / "no-such-moetrace"))
    res = speculate.speculate_store(open_store(path), opts(predictors=("pregate",), model=str(tmp_path), simulate=False))
    assert set(res["unavailable"]) == {"encoder/pregate"}
    assert "no-such-moetrace" in res["unavailable"]["encoder/pregate"] or "No such file" in res["unavailable"]["encoder/pregate"]
