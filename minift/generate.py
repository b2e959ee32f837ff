"""Text generation with a KV cache, for any minift language model (task "lm").

One token's trip: the model's forward takes `caches` (from `model.new_cache()`: one KVCache per layer), and each
attention layer writes the keys and values of the step's tokens into its cache (KVCache.add: in place, into
buffers long enough for the whole generation) and attends over everything cached so far; the last position's
logits pick the next token (pick_next_token), and that token alone is the next step's input. A local
(sliding-window) layer's cache lets go of what no later token can see and keeps its window; the attention mask
passed here covers the whole sequence, and each layer takes its last columns. A row that has said EOS leaves the
batch: its cache rows are dropped and the model does no more work for it.
"""
import math
import numbers

import torch
import torch.nn.functional as F

from .errors import MiniftError


class KVCache:
    """One attention layer's keys and values during generation: buffers (rows, k/v heads, positions, head_dim)
    written in place, the first `length` positions filled. `capacity`: the positions to make room for at once
    (generate: the prompt and every new token, so the buffers are never copied to grow; 0: start at the first
    step's size and double when full, as a Python list grows). `window`: a local layer's sliding window, or None."""

    def __init__(self, capacity=0, window=None):
        self.capacity, self.window = capacity, window
        self.keys = self.values = None  # allocated at the first add, shaped after its keys
        self.length = 0

    def add(self, k, v):
        """Write this step's keys and values (rows, heads, T, head_dim) after those kept, and return the keys and
        values its queries attend over: views of the buffers, no copy. A local layer's queries see the window - 1
        positions before the step's first token (and the step's tokens), so it returns only those."""
        T = k.shape[2]
        if self.keys is None or self.length + T > self.keys.shape[2]:
            self.make_room(k, v, T)
        self.keys[:, :, self.length:self.length + T] = k
        self.values[:, :, self.length:self.length + T] = v
        self.length += T
        first = 0 if self.window is None else max(self.length - T - (self.window - 1), 0)
        return self.keys[:, :, first:self.length], self.values[:, :, first:self.length]

    def make_room(self, k, v, T):
        """Room for T more positions. A local layer first lets go of what no later query can see: it keeps the last
        window - 1 positions, moved to the front (one copy of the window every `window` or so steps). Buffers still
        too short are replaced by longer ones (a local layer's: the window and room for as many steps again), the
        kept positions copied over."""
        if self.keys is not None and self.window is not None:
            keep = min(self.length, self.window - 1)
            for t in (self.keys, self.values):
                t[:, :, :keep] = t[:, :, self.length - keep:self.length].clone()  # clone: the two ranges may overlap
            self.length = keep
        if self.keys is not None and self.length + T <= self.keys.shape[2]:
            return
        size = max(self.capacity, 2 * self.length + T)
        if self.window is not None:  # never more than the window and room for as many steps again
            size = min(size, self.window - 1 + max(T, self.window))
        old = (self.keys, self.values)
        self.keys, self.values = (t.new_empty(*t.shape[:2], size, t.shape[3]) for t in (k, v))
        if old[0] is not None:
            self.keys[:, :, :self.length], self.values[:, :, :self.length] = (t[:, :, :self.length] for t in old)

    def repeat_rows(self, repeats):
        """Each row `repeats` times in a row (an int, or one count per row): samples that share a prompt."""
        self.keys, self.values = (t.repeat_interleave(repeats, dim=0) for t in (self.keys, self.values))

    def keep_rows(self, rows):
        """Only these rows (a boolean mask or indices): the rows that have finished leave the batch."""
        self.keys, self.values = self.keys[rows], self.values[rows]


