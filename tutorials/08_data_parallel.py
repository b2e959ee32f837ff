# %% [markdown]
# # Stage 8: past one process: data parallel training with torch.distributed
#
# One process works through a batch of 32 tweets per optimizer step. With N processes (N GPUs, or N
# machines) each takes 32/N of the same batch, and they must still make the update that one process with
# all 32 would make. That is **data parallelism**: every process (a *rank*) holds a full copy of the
# model, and only the data is split.
#
# After the backward each rank has the gradient of *its* examples. The ranks add their gradients up with
# one collective call, **all-reduce**: every rank hands in a tensor and every rank gets back the sum.
#
#     rank 0: g0 ──┐                 ┌──> g0 + g1
#                  ├── all-reduce ───┤
#     rank 1: g1 ──┘                 └──> g0 + g1
#
# Two details make the sum exactly one big batch's gradient (minift/distributed.py, about 150 lines):
# 1. the loss is a mean over the supervised targets of the *whole* global batch, so before anything is
#    normalised the ranks all-reduce their *count* of targets, and each divides by the global count;
# 2. the gradients travel in a few flat buckets (one `torch.cat`, one all-reduce, a split back), not one
#    call per tensor: a call has a fixed cost, and a model has hundreds of tensors.
# Then every rank holds the same gradient, clips it by the same global norm and makes the same AdamW step,
# so the copies stay identical. Only rank 0 prints and writes files; dropout masks differ per rank (a
# per-rank seed); an error on one rank stops all of them instead of leaving them waiting.
#
# PyTorch's `DistributedDataParallel` does step 2 with hooks on autograd. Our backward does not use autograd,
# so those hooks would never fire; here the synchronisation is written out, in `Distributed.gradients`.
#
# The launcher is PyTorch's own `torchrun`, which starts N copies of a script and tells each who it is
# (RANK, WORLD_SIZE, MASTER_ADDR ...):
#
#     torchrun --standalone --nproc_per_node 2 -m minift finetune --limit 400 --epochs 1
#
# This lesson trains MiniLM on a slice of the tweets twice, once in one process and once in two processes
# (gloo, over 127.0.0.1), and compares the weights.
#
#     python tutorials/08_data_parallel.py --quick    # < 1 min: 6 steps of 16 tweets, three times
#     python tutorials/08_data_parallel.py            # 30 steps of 32 tweets (a few minutes on 2 cores)

# %%
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import minift
from minift.corpora import load_classification_splits
from minift.tasks import encode_classification

parser = argparse.ArgumentParser(description="Stage 8: data parallel training, one process vs two")
parser.add_argument("--quick", action="store_true", help="6 small steps (for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set when torchrun starts us
args = parser.parse_args()
out = Path(args.runs) / "08_data_parallel" / ("quick" if args.quick else "full")
steps, batch_size = (6, 16) if args.quick else (30, 32)
torch.set_num_threads(1)  # one thread a process: two processes on two cores, nobody fighting over them


def tweets_and_model():
    """The same data and the same starting weights, in whichever process asks."""
    tok = minift.load_tokenizer("minilm")
    splits, label_names = load_classification_splits()
    examples = encode_classification(splits["train"][:steps * batch_size], tok, label_names, max_length=64)
    minift.seed_everything(0)  # the new head is drawn from the seed (and rank 0's is sent to all ranks anyway)
    model = minift.load("minilm", task="classify", num_labels=len(label_names), verbose=False)
    # no validation rows: the lesson is the weights, so no evaluation and no best model
    return minift.TrainData(examples, [], tok.pad_id), model


# Dropout off and fp32: then one process and two must agree up to float rounding (with dropout on, each rank
# draws its own masks and the runs differ the way two seeds do).
cfg = minift.TrainConfig(batch_size=batch_size, max_steps=steps, lr=5e-5, dropout=0.0, precision="fp32",
                         device="cpu", log_every=1)

# %% [markdown]
# ## 8.1 What each of the two processes runs
#
# torchrun starts this same file twice with `--worker`. `train()` notices torchrun's variables and joins the
# others (`minift.distributed.setup`); nothing else changes: the batch size stays the *global* 16 (or 32),
# each rank takes every second example of it. Before training, a first all-reduce to see one at work:
# each rank hands in rank + 1, and each gets back 1 + 2 = 3.

# %%
if args.worker:
    from minift import distributed

    dist = distributed.setup("cpu")  # from here on only rank 0 prints
    x = torch.tensor([dist.rank + 1.0])
    torch.distributed.all_reduce(x)
    print(f"all-reduce of (rank + 1) over {dist.world_size} ranks: {x.item():g}")
    data, model = tweets_and_model()
    minift.train(model, data, cfg, out / "two")
    if dist.is_main:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()},
                  str(out / "two" / "weights.safetensors"))
    sys.exit(0)

# %% [markdown]
# ## 8.2 One process, the whole batch

# %%
t0 = time.perf_counter()
data, model = tweets_and_model()
start = {n: p.detach().clone() for n, p in model.named_parameters()}
minift.train(model, data, cfg, out / "one")
one = {n: p.detach().clone() for n, p in model.named_parameters()}
print(f"one process: {steps} steps in {time.perf_counter() - t0:.1f} s")

# %% [markdown]
# ## 8.3 Two processes, half the batch each
#
# The same command a user types, from Python: `torchrun --nproc_per_node 2 THIS_FILE --worker`. `--standalone`
# lets torchrun pick a free port on this machine.

# %%
t0 = time.perf_counter()
env = {**os.environ, "OMP_NUM_THREADS": "1"}
command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", "--runs", args.runs] + (["--quick"] if args.quick else [])
done = subprocess.run(command, env=env, capture_output=True, text=True)
print("\n".join(line for line in done.stdout.splitlines() if "all-reduce" in line or "processes" in line))
if done.returncode != 0:
    sys.exit(f"the two-process run failed:\n{done.stderr[-3000:]}")
two = load_file(str(out / "two" / "weights.safetensors"))
print(f"two processes: {steps} steps in {time.perf_counter() - t0:.1f} s (starting torchrun and two Pythons included)")

# %% [markdown]
# ## 8.4 The same weights?
#
# Both runs moved the weights; how far apart did they end? Not exactly 0: two processes pad their halves
# to their own lengths and add the gradient up in another order, and float additions in another order
# round differently. AdamW then moves a weight with a near-zero gradient by about lr either way, so
# rounding in such a gradient shows in the weights. For scale, a third run: one process with the same
# batches cut in two micro-batches (grad_accum=2), which is also the same arithmetic in another order.

# %%
from dataclasses import replace

data, model = tweets_and_model()
minift.train(model, data, replace(cfg, grad_accum=2), out / "one_accum")
accum = {n: p.detach().clone() for n, p in model.named_parameters()}
moved = max(float((one[n] - start[n]).abs().max()) for n in one)
apart = max(float((one[n] - two[n]).abs().max()) for n in one)
apart_accum = max(float((one[n] - accum[n]).abs().max()) for n in one)
print(f"largest change of a weight in training:              {moved:.2e}")
print(f"largest difference, one process vs two processes:    {apart:.2e}")
print(f"largest difference, one process vs grad_accum=2:     {apart_accum:.2e}")
assert apart < 1e-5, "one process and two should reach the same weights"
print("two processes reached the weights of one (up to float rounding)")
print("\nall checks passed")
