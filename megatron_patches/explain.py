"""What Megatron-Core receives for a GPU job, built and printed on any machine.

Why: the GPU path's throughput settings (fusions, overlaps, recompute, fp8, the layer spec)
are decided from the config *and* the machine, so on a laptop or a login node nobody could see
what a GPU job would actually give Megatron. :func:`gpu_job_configs` builds the exact objects
``build_megatron_configs`` builds on a CUDA node with Transformer Engine and apex
(:data:`~megatron_patches.platform.GPU_JOB`, NVIDIA's NGC image), and :func:`explain` prints
them: every field that differs from Megatron-Core's defaults, the decisions with their reasons,
and the decoder-layer spec. ``python -m orchestration.train experiment=X --explain``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from megatron_patches.configs import MegatronConfigs, build_megatron_configs
from megatron_patches.llama_spec import TE_SPEC_MODULES, describe_spec, local_llama_layer_spec
from megatron_patches.platform import GPU_JOB, Platform, transformer_engine_import_error
from orchestration.config import RunConfig, validate

_UNSET = object()


def gpu_job_configs(cfg: RunConfig, platform: Platform = GPU_JOB) -> MegatronConfigs:
    """Megatron's configs for ``cfg`` as a job on ``platform`` (default: a CUDA node with TE)."""
    validate(cfg)
    return build_megatron_configs(cfg, on_cpu=not platform.cuda, platform=platform)


def non_default_fields(obj: Any) -> dict[str, Any]:
    """``{field: value}`` of a config dataclass where the value differs from its default
    (callables by name; hooks Megatron's runtime fills in are left out)."""
    out = {}
    for f in dataclasses.fields(obj):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else _UNSET)
        value = getattr(obj, f.name, _UNSET)
        if value is _UNSET or _same(value, default) or f.name.endswith("_func") and value \
                and f.name != "activation_func":
            continue
        out[f.name] = _show(value)
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # tensors, partials
        return a is b


def _show(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name
    if callable(value) and not isinstance(value, type):
        inner = getattr(value, "func", value)  # functools.partial
        return getattr(inner, "__qualname__", repr(inner))
    return value


def layer_spec_modules(mc: MegatronConfigs) -> tuple[dict[str, str], str]:
    """The decoder layer's modules and where the names come from."""
    if mc.layer_spec == "local":
        return describe_spec(local_llama_layer_spec()), "local spec (megatron_patches/llama_spec.py)"
    if transformer_engine_import_error() is None:
        from megatron_patches.llama_spec import llama_layer_spec

        return describe_spec(llama_layer_spec("te")), "TE spec, built here"
    return dict(TE_SPEC_MODULES), ("TE spec (get_gpt_layer_with_transformer_engine_spec); "
                                   "Transformer Engine is not installed here, so its modules "
                                   "are named from megatron_patches.llama_spec.TE_SPEC_MODULES")


def explain(cfg: RunConfig, platform: Platform = GPU_JOB) -> str:
    """The report ``--explain`` prints."""
    mc = gpu_job_configs(cfg, platform)
    lines = [f"run {cfg.name}: what Megatron-Core receives, {platform.describe()}",
             f"precision {mc.precision}; padded vocabulary {mc.padded_vocab_size} "
             f"(TP {cfg.parallel.tensor}); layer spec {mc.layer_spec}", "",
             "GPU-path decisions (megatron_patches.configs.gpu_defaults):"]
    lines += [f"  {key:<32} {why}" for key, why in mc.gpu_path.reasons.items()]
    for title, obj in (("TransformerConfig", mc.transformer),
                       ("DistributedDataParallelConfig", mc.ddp),
                       ("OptimizerConfig", mc.optimizer)):
        lines += ["", f"{title} (fields that differ from Megatron-Core's defaults):"]
        lines += [f"  {k} = {v!r}" for k, v in sorted(non_default_fields(obj).items())]
    modules, source = layer_spec_modules(mc)
    lines += ["", f"decoder layer: {source}"]
    lines += [f"  {k:<32} {v}" for k, v in modules.items()]
    return "\n".join(lines)
