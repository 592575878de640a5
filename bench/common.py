"""Shared helpers for the benchmarks: alternating repetitions, robust summaries, the environment
header every printed figure carries, a host-device sync counter and config composition.

Why alternate: on a shared, noisy machine (2 cores here) the speed drifts over a run. Running the
variants in interleaved blocks (A B B A A B ...) exposes every variant to the same drift, and
medians (not means, never one timing) keep a single preempted block from moving the answer.
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TypeVar

import torch
from torch.overrides import TorchFunctionMode

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "megatron-core", "numpy", "hydra-core", "sentencepiece", "transformer-engine")


@dataclass(frozen=True)
class Summary:
    """Median and quartiles of repeated measurements (the spread is printed with the median)."""

    median: float
    q1: float
    q3: float
    n: int

    def fmt(self, scale: float = 1.0, unit: str = "") -> str:
        return (
            f"{self.median * scale:.3f}{unit} (IQR {self.q1 * scale:.3f}-"
            f"{self.q3 * scale:.3f}, n={self.n})"
        )


def summarize(values: Sequence[float]) -> Summary:
    """Median and inclusive quartiles; one value gives a zero-width interval."""
    if not values:
        raise ValueError("no measurements to summarize")
    vals = sorted(values)
    if len(vals) == 1:
        return Summary(vals[0], vals[0], vals[0], 1)
    q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return Summary(statistics.median(vals), q1, q3, len(vals))


def alternation_order(names: Sequence[str], reps: int) -> list[str]:
    """Blocks to run: forward order on even repetitions, reversed on odd ones (ABBA...).

    Reversing cancels a linear drift between variants and removes the systematic "always runs
    second" position (warm caches, a just-finished garbage collection).
    """
    if reps < 1 or not names:
        raise ValueError("need at least one variant and one repetition")
    order: list[str] = []
    for rep in range(reps):
        order += list(names) if rep % 2 == 0 else list(reversed(names))
    return order


def run_alternating(blocks: dict[str, Callable[[int], T]], reps: int) -> dict[str, list[T]]:
    """Call each block ``reps`` times in :func:`alternation_order`; collect what each returns.

    A block gets its repetition index (so it can pick its data) and returns its measurement.
    """
    results: dict[str, list[T]] = {name: [] for name in blocks}
    seen: Counter[str] = Counter()
    for name in alternation_order(list(blocks), reps):
        results[name].append(blocks[name](seen[name]))
        seen[name] += 1
    return results


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median: how far the median could move with
    other draws of the same noise (seeded, so a rerun on the same data prints the same)."""
    if not values:
        raise ValueError("no measurements")
    rng = random.Random(seed)
    medians = sorted(
        statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples)
    )
    tail = (1.0 - level) / 2
    return medians[int(tail * (resamples - 1))], medians[int((1.0 - tail) * (resamples - 1))]


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-repetition ratios: adjacent blocks share the machine's state, so their ratio is
    less noisy than the ratio of two medians taken over the whole run."""
    if len(numerator) != len(denominator):
        raise ValueError("paired ratios need the same number of repetitions on both sides")
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b * x``: extrapolates measurements taken at reduced scales."""
    if len(xs) != len(ys) or len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError("need at least two distinct x values, paired with y values")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - b * mx, b


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Wall seconds of ``fn()``. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the
    clock starts and before it stops, so exactly the GPU work ``fn`` queued is counted."""
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def timed_wall_cpu(
    fn: Callable[[], object], sync: Callable[[], None] | None = None
) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``fn()``. CPU time leaves out the time this process
    waited for a core, so on a shared CPU box it is the less noisy measure of work per step."""
    c0 = time.process_time()
    wall = timed(fn, sync)
    return wall, time.process_time() - c0


def device_sync(device: str) -> Callable[[], None] | None:
    return torch.cuda.synchronize if device == "cuda" else None


