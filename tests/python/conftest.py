"""Fixtures for the Python reader's tests: a numpy-only writer of format v1/v2 trace stores (test-only;
the real writer is the C++ `moetrace collect`), and paths to the repository and the C++ CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PYTHON_DIR = os.path.join(REPO, "python")
if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)  # the package without `pip install ./python`

ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32",
             np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "BF16"}


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    """Plain safetensors writer; uint16 arrays are written as BF16 (the only uint16 in trace shards)."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": ST_DTYPES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for b in blobs:
            f.write(b)


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def topk_rows(logits: np.ndarray, k: int) -> np.ndarray:
    """[n, k] the k largest per row, descending, ties to the lowest index (moetrace's rule)."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :k].astype(np.int32)


def make_store(path, num_samples=7, shard_size=3, enc_layers=(1, 3, 5), dec_layers=(), num_experts=8,
               d_model=16, logits_dtype="F32", hidden_dtype=None, synthetic_every=0, seed=0,
               datasets=("glue/mrpc", "sst2"), capacity=4, format_version=None, empty_last_shard=False,
               family="switch", top_k=1, logits_topk=0, dropped=None):
    """Writes a store of random routing and returns the truth: a list of per-sample dicts holding the
    float32 values the store should read back as. Switch defaults give a format-v1 store; `family`
    (lm./gen. layers for the language models), `top_k` (expert/gate [S, k]), `dropped` (default: Switch
    has capacity, the others not) and `logits_topk` (--logits topk:K) a v2 one, as the C++ writer does.
    The truth keeps the full router_logits also for a topk:K store (to check the probabilities)."""
    rng = np.random.default_rng(seed)
    has_dropped = family == "switch" if dropped is None else dropped
    v2 = family != "switch" or top_k != 1 or not has_dropped or logits_topk > 0
    if format_version is None:
        format_version = 2 if v2 else 1
    if logits_topk:
        logits_dtype = "F16"  # the top-K values' dtype
    stack1, stack2 = ("enc", "dec") if family == "switch" else ("lm", "gen")
    os.makedirs(path, exist_ok=True)
    truth = []
    for i in range(num_samples):
        s = int(rng.integers(1, 12))
        ds = datasets[i % len(datasets)]
        tok = rng.integers(2, 32000, size=s).astype(np.int32)
        tok[-1] = 1
        synthetic = bool(synthetic_every) and i % synthetic_every == synthetic_every - 1
        sample = {"sample_id": f"{ds}/default/validation/{i}", "dataset": ds, "row": i, "synthetic": synthetic,
                  "token_ids": tok, "layers": {}}
        g = int(rng.integers(1, 5)) if dec_layers else 0
        if dec_layers:
            out_ids = rng.integers(2, 32000, size=g).astype(np.int32)
            out_ids[-1] = 1
            sample["dec_input_ids"] = np.concatenate([[0], out_ids[:-1]]).astype(np.int32)
            sample["dec_output_ids"] = out_ids
        for prefix, blocks, n in (("enc", enc_layers, s), ("dec", dec_layers, g)):
            for b in blocks:
                logits = rng.normal(size=(n, num_experts)).astype(np.float32) * 3
                if logits_dtype == "F16":
                    logits = logits.astype(np.float16).astype(np.float32)
                elif logits_dtype == "BF16":
                    logits = (to_bf16_bits(logits).astype(np.uint32) << 16).view(np.float32)
                top = topk_rows(logits, top_k)
                expert = top[:, 0].copy()
                counts = np.zeros(num_experts, int)
                drop = np.zeros(n, np.uint8)
                for t, e in enumerate(expert):
                    counts[e] += 1
                    drop[t] = prefix == "enc" and counts[e] > capacity and not synthetic
                probs = _softmax(logits)
                if top_k == 1:
                    layer = {"router_logits": logits, "expert": expert,
                             "gate": probs.max(axis=1).astype(np.float32)}
                else:
                    w = np.take_along_axis(probs, top, axis=1)
                    layer = {"router_logits": logits, "expert": top, "gate": (w / w.sum(axis=1, keepdims=True)).astype(np.float32)}
                if has_dropped:
                    layer["dropped"] = drop
                if logits_topk:
                    ids = topk_rows(logits, logits_topk)
                    vals = np.take_along_axis(logits, ids, axis=1)
                    m = logits.max(axis=1, keepdims=True) if n else np.zeros((0, 1), np.float32)
                    lse = (m[:, 0].astype(np.float64) + np.log(np.exp(logits.astype(np.float64) - m).sum(axis=1))) if n \
                        else np.zeros(0)
                    layer["router_topk_logits"] = vals.astype(np.float16).astype(np.float32)
                    layer["router_topk_ids"] = ids
                    layer["router_lse"] = lse.astype(np.float32)
                if hidden_dtype:
                    h = rng.normal(size=(n, d_model)).astype(np.float32)
                    if synthetic:
                        h[:] = 0
                    if hidden_dtype == "BF16":
                        h = (to_bf16_bits(h).astype(np.uint32) << 16).view(np.float32)
                    layer["hidden"] = h
                sample["layers"][f"{stack1 if prefix == 'enc' else stack2}.{b}"] = layer
        truth.append(sample)

    def stored(name, arr):
        kind = name.rsplit(".", 1)[-1]
        dtype = {"router_logits": logits_dtype, "hidden": hidden_dtype, "router_topk_logits": "F16"}.get(kind)
        if dtype == "F16":
            return arr.astype(np.float16)
        if dtype == "BF16":
            return to_bf16_bits(arr)
        return arr

    shards, first = [], 0
    bounds = list(range(0, num_samples, shard_size)) + [num_samples]
    chunks = [truth[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    if empty_last_shard:
        chunks.append([])
    for k, chunk in enumerate(chunks):
        lens = [len(x["token_ids"]) for x in chunk]
        tensors = {"token_ids": np.concatenate([x["token_ids"] for x in chunk] or [np.zeros(0, np.int32)]).astype(np.int32),
                   "sample_offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                   "sample_kind": np.array([x["synthetic"] for x in chunk], np.uint8)}
        names = [f"{stack1}.{b}" for b in enc_layers] + [f"{stack2}.{b}" for b in dec_layers]
        if dec_layers:
            glens = [len(x["dec_input_ids"]) for x in chunk]
            tensors[f"{stack2}.input_ids"] = np.concatenate([x["dec_input_ids"] for x in chunk] or [np.zeros(0, np.int32)])
            tensors[f"{stack2}.output_ids"] = np.concatenate([x["dec_output_ids"] for x in chunk] or [np.zeros(0, np.int32)])
            tensors[f"{stack2}.sample_offsets"] = np.concatenate([[0], np.cumsum(glens)]).astype(np.int64)
        for name in names:
            fields = ((["router_topk_logits", "router_topk_ids", "router_lse"] if logits_topk else ["router_logits"])
                      + ["expert"] + (["dropped"] if has_dropped else []) + ["gate"]
                      + (["hidden"] if hidden_dtype else []))
            for f in fields:
                kk = (top_k,) if top_k > 1 else ()
                width = {"router_logits": (num_experts,), "hidden": (d_model,), "expert": kk, "gate": kk,
                         "router_topk_logits": (logits_topk,), "router_topk_ids": (logits_topk,)}.get(f, ())
                parts = [x["layers"][name][f] for x in chunk]
                dt = parts[0].dtype if parts else {"expert": np.int32, "dropped": np.uint8,
                                                   "router_topk_ids": np.int32}.get(f, np.float32)
                arr = np.concatenate(parts) if parts else np.zeros((0,) + width, dt)
                tensors[f"{name}.{f}"] = stored(f"{name}.{f}", arr)
        file = f"shard-{k:05d}.safetensors"
        meta = {"format": "moetrace-trace", "format_version": str(format_version), "first_sample": str(first),
                "sample_ids": json.dumps([x["sample_id"] for x in chunk]),
                "datasets": json.dumps([x["dataset"] for x in chunk]),
                "rows": json.dumps([x["row"] for x in chunk])}
        write_safetensors(os.path.join(path, file), tensors, meta)
        raw = open(os.path.join(path, file), "rb").read()
        shards.append({"file": file, "first_sample": first, "num_samples": len(chunk), "num_tokens": sum(lens),
                       "num_decoder_tokens": int(tensors[f"{stack2}.sample_offsets"][-1]) if dec_layers else 0,
                       "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
        first += len(chunk)

    dist = np.zeros(num_experts, np.int64)
    per_layer = {}
    for name in [f"{stack1}.{b}" for b in enc_layers] + [f"{stack2}.{b}" for b in dec_layers]:
        ex = np.concatenate([x["layers"][name]["expert"] for x in truth])
        dr = (np.concatenate([x["layers"][name]["dropped"] for x in truth]) if has_dropped
              else np.zeros(len(ex), np.uint8))
        counts = np.bincount(ex.ravel(), minlength=num_experts)  # each of a token's k choices
        if name.startswith(stack1 + "."):
            dist += counts
        per_layer[name] = {"expert_counts": [int(c) for c in counts], "dropped": int(dr.sum()),
                           "tokens": int(len(ex)), "drop_rate": float(dr.sum() / max(len(ex), 1))}
    ds_counts = {}
    for x in truth:
        ds_counts[x["dataset"]] = ds_counts.get(x["dataset"], 0) + len(enc_layers)
    used = int(np.count_nonzero(dist))
    manifest = {
        "format": "moetrace-trace", "format_version": format_version, "moetrace_version": "0.1.0",
        "complete": True, "command_line": ["conftest.make_store"],
        "settings": {"mode": "mixed" if synthetic_every else "real", "seed": seed, "max_length": 256,
                     "logits_dtype": logits_dtype, "hidden_dtype": hidden_dtype or "none",
                     "decoder": bool(dec_layers), "max_new_tokens": 4 if dec_layers else 0,
                     "datasets": ",".join(datasets), "traces": num_samples, "real_ratio": 0.5},
        "model": {"id": "test/random", "files": [], "config": {}, "tokenizer_sha256": "", "demo": True},
        "layers": {"encoder": list(enc_layers), "decoder": list(dec_layers)},
        "num_experts": num_experts, "d_model": d_model,
        # Not in TRACE_FORMAT.md's example, but written by the C++ writer and required by its reader.
        "logits_dtype": logits_dtype, "hidden_dtype": hidden_dtype or "none", "decoder": bool(dec_layers),
        "samples_per_shard": shard_size,
        "shards": shards,
        "num_samples": num_samples, "num_tokens": int(sum(len(x["token_ids"]) for x in truth)),
        "num_decoder_tokens": int(sum(len(x.get("dec_input_ids", ())) for x in truth)),
        "total_traces": num_samples * len(enc_layers),
        "expert_distribution": {str(e): int(c) for e, c in enumerate(dist)},
        "experts_used": used, "diversity_percentage": 100.0 * used / num_experts,
        "dataset_distribution": ds_counts, "collection_time": 1.5, "device": "cpu (test)",
        "per_layer": per_layer, "throughput_tokens_per_s": 100.0,
    }
    if v2:
        manifest["routing"] = {"family": family, "top_k": top_k, "dropped": has_dropped}
    if logits_topk:
        manifest["logits_topk"] = logits_topk
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return truth


@pytest.fixture
def store_factory(tmp_path):
    """make(name, **options) -> (store directory, truth)."""
    def make(name="store", **kw):
        path = str(tmp_path / name)
        return path, make_store(path, **kw)
    return make


def moetrace_cli():
    """The C++ CLI: $MOETRACE_CLI, else build/tools/cli/moetrace. The one way the tests find it. The CLI is
    part of the product, not an optional dependency: a test that needs it fails when it is not built."""
    path = os.environ.get("MOETRACE_CLI") or os.path.join(REPO, "build", "tools", "cli", "moetrace")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"the C++ moetrace CLI is not built at {path} (bash scripts/build.sh, or set MOETRACE_CLI)")
    return path


@pytest.fixture(scope="module")
def cli():
    """The C++ CLI's path (see moetrace_cli)."""
    return moetrace_cli()


