#!/usr/bin/env python3
"""Rebuilds assets/demo/data from the real samples in tests/data (run from the repository root).

The demo data root mirrors how `hf download --repo-type dataset --local-dir DIR/<org>/<name>` lays
out Hub dataset repos (DIR/<org>/<name>/<config>/<split>...), holding real rows in the formats they are published
in (GLUE TSV, SuperGLUE JSON Lines, AG News CSV, TweetEval text, WikiText text, Hub Parquet), some
compressed, so the built-in demo exercises every reader. Needs only the standard library and the
`zstd` command.
"""
import gzip
import pathlib
import shutil
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[2]
SRC = REPO / "tests/data"
OUT = REPO / "assets/demo/data"


def head_lines(src, dst, n, keep_header=False):
    lines = src.read_bytes().split(b"\n")
    take = lines[: n + (1 if keep_header else 0)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(b"\n".join(take) + b"\n")


def copy(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def source(repo_dir, text):
    (OUT / repo_dir / "SOURCE.txt").write_text(text.strip() + "\n")


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    glue = "nyu-mll/glue"
    copy(SRC / "glue/MRPC/dev.tsv", OUT / glue / "mrpc/validation.tsv")
    head_lines(SRC / "glue/QNLI/dev.tsv", OUT / glue / "qnli/validation.tsv", 600, keep_header=True)
    head_lines(SRC / "glue/STS-B/dev.tsv", OUT / glue / "stsb/validation.tsv", 600, keep_header=True)
    copy(SRC / "parquet/sst2/validation-00000-of-00001.parquet",
         OUT / glue / "sst2/validation-00000-of-00001.parquet")
    rte = OUT / glue / "rte/validation.jsonl.gz"
    rte.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(rte, "wb", mtime=0) as f:
        f.write((SRC / "superglue_rte/val.jsonl").read_bytes())
    source(glue, """
Real GLUE validation rows, from tests/data (see tests/data/glue/SOURCE.txt for origin and licences):
mrpc/validation.tsv  - GLUE MRPC dev.tsv as published (UTF-8 BOM, header '#1 String', '#2 String'), 408 rows
qnli/validation.tsv  - the first 600 rows of GLUE QNLI dev.tsv (header index question sentence label)
stsb/validation.tsv  - the first 600 rows of GLUE STS-B dev.tsv (header ... sentence1 sentence2 score)
sst2/validation-00000-of-00001.parquet - the 872 SST-2 dev sentences as Parquet (tests/data/parquet/sst2;
                       SST: research use; tokenized, lowercased text of the stsa.binary release)
rte/validation.jsonl.gz - RTE dev (277 rows, SuperGLUE JSON Lines premise/hypothesis, same examples as GLUE
                       RTE dev), gzip-compressed; tests/data/superglue_rte/val.jsonl, repo licence Apache-2.0
""")
    sg = "aps/super_glue"
    copy(SRC / "parquet/super_glue-cb/validation.zstd-rg64.parquet",
         OUT / sg / "cb/validation-00000-of-00001.parquet")
    copy(SRC / "parquet/super_glue-rte/validation.gzip-plain-v2.parquet",
         OUT / sg / "rte/validation-00000-of-00001.parquet")
    source(sg, """
Real SuperGLUE validation rows as Parquet written by pyarrow (tests/data/parquet, see its SOURCE.txt):
cb/  - CommitmentBank dev, 56 rows (zstd, 64-row row groups); rte/ - RTE dev, 277 rows (gzip, data page v2).
Licences: those of the source samples (tests/data/superglue_cb, superglue_rte: repo Apache-2.0, research use).
""")
    head_lines(SRC / "ag_news/test.csv", OUT / "fancyzhx/ag_news/data/test.csv", 600)
    source("fancyzhx/ag_news", """
The first 600 rows of the AG News test set in the original ag_news_csv format (no header:
"class","title","description"), from tests/data/ag_news/test.csv (torchtext, BSD-3-Clause;
AG's corpus: non-commercial research/educational use).
""")
    copy(SRC / "tweet_eval/datasets/emotion/val_text.txt",
         OUT / "cardiffnlp/tweet_eval/emotion/validation.txt")
    source("cardiffnlp/tweet_eval", """
TweetEval emotion validation tweets (374, one per line), the original release's val_text.txt, from
tests/data/tweet_eval (cardiffnlp/tweeteval; released without restrictions, Twitter terms may apply).
""")
    wiki = OUT / "Salesforce/wikitext/wikitext-2-raw-v1/validation.txt"
    head_lines(SRC / "wikitext2_tokens/valid.txt", wiki, 900)
    subprocess.run(["zstd", "-q", "-19", "--rm", str(wiki)], check=True)
    source("Salesforce/wikitext", """
The first 900 lines of WikiText-2 valid (tokenized variant wiki.valid.tokens; the raw variant was not
available), zstd-compressed, from tests/data/wikitext2_tokens (pytorch/examples, BSD-3-Clause;
WikiText: CC BY-SA 3.0). Read one paragraph per line like the Hub's wikitext-2-raw-v1.
""")


if __name__ == "__main__":
    main()
