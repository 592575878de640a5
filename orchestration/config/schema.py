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
    # Normalise queries and keys per head before RoPE (Megatron-Core's qk_layernorm, with the
    # model's `normalization`), as Qwen3 / Gemma 3 do against attention-logit growth. Exported
    # to Hugging Face as Qwen3ForCausalLM.
    qk_layernorm: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    # Decoder-layer modules: te (Transformer Engine's fused modules, flash/fused attention) |
    # local (Megatron's own, unfused attention) | auto (te on CUDA, failing when TE does not
    # import; local on CPU). A GPU run without TE must ask for `local` explicitly.
    layer_spec: str = "auto"


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
    # Model chunks per pipeline rank (Megatron's virtual_pipeline_model_parallel_size): the
    # interleaved 1F1B schedule, whose bubble is 1/virtual_pipeline of plain 1F1B's.
    virtual_pipeline: int = 1
    # Micro-batches each chunk runs in a row (Megatron's microbatch_group_size_per_vp_stage;
    # default: parallel.pipeline). Larger groups hold more activations but admit micro-batch
    # counts the default refuses (K2: 34 per rank at PP4 needs 5).
    microbatch_group_size: int | None = None
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    recompute: str = "none"  # none | selective | full
    # Megatron-LM's high-MFU settings; null = on for a CUDA job (with the distributed optimizer
    # for the param gather), off on CPU (megatron_patches/configs.py: gpu_defaults).
    overlap_grad_reduce: bool | None = None
    overlap_param_gather: bool | None = None
    align_param_gather: bool | None = None  # all PP stages launch the param all-gather together
    context: int = 1  # context parallelism: each sequence split over this many ranks (TE only)
    cp_comm_type: str = "p2p"  # p2p | all_gather | a2a | a2a+p2p (Megatron's cp_comm_type)
    # Overlap TP communication with GEMMs (TE userbuffers); needs sequence_parallel and TP > 1.
    tp_comm_overlap: bool = False
    tp_comm_overlap_cfg: str | None = None  # YAML of TE's ub_cfgs (Megatron-LM --tp-comm-overlap-cfg)
    tp_comm_bootstrap_backend: str = "nccl"  # nccl | mpi | gloo


@dataclass
class FusionConfig:
    """Fused kernels of the GPU path. null = on where the platform has the kernel (Megatron's
    recipes), off on CPU; true insists (an error where the kernel is missing); false opts out."""

    rope: bool | None = None  # apply_rope_fusion (Transformer Engine's fused RoPE)
    gradient_accumulation: bool | None = None  # weight grads accumulated in the GEMM (apex/TE)
    cross_entropy: bool | None = None  # cross_entropy_loss_fusion
    cross_entropy_impl: str = "te"  # te | native (Megatron's cross_entropy_fusion_impl)


@dataclass
class Fp8Config:
    """FP8 GEMMs through Transformer Engine (TransformerConfig's fp8 fields); off by default.

    Delayed scaling with a 1024-step amax history and ``max`` is NeMo's/Megatron-Bridge's
    default recipe; ``tensorwise`` is per-tensor current scaling, ``mxfp8`` Blackwell only."""

    format: str | None = None  # e4m3 | hybrid (e4m3 forward, e5m2 gradients); null: no fp8
    recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"  # max | most_recent
    margin: int = 0
    param: bool = False  # keep the GEMM weights in fp8 (fp8_param)


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
    # Steps of decay after the warmup (default: the rest of the stage, or of the run with
    # lr_schedule=global). Independent of the stage's length: a stage that ends before its decay
    # does stops part-way down (Crystal's phase 1: 294,337 decay steps, stopped at 79,721).
    decay_steps: int | None = None
    init_lr: float = 0.0  # LR at step 0 of warmup
    # wsd (warmup-stable-decay): the last `wsd_decay_fraction` of the decay window anneals from
    # lr to min_lr in the shape `wsd_decay_style`, Megatron's names: linear | cosine |
    # exponential | minus_sqrt (1 - sqrt, Hagele et al. 2024).
    wsd_decay_fraction: float = 0.2
    wsd_decay_style: str = "linear"


