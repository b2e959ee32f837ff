"""The Llama family (Llama 2/3.x, SmolLM/SmolLM2, TinyLlama, Qwen2/2.5, Qwen3, Mistral), built from minift's layers.

Four things make a Llama out of a GPT-2 (compare gpt2.py side by side):
- RMSNorm instead of LayerNorm (no mean, no bias);
- no position table: rotary position embedding (RoPE) turns q and k by an angle that grows with the position;
- the MLP is SwiGLU: down(silu(gate(x)) * up(x)), three matrices and no GELU;
- grouped-query attention (GQA): fewer key/value heads than query heads, each k/v head shared by a group of
  query heads (SmolLM2-135M: 9 query heads, 3 k/v heads, groups of 3). The k/v cache is that much smaller.
Module names follow the Hugging Face checkpoint keys (`model.layers.0.self_attn.q_proj`, `model.norm`,
`lm_head`), so loading is the identity map. The relatives differ in a few switches:
- Qwen2 adds biases to q, k and v; Qwen3 instead RMS-normalises each head of q and k (q_norm, k_norm) before RoPE,
  and its head_dim is its own setting, not hidden / heads;
- Mistral (every layer) and Qwen2/3 (the layers `layer_types` marks) may attend over a sliding window: token t
  sees t-w+1 .. t only, in the mask (so in the backward too) and in generation's cache, which keeps its window;
- Llama 3.1+ and long-context Qwen stretch RoPE's slow frequencies once at load (`rope_scaling`: llama3, linear,
  yarn), so that positions past the pretraining length turn by angles the model has seen.
Mixture of experts (models/moe.py): the MLP of a sparse layer is a router and E SwiGLU experts, k per token.
- Mixtral is Mistral with sparse MLPs (its checkpoint's `block_sparse_moe.experts.E.w1/w3/w2` are read as
  `mlp.experts.E.gate_proj/up_proj/down_proj`, as transformers 5 renames them, and written back);
- Qwen3-MoE is Qwen3 with sparse MLPs, some layers possibly dense (`mlp_only_layers`, `decoder_sparse_step`);
- OLMoE is a Llama with sparse MLPs whose q/k norms cover the whole q and k projections, not each head.
"""
import math
from dataclasses import dataclass, fields
from functools import partial

import numpy as np
import torch
from torch import nn

from ..errors import MiniftError
from ..generate import KVCache
from ..heads import (Backbone, CausalLM, Classifier, TiedLMHead, attention_allowed, cached_positions, last_real_token,
                     pick_rows, pick_rows_backward, positions_from_mask)
from ..layers import (Attention, Embedding, Linear, RMSNorm, RotaryEmbedding, SwiGLU, apply_rope, apply_rope_backward,
                     frozen_below, keeps_for_backward, merge_heads, split_heads)
