"""The report page (minift/report.py): its curves are the log's numbers, read back from the SVG through the axis
labels as a reader reads them; an interrupted run's page shows the steps it did; nothing on the page asks the
network; every text is escaped; several runs share the axes; and headless Chromium renders a real run's page.

The runs are test_train's tiny random-init models on synthetic rows (about 0.1 s each) and test_faults' tiny
BERT job through `minift finetune` (a few seconds, once for the module)."""
import contextlib
import html
import importlib
import io
import json
import math
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from minift import cli
from minift.batching import TrainData
from minift.config import TrainConfig
from minift.report import write_report
from minift.resume import read_log
from minift.sweep import run_sweep
from minift.train import train
import test_train as T
from test_faults import cli_error, quick, tiny  # noqa: F401  (tiny: a fixture)
from test_train import _one_thread  # noqa: F401  (autouse: one torch thread, as test_train runs)

STEP = importlib.import_module("minift.step")


def ema(values):
    """The smoothed curve, written out again: an exponential moving average over about a tenth of the run."""
    weight, out, avg = 1 - 1 / max(1, len(values) / 10), [], values[0]
    for v in values:
        avg = weight * avg + (1 - weight) * v
        out.append(avg)
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading the charts back

class Chart:
    """One SVG chart of the page, read as a person reads it: each drawn point mapped to data units through the
    tick labels of its axes (the first and the last tick of each)."""

    def __init__(self, svg):
        self.title = html.unescape(re.search(r'<text class="title"[^>]*>(.*?)</text>', svg).group(1))
        ys = [(float(p), float(v)) for p, v in re.findall(r'<text class="ytick" x="[^"]*" y="([^"]*)">([^<]*)<', svg)]
        xs = [(float(p), float(v)) for p, v in re.findall(r'<text class="xtick" x="([^"]*)" y="[^"]*">([^<]*)<', svg)]
        (self.fy, self.tol_y), (self.fx, self.tol_x) = self.axis(ys), self.axis(xs)
        self.series = {}
        for name, points in re.findall(r'<polyline class="[^"]*" data-series="([^"]*)" stroke="[^"]*" points="([^"]*)"', svg):
            pairs = [p.split(",") for p in points.split()]
            self.series[html.unescape(name)] = [(self.fx(float(a)), self.fy(float(b))) for a, b in pairs]

    @staticmethod
    def axis(ticks):
        """value(pixel) from the two end ticks, and how far a value can be off: every coordinate is written to 0.1
        of a unit, so a point and the two ticks are each within 0.05 of where they belong."""
        (p0, v0), (p1, v1) = ticks[0], ticks[-1]
        scale = (v1 - v0) / (p1 - p0)
        return (lambda p: v0 + (p - p0) * scale), 0.16 * abs(scale)

    def assert_draws(self, name, points):
        drawn = self.series[name]
        assert len(drawn) == len(points), (name, len(drawn), len(points))
        for (x, y), (step, value) in zip(drawn, points):
            assert abs(x - step) <= self.tol_x and abs(y - value) <= self.tol_y, (name, step, value, x, y)


def charts(page):
    """{title: [Chart, ...]} in page order (a comparison page draws each title twice: every run, then the first)."""
    out = {}
    for svg in re.findall(r'<svg class="chart".*?</svg>', page, re.S):
        chart = Chart(svg)
        out.setdefault(chart.title, []).append(chart)
    return out


def short_run(out, lr=1e-2, epochs=3, n=48, **kw):
    """train() on test_train's synthetic classification rows, with validation; returns the log's records."""
    T.run(T.config(epochs=epochs, eval_every=3, lr=lr, **kw), out, n=n, val=T.cls_examples(12, seed=1))
    return read_log(out / "log.jsonl")


# ---------------------------------------------------------------------------------------------------------
# The page's numbers are the log's

def test_the_curves_are_the_logs_numbers(tmp_path):
    steps, evals = short_run(tmp_path)
    assert len(steps) == 36 and len(evals) == 12
    page = write_report(tmp_path).read_text()
    (loss,) = charts(page)["loss"]
    loss.assert_draws("training loss (each step)", [(r["step"], r["loss"]) for r in steps])
    loss.assert_draws("training loss (smoothed)", list(zip([r["step"] for r in steps], ema([r["loss"] for r in steps]))))
    loss.assert_draws("validation loss", [(e["step"], e["eval"]["loss"]) for e in evals])
    (accuracy,) = charts(page)["accuracy, macro_f1"]
    accuracy.assert_draws("validation accuracy", [(e["step"], e["eval"]["accuracy"]) for e in evals])
    accuracy.assert_draws("validation macro_f1", [(e["step"], e["eval"]["macro_f1"]) for e in evals])
    (lr,) = charts(page)["learning rate (the schedule)"]
    lr.assert_draws("learning rate", [(r["step"], r["lr"]) for r in steps])
    (grad,) = charts(page)["gradient norm, before clipping"]
    grad.assert_draws("training grad_norm (each step)", [(r["step"], r["grad_norm"]) for r in steps])
    # without results.json the best step is the lowest validation loss, marked on the loss and accuracy charts
    best = min(evals, key=lambda e: e["eval"]["loss"])["step"]
    assert page.count(f"best validation loss (step {best})") == 2 and "Unfinished" in page


