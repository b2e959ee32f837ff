"""The default fine-tune, minift vs the Hugging Face Trainer, side by side in one run.

Same model (all-MiniLM-L6-v2 + a new 3-class head), same split (data/splits/tweets-seed0: stratified
80/10/10 after dropping empty and duplicate texts), same max_length 64. The Trainer runs the recipe of
the guide (fp32, batch 32, AdamW lr 5e-5, wd 0.01, 6% warmup then linear decay, clip 1.0, 2 epochs);
minift runs its `minift finetune` defaults: the same settings, with mean pooling and bf16 where the
CPU has it. Prints test accuracy, macro-F1 and wall time of both.

    pip install -e '.[bench]'
    python bench/finetune.py                    # both, about 45 minutes on 2 cores (see RESULTS.md)
    python bench/finetune.py --skip-hf          # minift only
    python bench/finetune.py --epochs 1 --limit 3000   # a quicker comparison on a subset
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

from minift.tweets import TWEET_LABELS
from minift.finetune import finetune_classifier, load_classification_splits
from minift import recipe
from minift.hub import fetch_minilm
from minift.train import TrainConfig


def run_hf(splits, epochs, out, limit):
    """The transformers Trainer on the same rows, as a user of that library would write it."""
    import numpy as np
    from transformers import (AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    path = fetch_minilm()
    tok = AutoTokenizer.from_pretrained(path)
    label_id = {name: i for i, name in enumerate(TWEET_LABELS)}

    def encode(rows):
        enc = tok([r["text"] for r in rows], truncation=True, max_length=64)
        return [{"input_ids": i, "attention_mask": m, "labels": label_id[r["label"]]}
                for i, m, r in zip(enc["input_ids"], enc["attention_mask"], rows)]

    train_rows = splits["train"][:limit] if limit else splits["train"]
    model = BertForSequenceClassification.from_pretrained(path, num_labels=3)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=32, per_device_eval_batch_size=64,
                             learning_rate=5e-5, weight_decay=0.01, lr_scheduler_type="linear",
                             # 6% warmup; transformers 5 dropped warmup_ratio, so give the step count
                             warmup_steps=math.ceil(0.06 * math.ceil(len(train_rows) / 32) * epochs),
                             max_grad_norm=1.0, num_train_epochs=epochs, save_strategy="no", eval_strategy="no",
                             report_to=[], seed=0, use_cpu=True, logging_steps=100, dataloader_num_workers=0)
    t0 = time.perf_counter()
    trainer = Trainer(model=model, args=args, train_dataset=encode(train_rows),
                      data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    train_seconds = time.perf_counter() - t0
    pred = trainer.predict(encode(splits["test"]))
    preds, labels = np.argmax(pred.predictions, -1), pred.label_ids
    f1s = []
    for c in range(3):
        tp = ((preds == c) & (labels == c)).sum()
        p, r = tp / max((preds == c).sum(), 1), tp / max((labels == c).sum(), 1)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    return {"test_accuracy": float((preds == labels).mean()), "test_macro_f1": float(np.mean(f1s)),
            "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - t0,
            "samples_per_s": len(train_rows) * epochs / train_seconds}


def run_minift(cfg, out, limit, pooling):
    t0 = time.perf_counter()
    report = finetune_classifier("minilm", None, out, cfg, 64, pooling, limit=limit)
    return {"test_accuracy": report["test"]["accuracy"], "test_macro_f1": report["test"]["macro_f1"],
            "validation_accuracy": report["validation"]["accuracy"], "train_seconds": report["seconds"],
            "wall_seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--limit", type=int, help="training rows (default: all 29,794)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-minift", action="store_true")
    ap.add_argument("--precision", default="auto", help="minift's main-job default: bf16 where the hardware has it")
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--pooling", default=recipe.POOLING, help="minift's main-job default (recipe.py)")
    ap.add_argument("--out", default="runs/bench-finetune")
    args = ap.parse_args()
    out = Path(args.out)
    splits, _ = load_classification_splits(None, seed=0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; train rows "
          f"{args.limit or len(splits['train'])}, test rows {len(splits['test'])}, epochs {args.epochs}")
    results = {}
    if not args.skip_minift:
        cfg = TrainConfig(epochs=args.epochs, precision=args.precision, lr=args.lr)
        results["minift"] = run_minift(cfg, out / "minift", args.limit, args.pooling)
    if not args.skip_hf:
        results["transformers Trainer"] = run_hf(splits, args.epochs, out / "hf", args.limit)
    print("\n" + json.dumps(results, indent=2))
    for name, r in results.items():
        print(f"{name:22s} test accuracy {r['test_accuracy']:.4f}  macro-F1 {r['test_macro_f1']:.4f}  "
              f"wall {r['wall_seconds'] / 60:.1f} min")
    if len(results) == 2:
        m, h = results["minift"], results["transformers Trainer"]
        print(f"minift / Trainer: accuracy {m['test_accuracy'] - h['test_accuracy']:+.4f}, "
              f"macro-F1 {m['test_macro_f1'] - h['test_macro_f1']:+.4f}, "
              f"wall-time ratio {m['wall_seconds'] / h['wall_seconds']:.2f} (goal <= 0.50)")
    (out / "results.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
