"""Per-step metrics to stdout, a JSONL file in the run directory, and Weights & Biases.

W&B runs offline by default (``logging.wandb_mode=offline``): nothing needs a network, and
``wandb sync <run_dir>/wandb/offline-run-*`` uploads later. Only the main rank logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from orchestration.config import LoggingConfig

log = logging.getLogger(__name__)


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, config: dict[str, Any],
                 enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._wandb = None
        if not enabled:
            return
        # A raw append-only descriptor: a write that fails part-way (a full disk) leaves no
        # half line that a retry would duplicate; what was not written waits in memory.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._unwritten = b""
        self._write_error: OSError | None = None
        if cfg.wandb_mode != "disabled":
            self._wandb = _start_wandb(run_dir, cfg, run_name, config)

    def log(self, record: dict[str, Any], echo: bool = True) -> None:
        if not self.enabled:
            return
        self._append((json.dumps(record, default=float) + "\n").encode())
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                            step=int(record.get("step", 0)))
        if echo:
            log.info(format_record(record))

    def event(self, kind: str, **fields: Any) -> None:
        """A non-metric event (stage change, skipped batch, checkpoint) in the same JSONL."""
        self.log({"event": kind, **fields}, echo=True)

    def _append(self, data: bytes) -> bool:
        """Append ``data`` after whatever earlier lines are still unwritten; True when all is
        on disk. A full disk must not end the run from here (the checkpoint save that filled
        it reports it, in words, and must be the one to stop the job): the lines wait in
        memory and are retried with every new one."""
        self._unwritten += data
        try:
            while self._unwritten:
                self._unwritten = self._unwritten[os.write(self._fd, self._unwritten):]
        except OSError as err:
            if self._write_error is None:
                log.warning("cannot append to %s (%s); the metrics are kept in memory and "
                            "written once that succeeds", self.path, err)
            self._write_error = err
            return False
        if self._write_error is not None:
            log.info("%s is written again", self.path)
            self._write_error = None
        return True

    def close(self) -> None:
        if not self.enabled:
            return
        if not self._append(b""):  # last try; else the job log keeps them
            log.error("%s: these metrics could not be written (%s):\n%s", self.path,
                      self._write_error, self._unwritten.decode(errors="replace"))
        os.close(self._fd)
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: Path, cfg: LoggingConfig, name: str, config: dict[str, Any]):
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; metrics go to %s only", run_dir / "metrics.jsonl")
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=name,
                      id=_stable_id(run_dir), resume="allow", dir=str(run_dir),
                      mode=cfg.wandb_mode, config=config)


def _stable_id(run_dir: Path) -> str:
    """One W&B run per run directory, so a resumed or requeued job appends to the same run."""
    import hashlib

    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]


def format_record(r: dict[str, Any]) -> str:
    if "event" in r:
        return "[{}] ".format(r["event"]) + " ".join(
            f"{k}={v}" for k, v in r.items() if k != "event")
    parts = [f"step {r['step']:>6}"]
    for key, fmt in (("loss", "{:.4f}"), ("grad_norm", "{:.3f}"), ("lr", "{:.3e}"),
                     ("tokens_per_s", "{:,.0f}"), ("consumed_tokens", "{:,}"),
                     ("step_time_s", "{:.3f}"), ("mfu", "{:.1%}"), ("val_loss", "{:.4f}")):
        value = r.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(f"{key} " + fmt.format(value))
    if "val_ppl" in r:
        parts.append(f"val_ppl {r['val_ppl']:.2f}")
    parts += [f"{k} {v:.4f}" for k, v in r.items() if k.startswith("val_loss/")]
    return " | ".join(parts)
