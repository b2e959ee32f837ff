"""README's multi-node command, run for real on one machine: two network namespaces ("machines" with their own
network stack) joined by a virtual cable (veth), one process in each, against the same run in one process.

    python bench/two_nodes.py [--limit 400] [--zero 0|1|2]        # needs root (ip netns) and iproute2

Both runs fine-tune the main job (MiniLM on the tweets) with dropout off and fp32, so that the only difference
is how the batch is shared; the script prints each run's seconds, validation accuracy and how far the two
best/ models are apart.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

parser = argparse.ArgumentParser()
parser.add_argument("--limit", type=int, default=400)
parser.add_argument("--zero", type=int, default=0)
args = parser.parse_args()

NAMES, ADDRESSES, DEVICE = ["minift-node0", "minift-node1"], ["10.231.1.1", "10.231.1.2"], "veth0"
JOB = ["-m", "minift", "finetune", "--limit", str(args.limit), "--epochs", "1", "--dropout", "0", "--precision", "fp32"]


def sh(command):
    done = subprocess.run(command.split(), capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{command}: {done.stderr.strip()} (this needs root and iproute2)")


def make_namespaces():
    for ns in NAMES:
        sh(f"ip netns add {ns}")
    sh(f"ip link add {DEVICE} netns {NAMES[0]} type veth peer name {DEVICE} netns {NAMES[1]}")
    for ns, address in zip(NAMES, ADDRESSES):
        sh(f"ip -n {ns} addr add {address}/24 dev {DEVICE}")
        sh(f"ip -n {ns} link set {DEVICE} up")
        sh(f"ip -n {ns} link set lo up")


def final_accuracy(out):
    evals = [json.loads(x)["eval"] for x in (out / "log.jsonl").read_text().splitlines() if '"eval"' in x]
    return evals[-1]["accuracy"]


env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": DEVICE}
with tempfile.TemporaryDirectory() as tmp:
    one, two = Path(tmp, "one"), Path(tmp, "two")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, *JOB, "--out", str(one)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    if done.returncode:
        sys.exit(f"the one-process run failed:\n{done.stderr[-3000:]}")
    one_seconds = time.perf_counter() - t0
    make_namespaces()
    try:
        t0 = time.perf_counter()
        nodes = [subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
             str(node), "--nproc_per_node", "1", "--master-addr", ADDRESSES[0], "--master-port", "29500", *JOB,
             "--out", str(two), "--zero", str(args.zero)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for node, ns in enumerate(NAMES)]
        outputs = [p.communicate() for p in nodes]
        if any(p.returncode for p in nodes):
            sys.exit("the two-node run failed:\n" + "\n".join(err[-2000:] for _, err in outputs))
        two_seconds = time.perf_counter() - t0
    finally:
        for ns in NAMES:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    a, b = load_file(str(one / "best" / "model.safetensors")), load_file(str(two / "best" / "model.safetensors"))
    gap = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"MiniLM main job, --limit {args.limit} --epochs 1, dropout 0, fp32, {os.cpu_count()} CPUs")
    print(f"one process (2 threads): {one_seconds:.1f} s, validation accuracy {final_accuracy(one):.4f}")
    print(f"two nodes (network namespaces over veth, 1 process x 1 thread each, zero={args.zero}): {two_seconds:.1f} s, "
          f"validation accuracy {final_accuracy(two):.4f}")
    print(f"best/ weights, two nodes vs one process: max abs difference {gap:.3g} over {len(a)} tensors")
