"""Text generation with a KV cache, for any minift language model (task "lm").

The model's forward takes `caches`, a list with one [] per layer (from `model.new_cache()`): the first call
fills it with every layer's keys and values, each later call feeds only the newest token and appends to it. A
local (sliding-window) layer's attention trims its own cache to the last window - 1 positions, all it can still
see; the attention mask passed here covers the whole sequence, and each layer takes its last columns.
"""
import math
import numbers

import torch

from .errors import MiniftError


@torch.no_grad()
def generate(model, input_ids, max_new_tokens=50, temperature=0.0, top_k=None, top_p=None,
             attention_mask=None, eos_token_id=None, generator=None):
    """Sample continuations with a KV cache. temperature 0 is greedy. Rows are left-padded prompts."""
    check_settings(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=input_ids.device)  # some have several
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    caches = model.new_cache()
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    out, step_ids = input_ids, input_ids
    for _ in range(max_new_tokens):
        logits = model(step_ids, attention_mask, caches=caches)[:, -1].float()
        next_id = pick_next_token(logits, temperature, top_k, top_p, generator)
        next_id = torch.where(done, eos[0], next_id)  # finished rows pad with EOS
        out = torch.cat([out, next_id[:, None]], dim=1)
        done |= torch.isin(next_id, eos)
        if done.all():
            break
        step_ids = next_id[:, None]  # with the cache, only the new token goes through the model
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_id[:, None])], dim=1)
    model.train(was_training)
    return out


def check_settings(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p):
    """Refuse, before any work, what would crash deep inside torch or quietly print gibberish: a negative
    temperature turns the distribution upside down (the least likely token first), top_k 0 has no kth value."""
    def whole(x):
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not whole(max_new_tokens) or max_new_tokens < 1:
        raise MiniftError(f"max_new_tokens={max_new_tokens!r}: give a whole number >= 1 (how many tokens to add)")
    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
        raise MiniftError(f"temperature={temperature!r}: give a finite number >= 0 (0 is greedy, 1 samples "
                          f"the model's own probabilities, higher is more random)")
    if top_k is not None and (not whole(top_k) or top_k < 1):
        raise MiniftError(f"top_k={top_k!r}: give a whole number >= 1 (sample among the k likeliest tokens), "
                          f"or leave it out")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):  # also refuses nan
        raise MiniftError(f"top_p={top_p!r}: give a number above 0 and at most 1 (sample among the likeliest "
                          f"tokens that together reach this probability), or leave it out")
    if input_ids.shape[-1] == 0 or (attention_mask is not None and not attention_mask.bool().any(-1).all()):
        raise MiniftError("the prompt is empty: give some text to continue")


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
