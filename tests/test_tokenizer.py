"""Tokenizer tests on tiny tokenizers built here with the `tokenizers` library (no downloads).

make_bert() and make_gpt2() are also used by test_data.py."""
import json
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from minift.errors import MiniftError
from minift.tokenizer import Tokenizer

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran",
         "what", "day", "good", "bad", "hello", "world", "##s", "q", "ans", ":"]


def make_bert():
    """A BERT-style WordPiece tokenizer: one id per word above, [CLS] text [SEP], [PAD] = 0."""
    tok = tokenizers.Tokenizer(models.WordPiece({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(WORDS[:4])  # as in a real tokenizer.json: skipped by decode
    # Like MiniLM's tokenizer.json: pad and cut everything to 128; Tokenizer must switch that off.
    tok.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(128)
    return Tokenizer(tok)


def make_gpt2():
    """A GPT-2-style byte-level BPE trained on a few sentences, with <|endoftext|> and no pad token."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["the cat sat on the mat", "the dog ran", "what a good day",
                             "Below is an instruction that describes a task."], trainer)
    return Tokenizer(tok)


def ids_of(*words):
    return [WORDS.index(w) for w in words]


def test_from_file_and_folder(tmp_path):
    make_bert()._tok.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        tok = Tokenizer.from_file(path)
        assert tok.encode("the cat") == ids_of("[CLS]", "the", "cat", "[SEP]")


def test_from_file_errors(tmp_path):
    with pytest.raises(MiniftError) as e:
        Tokenizer.from_file(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path / "tokenizer.json") in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MiniftError) as e:
        Tokenizer.from_file(tmp_path)
    assert "\n" not in str(e.value) and "tokenizer.json" in str(e.value)


def test_bert_batch_pads_right_with_masks_and_token_types():
    tok = make_bert()
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 3, len(WORDS))
    batch = tok(["the cat sat", "a dog"])  # the file's fixed padding to 128 must be switched off
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    assert batch["input_ids"].tolist() == [ids_of("[CLS]", "the", "cat", "sat", "[SEP]"),
                                           ids_of("[CLS]", "a", "dog", "[SEP]", "[PAD]")]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0] * 5, [0] * 5]
    assert all(t.dtype == torch.long for t in batch.values())


def test_truncation_keeps_sep_and_left_padding():
    tok = make_bert()
    batch = tok(["the cat sat on the mat", "dog"], max_length=4, padding_side="left")
    assert batch["input_ids"].tolist() == [ids_of("[CLS]", "the", "cat", "[SEP]"),
                                           ids_of("[PAD]", "[CLS]", "dog", "[SEP]")]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    # Truncation is per call: the next call without max_length is whole again.
    assert len(tok.encode("the cat sat on the mat")) == 8
    assert tok.encode_batch(["the cat sat on the mat"], max_length=5) == [
        ids_of("[CLS]", "the", "cat", "sat", "[SEP]")]
    assert tok.encode("the cat", add_special_tokens=False) == ids_of("the", "cat")


def test_bad_arguments_raise_one_line():
    tok = make_bert()
    for kwargs in ({"max_length": 2}, {"padding_side": "middle"}):
        with pytest.raises(MiniftError) as e:
            tok(["the cat"], **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(MiniftError):
        tok([])


def test_gpt2_style_has_no_token_types_and_pads_with_eos():
    tok = make_gpt2()
    eos = tok._tok.token_to_id("<|endoftext|>")
    assert tok.eos_id == eos and tok.pad_id == eos
    batch = tok(["the cat sat on the mat", "the dog"], padding_side="left")
    assert set(batch) == {"input_ids", "attention_mask"}
    short = tok.encode("the dog")
    assert tok.encode("the dog", add_special_tokens=False) == short  # GPT-2 adds nothing
    row = batch["input_ids"][1].tolist()
    assert row[-len(short):] == short and set(row[:-len(short)]) == {eos}
    assert batch["attention_mask"][1].tolist() == [0] * (len(row) - len(short)) + [1] * len(short)


def test_decode_round_trip():
    gpt2 = make_gpt2()
    text = "the cat sat. Héllo wörld 🙂 \n tabs\tand  spaces"
    assert gpt2.decode(gpt2.encode(text)) == text  # byte-level: every string survives
    assert gpt2.decode(torch.tensor(gpt2.encode("the dog") + [gpt2.eos_id])) == "the dog"
    assert gpt2.decode(gpt2.encode("ran") + [gpt2.eos_id], skip_special_tokens=False) == "ran<|endoftext|>"
    bert = make_bert()
    assert bert.decode(bert.encode("The CAT sat")) == "the cat sat"  # lowercased; [CLS]/[SEP] skipped
    assert bert.decode(bert.encode("cats"), skip_special_tokens=False) == "[CLS] cats [SEP]"


def test_minilm_matches_transformers(minilm_dir):
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_file(minilm_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    texts = ["I just don't trust my life in google's hands #driverless cars_\ufffd_.no thank you",
             "ok", "self-driving cars " * 30]
    a = ours(texts, max_length=16)
    b = theirs(texts, max_length=16, truncation=True, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(a[key], b[key]), key
    assert ours.pad_id == theirs.pad_token_id and ours.eos_id == theirs.sep_token_id


# ---------------------------------------------------------------------------------------------------
# Chat templates: ChatML written directly, checked against the Jinja template rendered by jinja2

SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
# The same two templates spelled differently: escaped "\n" in the source, double quotes, trim marks, spaces.
SMOL_RESPELLED = ('{%- for message in messages -%}\n  {%- if loop.first and messages[0]["role"] != "system" %}'
                  '{{- "<|im_start|>system\\nBe kind, \\"always\\".<|im_end|>\\n" }}{% endif %}\n'
                  "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                  "{%- endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}")
PLAIN_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
LLAMA2_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
                   "+ ' [/INST]' }}{% else %}{{ message['content'] }}{% endif %}{% endfor %}")
CONVERSATIONS = [[{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
                 [{"role": "assistant", "content": "héllo 🙂\nline two"}, {"role": "user", "content": ""}]]


def chat_tokenizer(tmp_path, template, in_jinja_file=False, **config):
    """make_gpt2()'s tokenizer in a folder, with a tokenizer_config.json (and maybe chat_template.jinja)."""
    make_gpt2()._tok.save(str(tmp_path / "tokenizer.json"))
    if in_jinja_file:
        (tmp_path / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_file(tmp_path)


@pytest.mark.parametrize("template", [SMOL_TEMPLATE, SMOL_RESPELLED, PLAIN_CHATML])
def test_chat_template_equals_jinja(tmp_path, template):
    jinja2 = pytest.importorskip("jinja2")
    tok = chat_tokenizer(tmp_path, template)
    reference = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template)  # as transformers
    for messages in CONVERSATIONS:
        for generation in (True, False):
            expected = reference.render(messages=messages, add_generation_prompt=generation)
            assert tok.apply_chat_template(messages, add_generation_prompt=generation) == expected
    first = tok.apply_chat_template(CONVERSATIONS[0])
    assert first.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert first.startswith("<|im_start|>system\n") == (template != PLAIN_CHATML)  # default system prompt


def test_chat_template_from_jinja_file_and_list_form(tmp_path):
    tok = chat_tokenizer(tmp_path, SMOL_TEMPLATE, in_jinja_file=True)
    assert tok.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=False).startswith(
        "<|im_start|>system\nBe terse.<|im_end|>\n")
    named = [{"name": "tool_use", "template": LLAMA2_TEMPLATE}, {"name": "default", "template": PLAIN_CHATML}]
    (tmp_path / "named").mkdir()
    tok = chat_tokenizer(tmp_path / "named", named)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_refusals(tmp_path):
    for bad_template in (LLAMA2_TEMPLATE, SMOL_TEMPLATE.replace("'\n' + message['content']", "message['content']"),
                         PLAIN_CHATML.replace("{% endfor %}", "{% endfor %}\n\n"),  # Jinja outputs that blank line
                         PLAIN_CHATML.replace("}}{% endfor", "}} {% endfor"), "{{ bos_token }}" + PLAIN_CHATML):
        tok = chat_tokenizer(tmp_path, bad_template)
        with pytest.raises(MiniftError) as e:
            tok.apply_chat_template(CONVERSATIONS[0])
        assert "\n" not in str(e.value) and "ChatML" in str(e.value)
    tok = chat_tokenizer(tmp_path, SMOL_TEMPLATE)
    for messages in ([], "hi", [{"role": "user"}], [{"role": "user", "content": 3}], [("user", "hi")]):
        with pytest.raises(MiniftError) as e:
            tok.apply_chat_template(messages)
        assert "\n" not in str(e.value) and "role" in str(e.value)
    with pytest.raises(MiniftError) as e:
        make_gpt2().apply_chat_template(CONVERSATIONS[0])  # no tokenizer_config.json, no template
    assert "no chat template" in str(e.value)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(MiniftError) as e:
        Tokenizer.from_file(tmp_path)
    assert "\n" not in str(e.value) and "tokenizer_config.json" in str(e.value)


def test_special_tokens_from_tokenizer_config(tmp_path):
    """SmolLM2 style: eos and pad named in tokenizer_config.json (strings or AddedToken dicts) win over
    the built-in guesses (<|endoftext|> would be GPT-2's end of text)."""
    from tokenizers import AddedToken
    hf = make_gpt2()._tok
    hf.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    hf.save(str(tmp_path / "tokenizer.json"))
    start, end, eot = (hf.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True},
         "pad_token": "<|im_end|>"}))
    tok = Tokenizer.from_file(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (start, end, end) and eot not in (start, end)
    assert tok(["the cat", "a"])["input_ids"][1].tolist()[-1] == end  # pads with <|im_end|>
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<not-in-vocab>"}))
    tok = Tokenizer.from_file(tmp_path)  # unknown names fall back to the guesses
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, eot, eot)


