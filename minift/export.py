"""GGUF export: a Llama checkpoint folder -> one .gguf file that llama.cpp, Ollama and LM Studio run.

This is gguf.py read backwards (its docstring has the layout). Writing needs one thing reading does not:
the tensor table comes before the tensors and gives each one's offset, so every tensor's type and byte size
is decided first (the plan), the header, metadata and table written, and then the tensors one at a time,
each starting on a multiple of 32 bytes:

    export_gguf("runs/smollm2-chat/best", "smollm2-chat.q8_0.gguf", kind="q8_0")

What goes in, as llama.cpp's own converter (convert_hf_to_gguf.py) writes it:
- tensors under llama.cpp's names (token_embd, blk.N.attn_q ..., output_norm, and output unless the head is
  tied to the embedding), the q and k rows reordered for llama.cpp's RoPE (`permute`, the inverse of
  gguf.unpermute);
- matrices in `kind`: f32, f16, or llama.cpp's blocks of 32 (q8_0, q4_0, q4_1: quantize.QuantizedWeight,
  rounded as llama.cpp rounds); a matrix whose rows are not a whole number of blocks falls back to f16, as
  the converter does. Norms (1-D) stay f32 in every kind;
- the config as llama.* keys, the byte-level BPE tokenizer (vocabulary, token types, merges, the
  pre-tokenizer's name, special ids) and the chat template.
What the file cannot hold faithfully (another architecture, a classifier head, another tokenizer) is refused
in one line rather than written wrong. Only numpy and struct here: the `gguf` package is the tests' oracle.
`write_modelfile` puts an Ollama Modelfile beside the file.
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

from .checkpoints import read_config, read_safetensors
from .errors import MiniftError
from .files import atomic_write
from .gguf import (ARRAY, BLOCKS, DEFAULT_ALIGNMENT, MAGIC, PRE_TOKENIZERS, SCALAR_FORMATS, STRING,
                   U32, TensorInfo, read_gguf)
from .models.llama import GGUF_LAYER_NAMES as LAYER_NAMES, GGUF_TOP_NAMES as TOP_NAMES, LlamaConfig
from .quantize import BLOCK, QuantizedWeight
from .tokenizer import Tokenizer, chat_format

I32, F32, BOOL = 5, 6, 7  # metadata value types (gguf.SCALAR_FORMATS; gguf.py names the u32 one)
GGML_F32, GGML_F16 = 0, 1
# kind -> (the ggml type of its matrices, general.file_type: llama.cpp's LlamaFileType, MOSTLY_* = all but 1-D)
KINDS = {"f32": (GGML_F32, 0), "f16": (GGML_F16, 1), "q8_0": (8, 7), "q4_0": (2, 2), "q4_1": (3, 3)}
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5  # tokenizer.ggml.token_type values
GGUF_NAMES = {hf: ours for ours, hf in TOP_NAMES.items()}  # the inverses of gguf.py's name maps
LAYER_PARTS = {hf: ours for ours, hf in LAYER_NAMES.items()}


# ---------------------------------------------------------------------------------------------------
# What to export: the checkpoint, checked

def export_gguf(model_dir, out_path, kind="f16", modelfile=False) -> Path:
    """Write the Llama checkpoint in model_dir as a GGUF file at out_path (never over an existing file).
    kind: f32 | f16 | q8_0 | q4_0 | q4_1 for the matrices. modelfile: also write an Ollama Modelfile beside it."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    if kind not in KINDS:
        raise MiniftError(f"GGUF type {kind!r} is unknown: choose {', '.join(KINDS)} (--type)")
    for path in [out_path] + ([modelfile_path(out_path)] if modelfile else []):
        if path.exists():
            raise MiniftError(f"{path} already exists: minift does not overwrite it; delete it or choose another name")
    config = checked_config(model_dir)  # everything that can be refused is refused before any work
    vocab = read_vocab(model_dir, config)
    tensors = checked_tensors(model_dir, config)
    plan, source = plan_tensors(config, tensors, kind)
    meta = metadata(config, vocab, kind, model_name(model_dir))
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            write_header(f, meta, plan)
            for info in tqdm(plan, desc=f"writing {out_path.name}", unit="tensor"):
                pad_to(f, DEFAULT_ALIGNMENT)
                f.write(tensor_bytes(tensors[source[info.name]], info, config, kind))

    atomic_write(out_path, write)  # a stopped export leaves no file under the final name
    if modelfile:
        write_modelfile(out_path)
    return out_path


