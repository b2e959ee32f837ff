"""Every GGUF block type, read bit for bit as the `gguf` package (llama.cpp's own Python) reads it.

Blocks are random bytes, so every bit of every packed number, scale and minimum is exercised; only the fp16
scales are made sane (a NaN or inf scale would make a NaN of every number and hide the rest). Results are
compared as bits, not values: -0.0 against 0.0 or one rounding apart would fail. The real files fetched by
`minift.hub` (SmolLM2, Qwen2.5-Coder, Gemma 3) are read tensor type by tensor type when they are on disk (slow).
"""
import numpy as np
import pytest

from minift import hub
from minift.gguf import dequantize, read_gguf, type_name
from minift.gguf_blocks import BLOCKS, DEQUANTIZE, TYPE_NAMES, unpack

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

# the byte offsets of each block type's fp16 scales (and minimums), as drawn in gguf_blocks.py
FP16_AT = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.IQ4_NL: [0],
           Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208], Q.IQ4_XS: [0]}
PLAIN = [Q.F32, Q.F16, Q.BF16]


def random_blocks(qtype, n_blocks, seed=0):
    """n_blocks blocks of random bytes, their fp16 scales drawn from N(0, 0.05) (the size real ones have)."""
    rng = np.random.default_rng(seed)
    size = BLOCKS[qtype][1]
    assert (BLOCKS[qtype][0], size) == gguf.GGML_QUANT_SIZES[qtype], type_name(qtype)
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for at in FP16_AT.get(qtype, []):
        blocks[:, at:at + 2] = (rng.standard_normal((n_blocks, 1)) * 0.05).astype("<f2").view(np.uint8)
    return blocks


def same_bits(a, b):
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32),
                                                                                       b.view(np.uint32))


def test_every_type_we_read_is_in_the_oracle_table():
    assert set(DEQUANTIZE) == set(BLOCKS) == set(FP16_AT) | set(PLAIN)
    assert {TYPE_NAMES[t] for t in DEQUANTIZE} == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                                                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}
    for t, name in TYPE_NAMES.items():
        assert Q(t).name == name


@pytest.mark.parametrize("qtype", list(FP16_AT) + PLAIN, ids=lambda t: Q(t).name)
def test_random_blocks_equal_gguf_package_bit_for_bit(qtype):
    block, size = BLOCKS[qtype]
    blocks = random_blocks(qtype, 4096 // block + 37)  # a few thousand numbers; not a power of two of blocks
    ours = DEQUANTIZE[qtype](blocks.reshape(-1))
    theirs = gguf.quants.dequantize(blocks, qtype).reshape(-1)
    assert same_bits(ours, theirs), f"{Q(qtype).name}: {np.sum(ours.view(np.uint32) != theirs.view(np.uint32))} differ"
    if qtype in FP16_AT:  # no scale was NaN: every number must be finite, and many distinct
        assert np.isfinite(ours).all() and len(np.unique(ours)) > len(ours) // 50


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda t: Q(t).name)
def test_quantized_by_the_package_reads_back_close(qtype):
    """The other direction, for the types the package can write: values come back within the type's step."""
    x = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    ours = DEQUANTIZE[qtype](gguf.quants.quantize(x, qtype).reshape(-1)).reshape(x.shape)
    levels = {Q.Q4_0: 7, Q.Q4_1: 15, Q.Q5_0: 15, Q.Q5_1: 31, Q.Q8_0: 127}[qtype]
    blocks = np.abs(x).reshape(-1, 32).max(axis=1)  # each block's largest magnitude sets its step
    assert (np.abs(ours - x).reshape(-1, 32).max(axis=1) <= blocks / levels * 1.01).all()


def test_unpack_reads_llama_cpps_orders():
    # Q4_0's 16 bytes: low nibbles are numbers 0..15, high nibbles 16..31
    qs = np.arange(16, dtype=np.uint8).reshape(1, 16) | np.uint8(0xA0)
    assert unpack(qs, 4, 16).tolist() == [list(range(16)) + [10] * 16]
    # a bit mask: bit j of byte b is number 8b + j
    assert unpack(np.array([[0b00000101, 0b10000000]], np.uint8), 1, 1).tolist() == [[1, 0, 1] + [0] * 12 + [1]]
    # 2-bit numbers in groups of 2 bytes: bits 0-1 of both bytes first, then bits 2-3 ...
    assert unpack(np.array([[0b11100100, 0b00011011]], np.uint8), 2, 2).tolist() == [[0, 3, 1, 2, 2, 1, 3, 0]]


def test_every_type_read_through_a_file(tmp_path):
    """The same blocks written into a GGUF by the package's writer, read with read_gguf + dequantize:
    the tensor sizes (BLOCKS) and row shapes are right for every type."""
    writer = gguf.GGUFWriter(str(tmp_path / "all.gguf"), arch="llama")
    expected = {}
    for qtype in list(FP16_AT) + PLAIN:
        block, size = BLOCKS[qtype]
        rows = random_blocks(qtype, 3 * 512 // block, seed=int(qtype)).reshape(3, -1)  # 3 rows of 512 numbers
        writer.add_tensor(Q(qtype).name, rows, raw_dtype=qtype)
        expected[Q(qtype).name] = gguf.quants.dequantize(rows, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    g = read_gguf(tmp_path / "all.gguf")
    for name, theirs in expected.items():
        ours = dequantize(g, name)
        assert ours.shape == (3, 512) and same_bits(ours, theirs.astype(np.float32)), name


# ---------------------------------------------------------------------------------------------------
# The real files, where they have been fetched into weights/gguf/

REAL_FILES = [hub.SMOLLM2_GGUF] + [spec["file"] for spec in hub.SPLIT_GGUFS.values()]


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL_FILES)
def test_real_files_every_tensor_type_equals_gguf_package(name):
    path = hub.weights_dir() / "gguf" / name
    if not path.is_file():
        pytest.skip(f"{path} not fetched")
    g, reader = read_gguf(path), gguf.GGUFReader(path)
    by_type = {}
    for t in reader.tensors:  # the first and the last tensor of each type in the file, whole
        by_type.setdefault(int(t.tensor_type), []).append(t)
    assert by_type, name
    for qtype, tensors in by_type.items():
        for t in {id(x): x for x in (tensors[0], tensors[-1])}.values():
            ours = dequantize(g, t.name)
            theirs = gguf.quants.dequantize(t.data, Q(qtype)).reshape(ours.shape)
            assert same_bits(ours, theirs.astype(np.float32)), f"{name}: {t.name} ({type_name(qtype)})"
