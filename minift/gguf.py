"""GGUF, llama.cpp's one-file model format: read it, dequantize it, write a Hugging Face folder.

A GGUF file is three parts back to back, little-endian throughout:

    header     b"GGUF", version (u32), number of tensors (u64), number of metadata pairs (u64)
    metadata   key -> typed value: the config ("llama.block_count" ...), the tokenizer's vocabulary,
               merges and special ids, the chat template
    tensors    a table (name, shape, type, offset), then the tensors' bytes, aligned to 32 bytes

Weights are usually quantized: cut into blocks of 32 or 256 numbers that share fp16 scales, each number
kept in 2 to 8 bits (gguf_blocks.py draws every layout). We turn every tensor back into float32, undo
llama.cpp's reordering of the q and k rows (and the one it adds to Gemma's norms), and write config.json,
model.safetensors, tokenizer.json and tokenizer_config.json, so the rest of minift (and transformers) reads the
model like any other checkpoint; and the file's blocks as they are (gguf_blocks.safetensors, for QLoRA on them):

    convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "weights/smollm2")

Only numpy here: the `gguf` package is the tests' reference, never imported by minift.
"""
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from safetensors.numpy import save_file
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm

from .errors import MiniftError
from .files import existing_folder, new_folder, replace_folder
from .gguf_blocks import BLOCKS, BLOCKS_FILE, DEQUANTIZE, TYPE_NAMES
from .models import gemma, llama

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 (2023) stored counts as u32; nothing current writes it
DEFAULT_ALIGNMENT = 32

# ---------------------------------------------------------------------------------------------------
# Metadata values. Each value is tagged with its type id; fixed-size types map to a struct format,
# which numpy also understands (np.dtype("<u4")), so one table serves single values and arrays.

SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                  10: "<Q", 11: "<q", 12: "<d"}  # u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64
STRING, ARRAY = 8, 9
U32, U64 = 4, 10


class Cursor:
    """Walks the header and metadata. Every read checks that the bytes are there, so a cut-off file
    gives one clear line instead of a numpy or struct traceback."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        """Claim the next n bytes; return where they start."""
        if n < 0 or self.pos + n > len(self.buf):
            raise MiniftError(f"{self.path} is truncated ({len(self.buf)} bytes, the header needs more): "
                              f"the download or copy stopped early; fetch the file again")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, vtype: int):
        fmt = SCALAR_FORMATS[vtype]
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(U64)
        start = self.take(n)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        """One metadata value: a number, bool, string, or a list of them (arrays may nest)."""
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            item_type, count = self.scalar(U32), self.scalar(U64)
            if item_type in SCALAR_FORMATS:  # numbers in bulk (49,152 token types): one numpy read
                dtype = np.dtype(SCALAR_FORMATS[item_type])
                start = self.take(dtype.itemsize * count)
                return np.frombuffer(self.buf, dtype, count, start).tolist()
            return [self.value(item_type) for _ in range(count)]
        if vtype in SCALAR_FORMATS:
            return self.scalar(vtype)
        raise MiniftError(f"{self.path}: metadata value of unknown type {vtype} at byte {self.pos}: "
                          f"the file is corrupt or from a newer GGUF version; re-export it")


# ---------------------------------------------------------------------------------------------------
# Tensor types: their block layouts and dequantizers are in gguf_blocks.py.

SUPPORTED = ", ".join(TYPE_NAMES[t] for t in DEQUANTIZE)
GGML_F32 = 0  # float32: the one type a converted folder does not keep the bytes of (they are model.safetensors')


def type_name(ggml_type: int) -> str:
    return TYPE_NAMES.get(ggml_type, f"unknown type {ggml_type}")


# ---------------------------------------------------------------------------------------------------
# The file

@dataclass
class TensorInfo:
    name: str
    shape: tuple  # numpy order, (rows, cols): GGUF lists dimensions innermost first, we reverse them
    type: int     # a TYPE_NAMES key
    offset: int   # where its bytes start, counted from the start of the file


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict   # key -> int, float, bool, str or list
    tensors: dict    # name -> TensorInfo, in file order
    buf: np.ndarray  # the whole file, memory-mapped (uint8): tensors are read from it on demand


def read_gguf(path) -> GGUFFile:
    """Parse header, metadata and tensor table; tensor bytes stay on disk until dequantize() asks."""
    path = Path(path)
    if not path.is_file():
        raise MiniftError(f"{path}: no such file; pass the path of a .gguf file")
    if path.stat().st_size < 4:
        raise MiniftError(f"{path} is {path.stat().st_size} bytes, too short to be a GGUF file; fetch it again")
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(buf[:4]) != MAGIC:
        raise MiniftError(f"{path} is not a GGUF file (it starts with {bytes(buf[:4])!r}, not b'GGUF'); "
                          f"pass a llama.cpp .gguf file")
    cur = Cursor(buf, path)
    cur.take(4)
    version = cur.scalar(U32)
    if version not in VERSIONS:
        raise MiniftError(f"{path}: GGUF version {version}, minift reads versions 2 and 3 (little-endian); "
                          f"re-export it with a current llama.cpp")
    n_tensors, n_kv = cur.scalar(U64), cur.scalar(U64)
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar(U32))
    tensors = {}
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar(U64) for _ in range(cur.scalar(U32))]
        ggml_type, offset = cur.scalar(U32), cur.scalar(U64)
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type, offset)
    # The tensors' bytes start at the next multiple of the alignment; offsets count from there.
    align = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    data_start = -(-cur.pos // align) * align
    for t in tensors.values():
        t.offset += data_start
        if t.type in BLOCKS and t.offset + tensor_nbytes(t) > len(buf):
            raise MiniftError(f"{path} is truncated: tensor {t.name} ends at byte {t.offset + tensor_nbytes(t)}, "
                              f"the file has {len(buf)}; the download or copy stopped early, fetch it again")
    return GGUFFile(path, version, metadata, tensors, buf)


def tensor_nbytes(t: TensorInfo) -> int:
    block, nbytes = BLOCKS[t.type]
    n = int(np.prod(t.shape))
    if n % block:
        raise MiniftError(f"tensor {t.name} has {n} values, not a whole number of {type_name(t.type)} "
                          f"blocks of {block}: the file is corrupt")
    return n // block * nbytes


def check_supported(t: TensorInfo):
    if t.type not in DEQUANTIZE:
        raise MiniftError(f"tensor {t.name} is {type_name(t.type)}, minift dequantizes {SUPPORTED}; take a "
                          f"file in one of those (or re-quantize it with llama.cpp's llama-quantize)")


def dequantize(gguf: GGUFFile, name: str) -> np.ndarray:
    """Tensor `name` as a float32 numpy array of its (rows, cols) shape."""
    t = gguf.tensors[name]
    check_supported(t)
    return DEQUANTIZE[t.type](raw_rows(gguf, name).reshape(-1)).reshape(t.shape)


def raw_rows(gguf: GGUFFile, name: str) -> np.ndarray:
    """Tensor `name`'s bytes as they are in the file, uint8 of shape (rows, bytes a row): every row is whole blocks."""
    t = gguf.tensors[name]
    return np.asarray(gguf.buf[t.offset:t.offset + tensor_nbytes(t)]).reshape(int(np.prod(t.shape[:-1])), -1)


