"""Maximal update parametrization (muP) on Megatron-Core, without forking its optimizer.

Rules implemented (Tensor Programs V, Yang et al. 2022, arXiv 2203.03466, Table 3, Adam), with
width multiplier ``m = hidden_size / mup.base_width``:

| parameters | init std | Adam LR | forward multiplier |
| --- | --- | --- | --- |
| input embedding | ``embedding_init_std`` (width-independent) | base | ``embedding_multiplier`` |
| hidden matrices (QKV, attention out, MLP in/out) | ``init_method_std / sqrt(m)`` | base / m | 1 |
| residual output projections (attention out, MLP out) | hidden std / sqrt(2 * layers) | base / m | 1 |
| output layer (unembedding) | ``embedding_init_std`` (width-independent) | base | logits x ``output_multiplier / m`` |
| norms, biases | 1 / 0 | base, no weight decay | 1 |

Attention scores are scaled by ``1 / d_head ** attention_scale_power`` (1.0 under muP instead of
0.5). With ``scale_adam_eps`` Adam's epsilon is divided by ``m`` for the hidden matrices too, as
upstream Megatron-LM's muP does, so that updates stay width-independent when gradients shrink.
Initialisation uses truncated normals (at two standard deviations), as Cerebras/Crystal did.

The untied output layer is a readout ("output weights" in TP5 Table 3: init variance
1/fan_in^2 with no multiplier, which is a width-independent init times the 1/m multiplier in the
Table 8 form used here), so its init does not shrink with width: at init the logits scale as
1/sqrt(m), and the update term, O(1), dominates after the first steps. Upstream Megatron-LM
(``GPTModel``: ``init_method=config.embedding_init_method if config.use_mup and not
share_embeddings_and_output_weights``) does the same. A tied output layer is the embedding.

Where it hooks in:
- ``TransformerConfig``: ``softmax_scale`` and the three init methods (:func:`mup_transformer_kwargs`).
- The built ``GPTModel``: forward hooks on ``embedding`` and ``output_layer`` apply the two
  multipliers, and an untied output layer is re-initialised with ``embedding_init_method``
  (:func:`apply_mup_to_model`). The re-initialisation is the one unavoidable patch: 0.16.1's
  ``GPTModel.__init__`` hard-codes ``init_method=config.init_method`` for the output layer and
  has no field to change it. It draws the weight as the layer's constructor does
  (``_initialize_affine_weight_cpu`` on CPU: the full matrix, then this rank's rows; on GPU,
  the shard inside the model-parallel RNG tracker, as ``_initialize_affine_weight_gpu`` does),
  so tensor-parallel shards are drawn as Megatron draws them; every other parameter is initialised before it and is unchanged.
  ``tests/test_mup.py`` fails when those helpers move, and when ``GPTModel`` starts choosing
  the output layer's init itself (then the re-initialisation must go).
- ``get_megatron_optimizer(config_overrides=...)``: one ``ParamKey`` for hidden matrices sets the
  group's ``lr_mult`` (which ``megatron_patches.optimizer.apply_lr`` honours) and ``eps``.

megatron-core 0.16.1 has no muP; upstream Megatron-LM added ``use_mup``, ``mup_base_hidden_size``,
``mup_embedding_mult``, ``mup_output_mult`` and ``mup_attn_scale_power`` later, with the same
rules: hidden init ``init_method_std / sqrt(m)``, residual projections also ``/ sqrt(2 L)``,
embedding and untied output init ``embedding_init_method_std`` (default ``init_method_std``),
hidden-matrix LR and Adam eps ``/ m``, logits x ``1 / m`` (upstream's ``mup_output_mult`` is the
whole factor, ours is ``output_multiplier / m``) and scores / d_head. So moving to upstream's
fields keeps the rules, not the bits: upstream's inits are plain normals (ours truncate at
2 std, as Crystal did) and draw from the RNG in another order. Models initialised before the
output-layer re-initialisation are *not* upstream's model at ``m != 1`` even in distribution:
an untied readout started with std ``init_method_std / sqrt(m)`` instead of
``init_method_std`` (docs/mup.md).
"""

from __future__ import annotations

import functools
import math

import torch
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

