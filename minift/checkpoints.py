"""Hugging Face checkpoints <-> minift models: read config.json, build the model, load and save safetensors.

Our parameter names are the checkpoint's keys, so loading is nearly the identity map. What is left belongs
to each family module (models/bert.py, models/gpt2.py ...), found here by config.json's `model_type` in FAMILIES:
`Config.from_dict`, `TASKS` (task -> model class), `DEFAULT_TASK` (what the pretrained file computes),
`hf_to_ours` (prefixes, transposes, buffers to skip), `hf_state_dict` and `architecture` for saving,
`NEW_HEADS` (a task head we add, trained from scratch), `LABEL_HEAD` (its layer with one row per class),
`UNUSED_HEADS` (a pretraining head in the file that we drop) and `FAN_IN_FAN_OUT` (HF keeps W as (in, out)).
No other module knows a family's names. Anything else (missing, unexpected, wrong shape) is an error that
names the tensors. Only safetensors and JSON are read: never pickle, which can run code.

Beside its weights a model carries (heads.TaskModel) what is saved with them: `label_names` (a classifier's class names, as
id2label), `tokenizer_file` (copied into a saved folder, with its tokenizer_config.json) and `max_length`
(the tokens per text it was trained with, so predict and evaluate cut texts the same way).
"""
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .models import bert, gemma, gpt2, llama
from .errors import MiniftError
from .files import atomic_write

# model_type -> the module that knows the family
FAMILIES = {"bert": bert, "roberta": bert, "gpt2": gpt2, "llama": llama, "mistral": llama, "qwen2": llama, "qwen3": llama,
            "mixtral": llama, "qwen3_moe": llama, "olmoe": llama, "gemma2": gemma, "gemma3_text": gemma, "gemma3": gemma}
TASKS = ("classify", "tag", "lm", "encode")