# ---------------------------------------------------------------------------------------------------
# Architectures: which family turns the metadata into config.json, tensor names, the q/k row order

# general.architecture -> the family module, whose GGUF section holds its config_from_gguf, its tensor names, the
# q/k row order and how its norms are stored
ARCHITECTURES = {"llama": llama, "qwen2": llama, "qwen3": llama, "gemma2": gemma, "gemma3": gemma}


def family_of(meta: dict):
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise MiniftError(f"the GGUF's architecture is {arch!r}; minift converts {', '.join(ARCHITECTURES)} files "
                          f"(SmolLM2, TinyLlama, Llama 2/3, Qwen2/2.5, Qwen3, Gemma 2/3 ...)")
    return ARCHITECTURES[arch]


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q_proj / k_proj rows (n_heads: the kv heads for k_proj).

    RoPE rotates pairs of numbers in each head. Hugging Face pairs row j with row j + half
    (`rotate_half`); llama.cpp pairs neighbours, so its converter interleaves the two halves of each
    head: HF rows (0, half, 1, half+1, ...) come out as (0, 1, 2, 3, ...). Here we read each head as
    (half, 2) and transpose it back to (2, half)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise MiniftError(f"a q/k projection has {rows} rows, not a multiple of 2 x {n_heads} heads: "
                          f"the head counts in the file's metadata do not match its tensors")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


ROPE_FREQS = "rope_freqs.weight"  # Llama 3's rope scaling: read into config.json, not a weight


