"""Rendering of `moetrace analyze`'s statistics: report.html (self-contained) and its charts. Reads the
stats.json dictionary only (keys in docs/ANALYSIS.md)."""

from __future__ import annotations

import html
import json
import os

import numpy as np

from . import keys
from .accumulate import GATE_BINS, MARGIN_BINS
from .stats import transition_probs

TRANSITION_MIN_ROW = 10  # transition-map rows with fewer tokens are masked in the chart


def make_plots(stats: dict, out_dir: str, per_layer_charts: bool = False, jsd_vmax: float | None = None,
               transition_min_row: int | None = None) -> dict[str, list[str]]:
    """Draws every chart of the report into out_dir; returns {section: [file names]}. jsd_vmax: a
    fixed upper end of the dataset-JSD colour scale (1.0 = the full 0..1 bits range), else the data's."""
    from . import plots

    if transition_min_row is None:
        transition_min_row = TRANSITION_MIN_ROW
    files: dict[str, list[str]] = {}
    family = (stats.get("routing") or {}).get("family")
    for stack_key in ("encoder", "decoder"):
        title = keys.pass_title(stack_key, family)
        st = stats.get(stack_key)
        if not st or not st["layers"]:
            continue
        tag = "enc" if stack_key == "encoder" else "dec"
        names = st["layers"]
        pl = st["per_layer"]
        f = files.setdefault(stack_key, [])
        f.append(plots.usage_grid(os.path.join(out_dir, f"{tag}_usage_grid.png"), names,
                                  [pl[n]["expert_counts"] for n in names], f"{title}: top-1 expert usage per layer"))
        if per_layer_charts:
            for n in names:
                f.append(plots.usage_bars(os.path.join(out_dir, f"usage_{n}.png"), pl[n]["expert_counts"],
                                          f"{n}: top-1 expert usage ({pl[n]['tokens']} tokens)"))
        share = np.array([np.asarray(pl[n]["expert_counts"], float) / max(1, pl[n]["tokens"]) * 100 for n in names])
        f.append(plots.heatmap(os.path.join(out_dir, f"{tag}_layer_expert_heatmap.png"), share,
                               f"{title}: share of tokens per expert (%)", "expert", "MoE layer",
                               "share of tokens (%)", yticklabels=names))
        x = list(range(len(names)))
        mi = {t["to"]: t["normalized_mi"] for t in st["transitions"]}
        f.append(plots.lines(os.path.join(out_dir, f"{tag}_balance.png"), x, {
            "normalized entropy": [pl[n]["normalized_entropy"] for n in names],
            "Gini": [pl[n]["gini"] for n in names],
            "drop rate": [pl[n]["drop_rate"] for n in names],
            "MI(prev layer) / H": [mi.get(n) for n in names],
            "token-id consistency": [pl[n].get("token", {}).get("consistency") for n in names],
        }, f"{title}: balance and predictability across layers", "MoE layer", "value (0..1)",
            xticklabels=names, ylim=(0, 1.05)))
        # one panel per scale: max/mean load ~ 1..E, aux loss ~ 1, z-loss ~ tens
        f.append(plots.panels(os.path.join(out_dir, f"{tag}_loads.png"), x, [
            ("max / mean load (1 = balanced)", {"max/mean": [pl[n]["max_mean_load"] for n in names]}),
            ("aux loss (1 = balanced)", {"aux loss": [pl[n]["aux_loss"] for n in names]}),
            ("router z-loss", {"z-loss": [pl[n]["z_loss"] for n in names]}),
        ], f"{title}: load-balance losses across layers", "MoE layer", xticklabels=names))
        if any(pl[n]["gate"].get("count") for n in names):
            f.append(plots.histogram_pair(
                os.path.join(out_dir, f"{tag}_confidence.png"),
                (GATE_BINS, {n: pl[n]["gate"]["hist"]["counts"] for n in names if pl[n]["gate"].get("count")},
                 "top-1 gate probability"),
                (MARGIN_BINS, {n: pl[n]["margin"]["hist"]["counts"] for n in names if pl[n]["margin"].get("count")},
                 f"top-1 minus top-2 logit (last bin: ≥ {MARGIN_BINS[-2]:g})"),
                f"{title}: router confidence (ranges fitted to the data)"))
        if st["transitions"]:
            mats, titles, masked = [], [], 0
            for t in st["transitions"]:
                c = np.asarray(t["counts"], np.float64)
                p = transition_probs(c)
                few = c.sum(axis=1) < transition_min_row
                p[few] = np.nan
                masked += int(few.sum())
                mats.append(p)
                titles.append(f"{t['from']} → {t['to']}: MI {t['mutual_information_bits']:.2f} bits"
                              + (f"; {int(few.sum())} rows masked" if few.any() else ""))
            e = stats["num_experts"]
            log = e > 16
            f.append(plots.heatmap_grid(
                os.path.join(out_dir, f"{tag}_transitions.png"), mats, titles,
                f"{title}: P(expert at next MoE layer | expert at this layer)"
                + (", log colour scale" if log else "")
                + (f"; grey: {masked} rows with < {transition_min_row} tokens" if masked else ""),
                "expert at next layer", "expert at this layer", "probability", log=log))
            st["transition_rows_masked"] = masked
        dv = st["dataset_divergence"]
        ds = dv["datasets"]
        if len(ds) > 1:
            if len(ds) <= 12:
                f.append(plots.lines(os.path.join(out_dir, f"{tag}_datasets_entropy.png"), x,
                                     {d: [pl[n]["per_dataset"].get(d, {}).get("normalized_entropy") for n in names]
                                      for d in ds},
                                     f"{title}: normalized routing entropy per dataset", "MoE layer",
                                     "entropy / log2(E)", xticklabels=names, ylim=(0, 1.05)))
            else:  # many datasets: a heatmap instead of a line per dataset
                ent = np.array([[pl[n]["per_dataset"].get(d, {}).get("normalized_entropy", np.nan) for n in names]
                                for d in ds], np.float64)
                f.append(plots.heatmap(os.path.join(out_dir, f"{tag}_datasets_entropy.png"), ent,
                                       f"{title}: normalized routing entropy per dataset", "MoE layer", "dataset",
                                       "entropy / log2(E)", yticklabels=ds, xticklabels=names,
                                       figsize=(7.0, max(4.5, 0.16 * len(ds) + 1.5)), vmin=0.0, vmax=1.0))
            order = dv.get("order") or list(range(len(ds)))
            jsd = np.asarray(dv["mean_over_layers"], np.float64)[np.ix_(order, order)]
            floor = np.asarray(dv.get("noise_floor_mean_over_layers") or np.zeros_like(jsd), np.float64)
            floor = floor[np.ix_(order, order)] if floor.shape == jsd.shape and dv.get("noise_floor_mean_over_layers") \
                else floor
            excess = np.maximum(0.0, jsd - floor)
            within = (jsd <= 2.0 * floor) & ~np.eye(len(ds), dtype=bool)
            labels = [ds[i] for i in order]
            vmax = jsd_vmax  # auto: never stretch differences within the noise to the full colour scale
            if vmax is None:
                vmax = max(float(np.nanmax(excess)) if excess.size else 0.0, 3.0 * float(np.nanmax(floor)), 1e-6)
            side = 6.0 if len(ds) <= 12 else min(16.0, 4.0 + 0.2 * len(ds))
            f.append(plots.heatmap(
                os.path.join(out_dir, f"{tag}_datasets_jsd.png"), excess,
                f"{title}: JSD between datasets minus its noise floor (mean over layers"
                + (", clustered" if len(ds) > 2 else "") + ")",
                "dataset", "dataset", "JSD − noise floor (bits)", yticklabels=labels, xticklabels=labels,
                figsize=(side + 1.0, side), vmin=0, vmax=vmax, annotate=True, marks=within,
                mark_label="dot: JSD ≤ 2 × noise floor (random halves of the same text reach it)"))
            share = np.array([np.asarray(st["overall"]["per_dataset"][d]["expert_counts"], float) for d in labels])
            share = share / np.maximum(1, share.sum(axis=1, keepdims=True)) * 100
            f.append(plots.heatmap(os.path.join(out_dir, f"{tag}_datasets_usage.png"), share,
                                   f"{title}: expert usage per dataset, all layers (%)", "expert", "dataset",
                                   "share of tokens (%)", yticklabels=labels,
                                   figsize=(10.0, max(4.5, 0.16 * len(ds) + 1.5))))
    return files


