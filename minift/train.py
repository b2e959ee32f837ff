"""The training loop: batch -> forward -> loss -> backward -> clip -> AdamW -> schedule -> log.

`train()` is one function a learner can step through. Around it: the settings (TrainConfig), seeding,
precision, and checkpoints that resume exactly (model, AdamW state, every RNG, the position in the data).
"""
import contextlib
import json
import math
import random
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .checkpoints import atomic_write, load_state, read_safetensors, save_checkpoint
from .data import batch_order, collate
from .errors import MiniftError
from .evaluate import evaluate
from .gpt2 import GPT2LMHeadModel
from .layers import Dropout
from .optim import AdamW, LRSchedule, clip_grad_norm, describe_groups, param_groups, warmup_steps_for


@dataclass
class TrainConfig:
    epochs: float = 2
    batch_size: int = 32  # examples per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step (each of batch_size // grad_accum examples)
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    schedule: str = "linear"  # constant | linear | cosine
    min_lr: float = 0.0
    max_grad_norm: float = 1.0
    dropout: float | None = None  # None: the checkpoint's own rates
    precision: str = "fp32"  # fp32 | bf16 (autocast: bf16 matmuls, fp32 master weights and AdamW state) | auto
    device: str = "auto"  # auto | cpu | cuda
    backward: str = "manual"  # manual: our hand-written backward; autograd: PyTorch's (for new layers)
    seed: int = 0
    group_by_length: bool = True  # batches of similar lengths: less padding, same examples
    eval_every: int = 0  # optimizer steps between evaluations; 0: once per epoch
    metric: str = "accuracy"  # what "best" means on validation: accuracy | macro_f1 | loss
    patience: int = 0  # stop after this many evaluations without improvement; 0: never stop early
    log_every: int = 10
    save_every: int = 0  # optimizer steps between resumable checkpoints; 0: at each evaluation
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs); resumes keep counting


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


