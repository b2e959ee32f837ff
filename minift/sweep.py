"""Stage 6: tune hyperparameters. Try settings, record every trial, choose on validation only.

    from minift.sweep import run_sweep
    result = run_sweep({"lr": [2e-5, 5e-5, 1e-4], "batch_size": [16, 32]}, limit=2000)
    result["best"]   # {"trial": 3, "settings": {"lr": 5e-05, "batch_size": 16}, "val_accuracy": ..., ...}

Each trial is one call of finetune_classifier(..., test=False). The test set is not looked at here: a
setting chosen because it scored well on the test set makes the test set a second validation set, and its
score stops being an honest estimate of how the model does on new data. Stage 7 looks at it once.

Files in `out`: results.jsonl (one line per trial, written as each one ends, so an interrupted sweep loses
nothing; run the same sweep again and it goes on with the trials not done yet), results.csv (the table,
best first), report.html (every trial's curves on the same axes), sweep.json (what every trial shares),
trial-NNN/ (each trial's best model, log, output and report page).
"""
import contextlib
import csv
import itertools
import json
import shutil
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from random import Random

import torch

from . import recipe
from .errors import MiniftError
from .classify import finetune_classifier
from .config import TrainConfig
from .report import write_report
from .resume import read_log


def check_space(space):
    """A search space is {TrainConfig field: [values to try]}; say clearly what is wrong with one."""
    if not space:
        raise MiniftError("nothing to sweep: give each setting a list of values, e.g. {'lr': [3e-5, 5e-5]} "
                          "(on the command line: --lr 3e-5,5e-5)")
    for key, values in space.items():
        check_setting(key)
        if not isinstance(values, (list, tuple)) or not values:
            raise MiniftError(f"{key}: give a non-empty list of values to try, e.g. [{getattr(TrainConfig, key)!r}]")
        if len({repr(v) for v in values}) < len(values):
            raise MiniftError(f"{key}: {list(values)} lists a value twice; list each value once")


def check_setting(key):
    """A swept or listed setting must be a TrainConfig field, and not the metric that ranks the trials."""
    names = [f.name for f in fields(TrainConfig)]
    if key not in names:
        raise MiniftError(f"{key!r} is not a TrainConfig setting; choose among {', '.join(names)}")
    if key == "metric":
        raise MiniftError("metric decides which trial is best, so every trial must share it: set it in base")


def listed(trials: list[dict]) -> list[dict]:
    """Trials written out one by one ([{"lr": 1e-4}, {"lr": 1e-4, "freeze": ["embeddings"]}]): for levers
    that are tried in a few combinations, not all of them."""
    if not trials or not all(isinstance(t, dict) for t in trials):
        raise MiniftError("give the trials as a non-empty list of {setting: value} dicts, e.g. [{'lr': 1e-4}]")
    for t in trials:
        for key in t:
            check_setting(key)
    if len({json.dumps(t, sort_keys=True) for t in trials}) < len(trials):
        raise MiniftError("a trial is listed twice; list each one once")
    return [dict(t) for t in trials]


def grid(space: dict[str, list]) -> list[dict]:
    """Every combination of the values, the first setting changing slowest (a stable order)."""
    check_space(space)
    return [dict(zip(space, values)) for values in itertools.product(*space.values())]


def random_trials(space, n, seed=0) -> list[dict]:
    """n distinct combinations drawn at random (the same n for the same seed). With several settings,
    random trials cover more distinct values of each than a grid of the same size does."""
    combos = grid(space)
    if not 1 <= n <= len(combos):
        raise MiniftError(f"cannot draw {n} distinct trials from {len(combos)} combinations: ask for 1 to "
                          f"{len(combos)}, or drop --random to run the whole grid")
    return [combos[i] for i in Random(seed).sample(range(len(combos)), n)]


def as_stored(value):
    """`value` as it reads back from a JSON file (tuples become lists), so it compares with what was saved."""
    return json.loads(json.dumps(value))


