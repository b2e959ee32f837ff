"""The whole classification recipe in one function: data -> model -> train -> evaluate -> report.

The tutorials walk these steps one by one; `minift finetune` and bench/finetune.py call this function.
"""
import json
import time
from pathlib import Path

import torch

from .checkpoints import load_checkpoint, load_state, read_safetensors, save_checkpoint
from .data import cached_splits, clean, length_report, load_splits, read_csv, read_jsonl
from .errors import MiniftError
from .evaluate import evaluate, format_metrics
from .hub import data_dir, fetch_tweets, resolve_model
from .lora import add_lora, merge_and_unload, save_adapter
from .tasks import class_names, encode_classification
from .tokenizer import Tokenizer
from . import distributed, recipe
from .train import TrainConfig, pick_device, seed_everything, train
from .tweets import TWEET_LABELS, tweet_splits


def split_folder(data=None, seed=0):
    """Where the train/validation/test splits of a dataset are kept (made once, then reused)."""
    if data is None:
        return data_dir() / "splits" / f"tweets-seed{seed}"
    data = Path(data)
    return data if data.is_dir() else data.with_name(f"{data.stem}-splits-seed{seed}")


def load_classification_splits(data=None, text_column="text", label_column="label", seed=0, for_training=True):
    """(splits, label_names). No `data`: the offline tweet-sentiment corpus. A CSV/TSV/JSONL file: read,
    clean, split 80/10/10 once and keep the splits beside it (made again when the file changes). A folder:
    train/validation/test.jsonl in it. label_names: the training rows' classes, sorted; two at least
    unless for_training=False (data that a trained model only scores, against its own label names)."""
    folder = split_folder(data, seed)
    if data is None:
        return tweet_splits(fetch_tweets(), folder, seed), TWEET_LABELS
    data = Path(data)
    columns = {"text": text_column, "label": label_column}
    if data.is_dir():
        splits = load_splits(data, columns)
    else:
        def read_and_clean():
            rows = read_jsonl(data, columns) if data.suffix in (".jsonl", ".json") else read_csv(data, columns)
            rows, report = clean(rows)
            print(report)
            return rows
        splits = cached_splits(data, folder, read_and_clean, seed, (0.8, 0.1, 0.1), columns)
    # labels as text (a JSONL file may hold numbers), named in sorted order
    splits = {k: [{**r, "label": str(r["label"])} for r in v] for k, v in splits.items()}
    return splits, class_names(splits["train"], at_least=2 if for_training else 1)


def weights_moved(model, base):
    """How far fine-tuning moved the weights: ||w - w0|| / ||w0|| over all of them."""
    num = sum(float((p.detach().cpu() - base[n]).float().norm() ** 2) for n, p in model.named_parameters() if n in base)
    den = sum(float(t.float().norm() ** 2) for t in base.values())
    return (num / den) ** 0.5


