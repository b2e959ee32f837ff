"""The named-entity job: fine-tune a pretrained encoder to tag every word of a text (token classification).

    splits (corpora.py: a CoNLL file) -> encode (tasks.py: each word's tag on its first token) -> model
    (checkpoints.py, task "tag") -> train (train.py: best/ by entity F1) -> report (outputs.py)

recipe.py's NER_JOB and NER_TRAIN are its defaults (`minift finetune --task ner`): all-MiniLM-L6-v2 on the tweets of
hub.fetch_ner. It stands beside classify.py on the same skeleton. `predict_entities` is what `minift predict` prints
for a tagger, `evaluate_tagger` what `minift evaluate` scores.
"""
import time
from pathlib import Path

import torch

from . import distributed, recipe
from .batching import TrainData, pad_rows
from .checkpoints import load_checkpoint
from .config import TrainConfig
from .corpora import limit_rows, load_tagging_splits
from .errors import MiniftError
from .evaluate import entity_spans, evaluate
from .hub import resolve_model
from .outputs import after_training, finish, load_best, weights_moved
from .tasks import encode_tagging
from .tokenizer import Tokenizer
from .train import evaluate_like_training, pick_device, seed_everything, train


def encode_splits(splits, tok, tag_names, max_length):
    """Every split encoded (tasks.encode_tagging), with a note where words get no token (they are not scored)."""
    encoded = {}
    for name, rows in splits.items():
        encoded[name], cut = encode_tagging(rows, tok, tag_names, max_length)
        if cut:
            print(f"{name}: {cut:,} words get no token (cut by max_length {max_length}, or dropped by the tokenizer); "
                  "they are neither trained on nor scored")
    return encoded


def finetune_tagger(model=recipe.NER_JOB["model"], data=recipe.NER_JOB["data"], out=recipe.NER_JOB["out"], cfg=None,
                    max_length=recipe.NER_JOB["max_length"], limit=None, test=True, resume=False):
    """Fine-tune a pretrained encoder to tag named entities (a CoNLL file; None: the tweets of hub.fetch_ner). Prints
    entity-level precision, recall and F1 of the untrained head and of the fine-tuned model on validation and (the
    one look) test; returns the report (also in OUT/results.json). limit: the first `limit` training rows."""
    cfg = cfg or TrainConfig(**recipe.NER_TRAIN)
    t0 = time.perf_counter()
    path = resolve_model(model)
    tok = Tokenizer.from_file(path)
    splits, tag_names = load_tagging_splits(data, cfg.seed)
    scored = ("validation", "test") if test else ("validation",)  # the test split is not even encoded otherwise
    encoded = encode_splits({k: v for k, v in limit_rows(splits, limit).items() if k == "train" or k in scored}, tok,
                            tag_names, max_length)
    seed_everything(cfg.seed)  # before the new head is drawn: the same seed gives the same run
    net = load_checkpoint(path, "tag", num_labels=len(tag_names))
    net.label_names, net.max_length = list(tag_names), max_length  # saved with it (config.json's id2label)
    device = pick_device(cfg.device)
    examples = TrainData(encoded["train"], encoded["validation"], tok.pad_id)
    report = {"model": str(path), "train_rows": len(encoded["train"]), "tags": list(tag_names), "config": vars(cfg)}
    if distributed.is_main():  # the head drawn at random: what fine-tuning starts from (no RNG drawn, resume unchanged)
        report["before"] = {k: evaluate_like_training(net.to(device), encoded[k], examples, cfg, device) for k in scored}
    report.update(train(net, examples, cfg, out, resume=resume))
    if not distributed.is_main():  # under torchrun only rank 0 evaluates and writes the report
        return report
    with after_training(out):
        best = load_best(out, "tag", device)
        report["validation"], report["weights_moved"] = report.pop("best_metrics"), weights_moved(best, path)
        if test:
            report["test"] = evaluate_like_training(best, encoded["test"], examples, cfg, device)
    print("\nentity F1, the head drawn at random -> fine-tuned:\n" + "\n".join(
        f"  {k:<10} {report['before'][k]['f1']:.4f} -> {report[k]['f1']:.4f}" for k in scored))
    return finish(report, out, t0, f"predict with:  minift predict {Path(out) / 'best'} \"Justin Bieber sings in London "
                                   "tonight\"")


@torch.no_grad()
def predict_entities(model, tok, texts, max_length=None):
    """The named entities of new texts: for each text a list of (type, the entity's words). A text is cut into words
    at spaces (the training tweets had punctuation apart: "in London ."), each word tagged by its first token's
    logits; words past max_length (the model's, else recipe.NER_JOB's) are tagged O."""
    if not texts:
        raise MiniftError("no text to tag: give at least one sentence")
    sentences = [text.split() for text in texts]
    if not all(sentences):
        raise MiniftError("a text holds no word: give each text some words")
    model.eval()
    encoded = tok.encode_words(sentences, max_length or model.max_length or recipe.NER_JOB["max_length"])
    ids, mask = pad_rows([ids for ids, _ in encoded], tok.pad_id)
    guesses = model(ids, mask)
    if not torch.isfinite(guesses).all():
        raise MiniftError("the model's outputs are not finite (NaN or inf weights, a diverged run?): predict with an "
                          "earlier checkpoint, or train again with a lower lr")
    names = model.label_names or [str(i) for i in range(guesses.shape[-1])]
    found = []
    for words, (_, word_ids), guess in zip(sentences, encoded, guesses.argmax(-1).tolist()):
        tags = ["O"] * len(words)
        for position, w in reversed(list(enumerate(word_ids))):  # read backwards: a word's first token writes last
            if w is not None:
                tags[w] = names[guess[position]]
        found.append([(kind, " ".join(words[first:last + 1])) for kind, first, last in entity_spans(tags)])
    return found


def load_tagger(folder):
    """A saved tagger (a run's best/), refused in one line when its head was never trained."""
    model = load_checkpoint(folder, "tag", verbose=False)
    if model.load_report.new_head or not model.label_names:
        raise MiniftError(f"{folder} has no trained tagging head with tag names: fine-tune one first (minift finetune "
                          "--task ner)")
    return model


def evaluate_tagger(folder, data=None, split="validation", seed=0, max_length=None):
    """Entity-level figures of a saved tagger on a split of its data (None: the tweets of hub.fetch_ner), its words cut
    where they were in training (the model's max_length) unless max_length says otherwise."""
    model, tok = load_tagger(folder), Tokenizer.from_file(folder)
    splits, _ = load_tagging_splits(data, seed)
    examples, _ = encode_tagging(splits[split], tok, model.label_names, max_length or model.max_length or
                                 recipe.NER_JOB["max_length"])
    return evaluate(model, examples, tok.pad_id, label_names=model.label_names)
