"""Text <-> token ids, a thin layer over the Hugging Face `tokenizers` library.

Writing a WordPiece or byte-level BPE tokenizer is a lesson of its own; here we only load the
`tokenizer.json` that ships with a checkpoint, so our ids are exactly the ones the model was trained on.
What we add: truncation per call, padding to the longest row of the batch, tensors out, and chat
formatting for instruction-tuned decoders (ChatML, Qwen's and Gemma's templates, written without Jinja).

    tok = Tokenizer.from_file("weights/minilm")
    batch = tok(["what a day", "meh"], max_length=64)   # input_ids, attention_mask, token_type_ids
    prompt = Tokenizer.from_file("weights/smollm2").apply_chat_template([{"role": "user", "content": "hi"}])
"""
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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
        self.bos_token = _content(config.get("bos_token")) or ""  # what a template's {{ bos_token }} writes
        # A chat model's answer ends where its turn ends: ChatML's <|im_end|> (SmolLM2's and Qwen's files name it
        # EOS anyway), Gemma's <end_of_turn> (its <eos> ends a document). The instruction job trains that token
        # after each answer and generation stops at it.
        self.chat_format = chat_format(self.chat_template) if isinstance(self.chat_template, str) else None
        turn_end = _first_id(tok, [self.chat_format.end_of_turn]) if self.chat_format is not None else None
        self.eos_id = turn_end if turn_end is not None else self.eos_id

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
        if self.chat_format is None:
            raise MiniftError("the chat template is not one minift writes (ChatML, Qwen2.5, Qwen3, Gemma 2 and 3): "
                              "format the prompt yourself with the model's own tags")
        check_messages(messages)
        return self.chat_format.write(messages, add_generation_prompt, self.chat_format, self.bos_token)

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
# Chat templates. A checkpoint ships its template as Jinja code. We do not run Jinja: we recognise the
# templates we know and write their text directly. ChatML (SmolLM2; Qwen2.5 with its tools branch; Qwen3
# with its "thinking" block) and Gemma's turns:
#
#     <|im_start|>system\nYou are a helpful AI assistant ...<|im_end|>\n     (only if the template adds one)
#     <|im_start|>user\nWhat is the capital of France?<|im_end|>\n
#     <|im_start|>assistant\n                                                 (the generation prompt)
#
#     <bos><start_of_turn>user\nBe terse.\n\nWhat is the capital of France?<end_of_turn>\n
#     <start_of_turn>model\n                                                 (Gemma: the system folded in)
#
# To recognise one, the template is put in a canonical form. Canonical: inside each {% %} / {{ }} tag,
# whitespace outside quotes and the '-' trim marks are dropped and string literals are re-quoted with their
# escapes resolved ("\\n" in the source and a real newline compare equal). Text between tags is output by
# Jinja, so it must be whitespace that Jinja removes as transformers runs it (trim_blocks: the newline after
# a {% %} tag; lstrip_blocks: the indent before one; '-' marks: all of it), or the template is not one we
# know. ChatML is compared with its pattern, which may carry any default system prompt for conversations that
# do not start with one (SmolLM2's does); the longer templates by the sha256 of their canonical form
# (KNOWN_TEMPLATES: each one's text is in tests/chat_templates/, rendered there by Jinja and compared).

CHATML_LOOP = ("{{'<|im_start|>'+message['role']+'\n'+message['content']+'<|im_end|>'+'\n'}}{%endfor%}"
               "{%ifadd_generation_prompt%}{{'<|im_start|>assistant\n'}}{%endif%}")
CHATML = "{%formessageinmessages%}" + CHATML_LOOP
CHATML_WITH_SYSTEM = re.compile(
    re.escape("{%formessageinmessages%}{%ifloop.firstandmessages[0]['role']!='system'%}"
              "{{'<|im_start|>system\n") + "(.*)" + re.escape("<|im_end|>\n'}}{%endif%}" + CHATML_LOOP),
    re.DOTALL)
