"""PyTorch's fused attention backends on moetrace's encoder attention (docs/GPU.md, "Libraries
against the hand kernels").

T5 self-attention: unscaled (scale=1.0), a position bias [H, 2S-1] (bias[h, j-i+S-1]) expanded to
a float attn_mask [1, H, S, S], or with the padding mask folded in [B, H, S, S] (sequence b holds
S - (37 b mod S/2) tokens, as bench/bench_libs.cu; padded keys get the dtype's lowest value),
q, k, v [B, H, S, d] in bf16. Each backend (cuDNN, memory-efficient, FlashAttention, math) runs under
torch.nn.attention.sdpa_kernel; a backend that refuses the inputs is a result and its reason is
printed. Every output is compared with a float64 reference on a few sequences. FLOP = 4·B·H·S²·d.

  python bench/attention_libs.py [--json FILE] [--moetrace bench_libs.json]
  python bench/attention_libs.py --device cpu --batch 2 --heads 2 --seq 16   (a CPU smoke test)

--moetrace reads bench_libs's JSON and prints moetrace's flash_attention rows in the same table.
"""

import argparse
import datetime
import json
import platform
import re
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "math": SDPBackend.MATH,
}
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
TOLERANCE = 3e-2  # max |out - ref| / max |ref|: bf16 outputs and a bf16 mask


def lengths(B, S):
    """[B] valid tokens per sequence: S - (37 b mod S/2), as bench/bench_libs.cu."""
    return [S - (37 * b) % max(S // 2, 1) for b in range(B)]


def make_inputs(B, H, S, dk, dtype, device, seed=0):
    """q, k, v [B, H, S, dk] and the float masks: bias only [1, H, S, S], bias + padding [B, H, S, S]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = ((torch.rand(B, H, S, dk, generator=g) - 0.5).to(device, dtype) for _ in range(3))
    table = (torch.rand(H, 2 * S - 1, generator=g) * 2 - 1).to(device)  # bias[h, j - i + S - 1]
    i = torch.arange(S, device=device)
    bias = table[:, (i[None, :] - i[:, None]) + S - 1][None].to(dtype)  # [1, H, S, S]
    keep = i[None, :] < torch.tensor(lengths(B, S), device=device)[:, None]  # [B, S]
    padded = bias.expand(B, H, S, S).masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min)
    return q, k, v, {"bias [1,H,S,S]": bias, "bias + padding [B,H,S,S]": padded}  # [B, H, S, S]


def reference(q, k, v, mask, n):
    """float64 softmax(q·kᵀ + mask)·v for the first n sequences: [n, H, S, dk]."""
    q, k, v = (t[:n].double().cpu() for t in (q, k, v))
    m = mask[: min(n, mask.shape[0])].double().cpu()
    p = torch.softmax(q @ k.transpose(-1, -2) + m, dim=-1)
    return p @ v


def timed(fn, reps, device):
    """Mean seconds of one call over reps calls, after 2 warm-up calls."""
    for _ in range(2):
        fn()
    if device == "cuda":
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(reps):
            fn()
        t1.record()
        t1.synchronize()
        return t0.elapsed_time(t1) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def first_line(text):
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    return lines[0] if lines else "(no message)"


def run_backend(name, q, k, v, mask, reps, device, ref, n_ref):
    """One backend on one mask: a result row (times and error, or the refusal)."""
    row = {"impl": f"torch sdpa {name}", "ms": None, "tflops": None, "max_rel_err": None, "ok": False, "note": ""}
    call = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(BACKENDS[name]):
                out = call()
                sec = timed(call, reps, device)
        except RuntimeError as e:
            # PyTorch says why in warnings ("... requires ...") and raises "No available kernel".
            # Keep the reasons themselves, not the "X kernel not used because:" headers, the
            # "runtime disabled" notes of the backends sdpa_kernel switched off, or source locations.
            reasons = [re.sub(r"\s*\(Triggered internally at [^)]*\)", "", first_line(w.message)).strip()
                       for w in caught]
            reasons = [r for r in reasons if r and not r.endswith("because:") and "runtime disabled" not in r]
            row["note"] = "refused: " + ("; ".join(dict.fromkeys(reasons)) or first_line(e))
            return row
    got = out[:n_ref].double().cpu()
    err = float((got - ref).abs().max() / ref.abs().max())
    row.update(ms=sec * 1e3, max_rel_err=err, ok=bool(err <= TOLERANCE and torch.isfinite(out).all()))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backends", default="cudnn,efficient,flash,math")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--moetrace", help="bench_libs JSON: print its flash_attention rows too")
    a = ap.parse_args()
    names = a.backends.split(",")
    for n in names:
        if n not in BACKENDS:
            ap.error(f"--backends: unknown backend '{n}' (expected some of {','.join(BACKENDS)})")
    B, H, S, dk = a.batch, a.heads, a.seq, a.dk
    dtype = DTYPES[a.dtype]
    q, k, v, masks = make_inputs(B, H, S, dk, dtype, a.device)
    flop = 4.0 * B * H * S * S * dk
    n_ref = min(B, 4)
    rows = []
    for mname, mask in masks.items():
        ref = reference(q, k, v, mask, n_ref)
        for name in names:
            row = run_backend(name, q, k, v, mask, a.reps, a.device, ref, n_ref)
            row["mask"] = mname
            if row["ms"]:
                row["tflops"] = flop / (row["ms"] * 1e-3) / 1e12
            rows.append(row)
    gpu = torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or "cpu"
    result = {
        "benchmark": "attention_libs",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "gpu": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "shape": {"B": B, "H": H, "S": S, "dk": dk, "dtype": a.dtype, "device": a.device},
        "flop": flop,
        "rows": rows,
    }
    theirs = []
    if a.moetrace:
        theirs = [r for r in json.load(open(a.moetrace)).get("attention", []) if "ms" in r]
        for r in theirs:
            r.setdefault("note", "")
            if (r.get("B"), r.get("H"), r.get("S"), r.get("dk")) != (B, H, S, dk):
                r["note"] = f"other shape B={r.get('B')} H={r.get('H')} S={r.get('S')} dk={r.get('dk')}"
    print(f"\n== attention on {gpu}: B={B} H={H} S={S} d={dk} {a.dtype}, unscaled, torch {torch.__version__}, "
          f"cuDNN {result['cudnn']}; FLOP = 4·B·H·S²·d")
    print(f"{'impl':<28} {'mask':<32} {'ms':>8} {'TFLOP/s':>8} {'max rel':>9}  check / note")
    for r in theirs + rows:
        ms = f"{r['ms']:.3f}" if r.get("ms") else "-"
        tf = f"{r['tflops']:.1f}" if r.get("tflops") else "-"
        err = f"{r['max_rel_err']:.2e}" if r.get("max_rel_err") is not None else "-"
        check = ("ok" if r.get("ok") else "FAIL") if r.get("ms") else "-"
        print(f"{r['impl']:<28} {r['mask']:<32} {ms:>8} {tf:>8} {err:>9}  {check} {r.get('note', '')}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {a.json}")
    return 2 if any(r["ms"] and not r["ok"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
