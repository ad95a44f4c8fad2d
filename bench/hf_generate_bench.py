#!/usr/bin/env python3
"""Generation benchmark: decoder tokens/s of transformers' generate() against moetrace's (issue 19;
docs/GPU.md "Baselines").

transformers' SwitchTransformersForConditionalGeneration (switch-base-128 shape by default, random
weights at transformers' own initialization, bf16, the router fp32) runs
  generate(input_ids, attention_mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
           num_beams=1, output_router_logits=True)
on B random prompts of --prompt tokens, for each batch size of --batches (default 1,32,128). Rows:
  hf-faithful  every sparse layer (encoder and decoder) patched back to the transformers 4.x
               semantics of SWITCH_SPEC.md (bench/hf_switch_bench.py patch_faithful: fp32 router,
               per-sequence capacity, HF 4.x's loop over the experts); after generate(), the router
               logits (fp16) and top-1 experts of every sparse layer call (encoder once, decoder once
               per step) are copied to the host.
  hf-stock     transformers as installed (5.x: tokens flattened before the router, router_logits not
               the real logits; SWITCH_SPEC.md), output_router_logits=True; shown for reference.
decoder tokens/s = B x N / the median seconds of one generate() call (the encoder pass included, as
generate() includes it). With --bench-gpu PATH, moetrace's engine runs the same workload in the same
call (`bench_gpu --generate N --generate-batches ... --generate-prompt S --shapes ''`: encode +
generate with every step's decoder router logits and experts offered to a host observer, as
`collect --decoder` does) and its rows join the table.

Timing: --warmup calls, then --repeats calls per batch size, CUDA events on cuda (time.perf_counter on
cpu), the median is reported (bench/torch_bench_util.py).

  /work/venv-torch/bin/python bench/hf_generate_bench.py --tiny --device cpu     # CPU smoke run
  python3 bench/hf_generate_bench.py --device cuda --new-tokens 32 \\
      --bench-gpu build/bench/bench_gpu --json $OUT/hf_generate.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch_bench_util as U  # noqa: E402

ROWS = ("hf-faithful", "hf-stock")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32, help="N: max_new_tokens = min_new_tokens")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence (random ids)")
    ap.add_argument("--batches", default="1,32,128", help="batch sizes")
    ap.add_argument("--rows", default="hf-faithful", help=",".join(ROWS))
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bench-gpu", default="", help="moetrace's bench_gpu binary: its --generate rows join the table")
    ap.add_argument("--bench-gpu-args", default="", help="more bench_gpu options (e.g. --precision mixed)")
    ap.add_argument("--tiny", action="store_true", help="a tiny Switch model (d 64, 4+4 blocks, 8 experts) for the CPU")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    a.rows = [r for r in a.rows.split(",") if r]
    bad = [r for r in a.rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: expected a list of {', '.join(ROWS)}, got {bad}")
    try:
        a.batches = [int(b) for b in a.batches.split(",") if b]
    except ValueError:
        ap.error(f"--batches: expected a list of batch sizes, got {a.batches!r}")
    if not a.batches or min(a.batches) < 1 or a.new_tokens < 1 or a.prompt < 1 or a.repeats < 1:
        ap.error("--batches >= 1, --new-tokens >= 1, --prompt >= 1 and --repeats >= 1 expected")
    if a.tiny:
        a.experts = 8
        if a.batches == [1, 32, 128]:
            a.batches = [1, 4]
        a.new_tokens = min(a.new_tokens, 6)
        a.prompt = min(a.prompt, 12)
    return a


def build(torch, a, device, dtype):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    if a.tiny:
        shape = dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=4, num_decoder_layers=4,
                     num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)
    else:
        shape = dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
                     num_sparse_encoder_layers=6, num_sparse_decoder_layers=6)
    cfg = SwitchTransformersConfig(num_experts=a.experts, expert_capacity=64, router_dtype="float32",
                                   decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, **shape)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = SwitchTransformersForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.eval()
    for mod in model.modules():
        if type(mod).__name__.endswith("Top1Router"):
            mod.classifier.to(torch.float32)
    return model, cfg


def generate_fn(torch, model, ids, mask, n, capture, row, notes):
    """One generate() call. With the patched sparse layers, a transformers whose router outputs are
    recorded by hooks on the router module (5.2x) fails on output_router_logits=True (it finds no
    router output); then the call goes without it, the patch's capture holds the router outputs, and a
    note says so."""
    state = {"router_flag": True}

    def call():
        capture.clear()
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                  num_beams=1)
        try:
            out = model.generate(**kw, output_router_logits=state["router_flag"])
        except (ValueError, RuntimeError, TypeError, IndexError) as e:
            if row != "hf-faithful" or not state["router_flag"]:
                raise
            state["router_flag"] = False
            msg = f"hf-faithful: generate(output_router_logits=True) fails with the patched sparse layers " \
                  f"({str(e).splitlines()[0][:80]}); run without it, the patch captures the router outputs"
            if msg not in notes:
                notes.append(msg)
            capture.clear()
            out = model.generate(**kw)
        if row == "hf-faithful":
            host = [(lg.half().cpu(), t1.to(torch.int32).cpu()) for lg, t1, _ in capture]
        else:
            host = []
        call.out, call.host = out, host

    return call


def run_bench_gpu(a):
    """moetrace's rows: bench_gpu --generate, its JSON read back."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench_gpu_generate.json")
        cmd = [a.bench_gpu, "--generate", str(a.new_tokens), "--generate-batches", ",".join(map(str, a.batches)),
               "--generate-prompt", str(a.prompt), "--shapes", "", "--experts", str(a.experts), "--json", path,
               *a.bench_gpu_args.split()]
        print("running " + " ".join(repr(c) if c == "" else c for c in cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(proc.stdout[-3000:])
        if proc.returncode != 0 or not os.path.exists(path):
            return None, f"bench_gpu failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-300:]}"
        with open(path) as f:
            return json.load(f), None


def main(argv=None):
    a = parse_args(argv)
    import torch

    from hf_switch_bench import patch_faithful

    device = U.resolve_device(torch, a.device)
    torch.set_float32_matmul_precision("highest")
    mach = U.machine(torch, device)
    print(f"torch {torch.__version__}, transformers {mach['transformers']} on {U.device_name(mach)}", flush=True)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    notes = []
    if device.type == "cpu":
        notes += ["cpu: plain timer (time.perf_counter), fp32 (bf16 matmuls on a CPU say nothing); not comparable "
                  "with GPU rows"]
    results = []
    capture = []
    model = cfg = None
    for row in a.rows:
        model = None
        model, cfg = build(torch, a, device, dtype)  # fresh for each row: patch_faithful patches in place
        if row == "hf-faithful":
            patch_faithful(torch, model, cfg, capture)
        for B in a.batches:
            g = torch.Generator(device="cpu").manual_seed(B)
            ids = torch.randint(2, cfg.vocab_size, (B, a.prompt), generator=g).to(device)
            mask = torch.ones_like(ids)
            fn = generate_fn(torch, model, ids, mask, a.new_tokens, capture, row, notes)
            try:
                with torch.inference_mode():
                    secs = U.time_passes(torch, device, fn, a.warmup, a.repeats)
            except Exception as e:  # noqa: BLE001 (say it, go on)
                msg = (str(e).splitlines() or [type(e).__name__])[0][:160]
                notes.append(f"{row} batch {B}: failed ({type(e).__name__}: {msg})")
                print(f"{row} batch {B}: FAILED {msg}", flush=True)
                continue
            steps = fn.out.shape[1] - 1  # the start token, then one per step
            if steps != a.new_tokens:
                notes.append(f"{row} batch {B}: generate returned {steps} new tokens, expected {a.new_tokens}")
            n_dec = sum(1 for lg, _ in fn.host if lg.shape[1] == 1) if fn.host else None
            med = U.median(secs)
            r = {"row": row, "label": f"transformers {row}", "batch": B, "prompt": a.prompt, "new_tokens": steps,
                 "median_s": med, "min_s": min(secs), "max_s": max(secs), "repeats": len(secs),
                 "decoder_tokens_per_s": B * steps / med, "ms_per_step": 1e3 * med / max(steps, 1),
                 "decoder_router_calls_captured": n_dec}
            results.append(r)
            print(f"{row:<12} batch {B:<4} {r['decoder_tokens_per_s']:>12,.0f} decoder tokens/s "
                  f"({r['ms_per_step']:.2f} ms/step, median of {len(secs)})", flush=True)
    del model
    moetrace = None
    if a.bench_gpu:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        moetrace, err = run_bench_gpu(a)
        if err:
            notes.append("moetrace: " + err)
        else:
            for g in moetrace.get("generate", []):
                results.append({"row": "moetrace", "label": f"moetrace bench_gpu --generate ({moetrace.get('precision')})",
                                "batch": g["batch"], "prompt": g["prompt_tokens"], "new_tokens": g["new_tokens"],
                                "median_s": g["median_seconds"], "repeats": g["repeats"],
                                "decoder_tokens_per_s": g["decoder_tokens_per_s"],
                                "ms_per_step": 1e3 * g["median_seconds"] / g["new_tokens"],
                                "clock": "steady_clock around encode + generate"})
            if not moetrace.get("generate"):
                notes.append("moetrace: bench_gpu wrote no generate rows (an older bench_gpu without --generate?)")
    U.print_table(
        f"greedy generation, {a.new_tokens} new tokens (min = max), prompts of {a.prompt} random ids, "
        f"switch-{'tiny' if a.tiny else 'base'}-{a.experts} shape, decoder router logits to the host, on "
        f"{U.device_name(mach)}",
        [("row", "label", "{}"), ("batch", "batch", "{:d}"), ("decoder tokens/s", "decoder_tokens_per_s", "{:,.0f}"),
         ("ms/step", "ms_per_step", "{:.2f}"), ("s/call", "median_s", "{:.3f}")],
        results, notes)
    U.write_json(a.json, {
        "date": U.now_utc(), "machine": mach, "device": str(device), "command": [sys.executable, *sys.argv],
        "benchmark": "greedy generation (bench/hf_generate_bench.py)",
        "model": {"shape": "tiny" if a.tiny else "switch-base", "experts": a.experts,
                  "dtype": str(dtype).replace("torch.", ""), "init": "transformers' own, router fp32"},
        "workload": {"batches": a.batches, "prompt_tokens": a.prompt, "new_tokens": a.new_tokens},
        "timing": {"warmup": a.warmup, "repeats": a.repeats,
                   "clock": "cuda events" if device.type == "cuda" else "time.perf_counter"},
        "notes": notes, "results": results, "bench_gpu": moetrace})
    return 0


if __name__ == "__main__":
    sys.exit(main())
