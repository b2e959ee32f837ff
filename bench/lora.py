"""Full fine-tuning vs LoRA, side by side in one run: time of one training step (forward + backward + clip +
AdamW), peak memory, trainable parameters. Two tasks: the default tweet classifier (MiniLM, batch 32 x 64
tokens) and instruction tuning SmolLM2-135M-Instruct (batch 8 of the tweets as one-word-answer prompts,
padded to 96 tokens).

    python bench/lora.py                       # MiniLM, fp32, 10 timed rounds
    python bench/lora.py --task instruct --precision bf16 --rounds 5

Modes: full (every parameter trains), lora-qv (LoRA r=8, alpha=16 on query and value: the LoRA paper's
choice) and lora-all (r=8, alpha=16 on every linear layer of the encoder). The classification head trains in
all three. The steps take turns, one step of each mode per round (in reverse order every other round), so
that a slow spell of a shared machine hits all alike; times are medians over the rounds after 3 warm-up
rounds, and a ratio is the median over rounds of the ratio within each round. Peak memory is measured apart,
each mode in a fresh process (peak RSS after 3 steps: weights + AdamW state + what one step holds at its
peak). The weights are the real all-MiniLM-L6-v2 and the batch is 32 real tweets padded to 64 tokens.
"""
import argparse
import statistics
import subprocess
import sys
import time

import torch

import minift
from minift import recipe
from minift.batching import collate
from minift.corpora import load_classification_splits
from minift.lora import add_lora
from minift.optim import AdamW, param_groups
from minift.report import cpu_name  # (bench/preference.py, rollouts.py, align_task.py take it from here)
from minift.step import train_step
from minift.tasks import encode_classification
from minift.train import autocast

MODES = {"full": None, "lora-qv": (["query", "value"], 8, 16), "lora-all": ("all-linear", 8, 16)}
QV = {"classify": ["query", "value"], "instruct": ["q_proj", "v_proj"]}
SHAPE = {"classify": (32, 64), "instruct": (8, 96)}


def make_batch(task):
    """A fixed batch of real tweets, padded to the task's shape so that every mode sees the same work."""
    from minift.corpora import load_instruction_splits
    from minift.tasks import encode_instruction

    rows_n, seq = SHAPE[task]
    tok = minift.load_tokenizer(recipe.MODEL if task == "classify" else recipe.INSTRUCT_JOB["model"])
    if task == "classify":
        splits, labels = load_classification_splits()
        rows = encode_classification(splits["train"][:rows_n], tok, labels, seq)
    else:
        rows, _ = encode_instruction(load_instruction_splits(None, 0)["train"][:rows_n], tok, seq)  # chat template
    batch = collate(rows, tok.pad_id)
    pad = seq - batch["input_ids"].shape[1]
    batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, pad), value=tok.pad_id)
    batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, pad))
    if task == "instruct":
        batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, pad), value=-100)
    return batch


def make_step(mode, precision, task="classify"):
    """A model set up for `mode` and a function that runs one optimizer step on a fixed batch."""
    batch = make_batch(task)
    if task == "classify":
        model = minift.load(recipe.MODEL, task="classify", num_labels=3, pooling=recipe.POOLING, verbose=False)
    else:
        model = minift.load(recipe.INSTRUCT_JOB["model"], task="lm", verbose=False)
    summary = "every parameter"
    if MODES[mode] is not None:
        targets, r, alpha = MODES[mode]
        summary = add_lora(model, QV[task] if targets == ["query", "value"] else targets, r=r, alpha=alpha)
    model.train()
    optimizer = AdamW(param_groups(model, 0.01), lr=1e-5)  # the trainable tensors only: frozen ones get no state
    device = torch.device("cpu")

    def step():
        with autocast(device, precision):
            train_step(model, [batch], optimizer, 1e-5)

    return step, sum(p.numel() for p in model.parameters() if p.requires_grad), summary


def own_peak_rss_mb():
    """This process's peak RSS (Linux VmHWM: unlike ru_maxrss it is not inherited from the parent)."""
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def peak_rss_mb(mode, precision, task):
    cmd = [sys.executable, __file__, "--precision", precision, "--memory-of", mode, "--task", task]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--task", default="classify", choices=["classify", "instruct"])
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one mode, fresh process
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.memory_of:
        step, _, _ = make_step(args.memory_of, args.precision, args.task)
        for _ in range(3):
            step()
        print(own_peak_rss_mb())
        return

    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, {args.precision}; " + ("MiniLM classifier" if args.task == "classify" else
          "SmolLM2-135M instruction tuning") + " batch {} x {}".format(*SHAPE[args.task]))
    steps, counts = {}, {}
    for mode in MODES:
        steps[mode], counts[mode], summary = make_step(mode, args.precision, args.task)
        print(f"{mode}: {summary}")
    times = {mode: [] for mode in MODES}
    for r in range(3 + args.rounds):
        for mode in list(MODES)[::1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            steps[mode]()
            if r >= 3:
                times[mode].append(time.perf_counter() - t)
    print(f"\n| mode | trainable parameters | step time (median of {args.rounds}) | x faster than full | peak RSS |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        ratio = statistics.median(f / m for f, m in zip(times["full"], times[mode]))
        print(f"| {mode} | {counts[mode]:,} | {statistics.median(times[mode]):.3f} s | x{ratio:.2f} | "
              f"{peak_rss_mb(mode, args.precision, args.task):.0f} MB |")


if __name__ == "__main__":
    main()
