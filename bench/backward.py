"""One training step (forward + backward + AdamW), side by side in one run:
minift's hand-written backward vs autograd on the same minift model vs Hugging Face transformers.

    python bench/backward.py                 # all configs, fp32 and bf16
    python bench/backward.py --only minilm --steps 10

The three steps take turns, one step each per round, so that a slow spell of a shared machine hits all
three alike, and each config runs in a fresh process. Times are the median of the rounds after 3 warm-up
rounds; a ratio is the median over rounds of the ratio within each round. Ratios > 1 mean minift's
hand-written step is faster. Peak memory is measured apart, each step in a fresh process (peak RSS after
3 steps: weights + AdamW state + what one step holds at its peak).
Needs transformers (the test extra). Configs are random-init: speed does not depend on the weights.
"""
import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch

from minift.checkpoints import build_model
from minift.optim import AdamW, param_groups
from minift.objective import forward_backward
from minift.train import autocast

CONFIGS = {
    "minilm": dict(kind="classify", batch=32, seq=64, hf="BertForSequenceClassification",
                   config=dict(model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                               num_attention_heads=12, intermediate_size=1536, num_labels=3)),
    "gpt2-124M": dict(kind="lm", batch=4, seq=256, hf="GPT2LMHeadModel",
                      config=dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)),
    "gpt2-4x256": dict(kind="lm", batch=8, seq=128, hf="GPT2LMHeadModel",
                       config=dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=256, n_layer=4, n_head=4)),
    # SmolLM2-135M's shape (the offline decoder): 30 blocks, 576 wide, 9 query / 3 key-value heads, tied head
    "smollm2-135M": dict(kind="lm", batch=4, seq=256, hf="LlamaForCausalLM",
                         config=dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                     num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                     max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                                     tie_word_embeddings=True)),
}
HF_CONFIG = {"bert": "BertConfig", "gpt2": "GPT2Config", "llama": "LlamaConfig"}


def time_in_turns(steps, rounds, warmup=3):
    """steps: {label: step function}. One step of each per round, in reverse order every other round (so
    that no step always runs right after the same one); the seconds of each step in each round."""
    times = {label: [] for label in steps}
    for r in range(warmup + rounds):
        for label in list(steps)[::1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            steps[label]()
            if r >= warmup:
                times[label].append(time.perf_counter() - t)
    return times


def speedup(times, other):
    """How many times faster the manual step is than `other`: the median over rounds of the ratio within
    each round. Both steps of a round ran within seconds of each other, so a slow spell of the machine
    cancels out of the ratio (it would not from a ratio of medians taken over different minutes)."""
    return statistics.median(o / m for m, o in zip(times["manual"], times[other]))


def own_peak_rss_mb():
    """This process's peak RSS. Linux's VmHWM, not ru_maxrss: a child started by a big parent inherits the
    parent's ru_maxrss across exec."""
    try:
        line = next(row for row in open("/proc/self/status") if row.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except OSError:  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024**2)


def peak_rss_mb(name, precision, label):
    """Peak RSS of a fresh process that builds one step and runs it 3 times."""
    cmd = [sys.executable, __file__, "--only", name, "--precision", precision, "--memory-of", label]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def minift_step(spec, batch, precision, backward):
    model = build_model(spec["config"], task="lm" if spec["kind"] == "lm" else "classify", num_labels=3).train()
    groups = param_groups(model, 0.01)
    opt = AdamW(groups, lr=1e-5)
    device = torch.device("cpu")

    def step():
        n = model.count_targets(batch["labels"])
        with autocast(device, precision):
            forward_backward(model, batch, n, backward)
        opt.step()
        opt.zero_grad()
    return step


def hf_step(spec, batch, precision):
    import transformers

    hf_config = dict(spec["config"])
    kind = hf_config.pop("model_type")
    config = getattr(transformers, HF_CONFIG[kind])(**hf_config)
    model = getattr(transformers, spec["hf"])(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def make_batch(spec):
    torch.manual_seed(0)
    ids = torch.randint(1, spec["config"]["vocab_size"], (spec["batch"], spec["seq"]))
    labels = ids.clone() if spec["kind"] == "lm" else torch.randint(0, 3, (spec["batch"],))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def make_step(label, spec, batch, precision):
    return hf_step(spec, batch, precision) if label == "HF" else minift_step(spec, batch, precision, label)


def time_config(name, precision, labels, rounds):
    """Time the steps of one config in this process; print one line of times and ratios."""
    spec = CONFIGS[name]
    batch = make_batch(spec)
    steps = {label: make_step(label, spec, batch, precision) for label in labels}
    times = time_in_turns(steps, rounds)
    line = f"{name:10s} {spec['batch']}x{spec['seq']} {precision}: " + ", ".join(
        f"{label} {statistics.median(times[label]):.3f} s" for label in labels)
    line += f" | manual vs autograd x{speedup(times, 'autograd'):.2f}"
    if "HF" in times:
        line += f", vs HF x{speedup(times, 'HF'):.2f}"
    print(line, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (after 3 warm-up rounds)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], action="append")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--memory-of", choices=["manual", "autograd", "HF"], help=argparse.SUPPRESS)  # child processes
    ap.add_argument("--time-here", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    labels = ["manual", "autograd"] + ([] if args.no_hf else ["HF"])
    if args.memory_of:
        step = make_step(args.memory_of, CONFIGS[args.only], make_batch(CONFIGS[args.only]), args.precision[0])
        for _ in range(3):
            step()
        print(own_peak_rss_mb())
        return
    if args.time_here:
        time_config(args.only, args.precision[0], labels, args.steps)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.steps} rounds "
          f"after 3 warm-up rounds, the steps taking turns; ratios: median of the ratios within each round")
    for name in CONFIGS:
        if args.only and name != args.only:
            continue
        for precision in args.precision or ["fp32", "bf16"]:
            # Each config in a fresh process, as in a training run of its own: after a big model, the memory
            # it freed stays with the process and makes the next config's fresh tensors unusually cheap.
            cmd = [sys.executable, __file__, "--only", name, "--precision", precision, "--steps", str(args.steps),
                   "--time-here"] + (["--no-hf"] if args.no_hf else [])
            subprocess.run(cmd, check=True)
            if not args.no_memory:
                mem = {label: peak_rss_mb(name, precision, label) for label in labels}
                print(" " * 11 + "peak RSS: " + ", ".join(f"{label} {mb:.0f} MB" for label, mb in mem.items()),
                      flush=True)
    print("(ratios > 1: minift's hand-written step is faster)")


if __name__ == "__main__":
    main()
