"""Rules a config must satisfy before any process starts: shapes, layouts, choices.

:func:`validate` collects every violation and raises one :class:`ConfigError` naming the keys,
so a job fails on the login node, not minutes into a GPU allocation.
"""

from __future__ import annotations

from orchestration.config.schema import ModelConfig, OptimConfig, ParallelConfig, RunConfig


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
    errors += _choice_errors(cfg) + _checkpoint_errors(cfg) + _data_errors(cfg)
    errors += _schedule_errors(cfg) + _spike_errors(cfg) + _gpu_path_errors(cfg)
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))


def _checkpoint_errors(cfg: RunConfig) -> list[str]:
    every, interval = cfg.checkpoint.keep_every, cfg.checkpoint.save_interval
    # No periodic saves (save_interval 0): nothing to thin, keep_every has nothing to act on.
    if every > 0 and interval > 0 and every % interval:
        return [f"checkpoint.keep_every={every} is not a multiple of checkpoint.save_interval="
                f"{interval}: no saved checkpoint would be kept"]
    return []


def subset_errors(sources: list, where: str) -> list[str]:
    """``subset: [a, b]`` of each source must be a slice ``0 <= a < b <= 1``."""
    errors = []
    for i, source in enumerate(sources):
        subset = getattr(source, "subset", None)
        if subset is None:
            continue
        values = list(subset)
        if len(values) != 2 or not 0.0 <= values[0] < values[1] <= 1.0:
            errors.append(f"{where}.sources[{i}] ({source.name}).subset={values}: expected "
                          "[a, b] with 0 <= a < b <= 1")
    return errors


def _data_errors(cfg: RunConfig) -> list[str]:
    errors = subset_errors(cfg.data.sources, "data")
    for i, stage in enumerate(cfg.stages):
        if stage.data is not None:
            errors += subset_errors(stage.data.sources, f"stages[{i}].data")
    if cfg.spike.defer_to == "training_end" and cfg.stages:
        shapes = {(s.global_batch_size or cfg.train.global_batch_size,
                   s.seq_length or cfg.model.seq_length) for s in cfg.stages}
        if len(shapes) > 1:
            errors.append("spike.defer_to=training_end moves a stage's batches into the last "
                          "stage, so every stage needs the same global_batch_size and "
                          f"seq_length; the stages have (batch, seq) {sorted(shapes)}")
    ramped = cfg.train.rampup_batch_size or any(s.rampup_batch_size for s in cfg.stages)
    if cfg.spike.defer_to == "training_end" and ramped:
        errors.append("spike.defer_to=training_end moves batches across stages, which a "
                      "batch-size ramp (train/stages rampup_batch_size) makes of different "
                      "sizes; use spike.defer_to=stage_end with a ramp")
    return errors


def _spike_errors(cfg: RunConfig) -> list[str]:
    spike, errors = cfg.spike, []
    if spike.rerun_attempts < 1:
        errors.append(f"spike.rerun_attempts={spike.rerun_attempts} must be at least 1")
    for key in ("rerun_tolerance", "rerun_grad_tolerance"):
        if getattr(spike, key) < 0:
            errors.append(f"spike.{key}={getattr(spike, key)} must be >= 0")
    if spike.rule == "olmo" and spike.window < 19:
        errors.append(f"spike.window={spike.window} with spike.rule=olmo: OLMo-core's rule tests "
                      "only once max(20, window // 2) values are in, which a window below 19 "
                      "never holds")
    bad = {k: v for k, v in spike.inject.items() if v not in ("nan", "spike", "bad_batch")}
    if bad:
        errors.append(f"spike.inject={bad}: each value must be 'nan', 'spike' or 'bad_batch'")
    return errors


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
    for key, ramp, _ in _ramps(cfg):  # every size of a ramp is start + k x increment
        batches += [(f"{key}[0] (start)", ramp[0]), (f"{key}[1] (increment)", ramp[1])]
    for key, gbs in batches:
        if gbs % (cfg.train.micro_batch_size * dp):
            errors.append(f"{key}={gbs} is not divisible by train.micro_batch_size="
                          f"{cfg.train.micro_batch_size} x data-parallel size {dp}")
        elif cfg.parallel.virtual_pipeline > 1:
            errors += _interleaving_errors(key, gbs // (cfg.train.micro_batch_size * dp),
                                           cfg.parallel)
    return errors


