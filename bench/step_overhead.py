"""Driver step vs a bare Megatron-Core loop: per-step overhead and host-device syncs.

``python bench/step_overhead.py [--model tiny] [--device cpu] [--steps 100] [--block 5]``

Why: the driver adds a loop around Megatron (LR schedule, callbacks, the skip-decision
all-reduce, a vetoable optimizer step, JSONL metrics). It must cost next to nothing next to
the step itself and add no host-device sync to the bare loop's one (Megatron's grad norm).

Both loops use the same objects from one ``build_session(cfg)`` (a one-rank gloo world on
CPU) and read the same global batches through ``orchestration.data.microbatches``:

* driver: ``fit()``'s loop body, ``Trainer.run_step()`` (its hooks, the step, ``after_step``) with
  ``default_callbacks`` (metrics JSONL, eval and checkpoint checks whose intervals never fire);
* bare: what a Megatron-LM user writes, ``get_forward_backward_func()(...)`` and
  ``optimizer.step()`` with Megatron-LM's GPT loss function.

Blocks of ``--block`` steps alternate (ABBA); each block gives one per-step time. Syncs are
counted on separate, untimed steps so the counting mode costs the timed ones nothing.
"""

from __future__ import annotations

import argparse
import functools
import logging
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    bootstrap_ci,
    compose_config,
    count_syncs,
    device_sync,
    paired_ratios,
    print_header,
    run_alternating,
    summarize,
    timed,
    timed_wall_cpu,
)
from megatron_patches.parallel import comm_device  # noqa: E402
from orchestration.data.batches import microbatches  # noqa: E402
from orchestration.loop.host_copy import HostCopy  # noqa: E402

NEVER = 10**9  # an eval/checkpoint interval that does not fire


def bench_overrides(a: argparse.Namespace, run_dir: str, max_steps: int) -> list[str]:
    return [
        f"model={a.model}",
        f"data={a.data}",
        f"run_dir={run_dir}",
        f"runtime.device={a.device}",
        f"logging.wandb_mode={a.wandb}",
        f"train.micro_batch_size={a.micro_batch_size}",
        f"train.global_batch_size={a.global_batch_size}",
        f"train.max_steps={max_steps}",
        f"train.eval_interval={NEVER}",
        f"checkpoint.save_interval={NEVER}",
        "optim.warmup_steps=2",
        "spike.threshold=1e9",  # spike rules run every step but never fire (no skipped update)
        *a.overrides,
    ]


def _bare_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Megatron-LM ``pretrain_gpt.loss_func``: (loss sum, token count, report)."""
    mask = loss_mask.view(-1).float()
    loss = torch.sum(output.view(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1)])}


def _bare_forward_step(data_iterator, model):
    batch = {k: v.to(comm_device(), non_blocking=True) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, functools.partial(_bare_loss, batch["loss_mask"])


class BareLoop:
    """Megatron-Core's schedule and optimizer with nothing around them."""

    def __init__(self, trainer) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.trainer = trainer
        self.forward_backward = get_forward_backward_func()

    def step(self, index: int) -> None:
        t, layout = self.trainer, self.trainer.layout
        for chunk in t.model_chunks:
            chunk.zero_grad_buffer()
        t.session.optimizer.zero_grad()
        self.forward_backward(
            forward_step_func=_bare_forward_step,
            data_iterator=microbatches(t.data.train, layout, index),
            model=t.model_chunks,
            num_microbatches=layout.num_microbatches,
            seq_length=t.stage.seq_length,
            micro_batch_size=layout.micro_batch_size,
            forward_only=False,
        )
        t.session.optimizer.step()


def driver_step(trainer, index: int):
    """``Trainer.fit()``'s loop body (``run_step``) reading batch ``index``, i.e. global step
    ``index + 1``; returns its StepResult."""
    trainer.step = index
    return trainer.run_step()


def _host_us(fn, calls: int) -> tuple[float, float]:
    """Median and mean microseconds per call (the mean keeps rare blocking calls in)."""
    samples = [timed(fn) * 1e6 for _ in range(calls)]
    return statistics.median(samples), statistics.fmean(samples)


