"""Text <-> token ids, a thin layer over the Hugging Face `tokenizers` library.

Writing a WordPiece or byte-level BPE tokenizer is a lesson of its own; here we only load the
`tokenizer.json` that ships with a checkpoint, so our ids are exactly the ones the model was trained on.
What we add: truncation per call, padding to the longest row of the batch, and tensors out.

    tok = Tokenizer.from_file("weights/minilm")
    batch = tok(["what a day", "meh"], max_length=64)   # input_ids, attention_mask, token_type_ids
"""
from pathlib import Path

import tokenizers
import torch

from .errors import MiniftError


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer):
        self._tok = tok
        # A tokenizer.json may carry its own padding/truncation (MiniLM's pads every row to 128).
        # We switch both off and decide per call, so nothing hidden changes the lengths.
        tok.no_padding()
        tok.no_truncation()
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = _first_id(tok, ("<|endoftext|>", "[SEP]", "</s>"))
        # GPT-2 has no pad token, so we pad with its end-of-text id. Any id would do: the attention
        # mask hides pad positions and their labels are -100, so the model never learns from them.
        pad = _first_id(tok, ("[PAD]", "<pad>"))
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        # BERT-style: the post-processor wraps a text as [CLS] text [SEP], and the model also takes
        # token_type_ids (which sentence of a pair each token is in; all 0 for one text).
        self.num_special = tok.num_special_tokens_to_add(is_pair=False)
        self.has_token_types = self.num_special > 0

    @classmethod
    def from_file(cls, path):
        """Load a tokenizer.json file, or the tokenizer.json inside a checkpoint folder."""
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
        return cls(tok)

    def encode(self, text, add_special_tokens=True):
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts, add_special_tokens=True, max_length=None):
        """Ids for many texts at once (the library runs them in parallel); no padding."""
        if max_length is None:
            self._tok.no_truncation()
        else:
            if max_length < self.num_special + 1:
                raise MiniftError(f"max_length={max_length} leaves no room for text next to "
                                  f"{self.num_special} special tokens; use a larger max_length")
            # max_length counts the special tokens, so truncation cuts text and keeps the final [SEP].
            self._tok.enable_truncation(max_length)
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        self._tok.no_truncation()
        return [e.ids for e in encodings]

    def __call__(self, texts, max_length=None, padding_side="right", add_special_tokens=True):
        """Encode a batch: truncate to max_length, pad to the longest row; a dict of LongTensors."""
        if isinstance(texts, str):
            texts = [texts]
        if len(texts) == 0:
            raise MiniftError("the tokenizer got an empty list of texts; pass at least one text")
        if padding_side not in ("right", "left"):
            raise MiniftError(f"padding_side={padding_side!r}; use 'right' or 'left'")
        rows = self.encode_batch(texts, add_special_tokens, max_length)
        width = max(len(r) for r in rows)
        ids, mask = [], []
        for r in rows:
            pad = width - len(r)
            if padding_side == "right":
                ids.append(r + [self.pad_id] * pad)
                mask.append([1] * len(r) + [0] * pad)
            else:  # left padding: a decoder generates right after the last real token
                ids.append([self.pad_id] * pad + r)
                mask.append([0] * pad + [1] * len(r))
        batch = {"input_ids": torch.tensor(ids, dtype=torch.long),
                 "attention_mask": torch.tensor(mask, dtype=torch.long)}
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
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None
