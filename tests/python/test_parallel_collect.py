"""Data-parallel collection (docs/SCALING.md) with the C++ CLI on the tiny fixture model: world sizes
1, 2 and 3 as concurrent processes on one machine, ranked by --rank/--world-size or by the launchers'
environment variables (Open MPI, MPICH/PMI, srun, torchrun), give after the merge the store of one
process with the same seed: the same samples in the same order with every tensor equal (the shards
are the same bytes). A rank killed with kill -9 leaves committed shards only, merge refuses the
store until that rank is resumed, and then the store is again the single-process one. Merge is
idempotent, and verify and the Python reader accept merged stores."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess

import numpy as np
import pytest

from conftest import REPO

import moetrace
from moetrace.errors import StoreError

MODEL = os.path.join(REPO, "tests", "data", "fixtures", "tiny-a", "model")
SPM = os.path.join(REPO, "assets", "demo", "spiece.model")
DATA = os.path.join(REPO, "assets", "demo", "data")
ARGS = ["--traces", 200, "--samples-per-shard", 16, "--seed", 3, "--logits", "f32", "--hidden", "bf16",
        "--real-ratio", 0.5]
# Variables of every launcher: removed from the tests' environment so that a CI job that itself
# runs under srun or mpirun does not turn the single-process runs into ranks.
LAUNCHER_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK",
                 "PMI_SIZE", "MPI_LOCALRANKID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                 "SLURM_LOCALID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_JOB_ID", "RANK", "WORLD_SIZE",
                 "LOCAL_RANK", "MOETRACE_FAULT_KILL_AFTER")


def built_with_mpi(cli):
    """A binary linked with MPI would call MPI_Init under the fake OMPI_/PMI_ variables below."""
    try:
        out = subprocess.run(["ldd", cli], capture_output=True, text=True).stdout
    except OSError:
        return False
    return "libmpi" in out


def base_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(extra or {})
    return env


def command(cli, out, mode, *extra):
    return [cli, "collect", "--model", MODEL, "--tokenizer", SPM, "--datasets", "demo", "--data-root", DATA,
            "--threads", "1", "--no-progress", "-o", str(out), "--mode", mode, *map(str, ARGS), *map(str, extra)]


def launcher_env(how, rank, world):
    """The variables a launcher gives rank `rank` of `world` (local rank = rank: one machine)."""
    r, w = str(rank), str(world)
    return {
        "flags": {},
        "ompi": {"OMPI_COMM_WORLD_RANK": r, "OMPI_COMM_WORLD_SIZE": w, "OMPI_COMM_WORLD_LOCAL_RANK": r},
        "pmi": {"PMI_RANK": r, "PMI_SIZE": w, "MPI_LOCALRANKID": r},
        # srun inside an sbatch job: the step's variables next to the job's.
        "srun": {"SLURM_JOB_ID": "77", "SLURM_NTASKS": w, "SLURM_STEP_ID": "0", "SLURM_PROCID": r,
                 "SLURM_STEP_NUM_TASKS": w, "SLURM_LOCALID": r},
        "torchrun": {"RANK": r, "WORLD_SIZE": w, "LOCAL_RANK": r},
    }[how]


def run_ranks(cli, out, mode, world, how="flags", ranks=None, extra=(), kill=None):
    """Starts the ranks as concurrent processes and waits for all; returns {rank: CompletedProcess-like}.
    kill maps a rank to MOETRACE_FAULT_KILL_AFTER."""
    procs = {}
    for r in (range(world) if ranks is None else ranks):
        flags = ["--rank", r, "--world-size", world] if how == "flags" else []
        env = launcher_env(how, r, world)
        if kill and r in kill:
            env["MOETRACE_FAULT_KILL_AFTER"] = str(kill[r])
        procs[r] = subprocess.Popen(command(cli, out, mode, *flags, *extra), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=REPO, env=base_env(env))
    results = {}
    for r, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        results[r] = (p.returncode, stderr)
    return results


def assert_ok(results):
    for r, (code, err) in results.items():
        assert code == 0, f"rank {r} exited {code}:\n{err}"


def shard_digests(store):
    """(shard file name, samples, sha256) of every listed shard, in store order."""
    m = json.load(open(os.path.join(store, "manifest.json")))
    return [(os.path.basename(s["file"]), s["num_samples"],
             hashlib.sha256(open(os.path.join(store, s["file"]), "rb").read()).hexdigest()) for s in m["shards"]]


# What differs between runs of the same collection (timing, host, how it was launched).
PER_RUN = ("command_line", "device", "collection_time", "throughput_tokens_per_s", "data_parallel")


def content(manifest):
    m = {k: v for k, v in manifest.items() if k not in PER_RUN}
    m["shards"] = [dict(s, file=os.path.basename(s["file"])) for s in m["shards"]]
    return m


def assert_same_store(single, merged):
    """Same manifest content, same shard bytes, and (through the reader) every sample and tensor."""
    a, b = moetrace.open_store(single), moetrace.open_store(merged, verify=True)
    assert content(b.manifest) == content(a.manifest)
    assert shard_digests(merged) == shard_digests(single)
    assert b.sample_ids == a.sample_ids and len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.sample_id == y.sample_id and x.synthetic == y.synthetic
        assert np.array_equal(x.token_ids, y.token_ids)
        for name in a.layers:
            lx, ly = x.layer(name), y.layer(name)
            for field in ("router_logits", "expert", "dropped", "gate", "hidden"):
                assert np.array_equal(getattr(lx, field), getattr(ly, field)), (x.sample_id, name, field)


def verify(cli, store):
    proc = subprocess.run([cli, "verify", str(store)], capture_output=True, text=True, env=base_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def merge(cli, store, check=True):
    proc = subprocess.run([cli, "merge", str(store)], capture_output=True, text=True, env=base_env())
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def single_stores(cli, tmp_path_factory):
    """The single-process store of each mode, collected once."""
    stores = {}

    def get(mode):
        if mode not in stores:
            out = tmp_path_factory.mktemp("single") / mode
            proc = subprocess.run(command(cli, out, mode), capture_output=True, text=True, cwd=REPO, env=base_env())
            assert proc.returncode == 0, proc.stderr
            stores[mode] = str(out)
        return stores[mode]
    return get


@pytest.mark.parametrize("mode,world,how", [
    ("mixed", 1, "flags"), ("real", 2, "flags"), ("mixed", 3, "flags"),
    ("real", 2, "ompi"), ("mixed", 3, "pmi"), ("real", 3, "srun"), ("mixed", 2, "torchrun"),
])
def test_ranks_merge_into_the_single_process_store(cli, tmp_path, single_stores, mode, world, how):
    if how in ("ompi", "pmi") and built_with_mpi(cli):
        pytest.skip("built with MPI: fake MPI variables would make it call MPI_Init")
    out = tmp_path / "store"
    results = run_ranks(cli, out, mode, world, how)
    assert_ok(results)
    if world == 1:  # one rank is a plain single-process store
        assert not (out / "ranks").exists()
    else:
        assert sorted(os.listdir(out / "ranks")) == [f"rank-{r:05d}-of-{world:05d}" for r in range(world)]
        # The last rank to finish merged: no manual step needed.
        dp = json.load(open(out / "manifest.json"))["data_parallel"]
        assert dp["world_size"] == world and [r["rank"] for r in dp["ranks"]] == list(range(world))
        launcher = {"flags": "--rank/--world-size", "ompi": "Open MPI", "pmi": "MPICH/PMI", "srun": "Slurm srun",
                    "torchrun": "torchrun-style"}[how]
        assert all(launcher in err for _, err in results.values())
    verify(cli, out)
    assert_same_store(single_stores(mode), str(out))


def test_killed_rank_blocks_the_merge_until_resumed(cli, tmp_path, single_stores):
    out = tmp_path / "store"
    # Rank 1 of 3 (samples 32..63, two shards) dies inside its second shard, then again at its start.
    results = run_ranks(cli, out, "mixed", 3, kill={1: 20})
    assert results[1][0] == -signal.SIGKILL, results[1][1]
    assert results[0][0] == 0 and results[2][0] == 0, results
    assert not (out / "manifest.json").exists()
    part = out / "ranks" / "rank-00001-of-00003"
    m = json.load(open(part / "manifest.json"))
    assert m["complete"] is False and m["part"]["rank"] == 1 and m["num_samples"] == 16
    verify(cli, part)  # what the dead rank left is committed and valid
    proc = merge(cli, out, check=False)
    assert proc.returncode != 0 and "rank 1 (16 of 32 samples)" in proc.stderr
    assert not (out / "manifest.json").exists()

    results = run_ranks(cli, out, "mixed", 3, ranks=[1], extra=["--resume"], kill={1: 3})
    assert results[1][0] == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    assert_ok(run_ranks(cli, out, "mixed", 3, ranks=[1], extra=["--resume"]))
    assert (out / "manifest.json").exists()  # the resumed rank was the last one: it merged
    verify(cli, out)
    assert_same_store(single_stores("mixed"), str(out))


def test_parts_of_whole_windows_merge_into_the_single_process_store(cli, tmp_path):
    # Windows of 48 samples (3 shards of 16): 100 samples are 3 windows, one per rank; a rank killed
    # inside the second shard of its window resumes to the same bytes.
    window = ["--batch-window", 48]
    single = tmp_path / "single"
    proc = subprocess.run(command(cli, single, "mixed", *window), capture_output=True, text=True, cwd=REPO,
                          env=base_env())
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "store"
    results = run_ranks(cli, out, "mixed", 3, extra=window, kill={1: 20})
    assert results[1][0] == -signal.SIGKILL, results[1][1]
    parts = [json.load(open(out / "ranks" / f"rank-{r:05d}-of-00003" / "manifest.json"))["part"]
             for r in range(3)]
    assert [(p["first_sample"], p["num_samples"]) for p in parts] == [(0, 48), (48, 48), (96, 4)]
    assert_ok(run_ranks(cli, out, "mixed", 3, ranks=[1], extra=[*window, "--resume"]))
    verify(cli, out)
    assert_same_store(str(single), str(out))


def test_merge_is_idempotent_and_refuses_what_it_cannot_merge(cli, tmp_path, single_stores):
    out = tmp_path / "store"
    assert_ok(run_ranks(cli, out, "real", 2))
    first = (out / "manifest.json").read_bytes()
    for _ in range(2):
        proc = merge(cli, out)
        assert "merged 2 ranks" in proc.stdout
        assert (out / "manifest.json").read_bytes() == first
    (out / "manifest.json").unlink()
    merge(cli, out)
    assert (out / "manifest.json").read_bytes() == first
    assert "data-parallel   2 ranks" in subprocess.run([cli, "inspect", str(out)], capture_output=True,
                                                       text=True, env=base_env()).stdout

    # A shard missing from a rank: refused, naming it, and no manifest written.
    (out / "manifest.json").unlink()
    victim = out / "ranks" / "rank-00001-of-00002" / "shard-00004.safetensors"
    os.rename(victim, str(victim) + ".away")
    proc = merge(cli, out, check=False)
    assert proc.returncode != 0 and "shard-00004.safetensors: missing" in proc.stderr
    assert not (out / "manifest.json").exists()
    os.rename(str(victim) + ".away", victim)

    # Single-process stores need no merge; directories that are no store are refused.
    assert merge(cli, single_stores("real")).returncode == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = merge(cli, empty, check=False)
    assert proc.returncode != 0 and "not a data-parallel trace store" in proc.stderr


def test_refusals(cli, tmp_path, single_stores):
    out = tmp_path / "store"
    assert_ok(run_ranks(cli, out, "real", 2))

    def one_error(results, *needles):
        (code, err), = results.values()
        errors = [line for line in err.splitlines() if "error" in line]
        assert code != 0 and len(errors) == 1, err
        for n in needles:
            assert n in errors[0], errors[0]

    # Again without --resume/--overwrite; resumed with another world size; or as a single process.
    one_error(run_ranks(cli, out, "real", 2, ranks=[0]), "--resume")
    one_error(run_ranks(cli, out, "real", 3, ranks=[0], extra=["--resume"]), "world size 2")
    one_error(run_ranks(cli, out, "real", 1, ranks=[0], extra=["--resume"]), "world size 2")
    # Other settings are not the same collection.
    one_error(run_ranks(cli, out, "real", 2, ranks=[1], extra=["--resume", "--max-length", 64]), "max_length")
    # Ranks into a single-process store: only with --overwrite.
    single = tmp_path / "single"
    subprocess.run(["cp", "-r", single_stores("real"), str(single)], check=True)
    one_error(run_ranks(cli, single, "real", 2, ranks=[1], extra=["--resume"]), "single-process")
    assert_ok(run_ranks(cli, single, "real", 2, extra=["--overwrite"]))
    assert not list(single.glob("shard-*")) and (single / "manifest.json").exists()
    assert_same_store(single_stores("real"), str(single))
    # And back to one process.
    assert_ok(run_ranks(cli, single, "real", 1, extra=["--overwrite"]))
    assert not (single / "ranks").exists()
    assert_same_store(single_stores("real"), str(single))


@pytest.mark.parametrize("env,needle", [
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK is 2, not below"),
    ({"PMI_SIZE": "2"}, "PMI_SIZE is set but PMI_RANK is not"),
    ({"SLURM_PROCID": "x", "SLURM_STEP_NUM_TASKS": "2"}, "SLURM_PROCID='x'"),
    ({"RANK": "0", "WORLD_SIZE": "-1"}, "WORLD_SIZE='-1'"),
])
def test_bad_launcher_variables_give_one_line(cli, tmp_path, env, needle):
    proc = subprocess.run(command(cli, tmp_path / "x", "real"), capture_output=True, text=True, cwd=REPO,
                          env=base_env(env))
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode != 0 and len(errors) == 1 and needle in errors[0], proc.stderr
    assert not (tmp_path / "x").exists()


def test_flags_go_together(cli, tmp_path):
    for flags in (["--rank", 1], ["--world-size", 2], ["--rank", 2, "--world-size", 2]):
        proc = subprocess.run(command(cli, tmp_path / "x", "real", *flags), capture_output=True, text=True,
                              cwd=REPO, env=base_env())
        assert proc.returncode != 0 and "--rank" in proc.stderr, flags


def test_sbatch_without_srun_is_one_process(cli, tmp_path, single_stores):
    """A batch script's own SLURM_PROCID=0 and SLURM_NTASKS=4 (no srun step) must not make this
    process collect a quarter of the plan."""
    out = tmp_path / "store"
    proc = subprocess.run(command(cli, out, "real"), capture_output=True, text=True, cwd=REPO,
                          env=base_env({"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "4",
                                        "SLURM_LOCALID": "0"}))
    assert proc.returncode == 0, proc.stderr
    assert not (out / "ranks").exists()
    assert_same_store(single_stores("real"), str(out))


def test_python_reader_points_from_a_part_to_the_store(cli, tmp_path):
    out = tmp_path / "store"
    assert_ok(run_ranks(cli, out, "real", 2))
    with pytest.raises(StoreError, match="rank 1 of 2's part of a data-parallel store"):
        moetrace.open_store(out / "ranks" / "rank-00001-of-00002")
    verify(cli, out / "ranks" / "rank-00001-of-00002")  # the C++ verify checks a part on its own
