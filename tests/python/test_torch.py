"""moetrace.torch: TraceDataset and its padding collate (skipped where PyTorch is not installed)."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import PYTHON_DIR


def test_import_error_explains_how_to_install():
    code = ("import sys; sys.modules['torch'] = None\n"
            "try:\n    import moetrace.torch\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": PYTHON_DIR})
    assert "pip install torch" in out.stdout, out.stderr
    # The rest of the package does not need torch.
    code = "import sys; sys.modules['torch'] = None; import moetrace, moetrace.compat, moetrace.__main__"
    assert subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": PYTHON_DIR}).returncode == 0


def test_dataset_items_and_collate(store_factory):
    torch = pytest.importorskip("torch")
    from moetrace.torch import TraceDataset, collate
    path, truth = store_factory(hidden_dtype="BF16", dec_layers=(1,), synthetic_every=3)
    ds = TraceDataset(path, layers=["enc.3", "dec.1"], fields=["router_logits", "probs", "expert", "dropped", "hidden"])
    assert len(ds) == 7
    item = ds[2]
    assert item["sample_id"] == truth[2]["sample_id"]
    assert item["token_ids"].dtype == torch.int64
    assert torch.equal(item["enc.3.router_logits"], torch.from_numpy(truth[2]["layers"]["enc.3"]["router_logits"]))
    assert item["enc.3.expert"].dtype == torch.int64 and item["enc.3.dropped"].dtype == torch.bool
    batch = collate([ds[i] for i in range(4)])
    lens = [len(truth[i]["token_ids"]) for i in range(4)]
    s = max(lens)
    assert batch["token_ids"].shape == (4, s) and batch["enc.3.router_logits"].shape == (4, s, 8)
    assert batch["enc.3.hidden"].shape == (4, s, 16)
    assert batch["lengths"].tolist() == lens
    assert batch["attention_mask"].sum(1).tolist() == lens
    for b in range(4):
        assert (batch["enc.3.expert"][b, lens[b]:] == -100).all()  # labels pad with -100 (ignore_index)
        assert torch.equal(batch["enc.3.expert"][b, :lens[b]], torch.from_numpy(truth[b]["layers"]["enc.3"]["expert"].astype(np.int64)))
    g = [len(truth[i]["dec_input_ids"]) for i in range(4)]
    assert batch["dec.1.router_logits"].shape == (4, max(g), 8) and batch["dec_lengths"].tolist() == g
    assert batch["sample_id"] == [truth[i]["sample_id"] for i in range(4)]
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=ds.collate)
    assert sum(b["token_ids"].shape[0] for b in loader) == 7
    real = TraceDataset(path, real_only=True)
    assert len(real) == 5 and set(real[0]) >= {"enc.1.router_logits", "enc.5.expert"}
    with pytest.raises(KeyError):
        TraceDataset(path, fields=["nope"])