# ---------------------------------------------------------------------------------------------------
# The templates minift knows beyond ChatML (tests/chat_templates/: Qwen2.5-Coder's two from their GGUF files,
# Qwen3's from llama.cpp's models/templates, a later revision of it, Gemma 2's (llama.cpp's copy) and Gemma 3's
# (google/gemma-3-4b-it)), each against transformers' apply_chat_template, which runs the Jinja.

TEMPLATES = Path(__file__).parent / "chat_templates"
KNOWN = {"Qwen2.5-Coder-0.5B-Instruct": "Qwen2.5", "Qwen2.5-Coder-1.5B-Instruct": "Qwen2.5", "Qwen3-0.6B": "Qwen3",
         "Qwen3-revised": "Qwen3", "gemma-2-2b-it": "Gemma 2", "gemma-3-4b-it": "Gemma 3"}
CHAT_SPECIALS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TURNS = CONVERSATIONS + [
    [{"role": "user", "content": "  padded  \n"}, {"role": "assistant", "content": "\nsure "}, {"role": "user", "content": "x"}],
    [{"role": "system", "content": "Be terse. "}, {"role": "user", "content": "hi"}],
    [{"role": "system", "content": "S"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>r1</think>a1"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>\nr2\n\n</think>a2"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "q3"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "S2"},
     {"role": "user", "content": "q2"}],
    [{"role": "user", "content": "q"}, {"role": "user", "content": "again"}],
    [{"role": "user", "content": "<tool_response>\nx\n</tool_response>"}, {"role": "assistant", "content": "ok"}]]


