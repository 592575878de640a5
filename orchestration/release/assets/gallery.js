// The gallery page: tabs by URL hash, plots drawn with plotly.js (shipped beside index.html)
// when their view is first shown, and the A/B comparisons of the evaluation and prompt views.
// All data is the JSON embedded in the page; text from the run (answers, prompts) is only ever
// set with textContent. No network: the page works from file://.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("gallery-data").textContent);
  const VIEWS = ["curves", "eval", "prompts", "mix", "record"];
  const drawn = {};
  const PLOT_CONFIG = { responsive: true, displaylogo: false };

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function fmt(v) { return v === null || v === undefined ? "—" : Number(v).toFixed(4); }

  function fillSelect(select, steps, chosen) {
    select.replaceChildren();
    for (const s of steps) select.appendChild(el("option", { value: String(s) }, "step " + s));
    if (chosen !== undefined) select.value = String(chosen);
  }

  // ------------------------------------------------------------------ tabs
  function show(view) {
    if (!VIEWS.includes(view)) view = VIEWS[0];
    for (const v of VIEWS) {
      document.getElementById("view-" + v).classList.toggle("active", v === view);
      document.getElementById("tab-" + v).classList.toggle("active", v === view);
    }
    if (!drawn[view]) { drawn[view] = true; DRAW[view](); }
    document.body.dataset.view = view;
  }

  function plot(id, fig) {
    const node = document.getElementById(id);
    if (node && fig) Plotly.newPlot(node, fig.data, fig.layout, PLOT_CONFIG);
  }

  // ------------------------------------------------------------------ evaluation
  const EVAL = DATA.eval;

  function evalPoint(entry, step) { return entry.points[String(step)] || null; }

  function evalTable() {
    const a = document.getElementById("eval-a").value, b = document.getElementById("eval-b").value;
    const body = document.getElementById("eval-rows");
    body.replaceChildren();
    document.getElementById("eval-head-a").textContent = "A: step " + a;
    document.getElementById("eval-head-b").textContent = "B: step " + b;
    for (const [task, metrics] of Object.entries(EVAL.tasks)) {
      for (const [metric, entry] of Object.entries(metrics)) {
        const pa = evalPoint(entry, a), pb = evalPoint(entry, b);
        const row = el("tr", { "data-task": task, "data-metric": metric });
        row.appendChild(el("td", {}, task));
        row.appendChild(el("td", {}, metric));
        for (const [p, col] of [[pa, "a"], [pb, "b"]]) {
          const txt = p ? fmt(p[0]) + (p[1] !== null ? " ± " + fmt(p[1]) : "") : "—";
          row.appendChild(el("td", { class: "num", "data-col": col }, txt));
        }
        const delta = el("td", { class: "num", "data-col": "delta" });
        if (pa && pb) {
          const d = pb[0] - pa[0];
          delta.textContent = (d >= 0 ? "+" : "") + d.toFixed(4);
          if (pa[1] !== null && pb[1] !== null) {
            const se = Math.sqrt(pa[1] * pa[1] + pb[1] * pb[1]);
            delta.textContent += " (" + (se > 0 ? (d / se).toFixed(1) : "–") + " σ)";
          }
          if (entry.higher_is_better !== null && d !== 0) {
            delta.classList.add((d > 0) === entry.higher_is_better ? "better" : "worse");
          }
        } else {
          delta.textContent = "—";
        }
        row.appendChild(delta);
        body.appendChild(row);
      }
    }
  }

  function evalMarks() {
    const shapes = [["eval-a", "#2f6fde"], ["eval-b", "#d9622b"]].map(([id, color]) => ({
      type: "line", xref: "x", yref: "paper", y0: 0, y1: 1, line: { color, width: 2 },
      x0: Number(document.getElementById(id).value), x1: Number(document.getElementById(id).value),
    }));
    for (const node of document.querySelectorAll("#eval-charts .plot")) {
      if (node.data) Plotly.relayout(node, { shapes });
    }
  }

  function drawEval() {
    const root = document.getElementById("eval-content");
    if (!EVAL.checkpoints.length) {
      root.appendChild(el("p", { class: "empty" }, "No lm-eval results in this run yet: " +
        "python -m orchestration.evaluate --all-checkpoints RUN_DIR --tasks ..."));
      return;
    }
    const steps = EVAL.checkpoints;
    fillSelect(document.getElementById("eval-a"), steps, steps[0]);
    fillSelect(document.getElementById("eval-b"), steps, steps[steps.length - 1]);
    const charts = document.getElementById("eval-charts");
    let i = 0;
    for (const [task, metrics] of Object.entries(EVAL.tasks)) {
      const card = el("div", { class: "card" });
      const div = el("div", { class: "plot", id: "eval-plot-" + (i++) });
      card.appendChild(div);
      charts.appendChild(card);
      const traces = Object.entries(metrics).map(([metric, entry]) => {
        const xs = Object.keys(entry.points).map(Number).sort((p, q) => p - q);
        const errs = xs.map((x) => entry.points[String(x)][1]);
        return {
          x: xs, y: xs.map((x) => entry.points[String(x)][0]), name: metric,
          mode: "lines+markers", type: "scatter",
          error_y: { type: "data", array: errs.map((e) => (e === null ? 0 : e)),
                     visible: errs.some((e) => e !== null) },
        };
      });
      Plotly.newPlot(div, traces, {
        title: { text: task }, template: "plotly_white", height: 320,
        xaxis: { title: { text: "checkpoint step" } }, yaxis: { title: { text: "score" } },
        margin: { l: 55, r: 20, t: 45, b: 45 }, legend: { orientation: "h", y: -0.25 },
      }, PLOT_CONFIG);
    }
    for (const id of ["eval-a", "eval-b"]) {
      document.getElementById(id).addEventListener("change", () => { evalTable(); evalMarks(); });
    }
    evalTable();
    evalMarks();
  }

  // ------------------------------------------------------------------ prompts
  const PROMPTS = DATA.prompts;

  function answerCell(label, cls, step, id) {
    const cell = el("div", { "data-col": cls });
    cell.appendChild(el("h4", { class: "tag-" + cls }, label + ": step " + step));
    const answers = PROMPTS.answers[String(step)] || {};
    if (id in answers) {
      if (answers[id].trim() === "") {  // a model that answers only newlines or spaces
        cell.appendChild(el("div", { class: "missing" },
          "(whitespace only: " + answers[id].length + " characters)"));
      }
      cell.appendChild(el("pre", {}, answers[id]));
    } else {
      cell.appendChild(el("div", { class: "missing" }, "no answer at this checkpoint"));
    }
    return cell;
  }

  function promptList() {
    const a = document.getElementById("prompt-a").value, b = document.getElementById("prompt-b").value;
    const category = document.getElementById("prompt-category").value;
    const list = document.getElementById("prompt-list");
    list.replaceChildren();
    for (const p of PROMPTS.prompts) {
      if (category !== "" && p.category !== category) continue;
      const card = el("div", { class: "prompt", "data-id": p.id });
      const head = el("div", { class: "head" });
      head.appendChild(el("span", { class: "cat" }, p.category));
      head.appendChild(el("pre", {}, p.prompt));
      card.appendChild(head);
      const answers = el("div", { class: "answers" });
      answers.appendChild(answerCell("A", "a", a, p.id));
      answers.appendChild(answerCell("B", "b", b, p.id));
      card.appendChild(answers);
      list.appendChild(card);
    }
  }

  function drawPrompts() {
    if (!PROMPTS.checkpoints.length) {
      document.getElementById("prompts-content").appendChild(el("p", { class: "empty" },
        "No prompt answers in this run yet: python -m orchestration.prompts RUN_DIR"));
      return;
    }
    const steps = PROMPTS.checkpoints;
    fillSelect(document.getElementById("prompt-a"), steps, steps[0]);
    fillSelect(document.getElementById("prompt-b"), steps, steps[steps.length - 1]);
    const cat = document.getElementById("prompt-category");
    cat.appendChild(el("option", { value: "" }, "all categories"));
    for (const c of PROMPTS.categories) cat.appendChild(el("option", { value: c }, c));
    for (const id of ["prompt-a", "prompt-b", "prompt-category"]) {
      document.getElementById(id).addEventListener("change", promptList);
    }
    promptList();
  }

  // ------------------------------------------------------------------ the rest
  const DRAW = {
    curves() { for (const [name, fig] of Object.entries(DATA.figures.curves)) plot("plot-" + name, fig); },
    eval: drawEval,
    prompts: drawPrompts,
    mix() { plot("plot-mix", DATA.figures.mix); },
    record() {},
  };

  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  show(location.hash.slice(1));
  document.body.dataset.ready = "1";
})();
