"""layers.py, one layer at a time, in float64: the hand-written backward against autograd.

For each layer: run the forward with autograd on and `out.backward(gradient=dout)` (the reference), then
the same forward under `torch.no_grad()` in train mode and the layer's own `backward(dout)`. Every
parameter gradient and every input gradient must agree to a relative error of 1e-8:
max|g_ours - g_autograd| / max|g_autograd|. Dropout draws the same mask in both runs because torch is
seeded before each forward.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from minift.errors import MiniftError
from minift.layers import (GELU, Attention, Dropout, Embedding, LayerNorm, Linear, SoftCap, Tanh, cross_entropy,
                           keeps_for_backward)

TOL = 1e-8


def rel_err(ours, ref):
    assert ours is not None, "no gradient from the hand-written backward"
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = ref.abs().max().item()
    assert scale > 0, "the reference gradient is all zero: the check would prove nothing"
    return (ours - ref).abs().max().item() / scale


def kept_tensors(module):
    """Tensors a module (or a submodule) holds outside its parameters and buffers: activations kept for backward."""
    return {f"{name}.{attr}" if name else attr
            for name, m in module.named_modules()
            for attr, v in vars(m).items() if isinstance(v, torch.Tensor)}


def randomize(layer, scale=0.5):
    """Parameters far from their init (LayerNorm weight 1, biases 0), so that a backward that ignores them fails."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * scale + (1.0 if p.ndim == 1 and p is getattr(layer, "weight", None) else 0))


def check_layer(layer, inputs, seed=1):
    """inputs: float64 tensors (differentiable) or integer tensors (ids, masks). Returns the worst rel error."""
    layer.double().train()
    for p in layer.parameters():
        p.grad = None
    float_idx = [i for i, x in enumerate(inputs) if x.is_floating_point()]

    # reference: autograd
    leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    torch.manual_seed(seed)
    out = layer(*leaves)
    dout = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(99))
    out.backward(gradient=dout)
    ref_params = {n: p.grad.clone() for n, p in layer.named_parameters()}
    ref_inputs = [leaves[i].grad for i in float_idx]
    for p in layer.parameters():
        p.grad = None

    # ours: no graph, the layer's backward
    with torch.no_grad():
        torch.manual_seed(seed)
        out2 = layer(*inputs)
        assert not out2.requires_grad
        d = layer.backward(dout)
    torch.testing.assert_close(out2, out.detach(), rtol=0, atol=0)  # the same forward, bit for bit
    d = d if isinstance(d, tuple) else (d,)
    if not float_idx:
        assert d == (None,)
    worst = 0.0
    for d_ours, g_ref in zip(d, ref_inputs):  # backward returns the input gradients in the inputs' order
        worst = max(worst, rel_err(d_ours, g_ref))
    for n, p in layer.named_parameters():
        worst = max(worst, rel_err(p.grad, ref_params[n]))
    assert worst <= TOL, f"{type(layer).__name__}: worst relative gradient error {worst:.3e}"
    assert not kept_tensors(layer), f"left behind after backward: {kept_tensors(layer)}"
    return worst


def x64(*shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, dtype=torch.float64) * scale + shift


# --- one test per layer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_linear(bias):
    layer = Linear(7, 5, bias=bias).double()
    randomize(layer)
    check_layer(layer, [x64(3, 4, 7)])
    check_layer(layer, [x64(6, 7)])  # 2-D input too


def test_embedding_with_padding_idx():
    layer = Embedding(11, 6, padding_idx=2).double()
    randomize(layer)
    ids = torch.tensor([[2, 5, 5, 0], [2, 2, 10, 5]])  # the pad row used three times, row 5 three times
    check_layer(layer, [ids])
    layer.weight.grad = None
    with torch.no_grad():
        layer(ids)
        layer.backward(torch.ones(2, 4, 6, dtype=torch.float64))
    g = layer.weight.grad
    assert torch.equal(g[2], torch.zeros(6, dtype=torch.float64)), "the pad row must get no gradient"
    assert torch.equal(g[5], torch.full((6,), 3.0, dtype=torch.float64)), "a row used 3 times gets 3 gradients"
    assert torch.equal(g[1], torch.zeros(6, dtype=torch.float64)), "an unused row gets nothing"


