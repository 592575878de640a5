"""Downstream benchmarks with EleutherAI's lm-eval, per checkpoint, cached, on CPU or GPUs.

``python -m orchestration.evaluate PATH --tasks T[,T...] [lm-eval options]`` where PATH is
  - an exported Hugging Face folder (``config.json``): scored as it is;
  - a checkpoint (``step_XXXXXXXX``): exported, scored, the export removed;
  - a run directory (or ``--all-checkpoints RUN_DIR``): every kept checkpoint, then the table.
``python -m orchestration.evaluate RUN_DIR --list-checkpoints [--only-missing --tasks T ...]``
prints the kept checkpoints, oldest first, one path a line (what ``launch/eval.sbatch`` sizes
its array from).

Results are lm-eval's full output per checkpoint in ``<run_dir>/eval/<step_dir>/results.json``
(``orchestration.evaluation.results``); a task already scored there with the same options is
not rerun, so repeating a command does only what is missing. Options are lm-eval's own
(``orchestration.evaluation.options``): ``--device``, ``--dtype``, ``--batch-size`` (or
``auto``), ``--num-fewshot``, ``--limit``, ``--bootstrap-iters``, ``--seed``,
``--log-samples``, ``--parallelize``. Tasks are read from ``conf/eval/tasks/`` (plus
``--include``) with local data; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from orchestration.checkpoint.layout import checkpoint_dir, complete_checkpoints, read_metadata
from orchestration.common.files import write_json_atomic
from orchestration.common.quiet import install_warning_filters
from orchestration.evaluation import results as store
from orchestration.evaluation.options import (
    DTYPES,
    EvalOptions,
    check_batch_size,
    parse_limit,
)
from orchestration.evaluation.results import metrics, write_table
from orchestration.evaluation.runner import run_lm_eval

__all__ = ["evaluate", "evaluate_checkpoint", "evaluate_run", "list_checkpoints", "metrics"]
log = logging.getLogger(__name__)


def evaluate(hf_dir: Path, tasks: list[str], options: EvalOptions = EvalOptions(),
             include: list[Path] | None = None, output: Path | None = None) -> dict[str, Any]:
    """Score the HF folder ``hf_dir`` on the ``tasks`` missing from ``output`` (default: its
    checkpoint's results file when it was exported from one); return the whole file."""
    output = Path(output) if output else default_output(hf_dir)
    checkpoint = _checkpoint_of(hf_dir)
    existing = store.read_results(output)
    if checkpoint is not None:
        existing = store.read_current(output, checkpoint.get("saved_at"))
    todo = store.missing_tasks(existing, tasks, options)
    if not todo:
        log.info("%s: %s already scored with these options", output, ",".join(tasks))
        return existing
    new, samples = run_lm_eval(hf_dir, todo, options, include)
    merged = store.merge(existing, new, todo, options, checkpoint)
    write_json_atomic(output, merged)
    store.write_samples(output.parent, samples)
    run_dir = output.parent.parent.parent  # <run_dir>/eval/<step_dir>/results.json
    if checkpoint is not None and output.parent.parent.name == "eval":
        publish(run_dir, int(checkpoint["step"]), merged)
    return merged


def publish(run_dir: Path, step: int, result: dict[str, Any]) -> None:
    """Send the results to the run's W&B/TensorBoard as ``eval/<task>/<metric>`` (its logging
    settings from the run record). The JSON is the record: a tracker failure only warns."""
    from orchestration.metrics.trackers import publish_eval_results

    try:
        publish_eval_results(Path(run_dir), step, result["results"])
    except Exception as err:  # noqa: BLE001 -- W&B/TensorBoard must not lose a scored result
        log.warning("evaluation results not sent to W&B/TensorBoard: %r", err)


def default_output(hf_dir: Path) -> Path:
    """``<run_dir>/eval/<step_dir>/results.json`` for an export of a run's checkpoint,
    ``<ckpt>.eval/results.json`` beside any other checkpoint (an averaged one), else
    ``hf_dir/eval_results.json``."""
    ckpt = _export_info(hf_dir).get("checkpoint")
    return checkpoint_results(Path(ckpt)) if ckpt else Path(hf_dir) / "eval_results.json"


def checkpoint_results(ckpt: Path) -> Path:
    if ckpt.parent.name == "checkpoints":
        return store.results_path(ckpt.parent.parent, ckpt.name)
    return ckpt.with_name(f"{ckpt.name}.eval") / store.RESULTS_FILE


def evaluate_checkpoint(ckpt: Path, tasks: list[str], options: EvalOptions = EvalOptions(),
                        include: list[Path] | None = None, export_dir: Path | None = None,
                        keep_export: bool = False) -> dict[str, Any]:
    """Export ``ckpt`` (unless every task is cached) and score it; return its results file."""
    from orchestration.export import export

    ckpt = Path(ckpt).resolve()
    output = checkpoint_results(ckpt)
    cached = store.read_current(output, read_metadata(ckpt).get("time"))
    if not store.missing_tasks(cached, tasks, options):
        log.info("%s: cached (%s)", ckpt.name, output)
        return cached
    hf_dir = Path(export_dir or output.parent.parent / "hf") / ckpt.name
    if _export_info(hf_dir).get("checkpoint") != str(ckpt):
        export(ckpt, hf_dir, dtype=options.resolved_dtype())
    try:
        return evaluate(hf_dir, tasks, options, include, output)
    finally:
        if not keep_export:
            shutil.rmtree(hf_dir, ignore_errors=True)
            _remove_if_empty(hf_dir.parent)


def list_checkpoints(run_dir: Path, tasks: list[str] | None = None,
                     options: EvalOptions | None = None) -> list[Path]:
    """The run's kept (complete) checkpoints, oldest first; with ``tasks``, only those whose
    results miss one of them (with ``options``)."""
    found = complete_checkpoints(checkpoint_dir(run_dir))
    if tasks is None:
        return found
    opts = options or EvalOptions()
    return [c for c in found
            if store.missing_tasks(_current(c), tasks, opts)]


def evaluate_run(run_dir: Path, tasks: list[str], options: EvalOptions = EvalOptions(),
                 include: list[Path] | None = None, export_dir: Path | None = None,
                 keep_exports: bool = False) -> list[dict[str, Any]]:
    """Score every kept checkpoint of ``run_dir`` (cached ones are skipped); write the table."""
    for ckpt in complete_checkpoints(checkpoint_dir(run_dir)):
        evaluate_checkpoint(ckpt, tasks, options, include, export_dir, keep_exports)
    return run_table(run_dir, tasks)


def run_table(run_dir: Path, tasks: list[str] | None = None) -> list[dict[str, Any]]:
    """``eval/benchmarks.{csv,md}`` from the results files of the run's kept checkpoints."""
    rows = []
    for ckpt in complete_checkpoints(checkpoint_dir(run_dir)):
        result = _current(ckpt)
        if result:
            info = result.get("checkpoint", {})
            rows.append({"step": read_metadata(ckpt)["step"],
                         "tokens": info.get("consumed_tokens"), **metrics(result, tasks)})
    write_table(rows, Path(run_dir) / "eval" / "benchmarks")
    return rows


def _current(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's results, if they are of this save of it."""
    return store.read_current(checkpoint_results(Path(ckpt).resolve()),
                              read_metadata(ckpt).get("time"))


def _checkpoint_of(hf_dir: Path) -> dict[str, Any] | None:
    info = _export_info(hf_dir)
    if not info:
        return None
    keys = ("checkpoint", "step", "consumed_tokens", "saved_at", "run_name")
    return {"path" if k == "checkpoint" else k: info.get(k) for k in keys}


def _export_info(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "export_info.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _remove_if_empty(directory: Path) -> None:
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


def _kind(path: Path) -> str:
    if (path / "config.json").is_file():
        return "hf"
    if (path / "checkpoint_info.json").is_file():
        return "checkpoint"
    if (path / "checkpoints").is_dir():
        return "run"
    raise SystemExit(f"evaluate: {path} is not an HF folder (config.json), a checkpoint "
                     "(checkpoint_info.json) nor a run directory (checkpoints/)")


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                       max_batch_size=args.max_batch_size, num_fewshot=args.num_fewshot,
                       limit=args.limit, bootstrap_iters=args.bootstrap_iters, seed=args.seed,
                       log_samples=args.log_samples, parallelize=args.parallelize)


def add_option_args(p: argparse.ArgumentParser) -> None:
    """lm-eval's options, with its names (shared with the array job)."""
    d = EvalOptions()
    p.add_argument("--tasks", help="comma-separated lm-eval task names")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES)
    p.add_argument("--batch-size", default=d.batch_size, type=_arg(check_batch_size),
                   help="N, 'auto' or 'auto:N' (lm-eval finds the largest that fits)")
    p.add_argument("--max-batch-size", type=int, help="ceiling for --batch-size auto")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    p.add_argument("--limit", type=_arg(parse_limit), help="N docs per task, or a fraction < 1")
    p.add_argument("--bootstrap-iters", type=int, default=d.bootstrap_iters,
                   help="stderr resamples (0: no stderr)")
    p.add_argument("--seed", type=int, help="lm-eval's random, numpy, torch and few-shot seed")
    p.add_argument("--log-samples", action="store_true", help="write samples_<task>.jsonl")
    p.add_argument("--parallelize", action="store_true",
                   help="shard one model over this node's GPUs (accelerate device_map)")
    p.add_argument("--include", type=Path, action="append", default=[],
                   help="another directory of lm-eval task YAMLs (repeatable)")


def _arg(check):
    def parse(text: str):
        try:
            return check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, nargs="?", help="HF folder, checkpoint or run directory")
    p.add_argument("--all-checkpoints", type=Path, metavar="RUN_DIR",
                   help="score every kept checkpoint of this run")
    p.add_argument("--list-checkpoints", action="store_true",
                   help="print the run's kept checkpoints, oldest first, and exit")
    p.add_argument("--only-missing", action="store_true",
                   help="with --list-checkpoints: only those missing a --tasks result")
    p.add_argument("--table", action="store_true", help="only rewrite the run's table")
    p.add_argument("--output", type=Path, help="results JSON for an HF folder")
    p.add_argument("--export-dir", "--cache-dir", type=Path, dest="export_dir",
                   help="where checkpoints are exported to (default: <run_dir>/eval/hf)")
    p.add_argument("--keep-exports", action="store_true", help="keep the exported folders")
    add_option_args(p)
    args = p.parse_args(argv)
    install_warning_filters()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    path = args.all_checkpoints or args.path
    if path is None or (args.all_checkpoints and args.path):
        p.error("give one PATH (HF folder, checkpoint or run dir) or --all-checkpoints RUN_DIR")
    kind = "run" if args.all_checkpoints else _kind(path)
    tasks = [t for t in (args.tasks or "").split(",") if t] or None
    options = options_from_args(args)
    if args.list_checkpoints or args.table:
        if kind != "run":
            p.error(f"--list-checkpoints/--table need a run directory, not {path}")
        if args.table:
            run_table(path, tasks)
            print((path / "eval" / "benchmarks.md").read_text(), end="")
            return
        if args.only_missing and not tasks:
            p.error("--only-missing needs --tasks")
        for ckpt in list_checkpoints(path, tasks if args.only_missing else None, options):
            print(ckpt.resolve())
        return
    if not tasks:
        p.error("--tasks is required")
    if kind == "run":
        evaluate_run(path, tasks, options, args.include, args.export_dir, args.keep_exports)
        print((path / "eval" / "benchmarks.md").read_text(), end="")
        return
    if kind == "checkpoint":
        result = evaluate_checkpoint(path, tasks, options, args.include, args.export_dir,
                                     args.keep_exports)
        out = checkpoint_results(path.resolve())
    else:
        result = evaluate(path, tasks, options, args.include, args.output)
        out = args.output or default_output(path)
    print(json.dumps(metrics(result, tasks), indent=2), f"\nwritten to {out}")


if __name__ == "__main__":
    main()
