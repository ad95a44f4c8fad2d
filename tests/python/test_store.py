"""The reader against stores written by the test writer (conftest.make_store): values, columns, errors."""

import json
import os

import numpy as np
import pytest

import moetrace
from moetrace import StoreError


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("logits_dtype,hidden_dtype", [("F32", "F32"), ("F16", "BF16"), ("BF16", None)])
def test_samples_read_back_exactly(store_factory, logits_dtype, hidden_dtype):
    path, truth = store_factory(logits_dtype=logits_dtype, hidden_dtype=hidden_dtype, synthetic_every=3)
    store = moetrace.open_store(path)
    assert len(store) == len(truth) == 7
    assert store.encoder_layers == [1, 3, 5] and store.decoder_layers == []
    assert store.layers == ["enc.1", "enc.3", "enc.5"]
    assert (store.num_experts, store.d_model) == (8, 16)
    assert store.sample_ids == [x["sample_id"] for x in truth]
    assert store.datasets == [x["dataset"] for x in truth]
    for i, want in enumerate(truth):
        s = store.sample(i)
        assert (s.index, s.sample_id, s.dataset, s.row, s.synthetic) == (
            i, want["sample_id"], want["dataset"], want["row"], want["synthetic"])
        assert s.token_ids.dtype == np.int32 and _bits_equal(s.token_ids, want["token_ids"])
        assert len(s) == len(want["token_ids"])
        for name in store.layers:
            view, w = s.layer(name), want["layers"][name]
            # Widening F16/BF16 to float32 is exact, so every dtype reads back bit for bit.
            assert view.router_logits.dtype == np.float32 and _bits_equal(view.router_logits, w["router_logits"])
            assert _bits_equal(view.expert, w["expert"])
            assert view.dropped.dtype == bool and np.array_equal(view.dropped, w["dropped"].astype(bool))
            assert _bits_equal(view.gate, w["gate"])
            np.testing.assert_allclose(view.probs, moetrace.softmax(w["router_logits"]), rtol=1e-6)
            np.testing.assert_allclose(view.probs.sum(axis=1), 1, rtol=1e-5)
            if hidden_dtype:
                assert view.hidden.dtype == np.float32 and _bits_equal(view.hidden, w["hidden"])
            else:
                assert view.hidden is None
        assert s.dec_input_ids is None and not s.has_decoder


def test_f32_tensors_are_memory_mapped_not_copied(store_factory):
    path, _ = store_factory(logits_dtype="F32")
    store = moetrace.open_store(path)
    arr = store.shards[0].tensor("enc.1.router_logits")
    base = arr
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    assert not arr.flags.writeable


def test_sample_lookup_by_id_and_negative_index(store_factory):
    path, truth = store_factory()
    store = moetrace.open_store(path)
    assert store.sample(truth[4]["sample_id"]).index == 4
    assert store[-1].sample_id == truth[-1]["sample_id"]
    assert [s.sample_id for s in store] == [x["sample_id"] for x in truth]
    with pytest.raises(KeyError, match="no sample with id"):
        store.sample("nope/x/y/1")
    with pytest.raises(IndexError):
        store.sample(7)
    with pytest.raises(KeyError, match="no MoE layer 'enc.2'"):
        store.sample(0).layer("enc.2")
    assert store.sample(0).layer(3).name == "enc.3"


def test_decoder_routing(store_factory):
    path, truth = store_factory(dec_layers=(1, 3), hidden_dtype="F32")
    store = moetrace.open_store(path)
    assert store.layers == ["enc.1", "enc.3", "enc.5", "dec.1", "dec.3"]
    for i, want in enumerate(truth):
        s = store.sample(i)
        assert _bits_equal(s.dec_input_ids, want["dec_input_ids"])
        assert _bits_equal(s.dec_output_ids, want["dec_output_ids"])
        assert s.dec_input_ids[0] == 0
        for name in ("dec.1", "dec.3"):
            assert _bits_equal(s.layer(name).router_logits, want["layers"][name]["router_logits"])
            assert _bits_equal(s.layer(name).hidden, want["layers"][name]["hidden"])
            assert not s.layer(name).dropped.any()
    off = store.dec_sample_offsets
    col = store.column("dec.1.expert")
    assert _bits_equal(col[off[5]:off[6]], truth[5]["layers"]["dec.1"]["expert"])


