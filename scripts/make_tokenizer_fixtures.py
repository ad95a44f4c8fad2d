#!/usr/bin/env python3
"""Builds tests/data/tokenizers_lm/: small tokenizers trained to the MoE LM families' settings and the
ids Hugging Face `tokenizers` / transformers give for real texts of the repo's datasets.

Run with the reference environment (never a dependency of moetrace's build or tests):
    /work/venv-torch/bin/python scripts/make_tokenizer_fixtures.py

Tokenizers made (each in its own folder, as a model directory would hold them):
  qwen2_bpe/    byte-level BPE, NFC, the Qwen2 Split regex + ByteLevel(use_regex=False), ByteLevel
                post-processor; added tokens <|endoftext|>, <|im_start|>, <|im_end|> (special) and
                <think>, </think> (not special), as Qwen2/Qwen3's tokenizer.json have them.
  olmoe_bpe/    byte-level BPE, NFC, ByteLevel(add_prefix_space=False, use_regex=True) (the GPT-2
                regex), as GPT-NeoX-20B / OLMoE; added tokens <|endoftext|>, <|padding|>,
                |||PHONE_NUMBER|||, |||EMAIL_ADDRESS|||, |||IP_ADDRESS||| and whitespace-run tokens
                (normalized=true, not special) as GPT-NeoX has them.
  template_bpe/ olmoe_bpe's vocabulary with a TemplateProcessing post-processor
                "<|endoftext|> $A <|endoftext|>" and ByteLevel(add_prefix_space=True): BOS/EOS and
                prefix-space handling; added tokens <mask> (lstrip), <sep> (rstrip) and a
                normalized=true one whose content NFC changes.
  fallback_bpe/ a BPE that is not byte-level: NFC + the Qwen2 Split regex, byte_fallback=True with
                <0x00>..<0xFF> in the vocabulary and a small alphabet, so rare characters fall back.
  llama_spm/    SentencePiece BPE (Llama/Mixtral settings: byte_fallback, split_digits, dummy prefix,
                identity normalization) as tokenizer.model + tokenizer_config.json (legacy=true, as
                Mixtral-8x7B's), the reference from transformers' LlamaTokenizer (tokenizers backend).
  llama_spm_nolegacy/  the same model with legacy=false (transformers 5's default).
  tiny_bpe/     a hand-made 9-token BPE: ignore_merges, unk_token + fuse_unk, Split on a String,
                a Sequence normalizer, no decoder (14 texts).
Each folder has reference.jsonl: {"text", "ids", "decoded"} per text.
"""
import gzip
import json
import os
import random
import shutil
import sys
from datetime import datetime, timezone

import sentencepiece as spm
import tokenizers
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
OUT = os.path.join(DATA, "tokenizers_lm")
SEED = 20
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def lines(path, limit=None):
    with open(path, encoding="utf-8") as f:
        out = [line.rstrip("\n") for line in f]
    return out[:limit] if limit else out


def training_texts():
    """Real text the tokenizers are trained on (never used for the reference texts)."""
    texts = lines(os.path.join(DATA, "wikitext2_tokens", "test.txt"))
    import csv

    with open(os.path.join(DATA, "ag_news", "test.csv"), encoding="utf-8") as f:
        for row in csv.reader(f):
            texts.append(row[1] + "\n" + row[2])
    texts += lines(os.path.join(DATA, "tweet_eval", "datasets", "emoji", "val_text.txt"))
    return [t for t in texts if t.strip()]