def read_config(folder):
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise MiniftError(f"{folder} has no config.json: a checkpoint folder needs config.json, "
                          "model.safetensors and tokenizer.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MiniftError(f"{path} is not valid JSON ({e}): restore it from the original checkpoint") from None
    if not isinstance(config, dict):
        raise MiniftError(f"{path} holds a {type(config).__name__}, not a JSON object of settings: "
                          "restore it from the original checkpoint")
    return config


def family_of(model_or_config):
    """The family module of a model or of a config.json dict."""
    config = model_or_config if isinstance(model_or_config, dict) else vars(model_or_config.config)
    kind = config.get("model_type")
    if kind not in FAMILIES:
        raise MiniftError(f"model_type {kind!r} is not supported: minift implements {', '.join(FAMILIES)}")
    return FAMILIES[kind]


def build_model(config, task="classify", num_labels=None, pooling=None):
    """A freshly initialised minift model for an HF config dict and a task."""
    if task not in TASKS:
        raise MiniftError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if not isinstance(config, dict):
        raise MiniftError(f"config must be a dict of config.json's settings (checkpoints.read_config(folder)), not "
                          f"{type(config).__name__}")
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise MiniftError(f"num_labels {num_labels!r}: give the number of classes, a whole number >= 1 (2 or more to "
                          "train a classifier)")
    family = family_of(config)
    if task not in family.TASKS:
        what = "is an encoder: it has no causal-LM head" if task == "lm" else f"has no {task!r} model"
        raise MiniftError(f"{config['model_type']} {what}; choose task {' or '.join(map(repr, family.TASKS))}")
    overrides = {k: v for k, v in dict(num_labels=num_labels, pooling=pooling).items() if v is not None}
    model = family.TASKS[task](family.Config.from_dict({**config, **overrides}))
    # kept so that save() writes back every key we did not use; a checkpoint with a vision tower (gemma3) is run,
    # and saved, as its language model: its text_config's keys
    model.hf_config = dict(config.get("text_config") or config)
    if model.task in ("classify", "tag"):  # (the rest of heads.TaskModel's attributes start as None)
        model.label_names = _label_names(config, model)
    model.max_length = config.get("minift_max_length")
    return model


def _label_names(config, model):
    """The class names of config.json's id2label, when it names exactly the model's classes."""
    names = config.get("id2label") or {}
    wanted = [str(i) for i in range(model.config.num_labels)]
    return [names[i] for i in wanted] if isinstance(names, dict) and sorted(names) == sorted(wanted) else None


def read_safetensors(folder):
    """All tensors of a checkpoint folder in one dict (the export reads them so); loading takes them one at a time."""
    return dict(iter_safetensors(folder))


def iter_safetensors(folder):
    """(name, tensor) of a checkpoint folder, one tensor at a time: model.safetensors, or the shards named by its
    index. Each tensor is read from the file when asked for, so a load holds one of them beside the model, not a
    second copy of the whole checkpoint."""
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = shard_files(index)
    else:
        raise MiniftError(f"{folder} has no model.safetensors (nor model.safetensors.index.json): "
                          "minift reads safetensors only; convert a .bin checkpoint with transformers first")
    for f in files:
        try:
            with safe_open(f, "pt") as file:
                for key in file.keys():
                    yield key, file.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise MiniftError(f"{f} is damaged or truncated ({e}): download it again") from None


def shard_files(index):
    """The shard files named by model.safetensors.index.json ({"weight_map": {tensor name: file name}})."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, AttributeError) as e:
        weight_map = e  # not JSON, or JSON but not an object
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
        raise MiniftError(f"{index} is malformed: it needs {{\"weight_map\": {{tensor name: shard file}}}}; "
                          "download the checkpoint again")
    files = sorted({index.parent / f for f in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MiniftError(f"{index} names {missing[0]}, which is not in {index.parent}: download the checkpoint again")
    return files


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


def load_state(model, tensors):
    """Copy checkpoint tensors ((name, tensor) pairs: iter_safetensors) into the model; return a LoadReport, or raise
    naming what does not fit."""
    family = family_of(model)
    ours = dict(model.named_parameters())
    report = LoadReport()
    for key, t in tensors:
        name, t = family.hf_to_ours(key, t, model)
        if name is None:
            report.skipped_buffers.append(key)
        elif name not in ours:
            unused_head = key.startswith(family.UNUSED_HEADS) or name.startswith(family.UNUSED_HEADS)
            (report.dropped_head if unused_head else report.unexpected).append(key)
        else:
            p = ours.pop(name)
            if t.shape != p.shape:
                hint = " (looks transposed)" if t.ndim == 2 and t.T.shape == p.shape else ""
                report.mismatched.append(f"{key}: file {tuple(t.shape)} vs model {tuple(p.shape)}{hint}")
                continue
            with torch.no_grad():
                p.copy_(t)
            report.loaded.append(name)
    for name in ours:
        (report.new_head if name.startswith(family.NEW_HEADS) else report.missing).append(name)
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
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise MiniftError(f"dtype {dtype!r}: give a torch floating-point dtype, e.g. torch.float32 or torch.bfloat16")
    model = build_model(read_config(folder), task, num_labels, pooling)
    model.to(dtype)  # before the weights are copied in: a float64 checkpoint keeps every digit
    report = load_state(model, iter_safetensors(folder))
    model.load_report = report
    model.source = str(folder)
    if (Path(folder) / "tokenizer.json").is_file():
        model.tokenizer_file = Path(folder) / "tokenizer.json"
    if verbose:
        print(report)
    return model


def save_checkpoint(model, folder):
    """Write config.json + model.safetensors that both minift and transformers load, with what the model
    carries beside its weights (label names, max_length, the tokenizer)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    family = family_of(model)
    config = {**getattr(model, "hf_config", {}), **asdict(model.config)}
    config["architectures"] = [family.architecture(model)]
    if model.label_names:
        config["id2label"] = {str(i): n for i, n in enumerate(model.label_names)}
        config["label2id"] = {n: i for i, n in enumerate(model.label_names)}
    if model.max_length:
        config["minift_max_length"] = model.max_length
    tensors = {k: t.contiguous().cpu() for k, t in family.hf_state_dict(model).items()}
    atomic_write(folder / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))
    if model.tokenizer_file is not None:  # the tokenizer, and its config beside it (special tokens, chat template)
        tokenizer_file = Path(model.tokenizer_file)
        for source in (tokenizer_file, *(tokenizer_file.with_name(n) for n in ("tokenizer_config.json",
                                                                               "chat_template.jinja"))):
            if source.is_file():
                data = source.read_bytes()
                atomic_write(folder / source.name, lambda tmp, data=data: Path(tmp).write_bytes(data))
    return folder

