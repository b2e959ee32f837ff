"""Exact resume: a run stopped at any moment (Ctrl-C, SIGTERM, SIGKILL, a full disk) continues to exactly the
result of an uninterrupted run.

What that takes:
- the checkpoint holds the weights, AdamW's m, v and step, every RNG and the loop's position (LoopState),
  written to a new folder and swapped in by renames, so a crash leaves the previous checkpoint whole;
- log.jsonl is flushed and fsynced with every checkpoint, and cut back to the checkpoint's length on resume
  (records written after it are redone);
- Ctrl-C and SIGTERM are held while a step's update or a save is under way, then raised, so the saved state
  is always consistent; an evaluation that was due but did not finish is redone on resume;
- an earlier run in the same folder is moved aside (OUT/previous/), never destroyed before the new one saves.
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

from .checkpoints import atomic_write, load_state, read_safetensors, save_checkpoint
from .errors import MiniftError


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


def move_earlier_run_aside(out_dir):
    """A new run in a folder that holds an earlier one: move the earlier one's files to OUT/previous/ (an older
    previous/ goes), so nothing of it is lost before the new run has something to replace it with."""
    out_dir = Path(out_dir)
    names = [n for n in ("checkpoint", "checkpoint.old", "best", "log.jsonl", "results.json") if (out_dir / n).exists()]
    if not names:
        return
    previous = out_dir / "previous"
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    for n in names:
        (out_dir / n).rename(previous / n)
    print(f"note: {out_dir} held an earlier run; its files are now in {previous} (pass --resume to continue a run "
          "instead of starting over)")


# ---------------------------------------------------------------------------------------------------------
# Save and load

def save_training_state(folder, model, optimizer, state, cfg, label_names, tokenizer_file, log=None):
    """Everything needed to continue exactly: weights, AdamW m/v/step, RNGs, position in the data, and the log
    up to here. Written to a new folder and swapped in by renames, so a crash leaves the previous checkpoint
    whole; Ctrl-C and SIGTERM wait until the swap is done."""
    folder = Path(folder)
    new, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    with interrupts_held():
        if log is not None:  # the log is as durable as the checkpoint it describes
            log.flush()
            os.fsync(log.fileno())
            state.log_bytes = log.tell()
        shutil.rmtree(new, ignore_errors=True)
        try:
            save_checkpoint(model, new, label_names, tokenizer_file)
            tensors, meta = optimizer.state_dict()
            tensors.update({"rng." + k: v for k, v in rng_states().items()})
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(new / "optimizer.safetensors"))
            numpy_rng = np.random.get_state()
            trainer_state = {"state": asdict(state), "optimizer": meta, "config": asdict(cfg),
                             "python_rng": random.getstate(),
                             "numpy_rng": [numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]]}
            atomic_write(new / "trainer_state.json", lambda tmp: Path(tmp).write_text(json.dumps(trainer_state)))
        except OSError as e:
            shutil.rmtree(new, ignore_errors=True)
            kept = f"the previous checkpoint in {folder} is intact" if folder.exists() else "no checkpoint was kept"
            raise MiniftError(f"could not write the checkpoint ({e.strerror or e}): {kept}; free disk space or "
                              "choose another --out, then resume") from None
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        new.rename(folder)
        shutil.rmtree(old, ignore_errors=True)


def load_training_state(folder, model, optimizer, cfg=None):
    """Restore the weights, the AdamW state and every RNG saved in `folder`; return the LoopState.
    With `cfg` (this run's settings), say which settings differ from the saved run's."""
    folder = Path(folder)
    if not folder.exists() and folder.with_name(folder.name + ".old").exists():
        folder = folder.with_name(folder.name + ".old")  # a crash between the two renames of a save
    if not (folder / "trainer_state.json").is_file():
        raise MiniftError(f"nothing to resume in {folder}: no trainer_state.json (start without --resume)")
    load_state(model, read_safetensors(folder))
    try:
        saved = json.loads((folder / "trainer_state.json").read_text())
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise MiniftError(f"the checkpoint in {folder} is damaged ({e}): start again without --resume, or restore "
                          f"{folder.name} from a copy") from None
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
