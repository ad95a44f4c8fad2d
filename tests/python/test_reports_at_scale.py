"""Reports that hold with many datasets and experts and cannot mislead (issue 16), and the analysis
items of issue 14 (--real-only, --k lists, unknown --test-datasets)."""

import json
import os
import re

import numpy as np
import pytest

from analysis_testutil import make_store, png_size
from moetrace import analysis, open_store, plots, speculate
from moetrace.report import Col


def _store(path, *, n_ds=24, per_ds=4, length=30, num_experts=8, layers=(1, 3), same=True, kinds=None, demo=True,
           seed=0):
    """n_ds datasets; same=True: every dataset routes from one distribution (random splits of one text)."""
    rng = np.random.default_rng(seed)
    n = n_ds * per_ds
    datasets = [f"cat{k % 3}/ds{k:02d}" for k in range(n_ds) for _ in range(per_ds)]
    experts = {}
    for i in layers:
        if same:
            experts[f"enc.{i}"] = rng.integers(0, num_experts, size=n * length).astype(np.int32)
        else:  # dataset k prefers expert k mod E
            ds_of = np.repeat([k for k in range(n_ds) for _ in range(per_ds)], length)
            pick = rng.random(n * length) < 0.7
            experts[f"enc.{i}"] = np.where(pick, ds_of % num_experts,
                                           rng.integers(0, num_experts, size=n * length)).astype(np.int32)
    p = make_store(str(path), lengths=[length] * n, experts=experts, num_experts=num_experts, datasets=datasets,
                   kinds=kinds, seed=seed)
    if not demo:
        m = json.load(open(os.path.join(p, "manifest.json")))
        m["model"]["demo"] = False
        json.dump(m, open(os.path.join(p, "manifest.json"), "w"))
    return p


@pytest.fixture(scope="module")
def big_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("big")
    path = _store(tmp / "s", n_ds=24)
    out = tmp / "out"
    assert analysis.main([path, "-o", str(out), "-q", "--examples", "2"]) == 0
    return path, out, json.loads((out / "stats.json").read_text()), (out / "report.html").read_text()


def test_report_is_self_contained(big_report):
    _, out, _, html = big_report
    srcs = re.findall(r"<img src=[\"']([^\"']+)", html)
    assert len(srcs) >= 8
    assert all(s.startswith("data:image/png;base64,") for s in srcs)


def test_divergence_is_a_sorted_pair_list_not_n_squared_columns(big_report):
    _, _, stats, html = big_report
    dv = stats["encoder"]["dataset_divergence"]
    pairs = dv["pairs"]
    assert len(pairs) == 24 * 23 // 2
    assert [p["jsd"] for p in pairs] == sorted((p["jsd"] for p in pairs), reverse=True)
    assert {"a", "b", "jsd", "noise_floor", "excess"} <= set(pairs[0])
    widest = max(t.count("<th") for t in html.split("<table")[1:])
    assert widest <= 16, "no table has one column per dataset pair"
    section = html.split("<h3>Datasets</h3>")[1].split("<img")[0]
    assert section.count("<tr>") == 1 + 30  # header + the top 30
    assert sorted(dv["order"]) == list(range(24))


def test_noise_floor_explains_random_splits_of_one_text(big_report):
    _, _, stats, _ = big_report
    pairs = stats["encoder"]["dataset_divergence"]["pairs"]
    within = np.mean([p["jsd"] <= 2 * p["noise_floor"] for p in pairs])
    assert within > 0.9, within
    assert np.mean([p["excess"] for p in pairs]) < 0.3 * np.mean([p["jsd"] for p in pairs])


def test_noise_floor_leaves_real_differences(tmp_path):
    path = _store(tmp_path / "s", n_ds=4, same=False)
    s = analysis.analyze_store(open_store(path), examples=0, token_stats=False)
    pairs = s["encoder"]["dataset_divergence"]["pairs"]
    assert all(p["jsd"] > 3 * p["noise_floor"] for p in pairs)


def test_demo_banner_only_for_demo_models(big_report, tmp_path):
    _, _, stats, html = big_report
    assert stats["demo_model"] is True
    first_screen = html.split("<h2>")[0]
    assert "random weights" in first_screen
    path = _store(tmp_path / "s", n_ds=2, demo=False)
    assert analysis.main([path, "-o", str(tmp_path / "o"), "-q"]) == 0
    assert "random weights" not in (tmp_path / "o" / "report.html").read_text()