def special_tokenizer(tmp_path, template, eos="<eos>"):
    """make_gpt2()'s BPE with Gemma's and ChatML's special tokens, a template and BOS/EOS named: (ours, transformers')."""
    transformers = pytest.importorskip("transformers")
    hf = make_gpt2()._tok
    hf.add_special_tokens(CHAT_SPECIALS)
    hf.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<bos>", "eos_token": eos, "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token="<bos>",
                                                  eos_token=eos)
    theirs.chat_template = template
    return Tokenizer.from_file(tmp_path), theirs


@pytest.mark.parametrize("name", KNOWN)
def test_known_templates_equal_transformers(tmp_path, name):
    jinja2 = pytest.importorskip("jinja2")
    template = (TEMPLATES / f"{name}.jinja").read_text()
    ours, theirs = special_tokenizer(tmp_path, template)
    assert ours.chat_format.name == KNOWN[name]
    written = refused = 0
    for messages in TURNS:
        for generation in (True, False):
            try:
                expected = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            except jinja2.TemplateError:  # the template's raise_exception: roles that do not alternate, ...
                with pytest.raises(MiniftError) as e:
                    ours.apply_chat_template(messages, add_generation_prompt=generation)
                assert "\n" not in str(e.value)
                refused += 1
                continue
            assert ours.apply_chat_template(messages, add_generation_prompt=generation) == expected, messages
            written += 1
    assert written >= 8 and (refused > 0) == KNOWN[name].startswith("Gemma"), (written, refused)
    # a turn ends with the template's own token: the instruction job trains it, generation stops at it
    end = "<end_of_turn>" if KNOWN[name].startswith("Gemma") else "<|im_end|>"
    assert ours.eos_id == ours._tok.token_to_id(end) != ours._tok.token_to_id("<eos>")


def test_qwen_tools_and_unknown_templates_refused_in_one_line(tmp_path):
    for name in ("Qwen2.5-Coder-0.5B-Instruct", "Qwen3-0.6B"):
        ours, _ = special_tokenizer(tmp_path, (TEMPLATES / f"{name}.jinja").read_text())
        for messages in ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}],
                         [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": []}]):
            with pytest.raises(MiniftError) as e:
                ours.apply_chat_template(messages)
            assert "\n" not in str(e.value) and "tool" in str(e.value), str(e.value)
    # a template a little off the known one (Gemma 3 with one newline after the system prompt) is not guessed at
    bent = (TEMPLATES / "gemma-3-4b-it.jinja").read_text().replace("'\n\n'", "'\n'")
    ours, _ = special_tokenizer(tmp_path, bent)
    assert ours.chat_format is None and ours.eos_id == ours._tok.token_to_id("<eos>")
    with pytest.raises(MiniftError) as e:
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value) and "Gemma" in str(e.value)


def test_templates_respelled_are_the_same_template(tmp_path):
    """The fingerprint is of the canonical form: other quotes, whitespace and trim marks give the same format."""
    gemma2 = (TEMPLATES / "gemma-2-2b-it.jinja").read_text()
    respelled = gemma2.replace("{% for", "\n{%- for").replace("'<start_of_turn>model\\n'", '"<start_of_turn>model\\n"')
    assert respelled != gemma2
    ours, _ = special_tokenizer(tmp_path, respelled)
    assert ours.chat_format.name == "Gemma 2"
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
