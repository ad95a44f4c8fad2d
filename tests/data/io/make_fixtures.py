"""Makes the small checkpoint fixtures of tests/io (see SOURCE.txt). Needs torch; the tests do not.

    python tests/data/io/make_fixtures.py [out_dir]   (default: this script's folder)

Two kinds of files:
- torch.save output as it is (mixed.pt, proto4.pt), with expected.safetensors holding the dense
  values torch itself reads back, so the C++ reader can be compared byte for byte;
- hand-built archives (crafted_*.pt) in the torch.save layout, written by the small zip writer below,
  for what torch.save never writes: ZIP64 fields on a small file, compressed storages, a missing
  storage entry, a tensor reaching past its storage, globals outside the allowed list.
"""

import collections
import io
import json
import os
import pickle
import struct
import sys
import zlib

import torch

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))
os.makedirs(OUT, exist_ok=True)


def path(name):
    return os.path.join(OUT, name)


# ---------------------------------------------------------------------------------------------
# torch.save output
torch.manual_seed(0)
base = torch.randn(6, 5)
shared = torch.randn(7, 4)
mixed = collections.OrderedDict()
mixed["f32"] = base
mixed["f16"] = torch.randn(3, 4).half()
mixed["bf16"] = torch.randn(2, 3, 4).bfloat16()
mixed["f64"] = torch.randn(5).double()
mixed["i64"] = torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4)
mixed["i32"] = torch.arange(10, dtype=torch.int32)
mixed["i16"] = torch.arange(-4, 4, dtype=torch.int16)
mixed["i8"] = torch.arange(-6, 6, dtype=torch.int8)
mixed["u8"] = torch.arange(0, 250, 25, dtype=torch.uint8)
mixed["bool"] = torch.tensor([True, False, True])
mixed["transposed"] = base.t()  # strides (1, 5): copied by the reader
mixed["row_slice"] = base[2:4]  # storage offset 10, dense
mixed["col_slice"] = base[:, 1:3]  # offset 1, strides (5, 1): strided
mixed["every_other"] = base[::2, ::2]  # strides (10, 2)
mixed["expanded"] = torch.randn(1, 3).expand(4, 3)  # stride 0
mixed["scalar"] = torch.tensor(2.5)
mixed["empty"] = torch.zeros(0, 3)
mixed["tied_a"] = shared  # three names, one storage (like shared.weight / lm_head.weight)
mixed["tied_b"] = shared
mixed["tied_view"] = shared[1:]
mixed["param"] = torch.nn.Parameter(torch.randn(2, 2), requires_grad=False)
torch.save(mixed, path("mixed.pt"))

small = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
torch.save(small, path("proto4.pt"), pickle_protocol=4)  # FRAME, MEMOIZE, SHORT_BINUNICODE, ...
torch.save({"model": small, "step": 7, "name": "x"}, path("nested.pt"))


