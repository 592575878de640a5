"""muP coordinate check (Tensor Programs V, Yang et al. 2022, Fig. 5): activation size vs width.

Why: muP's promise is that every activation coordinate stays O(1) during training as the model
gets wider, which is what lets hyperparameters tuned on a narrow model transfer. A wrong
multiplier, init std or per-group LR shows up here, after a handful of Adam steps, as a curve
that grows (or vanishes) with width, long before it shows up as a failed LR transfer.

For each width and parametrization (SP: ``mup.enabled=false``; muP: ``mup.enabled=true``), the
tiny LLaMA is built in this process, trained a few steps with the real training step
(``Trainer.run_step``: schedule, clipping and muP's param groups all as in a run) at a fixed,
fairly large LR, and before every update a fixed probe batch is run through it with forward
hooks recording mean |x| (and mean |x_t - x_0|) at the embedding, every transformer layer, every
layer's attention scores (q.k times the softmax scale, before the mask) and the logits. Under
muP the curves are flat in width; under SP the logits, the later layers and the attention
scores grow with it.

What makes the check sensitive (each would hide a class of bug if left out):
- the width grows the head dimension as well as the number of heads (``--grow both``), so the
  1/d_head attention rule is exercised: with a fixed head_dim 1/d and 1/sqrt(d) differ by a
  constant and the check cannot tell them apart;
- the embedding multiplier is not 1 (``--embedding-multiplier``, 10 by default), so a
  multiplier applied twice or not at all changes the embedding and everything after it;
- weight decay is not 0 (``--weight-decay``, 0.1), so the decoupled decay's per-group LR is
  exercised too;
- the probe batch is one the model never trains on (the stage's batch ``steps``, after the
  ``steps`` training batches), so memorising the probe cannot masquerade as feature learning;
- the logits at init (t = 0) are compared with TP5's readout scaling, 1/sqrt(m)
  (:meth:`CoordCheck.slope`), which is how an output layer drawn with the wrong std shows.

    .venv/bin/python -m bench.mup_coord_check            # table + docs/img/mup_coord_check.png
    .venv/bin/python -m bench.mup_coord_check --widths 64 128 --seeds 1 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HEAD_DIM = 32  # the tiny model's: 128 hidden / 4 heads
DEFAULT_WIDTHS = (64, 128, 256, 512)
PARAMETRIZATIONS = ("SP", "muP")
GROW = ("heads", "head_dim", "both")


def model_shape(width: int, head_dim: int = HEAD_DIM, grow: str = "heads",
                base_width: int | None = None) -> dict[str, int]:
    """Hidden, FFN and head counts of the tiny model scaled to ``width``.

    ``grow="heads"`` keeps ``head_dim`` and adds heads (the LR sweep's shapes); ``"head_dim"``
    keeps the heads of ``base_width`` and widens each; ``"both"`` alternates, starting with the
    head dimension: from ``base_width`` (``base_width / head_dim`` heads of ``head_dim``) each
    doubling doubles the head dimension, then the number of heads, and so on. The FFN stays
    2.75x the width (conf/model/tiny.yaml: 128 -> 352), with 2 query heads per KV group.

    Why vary the head dimension: muP scales attention scores by 1/d_head instead of
    1/sqrt(d_head), and only a width sweep that changes d_head can see the difference.
    """
    if grow not in GROW:
        raise ValueError(f"grow={grow!r}: expected one of {GROW}")
    if grow != "heads":
        base_width = base_width or width
        doublings = math.log2(width / base_width)
        if width % base_width or base_width % head_dim or doublings != int(doublings):
            raise ValueError(f"width {width} is not base_width {base_width} x a power of two, "
                             f"or base_width is not a multiple of head_dim {head_dim}")
        widen = int(doublings) if grow == "head_dim" else (int(doublings) + 1) // 2
        head_dim = head_dim * 2 ** widen
    if width % head_dim:
        raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
    heads = width // head_dim
    return {
        "hidden_size": width,
        "ffn_hidden_size": round(2.75 * width / 8) * 8,
        "num_attention_heads": heads,
        "num_query_groups": max(1, heads // 2),
    }


def variant(base, width: int, parametrization: str, seed: int, base_width: int,
            grow: str = "both", smallest: int | None = None):
    """A copy of ``base`` (a RunConfig) at ``width`` under SP or muP, seeded with ``seed``; the
    shape grows (``grow``) from the ``smallest`` width of the check (default ``base_width``)."""
    cfg = copy.deepcopy(base)
    shape = model_shape(width, grow=grow, base_width=smallest or base_width)
    for key, value in shape.items():
        setattr(cfg.model, key, value)
    cfg.mup.enabled = parametrization == "muP"
    cfg.mup.base_width = base_width
    cfg.train.seed = seed
    return cfg


def coord_check_settings(cfg, steps: int, lr: float, batch: int, seq_length: int,
                         weight_decay: float = 0.1, embedding_multiplier: float = 10.0):
    """AdamW at a constant LR: no warmup, decay, clipping or spike skipping; weight decay and
    muP's embedding multiplier set (neither is neutral, see the module docstring).

    Why: the coordinate check is about how one update moves activations at each width; a
    warmup would hide the first steps, and global-norm clipping rescales updates by a
    width-dependent factor. ``max_steps`` is one more than the steps trained so that the
    stage's data has the unseen probe batch at position ``steps``.
    """
    cfg.train.max_steps = steps + 1
    cfg.train.micro_batch_size = cfg.train.global_batch_size = batch
    cfg.train.eval_interval = 0
    cfg.train.precision = "fp32"
    cfg.model.seq_length = seq_length
    cfg.optim.lr = cfg.optim.min_lr = lr
    cfg.optim.warmup_steps = 0
    cfg.optim.decay_style = "constant"
    cfg.optim.weight_decay = weight_decay
    cfg.optim.clip_grad = 0.0
    cfg.mup.embedding_multiplier = embedding_multiplier  # muP only: SP has no multipliers
    cfg.spike.enabled = False
    cfg.logging.wandb_mode = "disabled"
    cfg.runtime.device = "cpu"
    cfg.stages = []
    return cfg


def ensure_single_rank_env() -> None:
    """This process as a one-rank gloo world with Megatron's groups (as tests' megatron_env).

    Why not ``build_session``'s own start-up: Megatron's parallel groups can exist only once
    per process, and the check builds a dozen models in one process.
    """
    from megatron_patches.parallel import single_process_world

    single_process_world()


def build_objects(cfg):
    """``orchestration.loop.session.build_session`` without the process-group start-up (see
    above): this process is already a one-rank world."""
    from megatron_patches.parallel import seed_everything
    from orchestration.cluster.base import LocalCluster
    from orchestration.cluster.distributed import DistInfo
    from orchestration.loop.session import build_session

    seed_everything(cfg.train.seed)
    info = DistInfo(rank=0, world_size=1, local_rank=0, on_cpu=True, cluster=LocalCluster())
    return build_session(cfg, info)


def activation_sites(gpt) -> dict[str, torch.nn.Module]:
    """The modules whose outputs are measured, in forward order: the embedding (after muP's
    multiplier hook), each transformer layer (the residual stream), each layer's core attention
    (its scores, see :func:`attention_scores`) and the output layer (the logits, after muP's
    1/m hook: ours is registered later, so it sees the scaled output)."""
    sites = {"embedding": gpt.embedding}
    for i, layer in enumerate(gpt.decoder.layers):
        sites[f"layer {i}"] = layer
    for i, layer in enumerate(gpt.decoder.layers):
        sites[f"attn {i}"] = layer.self_attention.core_attention
    sites["logits"] = gpt.output_layer
    return sites


def attention_scores(core_attention, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The scores ``softmax_scale * q.k`` Megatron's ``DotProductAttention`` computes, as
    [b, heads, sq, sk] (keys repeated over each query group), before masking and softmax."""
    groups = query.shape[2] // key.shape[2]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=2)
    scores = torch.einsum("sbnh,tbnh->bnst", query.float(), key.float())
    return scores * core_attention.softmax_scale


