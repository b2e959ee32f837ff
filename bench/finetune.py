"""The main job, minift vs the Hugging Face Trainer, side by side in one run: time to accuracy and the result.

Same model (all-MiniLM-L6-v2 + a new 3-class head), same split (data/splits/tweets-seed0: stratified
80/10/10 after dropping empty and duplicate texts), same max_length 64, same validation and test rows.
- minift runs README's first command, `minift finetune`: the defaults of minift/recipe.py and TrainConfig
  (found by bench/recipe_search.py on validation), bf16 where the CPU multiplies bf16 natively.
- The Trainer runs the usual recipe of the guide, as a user of that library writes it: fp32, batch 32,
  AdamW lr 5e-5, wd 0.01, 6% warmup then linear decay, clip 1.0, 2 epochs (`--hf-epochs`).
Both are evaluated on the validation split as they train: minift on its own schedule (the recipe's), the
Trainer every quarter epoch. "minutes to X" is the training time (evaluations not counted) until the first
evaluation with validation accuracy >= X (`--target`). Wall time is the whole job: loading, tokenizing,
training, validation passes, saving and the test pass; for the Trainer the quarter-epoch validation passes
this bench adds are taken out of it (they do not change its training), so its wall time is that of a plain
`trainer.train()` + `trainer.predict(test)`.

    pip install -e '.[bench]'
    python bench/finetune.py                          # both: about 35 min on 2 cores with bf16 (RESULTS.md)
    python bench/finetune.py --skip-hf                # minift only
    python bench/finetune.py --epochs 1 --limit 3000  # a quicker comparison on a subset (both 1 epoch)

Results go to OUT/results.json. bench/finetune.json is a copy of the run in bench/RESULTS.md (session 6, the
main job's recipe of commit 3827573; the Trainer's figures repeat session 5's to the digit): tutorial 06 draws
its Trainer curve and bench/recipe_search.py takes the Trainer's validation accuracy from it.
"""
import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from minift import TrainConfig, recipe
from minift.classify import finetune_classifier
from minift.corpora import TWEET_LABELS, limit_rows, load_classification_splits
from minift.hub import fetch_minilm
from minift.sweep import learning_curve, seconds_to


def macro_f1(preds, labels, n):
    f1s = []
    for c in range(n):
        tp = ((preds == c) & (labels == c)).sum()
        p, r = tp / max((preds == c).sum(), 1), tp / max((labels == c).sum(), 1)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    return float(sum(f1s) / n)


def run_hf(splits, epochs, out, limit, evals_per_epoch):
    """The transformers Trainer on the same rows, as a user of that library would write it, plus validation
    passes every quarter epoch whose own time is recorded (and taken out of the wall time)."""
    import numpy as np
    from transformers import (AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    t0 = time.perf_counter()
    path = fetch_minilm()
    tok = AutoTokenizer.from_pretrained(path)
    label_id = {name: i for i, name in enumerate(TWEET_LABELS)}

    def encode(rows):
        enc = tok([r["text"] for r in rows], truncation=True, max_length=recipe.MAX_LENGTH)
        return [{"input_ids": i, "attention_mask": m, "labels": label_id[r["label"]]}
                for i, m, r in zip(enc["input_ids"], enc["attention_mask"], rows)]

    splits = limit_rows(splits, limit)  # the rows finetune_classifier(limit=limit) uses, held-out ones included
    train_rows, val_rows = splits["train"], splits["validation"]
    steps_per_epoch = math.ceil(len(train_rows) / 32)

    class Clock(TrainerCallback):
        """Validation accuracy at each evaluation, against the training time spent before it."""
        def __init__(self):
            self.curve, self.eval_seconds, self.start = [], 0.0, None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            self.eval_seconds += metrics["eval_runtime"]
            spent = time.perf_counter() - self.start - self.eval_seconds
            self.curve.append({"step": state.global_step, "train_seconds": round(spent, 1),
                               "accuracy": metrics["eval_accuracy"], "loss": metrics["eval_loss"]})

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    model = BertForSequenceClassification.from_pretrained(path, num_labels=3)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=32, per_device_eval_batch_size=64,
                             learning_rate=5e-5, weight_decay=0.01, lr_scheduler_type="linear",
                             # 6% warmup; transformers 5 dropped warmup_ratio, so give the step count
                             warmup_steps=math.ceil(0.06 * steps_per_epoch * epochs),
                             max_grad_norm=1.0, num_train_epochs=epochs, save_strategy="no", eval_strategy="steps",
                             eval_steps=max(1, steps_per_epoch // evals_per_epoch), report_to=[], seed=0,
                             use_cpu=True, logging_steps=100, dataloader_num_workers=0)
    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=encode(train_rows), eval_dataset=encode(val_rows),
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy, callbacks=[clock])
    trainer.train()
    if not clock.curve or clock.curve[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()  # the end of training, as minift evaluates it
    pred = trainer.predict(encode(splits["test"]))
    preds, labels = np.argmax(pred.predictions, -1), pred.label_ids
    wall = time.perf_counter() - t0 - clock.eval_seconds
    return {"test_accuracy": float((preds == labels).mean()), "test_macro_f1": macro_f1(preds, labels, 3),
            "validation_accuracy": clock.curve[-1]["accuracy"], "curve": clock.curve, "wall_seconds": wall,
            "validation_seconds_taken_out": clock.eval_seconds}


def run_minift(cfg, out, limit):
    """README's first command (`minift finetune`), through the function it calls."""
    report = finetune_classifier(recipe.MODEL, recipe.DATA, out, cfg, recipe.MAX_LENGTH, recipe.POOLING, limit=limit)
    return {"test_accuracy": report["test"]["accuracy"], "test_macro_f1": report["test"]["macro_f1"],
            "validation_accuracy": report["validation"]["accuracy"], "curve": learning_curve(Path(out) / "log.jsonl"),
            "wall_seconds": report["wall_seconds"]}


def minutes_to(curve, target):
    seconds = seconds_to(curve, target)
    return "not reached" if seconds is None else f"{seconds / 60:.1f} min"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, help="minift's epochs (default: the recipe's) and, unless --hf-epochs "
                                                  "is given, the Trainer's")
    ap.add_argument("--hf-epochs", type=float, help="the Trainer's epochs (default 2, the guide's recipe)")
    ap.add_argument("--limit", type=int, help="training rows (default: all 29,794); validation and test rows: a "
                                                 "quarter as many (corpora.limit_rows), for both")
    ap.add_argument("--target", type=float, default=0.80, help="validation accuracy for the time-to-accuracy column")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-minift", action="store_true")
    ap.add_argument("--precision", default=TrainConfig.precision, help="minift's (auto: bf16 where native)")
    ap.add_argument("--out", default="runs/bench-finetune")
    args = ap.parse_args()
    out = Path(args.out)
    splits, _ = load_classification_splits(None, seed=0)
    cfg = TrainConfig(**{**recipe.MAIN_TRAIN, "precision": args.precision})
    if args.epochs:
        cfg = replace(cfg, epochs=args.epochs)
    hf_epochs = args.hf_epochs or args.epochs or 2
    used = limit_rows(splits, args.limit)  # what both train and test on
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; "
          f"train rows {len(used['train'])}, test rows {len(used['test'])}; minift {cfg.epochs} "
          f"epochs, Trainer {hf_epochs}")
    results = {}
    if not args.skip_minift:
        results["minift"] = run_minift(cfg, out / "minift", args.limit)
    if not args.skip_hf:
        results["transformers Trainer"] = run_hf(splits, hf_epochs, out / "hf", args.limit, evals_per_epoch=4)
    print("\n" + json.dumps(results, indent=2))
    for name, r in results.items():
        print(f"{name:22s} minutes to validation accuracy {args.target}: {minutes_to(r['curve'], args.target):>11}; "
              f"final validation {r['validation_accuracy']:.4f}, test accuracy {r['test_accuracy']:.4f}, macro-F1 "
              f"{r['test_macro_f1']:.4f}, wall {r['wall_seconds'] / 60:.1f} min")
    if len(results) == 2:
        m, h = results["minift"], results["transformers Trainer"]
        print(f"minift / Trainer: test accuracy {m['test_accuracy'] - h['test_accuracy']:+.4f}, macro-F1 "
              f"{m['test_macro_f1'] - h['test_macro_f1']:+.4f}, wall-time ratio {m['wall_seconds'] / h['wall_seconds']:.2f} "
              "(goal: <= 0.25 with native bf16, <= 0.35 and <= 20 min without)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