@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_layernorm(eps):
    layer = LayerNorm(8, eps).double()
    randomize(layer)
    check_layer(layer, [x64(2, 5, 8, scale=3.0, shift=1.5)])
    # a nearly constant row: var ~ 1e-10, where eps matters and the 1/std is large
    check_layer(layer, [torch.ones(2, 3, 8, dtype=torch.float64) + x64(2, 3, 8, scale=1e-5)])


def test_layernorm_eps_is_used():
    x = torch.tensor([[1.0, 1.0 + 1e-3]], dtype=torch.float64)  # var = 2.5e-7
    for eps in (1e-12, 1e-5):
        y = LayerNorm(2, eps).double()(x)
        expect = 5e-4 / math.sqrt(2.5e-7 + eps)
        assert y[0, 1].item() == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    x = torch.cat([x64(40, scale=3.0), torch.tensor([0.0, -8.0, 8.0, 1e-4], dtype=torch.float64)])
    check_layer(GELU(approximate), [x.reshape(4, 11)])


def test_gelu_forms_differ():
    """BERT's erf GELU and GPT-2's tanh GELU are different functions: mixing them up is detectable."""
    x = torch.tensor([1.5], dtype=torch.float64)
    erf, tanh = GELU("none").eval()(x).item(), GELU("tanh").eval()(x).item()
    assert erf == pytest.approx(1.5 * 0.5 * (1 + math.erf(1.5 / math.sqrt(2))), rel=1e-12)
    k = math.sqrt(2 / math.pi)
    assert tanh == pytest.approx(0.5 * 1.5 * (1 + math.tanh(k * (1.5 + 0.044715 * 1.5**3))), rel=1e-12)
    assert abs(erf - tanh) > 1e-5


def test_tanh():
    check_layer(Tanh(), [x64(3, 9, scale=2.0)])


def test_dropout():
    layer = Dropout(0.3)
    x = x64(40, 50)
    check_layer(layer, [x])
    torch.manual_seed(5)
    y = layer.double().train()(x)
    kept = y != 0
    assert 0.25 < 1 - kept.double().mean().item() < 0.35, "about 30% dropped"
    torch.testing.assert_close(y[kept], x[kept] / 0.7, rtol=0, atol=1e-15)
    layer.eval()
    assert layer(x) is x, "identity in eval mode"
    with torch.no_grad():
        y = layer.train()(x)
        dx = layer.backward(torch.ones_like(x))
    assert torch.equal(dx, (y != 0).double() / 0.7), "backward drops the values that forward dropped"


# --- attention ------------------------------------------------------------------------------------------

B, H, TQ, TK, HD = 2, 3, 5, 5, 4


def qkv(tq=TQ, tk=TK):
    return x64(B, H, tq, HD), x64(B, H, tk, HD), x64(B, H, tk, HD)


def padding_mask(lengths, t):
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]  # (B,1,1,T)


def causal_mask(t):
    return torch.ones(t, t, dtype=torch.bool).tril()[None, None]


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("mask_kind", ["all", "padding", "causal+padding", "fully_masked_row", "cross"])
def test_attention(p, mask_kind):
    tk = 7 if mask_kind == "cross" else TK  # queries see more keys than they are (as with a KV cache)
    if mask_kind == "all":
        allowed = torch.ones(1, 1, 1, tk, dtype=torch.bool)
    elif mask_kind == "padding":
        allowed = padding_mask([5, 3], tk)
    elif mask_kind == "causal+padding":
        allowed = causal_mask(tk) & padding_mask([5, 3], tk)  # row 1: queries 3, 4 see only keys 0..2
    elif mask_kind == "fully_masked_row":
        allowed = causal_mask(tk).repeat(B, H, 1, 1).clone()
        allowed[1, :, 2, :] = False  # query 2 of example 1 may see nothing: a fully padded row
        allowed[0, 1, :, :] = False  # and a whole head of example 0
    else:
        allowed = torch.ones(TQ, tk, dtype=torch.bool).tril(diagonal=tk - TQ)[None, None] & padding_mask([7, 6], tk)
    q, k, v = qkv(TQ, tk)
    layer = Attention(p)
    check_layer(layer, [q, k, v, allowed])


