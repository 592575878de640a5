"""Import from Hugging Face: the inverse of export, checked end to end.

Export -> import -> export gives byte-identical safetensors; a Llama made by transformers
itself (unpadded vocabulary, its own init) imports to a Megatron model with HF's logits at
TP=1 (in process) and TP=2 / PP=2 (two spawned gloo ranks loading the same checkpoint); a run
started from the imported checkpoint trains exactly as one started from the original.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml
from test_export import (
    TOKENS,
    _free_port,
    export_cfg,
    hf_logits,
    megatron_logits,
    save_random_checkpoint,
)

VOCAB = 300  # export_cfg's tokenizer size: padded to 320 at TP=1, 384 at TP=2


def model_yaml(cfg, path: Path) -> Path:
    """The test run's architecture as a model YAML (what --model accepts besides a name)."""
    from orchestration.config import to_dict

    path.write_text(yaml.safe_dump({"model": to_dict(cfg)["model"]}))
    return path


@pytest.fixture(scope="module")
def hf_native(corpus, tmp_path_factory) -> tuple[object, Path]:
    """(cfg, folder): a LlamaForCausalLM saved by transformers, vocab 300 (unpadded), with
    the run's sentencepiece model as its tokenizer."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf_native")
    cfg = export_cfg(corpus, root / "run")
    m = cfg.model
    hf_cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, rms_norm_eps=m.norm_epsilon,
        rope_theta=float(m.rotary_base), max_position_embeddings=m.seq_length,
        tie_word_embeddings=False, initializer_range=0.5,  # logits large enough to compare
    )
    torch.manual_seed(3)
    model = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norms away from 1 so that a swapped norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(root / "hf")
    shutil.copyfile(corpus["tokenizer"], root / "hf" / "tokenizer.model")
    return cfg, root / "hf"


def test_export_import_export_is_identical(megatron_env, corpus, tmp_path):
    from orchestration.export import export
    from orchestration.import_hf import main

    cfg = export_cfg(corpus, tmp_path / "run")
    ckpt, model = save_random_checkpoint(cfg)
    first = export(ckpt, tmp_path / "hf1")
    out = tmp_path / "imported"
    main([str(first), str(out), "--model", str(model_yaml(cfg, tmp_path / "m.yaml"))])
    second = export(out, tmp_path / "hf2")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer.model"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    info = __import__("json").loads((out / "checkpoint_info.json").read_text())
    assert info["step"] == 0 and info["has_optimizer"] is False
    assert not list(tmp_path.glob("*.tmp")), "written under a temporary name, renamed"


def test_transformers_llama_imports_with_its_logits(megatron_env, hf_native, tmp_path):
    from orchestration.checkpoint import store
    from orchestration.hf.offline import build_cpu_model
    from orchestration.import_hf import import_hf

    cfg, hf_dir = hf_native
    out = import_hf(hf_dir, tmp_path / "imported", model_yaml(cfg, tmp_path / "m.yaml"))
    model = build_cpu_model(cfg, 1)
    store.load(out, model, None, with_optimizer=False)
    got, ref = megatron_logits(model, TOKENS), hf_logits(hf_dir, TOKENS)
    assert got.shape[-1] == 320 and ref.shape[-1] == VOCAB
    assert ref.std() > 1.0, "logits large enough for the tolerance to mean something"
    torch.testing.assert_close(got[..., :VOCAB], ref, atol=1e-4, rtol=1e-4)
    assert (got[..., VOCAB:] == 0).all(), "padding rows are zero"
    assert (out / "tokenizer" / "tokenizer.model").is_file()


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_imported_checkpoint_loads_at_tp2_and_pp2(hf_native, tmp_path, tp, pp):
    import torch.multiprocessing as mp

    from orchestration.import_hf import main

    cfg, hf_dir = hf_native
    out = tmp_path / "imported"
    main([str(hf_dir), str(out), "--model", str(model_yaml(cfg, tmp_path / "m.yaml")),
          "--tp", str(tp), "--pp", str(pp)])
    cfg = copy.deepcopy(cfg)
    cfg.parallel.tensor, cfg.parallel.pipeline = tp, pp
    mp.start_processes(_logits_worker, args=(2, _free_port(), cfg, str(out), str(tmp_path)),
                       nprocs=2, join=True, start_method="spawn")
    got = torch.load(tmp_path / "logits.pt")
    assert got.shape[-1] == (384 if tp == 2 else 320)
    torch.testing.assert_close(got[..., :VOCAB], hf_logits(hf_dir, TOKENS), atol=1e-4, rtol=1e-4)


def _logits_worker(rank: int, world: int, port: int, cfg, ckpt: str, out_dir: str) -> None:
    """Load the imported checkpoint at cfg's layout; the last stage's rank 0 saves logits.
    With PP=2 the first stage's hidden states go to the second by a plain send/recv."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch.distributed as dist

    from megatron_patches.configs import build_megatron_configs
    from megatron_patches.model import build_gpt_model
    from orchestration.checkpoint import store
    from orchestration.cluster.distributed import init_distributed, shutdown

    init_distributed(cfg)
    model = build_gpt_model(cfg, build_megatron_configs(cfg, on_cpu=True))
    store.load(Path(ckpt), model, None, with_optimizer=False)
    model.eval()
    positions = torch.arange(TOKENS.shape[1]).unsqueeze(0)
    with torch.no_grad():
        if cfg.parallel.pipeline == 1:
            logits = megatron_logits(model, TOKENS)
        elif rank == 0:  # first stage: embedding + its layers -> [seq, batch, hidden]
            dist.send(model(TOKENS, positions, None).contiguous(), dst=1)
            logits = None
        else:
            hidden = torch.empty(TOKENS.shape[1], 1, cfg.model.hidden_size)
            dist.recv(hidden, src=0)
            model.set_input_tensor(hidden)
            logits = model(TOKENS, positions, None, runtime_gather_output=True)
    if logits is not None and rank == world - 1:
        torch.save(logits.float(), Path(out_dir) / "logits.pt")
    shutdown()


