"""``python -m orchestration.gallery RUN_DIR [--out SITE] [--screenshots DIR]``

Write a run's gallery: a static site that opens from disk with no server and no internet
(``SITE/index.html``; default ``<run_dir>/gallery``). Views: the training curves (train and
held-out loss per source, LR, grad norm, tokens/s, with stage starts, skipped and deferred
batches marked), the evaluation gallery (each lm-eval task's metrics across checkpoints with
stderr bars; checkpoint A against B as a table), the prompt gallery (curated prompts by
category, A's and B's answers side by side), each stage's data mix, and the run record with
links to the metrics log and the data sequence.

Fill it first: ``python -m orchestration.evaluate --all-checkpoints RUN_DIR --tasks ...`` and
``python -m orchestration.prompts RUN_DIR``. ``--screenshots DIR`` also saves a PNG of each
view, taken in headless chromium (needs Debian's ``chromium`` and ``chromium-driver`` and the
``selenium`` package).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestration.common.quiet import install_warning_filters
from orchestration.release.prompts import DEFAULT_PROMPTS
from orchestration.release.site import build_site


def main(argv: list[str] | None = None) -> int:
    install_warning_filters()  # before anything imports megatron-core
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="site folder (default: <run_dir>/gallery)")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS,
                   help="the prompt set whose order the prompt gallery follows")
    p.add_argument("--data-sequence", type=Path, action="append", metavar="FILE",
                   help="a data-sequence file to link (repeatable; default: the run dir's "
                        "data_sequence*, as written by python -m orchestration.data_sequence "
                        "RUN_DIR --output RUN_DIR/data_sequence.jsonl)")
    p.add_argument("--screenshots", type=Path, metavar="DIR",
                   help="save <view>.png of each view, rendered in headless chromium")
    args = p.parse_args(argv)
    try:
        index = build_site(args.run_dir, args.out or args.run_dir / "gallery", args.prompts,
                           args.data_sequence)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"gallery: {index}")
    if args.screenshots:
        from orchestration.release.browser import Browser

        with Browser() as browser:
            page = browser.open(index)
            for path in page.screenshot_views(args.screenshots):
                print(f"screenshot: {path}")
            if page.errors():
                print(f"error: the page logged errors: {page.errors()}", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