def render_html(stats: dict, files: dict[str, list[str]], out_dir: str = ".", embed: bool = True,
                top_pairs: int = 30) -> str:
    from .report import Col, demo_banner, image, page, table

    img = lambda name: image(out_dir, name, embed)  # noqa: E731
    cnt, pct, flt, bits, txt = (lambda h: Col(h, "int")), (lambda h: Col(h, "pct")), (lambda h: Col(h)), \
        (lambda h: Col(h, "bits")), (lambda h: Col(h, "text"))
    model = {"id": stats["model"], "demo": stats.get("demo_model")}
    skipped = stats.get("skipped_synthetic_samples") or 0
    out = ["<h1>moetrace analyze</h1>", demo_banner(model),
           f"<p>Store <code>{html.escape(stats['store'])}</code>, model {html.escape(str(stats['model']))}, "
           f"{stats['num_experts']} experts, {stats['num_samples']:,} samples"
           + (f" (real only: {skipped:,} synthetic left out)" if stats.get("real_only") else "")
           + f", {stats['num_tokens']:,} encoder tokens, {stats['num_decoder_tokens']:,} decoder tokens; "
           f"analysed in {stats['elapsed_s']:.2f} s. All numbers are in <code>stats.json</code> (keys in "
           "docs/ANALYSIS.md).</p>"]
    out.append("<h2>Datasets</h2>" + table([txt("dataset"), cnt("samples"), cnt("encoder tokens")],
                                            [[d, v["samples"], v["tokens"]] for d, v in stats["datasets"].items()]))
    for stack_key in ("encoder", "decoder"):
        st = stats.get(stack_key)
        if not st or not st["layers"]:
            continue
        pl = st["per_layer"]
        imgs = files.get(stack_key, [])
        out.append(f"<h2>{keys.pass_title(stack_key, (stats.get('routing') or {}).get('family')).capitalize()}</h2>")
        out.append("<h3>Expert usage</h3>")
        out.append(table([txt("layer"), cnt("tokens"), flt("mean"), flt("std"), flt("cv"), bits("entropy (bits)"),
                          cnt("min"), cnt("max"), flt("skew"), flt("kurt"), flt("median"), flt("IQR"), cnt("active"),
                          cnt("unused"), pct("drop rate")],
                         [[n, pl[n]["tokens"], pl[n]["mean"], pl[n]["std"], pl[n]["cv"], pl[n]["entropy_bits"],
                           pl[n]["min"], pl[n]["max"], pl[n]["skewness"], pl[n]["kurtosis"], pl[n]["median"],
                           pl[n]["iqr"], pl[n]["active_experts"], pl[n]["zero_usage_experts"], pl[n]["drop_rate"]]
                          for n in st["layers"]]))
        out += [img(x) for x in imgs if "usage_grid" in x or "layer_expert_heatmap" in x]
        out.append("<h3>Load balance and router confidence</h3>")
        out.append(table([txt("layer"), flt("max/mean"), flt("Gini"), flt("aux loss"), flt("z-loss"),
                          flt("gate mean"), flt("gate p10"), flt("margin mean"), flt("margin p50")],
                         [[n, pl[n]["max_mean_load"], pl[n]["gini"], pl[n]["aux_loss"], pl[n]["z_loss"],
                           pl[n]["gate"].get("mean"), pl[n]["gate"].get("p10"), pl[n]["margin"].get("mean"),
                           pl[n]["margin"].get("p50")] for n in st["layers"]]))
        out += [img(x) for x in imgs if any(s in x for s in ("_balance", "_loads", "_confidence"))]
        out.append("<h3>Layer to layer</h3><p>In-sample top-k accuracy of a transition table (an upper bound of "
                   "what the <code>transition</code> predictor reaches on held-out samples).</p>")
        out.append(table([txt("from"), txt("to"), bits("H(to)"), bits("H(to|from)"), bits("MI (bits)"), flt("MI/H"),
                          pct("top-1"), pct("top-2"), pct("top-4")],
                         [[t["from"], t["to"], t["h_to_bits"], t["conditional_entropy_bits"],
                           t["mutual_information_bits"], t["normalized_mi"], t["topk_accuracy"]["1"],
                           t["topk_accuracy"]["2"], t["topk_accuracy"]["4"]] for t in st["transitions"]]))
        if st.get("transition_rows_masked"):
            out.append(f"<p class='note'>Transition maps: {st['transition_rows_masked']} rows (experts of the "
                       f"earlier layer chosen by fewer than {TRANSITION_MIN_ROW} tokens) are grey: their "
                       "probabilities rest on too few tokens to show.</p>")
        out += [img(x) for x in imgs if "_transitions." in x]
        if any("token" in pl[n] for n in st["layers"]):
            out.append("<h3>Token ids</h3><p>consistency: share of tokens whose id's most frequent expert is the one "
                       "chosen (SiDA-style); explained: I(token id; expert) / H(expert).</p>")
            out.append(table([txt("layer"), cnt("unique ids"), pct("consistency"), pct("consistency (ids seen ≥ 10×)"),
                              bits("MI (bits)"), pct("explained")],
                             [[n, pl[n]["token"]["unique_tokens"], pl[n]["token"]["consistency"],
                               pl[n]["token"]["consistency_min_count"], pl[n]["token"]["mi_bits"],
                               pl[n]["token"]["explained_fraction"]] for n in st["layers"] if "token" in pl[n]]))
        dv = st["dataset_divergence"]
        if len(dv["datasets"]) > 1:
            pairs = dv.get("pairs") or []
            out.append("<h3>Datasets</h3><p>Jensen-Shannon divergence of the top-1 expert distributions (bits, "
                       "mean over layers). The <i>noise floor</i> is the JSD the two datasets would show at these "
                       "token counts if their routing were the same (their tokens pooled and split at random); "
                       "<i>excess</i> = JSD − floor. Pairs whose JSD is within twice the floor are dotted in the "
                       f"heatmap. {len(pairs):,} pairs, the {min(top_pairs, len(pairs))} most divergent below; all "
                       "in <code>stats.json</code> (<code>dataset_divergence.pairs</code>).</p>")
            out.append(table([txt("dataset"), txt("dataset"), bits("JSD"), bits("noise floor"), bits("excess")],
                             [[r["a"], r["b"], r["jsd"], r["noise_floor"], r["excess"]] for r in pairs[:top_pairs]]))
            out += [img(x) for x in imgs if "_datasets_" in x]
        if any(x.startswith("usage_") for x in imgs):
            out.append("<h3>Per-layer charts</h3>")
            out += [img(x) for x in imgs if x.startswith("usage_")]
    if stats["examples"]:
        tt = stats.get("token_text") or {}
        note = (f"Token text from <code>{html.escape(str(tt['tokenizer']))}</code>." if tt.get("tokenizer")
                else html.escape(tt.get("note") or "token ids only."))
        out.append("<h2>Example expert paths</h2><p>One row per token: the token, then the expert at each MoE "
                   f"layer. {note}</p>")
        for ex in stats["examples"]:
            out.append(f"<h4>{html.escape(ex['sample_id'])} ({html.escape(ex['dataset'])}, {ex['tokens']} tokens)</h4>")
            pieces = ex.get("token_pieces")
            if pieces:
                out.append(table([txt("token"), cnt("id")] + [cnt(n) for n in ex["layers"]],
                                 [[pc, t] + p for pc, t, p in zip(pieces, ex["token_ids"], ex["paths"])]))
            else:
                out.append(table([cnt("token id")] + [cnt(n) for n in ex["layers"]],
                                 [[t] + p for t, p in zip(ex["token_ids"], ex["paths"])]))
    return page("moetrace analyze", out)


def write_report(stats: dict, out_dir: str, per_layer_charts: bool = False, embed: bool = True,
                 jsd_vmax: float | None = None, top_pairs: int = 30) -> None:
    os.makedirs(out_dir, exist_ok=True)
    files = make_plots(stats, out_dir, per_layer_charts, jsd_vmax=jsd_vmax)
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    with open(os.path.join(out_dir, "report.html"), "w") as f:
        f.write(render_html(stats, files, out_dir, embed=embed, top_pairs=top_pairs))
