"""Pictures of a run: learning curves from log.jsonl and a confusion matrix as PNGs, where matplotlib is installed.
Every run's report.html (report.py) draws the same curves without it; these are for a figure of your own.

    from minift.plots import plot_learning_curves, plot_confusion
    plot_learning_curves("runs/minilm-tweets/log.jsonl", "runs/minilm-tweets/curves.png")
    plot_confusion(metrics, "runs/minilm-tweets/confusion.png")   # metrics from minift.evaluate

Without matplotlib (`pip install minift[plots]`) each function writes the same numbers as a CSV file next
to where the PNG would have gone, says so, and returns the CSV's path: a run never fails for want of a plot.
"""
import csv
from pathlib import Path

from .errors import MiniftError
from .report import smooth
from .resume import read_log

MISSING = "matplotlib is missing, so {path} holds the numbers instead of a plot; pip install minift[plots] " \
          "(or pip install matplotlib) gives PNGs"


def learning_curve_rows(log_jsonl):
    """One row per step: training loss (raw, smoothed), lr, grad norm, and validation numbers where evaluated."""
    train, evals = read_log(log_jsonl)
    smoothed = smooth([t["loss"] for t in train])  # as report.html draws it: over about a tenth of the run
    by_step = {e["step"]: e["eval"] for e in evals}
    names = [k for k in ("loss", "accuracy", "macro_f1", "majority_baseline") if evals and k in evals[0]["eval"]]
    rows = []
    for t, s in zip(train, smoothed):
        row = {"step": t["step"], "train_loss": t["loss"], "train_loss_smoothed": s, "lr": t["lr"],
               "grad_norm": t.get("grad_norm")}
        row.update({f"val_{k}": by_step[t["step"]].get(k) if t["step"] in by_step else None for k in names})
        rows.append(row)
    return rows


def write_csv(rows, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def new_figure(figsize, height_ratios=(1,)):
    """A matplotlib Figure drawn with the Agg backend: no window, no global pyplot state to change.
    Raises ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(height_ratios), 1, sharex=True, height_ratios=height_ratios, squeeze=False)
    return fig, axes[:, 0]


def plot_learning_curves(log_jsonl, out_png):
    """Training loss (each step, and smoothed) and validation loss/accuracy vs step; the lr below.

    Read it like this: both losses falling = still learning; training loss falling while the validation
    loss rises = over-fitting (memorising the training rows); both flat and high = under-fitting."""
    rows = learning_curve_rows(log_jsonl)
    out_png = Path(out_png)
    try:
        fig, (ax, ax_lr) = new_figure((8, 6), height_ratios=(3, 1))
    except ImportError:
        path = write_csv(rows, out_png.with_suffix(".csv"))
        print(MISSING.format(path=path))
        return path
    evals = [r for r in rows if r["val_loss"] is not None]
    draw_losses(ax, rows, evals)
    handles, labels = ax.get_legend_handles_labels()
    if evals and evals[0].get("val_accuracy") is not None:  # a classifier: accuracy and F1 on a right axis
        right = draw_metrics(ax.twinx(), evals)
        handles, labels = [a + b for a, b in zip((handles, labels), right.get_legend_handles_labels())]
    fig.legend(handles, labels, fontsize=8, loc="outside upper center", ncols=3)
    ax.set_title(f"learning curves: {Path(log_jsonl)}", fontsize=9)
    ax_lr.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def draw_losses(ax, rows, evals):
    """Training loss each step (faint) and smoothed; validation loss at each evaluation, its lowest marked."""
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["train_loss"] for r in rows], color="tab:blue", alpha=0.25, lw=1, label="train loss (each step)")
    ax.plot(steps, [r["train_loss_smoothed"] for r in rows], color="tab:blue", lw=2, label="train loss (smoothed)")
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:red",
                label="validation loss")
        ax.axvline(best["step"], color="tab:red", ls=":", lw=1, label=f"lowest validation loss (step {best['step']})")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)


def draw_metrics(ax, evals):
    """Validation accuracy and macro-F1 (they live in [0, 1]) and the majority baseline they must beat."""
    steps = [r["step"] for r in evals]
    ax.plot(steps, [r["val_accuracy"] for r in evals], "s--", color="tab:green", label="validation accuracy")
    if evals[0].get("val_macro_f1") is not None:
        ax.plot(steps, [r["val_macro_f1"] for r in evals], "s--", color="tab:purple", label="validation macro-F1")
    if evals[0].get("val_majority_baseline") is not None:
        ax.axhline(evals[0]["val_majority_baseline"], color="gray", ls="--", lw=1, label="majority baseline")
    ax.set_ylabel("validation accuracy / macro-F1")
    ax.set_ylim(0, 1)
    return ax


def plot_confusion(metrics, out_png):
    """The confusion matrix of classification_metrics as a picture: rows the true label, columns the
    prediction; each cell coloured by the share of its row (so a rare class is as visible as a common one)."""
    names, counts = list(metrics["per_class"]), metrics["confusion"]
    out_png = Path(out_png)
    try:
        fig, (ax,) = new_figure((1.2 * len(names) + 2.5, 1.1 * len(names) + 1.8))
    except ImportError:
        rows = [{"true \\ predicted": name, **dict(zip(names, row))} for name, row in zip(names, counts)]
        path = write_csv(rows, out_png.with_suffix(".csv"))
        print(MISSING.format(path=path))
        return path
    shares = [[c / max(sum(row), 1) for c in row] for row in counts]
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(counts):
        for j, c in enumerate(row):
            ax.text(j, i, f"{c}\n{shares[i][j]:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if shares[i][j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
                 f"on {metrics['num_examples']} examples", fontsize=9)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png


def plot_time_vs_accuracy(trials, out_png, target=None):
    """Validation accuracy against minutes of training, one line per sweep trial (its `curve`, sweep.py):
    which lever reaches which accuracy how soon. `trials`: {label: curve}; `target`: a dotted line.

    Read it like this: the line that crosses the target furthest left is the cheapest recipe for that
    accuracy; a line that flattens early says more time buys it nothing."""
    rows = [{"trial": label, "step": p["step"], "train_minutes": round(p["train_seconds"] / 60, 2),
             "val_accuracy": p["accuracy"]} for label, curve in trials.items() for p in curve]
    if not rows:
        raise MiniftError("no learning curves to plot: the trials need evaluations (eval_every) and a log")
    out_png = Path(out_png)
    try:
        fig, (ax,) = new_figure((8, 5))
    except ImportError:
        path = write_csv(rows, out_png.with_suffix(".csv"))
        print(MISSING.format(path=path))
        return path
    for label, curve in trials.items():
        ax.plot([p["train_seconds"] / 60 for p in curve], [p["accuracy"] for p in curve], "o-", label=label)
    if target is not None:
        ax.axhline(target, color="gray", ls=":", lw=1, label=f"target {target}")
    ax.set_xlabel("minutes of training (evaluations not counted)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    return out_png
