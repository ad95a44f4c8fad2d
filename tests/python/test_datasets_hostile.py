"""Tiny hostile dataset files must not exhaust memory (hardening issue, items 5 and 6): each is made
here, then read by the C++ CLI under `prlimit --as` and a time limit, its peak RSS checked. Before
the fixes both took gigabytes (the Parquet one per batch of rows, the paragraph one in newlines)."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_bounded

def limited(cli, *args, timeout=180):
    """The CLI at warn level, one thread, under conftest.run_bounded's time and memory bounds."""
    return run_bounded(cli, "--log-level", "warn", *args, timeout=timeout,
                       env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})


def spec_file(tmp_path, **extra):
    """A catalog spec with the one dataset "bomb", read from DATA_ROOT/bomb/validation.*."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"datasets": [{"name": "bomb", "hub": "bomb", "split": "validation",
                                              "category": "test", "template": "{text}", **extra}]}))
    return spec


@pytest.mark.parametrize("store_schema", [True, False])
@pytest.mark.parametrize("value_bytes", [4_000_000, (4 << 20) + 1])
def test_parquet_dictionary_bomb_is_read_in_bounded_memory(cli, tmp_path, store_schema, value_bytes):
    """2M rows sharing one 4 MB dictionary string (5 KB on disk), then one ordinary row. A value over
    the 4 MiB record limit is skipped per row without being copied; one within it would be copied
    2M times (8 TB): the file is refused as a decompression bomb once its values pass 1000 times
    its size. Either way in bounded memory and time, with one line of explanation."""
    idx = np.zeros(2_000_000, np.int32)
    idx[-1] = 1
    col = pa.DictionaryArray.from_arrays(pa.array(idx), pa.array(["a" * value_bytes, "an ordinary row"]))
    path = tmp_path / "root" / "bomb" / "validation.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"text": col}), path, compression="zstd",
                   dictionary_pagesize_limit=64 << 20, store_schema=store_schema)
    assert path.stat().st_size < 64 << 10
    proc = limited(cli, "datasets", "plan", "--no-hf-cache", "--catalog", str(spec_file(tmp_path)),
                   "--datasets", "bomb", "--data-root", str(tmp_path / "root"))
    if value_bytes > 4 << 20:
        assert proc.returncode == 0, proc.stderr
        rows = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [r["text"] for r in rows] == ["an ordinary row"]
        assert rows[0]["sample_id"] == "bomb/default/validation/1999999"
        assert "too large" in proc.stderr
    else:
        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("moetrace: error: ") and str(path) in last, last
        assert "refused as a decompression bomb" in last, last


def test_text_paragraph_bomb_is_read_in_bounded_memory(cli, tmp_path):
    # One paragraph of 1.2G one-byte lines (2.4 GB of text, 2.4 MB gzipped) between two small ones.
    root = tmp_path / "root"
    (root / "bomb").mkdir(parents=True)
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    with open(root / "bomb" / "validation.txt.gz", "wb") as f:
        f.write(z.compress(b"first paragraph\n\n"))
        chunk = b"a\n" * (1 << 24)
        for _ in range(1_200_000_000 // (1 << 24)):
            f.write(z.compress(chunk))
        f.write(z.compress(b"\nlast paragraph\n"))
        f.write(z.flush())
    proc = limited(cli, "datasets", "plan", "--no-hf-cache", "--catalog",
                   str(spec_file(tmp_path, text_mode="paragraphs")), "--datasets", "bomb",
                   "--data-root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(line)["text"] for line in proc.stdout.splitlines()) == [
        "first paragraph", "last paragraph"]
    assert "row 1 skipped: too large" in proc.stderr
