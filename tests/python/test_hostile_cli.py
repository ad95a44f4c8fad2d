"""Memory and time bombs through the C++ CLI (issue 15 items 1-4): tiny hostile files, generated
here, must end in one error line quickly with under 1 GiB of resident memory, never hang or take
gigabytes. Each ran for minutes or took 4-25 GB before the fix."""

import json
import os
import shutil
import struct
import zipfile

import pytest

from conftest import REPO, run_bounded

TINY = os.path.join(REPO, "tests", "data", "fixtures", "tiny-a", "model")


def _run_bounded(cli, *args, timeout=60):
    return run_bounded(cli, *args, timeout=timeout)


def _expect_one_line_error(r, *needles):
    assert r.returncode != 0, r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


# -- torch checkpoints ------------------------------------------------------------------------------

def _s(text: str) -> bytes:  # BINUNICODE
    b = text.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _i(v: int) -> bytes:  # BININT
    return b"J" + struct.pack("<I", v)


def _tensor(key: str, numel: int, size, stride) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())"""
    return (b"ctorch._utils\n_rebuild_tensor_v2\n("
            + b"(" + _s("storage") + b"ctorch\nFloatStorage\n" + _s(key) + _s("cpu") + _i(numel) + b"tQ"
            + _i(0) + b"(" + b"".join(_i(d) for d in size) + b"t(" + b"".join(_i(d) for d in stride) + b"t"
            + b"\x89ccollections\nOrderedDict\n)RtR")


def _model_dir(tmp_path, pickle: bytes, storages: dict) -> str:
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(os.path.join(TINY, "config.json"), d / "config.json")
    with zipfile.ZipFile(d / "pytorch_model.bin", "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle)
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return str(d)


def test_shared_nested_dicts_fail_fast(cli, tmp_path):
    # 16 levels of 16 keys that all hold the (memoized) dict of the level below: 16^16 paths.
    p = b"\x80\x02}r" + struct.pack("<I", 0) + _s("w") + _tensor("0", 4, [4], [1]) + b"s0"
    for level in range(1, 17):
        p += b"}r" + struct.pack("<I", level) + b"("
        p += b"".join(_s(f"k{k}") + b"j" + struct.pack("<I", level - 1) for k in range(16))
        p += b"u0"
    p += b"j" + struct.pack("<I", 16) + b"."
    d = _model_dir(tmp_path, p, {"0": bytes(16)})
    assert os.path.getsize(os.path.join(d, "pytorch_model.bin")) < 8000
    _expect_one_line_error(_run_bounded(cli, "inspect", d), "pytorch_model.bin", "same dict again")


def test_expanded_views_share_one_budget(cli, tmp_path):
    # 100 zero-stride [8192, 8192] views of one 4-byte storage: 100 × 256 MiB.
    p = b"\x80\x02}(" + b"".join(_s(f"t{i}") + _tensor("0", 1, [8192, 8192], [0, 0]) for i in range(100))
    p += b"u."
    d = _model_dir(tmp_path, p, {"0": bytes(4)})
    _expect_one_line_error(_run_bounded(cli, "inspect", d), "pytorch_model.bin", "would copy")


def test_pickle_value_memory_is_bounded(cli, tmp_path):
    # 20 MB of EMPTY_DICT opcodes: 20M values, about 4 GB before the budget.
    p = b"\x80\x02" + b"}" * (20 << 20) + b"."
    d = _model_dir(tmp_path, p, {})
    _expect_one_line_error(_run_bounded(cli, "inspect", d), "pytorch_model.bin", "bytes of memory")


# -- trace store manifests ------------------------------------------------------------------------

@pytest.mark.parametrize("experts", [50_000_000, 2_000_000_000, 1 << 62])
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_huge_num_experts_is_refused(cli, store_factory, experts, command):
    path, _ = store_factory()
    mpath = os.path.join(path, "manifest.json")
    m = json.load(open(mpath))
    m["num_experts"] = experts
    json.dump(m, open(mpath, "w"))
    r = _run_bounded(cli, command, path)
    assert r.returncode != 0
    assert "num_experts" in r.stderr + r.stdout, (r.stdout + r.stderr)[-2000:]
    assert "Traceback" not in r.stderr and "terminate" not in r.stderr
