"""Turn a :class:`RunConfig` into Megatron-Core's config objects, in one place.

Everything Megatron needs to know about a run (architecture, parallel layout, precision, fused
kernels, optimizer, DDP buckets) is decided here from the typed schema, so a reader can see the
whole mapping at once and no other module interprets raw config for Megatron.

The GPU path's throughput settings (fusions, communication overlap) are decided by one
function, :func:`gpu_defaults`, from the config and the :class:`~megatron_patches.platform.
Platform` (what this machine's CUDA, Transformer Engine and apex offer): Megatron-LM's and
Megatron-Bridge's high-MFU defaults where the kernel exists, all off on CPU.
``python -m orchestration.train ... --explain`` prints the result for a GPU job on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer import TransformerConfig

from megatron_patches.platform import Platform, probe_platform, resolve_layer_spec
from orchestration.config import ConfigError, OptimConfig, RunConfig, padded_vocab_size

#: ``train.precision`` values to torch dtypes (``auto`` is resolved first).
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

#: TransformerConfig fields whose ``__post_init__`` imports the kernel library (TE's fused
#: RoPE). For an *assumed* platform (``--explain`` without a GPU) they are set after
#: construction, so the printed config is the GPU job's; a real job constructs them normally.
LIBRARY_CHECKED_FIELDS = ("apply_rope_fusion",)


@dataclass(frozen=True)
class GpuPath:
    """The throughput settings of one job, each with why it is on or off."""

    jit_fusions: bool  # bias+activation, bias+dropout, masked softmax, persistent layer norm
    rope_fusion: bool
    grad_accum_fusion: bool
    cross_entropy_fusion: bool
    cross_entropy_impl: str
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    align_param_gather: bool
    reasons: dict[str, str] = field(default_factory=dict)


@dataclass
class MegatronConfigs:
    """What ``build_megatron_configs`` returns: Megatron's configs plus GPTModel's arguments."""

    transformer: TransformerConfig
    optimizer: OptimizerConfig
    ddp: DistributedDataParallelConfig
    padded_vocab_size: int
    precision: str
    on_cpu: bool
    layer_spec: str = "local"  # te | local, resolved from model.layer_spec
    platform: Platform | None = None
    gpu_path: GpuPath | None = None


def resolve_precision(precision: str, on_cpu: bool) -> str:
    """``auto`` is bf16 on GPUs and fp32 on CPU (where bf16 matmuls are slow and inexact)."""
    if precision != "auto":
        return precision
    return "fp32" if on_cpu else "bf16"


def _setting(key: str, requested: bool | None, available: bool, missing: str,
             reasons: dict[str, str], default: bool | None = None) -> bool:
    """``requested``, or when null ``default`` (itself defaulting to ``available``); asking for
    what the platform lacks is an error."""
    if requested is True and not available:
        raise ConfigError(f"{key}=true but {missing}")
    default = available if default is None else default and available
    on = default if requested is None else requested
    how = "set in the config" if requested is not None else (
        "default on a GPU job" if on else missing)
    reasons[key] = f"{'on' if on else 'off'} ({how})"
    return on


def gpu_defaults(cfg: RunConfig, platform: Platform, layer_spec: str) -> GpuPath:
    """The one place the GPU path's fusions and overlaps are decided (all off on CPU)."""
    f, p, cuda, te = cfg.fusions, cfg.parallel, platform.cuda, platform.transformer_engine
    why: dict[str, str] = {}
    no_cuda = "no CUDA (CPU run)"
    rope = _setting("fusions.rope", f.rope, cuda and te and cfg.model.position_embedding == "rope",
                    no_cuda if not cuda else "needs Transformer Engine and RoPE", why)
    wgrad = _setting("fusions.gradient_accumulation", f.gradient_accumulation,
                     cuda and platform.fused_wgrad, no_cuda if not cuda else
                     "apex's fused_weight_gradient_mlp_cuda does not import (Megatron's "
                     "ColumnParallelLinear output layer needs it)", why)
    ce_ok = cuda and (te or f.cross_entropy_impl == "native")
    ce = _setting("fusions.cross_entropy", f.cross_entropy, ce_ok,
                  no_cuda if not cuda else "impl te needs Transformer Engine", why)
    # The overlaps are communication scheduling, not kernels: they run on gloo too (tested on
    # CPU), but are a GPU job's default only.
    grad_overlap = _setting("parallel.overlap_grad_reduce", p.overlap_grad_reduce, True, no_cuda,
                            why, default=cuda)
    gather_ok = p.distributed_optimizer and grad_overlap
    gather = _setting("parallel.overlap_param_gather", p.overlap_param_gather, gather_ok,
                      no_cuda if gather_ok else "needs the distributed optimizer and "
                      "overlap_grad_reduce", why, default=cuda)
    # Only the interleaved (virtual-pipeline) schedule launches aligned gathers; elsewhere the
    # forward hooks would wait on each bucket unoverlapped, so Megatron-LM turns it off there
    # and on (its default) with interleaving.
    interleaved = p.virtual_pipeline > 1
    align = _setting("parallel.align_param_gather", p.align_param_gather,
                     interleaved and gather, "needs the interleaved (virtual pipeline) schedule "
                     "and overlap_param_gather", why, default=cuda)
    why["jit fusions"] = "on (CUDA)" if cuda else f"off ({no_cuda})"
    why["layer spec"] = layer_spec
    return GpuPath(jit_fusions=cuda, rope_fusion=rope, grad_accum_fusion=wgrad,
                   cross_entropy_fusion=ce, cross_entropy_impl=f.cross_entropy_impl,
                   overlap_grad_reduce=grad_overlap, overlap_param_gather=gather,
                   align_param_gather=align, reasons=why)


