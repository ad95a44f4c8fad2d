#!/usr/bin/env python3
"""How faithful is moetrace's routing in each precision? (issue 18, docs/GPU.md "Precision")

1. Builds a Switch encoder with transformers' own random initialization (default: a tiny shape for
   a CPU smoke run; `--experts 128 --layers 12 --d-model 768` is switch-base-128), rounds its weights
   to bf16 and saves them as bf16 safetensors with config.json and the bundled spiece.model.
2. Runs `moetrace collect` on that directory once per precision (fp32, bf16, fp16, mixed, faithful) on --device, with
   the same plan: --samples real samples of the bundled rows (`--datasets demo`), float32 logits.
3. Reads the stores with the Python reader, checks that they hold the same samples and token ids,
   and feeds those ids to transformers patched to the 4.x semantics of SWITCH_SPEC.md
   (bench/hf_switch_bench.py patch_faithful) in fp32 and bf16.
4. Prints the top-1 agreement table of the issue over every (token, encoder MoE layer), a
   per-layer table of moetrace {bf16, fp16, mixed, faithful} vs moetrace fp32 (top-1 agreement, max |logit diff|),
   each collect run's tokens/s (the manifest's throughput: the collection loop, model load
   excluded) and its audit (`collect --audit`), and writes all of it as JSON with date and machine.

Needs torch and transformers (not in scripts/requirements.txt): a separate environment, e.g.
  python -m venv /work/venv-torch && /work/venv-torch/bin/pip install torch transformers safetensors
  /work/venv-torch/bin/python bench/fidelity.py                        # tiny, CPU, a minute
  python bench/fidelity.py --device cuda --experts 128 --layers 12 --d-model 768 --samples 600
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))  # the reader without installing the package
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # hf_switch_bench

PRECISIONS = ("fp32", "bf16", "fp16", "mixed", "faithful")
SPIECE = os.path.join(ROOT, "assets", "demo", "spiece.model")
DATA_ROOT = os.path.join(ROOT, "assets", "demo", "data")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model (transformers' random initialization, saved as bf16)")
    g.add_argument("--experts", type=int, default=8)
    g.add_argument("--layers", type=int, default=4, help="encoder blocks; every second one is sparse")
    g.add_argument("--d-model", type=int, default=64)
    g.add_argument("--d-ff", type=int, default=0, help="default 4 x d_model")
    g.add_argument("--heads", type=int, default=0, help="default d_model / d_kv")
    g.add_argument("--d-kv", type=int, default=64)
    g.add_argument("--capacity", type=int, default=64, help="expert capacity per sequence")
    g.add_argument("--seed", type=int, default=0, help="torch seed of the initialization")
    g = ap.add_argument_group("collection")
    g.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (moetrace and transformers)")
    g.add_argument("--samples", type=int, default=24, help="real samples of the bundled rows")
    g.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="moetrace precisions to collect; fp32 is needed as the reference")
    g.add_argument("--batch-tokens", type=int, default=0, help="collect --batch-tokens (0: its default)")
    g.add_argument("--audit", default="0.01", help="collect --audit of the bf16/mixed runs")
    g.add_argument("--cli", default=os.path.join(ROOT, "build", "tools", "cli", "moetrace"))
    g.add_argument("--hf-batch", type=int, default=64, help="sequences per transformers batch")
    g = ap.add_argument_group("output")
    g.add_argument("--work", default="/tmp/moetrace_fidelity", help="model and stores go here (replaced)")
    g.add_argument("--json", default="", help="write the results here (default WORK/fidelity.json)")
    a = ap.parse_args(argv)
    a.d_ff = a.d_ff or 4 * a.d_model
    a.heads = a.heads or max(1, a.d_model // a.d_kv)
    a.precisions = [p for p in a.precisions.split(",") if p]
    bad = [p for p in a.precisions if p not in PRECISIONS]
    if bad or "fp32" not in a.precisions:
        ap.error(f"--precisions: expected a list of {', '.join(PRECISIONS)} including fp32, got {a.precisions}")
    if a.layers < 2 or a.experts < 1 or a.samples < 1:
        ap.error("--layers >= 2, --experts >= 1 and --samples >= 1 expected")
    return a


# --- 1. the model -----------------------------------------------------------------------------------


def hf_config(a):
    from transformers import SwitchTransformersConfig

    return SwitchTransformersConfig(
        vocab_size=32128, d_model=a.d_model, d_ff=a.d_ff, d_kv=a.d_kv, num_heads=a.heads,
        num_layers=a.layers, num_decoder_layers=a.layers, num_sparse_encoder_layers=a.layers // 2,
        num_sparse_decoder_layers=a.layers // 2, num_experts=a.experts, expert_capacity=a.capacity,
        router_dtype="float32", router_bias=False, dropout_rate=0.0, tie_word_embeddings=True)


def build_model(torch, a, device):
    """transformers' encoder with its own initialization, every weight rounded to bf16 (so that the
    fp32 and bf16 runs of both engines see identical weights)."""
    from transformers.models.switch_transformers import modeling_switch_transformers as m

    cfg = hf_config(a)
    torch.manual_seed(a.seed)
    with torch.device(device):
        model = m.SwitchTransformersEncoderModel(cfg)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model, cfg


def checkpoint_tensors(torch, model, cfg):
    """The encoder's tensors under the transformers 4.x names moetrace reads (one wi/wo per expert,
    whatever layout the installed transformers keeps them in), as bf16."""
    from hf_switch_bench import expert_weights, sparse_modules

    out = {}
    sparse = {id(mod): mod for mod in sparse_modules(model)}
    prefixes = {}
    for name, mod in model.named_modules():
        if id(mod) in sparse:
            prefixes[name] = mod
    for name, t in model.state_dict().items():
        if name in ("encoder.embed_tokens.weight",):
            continue  # tied to shared.weight
        prefix = next((p for p in prefixes if name.startswith(p + ".experts.")), None)
        if prefix is None:
            out[name] = t
    for prefix, mod in prefixes.items():
        for e, (wi, wo) in enumerate(expert_weights(torch, mod, cfg.num_experts)):
            out[f"{prefix}.experts.expert_{e}.wi.weight"] = wi
            out[f"{prefix}.experts.expert_{e}.wo.weight"] = wo
    return {k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in out.items()}


def save_model(torch, model, cfg, path):
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    tensors = checkpoint_tensors(torch, model, cfg)
    names = [k for k in tensors if ".mlp.router.classifier.weight" in k]
    if not names or "shared.weight" not in tensors:
        raise SystemExit("fidelity.py: the installed transformers names its tensors in a way this script "
                         f"does not know (got e.g. {sorted(tensors)[:5]})")
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    conf = cfg.to_dict()
    conf["architectures"] = ["SwitchTransformersForConditionalGeneration"]
    conf["is_encoder_decoder"] = True
    conf["dtype"] = "bfloat16"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f, indent=2, default=str)
    shutil.copy(SPIECE, os.path.join(path, "spiece.model"))
    return sum(t.numel() for t in tensors.values())


# --- 2. moetrace collect ------------------------------------------------------------------------------


def collect(a, model_dir, precision, out, n_sparse):
    cmd = [a.cli, "collect", "--model", model_dir, "--datasets", "demo", "--data-root", DATA_ROOT,
           "--traces", str(a.samples * n_sparse), "--device", a.device, "--precision", precision,
           "--logits", "f32", "--seed", "0", "--no-progress", "--overwrite", "-o", out,
           "--audit", "0" if precision == "fp32" else a.audit]
    if a.batch_tokens:
        cmd += ["--batch-tokens", str(a.batch_tokens)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"fidelity.py: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    timing = re.search(r"timing: total ([\d.]+) s, loop ([\d.]+) s, engine ([\d.]+) s", proc.stderr)
    return {"precision": precision, "store": out, "wall_s": wall,
            "tokens": m["num_tokens"], "samples": m["num_samples"],
            "tokens_per_s": m["throughput_tokens_per_s"], "collection_time_s": m["collection_time"],
            "engine_s": float(timing.group(3)) if timing else None,
            "device": m["device"], "engine": m.get("engine"), "fidelity": m.get("fidelity"),
            "log": [line for line in proc.stderr.splitlines() if "audit" in line or "mixed" in line or "faithful" in line]}


def read_store(path):
    """Per sample: (sample_id, token ids, {layer: (expert [S], logits [S,E] float32)})."""
    from moetrace.store import open_store

    st = open_store(path)
    out = []
    for s in st:
        if s.synthetic:
            continue
        layers = {name: (np.asarray(s.layer(name).expert, dtype=np.int64),
                         np.asarray(s.layer(name).router_logits, dtype=np.float32))
                  for name in st.layers if name.startswith("enc.")}
        out.append((s.sample_id, np.asarray(s.token_ids, dtype=np.int64), layers))
    return out, [name for name in st.layers if name.startswith("enc.")]


# --- 3. transformers ----------------------------------------------------------------------------------


def run_transformers(torch, model, cfg, samples, layer_names, dtype, batch):
    """The 4.x-patched transformers encoder over the stored token ids: per sample {layer: (expert,
    logits)} like read_store's."""
    import copy

    from hf_switch_bench import patch_faithful

    m = copy.deepcopy(model).to(dtype)
    for mod in m.modules():
        if type(mod).__name__.endswith("Top1Router"):
            mod.classifier.to(torch.float32)
    capture = []
    patch_faithful(torch, m, cfg, capture)
    device = next(m.parameters()).device
    order = sorted(range(len(samples)), key=lambda i: len(samples[i][1]))
    out = [None] * len(samples)
    with torch.inference_mode():
        for b0 in range(0, len(order), batch):
            idx = order[b0:b0 + batch]
            S = max(len(samples[i][1]) for i in idx)
            ids = torch.zeros(len(idx), S, dtype=torch.long)
            mask = torch.zeros(len(idx), S, dtype=torch.long)
            for r, i in enumerate(idx):
                t = torch.from_numpy(samples[i][1])
                ids[r, :len(t)] = t
                mask[r, :len(t)] = 1
            capture.clear()
            m(input_ids=ids.to(device), attention_mask=mask.to(device))
            if len(capture) != len(layer_names):
                raise SystemExit(f"fidelity.py: transformers ran {len(capture)} sparse layers, the stores "
                                 f"have {len(layer_names)}")
            host = [(top1.cpu().numpy(), logits.float().cpu().numpy()) for logits, top1, _ in capture]
            for r, i in enumerate(idx):
                n = len(samples[i][1])
                out[i] = {name: (host[k][0][r, :n].astype(np.int64), host[k][1][r, :n])
                          for k, name in enumerate(layer_names)}
    del m
    return out


