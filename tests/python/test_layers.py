"""scripts/check_layers.py: the tree's #include arrows are README.md's, and a wrong one fails."""
import os
import shutil
import subprocess
import sys

from conftest import REPO

SCRIPT = os.path.join(REPO, "scripts", "check_layers.py")


def run(root):
    return subprocess.run([sys.executable, SCRIPT, str(root)], capture_output=True, text=True)


def test_the_tree_follows_the_readme():
    proc = run(REPO)
    assert proc.returncode == 0, proc.stderr


def test_a_wrong_arrow_fails(tmp_path):
    shutil.copy(os.path.join(REPO, "README.md"), tmp_path / "README.md")
    for d in ("src", "tools", "include"):
        shutil.copytree(os.path.join(REPO, d), tmp_path / d)
    assert run(tmp_path).returncode == 0
    bad = tmp_path / "src" / "io" / "safetensors.cc"
    bad.write_text('#include "model/config.h"\n' + bad.read_text())
    proc = run(tmp_path)
    assert proc.returncode == 1
    assert 'src/io/safetensors.cc:1: includes "model/config.h"' in proc.stderr, proc.stderr
    os.makedirs(tmp_path / "src" / "newarea")
    proc = run(tmp_path)
    assert "src/newarea: not in README.md's dependency table" in proc.stderr
