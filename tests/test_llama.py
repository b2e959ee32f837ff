"""The Llama family (llama.py and its layers in layers.py): every hand-written backward against autograd in
float64, logits and greedy generation against transformers' Llama, Qwen2, Qwen3 and Mistral on random-init
checkpoints (sliding windows shorter than the sequence, RoPE scaling past the pretraining length), loading and
saving under HF names, and the refusals (other RoPE rules, experts)."""
import json
import math
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file

from minift.models import llama
from minift.errors import MiniftError
from minift.heads import attention_allowed
from minift.layers import RMSNorm, RotaryEmbedding, SwiGLU, apply_rope, apply_rope_backward
from minift.models.llama import (LlamaAttention, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaMLP,
                          LlamaModel)

TOL = 1e-8  # float64 gradients, relative to the largest entry of the reference gradient

# small random-init shapes: GQA ratios 1, 3 and 4; tied and untied heads; biases; rope theta; head_dim != hidden/heads
SHAPES = {
    "llama-mha-untied": dict(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=40,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0),
    "llama-gqa3-tied": dict(model_type="llama", vocab_size=67, hidden_size=48, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, rope_theta=500.0,
                            tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama-gqa4-bias-headdim": dict(model_type="llama", vocab_size=53, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=6,
                                    rope_theta=100000.0, attention_bias=True, mlp_bias=True),
    "qwen2-gqa2-tied": dict(model_type="qwen2", vocab_size=71, hidden_size=32, intermediate_size=56,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                            tie_word_embeddings=True),
    "mistral-gqa2": dict(model_type="mistral", vocab_size=59, hidden_size=32, intermediate_size=44,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         sliding_window=None),
    # Qwen3: q/k RMSNorm per head, head_dim 12 with hidden 32 and 4 heads (not hidden / heads); with o/q/k/v biases
    "qwen3-gqa2-tied-headdim": dict(model_type="qwen3", vocab_size=73, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                    rope_theta=1e6, tie_word_embeddings=True),
    "qwen3-gqa3-bias": dict(model_type="qwen3", vocab_size=61, hidden_size=48, intermediate_size=40,
                            num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                            attention_bias=True, rms_norm_eps=1e-5),
    # sliding windows shorter than the 7-token sequences: Mistral on every layer, Qwen2 from max_window_layers up,
    # Qwen3 where layer_types says
    "mistral-window4": dict(model_type="mistral", vocab_size=59, hidden_size=32, intermediate_size=44,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=4),
    "qwen2-window3-tied": dict(model_type="qwen2", vocab_size=71, hidden_size=32, intermediate_size=56,
                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                               tie_word_embeddings=True, use_sliding_window=True, sliding_window=3, max_window_layers=1),
    "qwen3-window2-types": dict(model_type="qwen3", vocab_size=67, hidden_size=32, intermediate_size=40,
                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                use_sliding_window=True, sliding_window=2,
                                layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
HF_CLASS = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}
WINDOWED = ["mistral-window4", "qwen2-window3-tied", "qwen3-window2-types"]


def rel_err(ours, ref):
    assert ours is not None, "no gradient from the hand-written backward"
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    assert scale > 0, "the reference gradient is all zero: the check would prove nothing"
    return (ours - ref).abs().max().item() / scale


def perturb(module, scale=0.1, seed=0):
    """Move every parameter off its init (RMSNorm weight 1, biases 0), so that a backward ignoring one fails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def config(shape, **overrides):
    return LlamaConfig.from_dict({**SHAPES[shape], "eos_token_id": None, "bos_token_id": None, **overrides})


# ---- layers, one at a time --------------------------------------------------------------------------------

def check(layer, inputs, run_ours, seed=1):
    """Autograd on the layer's forward vs its hand-written backward, same inputs, same dropout masks.
    inputs: float tensors (all differentiable); run_ours(layer, inputs, dout) -> input gradients (tuple)."""
    layer.double().train()
    leaves = [x.clone().requires_grad_() for x in inputs]
    torch.manual_seed(seed)
    out = layer(*leaves)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(99))
    out.backward(gradient=dout)
    ref_params = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch.manual_seed(seed)
        out2 = layer(*inputs)
        grads = run_ours(layer, dout)
    torch.testing.assert_close(out2, out.detach(), rtol=0, atol=0)
    errors = [rel_err(g, x.grad) for g, x in zip(grads, leaves)]
    errors += [rel_err(p.grad, ref_params[n]) for n, p in layer.named_parameters()]
    return max(errors)


def test_rmsnorm_gradient():
    norm = perturb(RMSNorm(24, eps=1e-5), scale=0.5)
    x = torch.randn(3, 5, 24, dtype=torch.float64) * 2 + 0.5
    assert check(norm, [x], lambda m, d: (m.backward(d),)) < TOL


def test_rmsnorm_matches_transformers(transformers):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    ours, ref = perturb(RMSNorm(16, eps=1e-5), 0.5), LlamaRMSNorm(16, eps=1e-5)
    ref.weight.data.copy_(ours.weight)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_rope_backward_is_rotation_by_minus_the_angle():
    rope = RotaryEmbedding(8, theta=100.0)
    positions = torch.tensor([[0, 1, 2, 5, 9], [3, 3, 4, 40, 1000]])
    cos, sin = rope(positions, torch.float64)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    y = apply_rope(x, cos, sin)
    dout = torch.randn_like(y)
    y.backward(dout)
    assert rel_err(apply_rope_backward(dout, cos, sin), x.grad) < TOL
    # a rotation keeps lengths, and turning back undoes it (to fp32 precision: the angles are computed in fp32,
    # as transformers does, so cos^2 + sin^2 = 1 only to about 1e-7; with float64 angles to 1e-15)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0)
    angles = positions[..., None].double() * rope.inv_freq.double()
    cos64, sin64 = torch.cat([angles, angles], -1).cos()[:, None], torch.cat([angles, angles], -1).sin()[:, None]
    torch.testing.assert_close(apply_rope_backward(apply_rope(x, cos64, sin64), cos64, sin64), x.detach(),
                               rtol=0, atol=1e-13)


def test_rope_angles_match_transformers(transformers):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    hf_config = transformers.LlamaConfig(hidden_size=48, num_attention_heads=4, rope_theta=5000.0)
    positions = torch.tensor([[0, 1, 2, 700, 4095]])
    x = torch.randn(1, 5, 48)
    cos_ref, sin_ref = LlamaRotaryEmbedding(hf_config)(x, positions)
    cos, sin = RotaryEmbedding(12, 5000.0)(positions, torch.float32)
    torch.testing.assert_close(cos[:, 0], cos_ref, rtol=0, atol=0)
    torch.testing.assert_close(sin[:, 0], sin_ref, rtol=0, atol=0)
    q = torch.randn(1, 4, 5, 12)
    torch.testing.assert_close(apply_rope(q, cos, sin), apply_rotary_pos_emb(q, q, cos_ref, sin_ref)[0])


def test_swiglu_and_mlp_gradients():
    gate, up = torch.randn(2, 5, 12, dtype=torch.float64) * 3, torch.randn(2, 5, 12, dtype=torch.float64)
    assert check(SwiGLU(), [gate, up], lambda m, d: m.backward(d)) < TOL
    mlp = perturb(LlamaMLP(config("llama-gqa4-bias-headdim")), scale=0.3)  # with biases
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    assert check(mlp, [x], lambda m, d: (m.backward(d),)) < TOL


@pytest.mark.parametrize("shape,window", [("llama-mha-untied", None), ("llama-gqa3-tied", None),
                                          ("llama-gqa4-bias-headdim", None), ("qwen2-gqa2-tied", None),
                                          ("qwen3-gqa2-tied-headdim", None), ("qwen3-gqa3-bias", 3),
                                          ("llama-gqa3-tied", 2)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_grouped_query_attention_gradient(shape, window, dropout, padded_batch):
    """q/k/v projections, Qwen3's q/k norms, RoPE on q and k, k/v shared by groups of query heads, causal +
    padding masks, and a sliding window (the band of the mask) shorter than the rows."""
    c = config(shape, attention_dropout=dropout)
    attn = perturb(LlamaAttention(c, window), scale=0.3)
    _, mask = padded_batch([6, 3], "left", T=6)
    mask = torch.cat([mask, padded_batch([4], "right", T=6)[1]])
    allowed = attention_allowed(mask, 6, window=window)
    cos, sin = RotaryEmbedding(c.head_dim, c.rope_theta)(llama.positions_from_mask(mask), torch.float64)
    x = torch.randn(3, 6, c.hidden_size, dtype=torch.float64)
    err = check(_Bound(attn, cos, sin, allowed), [x], lambda m, d: (m.attn.backward(d),))
    assert err < TOL, f"{shape}: relative error {err:.3e}"


class _Bound(torch.nn.Module):
    """LlamaAttention with its angles and mask fixed, so that x is its only input."""

    def __init__(self, attn, cos, sin, allowed):
        super().__init__()
        self.attn, self.cos, self.sin, self.allowed = attn, cos, sin, allowed

    def forward(self, x):
        return self.attn(x, self.cos, self.sin, self.allowed)


def test_grouped_queries_equal_repeated_keys_and_the_k_gradient_sums_each_group():
    """Stacking a group's query heads along the time axis (one matmul per k/v head) gives the attention that
    repeating each k/v head for its group gives, and the shared head's gradient is the sum over its group."""
    from minift.layers import Attention

    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, hd = 2, 6, 2, 4, 5
    q, k, v = (torch.randn(*shape, generator=g, dtype=torch.float64)
               for shape in ((B, H, T, hd), (B, Hkv, T, hd), (B, Hkv, T, hd)))
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
    dout = torch.randn(B, H, T, hd, generator=g, dtype=torch.float64)
    attn = Attention(0.0).train()
    with torch.no_grad():
        out = llama.ungroup(attn(llama.group_queries(q, Hkv), k, v, allowed.repeat(1, 1, H // Hkv, 1)), H)
        dq, dk, dv = attn.backward(llama.group_queries(dout, Hkv))
    # the reference: each k/v head repeated for the 3 query heads of its group, then ordinary attention
    k_rep, v_rep = (t.repeat_interleave(H // Hkv, dim=1).requires_grad_() for t in (k, v))
    q_ref = q.clone().requires_grad_()
    scores = ((q_ref @ k_rep.transpose(-1, -2)) / hd ** 0.5).masked_fill(~allowed, float("-inf"))
    ref = torch.softmax(scores, -1) @ v_rep
    ref.backward(dout)
    torch.testing.assert_close(out, ref.detach())
    torch.testing.assert_close(llama.ungroup(dq, H), q_ref.grad)
    torch.testing.assert_close(dk[:, 1], k_rep.grad[:, 3] + k_rep.grad[:, 4] + k_rep.grad[:, 5])
    torch.testing.assert_close(dv[:, 0], v_rep.grad[:, 0] + v_rep.grad[:, 1] + v_rep.grad[:, 2])


# ---- whole models against autograd ------------------------------------------------------------------------

def make(kind, shape, **overrides):
    c = config(shape, pad_token_id=0, num_labels=3, **overrides)
    cls = {"lm": LlamaForCausalLM, "classify": LlamaForSequenceClassification, "encode": LlamaModel}[kind]
    return perturb(cls(c))


def ragged(model, padded_batch):
    """Rows 0-1 right-padded, rows 2-3 left-padded, and a row that is all padding."""
    V = model.config.vocab_size
    r_ids, r_mask = padded_batch([7, 4], "right", V)
    l_ids, l_mask = padded_batch([3, 6], "left", V, T=7)
    ids = torch.cat([r_ids, l_ids, torch.zeros(1, 7, dtype=torch.long)])
    mask = torch.cat([r_mask, l_mask, torch.zeros(1, 7, dtype=torch.long)])
    if model.task == "lm":
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, :3] = -100  # a prompt: not supervised
    else:
        labels = torch.tensor([0, 2, 1, 1, 0])
    return dict(input_ids=ids, attention_mask=mask), labels


def model_grad_errors(model, inputs, labels, seed=1):
    model.double().train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out_ref = model(**inputs)
    if model.task == "encode":
        dout = torch.randn(out_ref.shape, dtype=out_ref.dtype, generator=torch.Generator().manual_seed(5))
        out_ref.backward(dout)
    else:
        loss_ref, _ = model.loss(out_ref, labels)
        loss_ref.backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch.manual_seed(seed)
        out = model(**inputs)
        if model.task == "encode":
            model.backward(dout)
        else:
            loss, d = model.loss(out, labels)
            assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-13)
            model.backward(d)
    torch.testing.assert_close(out, out_ref.detach(), rtol=0, atol=0)
    return {n: rel_err(p.grad, ref[n]) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind,shape", [("lm", "llama-mha-untied"), ("lm", "llama-gqa3-tied"),
                                        ("lm", "qwen2-gqa2-tied"), ("classify", "llama-gqa4-bias-headdim"),
                                        ("encode", "mistral-gqa2"), ("lm", "qwen3-gqa2-tied-headdim"),
                                        ("classify", "qwen3-gqa3-bias"), ("lm", "mistral-window4"),
                                        ("lm", "qwen2-window3-tied"), ("classify", "qwen3-window2-types")])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_model_gradients_match_autograd(kind, shape, dropout, padded_batch):
    model = make(kind, shape, attention_dropout=dropout)
    inputs, labels = ragged(model, padded_batch)
    errors = model_grad_errors(model, inputs, labels)
    assert len(errors) == len(list(model.parameters()))
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{kind} {shape} dropout {dropout}: {worst} relative error {errors[worst]:.3e}"


def test_tied_head_is_one_tensor_with_both_gradients(padded_batch):
    model = make("lm", "llama-gqa3-tied")
    assert not hasattr(model, "lm_head")
    assert [n for n, _ in model.named_parameters() if "embed" in n] == ["model.embed_tokens.weight"]
    inputs, labels = ragged(model, padded_batch)
    assert model_grad_errors(model, inputs, labels)["model.embed_tokens.weight"] < TOL
    unused = sorted(set(range(model.config.vocab_size)) - set(inputs["input_ids"].flatten().tolist()))
    assert unused and model.model.embed_tokens.weight.grad[unused].abs().max() > 0  # the head's use


def test_training_path_keeps_nothing_after_backward(padded_batch):
    for kind, shape in [("lm", "llama-gqa3-tied"), ("lm", "llama-mha-untied"), ("classify", "qwen2-gqa2-tied")]:
        model = make(kind, shape, attention_dropout=0.1).train()
        inputs, labels = ragged(model, padded_batch)
        with torch.no_grad():
            loss, d = model.loss(model(**inputs), labels)
            model.backward(d)
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())
        left = {f"{m}.{a}" for m, mod in model.named_modules() for a, v in vars(mod).items()
                if isinstance(v, torch.Tensor)}
        assert not left, f"{kind} {shape}: still held after backward: {left}"


def test_eval_and_autograd_forward_keep_nothing(padded_batch):
    for kind in ("lm", "classify"):
        model = make(kind, "llama-gqa3-tied", attention_dropout=0.1)
        inputs, _ = ragged(model, padded_batch)
        with torch.no_grad():
            model.eval()(**inputs)
        model.train()(**inputs)  # autograd on: the graph keeps what it needs, the layers nothing
        left = {f"{m}.{a}" for m, mod in model.named_modules() for a, v in vars(mod).items()
                if isinstance(v, torch.Tensor)}
        assert not left, f"{kind}: kept without need: {left}"


def test_frozen_model_computes_no_frozen_gradient(padded_batch):
    """Everything frozen but the head: no .grad appears on a frozen tensor, and the head's is autograd's."""
    for kind, shape, head in [("classify", "llama-gqa4-bias-headdim", "score.weight"),
                              ("lm", "llama-mha-untied", "lm_head.weight")]:
        model = make(kind, shape)
        for n, p in model.named_parameters():
            p.requires_grad_(n == head)
        inputs, labels = ragged(model, padded_batch)
        errors = model_grad_errors(model, inputs, labels)
        assert list(errors) == [head] and errors[head] < TOL
        assert [n for n, p in model.named_parameters() if p.grad is not None] == [head]


def test_padding_does_not_change_results(padded_batch):
    """A sequence alone gives the same logits as inside a left- or right-padded batch."""
    for kind in ("lm", "classify"):
        model = make(kind, "llama-gqa3-tied").eval()
        inputs, _ = ragged(model, padded_batch)
        with torch.no_grad():
            batch_out = model(**inputs)
            for row, (start, n) in enumerate([(0, 7), (0, 4), (4, 3), (1, 6)]):
                alone = model(inputs["input_ids"][row:row + 1, start:start + n])
                if kind == "lm":
                    torch.testing.assert_close(batch_out[row, start:start + n], alone[0], rtol=0, atol=2e-6)
                else:
                    torch.testing.assert_close(batch_out[row], alone[0], rtol=0, atol=2e-6)
            assert torch.isfinite(batch_out).all()


# ---- against transformers --------------------------------------------------------------------------------

def hf_model(transformers, shape, task="lm", **overrides):
    """A random-init transformers model of this shape, perturbed so that no bias is 0 and no norm is 1."""
    spec = {**SHAPES[shape], **overrides}
    family = HF_CLASS[spec.pop("model_type")]
    cfg = getattr(transformers, family + "Config")(**spec, attn_implementation="eager")
    torch.manual_seed(0)
    suffix = "ForCausalLM" if task == "lm" else "ForSequenceClassification"
    return perturb(getattr(transformers, family + suffix)(cfg)).eval()


def load_folder(folder, task):
    """config.json + model.safetensors -> our model, with hf_to_ours only (strict: every tensor accounted for)."""
    model = llama.TASKS[task](llama.Config.from_dict(json.loads((folder / "config.json").read_text())))
    ours = dict(model.named_parameters())
    for key, t in load_file(folder / "model.safetensors").items():
        name, t = llama.hf_to_ours(key, t, model)
        if name is None or (name not in ours and name.startswith(llama.UNUSED_HEADS)):
            continue
        p = ours.pop(name)  # KeyError: an unexpected tensor
        assert p.shape == t.shape, key
        p.data.copy_(t)
    assert all(n.startswith(llama.NEW_HEADS) for n in ours), f"missing: {list(ours)}"
    return model.eval()


def hf_inputs(padded_batch, vocab, side):
    ids, mask = padded_batch([7, 3, 5], side, vocab, pad_id=0, T=7)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers counts from the mask only in generate()
    return ids, mask, positions


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_lm_logits_match_transformers(shape, side, transformers, tmp_path, padded_batch):
    hf = hf_model(transformers, shape)
    hf.save_pretrained(tmp_path)
    ours = load_folder(tmp_path, "lm")
    assert ours.config.tie_word_embeddings == SHAPES[shape].get("tie_word_embeddings", False)
    ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, side)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, mask)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", ["llama-gqa4-bias-headdim", "qwen2-gqa2-tied"])
