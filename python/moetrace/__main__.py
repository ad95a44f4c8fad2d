"""python -m moetrace SUBCOMMAND ...

  summary STORE                  what `moetrace inspect` reports, recomputed from the shards in Python
  export-pickle STORE OUT.pkl    the seed system's pickle (+ OUT.json metadata)
  export-parquet STORE OUT/      Parquet shards (one row per sample) + a Hugging Face dataset card
  analyze ..., speculate ...     dispatched to moetrace.analysis / moetrace.speculate when present
  fetch ...                      moetrace.fetch: download a model and datasets into the Hugging Face cache
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import numpy as np

from . import keys
from .errors import StoreError
from .store import TraceStore, open_store

# Subcommands implemented in their own modules: each exposes main(argv) -> int.
PLUGIN_COMMANDS = {"analyze": "moetrace.analysis", "speculate": "moetrace.speculate", "fetch": "moetrace.fetch"}


def compute_summary(store: TraceStore) -> dict:
    """Counts recomputed from the shards (streaming, one shard at a time)."""
    e = store.num_experts
    layers = {name: {"expert_counts": np.zeros(e, np.int64), "dropped": 0, "tokens": 0} for name in store.layers}
    datasets: dict[str, int] = {}
    samples = real = tokens = dec_tokens = nbytes = 0
    for shard in store.iter_shards():
        nbytes += os.path.getsize(shard.path)
        if shard.num_samples == 0:
            continue
        samples += shard.num_samples
        real += int(np.count_nonzero(shard.tensor("sample_kind") == 0))
        tokens += shard.num_tokens
        if shard.dec_sample_offsets is not None:
            dec_tokens += int(shard.dec_sample_offsets[-1])
        for d in shard.metadata["datasets"]:
            datasets[d] = datasets.get(d, 0) + 1
        for name, acc in layers.items():
            if not shard.has(keys.layer_tensor(name, keys.EXPERT)):
                continue
            expert = np.asarray(shard.tensor(keys.layer_tensor(name, keys.EXPERT)))
            acc["expert_counts"] += np.bincount(expert.ravel(), minlength=e)[:e]  # each of the k choices
            k_dropped = keys.layer_tensor(name, keys.DROPPED)
            if shard.has(k_dropped):
                acc["dropped"] += int(np.count_nonzero(shard.tensor(k_dropped)))
            acc["tokens"] += int(expert.shape[0])
    n_enc = len(store.encoder_layers)
    enc_names = keys.layers(store.encoder_stack, store.encoder_layers)
    dist = sum((layers[name]["expert_counts"] for name in enc_names), np.zeros(e, np.int64))
    used = int(np.count_nonzero(dist))
    return {
        "num_samples": samples, "real_samples": real, "synthetic_samples": samples - real,
        "num_tokens": tokens, "num_decoder_tokens": dec_tokens, "bytes": nbytes,
        "total_traces": samples * n_enc,
        "expert_distribution": {str(k): int(c) for k, c in enumerate(dist)},
        "experts_used": used,
        "diversity_percentage": 100.0 * used / e if e else 0.0,
        "dataset_distribution": {d: c * n_enc for d, c in sorted(datasets.items())},
        "per_layer": {name: {"expert_counts": [int(c) for c in acc["expert_counts"]], "dropped": acc["dropped"],
                             "tokens": acc["tokens"],
                             "drop_rate": acc["dropped"] / acc["tokens"] if acc["tokens"] else 0.0}
                      for name, acc in layers.items()},
    }


def check_against_manifest(store: TraceStore, s: dict) -> list[str]:
    """Differences between recomputed counts and the manifest's (empty when the store is consistent)."""
    m = store.manifest
    problems = []
    for key in ("num_samples", "num_tokens", "num_decoder_tokens", "total_traces", "expert_distribution",
                "experts_used", "dataset_distribution"):
        if key in m and m[key] != s[key]:
            problems.append(f"{key}: manifest {m[key]!r}, shards {s[key]!r}")
    for name, want in (m.get("per_layer") or {}).items():
        got = s["per_layer"].get(name)
        if got is None:
            problems.append(f"per_layer.{name}: in the manifest but not a layer of the store")
            continue
        for key in ("expert_counts", "dropped", "tokens"):
            if key in want and want[key] != got[key]:
                problems.append(f"per_layer.{name}.{key}: manifest {want[key]!r}, shards {got[key]!r}")
    return problems


