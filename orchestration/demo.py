"""``python -m orchestration.demo``: the README's main job, end to end on CPU, in minutes.

It builds the embedded demo corpus (stdlib prose and code plus
generated arithmetic), trains its tokenizer, tokenizes it to Megatron indexed files, prints the
mix, trains the tiny LLaMA through the real CLI (``python -m orchestration.train
experiment=demo``), then reports the loss against the corpus' unigram entropy: a model that
learned nothing beyond token frequencies sits at the entropy, so falling well below it is proof
of learning. Exits non-zero if it does not. It ends as a release does: every kept checkpoint
scored by lm-eval (``tiny_mc``) and answering the curated prompts, built into the run's
gallery (``runs/demo/gallery/index.html``, opened from disk), whose path it prints last.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from orchestration.common.quiet import install_warning_filters


def unigram_entropy(prefixes: dict[str, str], weights: dict[str, float]) -> float:
    """Entropy (nats) of the blend's token distribution: the loss of a frequency-only model."""
    from megatron_patches.datasets import read_tokens

    mixture = None
    for name, prefix in prefixes.items():
        tokens = read_tokens(prefix)
        counts = np.bincount(tokens.astype(np.int64)).astype(np.float64)
        dist = np.zeros(1 << 16)
        dist[: counts.size] = counts / counts.sum()
        mixture = dist * weights[name] if mixture is None else mixture + dist * weights[name]
    p = mixture[mixture > 0]
    return float(-(p * np.log(p)).sum())


def main(argv: list[str] | None = None) -> int:
    install_warning_filters()  # before anything imports megatron-core
    from data_prep.mix import blend_for_megatron, compute_mix
    from data_prep.prepare_demo import prepare_demo_data

    overrides = list(sys.argv[1:] if argv is None else argv)
    data_dir = Path(os.environ.get("OPT_DATA_DIR", "data")) / "demo"
    demo = prepare_demo_data(data_dir)
    shares = compute_mix(_demo_sources(demo.prefixes))
    paths, weights = blend_for_megatron(shares)
    entropy = unigram_entropy(demo.prefixes, {s.name: w for s, w in zip(shares, weights, strict=False)})
    print(f"unigram entropy of the demo mix: {entropy:.3f} nats", flush=True)

    run_dir = Path("runs/demo")
    cmd = [sys.executable, "-m", "orchestration.train", "experiment=demo", *overrides]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    status = _report(run_dir, entropy)
    _export_and_sample(run_dir)
    _gallery(run_dir)
    return status


def _gallery(run_dir: Path) -> None:
    """Score and prompt every kept checkpoint, write the data sequence, build the gallery."""
    from importlib.util import find_spec

    steps = [
        ["orchestration.evaluate", "--all-checkpoints", str(run_dir), "--tasks", "tiny_mc"],
        ["orchestration.prompts", str(run_dir), "--max-new-tokens", "32"],
    ]
    if find_spec("orchestration.data_sequence") is not None:
        steps.append(["orchestration.data_sequence", str(run_dir), "--format", "jsonl",
                      "--output", str(run_dir / "data_sequence.jsonl")])
    steps.append(["orchestration.gallery", str(run_dir), "--out", str(run_dir / "gallery")])
    for args in steps:
        cmd = [sys.executable, "-m", *args]
        print("$ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    print(f"\ngallery (open it in a browser, no server needed): "
          f"{(run_dir / 'gallery' / 'index.html').resolve()}")


def _export_and_sample(run_dir: Path) -> None:
    """Export the final checkpoint to Hugging Face format and generate from it there."""
    from orchestration.checkpoint.layout import checkpoint_dir, complete_checkpoints

    final = complete_checkpoints(checkpoint_dir(run_dir))[-1]
    out = run_dir / "hf"
    cmd = [sys.executable, "-m", "orchestration.export", str(final), str(out)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = "What is 17 plus 25?"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=32, do_sample=False)
    print(f"exported Hugging Face model: {out}")
    print(f"sample (greedy, transformers): {prompt!r} -> "
          f"{tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)!r}")
    gallery = run_dir / "samples.jsonl"
    if gallery.exists():
        print(f"in-training sample gallery: {gallery}")


def _demo_sources(prefixes: dict[str, str]) -> list:
    """The demo mix's sources (conf/data/demo.yaml) at the prefixes just built."""
    from orchestration.config import SourceConfig, load_data_mix

    multipliers = {s.name: s.multiplier for s in load_data_mix("demo").sources}
    return [SourceConfig(name=name, path=prefix, multiplier=multipliers.get(name, 1.0))
            for name, prefix in prefixes.items()]


def _report(run_dir: Path, entropy: float) -> int:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [r for r in records if "val_loss" in r]
    first, last = steps[0], steps[-1]
    tail = [r["loss"] for r in steps[-20:]]
    print("\n=== demo summary ===")
    print(f"steps: {last['step']}  tokens: {last['consumed_tokens']:,}")
    print(f"train loss: {first['loss']:.3f} -> {sum(tail) / len(tail):.3f} (mean of last "
          f"{len(tail)} steps); unigram entropy {entropy:.3f}")
    if evals:
        print(f"held-out loss {evals[-1]['val_loss']:.3f}, perplexity {evals[-1]['val_ppl']:.1f}")
    print(f"metrics: {run_dir / 'metrics.jsonl'}\ncheckpoints: {run_dir / 'checkpoints'}")
    learned = sum(tail) / len(tail) < 0.8 * entropy
    print("OK: loss is well below the unigram entropy" if learned else
          "FAIL: loss did not fall well below the unigram entropy")
    return 0 if learned else 1


if __name__ == "__main__":
    raise SystemExit(main())
