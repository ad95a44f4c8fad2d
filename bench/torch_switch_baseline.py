#!/usr/bin/env python3
"""The strong PyTorch baseline of the Switch encoder (issue 19; docs/GPU.md "Baselines").

What a skilled PyTorch user writes in a day for the switch-base-128 encoder with the routing of
../shared/SWITCH_SPEC.md (transformers 4.x semantics), in bf16 with random weights:
  * T5 blocks: RMS norm (mean of squares in fp32), fused q/k/v projection, SDPA with the relative
    position bias plus the padding mask as attn_mask and scale 1 (T5 does not scale), ReLU FFN;
    every second block sparse (1, 3, 5, ...).
  * the router in fp32 (logits = fp32(h) @ fp32(Wr)^T, fp32 matmul precision "highest": no TF32),
    softmax, probabilities rounded to the activation dtype, top-1 (argmax: ties to the lowest index),
    per-sequence capacity in position order (cumulative one-hot count <= capacity), gate = max prob;
  * the experts: tokens sorted by expert (stable argsort), one torch._grouped_mm per expert matrix
    (offs = cumulative tokens per expert, int32), un-sorted by index_copy; dropped tokens are computed
    with their expert and zeroed (no host sync, static shapes: what torch.compile needs). Without a
    working torch._grouped_mm: a loop of matmuls over the experts (offsets to the host), said in the
    table.
  * per batch, the router logits (fp16) [L,B,S,E], the top-1 experts (int32) and the kept flags go to
    pinned host memory (non_blocking, one synchronization per batch), as moetrace's capture does.
Rows: eager, and torch.compile of the two block functions (dense, sparse; weights are arguments, so
one graph serves every block of its kind); a row that cannot run says why in the table.

Workloads (--shapes): BxS with random ids, and `mix`: the real-text mix of bench_gpu and
bench/hf_switch_bench.py (the file --mix, written by `hf_switch_bench.py --write-mix` from the
bundled sst2 and ag_news rows tokenized with tests/data/t5-spiece/spiece.model; 1,700 samples of
5..512 tokens by default), sorted by length and batched 128 at a time, each batch padded to its
longest sample. tokens/s counts computed positions (B x S), real tokens/s the unpadded ones.

Faithfulness (--check, on by default, before timing): a tiny Switch encoder of transformers
(SwitchTransformersEncoderModel with its sparse layer patched back to the 4.x semantics by
bench/hf_switch_bench.py's patch_faithful) and this implementation with the same weights, in fp32
on --device, padded batches and a capacity small enough to drop tokens: top-1 experts and kept flags
must be identical at every position, router logits and the final hidden state within 1e-4 relative;
for each row (eager, compiled). The expert path in fp32 uses torch._grouped_mm where it runs in fp32,
the loop otherwise (the probe checks torch._grouped_mm against the loop in the benchmark's dtype).
The script stops with an error when the check fails.

Timing: warm-up passes, then --repeats passes, CUDA events on cuda (time.perf_counter on cpu), the
median is reported (bench/torch_bench_util.py).

  /work/venv-torch/bin/python bench/torch_switch_baseline.py --tiny          # CPU smoke run, seconds
  python3 bench/torch_switch_baseline.py --device cuda --json $OUT/torch_switch.json
  python3 bench/torch_switch_baseline.py --device cuda --shapes 128x256 --rows compiled --repeats 20
"""
from __future__ import annotations

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import torch_bench_util as U  # noqa: E402

