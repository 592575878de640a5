"""Give a fresh Megatron optimizer the Adam state a checkpoint load expects.

Why: before its first step a torch ``AdamW`` has no per-parameter state. Megatron-Core 0.16's
``DistributedOptimizer.state_dict()`` (called while building the *load* template) asserts that
every parameter's state carries one common ``step``, and its ``init_state_fn`` creates only the
moments, so resuming into a new process fails on the pure-PyTorch path (no Apex/TE fused Adam;
e.g. CPU). Filling zero moments and ``step = 0`` gives the template the right structure; the
load then overwrites every value. Parameters that already have state are left alone.
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
