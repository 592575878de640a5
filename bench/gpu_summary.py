"""The versions header and the summary table of ``bench/gpu_check.sh``.

``python bench/gpu_summary.py versions OUT.json`` prints (and saves) the packages, the GPU and
the platform the run sees: CUDA, Transformer Engine, apex, and the layer spec a job gets.
``python bench/gpu_summary.py table DIR`` reads the JSON files the check wrote into ``DIR``
(versions, the MFU grid, the step overhead, the checkpoint stall) and prints one Markdown table
to paste into docs/benchmarks.md, with both MFU conventions labelled.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment  # noqa: E402


def versions(out: str, device: str) -> dict:
    import torch

    from megatron_patches.platform import probe_platform, resolve_layer_spec

    on_cpu = device == "cpu" or not torch.cuda.is_available()
    platform = probe_platform(on_cpu)
    info = environment() | {"cuda": torch.version.cuda or "none",
                            "cudnn": str(torch.backends.cudnn.version()),
                            "platform": platform.describe()}
    try:
        info["layer_spec"] = resolve_layer_spec("auto", platform)
    except RuntimeError as err:  # CUDA without TE: say so, the grid below will fail the same way
        info["layer_spec"] = f"none: {err}"
    for key, value in info.items():
        print(f"   {key}: {value}")
    Path(out).write_text(json.dumps(info, indent=1))
    return info


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def table(directory: str) -> str:
    d = Path(directory)
    env, rows = _load(d / "versions.json") or {}, _load(d / "mfu.json") or []
    overhead, ckpt = _load(d / "overhead.json"), _load(d / "checkpoint.json")
    device = env.get("gpu", "CPU (dry run)")
    lines = [f"GPU check on {device}; torch {env.get('torch')}, CUDA {env.get('cuda')}, "
             f"megatron-core {env.get('megatron-core')}, transformer-engine "
             f"{env.get('transformer-engine')}; commit {env.get('commit')}, {env.get('date')}",
             "", "| measurement | configuration | result |", "| --- | --- | --- |"]
    ok = sorted((r for r in rows if "tokens_per_s" in r), key=lambda r: -r["tokens_per_s"])
    for r in ok:
        mfu = r.get("mfu") or {}
        rate = ("MFU n/a (no GPU peak)" if mfu.get("full_attn") is None else
                f"MFU {_pct(mfu['full_attn'])} full-attention / {_pct(mfu['causal'])} causal")
        lines.append(
            f"| MFU ({r.get('spec', '?')} spec) | {r['shape']}, mbs {r['mbs']}, recompute "
            f"{r['recompute']} | {r['tokens_per_s']:,.0f} tokens/s; {rate} |")
    for r in rows:
        if "tokens_per_s" not in r:
            why = "out of memory" if r.get("oom") else r.get("error", "failed")
            lines.append(f"| MFU | {r['shape']}, mbs {r['mbs']}, recompute {r['recompute']} | "
                         f"{why} |")
    if overhead:
        lines.append(
            f"| step: driver vs bare Megatron loop | same settings | driver "
            f"{overhead['driver_ms']:.1f} ms, bare {overhead['bare_ms']:.1f} ms (paired ratio "
            f"{overhead['paired_ratio']:.3f}); device syncs per step: driver "
            f"{overhead['driver_syncs']}, bare {overhead['bare_syncs']} |")
    if ckpt:
        lines.append(
            f"| checkpoint stall | {ckpt['checkpoint_mib']:,.0f} MiB | save call: sync "
            f"{ckpt['sync_call_s']:.2f} s, async {ckpt['async_call_s']:.2f} s; cost to "
            f"training: sync {ckpt['sync_cost_s']:.2f} s, async {ckpt['async_cost_s']:.2f} s |")
    lines += ["", "MFU conventions (orchestration/metrics/flops.py): full-attention = PaLM / "
              "Megatron-LM before 2025; causal = Megatron-LM's current "
              "num_floating_point_operations (attention halved for the causal mask)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "versions":
        versions(argv[1], argv[2] if len(argv) > 2 else "cuda")
        return 0
    if len(argv) == 2 and argv[0] == "table":
        print(table(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
