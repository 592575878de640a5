"""``python -m orchestration.plan``: budget a run before asking for a cluster; fit scaling laws.

``python -m orchestration.plan --model k2_65b --tokens 1.4e12 --tp 8 --pp 4 --dp 15``
prints the budget of one run: parameters, FLOPs, memory per GPU and days;
``python -m orchestration.plan fit runs.csv`` fits the Chinchilla law to small runs and says how
to spend a bigger FLOP budget. The arithmetic lives in ``orchestration.metrics.flops``,
``orchestration.planning.memory`` and ``orchestration.planning.scaling_law``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from orchestration.common.paths import CONF_DIR
from orchestration.common.quiet import install_warning_filters
from orchestration.config import load_model_config
from orchestration.metrics.flops import PEAK_BF16_FLOPS, flops_per_token, parameter_count
from orchestration.planning.memory import (  # noqa: F401  (re-exported for callers)
    MemoryEstimate,
    activation_bytes_per_layer,
    memory_per_gpu,
    stage_params,
)
from orchestration.planning.scaling_law import (  # noqa: F401  (re-exported for callers)
    ChinchillaFit,
    fit_chinchilla,
    read_runs,
)

CHINCHILLA_TOKENS_PER_PARAM = 20.0
GIB = 2**30


def chinchilla_tokens(parameters: float) -> float:
    """Hoffmann et al. (2022): compute-optimal training uses ~20 tokens per parameter."""
    return CHINCHILLA_TOKENS_PER_PARAM * parameters


def training_days(total_flops: float, num_gpus: int, peak: float, mfu: float) -> float:
    return total_flops / (num_gpus * peak * mfu) / 86400.0


def _human(x: float, unit: str = "") -> str:
    for scale, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{suffix}{unit}"
    return f"{x:.2f}{unit}"


def build_plan(args: argparse.Namespace) -> dict:
    """Everything the plan prints, as a JSON-able dict (``--json`` prints it verbatim)."""
    model = load_model_config(args.model, Path(args.conf_dir))
    seq = args.seq_length or model.seq_length
    params = parameter_count(model, args.tp)
    tokens = args.tokens or chinchilla_tokens(params.total)
    fpt = flops_per_token(model, seq, args.tp)
    gpus = args.gpus or args.tp * args.pp * args.dp
    mem = memory_per_gpu(
        model,
        args.tp,
        args.pp,
        args.dp,
        args.micro_batch,
        seq,
        flash_attention=not args.no_flash_attn,
        grad_bytes=args.grad_bytes,
        vp=args.vp,
        microbatch_group=args.microbatch_group,
    )
    peak = PEAK_BF16_FLOPS[args.gpu]
    return {
        "model": model.name,
        "seq_length": seq,
        "parameters": asdict(params),
        "tokens": tokens,
        "chinchilla_tokens": chinchilla_tokens(params.total),
        "flops_per_token": fpt,
        "flops_per_token_causal": flops_per_token(model, seq, args.tp, causal=True),
        "six_n_d": 6.0 * params.total * tokens,
        "training_flops": fpt * tokens,
        "layout": {
            "tp": args.tp,
            "pp": args.pp,
            "dp": args.dp,
            "gpus": gpus,
            "micro_batch": args.micro_batch,
            "vp": args.vp,
        },
        "memory_gib": {k: v / GIB for k, v in asdict(mem).items() if k != "params_per_gpu"}
        | {
            "params_per_gpu": mem.params_per_gpu,
            "total": mem.total / GIB,
            "total_full_recompute": mem.total_full_recompute / GIB,
        },
        "gpu": args.gpu,
        "peak_flops": peak,
        "days": {f"{m:g}": training_days(fpt * tokens, gpus, peak, m) for m in args.mfu},
    }


def format_budget(p: dict) -> str:
    par, mem, lay = p["parameters"], p["memory_gib"], p["layout"]
    lines = [
        f"model {p['model']}  (seq_length {p['seq_length']})",
        f"  parameters      {_human(par['total'])} total = {_human(par['non_embedding'])} "
        f"non-embedding + {_human(par['embedding'])} embedding + {_human(par['output'])} output",
        f"  tokens          {_human(p['tokens'])}  (Chinchilla-optimal ~{_human(p['chinchilla_tokens'])}"
        f" = 20 x params)",
        f"  FLOPs/token     {p['flops_per_token']:.4g}  (6N over matmul weights + full "
        f"attention; {p['flops_per_token_causal']:.4g} with causal attention)",
        f"  training FLOPs  {p['training_flops']:.4g}  (6ND alone: {p['six_n_d']:.4g})",
        f"layout TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']} = {lay['gpus']} GPUs, "
        f"micro-batch {lay['micro_batch']}; per GPU (heaviest stage):",
        f"  params          {_human(mem['params_per_gpu'])}",
        f"  weights bf16    {mem['weights']:8.2f} GiB",
        f"  grads           {mem['grads']:8.2f} GiB",
        f"  Adam (ZeRO-1)   {mem['optimizer']:8.2f} GiB",
        f"  activations     {mem['activations']:8.2f} GiB   (full recompute: "
        f"{mem['activations_full_recompute']:.2f} GiB)",
        f"  total           {mem['total']:8.2f} GiB   (full recompute: "
        f"{mem['total_full_recompute']:.2f} GiB; + framework overhead)",
        f"time on {lay['gpus']} x {p['gpu']} ({p['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak; "
        "MFU with full attention):",
    ]
    lines += [f"  MFU {float(m):.0%}: {d:7.1f} days" for m, d in p["days"].items()]
    return "\n".join(lines)


def add_fit_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("runs", type=Path, help="CSV or JSONL with columns N, D, loss")
    ap.add_argument(
        "--budget",
        type=float,
        nargs="+",
        default=[1e21, 1e22, 1e23, 1e24],
        help="FLOP budgets C for the compute-optimal N and D",
    )
    ap.add_argument("--delta", type=float, default=1e-3, help="Huber delta (Hoffmann: 1e-3)")
    ap.add_argument("--starts", type=int, default=32, help="L-BFGS runs from the best grid points")
    ap.add_argument("--json", action="store_true")


def run_fit(args: argparse.Namespace) -> int:
    n, d, loss = read_runs(args.runs)
    fit = fit_chinchilla(n, d, loss, args.delta, args.starts)
    optimal = [(c, *fit.compute_optimal(c)) for c in args.budget]
    if args.json:
        print(
            json.dumps(
                {
                    "fit": asdict(fit),
                    "optimal": [
                        {"flops": c, "n": nn, "d": dd, "loss": fit.loss(nn, dd)}
                        for c, nn, dd in optimal
                    ],
                }
            )
        )
        return 0
    s = fit.alpha + fit.beta
    print(
        f"fitted on {len(n)} runs: L(N, D) = {fit.E:.4f} + {fit.A:.4g}/N^{fit.alpha:.4f}"
        f" + {fit.B:.4g}/D^{fit.beta:.4f}   (objective {fit.objective:.3g})"
    )
    print(f"N_opt ~ C^{fit.beta / s:.3f}, D_opt ~ C^{fit.alpha / s:.3f}")
    for c, nn, dd in optimal:
        print(
            f"  C={c:.3g}: N_opt={_human(nn)} D_opt={_human(dd)} "
            f"({dd / nn:.1f} tokens/param) L={fit.loss(nn, dd):.4f}"
        )
    return 0


def _plan_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m orchestration.plan",
        description="Budget a run (default), or `fit RUNS.csv|jsonl` to fit L(N, D) = "
        "E + A/N^alpha + B/D^beta (see `python -m orchestration.plan fit --help`).",
    )
    ap.add_argument("--model", required=True, help="conf/model/<NAME>.yaml, or a YAML path")
    ap.add_argument("--conf-dir", default=str(CONF_DIR))
    ap.add_argument("--tokens", type=float, help="training tokens D (default: 20 x params)")
    ap.add_argument("--seq-length", type=int, help="override the model's seq_length")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--vp", type=int, default=1, help="model chunks per pipeline rank")
    ap.add_argument("--microbatch-group", type=int,
                    help="micro-batches per chunk in a row, interleaved (default: --pp)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--gpus", type=int, help="GPUs for the time estimate (default TPxPPxDP)")
    ap.add_argument("--gpu", default="h100_sxm", choices=sorted(PEAK_BF16_FLOPS))
    ap.add_argument("--mfu", type=float, nargs="+", default=[0.4, 0.5])
    ap.add_argument("--grad-bytes", type=int, default=4, choices=(2, 4))
    ap.add_argument("--no-flash-attn", action="store_true", help="count s^2 attention scores")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    install_warning_filters()  # before anything imports megatron-core
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        ap = argparse.ArgumentParser(prog="python -m orchestration.plan fit")
        add_fit_arguments(ap)
        return run_fit(ap.parse_args(argv[1:]))
    args = _plan_parser().parse_args(argv)
    plan = build_plan(args)
    print(json.dumps(plan, indent=2) if args.json else format_budget(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
