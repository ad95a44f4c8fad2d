"""bench/codec_bench.py: the byte shuffle is lossless, every codec row round-trips a real store's F16
logits, and a store without F16 logits is refused in one line."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import REPO


def load_bench():
    spec = importlib.util.spec_from_file_location("codec_bench", os.path.join(REPO, "bench", "codec_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_byte_shuffle_groups_high_and_low_bytes_and_round_trips():
    cb = load_bench()
    x = np.array([0x0102, 0x0304, 0x0506], np.uint16).view(np.float16)
    s = cb.byte_shuffle(x)
    assert s.tolist() == [0x02, 0x04, 0x06, 0x01, 0x03, 0x05]  # little-endian: low bytes first
    y = np.random.default_rng(0).standard_normal(1001).astype(np.float16)
    assert np.array_equal(cb.byte_unshuffle(cb.byte_shuffle(y), np.float16).view(np.uint16), y.view(np.uint16))


def test_table_of_a_store_with_f16_logits(store_factory, tmp_path, capsys):
    cb = load_bench()
    path, truth = store_factory(logits_dtype="F16", num_samples=9, num_experts=16)
    out = tmp_path / "codec.json"
    assert cb.main([path, "--json", str(out), "--cores", "2"]) == 0
    res = json.loads(out.read_text())
    assert res["bytes"] == sum(len(s["token_ids"]) for s in truth) * 3 * 16 * 2  # 3 layers, 16 experts
    assert {r["codec"] for r in res["rows"]} == {"zstd-1", "zstd-3", "lz4", "snappy"}
    for r in res["rows"]:
        assert r["ratio"] > 0.9 and r["logical_gb_s"] <= 1.5 * r["ratio"] + 1e-9
    assert "byte-shuffled" in capsys.readouterr().out


def test_a_store_with_f32_logits_is_refused_in_one_line(store_factory):
    cb = load_bench()
    path, _ = store_factory(logits_dtype="F32")
    with pytest.raises(SystemExit, match=r"router_logits is float32, expected float16"):
        cb.main([path, "--json", os.devnull])