def test_an_interrupted_run_shows_the_steps_it_did(tmp_path, monkeypatch, capsys):
    real_clip, calls = STEP.clip_grad_norm, {"n": 0}

    def clip(*args):  # a Ctrl-C inside the 5th step, before its update: 4 steps done
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_clip(*args)

    monkeypatch.setattr(STEP, "clip_grad_norm", clip)
    with pytest.raises(KeyboardInterrupt):
        short_run(tmp_path)
    assert f"report page of the steps so far: {tmp_path / 'report.html'}" in capsys.readouterr().out
    steps, evals = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [e["step"] for e in evals] == [3]
    for page in [(tmp_path / "report.html").read_text()]:
        assert "Unfinished" in page and "4 steps logged (to step 4) and 1 evaluations" in page
        charts(page)["loss"][0].assert_draws("training loss (each step)", [(r["step"], r["loss"]) for r in steps])
    with open(tmp_path / "log.jsonl", "a") as f:  # then killed while writing a line: the page keeps what was whole
        f.write('{"step": 5, "epoch": 0, "lo')
    page = write_report(tmp_path).read_text()
    charts(page)["loss"][0].assert_draws("training loss (each step)", [(r["step"], r["loss"]) for r in steps])


def test_a_run_stopped_early_writes_its_page(tmp_path, capsys):
    # test_train's early stop: lr 1e-30 cannot improve accuracy, patience 1 stops at the second evaluation
    result = train(T.make_model(), TrainData(T.cls_examples(24), T.cls_examples(8, seed=1), T.PAD),
                   T.config(lr=1e-30, eval_every=1, patience=1), tmp_path)
    assert result["stopped_early"] and f"report page: {tmp_path / 'report.html'}" in capsys.readouterr().out
    steps, _ = read_log(tmp_path / "log.jsonl")
    (loss,) = charts((tmp_path / "report.html").read_text())["loss"]
    loss.assert_draws("training loss (each step)", [(r["step"], r["loss"]) for r in steps])
    assert len(steps) == 2


def test_several_runs_share_the_axes(tmp_path):
    logs = {name: short_run(tmp_path / name, lr=lr) for name, lr in (("fast", 1e-2), ("slow", 1e-3))}
    own = (tmp_path / "fast" / "report.html").read_text()  # train() drew each run's own page as it ended
    page = write_report(tmp_path / "fast", [tmp_path / "slow"], path=tmp_path / "both.html").read_text()
    together, detail = charts(page)["loss"]  # every run on one chart, then the first run alone
    for name, (steps, evals) in logs.items():
        together.assert_draws(f"{name}: training loss (smoothed)", list(zip([r["step"] for r in steps],
                                                                             ema([r["loss"] for r in steps]))))
        together.assert_draws(f"{name}: validation loss", [(e["step"], e["eval"]["loss"]) for e in evals])
    assert len(together.series) == 4 and "training loss (each step)" in detail.series
    assert "2 runs compared" in page and page.index("fast") < page.index("slow")
    assert (tmp_path / "fast" / "report.html").read_text() == own  # --out elsewhere: the run's own page untouched


# ---------------------------------------------------------------------------------------------------------
# What the page says, from the numbers