def checked_config(model_dir: Path) -> LlamaConfig:
    """config.json as a LlamaConfig, refusing what llama.cpp's 'llama' architecture would run differently."""
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise MiniftError(f"{model_dir} holds a LoRA adapter only: export the run's best/ folder, which is the base "
                          f"model with the adapter merged in")
    raw = read_config(model_dir)
    kind = raw.get("model_type")
    if kind != "llama":
        raise MiniftError(f"{model_dir} holds a {kind!r} model: minift exports the Llama architecture (SmolLM2, "
                          f"TinyLlama, Llama 2 ...) to GGUF, nothing else")
    if any("ForSequenceClassification" in a for a in raw.get("architectures") or []):
        raise MiniftError(f"{model_dir} holds a classifier ({raw['architectures'][0]}): GGUF runners generate text; "
                          f"export a language model (a run with task lm)")
    config = LlamaConfig.from_dict(raw)  # refuses rope scaling, mixtures of experts, other activations
    if config.attention_bias or config.mlp_bias:
        raise MiniftError(f"{model_dir}: this Llama has biases (attention_bias or mlp_bias), which llama.cpp's "
                          f"llama architecture has no place for; it cannot be exported faithfully")
    return config


def checked_tensors(model_dir: Path, config: LlamaConfig) -> dict:
    """The checkpoint's tensors by HF name: exactly a Llama causal LM's, of the config's shapes, else one line
    naming the odd ones."""
    tensors = {k: t for k, t in read_safetensors(model_dir).items() if not k.endswith("rotary_emb.inv_freq")}
    shapes = llama_shapes(config)
    if config.tie_word_embeddings:
        del shapes["lm_head.weight"]
        tensors.pop("lm_head.weight", None)  # a tied head saved anyway: it is the embedding
    missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if "score.weight" in extra:
        raise MiniftError(f"{model_dir} holds a classifier head (score.weight): export a language model instead")
    if missing or extra:
        what = "; ".join(f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                         for label, names in (("missing", missing), ("not in a plain Llama", extra)) if names)
        raise MiniftError(f"{model_dir}'s weights are not a Llama causal LM's ({what}): export a checkpoint "
                          f"that minift or transformers saved as LlamaForCausalLM")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise MiniftError(f"{model_dir}: {name} is {tuple(tensors[name].shape)}, config.json makes it {shape}: "
                              f"config.json does not belong to these weights")
    return tensors


def llama_shapes(c: LlamaConfig) -> dict:
    """Every tensor of a LlamaForCausalLM, by HF name, with the shape its config gives it."""
    h, ff, q, kv = c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = {"input_layernorm": (h,), "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
             "self_attn.o_proj": (h, q), "post_attention_layernorm": (h,), "mlp.gate_proj": (ff, h),
             "mlp.up_proj": (ff, h), "mlp.down_proj": (h, ff)}
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,), "lm_head.weight": (c.vocab_size, h)}
    shapes.update({f"model.layers.{i}.{part}.weight": shape for i in range(c.num_hidden_layers) for part, shape in layer.items()})
    return shapes


def model_name(model_dir: Path) -> str:
    """general.name: the folder's name; for a run's best/ folder, the run's."""
    folder = model_dir.resolve()
    return folder.parent.name if folder.name == "best" else folder.name


