"""The package as a researcher uses it (issue 16's package items, issue 14 items 6, 16, 17, 20):
slices, one dtype rule, quiet pipes, padding values, packaging, export-pickle paths and ties."""

import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

import moetrace
from conftest import PYTHON_DIR, REPO, run_module
from analysis_testutil import make_store as make_exact_store


def test_store_slices_return_samples(store_factory):
    path, truth = store_factory(num_samples=7, shard_size=3)
    store = moetrace.open_store(path)
    got = store[0:3]
    assert [s.sample_id for s in got] == [t["sample_id"] for t in truth[:3]]
    assert [s.index for s in store[5:]] == [5, 6]
    assert [s.index for s in store[::-3]] == [6, 3, 0]
    assert store[-1].index == 6 and store[2:2] == []


def test_column_and_layer_view_share_one_dtype_rule(store_factory):
    path, truth = store_factory(logits_dtype="F16", hidden_dtype="BF16", num_samples=5)
    store = moetrace.open_store(path)
    col = store.column("enc.1.router_logits")
    view = store.sample(0).layer("enc.1").router_logits
    assert col.dtype == np.float32 and view.dtype == np.float32
    n = len(truth[0]["token_ids"])
    assert np.array_equal(col[:n], view)
    assert store.column("enc.1.hidden")[:n].dtype == np.float32
    assert store.column("enc.1.router_logits", float32=False).dtype == np.float16  # raw on request
    assert store.column("enc.1.expert").dtype == np.int32  # integers never widen


def test_summary_into_a_closed_pipe_is_quiet(store_factory):
    path, _ = store_factory(num_samples=30, shard_size=4, num_experts=64)
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
    # `| head -n 0`, deterministically: the reader is gone before the first write.
    proc = subprocess.Popen([sys.executable, "-m", "moetrace", "summary", path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert proc.returncode == 141


def test_torch_label_padding_is_minus_100():
    from moetrace.padding import LABEL_PAD, pad_value
    assert LABEL_PAD == -100
    assert pad_value("enc.1.expert") == -100 and pad_value("dec.3.expert") == -100
    assert pad_value("dec_output_ids") == -100
    assert pad_value("token_ids") == 0 and pad_value("enc.1.router_logits") == 0 and pad_value("enc.1.dropped") is False


def test_package_ships_py_typed_and_declares_extras():
    assert os.path.isfile(os.path.join(PYTHON_DIR, "moetrace", "py.typed"))
    text = open(os.path.join(PYTHON_DIR, "pyproject.toml")).read()
    assert re.search(r'^analysis = \[.*"matplotlib', text, re.M)
    assert re.search(r'^torch = \["torch"\]', text, re.M)
    assert re.search(r'^parquet = \[.*"pandas', text, re.M)
    assert re.search(r'^datasets = \[.*"datasets', text, re.M)
    assert '"py.typed"' in text


def test_setup_installs_the_package_editable():
    text = open(os.path.join(REPO, "scripts", "setup.sh")).read()
    assert re.search(r"pip install .*-e python", text)


def test_export_pickle_creates_missing_directories(store_factory, tmp_path):
    path, _ = store_factory(num_samples=3)
    out = tmp_path / "new" / "dir" / "out.pkl"
    proc = run_module("export-pickle", path, out)
    assert proc.returncode == 0 and out.exists() and out.with_suffix(".json").exists()
    assert len(pickle.load(open(out, "rb"))) == 3 * 3


def test_export_pickle_into_a_file_path_is_one_line(store_factory, tmp_path):
    path, _ = store_factory(num_samples=3)
    (tmp_path / "afile").write_text("x")
    proc = run_module("export-pickle", path, tmp_path / "afile" / "out.pkl", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("moetrace: error:") and "Traceback" not in proc.stderr


def test_target_top_k_agrees_with_target_routing_on_fp16_ties(tmp_path):
    # F16 logits where experts 2 and 5 tie after rounding; the engine (fp32) chose 5, the higher index.
    rng = np.random.default_rng(0)
    t, e = 40, 8
    lg = rng.uniform(-2, 0, size=(t, e)).astype(np.float32)
    lg[:, 2] = 1.0
    lg[:, 5] = 1.0 + 1e-5           # fp32: 5 wins; fp16: both round to 1.0
    experts = np.full(t, 5, np.int32)
    path = make_exact_store(str(tmp_path / "s"), lengths=[10] * 4, experts={"enc.1": experts},
                            logits={"enc.1": lg}, num_experts=e, logits_dtype=np.float16)
    from moetrace.compat import gating_records
    recs = list(gating_records(path))
    assert len(recs) == 4
    for r in recs:
        assert np.array_equal(r["target_top_k"][:, 0], np.full(10, 5))
        assert np.array_equal(r["target_routing"].argmax(axis=1), r["target_top_k"][:, 0])
        assert np.allclose(r["target_routing"].sum(axis=1), 1.0, atol=1e-5)


def test_usage_stats_write_the_seed_names_too():
    from moetrace.analysis import usage_stats
    s = usage_stats([1, 2, 3, 10])
    assert s["coefficient_of_variation"] == s["cv"] and s["min_usage"] == s["min"] == 1.0
    assert s["max_usage"] == s["max"] == 10.0
    doc = open(os.path.join(REPO, "docs", "ANALYSIS.md")).read()
    for name in ("coefficient_of_variation", "min_usage", "max_usage"):
        assert name in doc


def test_readme_sample_id_exists_in_a_demo_store(cli, tmp_path):
    text = open(os.path.join(PYTHON_DIR, "README.md")).read()
    ids = re.findall(r'store\.sample\("([^"]+)"\)', text)
    assert ids, "python/README.md shows a sample id"
    ids += re.findall(r'store\["([^"]+)"\]', open(os.path.join(REPO, "docs", "TRACE_FORMAT.md")).read())
    out = tmp_path / "demo"
    subprocess.run([cli, "collect", "-o", str(out), "-t", "120"], check=True, capture_output=True)
    store = moetrace.open_store(str(out))
    for sid in ids:
        assert store.sample(sid).sample_id == sid


@pytest.mark.parametrize("command", ["analyze", "speculate"])
def test_missing_matplotlib_is_one_line(store_factory, tmp_path, monkeypatch, command):
    path, _ = store_factory(num_samples=6)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "moetrace.plots", raising=False)
    import moetrace
    monkeypatch.delattr(moetrace, "plots", raising=False)
    proc = run_module(command, path, "-o", tmp_path / "o", "-q", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "moetrace[analysis]" in proc.stderr
