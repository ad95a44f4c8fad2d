"""The numpy-only example in docs/TRACE_FORMAT.md must read a store without the package."""

import io
import os
import re
import contextlib

import numpy as np

from conftest import REPO, make_store

DOC = os.path.join(REPO, "docs", "TRACE_FORMAT.md")


def _example_code() -> str:
    text = open(DOC).read()
    section = text.split("## Reading a store with numpy alone", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_doc_example_is_short_and_numpy_only():
    code = _example_code()
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 12, "the example is meant to stay about ten lines"
    imports = {m for line in lines for m in re.findall(r"^\s*(?:import|from)\s+([\w., ]+)", line)}
    assert "moetrace" not in " ".join(imports)


def test_doc_example_runs(tmp_path, monkeypatch):
    truth = make_store(str(tmp_path / "STORE"), logits_dtype="BF16", hidden_dtype="BF16")
    monkeypatch.chdir(tmp_path)
    namespace, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_example_code(), DOC, "exec"), namespace)
    want = truth[0]["layers"]["enc.1"]["expert"]
    assert out.getvalue().strip() == str(want)
    # The helper it defines reads every tensor; BF16 widens as the doc says.
    meta, t = namespace["read_shard"]("STORE/shard-00001.safetensors")
    assert meta["first_sample"] == "3"
    raw = t["enc.3.router_logits"]
    wide = (raw.astype(np.uint32) << 16).view(np.float32)
    s0 = int(t["sample_offsets"][1])
    assert np.array_equal(wide[:s0], truth[3]["layers"]["enc.3"]["router_logits"])