def previous_records(out, setup):
    """The trials an earlier run of this same sweep already finished (so a rerun goes on where it stopped)."""
    shared = out / "sweep.json"
    if shared.is_file() and json.loads(shared.read_text()) != setup:
        raise MiniftError(f"{out} holds a different sweep (see {shared}): choose another --out, or delete {out}")
    out.mkdir(parents=True, exist_ok=True)
    shared.write_text(json.dumps(setup, indent=2) + "\n")
    results = out / "results.jsonl"
    return [json.loads(line) for line in results.read_text().splitlines() if line] if results.is_file() else []


def run_trial(number, settings, cfg, model, data, out, max_length, limit, options):
    """One fine-tune; its validation numbers (or its error) as a record. Its printout goes to output.txt."""
    folder = out / f"trial-{number:03d}"
    shutil.rmtree(folder, ignore_errors=True)  # a trial cut short earlier starts again from scratch
    folder.mkdir(parents=True)
    record = {"trial": number, "settings": settings, "folder": str(folder)}
    t0 = time.perf_counter()
    try:
        # One screen per trial would bury the table; the whole report is kept in the trial's folder.
        with open(folder / "output.txt", "w") as f, contextlib.redirect_stdout(f):
            report = finetune_classifier(model, data, folder, cfg, max_length, limit=limit, test=False, **options)
    except MiniftError as e:  # e.g. a non-finite loss at a too-high lr: a result worth recording too
        record.update(status="failed", error=str(e))
    except torch.cuda.OutOfMemoryError:  # a batch size too big for the GPU is a result too
        torch.cuda.empty_cache()
        record.update(status="failed", error="out of GPU memory: try a smaller batch_size, or grad_accum")
    else:
        v = report["validation"]
        record.update(status="ok", val_accuracy=v["accuracy"], val_macro_f1=v["macro_f1"], val_loss=v["loss"],
                      best_step=report["best_step"], steps=report["steps"], stopped_early=report["stopped_early"],
                      curve=learning_curve(folder / "log.jsonl"))
    record["seconds"] = time.perf_counter() - t0
    record["config"] = asdict(cfg)
    # The resumable checkpoint (weights + AdamW state, ~260 MB for MiniLM) is not needed once a trial has
    # ended; best/ (the model chosen on validation) stays.
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    return record


def learning_curve(log):
    """The evaluations of a run's log: step, seconds of training before it (evaluations not counted) and the
    validation metrics. With it, "how long to reach 0.80?" is read off a trial instead of guessed."""
    curve, spent = [], 0.0
    for r in read_log(log)[1]:
        curve.append({"step": r["step"], "train_seconds": round(r["seconds"] - spent - r["eval_seconds"], 1),
                      **{k: r["eval"][k] for k in ("accuracy", "macro_f1", "loss")}})
        spent += r["eval_seconds"]
    return curve


def seconds_to(curve, target):
    """Seconds of training at the first evaluation of `curve` with accuracy >= target; None if none reached it."""
    return next((p["train_seconds"] for p in curve if p["accuracy"] >= target), None)


def ranked(records, metric):
    """Finished trials best first, then the failed ones. Higher accuracy/F1 is better, lower loss is; ties
    (common on a small validation set) go to the lower validation loss, then to the earlier trial."""
    ok = [r for r in records if r["status"] == "ok"]
    sign = 1 if metric == "loss" else -1
    ok.sort(key=lambda r: (sign * r[f"val_{metric}"], r["val_loss"]))
    return ok + [r for r in records if r["status"] != "ok"]


def setting(record, key):
    """A trial's value of a setting: its own, or the base's where a listed trial leaves it out."""
    return record["settings"].get(key, record["config"].get(key))


def format_value(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def format_table(records, keys, metric):
    """The trials as a table, best first; `keys` are the settings that change between trials."""
    head = ["rank", "trial", *keys, "val acc", "val F1", "val loss", "best step", "seconds"]
    lines = []
    for rank, r in enumerate(ranked(records, metric), 1):
        cells = [rank, r["trial"], *(format_value(setting(r, k)) for k in keys)]
        if r["status"] == "ok":
            cells += [f"{r['val_accuracy']:.4f}", f"{r['val_macro_f1']:.4f}", f"{r['val_loss']:.4f}", r["best_step"]]
        else:
            cells += ["failed", "", "", ""]
        lines.append([str(c) for c in cells] + [f"{r['seconds']:.0f}"])
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head] + lines]
    text += [f"trial {r['trial']} failed: {r['error']}" for r in records if r["status"] != "ok"]
    return "\n".join(text)


