"""`moetrace collect` on a decoder-only MoE language model (issue 20), end to end on the CPU: a tiny
OLMoE (the lm-fixtures model, its vocabulary resized to a real byte-level BPE tokenizer's) over real
text; the store's routing equals `moetrace forward`'s (the engine the fixtures check against
transformers), prompt and greedy generation, and the store is a valid format-2 store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import REPO, write_safetensors
from moetrace import open_store
from moetrace.safetensors_io import SafetensorsFile

FIXTURE = os.path.join(REPO, "tests", "data", "fixtures_lm", "olmoe", "model")
TOKENIZER = os.path.join(REPO, "tests", "data", "tokenizers_lm", "olmoe_bpe")
DATA = os.path.join(REPO, "tests", "data")
# The engine under test: the CPU here and in CI; scripts/gpu_check.sh's lm step runs this file again with
# MOETRACE_TEST_DEVICE=cuda (the GPU engine in fp32, collect and forward alike).
DEVICE = os.environ.get("MOETRACE_TEST_DEVICE", "cpu")
ENGINE = ["--device", DEVICE] + (["--precision", "fp32"] if DEVICE == "cuda" else [])
# A batch of many samples and forward's batch of one reach the same value by other reduction orders
# on the GPU; on the CPU they are the same computation.
RTOL, ATOL = (1e-5, 1e-6) if DEVICE == "cpu" else (1e-4, 1e-5)


def make_model(out: str) -> int:
    """The fixture's weights with embed_tokens / lm_head redrawn for the tokenizer's vocabulary."""
    os.makedirs(out)
    cfg = json.load(open(os.path.join(FIXTURE, "config.json")))
    tok = json.load(open(os.path.join(TOKENIZER, "tokenizer.json")))
    vocab = max(list(tok["model"]["vocab"].values()) + [t["id"] for t in tok["added_tokens"]]) + 1
    src = SafetensorsFile(os.path.join(FIXTURE, "model.safetensors"))
    rng = np.random.default_rng(0)
    tensors = {}
    for name in src.infos:
        t = np.asarray(src.tensor(name), np.float32)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = (rng.standard_normal((vocab, t.shape[1])) * 0.05).astype(np.float32)
        tensors[name] = t
    write_safetensors(os.path.join(out, "model.safetensors"), tensors, {"format": "pt"})
    cfg["vocab_size"] = vocab
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, f), out)
    return vocab


def run(cmd):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def collected(tmp_path_factory, cli):
    base = tmp_path_factory.mktemp("lm")
    model = base / "model"
    make_model(str(model))
    store = base / "store"
    run([cli, "collect", "--model", model, *ENGINE, "--traces", 60, "--datasets", "ag_news",
         "--data-root", DATA, "--decoder", "--max-new-tokens", 4, "--logits", "f32", "--no-progress",
         "-o", store])
    return cli, model, store, base


def forward(cli, model, ids, out, generate=0):
    inputs = out.with_suffix(".in.safetensors")
    write_safetensors(str(inputs), {"input_ids": np.asarray([ids], np.int64),
                                    "attention_mask": np.ones((1, len(ids)), np.int64)}, {})
    run([cli, "forward", "--model", model, *ENGINE, "--inputs", inputs, "--output", out, "--generate", generate])
    f = SafetensorsFile(str(out))
    return {n: np.asarray(f.tensor(n)) for n in f.infos}


def test_the_store_is_a_top_k_language_model_store(collected):
    cli, _, store, _ = collected
    s = open_store(str(store))
    assert (s.family, s.top_k) == ("olmoe", 2)
    assert s[0].layers == ["lm.0", "lm.1", "gen.0", "gen.1"]
    m = json.load(open(store / "manifest.json"))
    assert m["format_version"] == 2 and m["routing"] == {"family": "olmoe", "top_k": 2, "dropped": False}
    layer = s[0].layer("lm.0")
    assert layer.expert.shape == (len(s[0].token_ids), 2) and layer.gate.shape == layer.expert.shape
    assert not s.has_dropped and not np.asarray(layer.dropped).any()  # no capacity: nothing dropped
    run([cli, "verify", store])


def test_prompt_routing_equals_forward(collected):
    cli, model, store, base = collected
    s = open_store(str(store))
    for i in (0, len(s) // 2, len(s) - 1):
        sample = s[i]
        ref = forward(cli, model, list(sample.token_ids), base / f"fwd{i}.safetensors")
        for k, name in enumerate(("lm.0", "lm.1")):
            got = sample.layer(name)
            np.testing.assert_allclose(got.router_logits, ref[f"router.{k}.router_logits"][0], rtol=RTOL, atol=ATOL)
            np.testing.assert_array_equal(got.expert, ref[f"router.{k}.topk_ids"][0])
            np.testing.assert_allclose(got.gate, ref[f"router.{k}.topk_weights"][0], rtol=RTOL, atol=ATOL / 10)


def test_generation_equals_forward_generate(collected):
    cli, model, store, base = collected
    s = open_store(str(store))
    sample = s[1]
    ids = list(sample.token_ids)
    ref = forward(cli, model, ids, base / "gen.safetensors", generate=4)
    new = ref["generated_ids"][0][len(ids):]
    # Step t routes new token t and produces token t + 1 (the last new token is never routed).
    np.testing.assert_array_equal(sample.dec_input_ids, new[:-1])
    np.testing.assert_array_equal(sample.dec_output_ids, new[1:])
    for k, name in enumerate(("gen.0", "gen.1")):
        got = sample.layer(name)
        np.testing.assert_allclose(got.router_logits, ref[f"generate_router.{k}.router_logits"][0], rtol=RTOL,
                                   atol=ATOL)
        np.testing.assert_array_equal(got.expert, ref[f"generate_router.{k}.topk_ids"][0])


def test_synthetic_samples_are_refused_for_a_language_model(collected, tmp_path):
    cli, model, _, _ = collected
    proc = subprocess.run([cli, "collect", "--model", model, "--device", "cpu", "--mode", "synthetic", "-o",
                           tmp_path / "s", "--no-progress"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "language model; synthetic samples exist for Switch models only" in proc.stderr


def test_inspect_model_checks_a_language_model(collected, tmp_path):
    cli, model, _, _ = collected
    proc = run([cli, "inspect", model, "--json"])
    j = json.loads(proc.stdout)
    assert j["family"] == "olmoe" and j["ok"] and j["moe_layers"] == [0, 1]
    assert j["tokenizer"].endswith("tokenizer.json") and j["expert_layout"] == "per-expert"
    # A checkpoint without one expert's tensor: one line naming it, non-zero exit.
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    src = SafetensorsFile(str(model / "model.safetensors"))
    gone = "model.layers.1.mlp.experts.3.up_proj.weight"
    write_safetensors(str(broken / "model.safetensors"),
                      {n: np.asarray(src.tensor(n), np.float32) for n in src.infos if n != gone}, {"format": "pt"})
    bad = subprocess.run([cli, "inspect", broken], capture_output=True, text=True)
    assert bad.returncode != 0 and gone in bad.stderr, bad.stderr
    # routers is Switch's: a language model is one clear line.
    r = subprocess.run([cli, "routers", "--model", model, "-o", tmp_path / "r.safetensors"], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "decoder-only language model (olmoe)" in r.stderr


def test_analyze_and_speculate_name_the_prompt_and_the_generation(collected, tmp_path):
    cli, _, store, _ = collected
    run([cli, "analyze", store, "-o", tmp_path / "report", "-q"])
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<h2>Prompt</h2>" in html and "<h2>Generation</h2>" in html and "<h2>Encoder</h2>" not in html
    stats = json.loads((tmp_path / "report" / "stats.json").read_text())
    assert stats["routing"]["family"] == "olmoe" and stats["encoder"]["layers"] == ["lm.0", "lm.1"]
    run([cli, "speculate", store, "-o", tmp_path / "spec", "-q"])
    md = (tmp_path / "spec" / "speculation.md").read_text()
    assert "## Prompt" in md and "## Generation" in md