def _stored_dtypes(store: TraceStore) -> tuple[str, str]:
    """(logits dtype, hidden dtype or 'none') as the shard headers declare them."""
    settings = store.manifest.get("settings") or {}
    logits = store.manifest.get("logits_dtype", settings.get("logits_dtype", "?"))
    hidden = store.manifest.get("hidden_dtype", settings.get("hidden_dtype", "none"))
    if store.logits_topk:
        logits = f"top-{store.logits_topk} (F16 values, I32 ids, F32 log-sum-exp)"
    for shard in store.shards:
        if shard.num_samples and store.layers:
            first = store.layers[0]
            if not store.logits_topk:
                logits = shard.info(keys.layer_tensor(first, keys.ROUTER_LOGITS))[0]
            k_hidden = keys.layer_tensor(first, keys.HIDDEN)
            hidden = shard.info(k_hidden)[0] if shard.has(k_hidden) else "none"
            break
    return logits, hidden


def _print_fidelity(f, encoder_layers, p, stack: str = keys.ENCODER) -> None:
    """The manifest's `collect --audit` object as `moetrace inspect` prints it (verify.cc, print_fidelity)."""
    if not isinstance(f, dict):
        p("fidelity        not audited (`collect --audit FRACTION` re-runs samples at fp32)")
        return
    if f.get("status") != "measured":
        p(f"fidelity        {f.get('precision')}: audit skipped ({f.get('reason')})")
        return
    t = f["total"]
    p(f"fidelity        {f['precision']} vs an {f['reference']} re-run of {f['samples']} samples ({t['tokens']} "
      f"tokens, --audit {f['fraction']:g}): top-1 agreement {100.0 * t['top1_agreement']:.3f}%, max |logit error| "
      f"{t['max_logit_error']:.4f}")
    p(f"  {'layer':<14}{'tokens':>12}{'top-1 agree':>12}{'max |logit err|':>18}")
    for block in encoder_layers:
        name = keys.layer(stack, block)
        c = f["per_layer"].get(name, {})
        p(f"  {name:<14}{c.get('tokens', 0):>12}{100.0 * c.get('top1_agreement', 0):>11.3f}%"
          f"{c.get('max_logit_error', 0):>18.4f}")


def print_summary(store: TraceStore, s: dict, problems: list[str], out=None) -> None:
    """The layout of `moetrace inspect` (src/trace/verify.cc, print_store_summary), with the counts
    recomputed from the shards; then the sample kinds and the manifest check."""
    out = out or sys.stdout
    m = store.manifest
    p = lambda line: print(line, file=out)  # noqa: E731
    text = lambda key: m[key] if isinstance(m.get(key), str) else "?"  # noqa: E731
    number = lambda key: m[key] if isinstance(m.get(key), (int, float)) and not isinstance(m[key], bool) else 0  # noqa: E731
    layers = lambda v: json.dumps(v, separators=(",", ":")) if v else "none"  # noqa: E731
    model = m.get("model") if isinstance(m.get("model"), dict) else {}
    e = store.num_experts
    per_shard = m.get("samples_per_shard") or max((sh.num_samples for sh in store.shards), default=0)
    p(f"trace store     {store.path}")
    p("status          " + ("complete" if m.get("complete") is True else
                            "INCOMPLETE (interrupted or running; `moetrace collect --resume` continues it)"))
    p(f"format          {m.get('format')} v{m.get('format_version')}, written by moetrace {text('moetrace_version')}")
    p(f"routing         {store.family}, top-{store.top_k}, {'with' if store.has_dropped else 'no'} expert capacity")
    p(f"model           {model.get('id') if isinstance(model.get('id'), str) else '?'}")
    p(f"samples         {s['num_samples']} ({s['total_traces']} traces)")
    p(f"tokens          {s['num_tokens']} encoder" + (f", {s['num_decoder_tokens']} decoder" if store.decoder_layers else ""))
    p(f"shards          {len(store.shards)} ({s['bytes']} bytes, {per_shard} samples per shard)")
    p(f"MoE layers      encoder {layers(store.encoder_layers)}, decoder {layers(store.decoder_layers)}")
    p(f"experts         {e}, d_model {store.d_model}")
    logits, hidden = _stored_dtypes(store)
    p(f"stored          logits {logits}, hidden {hidden}")
    p(f"device          {text('device')}")
    p(f"collection      {number('collection_time'):.1f} s, {number('throughput_tokens_per_s'):.1f} tokens/s")
    if s["dataset_distribution"]:
        p("datasets (traces)")
        for name, count in s["dataset_distribution"].items():
            p(f"  {name:<32} {count}")
    choices = "top-1" if store.top_k == 1 else f"each of the top-{store.top_k}"
    over = "encoder" if store.family == "switch" else "prompt's"
    p(f"experts used    {s['experts_used']} of {e} ({s['diversity_percentage']:.1f}%), {choices} over the {over} MoE layers")
    counts = [(int(c), k) for k, c in enumerate(s["expert_distribution"].values())]
    total = sum(c for c, _ in counts)
    everything = e <= 16
    if not everything:
        counts.sort(key=lambda ce: -ce[0])  # stable: ties keep expert order
        p("  (10 most chosen)")
    for c, k in counts if everything else counts[:10]:
        p(f"  expert {k:>4}  {c:>12}  {100.0 * c / total if total else 0.0:>5.1f}%")
    if not everything:
        p(f"  least chosen: expert {counts[-1][1]} ({counts[-1][0]})")
    if s["per_layer"]:
        p(f"per layer       {'tokens':>12}{'dropped':>12}{'drop rate':>11}")
        for name, acc in s["per_layer"].items():
            p(f"  {name:<14}{acc['tokens']:>12}{acc['dropped']:>12}{100.0 * acc['drop_rate']:>10.2f}%")
    _print_fidelity(m.get("fidelity"), store.encoder_layers, p, store.encoder_stack)
    p(f"sample kinds    {s['real_samples']} real, {s['synthetic_samples']} synthetic")
    if problems:
        p("manifest check  MISMATCH")
        for line in problems:
            p(f"  {line}")
    else:
        p("manifest check  ok (counts recomputed from the shards equal the manifest's)")