@dataclass
class ActivationRecorder:
    """Forward hooks that keep mean |x| and mean |x - x_0| of each site for every probe pass."""

    sites: dict[str, torch.nn.Module]
    size: dict[str, list[float]] = field(default_factory=dict)
    delta: dict[str, list[float]] = field(default_factory=dict)
    _first: dict[str, torch.Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list)
    active: bool = False

    def __post_init__(self) -> None:
        for name, module in self.sites.items():
            self.size[name], self.delta[name] = [], []
            if name.startswith("attn"):  # scores come from the inputs: a pre-hook
                handle = module.register_forward_pre_hook(self._scores_hook(name))
            else:
                handle = module.register_forward_hook(self._hook(name))
            self._handles.append(handle)

    def _record(self, name: str, x: torch.Tensor) -> None:
        first = self._first.setdefault(name, x.clone())
        self.size[name].append(x.abs().mean().item())
        self.delta[name].append((x - first).abs().mean().item())

    def _hook(self, name: str):
        def record(_module, _inputs, output) -> None:
            if not self.active:  # training forwards pass through unrecorded
                return
            self._record(name, (output[0] if isinstance(output, tuple) else output).detach().float())

        return record

    def _scores_hook(self, name: str):
        def record(module, inputs) -> None:
            if self.active:
                query, key = inputs[0].detach(), inputs[1].detach()
                scores = attention_scores(module, query, key)
                causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
                self._record(name, scores[..., causal])

        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def probe(gpt, recorder: ActivationRecorder, batch: dict[str, torch.Tensor]) -> None:
    """One recorded forward pass of the fixed probe batch (dropout is 0 in these models)."""
    recorder.active = True
    try:
        gpt(batch["tokens"], batch["position_ids"], None)
    finally:
        recorder.active = False


