"""Per-GPU memory of a training layout: weights, gradients, Adam state and activations.

Formulas are documented on :func:`memory_per_gpu` and :func:`activation_bytes_per_layer`;
``python -m orchestration.plan`` prints them for a model and layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestration.config import ModelConfig, padded_vocab_size
from orchestration.metrics.flops import parameter_count

ADAM_BYTES_PER_PARAM = 12  # fp32 master weight + Adam's two fp32 moments


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the most loaded pipeline stage (see :func:`memory_per_gpu`)."""

    params_per_gpu: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    activations_full_recompute: float

    @property
    def model_state(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_state + self.activations

    @property
    def total_full_recompute(self) -> float:
        return self.model_state + self.activations_full_recompute


def stage_params(model: ModelConfig, tp: int, pp: int) -> int:
    """Parameters one GPU holds on the heaviest pipeline stage.

    Layers split evenly over PP stages and every weight over TP (norm weights and row-parallel
    biases are replicated across TP in Megatron; we ignore that <0.01 % here). The first stage
    also holds the input embedding, the last one the output layer and final norm; with tied
    embeddings and PP > 1 the last stage keeps its own copy of the embedding, so it counts too.
    """
    count = parameter_count(model, tp)
    vocab_weight = padded_vocab_size(model, tp) * model.hidden_size
    layers = model.num_layers // pp * count.per_layer
    final_norm = count.non_embedding - model.num_layers * count.per_layer
    output = count.output if (count.output or pp == 1) else vocab_weight
    ends = (
        (count.embedding + output + final_norm)
        if pp == 1
        else max(count.embedding, output + final_norm)
    )
    return -(-(layers + ends) // tp)


def activation_bytes_per_layer(
    model: ModelConfig,
    seq_length: int,
    micro_batch: int,
    tp: int,
    sequence_parallel: bool,
    flash_attention: bool = True,
) -> float:
    """Activation bytes one transformer layer stores for backward (bf16, 1-byte dropout masks).

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    eq. 1-4: ``s*b*h*(34 + 5*a*s/h)`` bytes per layer, with TP ``s*b*h*(10 + 24/t + 5*a*s/(h*t))``
    and with TP + sequence parallelism everything divided by t. Their 34 = 11 (attention:
    QKV input 2, Q and K 4, V 2, projection input 2, dropout mask 1) + 19 (MLP with 4h GeLU:
    fc1 input 2, GeLU input 8, fc2 input 8, dropout mask 1) + 4 (two norm inputs); 10 of it
    (norm inputs, QKV and fc1 inputs, dropout masks) is not split by TP without SP.
    We generalise the TP-split part to GQA (K and V are groups*head_dim wide) and any ffn/SwiGLU
    (fc1 output 2*f wide), which reproduces 34 for GPT-3 shapes. ``5*a*s^2*b`` (softmax output,
    its dropout mask and dropout output) is dropped with flash/fused attention, which recomputes
    the scores in backward; Megatron on GPUs uses it, so it is the default.
    """
    h, f = model.hidden_size, model.ffn_hidden_size
    kv = model.num_query_groups * (h // model.num_attention_heads)
    fc1_out = 2 * f if model.activation == "swiglu" else f
    split = 2 * h + 4 * kv + 2 * h + 2 * fc1_out + 2 * f
    replicated = 10 * h
    per_token = split / tp + replicated / (tp if sequence_parallel else 1)
    scores = 0.0 if flash_attention else 5 * model.num_attention_heads * seq_length / tp
    return seq_length * micro_batch * (per_token + scores)


def layers_in_flight(num_layers: int, pp: int, vp: int = 1,
                     microbatch_group: int | None = None) -> float:
    """Layer activations the first pipeline rank holds at its peak, in layers of one
    micro-batch.

    1F1B: ``pp`` micro-batches of ``L/pp`` layers, i.e. ``L``. Interleaved (``vp`` chunks of
    ``L/(pp*vp)`` layers): Megatron-Core's warm-up on rank 0 runs ``2*(pp-1) + (vp-1)*group``
    chunk forwards (``get_pp_rank_microbatches``; ``group`` defaults to ``pp``) before the first
    backward, so ``warmup + 1`` are held: ``L * (1 + (pp-1)/(pp*vp))`` at the default group.
    """
    if vp <= 1 or pp <= 1:
        return float(num_layers)
    group = microbatch_group or pp
    warmup = 2 * (pp - 1) + (vp - 1) * group
    return (warmup + 1) * num_layers / (pp * vp)


def memory_per_gpu(
    model: ModelConfig,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    micro_batch: int = 1,
    seq_length: int | None = None,
    sequence_parallel: bool | None = None,
    flash_attention: bool = True,
    grad_bytes: int = 4,
    distributed_optimizer: bool = True,
    vp: int = 1,
    microbatch_group: int | None = None,
) -> MemoryEstimate:
    """Per-GPU memory of the heaviest stage under ZeRO-1 (Megatron's distributed optimizer).

    * weights: bf16, 2 bytes x :func:`stage_params` (sharded by TP and PP);
    * grads: ``grad_bytes`` per parameter, also sharded by TP and PP. Megatron accumulates
      into an fp32 main-grad buffer by default, and ``megatron_patches.configs`` sets
      ``grad_reduce_in_fp32=True``, hence 4; pass 2 for bf16 grads;
    * optimizer: 12 bytes (fp32 master weight, Adam m and v) per parameter, additionally
      sharded over DP when the distributed optimizer is on;
    * activations: 1F1B keeps ``pp`` micro-batches in flight on the first stage, each with
      L/pp layers, i.e. L layers of one micro-batch (Korthikanti et al. sec. 4.2; more with
      an interleaved pipeline, :func:`layers_in_flight`), plus fp32
      logits for the loss (``4*s*b*V/t``, conservatively counted on every stage). With full
      recompute only each layer's input (``2*s*b*h``, /t with SP) is kept, plus one layer's
      full activations while it is being recomputed.
    Framework overhead (CUDA context, NCCL buffers, allocator fragmentation: often 3-8 GiB)
    is not included.
    """
    s = model.seq_length if seq_length is None else seq_length
    sp = tp > 1 if sequence_parallel is None else sequence_parallel
    n = stage_params(model, tp, pp)
    layer = activation_bytes_per_layer(model, s, micro_batch, tp, sp, flash_attention)
    logits = 4.0 * s * micro_batch * padded_vocab_size(model, tp) / tp
    layer_input = 2.0 * s * micro_batch * model.hidden_size / (tp if sp else 1)
    in_flight = layers_in_flight(model.num_layers, pp, vp, microbatch_group)
    return MemoryEstimate(
        params_per_gpu=n,
        weights=2.0 * n,
        grads=float(grad_bytes) * n,
        optimizer=ADAM_BYTES_PER_PARAM * n / (dp if distributed_optimizer else 1),
        activations=in_flight * layer + logits,
        activations_full_recompute=in_flight * layer_input + layer + logits,
    )
