"""LoRA: freeze the pretrained weights and learn a low-rank update beside them (Hu et al., 2021).

A frozen linear layer y = x W^T + b gets a side path through a bottleneck of r numbers:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r), r << in, out

Only A and B learn: r * (in + out) numbers instead of in * out. B starts at zero, so the model at step 0 is
exactly the pretrained one; A starts random (as peft does), so B's first gradient is not zero. After
training the update folds into W (merge), and inference costs nothing extra.

This file: the layer (forward and hand-written backward side by side), attaching it by name, merge/unmerge,
and saving/loading adapters in peft's layout (`adapter_config.json` + `adapter_model.safetensors`), so that
`peft.PeftModel.from_pretrained` loads what minift trained and minift loads what peft trained.
"""
import fnmatch
import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoints import family_of
from .errors import MiniftError
from .freeze import base_model, count_trainable, mark_frozen_below
from .layers import Dropout, Linear, accumulate_grad, cast_for_matmul, keeps_for_backward


class LoRALinear(Linear):
    """A Linear whose weight and bias are frozen, plus the trainable low-rank update (alpha / r) B A.

    It keeps Linear's parameter names (`weight`, `bias`: a checkpoint still loads into it) and adds
    `lora_A` (r, in) and `lora_B` (out, r), named as peft names them."""

    def __init__(self, linear, r, alpha, dropout=0.0):
        nn.Module.__init__(self)  # not Linear.__init__: we take the pretrained weight, not a fresh random one
        self.weight, self.bias = linear.weight, linear.bias
        d_out, d_in = self.weight.shape
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, d_in, dtype=self.weight.dtype, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft (and nn.Linear) initialise
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, dtype=self.weight.dtype, device=self.weight.device))
        self.lora_dropout = Dropout(dropout)  # on the side path's input only, as in peft
        self.merged = False  # True while the update sits inside W (merge_lora)
        self.enabled = True  # False: the base layer alone, the adapter switched off (preference.adapters_off)
        self.quantized = None  # W in 8 or 4 bits instead of `weight` (quantize.py: QLoRA)

    def extra_repr(self):
        if self.quantized is not None:
            return f"{self.quantized.extra_repr()}, bias={self.bias is not None}, r={self.r}, alpha={self.alpha:g}"
        return super().extra_repr() + f", r={self.r}, alpha={self.alpha:g}, merged={self.merged}"

    def forward(self, x):
        x = cast_for_matmul(x)
        if self.quantized is not None:  # x W^T + b with W dequantized a slice at a time
            y = self.quantized.linear(x)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:
            y = super().forward(x)  # x W^T + b (Linear keeps x only if W is trainable: for LoRA it is not)
        if self.merged or not self.enabled:
            return y  # W already holds the update, or the adapter is switched off
        h = self.lora_dropout(x)
        u = h @ self.lora_A.T  # (..., r): the input squeezed through the bottleneck
        if keeps_for_backward(self):
            self.h, self.u = h, u  # keeps: dropout(x) for dA, and u = h A^T for dB
        return y.add_(u @ self.lora_B.T, alpha=self.scale)  # (in place: one output-sized tensor less)

    def backward(self, dy):
        if self.merged or not self.enabled:
            raise MiniftError("a merged or switched-off LoRA layer cannot train: call unmerge_lora(model), or switch "
                              "the adapters back on, before training")
        h, u = self.h, self.u
        del self.h, self.u
        dy = cast_for_matmul(dy)
        if self.quantized is not None:
            dx = self.quantized.linear_backward(dy)  # dy @ W; a quantized W (and its bias) is frozen
        else:
            dx = super().backward(dy)  # dy @ W, and dW / db only where they are trainable
        # the side path, y_lora = s * u B^T with u = h A^T and s = alpha / r:
        if self.lora_B.requires_grad:  # dB = s * dy^T u   (out, r)
            accumulate_grad(self.lora_B, (dy.reshape(-1, dy.shape[-1]).T @ u.reshape(-1, self.r)).mul_(self.scale))
        du = (dy @ self.lora_B).mul_(self.scale)  # (..., r): the gradient at the bottleneck
        if self.lora_A.requires_grad:  # dA = du^T h   (r, in)
            accumulate_grad(self.lora_A, du.reshape(-1, self.r).T @ h.reshape(-1, h.shape[-1]))
        # x reaches y by two roads, W and the side path: its gradient is the sum
        return dx.add_(self.lora_dropout.backward(du @ self.lora_A))

    @torch.no_grad()
    def merge(self):
        """W += s * B A: from now on the plain matmul gives the adapted output. A quantized W is dequantized
        first: the merged layer is full precision (no rounding to 4 bits after training)."""
        if self.quantized is not None:
            self.weight = nn.Parameter(self.quantized.dequantize(self.lora_A.dtype), requires_grad=False)
            self.quantized = None
        if not self.merged:
            self.weight += self.scale * (self.lora_B @ self.lora_A)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W -= s * B A: back to the pretrained W (up to float rounding) and the side path."""
        if self.merged:
            self.weight -= self.scale * (self.lora_B @ self.lora_A)
            self.merged = False


# ---------------------------------------------------------------------------------------------------------
# Attaching by name. A target is a plain substring of a layer's dotted name ("query", "c_attn") or an
# fnmatch pattern ("*.layer.1?.*.value"); "all-linear" takes every linear layer of the transformer blocks.
# The family says which parameters are its new task head (NEW_HEADS): fully trainable, never wrapped. An
# untied LM head is not in the blocks: frozen like the body, and left out of "all-linear" (as in peft).

def _is_new_head(model, name):
    return name.startswith(family_of(model).NEW_HEADS)


def linear_layers(model):
    """{dotted name: Linear} for every linear layer of the model (LoRA ones included)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _layer_kinds(names):
    """The layer names with their numbers starred, each once: what a user can target."""
    kinds = dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names)
    return ", ".join(kinds)


