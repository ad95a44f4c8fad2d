"""The C++ CLI's general options and its inspect/verify/routers subcommands as a new user types them
(issue 14 items 9-13, issue 15 item 12): one dtype vocabulary, -q/--log-level in either position,
`routers --model random:...`, `inspect STORE/manifest.json`, typo suggestions, missing-store
messages, verify's mismatch lines, progress and --json, --version, model checks against config.json,
and one-line errors for broken manifests."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import struct
import subprocess

import numpy as np
import pytest

from conftest import REPO, write_safetensors

MODEL = os.path.join(REPO, "tests", "data", "fixtures", "tiny-a", "model")
SPM = os.path.join(REPO, "assets", "demo", "spiece.model")
DATA = os.path.join(REPO, "assets", "demo", "data")
CPP_SUBCOMMANDS = ("collect", "inspect", "verify", "routers", "forward", "tokenize", "merge", "datasets")


def run(cli, *args, cwd=REPO, check=None):
    proc = subprocess.run([cli, *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if check is not None:
        assert (proc.returncode == 0) == check, f"{args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def one_error_line(proc, raw_json_error=False):
    """The CLI's contract for bad input: non-zero exit, one "moetrace: error:" line, no traceback, no raw
    JSON-library message (unless it quotes a parse error's position: raw_json_error)."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moetrace: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert raw_json_error or "json.exception" not in proc.stderr, proc.stderr
    return lines[0]


def collect(cli, out, *extra, check=True):
    return run(cli, "collect", "--model", MODEL, "--tokenizer", SPM, "--datasets", "demo", "--data-root", DATA,
               "--threads", 2, "--no-progress", "--traces", 8, "-o", out, *extra, check=check)


# --- one dtype vocabulary --------------------------------------------------------------------------


@pytest.mark.parametrize("logits,want", [("fp16", "F16"), ("half", "F16"), ("float32", "F32"), ("BF16", "BF16"),
                                         ("bfloat16", "BF16"), ("f16", "F16")])
def test_collect_takes_every_dtype_spelling(cli, tmp_path, logits, want):
    out = tmp_path / "store"
    collect(cli, out, "--logits", logits, "--hidden", "bfloat16", "--precision", "f16")
    m = json.load(open(out / "manifest.json"))
    assert m["logits_dtype"] == want and m["hidden_dtype"] == "BF16"


@pytest.mark.parametrize("option,value,expected", [
    ("--logits", "int8", "expected f32, f16 or bf16"),
    ("--hidden", "fp16", "expected none, bf16 or f32"),
    ("--precision", "int4", "expected bf16, f16 or f32"),
])
def test_collect_refuses_other_dtypes_in_one_line(cli, tmp_path, option, value, expected):
    line = one_error_line(collect(cli, tmp_path / "store", option, value, check=False))
    assert f"{option} '{value}'" in line and expected in line and "fp16" in line
    assert not (tmp_path / "store").exists() or not os.listdir(tmp_path / "store")


def test_collect_refuses_a_negative_batch_overhead_in_one_line(cli, tmp_path):
    line = one_error_line(collect(cli, tmp_path / "store", "--batch-overhead", "-3", check=False))
    assert "--batch-overhead -3: expected 0 or more tokens" in line
    assert not (tmp_path / "store").exists() or not os.listdir(tmp_path / "store")


def test_collect_records_its_batch_overhead(cli, tmp_path):
    collect(cli, tmp_path / "default")
    collect(cli, tmp_path / "none", "--batch-overhead", "0")
    assert json.load(open(tmp_path / "default" / "manifest.json"))["engine"]["batch_overhead_tokens"] == 256
    assert json.load(open(tmp_path / "none" / "manifest.json"))["engine"]["batch_overhead_tokens"] == 0


# --- -q and --log-level in either position ---------------------------------------------------------


@pytest.mark.parametrize("sub", CPP_SUBCOMMANDS)
def test_every_subcommand_documents_quiet_and_log_level(cli, sub):
    text = run(cli, sub, "--help", check=True).stdout
    assert re.search(r"-q,\s*--quiet", text), text
    assert "--log-level" in text


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_log_level_work_before_and_after_the_subcommand(cli, tmp_path, where):
    out = tmp_path / "routers.safetensors"

    def routers(*opts):
        args = ["routers", "--model", "demo", "-o", out]
        return run(cli, *(list(opts) + args if where == "before" else args + list(opts)), check=True)

    assert "routers: wrote" in routers().stderr
    assert routers("-q").stderr == ""
    assert routers("--quiet").stderr == ""
    assert routers("--log-level", "error").stderr == ""
    assert routers("--log-level", "info").stderr != ""
    one_error_line(run(cli, *(["--log-level", "loud", "inspect", "demo"] if where == "before"
                              else ["inspect", "demo", "--log-level", "loud"])))


def test_nested_subcommands_take_them_too(cli):
    for args in (["datasets", "list", "-q"], ["datasets", "list", "--log-level", "warn"], ["-q", "datasets", "list"]):
        assert "cnn_dailymail" in run(cli, *args, check=True).stdout


def test_explicit_log_level_wins_over_quiet(cli, tmp_path):
    out = tmp_path / "r.safetensors"
    assert "routers: wrote" in run(cli, "-q", "routers", "--model", "demo", "-o", out, "--log-level", "info",
                                   check=True).stderr


# --- routers --model like collect's ----------------------------------------------------------------


@pytest.mark.parametrize("spec,experts,d_model", [("random:switch-base-2", 2, 768), ("demo", 8, 64)])
def test_routers_takes_collects_model_names(cli, tmp_path, spec, experts, d_model):
    out = tmp_path / "r.safetensors"
    run(cli, "routers", "--model", spec, "-o", out, "-q", check=True)
    raw = open(out, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["num_experts"] == str(experts)
    assert header["__metadata__"]["d_model"] == str(d_model)
    assert header["enc.1.router.weight"]["shape"] == [experts, d_model]


# --- stores by their manifest, typos, missing stores -----------------------------------------------


def test_inspect_and_verify_take_the_manifest_path(cli, store_factory):
    path, _ = store_factory()
    by_dir = run(cli, "inspect", path, check=True).stdout
    assert run(cli, "inspect", os.path.join(path, "manifest.json"), check=True).stdout == by_dir
    assert run(cli, "verify", os.path.join(path, "manifest.json"), check=True).stdout.startswith("OK ")


def test_a_mistyped_subcommand_suggests_the_right_one(cli):
    proc = run(cli, "colect", "-o", "x")
    line = one_error_line(proc)
    assert "unknown command 'colect'" in line and "did you mean 'collect'" in line
    line = one_error_line(run(cli, "-q", "inspcet", "demo"))
    assert "did you mean 'inspect'" in line
    assert "did you mean" not in one_error_line(run(cli, "frobnicate"))


def test_a_mistyped_store_path_is_a_missing_store(cli, store_factory, tmp_path):
    store_factory("routing_data/traces")
    line = one_error_line(run(cli, "inspect", "routing_data/trcaes", cwd=tmp_path))
    assert "routing_data/trcaes: no such trace store or model directory" in line
    assert "did you mean routing_data/traces?" in line
    assert "download" not in line and "Hugging Face" not in line
    line = one_error_line(run(cli, "inspect", "nowhere/at/all", cwd=tmp_path))
    assert "no such trace store or model directory" in line and "download" not in line


# --- verify: what differs, progress, --json --------------------------------------------------------


def test_verify_names_the_entries_that_differ(cli, store_factory):
    path, _ = store_factory()
    mpath = os.path.join(path, "manifest.json")
    m = json.load(open(mpath))
    got_e3 = m["expert_distribution"]["3"]
    m["expert_distribution"]["3"] += 5
    m["per_layer"]["enc.3"]["dropped"] += 1
    json.dump(m, open(mpath, "w"))
    proc = run(cli, "verify", path)
    assert proc.returncode == 1
    assert f"expert_distribution.3 is {got_e3 + 5} but the shards give {got_e3}" in proc.stdout
    assert re.search(r"per_layer\.enc\.3\.dropped is \d+ but the shards give \d+", proc.stdout)
    # Only the entries that differ: not the whole distribution.
    assert "expert_distribution.0" not in proc.stdout


def read_pty(fd):
    out = b""
    while True:
        r, _, _ = select.select([fd], [], [], 10)
        if not r:
            break
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


@pytest.mark.parametrize("extra", [(), ("--no-progress",), ("-q",)])
def test_verify_draws_progress_on_a_terminal_only(cli, store_factory, extra):
    path, _ = store_factory(num_samples=9, shard_size=1)
    master, slave = pty.openpty()
    os.set_blocking(master, True)
    proc = subprocess.Popen([cli, "verify", path, *extra], stdout=subprocess.PIPE, stderr=slave, cwd=REPO)
    os.close(slave)
    err = read_pty(master)
    stdout = proc.communicate()[0].decode()
    os.close(master)
    assert proc.returncode == 0 and stdout.startswith("OK ")
    if extra:
        assert err == ""
    else:
        assert "9/9 shards" in err and "\r" in err
        assert all(len(part) < 200 for part in err.split("\r"))
    # Not a terminal: nothing on stderr.
    assert run(cli, "verify", path).stderr == ""


def test_verify_json(cli, store_factory):
    path, truth = store_factory()
    j = json.loads(run(cli, "verify", path, "--json", check=True).stdout)
    assert j["ok"] is True and j["problems"] == [] and j["complete"] is True
    assert j["num_samples"] == len(truth) and j["num_shards"] == 3 and j["bytes"] > 0
    for key in ("store", "num_tokens", "total_traces"):
        assert key in j
    with open(os.path.join(path, "shard-00001.safetensors"), "r+b") as f:
        f.truncate(100)
    proc = run(cli, "verify", path, "--json")
    assert proc.returncode == 1
    j = json.loads(proc.stdout)
    assert j["ok"] is False and any("shard-00001.safetensors" in p for p in j["problems"])


def test_inspect_json_of_a_store(cli, store_factory):
    path, truth = store_factory(dec_layers=(1,), logits_dtype="BF16")
    j = json.loads(run(cli, "inspect", path, "--json", check=True).stdout)
    m = json.load(open(os.path.join(path, "manifest.json")))
    assert j["kind"] == "trace_store" and j["complete"] is True
    for key in ("num_samples", "total_traces", "num_tokens", "num_decoder_tokens", "expert_distribution",
                "experts_used", "diversity_percentage", "dataset_distribution", "num_experts", "d_model",
                "logits_dtype", "hidden_dtype", "device", "collection_time", "throughput_tokens_per_s"):
        assert j[key] == m[key], key
    assert j["layers"] == m["layers"] and j["num_shards"] == len(m["shards"])
    assert j["bytes"] == sum(s["bytes"] for s in m["shards"]) and j["model"] == "test/random"
    assert set(j["per_layer"]) == set(m["per_layer"])


# --- --version -------------------------------------------------------------------------------------


def test_version_names_commit_cuda_and_libraries(cli):
    out = run(cli, "--version", check=True).stdout
    fields = dict(re.findall(r"^(\w+)\s+(.+)$", out, re.M))
    assert out.startswith("moetrace 0.")
    assert fields["cuda"].startswith(("compiled in", "not compiled in"))
    assert re.match(r"\d+\.\d+", fields["arrow"]), out
    assert re.match(r"\d+\.\d+", fields["sentencepiece"]), out
    describe = subprocess.run(["git", "describe", "--always", "--tags"], capture_output=True, text=True,
                              cwd=REPO)
    if describe.returncode == 0:
        assert fields["commit"].removesuffix("-dirty") == describe.stdout.strip()
    else:
        assert fields["commit"] == "unknown"


# --- inspect MODEL checks its tensors against config.json -------------------------------------------


def copy_model(tmp_path, **config_changes):
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(os.path.join(MODEL, "model.safetensors"), d)
    cfg = json.load(open(os.path.join(MODEL, "config.json")))
    cfg.update(config_changes)
    json.dump(cfg, open(d / "config.json", "w"))
    return d


def test_inspect_accepts_the_fixture_and_says_it_has_no_tokenizer(cli):
    proc = run(cli, "inspect", MODEL, check=True)
    assert re.search(r"^check\s+\d+ tensors agree with config.json", proc.stdout, re.M), proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("tokenizer"))
    assert line.split()[1] == "none" and "demo/spiece.model" in line and "--tokenizer" in line


def test_inspect_refuses_a_config_that_contradicts_the_weights(cli, tmp_path):
    d = copy_model(tmp_path, d_model=48)
    proc = run(cli, "inspect", d)
    line = one_error_line(proc)
    assert "disagree with config.json" in line and "shared.weight" in line and "[32128, 48]" in line
    assert "MISMATCH" in proc.stdout
    j = json.loads(run(cli, "inspect", d, "--json").stdout)
    assert j["ok"] is False and any("has shape [32128, 32]" in p for p in j["problems"])
    assert j["tokenizer"] is None


def test_inspect_json_of_a_model(cli):
    j = json.loads(run(cli, "inspect", MODEL, "--json", check=True).stdout)
    assert j["kind"] == "model" and j["ok"] is True and j["problems"] == []
    assert j["config"]["d_model"] == 32 and j["sparse_encoder_blocks"] == [1, 3]
    assert j["parameters"]["total"] > 0 and set(j["dtypes"]) == {"F32"}
    assert j["directory"] == MODEL and j["files"] and j["demo"] is False


def test_router_weights_with_nan_warn_once_per_tensor(cli, tmp_path):
    d = copy_model(tmp_path)
    path = d / "model.safetensors"
    raw = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = "encoder.block.1.layer.1.mlp.router.classifier.weight"
    start = 8 + n + header[name]["data_offsets"][0]
    raw[start:start + 8] = struct.pack("<2f", float("nan"), float("inf"))
    open(path, "wb").write(bytes(raw))
    proc = run(cli, "inspect", d, check=True)
    assert f"router tensor '{name}' has 2 NaN/Inf values" in proc.stdout
    ids = np.array([[100, 200, 300, 1]], np.int64)
    inp = tmp_path / "in.safetensors"
    write_safetensors(str(inp), {"input_ids": ids, "attention_mask": np.ones_like(ids)}, {})
    proc = run(cli, "forward", "--model", d, "--inputs", inp, "-o", tmp_path / "out.safetensors", "--threads", 1,
               check=True)
    warnings = [x for x in proc.stderr.splitlines() if "NaN/Inf" in x]
    assert len(warnings) == 1 and name in warnings[0], proc.stderr


# --- broken manifests: one line naming what is wrong ------------------------------------------------


def test_inspect_says_an_unparsable_manifest_is_unparsable(cli, store_factory):
    path, _ = store_factory()
    with open(os.path.join(path, "manifest.json"), "w") as f:
        f.write('{"format": "moetrace-trace", "format_version": 1,')
    line = one_error_line(run(cli, "inspect", path), raw_json_error=True)
    assert "manifest.json: not valid JSON" in line and "column 50" in line and "config" not in line


@pytest.mark.parametrize("edit,field", [
    (lambda m: m["shards"][1].update(bytes="12"), "bytes"),
    (lambda m: m["per_layer"]["enc.3"].update(tokens="many"), "per_layer.enc.3.tokens"),
    (lambda m: m.update(device=5), "device"),
    (lambda m: m.update(complete="yes"), "complete"),
    (lambda m: m["expert_distribution"].update({"2": [1]}), "expert_distribution.2"),
    (lambda m: m.update(dataset_distribution=[1, 2]), "dataset_distribution"),
    (lambda m: m.update(model={"id": 7}), "model.id"),
])
def test_inspect_names_a_field_of_the_wrong_type(cli, store_factory, edit, field):
    path, _ = store_factory()
    mpath = os.path.join(path, "manifest.json")
    m = json.load(open(mpath))
    edit(m)
    json.dump(m, open(mpath, "w"))
    line = one_error_line(run(cli, "inspect", path))
    assert f'"{field}"' in line and "manifest.json" in line, line


# --- tokenize --model like collect's ----------------------------------------------------------------


def test_tokenize_takes_collects_model_names(cli):
    ref = subprocess.run([cli, "tokenize", "--spm", SPM], input='{"text": "Hello world"}\n', capture_output=True,
                         text=True, check=True).stdout
    for spec in ("demo", "random:switch-base-8"):
        proc = subprocess.run([cli, "tokenize", "--model", spec], input='{"text": "Hello world"}\n',
                              capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout == ref, proc.stderr
    proc = subprocess.run([cli, "tokenize", "--model", MODEL], input="", capture_output=True, text=True)
    line = one_error_line(proc)
    assert "no spiece.model" in line and "--spm" in line
