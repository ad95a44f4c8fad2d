"""Reading a moetrace trace store (docs/TRACE_FORMAT.md, format versions 1 and 2) with numpy alone.

Version 2 adds top-k routing (expert and gate [S, k] for k > 1), stores without `dropped` (models
without expert capacity), the lm./gen. layers of decoder-only language models, and `--logits topk:K`
(per token the K largest logits, their experts and the log-sum-exp instead of every logit).

Tensors are memory-mapped: nothing is copied until a caller asks for a converted value (BF16/F16 ->
float32, softmax probabilities, ColumnView.to_numpy()).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from typing import Iterator

import numpy as np

from . import keys
from .errors import StoreError
from .safetensors_io import DTYPES, SafetensorsFile, as_float32
from .stats import softmax  # the one softmax; moetrace.store.softmax as before

FORMAT = "moetrace-trace"
FORMAT_VERSIONS = (1, 2)  # the versions this reader knows; others are refused
LAYER_FIELDS = ("router_logits", "expert", "dropped", "gate", "hidden", "router_topk_logits", "router_topk_ids",
                "router_lse")
ROUTING_FAMILIES = ("switch", "olmoe", "mixtral", "qwen2_moe", "qwen3_moe")
REQUIRED_TENSORS = ("token_ids", "sample_offsets", "sample_kind")
# A manifest's shard path: shard-N.safetensors, or in a merged data-parallel store the rank
# directory's ranks/rank-RRRRR-of-WWWWW/shard-N.safetensors (docs/TRACE_FORMAT.md).
SHARD_PATH = re.compile(r"(ranks/rank-\d{5,}-of-\d{5,}/)?shard-\d+\.safetensors")


def open_store(path: str | os.PathLike, verify: bool = False, backend: str = "numpy") -> "TraceStore":
    """Opens the store at `path` (the directory, or its manifest.json).

    verify=True recomputes every shard's SHA-256 against the manifest (reads everything once).
    backend="numpy" maps the shards with numpy (zero copy); "safetensors" reads tensors through the
    `safetensors` package (copies; BF16 is still read here since numpy has no bfloat16).
    """
    path = os.fspath(path)
    if os.path.basename(path) == "manifest.json" and os.path.isfile(path):
        path = os.path.dirname(path) or "."
    return TraceStore(path, verify=verify, backend=backend)


def rows_f32(arr: np.ndarray, a: int, b: int, dtype: str | None = None) -> np.ndarray:
    """Rows a:b of a stored tensor as float32 (BF16 arrives as uint16 bits): the streaming passes of
    `analyze` and `speculate` read logits and hidden states a chunk of rows at a time with it."""
    x = np.asarray(arr[a:b])
    if x.dtype == np.uint16:
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32, copy=False)


def topk_probs(values: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """float32 [..., K]: the router probabilities of a --logits topk:K store's K experts,
    exp(value - lse), exact up to the F16 rounding of the stored logits (values [..., K] as stored or
    widened, lse [...] the log-sum-exp over all E logits)."""
    v = np.asarray(values, np.float32)
    return np.exp(v - np.asarray(lse, np.float32)[..., None]).astype(np.float32)


def _check_version(where: str, fmt, version) -> None:
    if fmt != FORMAT:
        raise StoreError(f"{where}: format is {fmt!r}, expected {FORMAT!r} (not a moetrace trace store)")
    try:
        v = int(version)
    except (TypeError, ValueError, OverflowError):
        v = None
    if v not in FORMAT_VERSIONS or str(version).strip() != str(v):
        known = ", ".join(str(k) for k in FORMAT_VERSIONS)
        raise StoreError(f"{where}: format_version {version!r} is not supported by this reader "
                         f"(it reads version {known}); install a newer moetrace Python package")


class Shard:
    """One committed shard: samples [first_sample, first_sample + num_samples) of the store."""

    def __init__(self, store_path: str, entry: dict, backend: str = "numpy",
                 stacks: tuple[str, str] = (keys.ENCODER, keys.DECODER), version: int | None = None):
        self.entry = entry
        self.version = version  # the manifest's format_version, which every shard must repeat
        self.stacks = stacks  # (first pass, generation) prefixes: ('enc', 'dec') or ('lm', 'gen')
        self.file = entry["file"]
        if not isinstance(self.file, str) or not SHARD_PATH.fullmatch(self.file):
            raise StoreError(f"{os.path.join(store_path, 'manifest.json')}: shard file {self.file!r} is neither "
                             f"shard-NNNNN.safetensors nor ranks/rank-RRRRR-of-WWWWW/shard-NNNNN.safetensors")
        self.path = os.path.join(store_path, self.file)
        self.first_sample = int(entry["first_sample"])
        self.num_samples = int(entry["num_samples"])
        self._backend = backend
        self._st: SafetensorsFile | None = None
        self._metadata: dict | None = None
        self._offsets: np.ndarray | None = None
        self._dec_offsets: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"Shard({self.file!r}, first_sample={self.first_sample}, num_samples={self.num_samples})"

    # -- opening and checks ------------------------------------------------------------------
    def _file(self) -> SafetensorsFile:
        if self._st is None:  # stays None when a check fails, so every access reports the problem
            st = SafetensorsFile(self.path)
            metadata = self._parse_metadata(st.metadata)
            self._offsets, self._dec_offsets = self._check_tensors(st)
            self._st, self._metadata = st, metadata
        return self._st

    def _parse_metadata(self, meta: dict) -> dict:
        _check_version(f"{self.path} (__metadata__)", meta.get("format"), meta.get("format_version"))
        if self.version is not None and str(meta.get("format_version")).strip() != str(self.version):
            raise StoreError(f"{self.path} (__metadata__): format_version {meta.get('format_version')!r} differs from "
                             f"the manifest's {self.version}")
        out = dict(meta)
        try:
            out["first_sample"] = int(meta["first_sample"])
            for key in ("sample_ids", "datasets", "rows"):
                out[key] = json.loads(meta[key])
                if not isinstance(out[key], list) or len(out[key]) != self.num_samples:
                    raise StoreError(f"{self.path}: __metadata__ {key!r} must be a JSON array of "
                                     f"{self.num_samples} entries (the manifest's num_samples)")
        except KeyError as e:
            raise StoreError(f"{self.path}: __metadata__ lacks {e.args[0]!r}") from None
        except RecursionError:
            raise StoreError(f"{self.path}: invalid __metadata__: JSON nested too deeply") from None
        except (ValueError, TypeError, OverflowError) as e:
            raise StoreError(f"{self.path}: invalid __metadata__: {e}") from None
        if out["first_sample"] != self.first_sample:
            raise StoreError(f"{self.path}: first_sample {out['first_sample']} differs from the manifest's "
                             f"{self.first_sample}")
        return out

    def gen_name(self, field: str) -> str:
        """A generation stack's own tensor: 'dec.input_ids' (Switch) or 'gen.input_ids' (a language model)."""
        return f"{self.stacks[1]}.{field}"

    def _check_tensors(self, st: SafetensorsFile) -> tuple[np.ndarray, np.ndarray | None]:
        """Checks the row structure; returns (sample_offsets, the generation's sample_offsets or None)."""
        infos = st.infos
        for name in REQUIRED_TENSORS:
            if name not in infos:
                raise StoreError(f"{self.path}: missing tensor {name!r}")
        if infos["sample_kind"].shape != (self.num_samples,):
            raise StoreError(f"{self.path}: sample_kind has shape {list(infos['sample_kind'].shape)}, "
                             f"expected [{self.num_samples}]")
        offsets = self._checked_offsets(st, "sample_offsets", infos["token_ids"].shape)
        dec_offsets = None
        gen_offsets, gen_ids = self.gen_name("sample_offsets"), self.gen_name("input_ids")
        if gen_offsets in infos:
            g = infos[gen_ids].shape if gen_ids in infos else None
            dec_offsets = self._checked_offsets(st, gen_offsets, g)
        rows = {self.stacks[0] + ".": int(offsets[-1]),
                self.stacks[1] + ".": int(dec_offsets[-1]) if dec_offsets is not None else 0}
        for name, info in infos.items():
            prefix = name.split(".", 1)[0] + "."
            if prefix in rows and name != gen_offsets and (not info.shape or info.shape[0] != rows[prefix]):
                raise StoreError(f"{self.path}: tensor {name!r} has shape {list(info.shape)}, "
                                 f"expected {rows[prefix]} rows (the last of the sample offsets)")
        return offsets, dec_offsets

    def _checked_offsets(self, st: SafetensorsFile, name: str, ids_shape: tuple | None) -> np.ndarray:
        """[N+1] offsets from 0 to the length of the 1-D ids tensor they cut, non-decreasing."""
        n = self.num_samples
        off = np.array(st.tensor(name), dtype=np.int64)
        rows = ids_shape[0] if ids_shape and len(ids_shape) == 1 else None
        if (off.shape != (n + 1,) or off[0] != 0 or np.any(np.diff(off) < 0)
                or (ids_shape is not None and off[-1] != rows)):
            raise StoreError(f"{self.path}: {name} must be {n + 1} non-decreasing offsets from 0 to the "
                             f"{rows if rows is not None else '?'} rows of its ids, got {off.tolist()[:8]}"
                             f"{'...' if off.size > 8 else ''} (shape {list(off.shape)})")
        return off

    # -- public ------------------------------------------------------------------------------
    @property
    def metadata(self) -> dict:
        """The shard's __metadata__, with first_sample as int and sample_ids/datasets/rows as lists."""
        self._file()
        return self._metadata

    @property
    def tensor_names(self) -> list[str]:
        return list(self._file().infos)

    def has(self, name: str) -> bool:
        return name in self._file().infos

    def info(self, name: str):
        """(dtype string, shape) of a tensor as the header declares it."""
        i = self._file().infos.get(name)
        if i is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return i.dtype, i.shape

    def tensor(self, name: str, float32: bool = False) -> np.ndarray:
        """A memory-mapped view of tensor `name`; BF16 comes as uint16 bits unless float32=True."""
        st = self._file()
        if name not in st.infos:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        if self._backend == "safetensors" and st.infos[name].dtype != "BF16":
            from safetensors import safe_open  # optional dependency
            with safe_open(self.path, framework="numpy") as f:
                arr = f.get_tensor(name)
            return as_float32(arr, st.infos[name].dtype) if float32 else arr
        return st.tensor(name, float32=float32)

    @property
    def sample_offsets(self) -> np.ndarray:
        """int64 [N+1]: sample k of this shard owns token rows sample_offsets[k]:sample_offsets[k+1]."""
        self._file()
        return self._offsets

    @property
    def dec_sample_offsets(self) -> np.ndarray | None:
        self._file()
        return self._dec_offsets

    @property
    def num_tokens(self) -> int:
        return int(self.sample_offsets[-1])

    def sha256(self) -> str:
        h = hashlib.sha256()
        try:
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError as e:  # missing, a directory, unreadable
            raise StoreError(f"{self.path}: cannot read: {e}") from None
        return h.hexdigest()

    def verify(self) -> None:
        """Raises StoreError when the file's SHA-256 is not the manifest's, or the manifest gives none
        (as the C++ `moetrace verify`: a shard without a checksum cannot be verified)."""
        want = self.entry.get("sha256")
        if not isinstance(want, str) or not re.fullmatch(r"[0-9a-f]{64}", want):
            raise StoreError(f"{self.path}: the manifest's entry has no sha256 (64 hex digits expected, "
                             f"got {want!r}); cannot verify the shard")
        got = self.sha256()
        if got != want:
            raise StoreError(f"{self.path}: sha256 mismatch: file has {got}, manifest says {want} "
                             f"(corrupt or rewritten shard)")

    def release(self) -> None:
        """Forgets the memory map (arrays already handed out stay valid)."""
        if self._st is not None:
            self._st.release()


