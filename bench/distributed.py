"""Data parallel on this machine: 2 processes x 1 thread (gloo) vs 1 process x 2 threads, one MiniLM classifier
training step on the same global batch (32 x 64 by default), and the all-reduce's share of the step.

    python bench/distributed.py [--steps 8] [--batch 32] [--seq 64] [--device cpu|cuda]

On a 2-core CPU there is no speed-up to expect: one process already uses both cores for its matmuls; two
processes split the batch instead, and pay for the all-reduce of the gradients (22.7M floats, about 90 MB,
added up across the two processes every step). What this measures is that overhead. With --device cuda and
as many GPUs as --nproc, the ranks talk over NCCL instead.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

import minift
from minift import distributed
from minift.optim import AdamW, param_groups
from minift.step import train_step

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=8, help="timed steps (after one warm-up step)")
parser.add_argument("--batch", type=int, default=32, help="global batch")
parser.add_argument("--seq", type=int, default=64)
parser.add_argument("--nproc", type=int, default=2)
parser.add_argument("--device", default="cpu")
parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
args = parser.parse_args()


class TimedSync:
    """The Distributed object of train_step, with a stopwatch around its gradient all-reduce."""

    def __init__(self, dist):
        self.dist, self.seconds = dist, 0.0

    def count(self, n):
        return self.dist.count(n)

    def gradients(self, params, loss):
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = self.dist.gradients(params, loss)
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        return loss


def measure(dist):
    """Median seconds of a whole step and of its all-reduce (0 in a single process)."""
    device = dist.device if dist else torch.device(args.device)
    torch.manual_seed(0)
    model = minift.load("minilm", task="classify", num_labels=3, verbose=False).to(device).train()
    optimizer = AdamW(param_groups(model, 0.01), lr=5e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=g)
    labels = torch.randint(0, 3, (args.batch,), generator=g)
    rows = slice(dist.rank, None, dist.world_size) if dist else slice(None)  # this rank's share
    batch = {"input_ids": ids[rows].to(device), "attention_mask": torch.ones_like(ids[rows]).to(device),
             "labels": labels[rows].to(device)}
    sync = TimedSync(dist) if dist else None
    steps, syncs = [], []
    for i in range(args.steps + 1):
        if sync:
            sync.seconds = 0.0
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(model, [batch], optimizer, 5e-5, sync=sync)  # fp32: no autocast around it
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step warms up caches
            steps.append(time.perf_counter() - t0)
            syncs.append(sync.seconds if sync else 0.0)
    return statistics.median(steps), statistics.median(syncs)


if args.worker:
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    dist = distributed.setup(args.device)
    step, sync = measure(dist)
    # the slowest rank sets the pace; report rank 0's numbers (the others are silenced)
    print(f"RESULT {step:.4f} {sync:.4f}")
    sys.exit(0)

print(f"MiniLM classifier, global batch {args.batch} x {args.seq}, fp32, {args.device}, torch {torch.__version__}, "
      f"{os.cpu_count()} CPUs")
torch.set_num_threads(args.nproc if args.device == "cpu" else torch.get_num_threads())
one_step, _ = measure(None)
print(f"1 process x {torch.get_num_threads()} threads: {one_step:.3f} s a step")
env = {**os.environ, "OMP_NUM_THREADS": "1"}
cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc), __file__,
       "--worker", "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
       "--device", args.device]
done = subprocess.run(cmd, env=env, capture_output=True, text=True)
line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT")), None)
if line is None:
    sys.exit(f"the {args.nproc}-process run failed:\n{done.stderr[-3000:]}")
step, sync = map(float, line.split()[1:])
print(f"{args.nproc} processes x 1 thread{'' if args.device == 'cpu' else ' (one GPU each)'}: {step:.3f} s a step, "
      f"of which the gradient all-reduce {sync:.3f} s ({100 * sync / step:.0f}%)")
print(f"ratio: {step / one_step:.2f}x the single process's step time")
