"""The Gemma family (Gemma 2, Gemma 3 text), built from minift's layers and the Llama family's attention.

Gemma is a Llama (RMSNorm, RoPE, grouped-query attention, a gated MLP; compare llama.py) with these differences:
- the token embedding is multiplied by sqrt(hidden_size), that number rounded to the weights' dtype first (in
  bf16, sqrt(640) = 25.30 becomes 25.25), as transformers does;
- RMSNorm multiplies by (1 + w), in fp32: the gains are stored minus one, so a fresh norm is the identity at w = 0;
- four norms per block, a "sandwich": before and after the attention, before and after the MLP;
- the MLP is GeGLU, down(gelu_tanh(gate(x)) * up(x)): SwiGLU with the tanh GELU in place of SiLU;
- attention is scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5;
- local layers (a sliding window) and global ones, by `layer_types`; Gemma 3 turns RoPE with a base of its own
  in the local layers (rope_local_base_freq, 10000) and rope_theta (1e6, with its scaling) in the global ones;
- Gemma 3 RMS-normalises each head of q and k (as Qwen3); Gemma 2 soft-caps instead, c tanh(x / c): the attention
  scores at attn_logit_softcapping (50) and the final logits at final_logit_softcapping (30);
- the LM head is the token embedding (tied).
Module names follow the Hugging Face checkpoint keys (`model.layers.0.pre_feedforward_layernorm`); a `gemma3`
checkpoint (with its vision tower) loads its language model, under `language_model.` in the file.
"""
import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..errors import MiniftError
from ..generate import KVCache
from ..heads import (Backbone, CausalLM, Classifier, TiedLMHead, attention_allowed, cached_positions, last_real_token,
                     pick_rows, pick_rows_backward, positions_from_mask)
from ..layers import (GELU, Attention, Embedding, Linear, RMSNorm, RotaryEmbedding, SoftCap, fp32_dtype, frozen_below,
                      keeps_for_backward)
from ..recompute import block_backward, block_forward
from .llama import (LlamaAttention, LlamaMLP, gguf_special_ids, gguf_value, gguf_vocab_size, read_rope_scaling,
                    rope_rescaling, rope_scaling_from_gguf, shortest_float)
from . import llama

MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")
LAYER_KINDS = ("sliding_attention", "full_attention")