def forward_backward(model, batch, num_targets, cfg, class_weights=None):
    """Loss of one micro-batch, with the gradients added into .grad. Returns the loss (a float)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if cfg.backward == "manual":
        with torch.no_grad():  # nothing hidden: no graph is built, our backward does the work
            logits = model(**inputs)
            loss, dlogits = model.loss(logits, batch["labels"], num_targets, class_weights)
            model.backward(dlogits)
    else:
        logits = model(**inputs)
        loss, _ = model.loss(logits, batch["labels"], num_targets, class_weights)
        loss.backward()
    return loss.item()


def micro_batches(examples, order, cfg, pad_id, padding_side, device):
    """Yield the micro-batches of one optimizer step: grad_accum pieces of one batch of indices."""
    size = math.ceil(len(order) / cfg.grad_accum)
    for i in range(0, len(order), size):
        batch = collate([examples[j] for j in order[i:i + size]], pad_id, padding_side)
        yield {k: v.to(device) for k, v in batch.items()}


def train(model, train_examples, val_examples, cfg, out_dir, pad_id, label_names=None,
          tokenizer_file=None, class_weights=None, padding_side="right", resume=False):
    """Fine-tune `model` on encoded examples (see data.py). Returns a dict of what happened."""
    if cfg.metric not in ("accuracy", "macro_f1", "loss"):
        raise MiniftError(f"metric {cfg.metric!r} is unknown: choose accuracy, macro_f1 or loss")
    if isinstance(model, GPT2LMHeadModel) and cfg.metric != "loss":
        raise MiniftError("a language model is judged by its validation loss: use metric='loss'")
    if cfg.dropout is not None and not 0.0 <= cfg.dropout < 1.0:
        raise MiniftError(f"dropout {cfg.dropout} must be in [0, 1): it is the fraction of values zeroed (0.1 is usual)")
    if cfg.backward not in ("manual", "autograd"):
        raise MiniftError(f"backward {cfg.backward!r} is unknown: choose manual or autograd")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    model.to(device).train()
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    groups = param_groups(model.named_parameters(), cfg.weight_decay)
    optimizer = AdamW(groups, lr=cfg.lr)
    lengths = [len(e["input_ids"]) for e in train_examples]
    batches_per_epoch = len(batch_order(lengths, cfg.batch_size, cfg.seed, 0, group_by_length=cfg.group_by_length))
    total_steps = math.ceil(cfg.epochs * batches_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    schedule = LRSchedule(cfg.lr, total_steps, warmup_steps_for(total_steps, cfg.warmup_ratio), cfg.schedule, cfg.min_lr)
    state = {"step": 0, "epoch": 0, "batch": 0, "best": None, "best_step": None, "evals_without_gain": 0}
    if resume:
        state = load_training_state(out_dir / "checkpoint", model, optimizer, cfg)
    elif (out_dir / "checkpoint").exists():
        print(f"note: {out_dir} holds an earlier run; its checkpoint and best model will be replaced "
              "(stop now and pass --resume to continue it instead, or choose another --out)")
    print(describe_groups(groups))
    print(schedule.describe())
    precision = fast_precision(device) if cfg.precision == "auto" else cfg.precision
    print(f"{len(train_examples)} training examples, {batches_per_epoch} batches of {cfg.batch_size} per epoch, "
          f"device {device}, {precision}, {cfg.backward} backward")
    log = open(out_dir / "log.jsonl", "a" if resume else "w")
    params = [p for g in groups for p in g["params"]]
    bar = tqdm(total=total_steps, initial=state["step"], desc="fine-tune", dynamic_ncols=True)
    tokens, t0, stop, rng_at_step_start = 0, time.perf_counter(), False, None
    try:
        while state["step"] < total_steps and not stop:
            order = batch_order(lengths, cfg.batch_size, cfg.seed, state["epoch"], group_by_length=cfg.group_by_length)
            for batch_indices in order[state["batch"]:]:
                rng_at_step_start = rng_states()  # a Ctrl-C before the update redoes this step with the same dropout
                # 1. forward + loss + backward over the micro-batches; the loss is divided by the count of
                #    targets in the whole step, so grad_accum=4 gives the same gradient as one big batch
                pieces = list(micro_batches(train_examples, batch_indices, cfg, pad_id, padding_side, device))
                num_targets = sum(model.count_targets(b["labels"]) for b in pieces)
                with autocast(device, cfg.precision):
                    loss = sum(forward_backward(model, b, num_targets, cfg, class_weights) for b in pieces)
                # 2. clip once per optimizer step, after accumulation; log the norm from before clipping
                grad_norm = clip_grad_norm(params, cfg.max_grad_norm)
                check_finite(loss, grad_norm, model, state["step"] + 1, schedule(state["step"]))
                # 3. AdamW with this step's learning rate, then clear the gradients. The update, its count and
                #    the new data position happen together: a Ctrl-C in between waits for the end of the block
                lr = schedule(state["step"])
                with interrupts_held():
                    optimizer.step(lr)
                    optimizer.zero_grad()
                    epoch = state["epoch"]
                    state["step"] += 1
                    state["batch"] += 1
                    end_of_epoch = state["batch"] == len(order)
                    if end_of_epoch:
                        state["epoch"], state["batch"] = state["epoch"] + 1, 0
                    rng_at_step_start = None  # the step is done: the RNG as it is now is where to continue
                tokens += sum(int(b["attention_mask"].sum()) for b in pieces)
                # 4. log, evaluate, save
                record = {"step": state["step"], "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm}
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}",
                                tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
                if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
                    record["tokens_per_s"] = tokens / (time.perf_counter() - t0)
                log.write(json.dumps(record) + "\n")
                due = state["step"] % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch
                if val_examples and (due or state["step"] == total_steps):
                    stop = evaluate_and_keep_best(model, val_examples, cfg, state, out_dir, pad_id, padding_side,
                                                  device, label_names, tokenizer_file, log)
                if (cfg.save_every and state["step"] % cfg.save_every == 0) or due or state["step"] == total_steps:
                    save_training_state(out_dir / "checkpoint", model, optimizer, state, cfg, label_names, tokenizer_file)
                if stop or state["step"] >= total_steps or end_of_epoch:
                    break
    except KeyboardInterrupt:
        if rng_at_step_start is not None:  # the step was not applied: resume redoes it, with the same dropout masks
            set_rng_states(rng_at_step_start)
        save_training_state(out_dir / "checkpoint", model, optimizer, state, cfg, label_names, tokenizer_file)
        print(f"\ninterrupted at step {state['step']}: checkpoint saved in {out_dir / 'checkpoint'}; "
              f"run the same command with --resume to continue")
        raise
    finally:
        bar.close()
        log.close()
    return {"steps": state["step"], "best": state["best"], "best_step": state["best_step"], "stopped_early": stop,
            "seconds": time.perf_counter() - t0, "out_dir": str(out_dir)}


def evaluate_and_keep_best(model, val_examples, cfg, state, out_dir, pad_id, padding_side, device, label_names,
                           tokenizer_file, log):
    """Validation metrics; save the model if it is the best so far. Returns True when patience ran out."""
    with autocast(device, cfg.precision):
        metrics = evaluate(model, val_examples, pad_id, batch_size=2 * cfg.batch_size, padding_side=padding_side,
                           label_names=label_names, device=device)
    value = metrics[cfg.metric]
    better = state["best"] is None or (value < state["best"] if cfg.metric == "loss" else value > state["best"])
    if better:
        state["best"], state["best_step"], state["evals_without_gain"] = value, state["step"], 0
        save_checkpoint(model, out_dir / "best", label_names, tokenizer_file)
    else:
        state["evals_without_gain"] += 1
    shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    log.write(json.dumps({"step": state["step"], "eval": shown}) + "\n")
    tqdm.write(f"step {state['step']}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
               + (" (best so far, saved)" if better else ""))
    return bool(cfg.patience) and state["evals_without_gain"] >= cfg.patience


def check_finite(loss, grad_norm, model, step, lr):
    """Stop on NaN/inf before the update, naming the step (numbered as in log.jsonl), the lr and the first bad
    parameter: a weight that is already NaN/inf (the cause) if there is one, else the first bad gradient."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    named = list(model.named_parameters())
    bad = next((f"weight {n}" for n, p in named if not torch.isfinite(p).all()), None) or next(
        (f"gradient of {n}" for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()),
        "none (the loss itself)")
    raise MiniftError(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}, lr {lr:.3g}, "
                      f"first bad parameter: {bad}; the last checkpoint is intact: lower the lr or use fp32")


