"""``python data_prep/tokenize.py --help``: tokenize JSONL into Megatron ``.bin/.idx``.

Why a directory: the command has always been ``python data_prep/tokenize.py``, but a *file*
of that name would shadow the standard library's ``tokenize`` (imported by ``linecache``,
``inspect`` and ``traceback``) for every script run from ``data_prep/``. Python runs a directory
through its ``__main__.py``, and the import system never takes a directory named
``tokenize.py`` for the module ``tokenize``, so the command stays and nothing is shadowed. The
work lives in ``data_prep.tokenize_cli`` and ``data_prep.pipeline``.
"""

import sys

from data_prep.tokenize_cli import main

if __name__ == "__main__":
    sys.exit(main())
