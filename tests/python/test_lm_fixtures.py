"""The committed MoE language-model parity fixtures (tests/data/fixtures_lm/, made by
scripts/make_lm_fixtures.py with transformers) against their documented layout and against a numpy
reimplementation of each family's routing rule (softmax over all experts, top-k, renormalization where
the family does it). Needs numpy and moetrace's safetensors reader only: no torch."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import REPO
from moetrace.safetensors_io import SafetensorsFile

ROOT = os.path.join(REPO, "tests", "data", "fixtures_lm")
FAMILIES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe")
ROUTER_KEYS = ("router_logits", "topk_ids", "topk_weights", "router_input")


def read_all(path: str) -> dict[str, np.ndarray]:
    f = SafetensorsFile(path)
    return {n: np.array(f.tensor(n)) for n in f.infos}


def dtypes(path: str) -> dict[str, str]:
    return {n: i.dtype for n, i in SafetensorsFile(path).infos.items()}


def load_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def weights(folder: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(read_all(os.path.join(folder, name)))
    return out


def moe_blocks(cfg: dict) -> list[int]:
    """MoE blocks as the families' decoder layers choose them (modeling_*.py DecoderLayer.__init__)."""
    n = cfg["num_hidden_layers"]
    if cfg["model_type"] in ("qwen2_moe", "qwen3_moe"):
        step, dense = cfg.get("decoder_sparse_step", 1), cfg.get("mlp_only_layers", [])
        return [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    return list(range(n))


def renormalizes(cfg: dict) -> bool:
    return cfg["model_type"] == "mixtral" or bool(cfg.get("norm_topk_prob", False))


def num_experts(cfg: dict) -> int:
    return cfg.get("num_local_experts", cfg.get("num_experts"))


def route(logits: np.ndarray, k: int, renorm: bool) -> tuple[np.ndarray, np.ndarray]:
    """softmax in float32 over all experts, the k largest in descending order (ties: lowest index),
    their probabilities, divided by their sum where the family renormalizes."""
    z = logits.astype(np.float32)
    p = np.exp(z - z.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    ids = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    w = np.take_along_axis(p, ids, axis=-1)
    if renorm:
        w = w / w.sum(-1, keepdims=True)
    return ids, w


def position_rule(mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """generate's position ids with right padding (meta.json position_ids_rule)."""
    pos = np.where(mask == 1, np.cumsum(mask, axis=-1) - 1, 0)
    steps = pos[:, -1:] + np.arange(1, new_tokens)[None, :]
    return np.concatenate([pos, steps], axis=1)


@pytest.fixture(scope="module", params=FAMILIES)
def fx(request):
    fam = request.param
    d = os.path.join(ROOT, fam)
    return {
        "family": fam, "dir": d,
        "cfg": load_json(os.path.join(d, "model", "config.json")),
        "meta": load_json(os.path.join(d, "meta.json")),
        "inputs": read_all(os.path.join(d, "inputs.safetensors")),
        "ref": read_all(os.path.join(d, "reference.safetensors")),
        "ref_dtypes": dtypes(os.path.join(d, "reference.safetensors")),
        "in_dtypes": dtypes(os.path.join(d, "inputs.safetensors")),
    }


def test_folder_layout(fx):
    d = fx["dir"]
    for name in ("model/config.json", "model/model.safetensors", "model_fused/config.json",
                 "model_fused/model.safetensors", "model_hub/config.json", "model_hub/model.safetensors.index.json",
                 "model_hub/model-00001-of-00002.safetensors", "model_hub/model-00002-of-00002.safetensors",
                 "inputs.safetensors", "reference.safetensors", "meta.json", "SOURCE.txt"):
        assert os.path.isfile(os.path.join(d, name)), f"{fx['family']}: {name} missing"
    assert fx["cfg"]["model_type"] == fx["family"]
    meta = fx["meta"]
    for key in ("family", "transformers", "torch", "generate_new_tokens", "seed", "position_ids_rule", "notes"):
        assert key in meta, f"{fx['family']}/meta.json: no {key!r}"
    assert meta["family"] == fx["family"]


def test_inputs(fx):
    ids, mask = fx["inputs"]["input_ids"], fx["inputs"]["attention_mask"]
    assert fx["in_dtypes"] == {"input_ids": "I64", "attention_mask": "I64"}
    assert ids.ndim == 2 and ids.shape == mask.shape and ids.shape[0] >= 3
    lengths = mask.sum(1)
    for r in range(mask.shape[0]):  # right padding: ones, then zeros
        assert (mask[r, :lengths[r]] == 1).all() and (mask[r, lengths[r]:] == 0).all(), f"row {r} is not right-padded"
        assert (ids[r, lengths[r]:] == fx["meta"]["pad_token_id"]).all()
    assert (lengths < mask.shape[1]).any() and (lengths == mask.shape[1]).any() and (lengths > 0).all()
    assert ids.min() >= 0 and ids.max() < fx["cfg"]["vocab_size"]


def test_reference_keys_shapes_dtypes(fx):
    cfg, ref, meta = fx["cfg"], fx["ref"], fx["meta"]
    b, s = fx["inputs"]["input_ids"].shape
    k, e, d, v, n = cfg["num_experts_per_tok"], num_experts(cfg), cfg["hidden_size"], cfg["vocab_size"], \
        meta["generate_new_tokens"]
    blocks = moe_blocks(cfg)
    assert meta["moe_blocks"] == blocks and 0 < len(blocks)
    want = {"logits": ("F32", (b, s, v)), "generated_ids": ("I32", (b, s + n)),
            "generate_position_ids": ("I64", (b, s + n - 1))}
    for i in range(len(blocks)):
        for prefix, t in (("router", s), ("generate_router", n - 1)):
            want[f"{prefix}.{i}.router_logits"] = ("F32", (b, t, e))
            want[f"{prefix}.{i}.topk_ids"] = ("I32", (b, t, k))
            want[f"{prefix}.{i}.topk_weights"] = ("F32", (b, t, k))
            want[f"{prefix}.{i}.router_input"] = ("F32", (b, t, d))
    assert set(ref) == set(want), sorted(set(ref) ^ set(want))
    for name, (dt, shape) in want.items():
        assert fx["ref_dtypes"][name] == dt, f"{name}: {fx['ref_dtypes'][name]}, expected {dt}"
        assert ref[name].shape == shape, f"{name}: {ref[name].shape}, expected {shape}"
        if dt == "F32":
            assert np.isfinite(ref[name]).all(), name
    gen = ref["generated_ids"]
    assert (gen[:, :s] == fx["inputs"]["input_ids"]).all(), "generated_ids must start with the prompt"
    assert gen.min() >= 0 and gen.max() < v


@pytest.mark.parametrize("prefix", ["router", "generate_router"])
def test_topk_follows_the_family_rule(fx, prefix):
    cfg, ref = fx["cfg"], fx["ref"]
    k, renorm = cfg["num_experts_per_tok"], renormalizes(cfg)
    assert fx["meta"]["renormalize_topk"] == renorm and fx["meta"]["top_k"] == k
    for i in range(len(moe_blocks(cfg))):
        logits = ref[f"{prefix}.{i}.router_logits"]
        ids, w = route(logits, k, renorm)
        np.testing.assert_array_equal(ref[f"{prefix}.{i}.topk_ids"], ids, err_msg=f"{prefix}.{i}.topk_ids")
        np.testing.assert_allclose(ref[f"{prefix}.{i}.topk_weights"], w, rtol=1e-5, atol=1e-7,
                                   err_msg=f"{prefix}.{i}.topk_weights")
        # The other choice of renormalization must not fit: the fixture tells the rules apart.
        _, other = route(logits, k, not renorm)
        assert not np.allclose(ref[f"{prefix}.{i}.topk_weights"], other, rtol=1e-3, atol=1e-5)
        if renorm:
            np.testing.assert_allclose(ref[f"{prefix}.{i}.topk_weights"].sum(-1), 1.0, rtol=1e-6)


def test_no_near_ties(fx):
    """Every routing decision and greedy token is at least `margin` away from a tie (so an engine within
    1e-4 of the reference must make the same choices), as meta.json claims."""
    cfg, ref, meta = fx["cfg"], fx["ref"], fx["meta"]
    k = cfg["num_experts_per_tok"]
    for name, arr in ref.items():
        if name.endswith("router_logits"):
            top = -np.sort(-arr, axis=-1)[..., :k + 1]
            gap = float((top[..., :-1] - top[..., 1:]).min())
            assert gap >= meta["margin"], f"{name}: logits {gap} from a tie"
    top = -np.sort(-ref["logits"], axis=-1)[..., :2]
    # (the forward logits are not what generate chose from at pad columns; the generation margin is
    # checked by the script on generate's own logits and recorded)
    assert meta["min_lm_logit_gap_generation"] >= meta["margin"] and not meta["eos_is_raw_argmax"]
    assert (top[..., 0] > top[..., 1]).all(), "tied LM logits"


def test_router_logits_are_router_input_times_gate(fx):
    """router_logits = router_input @ gate.weight^T with the Hub-named gate of model/ (ties the reference
    to the weights and the k -> block mapping)."""
    cfg, ref = fx["cfg"], fx["ref"]
    w = weights(os.path.join(fx["dir"], "model"))
    moe = "block_sparse_moe" if fx["family"] == "mixtral" else "mlp"
    for i, blk in enumerate(moe_blocks(cfg)):
        gate = w[f"model.layers.{blk}.{moe}.gate.weight"].astype(np.float64)
        for prefix in ("router", "generate_router"):
            got = ref[f"{prefix}.{i}.router_input"].astype(np.float64) @ gate.T
            np.testing.assert_allclose(ref[f"{prefix}.{i}.router_logits"], got, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{prefix}.{i} (block {blk})")


def test_generate_position_ids_follow_the_rule(fx):
    mask, n = fx["inputs"]["attention_mask"], fx["meta"]["generate_new_tokens"]
    np.testing.assert_array_equal(fx["ref"]["generate_position_ids"], position_rule(mask, n))


def test_three_layouts_hold_the_same_weights(fx):
    fam, d, cfg = fx["family"], fx["dir"], fx["cfg"]
    model = weights(os.path.join(d, "model"))
    hub_dir = os.path.join(d, "model_hub")
    index = load_json(os.path.join(hub_dir, "model.safetensors.index.json"))
    by_file: dict[str, set] = {}
    for name, fname in index["weight_map"].items():
        by_file.setdefault(fname, set()).add(name)
    assert sorted(by_file) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    hub = {}
    for fname, names in by_file.items():
        part = read_all(os.path.join(hub_dir, fname))
        assert set(part) == names, f"{fname}: tensors differ from the index's weight_map"
        hub.update(part)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in hub.values())
    assert set(hub) == set(model)
    for name in model:
        assert hub[name].dtype == np.float32 and np.array_equal(hub[name], model[name]), name

    fused = weights(os.path.join(d, "model_fused"))
    moe = "block_sparse_moe" if fam == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if fam == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    blocks = moe_blocks(cfg)
    for blk in blocks:
        gate_up = fused.pop(f"model.layers.{blk}.mlp.experts.gate_up_proj")
        down = fused.pop(f"model.layers.{blk}.mlp.experts.down_proj")
        router = fused.pop(f"model.layers.{blk}.mlp.gate.weight")
        e = num_experts(cfg)
        inter = gate_up.shape[1] // 2
        assert gate_up.shape == (e, 2 * inter, cfg["hidden_size"]) and down.shape == (e, cfg["hidden_size"], inter)
        base = f"model.layers.{blk}.{moe}"
        assert np.array_equal(router, model.pop(f"{base}.gate.weight"))
        for x in range(e):
            assert np.array_equal(gate_up[x, :inter], model.pop(f"{base}.experts.{x}.{names[0]}.weight"))
            assert np.array_equal(gate_up[x, inter:], model.pop(f"{base}.experts.{x}.{names[1]}.weight"))
            assert np.array_equal(down[x], model.pop(f"{base}.experts.{x}.{names[2]}.weight"))
    assert set(fused) == set(model)  # everything else carries the same name in both layouts
    for name in model:
        assert np.array_equal(fused[name], model[name]), name


def test_hub_config_spelling(fx):
    fam, cfg = fx["family"], fx["cfg"]
    hub = load_json(os.path.join(fx["dir"], "model_hub", "config.json"))
    assert "rope_parameters" in cfg and "rope_theta" not in cfg and cfg["dtype"] == "float32"  # 5.x spelling
    assert "rope_parameters" not in hub and "dtype" not in hub and hub["torch_dtype"] == "float32"
    assert hub["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    if cfg["rope_parameters"]["rope_type"] == "default":
        assert hub["rope_scaling"] is None
    else:
        assert hub["rope_scaling"] == {"type": cfg["rope_parameters"]["rope_type"],
                                       "factor": cfg["rope_parameters"]["factor"]}
    assert num_experts(hub) == num_experts(cfg)
    if fam == "mixtral":
        assert "num_local_experts" in hub
    if fam == "qwen3_moe":
        assert "num_experts" in hub and "num_local_experts" not in hub and "num_local_experts" in cfg
    thetas = {load_json(os.path.join(ROOT, f, "model", "config.json"))["rope_parameters"]["rope_theta"]
              for f in FAMILIES}
    assert len(thetas) > 1  # both a default and a non-default theta appear


def test_total_size_stays_small():
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(ROOT) for f in fs)
    assert total < 8 * 1024 * 1024, f"tests/data/fixtures_lm is {total} bytes"