ROWS = ("eager", "compiled")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("model (switch-base-128 shape by default)")
    g.add_argument("--experts", type=int, default=128)
    g.add_argument("--layers", type=int, default=12, help="encoder blocks; every second one is sparse")
    g.add_argument("--d-model", type=int, default=768)
    g.add_argument("--d-ff", type=int, default=3072)
    g.add_argument("--heads", type=int, default=12)
    g.add_argument("--d-kv", type=int, default=64)
    g.add_argument("--capacity", type=int, default=64, help="expert capacity per sequence")
    g.add_argument("--vocab", type=int, default=32128)
    g.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    g = ap.add_argument_group("run")
    g.add_argument("--device", default="cuda")
    g.add_argument("--rows", default=",".join(ROWS), help="eager,compiled")
    g.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled row")
    g.add_argument("--shapes", default="128x256,32x256,mix", help="BxS with random ids, or mix")
    g.add_argument("--mix", default="/tmp/moetrace_mix.txt", help="the mix file (written if absent)")
    g.add_argument("--mix-samples", type=int, default=1700)
    g.add_argument("--mix-batch", type=int, default=128)
    g.add_argument("--warmup", type=int, default=2, help="warm-up passes (the compiled row compiles here)")
    g.add_argument("--repeats", type=int, default=10, help="timed passes; the median is reported")
    g.add_argument("--no-check", action="store_true", help="skip the faithfulness check")
    g.add_argument("--tiny", action="store_true",
                   help="a tiny shape for a CPU smoke run (d 64, 4 blocks, 8 experts, shapes 4x32,mix "
                        "with 24 samples)")
    g.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if a.tiny:
        a.experts, a.layers, a.d_model, a.d_ff, a.heads, a.d_kv, a.capacity = 8, 4, 64, 256, 4, 16, 8
        if a.shapes == ap.get_default("shapes"):
            a.shapes = "4x32,mix"
        a.mix_samples, a.mix_batch = 24, 8
        a.repeats = min(a.repeats, 3)
        a.warmup = min(a.warmup, 2)
        if a.mix == ap.get_default("mix"):
            a.mix = "/tmp/moetrace_mix_tiny.txt"
    a.rows = [r for r in a.rows.split(",") if r]
    bad = [r for r in a.rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: expected a list of {', '.join(ROWS)}, got {bad}")
    if a.layers < 2 or a.experts < 1 or a.repeats < 1:
        ap.error("--layers >= 2, --experts >= 1, --repeats >= 1 expected")
    return a


# --- the model --------------------------------------------------------------------------------------


class Cfg:
    def __init__(self, a=None, **kw):
        src = dict(experts=8, layers=4, d_model=64, d_ff=256, heads=4, d_kv=16, capacity=8, vocab=32128)
        if a is not None:
            src.update({k: getattr(a, k) for k in src})
        src.update(kw)
        self.__dict__.update(src)
        self.num_buckets, self.max_distance, self.eps = 32, 128, 1e-6

    def sparse(self, i):  # SWITCH_SPEC.md: step 2 -> blocks 1, 3, 5, ...
        return i % 2 == 1


def random_weights(torch, c, device, dtype, seed=42):
    """Random weights at the scales bench_gpu uses (src/model/cuda/hf_init_weights.h): every matrix
    uniform with std 1/sqrt(fan_in), q at (d*d_kv)^-1/2, relative bias d^-1/2, embedding 1, norms 1;
    the router fp32, the experts as [E, out, in] (nn.Linear's layout)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def u(shape, std, dt=dtype):
        a = std * math.sqrt(3.0)
        return (torch.rand(shape, generator=g, device=device, dtype=torch.float32) * (2 * a) - a).to(dt)

    d, inner, F, E = c.d_model, c.heads * c.d_kv, c.d_ff, c.experts
    sd, si, sf = d ** -0.5, inner ** -0.5, F ** -0.5
    w = {"embed": u((c.vocab, d), 1.0), "rel_bias": u((c.num_buckets, c.heads), sd, torch.float32),
         "final_norm": torch.ones(d, device=device, dtype=dtype), "blocks": []}
    for i in range(c.layers):
        q = u((inner, d), sd / math.sqrt(c.d_kv))
        b = {"ln0": torch.ones(d, device=device, dtype=dtype), "ln1": torch.ones(d, device=device, dtype=dtype),
             "wqkv": torch.cat([q, u((inner, d), sd), u((inner, d), sd)]), "wo_attn": u((d, inner), si)}
        if c.sparse(i):
            b["router"] = u((E, d), sd, torch.float32)
            b["wi"] = u((E, F, d), sd)
            b["wo"] = u((E, d, F), sf)
        else:
            b["wi"] = u((F, d), sd)
            b["wo"] = u((d, F), sf)
        w["blocks"].append(b)
    return w


def weights_from_hf(torch, model, c, dtype):
    """The same dict from a transformers SwitchTransformersEncoderModel (the faithfulness check)."""
    from hf_switch_bench import expert_weights

    sd = model.state_dict()
    dev = next(model.parameters()).device

    def t(name, dt=dtype):
        return sd[name].detach().to(dev, dt).contiguous()

    w = {"embed": t("shared.weight"),
         "rel_bias": t("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", torch.float32),
         "final_norm": t("encoder.final_layer_norm.weight"), "blocks": []}
    for i, blk in enumerate(model.encoder.block):
        p = f"encoder.block.{i}.layer."
        b = {"ln0": t(p + "0.layer_norm.weight"), "ln1": t(p + "1.layer_norm.weight"),
             "wqkv": torch.cat([t(p + f"0.SelfAttention.{m}.weight") for m in "qkv"]),
             "wo_attn": t(p + "0.SelfAttention.o.weight")}
        if c.sparse(i):
            mlp = blk.layer[1].mlp
            b["router"] = t(p + "1.mlp.router.classifier.weight", torch.float32)
            ex = expert_weights(torch, mlp, c.experts)
            b["wi"] = torch.stack([wi.detach().to(dtype) for wi, _ in ex]).contiguous()
            b["wo"] = torch.stack([wo.detach().to(dtype) for _, wo in ex]).contiguous()
        else:
            b["wi"], b["wo"] = t(p + "1.mlp.wi.weight"), t(p + "1.mlp.wo.weight")
        w["blocks"].append(b)
    return w


def relative_buckets(torch, S, c, device):
    """Bidirectional T5 buckets of key_pos - query_pos, [S, S] (SWITCH_SPEC.md)."""
    pos = torch.arange(S, device=device)
    rp = pos[None, :] - pos[:, None]
    nb = c.num_buckets // 2
    bucket = (rp > 0).long() * nb
    a = rp.abs()
    max_exact = nb // 2
    large = max_exact + (torch.log(a.float().clamp(min=1) / max_exact) / math.log(c.max_distance / max_exact)
                         * (nb - max_exact)).long()
    large = large.clamp(max=nb - 1)
    return bucket + torch.where(a < max_exact, a, large)


def attention_bias(torch, w, c, mask, dtype):
    """Position bias [1,H,S,S] plus the padding mask: [B,H,S,S] in the activation dtype, once per
    batch, the attn_mask of every block's SDPA."""
    S = mask.shape[1]
    pos = w["rel_bias"][relative_buckets(torch, S, c, mask.device)].permute(2, 0, 1)[None]  # [1,H,S,S]
    neg = (1.0 - mask[:, None, None, :].float()) * torch.finfo(dtype).min
    return (pos + neg).to(dtype)


def rms_norm(torch, x, weight, eps):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(var + eps)).to(weight.dtype)


