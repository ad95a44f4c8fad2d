"""Format version 2 in the Python package: top-k routing (expert/gate [S, k]), stores without `dropped`, the
lm./gen. layers of a language model's store and `--logits topk:K`, through the reader, the summary,
export-pickle, Parquet, analyze and speculate (recall@k against a token's k true experts, the cache
simulator loading k experts per token). Stores come from conftest's numpy writer; the C++ verify reads them
too."""

import json
import os
import subprocess

import numpy as np
import pytest

import moetrace
from moetrace import analysis, keys, speculate
from moetrace.cachesim import layer_requests
from moetrace.compat import gating_records, export_pickle
from moetrace.evaluation import RecallCell, true_ranks
from moetrace.speculate import Options, Split
from conftest import moetrace_cli, run_module, write_safetensors


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_language_model_store_reads_back(store_factory):
    path, truth = store_factory("lm", family="olmoe", top_k=2, dec_layers=(1,), hidden_dtype="F32")
    store = moetrace.open_store(path)
    assert (store.family, store.top_k, store.has_dropped, store.logits_topk) == ("olmoe", 2, False, 0)
    assert store.layers == ["lm.1", "lm.3", "lm.5", "gen.1"] and store.manifest["format_version"] == 2
    for sample, want in zip(store, truth):
        for name in store.layers:
            view, w = sample.layer(name), want["layers"][name]
            assert view.expert.shape == (len(w["expert"]), 2)
            assert np.array_equal(view.expert, w["expert"]) and np.array_equal(view.gate, w["gate"])
            assert not view.dropped.any() and view.dropped.shape == (len(w["expert"]),)
            assert view.router_topk_logits is None and view.topk_probs is None
            np.testing.assert_array_equal(view.router_logits, w["router_logits"])
        assert np.array_equal(sample.dec_input_ids, want["dec_input_ids"])
    assert np.array_equal(store[1].layer(3).expert, truth[1]["layers"]["lm.3"]["expert"])  # int -> lm.{i}
    assert store.column("lm.1.expert").shape == (store.manifest["num_tokens"], 2)
    assert store.dec_sample_offsets[-1] == store.manifest["num_decoder_tokens"]


def test_topk_logits_store_reads_back(store_factory):
    path, truth = store_factory("tk", family="mixtral", top_k=2, logits_topk=3, num_experts=8)
    store = moetrace.open_store(path)
    assert store.logits_topk == 3
    for sample, want in zip(store, truth):
        view, w = sample.layer("lm.3"), truth[sample.index]["layers"]["lm.3"]
        assert np.array_equal(view.router_topk_ids, w["router_topk_ids"])
        assert np.array_equal(view.router_topk_logits, w["router_topk_logits"])
        assert np.array_equal(view.router_lse, w["router_lse"])
        exact = np.take_along_axis(_softmax(w["router_logits"].astype(np.float64)), w["router_topk_ids"], 1)
        np.testing.assert_allclose(view.topk_probs, exact, rtol=4e-3)
        np.testing.assert_allclose(moetrace.store.topk_probs(view.router_topk_logits, view.router_lse),
                                   view.topk_probs)
        with pytest.raises(moetrace.StoreError, match=r"keeps only the 3 largest router logits.*topk:3"):
            view.probs


def test_manifest_must_match_its_layout(store_factory):
    path, _ = store_factory("bad", family="olmoe", top_k=2)
    m = json.load(open(os.path.join(path, "manifest.json")))
    for edit, message in (({"format_version": 1}, "format_version 1 does not match its layout"),
                          ({"routing": {"family": "gpt", "top_k": 2, "dropped": False}}, "routing.family must be"),
                          ({"routing": {"family": "olmoe", "top_k": 99, "dropped": False}}, "routing.top_k must be"),
                          ({"logits_topk": 0.5}, "logits_topk must be an integer")):
        with open(os.path.join(path, "manifest.json"), "w") as f:
            json.dump({**m, **edit}, f)
        with pytest.raises(moetrace.StoreError, match=message):
            moetrace.open_store(path)


