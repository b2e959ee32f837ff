"""The training loop around one step (step.py): setup, the loop over batches, evaluation, checkpoints, the log.

`train()` is the shell a learner steps through; the step itself is `minift.step.train_step`, exact resume
and Ctrl-C live in resume.py, the settings and their checks in config.py.
"""
import contextlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .batching import batch_order, collate
from .checkpoints import save_checkpoint
from .config import TrainConfig, check_config
from . import distributed
from .errors import MiniftError
from .evaluate import evaluate
from .freeze import describe_trainable, freeze, mark_frozen_below
from .layers import Dropout
from .optim import AdamW, LRSchedule, describe_groups, param_groups, warmup_steps_for
from .resume import (LoopState, interrupts_held, load_training_state, move_earlier_run_aside, open_log, rng_states,
                     save_training_state, set_rng_states, sigterm_as_interrupt)
from .step import forward_backward, train_step  # noqa: F401  (forward_backward: the step's first half, for tests)

def seed_everything(seed):
    """One call seeds Python, NumPy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MiniftError("device 'cuda' asked for, but torch sees no CUDA GPU: use --device cpu (or auto)")
    return torch.device(name)


def autocast(device, precision):
    """bf16 autocast: matmuls in bf16, softmax/LayerNorm/loss in fp32, weights stay fp32."""
    if precision == "auto":
        precision = fast_precision(device)
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision != "bf16":
        raise MiniftError(f"precision {precision!r} is not supported: use fp32 or bf16")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MiniftError("this GPU has no bf16 support: use --precision fp32")
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise MiniftError("this CPU has no native bf16 matmul (AVX512-BF16 or AMX): use --precision fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def fast_precision(device):
    """bf16 where the hardware runs bf16 matmuls natively (recent GPUs; CPUs with AVX512-BF16 or AMX), else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def set_dropout(model, p):
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = p


def micro_batches(examples, order, cfg, pad_id, padding_side, device):
    """Yield the micro-batches of one optimizer step: grad_accum pieces of one batch of indices."""
    size = max(1, math.ceil(len(order) / cfg.grad_accum))  # (a rank's share of a last, small batch may be empty)
    for i in range(0, len(order), size):
        batch = collate([examples[j] for j in order[i:i + size]], pad_id, padding_side)
        yield {k: v.to(device) for k, v in batch.items()}


