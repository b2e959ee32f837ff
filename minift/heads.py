"""What every family shares above the layers: positions, pooling and row picking with their backward, the tied
LM head, and the four task contracts (classify, tag, lm, encode) that the loop and `evaluate` rely on.

The model contract, written down once. A minift task model is one of the classes below and has:
- `config`, a family config with `model_type` (checkpoints.py finds the family by it),
- `task`: "classify" (logits (batch, labels)), "tag" (logits (batch, time, tags)), "lm" (logits (batch, time,
  vocab)) or "encode" (hidden states),
- `forward(input_ids, attention_mask=None, ...)` -> logits,
- `loss(logits, labels, num_targets=None, class_weights=None)` -> (loss, dlogits); dlogits is None in eval
  mode or with autograd on,
- `count_targets(labels)`: how many supervised targets the labels hold (the loss divides by the count over
  a whole optimizer step, so micro-batches add up to the big batch),
- `backward(dlogits)`: fills every trainable parameter's `.grad`.
The loop asks `model.task`, never `isinstance`.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .errors import MiniftError
from .generate import generate
from .layers import accumulate_grad, cast_for_matmul, check_targets, cross_entropy, keeps_for_backward


def positions_from_mask(attention_mask, offset=0):
    """Position of each token counted over the real tokens only, so left padding does not shift them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0) + offset


def attention_allowed(attention_mask, T, past=0, document_ids=None, window=None):
    """Which keys each query may see, as (batch, 1, T, past + T) booleans: key j for query i if j <= i (causal)
    and j is a real token (padding mask) and, in a packed row (batching.pack_examples: document_ids 1, 2, ...
    per token, 0 on padding), j is in i's own text: a block-diagonal causal mask, so packed texts never see each
    other. With a sliding `window` w (a local layer of Mistral, Qwen2, Gemma), also j > i - w: the query and the
    w - 1 keys before it, as transformers counts (its sliding_window_overlay). It is a constant of the attention:
    the softmax backward needs nothing more (a masked probability is 0, and so is its gradient), so the window
    holds in the backward too. Indices count padded slots: padding sits at one end of a row, so between two real
    tokens the distance is the same as between their positions."""
    causal = torch.ones(past + T, past + T, dtype=torch.bool, device=attention_mask.device).tril()
    if window is not None:
        causal = causal.triu(1 - window)  # the band i - w < j <= i
    allowed = causal[past:][None, None] & attention_mask.bool()[:, None, None, :]
    if document_ids is not None:
        allowed = allowed & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return allowed


def cached_positions(caches, attention_mask, T, windowed=False):
    """How many positions came before these T in a generation with `caches` (one generate.KVCache per layer): the
    attention mask covers them all (generate passes it whole). Without a mask, the first layer's cache holds them all,
    unless the model has local layers, whose caches keep only their window (`windowed`): then the mask is needed."""
    if attention_mask is not None:
        return attention_mask.shape[1] - T
    if not caches or not caches[0].length:
        return 0
    if windowed:
        raise MiniftError("this model's sliding-window layers keep only their window in the cache: pass the "
                          "attention_mask of the whole sequence so far (past and new tokens), as generate() does")
    return caches[0].length


def last_real_token(attention_mask):
    """Index of the last 1 in each row of the mask: works for left and right padding alike."""
    T = attention_mask.shape[1]
    return (attention_mask * torch.arange(T, device=attention_mask.device)).argmax(-1)


def pick_rows(hidden, rows):
    """hidden[b, rows[b]] for every b: one vector per text (BERT's [CLS], a decoder's last token)."""
    return hidden[torch.arange(len(hidden), device=hidden.device), rows]


def pick_rows_backward(dpicked, rows, hidden_shape):
    """The gradient of pick_rows: each picked row gets its gradient back, every other position gets 0."""
    dhidden = torch.zeros(hidden_shape, dtype=dpicked.dtype, device=dpicked.device)
    dhidden[torch.arange(hidden_shape[0], device=dpicked.device), rows] = dpicked
    return dhidden


