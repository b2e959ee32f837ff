"""The training loop around one step (step.py): what trains, setup, the loop over batches, evaluation,
checkpoints, the log.

    minift.train(model, TrainData(train_examples, val_examples, tok.pad_id), TrainConfig(), "runs/mine")

`train()` is the shell a learner steps through; `prepare_model` is the one place that decides what trains;
the step itself is `minift.step.train_step`. Exact resume and Ctrl-C live in resume.py, the settings and
their checks in config.py, what a run leaves in its folder (best/, adapter/) in outputs.py.
"""
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .batching import TrainData, batch_order, pack_examples
from .config import TrainConfig, check_config
from . import distributed
from .errors import MiniftError
from .freeze import blocks, count_trainable, describe_trainable, freeze, mark_frozen_below
from .layers import Dropout
from .lora import add_lora, lora_layers, lora_summary
from .memory import estimate_memory, format_memory, keep_freed_memory, levers_by_gain, levers_not_on
from .objective import objective_of
from .optim import AdamW, LRSchedule, describe_groups, param_groups, warmup_steps_for
from .quantize import quantize_base
from .outputs import export_best
from .report import write_report
from .resume import (LoopState, interrupts_held, load_training_state, move_earlier_run_aside, open_log, rng_states,
                     save_training_state, set_rng_states, sigterm_as_interrupt)
from .step import train_step


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


