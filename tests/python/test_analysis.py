"""moetrace analyze: every statistic against an independent computation, on hand-made stores whose
answers are known (uniform routing, one expert, a deterministic layer-to-layer map) and on random ones."""

import json
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))

from analysis_testutil import make_store, permutation_store, png_size, softmax  # noqa: E402
from moetrace import accumulate, analysis, open_store  # noqa: E402

E = 8


# ---------------------------------------------------------------- pure functions, reference formulas


def ref_moments(c):
    c = [float(x) for x in c]
    n = len(c)
    mu = sum(c) / n
    m2 = sum((x - mu) ** 2 for x in c) / n
    m3 = sum((x - mu) ** 3 for x in c) / n
    m4 = sum((x - mu) ** 4 for x in c) / n
    return mu, math.sqrt(m2), (m3 / m2 ** 1.5 if m2 else 0.0), (m4 / m2 ** 2 - 3 if m2 else 0.0)


def ref_percentile(c, q):
    s = sorted(float(x) for x in c)
    pos = (len(s) - 1) * q
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@pytest.mark.parametrize("seed", range(5))
def test_usage_stats_match_reference(seed):
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 50, size=int(rng.integers(2, 40)))
    c[rng.integers(0, c.size)] = 0
    s = analysis.usage_stats(c)
    mu, sd, sk, ku = ref_moments(c)
    assert s["mean"] == pytest.approx(mu)
    assert s["std"] == pytest.approx(sd)
    assert s["cv"] == pytest.approx(sd / mu)
    assert s["skewness"] == pytest.approx(sk)
    assert s["kurtosis"] == pytest.approx(ku)
    for key, q in (("q25", 0.25), ("median", 0.5), ("q75", 0.75)):
        assert s[key] == pytest.approx(ref_percentile(c, q))
    assert s["iqr"] == pytest.approx(ref_percentile(c, 0.75) - ref_percentile(c, 0.25))
    p = [x / sum(c) for x in c if x > 0]
    assert s["entropy_bits"] == pytest.approx(-sum(x * math.log2(x) for x in p))
    assert s["active_experts"] == sum(1 for x in c if x > 0)
    assert s["zero_usage_experts"] == sum(1 for x in c if x == 0)
    assert s["expert_diversity"] == pytest.approx(s["active_experts"] / len(c))
    assert s["total_usage"] == sum(int(x) for x in c)
    assert s["min"] == min(c) and s["max"] == max(c)
    assert s["max_mean_load"] == pytest.approx(max(c) / mu)
    # Gini as the mean absolute difference over all pairs / (2 mean)
    g = sum(abs(float(a) - float(b)) for a in c for b in c) / (2 * len(c) ** 2 * mu)
    assert s["gini"] == pytest.approx(g)


