"""lm-eval on an exported model, offline, with local task data.

The hand-computed check repeats lm-eval's multiple-choice scoring with transformers alone:
context = question + " ", the trailing space moved to the continuation, the continuation's
tokens taken from encoding the whole string, summed log-probabilities, argmax; acc_norm
divides each choice's log-likelihood by its length in characters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_export import export_cfg, hf_model, save_random_checkpoint

QUESTIONS = [
    {"question": "the cat sees", "choices": ["a red ball.", "two apples.", "the old house."]},
    {"question": "3 plus 4 equals", "choices": ["7.", "12.", "a small boat."]},
]


@pytest.fixture(scope="module")
def hf_dir(corpus, tmp_path_factory, megatron_env) -> Path:
    from orchestration.export import export

    root = tmp_path_factory.mktemp("eval")
    path, _ = save_random_checkpoint(export_cfg(corpus, root / "run"))
    return export(path, root / "hf")


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's causal-LM log-likelihood of ``continuation`` after ``context``."""
    n_spaces = len(context) - len(context.rstrip())
    context, continuation = context[: len(context) - n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    cont = whole[len(ctx) :]
    inp = torch.tensor([(ctx + cont)[:-1]])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(inp).logits[0].double(), dim=-1)
    first = len(ctx) - 1
    return sum(float(logprobs[first + i, tok]) for i, tok in enumerate(cont))


def write_task(root: Path, docs: list[dict]) -> Path:
    """A task YAML with a data_files path relative to itself, as conf/eval/tasks/ has."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "hand.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tasks").mkdir()
    template = (Path(__file__).parents[1] / "conf/eval/tasks/tiny_mc.yaml").read_text()
    text = template.replace("task: tiny_mc", "task: hand_mc").replace("tiny_mc.jsonl", "hand.jsonl")
    (root / "tasks" / "hand_mc.yaml").write_text(text)
    return root / "tasks"


def test_acc_and_acc_norm_equal_hand_computed(hf_dir, tmp_path):
    from transformers import AutoTokenizer

    from orchestration.evaluate import evaluate, metrics

    model, tok = hf_model(hf_dir), AutoTokenizer.from_pretrained(hf_dir)
    lls = [
        [loglikelihood(model, tok, q["question"] + " ", c) for c in q["choices"]] for q in QUESTIONS
    ]
    # Gold = the most likely choice for the first question, the least for the second: acc 0.5.
    gold = [max(range(3), key=lls[0].__getitem__), min(range(3), key=lls[1].__getitem__)]
    docs = [{**q, "answer": g} for q, g in zip(QUESTIONS, gold, strict=True)]
    norm = [
        max(range(3), key=lambda i, q=q, ll=ll: ll[i] / len(q["choices"][i]))
        for q, ll in zip(QUESTIONS, lls, strict=True)
    ]
    result = metrics(evaluate(hf_dir, ["hand_mc"], include=[write_task(tmp_path, docs)]))
    assert result["hand_mc/acc"] == pytest.approx(0.5)
    expected_norm = sum(n == g for n, g in zip(norm, gold, strict=True)) / 2
    assert result["hand_mc/acc_norm"] == pytest.approx(expected_norm)


def test_local_task_via_cli(hf_dir, tmp_path):
    from orchestration.evaluate import main

    out = tmp_path / "results.json"
    main([str(hf_dir), "--tasks", "tiny_mc", "--limit", "4", "--output", str(out)])
    result = json.loads(out.read_text())
    scores = result["results"]["tiny_mc"]
    assert 0.0 <= scores["acc,none"] <= 1.0 and 0.0 <= scores["acc_norm,none"] <= 1.0
    assert result["n_samples"]["tiny_mc"]["effective"] == 4
    assert not list(tmp_path.glob("*.tmp")), "written atomically"


def test_all_checkpoints_table(corpus, tmp_path, megatron_env):
    """Every checkpoint of a run is exported and scored; one table row per step."""
    from orchestration.evaluate import evaluate_run

    cfg = export_cfg(corpus, tmp_path / "run")
    for step, seed in ((2, 0), (4, 1)):
        save_random_checkpoint(cfg, step=step, seed=seed)
    rows = evaluate_run(Path(cfg.run_dir), ["tiny_mc"], limit=3)
    assert [r["step"] for r in rows] == [2, 4]
    eval_dir = Path(cfg.run_dir) / "eval"
    csv_lines = (eval_dir / "benchmarks.csv").read_text().splitlines()
    assert csv_lines[0] == "step,tiny_mc/acc,tiny_mc/acc_norm" and len(csv_lines) == 3
    assert "| step | tiny_mc/acc | tiny_mc/acc_norm |" in (eval_dir / "benchmarks.md").read_text()
    assert not (eval_dir / "hf" / "step_00000002").exists(), "exports removed after scoring"
    assert all(math.isfinite(r["tiny_mc/acc"]) for r in rows)


def test_default_output_is_next_to_the_checkpoint(tmp_path):
    from orchestration.evaluate import default_output

    hf = tmp_path / "hf"
    hf.mkdir()
    assert default_output(hf) == hf / "eval_results.json"
    for ckpt, expected in (
        (tmp_path / "run/checkpoints/step_00000010", tmp_path / "run/eval/step_00000010.json"),
        (tmp_path / "avg", tmp_path / "avg.eval.json"),
    ):
        (hf / "export_info.json").write_text(json.dumps({"checkpoint": str(ckpt)}))
        assert default_output(hf) == expected