HIDDEN_MATRICES = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight",
                   "linear_fc2.weight")


def width_multiplier(cfg) -> float:
    return cfg.model.hidden_size / cfg.mup.base_width


def init_stds(cfg) -> dict[str, float]:
    """Init standard deviations: explicit ``mup.*_init_std`` values win over the derived ones."""
    mup, model = cfg.mup, cfg.model
    hidden = mup.hidden_init_std or model.init_method_std / math.sqrt(width_multiplier(cfg))
    return {
        "embedding": mup.embedding_init_std or model.init_method_std,
        "hidden": hidden,
        "output_proj": mup.output_proj_init_std or hidden / math.sqrt(2 * model.num_layers),
    }


def _truncated_normal(tensor: torch.Tensor, std: float) -> torch.Tensor:
    return torch.nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


def truncated_normal_init(std: float):
    return functools.partial(_truncated_normal, std=std)


def mup_transformer_kwargs(cfg) -> dict:
    """``TransformerConfig`` fields for muP: attention scale and initialisation."""
    stds = init_stds(cfg)
    head_dim = cfg.model.hidden_size // cfg.model.num_attention_heads
    return {
        "softmax_scale": head_dim ** -cfg.mup.attention_scale_power,
        "init_method": truncated_normal_init(stds["hidden"]),
        "output_layer_init_method": truncated_normal_init(stds["output_proj"]),
        "embedding_init_method": truncated_normal_init(stds["embedding"]),
        "embedding_init_method_std": stds["embedding"],
    }


def _scale_output(multiplier: float, _module, _inputs, output):
    if isinstance(output, tuple):  # Megatron linears return (output, bias)
        return (output[0] * multiplier, *output[1:])
    return output * multiplier


def reinit_untied_output_layer(model) -> bool:
    """Draw an untied output layer again with ``config.embedding_init_method`` (upstream's rule;
    see the module docstring). False when there is nothing to do: no output layer on this
    pipeline stage, or one tied to the embedding."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    layer = getattr(model, "output_layer", None)
    if (not getattr(model, "post_process", False) or layer is None or layer.weight is None
            or model.share_embeddings_and_output_weights):
        return False
    config = model.config
    if not config.perform_initialization:
        return False
    with torch.no_grad():
        if config.use_cpu_initialization:
            _initialize_affine_weight_cpu(layer.weight, layer.output_size, layer.input_size,
                                          layer.output_size_per_partition, 0,
                                          config.embedding_init_method,
                                          skip_set_tensor_parallel_attributes=True)
        else:  # _initialize_affine_weight_gpu without re-setting the TP attributes
            with get_cuda_rng_tracker().fork():
                config.embedding_init_method(layer.weight)
    return True


def apply_mup_to_model(model, cfg) -> None:
    """Initialise an untied output layer like the embedding, then register the input-embedding
    and output-logit multipliers as forward hooks."""
    reinit_untied_output_layer(model)
    m = width_multiplier(cfg)
    if getattr(model, "pre_process", False) and cfg.mup.embedding_multiplier != 1.0:
        model.embedding.register_forward_hook(
            functools.partial(_scale_output, cfg.mup.embedding_multiplier))
    if getattr(model, "post_process", False):
        model.output_layer.register_forward_hook(
            functools.partial(_scale_output, cfg.mup.output_multiplier / m))


def _is_hidden_matrix(_param, name: str) -> bool:
    return name.endswith(HIDDEN_MATRICES)


def mup_param_group_overrides(cfg, optimizer_config: OptimizerConfig) -> dict:
    """Megatron's standard groups (no weight decay on norms and biases) plus the hidden-matrix
    group with its LR (and epsilon) divided by the width multiplier."""
    from megatron.core.optimizer import get_standard_config_overrides

    m = width_multiplier(cfg)
    hidden = {"lr_mult": 1.0 / m}
    if cfg.mup.scale_adam_eps:
        hidden["eps"] = optimizer_config.adam_eps / m
    key = ParamKey(with_name_predicate=ParamWithNamePredicate(name="mup_hidden",
                                                              fn=_is_hidden_matrix))
    return {**get_standard_config_overrides(optimizer_config), key: hidden}
