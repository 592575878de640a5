"""The gallery's inputs and output without a browser: what is read from a run directory (both
lm-eval result layouts, skip logs, prompts, the record's mix), the site's files, the prompt
set, and the prompt answers (against the training model's own greedy decoding)."""

from __future__ import annotations

import json
import math
import re

import pytest
from test_report import write_metrics

FULL_LM_EVAL = {  # lm-eval's simple_evaluate output, as evaluate.py saves it per checkpoint
    "results": {"tiny_mc": {"alias": "tiny_mc", "acc,none": 0.5, "acc_stderr,none": 0.1,
                            "acc_norm,none": 0.4, "acc_norm_stderr,none": 0.12},
                "gsm8k": {"exact_match,strict-match": 0.25,
                          "exact_match_stderr,strict-match": 0.05}},
    "higher_is_better": {"tiny_mc": {"acc": True, "acc_norm": True},
                         "gsm8k": {"exact_match": True}},
    "configs": {"tiny_mc": {"num_fewshot": 0}}, "versions": {"tiny_mc": 1},
    "n-shot": {"tiny_mc": 0}, "date": 1.7e9,
}
SUMMARY = {  # the older per-checkpoint summary (bootstrap_iters=0: stderr 'N/A')
    "model": "x", "tasks": ["tiny_mc"], "limit": None, "versions": {},
    "results": {"tiny_mc": {"alias": "tiny_mc", "acc,none": 0.3, "acc_stderr,none": "N/A",
                            "acc_norm,none": 0.2, "acc_norm_stderr,none": "N/A"}},
    "export": {"step": 5},
}


