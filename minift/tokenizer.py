"""Text <-> token ids, a thin layer over the Hugging Face `tokenizers` library.

Writing a WordPiece or byte-level BPE tokenizer is a lesson of its own; here we only load the
`tokenizer.json` that ships with a checkpoint, so our ids are exactly the ones the model was trained on.
What we add: truncation per call, padding to the longest row of the batch, tensors out, and chat
formatting (ChatML) for instruction-tuned decoders.

    tok = Tokenizer.from_file("weights/minilm")
    batch = tok(["what a day", "meh"], max_length=64)   # input_ids, attention_mask, token_type_ids
    prompt = Tokenizer.from_file("weights/smollm2").apply_chat_template([{"role": "user", "content": "hi"}])
"""
import json
import re
from pathlib import Path

import tokenizers
import torch

from .batching import pad
from .errors import MiniftError


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, config=None, chat_template=None):
        """config: the tokenizer_config.json beside tokenizer.json, if any. It names the special tokens
        (SmolLM2: eos and pad are <|im_end|>) and may carry the chat template."""
        self._tok = tok
        config = config or {}
        # A tokenizer.json may carry its own padding/truncation (MiniLM's pads every row to 128).
        # We switch both off and decide per call, so nothing hidden changes the lengths.
        tok.no_padding()
        tok.no_truncation()
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = _first_id(tok, [_content(config.get("bos_token"))])
        self.eos_id = _first_id(tok, (_content(config.get("eos_token")), "<|endoftext|>", "[SEP]", "</s>"))
        # GPT-2 has no pad token, so we pad with its end-of-text id. Any id would do: the attention
        # mask hides pad positions and their labels are -100, so the model never learns from them.
        pad = _first_id(tok, (_content(config.get("pad_token")), "[PAD]", "<pad>"))
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        # BERT-style: the post-processor wraps a text as [CLS] text [SEP], and the model also takes
        # token_type_ids (which sentence of a pair each token is in; all 0 for one text).
        self.num_special = tok.num_special_tokens_to_add(is_pair=False)
        self.has_token_types = self.num_special > 0
        self.chat_template = chat_template or _template_of(config)

    @classmethod
    def from_file(cls, path):
        """Load a tokenizer.json file, or the tokenizer.json inside a checkpoint folder, with the
        tokenizer_config.json (and chat_template.jinja, as transformers 5 saves it) beside it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise MiniftError(f"{path}: no tokenizer.json there; pass a tokenizer.json file or a "
                              f"checkpoint folder that holds one")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for a broken file
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MiniftError(f"{path}: not a tokenizer.json the tokenizers library can read "
                              f"({first_line}); re-download it") from None
        config, jinja = path.with_name("tokenizer_config.json"), path.with_name("chat_template.jinja")
        try:
            config = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        except json.JSONDecodeError as e:
            raise MiniftError(f"{config}: not valid JSON ({e}); fix or delete it") from None
        return cls(tok, config, jinja.read_text(encoding="utf-8") if jinja.is_file() else None)

    def apply_chat_template(self, messages, add_generation_prompt=True) -> str:
        """A conversation [{"role": "user", "content": "..."}, ...] as the prompt text the model was
        tuned on. With add_generation_prompt the text ends where the assistant's answer begins."""
        if self.chat_template is None:
            raise MiniftError("this tokenizer has no chat template (tokenizer_config.json has no "
                              "chat_template): format the prompt yourself, or load an instruction-tuned model")
        system = chatml_default_system(self.chat_template)  # refuses what is not ChatML
        return format_chatml(messages, system, add_generation_prompt)

    def encode(self, text, add_special_tokens=True):
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts, add_special_tokens=True, max_length=None):
        """Ids for many texts at once (the library runs them in parallel); no padding."""
        return [e.ids for e in self._encodings(texts, add_special_tokens, max_length)]

    def encode_words(self, sentences, max_length=None):
        """Texts already cut into words (a CoNLL file's tokens) -> (ids, word_ids) for each: word_ids[i] is the
        index of the word token i comes from, None for a special token. A word may become several tokens
        (WordPiece's ##pieces) or none (a character the normalizer drops); truncation as in encode_batch."""
        encodings = self._encodings([list(words) for words in sentences], True, max_length, is_pretokenized=True)
        return [(e.ids, e.word_ids) for e in encodings]

    def _encodings(self, texts, add_special_tokens, max_length, is_pretokenized=False):
        if max_length is None:
            self._tok.no_truncation()
        else:
            if max_length < self.num_special + 1:
                raise MiniftError(f"max_length={max_length} leaves no room for text next to "
                                  f"{self.num_special} special tokens; use a larger max_length")
            # max_length counts the special tokens, so truncation cuts text and keeps the final [SEP].
            self._tok.enable_truncation(max_length)
        encodings = self._tok.encode_batch(list(texts), is_pretokenized=is_pretokenized,
                                           add_special_tokens=add_special_tokens)
        self._tok.no_truncation()
        return encodings

    def __call__(self, texts, max_length=None, padding_side="right", add_special_tokens=True):
        """Encode a batch: truncate to max_length, pad to the longest row; a dict of LongTensors."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise MiniftError("the tokenizer got an empty list of texts; pass at least one text")
        if padding_side not in ("right", "left"):
            raise MiniftError(f"padding_side={padding_side!r}; use 'right' or 'left'")
        rows = self.encode_batch(texts, add_special_tokens, max_length)
        width = max(len(r) for r in rows)  # left padding: a decoder generates right after the last real token
        batch = {"input_ids": torch.tensor([pad(r, self.pad_id, width, padding_side) for r in rows]),
                 "attention_mask": torch.tensor([pad([1] * len(r), 0, width, padding_side) for r in rows])}
        if self.has_token_types:
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])  # one text: segment 0
        return batch

    def decode(self, ids, skip_special_tokens=True):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i):
        return self._tok.id_to_token(i)


def _first_id(tok, names):
    """The id of the first of `names` that is in the vocabulary, else None."""
    for name in names:
        i = tok.token_to_id(name) if name is not None else None
        if i is not None:
            return i
    return None


def _content(token):
    """A special token as tokenizer_config.json writes it: "<|im_end|>" or {"content": "<|im_end|>", ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _template_of(config):
    """The chat template in a tokenizer_config.json: a string, or a list of named ones (take "default")."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template


# ---------------------------------------------------------------------------------------------------
# Chat templates. A checkpoint ships its template as Jinja code. We do not run Jinja: we recognise
# ChatML, the format SmolLM2 (and Qwen, among others) was tuned on, and write it directly:
#
#     <|im_start|>system\nYou are a helpful AI assistant ...<|im_end|>\n     (only if the template adds one)
#     <|im_start|>user\nWhat is the capital of France?<|im_end|>\n
#     <|im_start|>assistant\n                                                 (the generation prompt)
#
# To recognise it, the template is put in a canonical form and compared with ChatML's, which may carry
# a default system prompt for conversations that do not start with one (SmolLM2's does). Canonical:
# inside each {% %} / {{ }} tag, whitespace outside quotes and the '-' trim marks are dropped and string
# literals are re-quoted with their escapes resolved ("\\n" in the source and a real newline compare
# equal). Text between tags is output by Jinja, so it must be whitespace that Jinja removes as
# transformers runs it (trim_blocks: the newline after a {% %} tag; lstrip_blocks: the indent before
# one; '-' marks: all of it), or the template is not the ChatML we write.

CHATML_LOOP = ("{{'<|im_start|>'+message['role']+'\n'+message['content']+'<|im_end|>'+'\n'}}{%endfor%}"
               "{%ifadd_generation_prompt%}{{'<|im_start|>assistant\n'}}{%endif%}")
CHATML = "{%formessageinmessages%}" + CHATML_LOOP
CHATML_WITH_SYSTEM = re.compile(
    re.escape("{%formessageinmessages%}{%ifloop.firstandmessages[0]['role']!='system'%}"
              "{{'<|im_start|>system\n") + "(.*)" + re.escape("<|im_end|>\n'}}{%endif%}" + CHATML_LOOP),
    re.DOTALL)
JINJA_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)
JINJA_PIECES = re.compile(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"|(\s+)|([^'"\s]+)""", re.DOTALL)
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def canonical_tag(tag: str) -> str:
    """One tag without whitespace outside quotes or '-' marks; literals as '...' with escapes resolved."""
    out = []
    for single, double, space, code in JINJA_PIECES.findall(tag):
        if code:
            out.append(code)
        elif not space:
            literal = single or double
            out.append("'" + re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), literal) + "'")
    text = "".join(out)
    return text[:2] + text[2:-2].removeprefix("-").removesuffix("-") + text[-2:]


