"""Hugging Face checkpoints <-> minift models: read config.json, build the model, load and save safetensors.

Our parameter names are the checkpoint's keys, so loading is nearly the identity map. What is left:
- a prefix: a `BertModel` checkpoint says `embeddings...`, a `BertForSequenceClassification` one
  `bert.embeddings...`, RoBERTa `roberta.`, GPT-2 `h.0...` or `transformer.h.0...`;
- GPT-2's Conv1D weights are stored (in, out): we transpose on load and back on save;
- buffers that are not parameters (`position_ids`, GPT-2's old `attn.bias` causal mask) are skipped;
- heads: a pretraining head in the file (`cls.`, `lm_head.`) is dropped, a task head we add is new.
Anything else (missing, unexpected, wrong shape) is an error that names the tensors.
Only safetensors and JSON are read: never pickle, which can run code.
"""
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .bert import BertConfig, BertForSequenceClassification, BertModel
from .errors import MiniftError
from .gpt2 import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

TASKS = ("classify", "lm", "encode")
CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # GPT-2's (in, out) weights
BUFFERS = ("position_ids", ".attn.bias", ".attn.masked_bias")
PRETRAINING_HEADS = ("cls.", "lm_head.")
NEW_HEADS = ("classifier.", "score.", "bert.pooler.")


def read_config(folder):
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MiniftError(f"{folder} has no config.json: a checkpoint folder needs config.json, "
                          "model.safetensors and tokenizer.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MiniftError(f"{path} is not valid JSON ({e}): restore it from the original checkpoint") from None


def build_model(config, task="classify", num_labels=None, pooling=None):
    """A freshly initialised minift model for an HF config dict and a task."""
    kind = config.get("model_type")
    if task not in TASKS:
        raise MiniftError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    overrides = {k: v for k, v in dict(num_labels=num_labels, pooling=pooling).items() if v is not None}
    if kind in ("bert", "roberta"):
        c = BertConfig.from_dict({**config, **overrides})
        if task == "lm":
            raise MiniftError(f"{kind} is an encoder: it has no causal-LM head; use task='classify' or a GPT-2 model")
        model = BertForSequenceClassification(c) if task == "classify" else BertModel(c)
    elif kind == "gpt2":
        c = GPT2Config.from_dict({**config, **overrides})
        model = GPT2ForSequenceClassification(c) if task == "classify" else GPT2LMHeadModel(c)
    else:
        raise MiniftError(f"model_type {kind!r} is not supported: minift implements bert (MiniLM too), roberta and gpt2")
    model.hf_config = dict(config)  # kept so that save() writes back every key we did not use
    return model


def read_safetensors(folder):
    """All tensors of a checkpoint folder: model.safetensors, or the shards named by its index."""
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise MiniftError(f"{folder} has no model.safetensors (nor model.safetensors.index.json): "
                          "minift reads safetensors only; convert a .bin checkpoint with transformers first")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(f))
        except (SafetensorError, OSError) as e:
            raise MiniftError(f"{f} is damaged or truncated ({e}): download it again") from None
    return tensors


@dataclass
class LoadReport:
    loaded: list = field(default_factory=list)
    new_head: list = field(default_factory=list)  # expected: the task head we add is trained from scratch
    dropped_head: list = field(default_factory=list)  # expected: the pretraining head we do not use
    skipped_buffers: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # "name: file (a, b) vs model (c, d)"

    def __str__(self):
        lines = [f"loaded {len(self.loaded)} tensors"]
        for label, names in (("new task head (trained from scratch)", self.new_head),
                             ("pretraining head dropped", self.dropped_head),
                             ("buffers skipped", self.skipped_buffers)):
            if names:
                lines.append(f"{label}: {', '.join(names)}")
        return "\n".join(lines)


def _base_prefix(model):
    return "bert." if hasattr(model, "bert") else "transformer." if hasattr(model, "transformer") else ""


def _to_our_name(key, model):
    """The checkpoint key as one of our parameter names (or unchanged when it is not ours)."""
    if model.config.model_type == "roberta":
        key = key.replace("roberta.", "bert.", 1) if key.startswith("roberta.") else key
        # RobertaForSequenceClassification's head is BERT's pooler + classifier under other names
        key = key.replace("classifier.dense.", "bert.pooler.dense.").replace("classifier.out_proj.", "classifier.")
    prefix = _base_prefix(model)
    for p in ("bert.", "transformer."):  # a task model's checkpoint loaded into a base model
        if not prefix and key.startswith(p):
            key = key[len(p):]
    if prefix and not key.startswith(prefix) and not key.startswith(NEW_HEADS + PRETRAINING_HEADS):
        key = prefix + key
    return key


