"""The layers of a transformer, each with its forward and its hand-written backward side by side.

The rule every layer follows (the llm.c way):
- `forward(x)` computes the output. When the layer is in training mode and autograd is OFF, it also keeps
  exactly what its backward will need (the comment "keeps:" says what) in attributes of the layer.
- `backward(dout)` takes the gradient of the loss with respect to the layer's output, adds the gradients of
  its parameters into their `.grad`, forgets what forward kept, and returns the gradient of its input.

With autograd ON the same forward is an ordinary PyTorch forward: `loss.backward()` works and is the
reference that tests compare our backward with.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MiniftError


def keeps_for_backward(module):
    """Keep activations only for the hand-written backward: training mode, autograd off, not below the lowest
    trainable weight (freeze.py marks those modules: backward stops before it reaches them), and not in the first
    forward of a block that recomputes (recompute.py: its backward runs the forward again, keeping then)."""
    return (module.training and not torch.is_grad_enabled() and not frozen_below(module)
            and not getattr(module, "keeps_nothing", False))


def frozen_below(module):
    """True for a module that freeze.mark_frozen_below() found below every trainable weight."""
    return getattr(module, "frozen_below", False)


def accumulate_grad(param, grad):
    """param.grad += grad (the first use assigns). A weight used twice (GPT-2's tied embedding) gets the
    sum of both uses, and gradient accumulation over micro-batches is this same addition."""
    grad = grad.to(param.dtype)  # under bf16 autocast the matmul gives bf16; master grads stay fp32
    if param.grad is None:
        param.grad = grad.contiguous()
    else:
        param.grad += grad


def fp32_dtype(x):
    """Normalisation and softmax run in fp32 even when the matmuls run in bf16 (as autocast does)."""
    return torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype


def _as_fp32(x):
    """x itself, or its fp32 copy if it is bf16/fp16."""
    return x.to(fp32_dtype(x))


def cast_for_matmul(x):
    """Under autocast every matmul casts its fp32 inputs to bf16 by itself, each time. A tensor that feeds
    two matmuls (a layer's input: y and dW; a gradient: dW and dx) is cast once here instead of twice."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


class Linear(nn.Module):
    """y = x @ W.T + b, with W of shape (out, in) as in Hugging Face's nn.Linear checkpoints."""

    def __init__(self, d_in, d_out, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) * 0.02)
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def extra_repr(self):  # what print(model) shows
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, bias={self.bias is not None}"

    def forward(self, x):
        x = cast_for_matmul(x)
        if keeps_for_backward(self) and self.weight.requires_grad:
            self.x = x  # keeps: the input (in bf16 under autocast, as the matmul sees it), for dW = dy.T @ x
        return F.linear(x, self.weight, self.bias)

    def backward(self, dy):
        dy = cast_for_matmul(dy)
        dy2d = dy.reshape(-1, dy.shape[-1])
        if self.weight.requires_grad:  # a frozen weight costs nothing: no dW, and forward kept no input
            x = self.x
            del self.x
            accumulate_grad(self.weight, dy2d.T @ x.reshape(-1, x.shape[-1]))  # dW[o, i] = sum of dy[o] * x[i]
        if self.bias is not None and self.bias.requires_grad:
            accumulate_grad(self.bias, dy2d.sum(0))
        return dy @ self.weight  # dL/dx = dy @ W (under bf16 autocast, W's bf16 copy is cached)


class Embedding(nn.Module):
    """A lookup table: row `id` of the weight. Its backward adds dout into the rows that were looked up."""

    def __init__(self, num, dim, padding_idx=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num, dim) * 0.02)
        self.padding_idx = padding_idx  # as in HF: the pad row gets no gradient
        # the weight's gradient tensor, reused from step to step (see backward); a buffer, so that .to(device)
        # moves it along with the weight, and not persistent, so that it is never saved
        self.register_buffer("grad_buffer", None, persistent=False)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, padding_idx={self.padding_idx}"

    def forward(self, ids):
        if keeps_for_backward(self) and self.weight.requires_grad:
            self.ids = ids  # keeps: which rows were used
        return F.embedding(ids, self.weight, self.padding_idx)

    def backward(self, dout):
        if not self.weight.requires_grad:  # frozen: nothing to compute (token ids have no gradient)
            return
        ids = self.ids.reshape(-1)
        del self.ids
        dout = dout.reshape(-1, dout.shape[-1]).to(self.weight.dtype)
        if self.padding_idx is not None:
            dout = dout * (ids != self.padding_idx).unsqueeze(1)
        if self.weight.grad is None:
            # The gradient is as big as the table (47 MB for MiniLM's words) but mostly zeros. Zeroing last
            # step's tensor again is ten times cheaper than a fresh one (no page faults).
            if self.grad_buffer is None:
                self.grad_buffer = torch.empty_like(self.weight)
            self.weight.grad = self.grad_buffer.zero_()
        self.weight.grad.index_add_(0, ids, dout)  # a row used twice gets both gradients
        # no input gradient: token ids are not differentiable


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last dimension."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps  # BERT 1e-12, GPT-2 1e-5: read from config.json

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x):
        dtype, x = x.dtype, _as_fp32(x)  # statistics in fp32; output in the input's dtype
        # (not torch.var_mean: on CPU it is ten times slower than these two means)
        centered = x - x.mean(-1, keepdim=True)
        rstd = torch.rsqrt((centered * centered).mean(-1, keepdim=True) + self.eps)
        xhat = centered * rstd
        if keeps_for_backward(self):
            self.xhat, self.rstd = xhat, rstd  # keeps: normalised input and 1/std
        return torch.addcmul(self.bias, xhat, self.weight).to(dtype)  # xhat * w + b in one pass

    def backward(self, dy):
        xhat, rstd = self.xhat, self.rstd
        del self.xhat, self.rstd
        dy = _as_fp32(dy)
        if self.weight.requires_grad:
            accumulate_grad(self.weight, (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0))
        if self.bias.requires_grad:
            accumulate_grad(self.bias, dy.reshape(-1, dy.shape[-1]).sum(0))
        dxhat = dy * self.weight
        # the mean and the variance depend on every x of the row: two correction terms,
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), computed in place in dxhat
        mean_dxhat, mean_dxhat_xhat = dxhat.mean(-1, keepdim=True), (dxhat * xhat).mean(-1, keepdim=True)
        return dxhat.sub_(mean_dxhat).sub_(xhat.mul_(mean_dxhat_xhat)).mul_(rstd)