def test_softcap():
    """cap * tanh(x / cap), far into the flat part too (|x| up to about 4 caps); its backward 1 - tanh^2."""
    layer = SoftCap(2.5)
    x = x64(4, 9, scale=4.0)
    check_layer(layer, [x])
    y = layer.eval()(x)
    assert y.abs().max() < 2.5 and (y - x).abs().max() > 1.0  # it caps
    small = x64(3, 3, scale=1e-3)
    torch.testing.assert_close(layer(small), small, rtol=1e-6, atol=0)  # and is the identity near 0


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("scale,softcap", [(0.3, None), (None, 1.5), (0.7, 0.9)])
def test_attention_with_scale_and_softcap(p, scale, softcap):
    """Gemma's query_pre_attn_scalar ** -0.5 instead of 1 / sqrt(head_dim), and Gemma 2's soft-capped scores (small
    caps, so that the scores reach the flat part), with a causal + padding mask and a fully masked row."""
    allowed = (causal_mask(TK) & padding_mask([5, 3], TK)).repeat(1, H, 1, 1).clone()
    allowed[1, 0, 4, :] = False
    q, k, v = (t * 3 for t in qkv())
    check_layer(Attention(p, scale=scale, softcap=softcap), [q, k, v, allowed])
    # the forward is the formula, written out
    layer = Attention(0.0, scale=scale, softcap=softcap).double().eval()
    scores = q @ k.transpose(-1, -2) * (scale or HD ** -0.5)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0) @ v
    out = layer(q, k, v, allowed)
    torch.testing.assert_close(out[allowed.any(-1)[..., None].expand_as(out)], ref[allowed.any(-1)[..., None].expand_as(ref)],
                               rtol=0, atol=1e-13)


def test_attention_masked_keys_get_no_weight():
    q, k, v = qkv()
    allowed = padding_mask([5, 3], TK)
    layer = Attention(0.0).double().eval()
    out = layer(q, k, v, allowed)
    alone = layer(q[1:], k[1:, :, :3], v[1:, :, :3], torch.ones(1, 1, 1, 3, dtype=torch.bool))
    torch.testing.assert_close(out[1:], alone, rtol=0, atol=1e-14)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fully_padded_row_stays_finite(dtype):
    """finfo(dtype).min, not -inf or -1e10: -1e10 is -inf in fp16 and bf16 would make exp(-inf - -inf) = NaN."""
    q, k, v = (t.to(dtype) * 4 for t in qkv())
    allowed = padding_mask([5, 3], TK).repeat(1, 1, TQ, 1).clone()
    allowed[0, :, 1, :] = False  # a row with no key at all
    layer = Attention(0.0).eval()
    with torch.no_grad():
        out = layer(q, k, v, allowed)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    # the fully masked row attends evenly (uniform softmax): the mean of v
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[0, :, 1].float(), v[0].float().mean(1), rtol=0, atol=tol)
    # partly masked rows ignore the masked keys completely
    ref = F.scaled_dot_product_attention(q[1:].float(), k[1:, :, :3].float(), v[1:, :, :3].float())
    torch.testing.assert_close(out[1:].float(), ref, rtol=0, atol=tol * 5)


# --- cross-entropy --------------------------------------------------------------------------------------

def ce_check(logits, labels, **kw):
    leaf = logits.clone().requires_grad_()
    loss, d_none = cross_entropy(leaf, labels, **kw)
    assert d_none is None, "with autograd on, dlogits is left to loss.backward()"
    loss.backward()
    with torch.no_grad():
        loss2, d = cross_entropy(logits, labels, **kw)
    assert not loss2.requires_grad
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-14)
    err = rel_err(d, leaf.grad)
    assert err <= TOL, err
    return loss2.item(), d


@pytest.mark.parametrize("kw", [{}, {"num_targets": 13}, {"weights": "w"}, {"weights": "w", "num_targets": 9}])
def test_cross_entropy_gradient(kw):
    logits = x64(10, 6, scale=3.0)
    labels = torch.tensor([0, 5, -100, 2, 2, -100, 1, 3, 4, -100])
    if kw.get("weights") == "w":
        kw = {**kw, "weights": torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 0.25], dtype=torch.float64)}
    _, d = ce_check(logits, labels, **kw)
    assert torch.equal(d[labels == -100], torch.zeros(3, 6, dtype=torch.float64)), "ignored rows get no gradient"


