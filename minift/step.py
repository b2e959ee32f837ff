"""One optimizer step, as tutorial 04 writes it: the objective's gradients (for the model's own loss, each
micro-batch's forward, loss and backward: objective.SupervisedObjective); then clip once, AdamW with this step's
learning rate, clear the gradients. Put a breakpoint in `train_step` to watch it.
"""
import math

import torch

from .errors import MiniftError
from .objective import SupervisedObjective
from .optim import clip_grad_norm


def train_step(model, micro_batches, optimizer, lr, max_grad_norm=1.0, objective=None, sync=None):
    """One optimizer step over the micro-batches of one batch. Returns (loss, gradient norm before clipping, metrics).

    `objective` (objective.py): what is trained; it runs each micro-batch's forward and backward and fills .grad;
    None is the model's own loss (objective.SupervisedObjective: model.loss and model.backward), with no metrics.
    `sync`: what data-parallel training adds (distributed.Distributed: `sync.count(n)` adds up every process's
    count, `sync.gradients(params, loss)` their gradients, and under ZeRO the rest); None in one process."""
    objective = objective or SupervisedObjective()
    loss, metrics = objective.gradients(model, micro_batches, sync)
    if sync is not None:
        loss = sync.gradients(optimizer.params, loss)
    # clip once, after accumulation; under ZeRO-2 each process holds a share of the gradients: the norm is summed
    norm = sync.gradient_norm(optimizer.params) if sync is not None else None
    grad_norm = clip_grad_norm(optimizer.params, max_grad_norm, norm)
    check_finite(loss, grad_norm, model, optimizer.t + 1, lr)
    optimizer.step(lr)  # under ZeRO, of this process's own tensors ...
    if sync is not None:
        sync.send_updated_weights(optimizer.params)  # ... which it then sends to the others
    optimizer.zero_grad()
    return loss, grad_norm, metrics


def check_finite(loss, grad_norm, model, step, lr):
    """Stop on NaN/inf before the update, naming the step (numbered as in log.jsonl), the lr and the first bad
    parameter: a weight that is already NaN/inf (the cause) if there is one, else the first bad gradient."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    named = list(model.named_parameters())
    bad = next((f"weight {n}" for n, p in named if not torch.isfinite(p).all()), None) or next(
        (f"gradient of {n}" for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()),
        "none (the loss itself)")
    raise MiniftError(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}, lr {lr:.3g}, "
                      f"first bad parameter: {bad}; the last checkpoint is intact: lower the lr or use fp32")
