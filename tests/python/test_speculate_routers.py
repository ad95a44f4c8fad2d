"""The C++ side of analyze/speculate: `moetrace routers` writes the router weights that pregate reads,
and `moetrace analyze|speculate` hand their arguments and exit code to Python. Needs the built CLI (conftest.moetrace_cli)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))

from analysis_testutil import make_store, write_safetensors  # noqa: E402
from conftest import moetrace_cli  # noqa: E402
from moetrace import open_store, speculate  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def find_exe():
    return moetrace_cli()


def tiny_model(path, router_bias=False, dtype=np.float32):
    os.makedirs(path, exist_ok=True)
    cfg = {"vocab_size": 64, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 4, "num_decoder_layers": 4,
           "num_heads": 2, "num_experts": 4, "num_sparse_encoder_layers": 2, "num_sparse_decoder_layers": 2,
           "router_bias": router_bias, "expert_capacity": 8}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    rng = np.random.default_rng(0)
    tensors, want = {}, {}
    for stack, key, layer in (("encoder", "enc", 1), ("decoder", "dec", 2)):
        for i in (1, 3):
            w = rng.normal(size=(4, 8)).astype(np.float32)
            tensors[f"{stack}.block.{i}.layer.{layer}.mlp.router.classifier.weight"] = w.astype(dtype)
            want[f"{key}.{i}.router.weight"] = w.astype(dtype).astype(np.float32)
            if router_bias:
                b = rng.normal(size=4).astype(np.float32)
                tensors[f"{stack}.block.{i}.layer.{layer}.mlp.router.classifier.bias"] = b
                want[f"{key}.{i}.router.bias"] = b
    tensors["shared.weight"] = np.zeros((64, 8), np.float32)
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, {"format": "pt"})
    return want


@pytest.mark.parametrize("bias,dtype", [(False, np.float32), (True, np.float16)])
def test_routers_subcommand(tmp_path, bias, dtype):
    exe = find_exe()
    want = tiny_model(str(tmp_path / "model"), bias, dtype)
    out = tmp_path / "routers.safetensors"
    r = subprocess.run([exe, "routers", "--model", str(tmp_path / "model"), "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from moetrace.safetensors_io import SafetensorsFile
    st = SafetensorsFile(str(out))
    assert sorted(st.infos) == sorted(want)
    for name, w in want.items():
        assert st.infos[name].dtype == "F32"
        np.testing.assert_array_equal(np.asarray(st.tensor(name)), w)
    assert st.metadata["format"] == "moetrace-routers" and st.metadata["num_experts"] == "4"


def test_routers_subcommand_missing_router(tmp_path):
    exe = find_exe()
    tiny_model(str(tmp_path / "model"))
    write_safetensors(str(tmp_path / "model" / "model.safetensors"), {"shared.weight": np.zeros((2, 2), np.float32)}, {})
    r = subprocess.run([exe, "routers", "--model", str(tmp_path / "model"), "-o", str(tmp_path / "r.st")],
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "router" in r.stderr and "encoder.block.1" in r.stderr


def test_pregate_through_extracted_routers(tmp_path):
    """Router weights extracted by `moetrace routers` (found through $MOETRACE_EXE and the store's
    model directory) make pregate exact on a store routed by those very routers."""
    exe = find_exe()
    want = tiny_model(str(tmp_path / "model"))
    rng = np.random.default_rng(1)
    n, length = 30, 10
    t = n * length
    h1 = rng.normal(size=(t, 8)).astype(np.float32)
    experts = {"enc.1": (h1 @ want["enc.1.router.weight"].T).argmax(1), "enc.3": (h1 @ want["enc.3.router.weight"].T).argmax(1)}
    path = make_store(str(tmp_path / "s"), lengths=[length] * n, experts=experts, num_experts=4, d_model=8,
                      hidden={"enc.1": h1, "enc.3": h1})
    os.environ["MOETRACE_EXE"] = exe
    try:
        res = speculate.speculate_store(open_store(path), speculate.Options(
            split=speculate.Split(), predictors=("pregate",), model=str(tmp_path / "model"), simulate=False))
    finally:
        del os.environ["MOETRACE_EXE"]
    assert res["unavailable"] == {}
    assert [r["top1"] for r in res["encoder"]["results"] if r["predictor"] == "pregate"] == [1.0]


def test_cli_wrappers_pass_arguments_and_exit_codes(tmp_path):
    exe = find_exe()
    rng = np.random.default_rng(2)
    path = make_store(str(tmp_path / "s"), lengths=[8] * 20, experts={"enc.1": rng.integers(0, 8, 160),
                      "enc.3": rng.integers(0, 8, 160)}, num_experts=8)
    env = {k: v for k, v in os.environ.items() if k != "MOETRACE_PYTHON"}
    env["MOETRACE_PYTHON"] = sys.executable
    r = subprocess.run([exe, "analyze", path, "-o", str(tmp_path / "a"), "--no-plots", "-q"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "a" / "stats.json").read_text())["num_tokens"] == 160
    r = subprocess.run([exe, "speculate", path, "-o", str(tmp_path / "sp"), "--no-plots", "-q", "--cache-sizes", "2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sp" / "speculation.json").exists()
    r = subprocess.run([exe, "analyze", str(tmp_path / "nope"), "-q"], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "moetrace: error:" in r.stderr
    r = subprocess.run([exe, "speculate", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "--cache-sizes" in r.stdout
    env["MOETRACE_PYTHON"] = str(tmp_path / "no-such-python")
    r = subprocess.run([exe, "analyze", path], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "MOETRACE_PYTHON" in r.stderr


def test_routers_reproduce_the_stored_logits_of_a_collected_store(tmp_path):
    """End to end with a real checkpoint: `moetrace collect --hidden bf16` on the tiny fixture model,
    then `moetrace routers`: router weight x stored hidden state = stored logits (up to BF16
    rounding of the hidden state), and speculate's pregate finds the weights by itself."""
    exe = find_exe()
    model = os.path.join(ROOT, "tests", "data", "fixtures", "tiny-a", "model")
    data = os.path.join(ROOT, "assets", "demo", "data")
    store = str(tmp_path / "store")
    r = subprocess.run([exe, "collect", "-t", "40", "-m", model, "--tokenizer", os.path.join(ROOT, "assets", "demo", "spiece.model"),
                        "-o", store, "--hidden", "bf16", "--threads", "1", "--datasets", "demo", "--data-root", data],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, f"moetrace collect failed: {r.stderr.strip()[-300:]}"
    out = str(tmp_path / "routers.safetensors")
    r = subprocess.run([exe, "routers", "--model", model, "-o", out], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    from moetrace.analysis import rows_f32
    from moetrace.safetensors_io import SafetensorsFile
    w = SafetensorsFile(out)
    st = open_store(store)
    for shard in st.iter_shards():
        for name in st.layers:
            h = rows_f32(shard.tensor(f"{name}.hidden"), 0, shard.num_tokens)
            logits = h @ np.asarray(w.tensor(f"{name}.router.weight")).T
            stored = shard.tensor(f"{name}.router_logits", float32=True)
            assert np.abs(logits - stored).max() < 0.25
            assert np.mean(logits.argmax(1) == np.asarray(shard.tensor(f"{name}.expert"))) > 0.98
    os.environ["MOETRACE_EXE"] = exe
    cwd = os.getcwd()
    os.chdir(ROOT)  # the manifest names the model files relative to where collect ran
    try:
        res = speculate.speculate_store(st, speculate.Options(split=speculate.Split(), predictors=("pregate",),
                                                              simulate=False))
    finally:
        os.chdir(cwd)
        del os.environ["MOETRACE_EXE"]
    assert res["unavailable"] == {} and res["encoder"]["results"]
