"""Learning-curve and confusion plots: PNGs with matplotlib, the same numbers as CSV without it."""
import csv
import importlib.util
import json
import math
import sys

import pytest

from minift.errors import MiniftError
from minift.plots import plot_confusion, plot_learning_curves, plot_time_vs_accuracy
from minift.resume import read_log

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRICS = {"accuracy": 0.7, "macro_f1": 0.65, "num_examples": 20, "confusion": [[6, 1, 1], [2, 4, 0], [1, 1, 4]],
           "per_class": {"negative": {}, "neutral": {}, "positive": {}}}


def write_log(path, steps=40, eval_every=10):
    """A log.jsonl as train() writes it: training loss falls, validation loss falls then rises."""
    with open(path, "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "epoch": (step - 1) // 20, "loss": 1.1 * math.exp(-step / 15),
                                "lr": 5e-5 * (1 - step / steps), "grad_norm": 1.0}) + "\n")
            if step % eval_every == 0:
                val = {"loss": 0.9 + 0.001 * (step - 20) ** 2, "accuracy": 0.6 + step / 200, "macro_f1": 0.5,
                       "majority_baseline": 0.45, "num_examples": 50}
                f.write(json.dumps({"step": step, "eval": val}) + "\n")
    return path


def hide_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib...` now raises ImportError


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install minift[plots])")
def test_learning_curves_and_confusion_png(tmp_path):
    png = plot_learning_curves(write_log(tmp_path / "log.jsonl"), tmp_path / "plots" / "curves.png")
    assert png == tmp_path / "plots" / "curves.png" and png.read_bytes()[:8] == PNG_MAGIC
    png = plot_confusion(METRICS, tmp_path / "confusion.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_without_matplotlib_the_numbers_go_to_csv(tmp_path, monkeypatch, capsys):
    hide_matplotlib(monkeypatch)
    path = plot_learning_curves(write_log(tmp_path / "log.jsonl"), tmp_path / "curves.png")
    assert path == tmp_path / "curves.csv" and not (tmp_path / "curves.png").exists()
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 40 and rows[0]["step"] == "1"
    assert float(rows[9]["val_loss"]) == pytest.approx(0.9 + 0.1) and rows[8]["val_loss"] == ""
    assert float(rows[39]["val_accuracy"]) == pytest.approx(0.8)
    assert float(rows[39]["train_loss_smoothed"]) > float(rows[39]["train_loss"])  # the average lags a falling loss
    path = plot_confusion(METRICS, tmp_path / "confusion.png")
    rows = list(csv.reader(open(path)))
    assert rows[0] == ["true \\ predicted", "negative", "neutral", "positive"] and rows[2] == ["neutral", "2", "4", "0"]
    out = capsys.readouterr().out
    assert out.count("matplotlib is missing") == 2 and "pip install minift[plots]" in out


def test_a_resumed_or_restarted_run_keeps_the_newer_records(tmp_path):
    log = write_log(tmp_path / "log.jsonl", steps=30)
    with open(log, "a") as f:  # resumed from the checkpoint at step 20: steps 21.. are logged again
        for step in range(21, 26):
            f.write(json.dumps({"step": step, "epoch": 1, "loss": 0.5, "lr": 1e-5, "grad_norm": 1.0}) + "\n")
    train, evals = read_log(log)
    assert [t["step"] for t in train] == list(range(1, 26)) and train[-1]["loss"] == 0.5
    assert [e["step"] for e in evals] == [10, 20]
    with pytest.raises(MiniftError, match="no such log"):
        read_log(tmp_path / "missing.jsonl")


CURVES = {"1 epoch, lr 1e-4": [{"step": 233, "train_seconds": 60.0, "accuracy": 0.74},
                               {"step": 466, "train_seconds": 121.5, "accuracy": 0.79}],
          "embeddings frozen": [{"step": 233, "train_seconds": 54.0, "accuracy": 0.75}]}


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed (pip install minift[plots])")
def test_time_vs_accuracy_png(tmp_path):
    png = plot_time_vs_accuracy(CURVES, tmp_path / "levers.png", target=0.78)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_time_vs_accuracy_without_matplotlib_is_a_csv_of_every_point(tmp_path, monkeypatch):
    hide_matplotlib(monkeypatch)
    rows = list(csv.DictReader(open(plot_time_vs_accuracy(CURVES, tmp_path / "levers.png"))))
    assert [(r["trial"], r["step"], r["train_minutes"], r["val_accuracy"]) for r in rows] == [
        ("1 epoch, lr 1e-4", "233", "1.0", "0.74"), ("1 epoch, lr 1e-4", "466", "2.02", "0.79"),
        ("embeddings frozen", "233", "0.9", "0.75")]
    with pytest.raises(MiniftError, match="no learning curves"):
        plot_time_vs_accuracy({"a": []}, tmp_path / "none.png")