from ..recompute import block_backward, block_forward
from .moe import SparseMoeBlock, load_balancing_loss

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "olmoe")
MOE_TYPES = ("mixtral", "qwen3_moe", "olmoe")
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # how config.json files count experts


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: as many as query heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # a long-context rule for RoPE's frequencies (rope_rescaling); None: plain RoPE
    attention_bias: bool = False  # Llama: biases on q, k, v and o (Qwen2 always has q, k, v biases, no o bias)
    mlp_bias: bool = False
    attention_dropout: float = 0.0  # the only dropout a Llama has
    tie_word_embeddings: bool = False  # True: the LM head is the token embedding (SmolLM2, Qwen2.5-0.5B)
    sliding_window: int | None = None  # the local layers' window (local_layers); None: every layer sees all the past
    # Qwen2/3: the indices of the layers that slide (layer_types' "sliding_attention"); None: all alike (Mistral: all
    # slide). Not named layer_types: transformers reads a Mistral config.json with layer_types as another model
    sliding_layers: list | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"
    num_labels: int = 2  # for LlamaForSequenceClassification
    # mixture of experts (models/moe.py); num_experts 0: a dense model
    num_experts: int = 0  # experts per sparse layer (config.json's num_experts, or Mixtral's num_local_experts)
    num_experts_per_tok: int = 2  # k: the experts each token goes through
    moe_intermediate_size: int | None = None  # an expert's width (Qwen3-MoE); None: intermediate_size (Mixtral, OLMoE)
    norm_topk_prob: bool = False  # renormalise the k kept router weights to sum 1 (Mixtral always does)
    decoder_sparse_step: int = 1  # Qwen3-MoE: every n-th layer is sparse ...
    mlp_only_layers: list | None = None  # ... except these, which keep a dense MLP
    output_router_logits: bool = False  # True: training adds router_aux_loss_coef * the load-balancing loss
    router_aux_loss_coef: float = 0.001

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise MiniftError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}: check config.json")
        if self.head_dim % 2:
            raise MiniftError(f"head_dim {self.head_dim} is odd: rotary embedding turns pairs of coordinates")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise MiniftError(f"sliding_window {self.sliding_window!r} is not a whole number >= 1: check config.json")

    @property
    def qkv_bias(self):
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def o_bias(self):
        return self.attention_bias and self.model_type != "qwen2"

    @property
    def qk_norm(self):  # Qwen3 (and Qwen3-MoE): RMSNorm on each head of q and k; OLMoE: on the whole projections
        return {"qwen3": "head", "qwen3_moe": "head", "olmoe": "projection"}.get(self.model_type)

    def is_sparse(self, i):
        """Does layer i have a mixture of experts for its MLP (else a dense one)?"""
        return (self.num_experts > 0 and i not in (self.mlp_only_layers or [])
                and (i + 1) % self.decoder_sparse_step == 0)

    def window_of(self, i):
        """Layer i's sliding window, or None for a layer that sees every past token."""
        if self.sliding_layers is not None and i not in self.sliding_layers:
            return None
        return self.sliding_window

    @classmethod
    def from_dict(cls, d):
        """An HF config.json dict -> LlamaConfig; what minift cannot run exactly is refused, never approximated."""
        kind = d.get("model_type", "llama")
        if kind not in MODEL_TYPES:
            raise MiniftError(f"model_type {kind!r} is not a Llama-family model minift runs: {', '.join(MODEL_TYPES)}")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):
            raise MiniftError(f"hidden_act {d['hidden_act']!r} is not supported: the Llama family in minift uses silu")
        experts = next((d[k] for k in EXPERT_KEYS if d.get(k)), 0)
        if experts and kind not in MOE_TYPES:
            keys = ", ".join(k for k in EXPERT_KEYS if d.get(k))
            raise MiniftError(f"model_type {kind!r} with experts (config.json has {keys}) is not a mixture-of-experts "
                              f"model minift runs: {', '.join(MOE_TYPES)}")
        if kind in MOE_TYPES and not (experts and d.get("num_experts_per_tok")):
            raise MiniftError(f"a {kind} config.json needs its number of experts (num_experts or num_local_experts) "
                              "and num_experts_per_tok: restore it from the original checkpoint")
        if kind == "qwen3_moe" and not d.get("moe_intermediate_size"):
            raise MiniftError("a qwen3_moe config.json needs moe_intermediate_size (the experts' width): restore it "
                              "from the original checkpoint")
        if d.get("router_jitter_noise"):
            raise MiniftError(f"router_jitter_noise {d['router_jitter_noise']} is not supported: minift's router is "
                              "deterministic; set it to 0.0 in config.json")
        if d.get("clip_qkv") is not None:
            raise MiniftError(f"clip_qkv {d['clip_qkv']} is not supported: minift does not clamp q, k and v; "
                              "use a checkpoint without it (OLMoE's have none)")
        # transformers 5 writes rope_parameters {rope_theta, rope_type, ...}; older files rope_theta + rope_scaling
        rope = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
        if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise MiniftError("partial_rotary_factor is not supported: minift rotates every coordinate of a head")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        known = {f.name for f in fields(cls)} - {"rope_theta", "rope_scaling", "sliding_window", "sliding_layers",
                                                 "num_experts", "norm_topk_prob"}
        if "id2label" in d and "num_labels" not in d:
            d = {**d, "num_labels": len(d["id2label"])}
        window, sliding_layers = local_layers(d)
        return cls(**{k: v for k, v in d.items() if k in known and v is not None}, rope_theta=theta,
                   rope_scaling=read_rope_scaling(rope, d), sliding_window=window, sliding_layers=sliding_layers,
                   num_experts=experts, norm_topk_prob=kind == "mixtral" or bool(d.get("norm_topk_prob")))


