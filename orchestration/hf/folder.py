"""Reading a Hugging Face Llama folder: its config checked against a model size, its weights.

Released weights come as ``config.json`` plus ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``; old releases have ``pytorch_model*.bin``). The config is
checked key by key against ``conf/model/<size>.yaml`` before any tensor is read, so a wrong
``--model`` fails in one line naming every key that differs, not deep inside a shape mismatch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from orchestration.config import ModelConfig, padded_vocab_size

#: Tokenizer files a Llama release may ship; copied next to the imported checkpoint.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)


class IncompatibleHFConfig(ValueError):
    """The Hugging Face config is not the model size it is imported as."""


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (not a Hugging Face model folder)")
    return json.loads(path.read_text())


def rope_theta(hf: dict[str, Any]) -> float | None:
    """``rope_theta`` at the top level (transformers 4) or in ``rope_parameters`` (5)."""
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    params = hf.get("rope_parameters") or {}
    return float(params["rope_theta"]) if "rope_theta" in params else None


def rope_scaling(hf: dict[str, Any]) -> str | None:
    """The RoPE scaling type, None for plain RoPE (which is all Megatron's config here runs)."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return None if kind in (None, "default") else str(kind)


def vocab_sizes(m: ModelConfig) -> list[int]:
    """Embedding sizes a Llama folder for model ``m`` may have: the tokenizer's size, or it
    padded as a Megatron export at TP 1..64 pads it (the rows beyond are padding)."""
    return sorted({m.vocab_size, *(padded_vocab_size(m, 2**i) for i in range(7))})


def config_differences(hf: dict[str, Any], m: ModelConfig) -> list[str]:
    """``key: HF X, model Y`` for each config.json key that does not fit the model size."""
    head_dim = m.hidden_size // m.num_attention_heads
    heads = hf.get("num_attention_heads")
    expected: dict[str, tuple[Any, Any]] = {
        "model_type": (hf.get("model_type"), "llama"),
        "hidden_size": (hf.get("hidden_size"), m.hidden_size),
        "intermediate_size": (hf.get("intermediate_size"), m.ffn_hidden_size),
        "num_hidden_layers": (hf.get("num_hidden_layers"), m.num_layers),
        "num_attention_heads": (heads, m.num_attention_heads),
        "num_key_value_heads": (hf.get("num_key_value_heads", heads), m.num_query_groups),
        "head_dim": (hf.get("head_dim") or head_dim, head_dim),
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (bool(hf.get("attention_bias", False)), m.add_bias_linear),
        "mlp_bias": (bool(hf.get("mlp_bias", False)), m.add_bias_linear),
        "rope_theta": (rope_theta(hf), float(m.rotary_base)),
        "rope_scaling": (rope_scaling(hf), None),
    }
    diffs = [f"{k}: HF {hf_value!r}, model {want!r}"
             for k, (hf_value, want) in expected.items() if hf_value != want]
    eps = hf.get("rms_norm_eps")
    if eps is None or abs(eps - m.norm_epsilon) > 1e-12:
        diffs.append(f"rms_norm_eps: HF {eps!r}, model {m.norm_epsilon!r}")
    if hf.get("vocab_size") not in vocab_sizes(m):
        diffs.append(f"vocab_size: HF {hf.get('vocab_size')!r}, model {m.vocab_size} "
                     f"(or padded: {vocab_sizes(m)})")
    return diffs


def check_config(hf: dict[str, Any], m: ModelConfig, where: Path) -> None:
    diffs = config_differences(hf, m)
    if diffs:
        raise IncompatibleHFConfig(
            f"{where}/config.json does not match model '{m.name}': " + "; ".join(diffs))


#: Buffers old Llama checkpoints saved with the weights; recomputed from the config, not loaded.
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """The model's tensors in fp32: ``model.safetensors``, the shards its index lists, or
    (old releases) ``pytorch_model*.bin``; RoPE's saved ``inv_freq`` buffers are dropped."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [hf_dir / s for s in shards]
    elif (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    else:
        files = sorted(hf_dir.glob("model-*.safetensors"))
    weights: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            weights.update(load_file(str(f)))
    else:
        for f in sorted(hf_dir.glob("pytorch_model*.bin")):
            weights.update(torch.load(f, map_location="cpu", weights_only=True))
    if not weights:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors or pytorch_model*.bin weights")
    return {k: v.float() for k, v in weights.items() if not k.endswith(SKIPPED_SUFFIXES)}


def fit_vocab(weights: dict[str, torch.Tensor], rows: int, vocab_size: int) -> None:
    """Resize the embedding and output rows to ``rows`` (the run's padded vocabulary) in place:
    zero rows are appended, or padding rows (ids at or above ``vocab_size``) dropped."""
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name not in weights:
            continue
        w = weights[name]
        if w.shape[0] < rows:
            weights[name] = torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])
        elif w.shape[0] > rows:
            assert rows >= vocab_size, (rows, vocab_size)
            weights[name] = w[:rows]


def copy_tokenizer(hf_dir: Path, dest: Path) -> Path | None:
    """Copy the release's tokenizer files into ``dest``; the sentencepiece model's path (what
    ``data.tokenizer_model`` names), or None when the release has none."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(hf_dir) / name).is_file():
            shutil.copyfile(Path(hf_dir) / name, dest / name)
    model = dest / "tokenizer.model"
    return model if model.is_file() else None