@dataclass
class GemmaConfig:
    vocab_size: int = 262144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256  # its own setting: not hidden_size / num_attention_heads
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # the global layers' RoPE base (Gemma 2: every layer's)
    rope_scaling: dict | None = None  # the global layers' long-context rule (Gemma 3 4B and up: linear, factor 8)
    rope_local_base_freq: float | None = 10_000.0  # Gemma 3's local layers' RoPE base; None (Gemma 2): rope_theta
    query_pre_attn_scalar: float = 256  # attention scores are q.k * query_pre_attn_scalar ** -0.5
    sliding_window: int | None = 512  # the local layers' window
    layer_types: list | None = None  # "sliding_attention" or "full_attention" per layer (from_dict fills it)
    attn_logit_softcapping: float | None = None  # Gemma 2: 50.0
    final_logit_softcapping: float | None = None  # Gemma 2: 30.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | list | None = 1
    pad_token_id: int | None = 0
    model_type: str = "gemma3_text"
    num_labels: int = 2  # for a classifier

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise MiniftError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}: check config.json")
        if self.head_dim % 2:
            raise MiniftError(f"head_dim {self.head_dim} is odd: rotary embedding turns pairs of coordinates")
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.model_type, self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= set(LAYER_KINDS):
            raise MiniftError(f"layer_types must name 'sliding_attention' or 'full_attention' for each of the "
                              f"{self.num_hidden_layers} layers: check config.json")
        if "sliding_attention" in self.layer_types and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise MiniftError(f"sliding_window {self.sliding_window!r} is not a whole number >= 1: check config.json")

    # what LlamaAttention and LlamaMLP read from a config
    @property
    def qkv_bias(self):
        return self.attention_bias

    @property
    def o_bias(self):
        return self.attention_bias

    @property
    def mlp_bias(self):
        return False

    @property
    def qk_norm(self):  # Gemma 3 normalises each head of q and k; Gemma 2 soft-caps the scores instead
        return self.model_type == "gemma3_text"

    def window_of(self, i):
        """Layer i's sliding window, or None for a global layer."""
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None

    @classmethod
    def from_dict(cls, d):
        """An HF config.json dict -> GemmaConfig; what minift cannot run exactly is refused, never approximated."""
        if d.get("model_type") == "gemma3":  # Gemma 3 with its vision tower: the language model's settings
            d = {**(d.get("text_config") or {}), **{k: v for k, v in d.items() if k != "text_config"},
                 "model_type": "gemma3_text"}
        kind = d.get("model_type")
        if kind not in MODEL_TYPES:
            raise MiniftError(f"model_type {kind!r} is not a Gemma model minift runs: {', '.join(MODEL_TYPES)}")
        if d.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise MiniftError(f"hidden_activation {d['hidden_activation']!r} is not supported: Gemma in minift uses "
                              "the tanh GELU (gelu_pytorch_tanh)")
        if d.get("use_bidirectional_attention"):
            raise MiniftError("use_bidirectional_attention (an embedding model such as EmbeddingGemma) is not "
                              "supported: minift runs Gemma as a causal language model")
        global_rope, local_rope = rope_settings(d)
        if local_rope.get("rope_type", local_rope.get("type", "default")) != "default":
            raise MiniftError("RoPE scaling on Gemma's local layers is not supported: minift scales the global ones")
        gemma2 = kind == "gemma2"
        if "id2label" in d and "num_labels" not in d:
            d = {**d, "num_labels": len(d["id2label"])}
        own = dict(  # the settings whose defaults differ between Gemma 2 and 3, and RoPE's spellings
            rope_theta=global_rope.get("rope_theta", d.get("rope_theta", 10_000.0 if gemma2 else 1e6)),
            rope_scaling=read_rope_scaling(global_rope, d),
            rope_local_base_freq=None if gemma2 else local_rope.get("rope_theta", d.get("rope_local_base_freq", 1e4)),
            sliding_window=d.get("sliding_window", 4096),
            layer_types=d.get("layer_types") or default_layer_types(kind, d.get("num_hidden_layers", 18),
                                                                     d.get("sliding_window_pattern", 6)),
            # null in config.json turns a cap off, a missing key is transformers' default (Gemma 2: 50 and 30); Gemma
            # 3's attention is never capped (transformers passes it no cap, whatever its config says)
            attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0) if gemma2 else None,
            final_logit_softcapping=d.get("final_logit_softcapping", 30.0 if gemma2 else None))
        rest = {k: v for k, v in d.items() if k in {f.name for f in fields(cls)} - own.keys() and v is not None}
        return cls(**rest, **own)


def default_layer_types(kind, n, pattern=6):
    """transformers' layouts for a config without layer_types: Gemma 2 alternates local and global (layer 0
    local), Gemma 3 has one global layer in every `sliding_window_pattern` (5 local, then 1 global)."""
    pattern = 2 if kind == "gemma2" else pattern
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def rope_settings(d):
    """(the global layers' RoPE dict, the local layers'). transformers 5 writes rope_parameters nested by layer
    kind ({full_attention: {rope_theta, rope_type, factor}, sliding_attention: {...}}), older files rope_theta,
    rope_local_base_freq and rope_scaling (the global layers' rule); Gemma 2's is one dict for every layer."""
    rope = d.get("rope_parameters") or {}
    if "full_attention" in rope or "sliding_attention" in rope:
        # (an old-style rope_scaling beside them updates the global dict, as in transformers)
        return {**(rope.get("full_attention") or {}), **(d.get("rope_scaling") or {})}, rope.get("sliding_attention") or {}
    return {**(d.get("rope_scaling") or {}), **rope}, {}


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + w), in fp32 (layers.RMSNorm with another gain): Gemma stores each gain minus one, so its
    weights start at 0. The backward is RMSNorm's: d(1 + w)/dw = 1, so dW is the same sum."""

    def __init__(self, dim, eps):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def gain(self):
        return 1.0 + self.weight.to(fp32_dtype(self.weight))  # in fp32 even for bf16 weights (1 + w loses w in bf16)