def silent(text: str, before, after) -> bool:
    """Does Jinja (trim_blocks, lstrip_blocks) output nothing for `text` between tags before and after?"""
    if before is not None and before[-3] == "-" or after is not None and after[2] == "-":
        return not text.strip()  # a '-' mark eats the whitespace on its side
    block_before = before is not None and before[1] in "%#"
    block_after = after is not None and after[1] in "%#"
    return (text == "" or (block_before or after is None) and text == "\n"  # trim_blocks; the file's last \n
            or block_before and block_after and re.fullmatch(r"\n[ \t]*", text) is not None
            or before is None and block_after and re.fullmatch(r"[ \t]*", text) is not None)  # lstrip_blocks


def canonical_jinja(template: str):
    """The template's tags in canonical form, joined; None if it outputs any text between its tags."""
    tags, pos, before = [], 0, None
    for m in JINJA_TAG.finditer(template):
        if not silent(template[pos:m.start()], before, m.group()):
            return None
        if not m.group().startswith("{#"):  # comments output nothing
            tags.append(canonical_tag(m.group()))
        pos, before = m.end(), m.group()
    return "".join(tags) if silent(template[pos:], before, None) else None


def chatml_default_system(template: str):
    """The default system prompt of a ChatML template (None if it adds none); MiniftError if not ChatML."""
    canon = canonical_jinja(template)
    if canon == CHATML:
        return None
    m = CHATML_WITH_SYSTEM.fullmatch(canon or "")
    if m:
        return m.group(1)
    raise MiniftError("the chat template is not ChatML (<|im_start|>role\\ncontent<|im_end|>), the only "
                      "format minift writes: format the prompt yourself with the model's own tags")


def format_chatml(messages, system, add_generation_prompt=True) -> str:
    """ChatML text for a conversation; `system` is put first when the first message is not a system one."""
    if not isinstance(messages, (list, tuple)) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise MiniftError("a conversation is a non-empty list of {'role': ..., 'content': ...} dicts with "
                          "string values, e.g. [{'role': 'user', 'content': 'hi'}]")
    text = ""
    if system is not None and messages[0]["role"] != "system":
        text += f"<|im_start|>system\n{system}<|im_end|>\n"
    for m in messages:
        text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text
