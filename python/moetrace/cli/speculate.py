"""The command line of `moetrace speculate` (python -m moetrace speculate): options -> Options ->
speculate_store -> speculation.json, .md, .html and charts. The work is in moetrace.speculate."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from ..cachesim import POLICIES
from ..evaluation import KS, Split
from ..logopts import add_log_options, is_quiet
from ..predictors import ALL_PREDICTORS

if TYPE_CHECKING:  # moetrace.speculate imports this module: its Options is imported where it is used
    from ..speculate import Options


def _csv(s: str) -> list[str]:
    return [x for x in s.replace(" ", ",").split(",") if x]


def parse_bytes(s: str) -> float:
    s = s.strip().upper()
    for suf, m in (("GIB", 2 ** 30), ("MIB", 2 ** 20), ("KIB", 2 ** 10), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3),
                   ("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10), ("B", 1)):
        if s.endswith(suf):
            return float(s[:-len(suf)]) * m
    return float(s)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moetrace speculate", description=(
        "Expert-prediction baselines trained on a train split and evaluated on held-out samples, and an "
        "expert cache simulator. Writes DIR/speculation.json (keys in docs/ANALYSIS.md), DIR/speculation.md "
        "and PNG plots."))
    ap.add_argument("store", help="trace store directory (or its manifest.json)")
    ap.add_argument("-o", "--output", default="speculation", help="output directory (default: ./speculation)")
    ap.add_argument("--predictors", default=",".join(ALL_PREDICTORS),
                    help=f"comma-separated subset of {','.join(ALL_PREDICTORS)} (default: all)")
    ap.add_argument("--lookaheads", default="1,2,3", help="transition lookaheads in MoE layers (default 1,2,3)")
    ap.add_argument("--histories", default="2,3", help="history lengths of the history predictor (default 2,3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample split (and the learned model)")
    ap.add_argument("--test-fraction", type=float, default=0.2, help="share of samples held out (default 0.2)")
    ap.add_argument("--test-datasets", default="", help="split by dataset: these datasets are the test set")
    ap.add_argument("--train-datasets", default="", help="with --test-datasets: train only on these (default: all others)")
    ap.add_argument("--cache-sizes", default="", help="cache sizes in experts per layer, e.g. 1,2,4 (default: E/8, E/4, E/2, 3E/4)")
    ap.add_argument("--cache-bytes", default="", help="cache budgets for all MoE layers together, e.g. 2GiB,4GiB")
    ap.add_argument("--policies", default=",".join(POLICIES), help="cache policies (default lru,lfu,belady)")
    ap.add_argument("--prefetch-predictor", default="transition",
                    help="predictor whose top-k is prefetched before each layer, as name or name@lookahead "
                         "(default transition, i.e. lookahead 1)")
    ap.add_argument("--prefetch-k", type=int, default=1, help="experts prefetched per token and layer (default 1)")
    ap.add_argument("--expert-dtype", choices=("f32", "bf16", "f16"), default="f32",
                    help="dtype of the offloaded expert weights (default f32, as the engine runs)")
    ap.add_argument("--bandwidth-gbs", type=float, default=24.0, help="host-to-device bandwidth, GB/s (default 24)")
    ap.add_argument("--layer-ms", type=float, default=0.2,
                    help="compute time of one MoE layer per request (decode token or prefill sequence), ms (default 0.2)")
    ap.add_argument("--encoder-replay", choices=("prefill", "token"), default="prefill",
                    help="encoder replay: per sequence (prefill, default) or one token at a time")
    ap.add_argument("--routers", help="router weights from `moetrace routers` (for pregate)")
    ap.add_argument("--model", help="model directory, to extract router weights (default: the store's model)")
    ap.add_argument("--learned-tokens", type=int, default=20000, help="train tokens sampled for the learned model")
    ap.add_argument("--learned-steps", type=int, default=300, help="Adam steps of the learned model")
    ap.add_argument("--max-replay", type=int, default=50000,
                    help="replay at most this many requests per layer (the first test samples; default 50000)")
    ap.add_argument("--no-cache", action="store_true", help="skip the cache simulation")
    ap.add_argument("--no-plots", action="store_true", help="no charts: speculation.json, .md and .html only")
    ap.add_argument("--k", default=",".join(str(k) for k in KS),
                    help="the k of recall@k, any comma-separated list, e.g. 1,3,5,10 (default 1,2,4,8,16; 1 is "
                         "always included)")
    ap.add_argument("--real-only", action="store_true", help="leave out synthetic samples (of a mixed store)")
    ap.add_argument("--format", choices=("png", "svg", "pdf"), default="png",
                    help="chart files: png (default), svg, pdf (beside PNGs the report shows)")
    ap.add_argument("--dpi", type=int, default=100, help="PNG resolution (default 100; 300 for print)")
    ap.add_argument("--link-images", action="store_true",
                    help="link the chart files from speculation.html instead of embedding them")
    add_log_options(ap)
    return ap


def options_from_args(args) -> Options:
    from ..speculate import Options
    preds = tuple(_csv(args.predictors))
    bad = [p for p in preds if p not in ALL_PREDICTORS]
    if bad:
        raise ValueError(f"unknown predictor(s) {', '.join(bad)}; choose from {', '.join(ALL_PREDICTORS)}")
    pols = tuple(_csv(args.policies))
    if any(p not in POLICIES for p in pols):
        raise ValueError(f"unknown policy in {args.policies!r}; choose from {', '.join(POLICIES)}")
    if not 0.0 < args.test_fraction < 1.0:
        raise ValueError("--test-fraction must be between 0 and 1")
    try:
        ks = tuple(int(x) for x in _csv(args.k))
    except ValueError:
        raise ValueError(f"--k {args.k!r}: expected a comma-separated list of integers, e.g. 1,3,5,10") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"--k {args.k!r}: expected integers of at least 1, e.g. 1,3,5,10")
    return Options(
        predictors=preds, lookaheads=tuple(int(x) for x in _csv(args.lookaheads)),
        histories=tuple(int(x) for x in _csv(args.histories)),
        split=Split(args.seed, args.test_fraction, tuple(_csv(args.test_datasets)), tuple(_csv(args.train_datasets))),
        cache_sizes=tuple(int(x) for x in _csv(args.cache_sizes)),
        cache_bytes=tuple(parse_bytes(x) for x in _csv(args.cache_bytes)), policies=pols,
        prefetch_predictor=args.prefetch_predictor, prefetch_k=args.prefetch_k,
        expert_dtype_bytes={"f32": 4, "bf16": 2, "f16": 2}[args.expert_dtype],
        bandwidth_gbs=args.bandwidth_gbs, layer_ms=args.layer_ms, routers=args.routers, model=args.model,
        learned_tokens=args.learned_tokens, learned_steps=args.learned_steps, encoder_replay=args.encoder_replay,
        simulate=not args.no_cache, max_replay=max(1, args.max_replay), ks=ks, real_only=args.real_only,
        bar=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.quiet = is_quiet(args)
    from ..errors import StoreError
    from ..speculate import speculate_store
    from ..speculate_report import write_outputs
    from ..store import open_store
    try:
        opt = options_from_args(args)
    except ValueError as e:
        ap.error(str(e))
    if not args.no_plots:
        try:
            from .. import plots
        except ModuleNotFoundError as e:
            print(f"moetrace: error: the charts need {e.name}, which is not installed: pip install "
                  "'moetrace[analysis]' (or pass --no-plots)", file=sys.stderr)
            return 1
    try:
        store = open_store(args.store)
        progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
        if not args.no_plots:
            plots.configure(dpi=args.dpi, fmt=args.format)
        res = speculate_store(store, opt, progress)
    except (StoreError, KeyError, ValueError) as e:
        print(f"moetrace: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    write_outputs(res, args.output, plots_on=not args.no_plots, embed=not args.link_images)
    if not args.quiet:
        print(f"speculate: done in {res['elapsed_s']:.2f} s; wrote {args.output}/speculation.json, "
              f"{args.output}/speculation.html and {args.output}/speculation.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
