"""python/moetrace/keys.py mirrors src/core/keys.h: same field names, same key shapes."""
import re
from pathlib import Path

from moetrace import keys

HEADER = Path(__file__).resolve().parents[2] / "src" / "core" / "keys.h"


def header_constants():
    text = HEADER.read_text()
    return dict(re.findall(r'inline constexpr std::string_view k(\w+) = "([^"]+)";', text))


def test_fields_match_header():
    c = header_constants()
    assert c, "no constants found in src/core/keys.h"
    py = {"Input": keys.INPUT, "Hidden": keys.HIDDEN, "RouterLogits": keys.ROUTER_LOGITS,
          "Expert": keys.EXPERT, "Dropped": keys.DROPPED, "Gate": keys.GATE,
          "EncoderOutput": keys.ENCODER_OUTPUT}
    assert c == py


def test_build_and_parse():
    assert keys.tensor(keys.ENCODER, 3, keys.ROUTER_LOGITS) == "enc.3.router_logits"
    assert keys.layer(keys.DECODER, 11) == "dec.11"
    assert keys.parse("dec.5.gate") == ("dec", 5, "gate")
    for bad in ("enc.output", "token_ids", "enc.x.gate", "enc.3.", "xyz.1.gate"):
        assert keys.parse(bad) is None
