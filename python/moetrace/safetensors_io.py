"""Minimal safetensors reading with numpy: header parsing, validation and memory-mapped tensors.

A safetensors file is an 8-byte little-endian header length n, n bytes of JSON header
({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}), then the data
section; offsets are relative to the start of the data section (byte 8 + n).
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

from .errors import StoreError

# BF16 has no numpy dtype: it is read as uint16 and widened with widen_bf16().
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}

# A header bigger than this is not a trace shard (the C++ reader uses the same order of magnitude).
MAX_HEADER_BYTES = 100 * 1024 * 1024


def widen_bf16(raw: np.ndarray) -> np.ndarray:
    """uint16 bit patterns of bfloat16 -> float32 (exact: bf16 is the top half of an f32)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def as_float32(arr: np.ndarray, stored_dtype: str) -> np.ndarray:
    """Floating tensors as float32 (BF16 bits widened, F16/F64 converted: copies); others unchanged."""
    if stored_dtype == "BF16":
        return widen_bf16(arr)
    if stored_dtype in ("F16", "F64"):
        return arr.astype(np.float32)
    return arr


class TensorInfo:
    __slots__ = ("name", "dtype", "shape", "begin", "end")

    def __init__(self, name: str, dtype: str, shape: tuple, begin: int, end: int):
        self.name, self.dtype, self.shape, self.begin, self.end = name, dtype, shape, begin, end

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, {self.dtype}, {list(self.shape)})"


def read_header(path: str) -> tuple[dict, dict[str, TensorInfo], int]:
    """Parses and checks the header of `path` without mapping the data.

    Returns (metadata, tensors, data_start). Raises StoreError naming the file when the header is
    malformed or a tensor's bytes lie beyond the end of the file (a truncated shard).
    """
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise StoreError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise StoreError(f"{path}: invalid safetensors header: length {n} but the file has {size} bytes"
                                 + (" (truncated?)" if n <= MAX_HEADER_BYTES else ""))
            text = f.read(n)
    except FileNotFoundError:
        raise StoreError(f"{path}: shard file is missing") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot read: {e}") from None
    try:
        header = json.loads(text.decode("utf-8"))
    except RecursionError:
        raise StoreError(f"{path}: invalid safetensors header: JSON nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path}: invalid safetensors header: not JSON ({e})") from None
    if not isinstance(header, dict):
        raise StoreError(f"{path}: invalid safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise StoreError(f"{path}: invalid safetensors header: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            # Only JSON integers: int() would also take floats (1e300 -> OverflowError) and strings.
            if not isinstance(shape, list) or not all(_is_int(d) for d in shape + [begin, end]):
                raise TypeError
            shape = tuple(shape)
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"{path}: invalid safetensors header entry for tensor {key!r}: {info!r}") from None
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise StoreError(f"{path}: tensor {key!r} has unsupported dtype {dtype!r}")
        # Python ints: the product cannot wrap (an int64 product of [2**32, 2**32] is 0).
        expected = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if begin < 0 or end < begin or end - begin != expected or any(d < 0 for d in shape):
            raise StoreError(f"{path}: tensor {key!r}: data_offsets [{begin}, {end}] do not fit "
                             f"{dtype} {list(shape)} ({expected} bytes)")
        if end > data_len:
            raise StoreError(f"{path}: truncated: tensor {key!r} ends at byte {data_start + end} "
                             f"but the file has {size} bytes ({name})")
        tensors[key] = TensorInfo(key, dtype, shape, begin, end)
    # Tensors must not share bytes (a writer never overlaps them; the C++ reader refuses it too).
    spans = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise StoreError(f"{path}: tensors {a!r} and {b!r} overlap in the data section "
                             f"(byte {data_start + begin_b} belongs to both)")
    return metadata, tensors, data_start


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsFile:
    """A safetensors file whose tensors are numpy views of one read-only memory map (mapped lazily)."""

    def __init__(self, path: str):
        self.path = path
        self.metadata, self.infos, self._data_start = read_header(path)
        self._map: np.memmap | None = None

    def _mapped(self) -> np.memmap:
        if self._map is None:
            try:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise StoreError(f"{self.path}: cannot map: {e}") from None
        return self._map

    def release(self) -> None:
        """Drops this object's reference to the map; arrays handed out keep it alive until freed."""
        self._map = None

    def tensor(self, name: str, float32: bool = False) -> np.ndarray:
        """The tensor as a zero-copy memmap view; BF16 comes as uint16 bits unless float32=True
        (then it is widened, which copies). float32=True also converts F16/F64 (copy); F32 and integer
        tensors come unchanged."""
        info = self.infos.get(name)
        if info is None:
            raise StoreError(f"{self.path}: no tensor named {name!r}")
        if info.end == info.begin:
            arr = np.zeros(info.shape, dtype=DTYPES[info.dtype])
        else:
            raw = self._mapped()[self._data_start + info.begin:self._data_start + info.end]
            arr = raw.view(DTYPES[info.dtype]).reshape(info.shape)
        return as_float32(arr, info.dtype) if float32 else arr