def mean_pool(hidden, attention_mask):
    """The mean of the real tokens' vectors. Returns (pooled, kept): kept = (mask, count) is what the backward
    needs, since d pooled / d hidden[t] = mask[t] / count."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    count = mask.sum(1).clamp(min=1)
    return (hidden * mask).sum(1) / count, (mask, count)


def mean_pool_backward(dpooled, kept):
    mask, count = kept
    return dpooled.unsqueeze(1) * mask / count.unsqueeze(1)


class TiedLMHead(nn.Module):
    """The LM head that IS the token embedding (weight tying: GPT-2, SmolLM2): logits = h @ E^T. One tensor,
    two uses: this use's gradient dE = dlogits^T h adds to the embedding's own. It owns no parameter; the
    model passes E in, so the checkpoint has the tensor once."""

    def forward(self, hidden, weight):
        hidden = cast_for_matmul(hidden)
        if keeps_for_backward(self) and weight.requires_grad:
            self.hidden = hidden  # keeps: the head's input, for dE += dlogits^T @ hidden
        return hidden @ weight.T

    def backward(self, dlogits, weight):
        dlogits = cast_for_matmul(dlogits)
        if weight.requires_grad:
            hidden = self.hidden
            del self.hidden
            accumulate_grad(weight, dlogits.reshape(-1, dlogits.shape[-1]).T @ hidden.reshape(-1, hidden.shape[-1]))
        return dlogits @ weight  # the gradient of the hidden states


def chunked_lm_loss(hidden, weight, targets, num_targets, chunk, softcap=None):
    """The LM head and the cross-entropy together, `chunk` positions at a time, forward and backward in one go:
    the (positions, vocab) logits and their gradient exist for one chunk only (for SmolLM2 at 4 x 1024 tokens the
    whole batch's are 0.8 GB each in fp32). hidden (N, d) and targets (N,), already shifted; weight (vocab, d), so
    logits = hidden @ weight.T (then `softcap`, a layers.SoftCap, for Gemma 2). The head's weight gradient is added
    into weight.grad chunk by chunk (for a tied head that is the embedding's .grad, which its own backward adds to
    later). Returns (loss, dhidden)."""
    num_targets = check_targets(int((targets != -100).sum()) if num_targets is None else num_targets)
    hidden = cast_for_matmul(hidden)
    head = cast_for_matmul(weight)  # under bf16 autocast: the (vocab, d) matrix cast once, not twice in every chunk
    loss = torch.zeros((), device=hidden.device)  # a micro-batch with no target adds 0, as in the plain loss
    dhidden = torch.zeros_like(hidden)
    for start in range(0, len(hidden), chunk):
        part = slice(start, start + chunk)
        if not (targets[part] != -100).any():
            continue  # nothing to learn here (a prompt, padding): the gradient stays 0, the logits are never made
        logits = hidden[part] @ head.T
        if softcap is not None:
            logits = softcap(logits)  # (it keeps this chunk's tanh, and its backward frees it)
        part_loss, dlogits = cross_entropy(logits, targets[part], num_targets)
        loss = loss + part_loss
        if softcap is not None:
            dlogits = softcap.backward(dlogits)
        dlogits = cast_for_matmul(dlogits)
        if weight.requires_grad:
            accumulate_grad(weight, dlogits.T @ hidden[part])  # dW = sum over chunks of dlogits^T @ hidden
        dhidden[part] = dlogits @ head
    return loss, dhidden


def checked_labels(labels, device):
    """Labels as a LongTensor of class or token ids on `device`, or one line saying what they must be."""
    try:
        labels = torch.as_tensor(labels, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise MiniftError(f"labels must be a tensor (or list) of class or token ids, not {type(labels).__name__}") from None
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise MiniftError(f"labels are {labels.dtype}: give class or token ids, whole numbers (-100 where nothing is "
                          "learnt), e.g. torch.tensor([2, 0]) or labels.long()")
    return labels.long()


def check_input_ids(input_ids, vocab_size):
    """Token ids as a model takes them: an integer tensor (batch, time) of ids below vocab_size, or one line saying
    what was given instead (a string, floats, one flat list ...), not an error from deep inside torch. The range is
    checked on the CPU only (on a GPU it would make every forward wait for the device)."""
    if not isinstance(input_ids, torch.Tensor):
        raise MiniftError(f"input_ids must be a tensor of token ids (batch, time), e.g. tok(texts)['input_ids'], not "
                          f"{type(input_ids).__name__}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool or input_ids.dim() != 2:
        raise MiniftError(f"input_ids must be whole-number token ids of shape (batch, time), not {input_ids.dtype} of "
                          f"shape {tuple(input_ids.shape)}: e.g. tok(texts)['input_ids'], or ids[None] for one text")
    if input_ids.device.type == "cpu" and input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) \
            < vocab_size:
        raise MiniftError(f"token ids from {int(input_ids.min())} to {int(input_ids.max())}, but this model's vocabulary "
                          f"has {vocab_size}: encode the texts with this model's own tokenizer")


class TaskModel(nn.Module):
    """What every model carries beside its weights: set by load_checkpoint and the jobs, saved with it by
    checkpoints.save_checkpoint. Class-level defaults, so a model built directly from its config has them too.
    Calling a model checks its token ids first (check_input_ids), then runs its forward."""

    label_names = None  # a classifier's class names (a tagger's tags), in the order of its outputs (config.json's id2label)
    max_length = None  # the tokens per text it was trained with: predict and evaluate cut texts there
    tokenizer_file = None  # its tokenizer.json, copied beside a saved checkpoint
    source = None  # the folder it was loaded from (a LoRA adapter names it as its base model)

    def __call__(self, input_ids, *args, **kwargs):
        check_input_ids(input_ids, self.config.vocab_size)
        return super().__call__(input_ids, *args, **kwargs)


class Classifier(TaskModel):
    """A text classifier: one target per text, softmax cross-entropy over the classes."""
    task = "classify"

    def loss(self, logits, labels, num_targets=None, class_weights=None):
        """Mean cross-entropy over the examples (or over `num_targets` for a whole accumulated step)."""
        labels = checked_labels(labels, logits.device)  # a Python list of ids works too
        if labels.shape != logits.shape[:1]:
            raise MiniftError(f"{len(logits)} rows of logits but labels of shape {tuple(labels.shape)}: give one class "
                              "id per row")
        return cross_entropy(logits, labels, num_targets, class_weights, want_grad=self.training)

    def count_targets(self, labels):
        return len(labels)


class TokenClassifier(TaskModel):
    """A token tagger (named entities): logits (batch, time, tags), one softmax cross-entropy per labelled token.
    Labels -100 (special tokens, a word's later pieces, padding: tasks.encode_tagging) are not targets. The loss's
    gradient is a classifier's, token by token: (softmax - onehot) / targets on each labelled token, 0 elsewhere."""
    task = "tag"

    def loss(self, logits, labels, num_targets=None, class_weights=None):
        """Mean cross-entropy over the labelled tokens (or over `num_targets` for a whole accumulated step)."""
        labels = checked_labels(labels, logits.device)
        if labels.shape != logits.shape[:2]:
            raise MiniftError(f"logits for {tuple(logits.shape[:2])} (batch, positions) but labels of shape "
                              f"{tuple(labels.shape)}: give one label per token (-100 where nothing is learnt)")
        loss, dlogits = cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), num_targets,
                                      class_weights, want_grad=self.training)
        return loss, None if dlogits is None else dlogits.view(logits.shape)

    def count_targets(self, labels):
        return int((torch.as_tensor(labels) != -100).sum())


