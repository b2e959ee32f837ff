"""The training settings, and the one check of them that the Python API, the command line, the TOML file and
the sweep all go through: every value of the right type and in range, or one line that says how to fix it.
"""
import math
import typing
from dataclasses import dataclass, field, fields

from .errors import MiniftError


@dataclass
class TrainConfig:
    """Training settings, with generic fine-tuning defaults; recipe.py's MAIN_TRAIN and INSTRUCT_TRAIN are the
    main job's and the instruction job's choices on top of them (`TrainConfig(**recipe.MAIN_TRAIN)`)."""
    epochs: float = 2
    batch_size: int = 32  # examples per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step (each of batch_size // grad_accum examples)
    lr: float = 5e-5
    head_lr_scale: float = 1.0  # a classifier's new head trains at lr x this (it starts from random numbers)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    schedule: str = "linear"  # constant | linear | cosine
    min_lr: float = 0.0
    max_grad_norm: float = 1.0
    dropout: float | None = None  # None: the checkpoint's own rates
    precision: str = "auto"  # auto: bf16 where the hardware runs it natively, else fp32 | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    backward: str = "manual"  # manual: our hand-written backward; autograd: PyTorch's (for new layers)
    seed: int = 0
    group_by_length: bool = True  # batches of similar lengths: less padding, same examples
    eval_every: int = 0  # optimizer steps between evaluations; 0: once per epoch
    metric: str = "accuracy"  # what "best" means on validation: accuracy | macro_f1 | f1 (a tagger's entity F1) | loss |
    # exact_match | reward | auto: the objective's own (objective.py: a classifier's accuracy, a tagger's entity F1, a
    # language model's loss, GRPO's reward ...)
    patience: int = 0  # stop after this many evaluations without improvement; 0: never stop early
    log_every: int = 10
    save_every: int = 0  # optimizer steps between resumable checkpoints; 0: at each evaluation
    max_steps: int = 0  # stop after this many optimizer steps (0: run all epochs); resumes keep counting
    recompute: int = 0  # every N-th block keeps only its input and runs its forward again in backward; 0: off
    packing: int = 0  # a language model's rows packed into sequences of this many tokens (best-fit); 0: one row each
    chunked_loss: int = 0  # a language model's head and loss over this many positions at a time; 0: all at once
    freeze: list = field(default_factory=list)  # parameters not trained: "embeddings", "layers:N", name prefixes
    lora_r: int = 0  # LoRA rank; 0: no adapters, every weight is trained (lora.py)
    lora_alpha: float = 16.0  # the update is scaled by alpha / r
    lora_dropout: float = 0.0  # on the adapters' input (peft's default 0; each one costs a random mask a layer)
    lora_targets: list = field(default_factory=lambda: ["all-linear"])  # which Linear layers get adapters
    zero: int = 0  # under torchrun: 1 shards AdamW's state across the processes, 2 the gradients too (distributed.py)
    quantize: str = "none"  # the adapted layers' frozen weights in blocks of 8 or 4 bits (quantize.py): q8_0 | q4_0 | q4_1 |
    # source: the blocks of the GGUF file the model was converted from (Q4_K, Q6_K, Q5_0 ...), rounded nothing again


CHOICES = {"schedule": ("constant", "linear", "cosine"), "precision": ("auto", "fp32", "bf16"),
           "backward": ("manual", "autograd"),
           "metric": ("accuracy", "macro_f1", "f1", "loss", "exact_match", "reward", "auto"),
           "quantize": ("none", "q8_0", "q4_0", "q4_1", "source")}
# (lowest allowed, whether the lowest itself is allowed, a hint[, highest allowed, whether the highest itself is
# allowed]); no fourth and fifth: no upper bound
RANGES = {"epochs": (0, False, "e.g. 2"), "batch_size": (1, True, "e.g. 32"), "grad_accum": (1, True, "1 = no accumulation"),
          "lr": (0, False, "e.g. 5e-5; a learning rate of 0 trains nothing"),
          "head_lr_scale": (0, False, "1 = the head at the body's lr; e.g. 10"), "weight_decay": (0, True, "e.g. 0.01"),
          "warmup_ratio": (0, True, "between 0 and 1, e.g. 0.06", 1, True), "min_lr": (0, True, "0 decays to zero"),
          "max_grad_norm": (0, False, "e.g. 1.0; a negative norm would turn training into gradient ascent"),
          "seed": (0, True, "any whole number >= 0"), "eval_every": (0, True, "0 = once per epoch"),
          "patience": (0, True, "0 = never stop early"), "log_every": (1, True, "e.g. 10"),
          "save_every": (0, True, "0 = at each evaluation"), "max_steps": (0, True, "0 = run all epochs"),
          "recompute": (0, True, "0 = off, 1 = every block, 2 = every other block"),
          "packing": (0, True, "0 = off; e.g. 1024 tokens per packed sequence"),
          "chunked_loss": (0, True, "0 = off; e.g. 1024 positions"),
          "lora_r": (0, True, "0 = no LoRA; 8 or 16 are usual"), "lora_alpha": (0, False, "e.g. 16"),
          "dropout": (0, True, "in [0, 1): the fraction of values zeroed (0.1 is usual; None: the checkpoint's)", 1, False),
          "lora_dropout": (0, True, "in [0, 1), e.g. 0.05: the fraction of the adapters' input zeroed", 1, False)}


