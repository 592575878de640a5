"""Callbacks by name, built from config, as OLMo-core's ``TrainerConfig.with_callback`` does.

A run gets the :data:`DEFAULTS`; ``callbacks:`` in the run config adds or configures more by
registered name or ``module:Class`` path, each with its keyword options, and ``null`` removes
one::

    callbacks:
      grad_stats: {every: 100}                      # registered with register_callback
      my_project.callbacks:GradNoiseScale: {window: 64}
      samples: null                                 # no sample gallery

Each class builds itself with ``from_config(context, **options)`` (the base class passes the
options to ``__init__``); returning None leaves it out (e.g. samples with no prompts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestration.callbacks.base import Callback
from orchestration.common.imports import import_object
from orchestration.config import ConfigError, RunConfig

_REGISTRY: dict[str, str] = {
    "skipping": "orchestration.callbacks.skipping:SkipBatchesCallback",
    "metrics": "orchestration.callbacks.metrics:MetricsCallback",
    "eval": "orchestration.callbacks.evaluation:EvalCallback",
    "samples": "orchestration.callbacks.samples:SampleGalleryCallback",
    "checkpoint": "orchestration.callbacks.checkpointing:CheckpointCallback",
    "preemption": "orchestration.callbacks.preemption:PreemptionCallback",
    "lm_eval": "orchestration.callbacks.lm_eval:LmEvalCallback",  # not a default: needs tasks
}
DEFAULTS = ("skipping", "metrics", "eval", "samples", "checkpoint", "preemption")


@dataclass
class CallbackContext:
    """What a callback may need to build itself: the config and the run's shared services."""

    cfg: RunConfig
    logger: Any  # orchestration.metrics.logger.MetricsLogger (shared by all callbacks)
    is_main: bool
    world_size: int
    on_cpu: bool


def register_callback(name: str, target: str | type[Callback]) -> None:
    """Make ``name`` usable in ``callbacks:``; ``target`` is a class or ``module:Class``."""
    if isinstance(target, type):
        target = f"{target.__module__}:{target.__qualname__}"
    _REGISTRY[name] = target


def resolve(name: str) -> type[Callback]:
    """The class a ``callbacks:`` key names: a registered name or ``module:Class``."""
    target = _REGISTRY.get(name, name)
    if ":" not in target:
        raise ConfigError(f"callbacks.{name}: not a registered callback ({sorted(_REGISTRY)}) "
                          "nor a 'module:Class' path")
    try:
        cls = import_object(target)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"callbacks.{name}: cannot import {target} ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise ConfigError(f"callbacks.{name}: {target} is not a Callback subclass")
    return cls


def requested_callbacks(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """Name -> options: the defaults, then ``cfg.callbacks`` in order (None removes one)."""
    requested: dict[str, dict[str, Any]] = {name: {} for name in DEFAULTS}
    for name, options in (cfg.callbacks or {}).items():
        if options is None:
            requested.pop(name, None)
        elif isinstance(options, dict):
            requested[name] = {**requested.get(name, {}), **options}
        else:
            raise ConfigError(f"callbacks.{name}: expected a mapping of options or null, "
                              f"got {options!r}")
    return requested


def build_callbacks(context: CallbackContext) -> list[Callback]:
    """Instantiate every requested callback (fails, naming the key, before training)."""
    callbacks = []
    for name, options in requested_callbacks(context.cfg).items():
        cls = resolve(name)
        try:
            callback = cls.from_config(context, **options)
        except TypeError as err:
            raise ConfigError(f"callbacks.{name}: {err}") from err
        if callback is not None:
            callbacks.append(callback)
    return callbacks
