"""Make Megatron's distributed-optimizer checkpoints round-trip with PyTorch's own AdamW.

Both fixes apply only on the pure-PyTorch path (no Apex/TE fused Adam, e.g. CPU).

1. Why :func:`ensure_adam_state`: before its first step a torch ``AdamW`` has no per-parameter state. Megatron-Core 0.16's
``DistributedOptimizer.state_dict()`` (called while building the *load* template) asserts that
every parameter's state carries one common ``step``, and its ``init_state_fn`` creates only the
moments, so resuming into a new process fails on the pure-PyTorch path (no Apex/TE fused Adam;
e.g. CPU). Filling zero moments and ``step = 0`` gives the template the right structure; the
load then overwrites every value. Parameters that already have state are left alone.

2. Why :func:`restore_adam_steps`: ``DistributedOptimizer.load_state_dict`` gives every
parameter the *same* ``step`` tensor, and its dp-reshardable parameter-state load then copies a
stale count into it. ``torch.optim.AdamW`` (foreach) increments each parameter's step in place,
so a shared counter advances once per parameter per update, and a wrong count skews Adam's bias
correction from the first step after a resume. We set one fresh counter per parameter from the
count saved in the checkpoint's param groups.
Both are covered by ``tests/test_training.py::test_resume_reproduces_uninterrupted_run``.
"""

from __future__ import annotations

import torch


def ensure_adam_state(optimizer) -> None:
    """Initialise empty Adam state (moments and step) in every sub-optimizer of ``optimizer``."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format)


def restore_adam_steps(optimizer, loaded_state: dict) -> None:
    """Give each parameter its own ``step`` tensor holding the saved update count."""
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    per_sub = [loaded_state] if len(subs) == 1 else [loaded_state[i] for i in range(len(subs))]
    for sub, saved in zip(subs, per_sub, strict=True):
        inner = getattr(sub, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        step = _saved_step(saved)
        for state in inner.state.values():
            if step is not None:
                state["step"] = torch.tensor(float(step))
            elif isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _saved_step(saved: dict) -> float | None:
    """The update count Megatron stores in the saved param groups (non-Apex format)."""
    groups = saved.get("optimizer", {}).get("param_groups", []) if isinstance(saved, dict) else []
    steps = {g["step"] for g in groups if "step" in g}
    return steps.pop() if len(steps) == 1 else None
