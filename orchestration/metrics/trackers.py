"""The trackers: W&B and TensorBoard, under the names the ecosystem uses.

``metrics.jsonl`` keeps the loop's flat field names (``orchestration/metrics/logger.py``). The
trackers get the names the ecosystem uses (Megatron-LM, OLMo-core, torchtitan, HF Trainer all
namespace by phase): :data:`TRACKER_NAMES` maps one to the other, e.g. ``loss`` ->
``train/loss``, ``tokens_per_s`` -> ``throughput/tokens_per_s``, ``val_loss/<source>`` ->
``val/loss/<source>``. Events (``stage_start``, ``skip``, ``checkpoint``, ``rollback``) are not
metrics: they reach TensorBoard as text, never as scalars (their ``index``/``tokens`` fields
would otherwise become meaningless charts).

W&B runs offline by default (``logging.wandb_mode=offline``): nothing needs a network, and
``wandb sync <run_dir>/wandb/offline-run-*`` uploads later. ``logging.tensorboard=true`` writes
``<run_dir>/tensorboard/`` (``tensorboard --logdir <run_dir>/tensorboard``). lm-eval results
(``eval/<task>/<metric>``, against ``eval/step``, the scored checkpoint's step) reach both:
from the in-training hook's ``lm_eval/...`` records, and after the fact from
``orchestration.evaluate`` through :func:`publish_eval_results`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestration.config import LoggingConfig

log = logging.getLogger("orchestration.metrics.logger")  # the log lines keep their name

# metrics.jsonl field -> the W&B / TensorBoard name.
TRACKER_NAMES = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "consumed_tokens": "train/consumed_tokens",
    "tokens_per_s": "throughput/tokens_per_s",
    "step_time_s": "throughput/step_time_s",
    "mfu": "throughput/mfu",  # logs written before both conventions were logged
    "mfu_full_attn": "throughput/mfu_full_attn",
    "mfu_causal": "throughput/mfu_causal",
    "global_batch_size": "train/global_batch_size",  # changes during a batch-size ramp-up
    "z_loss": "train/z_loss",
    "reruns": "train/reruns",  # re-runs of a step flagged by the spike rule (spike.rerun)
    "val_loss": "val/loss",
    "val_ppl": "val/ppl",
}
# The in-training lm-eval hook (callbacks/lm_eval.py) logs ``lm_eval/<task>/<metric>`` with
# ``lm_eval/checkpoint_step``, the step of the checkpoint it scored.
TRACKER_PREFIXES = {"val_loss/": "val/loss/", "val_ppl/": "val/ppl/", "lm_eval/": "eval/"}
TRACKER_NAMES["lm_eval/checkpoint_step"] = "eval/step"
# Not metrics: the x axis, constants of the model at a stage (in the run's config), a wall clock.
NOT_METRICS = {"step", "flops_per_token", "flops_per_token_full_attn", "flops_per_token_causal",
               "time"}
EVAL_STEP = "eval/step"  # W&B's x axis for lm-eval results (logged after the fact, any order)


def tracker_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record under their tracker names; {} for an event.

    ``skipped`` (a reason or None) becomes ``train/skipped`` 0/1. A field already namespaced
    (``eval/...``, ``my/metric``) or unknown to the table passes through unchanged.
    """
    if "event" in record:
        return {}
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "skipped":
            out["train/skipped"] = 0.0 if value is None else 1.0
            continue
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[_tracker_name(key)] = float(value)
    return out


def _tracker_name(key: str) -> str:
    if key in TRACKER_NAMES:
        return TRACKER_NAMES[key]
    for old, new in TRACKER_PREFIXES.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def eval_metrics(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's ``results`` dict (``{task: {"acc,none": v, "acc_stderr,none": s}}``) as
    ``{"eval/<task>/<metric>": v, "eval/<task>/<metric>_stderr": s}``; a filter other than
    ``none`` is kept as a suffix (``exact_match/strict-match``). 'N/A' stderrs are left out."""
    out: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            name, _, filt = key.partition(",")
            if not numeric or name in ("sample_len", "sample_count") or "," not in key:
                continue
            suffix = "" if filt in ("", "none") else "/" + filt
            out[f"eval/{task}/{name}{suffix}"] = float(value)
    return out


class Trackers:
    """The run's W&B run and TensorBoard writer (each when configured), fed every record."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str,
                 config: dict[str, Any]) -> None:
        self._wandb = None
        self._tensorboard: TensorBoardTracker | None = None
        if cfg.wandb_mode != "disabled":
            self._wandb = start_wandb(run_dir, cfg, run_name, config)
        if cfg.tensorboard:
            self._tensorboard = TensorBoardTracker(tensorboard_dir(run_dir, cfg))

    def track(self, record: dict[str, Any], describe: Callable[[dict[str, Any]], str]) -> None:
        """Send one metrics record (or an event, as TensorBoard text written by ``describe``)."""
        step = int(record.get("step") or 0)
        metrics = tracker_metrics(record)
        if self._tensorboard is not None:
            if "event" in record:
                self._tensorboard.text(f"events/{record['event']}", describe(record), step)
            else:  # lm-eval scores belong to the checkpoint's step, not the step they arrived
                evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
                eval_step = int(evals.pop(EVAL_STEP, step))
                self._tensorboard.scalars({k: v for k, v in metrics.items()
                                           if not k.startswith("eval/")}, step)
                self._tensorboard.scalars(evals, eval_step)
        if self._wandb is not None and metrics:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tensorboard is not None:
            self._tensorboard.close()