def run_one(cfg, steps: int) -> dict:
    """Train ``steps`` steps of ``cfg``, probing before each update and after the last one
    with the stage's batch ``steps``, which the steps do not train on.

    Returns {"size"/"delta": {site: [value at t=0..steps]}, "loss": [train loss per step]}.
    """
    from megatron_patches.model import unwrap
    from orchestration.data.batches import microbatches
    from orchestration.loop.trainer import Trainer

    objects = build_objects(cfg)
    trainer = Trainer(cfg, objects)
    trainer.enter_stage(1)  # builds (or reuses from run_dir) the stage's datasets
    batch = next(microbatches(trainer.data.train, trainer.layout, steps))
    gpt = unwrap(objects.model_chunks[0])
    recorder = ActivationRecorder(activation_sites(gpt))
    losses = []
    for t in range(steps + 1):
        probe(gpt, recorder, batch)
        if t < steps:
            losses.append(trainer.run_step().loss)
    recorder.remove()
    return {"size": recorder.size, "delta": recorder.delta, "loss": losses}


@dataclass
class CoordCheck:
    """Seed-averaged results: ``size[param][site][width]`` is the list over t = 0..steps."""

    widths: list[int]
    steps: int
    size: dict[str, dict[str, dict[int, list[float]]]]
    delta: dict[str, dict[str, dict[int, list[float]]]]
    loss: dict[str, dict[int, list[float]]]

    def at_last_step(self, param: str, site: str, kind: str = "size") -> list[float]:
        table = self.size if kind == "size" else self.delta
        return [table[param][site][w][-1] for w in self.widths]

    def growth(self, param: str, site: str, kind: str = "size", t: int = -1) -> float:
        """Largest-width over smallest-width value at step ``t`` (the last; 1.0: flat)."""
        table = self.size if kind == "size" else self.delta
        return table[param][site][self.widths[-1]][t] / table[param][site][self.widths[0]][t]

    def slope(self, param: str, site: str, t: int = 0) -> float:
        """The exponent a in value ~ width^a between the smallest and largest width at step
        ``t``: TP5 puts muP's logits at init at -0.5 (readout init variance 1/fan_in^2)."""
        return math.log(self.growth(param, site, t=t)) / math.log(self.widths[-1] / self.widths[0])

    @property
    def sites(self) -> list[str]:
        first = next(iter(self.size.values()))
        return list(first)


