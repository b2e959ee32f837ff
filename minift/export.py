"""GGUF export: a Llama, Qwen2, Qwen3 or Gemma 2/3 checkpoint folder -> one .gguf file that llama.cpp, Ollama and
LM Studio run.

This is gguf.py read backwards (its docstring has the layout). Writing needs one thing reading does not:
the tensor table comes before the tensors and gives each one's offset, so every tensor's type and byte size
is decided first (the plan), the header, metadata and table written, and then the tensors one at a time,
each starting on a multiple of 32 bytes:

    export_gguf("runs/smollm2-chat/best", "smollm2-chat.q8_0.gguf", kind="q8_0")

What goes in, as llama.cpp's own converter (convert_hf_to_gguf.py) writes it:
- tensors under llama.cpp's names (the family's GGUF_TOP_NAMES and GGUF_LAYER_NAMES, read backwards: token_embd,
  blk.N.attn_q ..., output_norm, and output unless the head is tied to the embedding); for the llama architecture
  the q and k rows reordered for llama.cpp's RoPE (`permute`, the inverse of gguf.unpermute); Gemma's norms plus
  one (GGUF_NORM_SHIFT);
- matrices in `kind`: f32, f16, or llama.cpp's blocks of 32 (q8_0, q4_0, q4_1: quantize.QuantizedWeight,
  rounded as llama.cpp rounds); a matrix whose rows are not a whole number of blocks falls back to f16, as
  the converter does. Norms and biases (1-D) stay f32 in every kind;
- the config as {arch}.* keys; the tokenizer: byte-level BPE (vocabulary, token types, merges, the pre-tokenizer's
  name) or SentencePiece (pieces, scores, token types); special ids and the chat template.
What the file cannot hold faithfully (another architecture, a classifier head, a setting llama.cpp fixes another
way, another tokenizer) is refused in one line rather than written wrong. Only numpy and struct here: the `gguf`
package is the tests' oracle. `write_modelfile` puts an Ollama Modelfile beside the file, with the chat template in
Ollama's Go template syntax.
"""
import json
import re
import struct
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import models
from tqdm import tqdm

from .checkpoints import build_model, family_of, read_config, read_safetensors
from .errors import MiniftError
from .files import atomic_write
from .gguf import (ARCHITECTURES, ARRAY, BLOCKS, DEFAULT_ALIGNMENT, MAGIC, PRE_TOKENIZERS, SCALAR_FORMATS, STRING, U32,
                   TensorInfo, read_gguf)
from .models.gemma import GEMMA_27B_LAYERS, default_layer_types
from .quantize import BLOCK, QuantizedWeight
from .tokenizer import Tokenizer, chat_format

I32, F32, BOOL = 5, 6, 7  # metadata value types (gguf.SCALAR_FORMATS; gguf.py names the u32 one)
GGML_F32, GGML_F16 = 0, 1
# kind -> (the ggml type of its matrices, general.file_type: llama.cpp's LlamaFileType, MOSTLY_* = all but 1-D)
KINDS = {"f32": (GGML_F32, 0), "f16": (GGML_F16, 1), "q8_0": (8, 7), "q4_0": (2, 2), "q4_1": (3, 3)}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # tokenizer.ggml.token_type values
# our model_type -> llama.cpp's general.architecture: the families' GGUF_MODEL_TYPES read backwards
ARCH_OF = {family.GGUF_MODEL_TYPES[arch]: arch for arch, family in ARCHITECTURES.items()}


# ---------------------------------------------------------------------------------------------------
# What to export: the checkpoint, checked

