"""Plan a training run before asking for a cluster: parameters, FLOPs, memory, days; fit laws.

``python -m orchestration.plan --model k2_65b --tokens 1.4e12 --tp 8 --pp 4 --dp 15``
prints the budget of one run; ``python -m orchestration.plan fit runs.csv`` fits the Chinchilla
law to small runs and says how to spend a bigger FLOP budget. Memory and activation formulas
are documented on :func:`memory_per_gpu` and :func:`activation_bytes_per_layer`, the law fit
on :func:`fit_chinchilla`.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from orchestration.config import ModelConfig, padded_vocab_size
from orchestration.flops import PEAK_BF16_FLOPS, flops_per_token, parameter_count

DEFAULT_CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
CHINCHILLA_TOKENS_PER_PARAM = 20.0
ADAM_BYTES_PER_PARAM = 12  # fp32 master weight + Adam's two fp32 moments
GIB = 2**30


def load_model_config(name: str, conf_dir: Path = DEFAULT_CONF_DIR) -> ModelConfig:
    """Read ``conf/model/<name>.yaml`` (or a YAML path) into the typed :class:`ModelConfig`.

    A ``defaults`` list is dropped and a file wrapping everything under ``model:`` is unwrapped,
    so both Hydra group files and plain dumps load; unknown keys fail as in Hydra.
    """
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        path = conf_dir / "model" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no model config {name!r} (looked for {path})")
    raw = OmegaConf.load(path)
    raw.pop("defaults", None)
    if set(raw.keys()) == {"model"}:
        raw = raw.model
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def chinchilla_tokens(parameters: float) -> float:
    """Hoffmann et al. (2022): compute-optimal training uses ~20 tokens per parameter."""
    return CHINCHILLA_TOKENS_PER_PARAM * parameters


def training_days(total_flops: float, num_gpus: int, peak: float, mfu: float) -> float:
    return total_flops / (num_gpus * peak * mfu) / 86400.0


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the most loaded pipeline stage (see :func:`memory_per_gpu`)."""

    params_per_gpu: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    activations_full_recompute: float

    @property
    def model_state(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_state + self.activations

    @property
    def total_full_recompute(self) -> float:
        return self.model_state + self.activations_full_recompute


def stage_params(model: ModelConfig, tp: int, pp: int) -> int:
    """Parameters one GPU holds on the heaviest pipeline stage.

    Layers split evenly over PP stages and every weight over TP (norm weights and row-parallel
    biases are replicated across TP in Megatron; we ignore that <0.01 % here). The first stage
    also holds the input embedding, the last one the output layer and final norm; with tied
    embeddings and PP > 1 the last stage keeps its own copy of the embedding, so it counts too.
    """
    count = parameter_count(model, tp)
    vocab_weight = padded_vocab_size(model, tp) * model.hidden_size
    layers = model.num_layers // pp * count.per_layer
    final_norm = count.non_embedding - model.num_layers * count.per_layer
    output = count.output if (count.output or pp == 1) else vocab_weight
    ends = (
        (count.embedding + output + final_norm)
        if pp == 1
        else max(count.embedding, output + final_norm)
    )
    return -(-(layers + ends) // tp)


def activation_bytes_per_layer(
    model: ModelConfig,
    seq_length: int,
    micro_batch: int,
    tp: int,
    sequence_parallel: bool,
    flash_attention: bool = True,
) -> float:
    """Activation bytes one transformer layer stores for backward (bf16, 1-byte dropout masks).

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
    eq. 1-4: ``s*b*h*(34 + 5*a*s/h)`` bytes per layer, with TP ``s*b*h*(10 + 24/t + 5*a*s/(h*t))``
    and with TP + sequence parallelism everything divided by t. Their 34 = 11 (attention:
    QKV input 2, Q and K 4, V 2, projection input 2, dropout mask 1) + 19 (MLP with 4h GeLU:
    fc1 input 2, GeLU input 8, fc2 input 8, dropout mask 1) + 4 (two norm inputs); 10 of it
    (norm inputs, QKV and fc1 inputs, dropout masks) is not split by TP without SP.
    We generalise the TP-split part to GQA (K and V are groups*head_dim wide) and any ffn/SwiGLU
    (fc1 output 2*f wide), which reproduces 34 for GPT-3 shapes. ``5*a*s^2*b`` (softmax output,
    its dropout mask and dropout output) is dropped with flash/fused attention, which recomputes
    the scores in backward; Megatron on GPUs uses it, so it is the default.
    """
    h, f = model.hidden_size, model.ffn_hidden_size
    kv = model.num_query_groups * (h // model.num_attention_heads)
    fc1_out = 2 * f if model.activation == "swiglu" else f
    split = 2 * h + 4 * kv + 2 * h + 2 * fc1_out + 2 * f
    replicated = 10 * h
    per_token = split / tp + replicated / (tp if sequence_parallel else 1)
    scores = 0.0 if flash_attention else 5 * model.num_attention_heads * seq_length / tp
    return seq_length * micro_batch * (per_token + scores)


def memory_per_gpu(
    model: ModelConfig,
    tp: int = 1,
    pp: int = 1,
    dp: int = 1,
    micro_batch: int = 1,
    seq_length: int | None = None,
    sequence_parallel: bool | None = None,
    flash_attention: bool = True,
    grad_bytes: int = 4,
    distributed_optimizer: bool = True,
) -> MemoryEstimate:
    """Per-GPU memory of the heaviest stage under ZeRO-1 (Megatron's distributed optimizer).

    * weights: bf16, 2 bytes x :func:`stage_params` (sharded by TP and PP);
    * grads: ``grad_bytes`` per parameter, also sharded by TP and PP. Megatron accumulates
      into an fp32 main-grad buffer by default, and ``orchestration.build`` sets
      ``grad_reduce_in_fp32=True``, hence 4; pass 2 for bf16 grads;
    * optimizer: 12 bytes (fp32 master weight, Adam m and v) per parameter, additionally
      sharded over DP when the distributed optimizer is on;
    * activations: 1F1B keeps ``pp`` micro-batches in flight on the first stage, each with
      L/pp layers, i.e. L layers of one micro-batch (Korthikanti et al. sec. 4.2), plus fp32
      logits for the loss (``4*s*b*V/t``, conservatively counted on every stage). With full
      recompute only each layer's input (``2*s*b*h``, /t with SP) is kept, plus one layer's
      full activations while it is being recomputed.
    Framework overhead (CUDA context, NCCL buffers, allocator fragmentation: often 3-8 GiB)
    is not included.
    """
    s = model.seq_length if seq_length is None else seq_length
    sp = tp > 1 if sequence_parallel is None else sequence_parallel
    n = stage_params(model, tp, pp)
    layer = activation_bytes_per_layer(model, s, micro_batch, tp, sp, flash_attention)
    logits = 4.0 * s * micro_batch * padded_vocab_size(model, tp) / tp
    layer_input = 2.0 * s * micro_batch * model.hidden_size / (tp if sp else 1)
    return MemoryEstimate(
        params_per_gpu=n,
        weights=2.0 * n,
        grads=float(grad_bytes) * n,
        optimizer=ADAM_BYTES_PER_PARAM * n / (dp if distributed_optimizer else 1),
        activations=model.num_layers * layer + logits,
        activations_full_recompute=model.num_layers * layer_input + layer + logits,
    )


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
    )
    peak = PEAK_BF16_FLOPS[args.gpu]
    return {
        "model": model.name,
        "seq_length": seq,
        "parameters": asdict(params),
        "tokens": tokens,
        "chinchilla_tokens": chinchilla_tokens(params.total),
        "flops_per_token": fpt,
        "six_n_d": 6.0 * params.total * tokens,
        "training_flops": fpt * tokens,
        "layout": {
            "tp": args.tp,
            "pp": args.pp,
            "dp": args.dp,
            "gpus": gpus,
            "micro_batch": args.micro_batch,
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


def format_plan(p: dict) -> str:
    par, mem, lay = p["parameters"], p["memory_gib"], p["layout"]
    lines = [
        f"model {p['model']}  (seq_length {p['seq_length']})",
        f"  parameters      {_human(par['total'])} total = {_human(par['non_embedding'])} "
        f"non-embedding + {_human(par['embedding'])} embedding + {_human(par['output'])} output",
        f"  tokens          {_human(p['tokens'])}  (Chinchilla-optimal ~{_human(p['chinchilla_tokens'])}"
        f" = 20 x params)",
        f"  FLOPs/token     {p['flops_per_token']:.4g}  (6N over matmul weights + attention)",
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
        f"time on {lay['gpus']} x {p['gpu']} ({p['peak_flops'] / 1e12:.0f} TFLOP/s bf16 peak):",
    ]
    lines += [f"  MFU {float(m):.0%}: {d:7.1f} days" for m, d in p["days"].items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Scaling-law fit (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", D.2)


@dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with the objective value it reached."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = 0.0

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L subject to 6ND = C (Hoffmann et al. eq. 4).

        N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
        G = (alpha A / (beta B))^(1/(alpha+beta)).
        """
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        return g * (flops / 6.0) ** (self.beta / s), (flops / 6.0) ** (self.alpha / s) / g


def _huber_objective(theta: np.ndarray, log_n, log_d, log_l, delta: float):
    """Sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L), and its gradient.

    Scaled by 1/delta^2 so residuals of order delta give an objective of order 1, which keeps
    L-BFGS's relative stopping rule meaningful (the minimiser is unchanged).
    """
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    r = top + np.log(total) - log_l
    weights /= total
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.clip(r, -delta, delta)
    grad = np.array(
        [
            (dr * weights[0]).sum(),
            (dr * weights[1]).sum(),
            (dr * weights[2]).sum(),
            -(dr * weights[0] * log_n).sum(),
            -(dr * weights[1] * log_d).sum(),
        ]
    )
    return value / delta**2, grad / delta**2


def _grid_objectives(grid: np.ndarray, log_n, log_d, log_l, delta: float) -> np.ndarray:
    """Objective at every grid point at once, to choose where L-BFGS starts."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    terms = np.stack(
        [a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, a.shape) * np.ones_like(log_n)]
    )
    r = np.logaddexp.reduce(terms, axis=0) - log_l
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum(1)


# Hoffmann et al.'s initialisation grid: e, alpha, beta, a, b.
HOFFMANN_GRID = {
    "a": np.arange(0.0, 30.0, 5.0),
    "b": np.arange(0.0, 30.0, 5.0),
    "e": np.arange(-1.0, 1.5, 0.5),
    "alpha": np.arange(0.0, 2.5, 0.5),
    "beta": np.arange(0.0, 2.5, 0.5),
}


def fit_chinchilla(
    n: Sequence[float],
    d: Sequence[float],
    loss: Sequence[float],
    delta: float = 1e-3,
    starts: int = 32,
    grid: dict[str, np.ndarray] | None = None,
) -> ChinchillaFit:
    """Fit L(N, D) like Hoffmann et al.: Huber loss (delta=1e-3) on log L, L-BFGS from a grid.

    Parameters are fitted as a = log A, b = log B, e = log E so the prediction is a
    log-sum-exp. The full grid (4,500 points by default) is scored in one vectorised pass
    and L-BFGS runs from the ``starts`` best points (running it from all 4,500 takes minutes
    and ends in the same basin); the best end point wins.
    """
    from scipy.optimize import minimize  # optional dependency: only the fit needs it

    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=float)) for x in (n, d, loss))
    g = grid or HOFFMANN_GRID
    points = np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])))
    order = np.argsort(_grid_objectives(points, log_n, log_d, log_l, delta))[:starts]
    best = None
    for theta0 in points[order]:
        res = minimize(
            _huber_objective,
            theta0,
            args=(log_n, log_d, log_l, delta),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
        )
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return ChinchillaFit(
        float(np.exp(e)),
        float(np.exp(a)),
        float(np.exp(b)),
        float(alpha),
        float(beta),
        float(best.fun) * delta**2,
    )


