"""Mixture of experts (models/moe.py, used by models/llama.py): Mixtral, Qwen3-MoE and OLMoE.

The sparse block alone against autograd in float64 (top-1 and top-2, with and without renormalisation, ties in the
router's logits, an expert that gets no token, padding in the load-balancing loss) and against transformers' three
blocks; the load-balancing loss and its gradient against transformers' load_balancing_loss_func; whole models on
random-init transformers checkpoints (GQA, tied and untied, dense layers among sparse ones, a sliding window, both
padding sides): logits, the training loss with the balance term, gradients against autograd (LoRA too), a save that
transformers loads, greedy generation, adapters that peft loads onto transformers 5's fused experts; recompute, the
chunked loss, freezing and the memory estimate with sparse blocks; the refusals."""
import json

import pytest
import torch

from minift import checkpoints
from minift.config import TrainConfig
from minift.errors import MiniftError
from minift.lora import add_lora, load_adapter, lora_layers, save_adapter
from minift.memory import estimate_memory, kept_for_backward
from minift.models import llama
from minift.models.llama import LlamaConfig, LlamaMLP
from minift.models.moe import SparseMoeBlock, load_balancing_loss
from minift.objective import forward_backward
from minift.train import prepare_model
from test_llama import greedy, perturb, rel_err

TOL = 1e-8  # float64 gradients, relative to the largest entry of the reference gradient

# random-init shapes: top-1 and top-2, renormalised or not, GQA, tied and untied heads, dense layers among sparse ones
SHAPES = {
    # layer 1 dense (mlp_only_layers): its MLP is intermediate_size wide, the experts moe_intermediate_size
    "qwen3moe-top2-norm-gqa2": dict(model_type="qwen3_moe", vocab_size=61, hidden_size=32, intermediate_size=40,
                                    moe_intermediate_size=12, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
                                    norm_topk_prob=True, mlp_only_layers=[1]),
    # every second layer sparse (decoder_sparse_step 2), top-1 without renormalisation, tied head
    "qwen3moe-top1-tied-step2": dict(model_type="qwen3_moe", vocab_size=67, hidden_size=24, intermediate_size=32,
                                     moe_intermediate_size=8, num_hidden_layers=2, num_attention_heads=3,
                                     num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=1,
                                     norm_topk_prob=False, decoder_sparse_step=2, tie_word_embeddings=True),
    "olmoe-top2-gqa2": dict(model_type="olmoe", vocab_size=59, hidden_size=32, intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=5,
                            num_experts_per_tok=2, norm_topk_prob=False),
    # top-1 renormalised: every kept weight is 1, so only the load-balancing loss moves the router
    "olmoe-top1-norm-tied-bias": dict(model_type="olmoe", vocab_size=53, hidden_size=24, intermediate_size=12,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      num_experts=3, num_experts_per_tok=1, norm_topk_prob=True,
                                      tie_word_embeddings=True, attention_bias=True),
    "mixtral-top2-gqa4": dict(model_type="mixtral", vocab_size=61, hidden_size=32, intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                              num_experts_per_tok=2),
    # Mixtral is Mistral with experts: its sliding window (3, under 7-token rows) too
    "mixtral-top1-window3": dict(model_type="mixtral", vocab_size=57, hidden_size=16, intermediate_size=12,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                 num_local_experts=3, num_experts_per_tok=1, sliding_window=3),
}
HF_CLASS = {"qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe", "mixtral": "Mixtral"}


def config(shape, **overrides):
    return LlamaConfig.from_dict({**SHAPES[shape], "eos_token_id": None, "bos_token_id": None, **overrides})


def make(kind, shape, **overrides):
    c = config(shape, pad_token_id=0, num_labels=3, **overrides)
    return perturb(llama.TASKS[kind](c))


def hf_model(transformers, shape, task="lm", **overrides):
    spec = {**SHAPES[shape], **overrides}
    family = HF_CLASS[spec.pop("model_type")]
    cfg = getattr(transformers, family + "Config")(**spec, attn_implementation="eager")
    torch.manual_seed(0)
    suffix = "ForCausalLM" if task == "lm" else "ForSequenceClassification"
    return perturb(getattr(transformers, family + suffix)(cfg)).eval()


