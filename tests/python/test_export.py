"""Exports where researchers work: pandas, Parquet shards, Hugging Face datasets (issue 16)."""

import json
import os

import numpy as np
import pytest

import moetrace
import moetrace.export
from conftest import run_module

pd = pytest.importorskip("pandas")
pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402


def test_to_pandas_one_row_per_token_and_layer(store_factory):
    path, truth = store_factory(num_samples=7, shard_size=3, enc_layers=(1, 3), synthetic_every=3)
    store = moetrace.open_store(path)
    df = store.to_pandas()
    tokens = sum(len(t["token_ids"]) for t in truth)
    assert len(df) == tokens * 2
    assert list(df.columns) == list(moetrace.export.TOKEN_LAYER_COLUMNS)
    assert df["layer"].dtype == "category" and df["expert"].dtype == np.int16 and df["gate"].dtype == np.float32
    s3 = df[(df["sample"] == 3) & (df["layer"] == "enc.3")]
    assert s3["expert"].tolist() == truth[3]["layers"]["enc.3"]["expert"].tolist()
    assert s3["token_id"].tolist() == truth[3]["token_ids"].tolist()
    assert s3["position"].tolist() == list(range(len(truth[3]["token_ids"])))
    assert (s3["sample_id"] == truth[3]["sample_id"]).all()
    real = store.to_pandas(real_only=True, layers=["enc.1"])
    assert not real["synthetic"].any() and set(real["layer"]) == {"enc.1"}
    lg = store.to_pandas(layers=[1], logits=True)
    assert lg["router_logits"].iloc[0].shape == (8,)


def test_export_parquet_schema_and_values(store_factory, tmp_path):
    path, truth = store_factory(num_samples=7, shard_size=3, enc_layers=(1, 3), dec_layers=(1,),
                                logits_dtype="BF16")
    out = tmp_path / "pq"
    proc = run_module("export-parquet", path, out, "--logits", "-q")
    assert proc.returncode == 0
    files = sorted(os.listdir(out / "data"))
    assert files == [f"train-{k:05d}-of-00003.parquet" for k in range(3)]
    table = pq.read_table(out / "data")
    assert table.num_rows == 7
    names = table.schema.names
    for col in ("sample", "sample_id", "dataset", "row", "synthetic", "token_ids", "dec_input_ids",
                "dec_output_ids", "enc.1.expert", "enc.1.gate", "enc.1.dropped", "enc.1.router_logits",
                "dec.1.expert"):
        assert col in names, col
    meta = json.loads(table.schema.metadata[b"moetrace"])
    assert meta["num_experts"] == 8 and meta["format"] == "moetrace-parquet"
    rows = table.to_pylist()
    for r, t in zip(rows, truth):
        assert r["sample_id"] == t["sample_id"] and r["token_ids"] == t["token_ids"].tolist()
        assert r["enc.3.expert"] == t["layers"]["enc.3"]["expert"].tolist()
        assert np.allclose(np.array(r["enc.1.router_logits"]), t["layers"]["enc.1"]["router_logits"])
        assert r["dec.1.expert"] == t["layers"]["dec.1"]["expert"].tolist()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and "data/train-*.parquet" in card


def test_export_parquet_refuses_a_used_directory(store_factory, tmp_path):
    path, _ = store_factory(num_samples=3)
    out = tmp_path / "pq"
    run_module("export-parquet", path, out, "-q")
    proc = run_module("export-parquet", path, out, "-q", check=False)
    assert proc.returncode == 1 and "already holds" in proc.stderr and "Traceback" not in proc.stderr


def test_hugging_face_dataset_from_the_export(store_factory, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants
    # Local files only: without this, load_dataset(OUT) spends ~25 s trying to reach the Hub (no
    # network here) and leaves huggingface_hub unable to reach the fetch tests' local Hub afterwards.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path, truth = store_factory(num_samples=7, shard_size=3, enc_layers=(1, 3))
    out = tmp_path / "hf"
    run_module("export-parquet", path, out, "-q")
    ds = moetrace.export.hf_dataset(out, cache_dir=str(tmp_path / "cache"))
    assert isinstance(ds, datasets.Dataset) and len(ds) == 7
    assert ds[4]["enc.1.expert"] == truth[4]["layers"]["enc.1"]["expert"].tolist()
    assert callable(ds.push_to_hub)
    # The card's configs let load_dataset(OUT) find the files, as the Hub does after an upload.
    again = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(again) == 7
