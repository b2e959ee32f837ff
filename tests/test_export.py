"""GGUF export (minift/export.py), checked by three readers that did not write the file: minift's own
(gguf.convert_gguf, back to a Hugging Face folder), the `gguf` package (llama.cpp's Python reader, and its
quantizer as the reference for our blocks' bytes) and transformers' GGUF loader; and by llama.cpp itself
(llama-cpp-python) where it is installed. The tiny random Llama is written by minift's save_checkpoint with a
SmolLM2-style tokenizer; the real SmolLM2-135M-Instruct tests are marked slow.
"""
import json
from pathlib import Path
import re
import time

import numpy as np
import pytest
import torch

from minift import export
from minift.checkpoints import build_model, load_checkpoint, read_safetensors, save_checkpoint
from minift.export import export_gguf, write_modelfile
from minift.gguf import convert_gguf, read_gguf
from minift.models.llama import GGUF_LAYER_NAMES as LAYER_NAMES, GGUF_TOP_NAMES
from minift.quantize import QuantizedWeight
from minift.tokenizer import Tokenizer
from test_gguf import SMOL_TEMPLATE, SPECIALS, one_line_error, smollm_style_tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
KIND_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "add_bos_token": False,
                    "chat_template": SMOL_TEMPLATE}
TEXTS = ["the cat sat on the mat", "What is the capital of France?", "héllo wörld 🙂 日本", "I'm don't",
         "<|im_start|>user\nhi<|im_end|>\n", "x2024-01-01"]