class GeGLU(nn.Module):
    """gelu_tanh(gate) * up: Gemma's gated activation (Llama's SwiGLU with the tanh GELU in place of SiLU).
    The product's backward gives each factor the other times dy; the GELU's own backward does the rest."""

    def __init__(self):
        super().__init__()
        self.gelu = GELU("tanh")

    def forward(self, gate, up):
        g = self.gelu(gate)
        if keeps_for_backward(self):
            self.g, self.up = g, up  # keeps: both factors (the GELU keeps its own input)
        return g * up

    def backward(self, dy):
        g, up = self.g, self.up
        del self.g, self.up
        return self.gelu.backward(dy * up), dy * g  # (dgate, dup)


class GemmaMLP(LlamaMLP):
    """down(gelu_tanh(gate(x)) * up(x)): Llama's MLP (its forward and backward) with GeGLU for SwiGLU."""

    def __init__(self, c):
        super().__init__(c)
        self.act = GeGLU()


class GemmaAttention(LlamaAttention):
    """Llama's grouped-query attention (its forward and backward, the window and the cache) with Gemma's scale
    query_pre_attn_scalar ** -0.5, Gemma 3's q/k norms (1 + w) and Gemma 2's soft-capped scores."""

    def __init__(self, c, window=None):
        super().__init__(c, window)
        if c.qk_norm:
            self.q_norm, self.k_norm = GemmaRMSNorm(c.head_dim, c.rms_norm_eps), GemmaRMSNorm(c.head_dim, c.rms_norm_eps)
        self.attn = Attention(c.attention_dropout, scale=c.query_pre_attn_scalar ** -0.5, softcap=c.attn_logit_softcapping)


class GemmaDecoderLayer(nn.Module):
    """The sandwich: x + post_norm(attn(input_norm(x))), then + post_ff_norm(mlp(pre_ff_norm(x))). Normalising a
    branch's output too keeps what each block adds to the residual stream at one scale."""

    def __init__(self, c, window=None):
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = GemmaAttention(c, window)
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GemmaMLP(c)
        self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, allowed, cache=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, allowed, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))

    def backward(self, dout):
        # each residual passes its gradient through and adds its branch's, each branch backward from its last norm
        d_mlp = self.mlp.backward(self.post_feedforward_layernorm.backward(dout))
        dx = dout + self.pre_feedforward_layernorm.backward(d_mlp)
        d_attn = self.self_attn.backward(self.post_attention_layernorm.backward(dx))
        return dx + self.input_layernorm.backward(d_attn)