class LayerView:
    """One MoE layer of one sample: per-token routing, rows in token order. k = the store's experts
    per token (store.top_k); K = its --logits topk:K (store.logits_topk, 0 for full logits)."""

    def __init__(self, shard: Shard, name: str, begin: int, end: int, logits_topk: int = 0):
        self._shard, self.name, self._begin, self._end = shard, name, begin, end
        self.logits_topk = logits_topk

    def __repr__(self) -> str:
        return f"LayerView({self.name!r}, tokens={self._end - self._begin})"

    def _rows(self, field: str, float32: bool = False) -> np.ndarray:
        name = keys.layer_tensor(self.name, field)
        rows = self._shard.tensor(name)[self._begin:self._end]  # slice the map first: converts S rows only
        return as_float32(rows, self._shard.info(name)[0]) if float32 else rows

    def _full_logits(self, what: str) -> None:
        if self.logits_topk:
            raise StoreError(f"{self._shard.path}: {self.name}.{what}: the store keeps only the "
                             f"{self.logits_topk} largest router logits per token (--logits topk:{self.logits_topk}); "
                             f"use router_topk_logits, router_topk_ids, router_lse and topk_probs")

    @property
    def router_logits(self) -> np.ndarray:
        """float32 [S, E] (widened when stored as F16/BF16). StoreError in a --logits topk:K store."""
        self._full_logits("router_logits")
        return self._rows("router_logits", float32=True)

    @property
    def probs(self) -> np.ndarray:
        """float32 [S, E]: softmax of the stored logits. StoreError in a --logits topk:K store."""
        return softmax(self.router_logits)

    @property
    def expert(self) -> np.ndarray:
        """int32 [S] (k = 1: the top-1 expert, also for dropped tokens) or [S, k] (the k experts in
        descending weight order)."""
        return self._rows("expert")

    @property
    def dropped(self) -> np.ndarray:
        """bool [S]: the token exceeded its expert's capacity and skipped the expert (all False in a
        store without capacity, which has no `dropped` tensor)."""
        if not self._shard.has(keys.layer_tensor(self.name, keys.DROPPED)):
            return np.zeros(self._end - self._begin, bool)
        return self._rows("dropped").astype(bool)

    @property
    def gate(self) -> np.ndarray:
        """float32 [S] (k = 1: the top-1 router probability) or [S, k] (the k experts' routing
        weights, renormalized where the family does), as the engine computed them."""
        return self._rows("gate", float32=True)

    @property
    def router_topk_logits(self) -> np.ndarray | None:
        """float32 [S, K]: the K largest router logits (stored F16), descending; None with full logits."""
        return self._rows(keys.ROUTER_TOPK_LOGITS, float32=True) if self.logits_topk else None

    @property
    def router_topk_ids(self) -> np.ndarray | None:
        """int32 [S, K]: their experts (ties in the fp32 logits -> lowest index); None with full logits."""
        return self._rows(keys.ROUTER_TOPK_IDS) if self.logits_topk else None

    @property
    def router_lse(self) -> np.ndarray | None:
        """float32 [S]: log-sum-exp over all E logits (fp32); None with full logits."""
        return self._rows(keys.ROUTER_LSE) if self.logits_topk else None

    @property
    def topk_probs(self) -> np.ndarray | None:
        """float32 [S, K]: the K experts' router probabilities exp(logit - lse); None with full logits."""
        return topk_probs(self.router_topk_logits, self.router_lse) if self.logits_topk else None

    @property
    def hidden(self) -> np.ndarray | None:
        """float32 [S, d_model] router input, or None when the store was collected without --hidden."""
        if not self._shard.has(f"{self.name}.hidden"):
            return None
        return self._rows("hidden", float32=True)


