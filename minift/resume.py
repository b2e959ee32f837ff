"""Exact resume: a run stopped at any moment (Ctrl-C, SIGTERM, SIGKILL, a full disk) continues to exactly the
result of an uninterrupted run.

What that takes:
- the checkpoint holds the weights, AdamW's m, v and step, every RNG and the loop's position (LoopState),
  written to a new folder and swapped in by renames, so a crash leaves the previous checkpoint whole;
- log.jsonl is flushed and fsynced with every checkpoint, and cut back to the checkpoint's length on resume
  (records written after it are redone);
- Ctrl-C and SIGTERM are held while a step's update or a save is under way, then raised, so the saved state
  is always consistent; an evaluation that was due but did not finish is redone on resume;
- an earlier run in the same folder is moved aside (OUT/previous-N/), never destroyed.
"""
import contextlib
import json
import os
import random
import shutil
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoints import iter_safetensors, load_state, save_checkpoint
from .errors import MiniftError
from .files import atomic_write, existing_folder, new_folder, replace_folder


@dataclass
class LoopState:
    """Where the loop is: everything besides weights, optimizer and RNGs that a resume needs."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch: int = 0  # batches of this epoch done
    best: float | None = None  # the best validation metric so far, and its step
    best_step: int | None = None
    best_metrics: dict | None = None  # the full validation metrics at best_step, for the final report
    evals_without_gain: int = 0
    eval_due: bool = False  # an evaluation was due after `step` and has not finished: redo it on resume
    log_bytes: int = 0  # the length of log.jsonl that belongs to this state


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM

@contextlib.contextmanager
def interrupts_held():
    """Hold a Ctrl-C (SIGINT) or SIGTERM that arrives inside the block and raise KeyboardInterrupt at its end,
    so the block runs whole."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        handler = previous[caught[0]]
        if callable(handler):
            handler(caught[0], None)  # Python's Ctrl-C handler raises KeyboardInterrupt; so does ours for SIGTERM
        elif caught[0] == signal.SIGTERM or handler == signal.SIG_DFL:
            raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (what `timeout`, `kill` and cluster schedulers send before they kill) stops the run the way
    Ctrl-C does: a checkpoint is saved, then the run ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------------------
# RNG states

def rng_states():
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda{i}"] = s
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch_cpu"])
    cuda = sorted(k for k in states if k.startswith("torch_cuda"))
    if cuda and torch.cuda.is_available():  # a checkpoint from a GPU machine resumes on a CPU-only one
        torch.cuda.set_rng_state_all([states[k] for k in cuda])


# ---------------------------------------------------------------------------------------------------------
# The log and earlier runs

def open_log(out_dir, state):
    """log.jsonl for appending, cut back to the length the checkpoint saw (a fresh run: emptied)."""
    path = Path(out_dir) / "log.jsonl"
    log = open(path, "a+")
    log.truncate(state.log_bytes)
    log.seek(state.log_bytes)
    return log


RUN_FILES = ("checkpoint", "checkpoint.old", "best", "best.old", "adapter", "log.jsonl", "results.json", "report.html")


def move_earlier_run_aside(out_dir):
    """A new run in a folder that holds an earlier one: move the earlier one's files to OUT/previous-N/ (the
    first free N), so no earlier run is ever lost; delete those folders yourself when you no longer need them."""
    out_dir = Path(out_dir)
    names = [n for n in RUN_FILES if (out_dir / n).exists()]
    if not names:
        return
    n = 1
    while (out_dir / f"previous-{n}").exists():
        n += 1
    previous = out_dir / f"previous-{n}"
    previous.mkdir()
    for name in names:
        (out_dir / name).rename(previous / name)
    print(f"note: {out_dir} held an earlier run; its files are now in {previous} (pass --resume to continue a run "
          "instead of starting over)")


# ---------------------------------------------------------------------------------------------------------
# Save and load

def save_training_state(folder, model, optimizer, state, cfg, run_info, log=None, optimizer_state=None):
    """Everything needed to continue exactly: weights, AdamW m/v/step, RNGs, position in the data, and the log
    up to here; `run_info` ({"data": fingerprint, "processes": N}) is checked on resume. `optimizer_state`: the
    (tensors, meta) to write when they are not this process's own (ZeRO gathers them). Written to a new folder
    and swapped in by renames, so a crash leaves the previous checkpoint whole; Ctrl-C and SIGTERM wait until
    the swap is done."""
    folder = Path(folder)
    with interrupts_held():
        if log is not None:  # the log is as durable as the checkpoint it describes
            log.flush()
            os.fsync(log.fileno())
            state.log_bytes = log.tell()
        new = new_folder(folder)
        try:
            save_checkpoint(model, new)
            tensors, meta = optimizer_state or optimizer.state_dict()
            tensors.update({"rng." + k: v for k, v in rng_states().items()})
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(new / "optimizer.safetensors"))
            numpy_rng = np.random.get_state()
            trainer_state = {"state": asdict(state), "optimizer": meta, "config": asdict(cfg), "run": run_info,
                             "python_rng": random.getstate(),
                             "numpy_rng": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]]}
            atomic_write(new / "trainer_state.json", lambda tmp: Path(tmp).write_text(json.dumps(trainer_state)))
        except (OSError, SafetensorError) as e:  # a full disk reaches safetensors' writer as a SafetensorError
            shutil.rmtree(new, ignore_errors=True)
            why = getattr(e, "strerror", None) or e
            if folder.exists():
                raise MiniftError(f"could not write the checkpoint ({why}): the previous one in {folder} is intact; free "
                                  "disk space (or choose another --out), then run the same command with --resume") from None
            raise MiniftError(f"could not write the first checkpoint ({why}), so there is nothing to resume from: free "
                              "disk space or choose another --out, then start the run again") from None
        replace_folder(new, folder)