def test_palette_scales_past_ten_and_twenty():
    for n in (5, 12, 24, 62):
        pal = plots.palette(n)
        assert len(pal) == n
        keys = {(tuple(np.round(c, 4)), ls) for c, ls in pal}
        assert len(keys) == n, n


def test_numbers_are_formatted_per_column():
    assert Col("drop rate", "pct").fmt(0.0001) == "0.01%"
    assert Col("drop rate", "pct").fmt(0.25) == "25.0%"
    assert Col("tokens", "int").fmt(1234567) == "1,234,567"
    assert Col("z", "float").fmt(28.123456) == "28.12"
    assert Col("x").fmt(None) == "–"


def test_svg_and_300_dpi(tmp_path):
    path = _store(tmp_path / "s", n_ds=2)
    try:
        assert analysis.main([path, "-o", str(tmp_path / "svg"), "-q", "--format", "svg"]) == 0
        html = (tmp_path / "svg" / "report.html").read_text()
        assert "data:image/svg+xml;base64," in html and (tmp_path / "svg" / "enc_loads.svg").exists()
        assert analysis.main([path, "-o", str(tmp_path / "hi"), "-q", "--dpi", "300", "--format", "pdf"]) == 0
        assert png_size(tmp_path / "hi" / "enc_loads.png") == (3000, 1350)
        assert (tmp_path / "hi" / "enc_loads.pdf").read_bytes()[:4] == b"%PDF"
    finally:
        plots.configure(dpi=100, fmt="png")


def test_transition_rows_with_few_tokens_are_masked_and_counted(tmp_path):
    path = _store(tmp_path / "s", n_ds=2, per_ds=2, length=20, num_experts=128)
    assert analysis.main([path, "-o", str(tmp_path / "o"), "-q", "--examples", "0"]) == 0
    stats = json.loads((tmp_path / "o" / "stats.json").read_text())
    masked = stats["encoder"]["transition_rows_masked"]
    assert masked > 0
    assert f"{masked} rows" in (tmp_path / "o" / "report.html").read_text()


def test_confidence_range_follows_the_data():
    edges = analysis.GATE_BINS
    counts = np.zeros(len(edges) - 1)
    counts[10:50] = 5  # gates between 0.01 and 0.05, as with 128 experts
    new_edges, series = plots.data_range(edges, {"enc.1": counts})
    assert new_edges[0] >= 0.009 and new_edges[-1] <= 0.06
    assert series["enc.1"].sum() == counts.sum()


def test_analyze_real_only(tmp_path):
    kinds = [k % 2 for k in range(16)]
    path = _store(tmp_path / "s", n_ds=4, kinds=kinds)
    s = analysis.analyze_store(open_store(path), examples=3, real_only=True)
    assert s["num_samples"] == 8 and s["skipped_synthetic_samples"] == 8 and s["num_tokens"] == 8 * 30
    assert sum(s["encoder"]["per_layer"]["enc.1"]["expert_counts"]) == 8 * 30
    assert all(open_store(path).sample(ex["index"]).synthetic is False for ex in s["examples"])
    assert analysis.main([path, "-o", str(tmp_path / "o"), "-q", "--real-only", "--no-plots"]) == 0
    assert json.loads((tmp_path / "o" / "stats.json").read_text())["num_samples"] == 8


def test_examples_show_token_text(tmp_path, monkeypatch):
    pytest.importorskip("sentencepiece")
    path = _store(tmp_path / "s", n_ds=2)
    s = analysis.analyze_store(open_store(path), examples=2, token_stats=False)
    ex = s["examples"][0]
    assert len(ex["token_pieces"]) == len(ex["token_ids"]) and all(isinstance(p, str) for p in ex["token_pieces"])
    assert s["token_text"]["tokenizer"].endswith("spiece.model")
    import builtins
    real_import = builtins.__import__

    def no_sp(name, *a, **k):
        if name == "sentencepiece":
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_sp)
    s = analysis.analyze_store(open_store(path), examples=2, token_stats=False)
    assert "token_pieces" not in s["examples"][0] and "sentencepiece" in s["token_text"]["note"]


# ---------------------------------------------------------------- speculate


@pytest.fixture(scope="module")
def spec_store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("spec") / "s", n_ds=4, per_ds=10, num_experts=16, layers=(1, 3, 5),
                  kinds=[k % 4 == 3 for k in range(40)])


