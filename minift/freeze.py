"""Frozen weights cost nothing: which parameters train, and where the backward may stop.

Retraining only the top of a pretrained model is a standard move for small data sets, and adapters (LoRA)
freeze the whole base model. A frozen tensor has `requires_grad = False`; then
- every layer's backward skips its gradient (layers.py: no dW, and forward keeps no input for it),
- AdamW keeps no state for it (train.py builds the optimizer from the trainable tensors only),
- the backward stops below the lowest trainable part: `mark_frozen_below` flags the stages (embeddings,
  blocks) that come before it, so their forward keeps nothing and the model's backward returns early.
"""
import fnmatch

from torch import nn

from .errors import MiniftError
from .layers import Embedding


def freeze(model, patterns):
    """Freeze the parameters whose names match any pattern; return the names frozen.

    A pattern is a name prefix ("bert.embeddings."), an fnmatch pattern ("*.attention.*"), "embeddings"
    (every token/position/type embedding table) or "layers:N" (the embeddings and the lowest N blocks)."""
    named = list(model.named_parameters())
    stages = base_model(model).stages()
    frozen = []
    for pattern in patterns:
        if pattern.startswith("layers:"):
            n, depth = _count(pattern), len(blocks(model))
            if n >= depth:  # a linear probe may be meant; the main job's layers:2 on a 2-block model is not
                print(f"note: {pattern} freezes all {depth} blocks of this model: only the head trains")
            below = {id(p) for s in stages[:len(stages) - depth + n] for p in s.parameters()}
            hits = [name for name, p in named if id(p) in below]
        elif pattern == "embeddings":
            tables = {id(m.weight) for m in model.modules() if isinstance(m, Embedding)}
            hits = [name for name, p in named if id(p) in tables]
        else:
            hits = [name for name, _ in named if name.startswith(pattern) or fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise MiniftError(f"freeze pattern {pattern!r} matches no parameter: use 'embeddings', 'layers:N', or a "
                              f"name prefix such as {named[0][0].rsplit('.', 2)[0] + '.'!r} (see `minift info MODEL`)")
        frozen += hits
    params = dict(named)
    for name in frozen:
        params[name].requires_grad_(False)
    mark_frozen_below(model)
    return sorted(set(frozen))


def _count(pattern):
    try:
        return int(pattern.split(":", 1)[1])
    except ValueError:
        raise MiniftError(f"freeze pattern {pattern!r}: write layers:N with N a whole number, e.g. layers:3") from None


def base_model(model):
    """The model's body (BertModel, GPT2Model ...): the module that lists its stages."""
    return next(m for m in model.modules() if hasattr(m, "stages"))


def blocks(model):
    """The transformer blocks: the one ModuleList of the model's body (the last stages)."""
    return next(m for m in base_model(model).modules() if isinstance(m, nn.ModuleList))


def mark_frozen_below(model):
    """Flag every module of the stages that come before the lowest trainable one: backward never reaches
    them, so they keep nothing in forward. Call it again after changing requires_grad."""
    stages = base_model(model).stages()
    trainable = [any(p.requires_grad for p in s.parameters()) for s in stages]
    lowest = trainable.index(True) if True in trainable else len(stages)
    for i, stage in enumerate(stages):
        for m in stage.modules():
            m.frozen_below = i < lowest


def head_names(model):
    """The names of the parameters outside the model's body: a classifier's new head."""
    body = {id(p) for p in base_model(model).parameters()}
    return {name for name, p in model.named_parameters() if id(p) not in body}


def count_trainable(model):
    """(trainable, total) numbers of parameters, a tied tensor counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def describe_trainable(model):
    trainable, total = count_trainable(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