class GELU(nn.Module):
    """GELU(x) = x * Phi(x). BERT uses the exact erf form, GPT-2 the tanh approximation."""

    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate  # "none" (erf) or "tanh"

    def extra_repr(self):
        return f"approximate={self.approximate!r}"

    def forward(self, x):
        if keeps_for_backward(self):
            self.x = x  # keeps: the input
        return F.gelu(x, approximate=self.approximate)

    def backward(self, dy):
        x = self.x
        del self.x
        # the math is written out; the trailing underscores (in place) only save memory traffic
        if self.approximate == "tanh":
            k, c = math.sqrt(2 / math.pi), 0.044715
            # y = 0.5 x (1 + t) with t = tanh(u), u = k (x + c x^3), du/dx = k (1 + 3 c x^2):
            # dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx = 0.5 (1 + t) (1 + x (1 - t) du/dx)
            x2 = x * x
            t = (x2 * (k * c)).add_(k).mul_(x).tanh_()
            g = x2.mul_(3 * k * c).add_(k).mul_(x)  # x du/dx
            g.addcmul_(g, t, value=-1).add_(1)  # 1 + x (1 - t) du/dx
            return t.add_(1).mul_(g).mul_(dy).mul_(0.5)
        cdf = (x * (1 / math.sqrt(2))).erf_().add_(1).mul_(0.5)  # Phi(x)
        gauss = (x * x).mul_(-0.5).exp_()  # exp(-x^2 / 2) = sqrt(2 pi) phi(x)
        # d/dx [x Phi(x)] = Phi(x) + x phi(x)
        return cdf.addcmul_(x, gauss, value=1 / math.sqrt(2 * math.pi)).mul_(dy)


