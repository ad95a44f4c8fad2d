"""`moetrace forward --device/--precision` (issue #18): every fixture through the engine interface,
compared with its transformers reference by scripts/compare_forward.py, the script the GPU check
(scripts/gpu_check.sh forward) runs on `--device cuda`. Here the CPU engine, within the parity
test's bounds; and the options' errors, one line each."""
import json
import os
import struct
import subprocess
import sys

import pytest

from conftest import REPO

FIXTURES = os.path.join(REPO, "tests", "data", "fixtures")
COMPARE = os.path.join(REPO, "scripts", "compare_forward.py")
NAMES = sorted(n for n in os.listdir(FIXTURES) if os.path.exists(os.path.join(FIXTURES, n, "reference.safetensors")))


def steps_of(ref):
    with open(ref, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))["generated_ids"]["shape"][1] - 1


def forward(cli, name, out, *extra):
    ref = os.path.join(FIXTURES, name, "reference.safetensors")
    return subprocess.run([cli, "forward", "-m", os.path.join(FIXTURES, name, "model"), "--inputs", ref,
                           "-o", str(out), "--generate", str(steps_of(ref)), "--threads", "2", *extra],
                          capture_output=True, text=True)


def compare(out, name, *extra):
    ref = os.path.join(FIXTURES, name, "reference.safetensors")
    return subprocess.run([sys.executable, COMPARE, str(out), ref, *extra], capture_output=True, text=True)


def test_there_are_fixtures():
    assert len(NAMES) >= 2, NAMES


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("device", [[], ["--device", "cpu", "--precision", "fp32"], ["--device", "auto"]])
def test_every_fixture_matches_its_reference(cli, tmp_path, name, device):
    if device == ["--device", "auto"] and "compiled in" in subprocess.run(
            [cli, "--version"], capture_output=True, text=True).stdout and os.path.exists("/dev/nvidia0"):
        pytest.skip("auto picks the GPU here: gpu_check.sh compares it")  # the CPU runs above still do
    out = tmp_path / "out.safetensors"
    proc = forward(cli, name, out, *device)
    assert proc.returncode == 0, proc.stderr
    cmp = compare(out, name)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert "top-1 agreement" in cmp.stdout and "(100.000%)" in cmp.stdout.splitlines()[-1], cmp.stdout


def test_the_comparison_can_fail(cli, tmp_path):
    """A wrong output fails the comparison: here tiny-a's outputs against tiny-a-bf16's reference."""
    out = tmp_path / "out.safetensors"
    assert forward(cli, "tiny-a", out).returncode == 0
    cmp = compare(out, "tiny-a-bf16")
    assert cmp.returncode == 1 and "FAIL" in cmp.stdout, cmp.stdout
    # ... and passes with bounds loose enough to only report (what gpu_check.sh does for bf16).
    assert compare(out, "tiny-a", "--rtol", "5e-2", "--min-agreement", "0").returncode == 0


def one_error_line(proc):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("moetrace: error: "), proc.stderr
    return lines[0]


def test_the_cpu_computes_in_fp32_only(cli, tmp_path):
    line = one_error_line(forward(cli, "tiny-a", tmp_path / "o.safetensors", "--device", "cpu", "--precision", "bf16"))
    assert "--precision bf16" in line and "fp32" in line, line
    assert not (tmp_path / "o.safetensors").exists()


def test_mixed_on_the_cpu_is_fp32_and_says_so(cli, tmp_path):
    out = tmp_path / "mixed.safetensors"
    proc = forward(cli, "tiny-a", out, "--device", "cpu", "--precision", "mixed")
    assert proc.returncode == 0, proc.stderr
    assert "mixed is fp32" in proc.stderr, proc.stderr
    ref = tmp_path / "fp32.safetensors"
    assert forward(cli, "tiny-a", ref, "--device", "cpu").returncode == 0
    assert out.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("device,want", [("gpu", "--device 'gpu'"), ("cuda:x", "--device 'cuda:x'")])
def test_a_bad_device_is_one_line(cli, tmp_path, device, want):
    line = one_error_line(forward(cli, "tiny-a", tmp_path / "o.safetensors", "--device", device))
    assert want in line, line


def test_a_bad_precision_is_one_line(cli, tmp_path):
    line = one_error_line(forward(cli, "tiny-a", tmp_path / "o.safetensors", "--precision", "fp8"))
    assert "--precision 'fp8'" in line, line


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="a GPU is visible: gpu_check.sh runs --device cuda")
def test_cuda_without_a_gpu_is_one_line(cli, tmp_path):
    line = one_error_line(forward(cli, "tiny-a", tmp_path / "o.safetensors", "--device", "cuda"))
    assert "--device cuda" in line and "--device cpu" in line, line


def test_an_empty_batch_is_one_line_naming_the_file(cli, tmp_path):
    """Zero tokens used to run and write zero-size outputs; the engines' batch check refuses it."""
    import numpy as np
    from conftest import write_safetensors
    inp = tmp_path / "empty.safetensors"
    ids = np.zeros((2, 0), np.int64)
    write_safetensors(str(inp), {"input_ids": ids, "attention_mask": ids}, {})
    proc = subprocess.run([cli, "forward", "-m", os.path.join(FIXTURES, "tiny-a", "model"), "--inputs", str(inp),
                           "-o", str(tmp_path / "o.safetensors")], capture_output=True, text=True)
    line = one_error_line(proc)
    assert "empty.safetensors" in line and "'input_ids' has shape [2, 0]" in line, line
