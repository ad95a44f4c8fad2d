"""Stores written by the C++ `moetrace collect` read back in Python, with the values `moetrace forward`
computes for the same token ids.

Needs the built CLI (bash scripts/build.sh; MOETRACE_CLI overrides the path). Assumes forward takes `input_ids`/`attention_mask` (I32 [B,S]) in
--inputs and writes the reference fixtures' keys, `encoder_router.{n}.{router_logits, top1, kept,
max_prob, router_input}` for the n-th sparse encoder layer. forward runs collect's batch again, and the
stored values must be bit-exact (F16/BF16: forward's f32 rounded to nearest even).
"""

import os
import re
import subprocess

import numpy as np
import pytest

import moetrace
from moetrace import keys
from moetrace.safetensors_io import SafetensorsFile
from conftest import REPO, moetrace_cli, run_module, to_bf16_bits, write_safetensors

MODEL = os.path.join(REPO, "tests", "data", "fixtures", "tiny-a", "model")


def _cli_with(*subcommands):
    cli = moetrace_cli()
    listing = subprocess.run([cli, "--help"], capture_output=True, text=True).stdout
    for sub in subcommands:  # CLI11 lists subcommands one per line, indented
        assert re.search(rf"^\s+{sub}\b", listing, re.M), f"this moetrace build has no `{sub}` subcommand ({cli})"
    return cli


def _run(cmd):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny fixture model with a T5 tokenizer beside it (collect needs spiece.model; the fixture
    has none): links in a temporary directory."""
    if os.path.isfile(os.path.join(MODEL, "spiece.model")):
        return MODEL
    d = tmp_path_factory.mktemp("tiny-a-model")
    for name in os.listdir(MODEL):
        os.symlink(os.path.join(MODEL, name), d / name)
    os.symlink(os.path.join(REPO, "assets", "demo", "spiece.model"), d / "spiece.model")
    return str(d)


def _collect(tmp_path_factory, model_dir, dtype):
    """(store path, logits dtype) of a 40-trace collection on the tiny fixture model."""
    cli = _cli_with("collect", "forward")
    out = tmp_path_factory.mktemp(f"collect-{dtype}") / "store"
    _run([cli, "collect", "--model", model_dir, "--datasets", "demo", "--data-root", "assets/demo/data",
          "--traces", 40, "--logits", dtype, "--hidden", "f32" if dtype == "f32" else "bf16", "-o", out,
          "--threads", 2, "--batch-overhead", 100000])  # one batch (test_collected_values_equal_forward)
    return str(out), dtype


@pytest.fixture(scope="module", params=["f32", "f16", "bf16"])
def collected(request, tmp_path_factory, model_dir):
    return _collect(tmp_path_factory, model_dir, request.param)


@pytest.fixture(scope="module")
def collected_f32(tmp_path_factory, model_dir):
    return _collect(tmp_path_factory, model_dir, "f32")


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
    samples = [store.sample(i) for i in range(len(store))]
    assert samples and not any(s.synthetic for s in samples)
    # Rebuild collect's one batch (src/collect/collect.cc, make_batches): the samples sorted by length,
    # longest first (stable), right-padded. The store is small enough to be one window and one batch of
    # the default --batch-tokens 8192. Padding changes the f32 bits (up to ~5e-6 on these logits), so
    # only the same batch can be compared bit for bit.
    order = sorted(range(len(samples)), key=lambda i: -len(samples[i]))
    S = len(samples[order[0]])
    assert len(samples) * S <= 8192 and sum(len(s) for s in samples) <= 16384, "the store is not one batch"
    ids = np.zeros((len(order), S), np.int32)
    mask = np.zeros((len(order), S), np.int32)
    for b, i in enumerate(order):
        ids[b, :len(samples[i])] = samples[i].token_ids
        mask[b, :len(samples[i])] = 1
    inp, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    write_safetensors(str(inp), {"input_ids": ids, "attention_mask": mask}, {})
    _run([cli, "forward", "--model", MODEL, "--inputs", inp, "--output", out, "--threads", 2])
    ref = SafetensorsFile(str(out))
    for b, i in enumerate(order):
        sample, n = samples[i], len(samples[i])
        for k, block in enumerate(store.encoder_layers):
            view = sample.layer(f"enc.{block}")
            where = f"{sample.sample_id} enc.{block}"
            want = np.asarray(ref.tensor(f"encoder_router.{k}.router_logits", float32=True))[b, :n]
            if dtype == "f16":
                want = want.astype(np.float16).astype(np.float32)
            elif dtype == "bf16":
                want = (to_bf16_bits(want).astype(np.uint32) << 16).view(np.float32)
            got = view.router_logits
            assert got.shape == want.shape, where
            assert got.tobytes() == want.tobytes(), (
                f"{where}: logits differ from forward's (max |diff| {np.abs(got - want).max():g})")
            assert np.array_equal(view.expert, np.asarray(ref.tensor(f"encoder_router.{k}.top1"))[b, :n]), where
            kept = np.asarray(ref.tensor(f"encoder_router.{k}.kept"))[b, :n]
            assert np.array_equal(view.dropped, kept == 0), where
            gate = np.asarray(ref.tensor(f"encoder_router.{k}.max_prob", float32=True))[b, :n].reshape(-1)
            assert view.gate.tobytes() == gate.tobytes(), where
            hidden = np.asarray(ref.tensor(f"encoder_router.{k}.router_input", float32=True))[b, :n]
            if dtype == "f32":
                assert view.hidden.tobytes() == hidden.tobytes(), f"{where}: hidden differs from forward's"
            else:
                want_h = (to_bf16_bits(hidden).astype(np.uint32) << 16).view(np.float32)
                assert view.hidden.tobytes() == want_h.tobytes(), where


def test_collected_store_exports_seed_pickle(collected_f32, tmp_path):
    path, _ = collected_f32
    import pickle
    pkl = tmp_path / "out.pkl"
    run_module("export-pickle", path, pkl)
    data = pickle.load(open(pkl, "rb"))
    store = moetrace.open_store(path)
    assert len(data) == len(store) * 2 == store.manifest["total_traces"]
    assert data[1]["layer_id"] == 3 and len(data[1]["prev_layer_gates"]) == 1
    assert data[0]["hidden_states"].shape == (data[0]["sequence_length"], 32)


@pytest.mark.parametrize("options", [{}, {"logits_dtype": "BF16", "hidden_dtype": "BF16", "dec_layers": (1, 3),
                                          "synthetic_every": 3},
                                     {"logits_dtype": "F16", "hidden_dtype": "F32", "num_samples": 9}])
def test_cpp_verify_accepts_the_test_writers_stores(store_factory, options):
    """The Python tests' store writer and the C++ reader agree on the format."""
    cli = _cli_with("verify")
    path, _ = store_factory(**options)
    _run([cli, "verify", path])


