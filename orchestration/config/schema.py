"""The one typed config schema of a training run.

Every knob a run has lives in these dataclasses, registered with Hydra's ConfigStore as
``run_schema`` so that YAML in ``conf/`` is type-checked on composition (a misspelt key or a
string where an int belongs fails with the key's path). Code reads config only through these
types: ``orchestration.config.loading`` turns YAML into them (Hydra composition, a mix or model
file, a saved run config), :func:`orchestration.config.validate` checks the hardware rules, and
``megatron_patches.configs`` maps them to Megatron-Core's config objects.

Steps are 1-based everywhere (``orchestration/loop/stages.py`` states the convention): step 1
trains the first batch, ``checkpoint step_N`` holds the model after step N.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Architecture. Defaults are the LLaMA choices; Crystal-style models flip the flags."""

    name: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 352
    num_attention_heads: int = 4
    num_query_groups: int = 2  # K/V heads: < num_attention_heads is GQA; equal is plain MHA
    seq_length: int = 128
    vocab_size: int = 4096  # tokenizer's size; padded by make_vocab_size_divisible_by x TP
    make_vocab_size_divisible_by: int = 64
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm
    norm_epsilon: float = 1e-5
    activation: str = "swiglu"  # swiglu | gelu
    add_bias_linear: bool = False
    tie_embeddings: bool = False
    position_embedding: str = "rope"  # rope | learned_absolute
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0


@dataclass
class MupConfig:
    """Maximal update parametrization (Tensor Programs V); see megatron_patches/mup.py."""

    enabled: bool = False
    base_width: int = 256
    embedding_multiplier: float = 1.0
    output_multiplier: float = 1.0
    attention_scale_power: float = 1.0  # 1.0: scores / d_head; 0.5: / sqrt(d_head)
    embedding_init_std: float | None = None
    hidden_init_std: float | None = None
    output_proj_init_std: float | None = None
    scale_adam_eps: bool = True