def test_classifier_logits_match_transformers(shape, transformers, tmp_path, padded_batch):
    hf = hf_model(transformers, shape, task="classify", num_labels=3, pad_token_id=0)
    hf.save_pretrained(tmp_path)
    ours = load_folder(tmp_path, "classify")
    for side in ("left", "right"):
        ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, side)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            assert (ours(ids, mask) - ref).abs().max() <= 1e-5


def test_checkpoint_of_a_causal_lm_loads_into_a_classifier_and_base(transformers, tmp_path):
    hf = hf_model(transformers, "llama-mha-untied")
    hf.save_pretrained(tmp_path)
    classifier = load_folder(tmp_path, "classify")  # lm_head dropped, score new
    base = load_folder(tmp_path, "encode")  # "model." prefix dropped
    torch.testing.assert_close(base.embed_tokens.weight, hf.model.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(classifier.model.norm.weight, hf.model.norm.weight, rtol=0, atol=0)
    ids = torch.randint(1, 61, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(base(ids), hf.model(ids).last_hidden_state, rtol=0, atol=1e-5)
    # old checkpoints carry RoPE's frequencies as a buffer: skipped, never an error
    assert llama.hf_to_ours("model.layers.0.self_attn.rotary_emb.inv_freq", None, base)[0] is None


@pytest.mark.parametrize("shape", ["llama-gqa3-tied", "llama-gqa4-bias-headdim", "qwen2-gqa2-tied", "mistral-gqa2",
                                   "qwen3-gqa2-tied-headdim", "qwen3-gqa3-bias", *WINDOWED])
def test_saved_state_loads_into_transformers(shape, transformers, tmp_path, padded_batch):
    """hf_state_dict + our config, written as a checkpoint folder: transformers gives the same logits. (The
    source config's keys ride along, as save_checkpoint's hf_config: Qwen's use_sliding_window and layer_types.)"""
    ours = make("lm", shape).eval()
    config = {**SHAPES[shape], **asdict(ours.config), "architectures": [llama.architecture(ours)]}
    tensors = llama.hf_state_dict(ours)
    assert ("lm_head.weight" in tensors) == (not ours.config.tie_word_embeddings)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == llama.architecture(ours)
    ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, "left")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, mask)
    assert (out[mask.bool()] - ref[mask.bool()]).abs().max() <= 1e-5