def build_megatron_configs(cfg: RunConfig, on_cpu: bool,
                           platform: Platform | None = None) -> MegatronConfigs:
    """Megatron's configs for ``cfg`` on ``platform`` (default: probed for this process).

    Raises ``LayerSpecError`` when CUDA is present but Transformer Engine does not import and
    the config did not ask for ``model.layer_spec=local``, and ``ConfigError`` when a fusion is
    asked for (``true``) that the platform lacks.
    """
    platform = probe_platform(on_cpu) if platform is None else platform
    precision = resolve_precision(cfg.train.precision, not platform.cuda)
    layer_spec = resolve_layer_spec(cfg.model.layer_spec, platform)
    if platform.cuda and not platform.transformer_engine and (
            cfg.fp8.format or cfg.parallel.tp_comm_overlap or cfg.parallel.context > 1):
        raise ConfigError("fp8, parallel.tp_comm_overlap and parallel.context > 1 need "
                          f"Transformer Engine, which does not import ({platform.te_error})")
    path = gpu_defaults(cfg, platform, layer_spec)
    transformer = _transformer_config(cfg, precision, not platform.cuda, path, platform.assumed)
    return MegatronConfigs(
        transformer=transformer,
        optimizer=optimizer_config(cfg.optim, cfg, precision, path),
        ddp=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=path.overlap_grad_reduce,
            overlap_param_gather=path.overlap_param_gather,
            align_param_gather=path.align_param_gather,
            fp8_param_gather=cfg.fp8.format is not None and cfg.fp8.param,  # gather fp8 weights
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            bucket_size=None if not platform.cuda else 40_000_000,
        ),
        padded_vocab_size=padded_vocab_size(cfg.model, cfg.parallel.tensor),
        precision=precision,
        on_cpu=not platform.cuda,
        layer_spec=layer_spec,
        platform=platform,
        gpu_path=path,
    )


