"""Data parallel training (minift/distributed.py) with real processes: two CPU ranks talking over gloo on
127.0.0.1, launched by torchrun exactly as a user would launch them.

- two processes with 4 examples each make the same weights as one process with batches of 8 (fp32, dropout
  off), for a classifier and for a language model whose rows hold different numbers of targets (the global
  count is what makes these equal);
- with dropout on, the loss curve stays close to one process's (the masks differ, the data does not);
- a Ctrl-C on one rank saves one checkpoint; resuming under two processes is bitwise the uninterrupted run;
- an exception on one rank stops both within seconds, with that rank's message, instead of a hang.
- ranks that read different data (another hash) stop before the first step, with one message;
- a rank that hangs: after the collective timeout rank 0 saves and stops; the resume is bitwise the straight run.
- ZeRO-1 and ZeRO-2 (AdamW's state, and the gradients, sharded) reach plain data parallel's weights, each rank
  keeping its share; Ctrl-C and resume bitwise; a rank that hangs leaves the last checkpoint to resume from.
- two "machines" (network namespaces joined by a veth cable, README's multi-node command) reach one process.

This file is also the worker: torchrun runs it as a script (see `worker` at the bottom). The tiny models and
data are test_train.py's, so both sides build the same things.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import test_train as T  # noqa: E402

from minift.distributed import Distributed, buckets, partition  # noqa: E402
from minift.optim import AdamW  # noqa: E402

N_EXAMPLES = 24


def settings(kind="bert", dropout=0.0, lr=1e-2, zero=0):
    """Global batches of 8 in two micro-batches, 6 steps at a constant lr (max_steps does not change the plan)."""
    return T.config(kind, batch_size=8, grad_accum=2, dropout=dropout, lr=lr, max_steps=6, schedule="constant",
                    warmup_ratio=0.0, eval_every=3, zero=zero)


# AdamW moves every weight by about lr a step whatever the size of its gradient, so fp32 rounding in the
# gradients reaches the weights in proportion to lr: measured here, one process cutting the same batches into 1,
# 2, 4 or 8 micro-batches ends up to 1.7e-5 apart after 6 GPT-2 steps at lr 1e-2, 1.0e-6 at lr 1e-3. The
# comparison with one process is made at lr 5e-4, where that rounding floor is below the 1e-6 asked for.
EQUAL_LR = 5e-4


def launch(out, *args, timeout=90, env=None):
    """torchrun with two CPU processes on 127.0.0.1; returns (the finished process, seconds it took)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(HERE.parent), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__)), str(out), *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.perf_counter() - t0


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(tmp_path, kind, dropout=0.0, lr=1e-2):
    model, records = T.run(settings(kind, dropout, lr), tmp_path / "single", kind=kind, n=N_EXAMPLES,
                           val=T.examples(kind, 6, seed=1))
    return T.params_of(model), records


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------------------
# Without processes: the pieces

def test_buckets_keep_every_tensor_once_in_order():
    tensors = [torch.zeros(n) for n in (3, 5, 2**23, 7, 1)]
    groups = buckets(tensors)
    assert [len(g) for g in groups] == [2, 1, 2]  # the big one alone; order kept
    assert [t for g in groups for t in g] == tensors


