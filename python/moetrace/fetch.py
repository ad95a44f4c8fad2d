"""`moetrace fetch`: download into the Hugging Face hub cache exactly the files `moetrace collect` reads.

    moetrace fetch --model google/switch-base-128 --datasets maximum

The cache is huggingface_hub's (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), which
collect searches offline. huggingface_hub does the transfers (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE,
proxies, resumption, its progress bars); this module decides which files:

- a model: config.json, its tokenizer files (TOKENIZER_FILES: T5's spiece.model; the MoE language
  models' tokenizer.json / tokenizer.model with tokenizer_config.json and special_tokens_map.json) and
  the weights in one format: safetensors (single or sharded + index) when
  the revision has them, else pytorch_model*.bin (+ index); never other frameworks' copies (flax, tf,
  Mixtral's original consolidated.*.pt).
- a catalog dataset: the files collect's locator (src/data/locate.cc, split_files) reads for the
  entry's config and split, picked from the revision's file listing; when the main branch (or
  --revision) has none, the Hub's Parquet conversion at refs/convert/parquet
  (<config>/<split>/NNNN.parquet, <config>/partial-<split>/..., `default` for an unnamed config).

The selection (core | maximum | groups | names, --catalog FILE) is resolved by the moetrace executable
(`moetrace datasets list --json`), so it is exactly collect's. Needs only huggingface_hub: run as a
script by the CLI bridge (tools/cli/python_bridge.cc), it imports nothing else of the package.
docs/FETCH.md documents the options and the output.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

try:
    from .logopts import add_log_options, is_quiet
except ImportError:  # run as a file by the executable's bridge, without the package (and numpy)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from logopts import add_log_options, is_quiet  # type: ignore[no-redef]

CONVERTED = "refs/convert/parquet"

# ------------------------------------------------------------------------------------------------
# Which files: the locator's rules over a repo's file listing
# ------------------------------------------------------------------------------------------------

# src/data/records.cc format_from_name: the extensions collect reads (after .gz/.zst/.zstd).
_DATA_EXTS = {".parquet", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".txt", ".text", ".tokens", ".raw"}


def is_data_file(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    stem, ext = os.path.splitext(name)
    if ext in (".gz", ".zst", ".zstd"):
        ext = os.path.splitext(stem)[1]
    return ext.lower() in _DATA_EXTS


def split_aliases(split: str) -> list[str]:
    out = [split]
    if split == "validation":
        out += ["valid", "val", "dev"]
    elif split == "validation_matched":
        out.append("dev_matched")
    elif split == "validation_mismatched":
        out.append("dev_mismatched")
    return out


def split_files(paths, config: str, split: str) -> list[str]:
    """The files of `split` that collect would read from a repo holding `paths` (repo-relative, '/'):
    src/data/locate.cc split_files() applied to a listing instead of a folder. Sorted."""
    files = [p for p in paths if is_data_file(p)]
    dirs = [config, f"data/{config}"] if config else ["default"]
    dirs += ["data", ""]
    for d in dirs:
        prefix = d + "/" if d else ""
        for alias in split_aliases(split):
            found = [p for p in files if p.startswith(f"{prefix}{alias}/")]
            if not found:
                found = [p for p in files if p.startswith(f"{prefix}partial-{alias}/")]
            for p in files:
                rest = p[len(prefix):]
                if not p.startswith(prefix) or "/" in rest:
                    continue
                stem = rest.split(".", 1)[0]
                if stem == alias or stem.startswith(alias + "-"):
                    found.append(p)
            if found:
                return sorted(found)
    return []


# The tokenizer files collect may read (src/text's tokenizer factory): whichever the repo has.
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")
# The files a tokenizer is made from; a model without any is fetched with a note.
_TOKENIZER_MODELS = ("spiece.model", "tokenizer.json", "tokenizer.model")

_SAFETENSORS = re.compile(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?")
_PYTORCH = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin(\.index\.json)?")


def model_files(paths) -> tuple[list[str], str]:
    """(files to download, problem) for a model repo holding `paths`: config.json, the tokenizer files
    present (TOKENIZER_FILES), and the weights of one format (what src/io/checkpoint.cc open_checkpoint
    reads)."""
    top = {p for p in paths if "/" not in p}
    if "config.json" not in top:
        return [], "no config.json"
    for pattern, anchors in ((_SAFETENSORS, ("model.safetensors", "model.safetensors.index.json")),
                             (_PYTORCH, ("pytorch_model.bin", "pytorch_model.bin.index.json"))):
        if any(a in top for a in anchors):
            weights = sorted(p for p in top if pattern.fullmatch(p))
            break
    else:
        return [], ("no checkpoint (expected model.safetensors[.index.json] or "
                    "pytorch_model.bin[.index.json])")
    extra = [f for f in TOKENIZER_FILES if f in top]
    return ["config.json"] + extra + weights, ""


# ------------------------------------------------------------------------------------------------
# The plan: one item per model or dataset
# ------------------------------------------------------------------------------------------------


@dataclass
class Item:
    kind: str            # "model" | "dataset"
    name: str            # the model id or the catalog name
    repo: str
    repo_type: str       # "model" | "dataset"
    revision: str = "main"
    commit: str = ""     # the revision's commit hash
    files: dict = field(default_factory=dict)  # repo path -> size in bytes (None when unknown)
    status: str = ""     # "fetched" | "already cached" | "failed" | "would fetch"
    reason: str = ""
    note: str = ""

    @property
    def size(self) -> int:
        return sum(s or 0 for s in self.files.values())


class FetchError(Exception):
    """A problem with the command as given (bad selection, no moetrace executable): exit 2."""


def _hub():
    """huggingface_hub, with the submodules used here loaded (its top level is lazy)."""
    import huggingface_hub
    import huggingface_hub.constants  # noqa: F401
    import huggingface_hub.utils  # noqa: F401
    return huggingface_hub


def hub_error(e: Exception, repo: str, revision: str) -> str:
    """One line for why a repo or revision could not be listed or downloaded."""
    errors = _hub().utils
    if isinstance(e, errors.GatedRepoError):
        return f"gated on the Hub: accept the conditions on {repo}'s page, then set HF_TOKEN"
    if isinstance(e, errors.RepositoryNotFoundError):
        return "not found on the Hub (404; a private repo needs HF_TOKEN)"
    if isinstance(e, errors.RevisionNotFoundError):
        return f"no revision {revision}"
    if isinstance(e, getattr(errors, "DisabledRepoError", ())):
        return "disabled on the Hub"
    if isinstance(e, errors.OfflineModeIsEnabled) or "offline" in type(e).__name__.lower():
        return "HF_HUB_OFFLINE is set: the Hub cannot be asked what to download"
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


class Planner:
    def __init__(self, api, cache_dir: str):
        self.api = api
        self.cache_dir = cache_dir
        self._listings: dict = {}  # (repo_type, repo, revision) -> (commit, {path: size}) or Exception

    def listing(self, repo_type: str, repo: str, revision: str):
        key = (repo_type, repo, revision)
        if key not in self._listings:
            try:
                info = self.api.repo_info(repo, repo_type=repo_type, revision=revision, files_metadata=True)
                files = {s.rfilename: s.size for s in (info.siblings or [])}
                self._listings[key] = (info.sha, files)
            except Exception as e:  # noqa: BLE001 - reported per item
                # Offline (HF_HUB_OFFLINE): what an earlier fetch cached of this revision, if anything.
                offline = isinstance(e, _hub().utils.OfflineModeIsEnabled)
                self._listings[key] = (offline and self.cached_listing(repo_type, repo, revision)) or e
        result = self._listings[key]
        if isinstance(result, Exception):
            raise result
        return result

    def cached_listing(self, repo_type: str, repo: str, revision: str):
        """(commit, {path: size}) of the cached snapshot that refs/<revision> names, or None."""
        folder = os.path.join(self.cache_dir, f"{repo_type}s--" + repo.replace("/", "--"))
        commit = revision
        if not re.fullmatch(r"[0-9a-f]{40}", revision):
            try:
                with open(os.path.join(folder, "refs", revision)) as f:
                    commit = f.read().strip()
            except OSError:
                return None
        snap = os.path.join(folder, "snapshots", commit)
        if not commit or "/" in commit or commit in (".", "..") or not os.path.isdir(snap):
            return None
        files = {}
        for dirpath, _, names in os.walk(snap):
            for n in names:
                full = os.path.join(dirpath, n)
                if os.path.isfile(full):
                    files[os.path.relpath(full, snap).replace(os.sep, "/")] = os.path.getsize(full)
        return commit, files

    def model(self, repo: str, revision: str) -> Item:
        item = Item("model", repo, repo, "model", revision)
        try:
            item.commit, listing = self.listing("model", repo, revision)
        except Exception as e:  # noqa: BLE001
            return self._failed(item, hub_error(e, repo, revision))
        files, problem = model_files(listing)
        if problem:
            return self._failed(item, f"{problem} at {revision}")
        if not any(f in files for f in _TOKENIZER_MODELS):
            item.note = "no tokenizer (spiece.model, tokenizer.json or tokenizer.model): collect needs --tokenizer"
        item.files = {f: listing[f] for f in files}
        return item

    def dataset(self, spec: dict, revision: str) -> Item:
        name, repo, config, split = spec["name"], spec["hub"], spec.get("config") or "", spec["split"]
        item = Item("dataset", name, repo, "dataset", revision)
        where = f"config {config or '(unnamed)'} split {split}"
        main_error, files = None, []
        try:
            item.commit, listing = self.listing("dataset", repo, revision)
            files = split_files(listing, config, split)
        except Exception as e:  # noqa: BLE001
            main_error = e
            errors = _hub().utils
            if not isinstance(e, errors.OfflineModeIsEnabled):  # offline: the conversion may be cached
                return self._failed(item, hub_error(e, repo, revision))
        if not files:
            try:
                commit, converted = self.listing("dataset", repo, CONVERTED)
            except Exception as e:  # noqa: BLE001
                errors = _hub().utils
                if main_error is not None:
                    return self._failed(item, hub_error(main_error, repo, revision))
                if isinstance(e, errors.RevisionNotFoundError):
                    return self._failed(item, f"no data files for {where} at {revision}, and no {CONVERTED}")
                return self._failed(item, f"no data files for {where} at {revision}; {CONVERTED}: "
                                          f"{hub_error(e, repo, CONVERTED)}")
            files = split_files(converted, config, split)
            if not files:
                if main_error is not None:
                    return self._failed(item, hub_error(main_error, repo, revision))
                return self._failed(item, f"no data files for {where} at {revision} or {CONVERTED}")
            item.revision, item.commit, listing = CONVERTED, commit, converted
        item.files = {f: listing[f] for f in files}
        return item

    def snapshot_dir(self, item: Item) -> str:
        folder = f"{item.repo_type}s--" + item.repo.replace("/", "--")
        return os.path.join(self.cache_dir, folder, "snapshots", item.commit)

    def cached_files(self, item: Item) -> set:
        snap = self.snapshot_dir(item)
        return {f for f in item.files if os.path.isfile(os.path.join(snap, f))}

    def is_cached(self, item: Item) -> bool:
        return bool(item.files) and len(self.cached_files(item)) == len(item.files)

    @staticmethod
    def _failed(item: Item, reason: str) -> Item:
        item.status, item.reason = "failed", reason
        return item


def download(item: Item, cache_dir: str) -> None:
    """Downloads item.files at item.revision with huggingface_hub (which records the revision under
    refs/ and the files under snapshots/<commit>/); sets status and reason."""
    hub = _hub()
    # snapshot_download matches allow_patterns with fnmatch on the full path: escape exact names.
    patterns = [glob.escape(f) for f in item.files]
    try:
        # HF_ENDPOINT read now, not when huggingface_hub was first imported (a long-lived process or
        # a notebook may set it later).
        folder = hub.snapshot_download(item.repo, repo_type=item.repo_type, revision=item.revision,
                                       allow_patterns=patterns, cache_dir=cache_dir,
                                       endpoint=os.environ.get("HF_ENDPOINT") or None)
    except Exception as e:  # noqa: BLE001 - reported per item
        item.status, item.reason = "failed", hub_error(e, item.repo, item.revision)
        return
    missing = [f for f in item.files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        item.status = "failed"
        item.reason = f"{len(missing)} file(s) not downloaded, e.g. {missing[0]} (the revision moved? run again)"
    else:
        item.status = "fetched"


# ------------------------------------------------------------------------------------------------
# The catalog selection, through the moetrace executable
# ------------------------------------------------------------------------------------------------


def moetrace_exe() -> str:
    """$MOETRACE_EXE (set by the CLI bridge), else moetrace on PATH, else the source tree's build."""
    exe = os.environ.get("MOETRACE_EXE") or shutil.which("moetrace")
    if exe:
        return exe
    here = os.path.dirname(os.path.abspath(__file__))
    built = os.path.join(here, "..", "..", "build", "tools", "cli", "moetrace")
    if os.access(built, os.X_OK):
        return os.path.normpath(built)
    raise FetchError("--datasets needs the moetrace executable to read the catalog: run `moetrace fetch`, "
                     "or set MOETRACE_EXE")