class Tanh(nn.Module):
    """BERT's pooler activation."""

    def forward(self, x):
        y = torch.tanh(x)
        if keeps_for_backward(self):
            self.y = y  # keeps: the output, since tanh' = 1 - tanh^2
        return y

    def backward(self, dy):
        y = self.y
        del self.y
        return dy * (1 - y * y)


class Dropout(nn.Module):
    """Zero a fraction p of the values in training and scale the rest by 1/(1-p); identity in eval mode."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def extra_repr(self):
        return f"p={self.p}"

    def forward(self, x):
        if not self.training or self.p == 0:
            self.dropped = None
            return x
        dropped = torch.rand(x.shape, device=x.device) < self.p
        if keeps_for_backward(self):
            self.dropped = dropped  # keeps: which values were zeroed (bool), so backward zeroes the same
        return x.mul(1 / (1 - self.p)).masked_fill_(dropped, 0)  # (scale, then zero in place: two passes)

    def backward(self, dy):
        dropped = self.dropped
        self.dropped = None
        return dy if dropped is None else dy.mul(1 / (1 - self.p)).masked_fill_(dropped, 0)


# Attention heads: a (batch, time, heads * head_dim) projection seen as (batch, heads, time, head_dim), and back.

def split_heads(x, n_heads):  # (B, T, H*hd) -> (B, H, T, hd)
    B, T, D = x.shape
    # contiguous once here: otherwise each matmul that uses this view (two in forward, more in backward)
    # would copy it into a contiguous tensor again
    return x.view(B, T, n_heads, D // n_heads).transpose(1, 2).contiguous()


def merge_heads(x):  # (B, H, T, hd) -> (B, T, H*hd)
    B, H, T, hd = x.shape
    return x.transpose(1, 2).reshape(B, T, H * hd)



class Attention(nn.Module):
    """softmax(q k^T * scale + mask) v for every head, with dropout on the probabilities.

    q, k, v: (batch, heads, time, head_dim). `allowed`: bool, broadcastable to (batch, heads, t_q, t_k),
    True where a query may look at a key (padding mask and, for GPT-2, the causal mask).
    `scale`: 1 / sqrt(head_dim) unless the family says otherwise (Gemma: query_pre_attn_scalar ** -0.5).
    `softcap`: Gemma 2 squashes the scores into (-softcap, softcap) before the mask (SoftCap below).
    """

    def __init__(self, dropout, scale=None, softcap=None):
        super().__init__()
        self.dropout = Dropout(dropout)
        self.scale = scale
        self.softcap = SoftCap(softcap) if softcap else None

    def forward(self, q, k, v, allowed):
        scale = self.scale or 1 / math.sqrt(q.shape[-1])
        scores = (q @ k.transpose(-1, -2)).mul_(scale)  # (in place: one tensor less)
        if self.softcap is not None:
            scores = self.softcap(scores)
        # finfo.min, not -inf or -1e10: stays finite in every dtype, so a fully padded row is uniform, not NaN
        scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=fp32_dtype(scores))  # (upcasts inside: no fp32 copy)
        weights = self.dropout(probs).to(v.dtype)  # the weights that mix the values: probs after dropout
        if keeps_for_backward(self):
            # keeps: the inputs, the softmax (fp32), the weights after dropout, the mask
            self.q, self.k, self.v, self.probs, self.weights, self.allowed = q, k, v, probs, weights, allowed
        return weights @ v

    def backward(self, dout):
        q, k, v, probs, weights, allowed = self.q, self.k, self.v, self.probs, self.weights, self.allowed
        del self.q, self.k, self.v, self.probs, self.weights, self.allowed
        dv = weights.transpose(-1, -2) @ dout
        dprobs = _as_fp32(self.dropout.backward(dout @ v.transpose(-1, -2)))
        # softmax backward, row by row: ds = p * (dp - sum(dp * p)), in place in dprobs (a fresh tensor of ours)
        dscores = dprobs.sub_((dprobs * probs).sum(-1, keepdim=True)).mul_(probs)
        # a masked score was overwritten, so it passes no gradient (this matters in a fully masked row,
        # where softmax spreads evenly over the masked keys)
        dscores.masked_fill_(~allowed, 0)
        if self.softcap is not None:
            dscores = self.softcap.backward(dscores)
        dscores = dscores.mul_(self.scale or 1 / math.sqrt(q.shape[-1])).to(q.dtype)
        return dscores @ k, dscores.transpose(-1, -2) @ q, dv


class SoftCap(nn.Module):
    """y = cap * tanh(x / cap): x itself near 0, squashed smoothly into (-cap, cap) far out (Gemma 2's attention
    scores and final logits). Its derivative is 1 - tanh(x / cap)^2."""

    def __init__(self, cap):
        super().__init__()
        self.cap = cap

    def extra_repr(self):
        return f"cap={self.cap}"

    def forward(self, x):
        t = torch.tanh(x / self.cap)
        if keeps_for_backward(self):
            self.t = t  # keeps: tanh(x / cap), a tensor of its own (the caller may overwrite y in place)
        return t * self.cap

    def backward(self, dy):
        t = self.t
        del self.t
        return dy * (1 - t * t)


def check_targets(num_targets):
    """The count a loss divides by; 0 is an error, not a NaN."""
    if num_targets == 0:
        raise MiniftError("no supervised token in this batch (every label is -100): check the prompt masking and max_length")
    return num_targets


def cross_entropy(logits, labels, num_targets=None, weights=None, want_grad=True, ignore_index=-100):
    """Softmax cross-entropy summed over the targets that are not `ignore_index`, divided by `num_targets`.

    logits (N, C), labels (N,). `num_targets` defaults to the supervised count of this batch; the training
    loop passes the count over the whole optimizer step, so that micro-batches add up to the full batch.
    `weights` (C,), optional: a weight per class, to count rare classes more.
    Returns (loss, dlogits). dlogits is None when not wanted (evaluation) or when autograd is on (then use
    loss.backward()).
    """
    supervised = labels != ignore_index
    num_targets = check_targets(int(supervised.sum()) if num_targets is None else num_targets)
    # in fp32 even for bf16 logits; the upcast happens inside log_softmax (a language model's logits are
    # batch x time x vocab: a separate fp32 copy would be hundreds of MB)
    logprobs = torch.log_softmax(logits, dim=-1, dtype=fp32_dtype(logits))
    safe_labels = labels.masked_fill(~supervised, 0)
    row_weight = supervised.to(logprobs.dtype)
    if weights is not None:
        row_weight = row_weight * weights.to(logprobs.dtype)[safe_labels]
    picked = logprobs.gather(1, safe_labels.unsqueeze(1)).squeeze(1)
    loss = -(picked * row_weight).sum() / num_targets
    if torch.is_grad_enabled() or not want_grad:
        return loss, None
    # dL/dlogits = w * (softmax - onehot) / num_targets on supervised rows, 0 elsewhere
    dlogits = logprobs.exp_()
    dlogits[torch.arange(len(labels), device=labels.device), safe_labels] -= 1
    dlogits *= (row_weight / num_targets).unsqueeze(1)
    return loss, dlogits


# ---------------------------------------------------------------------------------------------------------
# The Llama family's layers: RMSNorm, rotary position embedding (RoPE), SwiGLU. (Grouped-query attention is
# the Attention above with k and v shared by groups of query heads: see LlamaAttention in models/llama.py.)
# ---------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w over the last dimension: LayerNorm without the mean and the bias."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps  # config.json's rms_norm_eps (1e-5 in SmolLM2 and TinyLlama, 1e-6 in Qwen2 and Mistral)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x):
        dtype, x = x.dtype, _as_fp32(x)  # statistics in fp32; output in the input's dtype
        rstd = torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps)
        xhat = x * rstd
        if keeps_for_backward(self):
            self.xhat, self.rstd = xhat, rstd  # keeps: normalised input and 1/rms
        return (xhat * self.gain()).to(dtype)

    def gain(self):
        """What multiplies the normalised x: the weight (Gemma's RMSNorm: 1 + weight, models/gemma.py)."""
        return self.weight

    def backward(self, dy):
        xhat, rstd = self.xhat, self.rstd
        del self.xhat, self.rstd
        dy = _as_fp32(dy)
        if self.weight.requires_grad:  # a frozen weight costs nothing
            accumulate_grad(self.weight, (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0))
        dxhat = dy * self.gain()  # (the gain's derivative by the weight is 1 in both forms: dW above)
        # the rms depends on every x of the row: one correction term (LayerNorm has a second one for the mean),
        # dx = rstd * (dxhat - xhat * mean(dxhat * xhat)), computed in place in dxhat
        mean_dxhat_xhat = (dxhat * xhat).mean(-1, keepdim=True)
        return dxhat.sub_(xhat.mul_(mean_dxhat_xhat)).mul_(rstd)


class RotaryEmbedding(nn.Module):
    """cos and sin of the rotation angles position * theta^(-2i/d): rotary position embedding (RoPE).

    RoPE turns each pair of coordinates (i, i + d/2) of a query or key head by an angle that grows with the
    position, so q.k depends on how far apart two tokens are, not where they are. Hugging Face pairs
    coordinate i with i + d/2 (`rotate_half`); llama.cpp pairs neighbours (2i, 2i + 1) and permutes the q/k
    rows in GGUF files to match: the GGUF converter undoes that, so here it is always Hugging Face's way.
    """

    def __init__(self, head_dim, theta, rescale=None):
        super().__init__()
        self.theta = theta  # config.json's rope_theta: 10000 in Llama 2, 100000 in SmolLM2, 1e6 in Qwen2
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        # a long-context checkpoint rescales the frequencies once, here (models/llama.py: the llama3, linear and
        # yarn rules of rope_scaling); yarn also multiplies cos and sin, so every q.k, by an attention factor
        self.attention_scale = 1.0
        if rescale is not None:
            inv_freq, self.attention_scale = rescale(inv_freq)
        # not persistent: computed from the config, never saved (old checkpoints that carry it are skipped)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def extra_repr(self):
        return f"head_dim={2 * self.inv_freq.shape[0]}, theta={self.theta}"

    def forward(self, position_ids, dtype):
        """position_ids (B, T) -> cos, sin of shape (B, 1, T, head_dim), broadcastable over the heads."""
        # angles in fp32 even for a bf16 model (as HF does): position 8000 * inv_freq must not lose its digits
        angles = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat([angles, angles], dim=-1)  # coordinate i and i + d/2 turn by the same angle
        cos, sin = angles.cos(), angles.sin()
        if self.attention_scale != 1.0:
            cos, sin = cos * self.attention_scale, sin * self.attention_scale
        return cos[:, None].to(dtype), sin[:, None].to(dtype)


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension: a quarter turn of every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Turn each pair (x_i, x_{i+d/2}) by its angle: x cos + rotate_half(x) sin. No parameters, no state."""
    return x * cos + rotate_half(x) * sin


def apply_rope_backward(dy, cos, sin):
    """A rotation is orthogonal: the gradient goes back through the inverse rotation, by minus the angle.

    (y = R x with R a rotation, so dx = R^T dy = R(-angle) dy; cos(-a) = cos(a), sin(-a) = -sin(a). With yarn's
    attention factor s, y = s R x and dx = s R^T dy: the same formula on the scaled cos and sin.)"""
    return apply_rope(dy, cos, -sin)


class SwiGLU(nn.Module):
    """silu(gate) * up, the gated activation of the Llama MLP: down(silu(gate(x)) * up(x)).

    silu(g) = g * sigmoid(g) (also called swish); its derivative is s + g s (1 - s) = s (1 + g (1 - s))."""

    def forward(self, gate, up):
        if keeps_for_backward(self):
            self.gate, self.up = gate, up  # keeps: both inputs (the product needs each for the other's grad)
        return F.silu(gate) * up

    def backward(self, dy):
        gate, up = self.gate, self.up
        del self.gate, self.up
        s = torch.sigmoid(gate)
        silu = gate * s
        dup = dy * silu  # d(a * b)/db = a
        # d/dg [silu(g)] * up * dy, reusing the buffers: s (1 + g (1 - s)) = s + silu (1 - s)
        dgate = silu.mul_(1 - s).add_(s).mul_(up).mul_(dy)
        return dgate, dup