def local_layers(d):
    """(sliding_window, sliding_layers) of an HF config dict: the window transformers applies, and where.

    Llama and OLMoE have none. Mistral and Mixtral apply `sliding_window` to every layer when it is set
    (Mistral-7B-v0.1: 4096; v0.2 and later: null), so their sliding_layers stay None. Qwen2, Qwen3 and Qwen3-MoE
    only when `use_sliding_window` is true (Qwen2.5's files set a window but leave it false); Qwen3-MoE then on every
    layer, Qwen2 and Qwen3 only in the layers that `layer_types` (or, in older files, `max_window_layers`: every layer
    from that one up) marks "sliding_attention".
    """
    kind, window = d.get("model_type", "llama"), d.get("sliding_window")
    if kind in ("llama", "olmoe") or window is None:
        return None, None
    if kind in ("mistral", "mixtral"):
        return window, None
    if not d.get("use_sliding_window", False):
        return None, None
    if kind == "qwen3_moe":
        return window, None
    n, first = d.get("num_hidden_layers", 32), d.get("max_window_layers", 28)
    types = d.get("layer_types") or ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
        raise MiniftError(f"layer_types must name 'sliding_attention' or 'full_attention' for each of the {n} layers: "
                          "check config.json")
    return window, [i for i, layer_type in enumerate(types) if layer_type == "sliding_attention"]


# ---- RoPE scaling: the long-context rules, applied once to the frequencies at load ---------------------------

ROPE_RULE_KEYS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"), "yarn": ("factor",)}


def read_rope_scaling(rope, d):
    """The RoPE scaling of a config (rope_scaling with "type" or "rope_type", or transformers 5's rope_parameters)
    as the dict minift keeps, or None for plain RoPE. A rule minift does not implement is refused by name."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_RULE_KEYS:
        raise MiniftError(f"rope scaling {kind!r} is not supported: minift implements plain RoPE and the "
                          f"{', '.join(map(repr, ROPE_RULE_KEYS))} rules; use a checkpoint with one of those")
    missing = [k for k in ROPE_RULE_KEYS[kind] if rope.get(k) is None]
    if missing:
        raise MiniftError(f"rope scaling {kind!r} needs {', '.join(missing)} in config.json's rope_scaling")
    scaling = {k: v for k, v in rope.items() if k not in ("type", "rope_theta")} | {"rope_type": kind}
    if kind in ("llama3", "yarn"):  # the pretraining length the rule is measured against (as transformers reads it)
        scaling["original_max_position_embeddings"] = d.get("original_max_position_embeddings") or rope.get(
            "original_max_position_embeddings") or d.get("max_position_embeddings", LlamaConfig.max_position_embeddings)
    return scaling


def rope_rescaling(scaling, theta):
    """The function RotaryEmbedding applies once to its frequencies for this rope scaling (None: plain RoPE)."""
    if scaling is None:
        return None
    rule = {"linear": linear_frequencies, "llama3": llama3_frequencies, "yarn": yarn_frequencies}[scaling["rope_type"]]
    return partial(rule, scaling=scaling, theta=theta)


def linear_frequencies(inv_freq, scaling, theta):
    """Every frequency / factor: position p turns as p / factor did (Code Llama, Gemma 3's global layers)."""
    return inv_freq / scaling["factor"], 1.0


def llama3_frequencies(inv_freq, scaling, theta):
    """Llama 3.1's rule. A pair whose wavelength (2 pi / frequency, in positions) is longer than
    original_max / low_freq_factor never turned fully during pretraining: its frequency / factor. One shorter than
    original_max / high_freq_factor turns many times in any text (local word order): kept. Between, a smooth
    ramp from one to the other. (transformers' _compute_llama3_parameters, step for step.)"""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelength - low) / (high - low)  # 0 at the long end of the ramp, 1 at its short end
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    between = (wavelength >= old_len / high) & (wavelength <= old_len / low)
    return torch.where(between, ramp, scaled), 1.0


def yarn_frequencies(inv_freq, scaling, theta):
    """YaRN (Qwen2.5 and Qwen3 past 32K): pairs that turn more than beta_fast times over the pretraining length keep
    their frequency, pairs that turn fewer than beta_slow times get frequency / factor, a linear ramp over the pair
    index between. It also scales cos and sin by the attention factor 0.1 ln(factor) + 1 (so q.k by its square):
    stretched positions make the softmax flatter, and this sharpens it back. (transformers' _compute_yarn_parameters.)"""
    dim, factor = 2 * len(inv_freq), scaling["factor"]
    old_len = scaling["original_max_position_embeddings"]

    def pair_turning(rotations):  # the (fractional) pair index that turns `rotations` times over old_len positions
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(scaling.get("beta_fast") or 32), pair_turning(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high += 0.001 if high == low else 0  # (as transformers: no division by zero)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the pretrained frequency (fast pairs), 0: the stretched one (slow pairs)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
    return inv_freq, yarn_attention_factor(scaling)


def yarn_attention_factor(scaling):
    """What yarn multiplies cos and sin by: config.json's attention_factor, else from the factor (and DeepSeek's
    mscale / mscale_all_dim pair), as transformers computes it."""
    factor = scaling["factor"]
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]

    def mscale(m):  # the YaRN paper's eq. 21
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(scaling["mscale"]) / mscale(scaling["mscale_all_dim"])
    return mscale(1)