# --- 4. the tables ------------------------------------------------------------------------------------


def compare(a_routes, b_routes, layer_names):
    """Top-1 agreement and max |logit diff| per layer and in all, over every (token, layer)."""
    per = {}
    agree_all = total_all = 0
    err_all = 0.0
    for name in layer_names:
        agree = total = 0
        err = 0.0
        for ra, rb in zip(a_routes, b_routes):
            ea, la = ra[name]
            eb, lb = rb[name]
            agree += int((ea == eb).sum())
            total += len(ea)
            if len(la):
                err = max(err, float(np.abs(la.astype(np.float64) - lb.astype(np.float64)).max()))
        per[name] = {"token_layers": total, "agree": agree, "top1_agreement": agree / max(total, 1),
                     "max_logit_diff": err}
        agree_all += agree
        total_all += total
        err_all = max(err_all, err)
    return {"token_layers": total_all, "agree": agree_all, "top1_agreement": agree_all / max(total_all, 1),
            "max_logit_diff": err_all, "per_layer": per}


def machine(torch, device):
    m = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
         "torch": torch.__version__}
    try:
        import transformers

        m["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            m["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        m["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return m


def main(argv=None):
    a = parse_args(argv)
    if not os.path.exists(a.cli):
        raise SystemExit(f"fidelity.py: no moetrace CLI at {a.cli} (build it: bash scripts/build.sh release)")
    import torch

    torch_device = a.device
    stages = {}
    t0 = time.perf_counter()
    os.makedirs(a.work, exist_ok=True)
    model_dir = os.path.join(a.work, "model")
    model, cfg = build_model(torch, a, torch_device)
    n_params = save_model(torch, model, cfg, model_dir)
    stages["model_s"] = time.perf_counter() - t0
    n_sparse = a.layers // 2
    print(f"model: switch-base-{a.experts}-shaped encoder, {a.layers} blocks ({n_sparse} sparse), d_model "
          f"{a.d_model}, d_ff {a.d_ff}, {a.heads}x{a.d_kv} heads, capacity {a.capacity}; {n_params / 1e9:.3f} B "
          f"parameters saved as bf16 in {model_dir} ({stages['model_s']:.1f} s)", flush=True)

    runs, routes = {}, {}
    ids_ref, layer_names = None, None
    for p in a.precisions:
        t = time.perf_counter()
        runs[p] = collect(a, model_dir, p, os.path.join(a.work, f"store-{p}"), n_sparse)
        samples, layer_names = read_store(runs[p]["store"])
        ids = [(sid, tok.tobytes()) for sid, tok, _ in samples]
        if ids_ref is None:
            ids_ref, base = ids, samples
        elif ids != ids_ref:
            raise SystemExit(f"fidelity.py: the {p} store holds other samples or token ids than the fp32 one")
        routes[f"moetrace {p}"] = [layers for _, _, layers in samples]
        stages[f"collect_{p}_s"] = time.perf_counter() - t
        print(f"collect {p:<6} {runs[p]['tokens_per_s']:>12,.0f} tokens/s  ({runs[p]['tokens']} tokens, "
              f"{runs[p]['samples']} samples, {runs[p]['device']}; run {runs[p]['wall_s']:.1f} s)", flush=True)
    if a.device == "cpu" and len(a.precisions) > 1:
        print("  (the CPU engine computes in fp32 whatever --precision says: the moetrace rows agree "
              "exactly; the precisions differ on the GPU)")
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        t = time.perf_counter()
        routes[f"transformers {name}"] = run_transformers(torch, model, cfg, base, layer_names, dt, a.hf_batch)
        stages[f"transformers_{name}_s"] = time.perf_counter() - t
        print(f"transformers {name}: {stages[f'transformers_{name}_s']:.1f} s", flush=True)
    del model

    pairs = [("moetrace fp32", "transformers fp32"), ("moetrace bf16", "moetrace fp32"),
             ("transformers bf16", "transformers fp32"), ("moetrace bf16", "transformers bf16"),
             ("moetrace fp16", "moetrace fp32"), ("moetrace mixed", "moetrace fp32"),
             ("moetrace mixed", "transformers fp32"), ("moetrace faithful", "moetrace fp32"),
             ("moetrace faithful", "transformers fp32")]
    results = []
    for x, y in pairs:
        if x in routes and y in routes:
            results.append({"pair": f"{x} vs {y}", **compare(routes[x], routes[y], layer_names)})
    n_tl = results[0]["token_layers"] if results else 0
    print(f"\ntop-1 agreement over {len(base)} samples, {n_tl:,} token-layers ({a.device})")
    print(f"| {'pair':<40} | {'top-1 agreement':>15} | {'max |logit diff|':>16} |")
    print(f"|{'-' * 42}|{'-' * 16}:|{'-' * 17}:|")
    for r in results:
        print(f"| {r['pair']:<40} | {100 * r['top1_agreement']:>14.3f}% | {r['max_logit_diff']:>16.4g} |")

    per_layer = {}
    others = [p for p in ("bf16", "fp16", "mixed", "faithful") if p in a.precisions]
    if others:
        print("\nper MoE layer, vs moetrace fp32: top-1 agreement / max |logit diff|")
        print(f"| {'layer':<8} | " + " | ".join(f"{p + ' top-1':>12} | {p + ' max diff':>15}" for p in others) + " |")
        print("|" + "-" * 10 + "|" + "|".join("-" * 13 + ":|" + "-" * 16 + ":" for _ in others) + "|")
        for name in layer_names:
            cells = []
            for p in others:
                r = next(r for r in results if r["pair"] == f"moetrace {p} vs moetrace fp32")["per_layer"][name]
                cells.append(f"{100 * r['top1_agreement']:>11.3f}% | {r['max_logit_diff']:>15.4g}")
                per_layer.setdefault(name, {})[p] = r
            print(f"| {name:<8} | " + " | ".join(cells) + " |")

    print("\ncollect runs (tokens/s: the manifest's throughput, model load and audit excluded)")
    for p, r in runs.items():
        fid = r["fidelity"] or {}
        audit = (f"audit {100 * fid['total']['top1_agreement']:.3f}% top-1 vs fp32 over {fid['samples']} samples"
                 if fid.get("status") == "measured" else
                 f"audit {fid.get('status', 'off')}" + (f" ({fid['reason']})" if fid.get("reason") else ""))
        print(f"  {p:<8} {r['tokens_per_s']:>12,.0f} tokens/s  {audit}")

    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(torch, a.device), "device": a.device, "command": [sys.executable, *sys.argv],
           "model": {"experts": a.experts, "layers": a.layers, "sparse_layers": n_sparse, "d_model": a.d_model,
                     "d_ff": a.d_ff, "heads": a.heads, "d_kv": a.d_kv, "capacity": a.capacity, "seed": a.seed,
                     "parameters": n_params, "init": "transformers (own random initialization), rounded to bf16"},
           "samples": len(base), "token_layers": n_tl, "pairs": results, "per_layer_vs_moetrace_fp32": per_layer,
           "collect": runs, "stages_s": stages}
    path = a.json or os.path.join(a.work, "fidelity.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