def write_log(path, train_loss, val_loss, **own):
    """A log.jsonl as train() writes it: 40 steps, an evaluation every 10; `own`: a job's figures, (train, val)."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "log.jsonl", "w") as f:
        for step in range(1, 41):
            extra = {k: fs[0](step) for k, fs in own.items() if fs[0]}
            f.write(json.dumps({"step": step, "epoch": 0, "loss": train_loss(step), "lr": 1e-4, "grad_norm": 1.0,
                                **extra}) + "\n")
            if step % 10 == 0:
                val = {"loss": val_loss(step), **{k: fs[1](step) for k, fs in own.items() if fs[1]}}
                f.write(json.dumps({"step": step, "eval": val, "seconds": step, "eval_seconds": 0.1}) + "\n")
    return path


@pytest.mark.parametrize("train_loss, val_loss, verdict", [
    (lambda s: 1.1 * math.exp(-s / 15), lambda s: 0.9 + 0.001 * (s - 20) ** 2, "Over-fitting"),
    (lambda s: 1.1 * math.exp(-s / 15), lambda s: 1.0 - s / 100, "Still learning"),
    (lambda s: 1.10 - s / 10000, lambda s: 1.09 - s / 10000, "Under-fitting"),
])
def test_the_page_says_how_the_run_went(tmp_path, train_loss, val_loss, verdict):
    page = write_report(write_log(tmp_path, train_loss, val_loss)).read_text()
    assert f'<p class="reading"><b>{verdict}</b>' in page
    if verdict == "Over-fitting":  # the lowest validation loss (step 20), and the step it was measured at the end
        assert "validation loss was best at step 20 (0.9) and is 1.3 at step 40" in page


def test_a_jobs_own_figures_get_their_charts(tmp_path):
    # DPO's per-step rewards and their validation values share a chart; GRPO's reward gets its own
    own = {"rewards/chosen": (lambda s: 0.01 * s, lambda s: 0.008 * s), "rewards/rejected": (lambda s: -0.02 * s, None),
           "rewards/margins": (lambda s: 0.03 * s, lambda s: 0.02 * s), "reward": (lambda s: s / 40, lambda s: s / 50)}
    page = write_report(write_log(tmp_path, lambda s: 0.69 - s / 100, lambda s: 0.69 - s / 120, **own)).read_text()
    found = charts(page)
    (rewards,), (reward,) = found["rewards/chosen, rewards/rejected, rewards/margins"], found["reward"]
    steps, evals = range(1, 41), range(10, 41, 10)
    rewards.assert_draws("training rewards/chosen (each step)", [(s, 0.01 * s) for s in steps])
    rewards.assert_draws("validation rewards/chosen", [(s, 0.008 * s) for s in evals])
    rewards.assert_draws("training rewards/margins (smoothed)", list(zip(steps, ema([0.03 * s for s in steps]))))
    assert "validation rewards/rejected" not in rewards.series
    reward.assert_draws("validation reward", [(s, s / 50) for s in evals])


# ---------------------------------------------------------------------------------------------------------
# A real job's page: named as the run's last line, nothing fetched, and drawn by a browser

@pytest.fixture(scope="module")
def job(tiny, tmp_path_factory):  # noqa: F811
    """`minift finetune` on test_faults' tiny BERT and 90 rows: 18 steps, an evaluation every 3; (OUT, printout)."""
    out = tmp_path_factory.mktemp("job") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        cli.main(quick(tiny, out, "--epochs", "2", "--max-steps", "18", "--log-every", "1"))
    return out, printed.getvalue()


def test_a_jobs_last_line_names_its_page_and_the_page_holds_its_results(job):
    out, printed = job
    assert printed.rstrip().splitlines()[-1].endswith(f": {out / 'report.html'}")
    page, results = (out / "report.html").read_text(), json.loads((out / "results.json").read_text())
    steps, evals = read_log(out / "log.jsonl")
    assert len(steps) == 18 and len(evals) == 6 and "Finished" in page and f"best/ (step {results['best_step']})" in page
    charts(page)["loss"][0].assert_draws("training loss (each step)", [(r["step"], r["loss"]) for r in steps])
    for split in ("validation", "test"):  # the heat maps' counts are results.json's confusion matrices
        title = {"validation": "<h3>validation, best/", "test": "<h3>test, the one look"}[split]
        table = page.split(title, 1)[1].split('<table class="confusion">', 1)[1].split("</table>", 1)[0]
        counts = [int(c.replace(",", "")) for c in re.findall(r"<td[^>]*>([\d,]+)<small>", table)]
        assert counts == [c for row in results[split]["confusion"] for c in row]
    assert html.escape(results["cpu"]) in page and "rows      72" in page  # the CPU, the data's token-length summary


