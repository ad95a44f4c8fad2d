"""The engine seam (issue #17): make_engine() in src/engine/engine.cc is the one place that knows
whether CUDA is built in; scripts/check_layers.py fails on a `MOETRACE_WITH_CUDA` anywhere else."""
import os
import shutil
import subprocess
import sys

from conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "check_layers.py")


def run(root):
    return subprocess.run([sys.executable, SCRIPT, str(root)], capture_output=True, text=True)


def copy_tree(tmp_path):
    shutil.copy(os.path.join(REPO, "README.md"), tmp_path / "README.md")
    for d in ("src", "tools", "include"):
        shutil.copytree(os.path.join(REPO, d), tmp_path / d)


def test_only_make_engine_knows_about_cuda(tmp_path):
    copy_tree(tmp_path)
    assert run(tmp_path).returncode == 0
    bad = tmp_path / "src" / "collect" / "collect.cc"
    bad.write_text("#ifdef MOETRACE_WITH_CUDA\n#endif\n" + bad.read_text())
    proc = run(tmp_path)
    assert proc.returncode == 1
    assert "src/collect/collect.cc:1: mentions MOETRACE_WITH_CUDA" in proc.stderr, proc.stderr


def test_make_engine_is_where_cuda_is_decided():
    text = open(os.path.join(REPO, "src", "engine", "engine.cc")).read()
    assert "#ifdef MOETRACE_WITH_CUDA" in text