def load_state(model, tensors):
    """Copy checkpoint tensors into the model; return a LoadReport, or raise naming what does not fit."""
    ours = dict(model.named_parameters())
    report = LoadReport()
    for key, t in tensors.items():
        name = _to_our_name(key, model)
        if key.endswith(BUFFERS):
            report.skipped_buffers.append(key)
        elif name not in ours:
            unused_head = key.startswith(PRETRAINING_HEADS) or name.startswith("bert.pooler.")  # mean pooling
            (report.dropped_head if unused_head else report.unexpected).append(key)
        else:
            if name.endswith(CONV1D) and model.config.model_type == "gpt2":
                t = t.T  # Conv1D (in, out) -> Linear (out, in)
            p = ours.pop(name)
            if t.shape != p.shape:
                hint = " (looks transposed)" if t.ndim == 2 and t.T.shape == p.shape else ""
                report.mismatched.append(f"{key}: file {tuple(t.shape)} vs model {tuple(p.shape)}{hint}")
                continue
            with torch.no_grad():
                p.copy_(t)
            report.loaded.append(name)
    for name in ours:
        # a task head is new; so is BertModel's pooler when the file came from a masked-LM model
        optional = name.startswith(NEW_HEADS) or (name.startswith("pooler.") and not _base_prefix(model))
        (report.new_head if optional else report.missing).append(name)
    problems = [f"{label}: {_few(names)}" for label, names in (
        ("missing", report.missing), ("unexpected", report.unexpected), ("wrong shape", report.mismatched)) if names]
    if problems:
        raise MiniftError(f"checkpoint does not fit {type(model).__name__}: {'; '.join(problems)} "
                          "(check that config.json belongs to these weights)")
    return report


def _few(names, n=4):
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def load_checkpoint(folder, task="classify", num_labels=None, pooling=None, dtype=torch.float32, verbose=True):
    """config.json + model.safetensors in `folder` -> a minift model with those weights (fp32 by default)."""
    model = build_model(read_config(folder), task, num_labels, pooling)
    report = load_state(model, read_safetensors(folder))
    model.to(dtype)
    model.load_report = report
    if verbose:
        print(report)
    return model


HF_CLASS = {"BertForSequenceClassification": "ForSequenceClassification", "BertModel": "Model",
            "GPT2ForSequenceClassification": "ForSequenceClassification", "GPT2LMHeadModel": "LMHeadModel"}


def hf_state_dict(model):
    """Our parameters under the names and layouts that transformers expects."""
    out = {}
    for name, p in model.named_parameters():  # a tied weight is listed once; HF re-ties lm_head on load
        t = p.detach()
        if name.endswith(CONV1D) and model.config.model_type == "gpt2":
            t = t.T  # back to Conv1D (in, out)
        if model.config.model_type == "roberta":
            name = name.replace("bert.pooler.dense.", "classifier.dense.") if model.config.pooling == "cls" else name
            name = name.replace("classifier.weight", "classifier.out_proj.weight").replace(
                "classifier.bias", "classifier.out_proj.bias").replace("bert.", "roberta.", 1)
        out[name] = t.contiguous().cpu()
    return out


def save_checkpoint(model, folder, label_names=None, tokenizer_file=None):
    """Write config.json + model.safetensors that both minift and transformers load."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    family = "Roberta" if model.config.model_type == "roberta" else "Bert" if hasattr(model.config, "hidden_size") else "GPT2"
    config = {**getattr(model, "hf_config", {}), **asdict(model.config)}
    config["architectures"] = [family + HF_CLASS[type(model).__name__]]
    if label_names:
        config["id2label"] = {str(i): n for i, n in enumerate(label_names)}
        config["label2id"] = {n: i for i, n in enumerate(label_names)}
    tensors = hf_state_dict(model)
    if config["architectures"][0] == "RobertaForSequenceClassification" and model.config.pooling != "cls":
        raise MiniftError("transformers' RoBERTa classifier uses [CLS] pooling: train with pooling='cls' to export it")
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    if tokenizer_file is not None:
        data = Path(tokenizer_file).read_bytes()
        atomic_write(folder / "tokenizer.json", lambda tmp: Path(tmp).write_bytes(data))
    return folder


def atomic_write(path, write):
    """write(tmp_path), then rename onto `path`: a crash midway leaves the old file, never a torn one."""
    tmp = Path(str(path) + ".tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