class Tags(HTMLParser):
    """Every tag, attribute and text of a page, for checking what it would ask a browser to fetch."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.attributes, self.text = set(), [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes += attrs

    def handle_data(self, data):
        self.text.append(data)


def assert_fetches_nothing(page):
    tags = Tags(page)
    assert not tags.tags & {"script", "img", "link", "iframe", "object", "embed", "image", "use", "a", "form", "base"}
    assert not [name for name, _ in tags.attributes if name in ("src", "href", "xlink:href", "srcset", "action")
                or name.startswith("on")]
    assert not [value for _, value in tags.attributes if value and re.search(r"https?:|//|url\(", value, re.I)]
    style = page.split("<style>", 1)[1].split("</style>", 1)[0]
    assert "url(" not in style and "@import" not in style
    assert "default-src 'none'" in page  # and the browser is told to fetch nothing, whatever the page held


def test_nothing_on_the_page_asks_the_network(job):
    page = (job[0] / "report.html").read_text()
    for text in ("http:", "https:", "//", "src=", "@import", "url("):
        assert text not in page.lower(), text
    assert_fetches_nothing(page)


HOSTILE = '<script>alert(1)</script> & "quoted" \'single\' Ã© <img src=https://example.com/x.png onerror=alert(2)>'


def test_every_text_is_escaped(tmp_path):
    run = write_log(tmp_path / "run", lambda s: 1 / s, lambda s: 1 / s)
    per_class = {name: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2} for name in (HOSTILE, "b&c")}
    validation = {"loss": 0.1, "accuracy": 0.5, "macro_f1": 0.5, "per_class": per_class, "confusion": [[1, 1], [1, 1]],
                  "majority_baseline": 0.5, "majority_label": HOSTILE, "num_examples": 4}
    results = {"model": HOSTILE, "config": {"metric": "loss", "freeze": [HOSTILE]}, "best_step": 40, "steps": 40,
               "validation": validation, "samples_before": [HOSTILE], "samples_after": ["url(//x) @import"]}
    (run / "results.json").write_text(json.dumps(results))
    page = write_report(run).read_text(encoding="utf-8")
    assert "<script" not in page and "<img" not in page
    assert html.escape(HOSTILE, quote=True) in page
    text = "".join(Tags(page).text)
    assert text.count(HOSTILE) >= 5 and "b&c" in text and "url(//x) @import" in text  # shown as the texts they are
    assert_fetches_nothing(page)


# ---------------------------------------------------------------------------------------------------------
# The command and the sweep

def test_minift_report_redraws_pages(job, tmp_path, capsys):
    out = job[0]
    short_run(tmp_path / "other")
    capsys.readouterr()
    cli.main(["report", str(out), str(tmp_path / "other"), "--out", str(tmp_path / "both.html")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "both.html")
    page = (tmp_path / "both.html").read_text()
    assert len(charts(page)["loss"][0].series) == 4 and "2 runs compared" in page
    line = cli_error(capsys, ["report", str(tmp_path / "nothing-here")])
    assert "holds no run" in line


def test_a_sweep_draws_its_trials_on_one_page(tiny, tmp_path, capsys):  # noqa: F811
    base = TrainConfig(max_steps=6, eval_every=3, batch_size=8, precision="fp32", device="cpu", freeze=[], log_every=1)
    result = run_sweep({"lr": [1e-2, 1e-3]}, model=tiny / "model", data=tiny / "data.csv", out=tmp_path, max_length=16,
                       base=base)
    assert f"report page, every trial's curves on the same axes: {tmp_path / 'report.html'}" in capsys.readouterr().out
    page = (tmp_path / "report.html").read_text()
    together = charts(page)["loss"][0]
    for trial in result["trials"]:
        steps, _ = read_log(Path(trial["folder"]) / "log.jsonl")
        name = f"{Path(trial['folder']).name} (lr={trial['settings']['lr']:.4g}): training loss (smoothed)"
        together.assert_draws(name, list(zip([r["step"] for r in steps], ema([r["loss"] for r in steps]))))
        assert (Path(trial["folder"]) / "report.html").is_file()  # and each trial has its own


# ---------------------------------------------------------------------------------------------------------
# The browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def png_pixels(path):
    """An 8-bit, non-interlaced RGB(A) PNG (what Chromium writes) as a (height, width, 3) array, its scanline
    filters undone by hand: the test needs no imaging library."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data[pos + 8:pos + 21])
        elif kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    assert depth == 8 and interlace == 0 and color in (2, 6)
    bpp, raw = (3 if color == 2 else 4), zlib.decompress(idat)
    stride, prev, rows = width * bpp, [0] * width * bpp, []
    for r in range(height):
        kind, line = raw[r * (stride + 1)], list(raw[r * (stride + 1) + 1:(r + 1) * (stride + 1)])
        for i in range(stride):  # None, Sub, Up, Average, Paeth (the PNG specification, 9.2)
            a, b, c = (line[i - bpp] if i >= bpp else 0), prev[i], (prev[i - bpp] if i >= bpp else 0)
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                near = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else b if abs(p - b) <= abs(p - c) else c
                line[i] = (line[i] + near) & 255
        rows.append(line)
        prev = line
    return np.array(rows, dtype=np.uint8).reshape(height, width, bpp)[..., :3]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is absent (Debian: apt-get install chromium)")
def test_chromium_renders_the_page(job, tmp_path):
    png = tmp_path / "page.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={png}", "--window-size=1200,2000", (job[0] / "report.html").as_uri()],
                   capture_output=True, timeout=180, check=True)
    pixels = png_pixels(png)
    assert pixels.shape == (2000, 1200, 3)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, "the screenshot is blank"

    def painted(hex_color):  # pixels of a curve's colour (the lines are antialiased: near it)
        target = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(pixels.astype(int) - target).sum(-1) < 30).sum())

    # the training loss (blue) and the validation loss (red) were drawn, as lines, not a few stray pixels
    assert painted("#1f77b4") > 300 and painted("#d62728") > 100
