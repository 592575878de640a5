"""Greedy decoding with the Megatron model, and the sample-gallery callback.

The reference is the exported Hugging Face model's argmax (the export itself is checked
against Megatron's logits in test_export.py); TP=2 decoding is covered there too.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_export import export_cfg, hf_greedy, hf_model, save_random_checkpoint


@pytest.fixture
def tiny(megatron_env, corpus, tmp_path):
    """(cfg, model, exported HF folder) of a random-weight tiny model."""
    from orchestration.export import export

    cfg = export_cfg(corpus, tmp_path / "run")
    path, model = save_random_checkpoint(cfg)
    return cfg, model, export(path, tmp_path / "hf")


def test_greedy_matches_exported_model_and_restores_mode(tiny):
    from megatron_patches.generation import greedy_generate

    cfg, model, hf_dir = tiny
    model.train()
    prompt = [5, 17, 42]
    new = greedy_generate(model, prompt, max_new_tokens=8)
    assert new == hf_greedy(hf_model(hf_dir), prompt, 8)
    assert model.training, "training mode restored"
    assert greedy_generate(model, prompt, 8) == new, "deterministic"


def test_eod_stops_and_padding_is_excluded(tiny):
    from megatron_patches.generation import greedy_generate

    _, model, _ = tiny
    full = greedy_generate(model, [5, 17, 42], max_new_tokens=6)
    eod = full[2]
    assert greedy_generate(model, [5, 17, 42], 6, eod_id=eod) == full[: full.index(eod)]
    capped = greedy_generate(model, [5, 17, 42], 6, vocab_size=256)
    assert all(t < 256 for t in capped)  # rows 256..319 are vocabulary padding
    long_prompt = list(range(1, 80))  # longer than seq_length 64: the newest tokens are kept
    assert greedy_generate(model, long_prompt, 2) == greedy_generate(model, long_prompt[-64:], 2)


def test_pipeline_parallel_is_refused(tiny, monkeypatch):
    from megatron.core import parallel_state

    from megatron_patches.generation import greedy_generate

    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_world_size", lambda: 2)
    with pytest.raises(NotImplementedError, match="pipeline"):
        greedy_generate(tiny[1], [1, 2], 3)


def test_sample_gallery_writes_every_n_steps_and_at_the_end(tiny):
    import sentencepiece as spm

    from megatron_patches.generation import greedy_generate
    from orchestration.callbacks.samples import SampleGalleryCallback
    from orchestration.loop.stages import plan_stages

    cfg, model, _ = tiny
    cfg.train.max_steps = 5
    trainer = SimpleNamespace(
        cfg=cfg,
        run_dir=Path(cfg.run_dir),
        stages=plan_stages(cfg),
        model_chunks=[model],
        is_main=True,
    )
    prompts = ["the cat sees", "3 plus 4 equals"]
    gallery = SampleGalleryCallback(prompts, every_steps=2, max_new_tokens=5)
    gallery.on_fit_start(trainer)
    for step in range(1, 6):
        gallery.after_step(trainer, SimpleNamespace(step=step))
    lines = (Path(cfg.run_dir) / "samples.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (2, 4, 5) for p in prompts]
    sp = spm.SentencePieceProcessor(model_file=cfg.data.tokenizer_model)
    ids = sp.encode(prompts[0])
    new = greedy_generate(model, ids, 5, eod_id=sp.eos_id(), vocab_size=sp.get_piece_size())
    assert prompts[0] + rows[0]["completion"] == sp.decode(ids + new)


def test_greedy_generate_needs_a_prompt(tiny):
    from megatron_patches.generation import greedy_generate

    with pytest.raises(ValueError):
        greedy_generate(tiny[1], [], 3)
