"""Hugging Face transformers (4.x, the correct Switch router) on the CPU, for the side-by-side with
bench_cpu: a random switch-base-N-shaped encoder at batch x length 1x128 and 8x256, same thread count.
Not part of CI (torch + transformers are several GB): run it where they are installed.

    python bench/hf_cpu_bench.py --experts 8 --threads 2 --json hf_cpu.json
"""
import argparse
import datetime
import json
import platform
import time

import torch
import transformers
from transformers import SwitchTransformersConfig, SwitchTransformersEncoderModel


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="hf_cpu_bench.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = SwitchTransformersConfig(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12,
                                   num_sparse_encoder_layers=6, num_experts=a.experts, expert_capacity=64)
    model = SwitchTransformersEncoderModel(cfg).eval()
    rows = []
    print(f"HF transformers {transformers.__version__}, torch {torch.__version__}, {cpu_model()}, "
          f"threads={a.threads}, switch-base-{a.experts} encoder (random fp32)")
    print(f"{'batch×len':>10} {'tokens/s':>10} {'ms/batch':>10}")
    for B, S in ((1, 128), (8, 256)):
        ids = torch.randint(3, 32000, (B, S))
        mask = torch.ones(B, S, dtype=torch.long)
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, output_router_logits=True)
            best = 1e30
            for _ in range(a.reps):
                t0 = time.perf_counter()
                model(input_ids=ids, attention_mask=mask, output_router_logits=True)
                best = min(best, time.perf_counter() - t0)
        tps = B * S / best
        print(f"{B:>4}×{S:<5} {tps:>10.0f} {best * 1e3:>10.1f}")
        rows.append({"batch": B, "length": S, "tokens_per_s": tps, "ms_per_batch": best * 1e3})
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "cpu": cpu_model(),
           "host": platform.node(), "threads": a.threads, "transformers": transformers.__version__,
           "torch": torch.__version__, "experts": a.experts, "encoder": rows}
    json.dump(out, open(a.json, "w"), indent=2)
    print("wrote", a.json)


if __name__ == "__main__":
    main()
