"""Run lm-eval's ``simple_evaluate`` on an exported Hugging Face folder, offline.

Tasks come from ``conf/eval/tasks/`` (plus ``--include`` directories) with their data files
beside them; lm-eval's built-in task index is scanned only when a requested task is not local,
and then its datasets must already be in the local HF cache: nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from orchestration.common.paths import CONF_DIR
from orchestration.evaluation.options import EvalOptions

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


def run_lm_eval(hf_dir: Path, tasks: list[str], options: EvalOptions,
                include: list[Path] | None = None) -> tuple[dict[str, Any], dict[str, list]]:
    """lm-eval's full output for ``tasks`` (JSON-safe) and its per-document samples (empty
    unless ``options.log_samples``)."""
    os.environ.update(OFFLINE)
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    model_args: dict[str, Any] = {"pretrained": str(hf_dir), "dtype": options.resolved_dtype()}
    if options.parallelize:
        model_args["parallelize"] = True
    seeds = {}
    if options.seed is not None:
        seeds = {k: options.seed for k in ("random_seed", "numpy_random_seed",
                                            "torch_random_seed", "fewshot_random_seed")}
    with tempfile.TemporaryDirectory(prefix="eval_tasks_") as tmp:
        task_dir, local = resolved_task_dir([TASK_DIR, *(include or [])], Path(tmp))
        # The built-in task index is large and mostly needs downloads: scan it only on demand.
        manager = TaskManager(include_path=str(task_dir), include_defaults=not set(tasks) <= local)
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=tasks,
            num_fewshot=options.num_fewshot,
            device=None if options.parallelize else options.resolved_device(),
            batch_size=options.lm_eval_batch_size(),
            max_batch_size=options.max_batch_size,
            limit=options.limit,
            task_manager=manager,
            bootstrap_iters=options.bootstrap_iters,
            log_samples=options.log_samples,
            **seeds,
        )
    samples = out.pop("samples", None) or {}
    # lm-eval's values include numpy scalars and task objects: its own JSON fallback.
    safe = json.loads(json.dumps(out, default=handle_non_serializable))
    return safe, samples