def hf_name(name: str, family=llama) -> str:
    """llama.cpp's tensor name -> the Hugging Face key (LlamaForCausalLM, Qwen2ForCausalLM, Gemma3ForCausalLM ...)
    by the family's GGUF_TOP_NAMES and GGUF_LAYER_NAMES."""
    if name in family.GGUF_TOP_NAMES:
        return family.GGUF_TOP_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in family.GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{family.GGUF_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise MiniftError(f"tensor {name} has no place in a {family.__name__.split('.')[-1]}-family model (mixtures of "
                      f"experts are not supported); convert a dense Llama, Qwen or Gemma GGUF")


# ---------------------------------------------------------------------------------------------------
# The tokenizer: the vocabulary and merges are in the metadata; how text is split before BPE is named
# by tokenizer.ggml.pre, and we rebuild that split with the `tokenizers` library.

def byte_level():
    # GPT-2's split (words, numbers, punctuation, spaces), then bytes -> printable characters (Ġ = space)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def split_then_bytes(pattern: str):
    # llama.cpp's regex for this vocabulary, each match a piece; then bytes -> printable characters
    return lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# GPT-2's split with its contractions any case, letters with one leading non-letter, newlines kept together;
# numbers one digit at a time (Qwen2) or up to three (Llama 3)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PRE_TOKENIZERS = {
    "gpt-2": byte_level,
    # SmolLM2 (and StarCoder): every digit on its own first, then as GPT-2
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level()]),
    "qwen2": split_then_bytes(QWEN2_SPLIT),
    "llama-bpe": split_then_bytes(LLAMA3_SPLIT),  # Llama 3
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values: special tokens, added plain tokens
GEMMA = ("gemma", "gemma2", "gemma3")


def gguf_tokenizer(meta: dict) -> tokenizers.Tokenizer:
    """The file's tokenizer as a `tokenizers` one: byte-level BPE ("gpt2") or SentencePiece ("llama"), then
    its special and added tokens and the BOS (EOS) it puts around every text."""
    kind, tokens = meta.get("tokenizer.ggml.model"), meta["tokenizer.ggml.tokens"]
    if kind == "gpt2":
        tok = byte_level_bpe(meta)
    elif kind == "llama":
        tok = sentencepiece_bpe(meta)
    else:
        raise MiniftError(f"the GGUF's tokenizer is {kind!r}; minift rebuilds byte-level BPE ('gpt2') and "
                          f"SentencePiece ('llama') ones")
    types = meta.get("tokenizer.ggml.token_type", [])
    # Kept whole in any text (never split by BPE); specials are also dropped by decode(skip_special_tokens).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    vocab = tok.get_vocab()  # a Gemma token respelled by sentencepiece_bpe is reached through the merges instead
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])
    bos, eos = ([tokens[meta[f"tokenizer.ggml.{which}_token_id"]]] if adds(meta, which) else [] for which in ("bos", "eos"))
    if bos or eos:  # Llama 2, Gemma: every text starts with BOS
        tok.post_processor = processors.TemplateProcessing(
            single=bos + ["$A"] + eos, pair=bos + ["$A"] + eos + bos + ["$B"] + eos,
            special_tokens=[(t, vocab[t]) for t in bos + eos])
    return tok


def adds(meta, which) -> bool:
    """Does the tokenizer put BOS (EOS) around every text? A SentencePiece file that does not say adds BOS."""
    default = which == "bos" and meta.get("tokenizer.ggml.model") == "llama"
    has_id = f"tokenizer.ggml.{which}_token_id" in meta
    return has_id and bool(meta.get(f"tokenizer.ggml.add_{which}_token", default))


def byte_level_bpe(meta: dict) -> tokenizers.Tokenizer:
    """GPT-2's kind: text split by a regex (tokenizer.ggml.pre), each piece as bytes, the file's merges."""
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise MiniftError(f"the GGUF's pre-tokenizer is {pre!r}; minift knows {', '.join(PRE_TOKENIZERS)} "
                          f"(another split would give the model ids it was not trained on)")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise MiniftError("the GGUF's vocabulary lists a token twice: the file is corrupt; re-export it")
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def sentencepiece_bpe(meta: dict) -> tokenizers.Tokenizer:
    """SentencePiece's BPE (Llama 2, TinyLlama, Mistral, Gemma), as llama.cpp's llm_tokenizer_spm runs it.

    Spaces are written "▁" (and, unless tokenizer.ggml.add_space_prefix is false, as Gemma's is, one is put
    before the text). The text is cut into characters, and the adjacent pair whose join is the best-scored
    token is joined, again and again. A character not in the vocabulary becomes its UTF-8 bytes, tokens
    <0x00> .. <0xFF> (byte fallback). The file has no merges list: merges_by_score writes one."""
    tokens = list(meta["tokenizer.ggml.tokens"])
    gemma = meta.get("general.architecture") in GEMMA
    if gemma:  # Gemma stores its runs of spaces as real spaces, which never meet the "▁"-written text
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = {token: i for i, token in enumerate(tokens)}
    # Gemma's scores are -1000 for its added tokens, though they join first: its file order is the rank
    scores = [-i for i in range(len(tokens))] if gemma else meta["tokenizer.ggml.scores"]
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges_by_score(vocab, dict(zip(tokens, scores))),
                                          unk_token=tokens[unk] if unk is not None else None,
                                          fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        steps.append(decoders.Strip(" ", 1, 0))  # the space we put before the text
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(steps)
    return tok


