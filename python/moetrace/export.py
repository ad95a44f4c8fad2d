"""Traces where researchers work: pandas, Parquet shards, Hugging Face `datasets`.

to_pandas(store)          one row per (token, MoE layer); columns in TOKEN_LAYER_COLUMNS.
export_parquet(store, d)  one row per sample, list columns per layer (schema in docs/TRACE_FORMAT.md,
                          "Parquet export"); d/data/train-NNNNN-of-MMMMM.parquet plus d/README.md (a
                          dataset card whose `configs` entry lets the Hub and
                          `datasets.load_dataset(d)` find the files).
hf_dataset(d)             the export loaded as a `datasets.Dataset` (push_to_hub accepts it).
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from . import keys
from .errors import StoreError
from .progress import bar
from .store import TraceStore, open_store

# to_pandas(): dtypes per column. The memory cost is about 26 bytes per (token, layer) row without
# logits (categoricals for the strings), plus 4*E bytes per row with logits=True.
TOKEN_LAYER_COLUMNS = {
    "sample": "int32", "sample_id": "category", "dataset": "category", "synthetic": "bool",
    "position": "int32", "token_id": "int32", "layer": "category", "expert": "int16",
    "gate": "float32", "dropped": "bool",
}


def _store(store) -> TraceStore:
    return store if isinstance(store, TraceStore) else open_store(store)


def _layers(store: TraceStore, layers: Iterable | None) -> list[str]:
    if layers is None:
        return list(store.layers)
    out = [keys.layer(store.encoder_stack, int(x)) if isinstance(x, (int, np.integer)) or str(x).isdecimal() else str(x)
           for x in layers]
    for name in out:
        if name not in store.layers:
            raise KeyError(f"no MoE layer {name!r} in {store.path} (layers: {', '.join(store.layers)})")
    return out


def to_pandas(store, layers: Iterable | None = None, real_only: bool = False, logits: bool = False,
              progress: bool = False):
    """A pandas DataFrame with one row per (token, MoE layer): columns TOKEN_LAYER_COLUMNS (plus
    `router_logits`, a float32 [E] array per row, with logits=True; in a --logits topk:K store
    `router_topk_logits` float32 [K], `router_topk_ids` int32 [K] and `router_lse` instead). Decoder layers'
    rows are the generation steps, with token_id the step's decoder input id. With k > 1 experts per token
    `expert` and `gate` are the top choice's and `experts` / `gates` hold all k (int16 / float32 [k] per row).

    Memory: everything is materialised: about 26 bytes per row, rows = tokens x layers (a store of
    1M tokens and 6 MoE layers: ~160 MB; with logits and 128 experts add 512 bytes per row: ~3 GB).
    For bigger stores read store.column() chunks, or export_parquet() and query the files."""
    import pandas as pd

    store = _store(store)
    names = _layers(store, layers)
    frames = []
    for shard in bar(store.iter_shards(), total=len(store.shards), desc="to_pandas", enabled=progress):
        if shard.num_samples == 0:
            continue
        md = shard.metadata
        kinds = np.asarray(shard.tensor("sample_kind"))
        for name in names:
            dec = keys.is_generation(name)
            off = shard.dec_sample_offsets if dec else shard.sample_offsets
            k_expert, k_gate, k_dropped, k_logits = (keys.layer_tensor(name, f) for f in (
                keys.EXPERT, keys.GATE, keys.DROPPED, keys.ROUTER_LOGITS))
            if off is None or not shard.has(k_expert):
                continue
            lengths = np.diff(off)
            keep_sample = np.ones(shard.num_samples, bool) if not real_only else kinds == 0
            keep_rows = np.repeat(keep_sample, lengths)
            ex = np.asarray(shard.tensor(k_expert))[keep_rows].reshape(int(keep_rows.sum()), -1)  # [rows, k]
            gt = (np.asarray(shard.tensor(k_gate, float32=True))[keep_rows].astype(np.float32).reshape(ex.shape)
                  if shard.has(k_gate) else None)
            keep = np.repeat(keep_sample, lengths)
            local = np.repeat(np.arange(shard.num_samples), lengths)[keep]
            pos = (np.arange(int(off[-1])) - np.repeat(off[:-1], lengths))[keep]
            cols = {
                "sample": (local + shard.first_sample).astype(np.int32),
                "sample_id": np.asarray(md["sample_ids"], object)[local],
                "dataset": np.asarray(md["datasets"], object)[local],
                "synthetic": kinds[local] == 1,
                "position": pos.astype(np.int32),
                "token_id": np.asarray(shard.tensor(shard.gen_name("input_ids") if dec else "token_ids"))[keep]
                .astype(np.int32),
                "layer": np.full(local.size, name, object),
                "expert": ex[:, 0].astype(np.int16),
                "gate": gt[:, 0] if gt is not None else np.full(local.size, np.nan, np.float32),
                "dropped": np.asarray(shard.tensor(k_dropped))[keep].astype(bool)
                if shard.has(k_dropped) else np.zeros(local.size, bool),
            }
            if store.top_k > 1:
                cols["experts"] = list(ex.astype(np.int16))
                cols["gates"] = list(gt) if gt is not None else [None] * local.size
            if logits and store.logits_topk:
                for f in (keys.ROUTER_TOPK_LOGITS, keys.ROUTER_TOPK_IDS, keys.ROUTER_LSE):
                    v = np.asarray(shard.tensor(keys.layer_tensor(name, f), float32=True))[keep]
                    cols[f] = list(v) if v.ndim > 1 else v
            elif logits:
                lg = np.asarray(shard.tensor(k_logits, float32=True))[keep].astype(np.float32)
                cols["router_logits"] = list(lg)
            frames.append(pd.DataFrame(cols))
    if not frames:
        empty = {c: pd.Series([], dtype="object" if t == "category" else t) for c, t in TOKEN_LAYER_COLUMNS.items()}
        return pd.DataFrame(empty).astype(TOKEN_LAYER_COLUMNS)
    df = pd.concat(frames, ignore_index=True)
    return df.astype({c: t for c, t in TOKEN_LAYER_COLUMNS.items() if t == "category"})


def parquet_schema(store: TraceStore, layers: list[str], logits: bool):
    """The pyarrow schema of export_parquet() (documented in docs/TRACE_FORMAT.md)."""
    import pyarrow as pa

    fields = [pa.field("sample", pa.int64()), pa.field("sample_id", pa.string()), pa.field("dataset", pa.string()),
              pa.field("row", pa.int64()), pa.field("synthetic", pa.bool_()),
              pa.field("token_ids", pa.list_(pa.int32()))]
    if any(keys.is_generation(n) for n in layers):
        fields += [pa.field("dec_input_ids", pa.list_(pa.int32())), pa.field("dec_output_ids", pa.list_(pa.int32()))]
    k, kl = store.top_k, store.logits_topk
    per_choice = (lambda t: pa.list_(t)) if k == 1 else (lambda t: pa.list_(pa.list_(t, k)))  # noqa: E731
    for n in layers:
        fields += [pa.field(keys.layer_tensor(n, keys.EXPERT), per_choice(pa.int32())),
                   pa.field(keys.layer_tensor(n, keys.GATE), per_choice(pa.float32())),
                   pa.field(keys.layer_tensor(n, keys.DROPPED), pa.list_(pa.bool_()))]
        if logits and kl:
            fields += [pa.field(keys.layer_tensor(n, keys.ROUTER_TOPK_LOGITS), pa.list_(pa.list_(pa.float32(), kl))),
                       pa.field(keys.layer_tensor(n, keys.ROUTER_TOPK_IDS), pa.list_(pa.list_(pa.int32(), kl))),
                       pa.field(keys.layer_tensor(n, keys.ROUTER_LSE), pa.list_(pa.float32()))]
        elif logits:
            fields.append(pa.field(keys.layer_tensor(n, keys.ROUTER_LOGITS),
                                   pa.list_(pa.list_(pa.float32(), store.num_experts))))
    return pa.schema(fields, metadata={"moetrace": json.dumps({
        "format": "moetrace-parquet", "version": 1, "num_experts": store.num_experts,
        "routing": {"family": store.family, "top_k": k, "dropped": store.has_dropped}, "logits_topk": kl,
        "model": (store.manifest.get("model") or {}).get("id"),
        "demo_model": bool((store.manifest.get("model") or {}).get("demo"))})})


def _list_array(values: np.ndarray, offsets: np.ndarray, typ):
    import pyarrow as pa
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, type=typ))


def _shard_table(store, shard, layers, logits, schema, real_only):
    import pyarrow as pa

    md = shard.metadata
    kinds = np.asarray(shard.tensor("sample_kind"))
    keep = np.flatnonzero(kinds == 0) if real_only else np.arange(shard.num_samples)
    off = shard.sample_offsets
    doff = shard.dec_sample_offsets

    def rows_of(o):  # the kept samples' token rows and their new offsets
        lens = np.diff(o)[keep]
        idx = np.concatenate([np.arange(o[k], o[k + 1]) for k in keep]) if keep.size else np.zeros(0, np.int64)
        return idx.astype(np.int64), np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)

    enc_idx, enc_off = rows_of(off)
    cols = {
        "sample": pa.array(keep + shard.first_sample, pa.int64()),
        "sample_id": pa.array([md["sample_ids"][k] for k in keep], pa.string()),
        "dataset": pa.array([md["datasets"][k] for k in keep], pa.string()),
        "row": pa.array([int(md["rows"][k]) if str(md["rows"][k]).lstrip("-").isdigit() else -1 for k in keep],
                        pa.int64()),
        "synthetic": pa.array(kinds[keep] == 1, pa.bool_()),
        "token_ids": _list_array(np.asarray(shard.tensor("token_ids"))[enc_idx].astype(np.int32), enc_off, pa.int32()),
    }
    dec_idx = dec_off = None
    if "dec_input_ids" in schema.names:
        if doff is None:
            raise StoreError(f"{shard.path}: no decoder rows ({shard.gen_name('sample_offsets')}) but the store has "
                             f"decoder layers")
        dec_idx, dec_off = rows_of(doff)
        for key, tensor in (("dec_input_ids", shard.gen_name("input_ids")), ("dec_output_ids", shard.gen_name("output_ids"))):
            cols[key] = _list_array(np.asarray(shard.tensor(tensor))[dec_idx].astype(np.int32), dec_off, pa.int32())
    for n in layers:
        idx, o = (dec_idx, dec_off) if keys.is_generation(n) else (enc_idx, enc_off)
        k_expert, k_gate, k_dropped, k_logits = (keys.layer_tensor(n, f) for f in (
            keys.EXPERT, keys.GATE, keys.DROPPED, keys.ROUTER_LOGITS))  # also the Parquet column names

        def rows(name, typ, width, f32=False):  # a per-token tensor as list<typ> or list<fixed_size_list<typ, width>>
            v = np.asarray(shard.tensor(name, float32=f32))[idx]
            if width == 0:
                return _list_array(v, o, typ)
            inner = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel(), typ), width)
            return pa.ListArray.from_arrays(pa.array(o.astype(np.int32)), inner)
        kk = store.top_k if store.top_k > 1 else 0
        cols[k_expert] = rows(k_expert, pa.int32(), kk)
        cols[k_gate] = rows(k_gate, pa.float32(), kk, True)
        cols[k_dropped] = (_list_array(np.asarray(shard.tensor(k_dropped))[idx].astype(bool), o, pa.bool_())
                           if shard.has(k_dropped) else _list_array(np.zeros(idx.size, bool), o, pa.bool_()))
        if logits and store.logits_topk:
            kl = store.logits_topk
            cols[keys.layer_tensor(n, keys.ROUTER_TOPK_LOGITS)] = rows(keys.layer_tensor(n, keys.ROUTER_TOPK_LOGITS),
                                                                      pa.float32(), kl, True)
            cols[keys.layer_tensor(n, keys.ROUTER_TOPK_IDS)] = rows(keys.layer_tensor(n, keys.ROUTER_TOPK_IDS),
                                                                   pa.int32(), kl)
            cols[keys.layer_tensor(n, keys.ROUTER_LSE)] = rows(keys.layer_tensor(n, keys.ROUTER_LSE), pa.float32(), 0)
        elif logits:
            lg = np.asarray(shard.tensor(k_logits, float32=True))[idx].astype(np.float32)
            inner = pa.FixedSizeListArray.from_arrays(pa.array(lg.ravel(), pa.float32()), store.num_experts)
            cols[k_logits] = pa.ListArray.from_arrays(pa.array(o.astype(np.int32)), inner)
    return pa.table([cols[f.name] for f in schema], schema=schema)


CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
tags:
- moetrace
- mixture-of-experts
- routing-traces
---
# Routing traces of {model}

Exported by `python -m moetrace export-parquet` from the moetrace trace store `{store}`:
{samples} samples, {experts} experts, MoE layers {layers}.{demo}
One row per sample; per MoE layer `L` the list columns `L.expert`, `L.gate`, `L.dropped`
(one entry per token){logits}. Schema: moetrace docs/TRACE_FORMAT.md, "Parquet export".

```python
import datasets
ds = datasets.load_dataset("parquet", data_dir="PATH/data", split="train")
```
"""


