"""``python -m orchestration.data_sequence RUN_DIR [--steps A-B] [--format text|jsonl]``

What each global step of a run trained on, as LLM360 publishes with every checkpoint: the
stage, the batch read (``data_stage[batch]``: another stage's when a window was deferred to the
end of training), each sample as a (source, position in that source's stream) pair, with
``--documents`` the document ids of each sample, and whether the step was skipped or trains a
deferred batch. Computed from the run's resolved config (its newest run record), its
``data_history.json`` and its skip log, without re-running training
(``orchestration/data/sequence.py``). By default steps 1 to the newest checkpoint's step.

    python -m orchestration.data_sequence runs/tiny_k2 --steps 140-160
    python -m orchestration.data_sequence runs/k2 --format jsonl --output k2_sequence.jsonl

Run it from the directory the run was started in when the config names relative data paths.
Exit codes: 0 done, 2 bad arguments or no run record.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from orchestration.common.files import write_text_atomic
from orchestration.common.quiet import install_warning_filters


def _step_range(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    try:
        a, b = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: expected A-B or A (1-based)") from None
    if not 1 <= a <= b:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: expected 1 <= A <= B")
    return a, b


def run_config(run_dir: Path):
    """The newest run record's resolved config, with ``run_dir`` pointing at ``run_dir``."""
    from orchestration.config import load_run_config
    from orchestration.metrics.run_record import list_run_records

    records = [r for r in list_run_records(run_dir) if (r / "config.yaml").is_file()]
    if not records:
        raise FileNotFoundError(f"{run_dir}: no run record (record/*/config.yaml): was it "
                                "trained with orchestration.train?")
    return load_run_config(records[-1] / "config.yaml", run_dir=str(run_dir))


def last_checkpoint_step(run_dir: Path) -> int | None:
    from orchestration.checkpoint.layout import checkpoint_dir, complete_checkpoints, step_of

    done = complete_checkpoints(checkpoint_dir(run_dir))
    return step_of(done[-1]) if done else None


def main(argv: list[str] | None = None) -> int:
    install_warning_filters()  # before anything imports megatron-core
    p = argparse.ArgumentParser(prog="python -m orchestration.data_sequence",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--steps", type=_step_range, help="A-B: only these global steps (1-based)")
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    p.add_argument("--documents", action="store_true", help="also the documents of each sample")
    p.add_argument("--output", type=Path, help="write here (atomically) instead of stdout")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        cfg = run_config(a.run_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import json

    from megatron_patches.parallel import single_process_group
    from orchestration.data.sequence import RunLog, SequenceReader, readable, steps
    from orchestration.loop.stages import plan_stages, total_steps

    log = RunLog.read(a.run_dir)
    end = total_steps(plan_stages(cfg))
    first, last = a.steps or (1, min(last_checkpoint_step(a.run_dir) or end, end))
    single_process_group()
    reader = SequenceReader(cfg, log)
    lines = []
    for item in steps(cfg, log, first, min(last, end)):
        record = reader.record(item, a.documents)
        lines.append(json.dumps(record) if a.format == "jsonl" else readable(record))
    text = "\n".join(lines) + "\n"
    if a.output:
        write_text_atomic(a.output, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
