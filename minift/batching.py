"""From encoded examples to batches: which examples go together, and padding them into tensors.

This is all the training loop and evaluate() need from the data side. Examples come tokenized once and
unpadded (see tasks.py); each batch is padded only to its own longest row.

    data = TrainData(train, validation, tok.pad_id)            # what train() is given
    for idx in batch_order([len(e["input_ids"]) for e in train], 32, seed=0, epoch=0):
        batch = collate([train[i] for i in idx], tok.pad_id)   # input_ids, attention_mask, labels

    packed = pack_examples(train, 1024)                        # rows packed into sequences (packing=1024)
"""
import bisect
from dataclasses import dataclass

import numpy as np
import torch

from .errors import MiniftError


@dataclass
class TrainData:
    """The data of one training run: encoded examples (tasks.py) and how to pad them into batches.

    train / validation: lists of {"input_ids", "label"} or {"input_ids", "labels"} (validation may be empty: no
    evaluation, no best model). padding_side: "right" for training (also for decoders: positions come from
    the mask). class_weights: a tensor of one loss weight per class (tasks.class_weights), or None.
    objective: what the loop trains on these examples (objective.py); None: the model's own loss
    (objective.SupervisedObjective with this pad_id, padding_side and class_weights). A job that trains another
    way gives its own: dpo.PreferenceObjective (pairs), grpo.GRPOObjective (prompts)."""
    train: list
    validation: list
    pad_id: int
    padding_side: str = "right"
    class_weights: torch.Tensor | None = None
    objective: object = None


def pad(seq, value, width, side="right"):
    """`seq` (a list) padded with `value` to `width` items, on the right or the left."""
    if side not in ("right", "left"):
        raise MiniftError(f"padding_side={side!r}; use 'right' or 'left'")
    n = width - len(seq)
    return seq + [value] * n if side == "right" else [value] * n + seq


def pad_rows(rows, pad_id, side="right", device=None):
    """Token-id lists -> (input_ids, attention_mask) LongTensors, padded on `side` to the longest row: the one padder
    of training batches, evaluation, generation's prompts (left) and rollouts."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([pad(list(r), pad_id, width, side) for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([pad([1] * len(r), 0, width, side) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def collate(examples, pad_id, padding_side="right"):
    """Pad a list of examples to the longest one: input_ids, attention_mask, labels (LongTensors).

    Classification: labels is [B]. Language modelling / instructions: labels is [B, T], padded with -100
    on the same side as input_ids, so padding is never a target."""
    if not examples:
        raise MiniftError("collate got no examples; check the batch indices")
    width = max(len(e["input_ids"]) for e in examples)
    ids, mask = pad_rows([e["input_ids"] for e in examples], pad_id, padding_side)
    labels = [e["label"] if "label" in e else pad(e["labels"], -100, width, padding_side) for e in examples]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels, dtype=torch.long)}
    if any("document_ids" in e for e in examples):  # packed examples (pack_examples); an unpacked row is one text
        documents = [e.get("document_ids", [1] * len(e["input_ids"])) for e in examples]
        positions = [e.get("position_ids", list(range(len(e["input_ids"])))) for e in examples]
        batch["document_ids"] = torch.tensor([pad(d, 0, width, padding_side) for d in documents])  # padding: text 0
        batch["position_ids"] = torch.tensor([pad(p, 0, width, padding_side) for p in positions])
    return batch


def pack_examples(examples, capacity):
    """Language-model examples packed into sequences of at most `capacity` tokens, best-fit decreasing: the
    longest rows first, each into the sequence it fills most tightly (a row longer than `capacity` stays alone).
    A packed example also has `document_ids` (1, 2, ... per row, so attention never crosses two of them:
    heads.attention_allowed) and `position_ids` (restarting at 0 for every row). Each row's first label is
    -100: it is the target of the previous row's last token, which in the row alone has no target either, so
    the loss and its count of targets are those of the rows unpacked. Deterministic: a resume packs alike."""
    if any("labels" not in e for e in examples):
        raise MiniftError("packing is for language-model examples ({'input_ids', 'labels'}): set packing=0 for a classifier")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    sequences, free = [], []  # free: sorted (room left, sequence index) of the sequences still open
    for i in order:
        n = len(examples[i]["input_ids"])
        k = bisect.bisect_left(free, (n, -1))  # the sequence with the least room that still fits this row
        if k < len(free):
            room, s = free.pop(k)
        else:
            room, s = capacity, len(sequences)
            sequences.append([])
        sequences[s].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, s))
    return [_packed([examples[i] for i in rows]) for rows in sequences]


def _packed(rows):
    ids, labels, documents, positions = [], [], [], []
    for d, e in enumerate(rows, 1):
        n = len(e["input_ids"])
        ids += e["input_ids"]
        labels += [-100] + e["labels"][1:]
        documents += [d] * n
        positions += list(range(n))
    return {"input_ids": ids, "labels": labels, "document_ids": documents, "position_ids": positions}


def batch_order(lengths, batch_size, seed, epoch, shuffle=True, group_by_length=False, drop_last=False):
    """The batches of one epoch, as lists of example indices; each index appears exactly once.

    It depends only on (seed, epoch), so a resumed run rebuilds the same order and skips to batch k.
    group_by_length: shuffle, sort each chunk of 50 batches by length (longest first), cut into batches,
    shuffle the batches. Rows of similar length share a batch: less padding, still random."""
    rng = np.random.default_rng((seed, epoch))
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if group_by_length:
        chunk = 50 * batch_size
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                                for c in np.split(order, range(chunk, len(order), chunk))])
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length and shuffle:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches
