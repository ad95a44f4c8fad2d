#!/usr/bin/env python3
"""Compares `moetrace forward` outputs with a fixture's reference outputs (transformers 4.x).

    python3 scripts/compare_forward.py OUT.safetensors tests/data/fixtures/NAME/reference.safetensors
        [--rtol 1e-4] [--min-agreement 1.0] [--label TEXT]

Every reference tensor but the inputs (input_ids, attention_mask, decoder_input_ids) must be in OUT
with the same shape and dtype. Float tensors: relative L2 error |out - ref| / |ref| at most --rtol
(1e-4, the CPU parity test's bound, tests/model/parity_test.cc). Integer tensors (top1, kept,
generated_ids): the share of equal elements at least --min-agreement (1.0: identical). One line
per tensor, then a summary with the top-1 agreement over every router's top1; exit status 1 when a
bound is missed (or a tensor is missing), 0 otherwise. Needs numpy only (no moetrace, no torch),
so the GPU check script runs it as it is.
"""
import argparse
import json
import struct
import sys

import numpy as np

INPUTS = ("input_ids", "attention_mask", "decoder_input_ids")
DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64, "U8": np.uint8,
          "I8": np.int8, "F16": np.float16, "BOOL": np.bool_}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        raw = body[begin:end]
        if meta["dtype"] == "BF16":
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(raw, DTYPES[meta["dtype"]])
        out[name] = (meta["dtype"], arr.reshape(meta["shape"]))
    return out


def compare(out, ref, rtol, min_agreement):
    """Yields (name, ok, text) per reference tensor; top1 agreement counts in the last tuple."""
    same = total = 0
    for name in sorted(ref):
        if name in INPUTS:
            continue
        rdt, r = ref[name]
        if name not in out:
            yield name, False, "missing from the output"
            continue
        odt, o = out[name]
        if o.shape != r.shape or odt != rdt:
            yield name, False, f"{odt} {list(o.shape)}, expected {rdt} {list(r.shape)}"
            continue
        if np.issubdtype(r.dtype, np.floating):
            r64, o64 = r.astype(np.float64), o.astype(np.float64)
            err = np.linalg.norm(o64 - r64) / max(np.linalg.norm(r64), 1e-30)
            yield name, bool(err <= rtol), f"rel error {err:.2e} (bound {rtol:g})"
        else:
            eq = int((o == r).sum())
            agree = eq / max(r.size, 1)
            if name.endswith(".top1"):
                same, total = same + eq, total + r.size
            yield name, agree >= min_agreement, f"{eq}/{r.size} equal ({100 * agree:.2f}%)"
    yield None, same, total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("output")
    ap.add_argument("reference")
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--min-agreement", type=float, default=1.0)
    ap.add_argument("--label", default="")
    a = ap.parse_args(argv)
    try:
        out, ref = read_safetensors(a.output), read_safetensors(a.reference)
    except (OSError, ValueError, KeyError, struct.error) as e:
        print(f"compare_forward: error: {e}", file=sys.stderr)
        return 1
    failed = compared = 0
    label = f"{a.label}: " if a.label else ""
    for name, ok, text in compare(out, ref, a.rtol, a.min_agreement):
        if name is None:
            same, total = ok, text
            break
        compared += 1
        failed += not ok
        print(f"{label}{'ok  ' if ok else 'FAIL'} {name:44s} {text}")
    top1 = f"top-1 agreement {same}/{total} ({100 * same / max(total, 1):.3f}%)"
    print(f"{label}{compared - failed}/{compared} tensors within bounds, {top1}")
    return 1 if failed or compared == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
