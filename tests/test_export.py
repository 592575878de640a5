"""Export to Hugging Face: the LlamaForCausalLM gives the Megatron model's logits.

Checkpoints here hold random weights of a realistic scale (not the 0.02-std init, whose tiny
logits would make an fp32 tolerance meaningless), written in-process with the run's own
``checkpoint.save``; the TP=2 one by two spawned gloo ranks, which also record their own
logits and greedy tokens as the reference. Helpers are imported by the other eval tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
TOKENS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64, 128, 31, 9]])


def export_cfg(corpus: dict, run_dir: Path, tp: int = 1):
    """Tiny GQA model, untied, padded vocabulary (300 -> 320 at TP=1, 384 at TP=2)."""
    from conftest import make_tiny_cfg

    cfg = make_tiny_cfg(corpus, run_dir)
    cfg.model.vocab_size, cfg.model.num_attention_heads, cfg.model.num_query_groups = 300, 4, 2
    cfg.model.rotary_base, cfg.model.norm_epsilon = 5000, 1e-6
    cfg.parallel.tensor = tp
    return cfg


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Same draws on every rank: replicated norms stay consistent across TP shards."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(noise * (1.0 if "word_embeddings" in name else p.shape[-1] ** -0.5))


def write_record(cfg) -> None:
    """The resolved run config where a training run's record puts it."""
    import yaml

    from orchestration.config import to_dict

    record = Path(cfg.run_dir) / "record" / "20250101T000000Z-test"
    record.mkdir(parents=True, exist_ok=True)
    (record / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def save_random_checkpoint(cfg, step: int = 1, seed: int = 0):
    """(checkpoint path, model) for a random-weight TP=1 model; needs ``megatron_env``."""
    from orchestration.checkpoint import layout as ckpt
    from orchestration.checkpoint import store
    from orchestration.hf.offline import build_cpu_model

    model = build_cpu_model(cfg, 1)
    randomize(model, seed)
    write_record(cfg)
    path = store.save(ckpt.checkpoint_dir(cfg.run_dir), step, model, None, {"step": step}, 0)
    return path, model


def save_mup_checkpoint(corpus: dict, run_dir: Path, tied: bool, seed: int):
    """(cfg, checkpoint path, model) of a random-weight muP run, built by the real muP model
    (base width 16, multipliers 4 and 3, attention scale power 0.75); needs ``megatron_env``."""
    from megatron_patches.configs import build_megatron_configs
    from megatron_patches.model import build_gpt_model
    from orchestration.checkpoint import layout as ckpt
    from orchestration.checkpoint import store

    cfg = export_cfg(corpus, run_dir)
    cfg.mup.enabled, cfg.mup.base_width = True, 16
    cfg.mup.embedding_multiplier, cfg.mup.output_multiplier = 4.0, 3.0
    cfg.mup.attention_scale_power, cfg.model.tie_embeddings = 0.75, tied
    model = build_gpt_model(cfg, build_megatron_configs(cfg, on_cpu=True))
    randomize(model, seed)
    write_record(cfg)
    path = store.save(ckpt.checkpoint_dir(cfg.run_dir), 1, model, None, {"step": 1}, 0)
    return cfg, path, model


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    positions = torch.arange(tokens.shape[1]).unsqueeze(0)
    with torch.no_grad():
        return model(tokens, positions, None, runtime_gather_output=True).float()


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).float().eval()


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(path)(tokens).logits.float()


def test_tp1_export_matches_megatron(megatron_env, corpus, tmp_path):
    import json

    from orchestration.export import main

    cfg = export_cfg(corpus, tmp_path / "run")
    ckpt, model = save_random_checkpoint(cfg)
    out = tmp_path / "hf"
    main([str(ckpt), str(out)])  # run config found in the run's record/
    ref, got = megatron_logits(model, TOKENS), hf_logits(out, TOKENS)
    assert ref.shape == got.shape == (1, TOKENS.shape[1], 320)
    assert ref.std() > 1.0, "logits large enough for the tolerance to mean something"
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_key_value_heads"], config["rope_theta"]) == (2, 5000.0)
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "float32"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf")] == [], "no temp"


