"""The classification job: fine-tune a pretrained encoder (or decoder) to label texts, in one function.

    splits (corpora.py) -> encode (tasks.py) -> model (checkpoints.py) -> train (train.py) -> report (outputs.py)

recipe.py's MAIN_JOB and MAIN_TRAIN are its defaults: `minift finetune` and bench/finetune.py call it, the
tutorials walk its steps one by one. instruct.py is the other job, on the same skeleton.
"""
import time
from pathlib import Path

import torch

from . import distributed, recipe
from .batching import TrainData
from .checkpoints import load_checkpoint
from .config import TrainConfig
from .corpora import limit_rows, load_classification_splits
from .data import length_report, stats
from .errors import MiniftError
from .hub import resolve_model
from .outputs import after_training, finish, load_best, weights_moved
from .tasks import encode_classification
from .tokenizer import Tokenizer
from .train import evaluate_like_training, pick_device, seed_everything, train


def finetune_classifier(model=recipe.MODEL, data=recipe.DATA, out=recipe.OUT, cfg=None, max_length=recipe.MAX_LENGTH,
                        pooling=recipe.POOLING, text_column="text", label_column="label", limit=None, test=True,
                        resume=False):
    """The main job (recipe.py's defaults): fine-tune a pretrained model to classify texts; print the report
    and return it (also in OUT/results.json). limit: the first `limit` training rows (corpora.limit_rows);
    test: take this run's one look at the test split."""
    cfg = cfg or TrainConfig(**recipe.MAIN_TRAIN)
    t0 = time.perf_counter()
    path = resolve_model(model)
    tok = Tokenizer.from_file(path)
    splits, label_names = load_classification_splits(data, text_column, label_column, cfg.seed)
    splits = limit_rows(splits, limit)
    print(length_report(splits["train"], tok, max_length))
    data_stats = {"rows": {k: len(v) for k, v in splits.items()}, "train": stats(splits["train"], tok, max_length)}
    # the test split is not even tokenized unless this run is the once-only look at it (test=True)
    encoded = {k: encode_classification(v, tok, label_names, max_length) for k, v in splits.items()
               if k != "test" or test}
    seed_everything(cfg.seed)  # before the new head is drawn: the same seed gives the same run
    net = load_checkpoint(path, "classify", num_labels=len(label_names), pooling=pooling)
    net.label_names, net.max_length = list(label_names), max_length  # saved with it (config.json)
    examples = TrainData(encoded["train"], encoded["validation"], tok.pad_id)
    result = train(net, examples, cfg, out, resume=resume)
    if not distributed.is_main():  # under torchrun only rank 0 evaluates and writes the report
        return result
    device = pick_device(cfg.device)
    with after_training(out):
        best = load_best(out, "classify", device)
        report = {"model": str(path), "train_rows": len(encoded["train"]), "data": data_stats, "config": vars(cfg),
                  **result, "validation": result["best_metrics"], "weights_moved": weights_moved(best, path)}
        del report["best_metrics"]  # (it is "validation": the numbers measured when best/ was chosen)
        if test:
            report["test"] = evaluate_like_training(best, encoded["test"], examples, cfg, device)
    return finish(report, out, t0, f"predict with:  minift predict {Path(out) / 'best'} \"what a great day\"")


@torch.no_grad()
def predict(model, tok, texts, max_length=None):
    """Class probabilities for new texts, as (label, probability) pairs; texts are cut at the max_length the
    model was trained with (model.max_length), else recipe.MAX_LENGTH."""
    if not texts:
        raise MiniftError("no text to predict: give at least one sentence")
    model.eval()
    batch = tok(texts, max_length=max_length or model.max_length or recipe.MAX_LENGTH)
    probs = model(batch["input_ids"], batch["attention_mask"]).float().softmax(-1)
    if not torch.isfinite(probs).all():
        raise MiniftError("the model's outputs are not finite (NaN or inf weights, a diverged run?): predict with an "
                          "earlier checkpoint, or train again with a lower lr")
    names = model.label_names or [str(i) for i in range(probs.shape[-1])]
    return [(names[int(p.argmax())], float(p.max())) for p in probs]
