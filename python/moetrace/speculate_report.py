"""Rendering of `moetrace speculate`'s results: speculation.md, speculation.html (self-contained) and
the charts. Reads the result dictionary only (speculation.json's keys, docs/ANALYSIS.md)."""

from __future__ import annotations

import json
import os

import numpy as np

from . import keys
from .cachesim import POLICIES
from .evaluation import KS


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _shown_ks(res: dict) -> list[int]:
    """The ks worth a column: recall@E and beyond are 100% by definition."""
    return [k for k in res.get("ks", KS) if k < res["num_experts"]] or [1]


def _detail_ks(res: dict) -> list[int]:
    """The ks of the per-target table beside top-1 (at most three)."""
    return [k for k in _shown_ks(res) if k > 1][:3]


def render_markdown(res: dict) -> str:
    ks = _shown_ks(res)
    dk = _detail_ks(res)
    out = ["# moetrace speculate", ""]
    if res.get("demo_model"):
        out += ["**Demo model: random weights.** This store was collected with a random-weight demo model; its "
                "routing says nothing about a trained model's.", ""]
    out += [f"Store `{res['store']}`, model {res['model']}, {res['num_experts']} experts"
            + (", real samples only" if res.get("real_only") else "") + ". Split: "
            f"`{json.dumps(res['split'])}`. {res['elapsed_s']:.2f} s.", ""]
    if res["unavailable"]:
        out.append("Unavailable: " + "; ".join(f"{k}: {v}" for k, v in res["unavailable"].items()))
        out.append("")
    for key in ("encoder", "decoder"):
        st = res.get(key)
        if not st:
            continue
        out += [f"## {keys.pass_title(key, (res.get('routing') or {}).get('family')).capitalize()}", "",
                f"Train: {st['train']['samples']} samples, {st['train']['tokens']} tokens; test: "
                f"{st['test']['samples']} samples, {st['test']['tokens']} tokens.", "",
                "Predictors ranked by top-1 accuracy on held-out samples (token-weighted over the target layers "
                "each can reach; lookahead = MoE layers ahead, 0 = known before the forward pass):", "",
                "| rank | predictor | lookahead | targets | " + " | ".join(f"recall@{k}" for k in ks) + " |",
                "|---|---|---|---|" + "---|" * len(ks)]
        for r in st["summary"]:
            out.append(f"| {r['rank']} | {r['predictor']} | {r['lookahead']} | {len(r['targets'])} | "
                       + " | ".join(_pct(r["recall"].get(str(k))) for k in ks) + " |")
        out.append("")
        out += ["Per target layer (all datasets; 95% CI of top-1 over samples):", "",
                "| predictor | lookahead | target | tokens | top-1 | 95% CI | "
                + " | ".join(f"recall@{k}" for k in dk) + (" |" if dk else "|"),
                "|---|---|---|---|---|---|" + "---|" * len(dk)]
        for r in st["results"]:
            if r["dataset"] != "all":
                continue
            ci = r["ci95"]["1"]
            out.append(f"| {r['predictor']} | {r['lookahead']} | {r['target']} | {r['tokens']} | {_pct(r['top1'])} | "
                       + (f"{_pct(ci[0])}–{_pct(ci[1])}" if ci else "–") + " | "
                       + " | ".join(_pct(r["recall"].get(str(k))) for k in dk) + (" |" if dk else ""))
        out.append("")
        c = st.get("cache")
        if c:
            out += [f"Expert cache ({c['mode']} replay of the test samples, {c['tokens']} tokens; expert "
                    f"{c['expert_bytes'] / 2**20:.1f} MiB, {c['bandwidth_gbs']} GB/s, {c['layer_ms']} ms per layer "
                    f"request; prefetch: {c['prefetch_predictor']} top-{c['prefetch_k']}). All experts on the GPU: "
                    f"{c['all_on_gpu_ms_per_token']:.3f} ms/token; no cache: {c['no_cache_ms_per_token']:.3f} ms/token.",
                    "", "| experts/layer | policy | prefetch | hit rate | experts moved | GiB moved | ms/token |",
                    "|---|---|---|---|---|---|---|"]
            for r in c["runs"]:
                out.append(f"| {r['cache_experts_per_layer']} | {r['policy']} | {'yes' if r['prefetch'] else 'no'} | "
                           f"{_pct(r['hit_rate'])} | {r['experts_transferred']} | {r['bytes_transferred'] / 2**30:.2f} | "
                           f"{r['ms_per_token']:.3f} |")
            out.append("")
        if st.get("learned"):
            curves = st["learned"]["loss_curves"]
            out.append(f"Learned predictor ({st['learned'].get('train_s', 0.0):.2f} s of training) loss, first → last "
                       "logged step (validation in brackets): " + ", ".join(
                           f"{st['layers'][int(t)]}: {c[0]['loss']:.3f} → {c[-1]['loss']:.3f}"
                           + (f" [{c[-1]['val_loss']:.3f}]" if "val_loss" in c[-1] else "")
                           for t, c in curves.items() if c))
            out.append("")
    return "\n".join(out)


