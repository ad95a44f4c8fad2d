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


def layers(stack: str, blocks) -> list[str]:
    """['enc.1', 'enc.3', ...]: the names of a stack's MoE layers from their block indices (a store's
    encoder_layers / decoder_layers)."""
    return [layer(stack, b) for b in blocks]


def layer_tensor(layer_name: str, field: str) -> str:
    """'enc.3' + 'expert' -> 'enc.3.expert': a tensor of the MoE layer named `layer_name`."""
    return f"{layer_name}.{field}"


class Parsed(NamedTuple):
    stack: str
    block: int
    field: str


_KEY = re.compile(r"(enc|dec)\.([0-9]+)\.(.+)", re.DOTALL)  # the field is the rest, as in keys.h


def parse(key: str) -> Optional[Parsed]:
    """The parts of 'enc.3.router_logits'; None for anything else (e.g. 'enc.output')."""
    m = _KEY.fullmatch(key)
    return Parsed(m.group(1), int(m.group(2)), m.group(3)) if m else None


class ParsedLayer(NamedTuple):
    stack: str
    block: int


_LAYER = re.compile(r"(enc|dec)\.([0-9]+)")


def parse_layer(name: str) -> Optional[ParsedLayer]:
    """The parts of a MoE layer's name 'dec.5'; None for anything else (a tensor key, 'enc.x', '3')."""
    m = _LAYER.fullmatch(name)
    return ParsedLayer(m.group(1), int(m.group(2))) if m else None


def stack_of(name: str) -> Optional[str]:
    """'enc' or 'dec' for a layer name or a tensor key of a stack ('dec.5', 'dec.5.gate',
    'dec.input_ids'); None otherwise ('token_ids', 'encoder')."""
    head = name.split(".", 1)[0]
    return head if head in (ENCODER, DECODER) and "." in name else None
