"""minift: fine-tuning from scratch in pure PyTorch, with a hand-written backward for every layer.

    import minift
    model = minift.load("minilm", task="classify", num_labels=3)   # a name or a checkpoint folder
    tok = minift.load_tokenizer("minilm")
    batch = tok(["what a day", "meh"])                              # input_ids, attention_mask, ...
    logits = model(batch["input_ids"], batch["attention_mask"])
"""
import torch

from .batching import TrainData
from .checkpoints import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .errors import MiniftError
from .evaluate import evaluate, format_metrics
from .hub import download, resolve_model
from .tokenizer import Tokenizer
from .train import seed_everything, train


def load(name_or_path, task="classify", num_labels=None, pooling=None, dtype=torch.float32, verbose=True):
    """A pretrained model by name ("minilm", "gpt2") or checkpoint folder, with a head for `task`:
    "classify" (sequence classification), "lm" (GPT-2 causal LM) or "encode" (BERT hidden states)."""
    return load_checkpoint(resolve_model(name_or_path), task, num_labels, pooling, dtype, verbose)


def load_tokenizer(name_or_path):
    return Tokenizer.from_file(resolve_model(name_or_path))


__all__ = ["load", "load_tokenizer", "load_checkpoint", "save_checkpoint", "Tokenizer", "TrainConfig", "TrainData", "train",
           "evaluate", "format_metrics", "seed_everything", "download", "resolve_model", "MiniftError"]
