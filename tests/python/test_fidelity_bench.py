"""bench/fidelity.py's pieces that need no torch: the agreement arithmetic and the option checks (the
whole script runs on the GPU machine and, tiny, on a CPU with torch + transformers installed)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from conftest import REPO


def load_bench():
    spec = importlib.util.spec_from_file_location("fidelity_bench", os.path.join(REPO, "bench", "fidelity.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def routes(experts_per_sample, shift=0.0):
    """Per sample {layer: (expert [S], logits [S, 3])}; logits one-hot-ish on the expert."""
    out = []
    for experts in experts_per_sample:
        e = np.asarray(experts, dtype=np.int64)
        logits = np.zeros((len(e), 3), dtype=np.float32)
        logits[np.arange(len(e)), e] = 2.0 + shift
        out.append({"enc.1": (e, logits), "enc.3": (e.copy(), logits.copy())})
    return out


def test_compare_counts_every_token_layer_and_the_largest_logit_difference():
    fid = load_bench()
    a = routes([[0, 1, 2], [2, 2]])
    b = routes([[0, 1, 1], [2, 2]], shift=0.25)
    b[1]["enc.3"] = (np.array([0, 2]), b[1]["enc.3"][1])
    r = fid.compare(a, b, ["enc.1", "enc.3"])
    assert r["token_layers"] == 10
    assert r["per_layer"]["enc.1"]["agree"] == 4 and r["per_layer"]["enc.3"]["agree"] == 3
    assert r["agree"] == 7 and r["top1_agreement"] == pytest.approx(0.7)
    # Expert 2 of token 3 holds 2.0 in a, 0 in b (b chose 1 there with 2.25): the largest difference.
    assert r["max_logit_diff"] == pytest.approx(2.25)
    same = fid.compare(a, a, ["enc.1", "enc.3"])
    assert same["top1_agreement"] == 1.0 and same["max_logit_diff"] == 0.0


def test_options_default_to_a_tiny_cpu_run_and_refuse_a_run_without_fp32():
    fid = load_bench()
    a = fid.parse_args([])
    assert (a.device, a.experts, a.layers, a.d_model, a.d_ff, a.heads) == ("cpu", 8, 4, 64, 256, 1)
    assert a.precisions == ["fp32", "bf16", "fp16", "mixed", "faithful"]
    full = fid.parse_args(["--experts", "128", "--layers", "12", "--d-model", "768", "--samples", "600"])
    assert (full.d_ff, full.heads, full.d_kv) == (3072, 12, 64)  # switch-base-128
    for bad in (["--precisions", "bf16,mixed"], ["--precisions", "fp32,int8"], ["--layers", "1"]):
        with pytest.raises(SystemExit):
            fid.parse_args(bad)