def test_balance_extremes():
    assert analysis.gini([5] * E) == pytest.approx(0.0)
    assert analysis.gini([0] * (E - 1) + [10]) == pytest.approx((E - 1) / E)
    assert analysis.jsd_bits([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    assert analysis.jsd_bits([1, 0], [0, 1]) == pytest.approx(1.0)
    j = analysis.joint_stats(np.eye(E) * 3)
    assert j["mutual_information_bits"] == pytest.approx(3.0)
    assert j["conditional_entropy_bits"] == pytest.approx(0.0)
    j = analysis.joint_stats(np.ones((E, E)))
    assert j["mutual_information_bits"] == pytest.approx(0.0)
    acc = analysis.table_topk_accuracy(np.ones((4, 4)), ks=(1, 2, 4, 8))
    assert acc == pytest.approx({"1": 0.25, "2": 0.5, "4": 1.0, "8": 1.0})


def test_sparse_counts_merge():
    rng = np.random.default_rng(0)
    sc = analysis.SparseCounts()
    allk = []
    for _ in range(30):
        k = rng.integers(0, 5000, size=3000)
        allk.append(k)
        sc.add(k)
    keys, counts = sc.finish()
    ref_k, ref_c = np.unique(np.concatenate(allk), return_counts=True)
    assert np.array_equal(keys, ref_k) and np.array_equal(counts, ref_c)


# ---------------------------------------------------------------- known-answer stores


def balanced_experts(t):
    return (np.arange(t) % E).astype(np.int32)


def run(tmp_path, **kw):
    path = make_store(str(tmp_path / "store"), **kw)
    return analysis.analyze_store(open_store(path), examples=3)


def test_uniform_routing(tmp_path):
    t = 40 * 16
    ex = balanced_experts(t)
    rng = np.random.default_rng(3)
    s = run(tmp_path, lengths=[16] * 40, experts={"enc.1": ex, "enc.3": rng.permutation(ex)}, num_experts=E)
    pl = s["encoder"]["per_layer"]["enc.1"]
    assert pl["entropy_bits"] == pytest.approx(3.0)
    assert pl["normalized_entropy"] == pytest.approx(1.0)
    assert pl["cv"] == pytest.approx(0.0) and pl["gini"] == pytest.approx(0.0)
    assert pl["max_mean_load"] == pytest.approx(1.0)
    assert pl["aux_loss"] == pytest.approx(1.0)  # E * sum(f * P) with f = 1/E whatever P is
    assert pl["active_experts"] == E and pl["zero_usage_experts"] == 0 and pl["expert_diversity"] == 1.0
    assert pl["skewness"] == 0.0 and pl["kurtosis"] == 0.0


def test_all_tokens_to_one_expert(tmp_path):
    t = 30 * 10
    ex = np.full(t, 5, np.int32)
    s = run(tmp_path, lengths=[10] * 30, experts={"enc.1": ex, "enc.3": ex}, num_experts=E)
    pl = s["encoder"]["per_layer"]["enc.1"]
    assert pl["entropy_bits"] == 0.0
    assert pl["active_experts"] == 1 and pl["zero_usage_experts"] == E - 1
    assert pl["unused_expert_ids"] == [0, 1, 2, 3, 4, 6, 7]
    assert pl["gini"] == pytest.approx((E - 1) / E)
    assert pl["max_mean_load"] == pytest.approx(E)
    assert pl["total_usage"] == t
    tr = s["encoder"]["transitions"][0]
    assert tr["mutual_information_bits"] == pytest.approx(0.0)
    assert tr["topk_accuracy"]["1"] == 1.0
    assert pl["token"]["consistency"] == 1.0


def test_deterministic_map_gives_log2_e(tmp_path):
    t = 50 * 16
    ex1 = balanced_experts(t)
    perm = np.random.default_rng(0).permutation(E)
    s = run(tmp_path, lengths=[16] * 50, experts={"enc.1": ex1, "enc.3": perm[ex1], "enc.5": perm[perm[ex1]]},
            num_experts=E)
    for tr in s["encoder"]["transitions"]:
        assert tr["mutual_information_bits"] == pytest.approx(math.log2(E))
        assert tr["conditional_entropy_bits"] == pytest.approx(0.0, abs=1e-12)
        assert tr["normalized_mi"] == pytest.approx(1.0)
        assert tr["topk_accuracy"]["1"] == 1.0
        p = analysis.transition_probs(tr["counts"])
        assert np.allclose(p.sum(axis=1), 1.0) and np.all((p == 0) | (p == 1))


# ---------------------------------------------------------------- random store vs. direct computation


@pytest.fixture(scope="module")
def random_store(tmp_path_factory):
    rng = np.random.default_rng(7)
    n = 45
    lengths = rng.integers(3, 40, size=n)
    t = int(lengths.sum())
    layers = ["enc.1", "enc.3", "enc.5"]
    experts = {k: rng.integers(0, E, size=t).astype(np.int32) for k in layers}
    experts["enc.3"][rng.random(t) < 0.5] = 2  # skew one layer
    logits = {k: (rng.normal(size=(t, E)) * 2).astype(np.float32) for k in layers}
    for k in layers:  # stored experts are the argmax of the stored logits
        experts[k] = logits[k].argmax(axis=1).astype(np.int32)
    dropped = {k: (rng.random(t) < 0.1).astype(np.uint8) for k in layers}
    datasets = [["glue/mrpc", "glue/sst2", "squad"][k % 3] for k in range(n)]
    token_ids = rng.integers(2, 30, size=t).astype(np.int32)
    path = make_store(str(tmp_path_factory.mktemp("rs") / "store"), lengths=lengths, experts=experts,
                      logits=logits, dropped=dropped, datasets=datasets, token_ids=token_ids,
                      num_experts=E, samples_per_shard=4, logits_dtype=np.float16)
    data = dict(lengths=lengths, experts=experts, dropped=dropped, datasets=datasets, token_ids=token_ids,
                logits={k: v.astype(np.float16).astype(np.float64) for k, v in logits.items()})
    return path, data


def test_random_store_against_direct(random_store, monkeypatch):
    path, d = random_store
    monkeypatch.setattr(accumulate, "CHUNK_ROWS", 17)  # many chunks per shard: streaming must not matter
    s = analysis.analyze_store(open_store(path), examples=4, seed=1)
    tok_ds = np.repeat(np.array(d["datasets"]), d["lengths"])
    for name, ex in d["experts"].items():
        pl = s["encoder"]["per_layer"][name]
        counts = np.bincount(ex, minlength=E)
        assert pl["expert_counts"] == counts.tolist()
        assert pl["drop_rate"] == pytest.approx(d["dropped"][name].mean())
        lg = d["logits"][name]
        lse = np.log(np.exp(lg).sum(axis=1))
        assert pl["z_loss"] == pytest.approx(np.mean(lse ** 2), rel=1e-5)
        p = np.exp(lg - lse[:, None])
        assert pl["aux_loss"] == pytest.approx(E * np.sum(counts / counts.sum() * p.mean(axis=0)), rel=1e-5)
        srt = np.sort(lg, axis=1)
        assert pl["margin"]["mean"] == pytest.approx(np.mean(srt[:, -1] - srt[:, -2]), rel=1e-4)
        assert pl["gate"]["mean"] == pytest.approx(np.mean(p.max(axis=1)), rel=1e-4)
        assert pl["gate"]["std"] == pytest.approx(np.std(p.max(axis=1)), rel=1e-3)
        assert sum(pl["gate"]["hist"]["counts"]) == ex.size
        # token-id consistency and mutual information, from plain dictionaries
        table = {}
        for tok, e in zip(d["token_ids"].tolist(), ex.tolist()):
            table.setdefault(tok, {}).setdefault(e, 0)
            table[tok][e] += 1
        n = ex.size
        assert pl["token"]["consistency"] == pytest.approx(sum(max(v.values()) for v in table.values()) / n)
        h_e = -sum(c / n * math.log2(c / n) for c in counts if c)
        h_e_t = -sum(c / n * math.log2(c / sum(v.values())) for v in table.values() for c in v.values())
        assert pl["token"]["mi_bits"] == pytest.approx(h_e - h_e_t)
        for ds in set(d["datasets"]):
            m = tok_ds == ds
            assert pl["per_dataset"][ds]["expert_counts"] == np.bincount(ex[m], minlength=E).tolist()
            assert pl["per_dataset"][ds]["drop_rate"] == pytest.approx(d["dropped"][name][m].mean())
        dv = s["encoder"]["dataset_divergence"]
        i, j = dv["datasets"].index("glue/mrpc"), dv["datasets"].index("squad")
        pa = np.bincount(ex[tok_ds == "glue/mrpc"], minlength=E) / np.sum(tok_ds == "glue/mrpc")
        pb = np.bincount(ex[tok_ds == "squad"], minlength=E) / np.sum(tok_ds == "squad")
        mm = (pa + pb) / 2
        kl = lambda a: sum(x * math.log2(x / y) for x, y in zip(a, mm) if x > 0)  # noqa: E731
        assert dv["per_layer"][name][i][j] == pytest.approx(0.5 * kl(pa) + 0.5 * kl(pb))
    # transitions: counts of consecutive pairs, conditional entropy from the definition
    a, b = d["experts"]["enc.1"], d["experts"]["enc.3"]
    tr = s["encoder"]["transitions"][0]
    j = np.zeros((E, E))
    for x, y in zip(a, b):
        j[x, y] += 1
    assert np.array_equal(np.array(tr["counts"]), j)
    n = a.size
    h_cond = -sum(j[x, y] / n * math.log2(j[x, y] / j[x].sum()) for x in range(E) for y in range(E) if j[x, y])
    assert tr["conditional_entropy_bits"] == pytest.approx(h_cond)
    assert tr["topk_accuracy"]["1"] == pytest.approx(j.max(axis=1).sum() / n)
    for ds in set(d["datasets"]):  # the same per dataset
        m = tok_ds == ds
        jd = np.zeros((E, E))
        np.add.at(jd, (a[m], b[m]), 1)
        ref = analysis.joint_stats(jd)
        assert tr["per_dataset"][ds]["mutual_information_bits"] == pytest.approx(ref["mutual_information_bits"])
        assert tr["per_dataset"][ds]["topk_accuracy"]["1"] == pytest.approx(jd.max(axis=1).sum() / m.sum())
    overall = np.sum([np.bincount(v, minlength=E) for v in d["experts"].values()], axis=0)
    assert s["encoder"]["overall"]["expert_counts"] == overall.tolist()
    # examples: seeded, and the paths are the stored experts
    assert len(s["examples"]) == 4
    offs = np.concatenate([[0], np.cumsum(d["lengths"])])
    for e in s["examples"]:
        k = e["index"]
        rows = slice(offs[k], min(offs[k + 1], offs[k] + 24))
        assert e["paths"] == np.stack([d["experts"][n][rows] for n in e["layers"]], axis=1).tolist()
    again = analysis.analyze_store(open_store(path), examples=4, seed=1)
    assert [e["index"] for e in again["examples"]] == [e["index"] for e in s["examples"]]


def test_manifest_counts_agree(random_store):
    path, _ = random_store
    st = open_store(path)
    s = analysis.analyze_store(st, examples=0)
    for name, want in st.manifest["per_layer"].items():
        assert s["encoder"]["per_layer"][name]["expert_counts"] == want["expert_counts"]


def test_decoder_stack(tmp_path):
    rng = np.random.default_rng(2)
    n = 12
    dec = {"dec.1": rng.integers(0, E, 5 * n).astype(np.int32), "dec.3": rng.integers(0, E, 5 * n).astype(np.int32)}
    path = make_store(str(tmp_path / "s"), lengths=[6] * n, experts={"enc.1": rng.integers(0, E, 6 * n)},
                      num_experts=E, dec_lengths=[5] * n, dec_experts=dec)
    s = analysis.analyze_store(open_store(path), examples=2)
    assert s["num_decoder_tokens"] == 5 * n
    assert s["decoder"]["per_layer"]["dec.3"]["expert_counts"] == np.bincount(dec["dec.3"], minlength=E).tolist()
    assert s["decoder"]["transitions"][0]["from"] == "dec.1"
    assert "decoder" in s["examples"][0]


# ---------------------------------------------------------------- report and command line

SEED_KEYS = ("entropy_bits", "skewness", "kurtosis", "median", "q25", "q75", "iqr", "active_experts",
             "expert_diversity", "total_usage", "zero_usage_experts", "mean", "std", "cv", "min", "max")


def test_cli_writes_stats_and_report(random_store, tmp_path):
    path, _ = random_store
    out = tmp_path / "out"
    assert analysis.main([path, "-o", str(out), "-q", "--per-layer-charts", "--link-images"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    for name in ("enc.1", "enc.3", "enc.5"):
        for key in SEED_KEYS:
            assert key in stats["encoder"]["per_layer"][name], key
    html = (out / "report.html").read_text()
    imgs = [x.split("'")[0] for x in html.split("<img src='")[1:]]
    assert len(imgs) >= 9
    for name in imgs:
        p = out / name
        assert p.exists() and p.stat().st_size > 2000, name
    assert png_size(out / "usage_enc.1.png") == (1000, 450)
    assert png_size(out / "enc_layer_expert_heatmap.png") == (1000, 450)
    assert png_size(out / "enc_transitions.png") == (840, 400)  # 2 layer pairs side by side
    assert png_size(out / "enc_confidence.png") == (1000, 450)
    assert png_size(out / "enc_datasets_jsd.png") == (700, 600)
    assert "glue/sst2" in html


def test_cli_reports_bad_store(tmp_path, capsys):
    assert analysis.main([str(tmp_path / "missing"), "-o", str(tmp_path / "o"), "-q"]) == 1
    assert "moetrace: error:" in capsys.readouterr().err


def test_permutation_store_helper(tmp_path):
    path = permutation_store(str(tmp_path / "p"))
    s = analysis.analyze_store(open_store(path), examples=0, token_stats=False)
    assert all(t["topk_accuracy"]["1"] == 1.0 for t in s["encoder"]["transitions"])
    assert "token" not in s["encoder"]["per_layer"]["enc.1"]
    assert softmax(np.zeros((1, 4))).sum() == pytest.approx(1.0)


def test_token_counts_dense_then_sparse(monkeypatch):
    monkeypatch.setattr(analysis.TokenCounts, "DENSE_MAX", 1000)
    rng = np.random.default_rng(3)
    tc = analysis.TokenCounts()
    parts = [rng.integers(0, 500, 300), rng.integers(0, 900, 300), rng.integers(0, 5000, 300), rng.integers(0, 50, 10)]
    for p in parts:
        tc.add(p)
    keys, counts = tc.finish()
    ref_k, ref_c = np.unique(np.concatenate(parts), return_counts=True)
    assert np.array_equal(keys, ref_k) and np.array_equal(counts, ref_c)
    tc = analysis.TokenCounts()
    tc.add(parts[0])
    keys, counts = tc.finish()
    ref_k, ref_c = np.unique(parts[0], return_counts=True)
    assert np.array_equal(keys, ref_k) and np.array_equal(counts, ref_c)


def test_bf16_logits(tmp_path):
    from analysis_testutil import from_bf16_bits, to_bf16_bits
    rng = np.random.default_rng(21)
    t = 20 * 12
    lg = (rng.normal(size=(t, E)) * 3).astype(np.float32)
    wide = from_bf16_bits(to_bf16_bits(lg)).astype(np.float64)
    ex = wide.argmax(axis=1).astype(np.int32)
    s = run(tmp_path, lengths=[12] * 20, experts={"enc.1": ex}, logits={"enc.1": lg}, logits_dtype="bf16",
            num_experts=E)
    pl = s["encoder"]["per_layer"]["enc.1"]
    lse = np.log(np.exp(wide).sum(axis=1))
    assert pl["z_loss"] == pytest.approx(np.mean(lse ** 2), rel=1e-5)
    srt = np.sort(wide, axis=1)
    assert pl["margin"]["mean"] == pytest.approx(np.mean(srt[:, -1] - srt[:, -2]), rel=1e-5)
