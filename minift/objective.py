"""What the loop trains: an objective. The model's own loss is one (SupervisedObjective, below); a job that trains
another way gives train() its own in TrainData.objective (dpo.PreferenceObjective, grpo.GRPOObjective).

The objective contract, written once (as heads.py writes the model's). An objective has:
- `collate(rows, device)`: encoded examples -> one micro-batch, a dict of tensors with "input_ids" and
  "attention_mask" (the loop counts their tokens for the progress bar);
- `memory_batch(rows, device)`: the largest batch a step's forward sees for these rows (the memory estimate);
- `gradients(model, micro_batches, sync)` -> (loss, metrics): one optimizer step's loss with its gradients added
  into .grad, divided by what the whole step holds (every micro-batch, and every process through `sync.count`),
  so that micro-batches and processes add up to one big batch; metrics: figures for the log line;
- `evaluate(model, examples, device, batch_size)` -> metrics: forward only, in eval mode (no dropout);
- `metric(model, cfg)` -> the name of the figure of evaluate() that chooses best/: cfg.metric, or with
  metric='auto' the objective's own; a figure it does not compute is refused in one line;
- `settings()`: what a resume must find the same (JSON, or None when nothing beyond TrainConfig and the data);
- `check(model, data, cfg)`: refuse, in one line and before any step, what it cannot honour (a setting, a
  model, examples of another kind).
train.py and step.py call only these: they never ask which objective they hold. A new way to train is one new
objective and its settings class (CONTRIBUTING.md, "Add a job").
"""
import torch

from .batching import collate
from .errors import MiniftError
from .evaluate import evaluate


class SupervisedObjective:
    """The model's own loss (heads.py: model.loss and model.backward): a classifier's cross-entropy over its
    classes, a language model's over the next tokens. Examples: tasks.py's ({"input_ids", "label"} or
    {"input_ids", "labels"}); a micro-batch: batching.collate's. backward: "manual" (the hand-written backward) or
    "autograd" (PyTorch's, for a layer someone added without writing its backward)."""

    def __init__(self, pad_id=0, padding_side="right", class_weights=None, backward="manual"):
        self.pad_id, self.padding_side, self.class_weights, self.backward = pad_id, padding_side, class_weights, backward

    def collate(self, rows, device):
        return {k: v.to(device) for k, v in collate(rows, self.pad_id, self.padding_side).items()}

    def memory_batch(self, rows, device):  # a step's forward sees the rows as they are
        return self.collate(rows, device)

    def gradients(self, model, batches, sync=None):
        """Each micro-batch's forward, loss and backward. The loss is divided by the count of targets in the whole
        step, so grad_accum=4 gives the gradient of one big batch (and N processes that of one: sync adds up every
        process's count). Returns (loss, {}): the model's own loss has no figures beyond it."""
        num_targets = sum(model.count_targets(b["labels"]) for b in batches)
        if sync is not None:
            num_targets = sync.count(num_targets)
        return sum(forward_backward(model, b, num_targets, self.backward, self.class_weights) for b in batches), {}

    def evaluate(self, model, examples, device, batch_size=64):
        """Loss (weighted by targets) and, for a classifier, accuracy, macro-F1, per class, the confusion matrix."""
        return evaluate(model, examples, self.pad_id, batch_size=batch_size, padding_side=self.padding_side,
                        label_names=model.label_names, device=device)

    def metric(self, model, cfg):
        offered = {"classify": ("accuracy", "macro_f1", "loss"), "tag": ("f1", "loss")}.get(model.task, ("loss",))
        if cfg.metric == "auto":
            return offered[0]
        if cfg.metric == "reward":
            raise MiniftError("metric 'reward' is GRPO's (grpo.py: the mean reward of its answers); judge this task by "
                              + " or ".join(offered))
        if cfg.metric not in offered:
            if model.task == "lm":
                raise MiniftError(f"metric {cfg.metric!r}: a language model is judged by its validation loss: use "
                                  "metric='loss'")
            raise MiniftError(f"metric {cfg.metric!r}: a {'tagger' if model.task == 'tag' else 'classifier'} is judged by "
                              f"{', '.join(offered)}")
        return cfg.metric

    def settings(self):
        return None  # nothing beyond TrainConfig (compared on resume) and the data (fingerprinted)

    def check(self, model, data, cfg):
        self.metric(model, cfg)
        if model.task == "lm" and cfg.head_lr_scale != 1:
            raise MiniftError("head_lr_scale is for a classifier's new head; a language model's head is pretrained: use 1")
        kind = "label" if model.task == "classify" else "labels"
        if any(kind not in e for e in data.train[:1] + (data.validation or [])[:1]):
            other = "a classifier" if kind == "labels" else "a language model"
            raise MiniftError(f"these examples are for {other}: encode them for a {model.task!r} model "
                              f"(tasks.encode_classification for classify, tasks.encode_instruction for lm)")


def forward_backward(model, batch, num_targets, backward="manual", class_weights=None):
    """The model's own loss of one micro-batch, with the gradients added into .grad. Returns the loss (a float)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    weights = None if class_weights is None else class_weights.to(batch["input_ids"].device)
    if backward == "manual":
        with torch.no_grad():  # nothing hidden: no graph is built, our backward does the work
            logits = model(**inputs)
            loss, dlogits = model.loss(logits, batch["labels"], num_targets, weights)
            model.backward(dlogits)
    else:  # autograd: for layers someone added without writing their backward
        loss, _ = model.loss(model(**inputs), batch["labels"], num_targets, weights)
        loss.backward()
    return loss.item()


def objective_of(data, cfg):
    """The objective a run trains: the job's own (data.objective), else the model's own loss on data's padding."""
    if data.objective is not None:
        return data.objective
    return SupervisedObjective(data.pad_id, data.padding_side, data.class_weights, cfg.backward)
