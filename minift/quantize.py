"""A frozen base in 8 or 4 bits under LoRA (QLoRA, on a CPU): the adapted layers' weights kept as GGUF's blocks.

Each row of a weight is cut into blocks of 32 numbers; a block stores one fp16 scale d (and for Q4_1 a minimum
m) and 32 small integers q:

    Q8_0   w = d * q         q in -127..127, 8 bits       34 bytes a block: 8.5 bits a weight
    Q4_0   w = d * (q - 8)   q in 0..15, 4 bits           18 bytes a block: 4.5 bits a weight
    Q4_1   w = d * q + m     q in 0..15, 4 bits           20 bytes a block: 5 bits a weight

They are llama.cpp's formats, byte for byte (two 4-bit numbers share a byte: values j and j + 16 of a block),
and `quantize` rounds as its reference code does. The weight never exists whole in fp32: the forward
y = x W^T and the input gradient dx = dy W dequantize ROWS rows of W at a time. A frozen weight needs no
gradient of its own, so that is all its backward is; the adapters beside it (lora.py) learn in full precision.
`quantize_base(model, kind)` puts the LoRA layers' weights in blocks; merging an adapter (merge_and_unload, for
best/) dequantizes its weight first, so best/ is an ordinary full-precision checkpoint.
"""
import torch
from torch import nn

from .errors import MiniftError
from .lora import lora_layers

KINDS = ("q8_0", "q4_0", "q4_1")
BLOCK = 32
ROWS = 256  # rows of W dequantized at once: 256 x in_features numbers, a few MB for a 4096-wide layer


class QuantizedWeight(nn.Module):
    """W (out, in) as blocks: `d` (and `m`) fp16 of shape (out, in / 32); `q` int8 (out, in / 32, 32) for Q8_0,
    or uint8 (out, in / 32, 16) holding two 4-bit numbers a byte for Q4_0 and Q4_1. Buffers: .to() moves them,
    and they are never trained."""

    def __init__(self, kind, d, q, m=None):
        super().__init__()
        self.kind = kind
        self.register_buffer("d", d)
        self.register_buffer("q", q)
        self.register_buffer("m", m)
        self.shape = (q.shape[0], q.shape[1] * BLOCK)

    def extra_repr(self):
        return f"{self.kind}, out={self.shape[0]}, in={self.shape[1]}"

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.d, self.q, self.m) if t is not None)

    @classmethod
    def quantize(cls, w, kind):
        """Blocks of W (out, in), rounded as llama.cpp's quantize_row_*_ref does."""
        if kind not in KINDS:
            raise MiniftError(f"quantize {kind!r} is unknown: choose {', '.join(KINDS)}")
        out, n_in = w.shape
        if n_in % BLOCK:
            raise MiniftError(f"a layer with {n_in} inputs cannot be cut into blocks of {BLOCK}: {kind} needs a "
                              f"multiple of {BLOCK} (leave this model's base unquantized)")
        x = w.detach().float().reshape(out, n_in // BLOCK, BLOCK)
        if kind == "q8_0":
            d = x.abs().amax(-1) / 127
            v = x * inverse(d)[..., None]
            q = (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8)  # C's roundf: halves away from 0
            return cls(kind, d.half(), q)
        if kind == "q4_0":  # the value of largest magnitude, with its sign, becomes -8
            biggest = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
            d = biggest / -8
            q = torch.clamp((x * inverse(d)[..., None] + 8.5).to(torch.int8), max=15)  # (int8)() truncates
            return cls(kind, d.half(), pack_nibbles(q))
        low, high = x.amin(-1), x.amax(-1)
        d = (high - low) / 15
        q = torch.clamp(((x - low[..., None]) * inverse(d)[..., None] + 0.5).to(torch.int8), max=15)
        return cls(kind, d.half(), pack_nibbles(q), low.half())

    def rows(self, start, stop, dtype=torch.float32):
        """Rows start:stop of W, dequantized, as (stop - start, in) numbers of `dtype`."""
        d = self.d[start:stop, :, None].to(dtype)
        if self.kind == "q8_0":
            w = self.q[start:stop].to(dtype) * d
        else:
            q = unpack_nibbles(self.q[start:stop]).to(dtype)
            w = (q - 8) * d if self.kind == "q4_0" else q * d + self.m[start:stop, :, None].to(dtype)
        return w.reshape(stop - start, self.shape[1])

    def dequantize(self, dtype=torch.float32):
        return self.rows(0, self.shape[0], dtype)

    def linear(self, x):
        """x @ W^T, ROWS output features at a time."""
        return torch.cat([x @ self.rows(a, min(a + ROWS, self.shape[0]), x.dtype).T
                          for a in range(0, self.shape[0], ROWS)], dim=-1)

    def linear_backward(self, dy):
        """dy @ W (the input's gradient), ROWS rows of W at a time: dx = sum over the slices of dy_slice @ W_slice."""
        dx = None
        for a in range(0, self.shape[0], ROWS):
            b = min(a + ROWS, self.shape[0])
            part = dy[..., a:b] @ self.rows(a, b, dy.dtype)
            dx = part if dx is None else dx.add_(part)
        return dx


def inverse(d):
    """1 / d, and 0 where d is 0 (a block of zeros), as llama.cpp writes it."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def pack_nibbles(q):
    """(..., 32) numbers 0..15 -> (..., 16) bytes: value j in the low four bits of byte j, value j + 16 in the high."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def unpack_nibbles(packed):
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


def quantize_base(model, kind):
    """Put every LoRA layer's frozen weight in `kind` blocks and drop its full-precision copy (the adapters and
    any other weight stay as they are). Returns the bytes the weights took before and after."""
    layers = lora_layers(model)
    if not layers:
        raise MiniftError(f"quantize={kind!r} quantizes the frozen base under LoRA adapters: set lora_r (e.g. 8) too")
    before = after = 0
    for layer in layers.values():
        layer.quantized = QuantizedWeight.quantize(layer.weight, kind)
        before += layer.weight.numel() * layer.weight.element_size()
        after += layer.quantized.nbytes()
        del layer.weight  # the point: only the blocks are kept
    return before, after
