"""ZeRO on this machine: what each of 2 processes keeps, plain data parallel vs ZeRO-1 vs ZeRO-2, SmolLM2-135M
full fine-tuning (fp32), the same global batch and steps in each mode.

    python bench/zero.py [--steps 3] [--batch 4] [--seq 64]

Per rank and mode: AdamW's m and v (bytes), the gradients held at the update (bytes), the peak RSS of the
process, seconds a step; and how far each mode's weights end from plain data parallel's (they should not).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import minift
from minift import distributed
from minift.optim import AdamW, param_groups
from minift.step import train_step

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--batch", type=int, default=4, help="global batch")
parser.add_argument("--seq", type=int, default=64)
parser.add_argument("--worker", nargs=2, metavar=("ZERO", "OUT"), help=argparse.SUPPRESS)
args = parser.parse_args()


def worker(zero, out):
    torch.set_num_threads(1)
    dist = distributed.setup("cpu")
    torch.manual_seed(0)
    model = minift.load("smollm2", task="lm", verbose=False).train()
    groups = param_groups(model, 0.01)
    optimizer = AdamW(groups, lr=1e-5, owned=dist.shard_optimizer(zero, groups) if zero else None)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.seq), generator=g)[dist.rank::dist.world_size]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    kept, times = {}, []
    real_step = AdamW.step

    def step_and_note(self, lr=None):  # at the update: what this rank holds
        kept["state"] = sum(t.numel() * t.element_size() for t in [*self.exp_avg.values(), *self.exp_avg_sq.values()])
        kept["gradients"] = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        return real_step(self, lr)
    AdamW.step = step_and_note
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step(model, [batch], optimizer, 1e-5, sync=dist)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {**kept, "peak": peak, "seconds": min(times[1:] or times)}
    Path(out, f"rank{dist.rank}.json").write_text(json.dumps(result))
    if dist.rank == 0:
        minift.save_checkpoint(model, Path(out) / "model")


if args.worker:
    worker(int(args.worker[0]), args.worker[1])
    sys.exit(0)

print(f"SmolLM2-135M, fp32, global batch {args.batch} x {args.seq}, {args.steps} steps, 2 processes x 1 thread (gloo), "
      f"torch {torch.__version__}, {os.cpu_count()} CPUs")
MB = 2**20
rows, weights = [], {}
with tempfile.TemporaryDirectory() as tmp:
    for zero in (0, 1, 2):
        out = Path(tmp, str(zero))
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--worker", str(zero), str(out)]
        done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"zero={zero} failed:\n{done.stderr[-3000:]}")
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        weights[zero] = load_file(str(out / "model" / "model.safetensors"))
        rows.append((zero, ranks))
print("| mode | rank | AdamW m+v MB | gradients MB | peak RSS MB | s/step |")
print("|---|---|---|---|---|---|")
for zero, ranks in rows:
    for r, k in enumerate(ranks):
        name = "data parallel" if zero == 0 else f"ZeRO-{zero}"
        print(f"| {name} | {r} | {k['state'] / MB:.1f} | {k['gradients'] / MB:.1f} | {k['peak'] / MB:.0f} | {k['seconds']:.2f} |")
for zero in (1, 2):
    base, other = weights[0], weights[zero]
    gap = max(float((base[k] - other[k]).abs().max()) for k in base)
    print(f"ZeRO-{zero} weights vs data parallel after {args.steps} steps: max abs difference {gap:.3g}; "
          f"rank 0 keeps {rows[zero][1][0]['state'] / rows[0][1][0]['state']:.2f} of the AdamW state")
