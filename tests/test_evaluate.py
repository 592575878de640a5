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
    include = [write_task(tmp_path, docs)]
    result = metrics(evaluate(hf_dir, ["hand_mc"], include=include, output=tmp_path / "r.json"))
    assert result["hand_mc/acc"] == pytest.approx(0.5)
    expected_norm = sum(n == g for n, g in zip(norm, gold, strict=True)) / 2
    assert result["hand_mc/acc_norm"] == pytest.approx(expected_norm)


def test_full_results_json_via_cli(hf_dir, tmp_path):
    """lm-eval's whole output is kept (configs, n-shot, versions, higher_is_better, date, its
    version), stderr is a number (bootstrap_iters > 0 by default), and the options are noted."""
    from orchestration.evaluate import main

    out = tmp_path / "results.json"
    main([str(hf_dir), "--tasks", "tiny_mc", "--limit", "4", "--output", str(out),
          "--device", "cpu", "--batch-size", "2", "--seed", "7", "--log-samples"])
    result = json.loads(out.read_text())
    scores = result["results"]["tiny_mc"]
    assert 0.0 <= scores["acc,none"] <= 1.0 and 0.0 <= scores["acc_norm,none"] <= 1.0
    assert isinstance(scores["acc_stderr,none"], float), "stderr computed, not 'N/A'"
    assert result["n-samples"]["tiny_mc"]["effective"] == 4
    assert result["configs"]["tiny_mc"]["output_type"] == "multiple_choice"
    assert result["n-shot"]["tiny_mc"] == 0 and "tiny_mc" in result["versions"]
    assert result["higher_is_better"]["tiny_mc"]["acc"] is True
    assert result["lm_eval_version"] and result["date"] and result["transformers_version"]
    assert result["config"]["batch_size"] == 2 and result["config"]["random_seed"] == 7
    assert result["checkpoint"]["step"] == 1
    stamp = result["evaluated"]["tiny_mc"]
    assert stamp["options"] == {"num_fewshot": None, "limit": 4, "dtype": "float32",
                                "bootstrap_iters": 1000, "seed": 7}
    assert stamp["run_options"]["device"] == "cpu" and stamp["date"].endswith("Z")
    samples = (tmp_path / "samples_tiny_mc.jsonl").read_text().splitlines()
    assert len(samples) == 4 and "doc" in json.loads(samples[0])
    assert not list(tmp_path.glob(".*.tmp")), "written atomically"


def test_rerun_does_only_what_is_missing(hf_dir, tmp_path):
    """Same tasks and options: nothing reruns; a new task runs alone and is merged in; other
    options (here few-shot) rerun the task."""
    from orchestration.evaluate import evaluate
    from orchestration.evaluation.options import EvalOptions

    docs = [{**q, "answer": 0} for q in QUESTIONS]
    include = [write_task(tmp_path / "tasks", docs)]
    out = tmp_path / "r.json"
    opts = EvalOptions(limit=2)
    first = evaluate(hf_dir, ["tiny_mc"], opts, include, out)
    mtime = out.stat().st_mtime_ns
    assert evaluate(hf_dir, ["tiny_mc"], opts, include, out) == first
    assert out.stat().st_mtime_ns == mtime, "cached: not rewritten"
    both = evaluate(hf_dir, ["tiny_mc", "hand_mc"], opts, include, out)
    assert both["evaluated"]["tiny_mc"] == first["evaluated"]["tiny_mc"], "not rerun"
    assert set(both["results"]) == {"tiny_mc", "hand_mc"} and set(both["configs"]) == {
        "tiny_mc", "hand_mc"}
    shot = evaluate(hf_dir, ["tiny_mc"], EvalOptions(limit=2, num_fewshot=1), include, out)
    assert shot["n-shot"]["tiny_mc"] == 1 and shot["evaluated"]["tiny_mc"]["options"][
        "num_fewshot"] == 1
    assert shot["results"]["hand_mc"] == both["results"]["hand_mc"]


