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
    errors += _choice_errors(cfg) + _checkpoint_errors(cfg)
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
    errors += _virtual_pipeline_errors(m, p)
    if p.sequence_parallel and tp == 1:
        errors.append("parallel.sequence_parallel=true needs parallel.tensor > 1")
    if not 0.0 < m.rotary_percent <= 1.0:
        errors.append(f"model.rotary_percent={m.rotary_percent} must be in (0, 1]")
    return errors


def _virtual_pipeline_errors(m: ModelConfig, p: ParallelConfig) -> list[str]:
    """Interleaving needs pipeline ranks to interleave, and whole layers in every chunk."""
    vp = p.virtual_pipeline
    if vp < 1:
        return [f"parallel.virtual_pipeline={vp} must be >= 1"]
    if vp == 1:
        return []
    if p.pipeline < 2:
        return [f"parallel.virtual_pipeline={vp} needs parallel.pipeline >= 2 (it interleaves "
                "model chunks across pipeline ranks)"]
    if m.num_layers % (p.pipeline * vp):
        return [f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline x "
                f"parallel.virtual_pipeline = {p.pipeline * vp} (layers per model chunk)"]
    return []


def _batch_errors(cfg: RunConfig, world_size: int | None) -> list[str]:
    errors = []
    model_parallel = cfg.parallel.tensor * cfg.parallel.pipeline
    if world_size is None:
        return errors
    if world_size % model_parallel:
        return [f"world size {world_size} is not divisible by parallel.tensor x "
                f"parallel.pipeline = {model_parallel}"]
    dp = world_size // model_parallel
    batches = [("train.global_batch_size", cfg.train.global_batch_size)]
    batches += [(f"stages[{i}].global_batch_size", s.global_batch_size)
                for i, s in enumerate(cfg.stages) if s.global_batch_size]
    for key, gbs in batches:
        if gbs % (cfg.train.micro_batch_size * dp):
            errors.append(f"{key}={gbs} is not divisible by train.micro_batch_size="
                          f"{cfg.train.micro_batch_size} x data-parallel size {dp}")
        elif cfg.parallel.virtual_pipeline > 1:
            errors += _interleaving_errors(key, gbs // (cfg.train.micro_batch_size * dp),
                                           cfg.parallel)
    return errors


def _interleaving_errors(key: str, microbatches: int, p: ParallelConfig) -> list[str]:
    """Megatron's interleaved schedule runs micro-batches in groups of
    ``microbatch_group_size`` (default: the pipeline size) per chunk; it refuses a group size
    outside [pipeline, micro-batches] and a last group smaller than the pipeline."""
    group = p.microbatch_group_size or p.pipeline
    if valid_microbatch_group(microbatches, group, p.pipeline):
        return []
    fits = [g for g in range(p.pipeline, microbatches + 1)
            if valid_microbatch_group(microbatches, g, p.pipeline)]
    hint = (f"set parallel.microbatch_group_size={fits[0]}" if fits
            else "use more micro-batches per rank")
    why = (f"the last group would have {microbatches % group}" if group <= microbatches
           else "a group cannot exceed them")
    return [f"{key} gives {microbatches} micro-batches per data-parallel rank, which Megatron's "
            f"interleaved schedule cannot run in groups of {group} at parallel.pipeline="
            f"{p.pipeline} ({why}); {hint}"]


def valid_microbatch_group(microbatches: int, group: int, pipeline: int) -> bool:
    """Megatron-Core 0.16's rule (``forward_backward_pipelining_with_interleaving``)."""
    if not pipeline <= group <= microbatches:
        return False
    return microbatches % group == 0 or microbatches % group >= pipeline


_CHOICES = {
    "model.normalization": ("RMSNorm", "LayerNorm"),
    "model.activation": ("swiglu", "gelu"),
    "model.position_embedding": ("rope", "learned_absolute"),
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