# Host-device synchronisation points on a GPU: reading a device value on the host, and a
# host list copied to the device by ``torch.tensor(data, device=...)`` (a copy with
# non_blocking=False, after which PyTorch calls cudaStreamSynchronize).
SYNC_METHODS = frozenset({"item", "tolist", "__float__", "__int__", "__bool__", "__index__",
                          "is_nonzero", "equal", "nonzero", "cpu", "numpy"})  # fmt: skip
HOST_TO_DEVICE = frozenset({"tensor", "as_tensor"})
# Sites that sync only in a CPU run, as fallbacks of GPU kernels: torch.optim's Adam reads its
# host-side step counter (GPUs use TE/apex FusedAdam) and Megatron's Python stand-in for apex's
# multi_tensor_l2norm. Reported, but not counted as device syncs.
CPU_FALLBACK_SITES = frozenset({"_get_value", "local_multi_tensor_l2_norm"})
_SKIP_FILES = (__file__, "torch/overrides.py", "torch/utils/_device.py")


def _call_site(depth: int = 2) -> tuple[str, str]:
    """("path:line (function)", function) of the first frame outside torch's dispatch."""
    frame = sys._getframe(depth)
    while frame.f_back is not None and frame.f_code.co_filename.endswith(_SKIP_FILES):
        frame = frame.f_back
    code = frame.f_code
    path = code.co_filename.split("site-packages/")[-1].replace(str(REPO) + "/", "")
    return f"{path}:{frame.f_lineno} ({code.co_name})", code.co_name


class SyncCounter(TorchFunctionMode):
    """Counts would-be host-device syncs by kind and call site while active (works on CPU).

    Caveat: calls made inside autograd's backward engine under the CPU compat layer (which
    re-pushes only its own mode there) are not seen; none of the counted calls happen there.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.cpu_only: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS or (name in HOST_TO_DEVICE and kwargs.get("device") is not None):
            site, function = _call_site()
            key = f"{'host->device copy' if name in HOST_TO_DEVICE else name} @ {site}"
            self.counts[key] += 1
            if function in CPU_FALLBACK_SITES:
                self.cpu_only.add(key)
        return func(*args, **kwargs)

    @property
    def device_syncs(self) -> int:
        """Syncs a GPU run would also have (CPU-only fallbacks left out)."""
        return sum(n for key, n in self.counts.items() if key not in self.cpu_only)


def count_syncs(fn: Callable[[], object], device: str) -> SyncCounter:
    """Sync points of one call of ``fn``. On CUDA they come from the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")``, which also sees syncs made in C++."""
    counter = SyncCounter()
    if device != "cuda":
        with counter:
            fn()
        return counter
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            counter.counts[f"cuda sync @ {Path(w.filename).name}:{w.lineno}"] += 1
    return counter


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "absent"


def _git_commit() -> str:
    try:  # read-only: the commit the figures belong to, marked when the tree has edits
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO, text=True, capture_output=True, check=True
        ).stdout.strip()
        return head + ("+edits" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, str]:
    """What a figure depends on besides the code: machine, packages, date, commit."""
    env = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}",
        "python": platform.python_version(),
        "commit": _git_commit(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    env |= {pkg: _version(pkg) for pkg in PACKAGES}
    return env


def print_header(title: str, command: str) -> None:
    print(f"== {title}")
    print(f"   command: {command}")
    for key, value in environment().items():
        print(f"   {key}: {value}")


def compose_config(overrides: list[str]):
    """The run config exactly as ``python -m orchestration.train <overrides>`` composes it.

    ``run_dir`` defaults to Hydra's output dir, which exists only inside a Hydra app; a
    benchmark that writes nothing gets a placeholder.
    """
    if not any(o.startswith("run_dir=") for o in overrides):
        overrides = [*overrides, "run_dir=runs/bench-unused"]
    from hydra import compose, initialize_config_dir

    from orchestration.config import register_configs, to_run_config

    register_configs()
    os.environ.setdefault("OPT_DATA_DIR", str(REPO / "data"))
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return to_run_config(compose(config_name="config", overrides=overrides))
