"""The GGUF block types: how llama.cpp packs numbers into bytes, and how to read them back (numpy only).

A quantized tensor is a run of blocks. Each block holds a fixed count of numbers (32, or 256 for the
"K-quants" and IQ4_XS) in a fixed count of bytes: one or two fp16 scales, then the numbers as small
integers. Reading a block back is `value = scale * q` (or `scale * q - min`). Every function below takes
the tensor's raw bytes (uint8), cuts them into blocks of `BLOCKS[type]` bytes, and returns float32
numbers in the tensor's order, computed in the same float32 order as llama.cpp's `ggml-quants.c`
(`dequantize_row_*`), so the result is bit for bit the one llama.cpp and the `gguf` package get.

Conventions in the drawings: byte offsets on the left; "q[i]" is number i of the block; "nibble" is 4 bits;
fp16 scales are little-endian. The K-quants cut their 256 numbers into sub-blocks (16 of 16, or 8 of 32),
each with its own small integer scale (and minimum) multiplied by the block's fp16 `d` (and `dmin`).
"""
import numpy as np

QK = 256  # numbers in a K-quant super-block (and in an IQ4_XS block)
# A folder converted from a GGUF keeps the file's blocks of every matrix here, bytes untouched (quantize.py: "source")
BLOCKS_FILE = "gguf_blocks.safetensors"

TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
              17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
              23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
              34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}
# type -> (numbers per block, bytes per block), for the types we read
BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 8: (32, 34), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24),
          10: (QK, 84), 11: (QK, 110), 12: (QK, 144), 13: (QK, 176), 14: (QK, 210), 20: (32, 18), 23: (QK, 136)}


# ---------------------------------------------------------------------------------------------------
# Two helpers every layout uses

def fp16(blocks, at):
    """The fp16 number at byte `at` of every block, as float32 of shape (n_blocks, 1)."""
    return blocks[:, at:at + 2].copy().view("<f2").astype(np.float32)


def unpack(packed, bits, width):
    """Small integers packed `8 // bits` to a byte -> one uint8 each, in the order llama.cpp numbers them.

    `packed` (n, k * width) is read as k groups of `width` bytes. Within a group, the lowest `bits` of the
    `width` bytes are the first `width` numbers, the next `bits` the next `width` numbers, and so on; then
    the next group. With bits=4, width=16 this is Q4_0's "low nibbles are q[0..15], high ones q[16..31]";
    with bits=1, width=1 it reads a bit mask: bit j of byte b is number 8b + j."""
    n = packed.shape[0]
    shifts = np.arange(0, 8, bits, dtype=np.uint8).reshape(1, 1, -1, 1)
    groups = packed.reshape(n, -1, 1, width) >> shifts  # (n, k, 8 // bits, width)
    return (groups & np.uint8((1 << bits) - 1)).reshape(n, -1)


# ---------------------------------------------------------------------------------------------------
# Unquantized

def dequantize_f32(raw):
    return raw.view("<f4")


def dequantize_f16(raw):
    return raw.view("<f2").astype(np.float32)


def dequantize_bf16(raw):
    """bf16 is the top half of a float32: shift the 16 bits up and read them as float32."""
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------------
# Blocks of 32 numbers with one fp16 scale (and a minimum)

def dequantize_q8_0(raw):
    """Q8_0, 34 bytes:
        0  d   fp16 scale
        2  qs  32 signed bytes q[0..31]
    value = d * q."""
    blocks = raw.reshape(-1, 34)
    return (blocks[:, 2:].view(np.int8).astype(np.float32) * fp16(blocks, 0)).reshape(-1)


def dequantize_q4_0(raw):
    """Q4_0, 18 bytes:
        0  d   fp16 scale
        2  qs  16 bytes: low nibbles q[0..15], high nibbles q[16..31]
    value = d * (q - 8), so q spans -8..7."""
    blocks = raw.reshape(-1, 18)
    q = unpack(blocks[:, 2:], 4, 16).astype(np.int8) - np.int8(8)
    return (fp16(blocks, 0) * q.astype(np.float32)).reshape(-1)


def dequantize_q4_1(raw):
    """Q4_1, 20 bytes:
        0  d   fp16 scale
        2  m   fp16 minimum
        4  qs  16 bytes: low nibbles q[0..15], high nibbles q[16..31]
    value = d * q + m."""
    blocks = raw.reshape(-1, 20)
    q = unpack(blocks[:, 4:], 4, 16).astype(np.float32)
    return (fp16(blocks, 0) * q + fp16(blocks, 2)).reshape(-1)


def five_bits(blocks, qh_at):
    """Q5_0 / Q5_1 numbers 0..31: the low 4 bits as in Q4_0 (16 bytes after qh), the 5th bit of q[i] is
    bit i of the 4-byte little-endian qh."""
    low = unpack(blocks[:, qh_at + 4:], 4, 16)
    high = unpack(blocks[:, qh_at:qh_at + 4], 1, 1)
    return low | (high << np.uint8(4))