def make_plots(res: dict, out_dir: str) -> list[str]:
    from . import plots
    files = []
    for key in ("encoder", "decoder"):
        st = res.get(key)
        if not st:
            continue
        ks = [k for k in res.get("ks", KS) if k <= res["num_experts"]]
        series, bands = {}, {}
        for r in st["summary"]:
            name = f"{r['predictor']} (d={r['lookahead']})"
            series[name] = [r["recall"].get(str(k)) for k in ks]
            ci = r.get("ci95") or {}
            if all(ci.get(str(k)) for k in ks):
                bands[name] = ([ci[str(k)][0] for k in ks], [ci[str(k)][1] for k in ks])
        files.append(plots.lines(os.path.join(out_dir, f"{key}_recall_at_k.png"), ks, series,
                                 f"{keys.pass_title(key, (res.get('routing') or {}).get('family'))}: recall@k on held-out samples (band: 95% CI over samples)",
                                 "k (experts prefetched per layer)", "recall@k", logx=True, ylim=(0, 1.02),
                                 bands=bands))
        c = st.get("cache")
        if c and c["runs"]:
            files.append(plots.cache_panels(os.path.join(out_dir, f"{key}_cache_hit_rate.png"), c["runs"],
                                            [p for p in POLICIES if any(r["policy"] == p for r in c["runs"])],
                                            c["tokens"],
                                            f"{keys.pass_title(key, (res.get('routing') or {}).get('family'))}: expert cache ({c['mode']} replay; prefetch "
                                            f"{c['prefetch_predictor']} top-{c['prefetch_k']})"))
        if st.get("learned") and st["learned"]["loss_curves"]:
            curves = st["learned"]["loss_curves"]
            series, styles = {}, {}
            names = [st["layers"][int(t)] for t in curves]
            pal = plots.palette(len(names))
            for (t, cv), name, (colour, _) in zip(curves.items(), names, pal):
                steps = [p["step"] for p in cv]
                series[f"{name} train"] = (steps, [p["loss"] for p in cv])
                styles[f"{name} train"] = {"color": colour, "ls": "-"}
                if cv and "val_loss" in cv[0]:
                    series[f"{name} validation"] = (steps, [p["val_loss"] for p in cv])
                    styles[f"{name} validation"] = {"color": colour, "ls": "--"}
            files.append(plots.lines(os.path.join(out_dir, f"{key}_learned_loss.png"), None, series,
                                     f"{keys.pass_title(key, (res.get('routing') or {}).get('family'))}: learned predictor loss per target layer (solid: training, dashed: "
                                     "validation)", "step", "cross-entropy (nats)", markers=False, styles=styles))
    return files


