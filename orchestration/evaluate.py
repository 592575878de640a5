"""Downstream benchmarks with EleutherAI's lm-eval on exported Hugging Face folders.

``python -m orchestration.evaluate HF_DIR --tasks tiny_mc[,...] [--output F] [--limit N]``
``python -m orchestration.evaluate --all-checkpoints RUN_DIR --tasks tiny_mc [--limit N]``

Why a wrapper: runs must be scored offline, reproducibly and per checkpoint. Tasks come from
``conf/eval/tasks/`` (plus ``--include``) with their local JSONL data; lm-eval's HF model class
runs on the CPU in float32. A folder exported from a checkpoint (``export_info.json``) has its
results written to ``<run_dir>/eval/step_XXXXXXXX.json``; ``--all-checkpoints`` exports and
scores every checkpoint of a run and writes ``benchmarks.md``/``.csv`` with one row per step.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from orchestration.common.files import write_json_atomic
from orchestration.common.paths import CONF_DIR

TASK_DIR = CONF_DIR / "eval" / "tasks"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def resolved_task_dir(task_dirs: list[Path], dest: Path) -> tuple[Path, set[str]]:
    """Copy task YAMLs into ``dest`` with relative ``data_files`` made absolute (datasets
    resolves them against the cwd, not the YAML); return ``dest`` and the task names."""
    names: set[str] = set()
    for task_dir in task_dirs:
        for src in sorted(Path(task_dir).glob("*.yaml")):
            try:
                conf = yaml.safe_load(src.read_text())
            except yaml.YAMLError:  # lm-eval's `!function` tags: copied as they are
                shutil.copy(src, dest / src.name)
                continue
            files = (conf.get("dataset_kwargs") or {}).get("data_files")
            if files is not None:
                conf["dataset_kwargs"]["data_files"] = _absolute(files, src.parent)
            names.update(str(conf[k]) for k in ("task", "group", "tag") if k in conf)
            (dest / src.name).write_text(yaml.safe_dump(conf, sort_keys=False))
    return dest, names


def _absolute(files: Any, base: Path) -> Any:
    if isinstance(files, dict):
        return {k: _absolute(v, base) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, base) for v in files]
    return str((base / files).resolve()) if "://" not in str(files) else files


def evaluate(
    hf_dir: Path,
    tasks: list[str],
    limit: int | None = None,
    include: list[Path] | None = None,
    batch_size: int = 1,
) -> dict[str, Any]:
    """lm-eval's results for ``tasks`` on the exported model: ``{"results": {task: ...}}``."""
    os.environ.update(OFFLINE)
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="eval_tasks_") as tmp:
        task_dir, local = resolved_task_dir([TASK_DIR, *(include or [])], Path(tmp))
        # The built-in task index is large and mostly needs downloads: scan it only on demand.
        manager = TaskManager(include_path=str(task_dir), include_defaults=not set(tasks) <= local)
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(hf_dir), "dtype": "float32"},
            tasks=tasks,
            device="cpu",
            batch_size=batch_size,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=0,
            log_samples=False,
        )
    return {
        "model": str(hf_dir),
        "tasks": tasks,
        "limit": limit,
        "results": out["results"],
        "versions": out.get("versions", {}),
        "n_samples": out.get("n-samples", {}),
        "export": _export_info(hf_dir),
    }


def metrics(result: dict[str, Any]) -> dict[str, float]:
    """Flat ``{"task/metric": value}`` (lm-eval names metrics "acc,none")."""
    flat = {}
    for task, values in result["results"].items():
        for key, value in values.items():
            name, _, _ = key.partition(",")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and not name.endswith("_stderr") and name != "sample_len":
                flat[f"{task}/{name}"] = float(value)
    return flat


def default_output(hf_dir: Path) -> Path:
    """Next to the exported checkpoint: ``<run_dir>/eval/<step dir>.json`` for a run's own,
    ``<ckpt>.eval.json`` beside any other (an averaged one); else inside ``hf_dir``."""
    ckpt = _export_info(hf_dir).get("checkpoint")
    if not ckpt:
        return Path(hf_dir) / "eval_results.json"
    ckpt = Path(ckpt)
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "eval" / f"{ckpt.name}.json"
    return ckpt.with_name(f"{ckpt.name}.eval.json")