def tiny_checkpoint(folder, tied=True, intermediate=96, extra_vocab=0, task="lm"):
    """A random Llama (GQA: 4 query heads, 2 k/v heads, head size 16) saved as a checkpoint folder with its
    tokenizer. intermediate=80 gives ffn_down rows of 80, not whole blocks of 32; extra_vocab leaves
    embedding rows the tokenizer does not use."""
    tok = smollm_style_tokenizer()
    config = dict(model_type="llama", vocab_size=tok.get_vocab_size() + extra_vocab, hidden_size=64,
                  intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=tied,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = build_model(config, task=task, num_labels=3).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1, so a norm written wrongly shows
            p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(model, folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return model, tok


def llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute, written out independently of export.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def logits_of(model, text_ids):
    with torch.no_grad():
        return model(torch.tensor([text_ids]))[0].double()


IDS = [5, 17, 42, 99, 3, 250, 7, 1, 2, 64]


# ---------------------------------------------------------------------------------------------------
# Round trip through minift's reader

@pytest.mark.parametrize("tied", [True, False])
def test_f32_comes_back_bit_for_bit(tmp_path, tied):
    model, _ = tiny_checkpoint(tmp_path / "ckpt", tied=tied)
    path = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32")
    back = read_safetensors(convert_gguf(path, tmp_path / "back"))
    source = read_safetensors(tmp_path / "ckpt")
    assert set(back) == set(source) and ("lm_head.weight" in back) == (not tied)
    for k, w in source.items():
        assert torch.equal(back[k], w), k
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"], config["intermediate_size"],
            config["rms_norm_eps"], config["rope_theta"], config["tie_word_embeddings"]) == (4, 2, 16, 96, 1e-5, 1e5, tied)
    assert torch.equal(logits_of(load_checkpoint(tmp_path / "back", "lm", verbose=False), IDS), logits_of(model, IDS))


@pytest.mark.parametrize("tied", [True, False])
def test_f16_logits_within_fp16_rounding(tmp_path, tied):
    """fp16 keeps 11 bits: a weight moves by up to 2^-12 of itself, and the logits (up to 2.8 here) by 1.0e-3 of
    their size (2.9e-3): the bound is relative, 2e-3 of the largest logit."""
    model, _ = tiny_checkpoint(tmp_path / "ckpt", tied=tied)
    back = convert_gguf(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f16"), tmp_path / "back")
    weights = read_safetensors(back)
    for k, w in read_safetensors(tmp_path / "ckpt").items():  # matrices rounded to fp16, norms kept in fp32
        assert torch.equal(weights[k], w.half().float() if w.ndim == 2 else w), k
    source = logits_of(model, IDS)
    gap = (logits_of(load_checkpoint(back, "lm", verbose=False), IDS) - source).abs().max()
    assert 0 < gap < 2e-3 * source.abs().max()


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_weights_are_quantize_dequantize(tmp_path, kind, tied):
    """Matrices come back as QuantizedWeight.quantize(w).dequantize(), exactly; ffn_down's rows of 80 are not
    whole blocks and fall back to fp16; norms stay fp32."""
    tiny_checkpoint(tmp_path / "ckpt", tied=tied, intermediate=80)
    path = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", kind)
    types = {name: t.type for name, t in read_gguf(path).tensors.items()}
    assert types["blk.1.ffn_down.weight"] == Q.F16 and types["blk.1.ffn_up.weight"] == KIND_TYPES[kind]
    assert types["token_embd.weight"] == KIND_TYPES[kind] and types["blk.0.attn_norm.weight"] == Q.F32
    assert read_gguf(path).metadata["general.file_type"] == {"q8_0": 7, "q4_0": 2, "q4_1": 3}[kind]
    back = read_safetensors(convert_gguf(path, tmp_path / "back"))
    for k, w in read_safetensors(tmp_path / "ckpt").items():
        if w.ndim == 1:
            expected = w
        elif "down_proj" in k:
            expected = w.half().float()
        else:
            expected = QuantizedWeight.quantize(w, kind).dequantize()
        assert torch.equal(back[k], expected), k
        assert not torch.equal(back[k], w) or w.ndim == 1, k  # it really was rounded


# ---------------------------------------------------------------------------------------------------
# The gguf package's reader and quantizer

@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "q4_0", "q4_1"])
def test_gguf_package_reads_what_we_meant(tmp_path, kind):
    tiny_checkpoint(tmp_path / "ckpt", tied=False, intermediate=80)
    path = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", kind)
    source = read_safetensors(tmp_path / "ckpt")
    reader = gguf.GGUFReader(path)
    assert reader.alignment == 32 and len(reader.tensors) == 2 + 2 * 9 + 1
    hf = GGUF_TOP_NAMES
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
        key = f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.weight" if m else hf[t.name]
        w = source[key].numpy()
        if t.name.endswith("attn_q.weight"):
            w = llama_cpp_permute(w, 4)
        elif t.name.endswith("attn_k.weight"):
            w = llama_cpp_permute(w, 2)
        qtype = Q.F32 if w.ndim == 1 else Q.F16 if (kind != "f32" and w.shape[1] % 32) else KIND_TYPES[kind]
        assert t.tensor_type == qtype and tuple(t.shape) == tuple(reversed(w.shape)), t.name
        expected = gguf.quants.quantize(np.ascontiguousarray(w), qtype)  # llama.cpp's reference rounding
        assert np.asarray(t.data).tobytes() == expected.tobytes(), t.name
    tok = json.loads((tmp_path / "ckpt" / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["tokenizer.ggml.tokens"] == tokens
    assert fields["tokenizer.ggml.token_type"] == [3 if t in SPECIALS else 1 for t in tokens]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in tok["model"]["merges"]]
    del fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"], fields["tokenizer.ggml.merges"]
    assert fields == {
        "general.architecture": "llama", "general.type": "model", "general.name": "ckpt",
        "llama.block_count": 2, "llama.context_length": 64, "llama.embedding_length": 64,
        "llama.feed_forward_length": 80, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 100000.0, "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-5, rel=1e-7),
        "llama.attention.key_length": 16, "llama.attention.value_length": 16,
        "general.file_type": {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_1": 3}[kind],
        "llama.vocab_size": len(tokens), "llama.rope.dimension_count": 16, "general.quantization_version": 2,
        "general.alignment": 32, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": SMOL_TEMPLATE}


def test_unused_embedding_rows_get_placeholder_tokens(tmp_path):
    model, tok = tiny_checkpoint(tmp_path / "ckpt", extra_vocab=6)
    n = tok.get_vocab_size()
    meta = read_gguf(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32")).metadata
    assert meta["llama.vocab_size"] == n + 6 == len(meta["tokenizer.ggml.tokens"])
    assert meta["tokenizer.ggml.tokens"][n:] == [f"[PAD{i}]" for i in range(n, n + 6)]
    assert meta["tokenizer.ggml.token_type"][n:] == [5] * 6  # UNUSED, as llama.cpp's converter writes them
    back = Tokenizer.from_file(convert_gguf(tmp_path / "m.gguf", tmp_path / "back"))
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text).ids, text


# ---------------------------------------------------------------------------------------------------
# transformers' GGUF loader

@pytest.mark.parametrize("kind, bound", [("f32", 1e-5), ("f16", 2e-3)])
@pytest.mark.parametrize("tied", [True, False])
def test_transformers_gguf_loader_matches_the_source(tmp_path, transformers, kind, bound, tied):
    """Logits within 1e-5 (f32) or 2e-3 (f16, see above) of their size (up to 3 here), and the same tokenizer."""
    model, tok = tiny_checkpoint(tmp_path / "ckpt", tied=tied)
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", kind)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    source = logits_of(model, IDS)
    with torch.no_grad():
        gap = (theirs(torch.tensor([IDS])).logits[0].double() - source).abs().max()
    assert gap < bound * source.abs().max(), gap
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    # (no whitespace before a digit: transformers splits such text as GPT-2 does, not as SmolLM2; see test_gguf)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text).ids, text
    assert hf_tok.chat_template == SMOL_TEMPLATE
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 2)


# ---------------------------------------------------------------------------------------------------
# Refusals, in one line, before anything is written

def test_refuses_what_it_cannot_export_faithfully(tmp_path):
    tiny_checkpoint(tmp_path / "ckpt")
    assert "'q4_k'" in one_line_error(export_gguf, tmp_path / "ckpt", tmp_path / "m.gguf", "q4_k")
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    assert "already exists" in one_line_error(export_gguf, tmp_path / "ckpt", tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"
    for model_type in ("bert", "gpt2", "mistral"):
        (tmp_path / model_type).mkdir()
        (tmp_path / model_type / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert f"'{model_type}'" in one_line_error(export_gguf, tmp_path / model_type, tmp_path / "m.gguf")
    tiny_checkpoint(tmp_path / "classifier", task="classify")
    assert "classifier" in one_line_error(export_gguf, tmp_path / "classifier", tmp_path / "m.gguf")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert "best/" in one_line_error(export_gguf, tmp_path / "adapter", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob("*.tmp"))


def test_refuses_a_tokenizer_it_does_not_write(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    tiny_checkpoint(tmp_path / "ckpt")
    tokenizer_json = tmp_path / "ckpt" / "tokenizer.json"
    original = tokenizer_json.read_text()
    HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tokenizer_json))
    assert "WordPiece" in one_line_error(export_gguf, tmp_path / "ckpt", tmp_path / "m.gguf")
    data = json.loads(original)
    data["pre_tokenizer"] = json.loads(pre_tokenizers.ByteLevel(add_prefix_space=True).__getstate__())
    tokenizer_json.write_text(json.dumps(data))
    assert "pre-tokenizer" in one_line_error(export_gguf, tmp_path / "ckpt", tmp_path / "m.gguf")
    data = json.loads(original)
    data["normalizer"] = {"type": "NFC"}
    tokenizer_json.write_text(json.dumps(data))
    assert "NFC" in one_line_error(export_gguf, tmp_path / "ckpt", tmp_path / "m.gguf")
    tokenizer_json.unlink()
    assert "no tokenizer.json" in one_line_error(export_gguf, tmp_path / "ckpt", tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_refuses_weights_a_llama_file_has_no_place_for(tmp_path):
    from safetensors.torch import save_file
    tiny_checkpoint(tmp_path / "ckpt")
    tensors = read_safetensors(tmp_path / "ckpt")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    message = one_line_error(export_gguf, tmp_path / "ckpt", tmp_path / "m.gguf")
    assert "model.layers.0.self_attn.q_proj.bias" in message, message
    del tensors["model.layers.0.self_attn.q_proj.bias"]
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    message = one_line_error(export_gguf, tmp_path / "ckpt", tmp_path / "m.gguf")
    assert "model.layers.0.self_attn.k_proj.weight is (32, 64), config.json makes it (64, 64)" in message, message
    assert not (tmp_path / "m.gguf").exists()


def test_a_stopped_export_leaves_no_file(tmp_path, monkeypatch):
    tiny_checkpoint(tmp_path / "ckpt")
    calls = []

    def stop_after_three(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    real = export.tensor_bytes
    monkeypatch.setattr(export, "tensor_bytes", stop_after_three)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no m.gguf, no m.gguf.tmp


# ---------------------------------------------------------------------------------------------------
# The Ollama Modelfile

GO_ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)


def go_template(template, messages):
    """Go's text/template by hand (no Go here), for the actions minift's Modelfiles use: range .Messages, if eq .Role "x",
    if $v, else, end, $v := / = .Content or "", and {{ .Role }} {{ .Content }} {{ $v }} printed; '{{-' trims the
    whitespace before them. Anything else raises, so a template outside this subset fails the test, not passes it."""
    pieces, pos = [], 0
    for m in GO_ACTION.finditer(template):
        if m.group(3):
            raise ValueError("not in the subset: -}}")
        text = template[pos:m.start()]
        pieces += [("text", text.rstrip() if m.group(1) else text), ("action", m.group(2))]
        pos = m.end()
    pieces.append(("text", template[pos:]))

    def block(i, stop):  # -> (list of nodes, index after the block, the word that ended it)
        nodes = []
        while i < len(pieces):
            kind, value = pieces[i]
            if kind == "action" and value in stop:
                return nodes, i + 1, value
            if kind == "action" and (value == "range .Messages" or value.startswith("if ")):
                body, i, word = block(i + 1, ("end", "else"))
                other, i = (block(i, ("end",))[:2] if word == "else" else ([], i))
                nodes.append((value, body, other))
            else:
                nodes.append((kind, value))
                i += 1
        return nodes, i, None

    def value(expr, message, env):
        if expr in (".Role", ".Content"):
            return message[expr[1:].lower()]
        if expr.startswith("$"):
            return env[expr]
        if expr == '""':
            return ""
        raise ValueError(f"not in the subset: {expr}")

    def run(nodes, message, env):
        out = ""
        for node in nodes:
            if node[0] == "text":
                out += node[1]
            elif node[0] == "range .Messages":
                out += "".join(run(node[1], m, env) for m in messages)
            elif node[0].startswith("if "):
                cond = node[0][3:]
                m = re.fullmatch(r'eq (\.Role) "(\w+)"', cond)
                truth = value(m.group(1), message, env) == m.group(2) if m else bool(value(cond, message, env))
                out += run(node[1] if truth else node[2], message, env)
            elif m := re.fullmatch(r"(\$\w+) :?= (.+)", node[1]):
                env[m.group(1)] = value(m.group(2), message, env)
            else:
                out += value(node[1], message, env)
        return out

    return run(block(0, ())[0], None, {})


def ollama_prompt(modelfile, messages):
    """The prompt Ollama builds from our Modelfile: its SYSTEM first when the conversation does not start with a
    system message, then TEMPLATE run on the messages."""
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.DOTALL).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', modelfile, re.DOTALL)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system.group(1)}] + messages
    return go_template(template, messages)


CONVERSATIONS = [[{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
                 [{"role": "user", "content": "héllo 🙂\nline two"}]]


def test_modelfile_template_equals_the_chat_template(tmp_path):
    _, tok = tiny_checkpoint(tmp_path / "ckpt")
    path = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "q8_0", modelfile=True)
    modelfile = (tmp_path / "m.Modelfile").read_text()
    assert modelfile.splitlines()[0] == "FROM ./m.gguf"
    assert modelfile.count('PARAMETER stop "<|im_end|>"') == 1
    ours = Tokenizer.from_file(tmp_path / "ckpt")
    for messages in CONVERSATIONS:
        assert ollama_prompt(modelfile, messages) == ours.apply_chat_template(messages), messages
    assert "already exists" in one_line_error(write_modelfile, path)


def test_modelfile_leaves_a_template_it_cannot_translate_to_ollama(tmp_path, capsys):
    tiny_checkpoint(tmp_path / "ckpt")
    llama2 = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    config = {**TOKENIZER_CONFIG, "chat_template": llama2, "eos_token": "<|endoftext|>"}
    (tmp_path / "ckpt" / "tokenizer_config.json").write_text(json.dumps(config))
    export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f16", modelfile=True)
    modelfile = (tmp_path / "m.Modelfile").read_text()
    assert "TEMPLATE" not in modelfile.replace("No TEMPLATE", "") and "Gemma's templates only" in modelfile
    assert modelfile.splitlines()[-1] == 'PARAMETER stop "<|endoftext|>"'
    assert "not one minift writes" in capsys.readouterr().out
    assert read_gguf(tmp_path / "m.gguf").metadata["tokenizer.chat_template"] == llama2  # the GGUF still has it


# ---------------------------------------------------------------------------------------------------
# llama.cpp itself (llama-cpp-python), where it is installed

def llama_cpp_model(path):
    """llama.cpp keeps its k/v cache in fp16 by default (logits 1.8e-3 off on the tiny f32 model, 3e-6 with an f32
    cache): type_k = type_v = 0 (GGML_TYPE_F32), so what is compared is the file, not the cache's precision."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False,
                           type_k=0, type_v=0)


def llama_cpp_greedy(llm, ids, max_new_tokens, eos):
    """Greedy decoding on llama.cpp's logits (its own sampler left out), stopping at the end-of-turn token."""
    llm.reset()
    llm.eval(ids)
    out = []
    while len(out) < max_new_tokens:
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if out[-1] == eos:
            break
        llm.eval([out[-1]])
    return out


def minift_greedy(model, ids, max_new_tokens, eos):
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, eos_token_id=eos)
    return out[0, len(ids):].tolist()


def test_llama_cpp_runs_the_tiny_export(tmp_path):
    model, tok = tiny_checkpoint(tmp_path / "ckpt", tied=False)
    llm = llama_cpp_model(export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf", "f32"))
    try:
        prompt = Tokenizer.from_file(tmp_path / "ckpt").apply_chat_template(CONVERSATIONS[1])
        ids = tok.encode(prompt).ids
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids  # its smollm split is ours
        llm.eval(ids)
        gap = np.abs(np.asarray(llm.scores[:len(ids)]) - logits_of(model, ids).numpy()).max()
        assert gap < 1e-4, gap
        assert llama_cpp_greedy(llm, ids, 12, eos=2) == minift_greedy(model, ids, 12, eos=2)
    finally:
        llm.close()


def test_llama_cpp_runs_a_lora_fine_tune_exported_merged(tmp_path):
    """A LoRA run of the instruction job leaves best/ merged (a plain checkpoint): its f32 export gives, in llama.cpp,
    the greedy tokens minift's best/ gives, and they are not the base model's (the adapters trained)."""
    pytest.importorskip("llama_cpp")
    from minift import TrainConfig
    from minift.instruct import finetune_instruct
    base, tok = tiny_checkpoint(tmp_path / "ckpt", tied=False)
    rows = [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": f"{a} {b}"},
                          {"role": "assistant", "content": a}]} for a in ("cat", "sun", "tree") for b in ("red", "dog")]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-2, metric="loss", precision="fp32", device="cpu", lora_r=4)
    finetune_instruct(str(tmp_path / "ckpt"), data=str(tmp_path / "rows.jsonl"), out=str(tmp_path / "run"), cfg=cfg,
                      max_length=64, test=False, score_rows=2, sample_rows=1)
    best = load_checkpoint(tmp_path / "run" / "best", "lm", verbose=False)
    llm = llama_cpp_model(export_gguf(tmp_path / "run" / "best", tmp_path / "tuned.gguf", "f32"))
    try:
        template = Tokenizer.from_file(tmp_path / "ckpt").apply_chat_template
        prompts = [[{"role": "system", "content": "Be terse."}, {"role": "user", "content": t}]
                   for t in ("sun dog", "tree red", "cat cat")]
        changed = 0
        for conversation in prompts:
            ids = tok.encode(template(conversation)).ids
            ours = minift_greedy(best, ids, 8, eos=2)
            assert llama_cpp_greedy(llm, ids, 8, eos=2) == ours
            changed += minift_greedy(base, ids, 8, eos=2) != ours
        assert changed  # the fine-tune changed the answers: the export carries the merged adapters
    finally:
        llm.close()


# ---------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct

@pytest.fixture(scope="module")
def smollm2_exports(smollm2_dir, tmp_path_factory):
    """SmolLM2 exported in every kind: {kind: (path, seconds)}."""
    folder = tmp_path_factory.mktemp("smollm2_gguf")
    exports = {}
    for kind in export.KINDS:
        t0 = time.perf_counter()
        path = export_gguf(smollm2_dir, folder / f"smollm2.{kind}.gguf", kind)
        exports[kind] = (path, time.perf_counter() - t0)
        print(f"SmolLM2 {kind}: {path.stat().st_size / 2**20:.1f} MiB in {exports[kind][1]:.1f} s")
    return exports


@pytest.mark.slow
def test_smollm2_export_is_llama_cpps_own_file(smollm2_exports):
    """weights/smollm2 came from llama.cpp's Q4_1 file (token_embd in Q8_0): exporting it as q4_1 gives that file's
    210 Q4_1 matrices byte for byte, q8_0 its Q8_0 embedding, and every tokenizer and llama.* key is the same."""
    from minift.hub import SMOLLM2_GGUF, weights_dir
    source = read_gguf(weights_dir() / "gguf" / SMOLLM2_GGUF)
    for kind, qtype in (("q4_1", Q.Q4_1), ("q8_0", Q.Q8_0)):
        ours = read_gguf(smollm2_exports[kind][0])
        same = [n for n, t in source.tensors.items() if t.type == qtype]
        assert len(same) == {"q4_1": 210, "q8_0": 1}[kind]
        for name in same:
            a, b = source.tensors[name], ours.tensors[name]
            assert b.type == qtype and b.shape == a.shape, name
            size = export.nbytes(b)
            assert bytes(ours.buf[b.offset:b.offset + size]) == bytes(source.buf[a.offset:a.offset + size]), name
    meta = read_gguf(smollm2_exports["f16"][0]).metadata
    for key, value in source.metadata.items():
        if key.startswith(("tokenizer.", "llama.")) and key != "tokenizer.ggml.add_space_prefix":
            assert meta[key] == value, key


SMOL_PROMPTS = [[{"role": "user", "content": "What is the capital of France?"}],
                [{"role": "user", "content": "Write a haiku about the sea."}],
                [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What color is the sky?"}],
                [{"role": "user", "content": "List three prime numbers 2 3 5 and explain why."}]]


def top_two_margin(model, ids):
    top = logits_of(model, ids)[-1].topk(2).values
    return float(top[0] - top[1])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_smollm2_llama_cpp_generates_minifts_tokens(smollm2_exports, smollm2_dir, tmp_path, kind):
    """Greedy answers through the chat template, until <|im_end|> or 40 tokens: llama.cpp on the export against
    minift on the same weights (for f16: the fp16-rounded ones, read back from the export). f32: the same tokens.
    f16: llama.cpp also rounds the activations to fp16 (logits 0.01-0.03 off), so where minift's two likeliest
    tokens are closer than 0.05 the two may part; before such a near tie they agree, and 3 of the 4 answers agree
    to the end (measured: the fourth parts at its first token, a margin of 0.001)."""
    path = smollm2_exports[kind][0]
    folder = smollm2_dir if kind == "f32" else convert_gguf(path, tmp_path / "back")
    model = load_checkpoint(folder, "lm", verbose=False).eval()
    tok = Tokenizer.from_file(smollm2_dir)
    llm = llama_cpp_model(path)
    try:
        same = 0
        for messages in SMOL_PROMPTS:
            ids = tok.encode(tok.apply_chat_template(messages))
            theirs, ours = llama_cpp_greedy(llm, ids, 40, tok.eos_id), minift_greedy(model, ids, 40, tok.eos_id)
            print(f"{kind}: {len(theirs)} tokens, same: {theirs == ours}: {tok.decode(theirs)!r}")
            same += theirs == ours
            if theirs != ours:
                k = next(i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b)
                margin = top_two_margin(model, ids + ours[:k])
                print(f"  parted at token {k}, where minift's top two logits are {margin:.4f} apart")
                assert kind == "f16" and margin < 0.05, (k, margin, tok.decode(theirs), tok.decode(ours))
        assert same == len(SMOL_PROMPTS) if kind == "f32" else same >= 3
    finally:
        llm.close()


def llama_cpp_logit_gap(path, model, tok):
    """The largest |llama.cpp - minift| logit over every position of the SMOL_PROMPTS, and how often the likeliest
    next token agrees."""
    llm = llama_cpp_model(path)
    try:
        gap, agree = 0.0, 0
        for messages in SMOL_PROMPTS:
            ids = tok.encode(tok.apply_chat_template(messages))
            llm.reset()
            llm.eval(ids)
            theirs, ours = np.asarray(llm.scores[:len(ids)]), logits_of(model, ids).numpy()
            gap = max(gap, float(np.abs(theirs - ours).max()))
            agree += int(theirs[-1].argmax() == ours[-1].argmax())
        return gap, agree
    finally:
        llm.close()


@pytest.fixture(scope="module")
def llama_cpps_own_gap(smollm2_dir):
    """The same gap for llama.cpp's own Q4_1 file (the source of weights/smollm2) against minift on its exact
    dequantized weights: what llama.cpp's rounding of the activations alone costs (measured 2.58)."""
    from minift.hub import SMOLLM2_GGUF, weights_dir
    return llama_cpp_logit_gap(weights_dir() / "gguf" / SMOLLM2_GGUF, load_checkpoint(smollm2_dir, "lm", verbose=False),
                               Tokenizer.from_file(smollm2_dir))[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
def test_smollm2_llama_cpp_logits_on_quantized_weights(smollm2_exports, llama_cpps_own_gap, tmp_path, kind):
    """llama.cpp rounds the activations to 8 bits before a quantized matmul, so its logits are near minift's on
    the dequantized weights, not equal: our file must be as near as llama.cpp's own file is (a wrong block layout
    would be as far as the rounding of the weights itself, 15 for q4_0)."""
    path = smollm2_exports[kind][0]
    back = convert_gguf(path, tmp_path / "back")
    model, tok = load_checkpoint(back, "lm", verbose=False).eval(), Tokenizer.from_file(back)
    gap, agree = llama_cpp_logit_gap(path, model, tok)
    print(f"{kind}: max |llama.cpp - minift on the dequantized weights| = {gap:.3f} over every position "
          f"(llama.cpp's own Q4_1 file: {llama_cpps_own_gap:.3f}); next token agrees on {agree} of {len(SMOL_PROMPTS)}")
    assert gap < 1.25 * llama_cpps_own_gap


def test_command_line_exports_and_refuses_in_one_line(tmp_path, capsys):
    from minift.cli import main
    tiny_checkpoint(tmp_path / "ckpt")
    main(["export", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--type", "q8_0", "--modelfile"])
    assert read_gguf(tmp_path / "m.gguf").metadata["general.file_type"] == 7  # MOSTLY_Q8_0
    assert (tmp_path / "m.Modelfile").read_text().startswith("FROM ./m.gguf\n")
    capsys.readouterr()  # the progress bar of that export
    for argv, words in ((["--type", "q9"], "GGUF type 'q9' is unknown"), ([], "already exists")):
        with pytest.raises(SystemExit) as e:
            main(["export", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and words in err[0], err


# ---------------------------------------------------------------------------------------------------
# Qwen2, Qwen3, Gemma 2 and Gemma 3, and a SentencePiece Llama: folders converted from GGUFs that llama.cpp's converters
# would write (test_gguf's writers), exported back

FAMILY_ARCHS = ["qwen2", "qwen3", "gemma2", "gemma3", "llama-spm"]


def family_folder(tmp_path, transformers, arch):
    """(a folder converted from a tiny random model's f32 GGUF, that GGUF)."""
    from test_gguf import family_gguf, llama_gguf, spm_kv, tiny_family
    if arch in ("qwen2", "llama-spm"):
        tok = smollm_style_tokenizer() if arch == "qwen2" else None
        tokens, kv = spm_kv() if tok is None else (None, [])
        size = tok.get_vocab_size() if tok else len(tokens)
        cls = transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.LlamaForCausalLM
        config = cls.config_class(vocab_size=size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False)
        torch.manual_seed(4)
        hf = cls(config).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        name = "qwen2" if arch == "qwen2" else "llama"
        path = llama_gguf(tmp_path / "src.gguf", hf, tok, [Q.F32], arch=name, tied=False, pre="qwen2", extra_kv=kv)
    else:
        hf, kv = tiny_family(transformers, arch)
        path = family_gguf(tmp_path / "src.gguf", hf, arch, [Q.F32], kv)
    return convert_gguf(path, tmp_path / "src"), path


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_family_export_gives_back_the_file_bit_for_bit(tmp_path, transformers, arch):
    """GGUF -> folder -> GGUF (f32): every tensor's bytes are the source file's (Gemma's norms: (s - 1) + 1 = s, exact for
    stored gains s in [0.5, 2]), every {arch}.* and tokenizer.* key of the source has its value (SentencePiece scores
    aside: ours are minus the merge ranks), the `gguf` package reads every tensor, and converting it again gives the
    folder's tensors and token ids bit for bit."""
    folder, source = family_folder(tmp_path, transformers, arch)
    path = export_gguf(folder, tmp_path / "m.gguf", "f32")
    ours, theirs = read_gguf(path), read_gguf(source)
    assert set(ours.tensors) == set(theirs.tensors)
    for name, t in theirs.tensors.items():
        a = ours.tensors[name]
        assert (a.type, a.shape) == (t.type, t.shape), name
        size = export.nbytes(a)
        assert bytes(ours.buf[a.offset:a.offset + size]) == bytes(theirs.buf[t.offset:t.offset + size]), name
    name = theirs.metadata["general.architecture"]
    for key, value in theirs.metadata.items():
        if key.startswith((f"{name}.", "tokenizer.")) and key != "tokenizer.ggml.scores":
            assert np.array_equal(np.float32(ours.metadata[key]), np.float32(value)) if isinstance(value, float) \
                else ours.metadata[key] == value, key
    reader = gguf.GGUFReader(path)
    assert {t.name for t in reader.tensors} == set(theirs.tensors)
    back = convert_gguf(path, tmp_path / "back")
    first, again = read_safetensors(folder), read_safetensors(back)
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)
    a, b = Tokenizer.from_file(folder), Tokenizer.from_file(back)
    from test_gguf import TOKENIZER_TEXTS
    for text in TOKENIZER_TEXTS + TEXTS:
        assert a.encode(text) == b.encode(text), text


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_transformers_reads_the_family_exports(tmp_path, transformers, arch):
    """transformers' GGUF loader on our export: the folder's weights tensor for tensor, the same token ids, and (given
    what its loader does not read: qwen3's head_dim, Gemma's query_pre_attn_scalar) the logits minift gives."""
    import minift
    folder, _ = family_folder(tmp_path, transformers, arch)
    export_gguf(folder, tmp_path / "m.gguf", "f32")
    config = json.loads((folder / "config.json").read_text())
    missing = {"qwen3": dict(head_dim=16), "gemma2": dict(query_pre_attn_scalar=16),
               "gemma3": dict(query_pre_attn_scalar=16)}.get(arch, {})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32,
                                                               attn_implementation="eager", **missing).eval()
    ref = theirs.state_dict()
    for k, w in read_safetensors(folder).items():
        assert torch.equal(ref[k], w), k
    ids = [2, 17, 42, 99, 3, 150, 7, 61, 30, 120, 11, 5]
    model = minift.load(folder, task="lm", verbose=False)
    with torch.no_grad():
        diff = (theirs(torch.tensor([ids])).logits[0] - model(torch.tensor([ids]))[0]).abs().max().item()
    assert diff < 1e-5, (diff, config["model_type"])
    hf_tok, ours = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf"), Tokenizer.from_file(folder)
    from test_gguf import TOKENIZER_TEXTS
    for text in TOKENIZER_TEXTS[:-2] + TEXTS[:4]:  # (specials aside: transformers adds them by other rules)
        assert hf_tok(text)["input_ids"] == ours.encode(text), text


CHAT_TEMPLATES = Path(__file__).parent / "chat_templates"


@pytest.mark.parametrize("template", ["Qwen2.5-Coder-0.5B-Instruct", "Qwen3-0.6B", "gemma-2-2b-it", "gemma-3-4b-it"])
def test_modelfile_speaks_each_familys_template(tmp_path, transformers, template):
    """The Modelfile's Go template gives the prompt our chat template gives (Gemma: without the BOS, which llama.cpp
    adds), for conversations that end with a user turn, with the default system prompt of Qwen2.5 as SYSTEM."""
    arch = "gemma3" if template.startswith("gemma") else "qwen2"
    folder, _ = family_folder(tmp_path, transformers, arch)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (CHAT_TEMPLATES / f"{template}.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    export_gguf(folder, tmp_path / "m.gguf", "q8_0", modelfile=True)
    modelfile = (tmp_path / "m.Modelfile").read_text()
    ours = Tokenizer.from_file(folder)
    assert f'PARAMETER stop "{ours.chat_format.end_of_turn}"' in modelfile.splitlines()[-2:]
    assert ('SYSTEM """You are Qwen' in modelfile) == template.startswith("Qwen2.5")
    conversations = CONVERSATIONS[:2] + [[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                          {"role": "user", "content": "c"}]]
    for messages in conversations:
        if template == "gemma-2-2b-it" and messages[0]["role"] == "system":
            continue  # Gemma 2's template refuses a system turn
        prompt = ours.apply_chat_template(messages)
        assert ollama_prompt(modelfile, messages) == (prompt.removeprefix("<bos>") if arch == "gemma3" else prompt), messages


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "gemma2", "gemma3"])
def test_llama_cpp_runs_each_familys_tiny_export(tmp_path, transformers, arch):
    """llama.cpp on our f32 export: minift's logits (f32 cache) and greedy tokens, past Gemma's window of 4. Gemma's
    logits are further apart (measured 8e-4 over 2 layers, 2.3e-3 over 6, against < 1e-4 for Qwen): ggml's CPU GELU
    reads its values from an fp16 table (GGML_GELU_FP16), and Gemma's MLP is GeGLU."""
    pytest.importorskip("llama_cpp")
    folder, _ = family_folder(tmp_path, transformers, arch)
    model = load_checkpoint(folder, "lm", verbose=False)
    llm = llama_cpp_model(export_gguf(folder, tmp_path / "m.gguf", "f32"))
    try:
        ids = [2, 17, 42, 99, 3, 150, 7, 61, 30, 120, 11, 5]
        llm.reset()
        llm.eval(ids)
        ours = logits_of(model, ids).numpy()
        gap = np.abs(np.asarray(llm.scores[:len(ids)]) - ours).max()
        print(f"{arch}: llama.cpp's logits {gap:.1e} from minift's (largest {np.abs(ours).max():.1f})")
        assert gap < (1e-4 if arch.startswith("qwen") else 5e-3), gap
        assert llama_cpp_greedy(llm, ids, 10, eos=-1) == minift_greedy(model, ids, 10, eos=-1)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def gemma3_export(tmp_path_factory):
    """Gemma 3 270M's converted folder exported as f32 (1 GB)."""
    from minift import hub
    path = hub.weights_dir() / "gguf" / hub.SPLIT_GGUFS["gemma3-270m"]["file"]
    if not path.is_file():
        pytest.skip(f"{path} not fetched")
    folder = hub.fetch_split_model("gemma3-270m")
    return folder, path, export_gguf(folder, tmp_path_factory.mktemp("gemma3") / "gemma3.f32.gguf", "f32", modelfile=True)


@pytest.mark.slow
def test_gemma3_270m_export_is_its_file_again(gemma3_export, transformers):
    """The real file's tokenizer keys (262,144 pieces and their types, the special ids, BOS) and config keys come back;
    the f32 tensors are its dequantized ones (norms plus one again, exactly); transformers' GGUF loader on our file gives
    the folder's weights tensor for tensor and the folder's token ids."""
    folder, source, path = gemma3_export
    ours, theirs = read_gguf(path), read_gguf(source)
    for key, value in theirs.metadata.items():
        if key.startswith(("gemma3.", "tokenizer.")) and key not in ("tokenizer.ggml.scores", "tokenizer.ggml.add_sep_token"):
            assert np.array_equal(np.float32(ours.metadata[key]), np.float32(value)) if isinstance(value, float) \
                else ours.metadata[key] == value, key
    assert theirs.metadata["tokenizer.ggml.add_sep_token"] is False  # llama.cpp's default: not written
    from minift.gguf import dequantize
    for name in ("blk.0.attn_q.weight", "blk.5.post_ffw_norm.weight", "output_norm.weight", "token_embd.weight"):
        assert np.array_equal(dequantize(ours, name), dequantize(theirs, name)), name
    loader = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ref, weights = loader.state_dict(), read_safetensors(folder)
    assert all(torch.equal(ref[k], w) for k, w in weights.items())
    del loader, ref, weights
    hf_tok, tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), Tokenizer.from_file(folder)
    from test_gguf import TOKENIZER_TEXTS
    for text in TOKENIZER_TEXTS + ["\t\tdef f():\n\t\t\treturn   {1: 'x'}\n\n\n\n"]:
        assert hf_tok(text)["input_ids"] == tok.encode(text), text
    modelfile = path.with_suffix(".Modelfile").read_text()
    assert "<start_of_turn>" in modelfile and 'PARAMETER stop "<end_of_turn>"' in modelfile


@pytest.mark.slow
def test_gemma3_270m_llama_cpp_generates_minifts_tokens(gemma3_export):
    """llama.cpp on the f32 export of Gemma 3 270M: minift's greedy tokens on a Gemma-turns prompt and a plain one."""
    folder, _, path = gemma3_export
    model, tok = load_checkpoint(folder, "lm", verbose=False), Tokenizer.from_file(folder)
    llm = llama_cpp_model(path)
    try:
        for text in (tok.apply_chat_template([{"role": "user", "content": "Write a haiku about the sea."}]),
                     "<bos>The capital of France is"):
            ids = tok.encode(text, add_special_tokens=False)
            assert llama_cpp_greedy(llm, ids, 20, tok.eos_id) == minift_greedy(model, ids, 20, tok.eos_id), text
    finally:
        llm.close()


def test_refuses_what_llama_cpp_fixes_otherwise_and_keeps_linear_rope(tmp_path, transformers):
    folder, _ = family_folder(tmp_path, transformers, "gemma3")
    config = json.loads((folder / "config.json").read_text())
    for change, words in ((dict(query_pre_attn_scalar=32), "query_pre_attn_scalar 32"),
                          (dict(layer_types=["full_attention"] * 6), "layer_types"),
                          (dict(rope_local_base_freq=20000.0), "local RoPE base"),
                          (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0}), "RoPE scaling")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        message = one_line_error(export_gguf, folder, tmp_path / "m.gguf")
        assert words in message and "gemma3" in message, message
    (tmp_path / "q").mkdir()
    qwen, _ = family_folder(tmp_path / "q", transformers, "qwen2")
    config = json.loads((qwen / "config.json").read_text())
    (qwen / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 8,
                                                  "max_window_layers": 0}))
    assert "sliding window of 8" in one_line_error(export_gguf, qwen, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    linear = {"rope_type": "linear", "factor": 4.0}
    (qwen / "config.json").write_text(json.dumps({**config, "rope_scaling": linear}))
    back = convert_gguf(export_gguf(qwen, tmp_path / "m.gguf", "f16"), tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["rope_scaling"] == linear
