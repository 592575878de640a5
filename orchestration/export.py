"""Export a Megatron checkpoint to a Hugging Face ``LlamaForCausalLM`` folder.

``python -m orchestration.export CKPT_DIR OUT_DIR [--run-config PATH] [--dtype float32]``

Why a converter of our own: the checkpoint is sharded by ``dist_checkpointing`` at whatever
TP/PP layout it was saved with, and the model may carry muP multipliers that plain Llama does
not have. This module loads the weights into a TP=1/PP=1 ``GPTModel`` in one CPU process
(Megatron reshards on load), renames them to Llama's layout (split fused QKV per query group,
split SwiGLU's ``[gate; up]``), folds muP's multipliers into the weights, and writes
``config.json``, ``model.safetensors``, tokenizer files and ``generation_config.json`` into a
temporary folder that is renamed into place, so OUT_DIR is complete or absent.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from orchestration.config import (
    ModelConfig,
    ParallelConfig,
    RunConfig,
    padded_vocab_size,
    to_run_config,
)

log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPO_DIR = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- run config
def run_config_candidates(ckpt: Path) -> list[Path]:
    """Where a checkpoint's run config lives, best first.

    A checkpoint may carry its own ``run_config.yaml`` (averaged checkpoints do). The run
    record's copy (newest job start) was resolved when the run started, so it holds
    the paths and values training used; Hydra's ``.hydra/config.yaml`` is unresolved
    (``${hydra:...}``, ``${oc.env:...}``) and is resolved here, against today's environment.
    """
    run_dir = Path(ckpt).resolve().parent.parent
    records = sorted((run_dir / "record").glob("*/config.yaml"), key=lambda p: p.parent.name)
    return [Path(ckpt) / "run_config.yaml", *reversed(records), run_dir / ".hydra" / "config.yaml"]


def load_run_config(ckpt: Path, override: Path | None = None) -> RunConfig:
    """The RunConfig a checkpoint was trained with (``override`` wins when given)."""
    from omegaconf import OmegaConf

    candidates = [Path(override)] if override else run_config_candidates(ckpt)
    errors = []
    for path in candidates:
        if not path.is_file():
            continue
        conf = OmegaConf.load(path)
        conf.run_dir = str(Path(ckpt).resolve().parent.parent)  # `${hydra:...}` in .hydra
        try:
            return to_run_config(conf)
        except Exception as err:  # an interpolation that only resolves inside Hydra
            errors.append(f"{path}: {err}")
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"no usable run config for {ckpt} (tried {tried}; {errors}); pass --run-config PATH"
    )


def resolve_path(path: str) -> Path:
    """A config path as training saw it: absolute, or relative to the cwd or the repo."""
    for candidate in (Path(path), Path.cwd() / path, REPO_DIR / path):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path} not found (also tried relative to {REPO_DIR})")


# ----------------------------------------------------------------------------- muP folding
@dataclass
class MupFactors:
    """What muP multiplies at run time, to be multiplied into plain Llama weights instead."""

    embedding: float = 1.0  # the embedding output
    logits: float = 1.0  # the output layer's logits
    query: float = 1.0  # queries, turning Llama's 1/sqrt(d) into muP's 1/d**power


def mup_factors(cfg: RunConfig) -> MupFactors:
    """muP's multipliers from the config: output_multiplier / width_mult on the logits, and
    d**(0.5 - power) on q, since q.k * d**(0.5 - power) / sqrt(d) == q.k / d**power."""
    mup = cfg.mup
    if not mup.enabled:
        return MupFactors()
    m = cfg.model
    head_dim = m.hidden_size // m.num_attention_heads
    return MupFactors(
        embedding=mup.embedding_multiplier,
        logits=mup.output_multiplier * mup.base_width / m.hidden_size,
        query=head_dim ** (0.5 - mup.attention_scale_power),
    )


def fold_mup(weights: dict[str, torch.Tensor], f: MupFactors) -> dict[str, torch.Tensor]:
    """Llama weights whose plain forward equals the muP forward (RoPE is linear, so scaling q
    before or after it is the same). A tied embedding is untied when the two factors differ."""
    out = dict(weights)
    embed = weights["model.embed_tokens.weight"]
    if "lm_head.weight" in weights:
        out["lm_head.weight"] = weights["lm_head.weight"] * f.logits
    elif f.logits != f.embedding:
        out["lm_head.weight"] = embed * f.logits
    out["model.embed_tokens.weight"] = embed * f.embedding
    for name, tensor in weights.items():
        if name.endswith("self_attn.q_proj.weight"):
            out[name] = tensor * f.query
    return out


# ----------------------------------------------------------------------------- tokenizer
def sentencepiece_to_tokenizers(model_file: Path):
    """A ``tokenizers.Tokenizer`` that segments exactly as the sentencepiece model does.

    Built from the model proto rather than with transformers' converters, whose behaviour and
    API change between releases: BPE (merges ranked by piece id) or Unigram, byte fallback,
    the normaliser's charsmap, whitespace collapsing and dummy prefix as the proto says.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, p.score) for p in proto.pieces]
    if ts.model_type == 1:  # unigram
        model = Unigram(pieces, unk_id=ts.unk_id, byte_fallback=ts.byte_fallback)
    elif ts.model_type == 2:  # bpe
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        normal = [p.piece for p in proto.pieces if p.type == 1]
        model = BPE(
            vocab,
            _bpe_merges(normal, vocab),
            unk_token=ts.unk_piece,
            fuse_unk=True,
            byte_fallback=ts.byte_fallback,
        )
    else:
        raise ValueError(f"{model_file}: sentencepiece model_type {ts.model_type} unsupported")
    tok = Tokenizer(model)
    steps = [normalizers.Precompiled(ns.precompiled_charsmap)] if ns.precompiled_charsmap else []
    if ns.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " ")]
    if ts.byte_fallback:
        dec.append(decoders.ByteFallback())
    dec.append(decoders.Fuse())  # one string, so Strip drops only the dummy prefix's space
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens(
        [AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type == 3]
    )
    tok.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces if p.type == 4])
    return tok


