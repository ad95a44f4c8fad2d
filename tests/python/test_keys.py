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
          "EncoderOutput": keys.ENCODER_OUTPUT, "LmOutput": keys.LM_OUTPUT,
          "RouterTopkLogits": keys.ROUTER_TOPK_LOGITS, "RouterTopkIds": keys.ROUTER_TOPK_IDS,
          "RouterLse": keys.ROUTER_LSE}
    assert c == py


def test_build_and_parse():
    assert keys.tensor(keys.ENCODER, 3, keys.ROUTER_LOGITS) == "enc.3.router_logits"
    assert keys.layer(keys.DECODER, 11) == "dec.11"
    assert keys.parse("dec.5.gate") == ("dec", 5, "gate")
    for bad in ("enc.output", "token_ids", "enc.x.gate", "enc.3.", "xyz.1.gate"):
        assert keys.parse(bad) is None


def test_layer_names_and_their_tensors():
    assert keys.layers(keys.ENCODER, [1, 3]) == ["enc.1", "enc.3"]
    assert keys.layer_tensor("dec.5", keys.GATE) == keys.tensor(keys.DECODER, 5, keys.GATE) == "dec.5.gate"
    assert keys.parse_layer("dec.5") == ("dec", 5)
    for bad in ("dec.5.gate", "enc.", "enc.x", "3", "enc.3\n", "encoder.3"):
        assert keys.parse_layer(bad) is None, bad
    assert [keys.stack_of(n) for n in ("enc.3", "dec.5.gate", "dec.input_ids", "token_ids", "dec", "encoder.1")] \
        == ["enc", "dec", "dec", None, None, None]


def test_parse_takes_the_rest_as_the_field_like_the_header():
    assert keys.parse("enc.3.router.weight") == ("enc", 3, "router.weight")
    assert keys.parse("enc.3.gate\n") == ("enc", 3, "gate\n")  # keys.h keeps every byte after the dot
    try:
        keys.layer("mid", 1)
    except ValueError as e:
        assert "stack must be" in str(e)
    else:
        raise AssertionError("keys.layer accepted stack 'mid'")


def test_language_model_stacks():
    """lm.{i} (the prompt pass) and gen.{i} (greedy generation) as in keys.h's Stack::kLm / kGen."""
    assert keys.tensor(keys.LM, 3, keys.EXPERT) == "lm.3.expert"
    assert keys.parse("gen.7.router_topk_ids") == ("gen", 7, "router_topk_ids")
    assert keys.parse_layer("lm.0") == ("lm", 0)
    assert [keys.stack_of(n) for n in ("lm.3", "gen.1.gate", "gen.input_ids", "lmx.1")] == ["lm", "gen", "gen", None]
    assert keys.is_generation("gen.2") and keys.is_generation("dec.1.expert") and not keys.is_generation("lm.2")
    assert keys.stacks_of("switch") == ("enc", "dec") and keys.stacks_of(None) == ("enc", "dec")
    assert keys.stacks_of("mixtral") == ("lm", "gen")
    header = HEADER.read_text()
    assert 'return "lm";' in header and 'return "gen";' in header
