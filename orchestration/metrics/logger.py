"""Per-step metrics to stdout, a JSONL file in the run directory, and the trackers.

``metrics.jsonl`` keeps the loop's flat field names (``loss``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``val_loss/<source>``, ...): it is the run's own record, read by
``orchestration.report`` and ``orchestration.gallery``. Events (``stage_start``, ``skip``,
``checkpoint``, ``rollback``) go into the same file. W&B and TensorBoard get the records under
the ecosystem's names (``orchestration/metrics/trackers.py``). Only the main rank logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from orchestration.config import LoggingConfig
from orchestration.metrics.trackers import Trackers

log = logging.getLogger(__name__)


class MetricsLogger:
    """The run's metrics log: ``metrics.jsonl`` (appended, never rewritten: the job that
    resumes adds to it), the console line, and the trackers. Disabled on every rank but the
    main one."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, run_name: str, config: dict[str, Any],
                 enabled: bool) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self._trackers: Trackers | None = None
        if not enabled:
            return
        # A raw append-only descriptor: a write that fails part-way (a full disk) leaves no
        # half line that a retry would duplicate; what was not written waits in memory.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._unwritten = b""
        self._write_error: OSError | None = None
        self._trackers = Trackers(self.run_dir, cfg, run_name, config)

    def log(self, record: dict[str, Any], echo: bool = True) -> None:
        if not self.enabled:
            return
        self._append((json.dumps(record, default=float) + "\n").encode())
        self._trackers.track(record, format_record)
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
        self._trackers.close()


def format_record(r: dict[str, Any]) -> str:
    if "event" in r:
        return "[{}] ".format(r["event"]) + " ".join(
            f"{k}={v}" for k, v in r.items() if k != "event")
    parts = [f"step {r['step']:>6}"]
    for key, fmt in (("loss", "{:.4f}"), ("grad_norm", "{:.3f}"), ("lr", "{:.3e}"),
                     ("tokens_per_s", "{:,.0f}"), ("consumed_tokens", "{:,}"),
                     ("step_time_s", "{:.3f}"), ("mfu_full_attn", "{:.1%}"),
                     ("mfu_causal", "{:.1%}"), ("val_loss", "{:.4f}")):
        value = r.get(key)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(f"{key} " + fmt.format(value))
    if "val_ppl" in r:
        parts.append(f"val_ppl {r['val_ppl']:.2f}")
    parts += [f"{k} {v:.4f}" for k, v in r.items() if k.startswith("val_loss/")]
    return " | ".join(parts)