def test_each_rank_takes_every_nth_example_of_the_global_batch():
    batch = list(range(10))
    shares = [Distributed(r, 3, torch.device("cpu")).share(batch) for r in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sorted(sum(shares, [])) == batch


def test_dropout_seeds_differ_per_rank_and_step_and_repeat():
    def masks(rank, step):
        Distributed(rank, 2, torch.device("cpu")).seed_dropout(seed=0, step=step)
        return torch.rand(1000)
    assert torch.equal(masks(1, 5), masks(1, 5))
    assert not torch.equal(masks(0, 5), masks(1, 5))
    assert not torch.equal(masks(1, 5), masks(1, 6))


# ---------------------------------------------------------------------------------------------------------
# Two processes

@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_two_processes_reach_the_weights_of_one(tmp_path, kind):
    single, single_records = one_process(tmp_path, kind, lr=EQUAL_LR)
    proc, _ = launch(tmp_path / "two", kind, "0.0", EQUAL_LR)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_file(str(tmp_path / "two" / "params_rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "two" / "params_rank1.safetensors"))
    T.assert_bitwise_equal(two, rank1)  # the ranks never drift apart: same gradients, same AdamW step
    assert max_difference(single, two) < 1e-6  # measured: 7.5e-9 (BERT classifier), 4.9e-7 (GPT-2 LM)
    assert max_difference(single, T.params_of(T.make_model(kind))) > 1e-3  # and training did move them
    two_records = T.steps_logged(tmp_path / "two")  # only rank 0 logs; the loss logged is the global one
    assert [r["step"] for r in two_records] == [r["step"] for r in single_records]
    for a, b in zip(single_records, two_records):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]


def test_with_dropout_the_loss_curve_stays_close_to_one_process(tmp_path):
    """Each rank draws its own masks, so the curves differ. Measured: the per-step losses (about 1.07) differ
    by 0.0046 on average over the 6 steps (0.0125 at most); allowed: 0.03 on average."""
    _, single = one_process(tmp_path, "bert", dropout=0.1)
    proc, _ = launch(tmp_path / "two", "bert", "0.1", "1e-2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = T.steps_logged(tmp_path / "two")
    gaps = [abs(a["loss"] - b["loss"]) for a, b in zip(single, two)]
    assert len(gaps) == 6 and sum(gaps) / len(gaps) < 0.03
    assert max(gaps) > 0  # the masks really differ from one process's


def test_ctrl_c_on_one_rank_then_resume_is_bitwise_the_straight_run(tmp_path):
    """Rank 1 alone gets a Ctrl-C after step 3: both stop, rank 0 saves step 3 once, and a resume under two
    processes ends bitwise where an uninterrupted two-process run ends (dropout on: every rank's masks too)."""
    proc, _ = launch(tmp_path / "straight", "bert", "0.1", "1e-2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, _ = launch(tmp_path / "split", "bert", "0.1", "1e-2", "interrupt-rank1-at", "3")
    assert proc.returncode != 0
    assert "interrupted at step 3" in proc.stdout
    assert T.trainer_state(tmp_path / "split" / "checkpoint")["state"]["step"] == 3
    proc, _ = launch(tmp_path / "split", "bert", "0.1", "1e-2", "resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    for name in ("params_rank0.safetensors", "params_rank1.safetensors"):
        T.assert_bitwise_equal(load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "split" / name)))
    assert T.steps_logged(tmp_path / "straight") == T.steps_logged(tmp_path / "split")


def test_an_error_on_one_rank_stops_both_quickly_with_its_message(tmp_path):
    """Rank 1 raises inside its backward at step 2 while rank 0 waits in the gradient all-reduce."""
    proc, ok_seconds = launch(tmp_path / "ok", "bert", "0.0", "1e-2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, seconds = launch(tmp_path / "bad", "bert", "0.0", "1e-2", "fail-rank1-at", "2", timeout=60)
    assert proc.returncode != 0
    assert "RuntimeError: injected failure on rank 1" in proc.stderr  # rank 1's own error
    assert "MiniftError: rank 1 of 2 failed, so every rank stops: RuntimeError: injected failure on rank 1" in proc.stderr
    assert seconds < ok_seconds + 5  # stopped at once, no wait for a timeout (measured: 10.0 s vs 10.3 s for a
    # whole run that succeeds; most of either is starting torchrun and two Pythons)


def test_a_rank_that_hangs_costs_the_wait_not_the_run(tmp_path):
    """Rank 1 hangs inside step 3 while rank 0 waits in the step's first all-reduce. After
    MINIFT_COLLECTIVE_TIMEOUT seconds rank 0 saves the checkpoint of step 2, says so in one line and stops
    (torchrun then ends rank 1); a resume under two processes ends bitwise where an uninterrupted run ends."""
    proc, _ = launch(tmp_path / "straight", "bert", "0.1", "1e-2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, seconds = launch(tmp_path / "stuck", "bert", "0.1", "1e-2", "stuck-rank1-at", "3", timeout=120,
                           env={"MINIFT_COLLECTIVE_TIMEOUT": "5"})
    assert proc.returncode != 0
    line = next(x for x in proc.stderr.splitlines() if "MiniftError: rank 0 waited 5 s" in x)
    assert "one of them is stuck or gone" in line and "checkpoint of step 2" in line and "--resume" in line
    assert T.trainer_state(tmp_path / "stuck" / "checkpoint")["state"]["step"] == 2
    proc, _ = launch(tmp_path / "stuck", "bert", "0.1", "1e-2", "resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("params_rank0.safetensors", "params_rank1.safetensors"):
        T.assert_bitwise_equal(load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "stuck" / name)))
    assert T.steps_logged(tmp_path / "straight") == T.steps_logged(tmp_path / "stuck")


# ---------------------------------------------------------------------------------------------------------
# ZeRO: AdamW's state (and with 2 the gradients) sharded across the two processes

def test_partition_gives_each_rank_about_half_biggest_first():
    assert partition([10, 1, 7, 3, 3], 2) == [0, 1, 1, 1, 0]  # 10 + 3 | 7 + 3 + 1: the biggest first, ties to rank 0
    assert partition([4, 4, 4, 4], 2) == [0, 1, 0, 1]
    assert partition([5], 3) == [0] and partition([], 2) == []


def kept(out):
    return [json.loads((out / f"kept_rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("zero", [1, 2])
def test_zero_reaches_the_weights_of_data_parallel_with_half_the_state(tmp_path, zero):
    """Two processes with ZeRO-1 or ZeRO-2 end where plain data parallel ends (GPT-2, whose rows hold different
    numbers of targets), every rank with the same weights; each keeps AdamW state for its own share of the tensors
    only, which together are the whole of it, and under ZeRO-2 its share of the gradients."""
    proc, _ = launch(tmp_path / "dp", "gpt2", "0.0", "1e-2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, _ = launch(tmp_path / "zero", "gpt2", "0.0", "1e-2", "zero", zero)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ZeRO-{zero}: rank 0 keeps AdamW's m and v for" in proc.stdout
    dp = load_file(str(tmp_path / "dp" / "params_rank0.safetensors"))
    for r in (0, 1):
        assert max_difference(dp, load_file(str(tmp_path / "zero" / f"params_rank{r}.safetensors"))) < 1e-6
    # measured: bitwise for both (the same sums of two numbers, the norm of the same per-tensor norms)
    dp_kept, zero_kept = kept(tmp_path / "dp"), kept(tmp_path / "zero")
    assert dp_kept[0] == dp_kept[1]
    assert zero_kept[0]["state"] + zero_kept[1]["state"] == dp_kept[0]["state"]
    assert max(k["state"] for k in zero_kept) < 0.6 * dp_kept[0]["state"]
    if zero == 2:
        assert zero_kept[0]["gradients"] + zero_kept[1]["gradients"] == dp_kept[0]["gradients"]
    else:
        assert zero_kept[0]["gradients"] == dp_kept[0]["gradients"]
    assert T.steps_logged(tmp_path / "dp") == T.steps_logged(tmp_path / "zero")
    saved_dp = load_file(str(tmp_path / "dp" / "checkpoint" / "optimizer.safetensors"))
    saved_zero = load_file(str(tmp_path / "zero" / "checkpoint" / "optimizer.safetensors"))
    assert saved_dp.keys() == saved_zero.keys()  # rank 0 gathered every rank's share into one whole checkpoint
    assert max_difference(saved_dp, saved_zero) < 1e-6


def test_zero2_ctrl_c_then_resume_is_bitwise_the_straight_run(tmp_path):
    """Rank 1 gets a Ctrl-C after step 3 under ZeRO-2 with dropout: rank 0 gathers both shards of AdamW's state
    into the checkpoint, and a resume under two processes ends bitwise where the uninterrupted run ends."""
    proc, _ = launch(tmp_path / "straight", "bert", "0.1", "1e-2", "zero", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, _ = launch(tmp_path / "split", "bert", "0.1", "1e-2", "zero", 2, "interrupt-rank1-at", "3")
    assert proc.returncode != 0 and "interrupted at step 3" in proc.stdout
    proc, _ = launch(tmp_path / "split", "bert", "0.1", "1e-2", "zero", 2, "resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("params_rank0.safetensors", "params_rank1.safetensors"):
        T.assert_bitwise_equal(load_file(str(tmp_path / "straight" / name)), load_file(str(tmp_path / "split" / name)))
    assert T.steps_logged(tmp_path / "straight") == T.steps_logged(tmp_path / "split")


def test_zero_with_a_rank_that_hangs_keeps_the_last_checkpoint(tmp_path):
    """Under ZeRO the stuck rank holds half of AdamW's state, so rank 0 cannot save the step it reached: it says
    which checkpoint is on disk (step 3, saved at the evaluation), and a resume from it ends bitwise at the end."""
    proc, _ = launch(tmp_path / "straight", "bert", "0.0", "1e-2", "zero", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, _ = launch(tmp_path / "stuck", "bert", "0.0", "1e-2", "zero", 1, "stuck-rank1-at", "5", timeout=120,
                     env={"MINIFT_COLLECTIVE_TIMEOUT": "5"})
    assert proc.returncode != 0
    line = next(x for x in proc.stderr.splitlines() if "MiniftError: rank 0 waited 5 s" in x)
    assert "checkpoint of step 3" in line and "--resume" in line
    assert T.trainer_state(tmp_path / "stuck" / "checkpoint")["state"]["step"] == 3
    proc, _ = launch(tmp_path / "stuck", "bert", "0.0", "1e-2", "zero", 1, "resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    T.assert_bitwise_equal(load_file(str(tmp_path / "straight" / "params_rank0.safetensors")),
                           load_file(str(tmp_path / "stuck" / "params_rank0.safetensors")))


# ---------------------------------------------------------------------------------------------------------
# Two "machines": two network namespaces of this one, joined by a virtual cable (veth), one process in each,
# started with README's multi-node torchrun command. They reach each other only over that cable.

@pytest.fixture
def two_nodes():
    """Two network namespaces with addresses 10.231.0.1 and .2 on a veth pair; yields (names, addresses, device)."""
    tag = f"mft{os.getpid() % 100000}"
    names, addresses, device = [f"{tag}a", f"{tag}b"], ["10.231.0.1", "10.231.0.2"], "veth0"
    setup = [f"ip netns add {names[0]}", f"ip netns add {names[1]}",
             f"ip link add {device} netns {names[0]} type veth peer name {device} netns {names[1]}"]
    for ns, address in zip(names, addresses):
        setup += [f"ip -n {ns} addr add {address}/24 dev {device}", f"ip -n {ns} link set {device} up",
                  f"ip -n {ns} link set lo up"]
    try:
        for command in setup:
            done = subprocess.run(command.split(), capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot make network namespaces here ({command}: {done.stderr.strip()}); needs root and iproute2")
        yield names, addresses, device
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_two_nodes_in_network_namespaces_reach_the_weights_of_one_process(tmp_path, two_nodes):
    names, addresses, device = two_nodes
    single, _ = one_process(tmp_path, "gpt2", lr=EQUAL_LR)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": device, "PYTHONPATH": str(HERE.parent)}
    procs = [subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc_per_node", "1", "--master-addr", addresses[0], "--master-port", "29500",
         str(Path(__file__)), str(tmp_path / "nodes"), "gpt2", "0.0", str(EQUAL_LR)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for node, ns in enumerate(names)]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    two = load_file(str(tmp_path / "nodes" / "params_rank0.safetensors"))
    T.assert_bitwise_equal(two, load_file(str(tmp_path / "nodes" / "params_rank1.safetensors")))
    assert max_difference(single, two) < 1e-6


def test_ranks_that_read_different_data_stop_at_once_with_one_message(tmp_path):
    """Rank 1 reads other examples (as many, so the step count agrees): the data's hash differs, and every rank
    stops in set_up, before any step, instead of training two different runs that wait on each other."""
    proc, _ = launch(tmp_path / "other", "bert", "0.0", "1e-2", "rank1-reads-other-data", timeout=60)
    assert proc.returncode != 0
    assert "the 2 processes disagree on the training plan" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "other" / "checkpoint").exists() and not (tmp_path / "other" / "log.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------
# The worker: what each of the two processes runs (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR ...)

def worker(out, kind, dropout, lr, *extra):
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    resume = "resume" in extra
    if "interrupt-rank1-at" in extra and rank == 1:  # a Ctrl-C that reaches rank 1 only, after step k
        at, log_step = int(extra[extra.index("interrupt-rank1-at") + 1]), T.TM.log_step

        def log_step_then_interrupt(run, *args):
            log_step(run, *args)
            if run.state.step == at:
                raise KeyboardInterrupt
        T.TM.log_step = log_step_then_interrupt
    if "fail-rank1-at" in extra and rank == 1:  # an exception in the middle of rank 1's step k
        at, forward_backward, calls = int(extra[extra.index("fail-rank1-at") + 1]), T.OBJECTIVE.forward_backward, []

        def failing_forward_backward(*args, **kw):
            calls.append(1)
            if len(calls) > 2 * (at - 1):  # two micro-batches a step
                raise RuntimeError("injected failure on rank 1")
            return forward_backward(*args, **kw)
        T.OBJECTIVE.forward_backward = failing_forward_backward
    if "stuck-rank1-at" in extra and rank == 1:  # rank 1 hangs in its step k (a deadlock, a stalled disk ...)
        at, forward_backward, calls = int(extra[extra.index("stuck-rank1-at") + 1]), T.OBJECTIVE.forward_backward, []

        def stuck_forward_backward(*args, **kw):
            calls.append(1)
            if len(calls) > 2 * (at - 1):
                time.sleep(600)
            return forward_backward(*args, **kw)
        T.OBJECTIVE.forward_backward = stuck_forward_backward
    if "rank1-reads-other-data" in extra and rank == 1:  # another copy of the data, of the same size
        real_examples = T.examples
        T.examples = lambda kind, n, seed=0: real_examples(kind, n, seed + 100)
    zero = int(extra[extra.index("zero") + 1]) if "zero" in extra else 0
    real_step = AdamW.step

    def step_and_note_what_is_kept(self, lr=None):  # at the update: this rank's AdamW m and v, and its gradients
        kept = {"state": sum(t.numel() * t.element_size() for t in [*self.exp_avg.values(), *self.exp_avg_sq.values()]),
                "gradients": sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)}
        (Path(out) / f"kept_rank{rank}.json").write_text(json.dumps(kept))
        return real_step(self, lr)
    AdamW.step = step_and_note_what_is_kept
    model, _ = T.run(settings(kind, float(dropout), float(lr), zero), out, kind=kind, n=N_EXAMPLES,
                     val=T.examples(kind, 6, seed=1), resume=resume)
    save_file(T.params_of(model), str(Path(out) / f"params_rank{rank}.safetensors"))


if __name__ == "__main__":
    worker(*sys.argv[1:])