def merges_by_score(vocab: dict, score: dict) -> list:
    """SentencePiece joins the pair whose join scores best; a BPE model joins the pair ranked first in its
    merges. So: every way to cut a token into two tokens of the vocabulary, ranked by the token's score
    (ties: the longer left part first), the same list transformers' GGUF loader builds."""
    merges = []
    for token, token_score in score.items():
        cuts = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        merges += [(left, right, token_score) for left, right in sorted(cuts, key=lambda c: (vocab[c[0]], vocab[c[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: equal keys keep their order
    return [(left, right) for left, right, _ in merges]


def tokenizer_config(meta: dict, default_template=None) -> dict:
    """tokenizer_config.json: the special tokens by name, the BOS/EOS flags and the chat template (the file's, else
    default_template)."""
    tokens = meta["tokenizer.ggml.tokens"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": adds(meta, "bos"), "add_eos_token": adds(meta, "eos"),
              "model_max_length": meta.get(f"{meta.get('general.architecture')}.context_length")}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and 0 <= i < len(tokens):
            config[name] = tokens[i]
    template = meta.get("tokenizer.chat_template", default_template)
    if template is not None:
        config["chat_template"] = template
    return config


# ---------------------------------------------------------------------------------------------------
# GGUF -> Hugging Face folder

def convert_gguf(gguf_path, out_dir) -> Path:
    """Write config.json, model.safetensors (fp32, HF names), tokenizer.json and tokenizer_config.json
    for a llama, qwen2, qwen3, gemma2 or gemma3 GGUF into out_dir, a new or empty folder; and gguf_blocks.safetensors,
    every matrix the file did not hold in F32 as its own bytes (uint8 rows, HF names, their types in the metadata), for
    QLoRA on them (quantize.py, kind "source"). Everything is written to out_dir.new first and swapped in whole
    (files.replace_folder), so an interrupted conversion leaves out_dir as it was."""
    out_dir = Path(out_dir)
    target = out_dir.resolve()  # "." and ".." get a name to put ".new" after; a link is followed, not replaced
    check_out_dir(target)  # before reading a 100 MB file: a wrong folder name costs nothing
    gguf = read_gguf(gguf_path)
    meta, arch = gguf.metadata, gguf.metadata.get("general.architecture")
    family = family_of(meta)  # everything that can be refused is refused before any work
    names = {name: hf_name(name, family) for name in gguf.tensors if name != ROPE_FREQS}
    for t in gguf.tensors.values():
        check_supported(t)
    rope_freqs = dequantize(gguf, ROPE_FREQS) if ROPE_FREQS in gguf.tensors else None
    config = family.config_from_gguf(meta, {n: t.shape for n, t in gguf.tensors.items()}, arch, rope_freqs)
    tok, tok_config = gguf_tokenizer(meta), tokenizer_config(meta, family.GGUF_CHAT_TEMPLATES.get(arch))
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tmp = new_folder(target)
    try:
        weights, blocks, types = {}, {}, {}
        for name in tqdm(names, desc=f"dequantizing {gguf.path.name}", unit="tensor"):
            w, raw = dequantize(gguf, name), raw_rows(gguf, name)
            part = name.split(".")[-2]  # blk.3.attn_q.weight -> attn_q
            if part in heads and arch in family.GGUF_PERMUTED_QK:  # weights and biases alike; whole rows of blocks
                w, raw = unpermute(w, heads[part]), unpermute(raw, heads[part])
            if name.endswith("norm.weight"):
                w = w - np.float32(family.GGUF_NORM_SHIFT)  # Gemma's are stored plus one
            weights[names[name]] = np.ascontiguousarray(w)
            if w.ndim == 2 and gguf.tensors[name].type != GGML_F32:
                blocks[names[name]], types[names[name]] = np.ascontiguousarray(raw), TYPE_NAMES[gguf.tensors[name].type]
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del weights
        save_file(blocks, str(tmp / BLOCKS_FILE), metadata={"gguf_types": json.dumps(types)})  # one key: the same bytes
        umask = os.umask(0)
        os.umask(umask)
        for file in ("model.safetensors", BLOCKS_FILE):
            os.chmod(tmp / file, 0o666 & ~umask)  # safetensors creates them 0600; like the others
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
        tok.save(str(tmp / "tokenizer.json"))
        replace_folder(tmp, target)  # a missing out_dir appears whole; an empty one is swapped out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless the conversion failed midway
    return out_dir


def check_out_dir(out_dir: Path):
    """Refuse a folder that holds files: converting into another checkpoint would overwrite it file by
    file and leave its other files mixed in with ours."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MiniftError(f"{out_dir} is a file, not a folder: convert into a new or empty folder")
    folder = existing_folder(out_dir)  # or the out_dir.old that a crash in replace_folder left: a checkpoint too
    held = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if held:
        few = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise MiniftError(f"{folder} already holds files ({few}): convert into a new or empty folder, "
                          f"or delete it first")