def driver_parts(trainer, result, last_step: int, calls: int = 400) -> None:
    """Host time of each piece the driver adds around Megatron, each timed alone (medians).

    after_step runs on results of steps cycling below ``last_step``, so the metrics echo fires
    at its real rate (1 in log_interval) and the end-of-run eval/checkpoint never does.
    """
    import dataclasses

    import torch.distributed as dist

    from megatron_patches.optimizer import apply_lr
    from orchestration.loop.lr import lr_for_step, weight_decay_for_step

    t, steps = trainer, iter(range(10**9))

    def bookkeeping() -> None:
        step = t.step + 1
        t.enter_stage(step)
        lr = lr_for_step(t.cfg, t.stages, step)
        apply_lr(t.session.optimizer, lr, weight_decay_for_step(t.cfg, t.stages, step))
        t.callbacks.before_step(t, step)
        t.batch_for_step(step)

    host = HostCopy(4, torch.float64, comm_device())

    def skip_reduce() -> None:  # StepRunner._forward_backward after the schedule, and the read
        # [LM loss sum, tokens, z-loss sum] + the stop vote
        total = torch.zeros(3, dtype=torch.float64, device=comm_device())
        total = torch.cat([total, total.new_full((1,), 0.0)])
        dist.all_reduce(total)
        host.start(total)
        host.values()

    def after(cb) -> None:
        cb.after_step(t, dataclasses.replace(result, step=next(steps) % last_step + 1))

    parts = {
        "pre-step bookkeeping (LR, WD, before_step, remap)": bookkeeping,
        "skip-decision reduce (cat, all_reduce, copy to host, read)": skip_reduce,
    }
    parts |= {
        f"after_step: {cb.name} ({type(cb).__name__})": functools.partial(after, cb)
        for cb in t.callbacks.callbacks
    }
    print(f"\nhost time of the driver's own pieces, per step ({calls} calls each):")
    print(f"   {'median':>8}  {'mean':>8}")
    totals = [0.0, 0.0]
    for name, fn in parts.items():
        med, mean = _host_us(fn, calls)
        totals = [totals[0] + med, totals[1] + mean]
        print(f"   {med:8.1f}  {mean:8.1f} us  {name}")
    print(f"   {totals[0]:8.1f}  {totals[1]:8.1f} us  total")


def build(a: argparse.Namespace, run_dir: str, max_steps: int):
    from orchestration.loop.session import build_session
    from orchestration.loop.trainer import Trainer
    from orchestration.train import default_callbacks

    cfg = compose_config(bench_overrides(a, run_dir, max_steps))
    objects = build_session(cfg)
    trainer = Trainer(cfg, objects, default_callbacks(cfg, objects))
    trainer.callbacks.on_fit_start(trainer)  # installs the stop-signal handler, as fit() does
    trainer.enter_stage(1)
    return trainer


