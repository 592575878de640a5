"""How long a checkpoint save stops training: synchronous vs ``checkpoint.async_save``.

``python bench/checkpoint_stall.py [--steps-per-block 8] [--reps 6] [overrides ...]``

One process, one model (by default a 25M-parameter LLaMA, 8 x 512 wide, vocab 4096, so the
checkpoint with its Adam state is ~300 MB), one data stream. Three kinds of block alternate
(ABCCBA ...), each ``--steps-per-block`` driver steps long, as ``Trainer.fit`` runs them:

* ``none``: the steps alone (the baseline);
* ``sync``: ``save_checkpoint()`` with the synchronous writer, then the steps;
* ``async``: ``save_checkpoint()`` with :class:`megatron_patches.checkpointing.AsyncSaver` (plan,
  stage the shards, fork the writer), then the steps (each polls the writer), then whatever
  wait remains for the write to be published at the end of the block.

A save's cost to training is its block's time minus the paired ``none`` block's. The ratio
async/sync of that cost is what the async writer buys; the checkpoint's size and the time until
it is published (complete on disk) are printed too.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import paired_ratios, print_header, run_alternating, summarize  # noqa: E402
from bench.step_overhead import build, driver_step  # noqa: E402
from megatron_patches.checkpointing import AsyncSaver  # noqa: E402
from orchestration.checkpoint import layout as ckpt  # noqa: E402

MODEL_25M = ["model.num_layers=8", "model.hidden_size=512", "model.ffn_hidden_size=1408",
             "model.num_attention_heads=8", "model.num_query_groups=4"]  # fmt: skip


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(a: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        total = (3 * a.reps + 2) * a.steps_per_block + 10
        trainer = build(a, run_dir, total)
        trainer.cfg.checkpoint.keep_last = 1
        background = AsyncSaver()
        step = [0]
        published: list[float] = []
        calls: dict[str, list[float]] = {"sync": [], "async": []}
        waits: list[float] = []

        def steps() -> None:
            for _ in range(a.steps_per_block):
                driver_step(trainer, step[0])
                step[0] += 1
                trainer.finalize_checkpoints(blocking=False)

        def block(kind: str):
            def run(_rep: int) -> float:
                trainer.saver = background if kind == "async" else None
                t0 = time.perf_counter()
                if kind != "none":
                    trainer.step = step[0]
                    trainer.save_checkpoint()
                    calls[kind].append(time.perf_counter() - t0)
                steps()
                t_wait = time.perf_counter()
                trainer.finalize_checkpoints(blocking=True)
                elapsed = time.perf_counter() - t0
                if kind == "async":
                    waits.append(elapsed - (t_wait - t0))
                if kind != "none":
                    newest = ckpt.complete_checkpoints(ckpt.checkpoint_dir(run_dir))[-1]
                    published.append(ckpt.read_metadata(newest)["save_seconds"])
                return elapsed

            return run

        for _ in range(2):  # warm-up: first steps, first plans of both writers
            for kind in ("sync", "async"):
                block(kind)(0)
        published.clear()
        waits.clear()
        for values in calls.values():
            values.clear()
        times = run_alternating({k: block(k) for k in ("none", "sync", "async")}, a.reps)
        size = _dir_bytes(ckpt.complete_checkpoints(ckpt.checkpoint_dir(run_dir))[-1])
        shutil.rmtree(Path(run_dir) / "checkpoints", ignore_errors=True)
    return {"times": times, "size": size, "published": published, "calls": calls,
            "waits": waits}


def report(r: dict, steps_per_block: int) -> None:
    times = r["times"]
    print(f"checkpoint: {r['size'] / 2**20:.0f} MiB; blocks of {steps_per_block} steps")
    for name, values in times.items():
        print(f"   {name:<6} block {summarize(values).fmt(unit=' s')}")
    cost = {k: [b - n for b, n in zip(times[k], times["none"], strict=True)]
            for k in ("sync", "async")}  # fmt: skip
    for name, values in cost.items():
        print(f"   {name:<6} save cost to training (block - paired none) "
              f"{summarize(values).fmt(unit=' s')}")
    for name, values in r["calls"].items():
        print(f"   {name:<6} save_checkpoint() call {summarize(values).fmt(unit=' s')}")
    print(f"   async  wait for the writer at the block's end {summarize(r['waits']).fmt(unit=' s')}")
    print(f"   save_seconds until published (both writers): "
          f"{summarize(r['published']).fmt(unit=' s')}")
    ratio = summarize(paired_ratios(cost["async"], cost["sync"]))
    print(f"   async/sync save cost (paired) {ratio.fmt()}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--data", default="demo")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--wandb", default="disabled")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--steps-per-block", type=int, default=8)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--small", action="store_true", help="the tiny model as configured")
    p.add_argument("--json-out", help="write the medians to this JSON file")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    a = p.parse_args(argv)
    if not a.small:
        a.overrides = [*MODEL_25M, *a.overrides]
    print_header("checkpoint stall: synchronous vs async save", " ".join(sys.argv))
    result = measure(a)
    report(result, a.steps_per_block)
    if a.json_out:
        write_json(a.json_out, result)


def write_json(path: str, r: dict) -> None:
    """Medians (seconds) of the blocking save call and the cost to training, per writer."""
    import json

    times = r["times"]
    out = {"checkpoint_mib": r["size"] / 2**20}
    for kind in ("sync", "async"):
        out[f"{kind}_call_s"] = summarize(r["calls"][kind]).median
        cost = [b - n for b, n in zip(times[kind], times["none"], strict=True)]
        out[f"{kind}_cost_s"] = summarize(cost).median
    Path(path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