def reference_texts():
    """A few hundred real texts the tokenizers were not trained on, edge cases included."""
    rng = random.Random(SEED)
    pools = {
        "wikitext2_valid": [t for t in lines(os.path.join(DATA, "wikitext2_tokens", "valid.txt")) if t.strip()],
        "tweet_eval_irony": lines(os.path.join(DATA, "tweet_eval", "datasets", "irony", "test_text.txt")),
        "tweet_eval_hillary": lines(
            os.path.join(DATA, "tweet_eval", "datasets", "stance", "hillary", "test_text.txt")
        ),
        "glue_mrpc": [r.split("\t")[3] for r in lines(os.path.join(DATA, "glue", "MRPC", "dev.tsv"))[1:]],
        "superglue_rte": [
            json.loads(r)["premise"] for r in lines(os.path.join(DATA, "superglue_rte", "val.jsonl"))
        ],
    }
    texts = []
    for name, pool in pools.items():
        non_ascii = [t for t in pool if any(ord(c) > 127 for c in t)]
        ascii_only = [t for t in pool if t not in set(non_ascii)]
        texts += rng.sample(non_ascii, min(25, len(non_ascii)))
        texts += rng.sample(ascii_only, 30)
    wiki = pools["wikitext2_valid"]
    # Multi-line texts (newline runs, leading spaces as wikitext has them).
    for i in range(0, 200, 20):
        texts.append("\n".join(wiki[i : i + 4]) + "\n\n")
    # Edge cases built from real text.
    base = pools["glue_mrpc"][:12]
    texts += [
        "",
        " ",
        "   ",
        "\n",
        "\n\n\n",
        "\t\tTabs\tand  spaces   ",
        "a\u000bvertical tab, a\u0085next line, a\u00a0no-break space, a\u3000wide space",
        "\r\nWindows\r\nline ends\r\n",
        "runs: a\u000b\u000bb x\u0085\u0085y p\u001c\u001d\u001e\u001fq z\u200b\u200bw \u2028\u2029 end\u000b",
        "Numbers: 1234567890, 3.14159, 1,000,000 and 2026-12-07.",
        "I'LL DON'T we'Re you've she'd it's THEY'VE Ma'am ſ'S",
        "Caf\u00e9 vs Cafe\u0301 (NFC composes the second), \u212b vs \u00c5, \ufb01 ligature",
        "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u4e2d\u6587\u548c\ud55c\uad6d\uc5b4",
        "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea \u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac",
        "Emoji: \U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \u2764\ufe0f \U0001f1e9\U0001f1ea",
        "<|endoftext|>",
        "<|endoftext|><|endoftext|>",
        base[0] + "<|endoftext|>" + base[1],
        "<|im_start|>user\n" + base[2] + "<|im_end|>\n<|im_start|>assistant\n",
        "<think>" + base[3] + "</think> " + base[4],
        "<|padding|>" + base[5] + " |||EMAIL_ADDRESS||| and |||PHONE_NUMBER|||, |||IP_ADDRESS|||",
        "<s>" + base[6] + "</s>",
        base[7] + " <s> " + base[8] + " <unk> </s>",
        "<|im_start|",
        "Un caf\u00e9 au lait, Caf\u00e9 au lait, Cafe\u0301 au lait.",
        "Fill  <mask>  here and <sep>   there\n<sep>\n \t<mask>",
        "<|endoftext|>   " + base[9] + "    \n",
        "     leading spaces and trailing     ",
        base[10] + "\n\n\n\n" + base[11],
        "\u2581Already escaped \u2581\u2581 spaces",
        "x" * 300,
        "\U0001f600" * 20,
    ]
    # Synthetic mixes of the characters where regex classes, NFC, added tokens and byte fallback
    # meet (a C++ fuzz run of 20000 such strings found no difference; 200 are kept).
    pieces = [
        " ", "  ", "\t", "\n", "\r\n", "\u000b", "\u0085", "\u00a0", "\u2003", "\u3000", "\u200b",
        "'s", "'S", "'ll", "'LL", "\u2019s", "\u017f", "a", "Z", "\u00e9", "e\u0301", "A\u030a", "\u01c5",
        "\u00df", "\ufb01", "\u2126", "\u03a9", "\u212a", "\u65e5", "\ud55c", "\u0627", "\u05e2", "\u0436",
        "\u0130", "\u0131", "0", "7", "\u00b2", "\u00bd", "\u0663", "\u0969", "\u216b", "\u2460",
        "\U0001d7d9", "$", "%", "\u2014", "\u2026", "\u00ab", "@", "#", "\U0001f600", "\U0001f44d\U0001f3fd",
        "\U0001f1e9\U0001f1ea", "\u0301", "\u0308", "\u094d", "<|endoftext|>", "<|im_start|>", "<think>",
        "<s>", "</s>", "<unk>", "<|", "|>", "  <mask> ", "<sep>  ", "|||IP_ADDRESS|||", "\x00", "\x7f",
        "\ufeff", "\U0010ffff",
    ]
    for _ in range(200):
        texts.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))))
    return texts


def byte_level_bpe(pre_tokenizer, vocab_size, special, extra=()):
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(training_texts(), trainer=trainer)
    tok.add_special_tokens(special)
    if extra:
        tok.add_tokens(list(extra))
    return tok