@dataclass
class SourceConfig:
    """One source of a data mix: Megatron indexed dataset prefixes (no .bin/.idx suffix).

    ``path`` is one prefix or a glob (``web_text_document-shard-*``); ``paths`` lists several
    (prefixes or globs), e.g. the shards of a sharded tokenization. The source's tokens are
    their sum, and its name, multiplier and held-out loss cover all of them.

    ``subset: [a, b]`` trains on the slice ``[a, b)`` of the source's training documents (of
    each of its prefixes), as Crystal gave each phase its own slice of a source
    (``data_subset: 0.0-0.1``); held-out documents are not affected."""

    name: str = ""
    path: str = ""
    paths: list[str] = field(default_factory=list)
    multiplier: float = 1.0
    tokens: int | None = None
    subset: list[float] | None = None


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
    # [start, increment, ramp_samples]: Megatron's --rampup-batch-size over this stage's first
    # samples (orchestration/data/ramp.py). Unset: the first stage takes train.rampup_batch_size.
    rampup_batch_size: list[int] | None = None


@dataclass
class SpikeConfig:
    """Skip a batch whose loss or grad norm spikes or is NaN/Inf (see orchestration/callbacks/spike_rules.py).

    The default rule (``zscore``) skips when the loss or the grad norm exceeds the mean plus 6
    standard deviations of the last 128 accepted steps, once 64 are in: one-sided, and skipped
    steps stay out of the history. ``olmo`` is OLMo-core's exact rule (two-sided, every step
    counts), ``megatron`` Megatron-LM's (10x the max of the first 100 values).
    ``rerun`` re-runs a flagged step on the same batch and RNG state, as Megatron-LM's re-run
    state machine does: a result that reproduces is a real spike (skipped), one that does not
    was a transient fault (logged; the re-run's result is used).
    """

    enabled: bool = True
    rule: str = "zscore"  # zscore | olmo | ema_ratio | max_ratio | megatron (spike_rules.py)
    window: int = 128
    threshold: float = 6.0
    min_history: int = 64  # no spike is declared before this many accepted steps
    ema_decay: float = 0.99
    check_grad_norm: bool = True
    escalate_after: int = 5  # this many skips ...
    escalate_within: int = 100  # ... within this many steps escalates:
    on_escalation: str = "stop"  # stop | rollback_skip | rollback_defer | none
    # rollback_defer moves the window to the end of its stage, or (as K2 did) of training;
    # training_end needs every stage to have the same global batch and sequence length.
    defer_to: str = "stage_end"  # stage_end | training_end
    skip_steps: list[str] = field(default_factory=list)  # "120", "300-340": never computed
    # drills: {"150": "nan" | "spike"} hit the step's first computation only (a transient
    # fault: a re-run does not see it); "bad_batch" (x1000) hits every computation of it
    inject: dict[str, str] = field(default_factory=dict)
    megatron_samples: int = 100  # rule megatron: the max is taken over this many first values
    rerun: bool = False  # re-run a flagged step to tell a transient fault from a real spike
    rerun_attempts: int = 1  # re-runs per step (Megatron: 1, in place; the loop allows 8)
    rerun_tolerance: float = 0.0  # relative loss difference under which two runs agree
    rerun_grad_tolerance: float = 1e-3  # the same for the grad norm (Megatron: 0.1%)


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    global_batch_size: int = 16
    # [start, increment, ramp_samples] as Megatron-LM's --rampup-batch-size: the global batch
    # grows from `start` by `increment` over the first `ramp_samples` samples of the run (its
    # first stage). Empty: no ramp-up.
    rampup_batch_size: list[int] = field(default_factory=list)
    max_steps: int = 300  # length of a run without `stages` (each stage sets its own)
    seed: int = 1234
    # PaLM's z-loss (Chowdhery et al. 2022, sec. 5): adds coeff * log(Z)^2 per token, Z the
    # softmax normaliser of the output logits, to keep log Z near 0 (PaLM: 1e-4). 0: off.
    # Logged as `z_loss` (the mean log(Z)^2, before the coefficient); `loss` stays the LM loss.
    z_loss_coeff: float = 0.0
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
    # Save at the last step of every stage (after its ramp-off): the stage's release
    # checkpoint, marked `release` in its checkpoint_info.json and never pruned.
    save_stage_end: bool = True
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
    # Python's garbage collector off, one gc.collect() every N steps on every rank together
    # (Megatron-LM's --manual-gc --manual-gc-interval 100); 0 leaves Python's automatic GC on.
    manual_gc_interval: int = 100


@dataclass
class RunConfig:
    name: str = "default"
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    mup: MupConfig = field(default_factory=MupConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    fusions: FusionConfig = field(default_factory=FusionConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
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