def attention(torch, F, x, b, bias, c):
    B, S, _ = x.shape
    h = rms_norm(torch, x, b["ln0"], c.eps)
    qkv = F.linear(h, b["wqkv"]).view(B, S, 3, c.heads, c.d_kv).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias, scale=1.0)
    return x + F.linear(o.transpose(1, 2).reshape(B, S, c.heads * c.d_kv), b["wo_attn"])


def make_blocks(torch, c, gmm):
    """(dense_block, sparse_block) as plain functions of (x, bias, *weights); gmm(a, b, offs) is
    torch._grouped_mm or the loop fallback."""
    import torch.nn.functional as F

    E, cap = c.experts, c.capacity

    def dense_block(x, bias, ln0, wqkv, wo_attn, ln1, wi, wo):
        x = attention(torch, F, x, dict(ln0=ln0, wqkv=wqkv, wo_attn=wo_attn), bias, c)
        h = rms_norm(torch, x, ln1, c.eps)
        return x + F.linear(F.relu(F.linear(h, wi)), wo)

    def sparse_block(x, bias, ln0, wqkv, wo_attn, ln1, router, wi, wo):
        x = attention(torch, F, x, dict(ln0=ln0, wqkv=wqkv, wo_attn=wo_attn), bias, c)
        h = rms_norm(torch, x, ln1, c.eps)
        B, S, d = h.shape
        logits = F.linear(h.float(), router)  # [B,S,E] fp32
        probs = torch.softmax(logits, dim=-1).to(h.dtype)
        top1 = probs.argmax(dim=-1)  # lowest index on ties
        gate = probs.gather(-1, top1[..., None])
        onehot = F.one_hot(top1, E).to(torch.int32)
        rank = (onehot.cumsum(dim=1) * onehot).sum(-1)  # 1-based position within its expert, per sequence
        kept = rank <= cap
        offs = onehot.sum(dim=(0, 1)).cumsum(0).to(torch.int32)
        order = torch.argsort(top1.reshape(-1), stable=True)
        xs = h.reshape(-1, d)[order]
        ys = gmm(F.relu(gmm(xs, wi.transpose(-2, -1), offs)), wo.transpose(-2, -1), offs)
        y = torch.empty_like(ys).index_copy_(0, order, ys).view(B, S, d)
        y = torch.where(kept[..., None], gate * y, torch.zeros((), dtype=y.dtype, device=y.device))
        return x + y, logits, top1, kept

    return dense_block, sparse_block


