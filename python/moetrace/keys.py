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
# Stored instead of router_logits by `collect --logits topk:K` (docs/TRACE_FORMAT.md): the K largest
# logits per token (F16, descending, ties -> lowest index), their experts (I32) and the log-sum-exp
# over all E logits (F32).
ROUTER_TOPK_LOGITS = "router_topk_logits"
ROUTER_TOPK_IDS = "router_topk_ids"
ROUTER_LSE = "router_lse"
ENCODER_OUTPUT = "enc.output"
LM_OUTPUT = "lm.output"
FIELDS = (INPUT, HIDDEN, ROUTER_LOGITS, EXPERT, DROPPED, GATE)

ENCODER = "enc"
DECODER = "dec"
# A decoder-only MoE language model's prompt (prefill) pass and its greedy generation steps: a store
# keeps them where it keeps Switch's encoder and decoder (expert/gate [.., k], no dropped).
LM = "lm"
GEN = "gen"
STACKS = (ENCODER, DECODER, LM, GEN)
FIRST_PASS = (ENCODER, LM)    # the stacks of a store's "encoder" layer list
GENERATION = (DECODER, GEN)   # the stacks of its "decoder" layer list


def layer(stack: str, block: int) -> str:
    """'enc.3': a MoE layer's name (the prefix of its tensors, its per_layer key)."""
    if stack not in STACKS:
        raise ValueError(f"stack must be one of {', '.join(STACKS)}, got {stack!r}")
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


_KEY = re.compile(r"(enc|dec|lm|gen)\.([0-9]+)\.(.+)", re.DOTALL)  # the field is the rest, as in keys.h


def parse(key: str) -> Optional[Parsed]:
    """The parts of 'enc.3.router_logits'; None for anything else (e.g. 'enc.output')."""
    m = _KEY.fullmatch(key)
    return Parsed(m.group(1), int(m.group(2)), m.group(3)) if m else None


class ParsedLayer(NamedTuple):
    stack: str
    block: int


_LAYER = re.compile(r"(enc|dec|lm|gen)\.([0-9]+)")


def parse_layer(name: str) -> Optional[ParsedLayer]:
    """The parts of a MoE layer's name 'dec.5'; None for anything else (a tensor key, 'enc.x', '3')."""
    m = _LAYER.fullmatch(name)
    return ParsedLayer(m.group(1), int(m.group(2))) if m else None


def stack_of(name: str) -> Optional[str]:
    """'enc', 'dec', 'lm' or 'gen' for a layer name or a tensor key of a stack ('dec.5', 'dec.5.gate',
    'dec.input_ids', 'lm.3'); None otherwise ('token_ids', 'encoder')."""
    head = name.split(".", 1)[0]
    return head if head in STACKS and "." in name else None


def is_generation(name: str) -> bool:
    """True for a layer name or tensor key of a generation stack ('dec.5', 'gen.3.gate')."""
    return stack_of(name) in GENERATION


def stacks_of(family: str | None) -> tuple[str, str]:
    """(first pass, generation) stack prefixes of a routing family: ('enc', 'dec') for switch (and
    None: stores written before families), ('lm', 'gen') for the decoder-only language models."""
    return (ENCODER, DECODER) if family in (None, "switch") else (LM, GEN)


def pass_title(section: str, family: str | None) -> str:
    """How reports name a store's two passes (the stats.json keys stay "encoder" / "decoder"):
    "encoder" / "decoder" for switch, "prompt" / "generation" for the language models."""
    if family in (None, "switch"):
        return section
    return "prompt" if section == "encoder" else "generation"
