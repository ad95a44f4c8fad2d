#!/usr/bin/env python3
"""Prefill baselines of decoder-only MoE language models (issue 20; docs/GPU.md "Baselines").

Prefill tokens/s of two published shapes with random weights on one GPU, router outputs to the host:
  olmoe    OLMoE-1B-7B: d 2048, 16 layers, 16 heads (16 kv), 64 experts top-8, expert intermediate
           1024, vocab 50304, q/k RMS norms, norm_topk_prob false
  mixtral  Mixtral-8x7B: d 4096, 32 layers, 32 heads (8 kv), 8 experts top-2, intermediate 14336,
           vocab 32000, renormalized top-2 (~93 GB in bf16: fits an H200, not an H100)
Rows:
  transformers        OlmoeForCausalLM / MixtralForCausalLM built from a config (no download:
                      from_config on the device under transformers' no_init_weights, then every
                      weight filled in place: normal(0, initializer_range), norms 1), the installed
                      experts implementation (transformers 5.x picks `grouped_mm` where it can; the
                      table says which) and attention (sdpa), called with output_router_logits=True.
  transformers-eager  the same model with experts_implementation="eager" (the per-expert loop), when
                      --hf-experts includes eager.
  strong eager / strong compiled
                      what a skilled user writes in a day: fused q/k/v projection, (OLMoE) q/k RMS
                      norms, rotary embedding, SDPA causal with grouped-query attention
                      (enable_gqa, else repeat_interleave: the table says), RMS norms with fp32
                      statistics, the family's router (logits = h @ Wg^T in the weights' dtype as
                      transformers computes them, softmax in fp32, top-k, renormalized where the family
                      does), tokens sorted by expert (stable argsort of the [T*k] ids) and SwiGLU experts
                      through torch._grouped_mm (offs = cumulative rows per expert, int32; a loop over the
                      experts where it is unavailable: the table says), the weighted results
                      index_add'ed back; the LM head over every position (as transformers computes it);
                      eager and torch.compile of the layer function (weights are arguments: one graph for
                      every layer). It uses the transformers model's own weight tensors (views, no copy).
Every row copies, per batch, the router logits of every MoE layer as fp16 [L,T,E] and the top-k expert
ids as int32 [L,T,k] to pinned host memory (transformers' row takes the ids by a top-k of its returned
logits' softmax).

Memory: the script compares the model's bytes plus a margin for activations with the free GPU memory;
when it does not fit (Mixtral-8x7B on an H100) it builds fewer layers and says so: the table then shows
the measured rate of the reduced model and, per layer, `layer-tokens/s` (tokens/s x layers) and the
full-depth estimate (tokens/s x layers run / layers of the model; embedding and LM head counted once).

Faithfulness (--check, on by default): tiny random models of both families, transformers in fp32 with
eager attention and eager experts vs this implementation on the same weights in fp32: top-k ids
identical at every position and MoE layer, router logits and LM logits within 1e-4 relative, for each
strong row. On the benchmark shape, the strong rows' top-k agreement with transformers' bf16 ids on the
first batch is reported (set agreement per token-layer; bf16 rounding makes it < 100%).

Timing: warm-up passes, then --repeats passes, CUDA events on cuda (time.perf_counter on cpu), median.

  /work/venv-torch/bin/python bench/lm_baselines.py --tiny --device cpu       # CPU smoke run
  python3 bench/lm_baselines.py --device cuda --models olmoe,mixtral --json $OUT/lm_baselines.json
  python3 bench/lm_baselines.py --device cuda --models mixtral --layers 8 --shapes 32x512
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch_bench_util as U  # noqa: E402

SHAPES = {
    "olmoe": dict(model_type="olmoe", hidden_size=2048, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=16, num_experts=64, num_experts_per_tok=8, intermediate_size=1024,
                  vocab_size=50304, norm_topk_prob=False, rope_theta=10000.0, rms_norm_eps=1e-5),
    "mixtral": dict(model_type="mixtral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, intermediate_size=14336,
                    vocab_size=32000, rope_theta=1e6, rms_norm_eps=1e-5),
}
TINY = {
    "olmoe": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, num_experts=16,
                  num_experts_per_tok=4, intermediate_size=32, vocab_size=512),
    "mixtral": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=4, num_experts_per_tok=2, intermediate_size=96, vocab_size=512),
}
ROWS = ("transformers", "strong-eager", "strong-compiled")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="olmoe,mixtral", help="olmoe,mixtral")
    ap.add_argument("--shapes", default="32x512,8x2048", help="BxS prefill batches of random ids")
    ap.add_argument("--rows", default=",".join(ROWS), help=",".join(ROWS))
    ap.add_argument("--hf-experts", default="default",
                    help="transformers experts implementations to time: default (what transformers picks) "
                         "and/or eager (the per-expert loop), e.g. default,eager")
    ap.add_argument("--layers", type=int, default=0,
                    help="build this many layers (0: the model's, fewer when it does not fit the free memory)")
    ap.add_argument("--margin-gib", type=float, default=6.0,
                    help="GPU memory kept free for activations, besides the LM logits")
    ap.add_argument("--compile-mode", default="default")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-check", action="store_true", help="skip the tiny fp32 check against transformers")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes of both families (a CPU smoke run)")
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    a.models = [m for m in a.models.split(",") if m]
    bad = [m for m in a.models if m not in SHAPES]
    if bad:
        ap.error(f"--models: expected a list of {', '.join(SHAPES)}, got {bad}")
    a.rows = [r for r in a.rows.split(",") if r]
    bad = [r for r in a.rows if r not in ROWS]
    if bad:
        ap.error(f"--rows: expected a list of {', '.join(ROWS)}, got {bad}")
    a.hf_experts = [e for e in a.hf_experts.split(",") if e]
    bad = [e for e in a.hf_experts if e not in ("default", "eager")]
    if bad:
        ap.error(f"--hf-experts: expected default and/or eager, got {bad}")
    try:
        a.shapes = [tuple(map(int, s.split("x"))) for s in a.shapes.split(",") if s]
    except ValueError:
        ap.error(f"--shapes: expected BxS[,BxS...] (e.g. 32x512), got {a.shapes!r}")
    if a.tiny and a.shapes == [(32, 512), (8, 2048)]:
        a.shapes = [(2, 16), (1, 40)]
    if a.tiny:
        a.repeats = min(a.repeats, 3)
    if a.repeats < 1 or a.layers < 0:
        ap.error("--repeats >= 1 and --layers >= 0 expected")
    return a


# --- configs and memory -----------------------------------------------------------------------------


def make_config(name, overrides=None, layers=0):
    from transformers import MixtralConfig, OlmoeConfig

    kw = dict(SHAPES[name])
    kw.pop("model_type")
    kw.update(overrides or {})
    if layers:
        kw["num_hidden_layers"] = layers
    rope_theta = kw.pop("rope_theta")
    cls = OlmoeConfig if name == "olmoe" else MixtralConfig
    cfg = cls(**kw, max_position_embeddings=4096, tie_word_embeddings=False)
    # transformers 5.x reads rope_parameters, 4.x rope_theta: set both.
    cfg.rope_theta = rope_theta
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        rp["rope_theta"] = rope_theta
    cfg.output_router_logits = True
    return cfg


def n_experts(cfg):
    return getattr(cfg, "num_experts", None) or cfg.num_local_experts


def head_dim(cfg):
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def param_count(cfg):
    d, hd, E, I = cfg.hidden_size, head_dim(cfg), n_experts(cfg), cfg.intermediate_size
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    per_layer = d * hd * (2 * H + 2 * KV) + E * d + E * 3 * d * I + 2 * d
    if cfg.model_type == "olmoe":
        per_layer += H * hd + KV * hd
    return per_layer, 2 * cfg.vocab_size * d + d


def fit_layers(torch, device, cfg, shapes, margin_gib, requested):
    """(layers to build, note or None)."""
    full = cfg.num_hidden_layers
    if requested:
        return requested, (f"{requested} of {full} layers built (--layers)" if requested != full else None)
    if device.type != "cuda":
        return full, None
    per_layer, fixed = param_count(cfg)
    free, _ = torch.cuda.mem_get_info(device)
    T = max(B * S for B, S in shapes)
    margin = margin_gib * 2**30 + 3 * T * cfg.vocab_size * 2  # the bf16 LM logits, twice over
    need = 2 * (fixed + full * per_layer) + margin
    if need <= free:
        return full, None
    n = int((free - margin - 2 * fixed) // (2 * per_layer))
    if n < 1:
        raise SystemExit(f"lm_baselines.py: {cfg.model_type}: not even one layer fits the {free / 2**30:.1f} GiB "
                         f"free ({2 * (fixed + per_layer) / 2**30:.1f} GiB for one layer + margin)")
    return n, (f"{cfg.model_type}: {2 * (fixed + full * per_layer) / 1e9:.1f} GB of bf16 weights + "
               f"{margin / 2**30:.1f} GiB margin do not fit the {free / 2**30:.1f} GiB free: {n} of {full} "
               f"layers built; per-layer-normalized numbers below")


# --- transformers ----------------------------------------------------------------------------------------


def no_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            import contextlib

            return contextlib.nullcontext()
    return no_init_weights()


def build_hf(torch, cfg, device, dtype, seed=0, attn="sdpa", experts=None):
    """The transformers model on the device, weights filled in place (normal(0, initializer_range),
    1-D weights = norms at 1), in eval mode."""
    from transformers import AutoModelForCausalLM

    kw = {"attn_implementation": attn}
    if experts:
        kw["experts_implementation"] = experts
    attempts = [dict(kw, dtype=dtype), dict(kw, torch_dtype=dtype)]
    if experts:  # a transformers without experts_implementation: the row's label says what ran
        attempts += [{"attn_implementation": attn, "dtype": dtype}, {"attn_implementation": attn, "torch_dtype": dtype}]
    err = None
    for kwargs in attempts:
        try:
            with torch.device(device), no_init():
                model = AutoModelForCausalLM.from_config(cfg, **kwargs)
            break
        except (TypeError, ValueError) as e:
            err = e
    else:
        raise SystemExit(f"lm_baselines.py: transformers could not build {cfg.model_type} from a config: {err}")
    model.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    std = getattr(cfg, "initializer_range", 0.02)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=g)
        for name, b in model.named_buffers():
            if b.is_floating_point() and not bool(torch.isfinite(b).all()):
                raise SystemExit(f"lm_baselines.py: buffer {name} is not finite after construction")
    return model


def hf_experts_impl(model):
    for attr in ("_experts_implementation_internal", "_experts_implementation"):
        v = getattr(model.config, attr, None)
        if v:
            return v
    return "eager (transformers without experts_implementation)"


def moe_block(layer):
    for attr in ("mlp", "block_sparse_moe"):
        m = getattr(layer, attr, None)
        if m is not None and hasattr(m, "gate") and hasattr(m, "experts"):
            return m
    raise SystemExit(f"lm_baselines.py: no MoE block in {type(layer).__name__} (looked for mlp, block_sparse_moe)")


def expert_tensors(torch, moe, E):
    """(gate_up [E, 2I, d], down [E, d, I]): transformers 5.x's fused parameters as they are (views), or
    4.x's per-expert linears stacked (gate_proj/up_proj/down_proj or Mixtral's w1/w3/w2)."""
    ex = moe.experts
    if hasattr(ex, "gate_up_proj") and hasattr(ex, "down_proj") and torch.is_tensor(ex.gate_up_proj):
        gu, dn = ex.gate_up_proj, ex.down_proj
        if gu.shape[1] != 2 * dn.shape[2]:  # stored transposed ([E, d, 2I])
            gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
        return gu.detach(), dn.detach()
    mods = list(ex)
    if hasattr(mods[0], "w1"):
        gu = torch.stack([torch.cat([m.w1.weight, m.w3.weight]) for m in mods])
        dn = torch.stack([m.w2.weight for m in mods])
    else:
        gu = torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in mods])
        dn = torch.stack([m.down_proj.weight for m in mods])
    return gu.detach(), dn.detach()


def weights_from_hf(torch, model, cfg):
    m = model.model
    E = n_experts(cfg)
    w = {"embed": m.embed_tokens.weight.detach(), "norm": m.norm.weight.detach(),
         "lm_head": model.lm_head.weight.detach(), "inv_freq": m.rotary_emb.inv_freq.detach().float(),
         "rope_scale": float(getattr(m.rotary_emb, "attention_scaling", 1.0)), "layers": []}
    for layer in m.layers:
        at = layer.self_attn
        moe = moe_block(layer)
        gate = moe.gate.weight if hasattr(moe.gate, "weight") else moe.gate
        gu, dn = expert_tensors(torch, moe, E)
        lw = {"ln1": layer.input_layernorm.weight.detach(), "ln2": layer.post_attention_layernorm.weight.detach(),
              "wqkv": torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]).detach(),
              "wo": at.o_proj.weight.detach(), "gate": gate.detach(), "gate_up": gu, "down": dn}
        if getattr(at, "q_norm", None) is not None:
            lw["q_norm"], lw["k_norm"] = at.q_norm.weight.detach(), at.k_norm.weight.detach()
        w["layers"].append(lw)
    return w


# --- the strong PyTorch baseline ------------------------------------------------------------------------


def probe_gqa(torch, device, dtype):
    import torch.nn.functional as F

    try:
        q = torch.randn(1, 4, 8, 16, device=device, dtype=dtype)
        k = torch.randn(1, 2, 8, 16, device=device, dtype=dtype)
        F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        return True, "SDPA enable_gqa"
    except (TypeError, RuntimeError) as e:
        return False, "SDPA without enable_gqa (k/v repeat_interleave'd): " + str(e).splitlines()[0][:100]


def make_layer_fn(torch, cfg, gmm, gqa):
    import torch.nn.functional as F

    E, k = n_experts(cfg), cfg.num_experts_per_tok
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim(cfg)
    eps = cfg.rms_norm_eps
    renorm = cfg.model_type == "mixtral" or bool(getattr(cfg, "norm_topk_prob", False))

    def rms(x, w):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return w * (x.float() * torch.rsqrt(var + eps)).to(x.dtype)

    def rotate(x, cos, sin):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def layer(x, cos, sin, ln1, wqkv, wo, q_norm, k_norm, ln2, gate, gate_up, down):
        B, S, d = x.shape
        h = rms(x, ln1)
        q, kk, v = F.linear(h, wqkv).split([H * hd, KV * hd, KV * hd], dim=-1)
        if q_norm is not None:
            q, kk = rms(q, q_norm), rms(kk, k_norm)
        q = q.view(B, S, H, hd).transpose(1, 2)
        kk = kk.view(B, S, KV, hd).transpose(1, 2)
        v = v.view(B, S, KV, hd).transpose(1, 2)
        q, kk = rotate(q, cos, sin), rotate(kk, cos, sin)
        if gqa:
            o = F.scaled_dot_product_attention(q, kk, v, is_causal=True, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q, kk.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1),
                                               is_causal=True)
        x = x + F.linear(o.transpose(1, 2).reshape(B, S, H * hd), wo)
        h = rms(x, ln2).view(B * S, d)
        logits = F.linear(h, gate)  # [T,E] in the weights' dtype, as transformers
        probs = torch.softmax(logits.float(), dim=-1)
        topw, ids = torch.topk(probs, k, dim=-1)  # [T,k], descending
        if renorm:
            topw = topw / topw.sum(dim=-1, keepdim=True)
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = counts.cumsum(0).to(torch.int32)
        gu = gmm(h[tok], gate_up.transpose(-2, -1), offs)
        g, u = gu.chunk(2, dim=-1)
        ys = gmm(F.silu(g) * u, down.transpose(-2, -1), offs)
        ys = ys * topw.reshape(-1)[order, None].to(ys.dtype)
        moe = torch.zeros_like(h).index_add_(0, tok, ys)
        return x + moe.view(B, S, d), logits, ids

    return layer


class StrongLM:
    def __init__(self, torch, cfg, w, gmm, gqa, compile_mode=None, device=None):
        self.torch, self.cfg, self.w = torch, cfg, w
        fn = make_layer_fn(torch, cfg, gmm, gqa)
        self.note = "eager"
        if compile_mode is not None:
            fn, self.note = U.try_compile(torch, fn, compile_mode, device)
            if fn is None:
                raise RuntimeError(self.note)
        self.layer = fn

    def __call__(self, ids):
        torch, w = self.torch, self.w
        x = w["embed"][ids]
        S = ids.shape[1]
        freqs = torch.arange(S, device=ids.device, dtype=torch.float32)[:, None] * w["inv_freq"][None]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * w["rope_scale"]).to(x.dtype)[None, None]
        sin = (emb.sin() * w["rope_scale"]).to(x.dtype)[None, None]
        logits, experts = [], []
        for lw in w["layers"]:
            x, lg, ex = self.layer(x, cos, sin, lw["ln1"], lw["wqkv"], lw["wo"], lw.get("q_norm"), lw.get("k_norm"),
                                   lw["ln2"], lw["gate"], lw["gate_up"], lw["down"])
            logits.append(lg)
            experts.append(ex)
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = w["norm"] * (x.float() * torch.rsqrt(var + self.cfg.rms_norm_eps)).to(x.dtype)
        return x @ w["lm_head"].t(), logits, experts


# --- check, runs -------------------------------------------------------------------------------------------


def check_family(torch, device, name, rows, compile_mode):
    cfg = make_config(name, TINY[name])
    cfg.rms_norm_eps = 1e-5
    model = build_hf(torch, cfg, device, torch.float32, seed=5, attn="eager", experts="eager")
    with torch.no_grad():  # a sharper router than std 0.02, so that the top-k has real margins
        for layer in model.model.layers:
            g = moe_block(layer).gate
            (g.weight if hasattr(g, "weight") else g).mul_(20.0)
    gen = torch.Generator(device="cpu").manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (3, 21), generator=gen).to(device)
    with torch.inference_mode():
        out = model(input_ids=ids, output_router_logits=True)
    ref_logits = out.logits.float()
    ref_router = [r.float().reshape(-1, n_experts(cfg)) for r in out.router_logits]
    ref_ids = [torch.topk(torch.softmax(r, -1), cfg.num_experts_per_tok, -1).indices for r in ref_router]
    w = weights_from_hf(torch, model, cfg)
    gmm32, note32 = U.probe_grouped_mm(torch, device, torch.float32)
    gqa, _ = probe_gqa(torch, device, torch.float32)
    res = []
    for row in rows:
        loop = lambda a, b, o: U.grouped_loop(torch, a, b, o)  # noqa: E731
        path = "torch._grouped_mm" if gmm32 else f"loop ({note32})"
        lm = StrongLM(torch, cfg, w, gmm32 or loop, gqa, compile_mode if row == "strong-compiled" else None, device)
        try:
            with torch.inference_mode():
                logits, router, experts = lm(ids)
        except Exception as e:  # noqa: BLE001 - torch 2.11's compiled grouped_mm takes bf16 only
            if row != "strong-compiled" or not gmm32:
                raise
            path = "loop (the compiled torch._grouped_mm refused fp32: " + str(e).splitlines()[0][:80] + ")"
            print(f"check {name}: compiled fp32 grouped_mm refused, checking the compiled model with the loop",
                  flush=True)
            lm = StrongLM(torch, cfg, w, loop, gqa, compile_mode, device)
            with torch.inference_mode():
                logits, router, experts = lm(ids)
        same = all(bool((e == r).all()) for e, r in zip(experts, ref_ids))
        rerr = max(float((a.float() - b).norm() / b.norm()) for a, b in zip(router, ref_router))
        lerr = float((logits.float() - ref_logits).norm() / ref_logits.norm())
        ok = same and rerr < 1e-4 and lerr < 1e-4 and len(router) == len(ref_router)
        res.append({"model": name, "row": row, "ok": ok, "topk_ids_identical": same, "router_logits_rel_err": rerr,
                    "lm_logits_rel_err": lerr, "experts_fp32_path": path})
        print(f"check {name:<7} {row:<15}: top-k ids {'identical' if same else 'DIFFERENT'}, router logits rel err "
              f"{rerr:.2e}, LM logits rel err {lerr:.2e} -> {'OK' if ok else 'FAILED'}", flush=True)
    return res


class HostCopy:
    def __init__(self, torch, device):
        self.torch, self.device, self.bufs = torch, device, {}

    def copy(self, logits, experts):
        torch = self.torch
        lg = torch.stack([x.reshape(-1, x.shape[-1]) for x in logits]).to(torch.float16)
        ex = torch.stack([x.reshape(-1, x.shape[-1]) for x in experts]).to(torch.int32)
        key = (lg.shape, ex.shape)
        if key not in self.bufs:
            pin = self.device.type == "cuda"
            self.bufs[key] = (torch.empty(lg.shape, dtype=lg.dtype, pin_memory=pin),
                              torch.empty(ex.shape, dtype=ex.dtype, pin_memory=pin))
        hl, he = self.bufs[key]
        hl.copy_(lg, non_blocking=True)
        he.copy_(ex, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return hl, he


def topk_agreement(torch, a, b):
    """Share of (token, layer) whose top-k id sets agree, over lists of [T,k] tensors."""
    same = tot = 0
    for x, y in zip(a, b):
        xs, _ = torch.sort(x.reshape(-1, x.shape[-1]), dim=-1)
        ys, _ = torch.sort(y.reshape(-1, y.shape[-1]), dim=-1)
        same += int((xs == ys).all(-1).sum())
        tot += xs.shape[0]
    return same / max(tot, 1)


def run_model(torch, a, device, name, notes, gmm, experts_path, gqa):
    dtype = torch.float32 if a.tiny and device.type == "cpu" else torch.bfloat16
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    full_cfg = make_config(name, TINY[name] if a.tiny else None)
    layers, note = fit_layers(torch, device, full_cfg, a.shapes, a.margin_gib, a.layers)
    if note:
        notes.append(note)
        print("note: " + note, flush=True)
    cfg = make_config(name, TINY[name] if a.tiny else None, layers)
    full_layers = full_cfg.num_hidden_layers
    per_layer, fixed = param_count(cfg)
    n_params = fixed + layers * per_layer
    batches = {}
    for B, S in a.shapes:
        g = torch.Generator(device="cpu").manual_seed(B * 7919 + S)
        batches[f"{B}x{S}"] = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(device)
    host = HostCopy(torch, device)
    results, ref_ids = [], {}
    model = None
    hf_rows = [r for r in a.rows if r == "transformers"]
    for impl in (a.hf_experts if hf_rows else []):
        if model is not None:
            del model
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        t0 = time.perf_counter()
        model = build_hf(torch, cfg, device, dtype, experts=None if impl == "default" else impl)
        build_s = time.perf_counter() - t0
        impl_name = hf_experts_impl(model)
        label = f"transformers (experts {impl_name}, attention {model.config._attn_implementation})"
        print(f"{name}: transformers model with {layers} layers built in {build_s:.1f} s; {label}", flush=True)
        for shape, ids in batches.items():
            def one_pass():
                out = model(input_ids=ids, output_router_logits=True, use_cache=False)
                rl = out.router_logits
                ex = [torch.topk(torch.softmax(r.float(), -1), cfg.num_experts_per_tok, -1).indices for r in rl]
                one_pass.ex = ex
                host.copy(rl, ex)

            row = "transformers" if impl == "default" else f"transformers-{impl}"
            results.append(timed(torch, a, device, name, shape, ids, row, label, one_pass, layers,
                                 full_layers, notes))
            if getattr(one_pass, "ex", None) is not None and shape not in ref_ids:
                ref_ids[shape] = [e.clone() for e in one_pass.ex]
    strong_rows = [r for r in a.rows if r.startswith("strong")]
    if strong_rows:
        if model is None:
            model = build_hf(torch, cfg, device, dtype)
        w = weights_from_hf(torch, model, cfg)
        del model
        model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for row in strong_rows:
            try:
                lm = StrongLM(torch, cfg, w, gmm, gqa, a.compile_mode if row == "strong-compiled" else None, device)
            except RuntimeError as e:
                notes.append(f"{name} {row}: not run ({e})")
                continue
            label = f"strong PyTorch {row.split('-')[1]} ({experts_path})"
            for shape, ids in batches.items():
                def one_pass():
                    _, lg, ex = lm(ids)
                    one_pass.ex = ex
                    host.copy(lg, ex)

                r = timed(torch, a, device, name, shape, ids, row, label, one_pass, layers, full_layers, notes)
                if r.get("status") == "ok" and shape in ref_ids:
                    r["topk_set_agreement_vs_transformers"] = topk_agreement(torch, one_pass.ex, ref_ids[shape])
                results.append(r)
        del w
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "config": {k: getattr(cfg, k, None) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
        "vocab_size", "num_experts_per_tok", "norm_topk_prob", "rms_norm_eps")} | {"num_experts": n_experts(cfg)},
        "layers_built": layers, "layers_of_model": full_layers, "parameters_built": n_params,
        "dtype": str(dtype).replace("torch.", ""), "results": results}


def timed(torch, a, device, name, shape, ids, row, label, fn, layers, full_layers, notes):
    tokens = ids.numel()
    try:
        with torch.inference_mode():
            secs = U.time_passes(torch, device, fn, a.warmup, a.repeats)
    except Exception as e:  # noqa: BLE001 (OOM, a compile failure: say it, go on)
        msg = (str(e).splitlines() or [type(e).__name__])[0][:160]
        notes.append(f"{name} {row} {shape}: failed ({type(e).__name__}: {msg})")
        print(f"{name} {row} {shape}: FAILED {type(e).__name__}: {msg}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"model": name, "row": row, "label": label, "shape": shape, "status": f"failed: {msg}"}
    med = U.median(secs)
    tps = tokens / med
    r = {"model": name, "row": row, "label": label, "shape": shape, "status": "ok", "tokens": tokens,
         "median_s": med, "min_s": min(secs), "max_s": max(secs), "repeats": len(secs), "tokens_per_s": tps,
         "layers": layers, "layer_tokens_per_s": tps * layers, "full_depth_estimate_tokens_per_s": tps * layers / full_layers,
         "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    print(f"{name:<8} {row:<15} {shape:<8} {tps:>12,.0f} tokens/s (median of {len(secs)}: {med * 1e3:.1f} ms)", flush=True)
    return r


def main(argv=None):
    a = parse_args(argv)
    import torch

    device = U.resolve_device(torch, a.device)
    torch.set_float32_matmul_precision("highest")
    mach = U.machine(torch, device)
    print(f"torch {torch.__version__}, transformers {mach['transformers']}, triton {mach['triton']} on "
          f"{U.device_name(mach)}", flush=True)
    notes = []
    dtype = torch.float32 if a.tiny and device.type == "cpu" else torch.bfloat16
    gmm, gmm_note = U.probe_grouped_mm(torch, device, dtype)
    if gmm is None:
        notes.append(f"strong rows: experts by a LOOP over the experts ({gmm_note})")
        gmm = lambda x, b, offs: U.grouped_loop(torch, x, b, offs)  # noqa: E731
    experts_path = "torch._grouped_mm" if gmm_note == "torch._grouped_mm" else "loop"
    gqa, gqa_note = probe_gqa(torch, device, dtype)
    if not gqa:
        notes.append("strong rows: " + gqa_note)
    check = []
    if not a.no_check:
        strong = [r for r in a.rows if r.startswith("strong")]
        for name in a.models:
            check += check_family(torch, device, name, strong, a.compile_mode)
        failed = [f"{c['model']} {c['row']}" for c in check if not c["ok"]]
        if failed:
            raise SystemExit(f"lm_baselines.py: the check against transformers failed for {failed} (see above)")
    runs = [run_model(torch, a, device, name, notes, gmm, experts_path, gqa) for name in a.models]

    if device.type == "cpu":
        notes.append("cpu: plain timer (time.perf_counter), not comparable with GPU rows")
    if dtype == torch.float32:
        notes.append("--tiny on cpu runs in fp32 (bf16 matmuls on a CPU say nothing)")
    table = []
    for run in runs:
        for r in run["results"]:
            if r.get("status") == "ok":
                table.append(dict(r, model_l=f"{r['model']} ({run['layers_built']}/{run['layers_of_model']} layers)",
                                  ms=r["median_s"] * 1e3,
                                  agree=(100 * r["topk_set_agreement_vs_transformers"]
                                         if "topk_set_agreement_vs_transformers" in r else None)))
    U.print_table(
        f"prefill, random weights, router logits f16 + top-k ids to the host, on {U.device_name(mach)}",
        [("model", "model_l", "{}"), ("row", "label", "{}"), ("shape", "shape", "{}"),
         ("tokens/s", "tokens_per_s", "{:,.0f}"), ("layer-tokens/s", "layer_tokens_per_s", "{:,.0f}"),
         ("full-depth est. tokens/s", "full_depth_estimate_tokens_per_s", "{:,.0f}"), ("ms/batch", "ms", "{:.1f}"),
         ("top-k = transformers", "agree", "{:.2f}%"), ("peak GiB", "peak_gpu_gib", "{:.1f}")],
        table, notes)
    U.write_json(a.json, {
        "date": U.now_utc(), "machine": mach, "device": str(device), "command": [sys.executable, *sys.argv],
        "benchmark": "MoE LM prefill baselines (bench/lm_baselines.py)",
        "shapes": [f"{B}x{S}" for B, S in a.shapes], "timing": {
            "warmup": a.warmup, "repeats": a.repeats,
            "clock": "cuda events" if device.type == "cuda" else "time.perf_counter"},
        "experts_path": experts_path, "experts_note": gmm_note,
        "attention": gqa_note, "check": check, "notes": notes, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