@pytest.mark.distributed
def test_tp2_export_and_generation(corpus, tmp_path):
    """A checkpoint saved at TP=2 exports to the TP=2 model's logits, and
    greedy_generate at TP=2 picks the tokens the exported model's argmax picks."""
    import torch.multiprocessing as mp

    from orchestration.export import export

    cfg = export_cfg(corpus, tmp_path / "run", tp=2)
    mp.start_processes(
        _tp2_worker,
        args=(2, _free_port(), cfg, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="spawn",
    )
    out = export(Path(cfg.run_dir) / "checkpoints" / "step_00000001", tmp_path / "hf")
    ref = torch.load(tmp_path / "tp2_logits.pt")
    assert ref.shape[-1] == 384  # padded for TP=2, kept as saved
    torch.testing.assert_close(hf_logits(out, TOKENS), ref, atol=1e-4, rtol=1e-4)
    generated = torch.load(tmp_path / "tp2_generated.pt")
    assert generated == hf_greedy(hf_model(out), TOKENS[0, :5].tolist(), len(generated))


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Reference decoding: argmax of the exported model's full forward, token by token."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def _tp2_worker(rank: int, world: int, port: int, cfg, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    from megatron_patches.configs import build_megatron_configs
    from megatron_patches.generation import greedy_generate
    from megatron_patches.model import build_gpt_model
    from orchestration.checkpoint import layout as ckpt
    from orchestration.checkpoint import store
    from orchestration.cluster.distributed import init_distributed, shutdown

    init_distributed(cfg)
    model = build_gpt_model(cfg, build_megatron_configs(cfg, on_cpu=True))
    randomize(model, seed=0)
    if rank == 0:
        write_record(cfg)
    store.save(ckpt.checkpoint_dir(cfg.run_dir), 1, model, None, {"step": 1}, 0)
    logits = megatron_logits(model, TOKENS)
    generated = greedy_generate(model, TOKENS[0, :5].tolist(), max_new_tokens=6)
    if rank == 0:
        torch.save(logits, Path(out_dir) / "tp2_logits.pt")
        torch.save(generated, Path(out_dir) / "tp2_generated.pt")
    shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_non_llama_architecture_is_refused():
    from orchestration.config import ModelConfig
    from orchestration.hf.llama import UnsupportedArchitecture, check_llama_compatible

    check_llama_compatible(ModelConfig())
    crystal = ModelConfig(normalization="LayerNorm", add_bias_linear=True, rotary_percent=0.25)
    with pytest.raises(UnsupportedArchitecture) as err:
        check_llama_compatible(crystal)
    for field in ("model.normalization", "model.add_bias_linear", "model.rotary_percent"):
        assert field in str(err.value)


@pytest.mark.parametrize("style", ["test_corpus", "byte_fallback"])
def test_tokenizer_json_segments_like_sentencepiece(corpus, tmp_path, style):
    """tokenizer.json (what transformers loads) encodes and decodes as sentencepiece does,
    for the test corpus's NFKC model and for data_prep's identity/byte-fallback settings."""
    import sentencepiece as spm

    from orchestration.hf.tokenizer import sentencepiece_to_tokenizers

    model_file = Path(corpus["tokenizer"])
    if style == "byte_fallback":
        from corpus import sentences

        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences(2000, seed=1)),
            model_prefix=str(tmp_path / "bf"),
            vocab_size=300,
            model_type="bpe",
            byte_fallback=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            split_digits=True,
            num_threads=1,
            minloglevel=2,
        )
        model_file = tmp_path / "bf.model"
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tok = sentencepiece_to_tokenizers(model_file)
    for text in [
        "the cat sees a red ball.",
        "3 plus 4 equals 7.",
        "  two  spaces ",
        "Ünïcödé ✓ 漢字",
        "tab\there\nnew line",
        "x",
        "1234567",
    ]:
        ids = sp.encode(text)
        assert tok.encode(text).ids == ids, text
        if sp.unk_id() not in ids:  # sentencepiece renders <unk> as " \u2047 "
            assert tok.decode(ids) == sp.decode(ids), text