def write_csv(records, keys, metric, path):
    columns = ["rank", "trial", *keys, "status", "val_accuracy", "val_macro_f1", "val_loss", "best_step", "steps",
               "seconds", "folder", "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for rank, r in enumerate(ranked(records, metric), 1):
            writer.writerow({**r, **{k: setting(r, k) for k in keys}, "rank": rank})


def run_sweep(space, model=recipe.MODEL, data=recipe.DATA, out=recipe.SWEEP_OUT, max_length=recipe.MAX_LENGTH,
              limit=None, random=None, base=None, **options) -> dict:
    """Fine-tune once per combination of `space` (or `random` of them), or once per trial when `space` is a
    list of them, every other setting from `base`; `options` go to finetune_classifier (pooling, text_column,
    label_column). Returns {"trials": records in the order they ran, "best": the best record on validation}."""
    base = base or TrainConfig(**recipe.MAIN_TRAIN)
    if isinstance(space, list):
        todo = listed(space)
        space = {k: [t.get(k, getattr(base, k)) for t in todo] for k in dict.fromkeys(k for t in todo for k in t)}
    else:
        todo = random_trials(space, random, seed=base.seed) if random else grid(space)
    out = Path(out)
    setup = {"model": str(model), "data": None if data is None else str(data), "max_length": max_length,
             "limit": limit, "base": asdict(base), **options}
    records = previous_records(out, as_stored(setup))
    done = [r["settings"] for r in records]
    keys = [k for k in space if len({repr(v) for v in space[k]}) > 1] or list(space)  # columns for what changes
    if done:
        print(f"{len(records)} trials already recorded in {out / 'results.jsonl'} are kept "
              f"(delete {out} to start afresh)")
    todo = [s for s in todo if as_stored(s) not in done]
    print(f"sweep: {len(todo)} trials of {', '.join(keys)}; the best by validation {base.metric}; "
          f"each trial's full report is in {out}/trial-NNN/output.txt")
    for i, settings in enumerate(todo, 1):
        number = len(records)
        print(f"trial {number} ({i}/{len(todo)}): {describe(settings)}")
        try:
            cfg = replace(base, **settings)
            record = run_trial(number, settings, cfg, model, data, out, max_length, limit, options)
        except KeyboardInterrupt:
            print(f"\nsweep interrupted in trial {number}; {len(records)} trials are saved in {out / 'results.jsonl'}: "
                  "run the same sweep again to go on with the rest")
            raise
        records.append(record)
        with open(out / "results.jsonl", "a") as f:  # appended at once: an interruption loses nothing
            f.write(json.dumps(record) + "\n")
        write_csv(records, keys, base.metric, out / "results.csv")
        if record["status"] == "ok":
            print(f"  -> validation accuracy {record['val_accuracy']:.4f}, loss {record['val_loss']:.4f} "
                  f"(best step {record['best_step']}), {record['seconds']:.0f} s")
        else:
            print(f"  -> failed: {record['error']}")
    return {"trials": records, "best": report(records, keys, base.metric, out)}


def describe(settings):
    return ", ".join(f"{k}={format_value(v)}" for k, v in settings.items())


def report(records, keys, metric, out):
    """Print the table, best first, and return the best trial: chosen on validation, never on test."""
    print(f"\n{format_table(records, keys, metric)}")
    best = ranked(records, metric)[0]
    if best["status"] != "ok":
        raise MiniftError(f"all {len(records)} trials failed (the first: {records[0]['error']}); "
                          f"see {out / 'results.csv'} and each trial's output.txt")
    print(f"\nbest on validation {metric}: trial {best['trial']} ({describe(best['settings'])}); "
          f"its model is in {Path(best['folder']) / 'best'}")
    print(f"all trials: {out / 'results.csv'}, {out / 'results.jsonl'}. The test set was not used: look at it "
          "once, with these settings, when you are done choosing (stage 7).")
    folders = [r["folder"] for r in ranked(records, metric) if r["status"] == "ok"]  # the best first, in detail
    print(f"report page, every trial's curves on the same axes: {write_report(folders[0], folders[1:], out / 'report.html')}")
    return best