def test_all_checkpoints_table_and_cache(corpus, tmp_path, megatron_env):
    """Every kept checkpoint is exported and scored into eval/<step_dir>/results.json; one
    table row per step; a second pass exports nothing."""
    from orchestration.evaluate import evaluate_run, list_checkpoints, main
    from orchestration.evaluation.options import EvalOptions

    cfg = export_cfg(corpus, tmp_path / "run")
    for step, seed in ((2, 0), (4, 1)):
        save_random_checkpoint(cfg, step=step, seed=seed)
    run = Path(cfg.run_dir)
    opts = EvalOptions(limit=3)
    assert [p.name for p in list_checkpoints(run, ["tiny_mc"], opts)] == [
        "step_00000002", "step_00000004"]
    rows = evaluate_run(run, ["tiny_mc"], opts)
    assert [r["step"] for r in rows] == [2, 4]
    eval_dir = run / "eval"
    for name in ("step_00000002", "step_00000004"):
        saved = json.loads((eval_dir / name / "results.json").read_text())
        assert saved["checkpoint"]["path"] == str((run / "checkpoints" / name).resolve())
    csv_lines = (eval_dir / "benchmarks.csv").read_text().splitlines()
    assert csv_lines[0] == "step,tokens,tiny_mc/acc,tiny_mc/acc_norm" and len(csv_lines) == 3
    assert "| step | tokens | tiny_mc/acc |" in (eval_dir / "benchmarks.md").read_text()
    assert not (eval_dir / "hf").exists(), "exports removed after scoring"
    assert all(math.isfinite(r["tiny_mc/acc"]) for r in rows)
    assert list_checkpoints(run, ["tiny_mc"], opts) == []
    mtime = (eval_dir / "step_00000002" / "results.json").stat().st_mtime_ns
    main([str(run), "--tasks", "tiny_mc", "--limit", "3"])  # cached: no export, no lm-eval
    assert (eval_dir / "step_00000002" / "results.json").stat().st_mtime_ns == mtime
    assert not (eval_dir / "hf").exists()
    save_random_checkpoint(cfg, step=2, seed=5)  # re-saved (a rollback): another model
    assert [p.name for p in list_checkpoints(run, ["tiny_mc"], opts)] == ["step_00000002"]


def test_list_checkpoints_cli(corpus, tmp_path, megatron_env, capsys):
    from orchestration.evaluate import main

    cfg = export_cfg(corpus, tmp_path / "run")
    for step in (3, 1, 2):
        save_random_checkpoint(cfg, step=step)
    main([cfg.run_dir, "--list-checkpoints"])
    lines = capsys.readouterr().out.splitlines()
    assert [Path(line).name for line in lines] == ["step_00000001", "step_00000002",
                                                   "step_00000003"]
    assert all(Path(line).is_absolute() for line in lines)


def test_option_parsing():
    from orchestration.evaluate import main
    from orchestration.evaluation.options import EvalOptions, check_batch_size, parse_limit

    assert check_batch_size("auto") == "auto" and check_batch_size("auto:4") == "auto:4"
    assert EvalOptions(batch_size="16").lm_eval_batch_size() == 16
    assert parse_limit("50") == 50 and isinstance(parse_limit("50"), int)
    assert parse_limit("0.25") == 0.25
    for bad in (["--batch-size", "big"], ["--limit", "-1"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            main([".", "--tasks", "tiny_mc", *bad])
    assert EvalOptions(device="cpu").resolved_dtype() == "float32"
    assert EvalOptions(device="cuda:0").resolved_dtype() == "bfloat16"


def test_default_output_is_next_to_the_checkpoint(tmp_path):
    from orchestration.evaluate import default_output

    hf = tmp_path / "hf"
    hf.mkdir()
    assert default_output(hf) == hf / "eval_results.json"
    for ckpt, expected in (
        (tmp_path / "run/checkpoints/step_00000010",
         tmp_path / "run/eval/step_00000010/results.json"),
        (tmp_path / "avg", tmp_path / "avg.eval/results.json"),
    ):
        (hf / "export_info.json").write_text(json.dumps({"checkpoint": str(ckpt)}))
        assert default_output(hf) == expected