# ---------------------------------------------------------------------------------------------------
# The tokenizer: tokenizer.json's byte-level BPE as GGUF's lists

def read_vocab(model_dir: Path, config: LlamaConfig) -> dict:
    """The tokenizer.* metadata values: tokens by id (padded to the model's vocab_size), types, merges,
    the pre-tokenizer's name, special ids, the BOS/EOS flags and the chat template."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise MiniftError(f"{model_dir} has no tokenizer.json: a GGUF carries its tokenizer, so copy the base "
                          f"model's tokenizer.json (and tokenizer_config.json) into the folder")
    chat_template = Tokenizer.from_file(path).chat_template  # also refuses a broken tokenizer(_config).json in one line
    data = json.loads(path.read_text(encoding="utf-8"))
    check_byte_level_bpe(data, path)
    tokens, types = token_list(data, config.vocab_size, path)
    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8")) if tok_config_path.is_file() else {}
    vocab = dict(tokens=tokens, types=types, merges=merge_list(data["model"].get("merges", [])),
                 pre=pre_tokenizer_name(data.get("pre_tokenizer"), path),
                 ids=special_ids(tokens, tok_config, config), chat_template=chat_template)
    vocab.update(special_flags(data.get("post_processor"), tok_config))
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


def token_list(data: dict, vocab_size: int, path: Path):
    """Tokens and their types by id. Ids the tokenizer leaves free (up to the embedding's rows) get
    [PADi] placeholders of type UNUSED, as the converter writes them."""
    by_id = {i: (token, NORMAL) for token, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens", []):
        special = added.get("special") or looks_special(added["content"])
        by_id[added["id"]] = (added["content"], CONTROL if special else USER_DEFINED)
    if max(by_id) >= vocab_size:
        raise MiniftError(f"{path} has token id {max(by_id)}, the model's embedding only {vocab_size} rows: "
                          f"the tokenizer belongs to another model")
    pairs = [by_id.get(i, (f"[PAD{i}]", UNUSED)) for i in range(vocab_size)]
    return [t for t, _ in pairs], [k for _, k in pairs]


def merge_list(merges: list) -> list:
    """Merges as "a b" strings; tokenizers >= 0.20 writes pairs [a, b], where a space is GGUF's Ġ (U+0120)."""
    return [m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m) for m in merges]


def special_ids(tokens: list, tok_config: dict, config: LlamaConfig) -> dict:
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

def metadata(config: LlamaConfig, vocab: dict, kind: str, name: str) -> list:
    """(key, value, type[, item type]) in the converter's order; gguf.llama_config reads them back."""
    c = config
    meta = [("general.architecture", "llama", STRING), ("general.type", "model", STRING), ("general.name", name, STRING),
            ("llama.block_count", c.num_hidden_layers, U32), ("llama.context_length", c.max_position_embeddings, U32),
            ("llama.embedding_length", c.hidden_size, U32), ("llama.feed_forward_length", c.intermediate_size, U32),
            ("llama.attention.head_count", c.num_attention_heads, U32),
            ("llama.attention.head_count_kv", c.num_key_value_heads, U32),
            ("llama.rope.freq_base", c.rope_theta, F32), ("llama.attention.layer_norm_rms_epsilon", c.rms_norm_eps, F32),
            ("llama.attention.key_length", c.head_dim, U32), ("llama.attention.value_length", c.head_dim, U32),
            ("general.file_type", KINDS[kind][1], U32), ("llama.vocab_size", c.vocab_size, U32),
            ("llama.rope.dimension_count", c.head_dim, U32), ("general.quantization_version", 2, U32),
            ("general.alignment", DEFAULT_ALIGNMENT, U32),
            ("tokenizer.ggml.model", "gpt2", STRING), ("tokenizer.ggml.pre", vocab["pre"], STRING),
            ("tokenizer.ggml.tokens", vocab["tokens"], ARRAY, STRING),
            ("tokenizer.ggml.token_type", vocab["types"], ARRAY, I32),
            ("tokenizer.ggml.merges", vocab["merges"], ARRAY, STRING)]
    meta += [(f"tokenizer.ggml.{key}", i, U32) for key, i in vocab["ids"].items()]
    meta += [("tokenizer.ggml.add_bos_token", vocab["add_bos"], BOOL),
             ("tokenizer.ggml.add_eos_token", vocab["add_eos"], BOOL)]
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

