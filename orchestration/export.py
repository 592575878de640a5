"""``python -m orchestration.export CKPT_DIR OUT_DIR [--run-config PATH] [--dtype float32]``

Export a Megatron checkpoint to a Hugging Face ``LlamaForCausalLM`` folder (``Qwen3ForCausalLM``
for a model with ``model.qk_layernorm``, Llama with per-head query/key norms): the weights are
loaded into a TP=1/PP=1 ``GPTModel`` in one CPU process (``orchestration.hf.offline``),
renamed to Llama's layout with muP's multipliers folded in (``orchestration.hf.llama``), and
written with ``config.json``, ``model.safetensors``, the tokenizer files
(``orchestration.hf.tokenizer``) and ``generation_config.json`` into a temporary folder that is
renamed into place, so OUT_DIR is complete or absent.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import torch

from orchestration.checkpoint.layout import read_metadata
from orchestration.common.files import replacing_dir, write_json_atomic
from orchestration.common.quiet import install_warning_filters
from orchestration.config import RunConfig
from orchestration.hf.llama import (
    MupFactors,
    check_llama_compatible,
    fold_mup,
    llama_config,
    megatron_to_llama,
    mup_factors,
)
from orchestration.hf.tokenizer import write_tokenizer

log = logging.getLogger(__name__)
DTYPES = ("float32", "bfloat16", "float16")  # config.json's torch_dtype names


def export(ckpt: Path, out: Path, run_config: Path | None = None, dtype: str = "float32") -> Path:
    """Write the HF folder ``out`` for checkpoint ``ckpt``; return ``out``."""
    from orchestration.hf.offline import checkpoint_run_config, load_megatron_weights

    ckpt, out = Path(ckpt).resolve(), Path(out)
    cfg = checkpoint_run_config(ckpt, run_config)
    check_llama_compatible(cfg.model)
    weights = megatron_to_llama(load_megatron_weights(ckpt, cfg), cfg.model)
    factors = mup_factors(cfg)
    weights = fold_mup(weights, factors)
    tied = "lm_head.weight" not in weights
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    with replacing_dir(tmp, out):
        special = write_tokenizer(cfg, tmp)
        vocab = weights["model.embed_tokens.weight"].shape[0]
        write_json_atomic(tmp / "config.json", llama_config(cfg, vocab, tied, dtype, special))
        gen = {k + "_token_id": v for k, v in special.items() if k in ("bos", "eos", "pad")}
        write_json_atomic(tmp / "generation_config.json", {**gen, "do_sample": False})
        write_json_atomic(tmp / "export_info.json", _provenance(ckpt, cfg, factors))
        _write_safetensors(tmp / "model.safetensors", weights, getattr(torch, dtype))
    log.info("exported %s -> %s", ckpt, out)
    return out


def _provenance(ckpt: Path, cfg: RunConfig, factors: MupFactors) -> dict:
    from megatron_patches.checkpointing import load_common

    return {
        "checkpoint": str(ckpt),
        "step": read_metadata(ckpt).get("step"),
        "saved_at": read_metadata(ckpt).get("time"),  # tells a re-save of the same step apart
        "consumed_tokens": load_common(ckpt).get("trainer", {}).get("consumed_tokens"),
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
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    args = p.parse_args(argv)
    install_warning_filters()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    export(args.checkpoint, args.out, args.run_config, args.dtype)


if __name__ == "__main__":
    main()
