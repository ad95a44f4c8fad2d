"""python -m moetrace summary, and the dispatch to the analysis/speculate modules."""

import json
import os
import sys
import types

import pytest

from moetrace import __main__ as cli
from conftest import run_module


def test_summary_text(store_factory):
    path, truth = store_factory(synthetic_every=3, dec_layers=(1,), logits_dtype="BF16", hidden_dtype="F32")
    out = run_module("summary", path, fresh=True).stdout
    lines = out.splitlines()
    assert lines[0] == f"trace store     {path}"
    for line in ("status          complete",
                 "format          moetrace-trace v1, written by moetrace 0.1.0",
                 "samples         7 (21 traces)",
                 "MoE layers      encoder [1,3,5], decoder [1]",
                 "experts         8, d_model 16",
                 "stored          logits BF16, hidden F32",
                 "collection      1.5 s, 100.0 tokens/s",
                 "datasets (traces)",
                 "  glue/mrpc                        12",
                 "sample kinds    5 real, 2 synthetic",
                 "per layer             tokens     dropped  drop rate"):
        assert line in lines, line
    assert lines[-1].startswith("manifest check  ok")
    assert sum(line.startswith("  expert ") for line in lines) == 8
    assert any(line.startswith("  dec.1 ") for line in lines)


def test_summary_with_many_experts_lists_the_ten_most_chosen(store_factory):
    path, truth = store_factory(num_experts=40)
    lines = run_module("summary", path).stdout.splitlines()
    assert "  (10 most chosen)" in lines
    shown = [int(line.split()[2]) for line in lines if line.startswith("  expert ")]
    assert len(shown) == 10 and shown == sorted(shown, reverse=True)
    assert any(line.startswith("  least chosen: expert ") for line in lines)


def test_summary_json_matches_manifest(store_factory):
    path, _ = store_factory()
    s = json.loads(run_module("summary", path, "--json", "--verify").stdout)
    m = json.load(open(os.path.join(path, "manifest.json")))
    for key in ("num_samples", "num_tokens", "total_traces", "expert_distribution", "experts_used",
                "diversity_percentage", "dataset_distribution", "per_layer"):
        assert s[key] == m[key], key
    assert s["manifest_mismatches"] == []


def test_summary_reports_a_manifest_that_disagrees_with_its_shards(store_factory):
    path, _ = store_factory()
    mpath = os.path.join(path, "manifest.json")
    m = json.load(open(mpath))
    m["per_layer"]["enc.3"]["dropped"] += 1
    m["expert_distribution"]["0"] += 1
    json.dump(m, open(mpath, "w"))
    proc = run_module("summary", path, check=False)
    assert proc.returncode == 1
    assert "manifest check  MISMATCH" in proc.stdout
    assert "per_layer.enc.3.dropped" in proc.stdout and "expert_distribution" in proc.stdout


def test_summary_error_names_the_file(store_factory):
    path, _ = store_factory()
    with open(os.path.join(path, "shard-00001.safetensors"), "r+b") as f:
        f.truncate(100)
    proc = run_module("summary", path, check=False, fresh=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("moetrace: error: ") and "shard-00001.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plugin_subcommands_dispatch(monkeypatch):
    calls = []
    fake = types.ModuleType("moetrace_fake_analysis")
    fake.main = lambda argv: calls.append(argv) or 3
    monkeypatch.setitem(sys.modules, "moetrace_fake_analysis", fake)
    monkeypatch.setitem(cli.PLUGIN_COMMANDS, "analyze", "moetrace_fake_analysis")
    assert cli.main(["analyze", "STORE", "--x"]) == 3
    assert calls == [["STORE", "--x"]]
    monkeypatch.setitem(cli.PLUGIN_COMMANDS, "speculate", "moetrace_not_there")
    assert cli.main(["speculate"]) == 2


def test_help_lists_subcommands():
    out = run_module("--help", fresh=True).stdout
    for name in ("summary", "export-pickle", "analyze", "speculate"):
        assert name in out
    assert run_module(check=False).returncode == 2


@pytest.mark.parametrize("args", [["export-pickle", "--help"], ["summary", "--help"]])
def test_subcommand_help(args):
    assert run_module(*args).returncode == 0
