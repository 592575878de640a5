"""Plots and a markdown summary of a run from its ``metrics.jsonl``.

``python -m orchestration.report RUN_DIR [--out DIR]`` writes into ``<run_dir>/report/``:
``loss.png`` (train loss, held-out loss overall and per source), ``lr.png``, ``grad_norm.png``,
``throughput.png`` (tokens/s and MFU against consumed tokens), ``summary.md`` and
``summary.json``. Stage starts are vertical lines, skipped batches red markers.

Why from the JSONL and not W&B: it is the one log every run has, offline included. A resumed
run appends to it and may repeat steps after its checkpoint; the newest record of a step wins.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import PercentFormatter  # noqa: E402

from orchestration.common.files import write_json_atomic
from orchestration.common.quiet import install_warning_filters


@dataclass
class RunLog:
    """``metrics.jsonl`` split by kind; ``train`` and ``val`` hold one record per step."""

    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)  # step -> reason


def read_log(path: Path) -> RunLog:
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    stages: dict[int, dict] = {}
    skipped: dict[int, str] = {}
    for line in Path(path).read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        event, step = r.get("event"), r.get("step")
        if event == "stage_start":
            stages[step] = r
        elif event == "skip":
            skipped[step] = str(r.get("reason", "skip"))
        elif event is None and "loss" in r:
            train[step] = r
            if r.get("skipped"):
                skipped[step] = str(r["skipped"])
        elif event is None and any(k.startswith("val_loss") for k in r):
            val[step] = {**val.get(step, {}), **r}  # overall and per-source may be separate
    return RunLog(
        [train[s] for s in sorted(train)],
        [val[s] for s in sorted(val)],
        [stages[s] for s in sorted(stages)],
        dict(sorted(skipped.items())),
    )


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _series(
    records: list[dict], key: str, x: str = "step", skip: dict[int, str] | None = None
) -> tuple[list, list]:
    """(x, y) of the finite values of ``key``, leaving out the steps in ``skip``."""
    pairs = [
        (r[x], r[key])
        for r in records
        if _finite(r.get(key)) and _finite(r.get(x)) and r.get("step") not in (skip or {})
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else alpha * v + (1 - alpha) * acc
        out.append(acc)
    return out


def _mark_stages(ax, log: RunLog, x: str = "step") -> None:
    for i, stage in enumerate(log.stages):
        if _finite(stage.get(x)):
            ax.axvline(
                stage[x], color="grey", ls="--", lw=0.8, label="stage start" if i == 0 else None
            )
            ax.text(
                stage[x],
                0.99,
                f" {stage.get('stage', '')}",
                va="top",
                ha="left",
                transform=ax.get_xaxis_transform(),
                fontsize=7,
                color="dimgrey",
            )


def _mark_skips(ax, log: RunLog, key: str) -> None:
    """A red x per skipped batch at its computed value. The axis keeps the scale of the
    accepted steps: a spike above it (the reason it was skipped, often 100x the loss) is drawn
    at the top edge with its value written next to it, a non-finite or uncomputed one at the
    bottom, so one spike never flattens the curve."""
    by_step = {r["step"]: r for r in log.train}
    bottom, top = ax.get_ylim()
    xs, ys, clipped = [], [], []
    for step in log.skipped:
        value = by_step.get(step, {}).get(key)
        xs.append(step)
        if not _finite(value):
            ys.append(bottom)
        elif value > top:
            ys.append(top)
            clipped.append((step, value))
        else:
            ys.append(value)
    if xs:
        ax.scatter(xs, ys, marker="x", color="red", zorder=5, clip_on=False,
                   label=f"skipped ({len(xs)})")
    for step, value in clipped:
        ax.annotate(f"{value:.3g}", (step, top), textcoords="offset points", xytext=(4, -10),
                    fontsize=7, color="red")
    ax.set_ylim(bottom, top)


def _save(fig, ax, path: Path, title: str) -> None:
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(log: RunLog, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5))
    steps, loss = _series(log.train, "loss", skip=log.skipped)  # skipped: markers only
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8, label="train")
    if len(loss) > 20:
        ax.plot(steps, _ema(loss), color="tab:blue", lw=1.5, label="train (EMA 0.1)")
    keys = sorted({k for r in log.val for k in r if k.startswith("val_loss")})
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"][1:] * 4)
    for key in keys:
        xs, ys = _series(log.val, key)
        label = "held-out" if key == "val_loss" else "held-out " + key.split("/", 1)[-1]
        ax.plot(
            xs,
            ys,
            marker="o",
            ms=3,
            lw=1.4 if key == "val_loss" else 0.9,
            label=label,
            color=next(colors),
        )
    ax.set(xlabel="step", ylabel="loss (nats/token)")
    _mark_stages(ax, log)
    _mark_skips(ax, log, "loss")
    _save(fig, ax, path, "Loss")


def plot_metric(log: RunLog, key: str, path: Path, title: str, log_y: bool = False) -> None:
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(*_series(log.train, key), lw=1.0)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel=key)
    _mark_stages(ax, log)
    _mark_skips(ax, log, key)
    _save(fig, ax, path, title)


#: MFU series of the metrics log: both attention conventions (orchestration/metrics/flops.py),
#: and ``mfu`` from logs written before they were named (full attention).
MFU_KEYS = (("mfu_full_attn", "MFU, full attention"), ("mfu_causal", "MFU, causal"),
            ("mfu", "MFU (full attention, older log)"))


def plot_throughput(log: RunLog, path: Path) -> None:
    mfus = [(k, label) for k, label in MFU_KEYS if any(_finite(r.get(k)) for r in log.train)]
    fig, axes = plt.subplots(
        2 if mfus else 1, 1, figsize=(9, 6 if mfus else 4), sharex=True, squeeze=False
    )
    ax = axes[0, 0]
    ax.plot(*_series(log.train, "tokens_per_s", x="consumed_tokens"), lw=0.8)
    ax.set_ylabel("tokens / s")
    for key, label in mfus:
        axes[1, 0].plot(*_series(log.train, key, x="consumed_tokens"), lw=0.8, label=label)
    if mfus:
        axes[1, 0].set_ylabel("MFU")
        axes[1, 0].yaxis.set_major_formatter(PercentFormatter(1.0))
        axes[1, 0].legend(loc="lower right")
    for ax in axes[:, 0]:
        _mark_stages(ax, log, x="consumed_tokens")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("consumed tokens")
    _save(fig, axes[0, 0], path, "Throughput")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(log: RunLog) -> dict[str, Any]:
    """The numbers ``summary.md`` shows; held-out ppl is exp of the held-out mean loss."""
    last = log.train[-1] if log.train else {}
    losses = _series(log.train, "loss", skip=log.skipped)[1]
    # A batch skipped before it was computed takes no time: keep it out of throughput.
    tps = _series(log.train, "tokens_per_s", skip=log.skipped)[1]
    mfu = {k: _series(log.train, k, skip=log.skipped)[1] for k, _ in MFU_KEYS}
    held_out = {}
    if log.val:
        final = log.val[-1]
        for key in sorted(k for k in final if k.startswith("val_loss") and _finite(final[k])):
            name = "all" if key == "val_loss" else key.split("/", 1)[1]
            held_out[name] = {"loss": final[key], "ppl": math.exp(min(final[key], 700.0))}
    return {
        "steps": last.get("step", 0),
        "consumed_tokens": last.get("consumed_tokens", 0),
        "final_train_loss": losses[-1] if losses else None,
        "final_train_loss_mean10": statistics.fmean(losses[-10:]) if losses else None,
        "held_out_step": log.val[-1]["step"] if log.val else None,
        "held_out": held_out,
        "skipped": len(log.skipped),
        "skipped_steps": list(log.skipped)[:50],
        "tokens_per_s_median": statistics.median(tps) if tps else None,
        "mfu_full_attn_median": _median(mfu["mfu_full_attn"] or mfu["mfu"]),
        "mfu_causal_median": _median(mfu["mfu_causal"]),
        "stages": [{"stage": s.get("stage"), "step": s.get("step")} for s in log.stages],
    }


def summary_markdown(s: dict[str, Any], run_dir: Path) -> str:
    def fmt(v: Any, spec: str = ".4f") -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [
        f"# Run summary: `{run_dir}`",
        "",
        "| metric | value |",
        "|---|---|",
        f"| steps | {s['steps']} |",
        f"| consumed tokens | {s['consumed_tokens']:,} |",
        f"| final train loss | {fmt(s['final_train_loss'])} |",
        f"| train loss, mean of last 10 steps | {fmt(s['final_train_loss_mean10'])} |",
        f"| skipped batches | {s['skipped']} |",
        f"| median tokens/s | {fmt(s['tokens_per_s_median'], ',.0f')} |",
        f"| median MFU, full attention (PaLM; Megatron-LM before 2025) | "
        f"{fmt(s['mfu_full_attn_median'], '.1%')} |",
        f"| median MFU, causal (Megatron-LM's current formula) | "
        f"{fmt(s['mfu_causal_median'], '.1%')} |",
        "",
    ]
    if s["held_out"]:
        lines += [
            f"## Held-out (step {s['held_out_step']})",
            "",
            "| source | loss | ppl |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v['loss']:.4f} | {v['ppl']:.3f} |" for k, v in s["held_out"].items()]
        lines.append("")
    if s["stages"]:
        lines += (
            ["## Stages", ""]
            + [f"- `{x['stage']}` from step {x['step']}" for x in s["stages"]]
            + [""]
        )
    return "\n".join(lines)


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """All plots plus ``summary.md``/``summary.json`` for ``run_dir``; return the folder."""
    run_dir = Path(run_dir)
    out = Path(out or run_dir / "report")
    out.mkdir(parents=True, exist_ok=True)
    log = read_log(run_dir / "metrics.jsonl")
    plot_loss(log, out / "loss.png")
    plot_metric(log, "lr", out / "lr.png", "Learning rate")
    plot_metric(log, "grad_norm", out / "grad_norm.png", "Gradient norm (pre-clip)", log_y=True)
    plot_throughput(log, out / "throughput.png")
    summary = summarize(log)
    write_json_atomic(out / "summary.json", summary, sort_keys=False)
    (out / "summary.md").write_text(summary_markdown(summary, run_dir))
    return out


def main(argv: list[str] | None = None) -> None:
    install_warning_filters()  # before anything imports megatron-core
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="output folder (default: <run_dir>/report)")
    args = p.parse_args(argv)
    out = write_report(args.run_dir, args.out)
    print((out / "summary.md").read_text(), end="")


if __name__ == "__main__":
    main()