class CausalLM(TaskModel):
    """A language model: position t predicts token t+1; labels -100 (prompt, padding) are not targets.
    Its forward also takes `caches` (a list from new_cache()), which generate() uses. Each family gives
    `head_weight()`, the matrix W of logits = hidden @ W.T (the token embedding when the head is tied)."""
    task = "lm"
    loss_chunk = 0  # TrainConfig.chunked_loss, set by train.prepare_model: positions per chunk of the loss
    hidden_only = False  # set by hidden_states() for one forward
    last_only = False  # set by last_logits() for one forward

    def __init__(self):
        super().__init__()
        # a layers.SoftCap on the logits (Gemma 2 sets one), which the chunked loss applies too. An attribute of
        # the instance, not the class: nn.Module keeps a submodule apart, so a class-level None would hide it
        self.final_softcap = None

    def head_is_deferred(self):
        """True in a training forward with the chunked loss: forward then returns the hidden states, not the
        logits, and loss() runs the head itself, a chunk of positions at a time (chunked_lm_loss); backward gets
        the hidden states' gradient. Evaluation and generation get the logits (but inside hidden_states())."""
        return self.hidden_only or (self.loss_chunk > 0 and keeps_for_backward(self))

    def hidden_states(self, input_ids, attention_mask=None):
        """The last hidden states, before the LM head, in any mode: for a loss that runs the head itself a chunk of
        positions at a time (a distillation teacher's, distill.py: its (positions, vocab) logits never exist whole)."""
        self.hidden_only = True
        try:
            return self(input_ids, attention_mask)
        finally:
            self.hidden_only = False

    def last_logits(self, input_ids, attention_mask=None, caches=None):
        """The logits of each row's last position only, (batch, vocab): all that generation's prefill and a
        multiple-choice context need. The family's forward cuts the hidden states to that position before its head:
        the head on every position of a prompt is a (positions x vocab) matmul, a fifth of SmolLM2's forward and
        more than half of Gemma 3 270M's (262,144 words). transformers' generate does the same (logits_to_keep=1)."""
        self.last_only = True
        try:
            return self(input_ids, attention_mask, caches=caches)[:, -1]
        finally:
            self.last_only = False

    def loss(self, logits, labels, num_targets=None, class_weights=None):
        """Next-token cross-entropy over the supervised tokens."""
        labels = checked_labels(labels, logits.device)
        if labels.shape != logits.shape[:2]:
            raise MiniftError(f"logits for {tuple(logits.shape[:2])} (batch, positions) but labels of shape "
                              f"{tuple(labels.shape)}: give one label per position (-100 where nothing is learnt)")
        # shift the labels, not the logits: the last position gets the target -100 (nothing follows it), so
        # the loss skips it and its gradient is 0, with no copy of the (batch, time, vocab) logits
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        if self.head_is_deferred():  # `logits` are the hidden states: the head and the loss a chunk at a time
            hidden = logits
            loss, dhidden = chunked_lm_loss(hidden.reshape(-1, hidden.shape[-1]), self.head_weight(),
                                            targets.reshape(-1), num_targets, self.loss_chunk, self.final_softcap)
            return loss, dhidden.view(hidden.shape)
        loss, dlogits = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), num_targets,
                                      want_grad=self.training)
        return loss, None if dlogits is None else dlogits.view(logits.shape)

    def count_targets(self, labels):
        return int((torch.as_tensor(labels)[:, 1:] != -100).sum())

    def generate(self, input_ids, **kwargs):
        """Continue the prompts: see minift.generate.generate for the options."""
        return generate(self, input_ids, **kwargs)


class Backbone(TaskModel):
    """A family's body without a task head (BertModel, GPT2Model, LlamaModel): token ids -> contextual vectors,
    for embeddings; it has no loss of its own. It lists its `stages()` in forward order (freeze.py)."""
    task = "encode"
