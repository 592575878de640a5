"""Expand SLURM's compressed host lists without ``scontrol``: ``node[01-04,07],gpu5``.

launch/common.sh uses ``scontrol show hostnames`` when it exists and this otherwise (inside a
container, on a laptop, in tests). Standard library only (and ``orchestration.cluster`` imports
nothing heavy), so any ``python3`` in the checkout can run it:
``python3 -m orchestration.cluster.nodelist 'node[01-04,07],gpu5'`` prints one host per line.

Handled: comma-separated items; bracket groups with single numbers and ``a-b`` ranges, zero
padded to the width of the range start (``[08-11]`` -> 08 09 10 11); text before and after a
bracket (``rack1-n[1-2]-ib``); several bracket groups in one item (their cartesian product, as
SLURM does). Not handled: ``a-b:step`` strides, which SLURM does not emit for node lists.
"""

from __future__ import annotations

import itertools
import re
import sys

_TOKEN = re.compile(r"\[([^\]]*)\]|([^\[\]]+)")


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {nodelist!r}")
        elif ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '[' in node list {nodelist!r}")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_range(spec: str) -> list[str]:
    """``01-04,07`` -> ['01', '02', '03', '04', '07'] (width of each start kept)."""
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {part!r} in [{spec}]")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {part!r} in [{spec}]")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def _expand_item(item: str) -> list[str]:
    pieces: list[list[str]] = []
    for bracket, literal in _TOKEN.findall(item):
        pieces.append([literal] if literal else _expand_range(bracket))
    return ["".join(parts) for parts in itertools.product(*pieces)]


def expand_nodelist(nodelist: str) -> list[str]:
    """All host names of a SLURM node list, in SLURM's order (duplicates kept)."""
    return [host for item in _split_top_level(nodelist) for host in _expand_item(item)]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 -m orchestration.cluster.nodelist NODELIST   (e.g. 'node[01-04,07],gpu5')", file=sys.stderr)
        return 2
    try:
        hosts = expand_nodelist(argv[0])
    except ValueError as exc:
        print(f"nodelist: {exc}", file=sys.stderr)
        return 1
    print("\n".join(hosts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
