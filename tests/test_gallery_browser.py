"""The gallery of a real tiny run, in headless chromium (``-m browser``; CI runs these after
the slow tests, installing Debian's chromium and chromium-driver first).

The run is trained here (two stages, held-out loss per source, a spike drill that skips a
batch, checkpoints at steps 5 and 10 and at stage 1's end, 6), then scored by lm-eval,
answered by the prompt command and built into a site through the real CLIs, as a team would.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist import run_single

from orchestration.release import browser as chromium

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(chromium.available() is not None,
                                 reason=f"no headless browser: {chromium.available()}")]
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, check=True,
                          capture_output=True, text=True, timeout=600)
    return proc.stdout


@pytest.fixture(scope="module")
def site(corpus, tmp_path_factory):
    from conftest import make_tiny_cfg

    from orchestration.config import StageConfig

    root = tmp_path_factory.mktemp("gallery")
    cfg = copy.deepcopy(make_tiny_cfg(corpus, root / "run"))
    cfg.stages = [StageConfig(name="stage1", max_steps=6), StageConfig(name="stage2", max_steps=4)]
    cfg.train.eval_interval = 5
    cfg.checkpoint.save_interval, cfg.checkpoint.keep_last = 5, 3
    cfg.spike.inject, cfg.spike.min_history = {"7": "spike"}, 2
    cfg.train.sample_interval, cfg.train.sample_tokens = 5, 6
    cfg.train.sample_prompts = ["the", "a b"]
    run_single(cfg)
    run = Path(cfg.run_dir)
    _cli("orchestration.prompts", str(run), "--max-new-tokens", "8")
    _cli("orchestration.evaluate", "--all-checkpoints", str(run), "--tasks", "tiny_mc",
         "--limit", "6")
    out = _cli("orchestration.gallery", str(run), "--out", str(root / "site"))
    assert f"gallery: {root / 'site' / 'index.html'}" in out
    return run, root / "site" / "index.html"


@pytest.fixture(scope="module")
def page(site):
    with chromium.Browser() as b:
        yield b.open(site[1])


def test_loads_without_errors_or_network(page):
    for view in chromium.VIEWS:
        page.show(view)
    assert page.errors() == []
    requests = page.requests()
    assert any(u.endswith("/plotly.min.js") for u in requests), requests
    assert page.external_requests() == []


def test_curves_mark_stages_and_skips(page, site):
    import json

    page.show("curves")
    loss = page.driver.execute_script(
        "const n = document.getElementById('plot-loss');"
        "return {names: n.data.map(t => t.name), shapes: n.layout.shapes.map(s => "
        "[s.x0, s.line.dash])}")
    skipped = [json.loads(x)["step"] for x in
               (site[0] / "skipped_batches.jsonl").read_text().splitlines()]
    assert 7 in skipped  # the spike drill
    assert f"skipped ({len(skipped)})" in loss["names"]
    assert {"train", "held-out"} <= set(loss["names"])
    assert [x for x, dash in loss["shapes"] if dash == "dash"] == [1, 7]  # stage starts


def test_eval_comparison_follows_the_selectors(page, site):
    from orchestration.release.collect import evaluations

    data = evaluations(site[0])
    # 5 and 10 by save_interval; 6 is stage 1's last step, its release checkpoint (save_stage_end)
    assert data["checkpoints"] == [5, 6, 10]
    page.show("eval")
    acc = data["tasks"]["tiny_mc"]["acc"]["points"]

    def cell(step: str) -> str:  # value, and ± stderr where lm-eval computed one
        value, stderr = acc[step]
        return f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")

    row = "#eval-rows tr[data-task='tiny_mc'][data-metric='acc'] td[data-col='{}']"
    assert page.text(row.format("a")) == [cell("5")]
    assert page.text(row.format("b")) == [cell("10")]
    page.select("eval-a", "10")
    page.select("eval-b", "5")
    assert page.text(row.format("a")) == [cell("10")]
    assert page.text(row.format("b")) == [cell("5")]
    assert page.text("#eval-head-a") == ["A: step 10"]
    delta = acc["5"][0] - acc["10"][0]
    assert page.text(row.format("delta"))[0].startswith(f"{'+' if delta >= 0 else '-'}"
                                                        f"{abs(delta):.4f}")
    shapes = page.driver.execute_script(
        "return document.querySelector('#eval-charts .plot').layout.shapes.map(s => s.x0)")
    assert shapes == [10, 5]  # A and B marked on every task's chart


def test_prompt_comparison_follows_the_selectors(page, site):
    from orchestration.release.prompts import answers_path, read_answers

    answers = {step: {r["id"]: r["answer"] for r in read_answers(answers_path(site[0], step))}
               for step in (5, 10)}
    page.show("prompts")
    page.select("prompt-category", "coding")
    cards = page.driver.execute_script(
        "return [...document.querySelectorAll('#prompt-list .prompt')].map(c => c.dataset.id)")
    assert cards and all(c.startswith("coding-") for c in cards)
    first = cards[0]
    cell = f"#prompt-list .prompt[data-id='{first}'] div[data-col='{{}}'] pre"

    def shown(col: str) -> str:  # textContent: the answer exactly, whitespace included
        return page.driver.execute_script(
            "return document.querySelector(arguments[0]).textContent", cell.format(col))

    assert (shown("a"), shown("b")) == (answers[5][first], answers[10][first])
    page.select("prompt-a", "10")
    page.select("prompt-b", "5")
    assert (shown("a"), shown("b")) == (answers[10][first], answers[5][first])
    page.select("prompt-category", "training samples")  # the in-training sample gallery
    categories = page.driver.execute_script(
        "return [...document.querySelectorAll('#prompt-list .cat')].map(c => c.textContent)")
    assert categories == ["training samples"] * 2


def test_every_view_screenshot_is_not_blank(page, tmp_path):
    from PIL import Image, ImageStat

    for path in page.screenshot_views(tmp_path):
        image = Image.open(path).convert("L")
        stat = ImageStat.Stat(image)
        assert image.size == (1400, 1000) or image.size[0] >= 1000, path
        assert stat.stddev[0] > 15, f"{path.name} looks blank (stddev {stat.stddev[0]:.1f})"
        # More than the header: the view's own content changes a good part of the page.
        body = image.crop((0, 150, image.size[0], image.size[1]))
        assert ImageStat.Stat(body).stddev[0] > 10, path.name
