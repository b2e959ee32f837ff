"""GPT-2, a decoder-only transformer, built from minift's layers, with its backward and a KV-cache sampler.

Module names follow the Hugging Face checkpoint keys (`wte`, `h.0.attn.c_attn`, `ln_f` ...), as nanoGPT
does. One difference hides in the checkpoint: GPT-2 stores `c_attn`, `c_proj` and `c_fc` as Conv1D with
weights of shape (in, out); ours are ordinary Linear (out, in), and checkpoints.py transposes on load and save.
"""
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..errors import MiniftError
from ..generate import KVCache
from ..heads import (Backbone, CausalLM, Classifier, TiedLMHead, attention_allowed, last_real_token, pick_rows,
                     pick_rows_backward, positions_from_mask)
from ..layers import (GELU, Attention, Dropout, Embedding, LayerNorm, Linear, frozen_below, keeps_for_backward, merge_heads,
                     split_heads)
from ..recompute import block_backward, block_forward


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"  # the tanh approximation of GELU
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int = 50256
    pad_token_id: int | None = None
    model_type: str = "gpt2"
    num_labels: int = 2  # for GPT2ForSequenceClassification

    @classmethod
    def from_dict(cls, d):
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu", "gelu_pytorch_tanh"):
            raise MiniftError(f"activation_function {d['activation_function']!r} is not supported: use gelu_new or gelu")
        known = {f.name for f in fields(cls)}
        if "id2label" in d and "num_labels" not in d:
            d = {**d, "num_labels": len(d["id2label"])}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})


class GPT2Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = Linear(c.n_embd, 3 * c.n_embd)  # q, k and v in one matmul
        self.attn = Attention(c.attn_pdrop)
        self.c_proj = Linear(c.n_embd, c.n_embd)
        self.resid_dropout = Dropout(c.resid_pdrop)

    def forward(self, x, allowed, cache=None):
        q, k, v = (split_heads(t, self.n_head) for t in self.c_attn(x).chunk(3, dim=-1))
        if cache is not None:  # generation: keys and values of earlier tokens are kept, not recomputed
            k, v = cache.add(k, v)
        return self.resid_dropout(self.c_proj(merge_heads(self.attn(q, k, v, allowed))))

    def backward(self, dout):
        dy = self.c_proj.backward(self.resid_dropout.backward(dout))
        dq, dk, dv = self.attn.backward(split_heads(dy, self.n_head))
        return self.c_attn.backward(torch.cat([merge_heads(dq), merge_heads(dk), merge_heads(dv)], dim=-1))


class GPT2MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = Linear(c.n_embd, c.n_inner or 4 * c.n_embd)
        self.act = GELU("none" if c.activation_function == "gelu" else "tanh")
        self.c_proj = Linear(c.n_inner or 4 * c.n_embd, c.n_embd)
        self.dropout = Dropout(c.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))

    def backward(self, dout):
        return self.c_fc.backward(self.act.backward(self.c_proj.backward(self.dropout.backward(dout))))