@pytest.mark.slow  # ~30 s on 2 cores: two spawned training runs
def test_training_starts_from_the_imported_checkpoint(megatron_env, corpus, tmp_path):
    """A run from export->import of a checkpoint has the losses of a run from the checkpoint
    itself: the import lost nothing the training model uses."""
    from dist import run_single

    from orchestration.export import export
    from orchestration.import_hf import import_hf

    cfg = export_cfg(corpus, tmp_path / "src")
    ckpt, _ = save_random_checkpoint(cfg)
    imported = import_hf(export(ckpt, tmp_path / "hf"), tmp_path / "imported",
                         model_yaml(cfg, tmp_path / "m.yaml"))
    losses = {}
    for name, start in (("original", ckpt), ("imported", imported)):
        run = copy.deepcopy(cfg)
        run.run_dir = str(tmp_path / name)
        run.checkpoint.load, run.checkpoint.load_optimizer = str(start), False
        run.train.max_steps = 2
        losses[name] = run_single(run)["losses"]
    assert len(losses["imported"]) == 2
    assert losses["imported"] == losses["original"]


def test_wrong_model_size_names_the_differing_keys(hf_native, tmp_path):
    from orchestration.import_hf import main

    cfg, hf_dir = hf_native
    with pytest.raises(SystemExit) as err:
        main([str(hf_dir), str(tmp_path / "out"), "--model", "tiny"])
    message = str(err.value)
    assert "\n" not in message
    for key in ("hidden_size: HF 64, model 128", "num_hidden_layers: HF 2, model 4",
                "intermediate_size", "vocab_size: HF 300", "rms_norm_eps", "rope_theta"):
        assert key in message, (key, message)
    assert "num_attention_heads" not in message  # 4 and 4: only differing keys are named
    assert not (tmp_path / "out").exists()


def test_config_check_reads_transformers_5_rope_parameters():
    from orchestration.config import ModelConfig
    from orchestration.hf.folder import config_differences

    m = ModelConfig()
    hf = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 352,
          "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
          "rms_norm_eps": 1e-5, "vocab_size": 4096, "hidden_act": "silu",
          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    assert config_differences(hf, m) == []
    llama3 = {**hf, "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0}}
    assert config_differences(llama3, m) == ["rope_scaling: HF 'llama3', model None"]


@pytest.mark.parametrize("tied", [False, True])
def test_mup_run_imports_with_multipliers_divided_out(megatron_env, corpus, tmp_path, tied):
    """A muP checkpoint exported (multipliers folded) and imported into the same muP run
    (--run-config) gives the exported Llama's logits through the muP forward; a tied run's
    untied export is tied again."""
    from test_export import save_mup_checkpoint

    from megatron_patches.configs import build_megatron_configs
    from megatron_patches.model import build_gpt_model
    from orchestration.checkpoint import store
    from orchestration.config import to_dict
    from orchestration.export import export
    from orchestration.import_hf import import_hf

    cfg, path, model = save_mup_checkpoint(corpus, tmp_path / "run", tied, seed=2)
    hf_dir = export(path, tmp_path / "hf")
    run_config = tmp_path / "run_config.yaml"
    run_config.write_text(yaml.safe_dump(to_dict(cfg)))
    out = import_hf(hf_dir, tmp_path / "imported", run_config=run_config)
    again = build_gpt_model(cfg, build_megatron_configs(cfg, on_cpu=True))
    store.load(out, again, None, with_optimizer=False)
    torch.testing.assert_close(megatron_logits(again, TOKENS), hf_logits(hf_dir, TOKENS),
                               atol=1e-4, rtol=1e-4)
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, torch.Tensor) and not name.endswith("_extra_state"):
            torch.testing.assert_close(again.state_dict()[name], tensor, atol=1e-6, rtol=1e-6)


def test_old_pytorch_bin_release_with_rope_buffers(megatron_env, hf_native, tmp_path):
    """pytorch_model.bin (pre-safetensors releases), with the rotary inv_freq buffers old Llama
    checkpoints saved: the same checkpoint as from the safetensors folder."""
    import shutil

    from safetensors.torch import load_file

    from orchestration.hf.folder import read_weights
    from orchestration.import_hf import import_hf

    cfg, hf_dir = hf_native
    old = tmp_path / "old"
    shutil.copytree(hf_dir, old)
    weights = load_file(str(old / "model.safetensors"))
    (old / "model.safetensors").unlink()
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(weights, old / "pytorch_model.bin")
    got, ref = read_weights(old), read_weights(hf_dir)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    out = import_hf(old, tmp_path / "imported", model_yaml(cfg, tmp_path / "m.yaml"))
    assert (out / "checkpoint_info.json").is_file()