def test_columns_span_shards(store_factory):
    path, truth = store_factory(num_samples=8, shard_size=3, logits_dtype="BF16")
    store = moetrace.open_store(path)
    want = np.concatenate([x["layers"]["enc.3"]["expert"] for x in truth])
    col = store.column("enc.3.expert")
    assert len(col) == len(want) and col.shape == want.shape and col.dtype == np.int32
    assert _bits_equal(col.to_numpy(), want)
    assert _bits_equal(np.asarray(col), want)
    for key in (slice(None), slice(2, 30), slice(0, 0), slice(-5, None), slice(1, 40, 3), slice(None, None, -2)):
        assert _bits_equal(col[key], want[key]), key
    for i in (0, 5, len(want) - 1, -1):
        assert col[i] == want[i]
    idx = np.array([len(want) - 1, 0, 17, 3])
    assert _bits_equal(col[idx], want[idx])
    assert _bits_equal(np.concatenate(list(col.chunks())), want)
    with pytest.raises(IndexError):
        col[len(want)]
    # BF16 logits: float32 by default (as LayerView), raw bits on request.
    logits = np.concatenate([x["layers"]["enc.3"]["router_logits"] for x in truth])
    raw = store.column("enc.3.router_logits", float32=False)
    assert raw.dtype == np.uint16 and raw.stored_dtype == "BF16"
    wide = store.column("enc.3.router_logits", float32=True)
    assert wide.shape == logits.shape and _bits_equal(wide[:], logits)
    assert _bits_equal(wide[4:20, 2], logits[4:20, 2])
    # Global offsets cut the columns into samples.
    off = store.sample_offsets
    assert off[0] == 0 and off[-1] == len(want) and len(off) == len(truth) + 1
    assert _bits_equal(col[off[6]:off[7]], truth[6]["layers"]["enc.3"]["expert"])
    assert _bits_equal(store.column("sample_kind").to_numpy(), np.zeros(8, np.uint8))
    with pytest.raises(KeyError, match="shard-local"):
        store.column("sample_offsets")
    with pytest.raises(KeyError, match="no tensor named"):
        store.column("enc.1.hidden")


def test_iter_shards_and_shard_metadata(store_factory):
    path, truth = store_factory(num_samples=7, shard_size=3, empty_last_shard=True)
    store = moetrace.open_store(path)
    shards = list(store.iter_shards())
    assert [(s.first_sample, s.num_samples) for s in shards] == [(0, 3), (3, 3), (6, 1), (7, 0)]
    meta = shards[1].metadata
    assert meta["first_sample"] == 3 and meta["format_version"] == "1"
    assert meta["sample_ids"] == [x["sample_id"] for x in truth[3:6]]
    assert meta["rows"] == [3, 4, 5]
    assert shards[1].path == os.path.join(path, "shard-00001.safetensors")
    assert store.sample(6).sample_id == truth[6]["sample_id"]
    assert len(store.column("token_ids")) == sum(len(x["token_ids"]) for x in truth)


def test_open_accepts_manifest_path_and_verify(store_factory):
    path, _ = store_factory()
    assert len(moetrace.open_store(os.path.join(path, "manifest.json"), verify=True)) == 7


def test_safetensors_package_backend_and_cross_check(store_factory):
    safetensors = pytest.importorskip("safetensors")
    from safetensors.numpy import load_file
    path, truth = store_factory(logits_dtype="F16", hidden_dtype="F32")
    loaded = load_file(os.path.join(path, "shard-00000.safetensors"))  # the test writer is valid safetensors
    store = moetrace.open_store(path, backend="safetensors")
    assert _bits_equal(loaded["enc.1.router_logits"], store.shards[0].tensor("enc.1.router_logits"))
    assert _bits_equal(store.sample(1).layer("enc.5").hidden, truth[1]["layers"]["enc.5"]["hidden"])
    assert safetensors is not None


# -- errors --------------------------------------------------------------------------------------

def _edit_manifest(path, **changes):
    mpath = os.path.join(path, "manifest.json")
    m = json.load(open(mpath))
    m.update(changes)
    json.dump(m, open(mpath, "w"))
    return m


def test_truncated_shard_is_named(store_factory):
    path, _ = store_factory()
    shard = os.path.join(path, "shard-00001.safetensors")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors.*truncated"):
        moetrace.open_store(path)
    # Without the manifest's byte count the header's offsets catch it, when the shard is first read.
    m = json.load(open(os.path.join(path, "manifest.json")))
    for s in m["shards"]:
        s["bytes"] = 0
    _edit_manifest(path, shards=m["shards"])
    store = moetrace.open_store(path)
    store.sample(0)  # shard 0 is fine
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors: truncated: tensor"):
        store.sample(4)
    with open(shard, "r+b") as f:
        f.truncate(5)
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors: truncated safetensors file"):
        moetrace.open_store(path).sample(4)


def test_corrupt_header_is_named(store_factory):
    path, _ = store_factory()
    shard = os.path.join(path, "shard-00002.safetensors")
    with open(shard, "r+b") as f:
        f.seek(8)
        f.write(b"#garbage")
    with pytest.raises(StoreError, match=r"shard-00002\.safetensors: invalid safetensors header: not JSON"):
        moetrace.open_store(path).sample(6)
    with open(shard, "r+b") as f:
        f.write((1 << 40).to_bytes(8, "little"))
    with pytest.raises(StoreError, match=r"shard-00002\.safetensors: invalid safetensors header: length"):
        moetrace.open_store(path).column("token_ids")


