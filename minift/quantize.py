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

kind "source" keeps instead the blocks the model's GGUF file had (Q4_K, Q6_K, Q5_0, Q8_0 ... F16), so that a run on
an Ollama or LM Studio file rounds nothing a second time. The converter (gguf.convert_gguf) writes them beside
model.safetensors, untouched, in gguf_blocks.safetensors: a converted folder stays whole when moved or copied, whereas
the GGUF itself may be gone (a download deleted, `ollama rm`), and the blocks take 0.15 to 0.17 of the fp32 weights'
room in a Q4_K_M file. `SourceBlocks` dequantizes them ROWS rows at a time with gguf_blocks.py's numpy readers, bit
for bit llama.cpp's: on a CPU as fast as torch code doing the same (measured on Qwen2.5-Coder's Q5_0 and Q6_K
matrices), and one reader per block type instead of two.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .checkpoints import family_of
from .errors import MiniftError
from .gguf_blocks import BLOCKS_FILE, DEQUANTIZE, TYPE_NAMES
from .lora import lora_layers

KINDS = ("q8_0", "q4_0", "q4_1")
BLOCK = 32
ROWS = 256  # rows of W dequantized at once: 256 x in_features numbers, a few MB for a 4096-wide layer



def roundf(a):
    """C's roundf for a >= 0 (halves away from 0), exactly: floor(a) + floor(2 * frac(a)). floor(a + 0.5) is not: in
    float32 0.49999997 + 0.5 rounds to 1.0, where llama.cpp's reference gives 0 (gguf-py's np_roundf is this)."""
    whole = torch.floor(a)
    return whole + torch.floor(2 * (a - whole))

class BlockWeight(nn.Module):
    """A frozen W (out, in) kept in blocks: a subclass gives rows(start, stop, dtype); the matmuls of the forward and of
    the input gradient dequantize ROWS rows at a time, so W never exists whole."""

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in self.buffers())

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


class QuantizedWeight(BlockWeight):
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
            q = (torch.sign(v) * roundf(v.abs())).to(torch.int8)
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


def inverse(d):
    """1 / d, and 0 where d is 0 (a block of zeros), as llama.cpp writes it."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def pack_nibbles(q):
    """(..., 32) numbers 0..15 -> (..., 16) bytes: value j in the low four bits of byte j, value j + 16 in the high."""
    q = q.to(torch.uint8)
    return q[..., :16] | (q[..., 16:] << 4)


def unpack_nibbles(packed):
    return torch.cat([packed & 0x0F, packed >> 4], dim=-1)


class SourceBlocks(BlockWeight):
    """W (out, in) as its GGUF file held it: `raw`, uint8 (out, bytes a row), each row a run of blocks of the file's
    type, the bytes untouched. A buffer, never trained; on a GPU each slice is read on the CPU (numpy) and sent back."""
    kind = "source"

    def __init__(self, ggml_type, raw, n_in):
        super().__init__()
        self.ggml_type = ggml_type
        self.register_buffer("raw", raw)
        self.shape = (raw.shape[0], n_in)

    def extra_repr(self):
        return f"{TYPE_NAMES[self.ggml_type]} (the file's), out={self.shape[0]}, in={self.shape[1]}"

    def rows(self, start, stop, dtype=torch.float32):
        w = DEQUANTIZE[self.ggml_type](self.raw[start:stop].cpu().numpy().reshape(-1))
        return torch.from_numpy(w).reshape(stop - start, self.shape[1]).to(self.raw.device, dtype)


def quantize_base(model, kind):
    """Put every LoRA layer's frozen weight in `kind` blocks (q8_0, q4_0, q4_1; "source": the model's GGUF blocks) and
    drop its full-precision copy (the adapters and any other weight stay as they are). Returns the bytes the weights
    took before and after."""
    layers = lora_layers(model)
    if not layers:
        raise MiniftError(f"quantize={kind!r} quantizes the frozen base under LoRA adapters: set lora_r (e.g. 8) too")
    source = source_blocks(model) if kind == "source" else None
    before = after = 0
    for name, layer in layers.items():
        if source is None:
            layer.quantized = QuantizedWeight.quantize(layer.weight, kind)
        elif f"{name}.weight" in source:
            layer.quantized = checked_source(source[f"{name}.weight"], layer.weight, name, model.source)
        else:
            continue  # the file held this matrix in F32: it stays as it is
        before += layer.weight.numel() * layer.weight.element_size()
        after += layer.quantized.nbytes()
        del layer.weight  # the point: only the blocks are kept
    return before, after


def source_blocks(model) -> dict:
    """{our parameter name: (ggml type, raw uint8 rows)} from the gguf_blocks.safetensors of the folder the model was
    loaded from (checkpoints.load_checkpoint notes it as model.source)."""
    if getattr(model, "source", None) is None:
        raise MiniftError("quantize='source' keeps the blocks of the GGUF file the model was converted from: load the "
                          "model from a folder `minift convert` wrote (minift.load), or choose q8_0, q4_0 or q4_1")
    path = Path(model.source) / BLOCKS_FILE
    if not path.is_file():
        raise MiniftError(f"quantize='source' keeps the blocks of the GGUF file the model was converted from, and "
                          f"{path.parent} has no {BLOCKS_FILE}: load a folder `minift convert` wrote (one converted "
                          "by an older minift: convert it again), or choose q8_0, q4_0 or q4_1")
    names = {name: ggml for ggml, name in TYPE_NAMES.items()}
    try:
        with safe_open(str(path), "pt") as f:
            types = json.loads(f.metadata()["gguf_types"])
            blocks = {}
            for key in f.keys():
                ours, raw = family_of(model).hf_to_ours(key, f.get_tensor(key), model)
                if ours is not None:
                    blocks[ours] = (names[types[key]], raw)
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise MiniftError(f"{path} is damaged ({type(e).__name__}: {e}): convert the GGUF file again") from None
    return blocks


def checked_source(block, weight, name, folder):
    """The layer's blocks, if they dequantize to its weight exactly (a folder trained or edited since it was converted
    would not: its blocks are another model's)."""
    ggml_type, raw = block
    blocks = SourceBlocks(ggml_type, raw.to(weight.device), weight.shape[1])
    if raw.shape[0] != weight.shape[0] or not torch.equal(blocks.dequantize(weight.dtype), weight):
        raise MiniftError(f"{name}: the GGUF blocks in {folder} do not give this model's weights (it was trained or "
                          "changed since its conversion): choose q8_0, q4_0 or q4_1, or start from the converted folder")
    return blocks
