"""Data parallel training, written out: N processes (ranks), one copy of the model each, one global batch.

    torchrun --nproc_per_node 2 -m minift finetune ...

Each optimizer step, every rank takes its share of the same global batch (`share`), runs the hand-written
forward and backward on it, and then the ranks add up what they found (all-reduce):
1. the count of supervised targets of the whole global batch, BEFORE the loss is normalised (`count`), so
   every rank divides by the same number;
2. the gradients (`gradients`), in a few flat buckets rather than one call per tensor.
Since each rank's gradient is (sum over its targets) / (global count), their sum is exactly the gradient of
one process that saw the whole batch: N ranks with B examples each compute the update of one process with
N*B. Every rank then holds the same gradient, clips it by the same global norm and makes the same AdamW
step, so the weights stay identical without ever being sent again (only once, at the start).

PyTorch's DistributedDataParallel does step 2 with hooks on autograd; our backward does not use autograd,
so the hooks would never fire. Here it is one function you can step through.

ZeRO (TrainConfig.zero, --zero 1|2): every rank above keeps AdamW's m and v for the whole model, twice the
weights' size, though all ranks compute the same update. ZeRO-1 gives each trainable tensor one owner
(`partition`, the biggest first to the least loaded rank): a rank keeps m and v for its own tensors only,
updates only those, and then sends them to the others (`send_updated_weights`, a broadcast from each owner:
an all-gather), so every rank again holds the whole model for the next forward. ZeRO-2 also shards the
gradients: instead of the all-reduce, each bucket is summed onto its owner alone (`td.reduce`: together, a
reduce-scatter) and dropped elsewhere, and the clipping norm is added up from every rank's own tensors
(`gradient_norm`). The update of each number is the same arithmetic as above, so the weights are those of
plain data parallel. One caveat: our backward adds every tensor's gradient into .grad before any is sent, so
ZeRO-2's saving holds from the reduce to the next step, not during the backward itself.

Two rules keep N processes from hanging (and a timeout ends the wait for a rank that hangs itself):
- every rank must reach every collective call (all-reduce, broadcast, barrier) in the same order; an
  exception on one rank would leave the others waiting forever. So every collective starts with `_agree`:
  the ranks first add up a "did anyone fail?" flag, and a rank that fails calls `fail(error)`, which is that
  same flag call; everyone then stops with the failing rank's message.
- only rank 0 writes (logs, checkpoints, best model) and prints (the others' stdout goes to /dev/null; their
  errors still reach stderr).
"""
import atexit
import datetime
import os
import sys

import numpy as np
import torch
import torch.distributed as td

from .errors import MiniftError

BUCKET_ELEMENTS = 8 * 2**20  # 32 MB of fp32 per all-reduce: a few calls for a whole model, as DDP does (25 MB)
MESSAGE_BYTES = 1000  # room for a failing rank's one-line message
# How long a rank waits in a collective before giving up (MINIFT_COLLECTIVE_TIMEOUT, in seconds). Rank 0
# evaluates alone while the others wait, so this must exceed the longest evaluation; a crash is caught much
# sooner by `_agree` or by torchrun. What is left is a rank that hangs: train() then saves and stops (is_timeout).
TIMEOUT_SECONDS = 30 * 60

_current = None  # the one Distributed of this process (train() may be called several times)


def setup(device="auto"):
    """The Distributed of this process when torchrun started several; None for a plain single process.

    torchrun sets RANK (this process among all), LOCAL_RANK (among this machine's), WORLD_SIZE (how many)
    and MASTER_ADDR/MASTER_PORT (where rank 0 listens). `device` is TrainConfig.device: on CUDA each rank
    takes its own GPU, cuda:LOCAL_RANK, and the ranks talk over NCCL; on CPU over gloo."""
    global _current
    if _current is not None:
        return _current
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 and not td.is_initialized():
        return None
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise MiniftError(f"WORLD_SIZE is set but {name} is not: start several processes with torchrun "
                              "(torchrun --nproc_per_node 2 -m minift finetune ...), or unset WORLD_SIZE")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise MiniftError(f"local rank {local_rank} has no GPU (torch sees {torch.cuda.device_count()}): "
                              "start at most that many processes per machine, or use --device cpu")
        torch.cuda.set_device(local_rank)  # "cuda" now means this rank's own GPU, here and in evaluate()
    if not td.is_initialized():  # a script may have made the process group itself
        td.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_seconds()))
        atexit.register(td.destroy_process_group)
    _current = Distributed(rank, td.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu"))
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # one rank prints; N copies of every line help nobody
    return _current


def timeout_seconds():
    value = os.environ.get("MINIFT_COLLECTIVE_TIMEOUT", str(TIMEOUT_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise MiniftError(f"MINIFT_COLLECTIVE_TIMEOUT={value!r}: give the seconds a process may wait for the others, "
                          f"e.g. {TIMEOUT_SECONDS}")
    return seconds


def is_timeout(error):
    """A collective call that waited its whole timeout: another rank is stuck (or gone without a word). Asking
    the others whether anyone failed (`fail`) would wait again, so the loop saves and stops instead."""
    return isinstance(error, RuntimeError) and "timed out" in str(error).lower()


def is_main():
    """True in rank 0 and in a plain single process: the one that prints and writes."""
    return _current is None or _current.is_main


class Distributed:
    """This rank's place among the others, and the collective calls the training loop needs."""

    def __init__(self, rank, world_size, device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.is_main = rank == 0
        self.stopped = False  # set once the ranks agreed that one of them failed
        self.zero = 0  # 0: plain data parallel; 1: AdamW's state sharded; 2: the gradients too (shard_optimizer)
        self.owners = {}  # under ZeRO: id(tensor) -> the rank that updates it

    def shard_optimizer(self, level, groups):
        """ZeRO-`level` (1 or 2) over AdamW's parameter groups: give every tensor an owner; return the names of
        this rank's own tensors (AdamW's `owned`)."""
        names = [n for g in groups for n in g["names"]]
        params = [p for g in groups for p in g["params"]]
        ranks = partition([p.numel() for p in params], self.world_size)
        self.zero, self.owners = level, {id(p): r for p, r in zip(params, ranks)}
        return {n for n, r in zip(names, ranks) if r == self.rank}

    # --- the data ----------------------------------------------------------------------------------------

    def share(self, batch_indices):
        """This rank's slice of a global batch: every world_size-th index. With length-grouped batches
        (longest first) a strided slice gives every rank a similar amount of work."""
        return batch_indices[self.rank::self.world_size]

    def seed_dropout(self, seed, step):
        """Seed this rank's dropout for this step from (seed, step, rank): different masks on every rank,
        the same ones again on a rerun or a resume, with no per-rank RNG state to save."""
        torch.manual_seed(int(np.random.SeedSequence([seed, step, self.rank]).generate_state(1)[0]))

    # --- the two calls of train_step (step.py) ------------------------------------------------------------

    def count(self, num_targets):
        """The number of supervised targets in the whole global batch (all ranks' counts added up)."""
        return int(self.total(num_targets))  # float64 holds every whole number up to 2^53 exactly

    def total(self, value):
        """A number added up over the ranks (each rank's sum of something; the caller divides by a count() of it)."""
        self._agree()
        total = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        td.all_reduce(total)  # SUM
        return float(total)

    def gradients(self, params, loss):
        """Add up every rank's .grad, in place, in a few flat buckets; return the global loss.

        Each rank's loss and gradients were already divided by the global count, so a plain sum is the
        whole batch's mean. A parameter with no gradient on some rank (a rank whose share was empty) counts
        as zeros there; one with no gradient on every rank (a frozen or unused one) keeps None."""
        self._agree()
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        numbers = torch.tensor([loss], dtype=torch.float64, device=self.device)
        td.all_reduce(has)
        td.all_reduce(numbers)
        used = [p for p, h in zip(params, has.tolist()) if h > 0]
        if self.zero == 2:
            self._reduce_to_owners(used)
            return float(numbers)
        for bucket in buckets(used):
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
            td.all_reduce(flat)  # the one line that makes N processes act as one
            for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad = g.view_as(p)  # a view into the bucket: no copy
        return float(numbers)

    def _reduce_to_owners(self, params):
        """ZeRO-2's reduce-scatter: each bucket of one owner's tensors is summed onto that owner alone, and the
        other ranks drop their copy: every gradient is then kept once across the ranks, by the rank that needs it."""
        for owner in range(self.world_size):
            for bucket in buckets([p for p in params if self.owners[id(p)] == owner]):
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
                td.reduce(flat, dst=owner)  # SUM, delivered to the owner only
                for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
                    p.grad = g.view_as(p) if self.rank == owner else None

    def gradient_norm(self, params):
        """ZeRO-2: the global gradient norm, from every rank's norms of its own tensors' gradients (each rank puts
        its own in their slots, the sum fills them all); None otherwise, where every rank has the whole gradient."""
        if self.zero != 2:
            return None
        self._agree()
        norms = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        for i, p in enumerate(params):
            if p.grad is not None:
                norms[i] = p.grad.float().norm()
        td.all_reduce(norms)
        return norms.norm()

    def send_updated_weights(self, params):
        """ZeRO: each rank updated only its own tensors; every owner broadcasts them to the others (together, an
        all-gather), so that every rank holds the whole, updated model again. Plain data parallel: nothing to do."""
        if not self.zero:
            return
        self._agree()
        for owner in range(self.world_size):
            for bucket in buckets([p for p in params if self.owners[id(p)] == owner]):
                flat = torch.cat([p.detach().reshape(-1) for p in bucket])
                td.broadcast(flat, src=owner)
                for p, w in zip(bucket, flat.split([p.numel() for p in bucket])):
                    p.data.copy_(w.view_as(p))

    def gather_optimizer_state(self, optimizer):
        """ZeRO: rank 0 collects the m and v of every rank's tensors (point to point, one tensor at a time), to
        write the same checkpoint as plain data parallel; it returns (tensors, meta), the other ranks None."""
        self._agree()
        mine, meta = optimizer.state_dict()
        tensors = {}
        for kind in ("exp_avg", "exp_avg_sq"):
            for name, p in zip(optimizer.names, optimizer.params):
                key, owner = f"{kind}.{name}", self.owners[id(p)]
                if owner == self.rank:
                    tensors[key] = mine[key]
                    if not self.is_main:
                        td.send(mine[key].contiguous(), dst=0)
                elif self.is_main:
                    tensors[key] = torch.empty_like(p)
                    td.recv(tensors[key], src=owner)
        return (tensors, meta) if self.is_main else None

    # --- the rest of the loop -----------------------------------------------------------------------------

    def broadcast_weights(self, model):
        """Rank 0's weights to every rank, so that all start from the same point (a new head drawn at
        random differs per rank unless every rank seeded alike)."""
        self._agree()
        for bucket in buckets([p for p in model.parameters()]):
            flat = torch.cat([p.detach().reshape(-1) for p in bucket])
            td.broadcast(flat, src=0)
            for p, w in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.data.copy_(w.view_as(p))

    def decide(self, flag):
        """Rank 0's decision (e.g. "stop early", which only rank 0 can know: it evaluated) for every rank."""
        self._agree()
        value = torch.tensor([int(bool(flag))], device=self.device)
        td.broadcast(value, src=0)
        return bool(value)

    def check_same_plan(self, numbers):
        """Stop every rank, with one message, unless all of them have the same `numbers` (the step count, the
        number of examples, the data's hash): ranks that read different copies of the data would otherwise
        disagree on the number of steps, and one of them would wait forever in a collective call."""
        self._agree()
        mine = torch.tensor(numbers, dtype=torch.int64, device=self.device)
        low, high = mine.clone(), mine.clone()
        td.all_reduce(low, op=td.ReduceOp.MIN)
        td.all_reduce(high, op=td.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise MiniftError(f"the {self.world_size} processes disagree on the training plan (steps, examples or the "
                              f"data's hash; rank {self.rank} has {numbers[:2]}): every process must read the same "
                              "data with the same settings")

    def barrier(self):
        """Wait here until every rank arrives (e.g. until rank 0 has written best/)."""
        self._agree()
        td.barrier()

    # --- failure: no hangs ---------------------------------------------------------------------------------

    def fail(self, error):
        """Called by a rank whose loop raised: take part in the `_agree` that the others are waiting in, so
        that they stop too (with this rank's message). Then the caller re-raises its own error."""
        if not self.stopped:  # not when the error came from `_agree` itself (the others know already)
            self._agree(error)

    def _agree(self, error=None):
        """Every collective starts here: each rank puts 0 (fine), 1 (failed) or 2 (interrupted) in its own
        slot, the slots are added up, and if any is set every rank learns which and why."""
        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self.device)
        flags[self.rank] = 0 if error is None else 2 if isinstance(error, KeyboardInterrupt) else 1
        td.all_reduce(flags)
        flags = flags.tolist()
        if not any(flags):
            return
        self.stopped = True
        src = flags.index(1) if 1 in flags else flags.index(2)  # an error says more than a Ctrl-C
        text = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8, device=self.device)
        if self.rank == src:
            raw = f"{type(error).__name__}: {error}".replace("\n", " ").encode()[:MESSAGE_BYTES]
            text[:len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        td.broadcast(text, src=src)  # bytes, not pickle: nothing is ever unpickled
        if error is not None:
            return  # this rank has its own error to raise
        if flags[src] == 2:
            raise KeyboardInterrupt(f"rank {src} was interrupted")
        message = bytes(text.tolist()).rstrip(b"\0").decode(errors="replace")
        raise MiniftError(f"rank {src} of {self.world_size} failed, so every rank stops: {message}")


def partition(sizes, world_size):
    """ZeRO: the rank that owns each tensor, given their sizes: the biggest first, each to the rank with the fewest
    numbers so far (as torch's ZeroRedundancyOptimizer does), so every rank keeps about 1/world_size of the state."""
    loads, owner = [0] * world_size, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):  # stable: equal sizes in model order
        owner[i] = loads.index(min(loads))
        loads[owner[i]] += sizes[i]
    return owner


def buckets(params):
    """Cut a list of tensors into groups of about BUCKET_ELEMENTS elements (a big tensor is a group alone)."""
    groups, size = [[]], 0
    for p in params:
        if groups[-1] and size + p.numel() > BUCKET_ELEMENTS:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel()
    return [g for g in groups if g]
