"""Names of observed tensors, mirroring src/core/keys.h (tests/python/test_keys.py checks the two agree).

One meaning of "layer": a MoE layer, named by its stack and the index of the transformer block that holds
it ("enc.3" = the MoE layer of encoder block 3). "block" is a transformer block index; a position among the
MoE layers only is a "moe index" and never appears in a key.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional

INPUT = "input"
HIDDEN = "hidden"
ROUTER_LOGITS = "router_logits"
EXPERT = "expert"
DROPPED = "dropped"
GATE = "gate"
ENCODER_OUTPUT = "enc.output"
FIELDS = (INPUT, HIDDEN, ROUTER_LOGITS, EXPERT, DROPPED, GATE)

ENCODER = "enc"
DECODER = "dec"


def layer(stack: str, block: int) -> str:
    """'enc.3': a MoE layer's name (the prefix of its tensors, its per_layer key)."""
    if stack not in (ENCODER, DECODER):
        raise ValueError(f"stack must be 'enc' or 'dec', got {stack!r}")
    return f"{stack}.{int(block)}"


def tensor(stack: str, block: int, field: str) -> str:
    """'enc.3.router_logits': one observed tensor of block `block`."""
    return f"{layer(stack, block)}.{field}"


class Parsed(NamedTuple):
    stack: str
    block: int
    field: str


_KEY = re.compile(r"^(enc|dec)\.([0-9]+)\.(.+)$")


def parse(key: str) -> Optional[Parsed]:
    """The parts of 'enc.3.router_logits'; None for anything else (e.g. 'enc.output')."""
    m = _KEY.match(key)
    return Parsed(m.group(1), int(m.group(2)), m.group(3)) if m else None
