"""`moetrace fetch` against a local fake of the Hugging Face Hub (tests/python/fake_hub.py): only the files
collect reads are requested, the cache it fills serves `moetrace collect` offline, failures are reported
per item. Nothing here reaches the internet: HF_ENDPOINT points at 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from fake_hub import FakeHub

import huggingface_hub  # noqa: F401  (scripts/requirements.txt: fetch's one dependency)

sys.path.insert(0, os.path.join(REPO, "python"))
from moetrace import fetch as fetch_mod  # noqa: E402

MODEL_DIR = os.path.join(REPO, "tests", "data", "fixtures", "tiny-a", "model")
SPM = os.path.join(REPO, "assets", "demo", "spiece.model")
SST2 = os.path.join(REPO, "tests", "data", "parquet", "sst2", "validation-00000-of-00001.parquet")
CB = os.path.join(REPO, "tests", "data", "parquet", "super_glue-cb", "validation-00000-of-00001.parquet")
RTE = os.path.join(REPO, "tests", "data", "parquet", "super_glue-rte", "validation-00000-of-00001.parquet")
AG_NEWS = os.path.join(REPO, "assets", "demo", "data", "fancyzhx", "ag_news", "data", "test.csv")
MODEL = "test-org/tiny-a"
THREE = "glue/sst2,super_glue/cb,ag_news"

# Files that must never be requested: other frameworks' weights, other configs' and splits' data.
DECOYS = ("flax_model.msgpack", "pytorch_model.bin", "generation_config.json", "README.md", "super_glue.py",
          "sst2/train-00000-of-00001.parquet", "rte/validation-00000-of-00001.parquet",
          "cb/train/0000.parquet", "rte/validation/0000.parquet", "data/train.csv")


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def make_hub() -> FakeHub:
    hub = FakeHub()
    model = {f: read(os.path.join(MODEL_DIR, f)) for f in os.listdir(MODEL_DIR)}  # safetensors + pytorch copy
    model["flax_model.msgpack"] = b"flax decoy"
    model["spiece.model"] = read(SPM)
    model["README.md"] = b"# tiny-a\n"
    hub.add("model", MODEL, model)
    hub.add("dataset", "nyu-mll/glue", {"sst2/validation-00000-of-00001.parquet": read(SST2),
                                        "sst2/train-00000-of-00001.parquet": read(SST2),
                                        "rte/validation-00000-of-00001.parquet": read(RTE),
                                        "README.md": b"# glue\n"})
    # A loading-script repository: main holds the script only, the Parquet is on refs/convert/parquet.
    hub.add("dataset", "aps/super_glue", {"super_glue.py": b"import datasets\n", "README.md": b"# sg\n"})
    hub.add("dataset", "aps/super_glue", {"cb/validation/0000.parquet": read(CB), "cb/train/0000.parquet": read(CB),
                                          "rte/validation/0000.parquet": read(RTE)},
            revision="refs/convert/parquet")
    hub.add("dataset", "fancyzhx/ag_news", {"data/test.csv": read(AG_NEWS), "data/train.csv": read(AG_NEWS)})
    # Failures: a gated repo, and a script-only repo without a Parquet conversion (imdb is absent: 404).
    hub.add("dataset", "cardiffnlp/tweet_eval", {"emotion/validation.parquet": read(SST2)}, gated=True)
    hub.add("dataset", "FiscalNote/billsum", {"billsum.py": b"import datasets\n"})
    return hub


@pytest.fixture
def hub():
    with make_hub() as h:
        yield h


def env_for(hub, cache, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update({"HF_ENDPOINT": hub.endpoint if hub else "http://127.0.0.1:9", "HF_HUB_CACHE": str(cache),
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1", "NO_PROXY": "127.0.0.1",
                "no_proxy": "127.0.0.1"})
    env.update(extra)
    return env


def run(cmd, env, check_rc=None):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, f"{' '.join(map(str, cmd))} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def table(stdout: str) -> dict:
    """Summary rows: 'model X' / 'dataset Y' -> the status column's text."""
    rows = {}
    for line in stdout.splitlines():
        for kind in ("model ", "dataset "):
            if line.startswith(kind):
                name = line.split()[1]
                for status in ("already cached", "fetched", "failed"):
                    if f"  {status}" in line:
                        rows[f"{kind}{name}"] = line[line.index(f"  {status}") + 2:]
    return rows


