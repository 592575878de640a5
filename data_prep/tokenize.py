"""Tokenize JSONL into Megatron ``.bin/.idx``: ``python data_prep/tokenize.py --help``.

This file is only an entry point; the work lives in ``data_prep.tokenize_cli`` and
``data_prep.pipeline``. Run as a script, Python puts ``data_prep/`` first on ``sys.path``, where
this file would shadow the standard library's ``tokenize`` (imported by ``linecache``,
``inspect`` and ``traceback``). So, before anything else, the script's own directory is taken off
``sys.path`` and the repository root put on it.
"""

import os as _os
import sys as _sys

if __name__ == "__main__" and not __package__:
    _here = _os.path.dirname(_os.path.abspath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _here]
    _sys.path.insert(0, _os.path.dirname(_here))

from data_prep.tokenize_cli import main  # noqa: E402

if __name__ == "__main__":
    _sys.exit(main())
