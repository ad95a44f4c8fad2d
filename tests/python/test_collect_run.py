"""The run flow of the C++ `moetrace collect` (issues #13, #14, #15): --device auto/cpu/cuda/cuda:N,
the real argv in the manifest, the store lock against a second process, SIGINT/SIGTERM committing
what is complete, a complete store resuming as a no-op, --resume with more traces extending the
store, the engine settings recorded and checked on resume, the progress line, the model-loaded and
Output lines, one throughput figure, timestamps on log lines. On the tiny fixture model."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

import pytest

from conftest import REPO

MODEL = os.path.join(REPO, "tests", "data", "fixtures", "tiny-a", "model")
SPM = os.path.join(REPO, "assets", "demo", "spiece.model")
DATA = os.path.join(REPO, "assets", "demo", "data")
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[moetrace (debug|info|warn|error)\] ")
# Variables that would make the run a rank of a data-parallel collection.
LAUNCHER_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "SLURM_PROCID",
                 "SLURM_STEP_NUM_TASKS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MOETRACE_FAULT_KILL_AFTER")


def env(**extra):
    e = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    e.update(extra)
    return e


def args(cli, out, *extra, threads=2):
    return [cli, "collect", "--model", MODEL, "--tokenizer", SPM, "--datasets", "demo", "--data-root", DATA,
            "--threads", str(threads), "-o", str(out), *map(str, extra)]


def collect(cli, out, *extra, check=True, progress=False, threads=2):
    cmd = args(cli, out, *extra, threads=threads) + ([] if progress else ["--no-progress"])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env())
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stderr}"
    return proc


def manifest(store):
    return json.load(open(os.path.join(store, "manifest.json")))


def shard_digests(store):
    return [(s["file"], s["num_samples"], hashlib.sha256(open(os.path.join(store, s["file"]), "rb").read()).hexdigest())
            for s in manifest(store)["shards"]]


def verify(cli, store):
    proc = subprocess.run([cli, "verify", str(store)], capture_output=True, text=True, env=env())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def error_lines(stderr):
    return [l for l in stderr.splitlines() if "error" in l.lower()]


def wait_for(predicate, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# --- A: the device --------------------------------------------------------------------------------

def test_device_auto_is_the_default_and_recorded(cli, tmp_path):
    out = tmp_path / "store"
    proc = collect(cli, out, "--traces", 12)
    m = manifest(out)
    # This machine has no GPU (or the build has no CUDA): auto runs on the CPU, and says so.
    assert m["engine"]["device"] == "cpu" and m["device"].startswith("cpu (")
    loaded = [l for l in proc.stderr.splitlines() if "model loaded:" in l]
    assert len(loaded) == 1 and " on cpu (" in loaded[0], proc.stderr
    assert re.search(r", \d+(\.\d)? (bytes|KiB|MiB|GiB) resident, in \d+\.\d s$", loaded[0]), loaded[0]


def test_device_cuda_without_a_gpu_fails_fast_and_leaves_nothing_behind(cli, tmp_path):
    out = tmp_path / "store"
    # An unknown dataset: had the datasets been scanned first, that would be the error.
    cmd = args(cli, out, "--traces", 12, "--device", "cuda", "--no-progress")
    cmd[cmd.index("demo")] = "no-such-dataset"
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env())
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert "--device cuda" in lines[0] and "no-such-dataset" not in lines[0], lines[0]
    assert "no CUDA GPU is visible" in lines[0] or "built without the CUDA backend" in lines[0], lines[0]
    assert "Cuda" not in lines[0] and "::" not in lines[0], lines[0]  # no internal class
    assert not out.exists()
    # The failed start blocks nothing: the next run writes its store.
    collect(cli, out, "--traces", 12)
    verify(cli, out)


def bad_weights_model(tmp_path):
    """The fixture model with one encoder weight's shape transposed in the safetensors header: its
    files are found and parsed, and the engine refuses it when it starts."""
    model = tmp_path / "bad-model"
    model.mkdir()
    with open(os.path.join(MODEL, "config.json")) as f:
        (model / "config.json").write_text(f.read())
    raw = open(os.path.join(MODEL, "model.safetensors"), "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name = "encoder.block.0.layer.1.mlp.wi.weight"
    header[name]["shape"] = header[name]["shape"][::-1]
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])
    return model, name


def test_a_failed_engine_start_leaves_no_store_behind(cli, tmp_path):
    out = tmp_path / "store"
    model, name = bad_weights_model(tmp_path)
    cmd = args(cli, out, "--traces", 12, "--no-progress")
    cmd[cmd.index(MODEL)] = str(model)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env())
    assert proc.returncode != 0 and name in proc.stderr, proc.stderr
    assert not out.exists()  # before: a manifest.json, and the next run said "is not empty"
    collect(cli, out, "--traces", 12)
    verify(cli, out)


@pytest.mark.parametrize("device", ["cuda:1", "cuda:0"])
def test_device_cuda_n_parses(cli, tmp_path, device):
    proc = collect(cli, tmp_path / "store", "--traces", 12, "--device", device, check=False)
    # Parsed: refused for the missing GPU, not as an unknown device.
    assert proc.returncode != 0
    assert f"--device {device}:" in proc.stderr and "expected auto" not in proc.stderr, proc.stderr
    proc = collect(cli, tmp_path / "other", "--traces", 12, "--device", "gpu", check=False)
    assert proc.returncode != 0 and "expected auto, cpu, cuda or cuda:N" in proc.stderr


# --- B: the run -----------------------------------------------------------------------------------

def test_manifest_records_the_real_command_line(cli, tmp_path):
    out = tmp_path / "store"
    collect(cli, out, "--traces", 12, "--seed", 5)
    cl = manifest(out)["command_line"]
    assert cl[0].endswith("moetrace") and cl[1:] == args(cli, out, "--traces", 12, "--seed", 5)[1:] + ["--no-progress"]


# A collection that runs for a minute or more on the tiny model (greedy decoding, small shards).
SLOW = ["--traces", 40000, "--samples-per-shard", 4, "--max-length", 64, "--decoder"]


def slow_run(cli, out, *extra):
    """SLOW started in the background."""
    cmd = args(cli, out, *SLOW, "--no-progress", *extra, threads=1)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env())


def test_a_second_process_on_the_store_is_refused_with_the_holders_pid(cli, tmp_path):
    out = tmp_path / "store"
    first = slow_run(cli, out)
    try:
        lock = out / ".moetrace.lock"
        assert wait_for(lambda: lock.exists() and lock.read_text().strip() == str(first.pid)), "no lock"
        for extra in (["--resume"], ["--overwrite"]):
            second = collect(cli, out, *SLOW, *extra, check=False, threads=1)
            assert second.returncode != 0
            errs = error_lines(second.stderr)
            assert len(errs) == 1 and f"in use by another moetrace process (pid {first.pid})" in errs[0], \
                second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    # The lock went with its holder: the store resumes (and is left valid).
    verify(cli, out)
    proc = slow_run(cli, out, "--resume")
    assert wait_for(lambda: (out / ".moetrace.lock").read_text().strip() == str(proc.pid))
    proc.kill()  # a crash releases the lock too
    proc.communicate(timeout=60)
    collect(cli, out, "--traces", 8, "--samples-per-shard", 4, "--max-length", 64, "--overwrite", threads=1)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_commits_what_is_complete(cli, tmp_path, sig, code):
    out = tmp_path / "store"
    proc = slow_run(cli, out)
    # Wait until a few shards are committed, then stop the run.
    assert wait_for(lambda: (out / "manifest.json").exists() and len(manifest(out)["shards"]) >= 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    m = manifest(out)
    said = re.search(r"interrupted \((SIGINT|SIGTERM)\); (\d+) samples are committed in", err)
    assert said and said.group(1) == signal.Signals(sig).name, err
    assert int(said.group(2)) == m["num_samples"] >= 12 and m["complete"] is False
    assert "Output: " in err.splitlines()[-1] and "incomplete" in err.splitlines()[-1]
    verify(cli, out)


def test_ctrl_c_inside_the_first_window_keeps_the_complete_prefix(cli, tmp_path):
    """One window (shard) for the whole run, one sample per batch, slow (greedy decoding): before,
    Ctrl-C committed nothing of a window that was not finished."""
    out = tmp_path / "store"
    cmd = args(cli, out, "--traces", 6000, "--samples-per-shard", 100000, "--max-length", 64, "--batch-tokens", 64,
               "--decoder", "--no-progress", threads=1)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env())
    assert wait_for(lambda: (out / "manifest.json").exists())
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    m = manifest(out)
    said = re.search(r"(\d+) samples are committed in", err)
    assert said and int(said.group(1)) == m["num_samples"] > 0, err
    assert m["num_samples"] < 1356  # interrupted indeed (the demo rows hold 1356 samples)
    verify(cli, out)


def test_complete_store_resumes_as_a_no_op(cli, tmp_path):
    out = tmp_path / "store"
    collect(cli, out, "--traces", 60, "--samples-per-shard", 4)
    before = (out / "manifest.json").read_bytes()
    digests = shard_digests(out)
    proc = collect(cli, out, "--traces", 60, "--samples-per-shard", 4, "--resume")
    assert (out / "manifest.json").read_bytes() == before and shard_digests(out) == digests
    said = [l for l in proc.stderr.splitlines() if "already complete" in l]
    assert len(said) == 1 and "nothing to do" in said[0], proc.stderr
    assert "model loaded" not in proc.stderr  # the engine never started


def test_resume_with_more_traces_extends_the_store_with_the_same_plan(cli, tmp_path):
    small, big, clean = tmp_path / "small", tmp_path / "big", tmp_path / "clean"
    common = ["--samples-per-shard", 4, "--seed", 11, "--mode", "mixed", "--real-ratio", 0.7]
    collect(cli, clean, "--traces", 150, *common)
    collect(cli, big, "--traces", 66, *common)
    assert manifest(big)["num_samples"] < manifest(clean)["num_samples"]
    collect(cli, big, "--traces", 150, *common, "--resume")
    m = manifest(big)
    assert m["complete"] is True and m["settings"]["traces"] == 150
    assert shard_digests(big) == shard_digests(clean)
    verify(cli, big)
    # Fewer traces than the store holds: refused, naming the option.
    collect(cli, small, "--traces", 60, *common)
    proc = collect(cli, small, "--traces", 30, *common, "--resume", check=False)
    assert proc.returncode != 0 and "settings.traces: 60" in proc.stderr and "not shrunk" in proc.stderr


def test_synthetic_progress_line_is_well_formed(cli, tmp_path):
    proc = collect(cli, tmp_path / "store", "--traces", 60, "--mode", "synthetic", progress=True)
    lines = [l for l in proc.stderr.splitlines() if "collect: " in l]
    assert len(lines) == 1, proc.stderr
    # The tiny model has 2 encoder MoE layers: 60 traces = 30 samples.
    assert lines[0].endswith("collect: 30/30 samples (100%), 60 traces"), lines[0]


def test_progress_bar_fits_a_narrow_terminal(cli, tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 50, 0, 0))
    cmd = args(cli, tmp_path / "store", "--traces", 600, "--samples-per-shard", 8)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, cwd=REPO,
                            env=env(COLUMNS="200"))
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, text
    segments = [seg.replace("\x1b[K", "").split("\n")[0] for seg in text.split("\r")]
    bars = [seg for seg in segments if " samples, " in seg and "[moetrace" not in seg]
    assert len(bars) >= 2, text
    for b in bars:
        assert len(b) <= 49, repr(b)  # the pty's 50 columns win over $COLUMNS


def test_one_throughput_figure_everywhere_and_timestamps(cli, tmp_path):
    out = tmp_path / "store"
    proc = collect(cli, out, "--traces", 120, "--samples-per-shard", 8)
    m = manifest(out)
    tp = m["throughput_tokens_per_s"]
    assert tp > 0 and tp == pytest.approx(m["num_tokens"] / m["collection_time"])
    shown = f"{tp:.1f} tokens/s"
    assert f"throughput {shown}" in proc.stderr, proc.stderr  # the log
    assert re.search(r"tokens in [\d.]+ s, " + re.escape(shown), proc.stderr), proc.stderr  # the summary
    inspect = subprocess.run([cli, "inspect", str(out)], capture_output=True, text=True, env=env())
    assert inspect.returncode == 0 and shown in inspect.stdout, inspect.stdout
    # Every log line starts with a timestamp; the last one names the store and its size.
    logs = [l for l in proc.stderr.splitlines() if "[moetrace " in l]
    assert logs and all(STAMP.match(l) for l in logs), logs
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(r"Output: " + re.escape(str(out)) + r" \(\d+(\.\d)? (bytes|KiB|MiB|GiB)\)$", last), last


# --- C: what changes results ----------------------------------------------------------------------

def test_resume_with_other_engine_settings_is_refused(cli, tmp_path):
    out = tmp_path / "store"
    proc = slow_run(cli, out)  # --threads 1
    assert wait_for(lambda: (out / "manifest.json").exists() and len(manifest(out)["shards"]) >= 1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    m = manifest(out)
    assert m["engine"]["threads"] == 1 and m["engine"]["batch_tokens"] == 8192
    assert m["engine"]["precision"] == "fp32" and m["engine"]["blas"]
    base = [*SLOW, "--resume"]
    for extra, threads, needle in (
            ([], 2, "collected with --threads 1, this run has --threads 2"),
            (["--batch-tokens", 4096], 1, "collected with --batch-tokens 8192, this run has --batch-tokens 4096")):
        r = collect(cli, out, *base, *extra, check=False, threads=threads)
        errs = error_lines(r.stderr)
        assert r.returncode != 0 and len(errs) == 1 and needle in errs[0], r.stderr


def test_store_without_engine_field_resumes_as_before(cli, tmp_path):
    out = tmp_path / "store"
    cmd = args(cli, out, "--traces", 120, "--samples-per-shard", 4, "--no-progress", threads=1)
    killed = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                            env=env(MOETRACE_FAULT_KILL_AFTER="9"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    m = manifest(out)
    assert m["complete"] is False and m["engine"]["threads"] == 1
    m.pop("engine")  # as written before the field existed
    (out / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    collect(cli, out, "--traces", 120, "--samples-per-shard", 4, "--resume", threads=2)
    assert manifest(out)["complete"] is True
    verify(cli, out)


# --- D: batching windows of several shards (--batch-window, docs/TRACE_FORMAT.md) -----------------

def killed_run(cli, out, *extra, after):
    """A run killed with kill -9 right after its `after`-th sample reached the writer."""
    cmd = args(cli, out, *extra, "--no-progress")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env=env(MOETRACE_FAULT_KILL_AFTER=str(after)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert manifest(out)["complete"] is False
    return proc


def test_batch_window_is_recorded_and_a_resume_keeps_it(cli, tmp_path):
    common = ["--traces", 120, "--samples-per-shard", 4, "--seed", 2]
    # The CPU's default: one shard per window.
    collect(cli, tmp_path / "default", *common)
    assert manifest(tmp_path / "default")["engine"]["batch_window"] == 4
    clean, out = tmp_path / "clean", tmp_path / "store"
    proc = collect(cli, clean, *common, "--batch-window", 12)
    assert manifest(clean)["engine"]["batch_window"] == 12
    assert "batching windows of 12 samples (3 shards)" in proc.stderr, proc.stderr
    # Killed in the second shard of the second window; resumed without the option: the store's.
    killed_run(cli, out, *common, "--batch-window", 12, after=19)
    refused = collect(cli, out, *common, "--resume", "--batch-window", 4, check=False)
    errs = error_lines(refused.stderr)
    assert refused.returncode != 0 and len(errs) == 1, refused.stderr
    assert "collected with --batch-window 12, this run has --batch-window 4" in errs[0], errs[0]
    resumed = collect(cli, out, *common, "--resume")
    assert "batching windows of 12 samples (3 shards)" in resumed.stderr, resumed.stderr
    assert shard_digests(out) == shard_digests(clean)
    verify(cli, out)


def test_store_without_batch_window_resumes_with_one_shard_per_window(cli, tmp_path):
    common = ["--traces", 120, "--samples-per-shard", 4, "--seed", 2]
    clean, out = tmp_path / "clean", tmp_path / "store"
    collect(cli, clean, *common)
    killed_run(cli, out, *common, after=9)
    m = manifest(out)
    m["engine"].pop("batch_window")  # as written before the field existed
    (out / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
    refused = collect(cli, out, *common, "--resume", "--batch-window", 8, check=False)
    errs = error_lines(refused.stderr)
    assert refused.returncode != 0 and len(errs) == 1, refused.stderr
    assert "collected with --batch-window 4, this run has --batch-window 8" in errs[0], errs[0]
    collect(cli, out, *common, "--resume")
    assert shard_digests(out) == shard_digests(clean)


def test_resume_with_more_traces_redoes_every_shard_of_the_cut_window(cli, tmp_path):
    # Windows of 12 = 3 shards of 4. 39 samples (78 traces, 2 MoE layers) end 3 samples into the
    # window [36, 48), 42 samples 6 into it: extended, shards 9 and 10 (samples 36..41) are redone.
    common = ["--samples-per-shard", 4, "--batch-window", 12, "--seed", 11, "--mode", "mixed",
              "--real-ratio", 0.7]
    clean, big = tmp_path / "clean", tmp_path / "big"
    collect(cli, clean, "--traces", 150, *common)
    collect(cli, big, "--traces", 84, *common)
    assert [s["num_samples"] for s in manifest(big)["shards"]][-2:] == [4, 2]
    before = shard_digests(big)
    proc = collect(cli, big, "--traces", 150, *common, "--resume")
    redone = [l for l in proc.stderr.splitlines() if "is computed again" in l]
    assert len(redone) == 2 and "shard-00009" in redone[0] and "shard-00010" in redone[1], proc.stderr
    after = shard_digests(big)
    assert after == shard_digests(clean) and after[:9] == before[:9]
    verify(cli, big)


def test_batch_window_must_be_whole_shards(cli, tmp_path):
    for value in (6, -4):
        proc = collect(cli, tmp_path / "store", "--traces", 12, "--samples-per-shard", 4, "--batch-window", value,
                       check=False)
        errs = error_lines(proc.stderr)
        assert proc.returncode != 0 and len(errs) == 1, proc.stderr
        assert f"--batch-window {value}: expected a positive multiple of --samples-per-shard 4" in errs[0], errs[0]
        assert not (tmp_path / "store").exists()


def test_log_says_how_the_windows_were_batched(cli, tmp_path):
    """One line with the batches, the window, the prompt tokens computed and the share of padding."""
    pattern = re.compile(r"batches: (\d+) from windows of 8 samples, (\d+) prompt tokens computed, padding "
                         r"(\d+\.\d)%$")
    for overhead, padded in ((0, False), (1000000, True)):
        out = tmp_path / f"store-{overhead}"
        proc = collect(cli, out, "--traces", 120, "--samples-per-shard", 8, "--batch-overhead", overhead)
        lines = [l for l in proc.stderr.splitlines() if "batches: " in l]
        assert len(lines) == 1, proc.stderr
        found = pattern.search(lines[0])
        assert found, lines[0]
        batches, computed, share = int(found[1]), int(found[2]), float(found[3])
        real = manifest(out)["num_tokens"]  # --mode real: every stored token went through a batch
        if not padded:  # no cost for another batch: one length per batch, nothing padded
            assert computed == real and share == 0.0, lines[0]
        else:  # a batch costs more than any padding: few batches, padded to their longest sample
            assert computed > real and share == pytest.approx(100 * (computed - real) / computed, abs=0.05)
        assert 1 <= batches <= 60


def test_resume_refuses_a_damaged_batch_window(cli, tmp_path):
    common = ["--traces", 120, "--samples-per-shard", 4]
    out = tmp_path / "store"
    killed_run(cli, out, *common, after=9)
    m = manifest(out)
    for bad in (0, 6, "8"):
        m["engine"]["batch_window"] = bad
        (out / "manifest.json").write_text(json.dumps(m, indent=2) + "\n")
        for extra in ([], ["--batch-window", 4]):
            proc = collect(cli, out, *common, "--resume", *extra, check=False)
            errs = error_lines(proc.stderr)
            assert proc.returncode != 0 and len(errs) == 1, proc.stderr
            assert "manifest.json: engine.batch_window must be a positive multiple of samples_per_shard 4, got " \
                   f"{json.dumps(bad)}" in errs[0], errs[0]