# ---- the sparse block alone -----------------------------------------------------------------------------

def block(top_k, norm, num_experts=5, hidden=8, width=6, seed=0):
    """A sparse block whose router ties experts 1, 2 and 3 (three equal rows) and never picks the last expert (its
    row points away from inputs that are all positive)."""
    c = LlamaConfig(hidden_size=hidden, intermediate_size=width, num_attention_heads=2)
    moe = SparseMoeBlock(hidden, [LlamaMLP(c) for _ in range(num_experts)], top_k, norm)
    perturb(moe, scale=0.3, seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        moe.gate.weight[1:4] = torch.randn(hidden, generator=g)
        d = torch.randn(hidden, generator=g)
        moe.gate.weight[0] = moe.gate.weight[1] + 3 * (d - d.mean())  # above the tie for some tokens, below for others
        moe.gate.weight[-1] = -1.0
    return moe


def block_inputs(hidden=8):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 7, hidden, generator=g, dtype=torch.float64) + 0.1  # positive: the last expert is never chosen
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding, which the load-balancing loss does not count
    return x, mask, torch.randn(2, 7, hidden, generator=g, dtype=torch.float64)


def routing_of(moe, x):
    with torch.no_grad():
        probs = torch.softmax(moe.gate(x.reshape(-1, x.shape[-1])), -1)
    return probs, probs.topk(moe.top_k, -1)[1]


@pytest.mark.parametrize("top_k,norm", [(1, False), (1, True), (2, False), (2, True), (3, True)])
@pytest.mark.parametrize("balance", [0.0, 0.7])
def test_block_gradients_match_autograd(top_k, norm, balance):
    """Router (through the kept weights, the renormalisation and the softmax; none through the choice), each expert
    on its own tokens, the input gradients added back per token, and the load-balancing loss's term, in float64."""
    moe, (x, mask, dout) = block(top_k, norm).double().train(), block_inputs()
    moe.records_routing = balance > 0
    probs, chosen = routing_of(moe, x)
    assert torch.equal(probs[:, 1], probs[:, 2]) and torch.equal(probs[:, 2], probs[:, 3])  # ties
    assert not (chosen == 4).any()  # an expert without a token
    assert ((chosen[:, :, None] == torch.tensor([1, 2, 3])).sum((1, 2)) < 3).any()  # the tie decided some choice

    leaf = x.clone().requires_grad_()
    out = moe(leaf)
    objective = (out * dout).sum()
    if balance:
        objective = objective + balance * load_balancing_loss([moe.routing], 5, top_k, mask)[0]
        del moe.routing
    objective.backward()
    ref = {n: p.grad for n, p in moe.named_parameters()}
    moe.zero_grad(set_to_none=True)
    with torch.no_grad():
        out2 = moe(x)
        if balance:
            moe.aux_dprobs = balance * load_balancing_loss([moe.routing], 5, top_k, mask)[1]
        dx = moe.backward(dout)
    torch.testing.assert_close(out2, out.detach(), rtol=0, atol=0)
    assert rel_err(dx, leaf.grad) < TOL
    idle = {f"experts.{e}." for e in range(5) if not (chosen == e).any()}
    assert "experts.4." in idle and len(idle) < 5 - top_k
    for name, p in moe.named_parameters():
        if name.startswith(tuple(idle)):  # no token: a zero gradient, as autograd's through the empty slice
            assert p.grad is not None and not p.grad.any() and not ref[name].any()
        elif top_k == 1 and norm and name == "gate.weight" and not balance:
            assert not p.grad.any() and ref[name].abs().max() < 1e-15  # a renormalised single weight is always 1
        else:
            assert rel_err(p.grad, ref[name]) < TOL, name
    assert not [k for k, v in vars(moe).items() if isinstance(v, (torch.Tensor, tuple))]  # nothing left kept


