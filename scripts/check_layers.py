#!/usr/bin/env python3
"""Checks that the C++ tree's #include arrows are the ones README.md allows.

Reads the "| folder | may include |" table of README.md's Layout section, then every
`#include "area/..."` in the source files under each folder (the first path component names the
area: core, kernels, io, ...), and prints one line per include the table does not allow. Exit 1 if
there is any, so the test run fails on a wrong arrow; an include of a file beside the includer (no
slash) is always allowed.

Also: `MOETRACE_WITH_CUDA` (whether the build has the GPU engine) appears in one source file only,
src/engine/engine.cc (make_engine); everything else asks the Engine interface.
"""
import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SOURCE_EXT = (".h", ".cc", ".cu", ".cuh")
CUDA_SWITCH = os.path.join("src", "engine", "engine.cc")


def allowed_table(readme: str) -> dict:
    rows = {}
    for line in open(readme, encoding="utf-8"):
        m = re.match(r"^\|\s*((?:src|tools|include)/[\w/]+)\s*\|\s*([\w ,]+?)\s*\|\s*$", line)
        if m:
            rows[m.group(1)] = {a.strip() for a in m.group(2).split(",") if a.strip()}
    return rows


def main() -> int:
    global ROOT
    if len(sys.argv) > 1:  # another tree (the tests check the checker on a copy)
        ROOT = os.path.abspath(sys.argv[1])
    table = allowed_table(os.path.join(ROOT, "README.md"))
    if not table:
        print("check_layers: README.md has no '| folder | may include |' table", file=sys.stderr)
        return 1
    problems, checked = [], 0
    for folder, allowed in sorted(table.items()):
        base = os.path.join(ROOT, folder)
        if not os.path.isdir(base):
            problems.append(f"{folder}: listed in README.md but not in the tree")
            continue
        for dirpath, _, files in os.walk(base):
            for name in sorted(files):
                if not name.endswith(SOURCE_EXT):
                    continue
                path = os.path.join(dirpath, name)
                for no, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
                    m = re.match(r'\s*#\s*include\s+"([^"]+)"', line)
                    if not m or "/" not in m.group(1):
                        continue
                    checked += 1
                    area = m.group(1).split("/")[0]
                    if area not in allowed:
                        rel = os.path.relpath(path, ROOT)
                        problems.append(f"{rel}:{no}: includes \"{m.group(1)}\": {folder} may include only "
                                        f"{', '.join(sorted(allowed))} (README.md, Layout)")
    # The one place that knows whether CUDA is built in.
    for top in ("src", "tools", "include"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, ROOT)
                if not name.endswith(SOURCE_EXT) or rel == CUDA_SWITCH:
                    continue
                for no, line in enumerate(open(path, encoding="utf-8", errors="replace"), 1):
                    if "MOETRACE_WITH_CUDA" in line:
                        problems.append(f"{rel}:{no}: mentions MOETRACE_WITH_CUDA: only {CUDA_SWITCH} "
                                        f"knows whether CUDA is built in (make_engine)")
    # Every source folder must be in the table, so that a new one cannot escape the check.
    for top in ("src",):
        for area in sorted(os.listdir(os.path.join(ROOT, top))):
            if os.path.isdir(os.path.join(ROOT, top, area)) and f"{top}/{area}" not in table:
                problems.append(f"{top}/{area}: not in README.md's dependency table")
    for p in problems:
        print(f"check_layers: {p}", file=sys.stderr)
    if problems:
        return 1
    print(f"check_layers: ok ({checked} includes in {len(table)} folders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
