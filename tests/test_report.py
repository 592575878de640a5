"""Run report: PNGs are written, and the summary's numbers follow from metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def write_metrics(run_dir: Path) -> None:
    """Two stages, per-source held-out loss, skips (event and record), a resume that
    repeats steps 5-6, and a final line cut short by a kill."""
    lines = [{"event": "stage_start", "step": 0, "stage": "main", "consumed_tokens": 0}]
    for step in range(1, 11):
        if step == 6:
            lines.append(
                {"event": "stage_start", "step": 5, "stage": "anneal", "consumed_tokens": 5 * 1024}
            )
        lines.append(
            {
                "step": step,
                "loss": 5.0 - 0.2 * step,
                "grad_norm": 1.0 / step,
                "lr": 1e-3,
                "tokens_per_s": 1000.0 + step,
                "consumed_tokens": step * 1024,
                "mfu": 0.3,
                "skipped": "loss spike" if step == 3 else None,
            }
        )
        if step == 6:  # the job died after step 6 and resumed from step 4
            lines += [
                {
                    "step": s,
                    "loss": 9.9,
                    "grad_norm": 1.0,
                    "lr": 1e-3,
                    "tokens_per_s": 1.0,
                    "consumed_tokens": s * 1024,
                    "skipped": None,
                }
                for s in (5,)
            ]
    lines.append({"event": "skip", "step": 8, "reason": "replay"})
    lines.append({"step": 10, "val_loss": 2.5, "val_ppl": math.exp(2.5)})
    lines.append({"step": 10, "val_loss/alpha": 2.0, "val_loss/beta": 3.0})
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 11, "lo'
    (run_dir / "metrics.jsonl").write_text(text)


def test_report_writes_plots_and_summary(tmp_path):
    from orchestration.report import main

    write_metrics(tmp_path)
    main([str(tmp_path)])
    report = tmp_path / "report"
    for name in ("loss", "lr", "grad_norm", "throughput"):
        png = (report / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name
    summary = json.loads((report / "summary.json").read_text())
    assert summary["held_out"]["all"]["ppl"] == pytest.approx(math.exp(2.5))
    assert summary["held_out"]["alpha"]["ppl"] == pytest.approx(math.exp(2.0))
    assert summary["steps"] == 10 and summary["consumed_tokens"] == 10 * 1024
    assert summary["skipped"] == 2 and summary["skipped_steps"] == [3, 8]
    assert summary["final_train_loss"] == pytest.approx(3.0)
    assert [s["stage"] for s in summary["stages"]] == ["main", "anneal"]
    md = (report / "summary.md").read_text()
    assert f"{math.exp(2.5):.3f}" in md and "| skipped batches | 2 |" in md


def test_newest_record_of_a_repeated_step_wins(tmp_path):
    from orchestration.report import read_log, summarize

    write_metrics(tmp_path)
    log = read_log(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in log.train] == list(range(1, 11))
    step5 = next(r for r in log.train if r["step"] == 5)
    assert step5["loss"] == pytest.approx(9.9)  # written after the resume
    # Skipped steps 3 and 8 are left out: median of 1, 1001, 1002, 1004, 1006, 1007, 1009, 1010.
    assert summarize(log)["tokens_per_s_median"] == pytest.approx(1005.0)


def test_a_skipped_spike_keeps_the_loss_axis_readable(tmp_path):
    """A 1000x loss (why the batch was skipped) is marked at the top edge with its value, not
    allowed to stretch the axis so far that the accepted curve becomes a flat line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestration.report import RunLog, _mark_skips

    train = [{"step": s, "loss": 5.0 - 0.1 * s} for s in range(1, 21)]
    train[9]["loss"] = 4000.0  # step 10: the spike
    log = RunLog(train=train, skipped={10: "loss spike", 15: "loss spike"})
    fig, ax = plt.subplots()
    ax.plot([r["step"] for r in train if r["step"] != 10],
            [r["loss"] for r in train if r["step"] != 10])
    _mark_skips(ax, log, "loss")
    bottom, top = ax.get_ylim()
    assert top < 10, "the axis keeps the accepted losses' scale"
    (marks,) = ax.collections
    assert [tuple(p) for p in marks.get_offsets()] == [(10, top), (15, train[14]["loss"])]
    assert [t.get_text() for t in ax.texts] == ["4e+03"]
    plt.close(fig)
