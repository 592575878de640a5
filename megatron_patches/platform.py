"""What this machine offers Megatron's fused kernels, probed once, and the layer spec it implies.

Why a module of its own: a GPU job's throughput depends on libraries that may or may not import
on a given node (Transformer Engine, apex's fused weight-gradient kernel). Before, a CUDA node
without a working TE fell back to the local spec, unfused attention included, without a word:
at micro-batch 8 and sequence 4096 that materialises ~8.6 GB of attention scores per layer, an
out-of-memory error or a several-fold slowdown. Here the probes run in one place, the
configs (``megatron_patches.configs``) read their answers from one :class:`Platform`, and
:func:`resolve_layer_spec` fails, naming the import error and the fix, unless the config asks
for the local spec itself (``model.layer_spec: local``).

``python -m orchestration.train ... --explain`` builds the configs for :data:`GPU_JOB` (a CUDA
node with TE and apex, as in NVIDIA's NGC PyTorch image) so that what a GPU job would give
Megatron can be read on any machine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

#: How to get Transformer Engine, printed with its import error.
TE_FIX = ("install Transformer Engine for this CUDA and torch (NVIDIA's NGC PyTorch container "
          "ships it; else `pip install --no-build-isolation transformer_engine[pytorch]`), or "
          "set model.layer_spec=local to train with Megatron's unfused local modules")


class LayerSpecError(RuntimeError):
    """The config's ``model.layer_spec`` cannot be honoured on this machine."""


@dataclass(frozen=True)
class Platform:
    """The kernels a job can use: CUDA, Transformer Engine (``te_error`` is None when it
    imports), apex's ``fused_weight_gradient_mlp_cuda`` (Megatron's own linear layers, e.g.
    the output layer, need it for ``gradient_accumulation_fusion``). ``assumed``: described
    (for ``--explain``), not probed on this machine."""

    cuda: bool
    te_error: str | None
    fused_wgrad: bool
    assumed: bool = False

    @property
    def transformer_engine(self) -> bool:
        return self.te_error is None

    def describe(self) -> str:
        te = "imports" if self.transformer_engine else f"does not import ({self.te_error})"
        source = "assumed GPU job (NGC image)" if self.assumed else "probed on this machine"
        return (f"{source}: CUDA {'yes' if self.cuda else 'no'}; Transformer Engine {te}; "
                f"apex fused wgrad {'yes' if self.fused_wgrad else 'no'}")


#: A CUDA node with Transformer Engine and apex, as in NVIDIA's NGC PyTorch containers.
GPU_JOB = Platform(cuda=True, te_error=None, fused_wgrad=True, assumed=True)


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def transformer_engine_import_error() -> str | None:
    """None when Transformer Engine and Megatron's TE extension import, else the error."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te  # noqa: F401
    except Exception as err:  # TE raises assorted errors (OSError for missing CUDA libraries)
        return f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return None


def fused_wgrad_available() -> bool:
    """Megatron's own flag: its ``ColumnParallelLinear`` raises with gradient accumulation
    fusion when apex's ``fused_weight_gradient_mlp_cuda`` did not import."""
    from megatron.core.tensor_parallel import layers

    return bool(layers._grad_accum_fusion_available)


def probe_platform(on_cpu: bool) -> Platform:
    """This process's platform. A CPU run (no CUDA, or ``runtime.device=cpu``) uses no CUDA
    kernel whatever is installed, so TE is not even imported."""
    if on_cpu:
        return Platform(cuda=False, te_error="not used on CPU", fused_wgrad=False)
    return Platform(cuda=cuda_present(), te_error=transformer_engine_import_error(),
                    fused_wgrad=fused_wgrad_available())


def resolve_layer_spec(requested: str, platform: Platform) -> str:
    """``te`` or ``local`` for ``model.layer_spec`` (``auto``: TE on CUDA, local on CPU).

    CUDA without an importable TE is an error unless ``local`` was asked for explicitly.
    """
    if requested == "local":
        return "local"
    if requested == "auto" and not platform.cuda:
        return "local"
    if not platform.transformer_engine:
        where = "CUDA is present but" if platform.cuda else "model.layer_spec=te but"
        raise LayerSpecError(
            f"{where} Transformer Engine does not import ({platform.te_error}); without it "
            f"attention would run unfused (the S x S scores in memory: out of memory or "
            f"several times slower). Fix: {TE_FIX}.")
    return "te"