STRING = r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\""""  # a quoted literal: a "}}" inside it is text, not the tag's end
JINJA_TAG = re.compile(rf"\{{#.*?#\}}|\{{\{{(?:{STRING}|.)*?\}}\}}|\{{%(?:{STRING}|.)*?%\}}", re.DOTALL)
JINJA_PIECES = re.compile(rf"({STRING})|(\s+)|([^'\"\s]+)", re.DOTALL)
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def canonical_tag(tag: str) -> str:
    """One tag without whitespace outside quotes or '-' marks; literals as '...' with escapes resolved."""
    out = []
    for literal, space, code in JINJA_PIECES.findall(tag):
        if code:
            out.append(code)
        elif not space:
            inside = re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), literal[1:-1])
            out.append("'" + inside + "'")
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


def fingerprint(template: str):
    """The first 16 hex digits of the sha256 of the template's canonical form (None: it outputs text of its own)."""
    canon = canonical_jinja(template)
    return None if canon is None else hashlib.sha256(canon.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ChatFormat:
    """A chat template minift writes: its name, its writer, the token that ends a turn, a default system prompt."""
    name: str
    write: Callable  # (messages, add_generation_prompt, format, bos_token) -> text
    end_of_turn: str = "<|im_end|>"
    system: str | None = None  # a ChatML template's default system prompt, put first when no system turn is


def chat_format(template: str):
    """The ChatFormat of a template minift knows, else None."""
    canon = canonical_jinja(template)
    if canon == CHATML:
        return ChatFormat("ChatML", format_chatml)
    if m := CHATML_WITH_SYSTEM.fullmatch(canon or ""):
        return ChatFormat("ChatML", format_chatml, system=m.group(1))
    return KNOWN_TEMPLATES.get(fingerprint(template))


def check_messages(messages):
    if not isinstance(messages, (list, tuple)) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise MiniftError("a conversation is a non-empty list of {'role': ..., 'content': ...} dicts with "
                          "string values, e.g. [{'role': 'user', 'content': 'hi'}]")


def format_chatml(messages, add_generation_prompt=True, fmt=None, bos_token=""):
    """ChatML text for a conversation; fmt.system is put first when the first message is not a system one."""
    system = fmt.system if fmt is not None else None
    text = ""
    if system is not None and messages[0]["role"] != "system":
        text += f"<|im_start|>system\n{system}<|im_end|>\n"
    for m in messages:
        text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def without_tools(messages, name):
    """Qwen's templates have a branch for tool calls and tool results: minift writes none, and refuses them."""
    for m in messages:
        if m["role"] not in ("system", "user", "assistant") or "tool_calls" in m:
            what = f"a {m['role']!r} turn" if "tool_calls" not in m else "an assistant turn with tool_calls"
            raise MiniftError(f"{what}: minift writes {name}'s system, user and assistant turns, not its tool calls "
                              "and results; give the conversation without tools")
    return messages


def format_qwen2_5(messages, add_generation_prompt=True, fmt=None, bos_token=""):
    """Qwen2.5: ChatML with a default system prompt ("You are Qwen, created by Alibaba Cloud ...")."""
    return format_chatml(without_tools(messages, fmt.name), add_generation_prompt, fmt)


def format_qwen3(messages, add_generation_prompt=True, fmt=None, bos_token=""):
    """Qwen3: ChatML without a default system prompt; an assistant turn after the last user turn is written with
    its reasoning in a <think> block (empty for the last turn when it has none). A content "<think>r</think>a" is
    split into reasoning r and answer a; earlier turns keep the answer only."""
    def query(m):  # a user turn that is not a tool's result wrapped as one
        return m["role"] == "user" and not (m["content"].startswith("<tool_response>")
                                            and m["content"].endswith("</tool_response>"))

    last_user = max((i for i, m in enumerate(without_tools(messages, fmt.name)) if query(m)), default=len(messages) - 1)
    text = ""
    for i, m in enumerate(messages):
        content, reasoning = m["content"], ""
        if m["role"] != "assistant":
            text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
            continue
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        if i > last_user and (i == len(messages) - 1 or reasoning):
            reasoning, content = reasoning.strip("\n"), content.lstrip("\n")
            content = f"<think>\n{reasoning}\n</think>\n\n{content}"
        text += f"<|im_start|>assistant\n{content}<|im_end|>\n"
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def format_gemma(messages, add_generation_prompt=True, fmt=None, bos_token=""):
    """Gemma: BOS, then turns <start_of_turn>user|model\\n{content, trimmed}<end_of_turn>\\n, user first and then
    alternating. Gemma 3 folds a first system message into the first user turn ("system\\n\\nuser"); Gemma 2's
    template refuses one."""
    prefix = ""
    if messages[0]["role"] == "system":
        if fmt.name == "Gemma 2":
            raise MiniftError("Gemma 2's chat template has no system turn: put the instructions in the first user turn")
        prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    text = bos_token
    for i, m in enumerate(messages):
        if (m["role"] == "user") != (i % 2 == 0):
            raise MiniftError(f"{fmt.name}'s turns alternate user, assistant, user ... (a system turn may come first): "
                              f"turn {i + 1} is {m['role']!r}")
        role = "model" if m["role"] == "assistant" else m["role"]
        text += f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{m['content'].strip()}<end_of_turn>\n"
    return text + ("<start_of_turn>model\n" if add_generation_prompt else "")


QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
KNOWN_TEMPLATES = {  # fingerprint(template) -> its format; the templates are in tests/chat_templates/
    "11d2c7b31bfbace4": ChatFormat("Qwen2.5", format_qwen2_5, system=QWEN_SYSTEM),  # Qwen2.5(-Coder) Instruct
    "224333add773e5e4": ChatFormat("Qwen2.5", format_qwen2_5, system=QWEN_SYSTEM),  # the same; its tools example escaped
    "392fba51aaa5c5fa": ChatFormat("Qwen3", format_qwen3),
    "90d75b650cc1f064": ChatFormat("Qwen3", format_qwen3),  # a revision: a message's content may be a list
    "f99801403d8de24e": ChatFormat("Gemma 2", format_gemma, end_of_turn="<end_of_turn>"),
    "68c7cec5642253d4": ChatFormat("Gemma 3", format_gemma, end_of_turn="<end_of_turn>"),
}