def match_targets(model, targets):
    """The names of the linear layers that the target patterns select (heads excluded)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    candidates = [n for n in linear_layers(model) if not _is_new_head(model, n + ".")]
    in_blocks = {id(m) for stage in base_model(model).stages() for m in stage.modules()}
    if not targets:
        raise MiniftError("no LoRA targets given: name the layers to adapt, e.g. ['query', 'value'] or 'all-linear'")
    chosen = []
    for pattern in targets:
        if pattern == "all-linear":
            hits = [n for n in candidates if id(model.get_submodule(n)) in in_blocks]
        elif any(c in pattern for c in "*?["):
            hits = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
        else:
            hits = [n for n in candidates if pattern in n]
        if not hits:
            raise MiniftError(f"LoRA target {pattern!r} matches no linear layer; this model's are: "
                              f"{_layer_kinds(candidates)} (or use 'all-linear')")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def _check_settings(r, alpha, dropout):
    if not isinstance(r, int) or r < 1:
        raise MiniftError(f"LoRA rank r={r!r} must be a whole number >= 1 (8 or 16 is usual)")
    if not alpha > 0:
        raise MiniftError(f"LoRA alpha={alpha!r} must be > 0: the update is scaled by alpha / r (16 is usual)")
    if not 0.0 <= dropout < 1.0:
        raise MiniftError(f"LoRA dropout {dropout} must be in [0, 1): it is the fraction of inputs zeroed (0.05 is usual)")


def attach_lora(model, names, r, alpha, dropout=0.0):
    """Wrap exactly the linear layers `names`; freeze everything else but the classification head."""
    _check_settings(r, alpha, dropout)
    if lora_layers(model):
        raise MiniftError("this model already has LoRA layers: attach adapters to a fresh model "
                          "(or call merge_and_unload(model) first)")
    layers = linear_layers(model)
    for name in names:
        d_out, d_in = layers[name].weight.shape
        if r > min(d_in, d_out):
            raise MiniftError(f"LoRA rank {r} is larger than layer {name} ({d_in} in, {d_out} out): "
                              f"a rank above {min(d_in, d_out)} adds numbers, not expressive power; lower r")
    for name, p in model.named_parameters():
        p.requires_grad_(_is_new_head(model, name))  # the pretrained body is frozen; a new task head must learn
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(layers[name], r, alpha, dropout))
    mark_frozen_below(model)  # the backward stops below the lowest adapted layer (embeddings keep nothing)
    model.lora_config = {"r": r, "alpha": alpha, "dropout": dropout, "layers": list(names)}
    return lora_summary(model)


def add_lora(model, targets, r=8, alpha=16, dropout=0.0):
    """Attach LoRA to the linear layers matching `targets`; return a one-line summary of what trains."""
    _check_settings(r, alpha, dropout)
    return attach_lora(model, match_targets(model, targets), r, alpha, dropout)


def lora_summary(model):
    trainable, total = count_trainable(model)
    layers = lora_layers(model)
    quantized = [layer.quantized for layer in layers.values() if layer.quantized is not None]
    total += sum(q.shape[0] * q.shape[1] for q in quantized)  # weights kept as blocks, not parameters
    kinds = dict.fromkeys(n.rpartition(".")[2] for n in layers)
    first = next(iter(layers.values()), None)
    what = (f"LoRA r={first.r} alpha={first.alpha:g} on {len(layers)} layers ({', '.join(kinds)})"
            if first else "no LoRA layers")
    base = f", their frozen weights in {quantized[0].kind} blocks" if quantized else ""
    return f"{what}{base}: trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"


def merge_lora(model):
    """Fold every adapter into its W (inference at the plain model's cost); unmerge_lora takes it out."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model):
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model):
    """Merge the adapters and put plain Linear layers back, in place: an ordinary model (every parameter
    trainable again) that save_checkpoint writes as a plain Hugging Face checkpoint. Returns the model."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        with torch.random.fork_rng(devices=[]):  # Linear() draws a W we replace: the run's RNG must not move
            plain = Linear(*reversed(layer.weight.shape), bias=layer.bias is not None)
        plain.weight, plain.bias = layer.weight, layer.bias  # the merged tensors themselves, not copies
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    mark_frozen_below(model)
    model.__dict__.pop("lora_config", None)
    return model


# ---------------------------------------------------------------------------------------------------------
# peft's layout. adapter_model.safetensors holds, for each adapted layer at Hugging Face module path P,
# `base_model.model.P.lora_A.weight` (r, in) and `...lora_B.weight` (out, r), and the trained task head under
# its own keys (`base_model.model.classifier.weight`: peft's `modules_to_save`). Our names are HF's checkpoint
# keys up to what each family's key map changes (RoBERTa's prefix and head). GPT-2's Conv1D weights are
# (in, out) in HF files, but A and B are the same either way: peft's `fan_in_fan_out` only transposes W
# when it merges.

PREFIX = "base_model.model."
TASK_TYPES = {"classify": "SEQ_CLS", "tag": "TOKEN_CLS", "lm": "CAUSAL_LM", "encode": "FEATURE_EXTRACTION"}


def hf_names(model):
    """{our parameter name: its key in a Hugging Face checkpoint}: the family's save map (hf_state_dict)
    read back through its load map (hf_to_ours), so this file knows no family's names."""
    family = family_of(model)
    return {family.hf_to_ours(key, t, model)[0]: key for key, t in family.hf_state_dict(model).items()}