def fast_precision(device):
    """bf16 where the hardware runs bf16 matmuls natively (recent GPUs; CPUs with AVX512-BF16 or AMX), else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def resolved_precision(precision, device):
    """The precision a run computes in: `precision` (a TrainConfig value), with auto made concrete for this device."""
    return fast_precision(device) if precision == "auto" else precision


def autocast(device, precision):
    """bf16 autocast: matmuls in bf16, softmax/LayerNorm/loss in fp32, weights stay fp32."""
    precision = resolved_precision(precision, device)
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    if precision != "bf16":
        raise MiniftError(f"precision {precision!r} is not supported: use fp32 or bf16")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise MiniftError("this GPU has no bf16 support: use --precision fp32")
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise MiniftError("this CPU has no native bf16 matmul (AVX512-BF16 or AMX): use --precision fp32")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def set_dropout(model, p):
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p = p


def prepare_model(model, cfg):
    """The one place that decides what trains, applied once before AdamW is built: the dropout rate, LoRA
    adapters (lora_r > 0: the pretrained body is frozen, the adapters and a new task head train), the frozen
    parts (freeze), where the backward may stop (freeze.mark_frozen_below), which blocks keep only their input
    (recompute.py: every cfg.recompute-th), and how many positions the chunked LM loss takes at once (heads.py).
    Returns a line saying what trains."""
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    if cfg.lora_r:
        if lora_layers(model):
            raise MiniftError("this model already has LoRA layers: pass lora_r=0 to train them as they are, or "
                              "give train() a model without adapters")
        add_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    if cfg.quantize != "none":  # after LoRA: the adapted layers' frozen weights go into 8- or 4-bit blocks
        quantize_base(model, cfg.quantize)
    if cfg.freeze:
        freeze(model, cfg.freeze)
    mark_frozen_below(model)
    for i, block in enumerate(blocks(model)):
        block.recompute = cfg.recompute > 0 and i % cfg.recompute == 0
    if cfg.chunked_loss and (model.task != "lm" or any(n.startswith("lm_head") for n in lora_layers(model))):
        raise MiniftError("chunked_loss splits a language model's head (a plain matrix) and its loss: set it to 0 "
                          "for a classifier, or leave lm_head out of lora_targets")
    if model.task == "lm":
        model.loss_chunk = cfg.chunked_loss
    if count_trainable(model)[0] == 0:
        raise MiniftError(f"nothing is left to train (freeze={cfg.freeze}): freeze fewer parts, e.g. "
                          "freeze=['layers:2'], or train LoRA adapters")
    return lora_summary(model) if lora_layers(model) else describe_trainable(model)


def micro_batches(examples, order, cfg, objective, device):
    """Yield the micro-batches of one optimizer step: grad_accum pieces of one batch of indices."""
    size = max(1, math.ceil(len(order) / cfg.grad_accum))  # (a rank's share of a last, small batch may be empty)
    for i in range(0, len(order), size):
        yield objective.collate([examples[j] for j in order[i:i + size]], device)


def train(model, data, cfg, out_dir, resume=False):
    """Fine-tune `model` on `data` (a batching.TrainData of encoded examples) with the settings `cfg`; write
    the log, checkpoints and the best model into `out_dir`. Returns a dict of what happened.

    The shell around the step (minift.step.train_step): set up, then batch after batch one step, its log
    line, an evaluation when one is due and a checkpoint when one is due. A Ctrl-C or SIGTERM saves a
    checkpoint that `resume=True` continues exactly. At the end (or a Ctrl-C) OUT/report.html draws the curves
    (report.py)."""
    keep_freed_memory()  # each step's large temporaries reuse the last step's memory (memory.py says why)
    run = set_up(model, data, cfg, out_dir, resume)
    state, stop = run.state, False
    try:
        with sigterm_as_interrupt():
            if state.eval_due:  # the run stopped during an evaluation: do it now, as the straight run did
                stop = evaluate_now(run)
                save(run)
            while state.step < run.total_steps and not stop:
                order = batch_order(run.lengths, cfg.batch_size, cfg.seed, state.epoch, group_by_length=cfg.group_by_length)
                for batch_indices in order[state.batch:]:
                    end_of_epoch, due = one_step(run, batch_indices, len(order))
                    if state.eval_due:
                        stop = evaluate_now(run)
                    if (cfg.save_every and state.step % cfg.save_every == 0) or due or state.step == run.total_steps:
                        save(run)
                    if stop or state.step >= run.total_steps or end_of_epoch:
                        break
        if run.dist:  # the others wait until rank 0 has written best/ and the checkpoint
            run.dist.barrier()
    except KeyboardInterrupt as e:
        if run.dist:  # a Ctrl-C on one rank stops them all, before the next step's update
            run.dist.fail(e)
        save_where_it_stopped(run)
        if run.dist:  # torchrun ends every rank once one exits: wait for rank 0's checkpoint
            run.dist.barrier()
        print(f"\ninterrupted at step {state.step}: checkpoint saved in {run.out_dir / 'checkpoint'}; "
              f"run the same command with --resume to continue")
        if run.main:  # the page of the steps done (report.py)
            print(f"report page of the steps so far: {write_report(run.out_dir)}")
        raise
    except Exception as e:
        if run.dist and distributed.is_timeout(e):  # another rank hangs: asking it anything would wait again
            if not cfg.zero:  # (under ZeRO the stuck rank holds a share of AdamW's state: the last checkpoint stays)
                save_where_it_stopped(run)
            raise stuck_error(e, run) from None
        if run.dist:  # tell the other ranks, which wait in a collective call, instead of leaving them hanging
            run.dist.fail(e)
        if is_out_of_memory(e):
            raise out_of_memory_error(e, cfg, max(run.lengths), run.model, run.memory) from None
        raise
    finally:
        run.bar.close()
        run.log.close()
    page = write_report(run.out_dir) if run.main else None  # the curves so far (a job's finish adds its results)
    if stop:
        print(f"stopped early at step {state.step}: {cfg.patience} evaluations without a better validation {run.metric} "
              f"(patience {cfg.patience}); the best model is from step {state.best_step}; report page: {page}")
    return {"steps": state.step, "metric": run.metric, "best": state.best, "best_step": state.best_step,
            "best_metrics": state.best_metrics,
            "stopped_early": stop, "seconds": time.perf_counter() - run.t0, "out_dir": str(run.out_dir),
            "precision": resolved_precision(cfg.precision, run.device)}


@dataclass
class StepClock:
    """Timings of early steps, for the time estimate (see note_step_time)."""
    timing: list = field(default_factory=list)  # (seconds, padded tokens) of steps of batch shapes seen before
    shapes_seen: set = field(default_factory=set)
    estimated: bool = False  # the estimate has been printed


@dataclass
class Run:
    """What train() sets up once and every step, evaluation and save works with."""
    model: object
    data: TrainData
    cfg: TrainConfig
    objective: object  # what is trained (objective.py): data.objective, or the model's own loss
    metric: str  # the validation figure that chooses best/ (cfg.metric, 'auto' made concrete by the objective)
    optimizer: AdamW
    schedule: LRSchedule
    state: LoopState
    out_dir: Path
    lengths: list  # of each training example, for batching by length
    total_steps: int
    device: torch.device
    dist: object  # distributed.Distributed under torchrun, else None
    run_info: dict  # what a resume must find the same (resume.check_same_run)
    log: object
    bar: object
    t0: float = field(default_factory=time.perf_counter)
    tokens: int = 0  # tokens trained on in this process, for the tokens/s on the progress bar
    rng_at_step_start: dict | None = None  # set while a step is under way (a Ctrl-C redoes it with these)
    clock: StepClock = field(default_factory=StepClock)
    memory: dict | None = None  # memory.estimate_memory's figures (rank 0), for an out-of-memory message
    saved_step: int | None = None  # the step of the checkpoint on disk, if any

    @property
    def main(self):  # the one process that prints, evaluates and writes
        return self.dist is None or self.dist.is_main


def set_up(model, data, cfg, out_dir, resume):
    """Check the settings, decide what trains, put the model on its device, build AdamW and the lr plan,
    start fresh or restore a checkpoint, and say what is about to happen."""
    check_config(cfg)
    objective = objective_of(data, cfg)
    check_task(model, data, cfg, objective)
    metric = objective.metric(model, cfg)
    if cfg.packing:  # rows packed into sequences of cfg.packing tokens; a batch counts sequences now
        rows, data = len(data.train), replace(data, train=pack_examples(data.train, cfg.packing))
        if len(data.train) == rows > 1:  # every row alone: the setting would cost a mask and change nothing
            shortest = sorted(len(e["input_ids"]) for e in data.train)[:2]
            raise MiniftError(f"packing={cfg.packing} put no two rows together (the two shortest have {shortest[0]} and "
                              f"{shortest[1]} tokens): give packing at least {sum(shortest)}, e.g. a few times the "
                              "typical row, or 0 for no packing")
        fill = sum(len(e["input_ids"]) for e in data.train) / (len(data.train) * cfg.packing)
        print(f"packing: {rows} rows into {len(data.train)} sequences of up to {cfg.packing} tokens, {fill:.0%} full")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = distributed.setup(cfg.device)  # None unless torchrun started several processes (distributed.py)
    device = dist.device if dist else pick_device(cfg.device)
    if dist and cfg.batch_size < dist.world_size:
        raise MiniftError(f"batch_size {cfg.batch_size} is smaller than the {dist.world_size} processes: the batch "
                          "is global (shared by all of them), so give at least one example per process")
    trains = prepare_model(model, cfg)  # before .to(device): adapters are drawn on the CPU, the same everywhere
    model.to(device).train()
    groups = param_groups(model, cfg.weight_decay, cfg.head_lr_scale)
    owned = dist.shard_optimizer(cfg.zero, groups) if dist and cfg.zero else None  # ZeRO: this rank's tensors
    optimizer = AdamW(groups, lr=cfg.lr, owned=owned)
    lengths = [len(e["input_ids"]) for e in data.train]
    batches_per_epoch = len(batch_order(lengths, cfg.batch_size, cfg.seed, 0, group_by_length=cfg.group_by_length))
    total_steps = math.ceil(cfg.epochs * batches_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    schedule = LRSchedule(cfg.lr, total_steps, warmup_steps_for(total_steps, cfg.warmup_ratio), cfg.schedule, cfg.min_lr)
    run_info = {"data": data_fingerprint(data), "processes": dist.world_size if dist else 1,
                "labels": model.label_names, "model": model_fingerprint(model),
                "objective": objective.settings()}
    if dist:
        dist.check_same_plan([total_steps, len(data.train), int(run_info["data"], 16)])
    main = dist is None or dist.is_main
    memory = None
    if main:  # before any RNG is seeded or restored: its forward's dropout draws change nothing that follows
        try:
            memory = estimate_memory(model, longest_batch(data, cfg, objective, device))
            print(format_memory(memory))
        except Exception as e:  # the longest batch is the first to run out of memory: say so before any step
            if is_out_of_memory(e):
                raise out_of_memory_error(e, cfg, max(lengths), model) from None
            raise
    if resume:
        state = load_training_state(out_dir / "checkpoint", model, optimizer, cfg, run_info)
    else:
        if main:
            move_earlier_run_aside(out_dir)
        seed_everything(cfg.seed)
        state = LoopState()
    if dist:  # every rank starts from rank 0's weights
        dist.broadcast_weights(model)
    print(trains + " | " + describe_groups(optimizer.groups))
    if cfg.zero:
        print(describe_zero(cfg.zero, optimizer, dist))
    print(schedule.describe())
    print(f"{len(data.train)} training examples, {batches_per_epoch} batches of {cfg.batch_size} per epoch, "
          f"device {device}, {resolved_precision(cfg.precision, device)}, {cfg.backward} backward"
          + (f", {dist.world_size} processes sharing each batch" if dist else ""))
    log = open_log(out_dir, state) if main else open(os.devnull, "w")
    bar = tqdm(total=total_steps, initial=state.step, desc="fine-tune", dynamic_ncols=True, disable=not main)
    return Run(model, data, cfg, objective, metric, optimizer, schedule, state, out_dir, lengths, total_steps, device,
               dist, run_info, log, bar, memory=memory, saved_step=state.step if resume else None)


def describe_zero(level, optimizer, dist):
    """One line: how much of AdamW's state this process keeps under ZeRO (or that one process has nothing to share)."""
    if dist is None:
        return f"zero={level}: one process, nothing to shard (start several with torchrun); plain AdamW"
    kept = sum(m.numel() * m.element_size() * 2 for m in optimizer.exp_avg.values())  # m and v
    every = sum(p.numel() * p.element_size() * 2 for p in optimizer.params)
    return (f"ZeRO-{level}: rank {dist.rank} keeps AdamW's m and v for {len(optimizer.exp_avg)} of {len(optimizer.params)} "
            f"tensors, {kept / 2**20:.1f} MB of {every / 2**20:.1f} MB" + (", and their gradients only" if level == 2 else ""))