def select_datasets(selection: str, catalog: str | None) -> list[dict]:
    """The catalog entries `selection` names, as `moetrace datasets list --json` prints them."""
    cmd = [moetrace_exe(), "datasets", "list", "--json", "--datasets", selection]
    if catalog:
        cmd += ["--catalog", catalog]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise FetchError(f"cannot run {cmd[0]} ({e.strerror})") from e
    if proc.returncode != 0:
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        msg = lines[-1] if lines else f"`{' '.join(cmd)}` exited with {proc.returncode}"
        raise FetchError(msg[len("moetrace: error: "):] if msg.startswith("moetrace: error: ") else msg)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def files_text(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def print_plan(items: list[Item], planner: Planner, out) -> None:
    total = 0
    for it in items:
        if it.status == "failed":
            print(f"{it.kind} {it.name} ({it.repo} @ {it.revision}): cannot fetch: {it.reason}", file=out)
            continue
        cached = planner.cached_files(it)
        print(f"{it.kind} {it.name}: {it.repo} @ {it.revision} ({it.commit[:12]}), {files_text(len(it.files))}, "
              f"{human(it.size)}{', already cached' if len(cached) == len(it.files) else ''}", file=out)
        for f, size in sorted(it.files.items()):
            print(f"  {f}  {human(size) if size is not None else '? B'}{'  (cached)' if f in cached else ''}",
                  file=out)
            if f not in cached:
                total += size or 0
        if it.note:
            print(f"  note: {it.note}", file=out)
    print(f"total to download: {human(total)} (dry run: nothing downloaded)", file=out)


def print_summary(items: list[Item], out) -> None:
    rows = [(f"{it.kind} {it.name}", f"{it.repo} @ {it.revision}",
             str(len(it.files)) if it.files else "-", human(it.size) if it.files else "-",
             it.status + (f": {it.reason}" if it.reason else "") + (f" ({it.note})" if it.note else ""))
            for it in items]
    head = ("item", "repo @ revision", "files", "size", "status")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    print("", file=out)
    for r in [head] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4], file=out)
    counts = {s: sum(1 for it in items if it.status == s) for s in ("fetched", "already cached", "failed")}
    print(f"{counts['fetched']} fetched, {counts['already cached']} already cached, {counts['failed']} failed; "
          f"cache {planner_cache_dir()}", file=out)