def test_collected_decoder_store_reads_back(model_dir, tmp_path):
    cli = _cli_with("collect")
    out = tmp_path / "store"
    _run([cli, "collect", "--model", model_dir, "--datasets", "demo", "--data-root", "assets/demo/data",
          "--traces", 12, "--decoder", "--max-new-tokens", 4, "--mode", "mixed", "--samples-per-shard", 2,
          "-o", out, "--threads", 2, "--no-progress"])
    store = moetrace.open_store(str(out), verify=True)
    assert store.decoder_layers == [1, 3] and store.layers == ["enc.1", "enc.3", "dec.1", "dec.3"]
    assert len(store.shards) > 1
    for sample in store:
        g = len(sample.dec_input_ids)
        if sample.synthetic:  # the model did not run: no generation (collect writes no decoder rows)
            assert g == 0
            continue
        assert 1 <= g <= 4 and sample.dec_input_ids[0] == 0
        assert np.array_equal(sample.dec_input_ids[1:], sample.dec_output_ids[:-1])
        for name in ("dec.1", "dec.3"):
            view = sample.layer(name)
            assert view.router_logits.shape == (g, 8) and not view.dropped.any()
            assert np.array_equal(view.expert, view.router_logits.argmax(axis=1))
    assert {s.synthetic for s in store} == {True, False}
    summary = run_module("summary", str(out)).stdout.splitlines()
    assert summary[-1].startswith("manifest check  ok")
    if re.search(r"^\s+inspect\b", subprocess.run([cli, "--help"], capture_output=True, text=True).stdout, re.M):
        inspect = _run([cli, "inspect", out]).stdout.splitlines()
        assert summary[:len(inspect)] == inspect


GOLDEN_V1 = os.path.join(REPO, "tests", "data", "trace_v1_golden", "store")
# The run's own fields (which machine, when, how fast): everything else must be equal.
RUN_FIELDS = ("command_line", "device", "engine", "collection_time", "throughput_tokens_per_s", "moetrace_version")