def resolve_paths(hub, method="GET") -> list[str]:
    return [p for p in hub.paths_requested(method) if "/resolve/" in p]


def test_fetch_three_datasets_and_a_model_then_collect_offline(cli, hub, tmp_path):
    cache = tmp_path / "hub"
    proc = run([cli, "fetch", "--model", MODEL, "--datasets", THREE], env_for(hub, cache), check_rc=0)
    rows = table(proc.stdout)
    assert set(rows) == {f"model {MODEL}", "dataset glue/sst2", "dataset super_glue/cb", "dataset ag_news"}, proc.stdout
    assert all(v == "fetched" for v in rows.values()), proc.stdout
    assert "4 fetched, 0 already cached, 0 failed" in proc.stdout

    # Exactly the files collect reads were downloaded; no decoy was even asked about (HEAD or GET).
    got = sorted(p.split("/resolve/", 1)[1].split("/", 1)[1] for p in resolve_paths(hub))
    assert got == sorted(["config.json", "spiece.model", "model.safetensors", "sst2/validation-00000-of-00001.parquet",
                          "cb/validation/0000.parquet", "data/test.csv"])
    for path in hub.paths_requested():
        assert not path.endswith(DECOYS), path
    # The conversion was asked for (the fake Hub splits API paths before decoding, so only the encoded
    # refs%2Fconvert%2Fparquet reaches it), and the cache records it under refs/refs/.
    assert "/api/datasets/aps/super_glue/revision/refs/convert/parquet" in hub.paths_requested("GET")
    sg = cache / "datasets--aps--super_glue"
    assert (sg / "refs" / "refs" / "convert" / "parquet").is_file()
    assert not (sg / "refs" / "main").exists()

    # A script-only main snapshot cached beside the conversion (as `hf download aps/super_glue` leaves it)
    # must not hide it from collect.
    main_snap = sg / "snapshots" / ("1" * 40)
    main_snap.mkdir(parents=True)
    (main_snap / "super_glue.py").write_text("import datasets\n")
    (sg / "refs" / "main").write_text("1" * 40)

    out = tmp_path / "store"
    env = env_for(None, cache, HF_HUB_OFFLINE="1")
    run([cli, "collect", "--model", MODEL, "--datasets", THREE, "--traces", 60, "--threads", 2, "--no-progress",
         "-o", out], env, check_rc=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["id"] == MODEL
    assert set(manifest["dataset_distribution"]) == {"glue/sst2", "super_glue/cb", "ag_news"}
    assert all(f["path"].startswith(str(cache)) for f in manifest["model"]["files"]), manifest["model"]["files"]
    run([cli, "verify", out], env, check_rc=0)

    # Run again: everything is already cached and no file is transferred again.
    before = len(resolve_paths(hub))
    again = run([cli, "fetch", "--model", MODEL, "--datasets", THREE], env_for(hub, cache), check_rc=0)
    assert all(v == "already cached" for v in table(again.stdout).values()), again.stdout
    assert len(table(again.stdout)) == 4
    assert len(resolve_paths(hub)) == before

    # Offline (HF_HUB_OFFLINE=1, no Hub): what is cached is reported as such, the rest fails saying why.
    offline = env_for(None, cache, HF_HUB_OFFLINE="1")
    proc = run([cli, "fetch", "--model", MODEL, "--datasets", THREE], offline, check_rc=0)
    assert all(v == "already cached" for v in table(proc.stdout).values()) and len(table(proc.stdout)) == 4, proc.stdout
    proc = run([cli, "fetch", "--datasets", "glue/sst2,imdb"], offline, check_rc=1)
    rows = table(proc.stdout)
    assert rows["dataset glue/sst2"] == "already cached"
    assert rows["dataset imdb"].startswith("failed: HF_HUB_OFFLINE is set"), rows


def test_dry_run_lists_files_and_sizes_and_downloads_nothing(cli, hub, tmp_path):
    cache = tmp_path / "hub"
    proc = run([cli, "fetch", "--model", MODEL, "--datasets", "super_glue/cb", "--dry-run"], env_for(hub, cache),
               check_rc=0)
    out = proc.stdout
    size = os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors"))
    assert f"model {MODEL}: {MODEL} @ main" in out
    assert f"model.safetensors  {fetch_mod.human(size)}" in out
    assert "dataset super_glue/cb: aps/super_glue @ refs/convert/parquet" in out
    assert "cb/validation/0000.parquet" in out
    total = size + os.path.getsize(SPM) + os.path.getsize(os.path.join(MODEL_DIR, "config.json")) + os.path.getsize(CB)
    assert f"total to download: {fetch_mod.human(total)}" in out
    assert "pytorch_model.bin" not in out and "flax" not in out
    assert resolve_paths(hub, None) == []
    assert not cache.exists() or not list(cache.rglob("snapshots"))


def test_failures_are_reported_skipped_and_make_the_exit_code_non_zero(cli, hub, tmp_path):
    cache = tmp_path / "hub"
    proc = run([cli, "fetch", "--model", f"{MODEL}@no-such-branch", "--datasets",
                "imdb,glue/sst2,tweet_eval/emotion,billsum"], env_for(hub, cache))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = table(proc.stdout)
    assert rows[f"model {MODEL}"] == "failed: no revision no-such-branch", rows
    assert rows["dataset glue/sst2"] == "fetched"
    assert rows["dataset imdb"].startswith("failed: not found on the Hub"), rows
    assert rows["dataset tweet_eval/emotion"].startswith("failed: gated"), rows
    assert "no refs/convert/parquet" in rows["dataset billsum"], rows
    assert "1 fetched, 0 already cached, 4 failed" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert (cache / "datasets--nyu-mll--glue" / "refs" / "main").is_file()


def test_bad_usage_is_one_line(cli, tmp_path):
    env = env_for(None, tmp_path / "hub")
    proc = run([cli, "fetch"], env)
    assert proc.returncode == 2 and "nothing to fetch" in proc.stderr
    proc = run([cli, "fetch", "--datasets", "no_such_dataset"], env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no_such_dataset" in proc.stderr, proc.stderr


def test_fetch_needs_only_huggingface_hub(cli, tmp_path):
    """The bridge runs fetch without numpy or matplotlib, and says in one line when huggingface_hub is missing."""
    shadow = tmp_path / "shadow"
    for name in ("numpy", "matplotlib"):
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('no {name} here (test)')\n")
    env = env_for(None, tmp_path / "hub", PYTHONPATH=str(shadow))
    proc = run([cli, "fetch", "--help"], env, check_rc=0)
    assert "--dry-run" in proc.stdout
    (shadow / "huggingface_hub").mkdir()
    (shadow / "huggingface_hub" / "__init__.py").write_text("raise ImportError('no huggingface_hub here (test)')\n")
    proc = run([cli, "fetch", "--model", MODEL], env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fetch needs huggingface_hub" in lines[0] and "pip install huggingface_hub" in lines[0]


def test_collect_names_the_fetch_command(cli, tmp_path):
    env = env_for(None, tmp_path / "empty-cache", HF_HUB_OFFLINE="1")
    (tmp_path / "empty-cache").mkdir()
    proc = run([cli, "collect", "--model", "google/switch-base-8", "-o", tmp_path / "a", "--no-progress"], env)
    assert proc.returncode != 0
    assert "moetrace fetch --model google/switch-base-8" in proc.stderr
    assert "hf download google/switch-base-8" in proc.stderr and "huggingface-cli" not in proc.stderr
    proc = run([cli, "collect", "--model", MODEL_DIR, "--tokenizer", SPM, "--datasets", "imdb,squad", "--traces", 12,
                "-o", tmp_path / "b", "--no-progress"], env)
    assert "moetrace fetch --datasets imdb" in proc.stderr, proc.stderr


# The locator's rules exist twice: src/data/locate.cc (collect) and fetch.split_files (which files to
# download). Both must pick the same files from the same layout.
LAYOUTS = {
    "nyu-mll/glue": ["mnli/validation_matched-00000-of-00001.parquet", "mnli/validation_mismatched.parquet",
                     "cola/dev.tsv", "cola/train.tsv", "mrpc/validation.tsv", "mrpc/validation.tsv.gz",
                     "qqp/partial-validation/0000.parquet", "qqp/partial-validation/0001.parquet",
                     "qqp/train/0000.parquet", "sst2/README.md", "data/sst2/validation-00000.jsonl",
                     "data/validation.csv"],
    "aps/super_glue": ["cb/validation/0000.parquet", "cb/validation/more/0001.parquet", "cb/validation/x.py",
                       "boolq/val.jsonl", "boolq/valid.jsonl", "rte/train/0000.parquet", "copa/validation.zst"],
    "FiscalNote/billsum": ["default/test/0000.parquet", "data/test-00000-of-00001.parquet", "test.csv"],
    "stanfordnlp/imdb": ["data/test-00000-of-00002.parquet", "data/test-00001-of-00002.parquet",
                         "data/train-00000-of-00001.parquet", "plain_text/unsupervised/0000.parquet"],
    "fancyzhx/ag_news": ["test.csv", "data/train.csv", "testing.csv"],
    "allenai/winogrande": ["winogrande_xs/validation/0000.parquet"],
}
PARITY = "glue/mnli,glue/cola,glue/mrpc,glue/qqp,glue/sst2,glue/rte,super_glue/cb,super_glue/boolq,super_glue/rte," \
         "super_glue/copa,billsum,imdb,ag_news,winogrande"


def test_split_files_agrees_with_the_cpp_locator(cli, tmp_path):
    root = tmp_path / "root"
    for repo, files in LAYOUTS.items():
        for f in files:
            p = root / repo / f
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"")
    env = env_for(None, tmp_path / "no-cache")
    proc = run([cli, "datasets", "check", "--json", "--data-root", root, "--no-hf-cache", "--datasets", PARITY,
                "--check-rows", 0], env)
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == len(PARITY.split(",")), proc.stdout + proc.stderr
    checked = 0
    for r in reports:
        repo_dir = root / r["hub"]
        cpp = sorted(os.path.relpath(f["path"], repo_dir) for f in r.get("files", []))
        py = fetch_mod.split_files(LAYOUTS[r["hub"]], r["config"], r["split"])
        assert py == cpp, (r["dataset"], py, cpp)
        checked += bool(cpp)
    assert checked >= 10  # most cases find files: the comparison is not vacuous


def test_model_files_take_one_format():
    assert fetch_mod.model_files(["config.json", "spiece.model", "model.safetensors", "pytorch_model.bin",
                                  "flax_model.msgpack", "tf_model.h5"]) == \
        (["config.json", "spiece.model", "model.safetensors"], "")
    sharded = ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
               "pytorch_model-00002-of-00002.bin", "flax_model.msgpack", "sub/model.safetensors"]
    assert fetch_mod.model_files(sharded)[0] == ["config.json", "pytorch_model-00001-of-00002.bin",
                                                 "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"]
    assert fetch_mod.model_files(["config.json", "flax_model.msgpack"])[1].startswith("no checkpoint")
    assert fetch_mod.model_files(["model.safetensors"])[1] == "no config.json"


def test_model_files_take_the_language_models_tokenizer_files():
    """OLMoE/Qwen ship tokenizer.json, Mixtral tokenizer.model too; Mixtral's consolidated.*.pt (the original
    format) and generation_config.json are not read by collect and are not fetched."""
    mixtral = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json", "consolidated.00.pt", "consolidated.01.pt", "model.safetensors.index.json",
               "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "README.md"]
    assert fetch_mod.model_files(mixtral) == (
        ["config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"], "")


def test_fetch_a_language_model_takes_its_tokenizer_and_shards_only(cli, tmp_path):
    # Distinct contents: the cache stores one blob per content, so equal files would be downloaded once.
    files = {"config.json": json.dumps({"model_type": "mixtral"}).encode(), "tokenizer.model": b"sp model",
             "tokenizer.json": b'{"model": {}}', "tokenizer_config.json": b'{"add_bos_token": true}',
             "generation_config.json": b'{"decoy": 1}', "consolidated.00.pt": b"original-format decoy",
             "model.safetensors.index.json": b'{"weight_map": {}}',
             "model-00001-of-00002.safetensors": b"shard one", "model-00002-of-00002.safetensors": b"shard two"}
    with FakeHub() as hub:
        hub.add("model", "test-org/tiny-moe-lm", files)
        cache = tmp_path / "hub"
        proc = run([cli, "fetch", "--model", "test-org/tiny-moe-lm", "--datasets", ""], env_for(hub, cache))
        assert table(proc.stdout).get("model test-org/tiny-moe-lm") == "fetched", proc.stdout + proc.stderr
        got = sorted(p.split("/resolve/", 1)[1].split("/", 1)[1] for p in resolve_paths(hub))
        assert got == sorted(["config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                              "model.safetensors.index.json", "model-00001-of-00002.safetensors",
                              "model-00002-of-00002.safetensors"])
        snaps = list((cache / "models--test-org--tiny-moe-lm" / "snapshots").iterdir())
        assert len(snaps) == 1 and (snaps[0] / "model-00002-of-00002.safetensors").read_bytes() == b"shard two"
        assert not (snaps[0] / "consolidated.00.pt").exists()


def test_exact_names_are_escaped_for_allow_patterns(tmp_path, monkeypatch):
    """snapshot_download's allow_patterns are fnmatch patterns: `[1]` would match `1`, `*` anything."""
    hub = FakeHub()
    hub.add("dataset", "org/odd", {"data/test[1].csv": b"text\nkept\n", "data/test1.csv": b"text\ndecoy\n",
                                   "data/test*.csv": b"text\nstar\n", "data/test-x.csv": b"text\ndecoy\n"})
    with hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        import huggingface_hub
        planner = fetch_mod.Planner(huggingface_hub.HfApi(endpoint=hub.endpoint), str(tmp_path))
        item = fetch_mod.Item("dataset", "odd", "org/odd", "dataset")
        item.commit, listing = planner.listing("dataset", "org/odd", "main")
        item.files = {f: listing[f] for f in ("data/test[1].csv", "data/test*.csv")}
        fetch_mod.download(item, str(tmp_path))
        assert item.status == "fetched", item.reason
        got = sorted(p.rsplit("/", 2)[-2:][1] for p in resolve_paths(hub))
        assert got == ["test*.csv", "test[1].csv"], hub.paths_requested()


def test_local_files_in_the_selection_are_not_fetched(cli, tmp_path):
    """`--datasets core,my.jsonl` as collect takes it: the file is local, nothing is asked for it."""
    own = tmp_path / "my.jsonl"
    own.write_text('{"text": "hello"}\n')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([cli, "fetch", "--datasets", str(own)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "a local file or folder" in proc.stderr and "nothing to fetch" in proc.stderr
    proc = subprocess.run([cli, "fetch", "--datasets", f"glue/sst2,{own}", "--dry-run"], capture_output=True,
                          text=True, env=env)
    assert "dataset my (" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "glue/sst2" in proc.stdout + proc.stderr