@pytest.mark.parametrize("kw", [dict(family="olmoe", top_k=2, dec_layers=(1, 3)),
                                dict(family="qwen3_moe", top_k=3, logits_topk=4, dec_layers=(1,), hidden_dtype="BF16"),
                                dict(top_k=1, logits_topk=2),  # Switch with capacity and top-2 logits
                                dict(family="switch", dec_layers=(1,))])  # version 1, for comparison
def test_cpp_verify_and_python_summary_agree_on_the_numpy_stores(store_factory, kw):
    """The numpy writer's v2 stores are what the C++ reader expects: `moetrace verify` recomputes every count
    (each of the k choices once) and finds them equal, and so does `python -m moetrace summary`."""
    path, _ = store_factory("v", **kw)
    proc = subprocess.run([moetrace_cli(), "verify", path], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stdout + proc.stderr
    out = run_module("summary", path).stdout
    assert "manifest check  ok" in out
    store = moetrace.open_store(path)
    assert f"routing         {store.family}, top-{store.top_k}" in out
    inspect = subprocess.run([moetrace_cli(), "inspect", path], capture_output=True, text=True).stdout
    assert f"routing         {store.family}, top-{store.top_k}" in inspect
    # the C++ and the Python summaries print the same lines for what both know
    for prefix in ("routing ", "format ", "stored ", "experts used ", "  " + store.layers[0]):
        line = next(x for x in inspect.splitlines() if x.startswith(prefix))
        assert line in out.splitlines(), (line, out)


def test_export_pickle_holds_the_k_experts(store_factory, tmp_path):
    path, truth = store_factory("p", family="olmoe", top_k=2)
    store = moetrace.open_store(path)
    recs = list(gating_records(store))
    assert len(recs) == len(store) * 3
    for rec in recs:
        w = truth[[s.sample_id for s in store].index(rec["sample_id"])]["layers"][f"lm.{rec['layer_id']}"]
        assert rec["target_top_k"].shape == (rec["sequence_length"], 2)
        assert np.array_equal(rec["target_top_k"], w["expert"])
        assert np.array_equal(rec["target_routing"].argmax(axis=1), rec["target_top_k"][:, 0])
    meta = export_pickle(store, tmp_path / "out.pkl")
    assert meta["expert_distribution"] == store.manifest["expert_distribution"]  # each of the k choices
    # --logits topk:K: the K exact probabilities at their experts, zeros elsewhere
    path, truth = store_factory("pk", family="olmoe", top_k=2, logits_topk=3)
    rec = next(gating_records(path))
    w = truth[0]["layers"]["lm.1"]
    p = rec["target_routing"]
    assert np.count_nonzero(p, axis=1).max() <= 3 and np.all(p.sum(axis=1) <= 1 + 1e-3)
    np.testing.assert_allclose(np.take_along_axis(p, w["router_topk_ids"], 1),
                               np.take_along_axis(_softmax(w["router_logits"]), w["router_topk_ids"], 1), rtol=4e-3)


def test_parquet_and_pandas_of_a_topk_store(store_factory, tmp_path):
    import pyarrow.parquet as pq
    from moetrace.export import export_parquet
    path, truth = store_factory("pq", family="olmoe", top_k=2, logits_topk=3, dec_layers=(1,))
    store = moetrace.open_store(path)
    out = export_parquet(store, tmp_path / "pq", logits=True)
    table = pq.read_table(os.path.join(tmp_path / "pq", out["files"][0]))
    row = table.slice(0, 1).to_pylist()[0]
    w = truth[0]["layers"]["lm.1"]
    assert row["lm.1.expert"] == w["expert"].tolist() and row["lm.1.router_topk_ids"] == w["router_topk_ids"].tolist()
    assert row["lm.1.dropped"] == [False] * len(w["expert"]) and "dec_input_ids" in row
    df = store.to_pandas(logits=True)
    first = df[(df["layer"] == "lm.1") & (df["sample"] == 0)]
    assert first["expert"].tolist() == w["expert"][:, 0].tolist()
    assert [list(x) for x in first["experts"]] == w["expert"].tolist()
    assert np.array_equal(np.stack(first["router_topk_ids"]), w["router_topk_ids"])


def test_analyze_counts_every_choice_and_transitions_the_top1(store_factory):
    path, truth = store_factory("an", family="olmoe", top_k=2, num_samples=9)
    st = analysis.analyze_store(moetrace.open_store(path), examples=2)
    ex = {n: np.concatenate([t["layers"][n]["expert"] for t in truth]) for n in ("lm.1", "lm.3")}
    pl = st["encoder"]["per_layer"]
    assert pl["lm.1"]["expert_counts"] == np.bincount(ex["lm.1"].ravel(), minlength=8).tolist()
    tr = st["encoder"]["transitions"][0]
    want = np.zeros((8, 8), int)
    np.add.at(want, (ex["lm.1"][:, 0], ex["lm.3"][:, 0]), 1)
    assert (tr["from"], tr["to"]) == ("lm.1", "lm.3") and tr["counts"] == want.tolist()
    assert st["routing"] == {"family": "olmoe", "top_k": 2, "dropped": False} and st["notices"] == []
    assert pl["lm.1"]["aux_loss"] is not None


def test_analyze_a_topk_logits_store_uses_the_lse_and_says_what_it_skips(store_factory, tmp_path):
    path, truth = store_factory("al", family="olmoe", top_k=2, logits_topk=3, num_samples=9)
    st = analysis.analyze_store(moetrace.open_store(path), examples=0)
    pl = st["encoder"]["per_layer"]["lm.5"]
    lse = np.concatenate([t["layers"]["lm.5"]["router_lse"] for t in truth]).astype(np.float64)
    vals = np.concatenate([t["layers"]["lm.5"]["router_topk_logits"] for t in truth]).astype(np.float64)
    assert pl["aux_loss"] is None and "mean_router_prob" not in pl
    assert pl["z_loss"] == pytest.approx(float((lse ** 2).mean()), rel=1e-5)
    assert pl["margin"]["mean"] == pytest.approx(float((vals[:, 0] - vals[:, 1]).mean()), rel=1e-4, abs=1e-3)
    assert len(st["notices"]) == 1 and "aux_loss and mean_router_prob not computed" in st["notices"][0]
    proc = run_module("analyze", path, "-o", tmp_path / "out", "--no-plots")
    assert "analyze: notice: aux_loss and mean_router_prob not computed" in proc.stderr
    # the same store with full logits: z-loss and margin agree with the top-K store's
    full_path, _ = store_factory("af", family="olmoe", top_k=2, num_samples=9, logits_dtype="F16")
    full = analysis.analyze_store(moetrace.open_store(full_path), examples=0)["encoder"]["per_layer"]["lm.5"]
    assert full["z_loss"] == pytest.approx(pl["z_loss"], rel=1e-3)


def test_recall_against_the_set_of_true_experts():
    scores = np.array([[5.0, 4.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    y = np.array([[0, 2], [3, 2]])
    assert true_ranks(scores, y).tolist() == [[0, 2], [0, 1]]
    cell = RecallCell(4, ks=(1, 2, 4), choices=2)
    cell.add(true_ranks(scores, y).ravel(), np.array([0, 0, 1, 1]), 2)
    r = cell.result()
    assert r["tokens"] == 2 and r["top1"] == pytest.approx(0.5)
    assert r["recall"]["2"] == pytest.approx(0.75) and r["recall"]["4"] == 1.0


def test_layer_requests_load_every_expert_of_a_token():
    experts = np.array([[[0, 3]], [[3, 1]]])  # [n=2, L=1, k=2]
    reqs, _ = layer_requests(experts, [np.array([0]), np.array([1])])
    assert reqs == [[[0, 3], [1, 3]]]
    reqs, _ = layer_requests(experts, [np.array([0, 1])])
    assert reqs == [[[0, 1, 3]]]


def _pair_store(path, n=80, length=20, E=8, seed=1):
    """A top-2 language-model store whose pair of experts at each layer is a function of the previous
    layer's top-1 expert (a permutation), so the transition predictor knows the whole set."""
    rng = np.random.default_rng(seed)
    T = n * length
    top = rng.integers(0, E, size=T)
    pairs = {}
    perm = rng.permutation(E)
    for b in (0, 1, 2):
        second = (top + 1 + b) % E
        pairs[f"lm.{b}"] = np.stack([top, second], axis=1).astype(np.int32)
        top = perm[top]
    offs = np.arange(0, T + 1, length, dtype=np.int64)
    os.makedirs(path)
    tensors = {"token_ids": rng.integers(2, 100, size=T).astype(np.int32), "sample_offsets": offs,
               "sample_kind": np.zeros(n, np.uint8)}
    per_layer = {}
    for name, ex in pairs.items():
        logits = np.zeros((T, E), np.float32)
        np.put_along_axis(logits, ex, np.array([3.0, 2.0], np.float32)[None].repeat(T, 0), 1)
        tensors[f"{name}.router_logits"] = logits
        tensors[f"{name}.expert"] = ex
        tensors[f"{name}.gate"] = np.tile(np.array([0.73, 0.27], np.float32), (T, 1))
        per_layer[name] = {"expert_counts": np.bincount(ex.ravel(), minlength=E).tolist(), "dropped": 0,
                           "tokens": T, "drop_rate": 0.0}
    ids = [f"ds/a/default/train/{k}" for k in range(n)]
    meta = {"format": "moetrace-trace", "format_version": "2", "first_sample": "0", "sample_ids": json.dumps(ids),
            "datasets": json.dumps(["ds/a"] * n), "rows": json.dumps(list(range(n)))}
    write_safetensors(os.path.join(path, "shard-00000.safetensors"), tensors, meta)
    manifest = {"format": "moetrace-trace", "format_version": 2, "complete": True, "settings": {"mode": "real"},
                "model": {"id": "test/olmoe-tiny", "config": {"d_model": 16, "d_ff": 64, "vocab_size": 128}},
                "layers": {"encoder": [0, 1, 2], "decoder": []}, "num_experts": E, "d_model": 16,
                "logits_dtype": "F32", "hidden_dtype": "none", "decoder": False,
                "routing": {"family": "olmoe", "top_k": 2, "dropped": False},
                "shards": [{"file": "shard-00000.safetensors", "first_sample": 0, "num_samples": n, "num_tokens": T,
                            "num_decoder_tokens": 0,
                            "bytes": os.path.getsize(os.path.join(path, "shard-00000.safetensors")), "sha256": ""}],
                "num_samples": n, "num_tokens": T, "per_layer": per_layer}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return path, pairs


def test_speculate_recall_is_against_the_k_true_experts(tmp_path):
    path, pairs = _pair_store(str(tmp_path / "s"))
    opt = Options(split=Split(seed=0, test_fraction=0.3), predictors=("transition", "frequency"), learned_steps=10,
                  cache_sizes=(1, 2, 4), ks=(1, 2, 3))
    res = speculate.speculate_store(moetrace.open_store(path), opt)
    assert res["top_k"] == 2
    cell = next(r for r in res["encoder"]["results"]
                if r["predictor"] == "transition" and r["lookahead"] == 1 and r["dataset"] == "all")
    # both true experts are the transition table's two best: half of them at k = 1, all at k = 2
    assert cell["top1"] == pytest.approx(0.5) and cell["recall"]["2"] == 1.0
    assert cell["tokens"] == res["encoder"]["test"]["tokens"]
    # prefill replay: a sequence's request is the distinct experts of all its tokens' k choices
    cache = res["encoder"]["cache"]
    assert cache["mode"] == "prefill" and cache["no_cache_bytes"] > 0
    opt2 = Options(split=Split(seed=0, test_fraction=0.3), predictors=("frequency",), learned_steps=10,
                   cache_sizes=(8,), encoder_replay="token")
    res2 = speculate.speculate_store(moetrace.open_store(path), opt2)
    c2 = res2["encoder"]["cache"]
    r8 = next(r for r in c2["runs"] if r["policy"] == "lru" and not r["prefetch"])
    assert r8["accesses"] == 2 * 3 * c2["tokens"]  # per token: k = 2 experts at each of the 3 layers
