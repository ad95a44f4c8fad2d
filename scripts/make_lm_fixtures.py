#!/usr/bin/env python3
"""Regenerates tests/data/fixtures_lm/: tiny random MoE language models of the four families moetrace
reads (olmoe, mixtral, qwen2_moe, qwen3_moe) with their transformers reference outputs.

Reference tool only: it needs torch and transformers (the project's /work/venv-torch, or any environment
with `pip install torch transformers safetensors`); moetrace's build, tests and CI never run it, they read
the committed fixtures. The layout and the meaning of every file are in tests/data/fixtures_lm/README.md.

    /work/venv-torch/bin/python scripts/make_lm_fixtures.py [--out DIR] [--family F ...]

Per family it
  1. builds the model with transformers' own initialization (from_config under torch.manual_seed), then
     multiplies the router weights by ROUTER_SCALE (routing far from uniform), draws the RMSNorm weights
     around 1 and the attention biases around 0 (so that an engine that ignores a norm weight or a bias
     fails), all in float32;
  2. writes model/ with save_pretrained (transformers' own layout), model_fused/ with
     save_pretrained(save_original_format=False) (the fused 3-D expert tensors transformers holds in
     memory), and model_hub/ (per-expert Hub names built here from the fused tensors, two shards and an
     index, config.json in the older Hub spelling);
  3. loads each folder back with from_pretrained and checks that its logits and router logits equal the
     in-memory model's bit for bit (this proves the names and the orientation of every tensor);
  4. writes inputs.safetensors and reference.safetensors (eager attention, float32) and meta.json.

A seed is accepted only when no routing decision and no greedy token is within MARGIN of a tie (the
gap between consecutive sorted router logits among the top k+1, and between the two largest LM logits
of every generation step), so that an implementation within 1e-4 of the reference makes the same
choices; the seed that was used is written to meta.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys

import safetensors
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

FAMILIES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe")
ROUTER_SCALE = 8.0
NORM_WEIGHT_STD = 0.25
BIAS_STD = 0.1
MARGIN = 1e-3
NEW_TOKENS = 5
BASE_SEED = {"olmoe": 1000, "mixtral": 2000, "qwen2_moe": 3000, "qwen3_moe": 4000}
# Row lengths of the prompt batch (right padding): one full row, three padded ones.
SEQ_LEN = 14
ROW_LENGTHS = (14, 9, 12, 5)
VOCAB = 256
EOS = 2

POSITION_IDS_RULE = (
    "forward (no position_ids passed): position_ids = arange(S) for every row, pads included "
    "(OlmoeModel/MixtralModel/Qwen2MoeModel/Qwen3MoeModel.forward: arange(S) + past length); "
    "attention: causal, and key positions with attention_mask 0 are masked for every query "
    "(a pad query attends to the real tokens before it). "
    "generate with right padding: prefill position_ids = cumsum(attention_mask) - 1 with pads set to 0 "
    "(GenerationMixin._prepare_position_ids_for_generation), i.e. real tokens 0..L-1, pads 0; "
    "the first new token is the argmax of the prefill logits at column S-1, which for a padded row is "
    "a pad column computed at position 0; new token j (j = 1..N-1, fed back one at a time with the KV "
    "cache) gets position p + j where p is the prefill position id of column S-1 "
    "(_update_model_kwargs_for_generation: position_ids[..., -1:] + 1), so S-1+j for an unpadded row "
    "and j for a padded row; the attention mask grows by ones, so new tokens attend to the row's real "
    "prompt tokens, the new tokens before them and themselves, never to pads. "
    "min_new_tokens=N suppresses EOS during the N steps; in these fixtures EOS is never the raw argmax "
    "(checked), so generated_ids are the plain greedy argmax."
)


def family_config(family: str) -> AutoConfig:
    common = dict(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  eos_token_id=EOS, tie_word_embeddings=False)
    if family == "olmoe":
        # OLMoE's q_norm spans all heads (hidden_size), so heads * head_dim must be hidden_size.
        return AutoConfig.for_model("olmoe", hidden_size=64, intermediate_size=16, num_hidden_layers=2,
                                    num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=1.2,
                                    pad_token_id=1, bos_token_id=None,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    if family == "mixtral":
        # head_dim 16 with hidden 48: q/o are 64 wide, not hidden_size (an explicit head_dim).
        return AutoConfig.for_model("mixtral", hidden_size=48, head_dim=16, intermediate_size=16,
                                    num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                                    bos_token_id=1, rope_parameters={"rope_type": "default",
                                                                     "rope_theta": 1000000.0}, **common)
    if family == "qwen2_moe":
        # Block 1 is dense (mlp_only_layers), top-4 without renormalization, shared expert, q/k/v biases,
        # linear RoPE scaling.
        return AutoConfig.for_model("qwen2_moe", hidden_size=64, intermediate_size=32, num_hidden_layers=3,
                                    num_experts=8, num_experts_per_tok=4, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=24, decoder_sparse_step=1,
                                    mlp_only_layers=[1], norm_topk_prob=False, qkv_bias=True,
                                    bos_token_id=None,
                                    rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                     "rope_theta": 10000.0}, **common)
    if family == "qwen3_moe":
        # Block 0 is dense, per-head q/k norm, explicit head_dim (64-wide q with hidden 48), renormalized top-2.
        return AutoConfig.for_model("qwen3_moe", hidden_size=48, head_dim=16, intermediate_size=24,
                                    num_hidden_layers=3, num_experts=8, num_experts_per_tok=2,
                                    moe_intermediate_size=16, decoder_sparse_step=1, mlp_only_layers=[0],
                                    norm_topk_prob=True, bos_token_id=None,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)
    raise ValueError(family)


def moe_blocks(model) -> list[int]:
    """Block indices of the MoE layers, in layer order (k counts these)."""
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]


def hub_prefix(family: str) -> str:
    return "block_sparse_moe" if family == "mixtral" else "mlp"


def hub_state_dict(family: str, model) -> dict[str, torch.Tensor]:
    """The Hub's per-expert tensor names, built from the fused in-memory tensors.

    transformers 5.x holds experts.gate_up_proj [E, 2I, d] (rows 0..I-1 gate, I..2I-1 up, each an
    nn.Linear weight [out, in]) and experts.down_proj [E, d, I]; conversion_mapping.py merges the Hub's
    experts.X.{w1,w3} (mixtral) / experts.X.{gate_proj,up_proj} (others) with MergeModulelist(dim=0) then
    Concatenate(dim=1), and experts.X.{w2,down_proj} with MergeModulelist(dim=0); mixtral's
    block_sparse_moe is renamed mlp. This is the inverse.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone().contiguous()
        parts = name.split(".")
        if ".mlp.experts.gate_up_proj" in name or ".mlp.experts.down_proj" in name:
            layer = parts[2]
            base = f"model.layers.{layer}.{hub_prefix(family)}.experts"
            if name.endswith("gate_up_proj"):
                inter = t.shape[1] // 2
                for x in range(t.shape[0]):
                    g, u = t[x, :inter].contiguous(), t[x, inter:].contiguous()
                    if family == "mixtral":
                        out[f"{base}.{x}.w1.weight"], out[f"{base}.{x}.w3.weight"] = g, u
                    else:
                        out[f"{base}.{x}.gate_proj.weight"], out[f"{base}.{x}.up_proj.weight"] = g, u
            else:
                for x in range(t.shape[0]):
                    key = "w2" if family == "mixtral" else "down_proj"
                    out[f"{base}.{x}.{key}.weight"] = t[x].contiguous()
            continue
        if family == "mixtral" and ".mlp.gate." in name:
            name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
        out[name] = t
    return out