def group_queries(q, n_kv_heads):
    """(B, H, T, hd) -> (B, Hkv, group * T, hd): the query heads that share a k/v head (heads j*group ...
    j*group + group-1 share head j) stacked along the time axis, so ONE matmul against the shared k serves the
    whole group, and k and v are never copied. A view: q is contiguous."""
    B, H, T, hd = q.shape
    return q.view(B, n_kv_heads, H // n_kv_heads * T, hd)


def ungroup(x, n_heads):  # (B, Hkv, group * T, hd) -> (B, H, T, hd), the inverse view
    B, _, GT, hd = x.shape
    return x.view(B, n_heads, GT * x.shape[1] // n_heads, hd)


class LlamaAttention(nn.Module):
    """Grouped-query attention with rotary positions: q, k rotated by RoPE, k/v shared by groups of q heads.
    `window`: this layer's sliding window (a local layer), or None (a global one)."""

    def __init__(self, c, window=None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.window = c.num_attention_heads, c.num_key_value_heads, window
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        # Qwen3: each head of q and k RMS-normalised over its own coordinates (one weight, shared by the heads),
        # which keeps q.k from growing with the weights; RMSNorm works on the last dimension, so no reshape.
        # OLMoE: the whole q and k projections instead, all heads at once, before they are split into heads
        self.norms_projection = c.qk_norm == "projection"
        q_width, k_width = ((c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim)
                            if self.norms_projection else (c.head_dim, c.head_dim))
        self.q_norm = RMSNorm(q_width, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(k_width, c.rms_norm_eps) if c.qk_norm else None
        self.attn = Attention(c.attention_dropout)  # the same softmax(q k^T / sqrt(d) + mask) v as BERT and GPT-2
        self.o_proj = Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.o_bias)

    def forward(self, x, cos, sin, allowed, cache=None):
        q, k = self.q_proj(x), self.k_proj(x)
        if self.norms_projection:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = split_heads(q, self.n_heads), split_heads(k, self.n_kv_heads)
        if self.q_norm is not None and not self.norms_projection:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = split_heads(self.v_proj(x), self.n_kv_heads)
        if cache is not None:  # generation: the cache holds the rotated keys of the k/v heads, not repeated; this
            k, v = cache.add(k, v)  # step's are written into it in place, and k, v become every position it may see
        # a local layer's cache starts later than the sequence: its keys are the mask's last columns
        allowed = allowed[..., allowed.shape[-1] - k.shape[2]:]
        if keeps_for_backward(self):
            self.cos, self.sin = cos, sin  # keeps: the angles (shared by every layer), to turn the gradients back
        # grouped-query attention: each k/v head answers its group of query heads in one matmul; a query
        # position's mask row repeats once per head of the group, as the group's heads are stacked in time
        group = self.n_heads // self.n_kv_heads
        out = self.attn(group_queries(q, self.n_kv_heads), k, v, allowed.repeat(1, 1, group, 1))
        return self.o_proj(merge_heads(ungroup(out, self.n_heads)))

    def backward(self, dout):
        cos, sin = self.cos, self.sin
        del self.cos, self.sin
        dout = group_queries(split_heads(self.o_proj.backward(dout), self.n_heads), self.n_kv_heads)
        # the GQA lesson: a shared k/v head's gradient is the sum over its group's query heads, and the one
        # matmul that served the whole group (dk = dscores^T q) adds them up by itself
        dq, dk, dv = self.attn.backward(dout)
        dq = ungroup(dq, self.n_heads)
        dq, dk = apply_rope_backward(dq, cos, sin), apply_rope_backward(dk, cos, sin)
        if self.q_norm is not None and not self.norms_projection:
            dq, dk = self.q_norm.backward(dq), self.k_norm.backward(dk)
        dq, dk = merge_heads(dq), merge_heads(dk)
        if self.norms_projection:
            dq, dk = self.q_norm.backward(dq), self.k_norm.backward(dk)
        # x fed three projections: its gradient is the sum of the three
        dx = self.q_proj.backward(dq)
        dx += self.k_proj.backward(dk)
        return dx.add_(self.v_proj.backward(merge_heads(dv)))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The gate decides, per feature, how much of `up` passes.
    `width`: its hidden width (an expert's, in a mixture of experts); None: config.intermediate_size."""

    def __init__(self, c, width=None):
        super().__init__()
        width = width or c.intermediate_size
        self.gate_proj = Linear(c.hidden_size, width, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, width, bias=c.mlp_bias)
        self.act = SwiGLU()
        self.down_proj = Linear(width, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))

    def backward(self, dout):
        dgate, dup = self.act.backward(self.down_proj.backward(dout))
        return self.gate_proj.backward(dgate).add_(self.up_proj.backward(dup))  # x fed both: gradients add


def sparse_mlp(c):
    """A mixture of experts in place of the MLP: the router and num_experts SwiGLU MLPs (models/moe.py)."""
    experts = [LlamaMLP(c, c.moe_intermediate_size) for _ in range(c.num_experts)]
    return SparseMoeBlock(c.hidden_size, experts, c.num_experts_per_tok, c.norm_topk_prob)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block, as GPT-2's: x + attn(norm(x)), then + mlp(norm(x)); no dropout on residuals.
    `sparse`: the MLP is a mixture of experts (the same residual around it, the same backward call)."""

    def __init__(self, c, window=None, sparse=False):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = LlamaAttention(c, window)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = sparse_mlp(c) if sparse else LlamaMLP(c)

    def forward(self, x, cos, sin, allowed, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def backward(self, dout):
        # a residual passes its gradient through unchanged and adds the branch's
        dx = dout + self.post_attention_layernorm.backward(self.mlp.backward(dout))
        return dx + self.input_layernorm.backward(self.self_attn.backward(dx))


class LlamaModel(Backbone):
    """Token ids -> last hidden states (after the final RMSNorm). Checkpoint keys without the `model.` prefix."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        # padding_idx as in HF: the pad row gets no gradient from the input side
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.windows = [c.window_of(i) for i in range(c.num_hidden_layers)]  # None: a global layer
        self.layers = nn.ModuleList(LlamaDecoderLayer(c, window, c.is_sparse(i)) for i, window in enumerate(self.windows))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # no parameters: angles from positions (frequencies rescaled once for a long-context checkpoint)
        self.rotary_emb = RotaryEmbedding(c.head_dim, c.rope_theta, rope_rescaling(c.rope_scaling, c.rope_theta))

    def forward(self, input_ids, attention_mask=None, position_ids=None, caches=None, document_ids=None):
        """caches: a list of one [] per layer (new_cache()), filled and extended by generation; None in training."""
        B, T = input_ids.shape
        past = cached_positions(caches, attention_mask, T, windowed=any(self.windows))
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:  # counted over real tokens only, so a left-padded row starts at 0 too
            position_ids = positions_from_mask(attention_mask)[:, past:]
        # causal, padding, packed texts apart, and a local layer's window: one mask per kind of layer
        masks = {w: attention_allowed(attention_mask, T, past, document_ids, w) for w in set(self.windows)}
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # computed once, used by every layer
        for i, layer in enumerate(self.layers):
            allowed = masks[self.windows[i]]
            x = layer(x, cos, sin, allowed, caches[i]) if caches is not None else block_forward(layer, x, cos, sin, allowed)
        return self.norm(x)

    def new_cache(self, capacity=0):
        """One KVCache per layer (a local layer's keeps its window: as transformers' DynamicSlidingWindowLayer)."""
        return [KVCache(capacity, window) for window in self.windows]

    def sparse_blocks(self):
        """The layers' mixtures of experts, bottom to top (none in a dense model)."""
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoeBlock)]

    def stages(self):
        """The parts of the forward in order; backward stops below the lowest trainable one (freeze.py)."""
        return [self.embed_tokens, *self.layers]

    def backward(self, dhidden):
        d = self.norm.backward(dhidden)
        for layer in reversed(self.layers):
            if frozen_below(layer):
                return  # no trainable weight below this layer: no gradient left to compute
            d = block_backward(layer, d)
        self.embed_tokens.backward(d)


class LlamaForCausalLM(CausalLM):
    """LlamaModel + the LM head: its own matrix `lm_head`, or the token embedding itself when tied.
    The loss (shifted labels), count_targets and generate() come from heads.CausalLM; a mixture of experts whose
    config says output_router_logits adds the load-balancing loss in training (`loss` below)."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.model = LlamaModel(c)
        if c.tie_word_embeddings:
            self.tied_head = TiedLMHead()  # no parameter of its own: the head is embed_tokens
        else:
            self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)

    def new_cache(self, capacity=0):
        return self.model.new_cache(capacity)

    def head_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, caches=None, document_ids=None):
        # as transformers: the config decides whether training adds the load-balancing loss (output_router_logits)
        balancing = self.training and self.config.output_router_logits
        for block in self.model.sparse_blocks():
            block.records_routing = balancing  # then the sparse blocks leave their routing for loss() to read
            vars(block).pop("routing", None)  # (one that no loss took, from an earlier forward: a DPO reference's)
        vars(self).pop("balance_mask", None)
        if balancing:
            self.balance_mask = attention_mask  # keeps: which tokens the load-balancing loss counts (None: all)
        hidden = self.model(input_ids, attention_mask, position_ids, caches, document_ids)
        if self.last_only:  # last_logits(): the head on each row's last position only
            hidden = hidden[:, -1:]
        if self.head_is_deferred():
            return hidden  # the chunked loss runs the head (heads.chunked_lm_loss)
        if not self.config.tie_word_embeddings:
            return self.lm_head(hidden)
        return self.tied_head(hidden, self.head_weight())  # tied: logits = h @ E.T

    def loss(self, logits, labels, num_targets=None, class_weights=None):
        """The next-token loss, plus router_aux_loss_coef * the load-balancing loss of the experts' routing when the
        forward recorded it (a training forward, config.output_router_logits), as transformers adds it to the loss.
        Over a step of several micro-batches each adds its share of the supervised tokens (count / num_targets), so
        the step's term is their weighted mean (1 micro-batch: exactly transformers'). Evaluation: the LM loss alone."""
        loss, dlogits = super().loss(logits, labels, num_targets, class_weights)
        blocks = [b for b in self.model.sparse_blocks() if "routing" in vars(b)]
        if not blocks:
            return loss, dlogits
        routings = [vars(b).pop("routing") for b in blocks]
        share = self.count_targets(labels) / num_targets if num_targets else 1.0
        aux, daux = load_balancing_loss(routings, self.config.num_experts, self.config.num_experts_per_tok,
                                        vars(self).pop("balance_mask", None))
        weight = self.config.router_aux_loss_coef * share
        if dlogits is not None:  # the hand-written backward: each sparse block it reaches adds this to its router's
            for block in blocks:
                if not frozen_below(block):
                    block.aux_dprobs = daux * weight
        return loss + weight * aux.to(loss.dtype), dlogits

    def backward(self, dlogits):
        vars(self).pop("balance_mask", None)  # (left by a forward whose loss was not this one: a DPO step's)
        if self.head_is_deferred():  # the chunked loss did the head's backward: this is the hidden states' gradient
            return self.model.backward(dlogits)
        if not self.config.tie_word_embeddings:
            return self.model.backward(self.lm_head.backward(dlogits))
        self.model.backward(self.tied_head.backward(dlogits, self.head_weight()))


class LlamaForSequenceClassification(Classifier):
    """A decoder reads left to right, so the last real (non-pad) token is the one that has seen the whole text."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.model = LlamaModel(c)
        self.score = Linear(c.hidden_size, c.num_labels, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids, attention_mask, position_ids)
        last = last_real_token(attention_mask)  # the last 1 of the mask: left and right padding alike
        if keeps_for_backward(self):
            self.last, self.hidden_shape = last, hidden.shape  # keeps: where the picked rows came from
        return self.score(pick_rows(hidden, last))

    def backward(self, dlogits):
        dhidden = pick_rows_backward(self.score.backward(dlogits), self.last, self.hidden_shape)
        del self.last, self.hidden_shape
        self.model.backward(dhidden)