class SwitchEncoder:
    def __init__(self, torch, c, w, gmm, compile_mode=None, device=None):
        self.torch, self.c, self.w = torch, c, w
        dense, sparse = make_blocks(torch, c, gmm)
        self.note = "eager"
        if compile_mode is not None:
            cd, note = U.try_compile(torch, dense, compile_mode, device)
            cs, _ = U.try_compile(torch, sparse, compile_mode, device)
            if cd is None or cs is None:
                raise RuntimeError(note)
            dense, sparse = cd, cs
            self.note = note
        self.dense, self.sparse = dense, sparse

    def __call__(self, ids, mask, logits_dtype):
        torch, c, w = self.torch, self.c, self.w
        x = w["embed"][ids]
        bias = attention_bias(torch, w, c, mask, x.dtype)
        logits, top1, kept = [], [], []
        for i, b in enumerate(w["blocks"]):
            if c.sparse(i):
                x, lg, t1, k = self.sparse(x, bias, b["ln0"], b["wqkv"], b["wo_attn"], b["ln1"], b["router"],
                                           b["wi"], b["wo"])
                logits.append(lg.to(logits_dtype))
                top1.append(t1.to(torch.int32))
                kept.append(k)
            else:
                x = self.dense(x, bias, b["ln0"], b["wqkv"], b["wo_attn"], b["ln1"], b["wi"], b["wo"])
        x = rms_norm(torch, x, w["final_norm"], c.eps)
        return x, torch.stack(logits), torch.stack(top1), torch.stack(kept)


class HostCopy:
    """Pinned host buffers per shape; copy() enqueues the non-blocking copies, then synchronizes."""

    def __init__(self, torch, device):
        self.torch, self.device, self.bufs = torch, device, {}

    def copy(self, *tensors):
        torch = self.torch
        key = tuple((t.shape, t.dtype) for t in tensors)
        if key not in self.bufs:
            pin = self.device.type == "cuda"
            self.bufs[key] = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in tensors]
        for dst, src in zip(self.bufs[key], tensors):
            dst.copy_(src, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return self.bufs[key]


# --- the faithfulness check ---------------------------------------------------------------------------


def check_faithful(torch, device, gmm_note, rows, compile_mode):
    """This implementation vs transformers patched to the 4.x semantics, tiny shape, fp32."""
    import argparse as _ap

    import fidelity
    from hf_switch_bench import patch_faithful

    c = Cfg(experts=8, layers=4, d_model=64, d_ff=128, heads=4, d_kv=16, capacity=3)
    fa = fidelity.parse_args(["--experts", "8", "--layers", "4", "--d-model", "64", "--d-ff", "128",
                              "--d-kv", "16", "--heads", "4", "--capacity", "3"])
    assert isinstance(fa, _ap.Namespace)
    model, hcfg = fidelity.build_model(torch, fa, str(device))
    w = weights_from_hf(torch, model, c, torch.float32)
    capture = []
    patch_faithful(torch, model, hcfg, capture)
    lengths = [19, 5, 33, 1, 40, 12]
    S = max(lengths)
    g = torch.Generator(device="cpu").manual_seed(3)
    ids = torch.randint(2, 32128, (len(lengths), S), generator=g)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    ids[mask == 0] = 0
    ids, mask = ids.to(device), mask.to(device)
    with torch.inference_mode():
        ref_out = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
    ref = [(lg.float(), t1, k) for lg, t1, k in capture]
    gmm32, note32 = U.probe_grouped_mm(torch, device, torch.float32)
    results = []
    for row in rows:
        enc = SwitchEncoder(torch, c, w, gmm32 or (lambda a, b, o: U.grouped_loop(torch, a, b, o)),
                            compile_mode if row == "compiled" else None, device)
        with torch.inference_mode():
            out, logits, top1, kept = enc(ids, mask, torch.float32)
        if len(ref) != logits.shape[0]:
            raise SystemExit(f"check: transformers ran {len(ref)} sparse layers, the baseline {logits.shape[0]}")
        top1_same = all(bool((top1[n].long() == r[1].long()).all()) for n, r in enumerate(ref))
        kept_same = all(bool((kept[n] == r[2]).all()) for n, r in enumerate(ref))
        lerr = max(float((logits[n] - r[0]).norm() / r[0].norm()) for n, r in enumerate(ref))
        herr = float((out - ref_out).norm() / ref_out.norm())
        drops = int(sum(int((~r[2]).sum()) for r in ref))
        ok = top1_same and kept_same and lerr < 1e-4 and herr < 1e-4
        results.append({"row": row, "ok": ok, "top1_identical": top1_same, "kept_identical": kept_same,
                        "logits_rel_err": lerr, "hidden_rel_err": herr, "dropped_tokens_in_reference": drops,
                        "experts_fp32_path": note32 if gmm32 else "loop (" + note32 + ")"})
        print(f"check {row:<8}: top-1 {'identical' if top1_same else 'DIFFERENT'}, kept "
              f"{'identical' if kept_same else 'DIFFERENT'}, logits rel err {lerr:.2e}, hidden rel err "
              f"{herr:.2e} ({drops} dropped tokens in the reference; experts in fp32 via "
              f"{'torch._grouped_mm' if gmm32 else 'the loop'}) -> {'OK' if ok else 'FAILED'}", flush=True)
    return results


# --- workloads ------------------------------------------------------------------------------------------


def batches_fixed(torch, device, B, S, vocab):
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(2, vocab, (B, S), generator=g).to(device)
    mask = torch.ones(B, S, dtype=torch.long, device=device)
    return [(ids, mask, B * S, B * S)]


def batches_mix(torch, device, samples, per_batch, vocab):
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]))
    out = []
    for i in range(0, len(order), per_batch):
        chunk = [samples[j] for j in order[i:i + per_batch]]
        S = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), S, dtype=torch.long)
        mask = torch.zeros(len(chunk), S, dtype=torch.long)
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor([min(t, vocab - 1) for t in s])
            mask[r, :len(s)] = 1
        out.append((ids.to(device), mask.to(device), len(chunk) * S, sum(len(s) for s in chunk)))
    return out


