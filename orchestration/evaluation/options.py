"""lm-eval's own options, as one typed value shared by the command, the array job and the hook.

Why a dataclass: the options that change what a score means (few-shot count, limit, dtype,
seeds, bootstrap iterations) are also the cache key of a checkpoint's results, so a rerun with
the same ones does nothing and a rerun with others recomputes. Device and batch size only
decide how fast the same numbers come out, so they are not part of the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EvalOptions:
    device: str = "auto"  # auto: cuda when a GPU is visible, else cpu; or cuda:N, cpu, mps
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on the CPU
    batch_size: str = "1"  # an int, or lm-eval's "auto" / "auto:N" (largest that fits)
    max_batch_size: int | None = None  # the ceiling of "auto"
    num_fewshot: int | None = None  # None: each task's own default
    limit: float | None = None  # docs per task (an int), or a fraction of them (< 1.0)
    # lm-eval skips stderr when 0 ("N/A"); mean-type metrics (acc) take a closed form at any
    # value > 0, the others are bootstrapped this many times (lm-eval's CLI default: 100000).
    bootstrap_iters: int = 1000
    seed: int | None = None  # sets lm-eval's four seeds; None keeps its 0,1234,1234,1234
    log_samples: bool = False  # also write every scored document (samples_<task>.jsonl)
    parallelize: bool = False  # spread one big model over the node's GPUs (accelerate)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "float32" if self.resolved_device() == "cpu" else "bfloat16"

    def lm_eval_batch_size(self) -> int | str:
        return int(self.batch_size) if self.batch_size.isdigit() else self.batch_size

    def cache_key(self) -> dict[str, Any]:
        """What a cached result must have been computed with to be reused."""
        return {"num_fewshot": self.num_fewshot, "limit": self.limit,
                "dtype": self.resolved_dtype(), "bootstrap_iters": self.bootstrap_iters,
                "seed": self.seed}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "device": self.resolved_device(), "dtype": self.resolved_dtype()}


def parse_limit(text: str) -> float | int:
    """``--limit 50`` (documents) or ``--limit 0.1`` (a fraction), as lm-eval reads it."""
    value = float(text)
    if value <= 0:
        raise ValueError(f"--limit {text}: must be > 0")
    return int(value) if value >= 1 and value == int(value) else value


def check_batch_size(text: str) -> str:
    if text.isdigit() and int(text) > 0:
        return text
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()):
        return text
    raise ValueError(f"--batch-size {text!r}: expected a positive integer, 'auto' or 'auto:N'")


def to_cli_args(options: EvalOptions) -> list[str]:
    """``options`` as ``orchestration.evaluate`` arguments (what the in-training hook runs)."""
    args = ["--device", options.device, "--dtype", options.dtype, "--batch-size",
            options.batch_size, "--bootstrap-iters", str(options.bootstrap_iters)]
    for flag, value in (("--max-batch-size", options.max_batch_size),
                        ("--num-fewshot", options.num_fewshot), ("--limit", options.limit),
                        ("--seed", options.seed)):
        if value is not None:
            args += [flag, str(value)]
    args += ["--log-samples"] if options.log_samples else []
    return args + (["--parallelize"] if options.parallelize else [])