def _hf_module(names, module):
    """A layer's Hugging Face path, read off its weight's key (or its lora_A's: a quantized base has no weight)."""
    leaf = ".weight" if module + ".weight" in names else ".lora_A"
    return names[module + leaf][:-len(leaf)]


def _short_targets(all_linear, adapted):
    """peft's target_modules (HF module paths in, a list out): the last names ("query", "value") when they
    select exactly the adapted layers under peft's matching (a name ending in a target), else the full paths."""
    short = sorted({n.rpartition(".")[2] for n in adapted})
    picked = {n for n in all_linear if n.rpartition(".")[2] in short}
    return short if picked == set(adapted) else sorted(adapted)


def _modules_to_save(head_keys, adapted):
    """The trained head as peft's modules_to_save: the head's top module under the model's body prefix
    (bert.pooler.dense.weight -> pooler, classifier.out_proj.weight -> classifier, score.weight -> score)."""
    body = {n.split(".")[0] for n in adapted}  # bert, roberta, transformer, model
    tops = {k.split(".")[1] if k.split(".")[0] in body else k.split(".")[0] for k in head_keys}
    return sorted(tops) or None


def save_adapter(model, folder, base_model_name_or_path=None):
    """Write adapter_config.json + adapter_model.safetensors that peft (and load_adapter) read."""
    layers = lora_layers(model)
    if not layers:
        raise MiniftError("this model has no LoRA layers to save: attach them with add_lora(model, targets) first")
    names = hf_names(model)
    adapted = {name: _hf_module(names, name) for name in layers}
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{adapted[name]}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{PREFIX}{adapted[name]}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    head = [n for n, p in model.named_parameters() if _is_new_head(model, n) and p.requires_grad]
    for name in head:
        tensors[PREFIX + names[name]] = model.get_parameter(name).detach().contiguous().cpu()
    first = next(iter(layers.values()))
    config = {
        "peft_type": "LORA", "task_type": TASK_TYPES[model.task],
        "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.lora_dropout.p,
        "target_modules": _short_targets([_hf_module(names, n) for n in linear_layers(model)], adapted.values()),
        "modules_to_save": _modules_to_save([names[n] for n in head], adapted.values()),
        "fan_in_fan_out": family_of(model).FAN_IN_FAN_OUT,  # GPT-2's Conv1D: W is (in, out) in HF's model
        "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if model.task == "classify":  # what the head needs that peft's files have no place for
        (folder / HEAD_SETTINGS).write_text(json.dumps(head_settings(model), indent=2))
    return folder


# A classifier's adapter is only right on a base model built the same way: the same pooling and number of
# classes, and it answers with the class names it was trained on. peft takes these from the base model's
# config, which for a pretrained encoder says nothing of them: they go into a file of their own.
HEAD_SETTINGS = "minift_head.json"


def head_settings(model):
    return {"num_labels": model.config.num_labels, "pooling": getattr(model.config, "pooling", None),
            "label_names": model.label_names, "max_length": model.max_length}


def read_head_settings(folder, model=None):
    """The classifier settings save_adapter wrote beside an adapter ({} for one peft wrote); with `model`,
    refuse one that pools otherwise than the adapter was trained to."""
    path = Path(folder) / HEAD_SETTINGS
    try:
        settings = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, OSError) as e:
        raise MiniftError(f"{path} is damaged ({e}): save the adapter again") from None
    if model is not None and model.task != "classify":
        return {}
    pooling = settings.get("pooling")
    if model is not None and pooling and pooling != getattr(model.config, "pooling", None):
        raise MiniftError(f"the adapter in {folder} was trained with {pooling!r} pooling, this model pools by "
                          f"{model.config.pooling!r}: load the base model with pooling={pooling!r} (minift predict does)")
    return settings


