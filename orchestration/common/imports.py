"""Objects named in config as ``module:attribute`` (callbacks, a data mix's prepare hook)."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(target: str) -> Any:
    """The attribute ``attr`` of module ``module`` for ``"module:attr"``; ImportError or
    AttributeError (with the reason) when it cannot be had."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ImportError(f"{target!r} is not a 'module:attribute' path")
    return getattr(importlib.import_module(module_name), attr)
