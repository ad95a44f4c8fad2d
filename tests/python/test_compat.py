"""Seed-structured records and the seed pickle export (python -m moetrace export-pickle)."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import moetrace
from moetrace.compat import GatingDataPoint, gating_records
from conftest import run_module

SEED_KEYS = {"layer_id", "hidden_states", "input_embeddings", "target_routing", "target_top_k",
             "prev_layer_gates", "sequence_length", "token_ids", "dataset_name", "sample_id"}
SEED_METADATA = ("total_traces", "num_experts", "expert_distribution", "experts_used", "diversity_percentage",
                 "dataset_distribution", "collection_time", "device")


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_records_have_the_seed_structure(store_factory):
    path, truth = store_factory(enc_layers=(1, 3, 5, 7, 9), hidden_dtype="F32", num_samples=4)
    records = list(gating_records(path))
    assert len(records) == 4 * 5
    for n, rec in enumerate(records):
        sample, block = truth[n // 5], (1, 3, 5, 7, 9)[n % 5]
        layer = sample["layers"][f"enc.{block}"]
        s = len(sample["token_ids"])
        assert set(rec) == SEED_KEYS
        assert rec["layer_id"] == block and rec["sequence_length"] == s
        assert rec["dataset_name"] == sample["dataset"] and rec["sample_id"] == sample["sample_id"]
        assert rec["token_ids"].dtype == np.int64 and np.array_equal(rec["token_ids"], sample["token_ids"])
        assert np.array_equal(rec["input_embeddings"], sample["token_ids"])
        assert rec["target_routing"].dtype == np.float32 and rec["target_routing"].shape == (s, 8)
        np.testing.assert_allclose(rec["target_routing"], _softmax(layer["router_logits"]), rtol=1e-6)
        assert rec["target_top_k"].dtype == np.int64 and rec["target_top_k"].shape == (s, 1)
        assert np.array_equal(rec["target_top_k"][:, 0], layer["expert"])
        assert rec["hidden_states"].dtype == np.float32 and np.array_equal(rec["hidden_states"], layer["hidden"])
        # Up to 3 earlier MoE layers, oldest first.
        earlier = [b for b in (1, 3, 5, 7, 9) if b < block][-3:]
        assert len(rec["prev_layer_gates"]) == len(earlier)
        for gates, b in zip(rec["prev_layer_gates"], earlier):
            np.testing.assert_allclose(gates, _softmax(sample["layers"][f"enc.{b}"]["router_logits"]), rtol=1e-6)


def test_record_selection(store_factory):
    path, truth = store_factory(synthetic_every=2, num_samples=6)
    recs = list(gating_records(path, layers=["enc.5", 3], limit=2))
    assert [(r["sample_id"], r["layer_id"]) for r in recs] == [
        (truth[0]["sample_id"], 3), (truth[0]["sample_id"], 5), (truth[1]["sample_id"], 3), (truth[1]["sample_id"], 5)]
    assert len(recs[1]["prev_layer_gates"]) == 2  # gates of all earlier layers, even unexported ones
    real = list(gating_records(path, real_only=True))
    assert {r["sample_id"] for r in real} == {x["sample_id"] for x in truth if not x["synthetic"]}
    assert list(gating_records(path, layers=[1]))[0]["hidden_states"] is None
    with pytest.raises(KeyError, match="no encoder MoE layer"):
        list(gating_records(path, layers=[2]))


def _load_without_moetrace(pkl):
    """Loads the pickle in a fresh interpreter that cannot import moetrace, as the seed's consumers do."""
    code = ("import pickle, sys; d = pickle.load(open(sys.argv[1], 'rb')); "
            "assert 'moetrace' not in sys.modules; "
            "print(len(d), type(d).__name__, type(d[0]).__name__, d[0]['target_routing'].dtype, sorted(d[0]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, str(pkl)], capture_output=True, text=True, env=env, cwd="/")
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_export_pickle_round_trip(store_factory, tmp_path):
    path, truth = store_factory(hidden_dtype="BF16", logits_dtype="F16")
    pkl = tmp_path / "traces.pkl"
    run_module("export-pickle", path, pkl, fresh=True)
    with open(pkl, "rb") as f:
        data = pickle.load(f)
    assert isinstance(data, list) and len(data) == 7 * 3
    for got, want in zip(data, gating_records(path)):
        assert set(got) == SEED_KEYS
        for key in SEED_KEYS:
            if key == "prev_layer_gates":
                assert len(got[key]) == len(want[key])
                assert all(np.array_equal(a, b) for a, b in zip(got[key], want[key]))
            elif isinstance(want[key], np.ndarray):
                assert got[key].dtype == want[key].dtype and np.array_equal(got[key], want[key])
            else:
                assert got[key] == want[key]
    assert _load_without_moetrace(pkl).split()[:4] == ["21", "list", "dict", "float32"]
    meta = json.load(open(tmp_path / "traces.json"))
    manifest = moetrace.open_store(path).manifest
    for key in SEED_METADATA:
        assert meta[key] == manifest[key], key
    assert meta["filtered"] is False and meta["exported_traces"] == 21


def test_export_filtered_recomputes_metadata(store_factory, tmp_path):
    path, truth = store_factory()
    pkl = tmp_path / "some.pkl"
    run_module("export-pickle", path, pkl, "--layers", "1,enc.5", "--limit", "3")
    data = pickle.load(open(pkl, "rb"))
    assert len(data) == 6 and {r["layer_id"] for r in data} == {1, 5}
    meta = json.load(open(tmp_path / "some.json"))
    counts = np.bincount(np.concatenate([r["target_top_k"][:, 0] for r in data]), minlength=8)
    assert meta["total_traces"] == 6 and meta["filtered"] is True
    assert meta["expert_distribution"] == {str(e): int(c) for e, c in enumerate(counts)}
    assert meta["experts_used"] == int(np.count_nonzero(counts))
    assert meta["dataset_distribution"] == {"glue/mrpc": 4, "sst2": 2}
    assert meta["collection_time"] == 1.5 and meta["device"] == "cpu (test)"


def test_export_dataclass_format(store_factory, tmp_path):
    path, truth = store_factory(num_samples=2)
    pkl = tmp_path / "dc.pkl"
    run_module("export-pickle", path, pkl, "--format", "dataclass")
    data = pickle.load(open(pkl, "rb"))
    assert len(data) == 6 and all(isinstance(d, GatingDataPoint) for d in data)
    assert data[4].layer_id == 3 and data[4].sample_id == truth[1]["sample_id"]
    assert np.array_equal(data[4].target_top_k[:, 0], truth[1]["layers"]["enc.3"]["expert"])
    assert len(data[4].prev_layer_gates) == 1


def test_export_errors_are_one_line(store_factory, tmp_path):
    path, _ = store_factory()
    proc = run_module("export-pickle", path, tmp_path / "x.pkl", "--layers", "2", check=False)
    assert proc.returncode == 1 and "no encoder MoE layer '2'" in proc.stderr and "Traceback" not in proc.stderr
    os.remove(os.path.join(path, "shard-00001.safetensors"))
    proc = run_module("export-pickle", path, tmp_path / "x.pkl", check=False)
    assert proc.returncode == 1 and "shard-00001.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "x.pkl")


def test_failed_export_leaves_no_partial_pickle(store_factory, tmp_path):
    path, _ = store_factory()
    m = json.load(open(os.path.join(path, "manifest.json")))
    for s in m["shards"]:
        s["bytes"] = 0
    json.dump(m, open(os.path.join(path, "manifest.json"), "w"))
    with open(os.path.join(path, "shard-00002.safetensors"), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 4)
    proc = run_module("export-pickle", path, tmp_path / "x.pkl", check=False)
    assert proc.returncode == 1 and "shard-00002.safetensors: truncated" in proc.stderr
    assert os.listdir(tmp_path) == [os.path.basename(path)]