def write_safetensors(file, tensors):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].clone().contiguous()  # a fresh storage holding exactly the dense values
        raw = bytes(t.untyped_storage().tolist())
        dt = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}[t.dtype]
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * ((8 - (8 + len(text)) % 8) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


# What torch reads back, densified: the reference for mixed.pt, proto4.pt and nested.pt.
back = torch.load(path("mixed.pt"), weights_only=True)
# torch's own weights_only unpickler does not read FRAME; the file is ours, so load it fully.
back.update({"proto4." + k: v for k, v in torch.load(path("proto4.pt"), weights_only=False).items()})
write_safetensors(path("expected.safetensors"), {k: v.detach() for k, v in back.items()})


# ---------------------------------------------------------------------------------------------
# A zip writer in the torch.save layout, with the knobs torch.save does not have.
def write_zip(file, entries, zip64=False, deflate=(), misalign=False):
    """entries: list of (name, bytes). zip64: write every size and offset as 0xFFFFFFFF plus a ZIP64
    extra field (what a > 4 GiB checkpoint looks like). deflate: names to store compressed.
    misalign: start every entry's data at 2 mod 64 instead of 0 mod 64."""
    out = io.BytesIO()
    central = []
    for name, data in entries:
        method, payload = (8, zlib.compress(data)[2:-4]) if name in deflate else (0, data)
        crc = zlib.crc32(data)
        offset = out.tell()
        n = name.encode()
        local_extra = struct.pack("<HHQQ", 1, 16, len(data), len(payload)) if zip64 else b""
        size32 = 0xFFFFFFFF if zip64 else len(data)
        csize32 = 0xFFFFFFFF if zip64 else len(payload)
        # Pad the local extra field so that the data starts 64-aligned, as torch does.
        head = 30 + len(n) + len(local_extra)
        pad = (-(offset + head + 4) + (2 if misalign else 0)) % 64
        local_extra += struct.pack("<HH", 0x4246, pad) + b"Z" * pad
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if zip64 else 20, 0, method, 0, 0x21, crc,
                              csize32, size32, len(n), len(local_extra)))
        out.write(n + local_extra + payload)
        central.append((n, method, crc, len(data), len(payload), offset))
    cd_start = out.tell()
    for n, method, crc, size, csize, offset in central:
        if zip64:
            extra = struct.pack("<HHQQQ", 1, 24, size, csize, offset)
            size, csize, offset = 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF
        else:
            extra = b""
        out.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45 if zip64 else 20, 0, method, 0,
                              0x21, crc, csize, size, len(n), len(extra), 0, 0, 0, 0, offset))
        out.write(n + extra)
    cd_size = out.tell() - cd_start
    count = len(central)
    if zip64:
        end64 = out.tell()
        out.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_size, cd_start))
        out.write(struct.pack("<IIQI", 0x07064B50, 0, end64, 1))
        out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
    else:
        out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, cd_size, cd_start, 0))
    with open(file, "wb") as f:
        f.write(out.getvalue())


class FakeStorage:
    def __init__(self, storage_type, key, numel):
        self.pid = ("storage", storage_type, key, "cpu", numel)


class FakeTensor:
    """Pickles exactly as torch does: _rebuild_tensor_v2(storage, offset, size, stride, False, {})."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, FakeStorage) else None


def crafted(file, state, storages, prefix="archive", skip=(), extra_pickle=None, **zip_args):
    """storages: {key: bytes}. extra_pickle replaces data.pkl with raw bytes."""
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(state)
    pkl = extra_pickle if extra_pickle is not None else buf.getvalue()
    entries = [(f"{prefix}/data.pkl", pkl), (f"{prefix}/byteorder", b"little")]
    entries += [(f"{prefix}/data/{k}", v) for k, v in storages.items() if k not in skip]
    entries += [(f"{prefix}/version", b"3\n")]
    write_zip(path(file), entries, **zip_args)


floats = struct.pack("<12f", *[float(i) for i in range(12)])
st = FakeStorage(torch.FloatStorage, "0", 12)
good = {"w": FakeTensor(st, 0, (3, 4), (4, 1)), "w_t": FakeTensor(st, 0, (4, 3), (1, 4))}
crafted("crafted_zip64.pt", good, {"0": floats}, zip64=True)
crafted("crafted_unaligned.pt", good, {"0": floats}, misalign=True)
crafted("crafted_compressed.pt", good, {"0": floats}, deflate=("archive/data/0",))
crafted("crafted_missing_storage.pt", good, {"0": floats}, skip=("0",))
crafted("crafted_extent.pt", {"w": FakeTensor(st, 4, (3, 4), (4, 1))}, {"0": floats})
crafted("crafted_short_storage.pt", good, {"0": floats[:40]})

# Globals outside the allowed list, written by hand (pickle would write posix.system for os.system).
os_system = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
eval_pkl = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."
crafted("crafted_os_system.pt", {}, {}, extra_pickle=os_system)
crafted("crafted_eval.pt", {}, {}, extra_pickle=eval_pkl)
with open(path("os_system.pkl"), "wb") as f:
    f.write(os_system)
print("wrote fixtures to", OUT)