def test_switch_default_store_is_byte_identical_to_version_1(tmp_path):
    """A Switch store with the default options is the store moetrace wrote before format version 2
    (tests/data/trace_v1_golden/SOURCE.txt): the same shard bytes and the same manifest."""
    cli = _cli_with("collect")
    out = tmp_path / "store"
    _run([cli, "collect", "--traces", 60, "--model", "demo", "--mode", "synthetic", "--max-length", 12, "--decoder",
          "--samples-per-shard", 4, "-o", out, "--no-progress", "-q", "--threads", 1])
    shards = sorted(f for f in os.listdir(GOLDEN_V1) if f.startswith("shard-"))
    assert shards and shards == sorted(f for f in os.listdir(out) if f.startswith("shard-"))
    for f in shards:
        with open(os.path.join(GOLDEN_V1, f), "rb") as a, open(out / f, "rb") as b:
            assert a.read() == b.read(), f"{f} differs from the version-1 store's"
    import json
    with open(os.path.join(GOLDEN_V1, "manifest.json")) as a, open(out / "manifest.json") as b:
        want, got = json.load(a), json.load(b)
    assert list(want) == list(got)  # the same fields in the same order
    for k in RUN_FIELDS:
        want.pop(k), got.pop(k)
    assert got == want and got["format_version"] == 1 and "routing" not in got


def test_logits_topk_store_keeps_the_exact_top_probabilities(tmp_path):
    """`collect --logits topk:3` next to `--logits f32` on the same model and samples (the same batches,
    so the same fp32 logits): the top-3 ids are the f32 logits' top 3 (ties to the lowest index), the
    values their F16 rounding, the lse the f32 logits' log-sum-exp, so exp(l - lse) is the softmax's
    probability up to the F16 rounding; synthetic samples get the same rule; verify checks it all."""
    cli = _cli_with("collect", "verify")
    common = ["--traces", 48, "--model", "demo", "--mode", "mixed", "--decoder", "--max-new-tokens", 3,
              "--samples-per-shard", 4, "--no-progress", "-q", "--threads", 2]
    _run([cli, "collect", *common, "--logits", "topk:3", "-o", tmp_path / "topk"])
    _run([cli, "collect", *common, "--logits", "f32", "-o", tmp_path / "full"])
    assert "OK" in _run([cli, "verify", tmp_path / "topk"]).stdout
    topk, full = moetrace.open_store(tmp_path / "topk"), moetrace.open_store(tmp_path / "full")
    assert topk.logits_topk == 3 and full.logits_topk == 0 and topk.manifest["format_version"] == 2
    assert topk.manifest["settings"]["logits_topk"] == 3 and "logits_topk" not in full.manifest["settings"]
    assert len(topk) == len(full) and any(s.synthetic for s in topk) and any(s.has_decoder for s in topk)
    for a, b in zip(topk, full):
        for name in topk.layers:
            if keys.is_generation(name) and not b.has_decoder:
                continue
            la, lb = a.layer(name), b.layer(name)
            logits = lb.router_logits
            want = np.argsort(-logits, axis=1, kind="stable")[:, :3]
            assert np.array_equal(la.router_topk_ids, want), (a.sample_id, name)
            assert np.array_equal(la.router_topk_logits, np.take_along_axis(logits, want, 1).astype(np.float16).astype(np.float32))
            m = logits.max(axis=1, keepdims=True)
            lse = (m[:, 0] + np.log(np.exp(logits.astype(np.float64) - m).sum(axis=1))).astype(np.float32)
            np.testing.assert_allclose(la.router_lse, lse, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(la.topk_probs, np.take_along_axis(lb.probs, want, 1), rtol=5e-3, atol=1e-7)
            assert np.array_equal(la.expert, lb.expert) and np.array_equal(la.gate, lb.gate)
            with pytest.raises(moetrace.StoreError, match=r"keeps only the 3 largest router logits"):
                la.router_logits
    shard = topk.shards[0]
    assert shard.info("enc.1.router_topk_logits") == ("F16", (shard.num_tokens, 3))
    assert shard.info("enc.1.router_topk_ids")[0] == "I32" and not shard.has("enc.1.router_logits")


def test_logits_option_errors_name_the_value(tmp_path):
    cli = _cli_with("collect")
    for value, message in (("topk:0", "topk:K needs a whole number K >= 1"), ("topk:2x", "topk:K needs a whole"),
                           ("f8", "expected f32, f16 or bf16 (also"), ("topk:9", "--logits topk:9: K must be in [1, 8]")):
        proc = subprocess.run([cli, "collect", "--traces", "6", "--model", "demo", "--logits", value, "-q",
                               "--no-progress", "-o", str(tmp_path / value.replace(":", "_"))],
                              capture_output=True, text=True)
        assert proc.returncode != 0 and message in proc.stderr, (value, proc.stderr)