def planner_cache_dir() -> str:
    return _hub().constants.HF_HUB_CACHE


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="moetrace fetch",
        description="Download into the Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else "
                    "~/.cache/huggingface/hub) exactly the files `moetrace collect` reads: a model's "
                    "config.json, spiece.model and weights in one format; each selected catalog dataset's "
                    "config/split files (refs/convert/parquet's Parquet when the main branch has none). "
                    "See docs/FETCH.md.")
    ap.add_argument("--model", "-m", action="append", default=[], metavar="ID",
                    help="a Hub model id (repeatable), e.g. google/switch-base-128; ID@REV for one revision")
    ap.add_argument("--datasets", metavar="SELECTION",
                    help="catalog datasets, as collect's --datasets: core | maximum (the whole catalog) | "
                         "a group | names, comma-separated")
    ap.add_argument("--catalog", metavar="FILE", help="a dataset spec file added to the built-in catalog "
                                                      "(as collect's --catalog)")
    ap.add_argument("--split", default="catalog", metavar="SPLIT",
                    help="fetch this split of every selected dataset instead of the catalog's "
                         "(catalog: each entry's own; default)")
    ap.add_argument("--revision", default="main", metavar="REV",
                    help="branch, tag or commit of the model(s) and datasets (default main); datasets "
                         f"without data files there come from {CONVERTED}")
    add_log_options(ap)
    ap.add_argument("--dry-run", action="store_true",
                    help="print repo, revision, files and sizes that would be downloaded; download nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet = is_quiet(args)
    if quiet:  # huggingface_hub's bars, and its own warnings only
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if not args.model and not args.datasets:
        print("moetrace fetch: error: nothing to fetch: give --model ID and/or --datasets SELECTION",
              file=sys.stderr)
        return 2
    try:
        hub = _hub()
    except ImportError as e:
        print(f"moetrace fetch: error: needs huggingface_hub in {sys.executable} ({e}); "
              "pip install huggingface_hub", file=sys.stderr)
        return 1
    try:
        specs = select_datasets(args.datasets, args.catalog) if args.datasets else []
    except FetchError as e:
        print(f"moetrace fetch: error: {e}", file=sys.stderr)
        return 2
    # A user's own file or folder in the selection (`--datasets core,my.jsonl`) is already local.
    for spec in [s for s in specs if s.get("path")]:
        if not quiet:
            print(f"moetrace fetch: dataset {spec['name']}: a local file or folder ({spec['path']}), "
                  "nothing to fetch", file=sys.stderr)
    specs = [s for s in specs if not s.get("path")]
    if not args.model and not specs:
        return 0
    if args.split != "catalog":
        specs = [{**s, "split": args.split} for s in specs]

    cache_dir = hub.constants.HF_HUB_CACHE
    planner = Planner(hub.HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None), cache_dir)
    # ID@REV as collect's --model takes it; else --revision.
    items = [planner.model(*(m.split("@", 1) if "@" in m else (m, args.revision))) for m in args.model]
    items += [planner.dataset(s, args.revision) for s in specs]

    if args.dry_run:
        print_plan(items, planner, sys.stdout)
        return 1 if any(it.status == "failed" for it in items) else 0

    for it in items:
        if it.status == "failed":
            print(f"moetrace fetch: {it.kind} {it.name}: {it.reason}; skipped", file=sys.stderr)
            continue
        if planner.is_cached(it):
            it.status = "already cached"
            continue
        if not quiet:
            print(f"moetrace fetch: {it.kind} {it.name}: {it.repo} @ {it.revision}, {files_text(len(it.files))}, "
                  f"{human(it.size)}", file=sys.stderr, flush=True)
        download(it, cache_dir)
        if it.status == "failed":
            print(f"moetrace fetch: {it.kind} {it.name}: {it.reason}", file=sys.stderr)
    print_summary(items, sys.stdout)
    return 1 if any(it.status == "failed" for it in items) else 0


if __name__ == "__main__":
    sys.exit(main())