def plan_tensors(config: LlamaConfig, tensors: dict, kind: str):
    """Every tensor's GGUF name, shape, type and offset (from the start of the data), in file order; and
    {GGUF name: HF name}. Offsets advance by each tensor's bytes rounded up to the alignment."""
    hf_names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{part}.weight" for i in range(config.num_hidden_layers)
                                                for part in LAYER_PARTS] + ["model.norm.weight"]
    if "lm_head.weight" in tensors:
        hf_names.append("lm_head.weight")
    plan, source, offset = [], {}, 0
    for hf in hf_names:
        shape = tuple(tensors[hf].shape)
        info = TensorInfo(gguf_name(hf), shape, tensor_type(shape, kind), offset)
        plan.append(info)
        source[info.name] = hf
        offset += -(-nbytes(info) // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT
    return plan, source


def gguf_name(hf: str) -> str:
    """The Hugging Face key -> llama.cpp's tensor name (the inverse of gguf.hf_name)."""
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf)
    return f"blk.{m.group(1)}.{LAYER_PARTS[m.group(2)]}.weight"


def tensor_type(shape: tuple, kind: str) -> int:
    """1-D tensors (the norms) stay f32; a matrix whose rows are not whole blocks of 32 falls back to f16
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


def tensor_bytes(t: torch.Tensor, info: TensorInfo, config: LlamaConfig, kind: str) -> bytes:
    """One tensor's bytes as the plan says: permuted if q or k, then f32, f16 or blocks."""
    w = t.detach().float().numpy()
    if info.name.endswith("attn_q.weight"):
        w = permute(w, config.num_attention_heads)
    elif info.name.endswith("attn_k.weight"):
        w = permute(w, config.num_key_value_heads)
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

# Ollama's Go template for ChatML. Ollama puts the Modelfile's SYSTEM first when a conversation does not start
# with a system message: that is the default system prompt of a ChatML template like SmolLM2's.
OLLAMA_CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                 "<|im_start|>assistant\n")


def modelfile_path(gguf_path) -> Path:
    return Path(gguf_path).with_suffix(".Modelfile")


def write_modelfile(gguf_path) -> Path:
    """An Ollama Modelfile beside a GGUF file (name.Modelfile): `ollama create my-model -f name.Modelfile`.
    The chat template is translated for ChatML; any other is left to Ollama, with a comment saying so."""
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
    lines = [f"FROM ./{gguf_name}"]
    if template is None:
        lines.append("# No TEMPLATE: the checkpoint has no chat template, so prompts go to the model as they are.")
    elif is_chatml(template):
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
        system = chat_format(template).system
        if system is not None:
            if '"""' in system:
                raise MiniftError('the default system prompt holds """, which a Modelfile cannot quote: '
                                  'export without a Modelfile and write its SYSTEM line yourself')
            lines.append(f'SYSTEM """{system}"""')
        stops = ["<|im_end|>"] + [s for s in stops if s != "<|im_end|>"]  # the end of a ChatML turn
    else:
        print(f"note: {gguf_name}'s chat template is not ChatML; its Modelfile leaves TEMPLATE to Ollama")
        lines.append("# No TEMPLATE: minift translates ChatML templates only. Ollama takes one from the GGUF's "
                     "tokenizer.chat_template when it recognises it; otherwise write one in its Go template syntax.")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def is_chatml(template: str) -> bool:
    fmt = chat_format(template)
    return fmt is not None and fmt.name == "ChatML"