# ---- what checkpoints.py needs from a family -------------------------------------------------------------

Config = LlamaConfig
TASKS = {"classify": LlamaForSequenceClassification, "lm": LlamaForCausalLM, "encode": LlamaModel}
NEW_HEADS = ("score.",)  # a classification head is trained from scratch
LABEL_HEAD = "score.weight"  # the layer with one row per class
DEFAULT_TASK = "lm"  # what the pretrained checkpoint computes: next-token logits
FAN_IN_FAN_OUT = False  # weights are (out, in) in HF's files, as in nn.Linear
UNUSED_HEADS = ("lm_head.",)  # a causal LM's head, in a classifier (or a tied copy in a tied model's file)
_FAMILY_NAME = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral",
                "qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe"}
_TASK_SUFFIX = {"lm": "ForCausalLM", "classify": "ForSequenceClassification", "encode": "Model"}
# Mixtral's files name the sparse MLP and its experts' matrices their own way; transformers 5 renames them on load and
# back on save, and so do we (one expert class, LlamaMLP, for every family; every Mixtral MLP is sparse)
MIXTRAL_NAMES = {".block_sparse_moe.": ".mlp.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}


def renamed(key, names):
    for old, new in names.items():
        key = key.replace(old, new)
    return key


def hf_to_ours(key, tensor, model):
    """An HF checkpoint key -> (our parameter name, tensor), or (None, tensor) for a key to skip."""
    if key.endswith("rotary_emb.inv_freq"):  # old checkpoints saved RoPE's frequencies: we compute them
        return None, tensor
    if model.config.model_type == "mixtral":
        key = renamed(key, MIXTRAL_NAMES)
    if isinstance(model, LlamaModel):  # a base model: HF's LlamaModel keys have no "model." prefix
        return (key[len("model."):] if key.startswith("model.") else key), tensor
    if key.startswith(("model.",) + NEW_HEADS + UNUSED_HEADS):
        return key, tensor
    return "model." + key, tensor  # a base model's checkpoint loaded into a task model


def hf_state_dict(model):
    """Our parameters under transformers' names: the identity (a tied head is the embedding, listed once), but
    for Mixtral's sparse MLPs, written under the names of its files."""
    names = {v: k for k, v in MIXTRAL_NAMES.items()} if model.config.model_type == "mixtral" else {}
    return {renamed(name, names): p.detach().contiguous().cpu() for name, p in model.named_parameters()}


def architecture(model):
    """The `architectures` entry of config.json: LlamaForCausalLM, Qwen2ForSequenceClassification, ..."""
    return _FAMILY_NAME[model.config.model_type] + _TASK_SUFFIX[model.task]


# ---- From a GGUF file: llama.cpp's metadata -> this family's config.json (gguf.py reads the file) ----------

GGUF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # general.architecture -> our model_type
# llama.cpp's converter interleaves each head's q and k rows (its RoPE turns neighbouring pairs) for the llama
# architecture only (LlamaModel.permute); its Qwen2 and Qwen3 converters keep Hugging Face's order.
GGUF_PERMUTED_QK = ("llama",)
# llama.cpp's tensor names -> Hugging Face's keys: top-level tensors, and each block's (blk.N.<part>.weight / .bias)
GGUF_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
GGUF_LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
                    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
GGUF_NORM_SHIFT = 0.0  # the norms' weights are stored as they are (Gemma's: plus one)
GGUF_CHAT_TEMPLATES = {}  # a file without a chat template gets none


def shortest_float(x: float) -> float:
    """A float32 from the file as its shortest decimal (9.999999747e-06 -> 1e-05, as in config.json)."""
    return float(str(np.float32(x)))


def gguf_value(meta: dict, arch: str, key: str):
    """The file's `{arch}.{key}`, one value for every layer, or one line saying what is missing."""
    if f"{arch}.{key}" not in meta:
        raise MiniftError(f"the GGUF has no {arch}.{key} in its metadata: the file is incomplete; re-export it")
    value = meta[f"{arch}.{key}"]
    if isinstance(value, list):
        raise MiniftError(f"{arch}.{key} differs per layer in this GGUF; minift supports one value for all")
    return value


def config_from_gguf(meta: dict, shapes: dict, arch: str, rope_freqs=None) -> dict:
    """The config.json of a Llama, Qwen2 or Qwen3 GGUF, from its `{arch}.*` metadata and its tensors' shapes.

    rope_freqs: the file's `rope_freqs.weight` (one factor per rotated pair: how Llama 3.1's rope scaling
    travels in a GGUF), or None."""
    def need(key):
        return gguf_value(meta, arch, key)

    model_type = GGUF_MODEL_TYPES[arch]
    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)  # Qwen3's is its own setting
    if meta.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise MiniftError(f"this GGUF rotates only part of each head ({arch}.rope.dimension_count != head size); "
                          "minift's Llama rotates whole heads")
    theta = shortest_float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    own = {"llama": dict(attention_bias=False, mlp_bias=False),  # a Llama file has no biases, or o_proj's too
           "qwen2": dict(use_sliding_window=False),  # Qwen2 always has q/k/v biases (no flag)
           "qwen3": dict(attention_bias=False, use_sliding_window=False)}[model_type]  # no biases, q/k norms
    return dict(
        architectures=[_FAMILY_NAME[model_type] + "ForCausalLM"], model_type=model_type,
        vocab_size=gguf_vocab_size(meta, arch, shapes), hidden_size=hidden, intermediate_size=need("feed_forward_length"),
        num_hidden_layers=need("block_count"), num_attention_heads=heads,
        num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim, hidden_act="silu", max_position_embeddings=need("context_length"),
        rms_norm_eps=shortest_float(need("attention.layer_norm_rms_epsilon")), rope_theta=theta,
        rope_scaling=rope_scaling_from_gguf(meta, arch, rope_freqs, theta, head_dim),
        attention_dropout=0.0, initializer_range=0.02, tie_word_embeddings="output.weight" not in shapes, **own,
        **gguf_special_ids(meta))


