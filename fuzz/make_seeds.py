"""Seeds for every fuzz target, from the files in tests/data (and a generated trace store).

Usage: python fuzz/make_seeds.py OUT_DIR   ->  OUT_DIR/<target>/<seed files>
Files above MAX_BYTES are left out: libFuzzer mutates small inputs faster.
"""

import os
import shutil
import struct
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
MAX_BYTES = 256 * 1024


def files(*suffixes, under=DATA):
    for dirpath, _, names in os.walk(under):
        for n in sorted(names):
            p = os.path.join(dirpath, n)
            if n.endswith(suffixes) and os.path.getsize(p) <= MAX_BYTES:
                yield p


def copy(target, paths, out, prefix=b""):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    for k, p in enumerate(paths):
        with open(p, "rb") as f:
            data = f.read()
        with open(os.path.join(d, f"{k:04d}_{os.path.basename(p)}"), "wb") as f:
            f.write(prefix + data)


def trace_store_seeds(out):
    sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
    from conftest import make_store  # the numpy test writer of format-v1 stores
    d = os.path.join(out, "trace_store")
    os.makedirs(d, exist_ok=True)
    variants = [dict(), dict(dec_layers=(1,), logits_dtype="F16", hidden_dtype="BF16"),
                dict(logits_dtype="BF16", hidden_dtype="F32", synthetic_every=2)]
    for k, kw in enumerate(variants):
        with tempfile.TemporaryDirectory() as tmp:
            make_store(tmp, num_samples=3, shard_size=3, **kw)
            manifest = open(os.path.join(tmp, "manifest.json"), "rb").read()
            shard = open(os.path.join(tmp, "shard-00000.safetensors"), "rb").read()
        with open(os.path.join(d, f"store{k}"), "wb") as f:
            f.write(struct.pack("<I", len(manifest)) + manifest + shard)


def main():
    out = sys.argv[1]
    shutil.rmtree(out, ignore_errors=True)
    checkpoints = list(files(".pt", ".bin"))
    copy("parquet", files(".parquet"), out)
    copy("text", files(".txt", ".txt.gz"), out, prefix=b"\x00")
    copy("text", files(".txt"), os.path.join(out, "paragraphs"), prefix=b"\x01")
    copy("zip", checkpoints, out)
    copy("torch_checkpoint", checkpoints, out)
    copy("safetensors_file", files(".safetensors"), out)
    copy("config", files("config.json"), out, prefix=b"\x00")
    copy("config", files("model.safetensors.index.json"), os.path.join(out, "st_index"), prefix=b"\x01")
    copy("config", files("pytorch_model.bin.index.json"), os.path.join(out, "pt_index"), prefix=b"\x02")
    copy("catalog", files("datasets.json", under=os.path.join(ROOT, "assets", "catalog")), out)
    trace_store_seeds(out)
    # Folders made above for a second prefix join their target's seeds.
    for extra, target in (("paragraphs", "text"), ("st_index", "config"), ("pt_index", "config")):
        src = os.path.join(out, extra, target)
        if os.path.isdir(src):
            for n in os.listdir(src):
                shutil.move(os.path.join(src, n), os.path.join(out, target, extra + "_" + n))
        shutil.rmtree(os.path.join(out, extra), ignore_errors=True)


if __name__ == "__main__":
    main()