def render_html(res: dict, files: list[str], out_dir: str, embed: bool = True) -> str:
    """speculation.html: the Markdown's tables with per-column formats and the charts embedded."""
    import html as H
    from .report import Col, demo_banner, image, page, table

    ks, dk = _shown_ks(res), _detail_ks(res)
    txt, cnt, pct = (lambda h: Col(h, "text")), (lambda h: Col(h, "int")), (lambda h: Col(h, "pct"))
    out = ["<h1>moetrace speculate</h1>", demo_banner({"id": res["model"], "demo": res.get("demo_model")}),
           f"<p>Store <code>{H.escape(res['store'])}</code>, model {H.escape(str(res['model']))}, "
           f"{res['num_experts']} experts" + (", real samples only" if res.get("real_only") else "")
           + f"; {res['elapsed_s']:.2f} s. Split: <code>{H.escape(json.dumps(res['split']))}</code>. All numbers "
           "are in <code>speculation.json</code> (keys in docs/ANALYSIS.md).</p>"]
    if res["unavailable"]:
        out.append("<p class='note'>Unavailable: " + "; ".join(f"{H.escape(k)}: {H.escape(str(v))}"
                                                            for k, v in res["unavailable"].items()) + "</p>")
    for key in ("encoder", "decoder"):
        st = res.get(key)
        if not st:
            continue
        mine = [f for f in files if f.startswith(key + "_")]
        out.append(f"<h2>{keys.pass_title(key, (res.get('routing') or {}).get('family')).capitalize()}</h2><p>Train: {st['train']['samples']:,} samples, "
                   f"{st['train']['tokens']:,} tokens; test: {st['test']['samples']:,} samples, "
                   f"{st['test']['tokens']:,} tokens. Fit {st['fit_s']:.2f} s, evaluation {st['eval_s']:.2f} s.</p>")
        out.append("<h3>Predictors</h3><p>Ranked by top-1 accuracy on held-out samples (token-weighted over the "
                   "target layers each can reach; lookahead = MoE layers ahead, 0 = known before the forward "
                   "pass).</p>")
        out.append(table([cnt("rank"), txt("predictor"), cnt("lookahead"), cnt("targets")]
                         + [pct(f"recall@{k}") for k in ks],
                         [[r["rank"], r["predictor"], r["lookahead"], len(r["targets"])]
                          + [r["recall"].get(str(k)) for k in ks] for r in st["summary"]]))
        out += [image(out_dir, f, embed) for f in mine if "_recall_at_k" in f]
        rows = []
        for r in st["results"]:
            if r["dataset"] != "all":
                continue
            ci = r["ci95"]["1"]
            rows.append([r["predictor"], r["lookahead"], r["target"], r["tokens"], r["top1"],
                         f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f}%" if ci else None]
                        + [r["recall"].get(str(k)) for k in dk])
        out.append("<details><summary>Per target layer (all datasets; 95% CI of top-1 over samples)</summary>"
                   + table([txt("predictor"), cnt("lookahead"), txt("target"), cnt("tokens"), pct("top-1"),
                            txt("95% CI")] + [pct(f"recall@{k}") for k in dk], rows) + "</details>")
        c = st.get("cache")
        if c:
            out.append(f"<h3>Expert cache</h3><p>{c['mode']} replay of the test samples, {c['tokens']:,} tokens; "
                       f"expert {c['expert_bytes'] / 2**20:.1f} MiB, {c['bandwidth_gbs']} GB/s, {c['layer_ms']} ms "
                       f"per layer request; prefetch: {H.escape(str(c['prefetch_predictor']))} top-{c['prefetch_k']}"
                       f". All experts on the GPU: {c['all_on_gpu_ms_per_token']:.3f} ms/token; no cache: "
                       f"{c['no_cache_ms_per_token']:.3f} ms/token"
                       + (f"; replay truncated to the first {c['requests_per_layer']:,} requests per layer"
                          if c.get("truncated") else "") + ".</p>")
            out.append(table([cnt("experts/layer"), txt("policy"), txt("prefetch"), pct("hit rate"),
                              cnt("experts moved"), Col("experts moved / token", "float"), Col("GiB moved", "float"),
                              Col("ms/token", "float")],
                             [[r["cache_experts_per_layer"], r["policy"], "yes" if r["prefetch"] else "no",
                               r["hit_rate"], r["experts_transferred"],
                               r["experts_transferred"] / max(1, c["tokens"]), r["bytes_transferred"] / 2 ** 30,
                               r["ms_per_token"]] for r in c["runs"]]))
            out += [image(out_dir, f, embed) for f in mine if "_cache_" in f]
        if st.get("learned"):
            ln = st["learned"]
            out.append(f"<h3>Learned predictor</h3><p>{H.escape(ln['model'])}; features: {H.escape(ln['features'])}; "
                       f"trained in {ln.get('train_s', 0.0):.2f} s.</p>")
            out += [image(out_dir, f, embed) for f in mine if "_learned_loss" in f]
    return page("moetrace speculate", out)


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return o


def write_outputs(res: dict, out_dir: str, plots_on: bool = True, embed: bool = True) -> None:
    """speculation.json, speculation.md (charts linked) and speculation.html (self-contained)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "speculation.json"), "w") as f:
        json.dump(_jsonable(res), f, indent=1)
    md = render_markdown(res)
    files = make_plots(res, out_dir) if plots_on else []
    with open(os.path.join(out_dir, "speculation.md"), "w") as f:
        f.write(md + "\n" + "".join(f"\n![{x}]({x})\n" for x in files))
    with open(os.path.join(out_dir, "speculation.html"), "w") as f:
        f.write(render_html(res, files, out_dir, embed=embed))
