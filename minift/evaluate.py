"""Did fine-tuning work? Classification metrics (with the majority-class baseline beside them), a tagger's
entity-level figures, and perplexity.

The classification metrics follow scikit-learn's definitions, the entity ones seqeval's (the tests check against
both), with zero_division=0: a class that is never predicted has precision 0, one with no examples has recall 0."""

import math

import torch

from .batching import collate
from .errors import MiniftError


def confusion_matrix(preds, labels, num_labels):
    """Counts of [true label, predicted label], as a long tensor of shape [num_labels, num_labels]."""
    preds, labels = torch.as_tensor(preds).long().flatten(), torch.as_tensor(labels).long().flatten()
    if preds.numel() != labels.numel():
        raise MiniftError(f"{preds.numel()} predictions but {labels.numel()} labels; they must pair up one to one")
    for what, x in (("label", labels), ("prediction", preds)):
        bad = x[(x < 0) | (x >= num_labels)]
        if bad.numel():
            raise MiniftError(f"{what} {bad[0].item()} is outside 0..{num_labels - 1}; check num_labels")
    # Each (true, pred) pair is one cell of the matrix; number the cells row by row and count them.
    cells = torch.bincount(labels * num_labels + preds, minlength=num_labels * num_labels)
    return cells.reshape(num_labels, num_labels)


def _ratio(a, b):
    return a / b if b else 0.0  # zero_division=0, as in scikit-learn


def classification_metrics(preds, labels, num_labels, label_names=None):
    """Accuracy, macro-F1, per-class precision/recall/F1/support, confusion matrix and majority baseline."""
    names = [str(i) for i in range(num_labels)] if label_names is None else list(label_names)
    if len(names) != num_labels:
        raise MiniftError(f"{len(names)} label names for {num_labels} labels; give one name per label")
    cm = confusion_matrix(preds, labels, num_labels)
    n = cm.sum().item()
    if n == 0:
        raise MiniftError("no examples to evaluate; is the evaluation split empty?")
    per_class = {}
    for c, name in enumerate(names):
        tp, predicted, support = cm[c, c].item(), cm[:, c].sum().item(), cm[c, :].sum().item()
        p, r = _ratio(tp, predicted), _ratio(tp, support)
        per_class[name] = {"precision": p, "recall": r, "f1": _ratio(2 * p * r, p + r), "support": support}
    # Macro-F1 is the plain mean over all num_labels classes, so a rare class counts as much as a common one.
    macro_f1 = sum(m["f1"] for m in per_class.values()) / num_labels
    # The baseline: always answer the most frequent true label. A model must beat this to have learned anything.
    support = cm.sum(dim=1)
    majority = support.argmax().item()
    return {"accuracy": cm.diag().sum().item() / n, "macro_f1": macro_f1, "per_class": per_class,
            "confusion": cm.tolist(), "majority_baseline": support[majority].item() / n,
            "majority_label": names[majority], "num_examples": n}


def entity_spans(tags):
    """The entities in one sentence's BIO tags, as (type, first word, last word), read as seqeval's default mode
    (conlleval's rules) reads them: an entity begins at B-TYPE, or at I-TYPE that does not continue an entity of
    its type (after O, or after another type: an ill-formed I- still counts); it runs through the I-TYPE after it.
    ["B-person", "I-person", "O", "I-geo-loc", "I-company"] -> [("person", 0, 1), ("geo-loc", 3, 3),
    ("company", 4, 4)]."""
    spans, start, kind = [], None, None
    for i, tag in enumerate(list(tags) + ["O"]):  # a last O closes an entity still open
        prefix, _, this = tag.partition("-")
        if prefix not in ("O", "B", "I") or (prefix == "O") != (tag == "O"):
            raise MiniftError(f"tag {tag!r} is not O, B-TYPE or I-TYPE: entity metrics read BIO tags")
        goes_on = start is not None and prefix == "I" and this == kind
        if start is not None and not goes_on:
            spans.append((kind, start, i - 1))
            start = None
        if prefix in ("B", "I") and not goes_on:
            start, kind = i, this
    return spans


def entity_metrics(true_tags, pred_tags):
    """Entity-level precision, recall and F1 of tagged sentences (lists of BIO tags), seqeval's definition (the
    tests check against it): an entity counts as found only when its type, first and last word all match a true
    one; micro-averaged over every entity, and per type (support: the true entities of that type), with
    zero_division=0. A tagger that says O everywhere scores 0, whatever its per-token accuracy."""
    if len(true_tags) != len(pred_tags) or any(len(t) != len(p) for t, p in zip(true_tags, pred_tags)):
        raise MiniftError("true and predicted tags must pair up: one tag sequence per sentence, one tag per word")
    true = {(n, *span) for n, tags in enumerate(true_tags) for span in entity_spans(tags)}
    pred = {(n, *span) for n, tags in enumerate(pred_tags) for span in entity_spans(tags)}

    def scores(t, p):
        precision, recall = _ratio(len(t & p), len(p)), _ratio(len(t & p), len(t))
        return {"precision": precision, "recall": recall, "f1": _ratio(2 * precision * recall, precision + recall)}
    types = sorted({e[1] for e in true | pred})
    per_type = {k: {**scores({e for e in true if e[1] == k}, {e for e in pred if e[1] == k}),
                    "support": sum(e[1] == k for e in true)} for k in types}
    return {**scores(true, pred), "per_type": per_type, "num_entities": len(true), "num_predicted": len(pred),
            "num_sentences": len(true_tags)}


