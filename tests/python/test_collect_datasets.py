"""`moetrace collect`'s dataset selection, run as a user would: the default (every catalog dataset
present, else the bundled rows with a warning), `--split`, a user's own files, and the errors that
name the `moetrace fetch` command (issue 13 "Defaults", papercuts issue item 8)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO

import moetrace

MODEL = os.path.join(REPO, "tests", "data", "fixtures", "tiny-a", "model")
SPM = os.path.join(REPO, "assets", "demo", "spiece.model")
DEMO = os.path.join(REPO, "assets", "demo", "data")
DEMO_NAMES = {"wikitext", "glue/sst2", "glue/mrpc", "glue/qnli", "glue/rte", "glue/stsb", "super_glue/cb",
              "super_glue/rte", "ag_news", "tweet_eval/emotion"}


def collect(cli, tmp_path, out, *extra):
    """collect with an empty Hugging Face cache and HOME: only --data-root holds datasets."""
    cache = tmp_path / "hf_cache"
    cache.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HOME": str(tmp_path)}
    cmd = [cli, "collect", "--model", MODEL, "--tokenizer", SPM, "--threads", "2", "--no-progress",
           "-t", "40", "-o", str(out), *map(str, extra)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)


def settings(store):
    return json.load(open(os.path.join(store, "manifest.json")))["settings"]


def test_nothing_present_collects_the_bundled_rows_with_a_warning(cli, tmp_path):
    out = tmp_path / "store"
    proc = collect(cli, tmp_path, out)
    assert proc.returncode == 0, proc.stderr
    assert "`moetrace fetch --datasets maximum`" in proc.stderr
    assert "bundled real rows" in proc.stderr
    st = moetrace.open_store(str(out))
    assert len(st) == 20 and set(st.datasets) <= DEMO_NAMES
    assert settings(out)["datasets"] == "demo"
    assert settings(out)["split"] == "catalog"


def test_default_is_every_catalog_dataset_present(cli, tmp_path):
    root = tmp_path / "root"
    for repo in ("nyu-mll/glue/mrpc", "fancyzhx/ag_news"):
        shutil.copytree(os.path.join(DEMO, repo), root / repo)
    out = tmp_path / "store"
    proc = collect(cli, tmp_path, out, "--data-root", root)
    assert proc.returncode == 0, proc.stderr
    assert "fetch" not in proc.stderr
    st = moetrace.open_store(str(out))
    assert set(st.datasets) == {"glue/mrpc", "ag_news"}
    assert settings(out)["datasets"] == "glue/mrpc,ag_news"  # what reproduces the plan


def test_split_overrides_the_catalog_and_is_recorded(cli, tmp_path):
    root = tmp_path / "root"
    (root / "fancyzhx/ag_news/data").mkdir(parents=True)
    rows = "".join(f'3,"Train headline {i}","Train story number {i} about markets."\n' for i in range(30))
    (root / "fancyzhx/ag_news/data/train.csv").write_text(rows)
    out = tmp_path / "store"
    proc = collect(cli, tmp_path, out, "--data-root", root, "--datasets", "ag_news", "--split", "train")
    assert proc.returncode == 0, proc.stderr
    st = moetrace.open_store(str(out))
    assert all(s.startswith("ag_news/default/train/") for s in st.sample_ids)
    assert settings(out)["split"] == "train"
    bad = collect(cli, tmp_path, tmp_path / "bad", "--split", "dev")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].endswith("--split 'dev': expected train, validation, test or catalog")


def test_explicit_selection_that_finds_nothing_names_the_fetch_command(cli, tmp_path):
    proc = collect(cli, tmp_path, tmp_path / "store", "--datasets", "core")
    assert proc.returncode != 0
    assert "`moetrace fetch --datasets core`" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_own_files_mix_with_catalog_names(cli, tmp_path):
    mine = tmp_path / "my notes.jsonl"
    mine.write_text("".join(json.dumps({"body": f"My own note number {i}, traced."}) + "\n" for i in range(12)))
    out = tmp_path / "store"
    proc = collect(cli, tmp_path, out, "--data-root", DEMO, "--datasets", f"glue/mrpc,{mine}:body")
    assert proc.returncode == 0, proc.stderr
    st = moetrace.open_store(str(out))
    assert set(st.datasets) == {"glue/mrpc", "my_notes"}
    own = [s for s in st.sample_ids if s.startswith("my_notes/")]
    assert own and all(s.split("/")[:3] == ["my_notes", "default", "file"] and s.split("/")[3].isdigit()
                       for s in own)
    assert settings(out)["datasets"] == f"glue/mrpc,{mine}:body"