def check_task(model, data, cfg, objective):
    """What a task needs from its settings and data, said before any work is done: the objective refuses what it
    cannot honour (objective.py)."""
    if not data.train:
        raise MiniftError("no training examples: check the data file (and --limit)")
    objective.check(model, data, cfg)


def longest_batch(data, cfg, objective, device):
    """The micro-batch of the longest examples (training or validation) as the step's forward sees it (a pair's two
    rows, a prompt's samples): the memory estimate's worst case, and a forward that meets any text too long for the
    model before the first step does."""
    rows = sorted(data.train + (data.validation or []), key=lambda e: -len(e["input_ids"]))
    return objective.memory_batch(rows[:max(1, cfg.batch_size // cfg.grad_accum)], device)


def data_fingerprint(data):
    """A short hash of the encoded training and validation examples, which a resume must find the same."""
    digest = hashlib.sha256()
    for part in (data.train, data.validation or []):
        digest.update(json.dumps(part).encode())
    return digest.hexdigest()[:15]


def model_fingerprint(model):
    """A short hash of the parameter names and shapes (LoRA layers included): another model, another hash."""
    shapes = [(name, list(p.shape)) for name, p in model.named_parameters()]
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:15]


def is_out_of_memory(e):
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def out_of_memory_error(e, cfg, longest, model, memory=None):
    """A torch out-of-memory error as one line that says what to lower, and the memory levers not on yet: the one
    that gives most back first, with set-up's estimate of how much (when it got that far)."""
    levers = levers_by_gain(memory) if memory else levers_not_on(model)
    return MiniftError(f"out of memory ({str(e).splitlines()[0][:80]}): lower batch_size (now {cfg.batch_size}; "
                       f"or raise grad_accum), max_length (the longest example has {longest} tokens), train fewer "
                       f"weights (freeze=['embeddings', 'layers:N'] or LoRA)" + "".join(f", or {x}" for x in levers))


def stuck_error(e, run):
    """A collective call that timed out, as one line that says what was kept and how to go on."""
    why = str(e).splitlines()[0].rpartition("] ")[2][:80]  # gloo's message after its source-file prefix
    waited = (f"rank {run.dist.rank} waited {distributed.timeout_seconds():g} s for the other processes ({why}): one "
              "of them is stuck or gone. ")
    if run.saved_step is None:
        return MiniftError(waited + "No checkpoint was saved yet: start the run again (MINIFT_COLLECTIVE_TIMEOUT sets the "
                           "wait, in seconds)")
    return MiniftError(waited + f"The checkpoint of step {run.saved_step} is in {run.out_dir / 'checkpoint'}: run the "
                       "same command with --resume (MINIFT_COLLECTIVE_TIMEOUT sets the wait, in seconds)")


def one_step(run, batch_indices, batches_in_epoch):
    """One optimizer step on one batch, counted and logged. Returns (end of epoch, evaluation due by the plan)."""
    cfg, state = run.cfg, run.state
    started = time.perf_counter()
    run.rng_at_step_start = rng_states()  # a Ctrl-C before the update redoes this step with the same dropout
    if run.dist:  # this rank's share of the global batch, and its own dropout masks
        batch_indices = run.dist.share(batch_indices)
        run.dist.seed_dropout(cfg.seed, state.step)
    pieces = list(micro_batches(run.data.train, batch_indices, cfg, run.objective, run.device))
    lr = run.schedule(state.step)
    # a Ctrl-C during the step waits for its end: the update, its count, the new data position and its log
    # line happen together (an error inside leaves the step undone)
    with interrupts_held():
        with autocast(run.device, cfg.precision):
            loss, grad_norm, metrics = train_step(run.model, pieces, run.optimizer, lr, cfg.max_grad_norm, run.objective,
                                                  sync=run.dist)
        epoch, end_of_epoch = state.epoch, state.batch + 1 == batches_in_epoch
        state.step, state.batch = state.step + 1, state.batch + 1
        if end_of_epoch:
            state.epoch, state.batch = state.epoch + 1, 0
        due = state.step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch
        state.eval_due = bool(run.data.validation) and (due or state.step == run.total_steps)
        run.rng_at_step_start = None
        run.tokens += sum(int(b["attention_mask"].sum()) for b in pieces)
        log_step(run, epoch, loss, lr, grad_norm, metrics)
    if not run.clock.estimated:
        note_step_time(run, pieces, time.perf_counter() - started)
    return end_of_epoch, due


ESTIMATE_AFTER = 20  # steps of already-seen batch shapes timed before the estimate is printed,
ESTIMATE_SECONDS = 30.0  # and seconds of them


def note_step_time(run, pieces, seconds):
    """Time early steps for the estimate. A batch of a shape not seen before also builds its matrix kernels
    (oneDNN makes them per shape and caches them): an estimate from the first 20 steps, mostly new shapes,
    came out 30-40% high. So only steps of shapes already seen count, as most of the run is made of them;
    and at least ESTIMATE_SECONDS of them, as a shared machine's speed wanders from one second to the next."""
    clock = run.clock
    shape = tuple(tuple(b["input_ids"].shape) for b in pieces)
    if shape in clock.shapes_seen:
        clock.timing.append((seconds, sum(b["input_ids"].numel() for b in pieces)))
        if len(clock.timing) >= ESTIMATE_AFTER and sum(s for s, _ in clock.timing) >= ESTIMATE_SECONDS:
            clock.estimated = True
            if run.main:
                print_estimate(run)
    clock.shapes_seen.add(shape)


def print_estimate(run):
    """Say early how long the run will take, so nobody waits an hour unwarned. Batches differ in length (they
    are grouped by it), so the time is counted per padded token and multiplied by the padded tokens of the
    batches still to come; an evaluation runs the forward only, about a third of a step's work per token."""
    cfg, state, timing = run.cfg, run.state, run.clock.timing
    per_token = sum(s for s, _ in timing) / sum(n for _, n in timing)
    left, epoch, first = run.total_steps - state.step, state.epoch, state.batch
    tokens = 0
    while left > 0:
        order = batch_order(run.lengths, cfg.batch_size, cfg.seed, epoch, group_by_length=cfg.group_by_length)
        batches = order[first:first + left]
        tokens += sum(len(b) * max(run.lengths[i] for i in b) for b in batches)
        left, epoch, first = left - len(batches), epoch + 1, 0
    n_batches = math.ceil(len(run.lengths) / cfg.batch_size)
    validation = run.data.validation or []
    evals = math.ceil((run.total_steps - state.step) / (cfg.eval_every or n_batches)) if validation else 0
    eval_tokens = evals * sum(len(e["input_ids"]) for e in validation)
    total = per_token * (tokens + eval_tokens / 3)
    tqdm.write(f"time estimate: about {total / 60:.1f} min for the {run.total_steps - state.step} steps left"
               + (f" and {evals} evaluation{'s' if evals > 1 else ''}" if evals else "")
               + f" ({per_token * 1e3:.3f} ms per padded token over {len(timing)} steps of batch shapes already seen)")


def log_step(run, epoch, loss, lr, grad_norm, metrics=None):
    """One line of log.jsonl per optimizer step (with a job's own metrics: DPO's rewards, GRPO's), and the progress bar."""
    state, tokens_per_s = run.state, run.tokens / (time.perf_counter() - run.t0)
    record = {"step": state.step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm, **(metrics or {})}
    if state.step % run.cfg.log_every == 0 or state.step == run.total_steps:
        record["tokens_per_s"] = tokens_per_s
    run.log.write(json.dumps(record) + "\n")
    run.bar.update(1)
    run.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{grad_norm:.2f}", tok_s=f"{tokens_per_s:.0f}")


def evaluate_like_training(model, examples, data, cfg, device):
    """A split's metrics as the loop measures validation (its precision, its batch size): every split a run
    reports is measured this way, so one model has one number per split wherever it is printed."""
    with autocast(device, cfg.precision):
        return objective_of(data, cfg).evaluate(model, examples, device, batch_size=2 * cfg.batch_size)


def evaluate_now(run):
    """Validation metrics, and the best model so far saved (rank 0). True when patience ran out."""
    stop = run.main and evaluate_and_keep_best(run)
    return run.dist.decide(stop) if run.dist else stop  # rank 0 evaluated alone: its answer holds for all


def evaluate_and_keep_best(run):
    """Validation metrics; save the model if it is the best so far. Returns True when patience ran out."""
    cfg, state, started = run.cfg, run.state, time.perf_counter()
    metrics = evaluate_like_training(run.model, run.data.validation, run.data, cfg, run.device)
    value = metrics[run.metric]
    with interrupts_held():  # the choice of best, best/, the log record and eval_due change together
        better = state.best is None or (value < state.best if run.metric == "loss" else value > state.best)
        if better:
            state.best, state.best_step, state.evals_without_gain = value, state.step, 0
            state.best_metrics = metrics
            export_best(run.model, run.out_dir)
        else:
            state.evals_without_gain += 1
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        # wall-clock seconds since train() began in this process, and of this evaluation: time to accuracy
        clock = {"seconds": round(time.perf_counter() - run.t0, 2), "eval_seconds": round(time.perf_counter() - started, 2)}
        run.log.write(json.dumps({"step": state.step, "eval": shown, **clock}) + "\n")
        tqdm.write(f"step {state.step}: validation " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
                   + (" (best so far, saved)" if better else ""))
        state.eval_due = False
    return bool(cfg.patience) and state.evals_without_gain >= cfg.patience


def save_where_it_stopped(run):
    """A checkpoint of the last step done, when a run stops between two: a step that had not reached its update
    is redone on resume, with the same dropout masks (its RNG state is put back first)."""
    if run.rng_at_step_start is not None:
        set_rng_states(run.rng_at_step_start)
    save(run)


def save(run):
    """A resumable checkpoint of everything, the log up to here included (rank 0 writes it; under ZeRO it first
    gathers every rank's share of AdamW's state, so the file is the same as without)."""
    optimizer_state = run.dist.gather_optimizer_state(run.optimizer) if run.dist and run.cfg.zero else None
    if run.main:
        save_training_state(run.out_dir / "checkpoint", run.model, run.optimizer, run.state, run.cfg, run.run_info,
                            run.log, optimizer_state)
    run.saved_step = run.state.step
