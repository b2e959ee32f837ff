"""Recompute (activation checkpointing): trade a second forward of a block for the memory its backward keeps.

In a training forward every layer keeps what its backward needs (layers.keeps_for_backward): for a transformer
block the attention probabilities alone are heads x T x T numbers per row. A block marked `recompute` (by
train.prepare_model from TrainConfig.recompute) keeps only its inputs in the forward; its backward first runs
the forward again from those inputs, keeping as usual, then the block's own backward. The gradients are the
same, bit for bit: the second forward does the same arithmetic on the same inputs, and it starts from the RNG
state the first one saw, so dropout zeroes the same values. The price is one more forward of those blocks
(about a third more compute per step).

The families' block loops call `block_forward` and `block_backward` instead of `block(...)` and
`block.backward(...)`; for a block that is not marked they are exactly those calls.
"""
from contextlib import contextmanager

import torch

from .layers import keeps_for_backward


def block_forward(block, *inputs):
    """block(*inputs); a marked block in a training forward keeps its inputs and the RNG state, nothing else."""
    if not (getattr(block, "recompute", False) and keeps_for_backward(block)):
        return block(*inputs)
    block.recompute_inputs = inputs  # the checkpoint: one tensor of activations per block (the masks are shared)
    block.recompute_rng = rng_state(inputs[0].device)
    with keeping_nothing(block):
        return block(*inputs)


def block_backward(block, dout):
    """block.backward(dout); a block that kept only its inputs runs its forward again first, from the saved
    RNG state (the same dropout masks), so that its layers keep what their backward needs."""
    inputs = getattr(block, "recompute_inputs", None)
    if inputs is not None:
        state, device = block.recompute_rng, inputs[0].device
        del block.recompute_inputs, block.recompute_rng
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the run's RNG goes on
            set_rng_state(state, device)
            block(*inputs)
    return block.backward(dout)


@contextmanager
def keeping_nothing(block):
    """Inside: the block's layers keep nothing for backward (layers.keeps_for_backward reads the flag)."""
    modules = list(block.modules())
    for m in modules:
        m.keeps_nothing = True
    try:
        yield
    finally:
        for m in modules:
            m.keeps_nothing = False


def rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)
