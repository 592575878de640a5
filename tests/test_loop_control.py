"""The loop's contracts: one 1-based step convention, decisions instead of trainer attributes,
callbacks built by name from config, and a pre_optim_step hook that sees reduced gradients."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from dist import run_distributed, run_single

from orchestration.callbacks.registry import CallbackContext, build_callbacks, requested_callbacks
from orchestration.config import ConfigError
from orchestration.loop.control import Control, Decision
from orchestration.loop.lr import lr_for_step
from orchestration.loop.stages import consumed_tokens, plan_stages, stage_at


def _records(run_dir: str) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_stage_steps_are_one_based(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    (stage,) = plan_stages(cfg)
    assert (stage.first_step, stage.last_step) == (1, cfg.train.max_steps)
    assert stage.batch_index(1) == 0 and stage.step_of_batch(0) == 1
    assert stage_at(plan_stages(cfg), 1) is not None
    assert consumed_tokens([stage], 0) == 0  # nothing trained before step 1
    assert consumed_tokens([stage], 1) == stage.tokens_per_step
    # Step 1 of a 2-step warmup trains at half the peak: never at LR 0.
    assert lr_for_step(cfg, [stage], 1) == pytest.approx(cfg.optim.lr / 2)


def test_one_step_convention_in_memory_logs_and_files(tiny_cfg):
    """Step 3 means the same batch, skip-log line, metric line and checkpoint everywhere."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.max_steps, cfg.checkpoint.save_interval, cfg.checkpoint.keep_last = 4, 2, 0
    cfg.spike.skip_steps = ["3"]
    out = run_single(cfg)
    assert sorted(out["loss_by_step"]) == [1, 2, 3, 4] and out["skipped"] == [3]
    records = _records(cfg.run_dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in train if r["skipped"]] == [3]
    gbs, seq = cfg.train.global_batch_size, cfg.model.seq_length
    assert [r["consumed_tokens"] for r in train] == [s * gbs * seq for s in (1, 2, 3, 4)]
    start = next(r for r in records if r.get("event") == "stage_start")
    assert start["step"] == 1 and start["consumed_tokens"] == 0
    (skip,) = [json.loads(x) for x in
               (Path(cfg.run_dir) / "skipped_batches.jsonl").read_text().splitlines()]
    assert skip["step"] == 3 and skip["sample_indices"] == [2 * gbs, 3 * gbs]  # batch index 2
    ckpts = sorted((Path(cfg.run_dir) / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["step_00000002", "step_00000004"]
    infos = [json.loads((p / "checkpoint_info.json").read_text())["step"] for p in ckpts]
    assert infos == [2, 4]
    saved = [r["step"] for r in records if r.get("event") == "checkpoint"]
    assert saved == [2, 4]


def test_control_merges_decisions_first_reason_wins():
    control = Control()
    control.merge(None)
    control.merge(Decision(skip="a", loss_scale=2.0))
    control.merge(Decision(skip="b", loss_scale=3.0, stop="first", failed=True))
    control.merge(Decision(stop="second", save=True))
    assert (control.skip, control.loss_scale, control.stop, control.failed, control.save) == (
        "a", 6.0, "first", True, True)
    control.reset_step()
    assert control.skip is None and control.loss_scale == 1.0 and not control.save
    assert control.stop == "first"  # a stop stays until the loop acts on it


def test_control_rerun_and_transient_fault_scale():
    """A re-run request is served once, and a transient fault's scale is not repeated by it;
    a bad batch's loss_scale is."""
    control = Control()
    control.merge(Decision(loss_scale=2.0, fault_scale=1000.0))
    control.merge(Decision(rerun="loss 4e3 > threshold"))
    control.merge(Decision(rerun="second"))
    assert (control.rerun, control.loss_scale, control.fault_scale) == (
        "loss 4e3 > threshold", 2.0, 1000.0)
    control.start_rerun()
    assert (control.rerun, control.loss_scale, control.fault_scale) == (None, 2.0, 1.0)
    control.merge(Decision(fault_scale=5.0, rerun="again"))
    control.reset_step()
    assert (control.rerun, control.loss_scale, control.fault_scale) == (None, 1.0, 1.0)


def test_callbacks_by_name_from_config(tiny_cfg):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.callbacks = {"samples": None, "probes:GradientProbe": {"stop_at": 2}}
    names = list(requested_callbacks(cfg))
    assert "samples" not in names and names[-1] == "probes:GradientProbe"
    context = CallbackContext(cfg, logger=None, is_main=True, world_size=1, on_cpu=True)
    built = build_callbacks(context)
    assert [cb.name for cb in built][-1] == "gradient_probe" and built[-1].stop_at == 2
    for bad, message in (({"nope": {}}, "callbacks.nope: not a registered callback"),
                         ({"probes:Missing": {}}, "cannot import probes:Missing"),
                         ({"probes:GradientProbe": {"colour": 1}}, "unexpected keyword")):
        cfg.callbacks = bad
        with pytest.raises(ConfigError, match=message):
            build_callbacks(context)


@pytest.mark.distributed
def test_pre_optim_step_sees_reduced_gradients_and_a_decision_stops_the_loop(tiny_cfg):
    """At DP=2 with the distributed optimizer the gradient shards' norms, summed over ranks,
    are the global grad norm; the probe's stop decision ends the run after step 3 with a
    checkpoint of step 3, and the summary reports it."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.callbacks = {"probes:GradientProbe": {"stop_at": 3}}
    out = run_distributed(cfg, 2)
    assert out["final_step"] == 3 and out["stopped"] == "probe stop at 3" and not out["failed"]
    assert (Path(cfg.run_dir) / "checkpoints" / "step_00000003").is_dir()
    for rank in (0, 1):
        rows = json.loads((Path(cfg.run_dir) / f"gradient_probe.{rank}.json").read_text())
        assert [r["step"] for r in rows] == [1, 2, 3]
        for r in rows:
            assert r["reduced_norm"] == pytest.approx(r["grad_norm"], rel=1e-5)
            assert r["named_grads"] > 0


def test_a_rerun_recomputes_the_same_step_and_is_bounded(tiny_cfg):
    """A callback asking for a re-run of step 3 every time: the loop computes step 3 again on
    the same batch from the same RNG state (dropout on: the same loss and grad norm each time),
    at most MAX_RERUNS times, then skips the update naming why, and goes on."""
    from orchestration.loop.step import MAX_RERUNS

    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.hidden_dropout = 0.1
    cfg.callbacks = {"probes:RerunProbe": {"at": 3}}
    out = run_single(cfg)
    assert out["final_step"] == 6 and out["skipped"] == [3]
    rows = json.loads((Path(cfg.run_dir) / "rerun_probe.json").read_text())
    *computed, result = rows
    assert [r["attempt"] for r in computed] == list(range(MAX_RERUNS + 1))
    assert len({(r["loss"], r["grad_norm"]) for r in computed}) == 1
    assert f"{MAX_RERUNS} re-runs did not settle step 3" in result["skip_reason"]
    assert result["extra"] == {"reruns": MAX_RERUNS}