def greedy(model, ids, mask, n):
    """Greedy decoding with the KV cache: the prompt once, then one token per step."""
    try:
        from minift.generate import generate
    except ImportError:
        generate = None
    if generate is not None:
        return generate(model, ids, max_new_tokens=n, attention_mask=mask, eos_token_id=-1)
    caches, out, step = model.new_cache(), ids, ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(step, mask, caches=caches)[:, -1].argmax(-1, keepdim=True)
            out, step, mask = torch.cat([out, nxt], 1), nxt, torch.cat([mask, torch.ones_like(nxt)], 1)
    return out


@pytest.mark.parametrize("shape", ["llama-gqa3-tied", "qwen2-gqa2-tied", "llama-gqa4-bias-headdim",
                                   "qwen3-gqa2-tied-headdim", *WINDOWED])
def test_greedy_generation_matches_transformers(shape, transformers, tmp_path, padded_batch):
    """Prompts of 6 and 3 tokens (left-padded) and 12 new ones: with a window of 2-4, the local layers' cache
    trims itself many times over."""
    hf = hf_model(transformers, shape, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    hf.save_pretrained(tmp_path)
    ours = load_folder(tmp_path, "lm")
    ids, mask = padded_batch([6, 3], "left", ours.config.vocab_size, pad_id=0)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    out = greedy(ours, ids, mask, 12)
    assert out.tolist() == ref.tolist()


def test_kv_cache_gives_the_logits_of_a_full_forward(padded_batch):
    model = make("lm", "llama-gqa3-tied").eval()
    ids, mask = padded_batch([9, 5], "left", model.config.vocab_size, pad_id=0)
    with torch.no_grad():
        full = model(ids, mask)
        caches = model.new_cache()
        steps = [model(ids[:, :4], mask[:, :4], caches=caches)]
        steps += [model(ids[:, t:t + 1], mask[:, :t + 1], caches=caches) for t in range(4, 9)]
    assert caches[0].keys.shape[1] == model.config.num_key_value_heads  # the cache holds k/v heads, not repeated
    real = mask.bool()
    assert (torch.cat(steps, 1)[real] - full[real]).abs().max() <= 1e-5


# ---- sliding windows ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("window", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("past", [0, 4])
def test_window_mask_is_transformers_band(window, past, padded_batch):
    """attention_allowed with a window equals transformers' own sliding-window mask function (key j seen by
    query i iff i - w < j <= i: the query and w - 1 keys before it) with padding on either side, and with a cache
    of `past` positions before the T new queries."""
    from transformers.masking_utils import and_masks, padding_mask_function, sliding_window_causal_mask_function
    T = 5
    _, left = padded_batch([past + T, 2], "left", T=past + T)
    _, right = padded_batch([past + 1, 3], "right", T=past + T)
    mask = torch.cat([left, right])
    ours = attention_allowed(mask, T, past, window=window)
    rule = and_masks(sliding_window_causal_mask_function(window), padding_mask_function(mask.bool()))
    b, q, k = torch.arange(len(mask))[:, None, None], past + torch.arange(T)[None, :, None], torch.arange(past + T)
    ref = rule(b, torch.tensor(0), q, k[None, None, :])[:, None]  # (batch, 1, T, past + T), by index broadcasting
    assert torch.equal(ours, ref)
    assert ours.sum(-1).max() == min(window, past + T)  # never more than w keys for a query


@pytest.mark.parametrize("shape", WINDOWED)
def test_the_window_changes_the_logits(shape, padded_batch):
    """The windowed shapes are not full attention in disguise: the same weights without the window give other
    logits past the window (so the tests against transformers above check the window), and the same ones within."""
    windowed = make("lm", shape).eval()
    full = LlamaForCausalLM(config(shape, sliding_window=None, use_sliding_window=False))
    full.load_state_dict(windowed.state_dict())
    ids, mask = padded_batch([7], "right", windowed.config.vocab_size)
    with torch.no_grad():
        a, b = windowed(ids, mask), full.eval()(ids, mask)
    w = windowed.config.sliding_window
    assert (a[:, :w] - b[:, :w]).abs().max() <= 1e-6 < (a[:, w:] - b[:, w:]).abs().max() - 1e-3


@pytest.mark.parametrize("shape", WINDOWED)
def test_windowed_cache_keeps_only_the_window(shape, padded_batch):
    """Token by token through the cache gives the logits of one full forward; a local layer's cache keeps its window
    (generate.KVCache), a global layer's every position."""
    model = make("lm", shape).eval()
    ids, mask = padded_batch([11, 6], "left", model.config.vocab_size, pad_id=0)
    with torch.no_grad():
        full = model(ids, mask)
        caches = model.new_cache()
        steps = [model(ids[:, :5], mask[:, :5], caches=caches)]
        steps += [model(ids[:, t:t + 1], mask[:, :t + 1], caches=caches) for t in range(5, 11)]
    real = mask.bool()
    assert (torch.cat(steps, 1)[real] - full[real]).abs().max() <= 1e-5
    windows = [model.config.window_of(i) for i in range(model.config.num_hidden_layers)]
    # a global layer holds all 11 positions; a local one at most its window and room for as many steps (or the prompt's 5)
    assert all(c.length == 11 if w is None else c.keys.shape[2] <= w - 1 + max(5, w) for c, w in zip(caches, windows))
    assert any(w is not None for w in windows)


def test_windowed_cache_needs_the_mask(padded_batch):
    model = make("lm", "mistral-window4").eval()
    ids = torch.randint(1, 59, (2, 6))
    with torch.no_grad():
        caches = model.new_cache()
        model(ids, caches=caches)  # the first call: nothing cached yet, no mask needed
        with pytest.raises(MiniftError, match="attention_mask of the whole sequence") as e:
            model(ids[:, :1], caches=caches)
    assert "\n" not in str(e.value)


def test_which_layers_slide():
    """Qwen2.5's files set a window but use_sliding_window false: full attention everywhere; with it true, the
    layers from max_window_layers up (or those layer_types names); Mistral every layer; Llama none."""
    def windows(shape, **extra):
        c = LlamaConfig.from_dict({**SHAPES[shape], **extra})
        return [c.window_of(i) for i in range(c.num_hidden_layers)]

    assert windows("qwen2-gqa2-tied", sliding_window=8, use_sliding_window=False) == [None, None]
    assert windows("qwen2-gqa2-tied", sliding_window=8, use_sliding_window=True, max_window_layers=2) == [None, None]
    assert windows("qwen2-gqa2-tied", sliding_window=8, use_sliding_window=True, max_window_layers=1) == [None, 8]
    assert windows("qwen3-window2-types") == [2, None, 2]
    assert windows("mistral-window4") == [4, 4]
    assert windows("mistral-gqa2") == [None, None]
    assert windows("llama-mha-untied", sliding_window=8) == [None, None]


# ---- RoPE scaling -------------------------------------------------------------------------------------------

# head_dim 16 and theta 1e4: wavelengths 6.3 ... 19869 positions, so llama3's rule (original 64, high 4, low 1:
# kept below 16, divided above 64) has pairs in all three regions; sequences of 80 reach past 64
SCALINGS = {
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64),
    "linear": dict(rope_type="linear", factor=4.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    "yarn-attention-factor": dict(type="yarn", factor=2.0, original_max_position_embeddings=32, attention_factor=0.8,
                                  beta_fast=16, beta_slow=2),
    "yarn-mscale": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=40, mscale=1.0,
                        mscale_all_dim=0.5, truncate=False),
}
SCALED = dict(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0, max_position_embeddings=256)


