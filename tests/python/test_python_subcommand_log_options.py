"""-q and --log-level reach the Python subcommands (analyze, speculate, fetch) from either side of the
subcommand's name, as they reach every C++ one (issue #14 item 9)."""
import os
import subprocess

from conftest import REPO


def run(cli, *args, env=None):
    return subprocess.run([cli, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})})


def test_analyze_is_quiet_with_q_before_or_after_the_name(cli, store_factory, tmp_path):
    store, _ = store_factory("s", num_samples=12)
    loud = run(cli, "analyze", store, "-o", tmp_path / "a", "--no-plots")
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.strip() != ""
    for args in (["-q", "analyze", store, "-o", tmp_path / "b", "--no-plots"],
                 ["analyze", store, "-o", tmp_path / "c", "--no-plots", "-q"],
                 ["--log-level", "warn", "analyze", store, "-o", tmp_path / "d", "--no-plots"],
                 ["analyze", store, "-o", tmp_path / "e", "--no-plots", "--log-level", "error"]):
        proc = run(cli, *args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert proc.stderr.strip() == "", (args, proc.stderr)
    # After the name wins over before.
    proc = run(cli, "-q", "analyze", store, "-o", tmp_path / "f", "--no-plots", "--log-level", "info")
    assert proc.returncode == 0 and proc.stderr.strip() != "", proc.stderr


def test_speculate_and_fetch_take_the_options(cli, store_factory, tmp_path):
    store, _ = store_factory("s", num_samples=12)
    proc = run(cli, "-q", "speculate", store, "-o", tmp_path / "spec", "--no-plots")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    # fetch parses both spellings (offline: nothing is asked of any Hub).
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    for args in (["-q", "fetch", "--model", "org/none", "--dry-run"],
                 ["fetch", "--model", "org/none", "--dry-run", "--log-level", "warn"]):
        proc = run(cli, *args, env=env)
        assert "unrecognized arguments" not in proc.stderr, proc.stderr
        assert proc.returncode in (0, 1), proc.stderr
