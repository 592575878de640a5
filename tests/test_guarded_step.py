"""guarded_step without a veto is Megatron's optimizer.step(); with a veto nothing changes."""

from __future__ import annotations

import torch
from megatron.core.optimizer import get_megatron_optimizer

from megatron_patches.configs import build_megatron_configs
from megatron_patches.guarded_step import guarded_step
from megatron_patches.model import build_gpt_model, unwrap, wrap_for_training
from megatron_patches.parallel import seed_everything
from orchestration.config import RunConfig


def _model_and_optimizer():
    cfg = RunConfig()
    cfg.model.num_layers, cfg.model.vocab_size = 2, 256
    cfg.optim.clip_grad = 0.05  # small, so clipping is exercised
    seed_everything(7)
    mc = build_megatron_configs(cfg, on_cpu=True)
    model = wrap_for_training(build_gpt_model(cfg, mc), mc)
    optimizer = get_megatron_optimizer(mc.optimizer, [model])
    return model, optimizer


def _backward(model, optimizer):
    model.zero_grad_buffer()
    optimizer.zero_grad()
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(32).expand(2, 32)
    loss = model(tokens[:, :-1], position_ids, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    model.finish_grad_sync()


def test_matches_optimizer_step_and_veto_leaves_weights(megatron_env):
    ref_model, ref_opt = _model_and_optimizer()
    model, opt = _model_and_optimizer()
    _backward(ref_model, ref_opt)
    _backward(model, opt)
    ok, ref_norm, _ = ref_opt.step()
    outcome = guarded_step(opt)
    assert ok and outcome.updated and outcome.grad_norm == ref_norm
    for (name, a), (_, b) in zip(unwrap(ref_model).named_parameters(),
                                 unwrap(model).named_parameters(), strict=True):
        assert torch.equal(a, b), name

    before = {n: p.detach().clone() for n, p in unwrap(model).named_parameters()}
    _backward(model, opt)
    vetoed = guarded_step(opt, veto=lambda grad_norm: True)
    assert not vetoed.updated
    for name, param in unwrap(model).named_parameters():
        assert torch.equal(param, before[name]), name