@torch.no_grad()
def generate(model, input_ids, max_new_tokens=50, temperature=0.0, top_k=None, top_p=None,
             attention_mask=None, eos_token_id=None, generator=None, num_samples=1):
    """Sample continuations with a KV cache. temperature 0 is greedy. Rows are left-padded prompts. With
    num_samples > 1 each prompt is continued that many times (its rows next to each other) and goes through the
    model once: its keys and values are copied for its samples. Returns the rows with their new tokens; a row that
    ended early is padded with EOS."""
    check_settings(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=input_ids.device)  # some have several
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    caches = model.new_cache(capacity=input_ids.shape[1] + max_new_tokens)  # room for every token: written in place
    logits = model.last_logits(input_ids, attention_mask, caches)  # the prompts, once each
    if num_samples > 1:
        input_ids, attention_mask, logits = (t.repeat_interleave(num_samples, 0) for t in (input_ids, attention_mask, logits))
        for cache in caches:
            cache.repeat_rows(num_samples)
    new = torch.full((len(input_ids), max_new_tokens), int(eos[0]), device=input_ids.device)
    rows = torch.arange(len(input_ids), device=input_ids.device)  # the rows still generating
    for step in range(max_new_tokens):
        next_id = pick_next_token(logits.float(), temperature, top_k, top_p, generator)
        new[rows, step] = next_id
        going = ~torch.isin(next_id, eos)
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():  # rows that said EOS leave the batch: the model does no more work for them
            rows, next_id, attention_mask = rows[going], next_id[going], attention_mask[going]
            for cache in caches:
                cache.keep_rows(going)
        attention_mask = F.pad(attention_mask, (0, 1), value=1)
        logits = model.last_logits(next_id[:, None], attention_mask, caches)  # only the new token goes through
    model.train(was_training)
    return torch.cat([input_ids, new[:, :step + 1]], dim=1)


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
    """Greedy (temperature 0), or a sample from softmax(logits / T) kept to the top-k and/or the top-p nucleus.

    Nothing sorts the vocabulary: top-k takes the k likeliest tokens from torch.topk (sorted, so top-p among them is a
    cumulative sum), top-p alone draws by rejection (sample_nucleus), and each row draws with one uniform number
    (sample_from) instead of torch.multinomial's one per token."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    top_k = None if top_k is None or top_k >= probs.shape[-1] else top_k  # every token: no cut
    top_p = None if top_p is None or top_p >= 1 else top_p  # a nucleus of all the mass is every token
    if top_k is not None:
        p, ids = probs.topk(top_k)  # the candidates, likeliest first
        if top_p is not None:  # the smallest set of them whose mass reaches top_p of theirs
            p = p / p.sum(-1, keepdim=True)
            p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0)  # a token goes when those before it hold more than top_p
        return ids.gather(-1, sample_from(p, generator)[:, None]).squeeze(1)
    if top_p is not None:
        return sample_nucleus(probs, top_p, generator)
    return sample_from(probs, generator)


def sample_from(probs, generator=None):
    """One column per row, drawn with probability probs / their row's sum, from one uniform number u in (0, 1] a row:
    the first column whose cumulative sum reaches u x the row's sum (inverse transform sampling). A column of
    probability 0 is never drawn: the cumulative sum does not move there."""
    cum = probs.cumsum(-1)
    u = 1 - torch.rand(len(probs), 1, generator=generator, device=probs.device, dtype=probs.dtype)
    return torch.searchsorted(cum, u * cum[:, -1:]).squeeze(1)


def sample_nucleus(probs, top_p, generator=None):
    """Top-p without a sort: the nucleus is the likeliest tokens whose mass reaches top_p, so a token is in it when the
    tokens likelier than it hold at most top_p. Draw from every token, keep the draw if it is in the nucleus, else draw
    again (rejection sampling): a kept token then has probability p / (the nucleus' mass), as when drawing from the
    nucleus alone, and a draw is kept with probability that mass (>= top_p): about 1 / top_p draws a row, each one
    pass over the vocabulary instead of sorting it."""
    picks = torch.empty(len(probs), dtype=torch.long, device=probs.device)
    todo = torch.arange(len(probs), device=probs.device)  # the rows still to draw
    while len(todo):
        rows = probs if len(todo) == len(probs) else probs[todo]
        pick = sample_from(rows, generator)
        likelier = (rows * (rows > rows.gather(-1, pick[:, None]))).sum(-1)  # the mass above the draw
        kept = likelier <= top_p
        picks[todo[kept]] = pick[kept]
        todo = todo[~kept]
    return picks
