"""Stores written by the C++ `moetrace collect` read back in Python, with the values `moetrace forward`
computes for the same token ids.

Skipped while the CLI is not built (bash scripts/build.sh; MOETRACE_CLI overrides the path) or lacks the
collect/forward subcommands. Assumes forward takes `input_ids`/`attention_mask` (I32 [B,S]) in
--inputs and writes the reference fixtures' keys, `encoder_router.{n}.{router_logits, top1, kept,
max_prob, router_input}` for the n-th sparse encoder layer. Each sample is run alone (B=1, no padding),
and f32 logits must be bit-exact: a sample's routing must not depend on how collect batched it
(forward itself gives ~5e-6 different logits for a sample padded in a batch than alone).
"""

import os
import re
import subprocess

import numpy as np
import pytest

import moetrace
from moetrace.safetensors_io import SafetensorsFile
from conftest import REPO, moetrace_cli, run_module, to_bf16_bits, write_safetensors

MODEL = os.path.join(REPO, "tests", "data", "fixtures", "tiny-a", "model")
CHECKED_SAMPLES = 8  # forward runs, one per sample (~0.4 s each)


def _cli_or_skip(*subcommands):
    cli = moetrace_cli()
    if cli is None:
        pytest.skip("the C++ moetrace CLI is not built (bash scripts/build.sh, or set MOETRACE_CLI)")
    listing = subprocess.run([cli, "--help"], capture_output=True, text=True).stdout
    for sub in subcommands:  # CLI11 lists subcommands one per line, indented
        if not re.search(rf"^\s+{sub}\b", listing, re.M):
            pytest.skip(f"this moetrace build has no `{sub}` subcommand yet ({cli})")
    return cli


def _run(cmd):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module", params=["f32", "f16", "bf16"])
def collected(request, tmp_path_factory):
    """(store path, logits dtype) of a 40-trace collection on the tiny fixture model."""
    cli = _cli_or_skip("collect", "forward")
    dtype = request.param
    out = tmp_path_factory.mktemp(f"collect-{dtype}") / "store"
    _run([cli, "collect", "--model", MODEL, "--datasets", "demo", "--data-root", "assets/demo/data",
          "--traces", 40, "--logits", dtype, "--hidden", "f32" if dtype == "f32" else "bf16", "-o", out,
          "--threads", 2])
    return str(out), dtype


def test_collected_store_reads_back(collected):
    path, dtype = collected
    store = moetrace.open_store(path, verify=True)
    m = store.manifest
    assert m["format_version"] == 1 and m["complete"] is True
    assert store.encoder_layers == [1, 3] and store.num_experts == 8 and store.d_model == 32
    assert len(store) == m["num_samples"] > 0
    assert m["total_traces"] == len(store) * 2
    assert m["settings"]["logits_dtype"] == dtype.upper()
    assert len(set(store.sample_ids)) == len(store)
    for shard in store.shards:
        assert shard.info("enc.1.router_logits")[0] == dtype.upper()
    s = store.sample(0)
    assert s.token_ids[-1] == 1  # </s>
    # The Python summary recomputes the manifest's counts from the shards, in inspect's layout.
    summary = run_module("summary", path).stdout.splitlines()
    assert summary[-1].startswith("manifest check  ok")
    cli = moetrace_cli()
    if re.search(r"^\s+inspect\b", subprocess.run([cli, "--help"], capture_output=True, text=True).stdout, re.M):
        inspect = _run([cli, "inspect", path]).stdout.splitlines()
        assert summary[:len(inspect)] == inspect


def test_collected_values_equal_forward(collected, tmp_path):
    path, dtype = collected
    cli = moetrace_cli()
    store = moetrace.open_store(path)
    real = [i for i in range(len(store)) if not store.sample(i).synthetic][:CHECKED_SAMPLES]
    assert real, "the collection holds no real samples"
    for i in real:
        sample = store.sample(i)
        ids = np.asarray(sample.token_ids, dtype=np.int32)[None, :]
        inp, out = tmp_path / f"in-{i}.safetensors", tmp_path / f"out-{i}.safetensors"
        write_safetensors(str(inp), {"input_ids": ids, "attention_mask": np.ones_like(ids)}, {})
        _run([cli, "forward", "--model", MODEL, "--inputs", inp, "--output", out, "--threads", 2])
        ref = SafetensorsFile(str(out))
        for n, block in enumerate(store.encoder_layers):
            view = sample.layer(f"enc.{block}")
            want = np.asarray(ref.tensor(f"encoder_router.{n}.router_logits", float32=True))[0]
            got = view.router_logits
            if dtype == "f16":
                want = want.astype(np.float16).astype(np.float32)
            elif dtype == "bf16":
                want = (to_bf16_bits(want).astype(np.uint32) << 16).view(np.float32)
            where = f"{sample.sample_id} enc.{block}"
            assert got.shape == want.shape, where
            assert got.tobytes() == want.tobytes(), (
                f"{where}: logits differ from forward's (max |diff| {np.abs(got - want).max():g})")
            top1 = np.asarray(ref.tensor(f"encoder_router.{n}.top1"))[0]
            kept = np.asarray(ref.tensor(f"encoder_router.{n}.kept"))[0]
            assert np.array_equal(view.expert, top1), where
            assert np.array_equal(view.dropped, kept == 0), where
            gate = np.asarray(ref.tensor(f"encoder_router.{n}.max_prob", float32=True))[0].reshape(-1)
            np.testing.assert_allclose(view.gate, gate, rtol=1e-6, err_msg=where)
            hidden = np.asarray(ref.tensor(f"encoder_router.{n}.router_input", float32=True))[0]
            if dtype == "f32":
                assert view.hidden.tobytes() == hidden.tobytes(), f"{where}: hidden differs from forward's"
            else:
                assert np.array_equal(view.hidden, (to_bf16_bits(hidden).astype(np.uint32) << 16).view(np.float32)), where


def test_collected_store_exports_seed_pickle(collected, tmp_path):
    path, dtype = collected
    if dtype != "f32":
        pytest.skip("one export is enough")
    import pickle
    pkl = tmp_path / "out.pkl"
    run_module("export-pickle", path, pkl)
    data = pickle.load(open(pkl, "rb"))
    store = moetrace.open_store(path)
    assert len(data) == len(store) * 2 == store.manifest["total_traces"]
    assert data[1]["layer_id"] == 3 and len(data[1]["prev_layer_gates"]) == 1
    assert data[0]["hidden_states"].shape == (data[0]["sequence_length"], 32)