def hub_config(family: str, saved: dict) -> dict:
    """config.json in the spelling of the Hub's (transformers 4.x era) files of each family."""
    cfg = {k: v for k, v in saved.items()}
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = None if rope["rope_type"] == "default" else {"type": rope["rope_type"],
                                                                       "factor": rope["factor"]}
    cfg["torch_dtype"] = cfg.pop("dtype")
    if family == "qwen3_moe":
        cfg["num_experts"] = cfg.pop("num_local_experts")  # Qwen3-30B-A3B's config.json says num_experts
    if family == "qwen2_moe":
        cfg.pop("layer_types", None)  # absent from Qwen1.5-MoE's config.json
        cfg.pop("qkv_bias", None)  # absent too: 4.x always had q/k/v biases (5.x default True)
        cfg["sliding_window"] = 4096  # as on the Hub; ignored because use_sliding_window is false
    if family == "mixtral":
        assert "num_local_experts" in cfg
    return dict(sorted(cfg.items()))


def write_hub_folder(family: str, model, saved_cfg: dict, folder: str) -> dict:
    sd = hub_state_dict(family, model)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    names = list(sd)
    shards: list[dict] = [{}, {}]
    acc = 0
    for n in names:  # split at half of the bytes: one layer's tensors straddle the two files
        shards[0 if acc < total / 2 else 1][n] = sd[n]
        acc += sd[n].numel() * sd[n].element_size()
    os.makedirs(folder, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        f.write("\n")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hub_config(family, saved_cfg), f, indent=2)
        f.write("\n")
    return sd


