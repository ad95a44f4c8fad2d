#!/usr/bin/env python3
"""Where does a low-precision GPU pass lose Switch routing? (issue #18's layer-by-layer measurement)

Emulates the numerics of moetrace's CUDA engine in PyTorch (fp32 residual stream, norms, softmaxes and
router GEMM; GEMM operands rounded to the activation dtype with fp32 accumulation; outputs rounded where
the engine stores them in the activation dtype) with every rounding point switchable:

  h    the RMS-norm output, operand of the q/k/v and FFN-in GEMMs
  qkv  q, k, v as the attention reads them
  p    the attention probabilities (operand of P·V)
  ctx  the attention output (operand of the o-projection)
  ffn  the FFN's ReLU output (operand of the FFN-out GEMM)
  route  the router probabilities before the top-1 argmax (SWITCH_SPEC.md: the activation dtype)

and each point's rounding chosen among bf16, fp16, tf32, "split" (a bf16 pair hi + lo: what two bf16
GEMMs over the same bf16 weights compute) and "pair16" (an fp16 pair: --precision faithful's p and
ctx). Weights are HF-init random at switch-base-N's shape, rounded to bf16 (so every variant sees the same weights, exactly representable in bf16 and fp16). Token ids are
real: the samples of a trace store (`moetrace collect --model demo ...` makes one from the bundled rows
in seconds on a CPU). With `--model DIR` the weights are those of a saved Switch checkpoint instead
(config.json + *.safetensors with transformers' tensor names, e.g. the model bench/fidelity.py saves):
then the emulation runs on exactly the weights whose agreement fidelity.py reports.

Prints top-1 agreement of each variant with the all-fp32 pass, per MoE layer, and writes JSON with the
date and machine. Needs PyTorch (a GPU for switch-base-128's size; `--experts 8 --layers 4` runs on a CPU).

    python bench/rounding_points.py STORE --out rounding.json [--experts 128] [--samples 600]
    python bench/rounding_points.py STORE --model /tmp/moetrace_fidelity/model --variants points
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

POINTS = ("h", "qkv", "p", "ctx", "ffn")


def variant(kind: str | None, route: str | None = None, **points: str) -> dict:
    """Every GEMM-operand point rounded to `kind` (None: fp32), overridden per point; `route` rounds the
    router probabilities before the argmax."""
    d = {p: kind for p in POINTS if kind}
    d.update(points)
    d = {p: k for p, k in d.items() if k is not None}  # a point overridden with None stays fp32
    if route:
        d["route"] = route
    return d


VARIANTS = {
    "fp32": variant(None),
    "bf16 (moetrace --precision bf16)": variant("bf16", route="bf16"),
    "bf16 operands, fp32 route": variant("bf16"),
    "bf16 operands, split h, fp32 route": variant("bf16", h="split"),
    "bf16 operands, split h+ffn, fp32 route": variant("bf16", h="split", ffn="split"),
    "fp16 (moetrace --precision fp16)": variant("fp16", route="fp16"),
    "fp16 operands, fp32 route (mixed)": variant("fp16"),
    "tf32 operands, fp32 route": variant("tf32"),
    "split bf16x2 operands, fp32 route": variant("split"),
    "fp32 operands, bf16 route": variant(None, route="bf16"),
}

# `--variants points`: what each single rounding point costs `mixed` (fp16 operands, fp32 route): that
# point left in fp32, and that point as a bf16 pair (16 significant bits, what a second GEMM buys).
POINT_VARIANTS = {"fp32": variant(None), "fp16 operands, fp32 route (mixed)": variant("fp16")}
for _p in POINTS:
    POINT_VARIANTS[f"mixed, {_p} in fp32"] = variant("fp16", **{_p: None})
    POINT_VARIANTS[f"mixed, {_p} as a bf16 pair"] = variant("fp16", **{_p: "split"})
# `--variants faithful`: --precision faithful (mixed with the attention's probabilities and output as
# fp16 pairs), its two pairs apart, and what a pair for the norm output would add. Also in `points`.
FAITHFUL_VARIANTS = {
    "fp32": variant(None),
    "fp16 operands, fp32 route (mixed)": variant("fp16"),
    "faithful (mixed, p + ctx as fp16 pairs)": variant("fp16", p="pair16", ctx="pair16"),
    "mixed, ctx as an fp16 pair": variant("fp16", ctx="pair16"),
    "mixed, p as an fp16 pair": variant("fp16", p="pair16"),
    "faithful + h as an fp16 pair": variant("fp16", p="pair16", ctx="pair16", h="pair16"),
}
POINT_VARIANTS.update({k: v for k, v in FAITHFUL_VARIANTS.items() if k not in POINT_VARIANTS})
# `--variants h`: the norm output's pair by consumer (what each costs: the q/k/v GEMM is 3/16 of a
# dense+sparse block pair's GEMM work at switch-base's shape, a dense FFN's first GEMM 4/16, an
# expert's first GEMM 4/16 plus its gather).
H_VARIANTS = {
    "fp32": variant(None),
    "fp16 operands, fp32 route (mixed)": variant("fp16"),
    "mixed, h as an fp16 pair": variant("fp16", h="pair16"),
    "mixed, h_attn pair (q/k/v operand)": variant("fp16", h_attn="pair16"),
    "mixed, h_dense pair (dense FFN in)": variant("fp16", h_dense="pair16"),
    "mixed, h_expert pair (expert FFN in)": variant("fp16", h_expert="pair16"),
    "mixed, h_attn + h_dense pairs (cuBLAS)": variant("fp16", h_attn="pair16", h_dense="pair16"),
}

# `--variants mixed`: fp32 and mixed alone, for mixed's spread over weight draws (fidelity.py --seed N).
MIXED_VARIANTS = {k: FAITHFUL_VARIANTS[k] for k in ("fp32", "fp16 operands, fp32 route (mixed)")}
# `--variants depth`: mixed with h's pair in some encoder blocks only (a pair's cost is paid per block):
# "blocks" [lo, hi) of the 12 takes the pair, the others mixed's fp16 h.
DEPTH_VARIANTS = {
    "fp32": variant(None),
    "mixed, h pair in every block": dict(variant("fp16"), pair_blocks=(0, 1 << 30)),
    "mixed, h pair in blocks 0-5": dict(variant("fp16"), pair_blocks=(0, 6)),
    "mixed, h pair in blocks 6-11": dict(variant("fp16"), pair_blocks=(6, 12)),
    "mixed, h pair in blocks 10-11": dict(variant("fp16"), pair_blocks=(10, 12)),
    "mixed, h pair in blocks 0-2": dict(variant("fp16"), pair_blocks=(0, 3)),
    "mixed, h pair in blocks 0-1": dict(variant("fp16"), pair_blocks=(0, 2)),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", help="a trace store whose token ids to use (its model does not matter)")
    ap.add_argument("--out", default="rounding_points.json")
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12, help="encoder blocks (every odd one sparse)")
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    ap.add_argument("--model", default=None,
                    help="a saved Switch checkpoint (config.json + safetensors) to take the weights from "
                         "instead of the HF-init random ones (--experts/--layers/--seed are then unused)")
    ap.add_argument("--variants", choices=("all", "points", "faithful", "h", "mixed", "depth"), default="all",
                    help="all: the table of docs/PERFORMANCE.md; points: mixed with one rounding point at a "
                         "time in fp32 or as a bf16 pair, and faithful's; faithful: mixed, faithful and "
                         "its pairs apart; h: the norm output's pair by consumer; mixed: fp32 and mixed "
                         "only (the spread over weight draws); depth: h's pair in some blocks only")
    a = ap.parse_args(argv)
    variants = {"all": VARIANTS, "points": POINT_VARIANTS, "faithful": FAITHFUL_VARIANTS,
                "h": H_VARIANTS, "mixed": MIXED_VARIANTS, "depth": DEPTH_VARIANTS}[a.variants]

    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import moetrace

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    store = moetrace.open_store(a.store)
    seqs = [np.asarray(store.sample(i).token_ids, np.int64) for i in range(min(a.samples, len(store)))]
    model = Model.from_checkpoint(a.model, dev, torch) if a.model else Model(a.experts, a.layers, a.seed, dev, torch)

    results, timing = {}, {}
    for name, rounding in variants.items():
        t0 = time.time()
        results[name] = run_batches(model, seqs, rounding, dev, torch)
        timing[name] = time.time() - t0
    ref = results["fp32"]
    names = [f"enc.{i}" for i, b in enumerate(model.blocks) if "router" in b]
    check = store_agreement(store, len(seqs), names, ref[0]) if a.model else None
    table = {}
    n_layers = len(ref[0])
    print(f"{'variant':42s} {'top-1 vs fp32':>13s}  per MoE layer (in block order)")
    for name in variants:
        experts, logits = results[name]
        agree = [float((experts[l] == ref[0][l]).float().mean()) for l in range(n_layers)]
        err = [float((logits[l] - ref[1][l]).abs().max()) for l in range(n_layers)]
        total = sum(int((experts[l] == ref[0][l]).sum()) for l in range(n_layers)) / sum(
            int(x.numel()) for x in ref[0])
        table[name] = {"rounding": rounding, "top1_agreement": total, "per_layer_top1": agree,
                       "per_layer_max_abs_logit_error": err, "seconds": timing[name]}
        print(f"{name:42s} {100 * total:12.3f}%  " + " ".join(f"{100 * x:6.2f}" for x in agree))
    if check is not None:
        # The store was collected from the same weights: the emulation's fp32 pass must route as it did.
        print(f"emulation fp32 vs the store's own routing: {100 * check:.3f}% top-1 (the emulation's check)")
    tokens = sum(len(s) for s in seqs)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": platform.node(), "device": torch.cuda.get_device_name() if dev.startswith("cuda") else dev,
           "torch": torch.__version__, "experts": model.E, "layers": len(model.blocks),
           "weights": a.model or f"HF-init random, seed {a.seed}", "samples": len(seqs),
           "fp32_vs_store_top1": check, "tokens": tokens, "token_layers": tokens * n_layers, "variants": table}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"{len(seqs)} samples, {tokens} tokens x {n_layers} MoE layers; JSON: {a.out}")
    return 0


class Model:
    """switch-base-N's encoder with HF-init random weights (transformers' _init_weights scales), bf16-exact,
    or (from_checkpoint) a saved checkpoint's encoder."""

    def __init__(self, experts, layers, seed, dev, torch):
        self.torch, self.E, self.d, self.F, self.H, self.dk = torch, experts, 768, 3072, 12, 64
        self.eps, self.capacity, self.buckets, self.max_distance = 1e-6, 64, 32, 128
        d, F, H, dk = self.d, self.F, self.H, self.dk
        g = torch.Generator(device=dev).manual_seed(seed)

        def w(shape, std):
            return (torch.randn(*shape, generator=g, device=dev) * std).bfloat16().float()

        self.emb = w((32128, d), 1.0)
        self.rel = w((32, H), d ** -0.5)
        self.blocks = []
        for i in range(layers):
            b = {"q": w((H * dk, d), (d * dk) ** -0.5), "k": w((H * dk, d), d ** -0.5),
                 "v": w((H * dk, d), d ** -0.5), "o": w((d, H * dk), (H * dk) ** -0.5),
                 "ln_attn": torch.ones(d, device=dev), "ln_ff": torch.ones(d, device=dev)}
            if i % 2 == 1:
                b["router"] = w((experts, d), 1.0)
                b["wi"] = w((experts, F, d), d ** -0.5).bfloat16()  # stored bf16: fp32 copies would not fit
                # transformers initializes an expert's wo with d_model^-0.5 (a dense block's with
                # d_ff^-0.5): experts add twice as much to the residual stream at switch-base's shape.
                b["wo"] = w((experts, d, F), d ** -0.5).bfloat16()
            else:
                b["wi"], b["wo"] = w((F, d), d ** -0.5), w((d, F), F ** -0.5)
            self.blocks.append(b)

    @classmethod
    def from_checkpoint(cls, path, dev, torch):
        """The encoder of a Switch checkpoint directory: config.json and every *.safetensors in it, with
        transformers' names (4.x `DenseReluDense` or 5.x `mlp`; experts as `experts.expert_{e}.wi/wo`)."""
        from safetensors import safe_open

        path = Path(path)
        cfg = json.loads((path / "config.json").read_text())
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise SystemExit(f"rounding_points.py: {path}: no *.safetensors (expected a saved Switch checkpoint)")
        raw = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    if name.startswith("encoder.") or name == "shared.weight":
                        raw[name] = st.get_tensor(name)

        def get(name, dtype=torch.float32):
            if name not in raw:
                raise SystemExit(f"rounding_points.py: {path}: tensor {name} missing")
            return raw[name].to(dev, dtype)

        m = cls.__new__(cls)
        m.torch, m.E = torch, int(cfg.get("num_experts", 8))
        m.d, m.F, m.H, m.dk = (int(cfg[k]) for k in ("d_model", "d_ff", "num_heads", "d_kv"))
        m.eps, m.capacity = float(cfg.get("layer_norm_epsilon", 1e-6)), int(cfg.get("expert_capacity", 64))
        m.emb = get("shared.weight")
        m.rel = get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        m.buckets = int(cfg.get("relative_attention_num_buckets", 32))
        m.max_distance = int(cfg.get("relative_attention_max_distance", 128))
        m.blocks = []
        for i in range(int(cfg["num_layers"])):
            p = f"encoder.block.{i}.layer."
            b = {n: get(f"{p}0.SelfAttention.{n}.weight") for n in "qkvo"}
            b["ln_attn"], b["ln_ff"] = get(f"{p}0.layer_norm.weight"), get(f"{p}1.layer_norm.weight")
            if f"{p}1.mlp.router.classifier.weight" in raw:
                b["router"] = get(f"{p}1.mlp.router.classifier.weight")
                b["wi"] = torch.stack([get(f"{p}1.mlp.experts.expert_{e}.wi.weight", torch.bfloat16)
                                       for e in range(m.E)])
                b["wo"] = torch.stack([get(f"{p}1.mlp.experts.expert_{e}.wo.weight", torch.bfloat16)
                                       for e in range(m.E)])
            else:
                ff = next((f"{p}1.{n}." for n in ("mlp", "DenseReluDense") if f"{p}1.{n}.wi.weight" in raw), None)
                if ff is None:
                    raise SystemExit(f"rounding_points.py: {path}: no dense FFN (wi/wo) in encoder block {i}")
                b["wi"], b["wo"] = get(ff + "wi.weight"), get(ff + "wo.weight")
            m.blocks.append(b)
        return m


