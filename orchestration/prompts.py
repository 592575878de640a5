"""``python -m orchestration.prompts RUN_DIR [--prompts conf/prompts/gallery.yaml]``

Answer the curated prompt set with every kept checkpoint of a run, greedily, for the prompt
gallery (``python -m orchestration.gallery``). Each checkpoint is exported to Hugging Face
format in a temporary folder and decoded with ``transformers``; answers go to
``<run_dir>/prompts/step_XXXXXXXX.jsonl`` and are cached: a rerun does only new checkpoints and
new or edited prompts. ``--steps`` picks checkpoints; run one step per array task to spread a
long run's checkpoints over GPUs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from orchestration.common.quiet import install_warning_filters
from orchestration.release.prompts import DEFAULT_PROMPTS, answer_checkpoint, load_prompt_set


def main(argv: list[str] | None = None) -> int:
    install_warning_filters()  # before anything imports megatron-core
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="prompt-set YAML")
    p.add_argument("--steps", help="comma-separated checkpoint steps (default: every kept one)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu", help="torch device for decoding (cpu, cuda, ...)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    args = p.parse_args(argv)
    from orchestration.checkpoint.layout import checkpoint_dir, complete_checkpoints, step_of

    try:
        name, prompts = load_prompt_set(args.prompts)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ckpts = complete_checkpoints(checkpoint_dir(args.run_dir))
    if args.steps:
        wanted = {int(s) for s in args.steps.split(",") if s}
        absent = sorted(wanted - {step_of(c) for c in ckpts})
        if absent:
            print(f"error: {args.run_dir}/checkpoints has no complete checkpoint for steps "
                  f"{absent}", file=sys.stderr)
            return 2
        ckpts = [c for c in ckpts if step_of(c) in wanted]
    if not ckpts:
        print(f"error: no complete checkpoint under {args.run_dir}/checkpoints", file=sys.stderr)
        return 2
    for ckpt in ckpts:
        path, made = answer_checkpoint(ckpt, args.run_dir, prompts, name, args.max_new_tokens,
                                       args.device, args.dtype)
        print(f"{ckpt.name}: {made} answers generated, {len(prompts) - made} cached -> {path}",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