def _read_adapter(folder):
    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise MiniftError(f"{folder} is not an adapter folder: it needs adapter_config.json and "
                          "adapter_model.safetensors (as save_adapter or peft's save_pretrained write)")
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise MiniftError(f"{folder}: adapter files damaged ({e}): save or download the adapter again") from None
    if not isinstance(config, dict) or not isinstance(config.get("r"), int) or config["r"] < 1 \
            or not isinstance(config.get("lora_alpha"), (int, float)):
        raise MiniftError(f"{config_path} is not a LoRA adapter's config (it needs an object with a whole-number 'r' "
                          "and 'lora_alpha'): save or download the adapter again")
    if config.get("peft_type") != "LORA":
        raise MiniftError(f"{folder} holds a {config.get('peft_type')} adapter: minift loads LoRA adapters only")
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform")
                   if config.get(k)]
    if unsupported or config.get("bias", "none") != "none":
        raise MiniftError(f"{folder}: adapter uses {', '.join(unsupported) or 'trained biases'}, which minift "
                          "does not implement: train it without those options")
    if config.get("target_parameters"):  # peft on transformers 5's experts, one 3-D tensor for all of a layer's
        raise MiniftError(f"{folder}: adapter adapts parameters directly (target_parameters "
                          f"{config['target_parameters']}: fused experts), which minift does not read: it reads and "
                          "writes one adapter per expert matrix, transformers 4's layout, which peft converts")
    return config, tensors


def load_adapter(model, folder):
    """Attach LoRA layers to `model` and fill them (and the task head) from an adapter folder that
    save_adapter or peft wrote. Returns the summary line."""
    config, tensors = _read_adapter(folder)
    base = config.get("base_model_name_or_path") or "another model"
    settings = read_head_settings(folder, model)
    names = hf_names(model)
    ours = {_hf_module(names, n): n for n in linear_layers(model)}
    lora, head = {}, {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise MiniftError(f"adapter key {key!r} does not start with {PREFIX!r}: not a peft LoRA adapter")
        key = key[len(PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
        if m:
            if m.group(1) not in ours:
                raise MiniftError(f"the adapter adapts layer {m.group(1)}, which this model does not have: it was "
                                  f"saved for {base}; load it onto that model")
            lora.setdefault(ours[m.group(1)], {})[m.group(2)] = t
        else:
            head[key.replace(".modules_to_save.default.", ".")] = t
    r = config["r"]
    for name, pair in lora.items():
        d_out, d_in = linear_layers(model)[name].weight.shape
        want = {"lora_A": (r, d_in), "lora_B": (d_out, r)}
        for part, shape in want.items():
            if part not in pair:
                raise MiniftError(f"the adapter has no {part} for layer {name}: the file is incomplete, save it again")
            if tuple(pair[part].shape) != shape:
                raise MiniftError(f"the adapter's {part} of {name} is {tuple(pair[part].shape)}, this model needs "
                                  f"{shape}: it was saved for {base} (or with another r); load it onto that model")
    params = {key: n for n, key in names.items()}
    for key, t in head.items():
        if key not in params:
            raise MiniftError(f"the adapter holds {key}, which this model does not have: it was saved for {base} "
                              "(another task or head?)")
        p = model.get_parameter(params[key])
        if t.shape != p.shape:
            raise MiniftError(f"the adapter's {key} is {tuple(t.shape)}, this model's {tuple(p.shape)}: it was "
                              f"saved for {base} (another number of labels?)")
    summary = attach_lora(model, list(lora), r, config["lora_alpha"], config.get("lora_dropout", 0.0))
    with torch.no_grad():
        for name, pair in lora.items():
            layer = model.get_submodule(name)
            layer.lora_A.copy_(pair["lora_A"])
            layer.lora_B.copy_(pair["lora_B"])
        for key, t in head.items():
            model.get_parameter(params[key]).copy_(t)
    model.label_names = settings.get("label_names") or model.label_names
    model.max_length = settings.get("max_length") or model.max_length
    return summary
