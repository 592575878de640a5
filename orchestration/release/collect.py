"""Everything the gallery shows, read from a run directory into plain JSON-able data.

Sources (all optional but the metrics log): ``metrics.jsonl`` (train/held-out curves, stage
starts, rollbacks; read as ``orchestration.report`` reads it, the newest record of a repeated
step winning), ``skipped_batches.jsonl`` (skipped steps, deferred windows), ``record/*``
(the run record: config, code, software; the newest config gives the stages and their mixes),
``eval/`` (lm-eval results per checkpoint), ``prompts/`` and ``samples.jsonl`` (answers).

Evaluation results are read in both layouts the project has written: lm-eval's full output
dict in ``eval/step_XXXXXXXX/results.json`` and the summary ``eval/step_XXXXXXXX.json``
(``{"results", "versions", "export"}``); each has ``results: {task: {"metric,filter": value,
"metric_stderr,filter": stderr or "N/A"}}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from orchestration.metrics.run_record import list_run_records
from orchestration.release.prompts import load_prompt_set, read_answers
from orchestration.report import read_log

TRAIN_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "consumed_tokens", "mfu")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


def _step_of_name(name: str) -> int | None:
    stem = name.removesuffix(".json")
    if stem.startswith("step_") and stem[5:].isdigit():
        return int(stem[5:])
    return None


# --------------------------------------------------------------------------- curves
def curves(run_dir: Path) -> dict[str, Any]:
    """Train and held-out series, stage starts, skipped steps, deferred windows, rollbacks."""
    log = read_log(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else None
    if log is None:
        return {"train": {}, "val": {}, "stages": [], "skipped": [], "deferred": [],
                "rollbacks": []}
    train = {key: [[r["step"], r[key]] for r in log.train if _finite(r.get(key))]
             for key in TRAIN_KEYS}
    val_keys = sorted({k for r in log.val for k in r if k.startswith("val_loss")})
    val = {key: [[r["step"], r[key]] for r in log.val if _finite(r.get(key))]
           for key in val_keys}
    stages = [{"step": s.get("step"), "stage": s.get("stage"), "index": s.get("index")}
              for s in log.stages]
    skip_log = [e for e in _jsonl(run_dir / "skipped_batches.jsonl") if not e.get("rolled_back")]
    skipped = _skipped(log.skipped, skip_log, {r["step"]: r for r in log.train})
    events = _jsonl(run_dir / "metrics.jsonl")
    rollbacks = [{"step": e.get("step"), "to_step": e.get("to_step"), "action": e.get("action"),
                  "window": e.get("window")} for e in events if e.get("event") == "rollback"]
    return {"train": train, "val": val, "stages": stages, "skipped": skipped,
            "deferred": _deferred(skip_log, stages), "rollbacks": rollbacks}


def _skipped(from_metrics: dict[int, str], skip_log: list[dict], train: dict[int, dict]
             ) -> list[dict[str, Any]]:
    by_step = {int(s): {"step": int(s), "reason": r} for s, r in from_metrics.items()}
    for e in skip_log:
        if e.get("kind", "skip") == "skip" and "step" in e:
            by_step[int(e["step"])] = {"step": int(e["step"]), "reason": e.get("reason"),
                                       "computed": e.get("computed")}
    for entry in by_step.values():
        loss = train.get(entry["step"], {}).get("loss")
        entry["loss"] = loss if _finite(loss) else None
    return [by_step[s] for s in sorted(by_step)]


RUN_SCOPE = -1  # a defer entry's stage_index when the window went to the end of training


def _deferred(skip_log: list[dict], stages: list[dict]) -> list[dict[str, Any]]:
    """Deferred windows in steps: the batches ``[start, end)`` that would have trained at
    those steps, moved to the end of stage ``stage_index`` (positions in that stage), or to
    the end of training (``stage_index`` -1, ``spike.defer_to=training_end``: positions in
    the run, step - 1)."""
    first = {s.get("index"): s.get("step") for s in stages} | {RUN_SCOPE: 1}
    out = []
    for e in skip_log:
        if e.get("kind") != "defer" or first.get(e.get("stage_index")) is None:
            continue
        start, end = e["batches"]
        base = first[e["stage_index"]]
        out.append({"stage": e.get("stage"), "first_step": base + start,
                    "last_step": base + end - 1, "decided_at": e.get("step"),
                    "to": "training end" if e["stage_index"] == RUN_SCOPE else "stage end"})
    return out


# --------------------------------------------------------------------------- evaluations
def evaluations(run_dir: Path) -> dict[str, Any]:
    """``{"checkpoints": [steps], "tasks": {task: {metric: {"higher_is_better",
    "points": {step: [value, stderr or None]}}}}, "files": {step: [paths]}}``."""
    eval_dir = run_dir / "eval"
    found: list[tuple[int, Path]] = []
    if eval_dir.is_dir():
        for path in sorted(eval_dir.glob("step_*.json")):
            found.append((_step_of_name(path.name), path))
        for path in sorted(eval_dir.glob("step_*/results.json")):
            found.append((_step_of_name(path.parent.name), path))
    tasks: dict[str, dict[str, dict]] = {}
    files: dict[int, list[str]] = {}
    for step, path in found:
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        step = step if step is not None else (doc.get("export") or {}).get("step")
        if step is None or not isinstance(doc.get("results"), dict):
            continue
        files.setdefault(int(step), []).append(str(path))
        scores = {**(doc.get("groups") or {}), **doc["results"]}  # group aggregates too
        _add_results(tasks, int(step), scores, doc.get("higher_is_better") or {})
    return {"checkpoints": sorted(files), "tasks": tasks, "files": files}


def _add_results(tasks: dict, step: int, results: dict, higher: dict) -> None:
    for task, values in results.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            name, _, filt = key.partition(",")
            if not _finite(value) or name.endswith("_stderr") or name in ("sample_len",
                                                                          "sample_count"):
                continue
            metric = name if filt in ("", "none") else f"{name} ({filt})"
            stderr = values.get(f"{name}_stderr,{filt}" if filt else f"{name}_stderr")
            entry = tasks.setdefault(task, {}).setdefault(
                metric, {"higher_is_better": None, "points": {}})
            if entry["higher_is_better"] is None:  # only lm-eval's full output says
                entry["higher_is_better"] = (higher.get(task) or {}).get(name)
            entry["points"][str(step)] = [float(value), float(stderr) if _finite(stderr)
                                          else None]


# --------------------------------------------------------------------------- prompts
def prompt_answers(run_dir: Path, prompt_set: Path | None = None) -> dict[str, Any]:
    """Prompts (curated set order, then any other answered ones) and answers per step;
    the in-training samples (``samples.jsonl``) are a category of their own."""
    prompts: dict[str, dict] = {}
    if prompt_set is not None and prompt_set.is_file():
        for p in load_prompt_set(prompt_set)[1]:
            prompts[p.id] = {"id": p.id, "category": p.category, "prompt": p.prompt}
    answers: dict[str, dict[str, str]] = {}
    for path in sorted((run_dir / "prompts").glob("step_*.jsonl")):
        step = _step_of_name(path.stem)
        for row in read_answers(path):
            if step is None or "id" not in row or "answer" not in row:
                continue
            prompts.setdefault(row["id"], {"id": row["id"], "category": row.get("category",
                               "others"), "prompt": row.get("prompt", "")})
            if prompts[row["id"]]["prompt"] == row.get("prompt"):  # an edited prompt: stale
                answers.setdefault(str(step), {})[row["id"]] = row["answer"]
    for row in _jsonl(run_dir / "samples.jsonl"):
        if not {"step", "prompt", "completion"} <= set(row):
            continue
        pid = "sample: " + row["prompt"]
        prompts.setdefault(pid, {"id": pid, "category": "training samples",
                                 "prompt": row["prompt"]})
        answers.setdefault(str(row["step"]), {})[pid] = row["completion"]
    answered = {pid for per_step in answers.values() for pid in per_step}
    shown = [p for p in prompts.values() if p["id"] in answered]
    categories = list(dict.fromkeys(p["category"] for p in shown))
    return {"checkpoints": sorted(int(s) for s in answers), "categories": categories,
            "prompts": shown, "answers": answers}


# --------------------------------------------------------------------------- record, mix
def records(run_dir: Path) -> list[dict[str, Any]]:
    """One summary per job start (oldest first) with the record's folder and files."""
    out = []
    for folder in list_run_records(run_dir):
        try:
            rec = json.loads((folder / "record.json").read_text())
        except (OSError, json.JSONDecodeError):
            rec = {}
        git, job, versions = rec.get("git") or {}, rec.get("job") or {}, rec.get("versions") or {}
        out.append({
            "name": folder.name, "path": str(folder),
            "files": sorted(p.name for p in folder.iterdir() if p.is_file()),
            "created_utc": rec.get("created_utc"), "hostname": rec.get("hostname"),
            "commit": git.get("commit"), "branch": git.get("branch"), "dirty": git.get("dirty"),
            "job_id": job.get("job_id"), "restart_count": job.get("restart_count"),
            "versions": {k: versions[k] for k in ("python", "torch", "megatron-core",
                                                   "transformer-engine", "nccl", "gpu")
                         if k in versions},
        })
    return out


