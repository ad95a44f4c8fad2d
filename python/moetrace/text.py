"""Token text beside token ids: the store's SentencePiece tokenizer, found from its manifest.

Where the tokenizer comes from, first match wins:
  1. `tokenizer=` given by the caller (a spiece.model path), or $MOETRACE_TOKENIZER;
  2. spiece.model in the model directory the store was collected with (manifest.model.files);
  3. for the demo and random:switch-base-N models (manifest.model.demo), assets/demo/spiece.model of
     the moetrace checkout this package runs from.
A candidate whose SHA-256 differs from manifest.model.tokenizer_sha256 (when recorded) is skipped.
Decoding needs the optional `sentencepiece` package (pip install sentencepiece, or
moetrace[analysis]); without it, or without a tokenizer file, callers show ids only and say why.
"""

from __future__ import annotations

import hashlib
import os

_DEMO_SPIECE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "assets", "demo",
                            "spiece.model")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_dir_of(manifest: dict, store_dir: str = "") -> str | None:
    """The model directory the store was collected with: manifest.model's files (paths as collect saw
    them: absolute, or relative to where it ran; tried from here, then from the store's directory)."""
    model = manifest.get("model") or {}
    cands = [model.get(k) for k in ("dir", "path")]
    cands += [os.path.dirname(f.get("path", "") if isinstance(f, dict) else str(f))
              for f in model.get("files") or []]
    for c in cands:
        if not c:
            continue
        for d in (c, os.path.join(store_dir, c)):
            if os.path.isfile(os.path.join(d, "config.json")):
                return d
    return None


class Tokenizer:
    """Decodes ids to pieces with sentencepiece. `reason` says why decoding is off (sp is None)."""

    def __init__(self, sp=None, path: str | None = None, reason: str = ""):
        self.sp, self.path, self.reason = sp, path, reason

    def __bool__(self) -> bool:
        return self.sp is not None

    def pieces(self, ids) -> list[str]:
        """One piece per id ('▁the', '</s>'), or [] when decoding is off."""
        if self.sp is None:
            return []
        n = self.sp.get_piece_size()
        return [self.sp.id_to_piece(int(i)) if 0 <= int(i) < n else f"<{int(i)}>" for i in ids]

    def decode(self, ids) -> str:
        if self.sp is None:
            return ""
        n = self.sp.get_piece_size()
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < n])


def tokenizer_for(store, tokenizer: str | None = None) -> Tokenizer:
    """The store's tokenizer (see the module docstring), or a Tokenizer whose reason says why not."""
    m = store.manifest
    model = m.get("model") or {}
    want = model.get("tokenizer_sha256") or ""
    cands = [tokenizer or os.environ.get("MOETRACE_TOKENIZER")]
    d = model_dir_of(m, getattr(store, "path", ""))
    if d:
        cands.append(os.path.join(d, "spiece.model"))
    if model.get("demo"):
        cands.append(os.path.normpath(_DEMO_SPIECE))
    found = None
    for c in cands:
        if c and os.path.isfile(c) and (not want or c == tokenizer or _sha256(c) == want):
            found = c
            break
    if found is None:
        return Tokenizer(reason="token ids only: the store's tokenizer (spiece.model) was not found "
                                "(pass --tokenizer PATH or set MOETRACE_TOKENIZER)")
    try:
        import sentencepiece
    except ImportError:
        return Tokenizer(path=found, reason="token ids only: install the `sentencepiece` package to show "
                                            "token text (pip install sentencepiece)")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(found)
    except (OSError, RuntimeError) as e:
        return Tokenizer(path=found, reason=f"token ids only: {found}: cannot load ({e})")
    return Tokenizer(sp, found)