def measure(a: argparse.Namespace, trainer) -> dict:
    bare, sync = BareLoop(trainer), device_sync(a.device)
    reps = max(a.steps // a.block, 2)
    first = a.warmup

    def block(step_fn):
        def run(rep: int) -> tuple[float, float]:
            start = first + rep * a.block  # both loops read the same batches in block `rep`
            wall, cpu = timed_wall_cpu(lambda: [step_fn(start + j) for j in range(a.block)], sync)
            return wall / a.block, cpu / a.block

        return run

    skipped: list[int] = []  # driver steps without an update would be cheaper: none expected

    def watched(step_fn):
        def run(index: int) -> None:
            if not step_fn(index).updated:
                skipped.append(index)

        return run

    loops = {"driver": watched(functools.partial(driver_step, trainer)), "bare": bare.step}
    for i in range(a.warmup):
        for step_fn in loops.values():
            step_fn(i)
    pairs = run_alternating({name: block(fn) for name, fn in loops.items()}, reps)
    times = {
        clock: {name: [p[i] for p in v] for name, v in pairs.items()}
        for i, clock in enumerate(("wall", "cpu"))
    }
    after = first + reps * a.block
    syncs = {
        name: count_syncs(functools.partial(fn, after), a.device) for name, fn in loops.items()
    }
    last = driver_step(trainer, after + 1)  # a real StepResult for the per-part timings
    return {"times": times, "syncs": syncs, "reps": reps, "last": last, "skipped": skipped}


def report_times(times: dict[str, list[float]], clock: str) -> None:
    d, b = times["driver"], times["bare"]
    print(f"{clock} time per step:")
    for name, values in times.items():
        print(f"   {name:<11} {summarize(values).fmt(1e3, ' ms')}")
    paired = paired_ratios(d, b)
    lo, hi = bootstrap_ci(paired)
    diffs = summarize([(x - y) * 1e3 for x, y in zip(d, b, strict=True)])
    print(
        f"   driver/bare: ratio of medians {statistics.median(d) / statistics.median(b):.4f}, "
        f"paired ratio {summarize(paired).fmt()}, 95% CI of its median {lo:.3f}-{hi:.3f}; "
        f"driver - bare {diffs.fmt(1.0, ' ms')}"
    )


def report(res: dict, a: argparse.Namespace, trainer) -> None:
    lay = trainer.layout
    print(
        f"\nconfig: model={a.model} mbs={lay.micro_batch_size} gbs={lay.global_batch_size} "
        f"seq={trainer.stage.seq_length} device={a.device} wandb={a.wandb} "
        f"torch threads={torch.get_num_threads()}; {res['reps']} blocks of {a.block} steps "
        f"per loop, alternating ABBA, after {a.warmup} warm-up steps each"
    )
    print(
        f"driver steps without an update: {len(res['skipped'])}; "
        f"stop requested: {trainer.control.stop}"
    )
    for clock in ("wall", "cpu"):
        report_times(res["times"][clock], clock)
    for name, counter in res["syncs"].items():
        print(
            f"{name}: {counter.device_syncs} device sync(s) per step "
            f"(+{sum(counter.counts.values()) - counter.device_syncs} CPU-fallback only)"
        )
        for key, n in sorted(counter.counts.items()):
            print(f"   {n:3d} x {key}{'   [CPU fallback]' if key in counter.cpu_only else ''}")


def write_json(path: str, res: dict) -> None:
    """Per-step medians (wall, ms), the paired driver/bare ratio and the device syncs."""
    import json

    wall = res["times"]["wall"]
    out = {f"{name}_ms": statistics.median(v) * 1e3 for name, v in wall.items()}
    out["paired_ratio"] = statistics.median(paired_ratios(wall["driver"], wall["bare"]))
    out |= {f"{name}_syncs": c.device_syncs for name, c in res["syncs"].items()}
    Path(path).write_text(json.dumps(out, indent=1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", help="conf/model/<name>.yaml")
    p.add_argument("--data", default="demo", help="conf/data/<name>.yaml")
    p.add_argument("--steps", type=int, default=100, help="timed steps per loop")
    p.add_argument("--block", type=int, default=5, help="steps per alternating block")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--global-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--wandb", choices=("disabled", "offline"), default="disabled")
    p.add_argument("--no-parts", action="store_true", help="skip the per-part breakdown")
    p.add_argument("--json-out", help="write the medians and sync counts to this JSON file")
    p.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides, e.g. parallel.recompute=full"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    print_header(
        "step overhead: driver vs bare Megatron-Core loop",
        "python bench/step_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    with tempfile.TemporaryDirectory() as run_dir:
        # The driver logs as a real run does (INFO, formatted lines), into a file not the console.
        logging.basicConfig(level=logging.INFO, filename=f"{run_dir}/driver.log", force=True)
        max_steps = a.warmup + max(a.steps // a.block, 2) * a.block + 5
        trainer = build(a, run_dir, max_steps)
        res = measure(a, trainer)
        report(res, a, trainer)
        if a.json_out:
            write_json(a.json_out, res)
        if not a.no_parts:
            driver_parts(trainer, res["last"], max_steps - 2)
        trainer.callbacks.on_fit_end(trainer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