def dequantize_q5_0(raw):
    """Q5_0, 22 bytes:
        0  d   fp16 scale
        2  qh  4 bytes: bit i is the 5th (high) bit of q[i]
        6  qs  16 bytes: low nibbles are q[0..15]'s low 4 bits, high nibbles q[16..31]'s
    value = d * (q - 16), so q spans -16..15."""
    blocks = raw.reshape(-1, 22)
    q = five_bits(blocks, 2).astype(np.int8) - np.int8(16)
    return (fp16(blocks, 0) * q.astype(np.float32)).reshape(-1)


def dequantize_q5_1(raw):
    """Q5_1, 24 bytes:
        0  d   fp16 scale
        2  m   fp16 minimum
        4  qh  4 bytes: bit i is the 5th (high) bit of q[i]
        8  qs  16 bytes: low nibbles are q[0..15]'s low 4 bits, high nibbles q[16..31]'s
    value = d * q + m."""
    blocks = raw.reshape(-1, 24)
    q = five_bits(blocks, 4).astype(np.float32)
    return (fp16(blocks, 0) * q + fp16(blocks, 2)).reshape(-1)


IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def dequantize_iq4_nl(raw):
    """IQ4_NL, 18 bytes, Q4_0's layout with a codebook:
        0  d   fp16 scale
        2  qs  16 bytes: low nibbles i[0..15], high nibbles i[16..31]
    value = d * IQ4_VALUES[i]: 16 levels spaced non-linearly (dense near 0, where most weights are)."""
    blocks = raw.reshape(-1, 18)
    return (fp16(blocks, 0) * IQ4_VALUES[unpack(blocks[:, 2:], 4, 16)]).reshape(-1)


# ---------------------------------------------------------------------------------------------------
# K-quants: super-blocks of 256 numbers, sub-blocks with their own small scales

def per_sub_block(values, sub_scale):
    """(n, 256) numbers times (n, S) sub-block factors: factor s multiplies numbers 256/S*s .. 256/S*(s+1)-1."""
    n, subs = sub_scale.shape
    return (sub_scale.reshape(n, subs, 1) * values.reshape(n, subs, -1)).reshape(n, QK)


def dequantize_q2_k(raw):
    """Q2_K, 84 bytes, 16 sub-blocks of 16:
         0  scales  16 bytes: sub-block s has scale = low nibble, min = high nibble
        16  qs      64 bytes of 2-bit q: two halves of 32 bytes; in half h, bits 2j..2j+1 of byte l
                    are q[128h + 32j + l]
        80  d       fp16 scale of the scales
        82  dmin    fp16 scale of the mins
    value = d * scale * q - dmin * min."""
    blocks = raw.reshape(-1, 84)
    scales = blocks[:, :16]
    q = unpack(blocks[:, 16:80], 2, 32).astype(np.float32)
    dl = fp16(blocks, 80) * (scales & np.uint8(0xF)).astype(np.float32)
    ml = fp16(blocks, 82) * (scales >> np.uint8(4)).astype(np.float32)
    return (per_sub_block(q, dl) - np.repeat(ml, 16, axis=1)).reshape(-1)


def dequantize_q3_k(raw):
    """Q3_K, 110 bytes, 16 sub-blocks of 16:
         0  hmask   32 bytes: bit j of byte l is the high bit of q[32j + l]
        32  qs      64 bytes of the low 2 bits, packed as Q2_K's
        96  scales  12 bytes: 16 six-bit signed scales. Scale s keeps its low 4 bits in byte s (s < 8,
                    low nibble) or byte s - 8 (high nibble), its high 2 bits in byte 8 + s % 4, bits 2(s // 4)
       108  d       fp16
    value = d * (scale - 32) * (q - 4), where q is 0..7 with the high bit *set* meaning "do not subtract 4"
    (so the 3-bit number runs -4..3)."""
    blocks = raw.reshape(-1, 110)
    low = unpack(blocks[:, 32:96], 2, 32).astype(np.int8)
    high = unpack(blocks[:, :32], 1, 32)
    q = (low - ((high ^ np.uint8(1)) << np.uint8(2)).astype(np.int8)).astype(np.float32)
    scale_low = unpack(blocks[:, 96:104], 4, 8)
    scale_high = unpack(blocks[:, 104:108], 2, 4)
    scales = (scale_low | (scale_high << np.uint8(4))).astype(np.int8) - np.int8(32)
    return per_sub_block(q, fp16(blocks, 108) * scales.astype(np.float32)).reshape(-1)


