"""bf16 vs fp32 training on this CPU, side by side: step speed and how far the loss curves drift apart.

Both runs start from the same pretrained MiniLM, the same seed and the same batches of the tweet task;
bf16 autocast runs the matmuls in bf16 and keeps fp32 master weights and AdamW state.

    python bench/bf16.py --steps 100
"""
import argparse
import statistics
import tempfile
from pathlib import Path

from minift import TrainConfig, TrainData, train
from minift.checkpoints import load_checkpoint
from minift.corpora import load_classification_splits
from minift.hub import fetch_minilm
from minift.resume import read_log
from minift.tasks import encode_classification
from minift.tokenizer import Tokenizer


def run(precision, steps, encoded, pad_id, path):
    model = load_checkpoint(path, "classify", num_labels=3, verbose=False)
    cfg = TrainConfig(precision=precision, max_steps=steps, log_every=1, eval_every=10**9)
    with tempfile.TemporaryDirectory() as out:
        result = train(model, TrainData(encoded, [], pad_id), cfg, out)  # no validation rows: steps only
        steps_logged, _ = read_log(Path(out) / "log.jsonl")
    return [r["loss"] for r in steps_logged], result["seconds"] / steps


def smooth(xs, k=10):
    return [statistics.mean(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    path = fetch_minilm()
    tok = Tokenizer.from_file(path)
    splits, labels = load_classification_splits()
    encoded = encode_classification(splits["train"][: args.steps * 32], tok, labels, 64)
    fp32, t32 = run("fp32", args.steps, encoded, tok.pad_id, path)
    bf16, t16 = run("bf16", args.steps, encoded, tok.pad_id, path)
    gap = [abs(a - b) for a, b in zip(smooth(fp32), smooth(bf16))]
    print(f"\nstep time: fp32 {t32:.3f} s, bf16 {t16:.3f} s -> bf16 speed-up x{t32 / t16:.2f}")
    print(f"loss (10-step mean) fp32 {smooth(fp32)[-1]:.4f}, bf16 {smooth(bf16)[-1]:.4f}; "
          f"largest gap between the smoothed curves {max(gap):.4f} (tolerance 0.05)")
    for s in range(0, args.steps, max(1, args.steps // 10)):
        print(f"  step {s + 1:4d}: fp32 {fp32[s]:.4f}  bf16 {bf16[s]:.4f}")


if __name__ == "__main__":
    main()
