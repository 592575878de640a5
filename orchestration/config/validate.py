"""Rules a config must satisfy before any process starts: shapes, layouts, choices.

:func:`validate` collects every violation and raises one :class:`ConfigError` naming the keys,
so a job fails on the login node, not minutes into a GPU allocation.
"""

from __future__ import annotations

from orchestration.config.schema import ModelConfig, ParallelConfig, RunConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending keys."""


class MissingConfigFile(ConfigError, FileNotFoundError):
    """A config group file (``conf/<group>/<name>.yaml``) that does not exist."""


def padded_vocab_size(model: ModelConfig, tensor_parallel: int) -> int:
    """Megatron's rule: pad the embedding so each TP shard is a multiple of the divisor."""
    multiple = model.make_vocab_size_divisible_by * tensor_parallel
    return -(-model.vocab_size // multiple) * multiple


def validate(cfg: RunConfig, world_size: int | None = None) -> None:
    """Fail fast, naming keys, on combinations the kernels or the parallel layout can't run."""
    errors = _model_errors(cfg.model, cfg.parallel) + _batch_errors(cfg, world_size)
    errors += _choice_errors(cfg) + _checkpoint_errors(cfg) + _gpu_path_errors(cfg)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _checkpoint_errors(cfg: RunConfig) -> list[str]:
    every, interval = cfg.checkpoint.keep_every, cfg.checkpoint.save_interval
    if every > 0 and (interval <= 0 or every % interval):
        return [f"checkpoint.keep_every={every} is not a multiple of checkpoint.save_interval="
                f"{interval}: no saved checkpoint would be kept"]
    return []


def _model_errors(m: ModelConfig, p: ParallelConfig) -> list[str]:
    errors = []
    tp = p.tensor
    if m.hidden_size % m.num_attention_heads:
        errors.append(f"model.hidden_size={m.hidden_size} is not divisible by "
                      f"model.num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % m.num_query_groups:
        errors.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                      f"model.num_query_groups={m.num_query_groups}")
    for key, value in (("num_attention_heads", m.num_attention_heads),
                       ("num_query_groups", m.num_query_groups),
                       ("ffn_hidden_size", m.ffn_hidden_size)):
        if value % tp:
            errors.append(f"model.{key}={value} is not divisible by parallel.tensor={tp}")
    if m.make_vocab_size_divisible_by % 64:
        errors.append(f"model.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by} "
                      "must be a multiple of 64 (tensor-core friendly embedding shards)")
    if m.num_layers % p.pipeline:
        errors.append(f"model.num_layers={m.num_layers} is not divisible by "
                      f"parallel.pipeline={p.pipeline}")
    if p.sequence_parallel and tp == 1:
        errors.append("parallel.sequence_parallel=true needs parallel.tensor > 1")
    if not 0.0 < m.rotary_percent <= 1.0:
        errors.append(f"model.rotary_percent={m.rotary_percent} must be in (0, 1]")
    return errors


def _batch_errors(cfg: RunConfig, world_size: int | None) -> list[str]:
    errors = []
    model_parallel = cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context
    if world_size is None:
        return errors
    if world_size % model_parallel:
        return [f"world size {world_size} is not divisible by parallel.tensor x "
                f"parallel.pipeline x parallel.context = {model_parallel}"]
    dp = world_size // model_parallel
    batches = [("train.global_batch_size", cfg.train.global_batch_size)]
    batches += [(f"stages[{i}].global_batch_size", s.global_batch_size)
                for i, s in enumerate(cfg.stages) if s.global_batch_size]
    for key, gbs in batches:
        if gbs % (cfg.train.micro_batch_size * dp):
            errors.append(f"{key}={gbs} is not divisible by train.micro_batch_size="
                          f"{cfg.train.micro_batch_size} x data-parallel size {dp}")
    return errors


_CHOICES = {
    "model.normalization": ("RMSNorm", "LayerNorm"),
    "model.activation": ("swiglu", "gelu"),
    "model.position_embedding": ("rope", "learned_absolute"),
    "model.layer_spec": ("auto", "te", "local"),
    "parallel.cp_comm_type": ("p2p", "all_gather", "a2a", "a2a+p2p"),
    "parallel.tp_comm_bootstrap_backend": ("nccl", "mpi", "gloo"),
    "fusions.cross_entropy_impl": ("te", "native"),
    "fp8.format": (None, "e4m3", "hybrid"),
    "fp8.recipe": ("delayed", "tensorwise", "mxfp8", "blockwise"),
    "fp8.amax_compute_algo": ("max", "most_recent"),
    "parallel.recompute": ("none", "selective", "full"),
    "optim.decay_style": ("cosine", "linear", "constant", "wsd"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "runtime.device": ("auto", "cuda", "cpu"),
    "spike.rule": ("zscore", "ema_ratio", "max_ratio"),
    "spike.on_escalation": ("stop", "rollback_skip", "rollback_defer", "none"),
}


def _choice_errors(cfg: RunConfig) -> list[str]:
    errors = []
    for key, allowed in _CHOICES.items():
        section, attr = key.split(".")
        value = getattr(getattr(cfg, section), attr)
        if value not in allowed:
            errors.append(f"{key}={value!r} is not one of {allowed}")
    if cfg.lr_schedule not in ("per_stage", "global"):
        errors.append(f"lr_schedule={cfg.lr_schedule!r} is not one of ('per_stage', 'global')")
    return errors


def _gpu_path_errors(cfg: RunConfig) -> list[str]:
    """Rules of the GPU-path keys (overlaps, context parallelism, fp8) that hold on any
    machine; what needs a kernel on this machine is checked by megatron_patches.configs."""
    p, errors = cfg.parallel, []
    if p.tp_comm_overlap and not (p.sequence_parallel and p.tensor > 1):
        errors.append("parallel.tp_comm_overlap=true needs parallel.sequence_parallel=true and "
                      f"parallel.tensor > 1 (got sequence_parallel={p.sequence_parallel}, "
                      f"tensor={p.tensor})")
    lengths = {cfg.model.seq_length} | {s.seq_length for s in cfg.stages if s.seq_length}
    if p.tp_comm_overlap and len(lengths) > 1:
        errors.append("parallel.tp_comm_overlap=true sizes TE's userbuffers once, for one "
                      f"sequence length; the stages use {sorted(lengths)}")
    if p.context < 1:
        errors.append(f"parallel.context={p.context} must be >= 1")
    elif p.context > 1:
        bad = sorted(n for n in lengths if n % (2 * p.context))
        if bad:
            errors.append(f"parallel.context={p.context} splits each sequence into "
                          f"{2 * p.context} chunks: sequence length(s) {bad} are not divisible")
        if cfg.model.layer_spec == "local":
            errors.append("parallel.context > 1 needs Transformer Engine's attention "
                          "(model.layer_spec=local has none)")
    if cfg.fp8.format is not None:
        if cfg.model.layer_spec == "local":
            errors.append(f"fp8.format={cfg.fp8.format} runs in Transformer Engine's modules: "
                          "model.layer_spec=local has none")
        if cfg.train.precision not in ("auto", "bf16"):
            errors.append(f"fp8.format={cfg.fp8.format} needs bf16 weights "
                          f"(train.precision={cfg.train.precision})")
    elif cfg.fp8.param:
        errors.append("fp8.param=true needs fp8.format (e4m3 or hybrid)")
    if p.overlap_param_gather and not p.distributed_optimizer:
        errors.append("parallel.overlap_param_gather=true needs parallel.distributed_optimizer")
    if p.align_param_gather and p.overlap_param_gather is False:
        errors.append("parallel.align_param_gather=true needs parallel.overlap_param_gather")
    if cfg.runtime.manual_gc_interval < 0:
        errors.append(f"runtime.manual_gc_interval={cfg.runtime.manual_gc_interval} must be "
                      ">= 0 (0: Python's automatic garbage collection)")
    return errors