class TensorBoardTracker:
    """A ``SummaryWriter`` opened at the first step it logs, with ``purge_step`` set to it: a
    resumed job repeats the steps after its checkpoint, and TensorBoard then hides the
    earlier job's records of those steps instead of drawing both."""

    def __init__(self, log_dir: Path, purge: bool = True) -> None:
        self.log_dir = Path(log_dir)
        self.purge = purge
        self._writer = None

    def _open(self, step: int):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir),
                                         purge_step=step if self.purge else None)
        return self._writer

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        if not metrics:
            return
        writer = self._open(step)
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self._open(step).add_text(tag, text, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def tensorboard_dir(run_dir: Path, cfg: LoggingConfig) -> Path:
    return Path(cfg.tensorboard_dir) if cfg.tensorboard_dir else Path(run_dir) / "tensorboard"


def start_wandb(run_dir: Path, cfg: LoggingConfig, name: str, config: dict[str, Any],
                suffix: str = "", job_type: str | None = None, files_dir: Path | None = None):
    """The run's W&B run (one per run directory and ``suffix``), or None without wandb.
    Its files go to ``files_dir/wandb`` (default: the run directory's ``wandb/``)."""
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; metrics go to %s only", run_dir / "metrics.jsonl")
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=name + suffix,
                     id=_stable_id(run_dir) + suffix, resume="allow",
                     dir=str(files_dir or run_dir),
                     mode=cfg.wandb_mode, config=config, group=name, job_type=job_type)
    # lm-eval results arrive per checkpoint, in any order and after the training steps:
    # they get their own x axis instead of W&B's monotonic step.
    run.define_metric(EVAL_STEP)
    run.define_metric("eval/*", step_metric=EVAL_STEP)
    return run


def _stable_id(run_dir: Path) -> str:
    """One W&B run per run directory, so a resumed or requeued job appends to the same run."""
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def publish_eval_results(run_dir: Path, step: int, results: dict[str, Any],
                         cfg: LoggingConfig | None = None, name: str | None = None) -> list[str]:
    """Send one checkpoint's lm-eval ``results`` to the run's trackers after training.

    The logging settings and name come from the run's newest record unless given. TensorBoard
    gets ``<tensorboard dir>/eval`` (a run of its own there, so a training restart's purge never
    hides evaluations); W&B gets a ``<name>-eval`` run in the training run's group (a finished
    or still-running training run cannot safely take writes from a second process), its
    offline files in ``<run_dir>/eval/wandb/step_XXXXXXXX/wandb/`` (``wandb sync`` them).
    Returns the trackers written to.
    """
    if cfg is None or name is None:
        saved_cfg, saved_name = _run_logging(Path(run_dir))
        cfg, name = cfg or saved_cfg, name or saved_name
    metrics = eval_metrics(results)
    done: list[str] = []
    if not metrics:
        return done
    if cfg.tensorboard:
        write_eval_events(tensorboard_dir(Path(run_dir), cfg) / "eval", step, metrics)
        done.append("tensorboard")
    if cfg.wandb_mode != "disabled":
        # W&B names an offline run's folder by the second it started: one folder per
        # checkpoint, so array tasks finishing in the same second never share one.
        files = Path(run_dir) / "eval" / "wandb" / f"step_{step:08d}"
        files.mkdir(parents=True, exist_ok=True)
        run = start_wandb(Path(run_dir), cfg, name, {}, suffix="-eval", job_type="eval",
                          files_dir=files)
        if run is not None:
            run.log({**metrics, EVAL_STEP: step})
            run.finish()
            done.append("wandb")
    return done


def write_eval_events(log_dir: Path, step: int, metrics: dict[str, float]) -> None:
    """Add one checkpoint's results to the evaluations' TensorBoard run at ``log_dir``.

    Checkpoints are scored in any order (an array job, a rerun of a missing one), but
    TensorBoard takes a step lower than one it has seen for a restart and purges the newer
    points. So every result published so far is kept in ``results.json`` there, and the event
    file is rewritten from it sorted by step, then swapped in for the old one; a lock makes
    concurrent array tasks take turns.
    """
    import fcntl
    import shutil
    import tempfile

    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state_path = log_dir / "results.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        state[str(step)] = {**state.get(str(step), {}), **metrics}
        tmp = Path(tempfile.mkdtemp(prefix=".events.", dir=log_dir))
        try:
            tracker = TensorBoardTracker(tmp, purge=False)
            for saved_step in sorted(state, key=int):
                tracker.scalars(state[saved_step], int(saved_step))
            tracker.close()
            old = set(log_dir.glob("events.out.tfevents.*"))
            new = [os.replace(f, log_dir / f.name) or log_dir / f.name
                   for f in tmp.glob("events.out.tfevents.*")]
            for path in old - set(new):
                path.unlink()
            tmp_state = log_dir / ".results.json.tmp"
            tmp_state.write_text(json.dumps(state, indent=1, sort_keys=True))
            os.replace(tmp_state, state_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _run_logging(run_dir: Path) -> tuple[LoggingConfig, str]:
    """``logging`` and ``name`` of the run's newest record (defaults when it has none)."""
    import yaml

    from orchestration.metrics.run_record import list_run_records

    records = list_run_records(run_dir)
    saved = yaml.safe_load((records[-1] / "config.yaml").read_text()) if records else {}
    fields = {k: v for k, v in (saved.get("logging") or {}).items()
              if k in LoggingConfig.__dataclass_fields__}
    return LoggingConfig(**fields), str(saved.get("name") or run_dir.name)