def train(model, train_examples, val_examples, cfg, out_dir, pad_id, label_names=None,
          tokenizer_file=None, class_weights=None, padding_side="right", resume=False):
    """Fine-tune `model` on encoded examples (see tasks.py). Returns a dict of what happened."""
    check_config(cfg)
    if model.task == "lm" and cfg.metric != "loss":
        raise MiniftError("a language model is judged by its validation loss: use metric='loss'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = distributed.setup(cfg.device)  # None unless torchrun started several processes (distributed.py)
    main = dist is None or dist.is_main  # the one process that prints, evaluates and writes
    device = dist.device if dist else pick_device(cfg.device)
    if dist and cfg.batch_size < dist.world_size:
        raise MiniftError(f"batch_size {cfg.batch_size} is smaller than the {dist.world_size} processes: the batch "
                          "is global (shared by all of them), so give at least one example per process")
    model.to(device).train()
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    if cfg.freeze:
        freeze(model, cfg.freeze)
    mark_frozen_below(model)
    optimizer = AdamW(param_groups(model.named_parameters(), cfg.weight_decay), lr=cfg.lr)
    lengths = [len(e["input_ids"]) for e in train_examples]
    batches_per_epoch = len(batch_order(lengths, cfg.batch_size, cfg.seed, 0, group_by_length=cfg.group_by_length))
    total_steps = math.ceil(cfg.epochs * batches_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    schedule = LRSchedule(cfg.lr, total_steps, warmup_steps_for(total_steps, cfg.warmup_ratio), cfg.schedule, cfg.min_lr)
    if resume:
        state = load_training_state(out_dir / "checkpoint", model, optimizer, cfg)
    else:
        if main:
            move_earlier_run_aside(out_dir)
        seed_everything(cfg.seed)
        state = LoopState()
    if dist:  # every rank starts from rank 0's weights
        dist.broadcast_weights(model)
    print(describe_trainable(model) + " | " + describe_groups(optimizer.groups))
    print(schedule.describe())
    precision = fast_precision(device) if cfg.precision == "auto" else cfg.precision
    print(f"{len(train_examples)} training examples, {batches_per_epoch} batches of {cfg.batch_size} per epoch, "
          f"device {device}, {precision}, {cfg.backward} backward"
          + (f", {dist.world_size} processes sharing each batch" if dist else ""))
    log = open_log(out_dir, state) if main else open(os.devnull, "w")
    bar = tqdm(total=total_steps, initial=state.step, desc="fine-tune", dynamic_ncols=True, disable=not main)
    tokens, t0, stop, rng_at_step_start = 0, time.perf_counter(), False, None
    first_step, t_steps = state.step, None

    def evaluate_now():  # validation metrics; the best model so far is saved. True when patience ran out
        stop = main and evaluate_and_keep_best(model, val_examples, cfg, state, out_dir, pad_id, padding_side,
                                               device, label_names, tokenizer_file, log)
        return dist.decide(stop) if dist else stop  # rank 0 evaluated alone: its answer holds for all

    def save():  # a resumable checkpoint of everything, the log up to here included
        if main:
            save_training_state(out_dir / "checkpoint", model, optimizer, state, cfg, label_names, tokenizer_file, log)

    try:
        with sigterm_as_interrupt():
            if state.eval_due:  # the run stopped during an evaluation: do it now, as the straight run did
                stop = evaluate_now()
                save()
            while state.step < total_steps and not stop:
                order = batch_order(lengths, cfg.batch_size, cfg.seed, state.epoch, group_by_length=cfg.group_by_length)
                for batch_indices in order[state.batch:]:
                    rng_at_step_start = rng_states()  # a Ctrl-C before the update redoes this step, same dropout
                    if dist:  # this rank's share of the global batch, its own dropout masks
                        batch_indices = dist.share(batch_indices)
                        dist.seed_dropout(cfg.seed, state.step)
                    pieces = list(micro_batches(train_examples, batch_indices, cfg, pad_id, padding_side, device))
                    lr = schedule(state.step)
                    # a Ctrl-C during the step waits for its end: the update, its count and the new data
                    # position happen together (an error inside leaves the step undone)
                    with interrupts_held():
                        with autocast(device, cfg.precision):
                            loss, grad_norm = train_step(model, pieces, optimizer, lr, cfg, class_weights, sync=dist)
                        epoch, end_of_epoch = state.epoch, state.batch + 1 == len(order)
                        state.step, state.batch = state.step + 1, state.batch + 1
                        if end_of_epoch:
                            state.epoch, state.batch = state.epoch + 1, 0
                        due = state.step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch
                        state.eval_due = bool(val_examples) and (due or state.step == total_steps)
                        rng_at_step_start = None
                        tokens += sum(int(b["attention_mask"].sum()) for b in pieces)
                        log_step(log, bar, state, cfg, total_steps, epoch, loss, lr, grad_norm,
                                 tokens / (time.perf_counter() - t0))
                    if state.step - first_step == ESTIMATE_AFTER:
                        print_estimate(time.perf_counter() - t_steps, ESTIMATE_AFTER - 1, total_steps - state.step,
                                       len(val_examples or []), cfg, batches_per_epoch)
                    elif state.step - first_step == 1:
                        t_steps = time.perf_counter()  # the first step warms up caches: time the ones after it
                    if state.eval_due:
                        stop = evaluate_now()
                    if (cfg.save_every and state.step % cfg.save_every == 0) or due or state.step == total_steps:
                        save()
                    if stop or state.step >= total_steps or end_of_epoch:
                        break
        if dist:  # the others wait until rank 0 has written best/ and the checkpoint
            dist.barrier()
    except KeyboardInterrupt as e:
        if dist:  # a Ctrl-C on one rank stops them all, before the next step's update
            dist.fail(e)
        if rng_at_step_start is not None:  # the step was not applied: resume redoes it, with the same dropout masks
            set_rng_states(rng_at_step_start)
        save()
        if dist:  # torchrun ends every rank once one exits: wait for rank 0's checkpoint
            dist.barrier()
        print(f"\ninterrupted at step {state.step}: checkpoint saved in {out_dir / 'checkpoint'}; "
              f"run the same command with --resume to continue")
        raise
    except Exception as e:
        if dist:  # tell the other ranks, which wait in a collective call, instead of leaving them hanging
            dist.fail(e)
        raise
    finally:
        bar.close()
        log.close()
    return {"steps": state.step, "best": state.best, "best_step": state.best_step, "stopped_early": stop,
            "seconds": time.perf_counter() - t0, "out_dir": str(out_dir)}


ESTIMATE_AFTER = 4  # steps timed before the estimate is printed (the first one is not counted)


def print_estimate(seconds, steps_timed, steps_left, val_rows, cfg, batches_per_epoch):
    """Say early how long the run will take, so nobody waits an hour unwarned. An evaluation pass runs the
    forward only, about a third of a training step's work per example."""
    per_step = seconds / steps_timed
    evals = math.ceil(steps_left / (cfg.eval_every or batches_per_epoch)) if val_rows else 0
    eval_seconds = evals * math.ceil(val_rows / cfg.batch_size) * per_step / 3
    total = per_step * steps_left + eval_seconds
    tqdm.write(f"time estimate: {per_step:.2f} s a step, about {total / 60:.1f} min for the {steps_left} steps left"
               + (f" and {evals} evaluations" if evals else "") + " (from the steps just timed)")


def log_step(log, bar, state, cfg, total_steps, epoch, loss, lr, grad_norm, tokens_per_s):
    """One line of log.jsonl per optimizer step, and the progress bar."""
    record = {"step": state.step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm}
    if state.step % cfg.log_every == 0 or state.step == total_steps:
        record["tokens_per_s"] = tokens_per_s
    log.write(json.dumps(record) + "\n")
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}", tok_s=f"{tokens_per_s:.0f}")


def evaluate_and_keep_best(model, val_examples, cfg, state, out_dir, pad_id, padding_side, device, label_names,
                           tokenizer_file, log):
    """Validation metrics; save the model if it is the best so far. Returns True when patience ran out."""
    with autocast(device, cfg.precision):
        metrics = evaluate(model, val_examples, pad_id, batch_size=2 * cfg.batch_size, padding_side=padding_side,
                           label_names=label_names, device=device)
    value = metrics[cfg.metric]
    with interrupts_held():  # the choice of best, best/, the log record and eval_due change together
        better = state.best is None or (value < state.best if cfg.metric == "loss" else value > state.best)
        if better:
            state.best, state.best_step, state.evals_without_gain = value, state.step, 0
            save_checkpoint(model, out_dir / "best", label_names, tokenizer_file)
        else:
            state.evals_without_gain += 1
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        log.write(json.dumps({"step": state.step, "eval": shown}) + "\n")
        tqdm.write(f"step {state.step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
                   + (" (best so far, saved)" if better else ""))
        state.eval_due = False
    return bool(cfg.patience) and state.evals_without_gain >= cfg.patience
