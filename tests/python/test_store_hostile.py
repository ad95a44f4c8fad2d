"""Hostile stores (issue 15 item 9): every problem is a StoreError naming the file, never a raw
RecursionError / OverflowError / ValueError / IsADirectoryError, and verify=True refuses what the
C++ `moetrace verify` refuses."""

import json
import os
import struct

import pytest

import moetrace
from moetrace import StoreError
from moetrace.safetensors_io import read_header


def _edit_manifest(path, edit):
    mpath = os.path.join(path, "manifest.json")
    m = json.load(open(mpath))
    edit(m)
    with open(mpath, "w") as f:
        json.dump(m, f)


@pytest.mark.parametrize("sha", [None, "", "abc", 7])
def test_verify_refuses_shard_without_sha256(store_factory, sha):
    path, _ = store_factory()

    def edit(m):
        if sha is None:
            del m["shards"][1]["sha256"]
        else:
            m["shards"][1]["sha256"] = sha
    _edit_manifest(path, edit)
    moetrace.open_store(path)  # without verify nothing is hashed
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors: the manifest's entry has no sha256"):
        moetrace.open_store(path, verify=True)


def test_verify_of_a_directory_shard_is_a_store_error(store_factory):
    path, _ = store_factory()
    shard = os.path.join(path, "shard-00000.safetensors")
    os.remove(shard)
    os.mkdir(shard)
    _edit_manifest(path, lambda m: m["shards"][0].update(bytes=0))
    with pytest.raises(StoreError, match=r"shard-00000\.safetensors"):
        moetrace.open_store(path, verify=True)


def test_deeply_nested_manifest_is_a_store_error(store_factory):
    path, _ = store_factory()
    with open(os.path.join(path, "manifest.json"), "w") as f:
        f.write("[" * 100000 + "]" * 100000)
    with pytest.raises(StoreError, match=r"manifest\.json"):
        moetrace.open_store(path)


@pytest.mark.parametrize("field,value", [
    ("first_sample", 1e400), ("num_samples", "x"), ("bytes", 1e400), ("bytes", "many")])
def test_bad_shard_numbers_are_store_errors(store_factory, field, value):
    path, _ = store_factory()
    mpath = os.path.join(path, "manifest.json")
    m = json.load(open(mpath))
    m["shards"][0][field] = value
    text = json.dumps(m).replace("Infinity", "1e400")  # json.dumps writes inf as Infinity
    with open(mpath, "w") as f:
        f.write(text)
    with pytest.raises(StoreError, match=r"manifest\.json|shard-00000"):
        moetrace.open_store(path)


def test_huge_integer_literal_in_manifest_is_a_store_error(store_factory):
    path, _ = store_factory()
    mpath = os.path.join(path, "manifest.json")
    text = open(mpath).read().replace('"num_samples": 7', '"num_samples": ' + "9" * 5000, 1)
    with open(mpath, "w") as f:
        f.write(text)
    with pytest.raises(StoreError, match=r"manifest\.json"):
        moetrace.open_store(path)


def _write_st(path, header: dict, data: bytes):
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def test_size_product_does_not_wrap(tmp_path):
    p = str(tmp_path / "wrap.safetensors")
    # 2^32 * 2^32 elements wrap to 0 in int64: the empty data_offsets must not match.
    _write_st(p, {"t": {"dtype": "U8", "shape": [1 << 32, 1 << 32], "data_offsets": [0, 0]}}, b"")
    with pytest.raises(StoreError, match=r"wrap\.safetensors: tensor 't'"):
        read_header(p)


def test_overlapping_tensors_are_refused(tmp_path):
    p = str(tmp_path / "overlap.safetensors")
    _write_st(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12))
    with pytest.raises(StoreError, match=r"overlap\.safetensors: tensors 'a' and 'b' overlap"):
        read_header(p)
    # Adjacent and empty tensors are fine.
    _write_st(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                  "e": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
                  "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12))
    assert set(read_header(p)[1]) == {"a", "b", "e"}


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]},
    {"dtype": "F32", "shape": [1], "data_offsets": [0, 4.0]},
    {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
])
def test_bad_header_entries_are_store_errors(tmp_path, entry):
    p = str(tmp_path / "bad.safetensors")
    text = json.dumps({"t": entry}).replace("Infinity", "1e400").encode()
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + bytes(4))
    with pytest.raises(StoreError, match=r"bad\.safetensors"):
        read_header(p)


def test_deeply_nested_header_is_a_store_error(tmp_path):
    p = str(tmp_path / "deep.safetensors")
    text = b"[" * 100000 + b"]" * 100000
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
    with pytest.raises(StoreError, match=r"deep\.safetensors"):
        read_header(p)
