"""`pip install ./python` gives a working package (built offline with the environment's setuptools)."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import PYTHON_DIR


def test_pip_install_builds_an_importable_package(tmp_path, store_factory):
    setuptools = pytest.importorskip("setuptools")
    try:
        import wheel  # noqa: F401  (setuptools < 70.1 needs it for bdist_wheel)
    except ImportError:
        if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
            pytest.skip(f"building offline needs setuptools>=70.1 or wheel (have setuptools {setuptools.__version__})")
    src = tmp_path / "src"
    shutil.copytree(PYTHON_DIR, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                           "--no-index", "--target", str(target), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (target / "moetrace" / "torch" / "__init__.py").is_file()
    path, _ = store_factory()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    code = ("import moetrace, sys; s = moetrace.open_store(sys.argv[1]); "
            "assert moetrace.__file__.startswith(sys.argv[2]); print(len(s), s.layers)")
    out = subprocess.run([sys.executable, "-c", code, path, str(target)], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "7 ['enc.1', 'enc.3', 'enc.5']"