@pytest.mark.parametrize("rule", list(SCALINGS))
def test_rope_scaling_frequencies_match_transformers(rule, transformers):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    spec = {**SCALED, "rope_scaling": SCALINGS[rule]}
    ref = LlamaRotaryEmbedding(transformers.LlamaConfig(**{k: v for k, v in spec.items() if k != "model_type"}))
    c = LlamaConfig.from_dict(spec)
    ours = LlamaModel(c).rotary_emb
    torch.testing.assert_close(ours.inv_freq, ref.inv_freq, rtol=0, atol=0)
    assert ours.attention_scale == pytest.approx(ref.attention_scaling, rel=1e-12)
    plain = RotaryEmbedding(16, 10000.0).inv_freq
    assert not torch.equal(ours.inv_freq, plain)  # the rule did something
    if rule == "llama3":  # the fastest pair is kept, the slowest divided by the factor, one in between neither
        assert ours.inv_freq[0] == plain[0] and ours.inv_freq[-1] == plain[-1] / 8
        assert plain[1] / 8 < ours.inv_freq[1] < plain[1]
    if rule == "yarn":
        assert ours.attention_scale == pytest.approx(0.1 * math.log(4.0) + 1)


@pytest.mark.parametrize("rule", list(SCALINGS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_rope_scaling_logits_match_transformers_past_the_original_length(rule, side, transformers, tmp_path,
                                                                         padded_batch):
    """Rows of 80 tokens, past original_max_position_embeddings, where a wrong rule shows; the same weights
    under plain RoPE give other logits (so the match is the rule's, yarn's attention factor included)."""
    spec = {**SCALED, "rope_scaling": SCALINGS[rule]}
    cfg = transformers.LlamaConfig(**{k: v for k, v in spec.items() if k != "model_type"}, attn_implementation="eager")
    torch.manual_seed(0)
    hf = perturb(transformers.LlamaForCausalLM(cfg)).eval()
    hf.save_pretrained(tmp_path)
    ours = load_folder(tmp_path, "lm")
    assert ours.config.rope_scaling["rope_type"] == SCALINGS[rule].get("rope_type", SCALINGS[rule].get("type"))
    ids, mask = padded_batch([80, 50, 71], side, ours.config.vocab_size, pad_id=0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, mask)
        plain = LlamaForCausalLM(LlamaConfig.from_dict({**SCALED, "rope_scaling": None}))
        plain.load_state_dict(ours.state_dict())
        unscaled = plain.eval()(ids, mask)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() <= 1e-5
    assert (unscaled[real] - ref[real]).abs().max() > 1e-3


def test_rope_scaling_spellings_and_saving(transformers, tmp_path):
    """rope_scaling with "type" or "rope_type", or transformers 5's rope_parameters, read the same; the pretraining
    length defaults to max_position_embeddings, as in transformers; a save keeps the rule."""
    rule = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    a = LlamaConfig.from_dict({**SCALED, "rope_scaling": {"type": "llama3", **rule}})
    b = LlamaConfig.from_dict({**SCALED, "rope_theta": 1.0, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4,
                                                                               **rule}})
    assert a.rope_scaling == b.rope_scaling == {"rope_type": "llama3", **rule, "original_max_position_embeddings": 256}
    assert a.rope_theta == b.rope_theta == 1e4
    model = LlamaForCausalLM(a).eval()
    config = {**asdict(a), "architectures": ["LlamaForCausalLM"]}
    save_file(llama.hf_state_dict(model), tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    torch.testing.assert_close(hf.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq, rtol=0, atol=0)


# ---- what minift cannot run is refused, in one line --------------------------------------------------------

@pytest.mark.parametrize("extra,words", [
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs low_freq_factor, high_freq_factor"),
    (dict(rope_scaling={"type": "dynamic", "factor": 4.0}), "'dynamic' is not supported"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "'longrope' is not supported"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(num_local_experts=8, num_experts_per_tok=2), "mixture-of-experts"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="mixtral"), "mixtral"),
    (dict(num_key_value_heads=4), "multiple"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=0), "sliding_window 0"),
    (dict(model_type="qwen3", use_sliding_window=True, sliding_window=4, layer_types=["full_attention"]), "layer_types"),
])
def test_refusals(extra, words):
    with pytest.raises(MiniftError) as e:
        LlamaConfig.from_dict({**SHAPES["llama-gqa3-tied"], **extra})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_default_rope_is_accepted():
    base = SHAPES["qwen2-gqa2-tied"]
    assert LlamaConfig.from_dict({**base, "rope_scaling": None}).rope_scaling is None
    c = LlamaConfig.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
    assert c.rope_theta == 7 and c.rope_scaling is None


