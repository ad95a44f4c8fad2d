"""The command line of `moetrace analyze` (python -m moetrace analyze): options -> analyze_store ->
stats.json and report.html. The work is in moetrace.analysis; this module parses and reports errors."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..logopts import add_log_options, is_quiet


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moetrace analyze", description=(
        "Expert usage, load balance, router confidence, layer-to-layer and token structure, and dataset "
        "differences of a trace store. Writes DIR/stats.json (keys in docs/ANALYSIS.md) and DIR/report.html "
        "(self-contained: its charts are embedded; the chart files are written beside it too)."))
    ap.add_argument("store", help="trace store directory (or its manifest.json)")
    ap.add_argument("-o", "--output", default="analysis", help="output directory (default: ./analysis)")
    ap.add_argument("--seed", type=int, default=0, help="seed for picking the example samples")
    ap.add_argument("--examples", type=int, default=5, help="number of example expert paths")
    ap.add_argument("--no-token-stats", action="store_true", help="skip the token-id statistics (saves memory)")
    ap.add_argument("--no-plots", action="store_true", help="write stats.json only")
    ap.add_argument("--per-layer-charts", action="store_true",
                    help="also draw one expert-usage bar chart per layer (usage_<layer>.png)")
    ap.add_argument("--real-only", action="store_true", help="leave out synthetic samples (of a mixed store)")
    ap.add_argument("--format", choices=("png", "svg", "pdf"), default="png",
                    help="chart files: png (default), svg (embedded as vector), pdf (written beside PNGs the report "
                         "shows)")
    ap.add_argument("--dpi", type=int, default=100, help="PNG resolution (default 100; 300 for print)")
    ap.add_argument("--link-images", action="store_true",
                    help="link the chart files from report.html instead of embedding them")
    ap.add_argument("--jsd-scale", choices=("auto", "fixed"), default="auto",
                    help="dataset-JSD heatmap colour scale: auto (the data's range, default) or fixed 0..1 bits")
    ap.add_argument("--top-pairs", type=int, default=30,
                    help="dataset pairs listed in the report, most divergent first (default 30; all in stats.json)")
    ap.add_argument("--tokenizer", help="spiece.model for the examples' token text (default: the store's model's)")
    add_log_options(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet = is_quiet(args)
    from ..analysis import analyze_store
    from ..analysis_report import write_report
    from ..errors import StoreError
    from ..store import open_store
    if args.no_plots is False:
        try:
            from .. import plots
        except ModuleNotFoundError as e:
            print(f"moetrace: error: the report's charts need {e.name}, which is not installed: "
                  "pip install 'moetrace[analysis]' (or pass --no-plots for stats.json only)", file=sys.stderr)
            return 1
        plots.configure(dpi=args.dpi, fmt=args.format)
    try:
        store = open_store(args.store)
        progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        stats = analyze_store(store, seed=args.seed, examples=args.examples,
                              token_stats=not args.no_token_stats, progress=None if sys.stderr.isatty() else progress,
                              real_only=args.real_only, bar=not args.quiet, tokenizer=args.tokenizer)
    except (StoreError, KeyError) as e:
        print(f"moetrace: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    for notice in stats.get("notices", []):  # what this store cannot give, and why (one line each)
        print(f"analyze: notice: {notice}", file=sys.stderr)
    os.makedirs(args.output, exist_ok=True)
    if args.no_plots:
        with open(os.path.join(args.output, "stats.json"), "w") as f:
            json.dump(stats, f, indent=1)
    else:
        write_report(stats, args.output, args.per_layer_charts, embed=not args.link_images,
                     jsd_vmax=1.0 if args.jsd_scale == "fixed" else None, top_pairs=args.top_pairs)
    if not args.quiet:
        print(f"analyze: {stats['num_tokens']} tokens in {stats['elapsed_s']:.2f} s "
              f"({stats['tokens_per_s'] or 0:.0f} tokens/s); wrote {args.output}/stats.json"
              + ("" if args.no_plots else f" and {args.output}/report.html"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
