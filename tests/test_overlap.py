"""Megatron's communication overlaps (a GPU job's default) train and save exactly as without.

``overlap_param_gather`` leaves each rank's full parameters stale between steps (the updated
shards are gathered in the next forward), so a checkpoint, an evaluation or a sample taken
then must first complete the gather (``megatron_patches.optimizer.params_gathered``). Two gloo
ranks with the distributed optimizer: the same losses, and the same weights in the checkpoint.
"""

from __future__ import annotations

import copy

import pytest
from dist import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_overlapped_grad_reduce_and_param_gather_match_and_save_fresh_weights(
        tiny_cfg, tmp_path, megatron_env):
    import torch

    from orchestration.hf.offline import load_megatron_weights

    tiny_cfg.train.max_steps, tiny_cfg.checkpoint.save_interval = 3, 3
    tiny_cfg.train.eval_interval = 0  # an evaluation's forward would gather the params itself
    plain = copy.deepcopy(tiny_cfg)
    plain.run_dir = str(tmp_path / "plain")
    plain.parallel.overlap_grad_reduce = plain.parallel.overlap_param_gather = False
    overlap = copy.deepcopy(tiny_cfg)
    overlap.run_dir = str(tmp_path / "overlap")
    overlap.parallel.overlap_grad_reduce = overlap.parallel.overlap_param_gather = True
    a, b = run_distributed(plain, 2), run_distributed(overlap, 2)
    assert a["losses"] == b["losses"]
    step = "checkpoints/step_00000003"
    wa = load_megatron_weights(tmp_path / "plain" / step, plain)
    wb = load_megatron_weights(tmp_path / "overlap" / step, overlap)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
