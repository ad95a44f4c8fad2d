"""Records in the structure of the seed system's routing traces, and export to its pickle format.

The seed pickled a list of per-(sample, encoder MoE layer) records. gating_records() yields them as
dicts with the seed's keys and numpy values; export_pickle() writes that list (or instances of the
GatingDataPoint dataclass below) plus the seed's metadata JSON beside it.

Record fields (S tokens, E experts, d = d_model):
  layer_id          int: the block index of the (encoder / prompt-pass) MoE layer (1, 3, ..., 11)
  hidden_states     float32 [S, d]: the router's input when the store has it (--hidden), else None
  input_embeddings  int64 [S]: the token ids (the seed stored the ids under this name, not embeddings)
  target_routing    float32 [S, E]: softmax of the stored router logits; argmax(target_routing) equals
                    target_top_k[:, 0] on every row (see consistent_routing for stored-logit ties).
                    A --logits topk:K store keeps K probabilities per token: they are exact (exp(l - lse))
                    at the K stored experts and 0 elsewhere, so a row sums to less than 1
  target_top_k      int64 [S, k]: the k experts as the engine chose them (the stored `expert`, k = the
                    store's top_k: [S, 1] for Switch), in descending weight order
  prev_layer_gates  list of float32 [S, E]: target_routing of up to 3 earlier MoE layers, oldest first
  sequence_length   int: S
  token_ids         int64 [S]
  dataset_name      str: the catalog name, e.g. glue/mrpc
  sample_id         str: '<dataset>/<config>/<split>/<row>'
The seed held torch tensors; these are numpy arrays (torch.from_numpy() converts without a copy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from typing import Any, Iterable, Iterator

import numpy as np

from . import keys
from .store import TraceStore, open_store, softmax

PREV_LAYERS = 3  # the seed's window of earlier layers' gates
SEED_METADATA_FIELDS = ("total_traces", "num_experts", "expert_distribution", "experts_used",
                        "diversity_percentage", "dataset_distribution", "collection_time", "device")


@dataclasses.dataclass
class GatingDataPoint:
    """The seed's record type with numpy arrays in place of torch tensors. Unpickling instances needs
    the moetrace package importable (pickle stores the class as moetrace.compat.GatingDataPoint)."""

    layer_id: int
    hidden_states: Any
    input_embeddings: Any
    target_routing: Any
    target_top_k: Any
    prev_layer_gates: list
    sequence_length: int
    token_ids: Any
    dataset_name: str
    sample_id: str


def consistent_routing(probs: np.ndarray, expert: np.ndarray) -> np.ndarray:
    """probs [S, E] float32 with argmax(probs) == expert on every row; returns probs (changed in place).

    The engine picks the expert from fp32 logits; a store keeping F16/BF16 logits can round two of
    them to the same value. Rounding is monotonic, so the stored expert's logit is then tied with
    the largest, never below it, and argmax (lowest index on ties) may name the other expert. The
    stored expert is the truth: on such rows its probability is raised by one float32 ulp (a change
    of about 1e-7), so that argmax(target_routing) agrees with target_top_k."""
    expert = expert.reshape(expert.shape[0], -1)[:, 0] if expert.ndim > 1 else expert
    wrong = np.flatnonzero(probs.argmax(axis=1) != expert)
    if wrong.size:
        top = probs[wrong].max(axis=1)
        probs[wrong, expert[wrong]] = np.nextafter(top, np.float32(np.inf))
    return probs


def _routing(view, num_experts: int) -> np.ndarray:
    """[S, E] router probabilities: the softmax of the stored logits, or in a --logits topk:K store
    the K exact probabilities scattered into zeros (the rest is not stored)."""
    if not view.logits_topk:
        return softmax(view.router_logits)
    ids, p = view.router_topk_ids, view.topk_probs
    out = np.zeros((ids.shape[0], num_experts), np.float32)
    np.put_along_axis(out, ids.astype(np.int64), p, axis=1)
    return out


def _encoder_layers(store: TraceStore, layers: Iterable | None) -> list[int]:
    """Normalises a layer selection (block indices or 'enc.{i}' names) to encoder block indices."""
    if layers is None:
        return list(store.encoder_layers)
    out = []
    for x in layers:
        s = str(x)
        parsed = keys.parse_layer(s)
        i = parsed.block if parsed is not None and parsed.stack == store.encoder_stack else int(s)
        if i not in store.encoder_layers:
            raise KeyError(f"no encoder MoE layer {x!r} in {store.path} (encoder layers: {store.encoder_layers})")
        out.append(i)
    return out


def gating_records(store: TraceStore | str | os.PathLike, layers: Iterable | None = None,
                   limit: int | None = None, real_only: bool = False) -> Iterator[dict]:
    """Yields one seed-style dict per (sample, encoder MoE layer), samples in store order, layers in
    block order. `layers` restricts the records written (prev_layer_gates still use all earlier MoE
    layers of the model); `limit` caps the number of samples; `real_only` skips synthetic samples."""
    if not isinstance(store, TraceStore):
        store = open_store(store)
    wanted = set(_encoder_layers(store, layers))
    done = 0
    for sample in store:
        if limit is not None and done >= limit:
            return
        if real_only and sample.synthetic:
            continue
        done += 1
        token_ids = np.array(sample.token_ids, dtype=np.int64)
        gates: list[np.ndarray] = []
        for block in store.encoder_layers:
            view = sample.layer(keys.layer(store.encoder_stack, block))
            expert = np.array(view.expert, dtype=np.int64).reshape(len(token_ids), -1)  # [S, k]
            probs = consistent_routing(_routing(view, store.num_experts), expert[:, 0])
            if block in wanted:
                hidden = view.hidden
                yield {
                    "layer_id": int(block),
                    "hidden_states": None if hidden is None else np.array(hidden, dtype=np.float32),
                    "input_embeddings": token_ids.copy(),
                    "target_routing": probs,
                    "target_top_k": expert,
                    "prev_layer_gates": list(gates[-PREV_LAYERS:]),
                    "sequence_length": int(len(token_ids)),
                    "token_ids": token_ids,
                    "dataset_name": sample.dataset,
                    "sample_id": sample.sample_id,
                }
            gates.append(probs)


def seed_metadata(store: TraceStore, records_summary: dict) -> dict:
    """The seed's metadata fields for the exported records, with the manifest's definitions: equal to
    the manifest's own values when the whole store is exported (a test checks that), and right for a
    filtered export too. collection_time and device come from the manifest."""
    m = store.manifest
    counts = records_summary["expert_counts"]
    used = int(np.count_nonzero(counts))
    return {
        "total_traces": records_summary["traces"],
        "num_experts": store.num_experts,
        "expert_distribution": {str(e): int(c) for e, c in enumerate(counts)},
        "experts_used": used,
        "diversity_percentage": 100.0 * used / store.num_experts if store.num_experts else 0.0,
        "dataset_distribution": dict(sorted(records_summary["datasets"].items())),
        "collection_time": m.get("collection_time"),
        "device": m.get("device"),
    }


class _StreamedList:
    """Pickles as a plain list whose items are pickled one at a time (bounded memory)."""

    def __init__(self, items: Iterable):
        self.items = items

    def __reduce__(self):
        return list, (), None, iter(self.items)


def export_pickle(store: TraceStore | str | os.PathLike, out_path: str | os.PathLike,
                  layers: Iterable | None = None, limit: int | None = None, fmt: str = "dict",
                  real_only: bool = False) -> dict:
    """Writes OUT.pkl (a list of records: dicts, or GatingDataPoint with fmt='dataclass') and OUT.json
    (the seed's metadata fields computed over the exported records, plus `source_store`, `filtered`,
    `exported_traces`, `record_format`). Returns the metadata."""
    if fmt not in ("dict", "dataclass"):
        raise ValueError(f"fmt must be 'dict' or 'dataclass', not {fmt!r}")
    if not isinstance(store, TraceStore):
        store = open_store(store)
    out_path = os.fspath(out_path)
    filtered = layers is not None or limit is not None or real_only
    summary = {"traces": 0, "expert_counts": np.zeros(store.num_experts, np.int64), "datasets": {}}

    def records():
        for rec in gating_records(store, layers=layers, limit=limit, real_only=real_only):
            summary["traces"] += 1
            # each of a token's k experts counts once, as in the manifest's expert_distribution
            summary["expert_counts"] += np.bincount(rec["target_top_k"].ravel(), minlength=store.num_experts)[:store.num_experts]
            summary["datasets"][rec["dataset_name"]] = summary["datasets"].get(rec["dataset_name"], 0) + 1
            yield GatingDataPoint(**rec) if fmt == "dataclass" else rec

    parent = os.path.dirname(os.path.abspath(out_path))
    try:
        os.makedirs(parent, exist_ok=True)  # the seed created missing directories too
    except OSError as e:
        from .errors import StoreError
        raise StoreError(f"{out_path}: cannot create its directory {parent}: {e.strerror or e}") from None
    tmp = out_path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            pickler = pickle.Pickler(f, protocol=4)
            pickler.fast = True  # no memo: records are written and forgotten one by one
            pickler.dump(_StreamedList(records()))
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    meta = seed_metadata(store, summary)
    meta["source_store"] = os.path.abspath(store.path)
    meta["filtered"] = filtered
    meta["exported_traces"] = summary["traces"]
    meta["record_format"] = fmt
    json_path = os.path.splitext(out_path)[0] + ".json"
    with open(json_path, "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta
