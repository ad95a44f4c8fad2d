#!/usr/bin/env python3
"""Does a fast lossless codec on the stored router logits pay on a real disk? (issue #19)

Reads the F16 router logits of a trace store (every MoE layer of its first shards, up to --mbytes),
compresses them with each codec Arrow C++ ships (pyarrow: zstd, lz4, snappy), as stored and
byte-shuffled (the high bytes of every fp16 value, then the low bytes: sign, exponent and top
mantissa bits together compress, the low mantissa bits barely), one thread, and prints per codec
the ratio and the compress / decompress rate of one core. From those it models what collect could
write to a disk of --disk-gbps with --cores cores compressing beside the GPU:

    logical GB/s = min(disk × ratio, cores × compress rate)          (uncompressed: disk)

and writes the table as JSON with the date and machine. A codec pays only where that exceeds the
disk's own rate by more than its ratio costs the readers (the Python reader, analyze, speculate
decompress every read).

    python bench/codec_bench.py STORE [--json codec.json] [--disk-gbps 1.5] [--cores 8]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_bench_util import now_utc, write_json  # noqa: E402  (no torch needed for these)

CODECS = (("zstd", 1), ("zstd", 3), ("lz4", None), ("snappy", None))


def byte_shuffle(values: np.ndarray) -> np.ndarray:
    """The bytes of a 2-byte array regrouped: every value's first byte, then every second byte."""
    b = np.ascontiguousarray(values).view(np.uint8).reshape(-1, values.dtype.itemsize)
    return np.ascontiguousarray(b.T).reshape(-1)


def byte_unshuffle(data: np.ndarray, dtype) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    return np.ascontiguousarray(data.reshape(size, -1).T).reshape(-1).view(dtype)


def store_logits(path: str, mbytes: float) -> np.ndarray:
    """The raw F16 router logits of a store's layers, concatenated, up to mbytes MB."""
    import moetrace

    store = moetrace.open_store(path)
    parts, total = [], 0
    for shard in store.shards:
        for name in shard.tensor_names:
            if not name.endswith("router_logits"):
                continue
            t = shard.tensor(name)
            if t.dtype != np.float16:
                raise SystemExit(f"codec_bench.py: {path}: {name} is {t.dtype}, expected float16 "
                                 "(collect --logits f16, the default)")
            parts.append(np.ascontiguousarray(t).reshape(-1))
            total += t.nbytes
            if total >= mbytes * 1e6:
                return np.concatenate(parts)
    if not parts:
        raise SystemExit(f"codec_bench.py: {path}: no router_logits tensors (a topk or --logits none store?)")
    return np.concatenate(parts)


def measure(data: bytes, codec: str, level, min_seconds: float = 0.3) -> dict:
    import pyarrow as pa

    c = pa.Codec(codec, compression_level=level) if level is not None else pa.Codec(codec)
    out, reps, t0 = None, 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - t0 < min_seconds:
        out = c.compress(data, asbytes=True)
        reps += 1
    comp_s = (time.perf_counter() - t0) / reps
    reps, t0 = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - t0 < min_seconds:
        back = c.decompress(out, decompressed_size=len(data), asbytes=True)
        reps += 1
    dec_s = (time.perf_counter() - t0) / reps
    if back != data:
        raise SystemExit(f"codec_bench.py: {codec} did not round-trip")
    return {"ratio": len(data) / len(out), "compress_mb_s": len(data) / comp_s / 1e6,
            "decompress_mb_s": len(data) / dec_s / 1e6}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--json", default="codec_bench.json")
    ap.add_argument("--mbytes", type=float, default=64.0, help="logits to read (MB)")
    ap.add_argument("--disk-gbps", type=float, default=1.5, help="the disk's write rate (dd, direct)")
    ap.add_argument("--cores", type=int, default=8, help="host cores free to compress")
    a = ap.parse_args(argv)
    if a.disk_gbps <= 0 or a.cores < 1 or a.mbytes <= 0:
        raise SystemExit("codec_bench.py: --disk-gbps and --mbytes must be > 0, --cores >= 1")
    logits = store_logits(a.store, a.mbytes)
    if not np.array_equal(byte_unshuffle(byte_shuffle(logits), np.float16).view(np.uint16), logits.view(np.uint16)):
        raise SystemExit("codec_bench.py: byte shuffle did not round-trip")
    layouts = {"as stored": logits.tobytes(), "byte-shuffled": byte_shuffle(logits).tobytes()}
    rows = []
    print(f"{logits.nbytes / 1e6:.1f} MB of F16 router logits from {a.store}; one core; "
          f"modelled: {a.disk_gbps} GB/s disk, {a.cores} cores")
    print(f"{'codec':10s} {'layout':14s} {'ratio':>6s} {'compress MB/s':>14s} {'decompress MB/s':>16s} "
          f"{'logical GB/s':>13s} {'vs disk':>8s}")
    for codec, level in CODECS:
        name = codec + (f"-{level}" if level is not None else "")
        for layout, data in layouts.items():
            r = measure(data, codec, level)
            logical = min(a.disk_gbps * r["ratio"], a.cores * r["compress_mb_s"] / 1e3)
            r.update(codec=name, layout=layout, logical_gb_s=logical, gain=logical / a.disk_gbps)
            rows.append(r)
            print(f"{name:10s} {layout:14s} {r['ratio']:6.3f} {r['compress_mb_s']:14,.0f} "
                  f"{r['decompress_mb_s']:16,.0f} {logical:13.2f} {r['gain']:7.2f}x")
    write_json(a.json, {"benchmark": "codec_bench", "date": now_utc(), "machine": platform.node(),
                        "cpu": platform.processor() or platform.machine(), "store": a.store,
                        "bytes": int(logits.nbytes), "disk_gbps": a.disk_gbps, "cores": a.cores, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
