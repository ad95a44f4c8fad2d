"""The expert cache simulator of `moetrace speculate`: replays per-layer expert requests through a GPU
expert cache (LRU, LFU, Belady's optimum; optionally with prefetching) and models the time per token.
Pure functions over lists of expert ids: no store, no predictors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

POLICIES = ("lru", "lfu", "belady")


def next_uses(requests: list[np.ndarray], prefetch: list | None, num_experts: int):
    """Backward pass: for request i, nxt[i][e] = next request index > i that needs e (for e in
    R_i), and pre[i][e] = next request index >= i that needs e (for e in the prefetch set P_i)."""
    inf = len(requests) + 1
    seen = [inf] * num_experts
    nxt = [None] * len(requests)
    pre = [None] * len(requests) if prefetch is not None else None
    for i in range(len(requests) - 1, -1, -1):
        r = requests[i]
        nxt[i] = [seen[e] for e in r]
        for e in r:
            seen[e] = i
        if prefetch is not None:
            pre[i] = [seen[e] for e in prefetch[i]]
    return nxt, pre


def simulate_cache(requests: list, capacity: int, policy: str, num_experts: int, prefetch: list | None = None) -> dict:
    """Replays requests (each a list of distinct experts needed at once by one layer: a prefill
    sequence's experts, or one decode token's) through a cache of `capacity` experts.

    Before request i the prefetch set P_i (if any) is loaded. After a request (or prefetch) the cache
    keeps at most `capacity` experts: those just used/prefetched are kept first, the rest evicted by
    policy: lru (least recently touched), lfu (fewest demand uses, then least recent), belady (the
    one needed farthest in the future; optimal for demand fetching, and it may also decline to keep a
    just-used expert). Returns counts and per-request demand/prefetch loads (for the time model)."""
    n = len(requests)
    cache: set = set()
    last = [-1] * num_experts
    freq = [0] * num_experts
    nuse = [n + 1] * num_experts
    nxt = pre = None
    if policy == "belady":
        nxt, pre = next_uses(requests, prefetch, num_experts)
    demand = np.zeros(n, np.int32)
    loaded = np.zeros(n, np.int32)
    hits = accesses = 0
    clock = 0

    def shrink(pinned):
        excess = len(cache) - capacity
        if excess <= 0:
            return
        if policy == "belady":  # farthest next use goes first, pinned or not
            victims = sorted(cache, key=lambda e: (-nuse[e], e))[:excess]
        else:
            key = (lambda e: (e in pinned, last[e], e)) if policy == "lru" else \
                (lambda e: (e in pinned, freq[e], last[e], e))
            victims = sorted(cache, key=key)[:excess]
        cache.difference_update(victims)

    for i in range(n):
        if prefetch is not None and len(prefetch[i]):
            p = prefetch[i]
            clock += 1
            new = [e for e in p if e not in cache]
            loaded[i] = len(new)
            cache.update(new)
            for k, e in enumerate(p):
                last[e] = clock
                if policy == "belady":
                    nuse[e] = pre[i][k]
            shrink(set(p))
        r = requests[i]
        clock += 1
        got = sum(1 for e in r if e in cache)
        hits += got
        accesses += len(r)
        demand[i] = len(r) - got
        cache.update(r)
        for k, e in enumerate(r):
            last[e] = clock
            freq[e] += 1
            if policy == "belady":
                nuse[e] = nxt[i][k]
        shrink(set(r))
    return {"accesses": accesses, "hits": hits, "hit_rate": hits / accesses if accesses else 0.0,
            "demand_loads": int(demand.sum()), "prefetch_loads": int(loaded.sum()),
            "demand_per_request": demand, "prefetch_per_request": loaded}


@dataclass
class TimeModel:
    expert_bytes: float
    bandwidth_gbs: float = 24.0   # host-to-device GB/s
    layer_ms: float = 0.2         # compute of one MoE layer for one request (a decode step or a prefill sequence)

    def transfer_ms(self, experts) -> np.ndarray:
        return np.asarray(experts, np.float64) * self.expert_bytes / (self.bandwidth_gbs * 1e9) * 1e3

    def request_ms(self, demand, prefetched) -> float:
        """Demand loads stall the layer; prefetches overlap the previous layer's compute."""
        c = self.layer_ms
        return float(np.sum(c + self.transfer_ms(demand) + np.maximum(0.0, self.transfer_ms(prefetched) - c)))


def layer_requests(experts: np.ndarray, groups: list, top: np.ndarray | None = None):
    """The requests each MoE layer sees when the rows of `experts` ([n, L]: the top-1 expert per token
    and moe index, or [n, L, k]: a top-k model's k experts, all loaded for the token) are served in
    `groups` (index arrays: one per prefill sequence, or one row per decode token): reqs[t][i] = the
    sorted distinct experts of group i at layer t. With `top` [n, L, p] (a predictor's top-p per token),
    also pre[t][i] = the group's predicted experts, most often predicted first (ties: lower expert); pre
    is None without it."""
    L = experts.shape[1]
    reqs = [[sorted(set(experts[g, t].ravel().tolist())) for g in groups] for t in range(L)]
    pre = None
    if top is not None:
        pre = []
        for t in range(L):
            lst = []
            for g in groups:  # the predicted experts of the request's tokens, most often predicted first
                v, c = np.unique(top[g, t], return_counts=True)
                lst.append(v[np.argsort(-c, kind="stable")].tolist())
            pre.append(lst)
    return reqs, pre


def replay(reqs: list, pre: list | None, sizes, policies, num_experts: int, tm: TimeModel, tokens: int) -> list:
    """Every (cache size in experts per layer, policy, with/without prefetching the first `size` of
    pre) through simulate_cache, one cache per MoE layer; returns speculation.json's cache `runs`."""
    L = len(reqs)
    ebytes = tm.expert_bytes
    runs = []
    for size in sizes:
        for policy in policies:
            for prefetch in ([False, True] if pre is not None else [False]):
                acc = hit = dem = pf = 0
                ms = 0.0
                for t in range(L):
                    p_t = [x[:size] for x in pre[t]] if prefetch else None
                    r = simulate_cache(reqs[t], size, policy, num_experts, p_t)
                    acc += r["accesses"]
                    hit += r["hits"]
                    dem += r["demand_loads"]
                    pf += r["prefetch_loads"]
                    ms += tm.request_ms(r["demand_per_request"], r["prefetch_per_request"])
                runs.append({"cache_experts_per_layer": size, "cache_bytes": size * L * ebytes, "policy": policy,
                             "prefetch": prefetch, "accesses": acc, "hits": hit, "hit_rate": hit / acc if acc else 0.0,
                             "experts_transferred": dem + pf, "demand_loads": dem, "prefetch_loads": pf,
                             "bytes_transferred": (dem + pf) * ebytes, "ms_per_token": ms / tokens})
    return runs