def scales_and_mins(packed):
    """Q4_K / Q5_K: 8 six-bit scales and 8 six-bit mins in 12 bytes (llama.cpp's get_scale_min_k4):

        byte   0-3: scale s (low 6 bits), s = 0..3;  top 2 bits: high bits of scale s + 4
        byte   4-7: min s   (low 6 bits), s = 0..3;  top 2 bits: high bits of min s + 4
        byte  8-11: low nibble: scale s + 4's low 4 bits;  high nibble: min s + 4's low 4 bits
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    six = np.uint8(0x3F)
    scales = np.concatenate([a & six, (c & np.uint8(0xF)) | ((a >> np.uint8(6)) << np.uint8(4))], axis=1)
    mins = np.concatenate([b & six, (c >> np.uint8(4)) | ((b >> np.uint8(6)) << np.uint8(4))], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def dequantize_q4_k(raw):
    """Q4_K, 144 bytes, 8 sub-blocks of 32:
         0  d       fp16 scale of the scales
         2  dmin    fp16 scale of the mins
         4  scales  12 bytes: 8 six-bit scales and 8 six-bit mins (scales_and_mins)
        16  qs      128 bytes of nibbles: four runs of 32 bytes; run r's low nibbles are q[64r .. 64r+31],
                    its high nibbles q[64r+32 .. 64r+63]
    value = d * scale * q - dmin * min."""
    blocks = raw.reshape(-1, 144)
    scales, mins = scales_and_mins(blocks[:, 4:16])
    q = unpack(blocks[:, 16:], 4, 32).astype(np.float32)
    return (per_sub_block(q, fp16(blocks, 0) * scales) - np.repeat(fp16(blocks, 2) * mins, 32, axis=1)).reshape(-1)


def dequantize_q5_k(raw):
    """Q5_K, 176 bytes, 8 sub-blocks of 32: Q4_K with a fifth bit.
         0  d, 2 dmin, 4 scales   as Q4_K
        16  qh      32 bytes: bit j of byte l is the 5th bit of q[32j + l]
        48  qs      128 bytes of the low 4 bits, as Q4_K's
    value = d * scale * q - dmin * min, q in 0..31."""
    blocks = raw.reshape(-1, 176)
    scales, mins = scales_and_mins(blocks[:, 4:16])
    q = (unpack(blocks[:, 48:], 4, 32) | (unpack(blocks[:, 16:48], 1, 32) << np.uint8(4))).astype(np.float32)
    return (per_sub_block(q, fp16(blocks, 0) * scales) - np.repeat(fp16(blocks, 2) * mins, 32, axis=1)).reshape(-1)


def dequantize_q6_k(raw):
    """Q6_K, 210 bytes, 16 sub-blocks of 16, low 4 bits, high 2 bits and scales kept apart:
          0  ql      128 bytes: two halves of 64; in half h, low nibbles are the low 4 bits of
                     q[128h .. 128h+63], high nibbles those of q[128h+64 .. 128h+127]
        128  qh      64 bytes: two halves of 32; in half h, bits 2j..2j+1 of byte l are the high 2 bits
                     of q[128h + 32j + l]
        192  scales  16 signed bytes, one per sub-block
        208  d       fp16
    value = d * scale * (q - 32), q in 0..63."""
    blocks = raw.reshape(-1, 210)
    q = unpack(blocks[:, :128], 4, 64) | (unpack(blocks[:, 128:192], 2, 32) << np.uint8(4))
    q = (q.astype(np.int8) - np.int8(32)).astype(np.float32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    return per_sub_block(q, fp16(blocks, 208) * scales).reshape(-1)


def dequantize_iq4_xs(raw):
    """IQ4_XS, 136 bytes, 8 sub-blocks of 32 with IQ4_NL's codebook:
          0  d         fp16
          2  scales_h  2 bytes (little-endian u16): bits 2s..2s+1 are the high 2 bits of sub-block s's scale
          4  scales_l  4 bytes: byte s // 2, low nibble for even s, high for odd s: the scale's low 4 bits
          8  qs        128 bytes: 16 per sub-block, low nibbles i[0..15], high nibbles i[16..31]
    value = d * (scale - 32) * IQ4_VALUES[i]."""
    blocks = raw.reshape(-1, 136)
    scales = unpack(blocks[:, 4:8], 4, 1) | (unpack(blocks[:, 2:4], 2, 1) << np.uint8(4))
    dl = fp16(blocks, 0) * (scales.astype(np.int8) - np.int8(32)).astype(np.float32)
    return per_sub_block(IQ4_VALUES[unpack(blocks[:, 8:], 4, 16)], dl).reshape(-1)


DEQUANTIZE = {0: dequantize_f32, 1: dequantize_f16, 30: dequantize_bf16, 8: dequantize_q8_0, 2: dequantize_q4_0,
              3: dequantize_q4_1, 6: dequantize_q5_0, 7: dequantize_q5_1, 20: dequantize_iq4_nl,
              10: dequantize_q2_k, 11: dequantize_q3_k, 12: dequantize_q4_k, 13: dequantize_q5_k,
              14: dequantize_q6_k, 23: dequantize_iq4_xs}