def store_agreement(store, n, names, ref_experts) -> float:
    """Top-1 agreement of the emulation's fp32 experts (run_batches' order: samples by length) with the
    experts the store holds for its first n samples, over every token and MoE layer."""
    order = sorted(range(n), key=lambda i: len(store.sample(i).token_ids))
    same = total = 0
    for name, ref in zip(names, ref_experts):
        got = ref.cpu().numpy()
        stored = np.concatenate([np.asarray(store.sample(i).layer(name).expert, np.int64) for i in order])
        same += int((stored == got).sum())
        total += len(stored)
    return same / total


def rounder(kind, torch):
    if kind == "bf16":
        return lambda x: x.bfloat16().float()
    if kind == "fp16":
        return lambda x: x.half().float()
    if kind == "tf32":  # round to nearest even at 10 mantissa bits
        def tf32(x):
            i = x.contiguous().view(torch.int32)
            return ((i + 0x0FFF + ((i >> 13) & 1)) & ~0x1FFF).view(torch.float32)
        return tf32
    if kind == "pair16":  # an fp16 pair hi + lo: what --precision faithful keeps (~22 bits)
        def pair16(x):
            hi = x.half().float()
            return hi + (x - hi).half().float()
        return pair16
    if kind == "split":
        def split(x):
            hi = x.bfloat16().float()
            return hi + (x - hi).bfloat16().float()
        return split
    raise ValueError(kind)