class Sample:
    """One sample (one input text) of a store."""

    def __init__(self, store: "TraceStore", index: int, shard: Shard, local: int):
        self.index, self.shard, self.local = index, shard, local
        meta = shard.metadata
        self.sample_id: str = meta["sample_ids"][local]
        self.dataset: str = meta["datasets"][local]
        self.row = meta["rows"][local]
        self.synthetic: bool = bool(shard.tensor("sample_kind")[local] == 1)
        off = shard.sample_offsets
        self._begin, self._end = int(off[local]), int(off[local + 1])
        dec = shard.dec_sample_offsets
        self._dec = (int(dec[local]), int(dec[local + 1])) if dec is not None else None
        self._store = store

    def __repr__(self) -> str:
        return f"Sample({self.index}, {self.sample_id!r}, tokens={len(self)})"

    def __len__(self) -> int:
        return self._end - self._begin

    @property
    def layers(self) -> list[str]:
        return self._store.layers

    @property
    def token_ids(self) -> np.ndarray:
        """int32 [S]: encoder input ids, ending in </s> = 1."""
        return self.shard.tensor("token_ids")[self._begin:self._end]

    @property
    def has_decoder(self) -> bool:
        return self._dec is not None

    def _dec_rows(self, name: str) -> np.ndarray | None:
        if self._dec is None:
            return None
        return self.shard.tensor(name)[self._dec[0]:self._dec[1]]

    @property
    def dec_input_ids(self) -> np.ndarray | None:
        """int32 [G]: decoder input token of each generation step (None without --decoder)."""
        return self._dec_rows(self.shard.gen_name("input_ids"))

    @property
    def dec_output_ids(self) -> np.ndarray | None:
        """int32 [G]: token generated at each step (None without --decoder)."""
        return self._dec_rows(self.shard.gen_name("output_ids"))

    def layer(self, name: str) -> LayerView:
        """'enc.{i}' / 'dec.{i}' (Switch) or 'lm.{i}' / 'gen.{i}' (a language model); an int i means
        the first pass's layer of block i ('enc.{i}' or 'lm.{i}')."""
        if isinstance(name, (int, np.integer)):
            name = keys.layer(self._store.encoder_stack, int(name))
        if name not in self._store.layers:
            raise KeyError(f"no MoE layer {name!r} in this store (layers: {', '.join(self._store.layers)})")
        k = self._store.logits_topk
        if keys.is_generation(name):
            if self._dec is None:
                raise KeyError(f"{self.shard.path}: no decoder routing stored (collected without --decoder)")
            return LayerView(self.shard, name, *self._dec, logits_topk=k)
        return LayerView(self.shard, name, self._begin, self._end, logits_topk=k)


