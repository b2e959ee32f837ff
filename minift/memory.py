"""Where the memory of a training step goes: what the forward keeps for the hand-written backward, and an
estimate of the whole (weights, gradients, AdamW state, kept activations, an LM's logits) before a run starts; and
keep_freed_memory, which lets each step reuse the last one's memory.
"""
import ctypes

import torch

from .freeze import blocks


def keep_freed_memory():
    """Ask the C allocator (glibc's malloc, on Linux) to keep freed memory for the next allocation instead of handing
    it back to the system. A step allocates the same large temporaries every time (a 262,144-word head's logits,
    its bf16 copy, its gradient: hundreds of MB each); by default malloc returns every block over 32 MB at its free,
    and the next step gets fresh pages, each one a page fault on first touch. Measured on Gemma 3 270M's shape (AMD
    EPYC, batch 2 x 128, alternating runs): a bf16 step 4.4-5.2 -> 2.5-3.1 s, fp32 7.3 -> 5.05 s, the peak 0.06-0.3 GB
    higher. Elsewhere (macOS, musl) there is no libc.so.6 with this call: nothing changes."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks up to 1 GB come from the heap, where a free keeps them
    mallopt(-1, 1 << 34)  # M_TRIM_THRESHOLD: the heap's free top is given back only beyond 16 GB


def kept_tensors(model):
    """After a forward in training mode with autograd off: (owner, name, tensor) for every tensor a layer kept for
    its backward. Parameters and buffers are not counted (they are not plain attributes); backward frees the rest."""
    for owner, module in model.named_modules():
        for name, value in vars(module).items():
            tensors = value if isinstance(value, tuple) else (value,)
            for i, t in enumerate(tensors):
                if isinstance(t, torch.Tensor):
                    yield owner or type(model).__name__, name if len(tensors) == 1 else f"{name}[{i}]", t


def kept_for_backward(model):
    """The kept tensors as (owner, name, shape, bytes) rows. A tensor that two layers keep (one layer's output is
    the next one's input) is a row of each: the rows can add up to more than the memory (storage_bytes)."""
    return [(owner, name, tuple(t.shape), t.numel() * t.element_size()) for owner, name, t in kept_tensors(model)]


def storage_bytes(kept):
    """The memory that (owner, name, tensor) triples really hold: each storage once."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for _, _, t in kept}.values())


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
    again; the logits counted for the positions the loss takes at once), and what each memory lever that is
    not on yet would give back (`levers`: {setting: bytes}). Returns a dict."""
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())  # quantized blocks (quantize.py) too
    grads = sum(p.numel() * p.element_size() for p in trainable)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    kept = forward_keeping(model, inputs)
    activations = storage_bytes(kept)
    names = {id(m): n for n, m in model.named_modules()}
    largest_block = max(storage_bytes([k for k in kept if k[0].startswith(names[id(b)] + ".")]) for b in blocks(model))
    del kept  # before the next forward: at most one forward's activations at a time
    positions = batch["input_ids"].numel()
    logits = logits_bytes(model, positions, model.loss_chunk) if model.task == "lm" else 0  # a classifier's: a few
    levers = {}
    if "recompute=1" in levers_not_on(model):
        levers["recompute=1"] = activations - kept_with_recompute(model, inputs, largest_block)
    if "chunked_loss=1024" in levers_not_on(model):
        levers["chunked_loss=1024"] = logits - logits_bytes(model, positions, 1024)
    return {"weights": weights, "gradients": grads, "adamw": 2 * grads, "activations": activations,
            "logits": logits, "total": weights + 3 * grads + activations + logits, "levers": levers}


def levers_not_on(model):
    """The memory settings this model does not use yet: recompute=1 (unless every block recomputes) and, for a
    language model that makes all its logits at once, chunked_loss=1024."""
    names = [] if all(getattr(b, "recompute", False) for b in blocks(model)) else ["recompute=1"]
    if model.task == "lm" and not model.loss_chunk:
        names.append("chunked_loss=1024")
    return names


def forward_keeping(model, inputs):
    """A training forward of `model` on `inputs`; what it kept for backward is taken out of the layers (as
    kept_tensors' triples) and returned."""
    was_training = model.training
    model.train()
    with torch.no_grad():
        model(**inputs)
    kept = list(kept_tensors(model))
    forget_kept(model)
    model.train(was_training)
    return kept


def kept_with_recompute(model, inputs, largest_block):
    """The activations at their peak with every block recomputing, measured the same way (every block marked for
    one forward): the blocks' inputs and what lies outside them, plus, in the backward, one block's own again
    (the largest, measured by the plain forward)."""
    marks = [getattr(b, "recompute", False) for b in blocks(model)]
    for b in blocks(model):
        b.recompute = True
    kept = storage_bytes(forward_keeping(model, inputs))
    for b, mark in zip(blocks(model), marks):
        b.recompute = mark
    return kept + largest_block


def logits_bytes(model, positions, chunk):
    """The logits and their fp32 log-probs (which become the gradient) for the positions the loss takes at once."""
    return 2 * (min(chunk, positions) if chunk else positions) * model.config.vocab_size * 4


def forget_kept(model):
    """Drop what a forward kept (a forward whose backward will not run)."""
    for module in model.modules():
        for name in [n for n, v in vars(module).items() if isinstance(v, torch.Tensor)
                     or (isinstance(v, tuple) and any(isinstance(t, torch.Tensor) for t in v))]:
            delattr(module, name)


def format_memory(m):
    return (f"memory estimate: weights {size(m['weights'])}, gradients {size(m['gradients'])}, AdamW state "
            f"{size(m['adamw'])}, activations {size(m['activations'])}, logits {size(m['logits'])}: about {size(m['total'])} "
            f"in all" + "".join(f"; {lever}" for lever in levers_by_gain(m)[:1]))


def levers_by_gain(m):
    """The levers of an estimate that give memory back, the most first: ["recompute=1 (about 8.71 GB back)", ...]."""
    gains = sorted(((saved, name) for name, saved in m["levers"].items() if saved > 0), reverse=True)
    return [f"{name} (about {size(saved)} back)" for saved, name in gains]


def size(n):
    """Bytes as people read them: GB from a tenth of one, MB below."""
    return f"{n / 2**30:.2f} GB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MB"