@pytest.mark.parametrize("family", ["Qwen3Moe", "Olmoe", "Mixtral"])
@pytest.mark.parametrize("top_k,norm", [(1, False), (2, True), (2, False)])
def test_block_matches_transformers(family, top_k, norm, transformers):
    """Our block with transformers' block's weights (its fused 3-D experts cut into our Linear layers) gives its
    output, with ties in the router and an expert without a token. Mixtral always renormalises."""
    import importlib
    model_type = {"Qwen3Moe": "qwen3_moe", "Olmoe": "olmoe", "Mixtral": "mixtral"}[family]
    hf_module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    count = "num_local_experts" if family == "Mixtral" else "num_experts"
    width = "moe_intermediate_size" if family == "Qwen3Moe" else "intermediate_size"
    cfg = getattr(transformers, family + "Config")(hidden_size=8, **{width: 6, count: 5}, num_experts_per_tok=top_k,
                                                     norm_topk_prob=norm, num_attention_heads=2)
    ref = getattr(hf_module, family + "SparseMoeBlock")(cfg).eval()
    ours = block(top_k, norm or family == "Mixtral").float().eval()
    with torch.no_grad():
        ref.gate.weight.copy_(ours.gate.weight)
        for e, expert in enumerate(ours.experts):
            ref.experts.gate_up_proj[e] = torch.cat([expert.gate_proj.weight, expert.up_proj.weight])
            ref.experts.down_proj[e] = expert.down_proj.weight
        x = block_inputs()[0].float()
        assert (ours(x) - ref(x)).abs().max() <= 1e-6
        assert not (routing_of(ours, x)[1] == 4).any()