@contextlib.contextmanager
def interrupts_held():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and raise it at the end, so the block runs whole."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt


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


def save_training_state(folder, model, optimizer, state, cfg, label_names, tokenizer_file):
    """Everything needed to continue exactly: weights, AdamW m/v/step, RNGs, position in the data.

    Written to a new folder and swapped in by renames, so a crash leaves the previous checkpoint whole."""
    folder = Path(folder)
    new, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    save_checkpoint(model, new, label_names, tokenizer_file)
    tensors, meta = optimizer.state_dict()
    tensors.update({"rng." + k: v for k, v in rng_states().items()})
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(new / "optimizer.safetensors"))
    extra = {"python_rng": random.getstate(), "numpy_rng": np.random.get_state()}
    extra["numpy_rng"] = [extra["numpy_rng"][0], extra["numpy_rng"][1].tolist(), *extra["numpy_rng"][2:]]
    trainer_state = {"state": state, "optimizer": meta, "config": asdict(cfg), **extra}
    atomic_write(new / "trainer_state.json", lambda tmp: Path(tmp).write_text(json.dumps(trainer_state)))
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(folder, model, optimizer, cfg=None):
    """Restore the weights, the AdamW state and every RNG saved in `folder`; return the loop's position.
    With `cfg` (this run's settings), say which settings differ from the saved run's."""
    folder = Path(folder)
    if not folder.exists() and folder.with_name(folder.name + ".old").exists():
        folder = folder.with_name(folder.name + ".old")  # a crash between the two renames of a save
    if not (folder / "trainer_state.json").is_file():
        raise MiniftError(f"nothing to resume in {folder}: no trainer_state.json (start without --resume)")
    load_state(model, read_safetensors(folder))
    saved = json.loads((folder / "trainer_state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
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
    return saved["state"]
