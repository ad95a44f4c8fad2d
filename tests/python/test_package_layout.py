"""The Python package's layout (issue #17): one module per concern, every name importable from where
it was before the split, whatever module is imported first; each module's third-party imports declared
in python/pyproject.toml; observation keys built with moetrace.keys, never by hand."""

import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import PYTHON_DIR, REPO

PKG = os.path.join(PYTHON_DIR, "moetrace")

# The public names of moetrace.analysis and moetrace.speculate before the split (v0.1.0).
OLD_ANALYSIS = ["ANALYSIS_VERSION", "CHUNK_ROWS", "GATE_BINS", "LayerAcc", "MARGIN_BINS", "NOISE_DRAWS",
                "SparseCounts", "StackAnalysis", "TOPK", "TRANSITION_MIN_ROW", "TokenCounts", "analyze_store",
                "build_parser", "entropy_bits", "gini", "grouped_hist", "hist_summary", "joint_stats", "jsd_bits",
                "jsd_noise_floor", "logit_features", "main", "make_plots", "order_for_heatmap", "pick_examples",
                "render_html", "rows_f32", "table_topk_accuracy", "token_expert_stats", "transition_probs",
                "usage_stats", "write_report"]
OLD_SPECULATE = ["ALL_PREDICTORS", "CHUNK_ROWS", "Chunk", "CountTable", "DENSE_LIMIT", "Frequency", "History", "KS",
                 "Learned", "Options", "POLICIES", "Predictor", "Pregate", "RecallCell", "SPECULATION_VERSION",
                 "SparseCounts", "Split", "StackSpec", "Temporal", "TimeModel", "TokenId", "Transition", "Z95",
                 "backoff", "build_parser", "build_predictors", "expert_bytes", "extract_routers", "hash_unit",
                 "load_routers", "main", "make_plots", "model_dir_of", "next_uses", "options_from_args",
                 "parse_bytes", "render_html", "render_markdown", "rows_f32", "run_stack", "simulate_cache",
                 "simulate_stack", "speculate_store", "stack_chunks", "stack_has_hidden", "summarize",
                 "topk_experts", "true_ranks", "write_outputs"]

# Modules that must work with numpy alone (`pip install moetrace`): the reader, the statistics, the
# predictors, the simulator and the runs behind `analyze --no-plots` / `speculate --no-plots`.
NUMPY_ONLY = ["store", "keys", "stats", "accumulate", "analysis", "evaluation", "predictors", "cachesim",
              "speculate", "compat", "safetensors_io", "text", "progress", "cli/analyze", "cli/speculate",
              "__main__"]
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"sklearn": "scikit-learn", "huggingface_hub": "huggingface_hub", "yaml": "pyyaml"}


def test_old_names_are_still_importable():
    from moetrace import analysis, speculate
    assert [n for n in OLD_ANALYSIS if not hasattr(analysis, n)] == []
    assert [n for n in OLD_SPECULATE if not hasattr(speculate, n)] == []
    assert set(analysis.__all__) >= set(OLD_ANALYSIS) and set(speculate.__all__) >= set(OLD_SPECULATE)


@pytest.mark.parametrize("first", ["moetrace.cli.speculate", "moetrace.cli.analyze", "moetrace.predictors",
                                   "moetrace.speculate_report", "moetrace.analysis_report", "moetrace.evaluation",
                                   "moetrace.accumulate", "moetrace.stats", "moetrace.speculate",
                                   "moetrace.analysis"])
def test_any_module_can_be_imported_first(first):
    code = (f"import {first}\n"
            "import moetrace.analysis as a, moetrace.speculate as s, moetrace.cli.analyze as ca, "
            "moetrace.cli.speculate as cs\n"
            "assert a.main is ca.main and s.main is cs.main\n"
            "import argparse; assert isinstance(s.build_parser(), argparse.ArgumentParser)\n"
            "assert isinstance(a.build_parser(), argparse.ArgumentParser)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=PYTHON_DIR))
    assert r.returncode == 0, r.stderr


def _modules():
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                yield os.path.relpath(path, PKG)[:-3].replace(os.sep, "/"), path


def _third_party_imports(path: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(open(path).read())
    nodes = tree.body if top_level_only else ast.walk(tree)
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    local = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py")}  # fetch.py also runs as a script
    return {m for m in out if m not in sys.stdlib_module_names and m not in ("moetrace", "__future__")
            and m not in local}


def _declared() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(PYTHON_DIR, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in reqs}


def test_every_third_party_import_is_declared():
    declared = _declared()
    missing = {}
    for name, path in _modules():
        for m in _third_party_imports(path, top_level_only=False):
            if DISTRIBUTIONS.get(m, m).lower() not in declared:
                missing.setdefault(m, []).append(name)
    assert missing == {}, f"imported but in no dependency list of python/pyproject.toml: {missing}"


def test_core_modules_need_numpy_only_at_import():
    found = {n: _third_party_imports(p, top_level_only=True) for n, p in _modules() if n in NUMPY_ONLY}
    assert set(found) == set(NUMPY_ONLY)
    assert {n: m for n, m in found.items() if m - {"numpy"}} == {}


def test_ci_requirements_cover_the_analysis_extra():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(PYTHON_DIR, "pyproject.toml"), "rb") as f:
        analysis = tomllib.load(f)["project"]["optional-dependencies"]["analysis"]
    with open(os.path.join(REPO, "scripts", "requirements.txt")) as f:
        ci = {re.split(r"[<>=\[ ;]", line.strip(), maxsplit=1)[0].lower() for line in f if line.strip()
              and not line.startswith("#")}
    names = {re.split(r"[<>=\[ ;]", r, maxsplit=1)[0].lower() for r in analysis}
    assert names <= ci, f"scripts/requirements.txt lacks {sorted(names - ci)}"


HAND_BUILT_KEY = re.compile(r"""f["'](?:enc|dec)\.\{|["'](?:enc|dec)\.["']\s*\+|"""
                            r"""f["']\{\w+\}\.(?:input|hidden|router_logits|expert|dropped|gate)["']""")


def test_no_observation_key_is_built_by_hand():
    """'enc.3', 'enc.3.expert': moetrace.keys.layer / layers / tensor / layer_tensor build them."""
    sites = []
    for name, path in _modules():
        if name == "keys":
            continue
        for i, line in enumerate(open(path), 1):
            if HAND_BUILT_KEY.search(line) and not line.lstrip().startswith("#"):
                sites.append(f"{name}.py:{i}: {line.strip()}")
    assert sites == []


def test_the_pattern_catches_what_it_should():
    for bad in ('f"enc.{i}"', "f'dec.{b}'", '"enc." + str(i)', 'f"{name}.expert"', 'f"{n}.router_logits"'):
        assert HAND_BUILT_KEY.search(bad), bad
    for ok in ('"dec.input_ids"', 'keys.layer_tensor(n, keys.EXPERT)', 'f"{name}: not found"'):
        assert not HAND_BUILT_KEY.search(ok), ok


@pytest.mark.parametrize("module", ["moetrace.analysis", "moetrace.speculate", "moetrace.cli.analyze",
                                    "moetrace.cli.speculate"])
def test_modules_still_run_as_scripts(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=PYTHON_DIR))
    assert r.returncode == 0 and r.stdout.startswith("usage: moetrace "), r.stderr
