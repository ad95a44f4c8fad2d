"""Progress bars for long Python work (analyze, speculate, export): tqdm when it is installed and
stderr is a terminal or the caller forces it; otherwise nothing (the commands print their own
summary lines). One place decides, so every command behaves the same."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def bar(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "shard",
        enabled: bool = True) -> Iterator[T]:
    """Wraps `items` in a tqdm bar on stderr when enabled, tqdm is importable and stderr is a TTY."""
    if enabled and sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return iter(items)
        return iter(tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False))
    return iter(items)
