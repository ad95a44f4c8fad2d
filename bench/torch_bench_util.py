"""Shared pieces of the PyTorch baselines (bench/torch_switch_baseline.py, bench/lm_baselines.py,
bench/hf_generate_bench.py): timing, feature probes that say what they fell back to, the machine
description and the JSON/table output. Not a benchmark itself.

Timing rule of every script: one warm-up pass (more with --warmup), then --repeats passes, each
timed with CUDA events on cuda (recorded on the current stream around the pass; the pass ends with
its host copies, so the events cover them) and time.perf_counter on cpu; the median is reported.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time


def time_passes(torch, device, fn, warmup, repeats):
    """Runs fn() warmup times, then repeats times; returns the per-pass seconds (a list)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            out.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def probe_grouped_mm(torch, device, dtype):
    """(fn or None, note): torch._grouped_mm(a [T,K], b [G,K,N], offs=int32 cumulative ends) if it
    runs on this device and dtype and matches a loop of matmuls; otherwise None and why."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        return None, f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randn(40, 32, generator=g).to(device, dtype)
        b = torch.randn(3, 32, 16, generator=g).to(device, dtype)
        offs = torch.tensor([5, 5, 40], dtype=torch.int32, device=device)  # unaligned, one empty group
        y = fn(a, b, offs=offs)
        ref = torch.cat([a[0:5] @ b[0], a[5:40] @ b[2]])
        err = (y.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-30)
        if not err < 2e-2:
            return None, f"torch._grouped_mm gave a relative error of {err:.3g} against a loop of matmuls"
        return fn, "torch._grouped_mm"
    except Exception as e:  # noqa: BLE001 (any failure means: use the loop)
        return None, f"torch._grouped_mm unavailable on {device.type}/{str(dtype).replace('torch.', '')}: " + \
            str(e).splitlines()[0][:120]


def grouped_loop(torch, a, b, offs):
    """The fallback of torch._grouped_mm: one matmul per non-empty group (offs to the host)."""
    out = a.new_empty(a.shape[0], b.shape[2])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ b[g]
        start = end
    return out


def try_compile(torch, fn, mode, device):
    """(compiled fn or None, note). None with the reason when torch.compile is missing or fails on
    a first call (that is the caller's: it passes a thunk that makes the first call)."""
    if not hasattr(torch, "compile"):
        return None, "torch.compile unavailable"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return None, "torch.compile needs triton, which is not installed"
    try:
        import torch._dynamo as dynamo

        # The check's fp32 graphs and every benchmark shape share a code object's cache.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
        return torch.compile(fn, mode=mode, dynamic=None), f"torch.compile(mode={mode!r})"
    except Exception as e:  # noqa: BLE001
        return None, "torch.compile failed: " + str(e).splitlines()[0][:160]


def machine(torch, device):
    m = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
         "torch": torch.__version__}
    try:
        import transformers

        m["transformers"] = transformers.__version__
    except ImportError:
        m["transformers"] = None
    try:
        import triton

        m["triton"] = triton.__version__
    except ImportError:
        m["triton"] = None
    try:
        with open("/proc/cpuinfo") as f:
            m["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        m["gpu"] = p.name
        m["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        m["cuda"] = torch.version.cuda
    else:
        m["gpu"] = None
    return m


def device_name(m):
    return m.get("gpu") or m.get("cpu") or "cpu"


def write_json(path, doc):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"wrote {path}")


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def print_table(title, columns, rows, notes=()):
    """A markdown table: columns [(header, key, fmt)], rows of dicts; notes printed below it."""
    cells = [[(fmt.format(r[k]) if r.get(k) is not None else "—") for _, k, fmt in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (h, _, _) in enumerate(columns)]
    left = [fmt == "{}" for _, _, fmt in columns]  # text columns left, numbers right
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for (h, _, _), w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + ("-" if lf else ":") for lf, w in zip(left, widths)) + "|")
    for c in cells:
        print("| " + " | ".join((v.ljust(w) if lf else v.rjust(w)) for v, w, lf in zip(c, widths, left)) + " |")
    if not rows:
        print("| (no row ran) |")
    for n in notes:
        print(f"  note: {n}")
    sys.stdout.flush()


def resolve_device(torch, name):
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here (use --device cpu)")
    return dev
