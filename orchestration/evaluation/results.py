"""Per-checkpoint lm-eval results on disk: where they go, what is cached, the step table.

``<run_dir>/eval/<step_dir_name>/results.json`` holds lm-eval's full output (``results``,
``groups``, ``configs``, ``versions``, ``n-shot``, ``higher_is_better``, ``n-samples``,
``config``, ``date``, ``lm_eval_version``, ``transformers_version``, ...) for every task scored
on that checkpoint, plus ``checkpoint`` (path, step, consumed tokens, run name) and
``evaluated``: per requested task, the options it was scored with (``EvalOptions.cache_key``),
when, and with which lm-eval. A task is rerun only when it is missing or its options differ;
new tasks are merged into the file, which is rewritten atomically.
"""

from __future__ import annotations

import csv
import io
import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from orchestration.common.files import write_jsonl_atomic, write_text_atomic
from orchestration.evaluation.options import EvalOptions

RESULTS_FILE = "results.json"
#: lm-eval's per-task dictionaries, merged task by task when tasks are added to a file.
PER_TASK = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
            "higher_is_better", "n-samples")


def results_dir(run_dir: Path, ckpt_name: str) -> Path:
    return Path(run_dir) / "eval" / ckpt_name


def results_path(run_dir: Path, ckpt_name: str) -> Path:
    return results_dir(run_dir, ckpt_name) / RESULTS_FILE


def read_results(path: Path) -> dict[str, Any]:
    """The results file, or ``{}`` when there is none yet."""
    return json.loads(Path(path).read_text()) if Path(path).is_file() else {}


def read_current(path: Path, saved_at: float | None) -> dict[str, Any]:
    """The results file if it scored the checkpoint saved at ``saved_at``, else ``{}``: a
    checkpoint re-saved under the same step (after a rollback) is a different model, and its
    old scores are replaced, not reused."""
    existing = read_results(path)
    if existing and existing.get("checkpoint", {}).get("saved_at") != saved_at:
        return {}
    return existing


def missing_tasks(existing: dict[str, Any], tasks: list[str], options: EvalOptions) -> list[str]:
    """The requested tasks not yet scored with these options."""
    done, key = existing.get("evaluated", {}), options.cache_key()
    return [t for t in tasks if done.get(t, {}).get("options") != key]


def merge(existing: dict[str, Any], new: dict[str, Any], tasks: list[str],
          options: EvalOptions, checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """``existing`` with lm-eval's output ``new`` for ``tasks`` merged in, task by task."""
    merged = {**existing, **{k: v for k, v in new.items() if k not in PER_TASK}}
    for key in PER_TASK:
        merged[key] = {**existing.get(key, {}), **new.get(key, {})}
    stamp = {"options": options.cache_key(), "run_options": options.to_dict(),
             "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "lm_eval_version": _version("lm_eval")}
    merged["evaluated"] = {**existing.get("evaluated", {}), **{t: stamp for t in tasks}}
    merged["lm_eval_version"] = new.get("lm_eval_version") or stamp["lm_eval_version"]
    if checkpoint is not None:
        merged["checkpoint"] = checkpoint
    return merged


def write_samples(directory: Path, samples: dict[str, list]) -> None:
    """lm-eval's logged samples, one JSONL file per task, beside results.json."""
    from lm_eval.utils import handle_non_serializable

    for task, rows in samples.items():
        safe = json.loads(json.dumps(rows, default=handle_non_serializable))
        write_jsonl_atomic(Path(directory) / f"samples_{task}.jsonl", safe)


def metrics(result: dict[str, Any], tasks: list[str] | None = None) -> dict[str, float]:
    """Flat ``{"task/metric": value}`` (lm-eval names metrics "acc,none"), for ``tasks``
    (their subtasks included) or for every task in the file."""
    flat = {}
    for task, values in result.get("results", {}).items():
        if tasks is not None and not _belongs(task, tasks, result):
            continue
        for key, value in values.items():
            name, _, _ = key.partition(",")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and not name.endswith("_stderr") and name != "sample_len":
                flat[f"{task}/{name}"] = float(value)
    return flat


def _belongs(task: str, tasks: list[str], result: dict[str, Any]) -> bool:
    if task in tasks:
        return True
    groups = result.get("group_subtasks", {})
    return any(task in groups.get(t, []) for t in tasks)


def write_table(rows: list[dict[str, Any]], stem: Path) -> None:
    """``stem``.csv and ``stem``.md: one row per checkpoint (step, consumed tokens), one column
    per metric."""
    lead = ["step", "tokens"]
    columns = [*lead, *sorted({k for row in rows for k in row} - set(lead))]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(stem.with_suffix(".csv"), text.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    write_text_atomic(stem.with_suffix(".md"), "\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
