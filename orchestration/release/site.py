"""Write the gallery: one ``index.html`` that opens from disk, with no server and no network.

The page's data is JSON embedded in it (browsers refuse ``fetch`` of ``file://``), its CSS and
JS are inlined from ``assets/``, and plotly.js is the ``plotly.min.js`` that the ``plotly``
package ships, copied beside it (one file, shared by every plot). The run record's small files
are copied into ``record/``, so the site is a release artefact of its own; the metrics log and
the data sequence, which can be large, are linked relative to the site.

The site is built in a temporary folder and renamed into place. An existing ``--out`` is only
replaced when it is a gallery (it holds the ``.gallery`` marker), never another folder.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestration.release.collect import collect
from orchestration.release.figures import curve_figures, mix_figure
from orchestration.release.prompts import DEFAULT_PROMPTS

ASSETS = Path(__file__).parent / "assets"
MARKER = ".gallery"
VIEWS = (("curves", "Training curves"), ("eval", "Evaluation gallery"),
         ("prompts", "Prompt gallery"), ("mix", "Data mix"), ("record", "Run record"))


def plotly_js() -> Path:
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the plotly package ships no plotly.min.js")
    return path


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _link(site: Path, target: str | Path, text: str | None = None) -> str:
    href = Path(os.path.relpath(Path(target).resolve(), site.resolve())).as_posix()
    return f'<a href="{_e(href)}">{_e(text or Path(target).name)}</a>'


def _curves_view() -> str:
    plots = "".join(f'<div class="card"><div class="plot" id="plot-{n}"></div></div>'
                    for n in ("loss", "lr", "grad_norm", "throughput"))
    return (f'<p>Stage starts: dashed lines. Skipped batches: red crosses. Batches deferred to '
            f'the end of their stage: shaded. Rollbacks: dotted lines.</p>'
            f'<div class="plots">{plots}</div>')


def _selectors(prefix: str, extra: str = "") -> str:
    return (f'<div class="selectors"><label class="tag-a">A <select id="{prefix}-a"></select>'
            f'</label><label class="tag-b">B <select id="{prefix}-b"></select></label>'
            f'{extra}</div>')


def _eval_view() -> str:
    return (f'<div id="eval-content">{_selectors("eval")}'
            '<div class="card"><table id="eval-table"><thead><tr><th>task</th><th>metric</th>'
            '<th id="eval-head-a" class="tag-a">A</th><th id="eval-head-b" class="tag-b">B</th>'
            '<th>B − A (in σ)</th></tr></thead><tbody id="eval-rows"></tbody></table></div>'
            '<div id="eval-charts" class="plots"></div></div>')


def _prompts_view() -> str:
    category = '<label>category <select id="prompt-category"></select></label>'
    return (f'<div id="prompts-content">{_selectors("prompt", category)}'
            '<div id="prompt-list"></div></div>')


def _fmt_tokens(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _mix_view(mix: dict[str, Any]) -> str:
    if not mix["stages"]:
        return f'<p class="empty">{_e(mix.get("error") or "no stages recorded")}</p>'
    parts = ['<div class="card"><div class="plot" id="plot-mix"></div></div>']
    for st in mix["stages"]:
        rows = []
        for src in st["sources"]:
            if "share" in src:
                rows.append(f'<tr><td>{_e(src["name"])}</td><td class="num">{src["share"]:.2%}'
                            f'</td><td class="num">{src["multiplier"]:g}</td><td class="num">'
                            f'{_fmt_tokens(src["tokens"])}</td><td class="num">'
                            f'{_fmt_tokens(src["effective_tokens"])}</td><td class="num">'
                            f'{src["epochs"]:.2f}</td></tr>')
            else:
                rows.append(f'<tr><td>{_e(src["name"])}</td><td class="num">?</td>'
                            f'<td class="num">{src["multiplier"]:g}</td><td colspan="3"></td></tr>')
        note = f'<p class="empty">{_e(st["error"])}</p>' if st["error"] else ""
        parts.append(
            f'<div class="card"><h3>Stage {st["index"]}: {_e(st["name"])} (mix '
            f'<code>{_e(st["mix"])}</code>): steps {st["first_step"]}–{st["last_step"]}, '
            f'{_fmt_tokens(st["tokens"])} tokens</h3>{note}<table><thead><tr><th>source</th>'
            '<th>share</th><th>multiplier</th><th>tokens (one pass)</th><th>tokens this stage'
            f'</th><th>epochs</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>')
    return "".join(parts)


def _record_view(data: dict[str, Any], site: Path, run_dir: Path) -> str:
    links = [_link(site, run_dir / "metrics.jsonl", "metrics.jsonl (the metrics log)")]
    if (run_dir / "skipped_batches.jsonl").is_file():  # copied into the site
        links.append('<a href="skipped_batches.jsonl">skipped_batches.jsonl</a> (skipped and '
                     'deferred batches; a replay list: <code>train.skip_batches_file</code>)')
    seq = [_link(site, p) for p in data["data_sequences"]]
    links.append("data sequence: " + (", ".join(seq) if seq else
                 '<span class="missing">not written yet (python -m orchestration.data_sequence '
                 f'{_e(run_dir)} --format jsonl --output {_e(run_dir)}/data_sequence.jsonl)'
                 '</span>'))
    parts = ['<div class="card"><h3>Links</h3><ul>'
             + "".join(f'<li class="link">{x}</li>' for x in links) + "</ul></div>"]
    if not data["records"]:
        parts.append('<p class="empty">no run record (record/) in this run directory</p>')
    for rec in reversed(data["records"]):  # newest first
        files = " · ".join(f'<a href="record/{_e(rec["name"])}/{_e(f)}">{_e(f)}</a>'
                           for f in rec["files"])
        kv = [("created (UTC)", rec["created_utc"]), ("host", rec["hostname"]),
              ("git commit", (rec["commit"] or "") + (" (dirty)" if rec["dirty"] else "")),
              ("branch", rec["branch"]), ("job id", rec["job_id"]),
              ("restart", rec["restart_count"])] + sorted(rec["versions"].items())
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in kv)
        parts.append(f'<div class="card record"><h3>Job start {_e(rec["name"])}</h3>'
                     f'<p>{files}</p><table class="kv">{rows}</table></div>')
    return "".join(parts)


def render(data: dict[str, Any], site: Path, run_dir: Path) -> str:
    payload = json.dumps({k: data[k] for k in ("run", "eval", "prompts", "figures")},
                         separators=(",", ":")).replace("<", "\\u003c")  # no </script>, <!--
    bodies = {"curves": _curves_view(), "eval": _eval_view(), "prompts": _prompts_view(),
              "mix": _mix_view(data["mix"]), "record": _record_view(data, site, run_dir)}
    nav = "".join(f'<a id="tab-{v}" href="#{v}">{_e(t)}</a>' for v, t in VIEWS)
    views = "".join(f'<section class="view" id="view-{v}"><h2>{_e(t)}</h2>{bodies[v]}</section>'
                    for v, t in VIEWS)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{_e(data["run"]["name"])}: run gallery</title>'
        f'<style>{(ASSETS / "gallery.css").read_text()}</style>'
        '<script src="plotly.min.js"></script></head><body>'
        f'<header><h1>{_e(data["run"]["name"])}</h1><div class="sub">{_e(data["run"]["run_dir"])}'
        f' · built {_e(data["run"]["built_utc"])}</div><nav>{nav}</nav></header>'
        f'<main>{views}</main>'
        f'<script type="application/json" id="gallery-data">{payload}</script>'
        f'<script>{(ASSETS / "gallery.js").read_text()}</script></body></html>\n')


def build_site(run_dir: Path, out: Path, prompt_set: Path | None = DEFAULT_PROMPTS,
               sequences: list[Path] | None = None) -> Path:
    """Write the gallery of ``run_dir`` to ``out``; return ``out/index.html``. ``sequences``:
    the data-sequence files to link (default: ``<run_dir>/data_sequence*``)."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a gallery (no {MARKER}): not replacing it")
    data = collect(run_dir, prompt_set, sequences)
    data["run"]["built_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    data["figures"] = {"curves": curve_figures(data["curves"]), "mix": mix_figure(data["mix"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copyfile(plotly_js(), tmp / "plotly.min.js")
        for rec in data["records"]:
            for name in rec["files"]:
                (tmp / "record" / rec["name"]).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(rec["path"]) / name, tmp / "record" / rec["name"] / name)
        if (run_dir / "skipped_batches.jsonl").is_file():
            shutil.copyfile(run_dir / "skipped_batches.jsonl", tmp / "skipped_batches.jsonl")
        # Links are relative to where the site will be, not to the temporary folder.
        (tmp / "index.html").write_text(render(data, out, run_dir))
        (tmp / MARKER).write_text("written by python -m orchestration.gallery\n")
        tmp.chmod(0o755)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"


def _swap(new: Path, out: Path) -> None:
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old.{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
