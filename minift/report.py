"""The report page of a run: OUT/report.html, one file that any browser opens offline.

    from minift.report import write_report
    write_report("runs/minilm-tweets")                                # -> runs/minilm-tweets/report.html
    write_report("runs/a", others=["runs/b"], path="runs/a-b.html")   # several runs on the same axes

It reads only the run's log.jsonl (every step and evaluation: resume.read_log) and results.json (the job's
report: outputs.finish) and draws its charts as inline SVG written here: no plotting library, no script, nothing
fetched (the page's Content-Security-Policy forbids it). A run without results.json (interrupted, still
running, or train() called on its own) gets a page of what its log holds, marked unfinished.

Read the curves as stage 5 does: both losses falling = still learning; the training loss falling while the
validation loss rises = over-fitting; both flat and high = under-fitting.
"""
import html
import json
import math
import platform
import time
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path

from .data import format_stats
from .errors import MiniftError
from .evals import HEADLINES
from .files import atomic_write
from .resume import read_log

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f"]
# A job's own figures that share a unit go on one chart (a classifier's accuracy and F1; DPO's rewards of both
# answers and their margin, their log-probabilities; GRPO's clip ratios); any other figure gets its own chart.
TOGETHER = [("accuracy", "macro_f1"), ("rewards/chosen", "rewards/rejected", "rewards/margins"),
            ("logps/chosen", "logps/rejected"), ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")]
STEP_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s")  # every job's; the rest is the job's own
NOT_DRAWN = ("loss", "perplexity", "majority_baseline")  # evaluation figures drawn elsewhere (or exp of the loss)


def esc(text):
    """Text as HTML shows it literally: a tweet's `<`, `&` and quotes are characters, not markup."""
    return html.escape(str(text), quote=True)


def num(v):
    """A number as the page prints it: whole numbers with separators, others to 4 significant digits."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "–" if v is None else str(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def duration(seconds):
    if not is_number(seconds):
        return "–"
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def cpu_name():
    """The CPU's model name (what a wall time means depends on it)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def smooth(values, weight=None):
    """Exponential moving average, as TensorBoard draws it: single batches are noisy, the trend is not.
    weight None: averaged over about a tenth of the run, so a short run keeps its shape and a long one loses its noise."""
    if weight is None:
        weight = 1 - 1 / max(1, len(values) / 10)
    out, avg = [], values[0] if values else 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        out.append(avg)
    return out


# ---------------------------------------------------------------------------------------------------------
# A run, as its two files tell it

@dataclass
class Run:
    folder: Path
    steps: list  # log.jsonl's step records, in step order
    evals: list  # its evaluation records
    results: dict | None  # results.json; None until the job has finished
    notes: list = field(default_factory=list)  # what could not be read, said on the page
    label: str = ""
    color: str = PALETTE[0]

    @property
    def metric(self):
        """The validation figure that chose best/ (the run's settings say; an unfinished run: the loss)."""
        if self.results:
            return self.results.get("config", {}).get("metric", "loss")
        names = [k for e in self.evals for k in e["eval"]]
        return "loss" if "loss" in names else next(iter(names), None)

    @property
    def best_step(self):
        if self.results:
            return self.results.get("best_step")
        values = [(e["step"], e["eval"][self.metric]) for e in self.evals if is_number(e["eval"].get(self.metric))]
        lower = self.metric == "loss"
        return (min if lower else max)(values, key=lambda sv: sv[1])[0] if values else None

    def best_label(self):
        return f"best/ (step {self.best_step})" if self.results else f"best validation {self.metric} (step {self.best_step})"


def read_run(folder):
    """A run folder's log.jsonl and results.json; what is missing or damaged becomes a note on the page."""
    folder = Path(folder)
    log, results_file = folder / "log.jsonl", folder / "results.json"
    if not log.is_file() and not results_file.is_file():
        raise MiniftError(f"{folder} holds no run (no log.jsonl or results.json): give the --out folder of a run")
    run = Run(folder, [], [], None)
    try:
        run.steps, run.evals = read_log(log)
    except MiniftError as e:
        run.notes.append(str(e))
    if results_file.is_file():
        try:
            run.results = json.loads(results_file.read_text())
        except (OSError, ValueError) as e:
            run.notes.append(f"{results_file} could not be read ({e})")
    if run.results and run.steps and run.steps[-1]["step"] > run.results.get("steps", 0):
        run.notes.append(f"results.json is from an earlier end of this run (step {run.results.get('steps')}); the log "
                         f"goes on to step {run.steps[-1]['step']}, so the page treats the run as unfinished")
        run.results = None
    return run


def name_runs(runs):
    """Each run's label (its folder's name; in a comparison with the settings that differ between runs) and colour."""
    names = [r.folder.name for r in runs]
    if len(set(names)) < len(names):
        names = [str(r.folder) for r in runs]
    configs = [r.results.get("config", {}) if r.results else {} for r in runs]
    seen = [c for c in configs if c]
    differ = [k for k in dict.fromkeys(k for c in seen for k in c)
              if len({json.dumps(c.get(k), default=str) for c in seen}) > 1]
    for run, name, config, color in zip(runs, names, configs, cycle(PALETTE)):
        settings = ", ".join(f"{k}={num(config[k])}" for k in differ if k in config)
        run.label, run.color = name + (f" ({settings})" if settings and len(runs) > 1 else ""), color


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def step_points(run, name):
    """(step, value) of a training figure at every logged step where it is a finite number."""
    return [(r["step"], r[name]) for r in run.steps if is_number(r.get(name))]


def eval_points(run, name):
    return [(e["step"], e["eval"][name]) for e in run.evals if is_number(e["eval"].get(name))]


# ---------------------------------------------------------------------------------------------------------
# Charts: SVG written by hand

W, H = 560, 260  # a chart's size in SVG units; the page scales it to its column
BOX = (62, 30, 482, 190)  # the plotting area: left, top, width, height


@dataclass
class Series:
    name: str
    points: list  # [(x, y)]
    color: str
    style: str = "line"  # line | faint (each step, under its average) | dots (evaluations)
    best: tuple | None = None  # a point to ring: the evaluation that chose best/


def ticks(lo, hi, count=5):
    """About `count` round numbers (1, 2 or 5 times a power of ten apart) from at or below lo to at or above hi:
    the axis runs from the first to the last, so every point lies inside and both ends are labelled."""
    if hi == lo:  # one value: room around it
        lo, hi = lo - (abs(lo) * 0.1 or 1.0), hi + (abs(hi) * 0.1 or 1.0)
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [i * step for i in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def line_chart(title, series, marks=(), hlines=(), legend=True, zero=False):
    """A <figure>: `series` on shared axes, x the optimizer step; `marks`: vertical lines [(x, text)];
    `hlines`: horizontal reference lines [(y, text)]; zero: the y axis starts at 0 (an lr, a norm). Coordinates are
    written to 0.1 of a unit."""
    series = [s for s in series if s.points]
    if not series:
        return ""
    xs = [x for s in series for x, _ in s.points] + [x for x, _ in marks]
    ys = [y for s in series for _, y in s.points] + [y for y, _ in hlines] + ([0.0] if zero else [])
    xt, yt = ticks(0, max(xs)), ticks(min(ys), max(ys))
    left, top, width, height = BOX

    def px(x):
        return left + (x - xt[0]) / (xt[-1] - xt[0]) * width

    def py(y):
        return top + (yt[-1] - y) / (yt[-1] - yt[0]) * height

    svg = [f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{esc(title)}">',
           f'<text class="title" x="{left}" y="16">{esc(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{width}" height="{height}" class="frame"/>']
    for t in yt:
        svg.append(f'<line class="grid" x1="{left}" x2="{left + width}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>'
                   f'<text class="ytick" x="{left - 6}" y="{py(t):.1f}">{t:g}</text>')
    for t in xt:
        svg.append(f'<text class="xtick" x="{px(t):.1f}" y="{top + height + 16}">{t:g}</text>')
    svg.append(f'<text class="xlabel" x="{left + width / 2}" y="{H - 4}">optimizer step</text>')
    for y, text in hlines:
        svg.append(f'<line class="ref" x1="{left}" x2="{left + width}" y1="{py(y):.1f}" y2="{py(y):.1f}"/>'
                   f'<text class="reftext" x="{left + width - 4}" y="{py(y) - 4:.1f}">{esc(text)}</text>')
    for x, text in marks:
        anchor = "end" if px(x) > left + width * 0.7 else "start"
        shift = -4 if anchor == "end" else 4
        svg.append(f'<line class="mark" x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{top}" y2="{top + height}"/>'
                   f'<text class="marktext" text-anchor="{anchor}" x="{px(x) + shift:.1f}" y="{top + 12}">{esc(text)}</text>')
    for s in series:
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in s.points)
        svg.append(f'<polyline class="{s.style}" data-series="{esc(s.name)}" stroke="{s.color}" points="{points}"/>')
        if s.style == "dots":
            svg += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.6" fill="{s.color}"/>' for x, y in s.points]
        if s.best:
            svg.append(f'<circle class="best" cx="{px(s.best[0]):.1f}" cy="{py(s.best[1]):.1f}" r="6" stroke="{s.color}"/>')
    svg.append("</svg>")
    keys = "".join(f'<span class="key"><i class="{s.style}" style="border-color:{s.color}"></i>{esc(s.name)}</span>'
                   for s in series if legend)
    return f'<figure>{"".join(svg)}<figcaption>{keys}</figcaption></figure>'


def figure_series(run, name, colors, raw, alone):
    """A figure of one run as series: its training values (raw: each step, faint, under their average; smoothed)
    and its validation values at each evaluation. `alone`: the only run on the chart, so names need no label."""
    who = "" if alone else f"{run.label}: "
    train, val = step_points(run, name), eval_points(run, name)
    out = []
    if train:
        if raw:
            out.append(Series(f"{who}training {name} (each step)", train, colors[0], "faint"))
        out.append(Series(f"{who}training {name} (smoothed)", list(zip([x for x, _ in train],
                                                                        smooth([y for _, y in train]))), colors[0]))
    if val:
        best = next(((x, y) for x, y in val if x == run.best_step), None) if name == run.metric else None
        out.append(Series(f"{who}validation {name}", val, colors[1], "dots", best))
    return out


def chart_of(runs, names, title):
    """One chart of the figures `names` for every run: one run in detail (each step, smoothed, validation, the
    best step marked), several runs one colour each (smoothed, validation)."""
    alone = len(runs) == 1
    series = []
    for i, name in enumerate(names):
        for run in runs:
            if not alone:
                colors = (run.color, run.color)  # one colour per run
            elif len(names) == 1:
                colors = PALETTE[:2]  # training and validation apart
            else:
                colors = (PALETTE[i % len(PALETTE)],) * 2  # one colour per figure: solid training, dotted validation
            series += figure_series(run, name, colors, raw=alone, alone=alone)
    marks = [(runs[0].best_step, runs[0].best_label())] if alone and runs[0].best_step else []
    baseline = [e["eval"]["majority_baseline"] for e in runs[0].evals if is_number(e["eval"].get("majority_baseline"))]
    hlines = [(baseline[-1], f"majority baseline {baseline[-1]:.3f}")] if "accuracy" in names and baseline else []
    return line_chart(title, series, marks, hlines, legend=alone)


def own_figures(runs):
    """The figures a job logs or evaluates besides loss, lr and grad norm (accuracy, DPO's rewards, GRPO's reward
    ...), in groups that share a chart (TOGETHER); several runs: one chart per figure."""
    names = [k for run in runs for e in run.evals for k in e["eval"] if k not in NOT_DRAWN and not k.startswith("num_")]
    names += [k for run in runs for r in run.steps for k in r if k not in STEP_FIELDS]
    names = [n for n in dict.fromkeys(names) if any(step_points(r, n) or eval_points(r, n) for r in runs)]
    if len(runs) > 1:
        return [[n] for n in names]
    groups = []
    for name in names:
        if not any(name in g for g in groups):
            groups.append([n for n in next((g for g in TOGETHER if name in g), (name,)) if n in names])
    return groups


def lr_and_grad_norm(runs):
    alone, run = len(runs) == 1, runs[0]
    lr = [Series(r.label if not alone else "learning rate", step_points(r, "lr"), r.color) for r in runs]
    clip = (run.results or {}).get("config", {}).get("max_grad_norm")
    grad = (figure_series(run, "grad_norm", (PALETTE[4], PALETTE[4]), raw=True, alone=True) if alone else
            [Series(r.label, list(zip([x for x, _ in step_points(r, "grad_norm")],
                                      smooth([y for _, y in step_points(r, "grad_norm")]))), r.color) for r in runs])
    hlines = [(clip, f"clipped above {clip:g}")] if alone and is_number(clip) and clip > 0 else []
    return [line_chart("learning rate (the schedule)", lr, legend=alone, zero=True),
            line_chart("gradient norm, before clipping", grad, hlines=hlines, legend=alone, zero=True)]


# ---------------------------------------------------------------------------------------------------------
# What the curves say

def reading(run):
    """(verdict, why): the curves read as stage 5 reads them. Still learning (the validation loss at its lowest at
    the last evaluation), over-fitting (past its lowest while the training loss still falls), under-fitting (the
    training loss hardly moves). Judged on the loss, which moves smoothly where accuracy jumps; GRPO, whose loss
    sits near 0 by construction (grpo.py), on its reward."""
    signal = "loss" if eval_points(run, "loss") else run.metric
    figure = signal if signal and step_points(run, signal) else "loss"  # the same figure on the training side
    steps = step_points(run, figure)
    if not steps:
        return "No steps yet", "no training step is logged."
    k = max(1, len(steps) // 10)
    start, trend = sum(y for _, y in steps[:k]) / k, smooth([y for _, y in steps])
    train = f"training {figure} {start:.3g} in the first tenth of the run, {trend[-1]:.3g} at the end (smoothed)"
    kept = f" best/ holds step {run.best_step} (the best validation {run.metric})." if run.best_step else ""
    if figure == "loss" and start > 0.1 and abs(trend[-1] - start) < 0.05 * start:
        return "Under-fitting", f"{train}: it hardly moved. A higher lr or more steps." + kept
    vals = eval_points(run, signal) if signal else []
    if len(vals) < 2:
        return "No trend yet", f"{train}; {len(vals)} validation evaluation(s): evaluate more often (eval_every)." + kept
    lower = signal == "loss"
    best, last = (min if lower else max)(vals, key=lambda v: v[1]), vals[-1]
    if best == last:
        return "Still learning", (f"validation {signal} {vals[0][1]:.4g} -> {last[1]:.4g}, at its best at the last "
                                  f"evaluation; {train}. More steps may help." + kept)
    worse = last[1] - best[1] if lower else best[1] - last[1]
    if worse <= 0.01 * abs(best[1]):
        return "Levelled off", (f"validation {signal} within 1% of its best (step {best[0]}, {best[1]:.4g}) since; "
                                f"{train}. More steps buy little." + kept)
    at_best = next((t for (x, _), t in zip(steps, trend) if x >= best[0]), trend[-1])
    falls = figure == "loss"  # a loss falls as the model fits its training rows; a reward rises
    if (trend[-1] < at_best) if falls else (trend[-1] > at_best):
        return "Over-fitting", (f"validation {signal} was best at step {best[0]} ({best[1]:.4g}) and is {last[1]:.4g} at "
                                f"step {last[0]}, while the training {figure} kept {'falling' if falls else 'rising'} "
                                f"({at_best:.3g} -> {trend[-1]:.3g}): from there on the model learns its training rows "
                                "by heart." + kept)
    return "Past its best", f"validation {signal} was best at step {best[0]} ({best[1]:.4g}), {last[1]:.4g} at step " \
                            f"{last[0]}; {train}." + kept


# ---------------------------------------------------------------------------------------------------------
# The page's sections (each "" when the run has nothing for it)

def table(head, rows):
    cells = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{esc(num(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def best_figures(run):
    """The validation figures of the model best/ holds: results.json's, or (unfinished) the log's at the best step."""
    if run.results:
        return run.results.get("validation")
    return next((e["eval"] for e in run.evals if e["step"] == run.best_step), None)


def headline(metrics):
    """A split's scalar figures on one line (a classifier's per-class table and confusion come on their own)."""
    return ", ".join(f"{k} {num(v)}" for k, v in (metrics or {}).items() if is_number(v)) or "–"


def status(run):
    steps = f"{len(run.steps)} steps logged (to step {run.steps[-1]['step']})" if run.steps else "no step logged yet"
    notes = "".join(f"<br>Note: {esc(n)}" for n in run.notes)
    if run.results is None:
        return (f'<p class="status unfinished"><b>Unfinished</b>: no results.json yet (interrupted, still running, or '
                f'train() called on its own); {steps} and {len(run.evals)} evaluations. <code>minift report '
                f'{esc(run.folder)}</code> redraws this page.{notes}</p>')
    r = run.results
    wall = duration(r.get("wall_seconds"))
    early = ", stopped early (patience)" if r.get("stopped_early") else ""
    return (f'<p class="status"><b>Finished</b>: {num(r.get("steps"))} steps in {wall}{early}; {esc(run.best_label())} '
            f'holds the model chosen on validation {esc(run.metric)}.{notes}</p>')


def summary_section(run):
    r = run.results or {}
    speed = [s["tokens_per_s"] for s in run.steps if is_number(s.get("tokens_per_s"))]
    rows = [("model", r.get("model")), ("validation, at the best step", headline(best_figures(run))),
            ("test (the one look)", headline(r.get("test")) if "test" in r else "not looked at"),
            ("weights moved", f"{r['weights_moved']:.4f} (relative L2 distance from the pretrained ones)"
             if is_number(r.get("weights_moved")) else None),
            ("wall time", duration(r["wall_seconds"]) if "wall_seconds" in r else None),
            ("CPU", r.get("cpu")), ("precision", r.get("precision")),
            ("training tokens per second", num(speed[-1]) if speed else None)]
    items = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows if v is not None)
    verdict, why = reading(run)
    return f'{status(run)}<p class="reading"><b>{esc(verdict)}</b>: {esc(why)}</p><table class="facts">{items}</table>'


def curves_section(runs, title):
    guide = ("Both losses falling: still learning. Training loss falling while the validation loss rises: "
             "over-fitting (best/ keeps the model from before the rise). Both flat and high: under-fitting (a higher "
             "lr, more steps).")
    if len(runs) > 1:
        guide += " One colour per run: solid lines are training (smoothed), dots validation; a ring marks each run's best."
    charts = [chart_of(runs, ["loss"], "loss")]
    charts += [chart_of(runs, g, ", ".join(g)) for g in own_figures(runs)]
    charts += lr_and_grad_norm(runs)
    return f'<h2>{esc(title)}</h2><p class="guide">{esc(guide)}</p><div class="charts">{"".join(charts)}</div>'


def confusion_table(metrics):
    """The confusion matrix as a heat map: rows the true label, columns the prediction, each cell shaded by its
    share of the row (a rare class shows as plainly as a common one)."""
    names, counts = list(metrics["per_class"]), metrics["confusion"]
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    rows = []
    for name, row in zip(names, counts):
        total = max(sum(row), 1)
        cells = "".join(f'<td style="background:rgba(31,119,180,{c / total:.2f});color:{"#fff" if c / total > 0.55 else "#222"}">'
                        f"{c:,}<small> {c / total:.0%}</small></td>" for c in row)
        rows.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
    return (f'<table class="confusion"><thead><tr><th>true \\ predicted</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def classifier_section(run):
    r = run.results or {}
    parts = []
    for split, title in (("validation", f"validation, {run.best_label()}"), ("test", "test, the one look")):
        m = r.get(split) or {}
        if "confusion" not in m:
            continue
        per_class = table(["class", "precision", "recall", "F1", "support"],
                          [(n, c["precision"], c["recall"], c["f1"], c["support"]) for n, c in m["per_class"].items()])
        parts.append(f'<div class="split"><h3>{esc(title)}</h3><p>accuracy {num(m["accuracy"])}, macro-F1 '
                     f'{num(m["macro_f1"])} on {num(m["num_examples"])} examples (majority baseline '
                     f'{num(m["majority_baseline"])}: always {esc(m["majority_label"])})</p>'
                     f'{confusion_table(m)}{per_class}</div>')
    return f'<h2>Confusion matrix and per-class figures</h2><div class="splits">{"".join(parts)}</div>' if parts else ""


def answer(text):
    return esc(text) if text.strip() else '<span class="none">(an empty answer)</span>'


def samples_section(run):
    r = run.results or {}
    before, after = r.get("samples_before") or [], r.get("samples_after") or []
    if not before and not after:
        return ""
    n = max(len(before), len(after))
    pairs = zip(before + [""] * (n - len(before)), after + [""] * (n - len(after)))
    rows = "".join(f"<tr><td>{i}</td><td>{answer(b)}</td><td>{answer(a)}</td></tr>" for i, (b, a) in enumerate(pairs, 1))
    return ("<h2>Sample answers, before and after</h2><p>Greedy answers to the first validation prompts, by the model "
            "as it came and by best/.</p><table class=\"samples\"><thead><tr><th>#</th><th>before fine-tuning</th>"
            f"<th>after fine-tuning</th></tr></thead><tbody>{rows}</tbody></table>")


def before_after_section(run):
    """The job's figures measured before training and after (exact match, GRPO's reward, the evaluation suites)."""
    r, rows = run.results or {}, []
    for key, value in r.items():
        if key.endswith("_before") and is_number(value):
            name = key[:-len("_before")]
            rows.append((name, value, r.get(name + "_after", (r.get("validation") or {}).get(name))))  # GRPO: validation's
    before, after = r.get("suites_before") or {}, r.get("suites_after") or {}
    for suite, res in after.items():  # each suite's headline numbers (evals.py)
        rows += [(f"{suite}: {k}", (before.get(suite) or {}).get(k), res.get(k)) for k, _ in HEADLINES.get(res.get("kind"), [])]
    return "<h2>Before and after fine-tuning</h2>" + table(["figure", "before", "after"], rows) if rows else ""


def data_section(run):
    r = run.results or {}
    data = r.get("data") or {}
    counts = [(f"{split} rows", n) for split, n in (data.get("rows") or {}).items()]
    if not counts:  # the job counted its rows (pairs, prompts) and its splits' targets (tokens, examples) itself
        counts = [(k.replace("_", " "), r[k]) for k in ("train_rows", "train_pairs", "train_prompts") if k in r]
        counts += [(f"{split} {k[len('num_'):].replace('targets', 'target tokens')}", v) for split in ("validation", "test")
                   for k, v in (r.get(split) or {}).items() if k.startswith("num_")]
    if not counts and not data:
        return ""
    stats = f"<h3>training rows</h3><pre>{esc(format_stats(data['train']))}</pre>" if "train" in data else ""
    return "<h2>Data</h2>" + table(["what", "count"], counts) + stats


def settings_section(run):
    config = (run.results or {}).get("config")
    if not config:
        return ""
    items = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(num(v))}</dd></div>" for k, v in config.items())
    return f'<h2>Settings</h2><dl class="settings">{items}</dl>'


def runs_section(runs):
    rows = []
    for run in runs:
        r = run.results or {}
        wall = duration(r.get("wall_seconds"))
        rows.append(f'<tr><td><i class="swatch" style="background:{run.color}"></i>{esc(run.label)}</td>'
                    f'<td>{"finished" if run.results else "unfinished"}</td><td>{num(len(run.steps))}</td>'
                    f'<td>{num(run.best_step)}</td><td>{esc(headline(best_figures(run)))}</td><td>{wall}</td>'
                    f'<td><b>{esc(reading(run)[0])}</b></td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("run", "", "steps", "best step", "validation at the best step",
                                              "wall time", "reading"))
    return f'<h2>The runs</h2><table class="runs"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


# ---------------------------------------------------------------------------------------------------------
# The page

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;max-width:1180px;margin:1.2em auto;
 padding:0 1em}
h1{font-size:1.45em;margin:.2em 0}h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em;padding-bottom:.15em}
h3{font-size:1em;margin:.6em 0 .3em}
.status{padding:.5em .8em;border-left:5px solid #2ca02c;background:#f2f8f2}
.status.unfinished{border-color:#d62728;background:#fbf0f0}
.reading{font-size:1.05em;padding:.4em .8em;border-left:5px solid #1f77b4;background:#f1f5fa}
.guide,figcaption,footer{color:#555;font-size:.88em}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:1.2em .8em}
figure{margin:0}svg.chart{width:100%;height:auto}
svg text{font-size:11px;fill:#333}svg .title{font-size:13px;font-weight:600}
svg .ytick{text-anchor:end;dominant-baseline:middle}svg .xtick,svg .xlabel{text-anchor:middle}
svg .frame{fill:none;stroke:#999}svg .grid{stroke:#e6e6e6}
svg polyline{fill:none;stroke-width:2;stroke-linejoin:round}svg polyline.faint{stroke-width:1;opacity:.3}
svg polyline.dots{stroke-width:1.3;stroke-dasharray:4 3}svg circle.best{fill:none;stroke-width:2}
svg .ref{stroke:#777;stroke-dasharray:6 4}svg .reftext{text-anchor:end;fill:#555}
svg .mark{stroke:#555;stroke-dasharray:2 3}svg .marktext{fill:#555}
.key{display:inline-block;margin-right:1.1em;white-space:nowrap}
.key i{display:inline-block;width:22px;margin-right:.35em;vertical-align:middle;border-top:2px solid}
.key i.faint{opacity:.35}.key i.dots{border-top-style:dashed}
.swatch{display:inline-block;width:.9em;height:.9em;margin-right:.4em;vertical-align:-.1em}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:.4em 0}
td,th{padding:.2em .6em;border-bottom:1px solid #e3e3e3;text-align:right;vertical-align:top}
td:first-child,th:first-child,.facts td,.facts th,.samples td,.runs td{text-align:left}
.confusion td{min-width:4.5em;text-align:center}.confusion small{opacity:.8}
.splits{display:flex;flex-wrap:wrap;gap:2.5em}.split{max-width:540px}
.settings{display:grid;grid-template-columns:repeat(auto-fill,minmax(17em,1fr));gap:0 1.5em}
.settings div{display:flex;justify-content:space-between;border-bottom:1px solid #e3e3e3}.settings dd{margin:0 0 0 1em}
pre{background:#f6f6f6;padding:.5em .8em;overflow-x:auto}.none{color:#888;font-style:italic}
@media print{body{max-width:none;margin:0;font-size:10pt}.charts{display:block}
 figure{max-width:16cm;margin:0 auto 1em}figure,table,.split{break-inside:avoid}
 *{-webkit-print-color-adjust:exact;print-color-adjust:exact}}
"""


def page(runs):
    main = runs[0]
    title = f"minift run: {main.label}" if len(runs) == 1 else f"minift: {len(runs)} runs compared"
    body = [f"<h1>{esc(title)}</h1>"]
    if len(runs) > 1:
        body += [runs_section(runs), curves_section(runs, "Learning curves of every run"),
                 f"<h2>{esc(main.label)}, in detail</h2>"]
    body += [summary_section(main), curves_section([main], "Learning curves"), classifier_section(main),
             samples_section(main), before_after_section(main), data_section(main), settings_section(main)]
    sources = ", ".join(str(r.folder / "log.jsonl") for r in runs)
    body.append(f"<footer>Drawn by minift.report from {esc(sources)} and results.json, "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}.</footer>")
    # the policy forbids the page every request: a text in it (a URL in a tweet) stays text
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'">'
            f'<meta name="viewport" content="width=device-width"><title>{esc(title)}</title><style>{STYLE}</style>'
            f'</head><body>{"".join(body)}</body></html>\n')


def write_report(out_dir, others=(), path=None):
    """Write the report page of the run in `out_dir` (with `others`: their curves on the same axes, and a table
    of them all) as `path` (default OUT/report.html), atomically; return its path."""
    runs = [read_run(folder) for folder in [out_dir, *others]]
    name_runs(runs)
    path = Path(path) if path else Path(out_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = page(runs)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path
