"""Tokens/s and MFU of the real driver step on one GPU, swept over micro-batch and recompute.

``python bench/mfu.py --device cuda`` (defaults: llama_1b, seq 4096, bf16, global batch 32,
micro-batch 1 2 4 8, recompute none selective full, distributed optimizer) and
``python bench/mfu.py --device cuda --largest`` (also finds the deepest 3072-wide LLaMA shape,
LLaMA-3.2-3B's width, heads and FFN, that trains on the GPU with full recompute, then sweeps it).
On a GPU the model uses the Transformer Engine layer spec (TE picks flash/fused attention),
bf16 and Megatron's fused kernels, all as ``megatron_patches.configs`` sets them for CUDA.

``python bench/mfu.py --model tiny --device cpu`` runs the same path on CPU (tokens/s only:
MFU is not defined without a GPU peak) to prove the benchmark works end to end.

Each configuration runs in a fresh process (clean GPU memory, an out-of-memory error is one
row of the table, not the end of the sweep): warm-up steps, then the median of timed steps.
MFU = tokens/s x ``orchestration.metrics.flops.flops_per_token`` / peak (model FLOPs: recompute is not
counted, so recompute shows up as lower MFU, as it should), in both attention conventions:
``full_attn`` (PaLM; Megatron-LM before 2025) and ``causal`` (Megatron-LM's current formula).
Rows print best first (highest tokens/s); ``--json-out FILE`` writes them for a summary table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import compose_config, device_sync, print_header, summarize, timed  # noqa: E402
from orchestration.metrics.flops import (  # noqa: E402
    PEAK_BF16_FLOPS,
    flops_per_token_by_convention,
    mfu,
)

# LLaMA-3.2-3B's width with head_dim 128 (flash-attention friendly) and GQA 24/8; the layer
# count is what --largest searches, deepest first.
WIDE_SHAPE = {
    "hidden_size": 3072,
    "ffn_hidden_size": 8192,
    "num_attention_heads": 24,
    "num_query_groups": 8,
    "vocab_size": 32000,
}
LARGEST_LAYERS = (44, 40, 36, 32, 28, 24)
NEVER = 10**9
H100_SXM_PEAK = PEAK_BF16_FLOPS["h100_sxm"]  # 989 TFLOP/s dense bf16
DEVICE_DEFAULTS = {"seq_length": (4096, 128), "global_batch_size": (32, 16),
                   "micro_batch_sizes": ([1, 2, 4, 8], [4, 8]), "precision": ("bf16", "auto"),
                   "steps": (10, 5)}  # fmt: skip


def mfu_or_none(tokens_per_s: float, flops: float, peak: float | None) -> float | None:
    """MFU on one device, or None where there is no peak to compare with (CPU)."""
    return None if not peak else mfu(tokens_per_s, flops, 1, peak)


def tokens_per_s(global_batch: int, seq: int, step_s: float) -> float:
    return global_batch * seq / step_s


def config_overrides(
    a: argparse.Namespace, mbs: int, recompute: str, layers: int | None, run_dir: str
) -> list[str]:
    shape = {} if layers is None else WIDE_SHAPE | {"num_layers": layers}
    return [
        f"model={a.model}",
        *(f"model.{k}={v}" for k, v in shape.items()),
        f"model.seq_length={a.seq_length}",
        f"train.micro_batch_size={mbs}",
        f"train.global_batch_size={a.global_batch_size}",
        f"train.max_steps={a.warmup + a.steps + 2}",
        f"train.precision={a.precision}",
        f"parallel.recompute={recompute}",
        "parallel.distributed_optimizer=true",
        f"runtime.device={a.device}",
        "data=demo",
        "logging.wandb_mode=disabled",
        f"train.eval_interval={NEVER}",
        f"checkpoint.save_interval={NEVER}",
        f"run_dir={run_dir}",
        *a.overrides,
    ]


def run_one(a: argparse.Namespace) -> dict:
    """In this (fresh) process: build the run, warm up, time ``a.steps`` driver steps."""
    import torch

    from bench.step_overhead import driver_step
    from orchestration.loop.session import build_session
    from orchestration.loop.trainer import Trainer
    from orchestration.metrics.flops import parameter_count
    from orchestration.train import default_callbacks

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config(config_overrides(a, a.one[0], a.one[1], a.layers, run_dir))
        row = {
            "params": parameter_count(cfg.model).total,
            "flops_per_token": flops_per_token_by_convention(cfg.model, a.seq_length),
        }
        try:
            objects = build_session(cfg)
            trainer = Trainer(cfg, objects, default_callbacks(cfg, objects))
            trainer.callbacks.on_fit_start(trainer)
            for i in range(a.warmup):
                driver_step(trainer, i)
            sync = device_sync(a.device)
            steps = [
                timed(lambda i=i: driver_step(trainer, a.warmup + i), sync) for i in range(a.steps)
            ]
        except (torch.OutOfMemoryError, RuntimeError) as err:  # TE/cuBLAS OOMs are RuntimeErrors
            if "out of memory" not in str(err).lower():
                raise
            return row | {"oom": True}
        s = summarize(steps)
        row |= {
            "step_s": s.median,
            "step_q1": s.q1,
            "step_q3": s.q3,
            "tokens_per_s": tokens_per_s(a.global_batch_size, a.seq_length, s.median),
        }
        if a.device == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["spec"] = objects.mc.layer_spec
        return row


def launch(a: argparse.Namespace, mbs: int, recompute: str, layers: int | None) -> dict:
    """One configuration in a child process; its row (or the error it died of)."""
    cmd = [sys.executable, __file__, *a.argv, "--one", str(mbs), recompute]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    row = json.loads(rows[-1]) if rows else {"error": (proc.stderr.strip() or "?").splitlines()[-1]}
    return row | {"mbs": mbs, "recompute": recompute, "layers": layers}


def sweep(a: argparse.Namespace, layers: int | None, peak: float | None) -> list[dict]:
    rows = []
    for recompute in a.recompute:
        for mbs in a.micro_batch_sizes:
            row = launch(a, mbs, recompute, layers)
            if "tokens_per_s" in row:
                row["mfu"] = {name: mfu_or_none(row["tokens_per_s"], flops, peak)
                              for name, flops in row["flops_per_token"].items()}
            print(format_row(row), flush=True)
            rows.append(row)
    return rows


def find_largest(a: argparse.Namespace) -> int | None:
    """Deepest WIDE_SHAPE that runs with full recompute at micro-batch 1."""
    for layers in LARGEST_LAYERS:
        row = launch(a, 1, "full", layers)
        print(
            f"   {layers} layers ({params_text(row.get('params', 0))}): "
            f"{'fits' if 'tokens_per_s' in row else row.get('error', 'out of memory')}"
        )
        if "tokens_per_s" in row:
            return layers
    return None


def params_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def format_row(r: dict) -> str:
    head = f"{r['recompute']:>9} mbs {r['mbs']:>2}"
    if r.get("oom"):
        return f"{head}: out of memory"
    if "error" in r:
        return f"{head}: failed: {r['error']}"
    mfus = r.get("mfu") or {}
    mfu_text = ("MFU n/a on CPU" if mfus.get("full_attn") is None else
                f"MFU {mfus['full_attn']:.1%} full-attn / {mfus['causal']:.1%} causal")
    mem = f", peak {r['peak_mem_gib']:.1f} GiB, {r['spec']} spec" if "peak_mem_gib" in r else ""
    return (
        f"{head}: step {r['step_s']:.3f} s (IQR {r['step_q1']:.3f}-{r['step_q3']:.3f}), "
        f"{r['tokens_per_s']:,.0f} tokens/s, {mfu_text}{mem}"
    )


def peak_flops(a: argparse.Namespace) -> float | None:
    if a.device != "cuda":
        return None
    if a.peak_tflops:
        return a.peak_tflops * 1e12
    import torch

    from orchestration.metrics.flops import peak_flops_for_device

    return peak_flops_for_device(torch.cuda.get_device_name()) or H100_SXM_PEAK


def run_sweeps(a: argparse.Namespace) -> None:
    peak = peak_flops(a)
    print(f"peak {peak / 1e12:.0f} TFLOP/s bf16" if peak else "CPU: MFU n/a")
    shapes: list[tuple[str, int | None]] = [(a.model, None)]
    all_rows: list[dict] = []
    if a.largest:
        print("searching the deepest 3072-wide shape that fits (full recompute, mbs 1):")
        layers = find_largest(a)
        shapes += [] if layers is None else [(f"{a.model}+3072x{layers}", layers)]
    for name, layers in shapes:
        print(
            f"\n{name}: seq {a.seq_length}, global batch {a.global_batch_size}, "
            f"{a.precision}, {a.steps} timed steps after {a.warmup} warm-up"
        )
        rows = sweep(a, layers, peak)
        ok = sorted((r for r in rows if "tokens_per_s" in r), key=lambda r: -r["tokens_per_s"])
        if ok:
            print(f"\n{name}, best first ({params_text(ok[0]['params'])} params):")
            for r in ok + [r for r in rows if "tokens_per_s" not in r]:
                print(f"   {format_row(r)}")
        all_rows += [r | {"shape": name} for r in rows]
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(all_rows, indent=1))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="llama_1b", help="conf/model/<name>.yaml")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    p.add_argument("--seq-length", type=int, help="default: 4096 on cuda, 128 on cpu")
    p.add_argument("--global-batch-size", type=int, help="default: 32 on cuda, 16 on cpu")
    p.add_argument(
        "--micro-batch-sizes", type=int, nargs="+", help="default: 1 2 4 8 on cuda, 4 8 on cpu"
    )
    p.add_argument(
        "--recompute",
        nargs="+",
        default=["none", "selective", "full"],
        choices=("none", "selective", "full"),
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32", "auto"),
        help="default: bf16 on cuda, auto (fp32) on cpu",
    )
    p.add_argument("--steps", type=int, help="timed steps; default: 10 on cuda, 5 on cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="default: from the GPU name")
    p.add_argument("--largest", action="store_true")
    p.add_argument("--json-out", help="write every row (both MFU conventions) to this JSON file")
    p.add_argument("--one", nargs=2, metavar=("MBS", "RECOMPUTE"), help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    a = p.parse_args(argv)
    a.argv = argv
    for key, (gpu, cpu) in DEVICE_DEFAULTS.items():
        if getattr(a, key) is None:
            setattr(a, key, gpu if a.device == "cuda" else cpu)
    if a.one:
        a.one = (int(a.one[0]), a.one[1])
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    if a.one:
        print("RESULT " + json.dumps(run_one(a)), flush=True)
        return 0
    print_header("MFU sweep", "python bench/mfu.py " + " ".join(argv))
    run_sweeps(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