def test_architecture_names():
    for shape, names in [("llama-mha-untied", ("LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaModel")),
                         ("qwen2-gqa2-tied", ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification", "Qwen2Model")),
                         ("qwen3-gqa3-bias", ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification", "Qwen3Model")),
                         ("mistral-gqa2", ("MistralForCausalLM", "MistralForSequenceClassification", "MistralModel"))]:
        c = config(shape)
        assert tuple(llama.architecture(llama.TASKS[t](c)) for t in ("lm", "classify", "encode")) == names


@pytest.mark.parametrize("shape", ["llama-gqa3-tied", "qwen2-gqa2-tied", "mistral-gqa2", "qwen3-gqa3-bias", *WINDOWED])
def test_checkpoints_load_and_save_through_the_family_functions(shape, transformers, tmp_path, monkeypatch,
                                                                 padded_batch):
    """checkpoints.py's generic load/save with this family's functions (registered here in case the
    model_type -> family dict does not list it yet): transformers -> minift -> save -> transformers."""
    from minift import checkpoints
    for kind in llama.MODEL_TYPES:
        monkeypatch.setitem(checkpoints.FAMILIES, kind, llama)
    hf = hf_model(transformers, shape)
    hf.save_pretrained(tmp_path / "hf")
    ours = checkpoints.load_checkpoint(tmp_path / "hf", task="lm", verbose=False)
    assert not ours.load_report.missing and len(ours.load_report.loaded) == len(list(ours.parameters()))
    checkpoints.save_checkpoint(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back) is type(hf)
    ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, "left")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        again = back(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(ref, again)  # the same weights, bit for bit, under the same architecture
    classifier = checkpoints.load_checkpoint(tmp_path / "ours", task="classify", num_labels=4, verbose=False)
    assert classifier.load_report.new_head == ["score.weight"]
    assert classifier.load_report.dropped_head == ([] if ours.config.tie_word_embeddings else ["lm_head.weight"])


# ---- LoRA, freezing, recompute, the chunked loss and the memory estimate on the new shapes -------------------

def built(spec, task="lm"):
    """checkpoints.build_model on a config dict (so the model carries it, as a loaded one does), perturbed."""
    from minift.checkpoints import build_model
    torch.manual_seed(0)
    return perturb(build_model({**spec, "pad_token_id": 0, "eos_token_id": None, "bos_token_id": None}, task,
                               num_labels=3 if task == "classify" else None))


def levers_batch(model, padded_batch):
    """Rows padded on both sides, the first 2 positions a prompt (no target), for the lm and classify tasks."""
    inputs, labels = ragged(model, padded_batch)
    if model.task == "lm":
        labels[:, :2] = -100
    return {**inputs, "labels": labels}


LEVERS = {  # the settings, and those of the reference run (the same adapters, dropout and frozen parts)
    "recompute every block, dropout": (dict(recompute=1, dropout=0.1), dict(dropout=0.1)),
    "chunked loss": (dict(chunked_loss=3), {}),
    "LoRA all-linear, recompute, chunked": (dict(lora_r=4, lora_dropout=0.1, recompute=2, chunked_loss=4),
                                            dict(lora_r=4, lora_dropout=0.1)),
}


def set_adapters(model):
    """A trained adapter's B (not 0), so that A's gradient is not 0 either; the same draws every time."""
    from minift.lora import lora_layers
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=layer.lora_B.dtype) * 0.3)