def test_speculate_k_list(spec_store, tmp_path):
    out = tmp_path / "o"
    assert speculate.main([spec_store, "-o", str(out), "-q", "--k", "1,3,5,10", "--no-cache", "--no-plots",
                           "--predictors", "frequency,transition"]) == 0
    res = json.loads((out / "speculation.json").read_text())
    assert res["ks"] == [1, 3, 5, 10]
    assert set(res["encoder"]["summary"][0]["recall"]) == {"1", "3", "5", "10"}
    assert "recall@3" in (out / "speculation.md").read_text() and "recall@10" in (out / "speculation.html").read_text()
    assert speculate.main([spec_store, "-o", str(out), "-q", "--k", "3,5"]) == 0  # 1 is added
    assert json.loads((out / "speculation.json").read_text())["ks"] == [1, 3, 5]


def test_speculate_unknown_test_dataset_is_an_error(spec_store, tmp_path, capsys):
    rc = speculate.main([spec_store, "-o", str(tmp_path / "o"), "-q", "--test-datasets", "foo"])
    err = capsys.readouterr().err
    assert rc == 1 and "--test-datasets" in err and "'foo'" in err and "cat0/ds00" in err
    assert not (tmp_path / "o" / "speculation.json").exists()


def test_speculate_real_only(spec_store):
    opt = speculate.Options(split=speculate.Split(0, 0.3), predictors=("frequency",), simulate=False, real_only=True)
    res = speculate.speculate_store(open_store(spec_store), opt)
    st = res["encoder"]
    assert st["train"]["samples"] + st["test"]["samples"] == 30 and res["real_only"] is True
    assert st["train"]["tokens"] + st["test"]["tokens"] == 30 * 30


def test_speculation_html_and_plots(spec_store, tmp_path):
    out = tmp_path / "o"
    assert speculate.main([spec_store, "-o", str(out), "-q", "--cache-sizes", "2,4,8", "--learned-steps", "30",
                           "--predictors", "frequency,transition,learned"]) == 0
    html = (out / "speculation.html").read_text()
    assert "&lt;seed&gt;" in html and "&lt;sample_id&gt;" in html  # the split's hash survives rendering
    assert "random weights" in html.split("<h2>")[0]
    srcs = re.findall(r"<img src=\"([^\"]+)", html)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "experts moved / token" in html
    md = (out / "speculation.md").read_text()
    assert "`{" in md  # the split JSON is code, so <seed> shows
    res = json.loads((out / "speculation.json").read_text())
    enc = res["encoder"]
    assert all(r["ci95"]["1"] is not None for r in enc["summary"])
    curve = enc["learned"]["loss_curves"]["1"]
    assert "val_loss" in curve[-1] and enc["learned"]["val_tokens"]["1"] > 0
    assert enc["learned"]["train_s"] > 0 and enc["fit_s"] >= enc["learned"]["train_s"]
    assert png_size(out / "encoder_cache_hit_rate.png") == (1000, 450)


@pytest.mark.parametrize("log", [False, True])
def test_masked_transition_rows_are_drawn_grey(tmp_path, log):
    import matplotlib.image as mpimg
    m = np.full((4, 4), 0.25)
    m[2] = np.nan  # a masked row
    name = plots.heatmap_grid(str(tmp_path / "t.png"), [m], ["t"], "t", "x", "y", "p", log=log, cols=1)
    img = mpimg.imread(str(tmp_path / name))[..., :3]
    grey = np.all(np.abs(img - 0xBB / 255) < 0.02, axis=-1)
    rows = np.flatnonzero(grey.sum(axis=1) > 20)
    assert rows.size > 10, "a band of grey pixels where the masked row is"


def test_jsd_colour_scale_is_not_stretched_over_noise(big_report):
    _, out, stats, _ = big_report
    import matplotlib.image as mpimg
    img = mpimg.imread(str(out / "enc_datasets_jsd.png"))[..., :3]
    img = img[:, : int(img.shape[1] * 0.8)]  # the matrix, not the colour bar
    # viridis' bright yellow end (> 0.8 red and green, low blue) must not appear for pure noise
    yellow = (img[..., 0] > 0.8) & (img[..., 1] > 0.8) & (img[..., 2] < 0.3)
    assert yellow.sum() < 50
