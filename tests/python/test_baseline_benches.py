"""The baseline scripts' pieces that need no torch (bench/lm_baselines.py, bench/torch_switch_baseline.py,
bench/hf_generate_bench.py, bench/torch_bench_util.py): parameter counts, the memory rule that reduces
the layer count, option checks, the table. The scripts themselves run on the GPU machine and, --tiny,
on a CPU with torch + transformers installed (docs/GPU.md "Baselines")."""

from __future__ import annotations

import importlib.util
import os
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO

BENCH = os.path.join(REPO, "bench")


def load(name):
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, name + ".py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(BENCH)


def shape_cfg(lm, name, **kw):
    s = dict(lm.SHAPES[name])
    experts = s.pop("num_experts", None) or s.pop("num_local_experts")
    s.update(kw)
    return SimpleNamespace(**s, num_experts=experts)


def test_parameter_counts_are_the_published_totals():
    lm = load("lm_baselines")
    for name, total in (("olmoe", 6_919_161_856), ("mixtral", 46_702_792_704)):
        c = shape_cfg(lm, name)
        per_layer, fixed = lm.param_count(c)
        assert fixed + c.num_hidden_layers * per_layer == total, name


class FakeTorch:
    def __init__(self, free_bytes):
        self.cuda = SimpleNamespace(mem_get_info=lambda device: (free_bytes, free_bytes))


def test_mixtral_fits_an_h200_and_is_cut_to_fewer_layers_on_an_h100():
    lm = load("lm_baselines")
    c = shape_cfg(lm, "mixtral")
    cuda = SimpleNamespace(type="cuda")
    layers, note = lm.fit_layers(FakeTorch(139 * 2**30), cuda, c, [(32, 512)], 6.0, 0)
    assert layers == 32 and note is None
    layers, note = lm.fit_layers(FakeTorch(78 * 2**30), cuda, c, [(32, 512)], 6.0, 0)
    per_layer, fixed = lm.param_count(c)
    assert 1 <= layers < 32 and "of 32 layers built" in note
    margin = 6 * 2**30 + 3 * 32 * 512 * c.vocab_size * 2
    assert 2 * (fixed + layers * per_layer) + margin <= 78 * 2**30 < 2 * (fixed + (layers + 1) * per_layer) + margin
    # --layers wins; the CPU never reduces.
    assert lm.fit_layers(FakeTorch(1), cuda, c, [(32, 512)], 6.0, 4)[0] == 4
    assert lm.fit_layers(FakeTorch(1), SimpleNamespace(type="cpu"), c, [(32, 512)], 6.0, 0) == (32, None)
    with pytest.raises(SystemExit, match="not even one layer"):
        lm.fit_layers(FakeTorch(2**30), cuda, c, [(32, 512)], 6.0, 0)


def test_option_checks_name_the_option():
    lm = load("lm_baselines")
    sw = load("torch_switch_baseline")
    gen = load("hf_generate_bench")
    for parse, argv in ((lm.parse_args, ["--models", "olmoe,gpt"]), (lm.parse_args, ["--shapes", "32by512"]),
                        (lm.parse_args, ["--rows", "fast"]), (lm.parse_args, ["--hf-experts", "triton"]),
                        (sw.parse_args, ["--rows", "eager,fast"]), (gen.parse_args, ["--batches", "1,0"]),
                        (gen.parse_args, ["--rows", "moetrace"])):
        with pytest.raises(SystemExit):
            parse(argv)
    a = lm.parse_args(["--tiny"])
    assert a.shapes == [(2, 16), (1, 40)] and a.repeats <= 3
    assert lm.parse_args([]).shapes == [(32, 512), (8, 2048)]
    a = sw.parse_args(["--tiny"])
    assert (a.experts, a.d_model, a.shapes) == (8, 64, "4x32,mix")
    assert sw.parse_args([]).shapes == "128x256,32x256,mix"
    assert gen.parse_args([]).batches == [1, 32, 128]


def test_table_aligns_text_left_numbers_right_and_marks_missing_values(capsys):
    util = load("torch_bench_util")
    util.print_table("t", [("row", "row", "{}"), ("tokens/s", "tps", "{:,.0f}")],
                     [{"row": "eager", "tps": 1234567.0}, {"row": "compiled (loop)", "tps": None}],
                     ["experts: LOOP"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| row             | tokens/s  |"
    assert lines[3] == "|-----------------|----------:|"
    assert lines[4] == "| eager           | 1,234,567 |"
    assert lines[5] == "| compiled (loop) |         — |"
    assert lines[6] == "  note: experts: LOOP"