def _mean_curves(curves: Sequence[list[float]]) -> list[float]:
    return [statistics.fmean(values) for values in zip(*curves, strict=True)]


def coord_check(
    base,
    widths: Iterable[int],
    steps: int,
    seeds: Iterable[int],
    base_width: int,
    parametrizations: Sequence[str] = PARAMETRIZATIONS,
    log=None,
    grow: str = "both",
) -> CoordCheck:
    """Run every (parametrization, width, seed) and average the curves over seeds."""
    widths, seeds = sorted(widths), list(seeds)
    raw: dict = {}
    for param in parametrizations:
        for width in widths:
            for seed in seeds:
                t0 = time.perf_counter()
                cfg = variant(base, width, param, seed, base_width, grow, widths[0])
                out = run_one(cfg, steps)
                raw.setdefault(param, {}).setdefault(width, []).append(out)
                if log:
                    log(
                        f"{param:>3} width {width:4d} seed {seed}: {time.perf_counter() - t0:5.1f}s"
                        f", loss {out['loss'][0]:.3f} -> {out['loss'][-1]:.3f}"
                    )
    size, delta, loss = {}, {}, {}
    for param, by_width in raw.items():
        sites = list(by_width[widths[0]][0]["size"])
        for kind, table in (("size", size), ("delta", delta)):
            table[param] = {
                s: {w: _mean_curves([r[kind][s] for r in by_width[w]]) for w in widths}
                for s in sites
            }
        loss[param] = {w: _mean_curves([r["loss"] for r in by_width[w]]) for w in widths}
    return CoordCheck(widths, steps, size, delta, loss)