def export_gguf(model_dir, out_path, kind="f16", modelfile=False) -> Path:
    """Write the checkpoint in model_dir as a GGUF file at out_path (never over an existing file).
    kind: f32 | f16 | q8_0 | q4_0 | q4_1 for the matrices. modelfile: also write an Ollama Modelfile beside it."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    if kind not in KINDS:
        raise MiniftError(f"GGUF type {kind!r} is unknown: choose {', '.join(KINDS)} (--type)")
    for path in [out_path] + ([modelfile_path(out_path)] if modelfile else []):
        if path.exists():
            raise MiniftError(f"{path} already exists: minift does not overwrite it; delete it or choose another name")
    raw, config = checked_config(model_dir)  # everything that can be refused is refused before any work
    arch, family = ARCH_OF[config.model_type], family_of(raw)
    vocab = read_vocab(model_dir, config, arch)
    tensors = checked_tensors(model_dir, raw)
    plan, source = plan_tensors(family, tensors, kind)
    kept = [info.name for info in plan if len(info.shape) == 2 and info.type != KINDS[kind][0]]
    if kept:  # (llama.cpp's converter does the same, and says so)
        print(f"note: the rows of {len(kept)} matrices (e.g. {kept[0]}: {tensors[source[kept[0]]].shape[-1]} values) "
              f"are not whole blocks of {BLOCK}: they stay f16, not {kind}")
    meta = metadata(arch, config, vocab, kind, model_name(model_dir))
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            write_header(f, meta, plan)
            for info in tqdm(plan, desc=f"writing {out_path.name}", unit="tensor"):
                pad_to(f, DEFAULT_ALIGNMENT)
                f.write(tensor_bytes(tensors[source[info.name]], info, config, kind, family, arch))

    try:
        atomic_write(out_path, write)  # a stopped export leaves no file under the final name
    except OSError as e:
        raise MiniftError(f"could not write {out_path} ({e.strerror or e}): nothing was left under that name; free disk "
                          "space or choose another path") from None
    if modelfile:
        write_modelfile(out_path)
    return out_path


def checked_config(model_dir: Path):
    """(config.json, the family's config), refusing what llama.cpp's architecture would run differently."""
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise MiniftError(f"{model_dir} holds a LoRA adapter only: export the run's best/ folder, which is the base "
                          f"model with the adapter merged in")
    raw = read_config(model_dir)
    kind = raw.get("model_type")
    if kind not in ARCH_OF:
        raise MiniftError(f"{model_dir} holds a {kind!r} model: minift exports {', '.join(ARCH_OF)} models (SmolLM2, "
                          f"TinyLlama, Llama 2/3, Qwen2/2.5, Qwen3, Gemma 2/3 text) to GGUF, nothing else")
    if any("ForSequenceClassification" in a for a in raw.get("architectures") or []):
        raise MiniftError(f"{model_dir} holds a classifier ({raw['architectures'][0]}): GGUF runners generate text; "
                          f"export a language model (a run with task lm)")
    config = family_of(raw).Config.from_dict(raw)  # refuses mixtures of experts, other activations ...
    problem = unwritable(config)
    if problem:
        raise MiniftError(f"{model_dir}: {problem}, which llama.cpp's {ARCH_OF[kind]} architecture does not run: "
                          "it cannot be exported faithfully")
    return raw, config


# the RoPE scalings a GGUF carries as {arch}.rope.scaling.* keys, and the settings each has there
ROPE_KEYS = {"linear": {"rope_type", "factor"}, "yarn": {"rope_type", "factor", "original_max_position_embeddings"}}


def unwritable(c) -> str | None:
    """What in a config a GGUF cannot carry, or llama.cpp fixes another way, in words; None if nothing."""
    if c.rope_scaling and set(c.rope_scaling) != ROPE_KEYS.get(c.rope_scaling["rope_type"]):
        return f"RoPE scaling {c.rope_scaling} (minift writes linear, and yarn with its factor alone)"
    if c.model_type in ("gemma2", "gemma3_text"):
        arch = ARCH_OF[c.model_type]
        llama_cpp_scalar = c.hidden_size // c.num_attention_heads if c.num_hidden_layers == GEMMA_27B_LAYERS[arch] \
            else c.head_dim
        if c.query_pre_attn_scalar != llama_cpp_scalar:
            return f"query_pre_attn_scalar {c.query_pre_attn_scalar} (llama.cpp scales by head_dim, {c.head_dim})"
        if c.layer_types != default_layer_types(c.model_type, c.num_hidden_layers):
            return "layer_types other than Gemma's own pattern of local and global layers"
        if c.model_type == "gemma3_text" and (c.rope_local_base_freq != 10000.0 or c.final_logit_softcapping):
            return "a local RoPE base other than 10000, or a final soft cap, in Gemma 3"
        return None
    if c.attention_bias or c.mlp_bias:
        return "biases beyond Qwen2's q/k/v ones (attention_bias or mlp_bias)"
    if c.sliding_window is not None:
        return f"a sliding window of {c.sliding_window}"
    return None


def checked_tensors(model_dir: Path, raw: dict) -> dict:
    """The checkpoint's tensors by HF name: exactly the causal LM's, of the config's shapes, else one line naming the
    odd ones. The shapes are the model's own, built on the meta device (no memory)."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in build_model(raw, task="lm").named_parameters()}
    tensors = {k: t for k, t in read_safetensors(model_dir).items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in shapes:
        tensors.pop("lm_head.weight", None)  # a tied head saved anyway: it is the embedding
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if "score.weight" in extra:
        raise MiniftError(f"{model_dir} holds a classifier head (score.weight): export a language model instead")
    if missing or extra:
        what = "; ".join(f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                         for label, names in (("missing", missing), ("not in the model", extra)) if names)
        raise MiniftError(f"{model_dir}'s weights are not its config's causal LM ({what}): export a checkpoint "
                          f"that minift or transformers saved as a ...ForCausalLM")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise MiniftError(f"{model_dir}: {name} is {tuple(tensors[name].shape)}, config.json makes it {shape}: "
                              f"config.json does not belong to these weights")
    return tensors


def model_name(model_dir: Path) -> str:
    """general.name: the folder's name; for a run's best/ folder, the run's."""
    folder = model_dir.resolve()
    return folder.parent.name if folder.name == "best" else folder.name


# ---------------------------------------------------------------------------------------------------
# The tokenizer: tokenizer.json's byte-level BPE or SentencePiece-style BPE as GGUF's lists

def read_vocab(model_dir: Path, config, arch: str) -> dict:
    """The tokenizer.* metadata values: the model kind ("gpt2" or "llama"), tokens by id (padded to the model's
    vocab_size), their types (and scores), merges or the space rule, special ids, BOS/EOS flags, the chat template."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise MiniftError(f"{model_dir} has no tokenizer.json: a GGUF carries its tokenizer, so copy the base "
                          f"model's tokenizer.json (and tokenizer_config.json) into the folder")
    chat_template = Tokenizer.from_file(path).chat_template  # also refuses a broken tokenizer(_config).json in one line
    data = json.loads(path.read_text(encoding="utf-8"))
    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8")) if tok_config_path.is_file() else {}
    if (data.get("model") or {}).get("byte_fallback"):
        vocab = sentencepiece_vocab(data, config.vocab_size, path, arch)
    else:
        check_byte_level_bpe(data, path)
        tokens, types = token_list(data, config.vocab_size, path)
        vocab = dict(model="gpt2", tokens=tokens, types=types, merges=merge_list(data["model"].get("merges", [])),
                     pre=pre_tokenizer_name(data.get("pre_tokenizer"), path))
    vocab.update(ids=special_ids(vocab["tokens"], tok_config, config), chat_template=chat_template,
                 **special_flags(data.get("post_processor"), tok_config))
    return vocab


def check_byte_level_bpe(data: dict, path: Path):
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise MiniftError(f"{path} is a {model.get('type')} tokenizer: minift writes byte-level BPE tokenizers "
                          f"(GPT-2, SmolLM2, Llama 3 style) into GGUF only")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise MiniftError(f"{path} is a BPE tokenizer but not a byte-level one (GGUF's 'gpt2' model): it cannot "
                          f"be exported faithfully")
    if data.get("normalizer") is not None:
        raise MiniftError(f"{path} normalizes text ({data['normalizer'].get('type')}) before BPE, which GGUF's "
                          f"'gpt2' tokenizer does not: it cannot be exported faithfully")


def pre_tokenizer_name(pre: dict | None, path: Path) -> str:
    """tokenizer.ggml.pre: the name of the split that gguf.PRE_TOKENIZERS (llama.cpp's names) builds the same.
    trim_offsets changes only character offsets, never ids, so it is not compared."""
    def canonical(d):
        if isinstance(d, dict):
            return {k: canonical(v) for k, v in d.items() if k != "trim_offsets"}
        return [canonical(v) for v in d] if isinstance(d, list) else d

    for name, make in PRE_TOKENIZERS.items():
        probe = tokenizers.Tokenizer(models.BPE())
        probe.pre_tokenizer = make()
        if canonical(json.loads(probe.to_str())["pre_tokenizer"]) == canonical(pre):
            return name
    raise MiniftError(f"{path}'s pre-tokenizer ({(pre or {}).get('type')}) is not one minift can name for llama.cpp "
                      f"({', '.join(PRE_TOKENIZERS)}): another split would give the model other ids")


def looks_special(token: str) -> bool:
    return token.startswith("<|") and token.endswith("|>")  # the converter marks these control tokens too


def token_list(data: dict, vocab_size: int, path: Path, byte_level=True):
    """Tokens and their types by id. Ids the tokenizer leaves free (up to the embedding's rows) get
    [PADi] placeholders of type UNUSED, as the converter writes them."""
    by_id = {i: (token, NORMAL) for token, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens", []):
        special = added.get("special") or byte_level and looks_special(added["content"])
        by_id[added["id"]] = (added["content"], CONTROL if special else USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise MiniftError(f"{path} has token id {max(by_id)}, the model's embedding only {vocab_size} rows: "
                          f"the tokenizer belongs to another model")
    pairs = [by_id.get(i, (f"[PAD{i}]", UNUSED)) for i in range(vocab_size)]
    return [t for t, _ in pairs], [k for _, k in pairs]


def sentencepiece_vocab(data: dict, vocab_size: int, path: Path, arch: str) -> dict:
    """SentencePiece's kind (GGUF's "llama" model: Llama 2, Gemma), from a BPE with byte fallback that spells spaces
    "▁": pieces by id, their types (the <0xNN> ones BYTE) and scores. SentencePiece joins the adjacent pair whose join
    scores best, a BPE model the pair its merges rank first: a piece's score is minus the rank of the first merge that
    makes it (gguf.merges_by_score reads them back). Runs of spaces that gguf.sentencepiece_bpe respelled "▁" for
    Gemma go back to spaces."""
    check_sentencepiece(data, path)
    tokens, types = token_list(data, vocab_size, path, byte_level=False)
    types = [BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else UNKNOWN if t == data["model"].get("unk_token") and k == NORMAL
             else k for t, k in zip(tokens, types)]
    if arch.startswith("gemma"):  # its runs of spaces are user-defined tokens (llama.cpp matches them in the text)
        respelled = [len(t) > 1 and set(t) == {"▁"} for t in tokens]
        tokens = [" " * len(t) if r else t for t, r in zip(tokens, respelled)]
        types = [USER_DEFINED if r else k for k, r in zip(types, respelled)]
    merges = merge_list(data["model"].get("merges", []))
    first = {}
    for rank, merge in enumerate(merges):
        first.setdefault(merge.replace(" ", ""), rank)
    scores = [-float(first.get(t, len(merges))) for t in tokens]
    return dict(model="llama", pre="default", tokens=tokens, types=types, scores=scores,
                add_space_prefix=data.get("normalizer") is None)  # Metaspace puts the "▁" before a text


def check_sentencepiece(data: dict, path: Path):
    """The two spellings gguf.sentencepiece_bpe writes (and Gemma's own tokenizer.json): a Metaspace pre-tokenizer
    that puts "▁" before the text (llama.cpp's add_space_prefix), or a normalizer that only turns spaces into "▁"."""
    model, normalizer, pre = data.get("model", {}), data.get("normalizer"), data.get("pre_tokenizer")
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    metaspace = pre is not None and pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "first" \
        and pre.get("replacement") == "▁" and not pre.get("split")
    if model.get("type") != "BPE" or not (normalizer is None and metaspace or normalizer == replace and pre is None):
        raise MiniftError(f"{path} is a byte-fallback tokenizer minift cannot write as GGUF's SentencePiece (a BPE with "
                          f"a Metaspace pre-tokenizer, or spaces replaced by '▁'): it cannot be exported faithfully")


def merge_list(merges: list) -> list:
    """Merges as "a b" strings; tokenizers >= 0.20 writes pairs [a, b], where a space is GGUF's Ġ (U+0120)."""
    return [m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m) for m in merges]


def special_ids(tokens: list, tok_config: dict, config) -> dict:
    """bos/eos/unk/pad ids: the tokens tokenizer_config.json names, else config.json's *_token_id."""
    index = {t: i for i, t in enumerate(tokens)}
    ids = {}
    for typ, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                     ("pad", "padding_token_id")):
        name = tok_config.get(f"{typ}_token")
        name = name.get("content") if isinstance(name, dict) else name
        fallback = getattr(config, f"{typ}_token_id", None)
        i = index.get(name, fallback if isinstance(fallback, int) else None)
        if i is not None and 0 <= i < len(tokens):
            ids[key] = i
    return ids


def special_flags(post_processor: dict | None, tok_config: dict) -> dict:
    """add_bos / add_eos: what tokenizer.json's post-processor adds around a text, unless tokenizer_config.json
    says otherwise (as llama.cpp's SpecialVocab reads them). Always written, so llama.cpp guesses nothing."""
    flags = {"add_bos": False, "add_eos": False}
    pp = post_processor or {}
    for step in pp.get("processors", [pp]):
        single = step.get("single", []) if step.get("type") == "TemplateProcessing" else []
        if len(single) > 1:
            flags["add_bos"] |= "SpecialToken" in single[0]
            flags["add_eos"] |= "SpecialToken" in single[-1]
    for flag in flags:
        if isinstance(tok_config.get(f"{flag}_token"), bool):
            flags[flag] = tok_config[f"{flag}_token"]
    return flags


# ---------------------------------------------------------------------------------------------------
# Metadata

def metadata(arch: str, c, vocab: dict, kind: str, name: str) -> list:
    """(key, value, type[, item type]) in the converter's order; the family's config_from_gguf reads them back."""
    meta = [("general.architecture", arch, STRING), ("general.type", "model", STRING), ("general.name", name, STRING),
            (f"{arch}.block_count", c.num_hidden_layers, U32), (f"{arch}.context_length", c.max_position_embeddings, U32),
            (f"{arch}.embedding_length", c.hidden_size, U32), (f"{arch}.feed_forward_length", c.intermediate_size, U32),
            (f"{arch}.attention.head_count", c.num_attention_heads, U32),
            (f"{arch}.attention.head_count_kv", c.num_key_value_heads, U32),
            (f"{arch}.rope.freq_base", c.rope_theta, F32), (f"{arch}.attention.layer_norm_rms_epsilon", c.rms_norm_eps, F32),
            (f"{arch}.attention.key_length", c.head_dim, U32), (f"{arch}.attention.value_length", c.head_dim, U32),
            ("general.file_type", KINDS[kind][1], U32), (f"{arch}.vocab_size", c.vocab_size, U32),
            (f"{arch}.rope.dimension_count", c.head_dim, U32), ("general.quantization_version", 2, U32),
            ("general.alignment", DEFAULT_ALIGNMENT, U32)]
    if c.rope_scaling:  # linear or yarn (unwritable refused the rest)
        rope = c.rope_scaling
        meta += [(f"{arch}.rope.scaling.type", rope["rope_type"], STRING), (f"{arch}.rope.scaling.factor", rope["factor"], F32)]
        if "original_max_position_embeddings" in rope:
            meta.append((f"{arch}.rope.scaling.original_context_length", rope["original_max_position_embeddings"], U32))
    if arch.startswith("gemma"):
        meta.append((f"{arch}.attention.sliding_window", c.sliding_window, U32))
    if arch == "gemma2":
        meta += [(f"{arch}.attn_logit_softcapping", c.attn_logit_softcapping, F32),
                 (f"{arch}.final_logit_softcapping", c.final_logit_softcapping, F32)]
    meta += [("tokenizer.ggml.model", vocab["model"], STRING),
             ("tokenizer.ggml.pre", vocab["pre"], STRING), ("tokenizer.ggml.tokens", vocab["tokens"], ARRAY, STRING)]
    if vocab["model"] == "llama":
        meta.append(("tokenizer.ggml.scores", vocab["scores"], ARRAY, F32))
    meta.append(("tokenizer.ggml.token_type", vocab["types"], ARRAY, I32))
    if vocab["model"] == "gpt2":
        meta.append(("tokenizer.ggml.merges", vocab["merges"], ARRAY, STRING))
    meta += [(f"tokenizer.ggml.{key}", i, U32) for key, i in vocab["ids"].items()]
    meta += [("tokenizer.ggml.add_bos_token", vocab["add_bos"], BOOL),
             ("tokenizer.ggml.add_eos_token", vocab["add_eos"], BOOL)]
    if vocab["model"] == "llama":
        meta.append(("tokenizer.ggml.add_space_prefix", vocab["add_space_prefix"], BOOL))
    if vocab["chat_template"] is not None:
        meta.append(("tokenizer.chat_template", vocab["chat_template"], STRING))
    return meta


def pack_string(s: str) -> bytes:
    data = s.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def pack_value(value, vtype: int, item_type: int | None = None) -> bytes:
    """A metadata value's bytes after its type tag: a string is its length (u64) then UTF-8; an array is
    its item type (u32), its length (u64), then the items."""
    if vtype == STRING:
        return pack_string(value)
    if vtype == ARRAY:
        head = struct.pack("<IQ", item_type, len(value))
        if item_type == STRING:
            return head + b"".join(pack_string(v) for v in value)
        return head + np.asarray(value, dtype=SCALAR_FORMATS[item_type]).tobytes()
    return struct.pack(SCALAR_FORMATS[vtype], value)


# ---------------------------------------------------------------------------------------------------
# Tensors

def plan_tensors(family, tensors: dict, kind: str):
    """Every tensor's GGUF name, shape, type and offset (from the start of the data), in file order (the embedding,
    each block's tensors in the family's GGUF_LAYER_NAMES order, the final norm, the head); and {GGUF name: HF name}.
    Offsets advance by each tensor's bytes rounded up to the alignment."""
    order = {part: i for i, part in enumerate(family.GGUF_LAYER_NAMES.values())}

    def place(hf):
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
        if m is None:
            return (-1,) if hf == "model.embed_tokens.weight" else (1e9, hf != "model.norm.weight")
        return int(m.group(1)), order[m.group(2)], m.group(3)

    plan, source, offset = [], {}, 0
    for hf in sorted(tensors, key=place):
        shape = tuple(tensors[hf].shape)
        info = TensorInfo(gguf_name(hf, family), shape, tensor_type(shape, kind), offset)
        plan.append(info)
        source[info.name] = hf
        offset += -(-nbytes(info) // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
    return plan, source


def gguf_name(hf: str, family) -> str:
    """The Hugging Face key -> llama.cpp's tensor name (the inverse of gguf.hf_name)."""
    top = {theirs: ours for ours, theirs in family.GGUF_TOP_NAMES.items()}
    if hf in top:
        return top[hf]
    parts = {theirs: ours for ours, theirs in family.GGUF_LAYER_NAMES.items()}
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    return f"blk.{m.group(1)}.{parts[m.group(2)]}.{m.group(3)}"


def tensor_type(shape: tuple, kind: str) -> int:
    """1-D tensors (the norms, biases) stay f32; a matrix whose rows are not whole blocks of 32 falls back to f16
    (llama.cpp's converter does the same when its quantizer refuses the shape)."""
    matrix_type = KINDS[kind][0]
    if len(shape) == 1:
        return GGML_F32
    if matrix_type not in (GGML_F32, GGML_F16) and shape[-1] % BLOCK:
        return GGML_F16
    return matrix_type


def nbytes(info: TensorInfo) -> int:
    block, size = BLOCKS[info.type]
    return int(np.prod(info.shape)) // block * size


def permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's order of q_proj / k_proj rows (the inverse of gguf.unpermute): in each head, the HF halves
    (rows 0..half-1 and half..2*half-1, the pairs rotate_half turns together) are interleaved, so that the
    pairs RoPE turns are neighbours."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_bytes(t: torch.Tensor, info: TensorInfo, config, kind: str, family, arch: str) -> bytes:
    """One tensor's bytes as the plan says: permuted if q or k of a llama file, a Gemma norm plus one, then f32, f16
    or blocks."""
    w = t.detach().float().numpy()
    if arch in family.GGUF_PERMUTED_QK and re.search(r"attn_q\.(weight|bias)$", info.name):
        w = permute(w, config.num_attention_heads)
    elif arch in family.GGUF_PERMUTED_QK and re.search(r"attn_k\.(weight|bias)$", info.name):
        w = permute(w, config.num_key_value_heads)
    if info.name.endswith("norm.weight"):
        w = w + np.float32(family.GGUF_NORM_SHIFT)
    if info.type == GGML_F32:
        return np.ascontiguousarray(w, dtype="<f4").tobytes()
    if info.type == GGML_F16:
        return np.ascontiguousarray(w, dtype="<f2").tobytes()
    return block_bytes(QuantizedWeight.quantize(torch.from_numpy(np.ascontiguousarray(w)), kind))


def block_bytes(qw: QuantizedWeight) -> bytes:
    """QuantizedWeight's blocks in GGUF's order, block after block along each row: the fp16 scale d (and the
    fp16 minimum m, for q4_1), then the 32 int8 (q8_0) or the 16 bytes of two nibbles (q4_0, q4_1)."""
    parts = [qw.d.numpy().view(np.uint8).reshape(*qw.d.shape, 2)]  # fp16 is little-endian on every CPU torch runs on
    if qw.m is not None:
        parts.append(qw.m.numpy().view(np.uint8).reshape(*qw.m.shape, 2))
    parts.append(qw.q.numpy().view(np.uint8))
    return np.concatenate(parts, axis=-1).tobytes()


# ---------------------------------------------------------------------------------------------------
# The file

def write_header(f, meta: list, plan: list):
    """Magic, version 3, counts; the metadata; the tensor table (dims innermost first, as GGUF lists them)."""
    f.write(MAGIC + struct.pack("<IQQ", 3, len(plan), len(meta)))
    for key, value, vtype, *item_type in meta:
        f.write(pack_string(key) + struct.pack("<I", vtype) + pack_value(value, vtype, *item_type))
    for info in plan:
        dims = tuple(reversed(info.shape))
        f.write(pack_string(info.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, info.type, info.offset))


def pad_to(f, alignment: int):
    f.write(b"\0" * (-f.tell() % alignment))


# ---------------------------------------------------------------------------------------------------
# Ollama

# Ollama's Go templates. Ollama puts the Modelfile's SYSTEM first when a conversation does not start with a system
# message: that is the default system prompt of a ChatML template like SmolLM2's or Qwen2.5's. Qwen3's template is
# ChatML for a conversation that ends with a user turn (its <think> block goes after the last user turn's answer).
# Gemma's: the turns user/model, a first system message folded into the first user turn; BOS is llama.cpp's to add
# (add_bos_token), and Go templates cannot trim, so a turn's content goes in as it is.
OLLAMA_CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                 "<|im_start|>assistant\n")
OLLAMA_GEMMA = ('{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = .Content }}'
                '{{- else }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
                '{{ if $system }}{{ $system }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n{{ $system = "" }}'
                '{{- end }}{{- end }}<start_of_turn>model\n')
OLLAMA_TEMPLATES = {"ChatML": OLLAMA_CHATML, "Qwen2.5": OLLAMA_CHATML, "Qwen3": OLLAMA_CHATML, "Gemma 2": OLLAMA_GEMMA,
                    "Gemma 3": OLLAMA_GEMMA}


def modelfile_path(gguf_path) -> Path:
    return Path(gguf_path).with_suffix(".Modelfile")


def write_modelfile(gguf_path) -> Path:
    """An Ollama Modelfile beside a GGUF file (name.Modelfile): `ollama create my-model -f name.Modelfile`.
    The chat template is translated for the formats minift writes (tokenizer.chat_format); any other is left to
    Ollama, with a comment saying so."""
    gguf_path = Path(gguf_path)
    path = modelfile_path(gguf_path)
    if path.exists():
        raise MiniftError(f"{path} already exists: minift does not overwrite it; delete it or choose another name")
    text = modelfile_text(gguf_path.name, read_gguf(gguf_path).metadata)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def modelfile_text(gguf_name: str, meta: dict) -> str:
    tokens, template = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.chat_template")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    stops = [tokens[eos]] if eos is not None else []
    fmt = chat_format(template) if template is not None else None
    lines = [f"FROM ./{gguf_name}"]
    if template is None:
        lines.append("# No TEMPLATE: the checkpoint has no chat template, so prompts go to the model as they are.")
    elif fmt is None:
        print(f"note: {gguf_name}'s chat template is not one minift writes; its Modelfile leaves TEMPLATE to Ollama")
        lines.append("# No TEMPLATE: minift translates ChatML, Qwen's and Gemma's templates only. Ollama takes one from "
                     "the GGUF's tokenizer.chat_template when it recognises it; otherwise write one in its Go template "
                     "syntax.")
    else:
        lines.append(f'TEMPLATE """{OLLAMA_TEMPLATES[fmt.name]}"""')
        if fmt.system is not None:
            if '"""' in fmt.system:
                raise MiniftError('the default system prompt holds """, which a Modelfile cannot quote: '
                                  'export without a Modelfile and write its SYSTEM line yourself')
            lines.append(f'SYSTEM """{fmt.system}"""')
        stops = [fmt.end_of_turn] + [s for s in stops if s != fmt.end_of_turn]  # the end of a turn first
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
