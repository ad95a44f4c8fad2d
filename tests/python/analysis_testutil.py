"""Hand-made trace stores for the analyze/speculate tests: a small safetensors writer (independent of
the moetrace reader) and builders for stores whose statistics are known in advance."""

from __future__ import annotations

import json
import os
import struct

import numpy as np

_DT = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
       np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "BF16"}


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """uint16 arrays are written as BF16 (bits), like the store's hidden states."""
    header: dict = {"__metadata__": metadata}
    blobs, off = [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        b = arr.tobytes()
        header[name] = {"dtype": _DT[arr.dtype], "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def logits_for(experts: np.ndarray, num_experts: int, rng: np.random.Generator, margin: float = 3.0) -> np.ndarray:
    """[T, E] float32 logits whose argmax is `experts` (noise below the margin)."""
    t = experts.shape[0]
    lg = rng.uniform(-1.0, 0.0, size=(t, num_experts)).astype(np.float32)
    lg[np.arange(t), experts] = margin
    return lg


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bit patterns (uint16, truncated), as the store keeps BF16 tensors."""
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def make_store(path: str, *, lengths, experts: dict[str, np.ndarray], num_experts: int,
               token_ids: np.ndarray | None = None, logits: dict[str, np.ndarray] | None = None,
               dropped: dict[str, np.ndarray] | None = None, hidden: dict[str, np.ndarray] | None = None,
               datasets: list[str] | None = None, sample_ids: list[str] | None = None,
               samples_per_shard: int = 7, d_model: int = 16, seed: int = 0,
               dec_lengths=None, dec_experts: dict[str, np.ndarray] | None = None,
               dec_input_ids: np.ndarray | None = None, logits_dtype=np.float32, kinds=None) -> str:
    """Writes a store. `experts` maps "enc.{i}" to the [T] top-1 experts of all samples concatenated
    (sample k has lengths[k] tokens); logits default to ones whose argmax is that expert."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int64)
    n = len(lengths)
    offs = np.concatenate([[0], np.cumsum(lengths)])
    t_all = int(offs[-1])
    if token_ids is None:
        token_ids = rng.integers(2, 100, size=t_all).astype(np.int32)
    datasets = datasets or ["ds/a"] * n
    sample_ids = sample_ids or [f"{datasets[k]}/default/train/{k}" for k in range(n)]
    kinds = np.zeros(n, np.uint8) if kinds is None else np.asarray(kinds, np.uint8)
    logits = dict(logits or {})
    for name, ex in experts.items():
        if name not in logits:
            logits[name] = logits_for(ex, num_experts, rng)
    enc_blocks = sorted(int(k.split(".")[1]) for k in experts)
    dec_blocks = sorted(int(k.split(".")[1]) for k in (dec_experts or {}))
    if dec_experts:
        dec_lengths = np.asarray(dec_lengths, np.int64)
        doffs = np.concatenate([[0], np.cumsum(dec_lengths)])
        if dec_input_ids is None:
            dec_input_ids = rng.integers(0, 50, size=int(doffs[-1])).astype(np.int32)
        dec_logits = {k: logits_for(v, num_experts, rng) for k, v in dec_experts.items()}
    os.makedirs(path, exist_ok=True)
    shards, per_layer = [], {}
    for s0 in range(0, n, samples_per_shard):
        s1 = min(n, s0 + samples_per_shard)
        a, b = int(offs[s0]), int(offs[s1])
        t = {"token_ids": token_ids[a:b].astype(np.int32),
             "sample_offsets": (offs[s0:s1 + 1] - a).astype(np.int64),
             "sample_kind": kinds[s0:s1]}
        for name in experts:
            lg = logits[name][a:b]
            t[f"{name}.router_logits"] = to_bf16_bits(lg) if logits_dtype == "bf16" else lg.astype(logits_dtype)
            t[f"{name}.expert"] = experts[name][a:b].astype(np.int32)
            dr = dropped[name][a:b] if dropped and name in dropped else np.zeros(b - a)
            t[f"{name}.dropped"] = dr.astype(np.uint8)
            t[f"{name}.gate"] = softmax(logits[name][a:b].astype(np.float32)).max(axis=1).astype(np.float32)
            if hidden and name in hidden:
                h = hidden[name][a:b]  # uint16 arrays are kept as BF16 bits
                t[f"{name}.hidden"] = h if h.dtype == np.uint16 else h.astype(np.float32)
        ndec = 0
        if dec_experts:
            da, db = int(doffs[s0]), int(doffs[s1])
            ndec = db - da
            t["dec.input_ids"] = dec_input_ids[da:db].astype(np.int32)
            t["dec.output_ids"] = np.roll(dec_input_ids[da:db], -1).astype(np.int32)
            t["dec.sample_offsets"] = (doffs[s0:s1 + 1] - da).astype(np.int64)
            for name, ex in dec_experts.items():
                t[f"{name}.router_logits"] = dec_logits[name][da:db]
                t[f"{name}.expert"] = ex[da:db].astype(np.int32)
                t[f"{name}.dropped"] = np.zeros(db - da, np.uint8)
                t[f"{name}.gate"] = softmax(dec_logits[name][da:db]).max(axis=1).astype(np.float32)
        meta = {"format": "moetrace-trace", "format_version": "1", "first_sample": str(s0),
                "sample_ids": json.dumps(sample_ids[s0:s1]), "datasets": json.dumps(datasets[s0:s1]),
                "rows": json.dumps(list(range(s0, s1)))}
        fname = f"shard-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(path, fname), t, meta)
        shards.append({"file": fname, "first_sample": s0, "num_samples": s1 - s0, "num_tokens": b - a,
                       "num_decoder_tokens": ndec, "bytes": os.path.getsize(os.path.join(path, fname)),
                       "sha256": ""})
    for name, ex in experts.items():
        c = np.bincount(ex, minlength=num_experts)
        dr = int(dropped[name].sum()) if dropped and name in dropped else 0
        per_layer[name] = {"expert_counts": c.tolist(), "dropped": dr, "tokens": t_all,
                           "drop_rate": dr / max(1, t_all)}
    manifest = {
        "format": "moetrace-trace", "format_version": 1, "moetrace_version": "0.1.0", "complete": True,
        "settings": {"mode": "real", "seed": seed, "hidden_dtype": "F32" if hidden else "none",
                     "decoder": bool(dec_experts)},
        "model": {"id": "test/switch-tiny", "files": [], "demo": True,
                  "config": {"d_model": d_model, "d_ff": 4 * d_model, "num_experts": num_experts,
                             "vocab_size": 128}},
        "layers": {"encoder": enc_blocks, "decoder": dec_blocks},
        "num_experts": num_experts, "d_model": d_model, "shards": shards,
        "num_samples": n, "num_tokens": t_all, "per_layer": per_layer,
    }
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return path


def uniform_store(path, *, num_samples=60, length=50, num_experts=8, layers=(1, 3, 5), seed=0, **kw):
    rng = np.random.default_rng(seed)
    t = num_samples * length
    experts = {f"enc.{i}": rng.integers(0, num_experts, size=t).astype(np.int32) for i in layers}
    return make_store(path, lengths=[length] * num_samples, experts=experts, num_experts=num_experts,
                      seed=seed, **kw)


def permutation_store(path, *, num_samples=40, length=30, num_experts=8, layers=(1, 3, 5), seed=0, **kw):
    """Layer 1 uniform random, each later layer a fixed permutation of the previous one's expert."""
    rng = np.random.default_rng(seed)
    t = num_samples * length
    e = rng.integers(0, num_experts, size=t).astype(np.int32)
    experts = {}
    for i in layers:
        experts[f"enc.{i}"] = e
        e = rng.permutation(num_experts).astype(np.int32)[e]
    return make_store(path, lengths=[length] * num_samples, experts=experts, num_experts=num_experts,
                      seed=seed, **kw)


def png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])