class ColumnView:
    """One tensor across all shards, as if concatenated along its first axis (rows are tokens for
    per-token tensors, samples for sample_kind). Indexing reads only the shards it touches."""

    def __init__(self, store: "TraceStore", name: str, float32: bool = False):
        self.name, self.float32, self._store = name, float32, store
        shards = [s for s in store.shards if s.num_samples > 0]
        if not shards:
            raise KeyError(f"{store.path}: the store has no samples, so no column {name!r}")
        missing = [s.path for s in shards if not s.has(name)]
        if missing:
            raise KeyError(f"{missing[0]}: no tensor named {name!r}")
        self._shards = shards
        rows = [s.info(name)[1][0] if s.info(name)[1] else 0 for s in shards]
        self._starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        dtype, shape = shards[0].info(name)
        for s in shards[1:]:
            if s.info(name)[0] != dtype or tuple(s.info(name)[1][1:]) != tuple(shape[1:]):
                raise StoreError(f"{s.path}: tensor {name!r} is {s.info(name)[0]} {list(s.info(name)[1])}, but "
                                 f"{shards[0].file} has {dtype} {list(shape)}")
        self.stored_dtype = dtype
        self.shape = (int(self._starts[-1]),) + tuple(shape[1:])
        self.dtype = np.dtype(np.float32) if float32 and dtype in ("BF16", "F16", "F32", "F64") else np.dtype(DTYPES[dtype])

    def __repr__(self) -> str:
        return f"ColumnView({self.name!r}, shape={list(self.shape)}, dtype={self.dtype}, shards={len(self._shards)})"

    def __len__(self) -> int:
        return self.shape[0]

    def _shard_array(self, k: int) -> np.ndarray:
        """Shard k's tensor as stored (a map view); _convert() after indexing, so only rows read convert."""
        return self._shards[k].tensor(self.name)

    def _convert(self, arr: np.ndarray) -> np.ndarray:
        return as_float32(arr, self.stored_dtype) if self.float32 else arr

    def chunks(self) -> Iterator[np.ndarray]:
        """Yields the per-shard arrays in order (views; BF16 widened copies when float32=True)."""
        for k in range(len(self._shards)):
            yield self._convert(self._shard_array(k))

    def to_numpy(self) -> np.ndarray:
        """The whole column as one array (a copy)."""
        parts = list(self.chunks())
        return np.concatenate(parts) if parts else np.zeros(self.shape, self.dtype)

    def __array__(self, dtype=None, copy=None):
        a = self.to_numpy()
        return a.astype(dtype) if dtype is not None else a

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {key} out of range for column {self.name!r} of {n} rows")
            k = int(np.searchsorted(self._starts, i, side="right")) - 1
            return self._convert(self._shard_array(k)[(i - self._starts[k],) + rest])
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                parts = []
                for k in range(len(self._shards)):
                    lo, hi = max(start, self._starts[k]), min(stop, self._starts[k + 1])
                    if lo < hi:
                        parts.append(self._convert(self._shard_array(k)[lo - self._starts[k]:hi - self._starts[k]]))
                if len(parts) == 1:
                    out = parts[0]
                elif parts:
                    out = np.concatenate(parts)
                else:
                    out = np.zeros((0,) + self.shape[1:], self.dtype)
                return out[(slice(None),) + rest] if rest else out
            key = np.arange(start, stop, step)
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row index out of range for column {self.name!r} of {n} rows")
        out = np.empty(idx.shape + self.shape[1:], self.dtype)
        which = np.searchsorted(self._starts, idx, side="right") - 1
        for k in np.unique(which):
            sel = which == k
            out[sel] = self._convert(self._shard_array(int(k))[idx[sel] - self._starts[k]])
        return out[(Ellipsis,) + rest] if rest else out