def lever_gradient_errors(spec, settings, reference, padded_batch, task="lm"):
    """The largest relative difference between the gradients with the lever on and the plain hand-written run's
    (itself checked against autograd above), float64; every trainable tensor compared."""
    from minift.config import TrainConfig
    from minift.objective import forward_backward
    from minift.train import prepare_model
    runs = []
    for cfg in (reference, settings):
        model = built(spec, task).double()
        torch.manual_seed(1)  # LoRA's A: the same draws in both runs
        prepare_model(model, TrainConfig(**cfg))
        set_adapters(model)
        model.train()
        b = levers_batch(model, padded_batch)
        torch.manual_seed(2)  # the same dropout masks
        forward_backward(model, b, model.count_targets(b["labels"]))
        runs.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    plain, lever = runs
    assert plain.keys() == lever.keys() and all(g is not None for g in lever.values())
    return max(rel_err(lever[n], plain[n]) for n in plain)


@pytest.mark.parametrize("lever", list(LEVERS))
@pytest.mark.parametrize("shape", ["qwen3-gqa2-tied-headdim", "qwen3-window2-types", "mistral-window4"])
def test_training_levers_keep_the_gradients(shape, lever, padded_batch):
    settings, reference = LEVERS[lever]
    assert lever_gradient_errors(SHAPES[shape], settings, reference, padded_batch) < 1e-12


