"""PyTorch access to a trace store: TraceDataset and a padding collate function.

PyTorch is optional for the moetrace package; this module alone needs it. (This is the subpackage
moetrace.torch: `import torch` below is absolute, so it imports PyTorch itself.)
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

try:
    import torch
    from torch.utils.data import Dataset
except ImportError as e:  # pragma: no cover - exercised only where torch is missing
    raise ImportError(
        "moetrace.torch needs PyTorch, which is not installed: `pip install torch` "
        "(or `pip install './python[torch]'` from the moetrace repository). "
        "The rest of moetrace (open_store, compat, export-pickle) works without it.") from e

import numpy as np

from .. import keys
from ..padding import LABEL_PAD, PAD_VALUES, pad_value
from ..store import LAYER_FIELDS, TraceStore, open_store

DEFAULT_FIELDS = ("router_logits", "expert")


class TraceDataset(Dataset):
    """Samples of a store as dicts of tensors:

        token_ids          int64 [S]
        {layer}.{field}    per requested layer ('enc.1', 'dec.1', ...) and field
                           (router_logits f32 [S,E], probs f32 [S,E], expert int64 [S], dropped bool [S],
                           gate f32 [S], hidden f32 [S,d])
        dec_input_ids, dec_output_ids  int64 [G] when a decoder layer is requested
        index (int), sample_id, dataset (str), synthetic (bool)

    layers defaults to all MoE layers of the store, fields to router_logits and expert.
    """

    def __init__(self, store: TraceStore | str | os.PathLike, layers: Iterable[str] | None = None,
                 fields: Sequence[str] | None = None, real_only: bool = False):
        self.store = store if isinstance(store, TraceStore) else open_store(store)
        self.layers = list(self.store.layers if layers is None else
                           [keys.layer(self.store.encoder_stack, x) if isinstance(x, int) else str(x) for x in layers])
        for name in self.layers:
            if name not in self.store.layers:
                raise KeyError(f"no MoE layer {name!r} in {self.store.path} (layers: {self.store.layers})")
        self.fields = tuple(DEFAULT_FIELDS if fields is None else fields)
        bad = [f for f in self.fields if f not in LAYER_FIELDS + ("probs",)]
        if bad:
            raise KeyError(f"unknown field(s) {bad}; known: {list(LAYER_FIELDS) + ['probs']}")
        if real_only:
            kinds = self.store.column("sample_kind").to_numpy() if len(self.store) else np.zeros(0)
            self.indices = np.flatnonzero(kinds == 0)
        else:
            self.indices = np.arange(len(self.store))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        sample = self.store.sample(int(self.indices[i]))
        item = {"index": sample.index, "sample_id": sample.sample_id, "dataset": sample.dataset,
                "synthetic": sample.synthetic,
                "token_ids": torch.from_numpy(np.array(sample.token_ids, dtype=np.int64))}
        if any(keys.is_generation(name) for name in self.layers):
            item["dec_input_ids"] = torch.from_numpy(np.array(sample.dec_input_ids, dtype=np.int64))
            item["dec_output_ids"] = torch.from_numpy(np.array(sample.dec_output_ids, dtype=np.int64))
        for name in self.layers:
            view = sample.layer(name)
            for field in self.fields:
                value = getattr(view, field)
                if value is None:
                    raise KeyError(f"{sample.shard.path}: {name}.{field} is not stored (collect with --hidden)")
                if field == "expert":
                    value = value.astype(np.int64)
                item[keys.layer_tensor(name, field)] = torch.from_numpy(np.array(value))
        return item


def _pad(tensors: list, value) -> "torch.Tensor":
    longest = max(t.shape[0] for t in tensors)
    out = torch.full((len(tensors), longest) + tuple(tensors[0].shape[1:]), value, dtype=tensors[0].dtype)
    for b, t in enumerate(tensors):
        out[b, :t.shape[0]] = t
    return out


def collate(batch: list[dict]) -> dict:
    """Stacks TraceDataset items, right-padding token axes: encoder tensors to the longest sample
    (`attention_mask` bool [B,S], `lengths` int64 [B]), decoder tensors to the longest generation
    (`dec_mask`, `dec_lengths`). Pads (moetrace.padding): labels -100 (expert, dec_output_ids: the
    ignore_index of CrossEntropyLoss), input ids 0, dropped False, floats 0."""
    out: dict = {}
    first = batch[0]
    for key in first:
        values = [item[key] for item in batch]
        if isinstance(first[key], torch.Tensor):
            out[key] = _pad(values, pad_value(key))
        else:
            out[key] = values
    lengths = torch.tensor([item["token_ids"].shape[0] for item in batch], dtype=torch.int64)
    out["lengths"] = lengths
    out["attention_mask"] = torch.arange(int(lengths.max()) if len(batch) else 0)[None, :] < lengths[:, None]
    if "dec_input_ids" in first:
        dec = torch.tensor([item["dec_input_ids"].shape[0] for item in batch], dtype=torch.int64)
        out["dec_lengths"] = dec
        out["dec_mask"] = torch.arange(int(dec.max()))[None, :] < dec[:, None]
    return out


TraceDataset.collate = staticmethod(collate)  # so that DataLoader(ds, collate_fn=ds.collate) works

__all__ = ["TraceDataset", "collate", "LABEL_PAD", "PAD_VALUES"]