def finetune_classifier(model=recipe.MODEL, data=recipe.DATA, out=recipe.OUT, cfg=None, max_length=recipe.MAX_LENGTH,
                        pooling=recipe.POOLING, text_column="text", label_column="label", limit=None, test=True,
                        resume=False):
    """The main job (recipe.py's defaults): fine-tune a pretrained encoder or decoder to classify texts;
    print and return the metrics."""
    cfg = cfg or TrainConfig(**recipe.MAIN_TRAIN)
    t0 = time.perf_counter()
    path = resolve_model(model)
    tok = Tokenizer.from_file(path)
    splits, label_names = load_classification_splits(data, text_column, label_column, cfg.seed)
    if limit:  # a quick run on the first `limit` training rows (tutorials, smoke tests)
        splits = {k: v[:limit] if k == "train" else v[: max(limit // 4, 50)] for k, v in splits.items()}
    print(length_report(splits["train"], tok, max_length))
    # the test split is not even tokenized unless this run is the once-only look at it (test=True)
    encoded = {k: encode_classification(v, tok, label_names, max_length) for k, v in splits.items()
               if k != "test" or test}
    seed_everything(cfg.seed)  # before the new head is drawn: the same seed gives the same run
    net = load_checkpoint(path, "classify", num_labels=len(label_names), pooling=pooling)
    base = {n: p.detach().clone() for n, p in net.named_parameters()}
    if cfg.lora_r:
        print(add_lora(net, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout))
    result = train(net, encoded["train"], encoded["validation"], cfg, out, tok.pad_id, label_names,
                   tokenizer_file=path / "tokenizer.json", resume=resume)
    if not distributed.is_main():  # under torchrun only rank 0 evaluates and writes the report
        return result
    best_metrics = result.pop("best_metrics")  # (the report's "validation", below)
    best = load_best(Path(out), path, cfg, label_names, pooling, "classify")
    device = pick_device(cfg.device)
    best.to(device)
    report = {"model": str(path), "train_rows": len(encoded["train"]), "config": vars(cfg), **result,
              "weights_moved": weights_moved(best, base)}
    if result["precision"] == "fp32" and best_metrics and not cfg.lora_r:
        # measured when the best model was chosen, in fp32 as the report's passes run: evaluating it again would
        # repeat the numbers and cost a pass (a twentieth of the main job on a CPU without bf16)
        report["validation"] = best_metrics
    else:  # a bf16 run chose it in bf16, or LoRA's merged weights round differently: evaluate what was saved
        report["validation"] = evaluate(best, encoded["validation"], tok.pad_id, label_names=label_names, device=device)
    print(f"\nvalidation (best step {result['best_step']}):\n{format_metrics(report['validation'])}")
    if test:
        report["test"] = evaluate(best, encoded["test"], tok.pad_id, label_names=label_names, device=device)
        print(f"\ntest (held out, looked at once):\n{format_metrics(report['test'])}")
    report["wall_seconds"] = time.perf_counter() - t0
    print(f"\nweights moved {report['weights_moved']:.4f} (relative L2 distance from the pretrained ones)")
    print(f"best model saved in {Path(out) / 'best'}, log in {Path(out) / 'log.jsonl'}; "
          f"total {report['wall_seconds'] / 60:.1f} min")
    print(f"predict with:  minift predict {Path(out) / 'best'} \"what a great day\"")
    (Path(out) / "results.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def load_best(out, base_path, cfg, label_names=None, pooling=None, task="classify"):
    """The best model of a run. With LoRA, best/ holds the base weights and the adapters: the adapters are
    also saved in peft's layout (OUT/adapter), and best/ becomes the merged, plain checkpoint that
    `minift predict` and transformers load."""
    if not cfg.lora_r:
        return load_checkpoint(out / "best", task, verbose=False)
    num_labels = len(label_names) if label_names else None
    model = load_checkpoint(base_path, task, num_labels=num_labels, pooling=pooling, verbose=False)
    add_lora(model, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    load_state(model, read_safetensors(out / "best"))
    save_adapter(model, out / "adapter", str(base_path))
    model = merge_and_unload(model)
    save_checkpoint(model, out / "best", label_names, base_path / "tokenizer.json")
    print(f"adapter saved in {out / 'adapter'} (peft's layout); best/ holds the merged model")
    return model


def look_at_test_set(folder, again=False):
    """Allow one look at a test set; a second needs again=True. Every look at the test set that changes
    what you do next (another lr, another epoch) makes it a second validation set, and its score stops
    being an honest estimate of how the model does on new data."""
    marker = Path(folder) / "test_looked_at.json"
    if marker.exists() and not again:
        when = json.loads(marker.read_text())["when"]
        raise MiniftError(f"the test set in {folder} was already looked at ({when}); choosing settings by it "
                          "would make its score optimistic: pass again=True (--again) if you really mean to")
    marker.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S")}))


@torch.no_grad()
def predict(model, tok, texts, label_names=None, max_length=128):
    """Class probabilities for new texts, as (label, probability) pairs."""
    if not texts:
        raise MiniftError("no text to predict: give at least one sentence")
    model.eval()
    batch = tok(texts, max_length=max_length)
    probs = model(batch["input_ids"], batch["attention_mask"]).float().softmax(-1)
    names = label_names or [str(i) for i in range(probs.shape[-1])]
    return [(names[int(p.argmax())], float(p.max())) for p in probs]
