"""Check that the installed packages are the versions ``constraints.txt`` pins.

    python launch/check_versions.py                 # CI: every pinned package that is installed
    python launch/check_versions.py --require-all   # the image: every pinned package, installed

Why: the Docker image and CI must run the same megatron-core and eval stack; the image's pip
(NGC's Python) could otherwise resolve other versions without anyone noticing. The Dockerfile
runs this at build time and the Makefile after ``make setup``; it exits 1 naming each package
whose version differs (or, with --require-all, is missing). Standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)")


def read_pins(path: Path) -> dict[str, str]:
    """``name: version`` of every ``name==version`` line (comments and blanks skipped)."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = PIN.match(text)
        if match is None:
            raise ValueError(f"{path}:{number}: expected 'name==version', got {line!r}")
        pins[match.group(1)] = match.group(2)
    return pins


def differences(pins: dict[str, str], require_all: bool) -> list[str]:
    problems = []
    for name, wanted in pins.items():
        try:
            found = metadata.version(name)
        except metadata.PackageNotFoundError:
            if require_all:
                problems.append(f"{name}: not installed (constraints.txt pins {wanted})")
            continue
        if found != wanted:
            problems.append(f"{name}: installed {found}, constraints.txt pins {wanted}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--constraints", type=Path, default=REPO / "constraints.txt")
    p.add_argument("--require-all", action="store_true", help="a missing package is an error")
    args = p.parse_args(argv)
    problems = differences(read_pins(args.constraints), args.require_all)
    for problem in problems:
        print(f"check_versions: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