def _ramps(cfg: RunConfig) -> list[tuple[str, list[int], int]]:
    """(key, [start, increment, samples], the stage's global batch) of each batch-size ramp
    (``loop/stages.py: plan_stages`` gives train.rampup_batch_size to the first stage)."""
    gbs = cfg.train.global_batch_size
    ramps = [(f"stages[{i}].rampup_batch_size", list(s.rampup_batch_size),
              s.global_batch_size or gbs)
             for i, s in enumerate(cfg.stages) if s.rampup_batch_size]
    first_own = bool(cfg.stages) and cfg.stages[0].rampup_batch_size is not None
    if cfg.train.rampup_batch_size and not first_own:
        first_gbs = (cfg.stages[0].global_batch_size if cfg.stages else None) or gbs
        ramps.insert(0, ("train.rampup_batch_size", list(cfg.train.rampup_batch_size),
                         first_gbs))
    return ramps


def _schedule_errors(cfg: RunConfig) -> list[str]:
    """LR schedules (the run's and each stage's), batch-size ramps and the z-loss."""
    from orchestration.data.ramp import ramp_problem

    optims = [("optim", cfg.optim)] + [(f"stages[{i}].optim", s.optim)
                                       for i, s in enumerate(cfg.stages) if s.optim]
    errors = [e for key, optim in optims for e in _optim_errors(key, optim)]
    for key, ramp, gbs in _ramps(cfg):
        problem = ramp_problem(ramp, gbs)
        if problem:
            errors.append(f"{key}={ramp}: {problem}")
    if cfg.train.z_loss_coeff < 0:
        errors.append(f"train.z_loss_coeff={cfg.train.z_loss_coeff} must be >= 0")
    return errors


def _optim_errors(key: str, optim: OptimConfig) -> list[str]:
    errors = []
    if optim.decay_style not in _DECAY_STYLES:
        errors.append(f"{key}.decay_style={optim.decay_style!r} is not one of {_DECAY_STYLES}")
    if optim.decay_steps is not None and optim.decay_steps <= 0:
        errors.append(f"{key}.decay_steps={optim.decay_steps} must be positive (or unset)")
    if not 0.0 < optim.wsd_decay_fraction <= 1.0:
        errors.append(f"{key}.wsd_decay_fraction={optim.wsd_decay_fraction} must be in (0, 1]")
    if optim.wsd_decay_style not in _WSD_STYLES:
        errors.append(f"{key}.wsd_decay_style={optim.wsd_decay_style!r} is not one of "
                      f"{_WSD_STYLES}")
    return errors


_DECAY_STYLES = ("cosine", "linear", "constant", "wsd")
_WSD_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")  # Megatron's lr_wsd_decay_style


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
    "model.layer_spec": ("auto", "te", "local"),
    "parallel.cp_comm_type": ("p2p", "all_gather", "a2a", "a2a+p2p"),
    "parallel.tp_comm_bootstrap_backend": ("nccl", "mpi", "gloo"),
    "fusions.cross_entropy_impl": ("te", "native"),
    "fp8.format": (None, "e4m3", "hybrid"),
    "fp8.recipe": ("delayed", "tensorwise", "mxfp8", "blockwise"),
    "fp8.amax_compute_algo": ("max", "most_recent"),
    "parallel.recompute": ("none", "selective", "full"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
    "runtime.device": ("auto", "cuda", "cpu"),
    "spike.rule": ("zscore", "olmo", "ema_ratio", "max_ratio", "megatron"),
    "spike.on_escalation": ("stop", "rollback_skip", "rollback_defer", "none"),
    "spike.defer_to": ("stage_end", "training_end"),
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