def load_mix(a):
    import hf_switch_bench

    if not os.path.exists(a.mix):
        try:
            hf_switch_bench.write_mix(a.mix, a.mix_samples)
        except ImportError as e:
            raise SystemExit(f"--mix {a.mix}: absent, and writing it needs sentencepiece ({e}); write it "
                             "with bench/hf_switch_bench.py --write-mix where sentencepiece is installed")
        print(f"wrote the mix file {a.mix} ({a.mix_samples} samples)")
    samples = hf_switch_bench.read_mix(a.mix)
    if not samples:
        raise SystemExit(f"--mix {a.mix}: no samples (expected one sample per line: space-separated ids)")
    return samples


def main(argv=None):
    a = parse_args(argv)
    import torch

    device = U.resolve_device(torch, a.device)
    torch.set_float32_matmul_precision("highest")  # the router's fp32 logits: no TF32
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    mach = U.machine(torch, device)
    print(f"torch {torch.__version__}, transformers {mach['transformers']}, triton {mach['triton']} on "
          f"{U.device_name(mach)}", flush=True)
    notes = []
    gmm, gmm_note = U.probe_grouped_mm(torch, device, dtype)
    if gmm is None:
        notes.append(f"experts: LOOP over the experts, not grouped ({gmm_note})")
        gmm = lambda x, w, offs: U.grouped_loop(torch, x, w, offs)  # noqa: E731
        experts_path = "loop"
    else:
        experts_path = "torch._grouped_mm"
    print(f"experts: {experts_path}" + ("" if experts_path != "loop" else f" ({gmm_note})"), flush=True)

    check = []
    if not a.no_check:
        check = check_faithful(torch, device, gmm_note, a.rows, a.compile_mode)
        failed = [r["row"] for r in check if not r["ok"]]
        if failed:
            raise SystemExit(f"torch_switch_baseline.py: the faithfulness check failed for {failed}: the "
                             "baseline does not route as transformers 4.x does (see above)")

    c = Cfg(a)
    w = random_weights(torch, c, device, dtype)
    n_params = sum(t.numel() for k, t in w.items() if k != "blocks") + sum(
        t.numel() for b in w["blocks"] for t in b.values())
    print(f"model: {c.layers} blocks ({c.layers // 2} sparse) d {c.d_model} d_ff {c.d_ff} {c.heads}x{c.d_kv} "
          f"heads, {c.experts} experts, capacity {c.capacity}; {n_params / 1e9:.3f} B parameters in {a.dtype}",
          flush=True)

    workloads = {}
    for shape in [s for s in a.shapes.split(",") if s]:
        if shape == "mix":
            workloads[shape] = batches_mix(torch, device, load_mix(a), a.mix_batch, c.vocab)
        else:
            try:
                B, S = map(int, shape.split("x"))
            except ValueError:
                raise SystemExit(f"--shapes: '{shape}': expected BxS (e.g. 128x256) or mix")
            workloads[shape] = batches_fixed(torch, device, B, S, c.vocab)

    host = HostCopy(torch, device)
    results = []
    for row in a.rows:
        try:
            enc = SwitchEncoder(torch, c, w, gmm, a.compile_mode if row == "compiled" else None, device)
        except RuntimeError as e:
            notes.append(f"{row}: not run ({e})")
            results.append({"row": row, "status": f"not run: {e}"})
            continue
        for shape, batches in workloads.items():
            def one_pass():
                for ids, mask, _, _ in batches:
                    _, logits, top1, kept = enc(ids, mask, torch.float16)
                    host.copy(logits, top1, kept)

            try:
                with torch.inference_mode():
                    secs = U.time_passes(torch, device, one_pass, a.warmup, a.repeats)
            except Exception as e:  # noqa: BLE001 (e.g. a compile failure at the first call)
                msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                notes.append(f"{row} {shape}: failed ({type(e).__name__}: {msg})")
                results.append({"row": row, "shape": shape, "status": f"failed: {msg}"})
                print(f"{row} {shape}: FAILED {type(e).__name__}: {msg}", flush=True)
                continue
            med = U.median(secs)
            tokens = sum(b[2] for b in batches)
            real = sum(b[3] for b in batches)
            r = {"row": row, "shape": shape, "status": "ok", "experts": experts_path, "how": enc.note,
                 "batches": len(batches), "tokens": tokens, "real_tokens": real, "median_s": med,
                 "min_s": min(secs), "max_s": max(secs), "repeats": len(secs),
                 "tokens_per_s": tokens / med, "real_tokens_per_s": real / med}
            results.append(r)
            print(f"{row:<9} {shape:<8} {r['tokens_per_s']:>12,.0f} tokens/s {r['real_tokens_per_s']:>12,.0f} real "
                  f"tokens/s (median of {len(secs)}: {med * 1e3:.2f} ms/pass)", flush=True)

    if device.type == "cpu":
        notes.append("cpu: plain timer (time.perf_counter), not comparable with GPU rows")
    rows = [dict(r, label=f"strong PyTorch {r['row']} ({r.get('experts', '-')})") for r in results if r.get("status") == "ok"]
    U.print_table(
        f"strong PyTorch Switch encoder ({c.experts} experts, d {c.d_model}, {c.layers} blocks, {a.dtype}; "
        f"logits f16 + experts + kept to the host) on {U.device_name(mach)}",
        [("row", "label", "{}"), ("shape", "shape", "{}"), ("batches", "batches", "{}"),
         ("tokens/s", "tokens_per_s", "{:,.0f}"), ("real tokens/s", "real_tokens_per_s", "{:,.0f}"),
         ("ms/pass", "median_s", "{:.3f}")],
        [dict(r, median_s=r["median_s"] * 1e3) for r in rows], notes)
    U.write_json(a.json, {
        "date": U.now_utc(), "machine": mach, "device": str(device), "command": [sys.executable, *sys.argv],
        "benchmark": "strong PyTorch Switch encoder (bench/torch_switch_baseline.py)",
        "model": {"experts": c.experts, "layers": c.layers, "sparse_layers": c.layers // 2, "d_model": c.d_model,
                  "d_ff": c.d_ff, "heads": c.heads, "d_kv": c.d_kv, "capacity": c.capacity, "vocab": c.vocab,
                  "dtype": a.dtype, "parameters": n_params, "init": "uniform, bench_gpu's scales"},
        "shapes": {k: {"batches": len(v), "tokens": sum(b[2] for b in v), "real_tokens": sum(b[3] for b in v),
                       "batch_shapes": [list(b[0].shape) for b in v]} for k, v in workloads.items()},
        "timing": {"warmup": a.warmup, "repeats": a.repeats,
                   "clock": "cuda events" if device.type == "cuda" else "time.perf_counter"},
        "experts_path": experts_path, "experts_note": gmm_note, "check": check, "notes": notes,
        "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
