"""One training step (forward + backward + AdamW), side by side in one run:
minift's hand-written backward vs autograd on the same minift model vs Hugging Face transformers.

    python bench/backward.py                 # all configs, fp32 and bf16
    python bench/backward.py --only minilm --steps 10

Prints the median step time of each, the ratios (>1 means minift is faster) and peak memory (RSS growth).
Needs transformers (the test extra). Configs are random-init: speed does not depend on the weights.
"""
import argparse
import gc
import resource
import statistics
import time

import torch

from minift.checkpoints import build_model
from minift.layers import Dropout
from minift.optim import AdamW, param_groups
from minift.train import TrainConfig, autocast, forward_backward

CONFIGS = {
    "minilm": dict(kind="classify", batch=32, seq=64, hf="BertForSequenceClassification",
                   config=dict(model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                               num_attention_heads=12, intermediate_size=1536, num_labels=3)),
    "gpt2-124M": dict(kind="lm", batch=4, seq=256, hf="GPT2LMHeadModel",
                      config=dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)),
    "gpt2-4x256": dict(kind="lm", batch=8, seq=128, hf="GPT2LMHeadModel",
                       config=dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=256, n_layer=4, n_head=4)),
}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step, steps, warmup=3):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def minift_step(spec, batch, precision, backward):
    model = build_model(spec["config"], task="lm" if spec["kind"] == "lm" else "classify", num_labels=3).train()
    groups = param_groups(model.named_parameters(), 0.01)
    opt = AdamW(groups, lr=1e-5)
    cfg = TrainConfig(precision=precision, backward=backward)
    device = torch.device("cpu")

    def step():
        n = model.count_targets(batch["labels"])
        with autocast(device, precision):
            forward_backward(model, batch, n, cfg)
        opt.step()
        opt.zero_grad()
    return step


def hf_step(spec, batch, precision):
    import transformers

    hf_config = dict(spec["config"])
    kind = hf_config.pop("model_type")
    config = (transformers.BertConfig if kind == "bert" else transformers.GPT2Config)(**hf_config)
    model = getattr(transformers, spec["hf"])(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=list(CONFIGS))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", choices=["fp32", "bf16"], action="append")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.steps} steps after 3 warm-up")
    for name, spec in CONFIGS.items():
        if args.only and name != args.only:
            continue
        vocab = spec["config"]["vocab_size"]
        ids = torch.randint(1, vocab, (spec["batch"], spec["seq"]))
        labels = ids.clone() if spec["kind"] == "lm" else torch.randint(0, 3, (spec["batch"],))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        for precision in args.precision or ["fp32", "bf16"]:
            row = {}
            runs = [("manual", lambda: minift_step(spec, batch, precision, "manual")),
                    ("autograd", lambda: minift_step(spec, batch, precision, "autograd"))]
            if not args.no_hf:
                runs.append(("HF", lambda: hf_step(spec, batch, precision)))
            for label, make in runs:
                gc.collect()
                before = peak_rss_mb()
                row[label] = time_steps(make(), args.steps)
                row[label + "_mem"] = peak_rss_mb() - before
            line = (f"{name:11s} {spec['batch']}x{spec['seq']} {precision}: minift manual {row['manual']:.3f} s, "
                    f"autograd {row['autograd']:.3f} s")
            if "HF" in row:
                line += f", HF {row['HF']:.3f} s | vs HF x{row['HF'] / row['manual']:.2f}"
            line += f", vs autograd x{row['autograd'] / row['manual']:.2f}"
            print(line, flush=True)
    print("(ratios > 1: minift's hand-written step is faster; peak-RSS growth is a rough memory signal)")


if __name__ == "__main__":
    main()
