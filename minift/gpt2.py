"""GPT-2, a decoder-only transformer, built from minift's layers, with its backward and a KV-cache sampler.

Module names follow the Hugging Face checkpoint keys (`wte`, `h.0.attn.c_attn`, `ln_f` ...), as nanoGPT
does. One difference hides in the checkpoint: GPT-2 stores `c_attn`, `c_proj` and `c_fc` as Conv1D with
weights of shape (in, out); ours are ordinary Linear (out, in), and checkpoints.py transposes on load and save.
"""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .bert import merge_heads, positions_from_mask, split_heads
from .errors import MiniftError
from .layers import (GELU, Attention, Dropout, Embedding, LayerNorm, Linear, accumulate_grad, cast_for_matmul,
                     cross_entropy)


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
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
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


class GPT2Model(nn.Module):
    """Token ids -> last hidden states (after ln_f)."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.wte = Embedding(c.vocab_size, c.n_embd)
        self.wpe = Embedding(c.n_positions, c.n_embd)
        self.drop = Dropout(c.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(c) for _ in range(c.n_layer))
        self.ln_f = LayerNorm(c.n_embd, c.layer_norm_epsilon)

    def forward(self, input_ids, attention_mask=None, position_ids=None, caches=None):
        """caches: a list of one [] per layer, filled and extended by generate(); None when training."""
        B, T = input_ids.shape
        past = caches[0][0].shape[2] if caches and caches[0] else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, past:]
        if past + T > self.config.n_positions:
            raise MiniftError(f"sequence of {past + T} tokens is longer than the model's {self.config.n_positions} "
                              "positions: lower max_length (or max_new_tokens)")
        # query i may see key j if j <= i (causal) and j is a real token (padding mask)
        causal = torch.ones(past + T, past + T, dtype=torch.bool, device=input_ids.device).tril()[past:]
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        for i, block in enumerate(self.h):
            x = block(x, allowed, caches[i] if caches is not None else None)
        return self.ln_f(x)

    def backward(self, dhidden):
        d = self.ln_f.backward(dhidden)
        for block in reversed(self.h):
            d = block.backward(d)
        d = self.drop.backward(d)
        self.wte.backward(d)
        self.wpe.backward(d)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with its language-model head, which is the token embedding itself (weight tying)."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.transformer = GPT2Model(c)

    def forward(self, input_ids, attention_mask=None, position_ids=None, caches=None):
        hidden = cast_for_matmul(self.transformer(input_ids, attention_mask, position_ids, caches))
        if self.training and not torch.is_grad_enabled():
            self.hidden = hidden  # keeps: the input of the head, for d(wte) += dlogits.T @ hidden
        return hidden @ self.transformer.wte.weight.T  # tied: logits = h @ wte.T

    def loss(self, logits, labels, num_targets=None, class_weights=None):
        """Next-token cross-entropy: position t predicts labels[t+1]; -100 labels (prompt, padding) are skipped."""
        # shift the labels, not the logits: the last position gets the target -100 (nothing follows it), so
        # the loss skips it and its gradient is 0, with no copy of the (batch, time, vocab) logits
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)
        loss, dlogits = cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), num_targets,
                                      want_grad=self.training)
        return loss, None if dlogits is None else dlogits.view(logits.shape)

    def count_targets(self, labels):
        return int((labels[:, 1:] != -100).sum())

    def backward(self, dlogits):
        hidden, wte = self.hidden, self.transformer.wte.weight
        del self.hidden
        dlogits = cast_for_matmul(dlogits)
        # the second use of the tied weight: its gradient adds to the embedding's own
        accumulate_grad(wte, dlogits.reshape(-1, dlogits.shape[-1]).T @ hidden.reshape(-1, hidden.shape[-1]))
        self.transformer.backward(dlogits @ wte)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=50, temperature=0.0, top_k=None, top_p=None,
                 attention_mask=None, eos_token_id=None, generator=None):
        """Sample continuations with a KV cache. temperature 0 is greedy. Rows are left-padded prompts."""
        was_training = self.training
        self.eval()
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        caches = [[] for _ in self.transformer.h]
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        out, step_ids = input_ids, input_ids
        for _ in range(max_new_tokens):
            logits = self(step_ids, attention_mask, caches=caches)[:, -1].float()
            next_id = pick_next_token(logits, temperature, top_k, top_p, generator)
            next_id = torch.where(done, torch.full_like(next_id, eos), next_id)  # finished rows pad with EOS
            out = torch.cat([out, next_id[:, None]], dim=1)
            done |= next_id == eos
            if done.all():
                break
            step_ids = next_id[:, None]  # with the cache, only the new token goes through the model
            attention_mask = torch.cat([attention_mask, torch.ones_like(next_id[:, None])], dim=1)
        self.train(was_training)
        return out


def pick_next_token(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Greedy (temperature 0), or sample from softmax(logits / T) kept to the top-k and/or top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


class GPT2ForSequenceClassification(nn.Module):
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
        T = attention_mask.shape[1]
        # index of the last 1 in the mask: works for left and right padding alike
        self.last = (attention_mask * torch.arange(T, device=hidden.device)).argmax(-1)
        self.hidden_shape = hidden.shape
        return self.score(hidden[torch.arange(len(hidden)), self.last])

    def loss(self, logits, labels, num_targets=None, class_weights=None):
        return cross_entropy(logits, labels, num_targets, class_weights, want_grad=self.training)

    def count_targets(self, labels):
        return len(labels)

    def backward(self, dlogits):
        dlast = self.score.backward(dlogits)
        dhidden = torch.zeros(self.hidden_shape, dtype=dlast.dtype, device=dlast.device)
        dhidden[torch.arange(len(dlast)), self.last] = dlast
        self.transformer.backward(dhidden)