@pytest.mark.parametrize("shape", ["qwen3-gqa3-bias", "qwen2-window3-tied"])
def test_frozen_layers_leave_the_other_gradients(shape, padded_batch):
    """freeze layers:1 (embeddings and the lowest block): the rest get the full model's gradients, float64."""
    from minift.freeze import freeze
    from minift.objective import forward_backward
    runs = []
    for patterns in ([], ["layers:1"]):
        model = built(SHAPES[shape], "classify").double().train()
        if patterns:
            freeze(model, patterns)
        b = levers_batch(model, padded_batch)
        forward_backward(model, b, model.count_targets(b["labels"]))
        runs.append({n: p.grad for n, p in model.named_parameters()})
    full, frozen = runs
    assert frozen["model.embed_tokens.weight"] is None and frozen["model.layers.0.self_attn.q_proj.weight"] is None
    trained = [n for n, g in frozen.items() if g is not None]
    assert "model.layers.1.self_attn.k_proj.weight" in trained
    assert max(rel_err(frozen[n], full[n]) for n in trained) < TOL


@pytest.mark.parametrize("shape", ["qwen3-gqa2-tied-headdim", "qwen3-window2-types"])
def test_lora_gradients_match_autograd(shape, padded_batch):
    """all-linear adapters (q, k, v, o, gate, up, down; Qwen3's q/k norms are not linear layers) with dropout."""
    from minift.lora import add_lora, lora_layers
    model = built(SHAPES[shape])
    add_lora(model, "all-linear", r=4, alpha=8, dropout=0.1)
    assert {n.rpartition(".")[2] for n in lora_layers(model)} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"}
    set_adapters(model)
    b = levers_batch(model, padded_batch)
    errors = model_grad_errors(model, {k: v for k, v in b.items() if k != "labels"}, b["labels"])
    assert set(errors) == {n for n, p in model.named_parameters() if p.requires_grad} and max(errors.values()) < TOL