def test_sha_mismatch_with_verify(store_factory):
    path, _ = store_factory()
    shard = os.path.join(path, "shard-00000.safetensors")
    with open(shard, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    moetrace.open_store(path)  # without verify the flip goes unseen
    with pytest.raises(StoreError, match=r"shard-00000\.safetensors: sha256 mismatch"):
        moetrace.open_store(path, verify=True)


def test_unknown_format_version_is_refused(store_factory):
    path, _ = store_factory()
    _edit_manifest(path, format_version=3)
    with pytest.raises(StoreError, match=r"manifest\.json: format_version 3 is not supported by this reader"):
        moetrace.open_store(path)
    path2, _ = store_factory("v3shards", format_version=3)
    _edit_manifest(path2, format_version=1)  # a manifest that claims 1 over shards that say 3
    with pytest.raises(StoreError, match=r"shard-00000\.safetensors \(__metadata__\): format_version '3'"):
        moetrace.open_store(path2).sample(0)
    _edit_manifest(path, format_version=1, format="something-else")
    with pytest.raises(StoreError, match="not a moetrace trace store"):
        moetrace.open_store(path)


def test_missing_shard_and_missing_store(store_factory, tmp_path):
    path, _ = store_factory()
    os.remove(os.path.join(path, "shard-00002.safetensors"))
    with pytest.raises(StoreError, match=r"shard-00002\.safetensors: listed in .*manifest\.json but missing"):
        moetrace.open_store(path)
    with pytest.raises(StoreError, match=r"manifest\.json: not found"):
        moetrace.open_store(tmp_path / "nowhere")


def test_inconsistent_shard_is_named(store_factory):
    path, _ = store_factory()
    m = json.load(open(os.path.join(path, "manifest.json")))
    m["shards"][1]["num_samples"] = 2
    m["shards"][2]["first_sample"] = 5
    _edit_manifest(path, shards=m["shards"], num_samples=6)
    with pytest.raises(StoreError, match=r"shard-00001\.safetensors: __metadata__ 'sample_ids' must be"):
        moetrace.open_store(path).sample(3)


def test_unlisted_files_are_ignored(store_factory):
    path, truth = store_factory()
    m = json.load(open(os.path.join(path, "manifest.json")))
    _edit_manifest(path, shards=m["shards"][:2], num_samples=6)
    open(os.path.join(path, ".tmp-shard-00003.safetensors"), "wb").write(b"partial")
    store = moetrace.open_store(path)
    assert len(store) == 6 and store.sample_ids == [x["sample_id"] for x in truth[:6]]


def _rewrite_shard(path, file, changes):
    """Rewrites one shard with some tensors replaced (None removes one); the manifest's size and hash
    are cleared so that only the shard's own structure is checked."""
    from moetrace.safetensors_io import SafetensorsFile
    from conftest import write_safetensors
    f = SafetensorsFile(os.path.join(path, file))
    tensors = {k: np.array(f.tensor(k)) for k in f.infos}
    for k, v in changes.items():
        if v is None:
            del tensors[k]
        else:
            tensors[k] = v
    meta = dict(f.metadata)
    del f
    write_safetensors(os.path.join(path, file), tensors, meta)
    m = json.load(open(os.path.join(path, "manifest.json")))
    for s in m["shards"]:
        s["bytes"], s["sha256"] = 0, ""
    _edit_manifest(path, shards=m["shards"])


def test_bad_row_structure_is_named_on_every_access(store_factory):
    path, truth = store_factory()
    n = sum(len(x["token_ids"]) for x in truth[3:6])
    _rewrite_shard(path, "shard-00001.safetensors", {"sample_offsets": np.array([0, 5, 2, n], np.int64)})
    store = moetrace.open_store(path)
    for _ in range(2):
        with pytest.raises(StoreError, match=r"shard-00001\.safetensors: sample_offsets must be 4 non-decreasing"):
            store.sample(3)
    path, truth = store_factory("other")
    _rewrite_shard(path, "shard-00000.safetensors", {"enc.3.expert": np.zeros(2, np.int32)})
    with pytest.raises(StoreError, match=r"shard-00000\.safetensors: tensor 'enc.3.expert' has shape \[2\]"):
        moetrace.open_store(path).sample(0)
    _rewrite_shard(path, "shard-00000.safetensors", {"sample_kind": None})
    with pytest.raises(StoreError, match=r"shard-00000\.safetensors: missing tensor 'sample_kind'"):
        moetrace.open_store(path).sample(0)
