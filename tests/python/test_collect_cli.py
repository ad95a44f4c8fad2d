"""End-to-end tests of the C++ `moetrace collect`: real, synthetic and mixed modes on the tiny fixture
model and the bundled real data; the manifest's counts against the shards (`moetrace verify` and an
independent recount here); resume after kill -9 at several points and after Ctrl-C gives the store of
an uninterrupted run; refusals of unusable outputs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import REPO

import moetrace

MODEL = os.path.join(REPO, "tests", "data", "fixtures", "tiny-a", "model")
SPM = os.path.join(REPO, "assets", "demo", "spiece.model")
DATA = os.path.join(REPO, "assets", "demo", "data")


def collect(cli, out, *extra, env=None, check=True):
    cmd = [cli, "collect", "--model", MODEL, "--tokenizer", SPM, "--datasets", "demo", "--data-root", DATA,
           "--threads", "2", "--no-progress", "-o", str(out), *map(str, extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stderr}"
    return proc


def shard_digests(store):
    m = json.load(open(os.path.join(store, "manifest.json")))
    return [(s["file"], s["num_samples"], hashlib.sha256(open(os.path.join(store, s["file"]), "rb").read()).hexdigest())
            for s in m["shards"]]


def recount(store):
    """The manifest's seed fields recomputed from the shards with the Python reader."""
    st = moetrace.open_store(store)
    E = st.num_experts
    dist = np.zeros(E, np.int64)
    for i in st.encoder_layers:
        for chunk in st.column(f"enc.{i}.expert").chunks():
            dist += np.bincount(chunk, minlength=E)
    datasets = {}
    for d in st.datasets:
        datasets[d] = datasets.get(d, 0) + len(st.encoder_layers)
    return st, dist, datasets


@pytest.mark.parametrize("mode", ["real", "synthetic", "mixed"])
def test_modes_write_verified_stores(cli, tmp_path, mode):
    out = tmp_path / "store"
    collect(cli, out, "--mode", mode, "--traces", 120, "--real-ratio", 0.25, "--samples-per-shard", 16)
    assert subprocess.run([cli, "verify", str(out)], capture_output=True).returncode == 0
    st, dist, datasets = recount(out)
    m = st.manifest
    L = len(st.encoder_layers)
    assert m["complete"] is True
    assert len(st) == 60 and m["total_traces"] == 60 * L  # ceil(120 / 2 MoE layers)
    assert [m["expert_distribution"][str(e)] for e in range(st.num_experts)] == dist.tolist()
    assert m["experts_used"] == int((dist > 0).sum())
    assert m["dataset_distribution"] == datasets
    kinds = np.concatenate([s.tensor("sample_kind") for s in st.iter_shards()])
    if mode == "real":
        assert kinds.sum() == 0 and "synthetic" not in datasets
    elif mode == "synthetic":
        assert kinds.all() and m["experts_used"] == st.num_experts  # coverage by design
        assert all(st.sample(i).sample_id.startswith("synthetic/") for i in range(len(st)))
    else:
        assert kinds.sum() == 45  # exactly (1 - 0.25) of 60 synthetic
        first_real = [k for k in range(len(kinds)) if kinds[k] == 0]
        assert first_real == list(range(3, 60, 4))  # interleaved, not real-first