def _gpu_kwargs(cfg: RunConfig, path: GpuPath) -> dict:
    """TransformerConfig fields of the GPU path: fusions, TP overlap, context parallel, fp8."""
    p, fp8 = cfg.parallel, cfg.fp8
    kwargs = {
        "bias_activation_fusion": path.jit_fusions and cfg.model.activation == "swiglu",
        "bias_dropout_fusion": path.jit_fusions,
        "masked_softmax_fusion": path.jit_fusions,
        "persist_layer_norm": path.jit_fusions,
        "apply_rope_fusion": path.rope_fusion,
        "gradient_accumulation_fusion": path.grad_accum_fusion,
        "cross_entropy_loss_fusion": path.cross_entropy_fusion,
        "cross_entropy_fusion_impl": path.cross_entropy_impl,
        "tp_comm_overlap": p.tp_comm_overlap,
        "context_parallel_size": p.context,
    }
    if p.context > 1:
        kwargs["cp_comm_type"] = p.cp_comm_type
    if fp8.format is not None:
        kwargs |= {"fp8": fp8.format, "fp8_recipe": fp8.recipe, "fp8_margin": fp8.margin,
                   "fp8_amax_history_len": fp8.amax_history_len,
                   "fp8_amax_compute_algo": fp8.amax_compute_algo, "fp8_param": fp8.param}
    return kwargs


def _construct(kwargs: dict, assumed_platform: bool) -> TransformerConfig:
    """``TransformerConfig(**kwargs)``; for an assumed platform, the library-checked fields
    are set after ``__post_init__`` (whose import checks only a real GPU job can pass)."""
    deferred = {k: kwargs.pop(k) for k in LIBRARY_CHECKED_FIELDS
                if assumed_platform and kwargs.get(k)}
    config = TransformerConfig(**kwargs)
    for key, value in deferred.items():
        setattr(config, key, value)
    return config


def _transformer_config(cfg: RunConfig, precision: str, on_cpu: bool, path: GpuPath,
                        assumed_platform: bool = False) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    swiglu = m.activation == "swiglu"
    recompute = {} if p.recompute == "none" else {"recompute_granularity": p.recompute}
    if p.recompute == "full":
        recompute |= {"recompute_method": "uniform", "recompute_num_layers": 1}
    extra = {}
    if cfg.mup.enabled:
        from megatron_patches.mup import mup_transformer_kwargs

        extra = mup_transformer_kwargs(cfg)
    return _construct(dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_bias_linear,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        init_method_std=m.init_method_std,
        qk_layernorm=m.qk_layernorm,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=(p.virtual_pipeline if p.virtual_pipeline > 1
                                              else None),
        microbatch_group_size_per_vp_stage=p.microbatch_group_size,
        **_p2p_kwargs(p.virtual_pipeline),
        sequence_parallel=p.sequence_parallel,
        params_dtype=PRECISION_DTYPES[precision],
        pipeline_dtype=PRECISION_DTYPES[precision],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # On CPU, initialise the full master weight and split it: the same seed gives the same
        # model at every TP size, which the parallel-equivalence tests rely on.
        use_cpu_initialization=on_cpu,
        deterministic_mode=on_cpu and cfg.runtime.deterministic,
        **_gpu_kwargs(cfg, path),
        **recompute,
        **extra,
    ), assumed_platform)


def _p2p_kwargs(virtual_pipeline: int) -> dict:
    """Megatron-LM's defaults for the interleaved schedule: overlapped, unbatched p2p. The
    batched ops would also be wrong at PP=2: a rank's previous and next stage are then the same
    peer, and one batch's activation and gradient messages to it are matched in the wrong order
    (measured on gloo: micro-batches 3-4 of a step got each other's tensors).
    ``_p2p_ops`` sends each direction over its own process group instead."""
    if virtual_pipeline <= 1:
        return {}
    return {"overlap_p2p_comm": True, "batch_p2p_comm": False}


def optimizer_config(optim: OptimConfig, cfg: RunConfig, precision: str,
                     path: GpuPath | None = None) -> OptimizerConfig:
    """AdamW (decoupled weight decay) with Megatron's mixed-precision and ZeRO-1 machinery."""
    return OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_eps=optim.eps,
        clip_grad=optim.clip_grad,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype=PRECISION_DTYPES[precision],
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_param_gather=bool(path and path.overlap_param_gather),
        log_num_zeros_in_grad=False,
    )