def export_parquet(store, out_dir: str | os.PathLike, layers: Iterable | None = None, logits: bool = False,
                   real_only: bool = False, progress: bool = False) -> dict:
    """Writes OUT/data/train-NNNNN-of-MMMMM.parquet (one file per non-empty store shard, one row per
    sample) and OUT/README.md (a Hub dataset card). Returns {"files", "rows", "schema"}."""
    import pyarrow.parquet as pq

    store = _store(store)
    names = _layers(store, layers)
    out_dir = os.fspath(out_dir)
    data = os.path.join(out_dir, "data")
    try:
        os.makedirs(data, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{out_dir}: cannot create the export directory: {e.strerror or e}") from None
    stale = [f for f in os.listdir(data) if f.endswith(".parquet")]
    if stale:
        raise StoreError(f"{data}: already holds {len(stale)} Parquet files; export into an empty directory")
    schema = parquet_schema(store, names, logits)
    shards = [s for s in store.shards if s.num_samples > 0]
    files, rows = [], 0
    for k, shard in enumerate(bar(shards, total=len(shards), desc="export-parquet", enabled=progress)):
        table = _shard_table(store, shard, names, logits, schema, real_only)
        shard.release()
        name = f"train-{k:05d}-of-{len(shards):05d}.parquet"
        pq.write_table(table, os.path.join(data, name), compression="zstd")
        files.append(os.path.join("data", name))
        rows += table.num_rows
    model = store.manifest.get("model") or {}
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(CARD.format(model=model.get("id") or "?", store=os.path.abspath(store.path), samples=rows,
                            experts=store.num_experts, layers=", ".join(names),
                            demo=("\n**The model is a random-weight demo model: this routing says nothing about a "
                                  "trained model's.**\n") if model.get("demo") else "",
                            logits=", and `L.router_logits` (per token a list of E float32)" if logits else ""))
    return {"files": files, "rows": rows, "schema": schema}


def hf_dataset(out_dir: str | os.PathLike, split: str = "train", cache_dir: str | None = None):
    """The export_parquet() output as a `datasets.Dataset`; `.push_to_hub("user/name")` shares it (or
    upload OUT/ as it is: its README.md card points the Hub at the Parquet files). cache_dir: where
    `datasets` keeps its Arrow cache (default ~/.cache/huggingface/datasets)."""
    import datasets

    return datasets.load_dataset("parquet", data_dir=os.path.join(os.fspath(out_dir), "data"), split=split,
                                 cache_dir=cache_dir)