def _bpe_merges(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, ranked by the merged piece's id (its score)."""
    merges = []
    for piece in sorted(pieces, key=vocab.__getitem__):
        splits = [
            (piece[:i], piece[i:])
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    return merges


def write_tokenizer(cfg: RunConfig, out: Path) -> dict[str, int]:
    """tokenizer.model, tokenizer.json and configs; return the special token ids."""
    import sentencepiece as spm

    model_file = resolve_path(cfg.data.tokenizer_model)
    shutil.copyfile(model_file, out / "tokenizer.model")
    sentencepiece_to_tokenizers(model_file).save(str(out / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()}
    ids = {k: v for k, v in ids.items() if v >= 0}
    tokens = {f"{k}_token": sp.id_to_piece(v) for k, v in ids.items()}
    _write_json(out / "special_tokens_map.json", tokens)
    _write_json(
        out / "tokenizer_config.json",
        {
            # Training data has no BOS (documents end in EOD), so neither do encoded prompts.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "model_max_length": cfg.model.seq_length,
            **tokens,
        },
    )
    return ids


# ----------------------------------------------------------------------------- model


class UnsupportedArchitecture(ValueError):
    """The run's architecture has no plain ``LlamaForCausalLM`` equivalent."""


def check_llama_compatible(m: ModelConfig) -> None:
    """Raise naming each model field that LlamaForCausalLM cannot express."""
    wanted = {
        "normalization": "RMSNorm",
        "activation": "swiglu",
        "add_bias_linear": False,
        "position_embedding": "rope",
        "rotary_percent": 1.0,
    }
    bad = [
        f"model.{k}={getattr(m, k)!r} (Llama needs {v!r})"
        for k, v in wanted.items()
        if getattr(m, k) != v
    ]
    if bad:
        raise UnsupportedArchitecture("cannot export to LlamaForCausalLM: " + "; ".join(bad))


def init_single_process(seed: int = 1234) -> None:
    """This process as a 1-rank gloo world with TP=PP=1 (reused if it already is one)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_patches import cpu_compat
    from orchestration.distributed import seed_everything

    cpu_compat.enable(force=True)  # export always runs on CPU
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    if not get_cuda_rng_tracker().get_states():  # attention forks it even without dropout
        seed_everything(seed)
    sizes = (
        dist.get_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    if sizes != (1, 1, 1):
        raise RuntimeError(f"export needs a 1-process TP=PP=1 world, found world/tp/pp={sizes}")


def build_cpu_model(cfg: RunConfig, saved_tp: int):
    """An uninitialised fp32 TP=1 GPTModel with the vocabulary padded as it was saved."""
    from orchestration.build import build_megatron_configs
    from orchestration.model import build_gpt_model

    cfg = copy.deepcopy(cfg)
    cfg.parallel = ParallelConfig(tensor=1, pipeline=1, sequence_parallel=False)
    cfg.train.precision, cfg.runtime.device = "fp32", "cpu"
    cfg.mup.enabled = False  # multipliers are folded into the weights, not run
    mc = build_megatron_configs(cfg, on_cpu=True)
    mc.padded_vocab_size = padded_vocab_size(cfg.model, saved_tp)
    mc.transformer.perform_initialization = False  # every weight comes from the checkpoint
    return build_gpt_model(cfg, mc)


def load_megatron_weights(ckpt: Path, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's full (unsharded) model weights under Megatron's TP=1 names."""
    from orchestration import checkpoint

    init_single_process()
    saved_tp = int(checkpoint.read_metadata(ckpt).get("layout", {}).get("tp", 1))
    model = build_cpu_model(cfg, saved_tp)
    checkpoint.load(ckpt, model, None, with_optimizer=False)
    return {
        k: v.detach()
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
    }


def megatron_to_llama(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename and split Megatron's fused tensors into Llama's (no rescaling here)."""
    heads, groups, hidden = m.num_attention_heads, m.num_query_groups, m.hidden_size
    head_dim, per_group = hidden // heads, heads // groups
    out = {
        "model.embed_tokens.weight": sd["embedding.word_embeddings.weight"],
        "model.norm.weight": sd["decoder.final_layernorm.weight"],
    }
    if "output_layer.weight" in sd and not m.tie_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"]
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        # Rows are grouped per query group: [per_group query heads, 1 key, 1 value] x head_dim.
        qkv = sd[src + "self_attention.linear_qkv.weight"].view(
            groups, per_group + 2, head_dim, hidden
        )
        out[dst + "self_attn.q_proj.weight"] = qkv[:, :per_group].reshape(-1, hidden)
        out[dst + "self_attn.k_proj.weight"] = qkv[:, per_group].reshape(-1, hidden)
        out[dst + "self_attn.v_proj.weight"] = qkv[:, per_group + 1].reshape(-1, hidden)
        out[dst + "self_attn.o_proj.weight"] = sd[src + "self_attention.linear_proj.weight"]
        gate, up = sd[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)  # SwiGLU: [gate; up]
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.linear_fc2.weight"]
        out[dst + "input_layernorm.weight"] = sd[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "pre_mlp_layernorm.weight"]
    return out


def llama_config(
    cfg: RunConfig, vocab: int, tied: bool, dtype: str, special: dict[str, int]
) -> dict:
    """config.json contents (LlamaConfig's fields; read by transformers 4.45+ and 5)."""
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(m.rotary_base),
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": m.init_method_std,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        "use_cache": True,
        **{f"{k}_token_id": v for k, v in special.items() if k in ("bos", "eos", "pad")},
    }


def export(ckpt: Path, out: Path, run_config: Path | None = None, dtype: str = "float32") -> Path:
    """Write the HF folder ``out`` for checkpoint ``ckpt``; return ``out``."""
    ckpt, out = Path(ckpt).resolve(), Path(out)
    cfg = load_run_config(ckpt, run_config)
    check_llama_compatible(cfg.model)
    weights = megatron_to_llama(load_megatron_weights(ckpt, cfg), cfg.model)
    factors = mup_factors(cfg)
    weights = fold_mup(weights, factors)
    tied = "lm_head.weight" not in weights
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        special = write_tokenizer(cfg, tmp)
        vocab = weights["model.embed_tokens.weight"].shape[0]
        _write_json(tmp / "config.json", llama_config(cfg, vocab, tied, dtype, special))
        gen = {k + "_token_id": v for k, v in special.items() if k in ("bos", "eos", "pad")}
        _write_json(tmp / "generation_config.json", {**gen, "do_sample": False})
        _write_json(tmp / "export_info.json", _provenance(ckpt, cfg, factors))
        _write_safetensors(tmp / "model.safetensors", weights, _DTYPES[dtype])
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s -> %s", ckpt, out)
    return out


def _provenance(ckpt: Path, cfg: RunConfig, factors: MupFactors) -> dict:
    from orchestration.checkpoint import read_metadata

    return {
        "checkpoint": str(ckpt),
        "step": read_metadata(ckpt).get("step"),
        "run_name": cfg.name,
        "mup_folded": factors.__dict__,
    }


def _write_safetensors(path: Path, weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.to(dtype).contiguous().clone() for k, v in weights.items()}
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.chmod(partial, 0o644)
    os.replace(partial, path)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="a step_XXXXXXXX checkpoint directory")
    p.add_argument("out", type=Path, help="the Hugging Face folder to write")
    p.add_argument(
        "--run-config",
        type=Path,
        default=None,
        help="run config YAML (default: the run's record/*/config.yaml or .hydra)",
    )
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    export(args.checkpoint, args.out, args.run_config, args.dtype)


if __name__ == "__main__":
    main()