def load_training_state(folder, model, optimizer, cfg=None, run_info=None):
    """Restore the weights, the AdamW state and every RNG saved in `folder`; return the LoopState.
    With `cfg` (this run's settings), say which settings differ from the saved run's; with `run_info`, refuse
    other training data and say so when the number of processes changed."""
    folder = existing_folder(folder)  # (a crash between the two renames of a save leaves checkpoint.old)
    if not (folder / "trainer_state.json").is_file():
        raise MiniftError(f"nothing to resume in {folder}: no trainer_state.json (start without --resume)")
    try:
        saved = json.loads((folder / "trainer_state.json").read_text())
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise MiniftError(f"the checkpoint in {folder} is damaged ({e}): start again without --resume, or restore "
                          f"{folder.name} from a copy") from None
    if run_info is not None:
        check_same_run(saved, run_info, folder)
    load_state(model, iter_safetensors(folder))
    rngs = {k[len("rng."):]: tensors.pop(k) for k in list(tensors) if k.startswith("rng.")}
    set_rng_states(rngs)
    optimizer.load_state_dict(tensors, saved["optimizer"])
    py = saved["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = saved["numpy_rng"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    print(f"resumed from {folder} at step {saved['state']['step']}")
    if cfg is not None:
        changed = [f"{k} {old} -> {getattr(cfg, k)}" for k, old in saved["config"].items()
                   if getattr(cfg, k, old) != old]
        if changed:  # allowed (more epochs, a lower lr ...), but the run is no longer the one that was saved
            print("note: settings changed since the checkpoint: " + ", ".join(changed))
    return LoopState(**saved["state"])


def check_same_run(saved, now, folder):
    """A resume must continue the same run. Over other data its test split would hold rows it trained on (and
    the validation rows that chose best/ may have been trained on too); another model, label set or LoRA shape
    cannot take the saved weights. Another number of processes is allowed (the update is the same) but no
    longer bitwise: say so. `saved`: trainer_state.json; `now`: this run's run_info (train.set_up)."""
    # (a checkpoint saved without run_info, or before minift kept it, has nothing to compare: it is trusted)
    before, lora = saved.get("run") or {}, {k: v for k, v in saved.get("config", {}).items() if k.startswith("lora_")}
    if "labels" in before and before["labels"] != now.get("labels"):  # (first: other labels make another head too)
        raise MiniftError(f"the run saved in {folder} has the labels {before.get('labels')}, this one "
                          f"{now.get('labels')}: resume with the same data, or start a new run without --resume")
    if before.get("model") and before["model"] != now.get("model"):
        raise MiniftError(f"the checkpoint in {folder} holds another model or other LoRA settings (it was saved with "
                          f"{', '.join(f'{k}={v}' for k, v in lora.items())}): resume with the same --model and LoRA "
                          "settings, or start a new run without --resume")
    if before.get("data") and before["data"] != now.get("data"):
        raise MiniftError(f"the training data differ from the run saved in {folder} (the file or its splits "
                          "changed, or --limit, --max-length or the seed): resuming would mix two data sets; "
                          "start a new run without --resume (or with another --out)")
    if before.get("objective") != now.get("objective") and "objective" in before:
        raise MiniftError(f"the run saved in {folder} trained with {before['objective']}, this one with "
                          f"{now.get('objective')}: resume with the same settings, or start a new run without --resume")
    if before.get("processes", 1) != now.get("processes", 1):
        print(f"note: the checkpoint was saved by {before.get('processes', 1)} processes, this run has "
              f"{now.get('processes', 1)}: the updates are the same, the rounding is not, so the result will "
              "differ from an uninterrupted run in the last bits")


# ---------------------------------------------------------------------------------------------------------
# Reading the log back

def read_log(log_jsonl):
    """(train records, eval records) of a log.jsonl that train() wrote, in step order.

    A resumed run logs again the steps after its last checkpoint, and a rerun into the same folder starts
    again at step 1: when a step number comes round again, the newer records replace the older ones. A last line
    cut short by a killed process is left out."""
    path = Path(log_jsonl)
    if not path.is_file():
        raise MiniftError(f"{path}: no such log; train() writes log.jsonl in its output folder")
    train, evals = [], []
    lines = path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError:
            if n == len(lines):  # a last line cut short (the process killed mid-write): the records before it stand
                break
            raise MiniftError(f"{path}, line {n}, is not a JSON record: the log is damaged") from None
        if "eval" in r:
            evals.append(r)
            continue
        if train and r["step"] <= train[-1]["step"]:
            train = [t for t in train if t["step"] < r["step"]]
            evals = [e for e in evals if e["step"] < r["step"]]
        train.append(r)
    if not train:
        raise MiniftError(f"{path} has no training steps yet; plot it once training has logged a step")
    return train, evals