def evaluate_run(
    run_dir: Path,
    tasks: list[str],
    limit: int | None = None,
    include: list[Path] | None = None,
    cache_dir: Path | None = None,
    keep_exports: bool = False,
) -> list[dict[str, Any]]:
    """Export and score every complete checkpoint of ``run_dir``; write the step table.

    A step whose results file already holds the same tasks and limit is not re-run.
    """
    from orchestration.checkpoint.layout import checkpoint_dir, complete_checkpoints, read_metadata
    from orchestration.export import export

    eval_dir = Path(run_dir) / "eval"
    cache = Path(cache_dir or eval_dir / "hf")
    rows = []
    for ckpt in complete_checkpoints(checkpoint_dir(run_dir)):
        out = eval_dir / f"{ckpt.name}.json"
        result = _cached(out, tasks, limit)
        if result is None:
            hf_dir = export(ckpt, cache / ckpt.name)
            result = evaluate(hf_dir, tasks, limit, include)
            write_json_atomic(out, result)
            publish(run_dir, read_metadata(ckpt)["step"], result)
            if not keep_exports:
                shutil.rmtree(hf_dir, ignore_errors=True)
        rows.append({"step": read_metadata(ckpt)["step"], **metrics(result)})
    if not keep_exports and cache.is_dir() and not any(cache.iterdir()):
        cache.rmdir()
    write_table(rows, eval_dir / "benchmarks")
    return rows


def publish(run_dir: Path, step: int, result: dict[str, Any]) -> None:
    """Send the results to the run's W&B/TensorBoard as ``eval/<task>/<metric>`` (its logging
    settings from the run record). The JSON is the record: a tracker failure only warns."""
    from orchestration.metrics.logger import publish_eval_results

    try:
        publish_eval_results(Path(run_dir), step, result["results"])
    except Exception as err:  # noqa: BLE001 -- W&B/TensorBoard must not lose a scored result
        print(f"warning: evaluation results not sent to W&B/TensorBoard: {err!r}")


def _cached(path: Path, tasks: list[str], limit: int | None) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if (result.get("tasks"), result.get("limit")) == (tasks, limit) else None


def write_table(rows: list[dict[str, Any]], stem: Path) -> None:
    """``stem``.csv and ``stem``.md: one row per checkpoint step, one column per metric."""
    columns = ["step", *sorted({k for row in rows for k in row} - {"step"})]
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def _export_info(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "export_info.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", type=Path, nargs="?", help="an exported Hugging Face folder")
    p.add_argument(
        "--all-checkpoints",
        type=Path,
        metavar="RUN_DIR",
        help="export and evaluate every checkpoint of this run",
    )
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--output", type=Path, help="results JSON (default: <run_dir>/eval/)")
    p.add_argument("--limit", type=int, help="score only the first N documents per task")
    p.add_argument(
        "--include",
        type=Path,
        action="append",
        default=[],
        help="another directory of lm-eval task YAMLs (repeatable)",
    )
    p.add_argument("--cache-dir", type=Path, help="where --all-checkpoints exports to")
    p.add_argument("--keep-exports", action="store_true", help="keep --all-checkpoints exports")
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    if (args.hf_dir is None) == (args.all_checkpoints is None):
        p.error("give either HF_DIR or --all-checkpoints RUN_DIR")
    if args.all_checkpoints:
        evaluate_run(
            args.all_checkpoints, tasks, args.limit, args.include, args.cache_dir, args.keep_exports
        )
        print((args.all_checkpoints / "eval" / "benchmarks.md").read_text(), end="")
        return
    result = evaluate(args.hf_dir, tasks, args.limit, args.include)
    out = args.output or default_output(args.hf_dir)
    write_json_atomic(out, result)
    info = _export_info(args.hf_dir)
    if args.output is None and out.parent.name == "eval" and info.get("step") is not None:
        publish(out.parent.parent, int(info["step"]), result)
    print(json.dumps(metrics(result), indent=2), f"\nwritten to {out}")


if __name__ == "__main__":
    main()