@pytest.fixture
def run_dir(tmp_path, corpus):
    """A run directory with every kind of file the gallery reads."""
    from conftest import make_tiny_cfg

    from orchestration.config import to_dict
    from orchestration.metrics.run_record import write_run_record

    run = tmp_path / "run"
    run.mkdir()
    write_metrics(run)  # two stages (main from step 0, anneal from 5), skips at 3 and 8
    with open(run / "metrics.jsonl", "a") as f:
        f.write("\n" + json.dumps({"event": "rollback", "step": 9, "to_step": 6,
                                   "action": "rollback_defer", "window": [7, 9]}) + "\n")
    skips = [{"kind": "skip", "step": 4, "reason": "loss spike", "computed": True,
              "rolled_back": True},
             {"kind": "skip", "step": 9, "reason": "rolled-back window", "computed": False},
             {"kind": "defer", "stage_index": 1, "stage": "anneal", "batches": [2, 4], "step": 9}]
    (run / "skipped_batches.jsonl").write_text("".join(json.dumps(s) + "\n" for s in skips))
    (run / "eval").mkdir()
    (run / "eval" / "step_00000005.json").write_text(json.dumps(SUMMARY))
    (run / "eval" / "step_00000010").mkdir()
    (run / "eval" / "step_00000010" / "results.json").write_text(json.dumps(FULL_LM_EVAL))
    (run / "prompts").mkdir()
    for step in (5, 10):
        rows = [{"id": "history-printing-press", "category": "history",
                 "prompt": "The printing press, invented by Johannes Gutenberg around 1440,",
                 "answer": f"answer {step} <script>alert(1)</script>"},
                {"id": "coding-is-prime", "category": "coding", "prompt": "an old text",
                 "answer": "stale"}]  # its prompt was edited since: not shown
        (run / "prompts" / f"step_{step:08d}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows))
    (run / "samples.jsonl").write_text(json.dumps({"step": 5, "prompt": "def f(",
                                                   "completion": "x):"}) + "\n")
    cfg = make_tiny_cfg(corpus, run)
    write_run_record(run, to_dict(cfg), [])
    return run


def test_collect_reads_every_source(run_dir):
    from orchestration.release.collect import collect
    from orchestration.release.prompts import DEFAULT_PROMPTS

    data = collect(run_dir, DEFAULT_PROMPTS)
    c = data["curves"]
    assert [p[0] for p in c["train"]["loss"]] == list(range(1, 11))
    assert set(c["val"]) == {"val_loss", "val_loss/alpha", "val_loss/beta"}
    assert [s["stage"] for s in c["stages"]] == ["main", "anneal"]
    # metrics' skips (3: record, 8: event) and the skip log's (9); 4 was rolled back.
    assert [s["step"] for s in c["skipped"]] == [3, 8, 9]
    assert c["skipped"][0]["loss"] == pytest.approx(5.0 - 0.6)
    assert c["deferred"] == []  # the fixture's stage_start events carry no index
    assert c["rollbacks"] == [{"step": 9, "to_step": 6, "action": "rollback_defer",
                               "window": [7, 9]}]
    ev = data["eval"]
    assert ev["checkpoints"] == [5, 10]
    acc = ev["tasks"]["tiny_mc"]["acc"]
    assert acc["points"] == {"5": [0.3, None], "10": [0.5, 0.1]}
    assert acc["higher_is_better"] is True
    assert ev["tasks"]["gsm8k"]["exact_match (strict-match)"]["points"] == {"10": [0.25, 0.05]}
    pr = data["prompts"]
    assert pr["checkpoints"] == [5, 10]
    assert [p["id"] for p in pr["prompts"]] == ["history-printing-press", "sample: def f("]
    assert pr["categories"] == ["history", "training samples"]
    assert pr["answers"]["10"]["history-printing-press"].startswith("answer 10")
    mix = data["mix"]["stages"]
    assert len(mix) == 1 and math.isclose(sum(s["share"] for s in mix[0]["sources"]), 1.0)
    assert {s["name"] for s in mix[0]["sources"]} == {"alpha", "beta"}
    assert len(data["records"]) == 1 and data["records"][0]["files"] == [
        "config.yaml", "git.diff", "record.json"]


def test_deferred_window_in_steps():
    from orchestration.release.collect import _deferred

    stages = [{"step": 1, "index": 0}, {"step": 101, "index": 1}]
    log = [{"kind": "defer", "stage_index": 1, "stage": "s2", "batches": [10, 20], "step": 125},
           {"kind": "defer", "stage_index": -1, "stage": "training", "batches": [95, 110],
            "step": 112}]  # spike.defer_to=training_end: run positions (step - 1)
    assert _deferred(log, stages) == [
        {"stage": "s2", "first_step": 111, "last_step": 120, "decided_at": 125,
         "to": "stage end"},
        {"stage": "training", "first_step": 96, "last_step": 110, "decided_at": 112,
         "to": "training end"}]


def test_site_is_self_contained(run_dir, tmp_path):
    from orchestration.gallery import main

    site = tmp_path / "site"
    (run_dir / "data_sequence.jsonl").write_text('{"step": 1}\n')
    assert main([str(run_dir), "--out", str(site)]) == 0
    page = (site / "index.html").read_text()
    assert (site / "plotly.min.js").stat().st_size > 1_000_000
    assert '<script src="plotly.min.js">' in page
    # Nothing outside file://: no URL with a scheme, no protocol-relative source.
    assert not re.findall(r"""(?:src|href)=["'](?:[a-z]+:)?//""", page, re.I)
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page
    payload = re.search(r'<script type="application/json" id="gallery-data">(.*?)</script>',
                        page, re.S).group(1)
    assert "<" not in payload  # answers hold "<script>": escaped inside the JSON
    data = json.loads(payload)
    assert data["eval"]["checkpoints"] == [5, 10]
    assert data["prompts"]["answers"]["10"]["history-printing-press"] == (
        "answer 10 <script>alert(1)</script>")
    assert set(data["figures"]["curves"]) == {"loss", "lr", "grad_norm", "throughput"}
    loss = data["figures"]["curves"]["loss"]
    assert "skipped (3)" in [t.get("name") for t in loss["data"]]
    assert len([s for s in loss["layout"]["shapes"] if s.get("line", {}).get("dash") == "dash"]) == 2
    record = next((site / "record").iterdir())
    assert (record / "config.yaml").is_file() and (site / "skipped_batches.jsonl").is_file()
    assert '<a href="../run/metrics.jsonl">' in page
    assert '<a href="../run/data_sequence.jsonl">' in page


def test_site_replaces_only_a_gallery(run_dir, tmp_path):
    from orchestration.release.site import build_site

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a gallery"):
        build_site(run_dir, other)
    assert (other / "notes.txt").read_text() == "keep"
    site = tmp_path / "site"
    build_site(run_dir, site)
    (site / "stale.txt").write_text("old")
    build_site(run_dir, site)
    assert not (site / "stale.txt").exists() and (site / "index.html").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_shipped_prompt_set_and_bad_sets(tmp_path):
    from orchestration.release.prompts import load_prompt_set

    name, prompts = load_prompt_set()
    cats = {}
    for p in prompts:
        cats.setdefault(p.category, []).append(p)
    assert set(cats) == {"history", "coding", "word problems", "logic", "safety",
                         "story telling", "others"}
    assert all(len(v) >= 3 for v in cats.values()) and name == "gallery-v1"
    bad = tmp_path / "bad.yaml"
    bad.write_text("categories:\n  a:\n    - {id: x, prompt: p}\n    - {id: x, prompt: q}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: categories.a\[1\]: id 'x' is used twice"):
        load_prompt_set(bad)
    bad.write_text("categories:\n  a:\n    - {id: y}\n")
    with pytest.raises(ValueError, match=r"categories.a\[0\]: expected \{id"):
        load_prompt_set(bad)


def test_answers_match_the_training_model_and_are_cached(megatron_env, corpus, tmp_path):
    import sentencepiece as spm
    from test_export import export_cfg, save_random_checkpoint

    from megatron_patches.generation import greedy_generate
    from orchestration.release.prompts import Prompt, answer_checkpoint, read_answers

    cfg = export_cfg(corpus, tmp_path / "run")
    ckpt, model = save_random_checkpoint(cfg, step=3)
    sp = spm.SentencePieceProcessor(model_file=str(cfg.data.tokenizer_model))
    prompts = [Prompt("a", "logic", "the cat"), Prompt("b", "coding", "def f(x):")]
    path, made = answer_checkpoint(ckpt, cfg.run_dir, prompts, "t", max_new_tokens=6)
    assert made == 2 and path.name == "step_00000003.jsonl"
    rows = read_answers(path)
    for prompt, row in zip(prompts, rows, strict=True):
        ids = sp.encode(prompt.prompt)
        new = greedy_generate(model, ids, 6, eod_id=sp.eos_id(), vocab_size=sp.get_piece_size())
        assert row["answer"] == sp.decode(ids + new)[len(sp.decode(ids)):], prompt
        assert (row["id"], row["step"], row["decoding"]) == (prompt.id, 3, "greedy")
    assert answer_checkpoint(ckpt, cfg.run_dir, prompts, "t", max_new_tokens=6)[1] == 0
    edited = [prompts[0], Prompt("b", "coding", "import os")]
    assert answer_checkpoint(ckpt, cfg.run_dir, edited, "t", max_new_tokens=6)[1] == 1
    again = read_answers(path)
    assert again[0] == rows[0] and again[1]["prompt"] == "import os"


def test_long_curves_are_thinned_but_keep_the_last_step():
    from orchestration.release.figures import MAX_POINTS, _thin

    points = [[s, float(s)] for s in range(1, 3 * MAX_POINTS + 2)]
    thin = _thin(points)
    assert len(thin) <= MAX_POINTS + 1 and thin[0] == points[0] and thin[-1] == points[-1]
    assert _thin(points[:MAX_POINTS]) == points[:MAX_POINTS]
