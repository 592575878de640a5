"""The data sequence of a run: for each global step, what it trained on.

LLM360 publishes this with every checkpoint. It is computed, never logged: from the run's
resolved config (its stages, mixes and seeds), the mix changes it recorded
(``data_history.json``), and its skip log (``skipped_batches.jsonl``: the skipped steps and
the deferred windows that survived rollbacks). The order is the one training uses
(``SkipBatchesCallback.remap_position``/``remap_batch``, ``Trainer.batch_for_step``) and the
samples come from the same streams (``orchestration/data/streams.py``), so no training is
re-run: the indices are loaded from ``run_dir/data_cache`` (or rebuilt, identically).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestration.callbacks.skipping import RUN_SCOPE, defer, read_skip_log
from orchestration.config import RunConfig
from orchestration.loop.stages import Stage, plan_stages, stage_at, total_steps


@dataclass
class RunLog:
    """What a run recorded about its data: mix changes, skipped steps, deferred windows."""

    history: list[dict]
    skipped: dict[int, str]  # step -> reason
    deferred: dict[int, list[list[int]]]  # stage index (RUN_SCOPE: the run) -> spans

    @classmethod
    def read(cls, run_dir: Path) -> RunLog:
        path = run_dir / "data_history.json"
        history = json.loads(path.read_text()) if path.is_file() else []
        log = run_dir / "skipped_batches.jsonl"
        skips, deferred = read_skip_log(log) if log.is_file() else ({}, {})
        skipped = {step: entry["reason"] for step, entry in skips.items()}
        return cls(history, skipped, deferred)


@dataclass
class StepData:
    """What global step ``step`` trained on."""

    step: int
    stage: Stage
    data_stage: Stage  # whose batch it read (``stage`` unless deferred to the end of training)
    batch: int  # the batch position in ``data_stage``
    skipped: str | None
    deferred: bool  # its batch was moved here from an earlier step by a deferral

    @property
    def sample_range(self) -> tuple[int, int]:
        first = self.data_stage.first_sample(self.batch)  # a batch-size ramp shrinks early ones
        return first, first + self.data_stage.batch_size(self.batch)


def step_order(stages: list[Stage], deferred: dict[int, list[list[int]]],
               step: int) -> tuple[Stage, int]:
    """(stage, batch) that ``step`` reads after the deferrals, as the training loop maps it."""
    position = defer(deferred.get(RUN_SCOPE, []), total_steps(stages), step - 1)
    data_stage = stage_at(stages, position + 1)
    batch = defer(deferred.get(data_stage.index, []), data_stage.steps,
                  data_stage.batch_index(position + 1))
    return data_stage, batch


def steps(cfg: RunConfig, log: RunLog, first: int, last: int) -> Iterator[StepData]:
    stages = plan_stages(cfg)
    for step in range(first, last + 1):
        stage = stage_at(stages, step)
        data_stage, batch = step_order(stages, log.deferred, step)
        natural = data_stage.steps_before + batch  # the run position it had before deferrals
        yield StepData(step, stage, data_stage, batch, log.skipped.get(step),
                       deferred=step - 1 > natural)


class SequenceReader:
    """The samples of each step: every stage's training data, built once from the config."""

    def __init__(self, cfg: RunConfig, log: RunLog) -> None:
        from orchestration.data.datasets import run_streams

        self.cfg, self.log = cfg, log
        self.stages = plan_stages(cfg)
        self.streams = run_streams(cfg)
        self._train: dict[int, object] = {}

    def train(self, stage: Stage):
        from orchestration.data.datasets import stage_train_data

        if stage.index not in self._train:
            self._train[stage.index] = stage_train_data(self.stages, stage, self.streams,
                                                        self.log.history)
        return self._train[stage.index]

    def record(self, item: StepData, documents: bool = False) -> dict:
        """One JSONL record: the step, its stage, the batch read and its (source, position)
        pairs, with the documents of each sample when asked."""
        begin, end = item.sample_range
        train = self.train(item.data_stage)
        out = {"step": item.step, "stage": item.stage.name, "data_stage": item.data_stage.name,
               "batch": item.batch, "skipped": item.skipped, "deferred": item.deferred,
               "samples": [[s, p] for s, p in train.sources(range(begin, end))]}
        if documents:
            out["documents"] = [train.documents(i) for i in range(begin, end)]
        return out


def readable(record: dict) -> str:
    """One line per step: stage, batch, per source the positions read (as ranges)."""
    by_source: dict[str, list[int]] = {}
    for source, position in record["samples"]:
        by_source.setdefault(source, []).append(position)
    parts = [f"{source} {_ranges(sorted(positions))}" for source, positions in by_source.items()]
    where = f"{record['data_stage']}[{record['batch']}]"
    flags = (" DEFERRED here" if record["deferred"] else "") + (
        f" SKIPPED ({record['skipped']})" if record["skipped"] else "")
    return f"step {record['step']:>8} {record['stage']:<10} reads {where:<16}{flags}  " + \
        "; ".join(parts)


def _ranges(values: list[int]) -> str:
    spans, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            spans.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(spans)