def check_config(cfg):
    """Raise MiniftError naming the first setting that is of the wrong type or out of range."""
    if not isinstance(cfg, TrainConfig):
        raise MiniftError(f"settings must be a minift.TrainConfig, not {type(cfg).__name__}")
    check_fields(cfg, CHOICES, RANGES)
    if cfg.min_lr > cfg.lr:
        raise MiniftError(f"min_lr {cfg.min_lr:g} is above the peak lr {cfg.lr:g}: the floor must be lower")
    if cfg.zero not in (0, 1, 2):
        raise MiniftError(f"zero = {cfg.zero} is unknown: 0 = off, 1 = AdamW's state sharded across processes, 2 = the "
                          "gradients too")
    if cfg.grad_accum > cfg.batch_size:
        raise MiniftError(f"grad_accum {cfg.grad_accum} is more than batch_size {cfg.batch_size}: each micro-batch "
                          "needs at least one example")
    if not (cfg.device in ("auto", "cpu", "cuda") or (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit())):
        raise MiniftError(f"device {cfg.device!r} is unknown: choose auto, cpu, cuda or cuda:N")
    if any(not isinstance(p, str) or not p for p in cfg.freeze):
        raise MiniftError(f"freeze {cfg.freeze!r}: give a list of name patterns, e.g. ['embeddings'] or ['layers:3']")
    return cfg


def check_own_loss_config(cfg, job, metrics, keeps, why_no_packing, backward_in):
    """What the loop's settings must be for a job that brings its own loss and hand-written backward (DPO and KTO, GRPO,
    distillation, a reward model): check_config, then one of the job's `metrics` ('auto' picks the job's), no packing
    and the manual backward, each refused in one line that says the job's reason."""
    check_config(cfg)
    if cfg.metric not in ("auto", *metrics):
        raise MiniftError(f"metric {cfg.metric!r}: {job} keeps {keeps}: use metric=" + " or ".join(
            f"'{m}'" for m in metrics) + " ('auto' picks the job's)")
    if cfg.packing:
        raise MiniftError(f"{why_no_packing}: use packing=0")
    if cfg.backward != "manual":
        raise MiniftError(f"backward='autograd' runs the model's own loss with autograd; {job}'s backward is written by "
                          f"hand ({backward_in}): use backward='manual'")
    return cfg


def check_fields(settings, choices, ranges):
    """Every field of a settings dataclass (TrainConfig, dpo.DPOSettings, grpo.GRPOSettings) of its declared type,
    one of its `choices` and within its `ranges` ({name: (lowest, whether the lowest is allowed, a hint)}, and where
    a tuple goes on: (..., highest, whether the highest is allowed)), or one MiniftError line that names the first one
    that is not."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        _check_type(f, value)
        if value is None:
            continue
        if f.name in choices and value not in choices[f.name]:
            raise MiniftError(f"{f.name} {value!r} is unknown: choose {', '.join(choices[f.name])}")
        if f.name in ranges:
            low, low_allowed, hint, *upper = ranges[f.name]
            high, high_allowed = upper or (math.inf, False)
            if (not math.isfinite(value) or value < low or (value == low and not low_allowed) or value > high
                    or (value == high and not high_allowed)):
                raise MiniftError(f"{f.name} = {value} is out of range: {hint}")


KINDS = {float: ((int, float), "a number"), int: ((int,), "a whole number"), str: ((str,), "text"),
         bool: ((bool,), "true or false"), list: ((list, tuple), "a list"), object: ((object,), "a value")}


def field_kind(f):
    """(the field's type, whether None is allowed): `float | None` -> (float, True), `int` -> (int, False)."""
    kinds = [k for k in typing.get_args(f.type) or (f.type,) if k is not type(None)]
    return kinds[0], len(kinds) < len(typing.get_args(f.type) or (f.type,))


def _check_type(f, value):
    """bool is not a number here and 8.5 is not a batch size; an int is a fine float; None only where declared."""
    kind, optional = field_kind(f)
    if value is None and optional:
        return
    wanted, what = KINDS[kind]
    if (isinstance(value, bool) and bool not in wanted) or not isinstance(value, wanted):
        raise MiniftError(f"{f.name} = {value!r} is {type(value).__name__}: it must be {what}"
                          + (" (or None)" if optional else ""))