class TraceStore:
    """A trace store directory: manifest.json plus the shards it lists."""

    def __init__(self, path: str, verify: bool = False, backend: str = "numpy"):
        if backend not in ("numpy", "safetensors"):
            raise ValueError(f"backend must be 'numpy' or 'safetensors', not {backend!r}")
        self.path = path
        manifest_path = os.path.join(path, "manifest.json")
        try:
            with open(manifest_path, "rb") as f:
                self.manifest: dict = json.loads(f.read().decode("utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{manifest_path}: not found ({path} is not a trace store)") from None
        except RecursionError:
            raise StoreError(f"{manifest_path}: cannot read: JSON nested too deeply") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: bad JSON, huge int literals
            raise StoreError(f"{manifest_path}: cannot read: {e}") from None
        if not isinstance(self.manifest, dict):
            raise StoreError(f"{manifest_path}: not a JSON object")
        _check_version(manifest_path, self.manifest.get("format"), self.manifest.get("format_version"))
        part = self.manifest.get("part")
        if isinstance(part, dict):
            store = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            raise StoreError(f"{path}: this is rank {part.get('rank')} of {part.get('world_size')}'s part of a "
                             f"data-parallel store; open the store itself ({store}) once `moetrace merge` "
                             f"has assembled it")
        try:
            layers = self.manifest.get("layers", {})
            # the MoE layers of each stack, as the block indices that hold them (moetrace.keys)
            self.encoder_layers: list[int] = [int(i) for i in layers.get("encoder", [])]
            self.decoder_layers: list[int] = [int(i) for i in layers.get("decoder", [])]
            self.num_experts: int = int(self.manifest["num_experts"])
            self.d_model: int = int(self.manifest["d_model"])
            self._read_routing(manifest_path)
            entries = list(self.manifest["shards"])
            self.shards: list[Shard] = [Shard(path, e, backend, (self.encoder_stack, self.decoder_stack),
                                              self.format_version) for e in entries]
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise StoreError(f"{manifest_path}: invalid manifest ({type(e).__name__}: {e})") from None
        self.layers: list[str] = (keys.layers(self.encoder_stack, self.encoder_layers)
                                  + keys.layers(self.decoder_stack, self.decoder_layers))
        expected = 0
        for s in self.shards:
            if s.first_sample != expected:
                raise StoreError(f"{manifest_path}: shard {s.file} starts at sample {s.first_sample}, expected {expected}")
            expected += s.num_samples
            try:
                size = os.path.getsize(s.path)
            except FileNotFoundError:
                raise StoreError(f"{s.path}: listed in {manifest_path} but missing") from None
            try:
                want = int(s.entry.get("bytes") or 0)
            except (TypeError, ValueError, OverflowError):
                raise StoreError(f"{manifest_path}: shard {s.file}: bytes {s.entry.get('bytes')!r} is not an "
                                 f"integer") from None
            if want and size != want:
                raise StoreError(f"{s.path}: {size} bytes but the manifest says {want} "
                                 f"({'truncated' if size < want else 'rewritten'} shard)")
            if verify:
                s.verify()
        self._num_samples = expected
        declared = self.manifest.get("num_samples")
        if declared is not None and (not isinstance(declared, int) or declared != expected):
            raise StoreError(f"{manifest_path}: num_samples {declared} but its shards hold {expected}")
        self._firsts = [s.first_sample for s in self.shards]
        self._ids: dict[str, int] | None = None

    def _read_routing(self, where: str) -> None:
        """Version 2's routing and --logits topk:K; a version-1 store is Switch top-1 with capacity."""
        routing = self.manifest.get("routing")
        if routing is None:
            routing = {"family": "switch", "top_k": 1, "dropped": True}
        if not isinstance(routing, dict):
            raise StoreError(f"{where}: routing must be an object")
        family, top_k, dropped = routing.get("family"), routing.get("top_k"), routing.get("dropped")
        if family not in ROUTING_FAMILIES:
            raise StoreError(f"{where}: routing.family must be one of {', '.join(ROUTING_FAMILIES)}, got {family!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.num_experts:
            raise StoreError(f"{where}: routing.top_k must be an integer in [1, {self.num_experts}], got {top_k!r}")
        if not isinstance(dropped, bool):
            raise StoreError(f"{where}: routing.dropped must be true or false, got {dropped!r}")
        k = self.manifest.get("logits_topk", 0)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.num_experts:
            raise StoreError(f"{where}: logits_topk must be an integer in [1, {self.num_experts}], got {k!r}")
        #: routing family: switch, olmoe, mixtral, qwen2_moe or qwen3_moe
        self.family: str = family
        #: experts per token: expert and gate are [S] for 1, [S, top_k] above
        self.top_k: int = top_k
        #: the model has expert capacity: the store holds `dropped`
        self.has_dropped: bool = dropped
        #: --logits topk:K (0: every logit in router_logits)
        self.logits_topk: int = k
        #: the stacks' prefixes: ('enc', 'dec') for Switch, ('lm', 'gen') for a language model
        self.encoder_stack, self.decoder_stack = keys.stacks_of(family)
        # Version 1 is exactly Switch's top-1 with capacity and full logits; anything else is version 2.
        want = 1 if (family == "switch" and top_k == 1 and dropped and not k) else 2
        if int(self.manifest["format_version"]) != want:
            raise StoreError(f"{where}: format_version {self.manifest['format_version']} does not match its layout "
                             f"(version {want}: version 1 is Switch top-1 with capacity and full router_logits)")
        self.format_version: int = want

    def gen_name(self, field: str) -> str:
        """A generation stack's own tensor: 'dec.input_ids' (Switch) or 'gen.input_ids' (a language model)."""
        return f"{self.decoder_stack}.{field}"

    def __repr__(self) -> str:
        return f"TraceStore({self.path!r}, samples={len(self)}, layers={self.layers})"

    def __len__(self) -> int:
        return self._num_samples

    def __iter__(self) -> Iterator[Sample]:
        for shard in self.iter_shards():
            for k in range(shard.num_samples):
                yield Sample(self, shard.first_sample + k, shard, k)

    def __getitem__(self, key):
        """store[i] or store['<sample id>'] -> Sample; store[a:b:c] -> list of Samples."""
        if isinstance(key, slice):
            return [self.sample(i) for i in range(*key.indices(len(self)))]
        return self.sample(key)

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete", False))

    def iter_shards(self) -> Iterator[Shard]:
        """Yields the shards in order, releasing each one's map after the caller moves on."""
        for s in self.shards:
            try:
                yield s
            finally:
                s.release()

    def verify(self) -> None:
        for s in self.shards:
            s.verify()

    def to_pandas(self, layers=None, real_only: bool = False, logits: bool = False):
        """pandas DataFrame, one row per (token, MoE layer); see moetrace.export.to_pandas for the
        columns and the memory cost (about 26 bytes per row, + 4*E with logits=True)."""
        from .export import to_pandas
        return to_pandas(self, layers=layers, real_only=real_only, logits=logits)

    def column(self, name: str, float32: bool = True) -> ColumnView:
        """One tensor across all shards. Floating tensors (router_logits, gate, hidden) read as float32,
        as LayerView returns them (one rule); float32=False keeps the stored dtype (F16 as float16,
        BF16 as its uint16 bits) for zero-copy access. Integer tensors are never converted."""
        if name in ("sample_offsets", self.gen_name("sample_offsets")):
            raise KeyError(f"{name} is shard-local; use store.sample_offsets or store.dec_sample_offsets for "
                           f"global offsets")
        return ColumnView(self, name, float32=float32)

    def _global_offsets(self, attr: str) -> np.ndarray | None:
        parts, base = [np.zeros(1, np.int64)], 0
        for s in self.shards:
            off = getattr(s, attr)
            if off is None:
                return None
            parts.append(off[1:] + base)
            base += int(off[-1])
        return np.concatenate(parts)

    @property
    def sample_offsets(self) -> np.ndarray:
        """int64 [N+1] global: sample i owns rows sample_offsets[i]:sample_offsets[i+1] of any
        per-token column (store.column('enc.1.expert') ...)."""
        return self._global_offsets("sample_offsets")

    @property
    def dec_sample_offsets(self) -> np.ndarray | None:
        """int64 [N+1] global offsets into the dec.* columns, or None without --decoder."""
        return self._global_offsets("dec_sample_offsets") if self.decoder_layers else None

    @property
    def sample_ids(self) -> list[str]:
        return [x for s in self.shards for x in s.metadata["sample_ids"]]

    @property
    def datasets(self) -> list[str]:
        return [x for s in self.shards for x in s.metadata["datasets"]]

    def locate(self, index: int) -> tuple[Shard, int]:
        n = len(self)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"sample {index} out of range for a store of {n} samples")
        k = bisect.bisect_right(self._firsts, i) - 1
        while self.shards[k].num_samples == 0 or i >= self.shards[k].first_sample + self.shards[k].num_samples:
            k += 1  # empty shards share a first_sample with the next one
        return self.shards[k], i - self.shards[k].first_sample

    def sample(self, key: int | str) -> Sample:
        """Sample by global index or by sample id ('<dataset>/<config>/<split>/<row>')."""
        if isinstance(key, str):
            if self._ids is None:
                self._ids = {sid: i for i, sid in enumerate(self.sample_ids)}
            if key not in self._ids:
                raise KeyError(f"no sample with id {key!r} in {self.path}")
            key = self._ids[key]
        shard, local = self.locate(int(key))
        return Sample(self, shard.first_sample + local, shard, local)