def run_module(*args, check=True, fresh=False):
    """Runs `python -m moetrace ARGS`: in this process (fast), or with fresh=True in a new interpreter
    with the repository's package on PYTHONPATH. Returns an object with returncode, stdout, stderr."""
    args = [str(a) for a in args]
    if fresh:
        env = dict(os.environ)
        env["PYTHONPATH"] = PYTHON_DIR + os.pathsep + env.get("PYTHONPATH", "")
        proc = subprocess.run([sys.executable, "-m", "moetrace", *args], capture_output=True, text=True,
                              env=env, cwd=REPO)
    else:
        import contextlib
        import io
        import types
        from moetrace.__main__ import main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 1
        proc = types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m moetrace {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


class BoundedRun:
    """What run_bounded() saw: exit status, output and the child's peak resident memory in bytes."""

    def __init__(self, returncode, stdout, stderr, max_rss):
        self.returncode, self.stdout, self.stderr, self.max_rss = returncode, stdout, stderr, max_rss


def run_bounded(cli, *args, timeout=60, max_rss=1 << 30, env=None):
    """The CLI with a wall-clock limit, failing the test past it or past `max_rss` of peak resident
    memory (measured per child by wait4). The CLI's own address space is ~2 GB before it reads
    anything (runtimes reserve it), so the bound is on resident memory; `prlimit --as=8G` only keeps
    a regression from taking the machine down. The hostile-input tests use it."""
    import tempfile
    import time
    if shutil.which("prlimit") is None:
        pytest.fail("prlimit (util-linux) is needed for the bounded-memory tests")
    cmd = ["prlimit", f"--as={8 << 30}", cli, *map(str, args)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                os.wait4(p.pid, 0)
                pytest.fail(f"moetrace {' '.join(map(str, args))} ran past {timeout} s")
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        r = BoundedRun(os.waitstatus_to_exitcode(status), out.read().decode(errors="replace"),
                       err.read().decode(errors="replace"), usage.ru_maxrss * 1024)
    assert r.max_rss < max_rss, f"moetrace {' '.join(map(str, args))} took {r.max_rss >> 20} MiB\n{r.stderr[-2000:]}"
    return r