def data_mix(run_dir: Path) -> dict[str, Any]:
    """Per stage of the newest recorded config: steps, tokens and each source's share,
    multiplier, tokens and epochs (``data_prep.mix``; token counts need the ``.idx`` files or
    the sources' published ``tokens``)."""
    from data_prep.mix import compute_mix
    from orchestration.config import to_run_config
    from orchestration.loop.stages import plan_stages

    recs = list_run_records(run_dir)
    if not recs:
        return {"stages": [], "error": f"no run record under {run_dir}/record"}
    try:
        saved = yaml.safe_load((recs[-1] / "config.yaml").read_text())
        cwd = (json.loads((recs[-1] / "record.json").read_text()) or {}).get("cwd")
        stages = plan_stages(to_run_config(saved))
    except Exception as err:  # noqa: BLE001 -- an old record must not stop the gallery
        return {"stages": [], "error": f"{recs[-1]}/config.yaml: {err}"}
    out = []
    for st in stages:
        entry = {"index": st.index, "name": st.name, "mix": st.data.name,
                 "first_step": st.first_step, "last_step": st.last_step, "steps": st.steps,
                 "tokens": st.tokens, "sources": [], "error": None}
        try:
            sources = [_at_cwd(s, cwd) for s in st.data.sources]
            for share in compute_mix(sources, st.tokens):
                entry["sources"].append({
                    "name": share.name, "share": share.share, "multiplier": share.multiplier,
                    "tokens": share.tokens, "effective_tokens": share.effective_tokens,
                    "epochs": share.epochs(st.tokens)})
        except (ValueError, OSError) as err:
            entry["error"] = str(err)
            entry["sources"] = [{"name": s.name, "multiplier": s.multiplier}
                                for s in st.data.sources]
        out.append(entry)
    return {"stages": out, "error": None, "config": str(recs[-1] / "config.yaml")}


def _at_cwd(src, cwd: str | None):
    """A source whose relative path was relative to the training job's cwd."""
    import dataclasses

    if not cwd or not src.path or Path(src.path).is_absolute() or Path(src.path + ".idx").exists():
        return src
    return dataclasses.replace(src, path=str(Path(cwd) / src.path))


def data_sequences(run_dir: Path) -> list[str]:
    """What ``python -m orchestration.data_sequence RUN_DIR --output RUN_DIR/data_sequence.jsonl``
    wrote (any ``data_sequence*`` in the run directory)."""
    return sorted(str(p) for p in run_dir.glob("data_sequence*"))


def collect(run_dir: Path, prompt_set: Path | None = None,
            sequences: list[Path] | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir}/metrics.jsonl not found: not a run directory")
    return {"run": {"name": run_dir.resolve().name, "run_dir": str(run_dir.resolve())},
            "curves": curves(run_dir), "eval": evaluations(run_dir),
            "prompts": prompt_answers(run_dir, prompt_set), "mix": data_mix(run_dir),
            "records": records(run_dir),
            "data_sequences": [str(p) for p in sequences] if sequences
            else data_sequences(run_dir)}