def write_reference(folder, encode, decode, texts):
    with open(os.path.join(folder, "reference.jsonl"), "w", encoding="utf-8") as f:
        for t in texts:
            ids = encode(t)
            f.write(json.dumps({"text": t, "ids": ids, "decoded": decode(ids)}, ensure_ascii=False) + "\n")


def fresh(name):
    folder = os.path.join(OUT, name)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    return folder


def save_hf(tok, folder, config, edit=None):
    path = os.path.join(folder, "tokenizer.json")
    tok.save(path)
    if edit:
        with open(path, encoding="utf-8") as f:
            j = json.load(f)
        edit(j)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(j, f, ensure_ascii=False, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    # Reload from the file, so the reference is what the saved tokenizer.json gives.
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    return tok


def main():
    texts = reference_texts()
    AT = tokenizers.AddedToken

    # Qwen2 / Qwen3 style.
    qwen_pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    qwen = byte_level_bpe(
        qwen_pre,
        1500,
        [AT(s, special=True, normalized=False) for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]],
    )
    qwen.add_tokens([AT(s, special=False, normalized=False) for s in ["<think>", "</think>"]])
    qwen.post_processor = processors.ByteLevel(trim_offsets=False)
    folder = fresh("qwen2_bpe")
    qwen = save_hf(
        qwen,
        folder,
        {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>"},
    )
    write_reference(folder, lambda t: qwen.encode(t).ids, lambda i: qwen.decode(i, skip_special_tokens=False), texts)

    # OLMoE / GPT-NeoX style.
    olmoe = byte_level_bpe(
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        1200,
        [AT(s, special=True, normalized=False) for s in ["<|endoftext|>", "<|padding|>"]],
    )
    olmoe.add_tokens([AT(s, special=False, normalized=False)
                      for s in ["|||PHONE_NUMBER|||", "|||EMAIL_ADDRESS|||", "|||IP_ADDRESS|||"]])
    olmoe.add_tokens([AT(" " * n, special=False, normalized=True) for n in (24, 8, 4, 2)])
    olmoe.post_processor = processors.ByteLevel(trim_offsets=True)
    folder = fresh("olmoe_bpe")
    def string_merges(j):
        # GPT-NeoX's / OLMoE's files spell merges as "a b" strings (older tokenizers wrote them so).
        j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]

    olmoe = save_hf(
        olmoe,
        folder,
        {"tokenizer_class": "GPTNeoXTokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
         "pad_token": "<|padding|>"},
        string_merges,
    )
    write_reference(folder, lambda t: olmoe.encode(t).ids, lambda i: olmoe.decode(i, skip_special_tokens=False), texts)

    # BOS/EOS through TemplateProcessing, prefix space.
    tmpl = Tokenizer.from_file(os.path.join(OUT, "olmoe_bpe", "tokenizer.json"))
    tmpl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    eot = tmpl.token_to_id("<|endoftext|>")
    tmpl.add_special_tokens([AT("<mask>", special=True, normalized=False, lstrip=True),
                             AT("<sep>", special=True, normalized=False, rstrip=True)])
    # normalized=true with content that NFC changes: matched as the normalizer writes it.
    tmpl.add_tokens([AT("Cafe\u0301 au lait", special=False, normalized=True)])
    tmpl.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|endoftext|>", pair="<|endoftext|> $A <|endoftext|> $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", eot)],
    )
    folder = fresh("template_bpe")
    tmpl = save_hf(tmpl, folder, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})
    write_reference(folder, lambda t: tmpl.encode(t).ids, lambda i: tmpl.decode(i, skip_special_tokens=False), texts)
    # Truncation as transformers does it (the template's tokens kept), for the truncation test.
    with open(os.path.join(folder, "truncated.jsonl"), "w", encoding="utf-8") as f:
        for t in texts[:40]:
            for n in (3, 8):
                tmpl.enable_truncation(max_length=n)
                ids = tmpl.encode(t).ids
                f.write(json.dumps({"text": t, "max_length": n, "ids": ids}, ensure_ascii=False) + "\n")
        tmpl.no_truncation()

    # Byte fallback (a BPE that is not byte-level).
    fb = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=False))
    fb.normalizer = normalizers.NFC()
    fb.pre_tokenizer = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False)
    fb.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = BpeTrainer(vocab_size=1400, special_tokens=["<unk>"] + byte_tokens, limit_alphabet=100,
                         show_progress=False)
    fb.train_from_iterator(training_texts(), trainer=trainer)
    fb.add_special_tokens([AT("<|endoftext|>", special=True, normalized=False)])
    folder = fresh("fallback_bpe")
    def bytes_not_added(j):
        # The <0xXX> pieces stay in the model's vocabulary but are no added tokens (as in Llama's file).
        j["added_tokens"] = [a for a in j["added_tokens"] if not a["content"].startswith("<0x")]

    fb = save_hf(fb, folder, {"eos_token": "<|endoftext|>", "unk_token": "<unk>"}, bytes_not_added)
    write_reference(folder, lambda t: fb.encode(t).ids, lambda i: fb.decode(i, skip_special_tokens=False), texts)

    # A hand-made BPE for the options the trained ones leave unused: ignore_merges (a vocabulary word
    # taken whole although no merge makes it), unk_token with fuse_unk, Split on a String pattern,
    # a Sequence normalizer (NFKC), no decoder (decode joins tokens with spaces).
    vocab = {"<unk>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "bc": 5, "abc": 6, " ": 7, "x": 8}
    tiny = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>", fuse_unk=True,
                                ignore_merges=True))
    tiny.normalizer = normalizers.Sequence([normalizers.NFKC()])
    tiny.pre_tokenizer = pre_tokenizers.Split(" ", behavior="isolated")
    folder = fresh("tiny_bpe")
    tiny = save_hf(tiny, folder, {})
    tiny_texts = ["", "abc", "abcabc", "ab c", "zzz abc", "q", "abc  ab", "\uff42c x", "bcab", "xqqa",
                  "a\u00e9b\u00e9\u00e9c", "abc abcx", "  ", "cba"]
    write_reference(folder, lambda t: tiny.encode(t).ids, lambda i: tiny.decode(i, skip_special_tokens=False),
                    tiny_texts)

    # Llama / Mixtral SentencePiece.
    tmp = os.path.join(OUT, "_spm_train.txt")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(t.replace("\n", " ") for t in training_texts()))
    prefix = os.path.join(OUT, "_spm")
    spm.SentencePieceTrainer.train(
        input=tmp, model_prefix=prefix, model_type="bpe", vocab_size=1200, byte_fallback=True,
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=0, seed_sentencepiece_size=100000,
        num_threads=2, minloglevel=2,
    )
    os.remove(tmp)
    for name, legacy in (("llama_spm", True), ("llama_spm_nolegacy", False)):
        folder = fresh(name)
        shutil.copy(prefix + ".model", os.path.join(folder, "tokenizer.model"))
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                       "legacy": legacy, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                       "pad_token": None}, f, indent=2)
        hf = transformers.AutoTokenizer.from_pretrained(folder)
        write_reference(folder, lambda t: hf.encode(t), lambda i: hf.decode(i, skip_special_tokens=True), texts)
    os.remove(prefix + ".model")
    os.remove(prefix + ".vocab")

    with open(os.path.join(OUT, "SOURCE.txt"), "w") as f:
        f.write(
            "Made by scripts/make_tokenizer_fixtures.py (see its docstring for what each folder holds).\n"
            f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
            f"Python {sys.version.split()[0]}, tokenizers {tokenizers.__version__}, "
            f"transformers {transformers.__version__}, sentencepiece {spm.__version__}\n"
            "Training text: tests/data/wikitext2_tokens/test.txt, tests/data/ag_news/test.csv (title + "
            "description), tests/data/tweet_eval/datasets/emoji/val_text.txt.\n"
            "Reference texts (not trained on): samples of tests/data/wikitext2_tokens/valid.txt, "
            "tweet_eval irony and stance/hillary test texts, glue MRPC dev, superglue RTE val (non-ASCII "
            f"lines preferred, seed {SEED}), multi-line wikitext passages and edge cases built from them, and "
            "200 synthetic mixes of tricky characters.\n"
            "ids: tokenizers' Tokenizer.from_file(tokenizer.json).encode(text).ids (add_special_tokens); "
            "llama_spm*: transformers AutoTokenizer (LlamaTokenizer) .encode(text).\n"
            "decoded: decode(ids, skip_special_tokens=False); llama_spm*: skip_special_tokens=True.\n"
        )
    print(f"{len(texts)} reference texts into {OUT}")


if __name__ == "__main__":
    main()
