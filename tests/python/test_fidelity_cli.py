"""Issue 18 through the CLI on the CPU: `--precision mixed` (fp32 on the CPU engine, said in the
log), `collect --audit` (the manifest's fidelity object: skipped with its reason on the CPU, off with
0, bad values refused in one line), `inspect` showing it (text and --json), verify and the Python
reader accepting it, and what --resume does with it."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO

MODEL = os.path.join(REPO, "tests", "data", "fixtures", "tiny-a", "model")
SPM = os.path.join(REPO, "assets", "demo", "spiece.model")
DATA = os.path.join(REPO, "assets", "demo", "data")


def run(cli, *args, check=True):
    proc = subprocess.run([cli, *map(str, args)], capture_output=True, text=True, cwd=REPO)
    if check is not None:
        assert (proc.returncode == 0) == check, f"{args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def collect(cli, out, *extra, check=True, traces=8):
    return run(cli, "collect", "--model", MODEL, "--tokenizer", SPM, "--datasets", "demo", "--data-root", DATA,
               "--threads", 2, "--no-progress", "--traces", traces, "--samples-per-shard", 3, "-o", out, *extra,
               check=check)


def manifest(store):
    with open(os.path.join(store, "manifest.json")) as f:
        return json.load(f)


def one_error_line(proc):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moetrace: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def measured_fidelity(m):
    """A measured fidelity object that fits the store's layers (what a GPU run writes)."""
    per_layer, tokens = {}, m["num_tokens"]
    for k, block in enumerate(m["layers"]["encoder"]):
        agree = tokens - k - 1
        per_layer[f"enc.{block}"] = {"tokens": tokens, "top1_agree": agree, "top1_agreement": agree / tokens,
                                     "max_logit_error": 0.01 * (k + 1)}
    total_agree = sum(v["top1_agree"] for v in per_layer.values())
    total_tokens = tokens * len(per_layer)
    return {"status": "measured", "reference": "fp32", "precision": "bf16", "fraction": 0.5,
            "samples": m["num_samples"], "seconds": 2.5, "per_layer": per_layer,
            "total": {"tokens": total_tokens, "top1_agree": total_agree,
                      "top1_agreement": total_agree / total_tokens,
                      "max_logit_error": 0.01 * len(per_layer)}}


def write_manifest(store, m):
    with open(os.path.join(store, "manifest.json"), "w") as f:
        json.dump(m, f, indent=2)


def test_precision_mixed_on_the_cpu_is_fp32_and_says_so(cli, tmp_path):
    out = tmp_path / "mixed"
    proc = collect(cli, out, "--precision", "mixed", "--device", "cpu")
    assert "--precision mixed: the CPU engine computes everything in fp32, so mixed is fp32" in proc.stderr
    m = manifest(out)
    assert m["engine"]["precision"] == "fp32"
    # The same bytes as an fp32 run: the CPU engine has one precision.
    ref = tmp_path / "fp32"
    collect(cli, ref, "--precision", "fp32", "--device", "cpu")
    for sh in m["shards"]:
        assert open(out / sh["file"], "rb").read() == open(ref / sh["file"], "rb").read()


@pytest.mark.parametrize("value", ["int4", "mix", "fp64"])
def test_precision_refuses_other_words_naming_mixed(cli, tmp_path, value):
    line = one_error_line(collect(cli, tmp_path / "s", "--precision", value, check=False))
    assert f"--precision '{value}': expected bf16, f16 or f32" in line and "or mixed" in line
    assert not (tmp_path / "s").exists() or not os.listdir(tmp_path / "s")


@pytest.mark.parametrize("value", ["2", "x", "-0.5", "1.5", "nan", ""])
def test_audit_refuses_what_is_not_a_fraction_in_one_line(cli, tmp_path, value):
    line = one_error_line(collect(cli, tmp_path / "s", "--audit", value, check=False))
    assert f"--audit '{value}': expected a fraction of the samples in [0, 1]" in line
    assert not (tmp_path / "s").exists() or not os.listdir(tmp_path / "s")


