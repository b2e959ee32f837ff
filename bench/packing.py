"""Packing, side by side in one run: real (non-pad) tokens per second of SmolLM2-135M full fine-tuning (fp32) with
rows padded per batch (the loop's batches of similar lengths) and with rows packed into sequences of
--capacity tokens (TrainConfig.packing: best-fit, a block-diagonal causal mask), on two data sets:

- the instruction job's rows (the tweets as prompt/response rows in SmolLM2's chat template, as
  `minift finetune --task instruct` encodes them);
- a JSONL-like set with a long tail of lengths (random tokens; lengths log-normal, cut at --capacity).

The same rows, in the order the loop would take them, for --steps steps of each; the first step is not timed.
Padded batches hold --batch rows, either drawn at random (group_by_length=False, the common default) or of
similar lengths (minift's default); packed batches hold as many sequences as give the same number of rows per
step on average, so both modes train on about as many tokens a step.

    python bench/packing.py                    # 3 timed steps of each, capacity 256 (the instruct job's max_length)
"""
import argparse
import platform
import time

import numpy as np
import torch

from minift import Tokenizer, recipe
from minift.batching import batch_order, collate, pack_examples
from minift.checkpoints import load_checkpoint
from minift.corpora import load_instruction_splits
from minift.hub import resolve_model
from minift.optim import AdamW, param_groups
from minift.step import train_step
from minift.tasks import encode_instruction


def long_tail_rows(n, capacity, seed=0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=3.5, sigma=0.9, size=n).astype(int), 4, capacity)
    return [{"input_ids": ids, "labels": ids} for ids in (rng.integers(1, 49152, size=k).tolist() for k in lengths)]


def batches(examples, batch_size, steps, grouped=True):
    lengths = [len(e["input_ids"]) for e in examples]
    order = batch_order(lengths, batch_size, seed=0, epoch=0, group_by_length=grouped)[:steps + 1]
    return [collate([examples[i] for i in idx], pad_id=0) for idx in order]


def tokens_per_second(model, batch_list):
    optimizer = AdamW(param_groups(model, 0.01), lr=1e-5)
    seconds, tokens, slots = 0.0, 0, 0
    for k, batch in enumerate(batch_list):
        t0 = time.perf_counter()
        train_step(model, [batch], optimizer, 1e-5)
        if k:  # the first step allocates: not timed
            seconds += time.perf_counter() - t0
            tokens += int(batch["attention_mask"].sum())
            slots += batch["input_ids"].numel()
    return tokens / seconds, 1 - tokens / slots


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--capacity", type=int, default=recipe.INSTRUCT_JOB["max_length"])
    args = p.parse_args()
    torch.manual_seed(0)
    folder = resolve_model("smollm2")
    model = load_checkpoint(folder, "lm", verbose=False).train()
    tok = Tokenizer.from_file(folder)
    instruct, _ = encode_instruction(load_instruction_splits(None, 0)["train"][:2000], tok, args.capacity)
    sets = {"instruction job (tweets)": instruct, "long tail of lengths": long_tail_rows(2000, args.capacity)}
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; SmolLM2-135M full "
          f"fine-tuning, fp32, {args.steps} timed steps each, capacity {args.capacity}, {args.batch} rows a padded batch")
    print(f"{'data':26s} {'mean len':>8s} {'mode':>24s} {'pad %':>6s} {'tokens/s':>9s} {'x':>6s}")
    for name, examples in sets.items():
        mean = float(np.mean([len(e["input_ids"]) for e in examples]))
        packed = pack_examples(examples, args.capacity)
        per_step = max(1, round(args.batch * len(packed) / len(examples)))  # as many rows a step, on average
        modes = {"padded, random batches": batches(examples, args.batch, args.steps, grouped=False),
                 "padded, similar lengths": batches(examples, args.batch, args.steps),
                 "packed": batches(packed, per_step, args.steps)}
        base = None
        for mode, batch_list in modes.items():
            rate, waste = tokens_per_second(model, batch_list)
            base = base or rate
            print(f"{name if mode.endswith('random batches') else '':26s} {mean:8.1f} {mode:>24s} {100 * waste:6.1f} "
                  f"{rate:9.1f} {rate / base:6.2f}")

if __name__ == "__main__":
    main()