def test_mup_folding_reproduces_the_mup_forward():
    """A Llama run as muP runs it (embedding x m_emb, scores / d**power, logits x
    m_out / width_mult) equals the plain Llama forward of the folded weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestration.config import RunConfig
    from orchestration.hf.llama import fold_mup, mup_factors

    cfg = RunConfig()
    cfg.model.hidden_size, cfg.model.num_attention_heads = 64, 4  # head_dim 16
    cfg.mup.enabled, cfg.mup.base_width = True, 16  # width_mult 4
    cfg.mup.embedding_multiplier, cfg.mup.output_multiplier = 10.0, 2.0
    cfg.mup.attention_scale_power = 1.0
    f = mup_factors(cfg)
    assert (f.embedding, f.logits, f.query) == pytest.approx((10.0, 0.5, 16**-0.5))

    hf_cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    mup_model = LlamaForCausalLM(hf_cfg).eval()
    for layer in mup_model.model.layers:
        layer.self_attn.scaling = 16**-1.0  # muP: 1/d instead of 1/sqrt(d)
    plain = LlamaForCausalLM(hf_cfg).eval()
    plain.load_state_dict(fold_mup(mup_model.state_dict(), f))
    with torch.no_grad():
        embeds = mup_model.model.embed_tokens(TOKENS) * 10.0
        ref = mup_model(inputs_embeds=embeds).logits * (2.0 / 4)
        got = plain(TOKENS).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_mup_folding_unties_a_tied_embedding():
    """Tied weights serve as embedding and output with different multipliers: export unties."""
    from orchestration.hf.llama import MupFactors, fold_mup

    w = torch.randn(8, 4)
    out = fold_mup({"model.embed_tokens.weight": w}, MupFactors(embedding=3.0, logits=0.5))
    torch.testing.assert_close(out["model.embed_tokens.weight"], w * 3.0)
    torch.testing.assert_close(out["lm_head.weight"], w * 0.5)
    same = fold_mup({"model.embed_tokens.weight": w}, MupFactors(embedding=2.0, logits=2.0))
    assert "lm_head.weight" not in same


def _mup_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("megatron_patches.mup") is not None


@pytest.mark.skipif(not _mup_available(), reason="megatron_patches/mup.py not there yet")
@pytest.mark.parametrize("tied", [False, True])
def test_mup_checkpoint_exports_with_multipliers_folded(megatron_env, corpus, tmp_path, tied):
    """End to end with the real muP model: its logits equal the exported plain Llama's
    (a tied embedding comes out untied, its two multipliers differing)."""
    import json

    from orchestration.export import export

    _, path, model = save_mup_checkpoint(corpus, tmp_path / "run", tied, seed=1)
    out = export(path, tmp_path / "hf")
    torch.testing.assert_close(
        hf_logits(out, TOKENS), megatron_logits(model, TOKENS), atol=1e-4, rtol=1e-4
    )
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_exported_copy_of_config(tmp_path):
    """A checkpoint's own run_config.yaml (averaged checkpoints) wins over the run's."""
    from orchestration.hf.offline import run_config_candidates

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    found = run_config_candidates(ckpt)
    assert found[0] == ckpt.resolve() / "run_config.yaml"
    assert found[-1] == tmp_path.resolve() / "run" / ".hydra" / "config.yaml"


def test_hydra_config_is_used_without_a_record(tmp_path):
    """Hydra's unresolved copy works outside Hydra: its run_dir is the checkpoint's run."""
    import yaml

    from orchestration.config import RunConfig, to_dict
    from orchestration.hf.offline import checkpoint_run_config as load_run_config

    cfg = RunConfig()
    cfg.model.num_layers = 3
    conf = {**to_dict(cfg), "run_dir": "${hydra:runtime.output_dir}"}
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(yaml.safe_dump(conf))
    loaded = load_run_config(tmp_path / "run" / "checkpoints" / "step_00000001")
    assert loaded.model.num_layers == 3 and loaded.run_dir == str((tmp_path / "run").resolve())
