"""Where the memory of a training step goes: what the forward keeps for the hand-written backward, and an
estimate of the whole (weights, gradients, AdamW state, kept activations, an LM's logits) before a run starts.
"""
import torch


def kept_for_backward(model):
    """After a forward in training mode with autograd off: every tensor a layer kept for its backward, as
    (owner, name, shape, bytes) rows. Parameters and buffers are not counted; backward frees the rest."""
    rows = []
    for owner, module in model.named_modules():
        for name, value in vars(module).items():
            tensors = value if isinstance(value, tuple) else (value,)
            for i, t in enumerate(tensors):
                if isinstance(t, torch.Tensor):
                    label = name if len(tensors) == 1 else f"{name}[{i}]"
                    rows.append((owner or type(model).__name__, label, tuple(t.shape), t.numel() * t.element_size()))
    return rows


def format_kept(rows, top=None):
    """A table of kept tensors, biggest first, with the total."""
    rows = sorted(rows, key=lambda r: -r[3])
    lines = [f"{'kept by':48s} {'tensor':12s} {'shape':>20s} {'MB':>8s}"]
    for owner, name, shape, size in rows[:top]:
        lines.append(f"{owner[-48:]:48s} {name:12s} {str(shape):>20s} {size / 2**20:8.2f}")
    if top is not None and len(rows) > top:
        lines.append(f"... and {len(rows) - top} more")
    lines.append(f"total: {len(rows)} tensors, {sum(r[3] for r in rows) / 2**20:.1f} MB")
    return "\n".join(lines)


def estimate_memory(model, batch):
    """Bytes of weights, gradients, AdamW state (m and v), kept activations and a language model's logits with
    their gradient for one training step on `batch` (the activations measured with one forward, then dropped
    again; the logits counted for the positions the loss takes at once). Returns a dict."""
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    was_training = model.training
    model.train()
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if k != "labels"})
    activations = sum(r[3] for r in kept_for_backward(model))
    forget_kept(model)
    model.train(was_training)
    logits = 0  # a classifier's are a few numbers per text
    if model.task == "lm":  # the logits and their fp32 log-probs (which become the gradient), for the positions at once
        positions = batch["input_ids"].numel()
        at_once = min(model.loss_chunk, positions) if model.loss_chunk else positions
        logits = 2 * at_once * model.config.vocab_size * 4
    return {"weights": weights, "gradients": grads, "adamw": 2 * grads, "activations": activations,
            "logits": logits, "total": weights + 3 * grads + activations + logits}


def forget_kept(model):
    """Drop what a forward kept (a forward whose backward will not run)."""
    for module in model.modules():
        for name in [n for n, v in vars(module).items() if isinstance(v, torch.Tensor)
                     or (isinstance(v, tuple) and v and all(isinstance(t, torch.Tensor) for t in v))]:
            delattr(module, name)


def format_memory(m):
    gb = lambda n: f"{n / 2**30:.2f} GB"  # noqa: E731
    return (f"memory estimate: weights {gb(m['weights'])}, gradients {gb(m['gradients'])}, AdamW state "
            f"{gb(m['adamw'])}, activations {gb(m['activations'])}, logits {gb(m['logits'])}: about {gb(m['total'])} in all")