def format_table(result: CoordCheck, kind: str = "size", t: int = -1) -> str:
    """Markdown table: each site's mean |x| per width at step ``t`` (the last), and the
    growth ratio."""
    label = "mean |x_t|" if kind == "size" else "mean |x_t - x_0|"
    when = f"after {result.steps} Adam steps" if t in (-1, result.steps) else f"at t = {t}"
    head = [
        "param",
        "site",
        *[f"w={w}" for w in result.widths],
        f"{result.widths[-1]}/{result.widths[0]}",
    ]
    lines = [
        f"{label} {when}",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    table = result.size if kind == "size" else result.delta
    for param in table:
        for site in result.sites:
            values = [table[param][site][w][t] for w in result.widths]
            cells = [f"{v:.3g}" for v in values] + [f"{result.growth(param, site, kind, t):.2f}x"]
            lines.append(f"| {param} | {site} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shown_steps(steps: int, most: int = 6) -> list[int]:
    """At most ``most`` steps, evenly spread over 0..steps, so long checks keep a legend."""
    return (
        sorted({round(i * steps / (most - 1)) for i in range(most)})
        if steps >= most
        else list(range(steps + 1))
    )


def plot(result: CoordCheck, path: Path, title: str) -> None:
    """Top: every site at the last step vs width; bottom: the logits at each step t vs width.
    SP left, muP right, log-log, shared y range per row so the slopes compare by eye."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(result.size)
    fig, axes = plt.subplots(
        2, len(params), figsize=(5.2 * len(params), 8.4), sharey="row", squeeze=False
    )
    cmap = plt.get_cmap("viridis")
    for col, param in enumerate(params):
        top, bottom = axes[0][col], axes[1][col]
        for i, site in enumerate(result.sites):
            top.plot(
                result.widths,
                result.at_last_step(param, site),
                marker="o",
                color=cmap(i / max(len(result.sites) - 1, 1)),
                label=site,
            )
        top.set_title(f"{param}: mean |x| after {result.steps} steps")
        for t in _shown_steps(result.steps):
            values = [result.size[param]["logits"][w][t] for w in result.widths]
            bottom.plot(
                result.widths,
                values,
                marker="o",
                color=plt.get_cmap("plasma")(t / (result.steps + 1)),
                label=f"t={t}",
            )
        bottom.set_title(f"{param}: logits mean |x| at step t")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(result.widths, [str(w) for w in result.widths])
            ax.set_xlabel("width (hidden size)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("mean |activation|")
    axes[1][0].set_ylabel("mean |logit|")
    axes[0][-1].legend(fontsize=8, loc="best")
    axes[1][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_base_config(run_dir: Path):
    """The sweep's experiment (conf/experiment/mup_sweep.yaml) as a typed RunConfig."""
    from hydra import compose, initialize_config_dir

    from orchestration.config import register_configs, to_run_config

    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return to_run_config(
            compose("config", overrides=["experiment=mup_sweep", f"run_dir={run_dir}"])
        )


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=list(DEFAULT_WIDTHS))
    p.add_argument("--base-width", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seeds", type=int, default=3, help="seeds 1234, 1235, ... to average")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--grow", choices=GROW, default="both",
                   help="what a wider model widens: more heads, wider heads, or both (default)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--embedding-multiplier", type=float, default=10.0)
    p.add_argument("--png", type=Path, default=REPO / "docs/img/mup_coord_check.png")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    # Megatron's CPU fallbacks and torch deprecations warn once per model: noise around a table.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from orchestration.data.datasets import prepare_data

    with tempfile.TemporaryDirectory() as tmp:
        base = demo_base_config(Path(tmp) / "run")
        coord_check_settings(base, args.steps, args.lr, args.batch, args.seq_length,
                             args.weight_decay, args.embedding_multiplier)
        prepare_data(base.data, is_main=True)
        ensure_single_rank_env()
        t0 = time.perf_counter()
        result = coord_check(
            base,
            args.widths,
            args.steps,
            range(1234, 1234 + args.seeds),
            args.base_width,
            log=lambda s: print(s, flush=True),
            grow=args.grow,
        )
    print(
        f"\ncoordinate check: {time.perf_counter() - t0:.0f}s, widths {args.widths}, "
        f"base_width {args.base_width}, Adam lr {args.lr}, {args.seeds} seed(s), "
        f"batch {args.batch}x{args.seq_length} tokens, demo corpus, grow {args.grow}, "
        f"weight decay {args.weight_decay}, muP embedding multiplier {args.embedding_multiplier}"
        f"\nshapes: " + ", ".join(
            "{}: {num_attention_heads}x{}".format(w, w // s["num_attention_heads"], **s)
            for w in args.widths
            for s in [model_shape(w, grow=args.grow, base_width=min(args.widths))]) + "\n"
    )
    print(format_table(result, "size"), "\n")
    print(format_table(result, "delta"), "\n")
    print(format_table(result, "size", t=0), "\n")
    for param in result.size:
        print(f"{param}: logits at init ~ width^{result.slope(param, 'logits'):.2f} "
              "(TP5 muP readout: -0.5)")
    title = (
        f"coordinate check, tiny LLaMA (4 layers, grow {args.grow}), AdamW lr {args.lr} "
        f"wd {args.weight_decay}, "
        f"{args.steps} steps, mean of {args.seeds} seed(s); muP base_width {args.base_width}"
    )
    plot(result, args.png, title)
    print(f"\nwrote {args.png.relative_to(REPO) if args.png.is_relative_to(REPO) else args.png}")


if __name__ == "__main__":
    sys.exit(main())