class GemmaModel(Backbone):
    """Token ids -> last hidden states (after the final norm). Checkpoint keys without the `model.` prefix."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.windows = [c.window_of(i) for i in range(c.num_hidden_layers)]  # None: a global layer
        self.layers = nn.ModuleList(GemmaDecoderLayer(c, window) for window in self.windows)
        self.norm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps)
        # the global layers' angles; Gemma 3's local layers turn theirs with a base of their own
        self.rotary_emb = RotaryEmbedding(c.head_dim, c.rope_theta, rope_rescaling(c.rope_scaling, c.rope_theta))
        self.rotary_emb_local = None if c.rope_local_base_freq is None else RotaryEmbedding(c.head_dim,
                                                                                         c.rope_local_base_freq)

    def embed_scale(self):
        """sqrt(hidden_size) as transformers makes it: a float32 number, then in the weights' dtype."""
        return torch.tensor(math.sqrt(self.config.hidden_size), dtype=torch.float32).to(self.embed_tokens.weight.dtype)

    def forward(self, input_ids, attention_mask=None, position_ids=None, caches=None, document_ids=None):
        """caches: a list of one [] per layer (new_cache()), filled and extended by generation; None in training."""
        B, T = input_ids.shape
        past = cached_positions(caches, attention_mask, T, windowed=any(self.windows))
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:  # counted over real tokens only, so a left-padded row starts at 0 too
            position_ids = positions_from_mask(attention_mask)[:, past:]
        masks = {w: attention_allowed(attention_mask, T, past, document_ids, w) for w in set(self.windows)}
        x = self.embed_tokens(input_ids) * self.embed_scale()
        angles = {None: self.rotary_emb(position_ids, x.dtype)}  # global layers; local ones by their window
        local = self.rotary_emb if self.rotary_emb_local is None else self.rotary_emb_local
        angles[self.config.sliding_window] = local(position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            (cos, sin), allowed = angles[self.windows[i]], masks[self.windows[i]]
            x = layer(x, cos, sin, allowed, caches[i]) if caches is not None else block_forward(layer, x, cos, sin, allowed)
        return self.norm(x)

    def new_cache(self, capacity=0):
        return [KVCache(capacity, window) for window in self.windows]

    def stages(self):
        """The parts of the forward in order; backward stops below the lowest trainable one (freeze.py)."""
        return [self.embed_tokens, *self.layers]

    def backward(self, dhidden):
        d = self.norm.backward(dhidden)
        for layer in reversed(self.layers):
            if frozen_below(layer):
                return  # no trainable weight below this layer: no gradient left to compute
            d = block_backward(layer, d)
        self.embed_tokens.backward(d * self.embed_scale())  # x = E[id] * scale: the rows get dx * scale


class GemmaForCausalLM(CausalLM):
    """GemmaModel + the LM head (the token embedding when tied, as in every Gemma), then Gemma 2's soft cap
    on the logits. The loss, count_targets and generate() come from heads.CausalLM."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.model = GemmaModel(c)
        if c.tie_word_embeddings:
            self.tied_head = TiedLMHead()  # no parameter of its own: the head is embed_tokens
        else:
            self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.final_logit_softcapping:
            self.final_softcap = SoftCap(c.final_logit_softcapping)  # (heads.CausalLM: the chunked loss applies it)

    def new_cache(self, capacity=0):
        return self.model.new_cache(capacity)

    def head_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, caches=None, document_ids=None):
        hidden = self.model(input_ids, attention_mask, position_ids, caches, document_ids)
        if self.last_only:  # last_logits(): the head on each row's last position only
            hidden = hidden[:, -1:]
        if self.head_is_deferred():
            return hidden  # the chunked loss runs the head and the cap (heads.chunked_lm_loss)
        logits = self.lm_head(hidden) if not self.config.tie_word_embeddings else self.tied_head(hidden, self.head_weight())
        return logits if self.final_softcap is None else self.final_softcap(logits)

    def backward(self, dlogits):
        if self.head_is_deferred():  # the chunked loss did the head's backward: this is the hidden states' gradient
            return self.model.backward(dlogits)
        if self.final_softcap is not None:
            dlogits = self.final_softcap.backward(dlogits)
        if not self.config.tie_word_embeddings:
            return self.model.backward(self.lm_head.backward(dlogits))
        self.model.backward(self.tied_head.backward(dlogits, self.head_weight()))


class GemmaForSequenceClassification(Classifier):
    """The last real (non-pad) token's hidden state -> class logits (as Llama's; transformers caps nothing here)."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.model = GemmaModel(c)
        self.score = Linear(c.hidden_size, c.num_labels, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids, attention_mask, position_ids)
        last = last_real_token(attention_mask)
        if keeps_for_backward(self):
            self.last, self.hidden_shape = last, hidden.shape  # keeps: where the picked rows came from
        return self.score(pick_rows(hidden, last))

    def backward(self, dlogits):
        dhidden = pick_rows_backward(self.score.backward(dlogits), self.last, self.hidden_shape)
        del self.last, self.hidden_shape
        self.model.backward(dhidden)


# ---- what checkpoints.py needs from a family -------------------------------------------------------------

Config = GemmaConfig
TASKS = {"classify": GemmaForSequenceClassification, "lm": GemmaForCausalLM, "encode": GemmaModel}
NEW_HEADS = ("score.",)  # a classification head is trained from scratch
LABEL_HEAD = "score.weight"  # the layer with one row per class
DEFAULT_TASK = "lm"  # what the pretrained checkpoint computes: next-token logits
FAN_IN_FAN_OUT = False  # weights are (out, in) in HF's files, as in nn.Linear
# a causal LM's head in a classifier (or a tied copy), and a gemma3 file's vision tower, which we do not run
UNUSED_HEADS = ("lm_head.", "vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                "model.multi_modal_projector.")
_ARCHITECTURES = {"gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification", "Gemma2Model"),
                  "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification", "Gemma3TextModel")}
# a gemma3 file keeps its language model under these prefixes (on disk, and in transformers 5's module tree)
_LANGUAGE_MODEL = (("language_model.model.", "model."), ("model.language_model.", "model."),
                   ("language_model.lm_head.", "lm_head."))