def test_cross_entropy_matches_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 1.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([2, -100, 0])

    def nll(row, label):
        return math.log(sum(math.exp(z) for z in row)) - row[label]

    l0, l2 = nll([1, 2, 3], 2), nll([5, 1, -1], 0)
    loss, d = ce_check(logits, labels)
    assert loss == pytest.approx((l0 + l2) / 2, rel=1e-14)  # mean over the 2 supervised rows, not 3
    p0 = [math.exp(z) / sum(math.exp(y) for y in (1, 2, 3)) for z in (1, 2, 3)]
    expect_row0 = torch.tensor([p0[0], p0[1], p0[2] - 1], dtype=torch.float64) / 2
    torch.testing.assert_close(d[0], expect_row0, rtol=1e-14, atol=0)
    # explicit num_targets: the sum over the targets divided by the whole step's count
    loss4, _ = ce_check(logits, labels, num_targets=4)
    assert loss4 == pytest.approx((l0 + l2) / 4, rel=1e-14)
    # class weights scale each target's term; the divisor stays the target count (not the sum of weights)
    w = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    lw, _ = ce_check(logits, labels, weights=w)
    assert lw == pytest.approx((0.5 * l0 + 2.0 * l2) / 2, rel=1e-14)
    # and the unweighted loss is PyTorch's
    ref = F.cross_entropy(logits, labels, ignore_index=-100).item()
    assert loss == pytest.approx(ref, rel=1e-14)


@pytest.mark.parametrize("grad", [True, False])
def test_cross_entropy_all_ignored_is_an_error_not_nan(grad):
    logits = x64(4, 3)
    labels = torch.full((4,), -100)
    with torch.set_grad_enabled(grad), pytest.raises(MiniftError) as e:
        cross_entropy(logits, labels)
    msg = str(e.value)
    assert "\n" not in msg and "-100" in msg and "supervised" in msg


def test_cross_entropy_bf16_logits_computed_in_fp32():
    logits = x64(6, 50, scale=4.0)
    labels = torch.randint(0, 50, (6,))
    with torch.no_grad():
        loss16, d16 = cross_entropy(logits.bfloat16(), labels)
        loss32, _ = cross_entropy(logits.bfloat16().float(), labels)
    assert loss16.dtype == torch.float32 and d16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-6)


# --- what forward keeps ---------------------------------------------------------------------------------

def layer_cases():
    q, k, v = qkv()
    return [
        (Linear(4, 3), [x64(2, 4)]),
        (Embedding(10, 4, padding_idx=0), [torch.tensor([[0, 3, 3]])]),
        (LayerNorm(4, 1e-12), [x64(2, 4)]),
        (GELU("none"), [x64(2, 4)]),
        (GELU("tanh"), [x64(2, 4)]),
        (Tanh(), [x64(2, 4)]),
        (Dropout(0.3), [x64(2, 4)]),
        (Attention(0.2), [q, k, v, causal_mask(TK)]),
    ]


def test_keeps_for_backward_truth_table():
    m = Linear(2, 2)
    with torch.no_grad():
        assert keeps_for_backward(m.train()) is True
        assert keeps_for_backward(m.eval()) is False
    with torch.enable_grad():
        assert keeps_for_backward(m.train()) is False


@pytest.mark.parametrize("case", range(8))
def test_keeps_only_for_our_backward_and_frees_it(case):
    layer, inputs = layer_cases()[case]
    layer.double()
    # autograd on, train mode: autograd keeps what it needs; the layer keeps nothing
    layer.train()(*inputs)
    assert not kept_tensors(layer), f"kept with autograd on: {kept_tensors(layer)}"
    # eval mode, no graph (inference): nothing kept
    with torch.no_grad():
        layer.eval()(*inputs)
    assert not kept_tensors(layer), f"kept in eval mode: {kept_tensors(layer)}"
    # training without autograd: kept, then freed by backward
    with torch.no_grad():
        out = layer.train()(*inputs)
        kept = kept_tensors(layer)
        assert kept, "the training forward must keep what backward needs"
        layer.backward(torch.ones_like(out))
    assert not kept_tensors(layer), f"still held after backward: {kept_tensors(layer)}"