@pytest.mark.parametrize("shape", ["qwen3-gqa2-tied-headdim", "qwen3-window2-types"])
def test_lora_adapter_loads_in_peft(shape, transformers, tmp_path, padded_batch):
    """save_adapter in peft's layout: peft on transformers' Qwen3 gives our adapted logits."""
    peft = pytest.importorskip("peft")
    from minift.checkpoints import save_checkpoint
    from minift.lora import add_lora, save_adapter
    model = built(SHAPES[shape])
    save_checkpoint(model, tmp_path / "base")
    add_lora(model, "all-linear", r=4, alpha=8)
    set_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=tmp_path / "base")
    ids, mask, positions = hf_inputs(padded_batch, model.config.vocab_size, "left")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ours = model.eval()(ids, mask)
    real = mask.bool()
    assert (ours[real] - ref[real]).abs().max() <= 1e-5
    with torch.no_grad():
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
        assert (plain.eval()(input_ids=ids, attention_mask=mask, position_ids=positions).logits[real]
                - ours[real]).abs().max() > 1e-3  # the adapter makes the match


def test_memory_estimate_counts_the_new_blocks(padded_batch):
    """The estimate runs on a windowed Qwen3, counts the q/k norms' kept tensors, and recompute gives some back."""
    from minift.memory import estimate_memory, kept_for_backward
    model = built(SHAPES["qwen3-window2-types"])
    b = levers_batch(model, padded_batch)
    m = estimate_memory(model, b)
    assert m["activations"] > 0 and m["levers"]["recompute=1"] > 0
    model.train()
    with torch.no_grad():
        model(b["input_ids"], b["attention_mask"])
    owners = {owner for owner, *_ in kept_for_backward(model)}
    assert "model.layers.0.self_attn.q_norm" in owners and "model.layers.2.self_attn.k_norm" in owners