def cmd_summary(args) -> int:
    store = open_store(args.store, verify=args.verify)
    s = compute_summary(store)
    problems = check_against_manifest(store, s)
    if args.json:
        json.dump({**s, "manifest_mismatches": problems}, sys.stdout, indent=2)
        print()
    else:
        print_summary(store, s, problems)
    return 1 if problems else 0


def cmd_export_pickle(args) -> int:
    from .compat import export_pickle
    layers = None
    if args.layers:
        layers = [x for part in args.layers for x in part.split(",") if x]
    meta = export_pickle(args.store, args.out, layers=layers, limit=args.limit, fmt=args.format,
                         real_only=args.real_only)
    print(f"wrote {meta['exported_traces']} records ({args.format}) to {args.out} and its metadata beside it",
          file=sys.stderr)
    return 0


def cmd_export_parquet(args) -> int:
    from .export import export_parquet
    layers = [x for part in args.layers for x in part.split(",") if x] if args.layers else None
    info = export_parquet(args.store, args.out, layers=layers, logits=args.logits, real_only=args.real_only,
                          progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {info['rows']} samples in {len(info['files'])} Parquet files to {args.out}/data and a "
              f"dataset card to {args.out}/README.md", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m moetrace", description="Read moetrace trace stores in Python.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("summary", help="counts of a store, recomputed from its shards and checked against the manifest")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--verify", action="store_true", help="also check every shard's SHA-256")
    p.set_defaults(func=cmd_summary)
    p = sub.add_parser("export-pickle", help="write the seed system's pickle of routing records (+ OUT.json)")
    p.add_argument("store")
    p.add_argument("out", help="OUT.pkl; the metadata goes to OUT.json")
    p.add_argument("--layers", nargs="+", help="encoder MoE layers to export: block indices or enc.{i} (default all)")
    p.add_argument("--limit", type=int, help="export at most N samples")
    p.add_argument("--format", choices=("dict", "dataclass"), default="dict",
                   help="dict: plain dicts (default); dataclass: moetrace.compat.GatingDataPoint instances "
                        "(loading them needs moetrace importable)")
    p.add_argument("--real-only", action="store_true", help="skip synthetic samples")
    p.set_defaults(func=cmd_export_pickle)
    p = sub.add_parser("export-parquet", help="write Parquet shards (one row per sample) and a Hugging Face "
                                              "dataset card; schema in docs/TRACE_FORMAT.md")
    p.add_argument("store")
    p.add_argument("out", help="output directory: OUT/data/train-*.parquet and OUT/README.md")
    p.add_argument("--layers", nargs="+", help="MoE layers to export: enc.{i}/dec.{i} or encoder block indices "
                                               "(default all)")
    p.add_argument("--logits", action="store_true", help="also export router logits (4*E bytes per token and layer)")
    p.add_argument("--real-only", action="store_true", help="skip synthetic samples")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary line")
    p.set_defaults(func=cmd_export_parquet)
    for name in PLUGIN_COMMANDS:
        sub.add_parser(name, help=f"see python -m moetrace {name} --help", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `python -m moetrace summary STORE | head`: the reader left; stop quietly, as cat does.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a pipe writer that was cut off


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PLUGIN_COMMANDS:
        try:
            module = importlib.import_module(PLUGIN_COMMANDS[argv[0]])
        except ModuleNotFoundError as e:
            if e.name != PLUGIN_COMMANDS[argv[0]]:
                raise
            print(f"moetrace: error: the {argv[0]} subcommand is not available in this version "
                  f"({PLUGIN_COMMANDS[argv[0]]} is missing)", file=sys.stderr)
            return 2
        return int(module.main(argv[1:]) or 0)
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "func", None):
        ap.print_help()
        return 2
    try:
        return args.func(args)
    except StoreError as e:
        print(f"moetrace: error: {e}", file=sys.stderr)
        return 1
    except KeyError as e:  # an unknown layer, sample or tensor name
        print(f"moetrace: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
