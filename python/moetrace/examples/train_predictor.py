"""Train a small PyTorch expert predictor from a trace store: the same kind of model as
`moetrace speculate`'s `learned` predictor (next MoE layer's expert from the current router input and
the previous experts), with the same honest split (by sample id, never by token).

    python -m moetrace.examples.train_predictor STORE [--target enc.3] [--epochs 5] [--hidden-size 256]

Needs PyTorch (not a moetrace dependency). A starting point: change the features, the model or the
target and compare with the baselines that `moetrace speculate` reports on the same split.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from moetrace import keys


def load_split(store, target: str, split, max_tokens: int):
    """(x_train, y_train, x_test, y_test): features of layer `target`'s previous MoE layer."""
    from moetrace.store import rows_f32

    layers = store.layers
    t = layers.index(target)
    stack = keys.stack_of(target)
    if t == 0 or keys.stack_of(layers[t - 1]) != stack:
        raise SystemExit(f"{target} has no previous MoE layer in its stack; pick another --target")
    prev, prev2 = layers[t - 1], (layers[t - 2] if t >= 2 and keys.stack_of(layers[t - 2]) == stack else None)
    e = store.num_experts
    parts = {0: ([], []), 1: ([], [])}
    kept = 0
    for shard in store.iter_shards():
        if not shard.num_samples:
            continue
        md = shard.metadata
        role = split.assign(md["sample_ids"], md["datasets"])
        off = shard.sample_offsets if stack == keys.ENCODER else shard.dec_sample_offsets
        rows_role = np.repeat(role, np.diff(off))
        feats = []
        k_hidden = keys.layer_tensor(prev, keys.HIDDEN)
        if shard.has(k_hidden):
            feats.append(rows_f32(shard.tensor(k_hidden), 0, int(off[-1])))
        for name in (prev, prev2):
            oh = np.zeros((int(off[-1]), e), np.float32)
            if name is not None:
                oh[np.arange(oh.shape[0]), np.asarray(shard.tensor(keys.layer_tensor(name, keys.EXPERT)))] = 1.0
            feats.append(oh)
        x = np.concatenate(feats, axis=1)
        y = np.asarray(shard.tensor(keys.layer_tensor(target, keys.EXPERT)), np.int64)
        for r in (0, 1):
            m = rows_role == r
            parts[r][0].append(x[m])
            parts[r][1].append(y[m])
        kept += x.shape[0]
        if kept >= max_tokens:
            break
    cat = lambda lst: np.concatenate(lst) if lst else np.zeros((0,))  # noqa: E731
    return cat(parts[0][0]), cat(parts[0][1]), cat(parts[1][0]), cat(parts[1][1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--target", help="layer to predict (default: the second encoder MoE layer)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="split seed (same meaning as in moetrace speculate)")
    ap.add_argument("--test-fraction", type=float, default=0.2)
    ap.add_argument("--max-tokens", type=int, default=2_000_000, help="read at most this many tokens")
    args = ap.parse_args(argv)
    try:
        import torch
        from torch import nn
    except ImportError:
        print("this example needs PyTorch: pip install torch", file=sys.stderr)
        return 1
    import moetrace
    from moetrace.speculate import Split

    store = moetrace.open_store(args.store)
    target = args.target or store.layers[1]
    xtr, ytr, xte, yte = load_split(store, target, Split(args.seed, args.test_fraction), args.max_tokens)
    if len(ytr) == 0 or len(yte) == 0:
        raise SystemExit("empty train or test split: use a larger store or another --test-fraction")
    mu, sd = xtr.mean(axis=0), xtr.std(axis=0) + 1e-6
    xtr_t = torch.tensor((xtr - mu) / sd, dtype=torch.float32)
    xte_t = torch.tensor((xte - mu) / sd, dtype=torch.float32)
    ytr_t, yte_t = torch.tensor(ytr), torch.tensor(yte)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(xtr.shape[1], args.hidden_size), nn.ReLU(),
                          nn.Linear(args.hidden_size, store.num_experts))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=1e-5)
    loss_fn = nn.CrossEntropyLoss()
    print(f"{target}: {len(ytr)} train tokens, {len(yte)} test tokens, {xtr.shape[1]} features")
    for epoch in range(args.epochs):
        perm = torch.randperm(len(ytr_t))
        total = 0.0
        for i in range(0, len(perm), 1024):
            idx = perm[i:i + 1024]
            opt.zero_grad()
            loss = loss_fn(model(xtr_t[idx]), ytr_t[idx])
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        with torch.no_grad():
            logits = model(xte_t)
            top = logits.topk(min(4, store.num_experts), dim=1).indices
            acc1 = (top[:, 0] == yte_t).float().mean().item()
            rec4 = (top == yte_t[:, None]).any(dim=1).float().mean().item()
        print(f"epoch {epoch + 1}: train loss {total / len(ytr_t):.4f}, test top-1 {acc1:.3f}, recall@4 {rec4:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
