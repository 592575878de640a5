"""The prompt gallery's answers: each kept checkpoint completes a curated prompt set greedily.

Why through the Hugging Face export: it is the model users download, the export is checked
against Megatron's logits (tests/test_export.py), and ``transformers`` decodes with a KV cache
on any device, which full-recompute decoding with the training model
(``megatron_patches.generation``, used by the in-training sample gallery) cannot do for long
answers or large models. Greedy decoding needs no seed, so an answer is a function of the
checkpoint and the prompt alone.

Answers are cached per checkpoint in ``<run_dir>/prompts/step_XXXXXXXX.jsonl``, one line per
prompt, matched on (id, prompt text, max_new_tokens): a rerun generates only what is missing
(a new checkpoint, an added or edited prompt) and exports nothing when nothing is.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestration.common.files import write_jsonl_atomic
from orchestration.common.paths import CONF_DIR

DEFAULT_PROMPTS = CONF_DIR / "prompts" / "gallery.yaml"


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    prompt: str


def load_prompt_set(path: Path = DEFAULT_PROMPTS) -> tuple[str, list[Prompt]]:
    """(name, prompts) of a prompt-set YAML: ``categories: {category: [{id, prompt}]}``."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read the prompt set ({err})") from err
    categories = doc.get("categories") if isinstance(doc, dict) else None
    if not isinstance(categories, dict) or not categories:
        raise ValueError(f"{path}: expected a mapping `categories: {{name: [{{id, prompt}}]}}`")
    prompts, seen = [], set()
    for category, items in categories.items():
        if not isinstance(items, list):
            raise ValueError(f"{path}: categories.{category}: expected a list of {{id, prompt}}")
        for i, item in enumerate(items):
            where = f"{path}: categories.{category}[{i}]"
            if not isinstance(item, dict) or not item.get("id") or not item.get("prompt"):
                raise ValueError(f"{where}: expected {{id: <name>, prompt: <non-empty text>}}")
            if item["id"] in seen:
                raise ValueError(f"{where}: id '{item['id']}' is used twice")
            seen.add(item["id"])
            prompts.append(Prompt(str(item["id"]), str(category), str(item["prompt"])))
    return str(doc.get("name") or path.stem), prompts


def answers_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "prompts" / f"step_{step:08d}.jsonl"


def read_answers(path: Path) -> list[dict[str, Any]]:
    """The answer lines of one checkpoint; a line cut short by a kill is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines() if Path(path).is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def missing(prompts: list[Prompt], cached: list[dict], max_new_tokens: int) -> list[Prompt]:
    have = {(r.get("id"), r.get("prompt"), r.get("max_new_tokens")) for r in cached}
    return [p for p in prompts if (p.id, p.prompt, max_new_tokens) not in have]


class GreedyAnswerer:
    """Greedy completions by an exported Hugging Face folder (padding rows of the vocabulary
    masked, stopping at the tokenizer's end of sequence)."""

    def __init__(self, hf_dir: Path, device: str = "cpu", dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=getattr(torch, dtype)).to(device).eval()
        self.device = device
        self.vocab = len(self.tokenizer)

    def __call__(self, prompt: str, max_new_tokens: int) -> str:
        torch = self.torch
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        padding = list(range(self.vocab, self.model.config.vocab_size))  # Megatron's padding
        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([ids], device=self.device), max_new_tokens=max_new_tokens,
                do_sample=False, suppress_tokens=padding or None, eos_token_id=eos,
                pad_token_id=eos if eos is not None else 0)
        new = [t for t in out[0, len(ids):].tolist() if t != eos]
        # Decode with the prompt so the boundary's whitespace survives, then cut the prompt off.
        full = self.tokenizer.decode(ids + new, skip_special_tokens=True)
        return full[len(self.tokenizer.decode(ids, skip_special_tokens=True)):]


def answer_checkpoint(ckpt: Path, run_dir: Path, prompts: list[Prompt], set_name: str,
                      max_new_tokens: int = 64, device: str = "cpu",
                      dtype: str = "float32") -> tuple[Path, int]:
    """Write (complete) the answers of checkpoint ``ckpt``; return (file, answers generated)."""
    from orchestration.checkpoint.layout import read_metadata
    from orchestration.export import export

    step = int(read_metadata(ckpt)["step"])
    path = answers_path(run_dir, step)
    cached = read_answers(path)
    todo = missing(prompts, cached, max_new_tokens)
    if not todo:
        return path, 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".hf-{ckpt.name}.", dir=path.parent))
    try:
        answer = GreedyAnswerer(export(ckpt, tmp / "hf", dtype=dtype), device, dtype)
        fresh = {p.id: {"id": p.id, "category": p.category, "prompt": p.prompt,
                        "answer": answer(p.prompt, max_new_tokens), "step": step,
                        "checkpoint": ckpt.name, "max_new_tokens": max_new_tokens,
                        "decoding": "greedy", "prompt_set": set_name}
                 for p in todo}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keep = {(p.id, p.prompt, max_new_tokens) for p in prompts}
    old = [r for r in cached if (r.get("id"), r.get("prompt"), r.get("max_new_tokens")) in keep]
    by_id = {r["id"]: r for r in old} | fresh
    rows = [by_id[p.id] for p in prompts]
    rows += [r for r in cached if r.get("id") not in by_id]  # other sets' answers are kept
    write_jsonl_atomic(path, rows)
    return path, len(fresh)