def gguf_vocab_size(meta, arch, shapes):
    tokens = meta.get("tokenizer.ggml.tokens")
    return meta.get(f"{arch}.vocab_size") or (len(tokens) if tokens else shapes["token_embd.weight"][0])


def gguf_special_ids(meta):
    return dict(bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
                pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))


def rope_scaling_from_gguf(meta, arch, rope_freqs, theta, head_dim):
    """config.json's rope_scaling: linear and YaRN travel as `{arch}.rope.scaling.*` keys; Llama 3's rule as
    the rope_freqs tensor alone (llama.cpp's converter writes no key for it)."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if rope_freqs is not None and kind == "none":
        return llama3_rope_scaling(rope_freqs, theta, head_dim)
    if rope_freqs is not None or kind not in ("none", "linear", "yarn"):
        raise MiniftError(f"this GGUF's rope scaling ({kind}{' and rope_freqs' if rope_freqs is not None else ''}) "
                          "is not one minift maps: linear, yarn, or Llama 3's rope_freqs alone")
    if kind == "none":
        return None
    factor = shortest_float(meta[f"{arch}.rope.scaling.factor"])
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    return {"rope_type": "yarn", "factor": factor,
            "original_max_position_embeddings": meta[f"{arch}.rope.scaling.original_context_length"]}


def llama3_rope_scaling(rope_freqs, theta, head_dim) -> dict:
    """Llama 3's rope_scaling, read back from the per-pair factors llama.cpp stores (LlamaModel's rope_freqs).

    The rule: a pair whose wavelength 2 pi / freq is under original / high_freq_factor keeps its frequency
    (factor 1), one over original / low_freq_factor turns `factor` times slower, and between the two the
    factor f ramps: 1 / f = (1 - s) / factor + s, with s = (original / wavelength - low) / (high - low).
    So `factor` is the largest f, and s is a straight line in freq through the pairs on the ramp. Only
    the ratios original : low : high matter; we take low_freq_factor = 1, as every Llama 3 does."""
    f = np.asarray(rope_freqs, dtype=np.float64)
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor = f.max()
    ramp = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if len(f) != head_dim // 2 or ramp.sum() < 2:
        raise MiniftError(f"this GGUF's rope_freqs ({len(f)} factors, {ramp.sum()} on the ramp) is not Llama 3's "
                          f"rule over {head_dim // 2} rotated pairs: minift cannot map it to config.json")
    s = (1 / f[ramp] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(freqs[ramp], s, 1)  # s = original / (2 pi (high - 1)) * freq - 1 / (high - 1)
    high = round(1 - 1 / intercept, 3)
    original = round(slope * 2 * np.pi * (high - 1))
    scaling = {"rope_type": "llama3", "factor": shortest_float(factor), "low_freq_factor": 1.0,
               "high_freq_factor": high, "original_max_position_embeddings": original}
    wavelength = 2 * np.pi / freqs
    ramp_again = (original / wavelength - 1) / (high - 1)
    expected = np.where(wavelength < original / high, 1.0, np.where(
        wavelength > original, factor, 1 / ((1 - ramp_again) / factor + ramp_again)))
    if not np.allclose(expected, f, rtol=1e-5, atol=0):
        raise MiniftError(f"this GGUF's rope_freqs does not follow Llama 3's rule (closest: {scaling}): "
                          "minift cannot map it to config.json")
    return scaling