@dataclass
class ParallelConfig:
    """Model parallelism. Data parallelism is whatever the world size leaves over."""

    tensor: int = 1
    pipeline: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    recompute: str = "none"  # none | selective | full
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule of a single-stage run (stages may override)."""

    lr: float = 3e-3
    min_lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 30
    decay_style: str = "cosine"  # cosine | linear | constant | wsd
    decay_steps: int | None = None  # default: the stage's steps minus warmup
    init_lr: float = 0.0  # LR at step 0 of warmup


@dataclass
class SourceConfig:
    """One source of a data mix: Megatron indexed dataset prefixes (no .bin/.idx suffix).

    ``path`` is one prefix or a glob (``web_text_document-shard-*``); ``paths`` lists several
    (prefixes or globs), e.g. the shards of a sharded tokenization. The source's tokens are
    their sum, and its name, multiplier and held-out loss cover all of them."""

    name: str = ""
    path: str = ""
    paths: list[str] = field(default_factory=list)
    multiplier: float = 1.0
    tokens: int | None = None


@dataclass
class DataConfig:
    """A data mix (conf/data/*.yaml): sources, tokenizer and the train/valid/test split."""

    name: str = "demo"
    tokenizer_model: str = ""
    split: str = "98,2,0"
    sources: list[SourceConfig] = field(default_factory=list)
    eod_mask_loss: bool = False
    builder_threads: int = 1  # Megatron builds the sources' indices of a blend in this many threads
    prepare: str | None = None  # "module:function" called with this DataConfig to build missing data


@dataclass
class StageConfig:
    """One stage of a curriculum; unset fields inherit the run's top-level values."""

    name: str = "main"
    mix: str | None = None  # a data mix by name (conf/data/<mix>.yaml) ...
    data: DataConfig | None = None  # ... or inline; neither: the run's top-level `data`
    train_tokens: int | None = None
    max_steps: int | None = None
    global_batch_size: int | None = None
    seq_length: int | None = None
    optim: OptimConfig | None = None  # with lr_schedule=per_stage: this stage's own schedule
    ramp_off_steps: int = 0  # linearly bring the LR down over the stage's last N steps ...
    ramp_off_lr: float | None = None  # ... to this value (default: the schedule's min_lr)


@dataclass
class SpikeConfig:
    """Skip a batch whose loss or grad norm spikes or is NaN/Inf (see orchestration/callbacks/spike_rules.py).

    Default rule is OLMo-core's: skip when the loss or the grad norm exceeds the mean plus 6
    standard deviations of the last 128 accepted steps, once at least half the window is seen.
    """

    enabled: bool = True
    rule: str = "zscore"  # zscore (mean + k*std) | ema_ratio (k x EMA) | max_ratio (k x max)
    window: int = 128
    threshold: float = 6.0
    min_history: int = 64  # no spike is declared before this many accepted steps
    ema_decay: float = 0.99
    check_grad_norm: bool = True
    escalate_after: int = 5  # this many skips ...
    escalate_within: int = 100  # ... within this many steps escalates:
    on_escalation: str = "stop"  # stop | rollback_skip | rollback_defer | none
    skip_steps: list[str] = field(default_factory=list)  # "120", "300-340": never computed
    inject: dict[str, str] = field(default_factory=dict)  # {"150": "nan" | "spike"} for drills


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 16
    max_steps: int = 300  # length of a run without `stages` (each stage sets its own)
    seed: int = 1234
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 4
    eval_per_source: bool = True  # also report held-out loss on each source of the mix
    sample_interval: int = 0  # greedy samples from sample_prompts every N steps (0: off)
    sample_prompts: list[str] = field(default_factory=list)
    sample_tokens: int = 32
    skip_batches_file: str | None = None
    exit_after_steps: int | None = None  # stop (with a checkpoint) after N steps this job
    eval_only: bool = False  # evaluate the loaded/resumed weights once and exit


@dataclass
class CheckpointConfig:
    save_interval: int = 100
    keep_last: int = 3
    # Also keep every checkpoint whose step is a multiple of this (0: none), never pruned: the
    # release checkpoints of a 360-open run (K2 kept 360 over stage 1).
    keep_every: int = 0
    load: str | None = None  # start from this checkpoint when the run dir has none
    load_optimizer: bool = True  # with `load`: also restore optimizer state (not just weights)
    save_initial: bool = False  # also save step 0 (the initial weights), as LLM360 releases do
    # Megatron-Core 0.16 can reshard distributed-optimizer state across DP but not TP/PP. On a
    # TP/PP change the weights always load; Adam's moments restart only if this is true.
    reset_optimizer_on_reshard: bool = False
    # Write shards in a background process (Megatron's async dist_checkpointing save) while
    # training continues; the checkpoint is published (renamed from *.tmp) once all ranks finish.
    async_save: bool = False
    # A run dir whose checkpoints all fail to load refuses to start; true trains from scratch
    # instead, after moving the unloadable ones to checkpoints/unloadable/ (never pruned).
    allow_fresh_start: bool = False


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "open-pretrain"
    wandb_entity: str | None = None
    # TensorBoard event files (offline, next to W&B): <run_dir>/tensorboard unless a dir is given.
    tensorboard: bool = False
    tensorboard_dir: str | None = None


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cuda | cpu
    distributed_timeout_s: int = 600
    peak_flops_per_gpu: float | None = None  # for MFU; detected for known GPUs when unset
    # Fault drill for testing recovery: "stall:rank=R,step=S,seconds=T" sleeps rank R before
    # step S (1-based), as a hung GPU or a stuck filesystem read would.
    fault_drill: str | None = None
    deterministic: bool = True


@dataclass
class RunConfig:
    name: str = "default"
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    mup: MupConfig = field(default_factory=MupConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: list[StageConfig] = field(default_factory=list)
    lr_schedule: str = "per_stage"  # per_stage: each stage's optim | global: one over all stages
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # Callbacks by registered name (orchestration/callbacks/registry.py) or "module:Class",
    # each with its keyword options; `null` removes a default one (e.g. `callbacks.samples: null`).
    callbacks: dict[str, Any] = field(default_factory=dict)