def bucket(rp, torch, num_buckets=32, max_distance=128):
    """Relative position bucket (SWITCH_SPEC.md), bidirectional, of rp = key - query."""
    nb = num_buckets // 2
    n = rp.abs()
    exact = nb // 2
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (nb - exact)).long()
    return (rp > 0).long() * nb + torch.where(n < exact, n, large.clamp(max=nb - 1))


def forward(m: Model, ids, mask, rounding):
    torch = m.torch
    rounding = dict(rounding)
    lo, hi = rounding.pop("pair_blocks", (0, 0))  # blocks whose h is an fp16 pair (depth variants)
    r = {p: rounder(k, torch) for p, k in rounding.items()}
    pair = rounder("pair16", torch)
    R = lambda p, x: r[p](x) if p in r else x
    # The norm output by consumer (h_attn: the q/k/v GEMM's operand, h_dense / h_expert: a dense or
    # an expert FFN's first GEMM's); each defaults to h's rounding.
    Rh = lambda p, x: pair(x) if lo <= i < hi else r[p](x) if p in r else R("h", x)
    B, S = ids.shape
    H, dk, d, E = m.H, m.dk, m.d, m.E
    X = m.emb[ids]
    pos = torch.arange(S, device=ids.device)
    bias = m.rel[bucket(pos[None, :] - pos[:, None], torch, m.buckets, m.max_distance)].permute(2, 0, 1)[None]
    neg = torch.where(mask[:, None, None, :] > 0, 0.0, torch.finfo(torch.float32).min)
    norm = lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps))
    out = []
    for i, b in enumerate(m.blocks):
        h = Rh("h_attn", norm(X, b["ln_attn"]))
        q, k, v = (R("qkv", h @ b[n].T).view(B, S, H, dk).transpose(1, 2) for n in "qkv")
        p = R("p", torch.softmax(q @ k.transpose(-1, -2) + bias + neg, -1))
        X = X + R("ctx", (p @ v).transpose(1, 2).reshape(B, S, H * dk)) @ b["o"].T
        hf = norm(X, b["ln_ff"])
        h = Rh("h_expert" if "router" in b else "h_dense", hf)
        if "router" not in b:
            X = X + R("ffn", torch.relu(h @ b["wi"].T)) @ b["wo"].T
            continue
        logits = hf @ b["router"].T  # fp32 router on the fp32 norm output
        probs = R("route", torch.softmax(logits, -1))
        expert = probs.argmax(-1)  # the first maximum: lowest index on ties
        gate = probs.gather(-1, expert[..., None])[..., 0]
        onehot = torch.nn.functional.one_hot(expert, E)
        kept = (onehot.cumsum(1) * onehot).sum(-1) <= m.capacity  # per-sequence capacity, position order
        out.append((expert, logits))
        Xf, hh = X.reshape(B * S, d), h.reshape(B * S, d)
        ef, kf, gf = expert.reshape(-1), kept.reshape(-1), gate.reshape(-1)
        for e in range(E):
            idx = ((ef == e) & kf).nonzero()[:, 0]
            if idx.numel():
                y = R("ffn", torch.relu(hh[idx] @ b["wi"][e].float().T)) @ b["wo"][e].float().T
                Xf[idx] += gf[idx, None] * y
        X = Xf.view(B, S, d)
    return out


def run_batches(m: Model, seqs, rounding, dev, torch, batch=100):
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    experts, logits = [], []
    for c in range(0, len(order), batch):
        part = order[c:c + batch]
        S = max(len(seqs[i]) for i in part)
        ids = torch.zeros(len(part), S, dtype=torch.long, device=dev)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(part):
            ids[j, :len(seqs[i])] = torch.from_numpy(seqs[i])
            mask[j, :len(seqs[i])] = 1
        with torch.no_grad():
            o = forward(m, ids, mask, rounding)
        experts.append([x[0][mask > 0] for x in o])
        logits.append([x[1][mask > 0] for x in o])
    n = len(experts[0])
    return ([torch.cat([p[l] for p in experts]) for l in range(n)],
            [torch.cat([p[l] for p in logits]) for l in range(n)])


if __name__ == "__main__":
    sys.exit(main())
