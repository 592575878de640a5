"""muP learning-rate transfer: sweep Adam's LR at three widths under SP and muP, plot the
held-out loss against LR per width, and report each width's optimum.

Why: the coordinate check (bench/mup_coord_check.py) shows activations stay O(1); what muP is
*for* is that the optimum LR found on a narrow proxy stays the optimum when the model is made
wider (Tensor Programs V, Fig. 1). Under SP the optimum drifts (usually down) with width.

Each width is one Hydra multirun of the training driver (``conf/experiment/mup_sweep.yaml``)
over ``mup.enabled`` x ``optim.lr``; a width needs its hidden size, FFN size and head counts
set together, which a Hydra sweep cannot tie, so the widths are separate invocations:

    python -m orchestration.train -m experiment=mup_sweep hydra.sweep.dir=runs/mup_sweep-sweep \
        model.hidden_size=256 model.ffn_hidden_size=704 model.num_attention_heads=4 \
        model.num_query_groups=2 mup.enabled=false,true optim.lr=3e-4,1e-3,... \
        train.max_steps=80 train.eval_interval=80

(``--grow both``, the default: widths 64/128/256 are 2x32, 2x64, 4x64 heads; ``--grow heads``
keeps head_dim 32.)

Each run's final ``val_loss`` is read from its ``metrics.jsonl``; the final checkpoints (which
the driver always writes) are deleted once a width is done, unless --keep-checkpoints.

    .venv/bin/python -m bench.mup_lr_sweep                  # run, collect, plot, print tables
    .venv/bin/python -m bench.mup_lr_sweep --collect-only   # re-plot an existing sweep
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from bench.mup_coord_check import GROW, model_shape

REPO = Path(__file__).resolve().parents[1]
DEFAULT_WIDTHS = (64, 128, 256)
DEFAULT_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
PARAMS = {"false": "SP", "true": "muP"}


@dataclass(frozen=True)
class Point:
    param: str  # SP | muP
    width: int
    lr: float
    val_loss: float
    train_loss: float


def width_command(width: int, lrs: list[float], steps: int, sweep_dir: Path,
                  grow: str = "heads", smallest: int = 64, extra: tuple[str, ...] = (),
                  params: tuple[str, ...] = ("SP", "muP")) -> list[str]:
    """The multirun for one width: SP and muP at every LR (12 jobs with the default grid).
    ``grow`` and ``smallest`` pick the shape as the coordinate check does; ``extra`` are more
    Hydra overrides (e.g. ``mup.output_multiplier=4``)."""
    shape = model_shape(width, grow=grow, base_width=smallest)
    return [
        sys.executable,
        "-m",
        "orchestration.train",
        "-m",
        "experiment=mup_sweep",
        f"hydra.sweep.dir={sweep_dir}",
        *[f"model.{key}={value}" for key, value in shape.items()],
        "mup.enabled=" + ",".join(k for k, v in PARAMS.items() if v in params),
        "optim.lr=" + ",".join(f"{lr:g}" for lr in lrs),
        f"train.max_steps={steps}",
        f"train.eval_interval={steps}",
        *extra,
    ]


def run_width(cmd: list[str], log_path: Path) -> float:
    """Run one width's multirun, its output to ``log_path``; return the wall time."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def prune_checkpoints(sweep_dir: Path) -> None:
    """Drop every run's final checkpoint: only the metrics are needed, and a checkpoint left
    behind would make a re-run of the same job resume at its last step instead of training."""
    for ckpt in sweep_dir.glob("*/checkpoints"):
        shutil.rmtree(ckpt)


def _overrides(run_dir: Path) -> dict[str, str]:
    items = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    return dict(item.split("=", 1) for item in items)


def _last(records: list[dict], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return float(values[-1]) if values else float("nan")


def collect(sweep_dir: Path) -> list[Point]:
    """One point per run dir of the sweep: its overrides and the last val_loss it logged
    (NaN when the run diverged before its evaluation or did not finish)."""
    points = []
    for metrics in sorted(sweep_dir.glob("*/metrics.jsonl")):
        over = _overrides(metrics.parent)
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line]
        points.append(
            Point(
                PARAMS[over["mup.enabled"].lower()],
                int(over["model.hidden_size"]),
                float(over["optim.lr"]),
                _last(records, "val_loss"),
                _last(records, "loss"),
            )
        )
    return sorted(points, key=lambda p: (p.param != "SP", p.width, p.lr))


def curve(points: list[Point], param: str, width: int) -> tuple[list[float], list[float]]:
    chosen = [p for p in points if p.param == param and p.width == width]
    return [p.lr for p in chosen], [p.val_loss for p in chosen]