_ALIASES = {
    "n": ("n", "params", "parameters", "n_params"),
    "d": ("d", "tokens", "n_tokens"),
    "loss": ("loss", "l", "final_loss", "eval_loss"),
}


def read_runs(path: Path) -> tuple[list[float], list[float], list[float]]:
    """Rows of (N, D, loss) from CSV (header row) or JSON lines; column names per _ALIASES."""
    with open(path) as fh:
        if path.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in fh if line.strip()]
        else:
            rows = list(csv.DictReader(fh))
    out: dict[str, list[float]] = {}
    for key, names in _ALIASES.items():
        found = [c for c in (rows[0] if rows else {}) if c.strip().lower() in names]
        if not found:
            raise ValueError(f"{path}: no column for {key} (one of {names})")
        out[key] = [float(r[found[0]]) for r in rows]
    return out["n"], out["d"], out["loss"]


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
    ap.add_argument("--conf-dir", default=str(DEFAULT_CONF_DIR))
    ap.add_argument("--tokens", type=float, help="training tokens D (default: 20 x params)")
    ap.add_argument("--seq-length", type=int, help="override the model's seq_length")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--gpus", type=int, help="GPUs for the time estimate (default TPxPPxDP)")
    ap.add_argument("--gpu", default="h100_sxm", choices=sorted(PEAK_BF16_FLOPS))
    ap.add_argument("--mfu", type=float, nargs="+", default=[0.4, 0.5])
    ap.add_argument("--grad-bytes", type=int, default=4, choices=(2, 4))
    ap.add_argument("--no-flash-attn", action="store_true", help="count s^2 attention scores")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["fit"]:
        ap = argparse.ArgumentParser(prog="python -m orchestration.plan fit")
        add_fit_arguments(ap)
        return run_fit(ap.parse_args(argv[1:]))
    args = _plan_parser().parse_args(argv)
    plan = build_plan(args)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