def hf_to_ours(key, tensor, model):
    """An HF checkpoint key -> (our parameter name, tensor), or (None, tensor) for a key to skip."""
    for theirs, ours in _LANGUAGE_MODEL:
        if key.startswith(theirs):
            key = ours + key[len(theirs):]
    if isinstance(model, GemmaModel):  # a base model: HF's Gemma3TextModel keys have no "model." prefix
        return (key[len("model."):] if key.startswith("model.") else key), tensor
    if key.startswith(("model.",) + NEW_HEADS + UNUSED_HEADS):
        return key, tensor
    return "model." + key, tensor  # a base model's checkpoint loaded into a task model


def hf_state_dict(model):
    """Our parameters under transformers' names: the identity (a tied head is the embedding, listed once)."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()}


def architecture(model):
    """The `architectures` entry of config.json: Gemma3ForCausalLM, Gemma2ForSequenceClassification, ..."""
    return _ARCHITECTURES[model.config.model_type][("lm", "classify", "encode").index(model.task)]


# ---- From a GGUF file: llama.cpp's metadata -> this family's config.json (gguf.py reads the file) ----------

GGUF_MODEL_TYPES = {"gemma2": "gemma2", "gemma3": "gemma3_text"}  # general.architecture -> our model_type
GGUF_PERMUTED_QK = ()  # llama.cpp's Gemma converters keep Hugging Face's q/k row order
GGUF_TOP_NAMES = llama.GGUF_TOP_NAMES
# Llama's names, but for the sandwich: llama.cpp's ffn_norm is the norm before the MLP, and two norms after
GGUF_LAYER_NAMES = {**llama.GGUF_LAYER_NAMES, "ffn_norm": "pre_feedforward_layernorm",
                    "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
# llama.cpp's Gemma converters store every norm's weight plus one (the gain 1 + w its RMSNorm multiplies by):
# minus one on reading, plus one on export
GGUF_NORM_SHIFT = 1.0
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # llama.cpp scales these by hidden / heads (query_pre_attn_scalar)
# A Gemma file without a chat template (the Gemma 3 270M base file) gets its family's, so that `generate` and the
# instruction job speak Gemma's turns: google/gemma-2-2b-it's and google/gemma-3-4b-it's templates
GGUF_CHAT_TEMPLATES = {
    "gemma2": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
              "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
              "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
              "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
    "gemma3": "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
              "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
              "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
              "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
              "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
              "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
              "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
              "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
              "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
              "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
              "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
              "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
              "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
              "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
              "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
              "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
              "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"}


def config_from_gguf(meta: dict, shapes: dict, arch: str, rope_freqs=None) -> dict:
    """The config.json of a Gemma 2 or Gemma 3 GGUF, from its `{arch}.*` metadata and its tensors' shapes. What the
    file does not say, llama.cpp fixes by architecture, and so do we: Gemma 3's local layers turn RoPE with base
    10000 and one layer in six is global; Gemma 2 alternates; scores are scaled by head_dim ** -0.5 (27B: by
    (hidden / heads) ** -0.5)."""
    def need(key):
        return gguf_value(meta, arch, key)

    model_type, gemma2 = GGUF_MODEL_TYPES[arch], arch == "gemma2"
    hidden, heads, layers = need("embedding_length"), need("attention.head_count"), need("block_count")
    head_dim = meta.get(f"{arch}.attention.key_length", hidden // heads)
    theta = shortest_float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    return dict(
        architectures=[_ARCHITECTURES[model_type][0]], model_type=model_type, vocab_size=gguf_vocab_size(meta, arch, shapes),
        hidden_size=hidden, intermediate_size=need("feed_forward_length"), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=meta.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=head_dim, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=need("context_length"),
        rms_norm_eps=shortest_float(need("attention.layer_norm_rms_epsilon")), rope_theta=theta,
        rope_scaling=rope_scaling_from_gguf(meta, arch, rope_freqs, theta, head_dim),
        rope_local_base_freq=None if gemma2 else 10000.0,
        query_pre_attn_scalar=hidden // heads if layers == GEMMA_27B_LAYERS[arch] else head_dim,
        sliding_window=need("attention.sliding_window"), layer_types=default_layer_types(model_type, layers),
        attn_logit_softcapping=meta.get(f"{arch}.attn_logit_softcapping") if gemma2 else None,
        final_logit_softcapping=meta.get(f"{arch}.final_logit_softcapping"),
        attention_bias=False, attention_dropout=0.0, initializer_range=0.02,
        tie_word_embeddings="output.weight" not in shapes, **gguf_special_ids(meta))