def optimum(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """(best grid LR, LR at the vertex of a parabola in log10 LR through the best grid point
    and its two neighbours). Why the fit: on a half-decade grid a shift of the optimum by less
    than a grid step still moves the vertex, so transfer vs drift is visible between points.
    The vertex is clamped to the neighbours' range; at the grid's edge it is the edge."""
    finite = [(lr, loss) for lr, loss in zip(lrs, losses, strict=True) if math.isfinite(loss)]
    i = min(range(len(finite)), key=lambda k: finite[k][1])
    best = finite[i][0]
    if i == 0 or i == len(finite) - 1:
        return best, best
    (x0, y0), (x1, y1), (x2, y2) = [(math.log10(lr), loss) for lr, loss in finite[i - 1 : i + 2]]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
    if a <= 0:
        return best, best
    return best, 10 ** min(max(-b / (2 * a), x0), x2)


def format_tables(points: list[Point], widths: list[int]) -> str:
    """Markdown: the loss grid, then the optimum per width for SP and muP."""
    lrs = sorted({p.lr for p in points})
    grid = {(p.param, p.width, p.lr): p.val_loss for p in points}
    lines = [
        "| param | width | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|---|" + "---|" * len(lrs),
    ]
    for param in sorted({p.param for p in points}, key=("SP", "muP").index):
        for w in widths:
            cells = [f"{grid.get((param, w, lr), float('nan')):.3f}" for lr in lrs]
            lines.append(f"| {param} | {w} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| param | width | best grid LR | fitted optimum LR | best val loss |",
        "|---|---|---|---|---|",
    ]
    for param in ("SP", "muP"):
        for w in widths:
            xs, ys = curve(points, param, w)
            if not xs:
                continue
            best, fitted = optimum(xs, ys)
            finite = [y for y in ys if math.isfinite(y)]
            lines.append(f"| {param} | {w} | {best:g} | {fitted:.2g} | {min(finite):.3f} |")
    return "\n".join(lines)


def plot(points: list[Point], widths: list[int], path: Path, title: str) -> None:
    """Two panels (SP, muP), held-out loss vs LR (log x), one curve per width; a star marks
    each width's fitted optimum. Diverged runs (NaN or far above the best) sit on the top edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [p.val_loss for p in points if math.isfinite(p.val_loss)]
    low = min(finite)
    top = min(max(finite), low + 3.0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, param in zip(axes, ("SP", "muP"), strict=True):
        for i, w in enumerate(widths):
            xs, ys = curve(points, param, w)
            if not xs:
                continue
            color = cmap(i / max(len(widths) - 1, 1))
            shown = [y if math.isfinite(y) and y <= top else top for y in ys]
            ax.plot(xs, shown, marker="o", color=color, label=f"width {w}")
            clipped = [
                (x, top) for x, y in zip(xs, ys, strict=True) if not (math.isfinite(y) and y <= top)
            ]
            if clipped:
                ax.scatter(*zip(*clipped, strict=True), marker="x", s=60, color=color, zorder=3)
            _, fitted = optimum(xs, ys)
            ax.axvline(fitted, color=color, linestyle=":", alpha=0.7)
            ax.scatter(
                [fitted],
                [min(y for y in ys if math.isfinite(y))],
                marker="*",
                s=180,
                color=color,
                edgecolor="black",
                zorder=4,
            )
        ax.set_xscale("log")
        ax.set_title(f"{param}" + (" (base_width 64)" if param == "muP" else ""))
        ax.set_xlabel("peak learning rate (Adam)")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(low - 0.05 * (top - low), top + 0.05 * (top - low))
    axes[0].set_ylabel("held-out loss after training")
    axes[1].legend(loc="lower right", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS))
    p.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS))
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--grow", choices=GROW, default="both",
                   help="what a wider model widens (as bench.mup_coord_check; 'heads' keeps "
                        "head_dim 32, as docs/mup.md's first sweep did)")
    p.add_argument("--params", nargs="+", choices=("SP", "muP"), default=["SP", "muP"])
    p.add_argument("--set", dest="extra", nargs="*", default=[],
                   help="more Hydra overrides for every run, e.g. mup.output_multiplier=4")
    p.add_argument("--sweep-dir", type=Path, default=Path("runs/mup_sweep-sweep"))
    p.add_argument("--png", type=Path, default=REPO / "docs/img/mup_lr_transfer.png")
    p.add_argument("--collect-only", action="store_true", help="plot an existing sweep")
    p.add_argument("--overwrite", action="store_true", help="delete an existing sweep dir")
    p.add_argument("--keep-checkpoints", action="store_true")
    return p.parse_args(argv)


def run_sweep(args: argparse.Namespace, sweep_dir: Path) -> None:
    if sweep_dir.exists() and any(sweep_dir.glob("*/metrics.jsonl")):
        if not args.overwrite:
            raise SystemExit(
                f"{sweep_dir} holds a sweep (metrics append, checkpoints resume): "
                "pass --overwrite to start again, or --collect-only"
            )
        shutil.rmtree(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    total = 0.0
    for width in args.widths:
        cmd = width_command(width, args.lrs, args.steps, sweep_dir, args.grow,
                            min(args.widths), tuple(args.extra), tuple(args.params))
        print("$ " + " ".join(cmd[1:]).replace(str(REPO) + "/", ""), flush=True)
        seconds = run_width(cmd, sweep_dir / f"width_{width}.log")
        total += seconds
        runs = len(args.params) * len(args.lrs)
        print(f"  width {width}: {seconds:.0f}s ({runs} runs)", flush=True)
        if not args.keep_checkpoints:
            prune_checkpoints(sweep_dir)
    runs = len(args.params) * len(args.lrs) * len(args.widths)
    print(f"sweep: {total:.0f}s wall for {runs} runs")


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    sweep_dir = args.sweep_dir if args.sweep_dir.is_absolute() else REPO / args.sweep_dir
    if not args.collect_only:
        run_sweep(args, sweep_dir)
    points = collect(sweep_dir)
    widths = sorted({p.width for p in points})
    (sweep_dir / "results.json").write_text(json.dumps([asdict(p) for p in points], indent=1))
    print(format_tables(points, widths))
    steps = args.steps
    plot(
        points,
        widths,
        args.png,
        f"LR transfer, tiny LLaMA (4 layers, grow {args.grow}) on the demo corpus: {steps} steps "
        f"x 8 x 64 tokens, warmup 8 + cosine to 0, held-out loss on 4096 tokens",
    )
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