def test_cpu_store_records_a_skipped_audit_and_inspect_shows_it(cli, tmp_path):
    out = tmp_path / "store"
    proc = collect(cli, out)  # --audit defaults to 0.01
    assert "audit skipped: the CPU engine computes in fp32" in proc.stderr
    f = manifest(out)["fidelity"]
    assert f == {"status": "skipped", "reason": "the CPU engine computes in fp32: the stored routing is fp32's",
                 "reference": "fp32", "precision": "fp32", "fraction": 0.01}
    assert list(manifest(out))[-1] == "fidelity"
    text = run(cli, "inspect", out).stdout
    assert "fidelity        fp32: audit skipped (the CPU engine computes in fp32" in text
    j = json.loads(run(cli, "inspect", out, "--json").stdout)
    assert j["fidelity"]["status"] == "skipped"
    assert run(cli, "verify", out).returncode == 0


def test_audit_zero_writes_no_fidelity(cli, tmp_path):
    out = tmp_path / "store"
    proc = collect(cli, out, "--audit", "0")
    assert "audit skipped" not in proc.stderr and "audit:" not in proc.stderr
    assert "fidelity" not in manifest(out)
    assert "fidelity        not audited" in run(cli, "inspect", out).stdout
    assert json.loads(run(cli, "inspect", out, "--json").stdout)["fidelity"] is None


def test_a_measured_fidelity_is_shown_verified_and_readable(cli, tmp_path):
    out = tmp_path / "store"
    collect(cli, out)
    m = manifest(out)
    m["fidelity"] = measured_fidelity(m)
    write_manifest(out, m)
    assert run(cli, "verify", out).returncode == 0
    text = run(cli, "inspect", out).stdout
    blocks = m["layers"]["encoder"]
    assert f"fidelity        bf16 vs an fp32 re-run of {m['num_samples']} samples" in text
    for block in blocks:
        assert f"  enc.{block} " in text
    assert text.index(f"  enc.{blocks[0]} ") < text.index(f"  enc.{blocks[-1]} ")
    j = json.loads(run(cli, "inspect", out, "--json").stdout)
    assert j["fidelity"]["total"] == m["fidelity"]["total"]
    assert j["fidelity"]["per_layer"] == m["fidelity"]["per_layer"]
    from moetrace.store import open_store

    st = open_store(out)
    assert len(st) == m["num_samples"] and st.manifest["fidelity"]["status"] == "measured"


def test_a_broken_fidelity_is_one_line_in_inspect_and_a_problem_in_verify(cli, tmp_path):
    out = tmp_path / "store"
    collect(cli, out)
    m = manifest(out)
    m["fidelity"] = measured_fidelity(m)
    first = f"enc.{m['layers']['encoder'][0]}"
    m["fidelity"]["per_layer"][first]["top1_agree"] = m["num_tokens"] + 1
    write_manifest(out, m)
    line = one_error_line(run(cli, "inspect", out, check=False))
    assert f"fidelity: per_layer.{first}" in line and "top1_agree" in line
    proc = run(cli, "verify", out, check=False)
    assert proc.returncode != 0 and "top1_agree" in proc.stdout + proc.stderr


def test_resume_keeps_the_fidelity_of_a_complete_store_and_recomputes_it_when_extended(cli, tmp_path):
    out = tmp_path / "store"
    collect(cli, out)
    m = manifest(out)
    m["fidelity"] = measured_fidelity(m)
    write_manifest(out, m)
    before = open(out / "manifest.json").read()
    proc = collect(cli, out, "--resume")  # nothing to compute
    assert "nothing to do" in proc.stderr
    assert open(out / "manifest.json").read() == before
    # Extended: the stale object goes, the audit of the new run records its own.
    collect(cli, out, "--resume", traces=16)
    m2 = manifest(out)
    assert m2["num_samples"] > m["num_samples"]
    assert m2["fidelity"]["status"] == "skipped"
    # Extended with --audit 0: no stale object survives.
    m2["fidelity"] = measured_fidelity(m2)
    write_manifest(out, m2)
    collect(cli, out, "--resume", "--audit", "0", traces=24)
    assert "fidelity" not in manifest(out)