def test_load_balancing_loss_matches_transformers(transformers):
    """The value, over three layers with padding, and its gradient through the softmax into the router logits:
    ours (daux/dprobs, then the softmax backward) against autograd through transformers' own function."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    from minift.models.moe import route_backward
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, :1] = 0
    for top_k in (1, 2):
        logits = [torch.randn(15, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        ref = load_balancing_loss_func(tuple(logits), 6, top_k, mask)
        ref.backward()
        routings = [(torch.softmax(t.detach(), -1), torch.softmax(t.detach(), -1).topk(top_k, -1)[1]) for t in logits]
        aux, daux = load_balancing_loss(routings, 6, top_k, mask)
        assert aux.item() == pytest.approx(ref.item(), rel=1e-6)  # (transformers counts in float32)
        assert aux.item() > top_k  # uneven: the loss is top_k only for a perfectly even load
        for (probs, chosen), t in zip(routings, logits):
            none = torch.zeros_like(chosen, dtype=probs.dtype)  # the LM loss's part left out: the aux term alone
            dlogits = route_backward(none, probs, chosen, None, None, False, daux)
            assert rel_err(dlogits, t.grad) < 1e-6


# ---- whole models against transformers ---------------------------------------------------------------------

def load_folder(folder, task="lm"):
    return checkpoints.load_checkpoint(folder, task=task, verbose=False).eval()


def hf_inputs(padded_batch, vocab, side):
    ids, mask = padded_batch([7, 3, 5], side, vocab, pad_id=0, T=7)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_lm_logits_match_transformers(shape, side, transformers, tmp_path, padded_batch):
    hf = hf_model(transformers, shape)
    hf.save_pretrained(tmp_path)
    ours = load_folder(tmp_path)
    assert not ours.load_report.missing and len(ours.load_report.loaded) == len(list(ours.parameters()))
    assert ours.config.tie_word_embeddings == SHAPES[shape].get("tie_word_embeddings", False)
    sparse = [i for i, layer in enumerate(ours.model.layers) if isinstance(layer.mlp, SparseMoeBlock)]
    assert sparse == [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")] and sparse
    ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, side)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, mask)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", ["qwen3moe-top2-norm-gqa2", "mixtral-top2-gqa4"])
def test_classifier_logits_match_transformers(shape, transformers, tmp_path, padded_batch):
    hf = hf_model(transformers, shape, task="classify", num_labels=3, pad_token_id=0)
    hf.save_pretrained(tmp_path)
    ours = load_folder(tmp_path, "classify")
    for side in ("left", "right"):
        ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, side)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            assert (ours(ids, mask) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", list(SHAPES))
def test_training_loss_with_the_balance_term_matches_transformers(shape, transformers, tmp_path, padded_batch):
    """output_router_logits in config.json: transformers' training loss is the LM loss + coef * aux over the real
    tokens; ours the same (a left-padded batch with a prompt), and without it the LM loss alone."""
    hf = hf_model(transformers, shape, output_router_logits=True, router_aux_loss_coef=0.3, pad_token_id=0)
    hf.save_pretrained(tmp_path)
    ours = load_folder(tmp_path).train()
    ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, "left")
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    with torch.no_grad():
        ref = hf.train()(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels)
        loss, _ = ours.loss(ours(ids, mask), labels)
        ours.config.output_router_logits = False
        plain, _ = ours.loss(ours(ids, mask), labels)
    assert loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert (loss - plain).item() == pytest.approx(0.3 * ref.aux_loss.item(), rel=1e-4)
    assert ref.aux_loss.item() > 0.1
    assert not [n for n, m in ours.named_modules() for k in vars(m) if k in ("routing", "balance_mask")]
    # a training forward whose routing no loss took (a DPO step's reference) is not read by a later evaluation
    ours.config.output_router_logits = True
    with torch.no_grad():
        ours(ids, mask)
        evaluated, _ = ours.eval().loss(ours(ids, mask), labels)
    assert evaluated.item() == pytest.approx(plain.item(), rel=1e-6)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_saved_checkpoint_loads_into_transformers(shape, transformers, tmp_path, padded_batch):
    """transformers -> minift -> save_checkpoint -> transformers: the same class and the same logits, bit for bit
    (Mixtral's experts written back under block_sparse_moe.experts.E.w1/w3/w2, which transformers 5 fuses)."""
    hf = hf_model(transformers, shape)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_folder(tmp_path / "hf")
    checkpoints.save_checkpoint(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back) is type(hf)
    ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, "left")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        again = back(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(ref, again)
    if SHAPES[shape]["model_type"] == "mixtral":
        from safetensors.torch import load_file
        keys = load_file(tmp_path / "ours" / "model.safetensors")
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys and not any(".mlp." in k for k in keys)


@pytest.mark.parametrize("shape", ["qwen3moe-top2-norm-gqa2", "olmoe-top2-gqa2", "mixtral-top1-window3"])
def test_greedy_generation_matches_transformers(shape, transformers, tmp_path, padded_batch):
    hf = hf_model(transformers, shape, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    hf.save_pretrained(tmp_path)
    ours = load_folder(tmp_path)
    ids, mask = padded_batch([6, 3], "left", ours.config.vocab_size, pad_id=0)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert greedy(ours, ids, mask, 10).tolist() == ref.tolist()


# ---- whole models against autograd -------------------------------------------------------------------------

def ragged(model, padded_batch):
    """Rows right- and left-padded, a prompt that is not supervised."""
    V = model.config.vocab_size
    r_ids, r_mask = padded_batch([7, 4], "right", V)
    l_ids, l_mask = padded_batch([3, 6], "left", V, T=7)
    ids, mask = torch.cat([r_ids, l_ids]), torch.cat([r_mask, l_mask])
    labels = ids.masked_fill(mask == 0, -100) if model.task == "lm" else torch.tensor([0, 2, 1, 1])
    if model.task == "lm":
        labels[0, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def gradients(model, b, backward, num_targets=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks
    loss = forward_backward(model, b, num_targets or model.count_targets(b["labels"]), backward)
    return loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def compare_with_autograd(model, b, num_targets=None):
    """Our backward against autograd on the same forward (float64); returns the worst relative error. An expert that
    got no token must have a zero gradient in both."""
    model.double().train()
    loss_ref, ref = gradients(model, b, "autograd", num_targets)
    loss, ours = gradients(model, b, "manual", num_targets)
    assert loss == pytest.approx(loss_ref, rel=1e-13)
    assert ours.keys() == ref.keys() and ours
    errors = {}
    for name, g in ours.items():
        if ref[name].abs().max() < 1e-12:  # an expert without a token; a top-1 renormalised router without balance
            assert g is not None and g.abs().max() < 1e-12, name
        else:
            errors[name] = rel_err(g, ref[name])
    left = {f"{m}.{k}" for m, mod in model.named_modules() for k, v in vars(mod).items()
            if isinstance(v, (torch.Tensor, tuple))}
    assert not left, f"still held after backward: {left}"
    return max(errors.values())


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("balance", [False, True])
def test_lm_gradients_match_autograd(shape, balance, padded_batch):
    model = make("lm", shape, output_router_logits=balance, router_aux_loss_coef=0.5)
    b = ragged(model, padded_batch)
    # a step of two micro-batches: the balance term weighted by this one's share of the targets
    assert compare_with_autograd(model, b, 2 * model.count_targets(b["labels"])) < TOL


@pytest.mark.parametrize("shape", ["qwen3moe-top2-norm-gqa2", "olmoe-top1-norm-tied-bias", "mixtral-top1-window3"])
def test_classifier_and_dropout_gradients_match_autograd(shape, padded_batch):
    model = make("classify", shape, attention_dropout=0.2)
    assert compare_with_autograd(model, ragged(model, padded_batch)) < TOL


@pytest.mark.parametrize("shape", ["qwen3moe-top2-norm-gqa2", "olmoe-top2-gqa2", "mixtral-top2-gqa4"])
def test_lora_gradients_match_autograd(shape, padded_batch):
    """Adapters on attention, on every expert's three matrices and on the router ('all-linear'), the balance term on."""
    model = make("lm", shape, output_router_logits=True).double()
    torch.manual_seed(2)
    add_lora(model, "all-linear", r=2, alpha=4)
    kinds = {name.rpartition(".")[2] for name in lora_layers(model)}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate", "gate_proj", "up_proj", "down_proj"}
    experts = sum(len(m.experts) for m in model.model.sparse_blocks())
    assert sum(".experts." in name for name in lora_layers(model)) == 3 * experts
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    assert compare_with_autograd(model, ragged(model, padded_batch)) < TOL


# ---- adapters in peft's layout, onto transformers 5's fused experts ----------------------------------------

@pytest.mark.parametrize("shape", ["qwen3moe-top2-norm-gqa2", "olmoe-top1-norm-tied-bias", "mixtral-top2-gqa4"])
def test_our_adapter_loads_in_peft(shape, transformers, tmp_path, padded_batch):
    """minift writes one adapter per expert matrix under the checkpoint's module names (transformers 4's layout:
    model.layers.L.mlp.experts.E.gate_proj, Mixtral's block_sparse_moe.experts.E.w1); peft 0.21 fuses them onto
    transformers 5's 3-D experts (gate and up side by side: rank 2r, B block-diagonal) and gives our logits.
    (Every layer sparse: peft's conversion takes any gate_proj target for an expert's, so it drops the adapters of a
    Qwen3-MoE's dense layers, mlp_only_layers.)"""
    peft = pytest.importorskip("peft")
    hf = hf_model(transformers, shape, **({"mlp_only_layers": []} if "qwen3moe" in shape else {}))
    hf.save_pretrained(tmp_path / "hf")
    ours = load_folder(tmp_path / "hf")
    torch.manual_seed(2)
    add_lora(ours, "all-linear", r=2, alpha=6)
    for layer in lora_layers(ours).values():
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    save_adapter(ours, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {"gate", "gate_proj", "up_proj", "down_proj"} <= set(saved["target_modules"]) or \
        {"gate", "w1", "w3", "w2"} <= set(saved["target_modules"])
    ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, "right")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        mine = ours.eval()(ids, mask)
        base = load_folder(tmp_path / "hf")(ids, mask)
    real = mask.bool()
    assert (mine[real] - theirs[real]).abs().max() <= 1e-5
    assert (mine[real] - base[real]).abs().max() > 1e-2  # the adapters (the experts' too) did something
    # and minift reads its own adapter back
    again = load_folder(tmp_path / "hf")
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again.eval()(ids, mask), mine)


def test_an_adapter_on_fused_experts_is_refused_in_one_line(transformers, tmp_path):
    """peft on transformers 5 adapts the fused 3-D experts as parameters (target_parameters); minift says so."""
    peft = pytest.importorskip("peft")
    hf = hf_model(transformers, "olmoe-top2-gqa2")
    hf.save_pretrained(tmp_path / "hf")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft.get_peft_model(hf, config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(MiniftError, match="target_parameters") as e:
        load_adapter(load_folder(tmp_path / "hf"), tmp_path / "adapter")
    assert "\n" not in str(e.value)


# ---- recompute, the chunked loss, freezing, the memory estimate --------------------------------------------

def prepared(shape, **settings):
    torch.manual_seed(0)
    model = make("lm", shape, output_router_logits=True, attention_dropout=0.1).double()
    torch.manual_seed(1)
    prepare_model(model, TrainConfig(**settings))
    return model


@pytest.mark.parametrize("settings", [dict(recompute=1), dict(recompute=2, lora_r=2), dict(chunked_loss=5),
                                      dict(recompute=1, chunked_loss=3, freeze=["layers:1"])])
def test_recompute_and_chunked_loss_give_the_plain_gradients(settings, padded_batch):
    """The same loss and gradients (recompute alone: bit for bit) with sparse blocks, dropout and the balance term."""
    plain = prepared("qwen3moe-top2-norm-gqa2", **{**settings, "recompute": 0, "chunked_loss": 0})
    other = prepared("qwen3moe-top2-norm-gqa2", **settings)
    b = ragged(plain, padded_batch)
    n = 2 * plain.count_targets(b["labels"])
    loss_plain, g_plain = gradients(plain.train(), b, "manual", n)
    loss_other, g_other = gradients(other.train(), b, "manual", n)
    assert g_plain.keys() == g_other.keys() and g_plain
    if settings.get("chunked_loss"):
        assert loss_other == pytest.approx(loss_plain, rel=1e-12)
        for name in g_plain:
            torch.testing.assert_close(g_other[name], g_plain[name], rtol=1e-10, atol=1e-13, msg=name)
    else:
        assert loss_other == loss_plain and all(torch.equal(g_plain[n], g_other[n]) for n in g_plain)
    assert kept_for_backward(other) == [] and kept_for_backward(plain) == []


def test_freezing_leaves_the_other_gradients_alone(padded_batch):
    """layers:1 freezes the embeddings and the lowest block (its router and experts): no gradient appears there, the
    backward stops above it, and the trainable gradients are those of the unfrozen model (the balance term still
    counts the frozen layer's routing)."""
    full = prepared("qwen3moe-top2-norm-gqa2")
    frozen = prepared("qwen3moe-top2-norm-gqa2", freeze=["layers:1"])
    b = ragged(full, padded_batch)
    _, g_full = gradients(full.train(), b, "manual")
    _, g_frozen = gradients(frozen.train(), b, "manual")
    assert not any(n.startswith(("model.embed_tokens", "model.layers.0.")) for n in g_frozen)
    assert all(p.grad is None for n, p in frozen.named_parameters() if n.startswith("model.layers.0."))
    for name, g in g_frozen.items():
        torch.testing.assert_close(g, g_full[name], rtol=1e-12, atol=1e-15, msg=name)


def test_a_bf16_autocast_step_is_close_to_fp32(padded_batch):
    """Under bf16 autocast (the matmuls in bf16, the router's softmax and the weights' gradients in fp32) the step
    runs and its gradients stay near fp32's: every one finite and in fp32, the whole within a few percent."""
    from minift.train import autocast
    try:
        bf16 = autocast(torch.device("cpu"), "bf16")
    except MiniftError as e:
        pytest.skip(str(e))
    model = make("lm", "qwen3moe-top2-norm-gqa2", output_router_logits=True).train()
    b = ragged(model, padded_batch)
    g32 = {n: g.clone() for n, g in gradients(model, b, "manual")[1].items()}
    with bf16:
        g16 = gradients(model, b, "manual")[1]
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in g16.values())
    norm = torch.cat([g.flatten() for g in g32.values()]).norm()
    assert torch.cat([(g16[n] - g).flatten() for n, g in g32.items()]).norm() / norm < 0.05


def test_memory_estimate_counts_what_the_sparse_blocks_keep(padded_batch):
    """The estimate's activations are what a training forward keeps: the router's softmax and choice, the experts'
    outputs, and each expert's own inputs (an expert without a token keeps an empty one)."""
    model = make("lm", "qwen3moe-top2-norm-gqa2").train()
    b = ragged(model, padded_batch)
    estimate = estimate_memory(model, b)
    assert kept_for_backward(model) == []  # the estimate's forward left nothing behind
    with torch.no_grad():
        model(b["input_ids"], b["attention_mask"])
    kept = {(owner, name): shape for owner, name, shape, _ in kept_for_backward(model)}
    tokens, hidden = b["input_ids"].numel(), model.config.hidden_size
    assert kept["model.layers.0.mlp", "probs"] == (tokens, 6) and kept["model.layers.0.mlp", "outs"] == (2 * tokens, hidden)
    assert sum(kept[f"model.layers.2.mlp.experts.{e}.gate_proj", "x"][0] for e in range(6)) == 2 * tokens
    assert estimate["activations"] > 0 and "recompute=1" in estimate["levers"]


# ---- reading configs, and the refusals --------------------------------------------------------------------

def test_configs_read_as_transformers_reads_them():
    """The expert count under either name, the per-family defaults for renormalising, which layers are sparse."""
    assert config("mixtral-top2-gqa4").num_experts == 4 and config("mixtral-top2-gqa4").norm_topk_prob
    assert config("qwen3moe-top1-tied-step2", num_experts=None, num_local_experts=7).num_experts == 7
    qwen = config("qwen3moe-top2-norm-gqa2")
    assert [qwen.is_sparse(i) for i in range(3)] == [True, False, True]
    step2 = config("qwen3moe-top1-tied-step2")
    assert [step2.is_sparse(i) for i in range(2)] == [False, True]
    assert not config("olmoe-top2-gqa2").norm_topk_prob and config("olmoe-top2-gqa2").qk_norm == "projection"
    assert LlamaConfig.from_dict({**SHAPES["qwen3moe-top2-norm-gqa2"], "use_sliding_window": True,
                                  "sliding_window": 4}).sliding_window == 4
    assert config("mixtral-top1-window3").window_of(1) == 3 and config("olmoe-top2-gqa2").window_of(0) is None


@pytest.mark.parametrize("extra,words", [
    (dict(model_type="llama", num_local_experts=8), "is not a mixture-of-experts model minift runs"),
    (dict(model_type="qwen3", num_experts=8), "is not a mixture-of-experts model minift runs"),
    (dict(model_type="qwen2_moe"), "'qwen2_moe' is not a Llama-family model"),
    (dict(model_type="mixtral", router_jitter_noise=0.1), "router_jitter_noise"),
    (dict(model_type="olmoe", clip_qkv=8.0), "clip_qkv"),
    (dict(model_type="olmoe", num_local_experts=None), "needs its number of experts"),
    (dict(model_type="qwen3_moe", num_experts_per_tok=0), "needs its number of experts"),
    (dict(model_type="qwen3_moe"), "needs moe_intermediate_size"),
])
def test_refusals(extra, words):
    with pytest.raises(MiniftError) as e:
        LlamaConfig.from_dict({**SHAPES["mixtral-top2-gqa4"], **extra})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_dense_save_reads_back_dense(tmp_path):
    """A dense Llama saved by minift carries the new fields (num_experts 0): it loads back dense, not refused."""
    c = LlamaConfig.from_dict({"model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
                               "num_hidden_layers": 1, "num_attention_heads": 2})
    model = llama.LlamaForCausalLM(c)
    checkpoints.save_checkpoint(model, tmp_path)
    again = load_folder(tmp_path)
    assert again.model.sparse_blocks() == [] and again.config.num_experts == 0