def perturb(model, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_WEIGHT_STD * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * torch.randn(p.shape, generator=gen))
            elif name.endswith(".gate.weight"):
                p.mul_(ROUTER_SCALE)


def make_inputs(config, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    b = len(ROW_LENGTHS)
    ids = torch.randint(3, config.vocab_size, (b, SEQ_LEN), generator=gen, dtype=torch.int64)
    mask = torch.zeros((b, SEQ_LEN), dtype=torch.int64)
    for r, n in enumerate(ROW_LENGTHS):
        mask[r, :n] = 1
        ids[r, n:] = pad
    return ids, mask


def route(logits: torch.Tensor, k: int, renorm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The families' router rule (modeling_*.py *TopKRouter.forward): softmax in fp32, topk, renorm."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return idx, w


def min_gap(logits: torch.Tensor, k: int) -> float:
    """Smallest gap between consecutive sorted values among the top k+1 (ties and near-ties)."""
    s = torch.sort(logits.float(), dim=-1, descending=True).values[..., : k + 1]
    return float((s[..., :-1] - s[..., 1:]).min())


class Recorder:
    """Forward hooks on every MoE block's router (the gate module): its input and its outputs."""

    def __init__(self, model, blocks):
        self.calls: dict[int, list] = {b: [] for b in blocks}
        self.handles = []
        for b in blocks:
            gate = model.model.layers[b].mlp.gate
            self.handles.append(gate.register_forward_hook(self._hook(b)))
        self.positions: list[torch.Tensor] = []
        self.handles.append(model.model.rotary_emb.register_forward_hook(self._positions, with_kwargs=True))

    def _positions(self, module, args, kwargs, out):
        pos = args[1] if len(args) > 1 else kwargs["position_ids"]
        self.positions.append(pos.detach().clone())

    def _hook(self, b):
        def fn(module, args, out):
            logits, scores, indices = out
            self.calls[b].append({"input": args[0].detach().clone(), "logits": logits.detach().clone(),
                                  "scores": scores.detach().clone(), "indices": indices.detach().clone()})
        return fn

    def reset(self):
        for v in self.calls.values():
            v.clear()
        self.positions.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


def clip_fractions(model, ids, mask) -> dict:
    """OLMoE: the fraction of q, k, v entries that clip_qkv clamps (it must clamp some)."""
    clip = model.config.clip_qkv
    seen = {"q": [], "k": [], "v": []}
    hs = []
    for layer in model.model.layers:
        att = layer.self_attn
        hs.append(att.q_norm.register_forward_hook(lambda m, a, o: seen["q"].append(o.detach().clone())))
        hs.append(att.k_norm.register_forward_hook(lambda m, a, o: seen["k"].append(o.detach().clone())))
        hs.append(att.v_proj.register_forward_hook(lambda m, a, o: seen["v"].append(o.detach().clone())))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hs:
        h.remove()
    return {n: float(torch.cat([t.flatten() for t in v]).abs().gt(clip).float().mean()) for n, v in seen.items()}


def build(family: str, seed: int):
    config = family_config(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    perturb(model, gen)
    model.eval()
    ids, mask = make_inputs(config, gen)
    return model, ids, mask


def run_reference(model, ids, mask):
    blocks = moe_blocks(model)
    cfg = model.config
    k = cfg.num_experts_per_tok
    renorm = True if cfg.model_type == "mixtral" else bool(cfg.norm_topk_prob)
    rec = Recorder(model, blocks)
    b, s = ids.shape
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    ref: dict[str, torch.Tensor] = {}
    gaps = []
    for kk, blk in enumerate(blocks):
        (call,) = rec.calls[blk]
        logits = out.router_logits[kk]
        assert torch.equal(logits, call["logits"]), "output_router_logits and the gate hook disagree"
        idx, w = route(logits, k, renorm)
        assert torch.equal(idx, call["indices"]) and torch.equal(w, call["scores"]), \
            f"block {blk}: recomputed top-k differs from the router's own"
        gaps.append(min_gap(logits, k))
        e = logits.shape[-1]
        ref[f"router.{kk}.router_logits"] = logits.reshape(b, s, e).float().contiguous()
        ref[f"router.{kk}.topk_ids"] = idx.reshape(b, s, k).to(torch.int32).contiguous()
        ref[f"router.{kk}.topk_weights"] = w.reshape(b, s, k).float().contiguous()
        ref[f"router.{kk}.router_input"] = call["input"].reshape(b, s, -1).float().contiguous()
    ref["logits"] = out.logits.float().contiguous()
    forward_positions = rec.positions[0]

    # Greedy generation, with the router of every decode step and the position ids transformers used.
    rec.reset()
    with torch.no_grad():
        g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                           min_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                           output_logits=True)
    seq = g.sequences
    assert seq.shape == (b, s + NEW_TOKENS)
    step_logits = torch.stack(g.logits, dim=1)  # [B, N, V], raw (before min_new_tokens' EOS mask)
    lm_gap = min_gap(step_logits, 1)
    eos_argmax = bool((step_logits.argmax(-1) == cfg.eos_token_id).any())
    assert torch.equal(step_logits.argmax(-1), seq[:, s:]), "generated tokens are not the raw argmax"
    ref["generated_ids"] = seq.to(torch.int32).contiguous()
    gen_positions = torch.cat(rec.positions, dim=1).expand(b, -1)  # prefill [B,S] then N-1 steps [B,1]
    assert gen_positions.shape == (b, s + NEW_TOKENS - 1)
    ref["generate_position_ids"] = gen_positions.to(torch.int64).contiguous()
    for kk, blk in enumerate(blocks):
        calls = rec.calls[blk]
        assert len(calls) == NEW_TOKENS, (blk, len(calls))
        steps = calls[1:]  # calls[0] is generate's prefill
        logits = torch.stack([c["logits"] for c in steps], dim=1)  # [B, N-1, E]
        idx, w = route(logits, k, renorm)
        assert torch.equal(idx, torch.stack([c["indices"] for c in steps], dim=1))
        assert torch.equal(w, torch.stack([c["scores"] for c in steps], dim=1))
        gaps.append(min_gap(logits, k))
        ref[f"generate_router.{kk}.router_logits"] = logits.float().contiguous()
        ref[f"generate_router.{kk}.topk_ids"] = idx.to(torch.int32).contiguous()
        ref[f"generate_router.{kk}.topk_weights"] = w.float().contiguous()
        ref[f"generate_router.{kk}.router_input"] = torch.stack([c["input"] for c in steps], dim=1).float().contiguous()
    rec.remove()

    # The documented position rule, checked against what transformers did.
    rule = mask.cumsum(-1) - 1
    rule = rule.masked_fill(mask == 0, 0)
    last = rule[:, -1:]
    steps = last + torch.arange(1, NEW_TOKENS, dtype=torch.int64)
    assert torch.equal(gen_positions, torch.cat([rule, steps], dim=1)), "position rule does not match generate"
    assert torch.equal(forward_positions.expand(b, -1), torch.arange(s).expand(b, -1)), "forward positions"

    # ... and the rule replayed without a cache: a full forward with those position ids and the grown
    # mask reproduces every greedy token (so the generated tokens attend to exactly what is documented).
    full_mask = torch.cat([mask, torch.ones((b, NEW_TOKENS - 1), dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        replay = model(input_ids=seq[:, :-1], attention_mask=full_mask, position_ids=gen_positions).logits
    assert torch.equal(replay[:, s - 1:].argmax(-1), seq[:, s:]), "cache-free replay disagrees with generate"
    replay_err = float((replay[:, s - 1:] - step_logits).abs().max())

    stats = {"min_router_logit_gap": min(gaps), "min_lm_logit_gap_generation": lm_gap,
             "eos_is_raw_argmax": eos_argmax, "replay_max_abs_logit_diff": replay_err,
             "max_top1_prob_mean": float(torch.stack([torch.softmax(ref[f"router.{i}.router_logits"], -1).max(-1)
                                                      .values.mean() for i in range(len(blocks))]).mean())}
    return ref, stats, blocks


def outputs_of(model, ids, mask):
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    return o.logits, o.router_logits


def check_loads(folder: str, model, ids, mask) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32)
    loaded.eval()
    want_sd, got_sd = model.state_dict(), loaded.state_dict()
    assert set(want_sd) == set(got_sd), f"{folder}: parameter names differ"
    for n in want_sd:
        assert torch.equal(want_sd[n], got_sd[n]), f"{folder}: {n} differs after loading"
    la, ra = outputs_of(model, ids, mask)
    lb, rb = outputs_of(loaded, ids, mask)
    assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(ra, rb)), f"{folder}: outputs differ"


def layout_of(folder: str) -> str:
    names = []
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            names += list(load_file(os.path.join(folder, f)))
    if any(n.endswith("experts.gate_up_proj") for n in names):
        return "fused 3-D: mlp.experts.gate_up_proj [E,2I,d] (gate rows then up rows), mlp.experts.down_proj [E,d,I]"
    return "per-expert: " + ", ".join(sorted({".".join(n.split(".")[3:]).replace(".0.", ".X.", 1)
                                              for n in names if ".experts.0." in n and ".layers." in n}))


def make_family(family: str, out_root: str, max_tries: int = 50) -> dict:
    for attempt in range(max_tries):
        seed = BASE_SEED[family] + attempt
        model, ids, mask = build(family, seed)
        ref, stats, blocks = run_reference(model, ids, mask)
        if stats["min_router_logit_gap"] >= MARGIN and stats["min_lm_logit_gap_generation"] >= MARGIN \
                and not stats["eos_is_raw_argmax"]:
            break
        print(f"{family}: seed {seed} rejected ({stats})", file=sys.stderr)
    else:
        raise SystemExit(f"{family}: no seed in {max_tries} tries met the margins")

    root = os.path.join(out_root, family)
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    mdir, fdir, hdir = (os.path.join(root, d) for d in ("model", "model_fused", "model_hub"))
    model.save_pretrained(mdir)
    model.save_pretrained(fdir, save_original_format=False)
    os.remove(os.path.join(fdir, "generation_config.json"))
    with open(os.path.join(mdir, "config.json")) as f:
        saved_cfg = json.load(f)
    hub_sd = write_hub_folder(family, model, saved_cfg, hdir)
    shutil.copy(os.path.join(mdir, "generation_config.json"), hdir)
    # model/ (transformers' own reverse conversion) and model_hub/ (built here) must hold the same tensors.
    saved_sd = load_file(os.path.join(mdir, "model.safetensors"))
    assert set(saved_sd) == set(hub_sd), sorted(set(saved_sd) ^ set(hub_sd))
    assert all(torch.equal(saved_sd[n], hub_sd[n]) for n in hub_sd)
    for d in (mdir, fdir, hdir):
        check_loads(d, model, ids, mask)

    save_file({"input_ids": ids.contiguous(), "attention_mask": mask.contiguous()},
              os.path.join(root, "inputs.safetensors"))
    save_file(ref, os.path.join(root, "reference.safetensors"))
    cfg = model.config
    extra = {"clip_fractions_qkv": clip_fractions(model, ids, mask)} if family == "olmoe" else {}
    if family == "olmoe":
        assert extra["clip_fractions_qkv"]["q"] > 0 and extra["clip_fractions_qkv"]["k"] > 0
    meta = {
        "family": family,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "generate_new_tokens": NEW_TOKENS,
        "seed": seed,
        "position_ids_rule": POSITION_IDS_RULE,
        "moe_blocks": blocks,
        "num_experts": int(ref["router.0.router_logits"].shape[-1]),
        "top_k": int(cfg.num_experts_per_tok),
        "renormalize_topk": family == "mixtral" or bool(cfg.norm_topk_prob),
        "pad_token_id": int(cfg.pad_token_id) if cfg.pad_token_id is not None else 0,
        "eos_token_id": int(cfg.eos_token_id),
        "row_lengths": list(ROW_LENGTHS),
        "layouts": {"model": layout_of(mdir), "model_fused": layout_of(fdir), "model_hub": layout_of(hdir)},
        "router_scale": ROUTER_SCALE,
        "margin": MARGIN,
        **stats,
        **extra,
        "notes": (
            "Random weights: transformers' init under torch.manual_seed(seed), then router weights x"
            f"{ROUTER_SCALE}, RMSNorm weights 1 + {NORM_WEIGHT_STD}*N(0,1), biases {BIAS_STD}*N(0,1) "
            "(torch.Generator seeded seed+1, which also draws the input ids). float32, eager attention. "
            "router.{k}.* count MoE layers only (k -> block: moe_blocks); topk_ids are in descending weight "
            "order; no ties: every gap between consecutive sorted router logits among the top k+1 and "
            "between the two largest LM logits of each generation step is >= margin (min values above). "
            "logits and router.* come from model(input_ids, attention_mask) (forward position rule). "
            "generate_router.{k}.* [B,N-1,...]: the router of decode step j = 1..N-1, which feeds new token j "
            "(the first new token comes from generate's prefill). generate_position_ids [B,S+N-1]: the "
            "position ids transformers used in generate (prefill then one per decode step)."),
    }
    with open(os.path.join(root, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    with open(os.path.join(root, "SOURCE.txt"), "w") as f:
        f.write(
            f"Made by scripts/make_lm_fixtures.py (moetrace), {datetime.date.today().isoformat()}, with "
            f"transformers {transformers.__version__}, torch {torch.__version__}, safetensors "
            f"{safetensors.__version__}, Python {sys.version.split()[0]}; seed {seed}.\n"
            "Random weights (no licence restrictions). model/: save_pretrained; model_fused/: "
            "save_pretrained(save_original_format=False); model_hub/: per-expert Hub names built by the script "
            "from the fused tensors (the inverse of transformers' conversion_mapping.py for this family), two "
            "shards + index, config.json in the Hub's older spelling. All three load back with from_pretrained "
            "and give bit-identical logits and router logits (checked by the script). "
            "Reference outputs: eager attention, float32. See ../README.md and meta.json.\n")
    print(f"{family}: seed {seed}, {json.dumps(stats)}")
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data", "fixtures_lm"))
    ap.add_argument("--family", action="append", choices=FAMILIES)
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    for fam in args.family or FAMILIES:
        make_family(fam, args.out)


if __name__ == "__main__":
    main()
