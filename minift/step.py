"""One optimizer step, as tutorial 04 writes it: for each micro-batch forward, loss, backward; then clip once,
AdamW with this step's learning rate, clear the gradients. Put a breakpoint in `train_step` to watch it.
"""
import math

import torch

from .errors import MiniftError
from .optim import clip_grad_norm


def forward_backward(model, batch, num_targets, backward="manual", class_weights=None):
    """Loss of one micro-batch, with the gradients added into .grad. Returns the loss (a float)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if backward == "manual":
        with torch.no_grad():  # nothing hidden: no graph is built, our backward does the work
            logits = model(**inputs)
            loss, dlogits = model.loss(logits, batch["labels"], num_targets, class_weights)
            model.backward(dlogits)
    else:  # autograd: for layers someone added without writing their backward
        logits = model(**inputs)
        loss, _ = model.loss(logits, batch["labels"], num_targets, class_weights)
        loss.backward()
    return loss.item()


def train_step(model, micro_batches, optimizer, lr, max_grad_norm=1.0, backward="manual", class_weights=None,
               sync=None, objective=None):
    """One optimizer step over the micro-batches of one batch. Returns (loss, gradient norm before clipping, metrics).

    `sync`: what data-parallel training adds (distributed.Distributed: `sync.count(n)` adds up every process's
    target count, `sync.gradients(params, loss)` their gradients, and under ZeRO the rest); None in one process.
    `objective`: a job's own loss (dpo.PreferenceObjective, grpo.GRPOObjective), which fills .grad itself and
    returns its metrics for the log; None: the model's own loss (model.loss and model.backward), metrics {}."""
    if objective is not None:
        loss, metrics = objective.gradients(model, micro_batches, sync)
    else:
        loss, metrics = supervised_gradients(model, micro_batches, backward, class_weights, sync), {}
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


def supervised_gradients(model, micro_batches, backward="manual", class_weights=None, sync=None):
    """The model's own loss over the micro-batches of one step, its gradients added into .grad. Returns the loss."""
    # the loss is divided by the count of targets in the whole step, so grad_accum=4 gives the same
    # gradient as one big batch (and N processes the same as one: sync adds up every process's count)
    num_targets = sum(model.count_targets(b["labels"]) for b in micro_batches)
    if sync is not None:
        num_targets = sync.count(num_targets)
    loss = 0.0
    for batch in micro_batches:
        loss += forward_backward(model, batch, num_targets, backward, class_weights)
    return loss


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
