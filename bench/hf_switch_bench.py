#!/usr/bin/env python3
"""Hugging Face transformers baseline for the GPU engine's benchmark (docs/PERFORMANCE.md, GPU).

Runs a switch-base-128-shaped encoder with random bf16 weights through transformers on the GPU and
reports tokens/s with the router outputs copied to the host, in two ways:

  hf-stock     transformers as installed (5.x): tokens are flattened before the router, so the
               per-sequence capacity never applies and router_logits is not the real logits
               (SWITCH_SPEC.md). Fast but wrong; shown for reference.
  hf-faithful  the sparse layer patched back to the transformers 4.x semantics of SWITCH_SPEC.md:
               float32 router logits [B,S,E], softmax, top-1, per-sequence capacity in position
               order, gate; HF 4.x's loop over the experts. Logits (fp16) and experts go to the host.

Shapes: 1x128 (the seed's one-sample-at-a-time way), 32x256, 128x256, and the real-text mix
(--mix file written by --write-mix: sst2 + ag_news test texts tokenized with the T5 SentencePiece
model, one sample per line as space-separated ids ending in eos=1), batched 128 at a time after
sorting by length. Also writes that mix file for bench_gpu, so both read the same samples.
"""
import argparse
import csv
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_mix(path, n_samples):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(ROOT, "tests/data/t5-spiece/spiece.model"))
    texts = []
    with open(os.path.join(ROOT, "tests/data/sst2_stsa/stsa.binary.test"), encoding="utf-8") as f:
        for line in f:
            texts.append(line.strip()[2:])
    with open(os.path.join(ROOT, "tests/data/ag_news/test.csv"), encoding="utf-8") as f:
        for row in csv.reader(f):
            texts.append(row[1] + " " + row[2])
    # Interleave the two sources so the mix holds both short reviews and longer news.
    half = n_samples // 2
    chosen = texts[:half] + texts[1821:1821 + (n_samples - half)]
    with open(path, "w") as f:
        for t in chosen:
            ids = sp.encode(t)[:511] + [1]
            f.write(" ".join(map(str, ids)) + "\n")
    return chosen


def read_mix(path):
    with open(path) as f:
        return [[int(x) for x in line.split()] for line in f if line.strip()]


def build_model(torch, n_experts, dtype):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers import modeling_switch_transformers as m

    cfg = SwitchTransformersConfig(num_experts=n_experts, d_model=768, d_ff=3072, d_kv=64, num_heads=12,
                                   num_layers=12, num_sparse_encoder_layers=6, num_decoder_layers=12,
                                   num_sparse_decoder_layers=6, expert_capacity=64, router_dtype="float32")
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device("cuda"):
        model = m.SwitchTransformersEncoderModel(cfg)
    torch.set_default_dtype(prev)
    model.eval()
    # Random weights at a sane scale (the default init is fine, but make the router fp32 as 4.x).
    for mod in model.modules():
        if type(mod).__name__.endswith("Top1Router"):
            mod.classifier.to(torch.float32)
    return model, cfg, m


def sparse_modules(model):
    return [mod for mod in model.modules() if type(mod).__name__.endswith("SparseMLP")]


def expert_weights(torch, mlp, E):
    """Per-expert (wi [d_ff, d], wo [d, d_ff]) whatever 5.x calls them."""
    ex = mlp.experts
    if hasattr(ex, "expert_0") or (hasattr(ex, "keys") and "expert_0" in ex.keys()):
        return [(ex[f"expert_{j}"].wi.weight, ex[f"expert_{j}"].wo.weight) for j in range(E)]
    params = dict(ex.named_parameters())
    three_d = [p for p in params.values() if p.dim() == 3 and p.shape[0] == E]
    if len(three_d) >= 2:
        a, b = three_d[0], three_d[1]
        d_ff = max(a.shape[1], a.shape[2])
        wi = a if a.shape[1] == d_ff else a.transpose(1, 2)
        wo = b if b.shape[2] == d_ff else b.transpose(1, 2)
        return [(wi[j], wo[j]) for j in range(E)]
    raise RuntimeError("unknown expert layout: " + ", ".join(f"{k}{tuple(v.shape)}" for k, v in params.items()))


def patch_faithful(torch, model, cfg, capture):
    """Replaces every sparse layer's forward with the 4.x semantics (SWITCH_SPEC.md)."""
    import torch.nn.functional as F

    E, cap = cfg.num_experts, cfg.expert_capacity
    for mlp in sparse_modules(model):
        orig = mlp.forward
        param = next(model.parameters())
        x = torch.randn(1, 3, cfg.d_model, device=param.device, dtype=param.dtype)
        returns_tuple = isinstance(orig(x), tuple)
        wr = mlp.router.classifier.weight.float()
        experts = expert_weights(torch, mlp, E)

        def forward(hidden_states, *args, _wr=wr, _experts=experts, _tuple=returns_tuple, **kw):
            B, S, d = hidden_states.shape
            logits = F.linear(hidden_states.float(), _wr)  # [B,S,E] float32
            probs = torch.softmax(logits, dim=-1).to(hidden_states.dtype)
            top1 = probs.argmax(dim=-1)
            gate = probs.max(dim=-1).values
            onehot = F.one_hot(top1, E)
            kept = (torch.cumsum(onehot, dim=1) * onehot).sum(-1) <= cap  # per sequence, position order
            mask = onehot.bool() & kept[..., None]
            nxt = torch.zeros_like(hidden_states)
            for e in torch.nonzero(mask.reshape(-1, E).sum(0), as_tuple=True)[0].tolist():  # HF 4.x loop
                sel = mask[:, :, e]
                wi, wo = _experts[e]
                nxt[sel] = F.linear(F.relu(F.linear(hidden_states[sel], wi)), wo)
            capture.append((logits, top1, kept))
            out = gate[..., None] * nxt
            return (out, (logits, top1)) if _tuple else out

        mlp.forward = forward


def batches_fixed(torch, B, S, n_iter, vocab=32128):
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(2, vocab, (B, S), device="cuda", generator=g)
    mask = torch.ones(B, S, dtype=torch.long, device="cuda")
    return [(ids, mask, B * S)] * n_iter


def batches_mix(torch, samples, batch):
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    out = []
    for i in range(0, len(order), batch):
        chunk = [samples[j] for j in order[i:i + batch]]
        S = max(len(c) for c in chunk)
        ids = torch.zeros(len(chunk), S, dtype=torch.long)
        mask = torch.zeros(len(chunk), S, dtype=torch.long)
        for r, c in enumerate(chunk):
            ids[r, :len(c)] = torch.tensor(c)
            mask[r, :len(c)] = 1
        out.append((ids.cuda(), mask.cuda(), sum(len(c) for c in chunk)))
    return out


def run(torch, model, batches, mode, capture, budget_s):
    """Tokens/s over the batches (repeated until budget_s), router outputs to the host each batch."""
    def one(ids, mask):
        capture.clear()
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        if mode == "hf-faithful":
            host = [(l.half().cpu(), t.cpu(), k.cpu()) for l, t, k in capture]
        else:
            rl = getattr(out, "router_probs", None)
            if rl is None:
                rl = getattr(out, "router_logits", None)
            if torch.is_tensor(rl):
                rl = (rl,)
            host = []
            for item in (rl if rl is not None else ()):
                for t in (item if isinstance(item, (tuple, list)) else (item,)):
                    if torch.is_tensor(t):
                        host.append(t.cpu())
        return host

    with torch.inference_mode():
        one(*batches[0][:2])  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = 0
        n = 0
        while True:
            for ids, mask, ntok in batches:
                one(ids, mask)
                tokens += ntok
                n += 1
            torch.cuda.synchronize()
            if time.perf_counter() - t0 > budget_s:
                break
        dt = time.perf_counter() - t0
    return tokens / dt, dt, n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--mix", default="/tmp/moetrace_mix.txt")
    ap.add_argument("--write-mix", action="store_true", help="only write the mix file and exit")
    ap.add_argument("--mix-samples", type=int, default=1700)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--budget", type=float, default=4.0, help="seconds per row")
    ap.add_argument("--rows", default="hf-stock,hf-faithful")
    ap.add_argument("--shapes", default="1x128,32x256,128x256,mix")
    args = ap.parse_args()

    if args.write_mix or not os.path.exists(args.mix):
        write_mix(args.mix, args.mix_samples)
        print(f"wrote {args.mix}")
        if args.write_mix:
            return

    import torch
    import transformers

    model, cfg, _ = build_model(torch, args.experts, torch.bfloat16)
    capture = []
    results = []
    samples = read_mix(args.mix)
    print(f"torch {torch.__version__} transformers {transformers.__version__} on {torch.cuda.get_device_name()}")
    print(f"{'row':<12} {'shape':<9} {'tokens/s':>12} {'batches':>8} {'seconds':>8}")
    for mode in args.rows.split(","):
        if mode == "hf-faithful":
            patch_faithful(torch, model, cfg, capture)
        for shape in args.shapes.split(","):
            if shape == "mix":
                batches = batches_mix(torch, samples, 128)
            else:
                B, S = map(int, shape.split("x"))
                batches = batches_fixed(torch, B, S, 1)
            tps, dt, n = run(torch, model, batches, mode, capture, args.budget)
            results.append({"row": mode, "shape": shape, "tokens_per_s": tps, "batches": n, "seconds": dt})
            print(f"{mode:<12} {shape:<9} {tps:>12,.0f} {n:>8} {dt:>8.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                       "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "transformers": transformers.__version__, "experts": args.experts,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
