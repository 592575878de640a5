"""``python -m orchestration.import_hf HF_DIR OUT --model SIZE [--tp N] [--pp M]``

Continue pretraining from released weights: a Hugging Face ``LlamaForCausalLM`` folder becomes
a Megatron dist checkpoint that a run starts from with ``checkpoint.load=OUT`` (the weights
load; Adam starts fresh, as there is no optimizer state to import). The exact inverse of
``orchestration.export``: Q/K/V fused per query group, ``[gate; up]`` stacked into fc1, muP's
multipliers divided back out when the run config has muP, the vocabulary padded (zero rows) as
a TP=N run pads it. The HF config is checked against ``conf/model/SIZE.yaml`` (or a model YAML
path) first, and any key that differs is named.

The checkpoint is written by one CPU process: ``dist_checkpointing`` stores global tensors
and reshards them on load, so it loads at any TP/PP; ``--tp`` decides only the vocabulary
padding (which depends on TP) and ``--pp`` is checked against the layer count. OUT holds the
shards, ``checkpoint_info.json`` (step 0, no optimizer, the source folder), a
``run_config.yaml`` (so ``orchestration.export OUT`` works on it) and the release's tokenizer
files under ``tokenizer/``. It is written as ``OUT.tmp`` and renamed when complete.
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
import time
from pathlib import Path

import torch

from orchestration.checkpoint.layout import INFO_FILE, shape_config
from orchestration.common.files import replacing_dir, write_json_atomic, write_text_atomic
from orchestration.common.quiet import install_warning_filters
from orchestration.config import (
    ConfigError,
    ParallelConfig,
    RunConfig,
    load_model_config,
    load_run_config,
    padded_vocab_size,
    to_dict,
)
from orchestration.config.validate import _model_errors
from orchestration.hf import folder
from orchestration.hf.llama import (
    check_llama_compatible,
    llama_to_megatron,
    mup_factors,
    unfold_mup,
)

log = logging.getLogger(__name__)


def import_config(model: str | Path | None, run_config: Path | None, tp: int, pp: int) -> RunConfig:
    """The run config the checkpoint is for: ``run_config`` (its muP, tokenizer) or defaults,
    with ``model`` (a size name or YAML) as the architecture, checked for a TP=tp/PP=pp run."""
    cfg = load_run_config(run_config) if run_config else RunConfig(name="import_hf")
    if model is not None:
        cfg.model = load_model_config(model)
    cfg.parallel = ParallelConfig(tensor=tp, pipeline=pp)
    errors = _model_errors(cfg.model, cfg.parallel)
    if errors:
        raise ConfigError(f"--model {model} --tp {tp} --pp {pp}: " + "; ".join(errors))
    check_llama_compatible(cfg.model)
    return cfg


def megatron_weights(hf_dir: Path, cfg: RunConfig, tp: int) -> dict[str, torch.Tensor]:
    """The HF folder's weights under Megatron's names, vocabulary padded for TP=tp."""
    m = cfg.model
    weights = folder.read_weights(hf_dir)
    weights = unfold_mup(weights, mup_factors(cfg))
    if m.tie_embeddings and "lm_head.weight" in weights:
        embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
        if not torch.allclose(embed, head, rtol=1e-5, atol=1e-6):
            raise folder.IncompatibleHFConfig(
                f"{hf_dir}: lm_head differs from embed_tokens but model '{m.name}' ties them "
                "(model.tie_embeddings=true)")
    folder.fit_vocab(weights, padded_vocab_size(m, tp), m.vocab_size)
    return llama_to_megatron(weights, m)


def import_hf(hf_dir: Path, out: Path, model: str | Path | None = None, tp: int = 1,
              pp: int = 1, run_config: Path | None = None) -> Path:
    """Write the checkpoint directory ``out`` from the HF folder ``hf_dir``; return ``out``."""
    from megatron_patches.checkpointing import save_weights_only
    from megatron_patches.parallel import single_process_world
    from orchestration.hf.offline import build_cpu_model

    hf_dir, out = Path(hf_dir).resolve(), Path(out).resolve()
    cfg = import_config(model, run_config, tp, pp)
    folder.check_config(folder.read_config(hf_dir), cfg.model, hf_dir)
    weights = megatron_weights(hf_dir, cfg, tp)
    single_process_world()
    megatron = build_cpu_model(cfg, tp)
    _copy_into(megatron, weights, hf_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with replacing_dir(tmp, out):
        save_weights_only(megatron, {"step": 0, "imported_from": str(hf_dir)}, tmp)
        saved = copy.deepcopy(cfg)
        sp_model = folder.copy_tokenizer(hf_dir, tmp / "tokenizer")
        if sp_model is not None:  # where it will be after the rename
            saved.data.tokenizer_model = str(out / "tokenizer" / sp_model.name)
        write_text_atomic(tmp / "run_config.yaml", _yaml(saved))
        write_json_atomic(tmp / INFO_FILE, _info(hf_dir, cfg, tp, pp))
    log.info("imported %s -> %s (model %s, vocab padded for tp=%d)", hf_dir, out,
             cfg.model.name, tp)
    return out


def _copy_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], hf_dir: Path) -> None:
    """Every model tensor from ``weights``, shapes checked; nothing missing, nothing left."""
    state = {k: v for k, v in model.state_dict().items()
             if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    missing, unused = sorted(set(state) - set(weights)), sorted(set(weights) - set(state))
    if missing or unused:
        raise folder.IncompatibleHFConfig(
            f"{hf_dir}: weights do not fit the model (missing {missing[:5]}, unused {unused[:5]})")
    with torch.no_grad():
        for name, tensor in state.items():
            if tensor.shape != weights[name].shape:
                raise folder.IncompatibleHFConfig(
                    f"{hf_dir}: {name} has shape {tuple(weights[name].shape)}, "
                    f"the model needs {tuple(tensor.shape)}")
            tensor.copy_(weights[name])


def _info(hf_dir: Path, cfg: RunConfig, tp: int, pp: int) -> dict:
    """checkpoint_info.json: step 0, weights only, the layout whose vocabulary padding it has
    (export reads ``layout.tp`` for that), and where the weights came from."""
    return {
        "step": 0,
        "time": time.time(),
        "has_optimizer": False,
        "layout": {"tp": tp, "pp": pp, "dp": 1, "world": tp * pp},
        "written_by": "orchestration.import_hf (one process; loads at any TP/PP)",
        "imported_from": {"path": str(hf_dir), "model": cfg.model.name,
                          "mup_unfolded": mup_factors(cfg).__dict__},
        "config": shape_config(to_dict(cfg)),
    }


def _yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", type=Path, help="a Hugging Face LlamaForCausalLM folder")
    p.add_argument("out", type=Path, help="the checkpoint directory to write")
    p.add_argument("--model", help="conf/model/<SIZE>.yaml name or a model YAML path "
                   "(default: the --run-config's model)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the run (vocab "
                   "padding)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the run")
    p.add_argument("--run-config", type=Path, help="the run's config YAML (muP, tokenizer)")
    args = p.parse_args(argv)
    if args.model is None and args.run_config is None:
        p.error("give --model SIZE (or --run-config with the run's model)")
    install_warning_filters()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        import_hf(args.hf_dir, args.out, args.model, args.tp, args.pp, args.run_config)
    except (folder.IncompatibleHFConfig, ConfigError, FileNotFoundError) as err:
        raise SystemExit(f"import_hf: {err}") from None


if __name__ == "__main__":
    main()
