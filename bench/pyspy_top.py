"""Summarize py-spy collapsed-stack profiles (``py-spy record --format raw``).

Prints the functions with the most samples, inclusive (the function is anywhere on the
stack) and self (the function is on top), as a share of all samples. Several files are
added together, e.g. the profiles of two workers of one run::

    python -m bench.pyspy_top /tmp/prof/oao-wide-p1-r0-w0.txt --top 25
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

_LINE_NO = re.compile(r":\d+\)$")


def frame_name(frame: str, with_line: bool) -> str:
    """``func (path/file.py:12)`` → ``func (path/file.py)`` unless ``with_line``."""
    return frame if with_line else _LINE_NO.sub(")", frame)


def load(paths: list[Path], with_line: bool = False) -> tuple[int, Counter[str], Counter[str]]:
    """``(total samples, inclusive counts, self counts)`` over the collapsed files."""
    total = 0
    incl: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_s = line.rpartition(" ")
            if not stack or not count_s.isdigit():
                continue
            count = int(count_s)
            frames = [frame_name(f, with_line) for f in stack.split(";")]
            total += count
            for f in set(frames):
                incl[f] += count
            own[frames[-1]] += count
    return total, incl, own


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pyspy_top", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="collapsed-stack files from py-spy --format raw")
    p.add_argument("--top", type=int, default=20, help="rows per table (default 20)")
    p.add_argument("--lines", action="store_true", help="keep line numbers (one row per line)")
    p.add_argument("--match", default="", help="inclusive table: only frames containing this text")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = p.parse_args(argv)
    total, incl, own = load(args.files, args.lines)
    if total == 0:
        print("no samples", file=sys.stderr)
        return 1
    inc_rows = [(f, n) for f, n in incl.most_common() if args.match in f][: args.top]
    self_rows = own.most_common(args.top)
    if args.json:
        print(
            json.dumps(
                {
                    "samples": total,
                    "inclusive": [{"frame": f, "share": n / total} for f, n in inc_rows],
                    "self": [{"frame": f, "share": n / total} for f, n in self_rows],
                },
                indent=2,
            )
        )
        return 0
    print(f"{total} samples (non-idle) in {len(args.files)} file(s)\n")
    print("inclusive  frame")
    for f, n in inc_rows:
        print(f"{100 * n / total:8.1f}%  {f}")
    print("\nself       frame")
    for f, n in self_rows:
        print(f"{100 * n / total:8.1f}%  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