class GPT2Block(nn.Module):
    """Pre-norm residual block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, c):
        super().__init__()
        self.ln_1 = LayerNorm(c.n_embd, c.layer_norm_epsilon)
        self.attn = GPT2Attention(c)
        self.ln_2 = LayerNorm(c.n_embd, c.layer_norm_epsilon)
        self.mlp = GPT2MLP(c)

    def forward(self, x, allowed, cache=None):
        x = x + self.attn(self.ln_1(x), allowed, cache)
        return x + self.mlp(self.ln_2(x))

    def backward(self, dout):
        # a residual passes its gradient through unchanged and adds the branch's
        dx = dout + self.ln_2.backward(self.mlp.backward(dout))
        return dx + self.ln_1.backward(self.attn.backward(dx))


class GPT2Model(Backbone):
    """Token ids -> last hidden states (after ln_f)."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.wte = Embedding(c.vocab_size, c.n_embd)
        self.wpe = Embedding(c.n_positions, c.n_embd)
        self.drop = Dropout(c.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(c) for _ in range(c.n_layer))
        self.ln_f = LayerNorm(c.n_embd, c.layer_norm_epsilon)

    def forward(self, input_ids, attention_mask=None, position_ids=None, caches=None, document_ids=None):
        """caches: a list of one [] per layer, filled and extended by generate(); None when training."""
        B, T = input_ids.shape
        past = caches[0].length if caches else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, past:]
        if past + T > self.config.n_positions:
            raise MiniftError(f"sequence of {past + T} tokens is longer than the model's {self.config.n_positions} "
                              "positions: lower max_length (or max_new_tokens)")
        allowed = attention_allowed(attention_mask, T, past, document_ids)  # causal, padding, packed texts apart
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for i, block in enumerate(self.h):
            x = block(x, allowed, caches[i]) if caches is not None else block_forward(block, x, allowed)
        return self.ln_f(x)

    def new_cache(self, capacity=0):
        return [KVCache(capacity) for _ in self.h]

    def stages(self):
        """The parts of the forward in order; backward stops below the lowest trainable one (freeze.py)."""
        return [self.wte, self.wpe, self.drop, *self.h]

    def backward(self, dhidden):
        d = self.ln_f.backward(dhidden)
        for block in reversed(self.h):
            if frozen_below(block):
                return  # no trainable weight below this block: no gradient left to compute
            d = block_backward(block, d)
        if frozen_below(self.drop):
            return  # both embeddings frozen
        d = self.drop.backward(d)
        self.wte.backward(d)
        self.wpe.backward(d)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 with its language-model head, which is the token embedding itself (weight tying)."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.transformer = GPT2Model(c)
        self.head = TiedLMHead()  # no parameter of its own: the head is wte

    def head_weight(self):
        return self.transformer.wte.weight  # tied: logits = h @ wte.T

    def forward(self, input_ids, attention_mask=None, position_ids=None, caches=None, document_ids=None):
        hidden = self.transformer(input_ids, attention_mask, position_ids, caches, document_ids)
        if self.last_only:  # last_logits(): the head on each row's last position only
            hidden = hidden[:, -1:]
        if self.head_is_deferred():
            return hidden  # the chunked loss runs the head (heads.chunked_lm_loss)
        return self.head(hidden, self.head_weight())

    def new_cache(self, capacity=0):
        return self.transformer.new_cache(capacity)

    def backward(self, dlogits):
        if self.head_is_deferred():  # the chunked loss did the head's backward: this is the hidden states' gradient
            return self.transformer.backward(dlogits)
        self.transformer.backward(self.head.backward(dlogits, self.head_weight()))


class GPT2ForSequenceClassification(Classifier):
    """GPT-2 reads left to right, so the last real (non-pad) token is the one that has seen the whole text."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.transformer = GPT2Model(c)
        self.score = Linear(c.n_embd, c.num_labels, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.transformer(input_ids, attention_mask, position_ids)
        last = last_real_token(attention_mask)
        if keeps_for_backward(self):
            self.last, self.hidden_shape = last, hidden.shape  # keeps: where the picked rows came from
        return self.score(pick_rows(hidden, last))

    def backward(self, dlogits):
        dhidden = pick_rows_backward(self.score.backward(dlogits), self.last, self.hidden_shape)
        del self.last, self.hidden_shape
        self.transformer.backward(dhidden)


# ---------------------------------------------------------------------------------------------------------
# The family's checkpoint knowledge, which checkpoints.py looks up by config.json's model_type.

MODEL_TYPES = ("gpt2",)
Config = GPT2Config
TASKS = {"classify": GPT2ForSequenceClassification, "lm": GPT2LMHeadModel, "encode": GPT2Model}
NEW_HEADS = ("score.",)  # ours, may be missing from a file: trained from scratch
LABEL_HEAD = "score.weight"  # the layer with one row per class
DEFAULT_TASK = "lm"  # what the pretrained checkpoint computes: next-token logits
UNUSED_HEADS = ("lm_head.",)  # the LM head in a file is the token embedding again (tied): nothing to load
FAN_IN_FAN_OUT = True  # Conv1D: W is (in, out) in HF's model (peft's fan_in_fan_out for LoRA adapters)
CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # stored (in, out) in GPT-2 files
ARCHITECTURE = {GPT2ForSequenceClassification: "GPT2ForSequenceClassification", GPT2LMHeadModel: "GPT2LMHeadModel",
                GPT2Model: "GPT2Model"}


def hf_to_ours(key, tensor, model):
    """A checkpoint key -> (our parameter name, tensor), or (None, tensor) for a buffer we do not keep.
    A GPT2Model file says `h.0...`, a task model's `transformer.h.0...`; Conv1D weights are transposed."""
    if key.endswith((".attn.bias", ".attn.masked_bias")):  # old files keep the causal mask as a buffer
        return None, tensor
    if isinstance(model, GPT2Model):
        key = key[len("transformer."):] if key.startswith("transformer.") else key
    elif not key.startswith(("transformer.", "score.", "lm_head.")):
        key = "transformer." + key
    return key, tensor.T if key.endswith(CONV1D) else tensor  # Conv1D (in, out) -> Linear (out, in)


def hf_state_dict(model):
    """Our parameters under the names and layouts transformers expects (a tied weight is listed once; HF
    re-ties lm_head on load)."""
    return {name: p.detach().T if name.endswith(CONV1D) else p.detach() for name, p in model.named_parameters()}


def architecture(model):
    return ARCHITECTURE[type(model)]