def format_metrics(metrics):
    """A short report: headline numbers beside the baseline, a per-class table and the confusion matrix (a
    language model's: loss and perplexity)."""
    m = metrics
    if "perplexity" in m:
        return f"loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f} over {m['num_targets']:,} target tokens"
    if "per_type" in m:  # a tagger's entity figures
        lines = [f"entities: precision {m['precision']:.4f}  recall {m['recall']:.4f}  F1 {m['f1']:.4f}  "
                 f"({m['num_predicted']:,} predicted, {m['num_entities']:,} true in {m['num_sentences']:,} texts; "
                 "tagging every word O scores 0)", f"{'type':<12} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
        lines += [f"{k:<12} {t['precision']:>9.4f} {t['recall']:>9.4f} {t['f1']:>9.4f} {t['support']:>9}"
                  for k, t in m["per_type"].items()]
        return "\n".join(lines)
    if "per_class" not in m:  # a job's own figures (DPO's rewards, GRPO's): as they are
        return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())
    names = list(m["per_class"])
    w = max(9, *(len(name) for name in names))  # column width that fits the longest label name
    lines = [f"accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  on {m['num_examples']} examples  "
             f"(majority baseline {m['majority_baseline']:.4f}: always '{m['majority_label']}')",
             f"{'class':<{w}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
    for name, c in m["per_class"].items():
        lines.append(f"{name:<{w}} {c['precision']:>9.4f} {c['recall']:>9.4f} {c['f1']:>9.4f} {c['support']:>9}")
    lines.append("confusion matrix (rows: true label, columns: predicted)")
    lines.append(" " * w + "".join(f" {name:>{w}}" for name in names))
    for name, row in zip(names, m["confusion"]):
        lines.append(f"{name:<{w}}" + "".join(f" {count:>{w}}" for count in row))
    return "\n".join(lines)


def perplexity(mean_loss):
    """exp of the mean per-token cross-entropy: the effective number of tokens the model hesitates between."""
    mean_loss = float(mean_loss)
    return math.inf if mean_loss > 709 else math.exp(mean_loss)  # exp overflows a double past ~709.78


@torch.no_grad()
def evaluate(model, examples, pad_id, batch_size=64, padding_side="right", label_names=None, device="cpu"):
    """Run the model over encoded examples in eval mode (no dropout); return the loss and the task's metrics.

    The loss is weighted by targets (tokens for a language model, words for a tagger, examples for a classifier),
    so it does not change with the batch size. The model's train/eval mode is restored afterwards."""
    if not examples:
        raise MiniftError("no examples to evaluate; is the evaluation split empty?")
    was_training = model.training
    model.eval()
    total_loss, total_targets, preds, labels = 0.0, 0, [], []
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # similar lengths: less padding
    for i in range(0, len(order), batch_size):
        batch = collate([examples[j] for j in order[i:i + batch_size]], pad_id, padding_side)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(batch["input_ids"], batch["attention_mask"])
        n = model.count_targets(batch["labels"])
        if n == 0:
            continue  # an LM batch whose labels are all -100 has nothing to score
        loss, _ = model.loss(logits, batch["labels"], n)
        total_loss, total_targets = total_loss + loss.item() * n, total_targets + n
        if model.task == "classify":  # one prediction per example (the model contract: heads.py)
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        elif model.task == "tag":  # one tag per word: its first token's, where the label is not -100
            for guess, truth in zip(logits.argmax(-1).cpu(), batch["labels"].cpu()):
                preds.append(guess[truth != -100].tolist())
                labels.append(truth[truth != -100].tolist())
    model.train(was_training)
    mean_loss = total_loss / max(total_targets, 1)
    if not math.isfinite(mean_loss):
        raise MiniftError(f"the evaluation loss is {mean_loss}: the model's outputs are not finite (NaN or inf weights, "
                          "a diverged run?); evaluate an earlier checkpoint, or train again with a lower lr")
    if not preds:
        return {"loss": mean_loss, "perplexity": perplexity(mean_loss), "num_targets": total_targets}
    if model.task == "tag":
        if label_names is None:
            raise MiniftError("a tagger's outputs need their tag names (model.label_names, config.json's id2label) "
                              "to be read as entities: set them")
        named = [[[label_names[i] for i in s] for s in seqs] for seqs in (labels, preds)]
        return {"loss": mean_loss, **entity_metrics(*named)}
    num_labels = logits.shape[-1]
    metrics = classification_metrics(torch.cat(preds), torch.cat(labels), num_labels, label_names)
    return {"loss": mean_loss, **metrics}