def test_same_seed_same_store_and_other_seed_differs(cli, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    collect(cli, a, "--traces", 80, "--seed", 5)
    collect(cli, b, "--traces", 80, "--seed", 5, "--batch-tokens", 512)  # other batching, same plan
    collect(cli, c, "--traces", 80, "--seed", 6)
    sa, sb, sc = (moetrace.open_store(p) for p in (a, b, c))
    assert sa.sample_ids == sb.sample_ids and sa.sample_ids != sc.sample_ids
    for i in range(len(sa)):  # routing decisions do not depend on how samples were batched
        assert np.array_equal(sa.sample(i).layer("enc.1").expert, sb.sample(i).layer("enc.1").expert)
        assert np.array_equal(sa.sample(i).layer("enc.3").dropped, sb.sample(i).layer("enc.3").dropped)


@pytest.mark.parametrize("kill_points,window", [([1], 16), ([7, 13], 16), ([16, 3, 29], 16), ([20, 40], 48)])
def test_resume_after_kill9_equals_uninterrupted(cli, tmp_path, kill_points, window):
    """Kill -9 right after the N-th sample of a run reached the writer (inside a shard, at a shard
    boundary, during a background commit, inside a window of three shards), resume until done: the
    same shards as one clean run."""
    args = ["--traces", 200, "--samples-per-shard", 16, "--batch-window", window, "--logits", "f32", "--hidden",
            "bf16", "--seed", 3]
    clean = tmp_path / "clean"
    collect(cli, clean, *args)
    out = tmp_path / "killed"
    first = True
    for n in kill_points:
        proc = collect(cli, out, *args, *([] if first else ["--resume"]),
                       env={"MOETRACE_FAULT_KILL_AFTER": str(n)}, check=False)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        first = False
        m = json.load(open(out / "manifest.json"))
        assert m["complete"] is False
        # Whatever was committed is a valid store already.
        assert subprocess.run([cli, "verify", str(out)], capture_output=True).returncode == 0
    collect(cli, out, *args, "--resume")
    assert shard_digests(out) == shard_digests(clean)
    assert json.load(open(out / "manifest.json"))["complete"] is True


def test_ctrl_c_commits_and_resumes(cli, tmp_path):
    # A run that ends before the interrupt arrives proves nothing: try again with a 10x larger job
    # (the first size is enough unless the machine is very fast); never skip.
    for traces in (2000, 20000, 200000):
        args = ["--traces", traces, "--samples-per-shard", 32, "--seed", 1, "--max-length", 64]
        out = tmp_path / f"store-{traces}"
        cmd = [cli, "collect", "--model", MODEL, "--tokenizer", SPM, "--datasets", "demo", "--data-root", DATA,
               "--threads", "2", "--no-progress", "-o", str(out), *map(str, args)]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO)
        # Wait until collection is under way (the store's manifest exists), then interrupt.
        deadline = time.time() + 60
        while not (out / "manifest.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
        # Finished before the interrupt: exit 0, or the signal's default action once collect had
        # returned (its handlers are collect's own, for the loop).
        finished = json.load(open(out / "manifest.json")).get("complete", False)
        if proc.returncode != 0 and not finished:
            break
    assert proc.returncode == 130, err
    assert "--resume" in err
    assert subprocess.run([cli, "verify", str(out)], capture_output=True).returncode == 0
    collect(cli, out, *args, "--resume")
    clean = tmp_path / "clean"
    collect(cli, clean, *args)
    assert shard_digests(out) == shard_digests(clean)


def test_refuses_foreign_output_and_changed_settings(cli, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = collect(cli, foreign, "--traces", 10, check=False)
    errors = [l for l in proc.stderr.splitlines() if "error" in l]
    assert proc.returncode != 0 and len(errors) == 1 and "foreign" in errors[0]
    assert (foreign / "notes.txt").read_text() == "mine"

    out = tmp_path / "store"
    collect(cli, out, "--traces", 10)
    proc = collect(cli, out, "--traces", 10, check=False)  # exists, no --resume/--overwrite
    assert proc.returncode != 0 and ("--resume" in proc.stderr or "--overwrite" in proc.stderr)
    proc = collect(cli, out, "--traces", 10, "--seed", 9, "--resume", check=False)
    assert proc.returncode != 0 and "seed" in proc.stderr
    collect(cli, out, "--traces", 10, "--seed", 9, "--overwrite")


def test_unwritable_output_gives_one_line_error(cli, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/moetrace-cannot-write-here"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "store")
    proc = collect(cli, target, "--traces", 10, check=False)
    assert proc.returncode != 0
    err = [l for l in proc.stderr.splitlines() if "error" in l]
    assert len(err) == 1 and ("moetrace-cannot-write-here" in err[0] or "store" in err[0]), err


def test_bad_flags_are_refused(cli, tmp_path):
    for flags in (["--mode", "fancy"], ["--logits", "f64"], ["--hidden", "f16"], ["--real-ratio", "1.5"]):
        proc = collect(cli, tmp_path / "x", "--traces", 4, *flags, check=False)
        assert proc.returncode != 0 and "error" in proc.stderr.lower(), flags
