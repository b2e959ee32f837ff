"""Did fine-tuning work? Classification metrics (with the majority-class baseline beside them) and perplexity.

The metrics follow scikit-learn's definitions (the tests check against it), with zero_division=0: a class
that is never predicted has precision 0, one with no examples has recall 0."""

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


def format_metrics(metrics):
    """A short report: headline numbers beside the baseline, a per-class table and the confusion matrix (a
    language model's: loss and perplexity)."""
    m = metrics
    if "perplexity" in m:
        return f"loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f} over {m['num_targets']:,} target tokens"
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

    The loss is weighted by targets (tokens for a language model, examples for a classifier), so it does
    not change with the batch size. The model's train/eval mode is restored afterwards."""
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
    model.train(was_training)
    mean_loss = total_loss / max(total_targets, 1)
    if not math.isfinite(mean_loss):
        raise MiniftError(f"the evaluation loss is {mean_loss}: the model's outputs are not finite (NaN or inf weights, "
                          "a diverged run?); evaluate an earlier checkpoint, or train again with a lower lr")
    if not preds:
        return {"loss": mean_loss, "perplexity": perplexity(mean_loss), "num_targets": total_targets}
    num_labels = logits.shape[-1]
    metrics = classification_metrics(torch.cat(preds), torch.cat(labels), num_labels, label_names)
    return {"loss": mean_loss, **metrics}
