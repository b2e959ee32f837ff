"""LoRA: the layer's hand-written backward against autograd (float64, dropout on), whole models with
adapters against autograd, step 0 == the base model, merge/unmerge, the peft round trip both ways, and the
one-line errors. peft and transformers are the oracle only (importorskip)."""
import copy
import json

import pytest
import torch

from minift.models.bert import BertConfig, BertForSequenceClassification
from minift.checkpoints import load_checkpoint, save_checkpoint
from minift.errors import MiniftError
from minift.models.gpt2 import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
from minift.layers import Linear
from minift.lora import (LoRALinear, add_lora, hf_names, linear_layers, load_adapter, lora_layers, lora_summary,
                         merge_and_unload, merge_lora, save_adapter, unmerge_lora)

TOL = 1e-10  # float64 gradients, relative to the largest entry of autograd's

BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
            num_labels=3, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2, max_position_embeddings=24)
GPT2 = dict(vocab_size=50, n_positions=24, n_embd=16, n_layer=2, n_head=4, num_labels=3,
            resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)
# grouped-query attention (4 query heads, 2 k/v heads), an untied LM head
LLAMA = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=24, num_labels=3, attention_dropout=0.2, pad_token_id=0)


def make_model(kind, **overrides):
    """A small random-init minift model, its parameters moved off their init (no zero bias, LayerNorm != 1)."""
    if kind == "bert-cls":
        model = BertForSequenceClassification(BertConfig(**{**BERT, **overrides}))
    elif kind == "roberta-cls":
        model = BertForSequenceClassification(BertConfig(**{**BERT, **overrides}, model_type="roberta",
                                                         type_vocab_size=1, pad_token_id=1))
    elif kind == "gpt2-cls":
        model = GPT2ForSequenceClassification(GPT2Config(**{**GPT2, **overrides}, pad_token_id=0))
    elif kind.startswith("llama"):
        llama = pytest.importorskip("minift.models.llama")  # the Llama family (issue 13)
        task = llama.LlamaForCausalLM if kind == "llama-lm" else llama.LlamaForSequenceClassification
        model = task(llama.LlamaConfig(**{**LLAMA, **overrides}))
    else:
        model = GPT2LMHeadModel(GPT2Config(**{**GPT2, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def set_adapters(model, scale=0.3):
    """Non-zero B (and a fresh A): a trained adapter, so that every gradient and every output difference is real."""
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.normal_(0, scale)
            layer.lora_B.normal_(0, scale)


def batch_for(model, padded=True, left=True):
    """4 rows of 7 tokens: with `padded`, one right-padded row and (with `left`) one left-padded row
    (transformers' BERT takes [CLS] at position 0 and counts positions from the left edge: right padding only)."""
    B, T = 4, 7
    pad = model.config.pad_token_id or 0
    ids = torch.randint(2, model.config.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    if padded:  # one right-padded row, one left-padded row
        mask[1, 5:] = 0
        mask[2, :3] = int(not left)
        ids = ids.masked_fill(mask == 0, pad)
    if model.task == "lm":
        labels = ids.masked_fill(mask == 0, -100)
    else:
        labels = torch.randint(0, model.config.num_labels, (B,))
    return dict(input_ids=ids, attention_mask=mask), labels


# ---------------------------------------------------------------------------------------------------------
# The layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.4])
@pytest.mark.parametrize("train_w", [False, True])
def test_layer_gradients_match_autograd(bias, dropout, train_w):
    base = Linear(6, 5, bias=bias).double()
    layer = LoRALinear(base, r=3, alpha=5, dropout=dropout).double().train()
    with torch.no_grad():
        layer.lora_B.normal_()
        if bias:
            layer.bias.normal_()
    layer.weight.requires_grad_(train_w)  # the usual LoRA case is frozen; a trainable W must still work
    if bias:
        layer.bias.requires_grad_(train_w)
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    dy = torch.randn(2, 4, 5, dtype=torch.float64)

    torch.manual_seed(7)  # the same dropout mask in both passes
    xr = x.clone().requires_grad_(True)
    y_ref = layer(xr)
    y_ref.backward(dy)
    ref = {n: p.grad for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)

    torch.manual_seed(7)
    with torch.no_grad():
        y = layer(x)
        dx = layer.backward(dy)
    assert torch.equal(y, y_ref.detach())
    assert (dx - xr.grad).abs().max() <= TOL * xr.grad.abs().max()
    for n, p in layer.named_parameters():
        if not p.requires_grad:
            assert p.grad is None and ref[n] is None, f"{n} is frozen but got a gradient"
            continue
        assert ref[n].abs().max() > 0, n
        err = (p.grad - ref[n]).abs().max() / ref[n].abs().max()
        assert err <= TOL, f"{n}: relative error {err:.2e}"
    assert {n for n, p in layer.named_parameters() if p.grad is not None} == (
        {"lora_A", "lora_B"} | ({"weight"} | ({"bias"} if bias else set()) if train_w else set()))
    if dropout:  # dropout was on (the two passes matched because they drew the same masks)
        with torch.no_grad():
            assert not torch.allclose(y, layer.eval()(x))
    left = [a for a in ("x", "h", "u") if hasattr(layer, a)]
    assert not left, f"kept after backward: {left}"


def test_layer_with_frozen_weight_keeps_no_input():
    layer = LoRALinear(Linear(8, 8), r=2, alpha=4).train()
    layer.weight.requires_grad_(False)
    with torch.no_grad():
        layer(torch.randn(3, 8))
    assert not hasattr(layer, "x")  # no dW to compute, so Linear keeps nothing; the side path keeps h and u
    assert layer.u.shape == (3, 2)


def test_init_as_peft():
    torch.manual_seed(0)
    layer = LoRALinear(Linear(64, 32), r=8, alpha=16)
    assert layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (32, 8)
    assert torch.equal(layer.lora_B, torch.zeros(32, 8))
    bound = 1 / 64 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64: U(-1/sqrt(64), 1/sqrt(64))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert layer.scale == 2.0


# ---------------------------------------------------------------------------------------------------------
# Whole models


@pytest.mark.parametrize("kind,targets", [("bert-cls", ["query", "value"]), ("bert-cls", "all-linear"),
                                          ("roberta-cls", ["*.attention.self.*", "intermediate.dense"]),
                                          ("gpt2-cls", ["c_attn"]), ("gpt2-lm", "all-linear"),
                                          ("llama-lm", "all-linear"), ("llama-cls", ["q_proj", "v_proj"])])
def test_model_gradients_match_autograd(kind, targets):
    model = make_model(kind)
    add_lora(model, targets, r=4, alpha=8, dropout=0.1)
    set_adapters(model)
    model.double().train()
    inputs, labels = batch_for(model)

    torch.manual_seed(3)
    loss_ref, _ = model.loss(model(**inputs), labels)
    loss_ref.backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch.manual_seed(3)
        loss, d = model.loss(model(**inputs), labels)
        model.backward(d)
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-13)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable, "frozen tensors got a .grad"
    assert {n for n, g in ref.items() if g is not None} == trainable
    errors = {n: ((p.grad - ref[n]).abs().max() / ref[n].abs().max()).item()
              for n, p in model.named_parameters() if n in trainable}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst}: relative error {errors[worst]:.2e}"
    assert any(".lora_A" in n for n in errors) and any(".lora_B" in n for n in errors)
    # nothing kept is left over: the frozen linear layers kept no input (no dW to compute), the rest was freed
    left = {f"{m}.{a}" for m, mod in model.named_modules() for a, v in vars(mod).items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}
    assert not left, f"still held after backward: {left}"


def test_adapted_model_trains_and_leaves_the_base_alone():
    model = make_model("bert-cls")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, ["query", "value"], r=4, alpha=8)
    model.train()
    inputs, labels = batch_for(model, padded=False)
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for _ in range(30):  # plain SGD, our backward
        with torch.no_grad():
            loss, d = model.loss(model(**inputs), labels)
            model.backward(d)
            for p in params:
                p -= 0.1 * p.grad
                p.grad = None
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    moved = {n for n, p in model.named_parameters() if n in base and not torch.equal(p, base[n])}
    assert moved == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}
    assert all(lay.lora_B.abs().max() > 0 for lay in lora_layers(model).values())


@pytest.mark.parametrize("kind", ["bert-cls", "gpt2-lm"])
def test_step_zero_is_the_base_model_exactly(kind):
    model = make_model(kind).eval()
    inputs, _ = batch_for(model)
    with torch.no_grad():
        before = model(**inputs)
        add_lora(model, "all-linear", r=4, alpha=8)
        after = model(**inputs)
    assert torch.equal(before, after)  # B = 0: the side path adds exact zeros


@pytest.mark.parametrize("kind", ["bert-cls", "gpt2-lm"])
def test_merge_and_unmerge(kind):
    model = make_model(kind)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, "all-linear", r=4, alpha=8)
    set_adapters(model)
    model.eval()
    inputs, _ = batch_for(model)
    with torch.no_grad():
        unmerged = model(**inputs)
        merge_lora(model)
        merged = model(**inputs)
        unmerge_lora(model)
        again = model(**inputs)
    assert (merged - unmerged).abs().max() <= 1e-6
    assert (again - unmerged).abs().max() <= 1e-6
    assert not torch.allclose(unmerged, make_model_output(kind, w0, inputs), atol=1e-3), "the adapter changes outputs"
    for n, p in model.named_parameters():  # W is back, up to float rounding
        if n in w0:
            assert (p - w0[n]).abs().max() <= 1e-6, n


def make_model_output(kind, weights, inputs):
    base = make_model(kind).eval()
    base.load_state_dict(weights)
    with torch.no_grad():
        return base(**inputs)


def test_merged_model_saves_as_a_plain_checkpoint(tmp_path, transformers):
    model = make_model("bert-cls")
    add_lora(model, ["query", "value", "intermediate.dense"], r=4, alpha=8)
    set_adapters(model)
    model.eval()
    inputs, _ = batch_for(model, left=False)
    with torch.no_grad():
        adapted = model(**inputs)
    plain = merge_and_unload(model)
    assert not lora_layers(plain) and all(type(m) is Linear for m in linear_layers(plain).values())
    assert all(p.requires_grad for p in plain.parameters())
    save_checkpoint(plain, tmp_path / "merged")
    ours = load_checkpoint(tmp_path / "merged", verbose=False).eval()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (ours(**inputs) - adapted).abs().max() <= 1e-6
        assert (hf(**inputs).logits - adapted).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# peft's layout, both ways

HF_AUTO = {"bert-cls": "AutoModelForSequenceClassification", "roberta-cls": "AutoModelForSequenceClassification",
           "gpt2-cls": "AutoModelForSequenceClassification", "gpt2-lm": "AutoModelForCausalLM",
           "llama-cls": "AutoModelForSequenceClassification", "llama-lm": "AutoModelForCausalLM"}
PEFT_CASES = [("bert-cls", ["query", "value"]), ("bert-cls", "all-linear"), ("roberta-cls", ["query", "dense"]),
              ("gpt2-cls", ["c_attn", "c_fc"]), ("gpt2-lm", "all-linear"), ("llama-lm", "all-linear"),
              ("llama-cls", ["q_proj", "v_proj", "down_proj"])]


@pytest.fixture(scope="module")
def peft():
    return pytest.importorskip("peft")


def needs_family(kind):
    from minift.checkpoints import FAMILIES
    if kind.startswith("llama") and "llama" not in FAMILIES:
        pytest.skip("the Llama family is not registered in checkpoints.FAMILIES yet")


def hf_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("kind,targets", PEFT_CASES)
def test_our_adapter_loads_in_peft(kind, targets, tmp_path, transformers, peft):
    needs_family(kind)
    model = make_model(kind, hidden_dropout_prob=0.0) if "bert" in kind else make_model(kind)
    save_checkpoint(model, tmp_path / "base")
    add_lora(model, targets, r=4, alpha=8, dropout=0.05)
    set_adapters(model)
    with torch.no_grad():  # a trained head, different from the base checkpoint's
        for n, p in model.named_parameters():
            if p.requires_grad and ".lora_" not in n:
                p.add_(torch.randn_like(p))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=tmp_path / "base")
    model.eval()
    inputs, _ = batch_for(model, padded="bert" in kind, left=False)
    with torch.no_grad():
        ours = model(**inputs)

    base = getattr(transformers, HF_AUTO[kind]).from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    theirs = hf_logits(peft_model, inputs)
    assert (theirs - ours).abs().max() <= 1e-5
    # and it is the adapter (and head) that makes the match, not a coincidence
    plain = getattr(transformers, HF_AUTO[kind]).from_pretrained(tmp_path / "base").eval()
    assert (hf_logits(plain, inputs) - ours).abs().max() > 1e-3
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] == kind.startswith("gpt2")


@pytest.mark.parametrize("kind,targets", PEFT_CASES)
def test_peft_adapter_loads_in_minift(kind, targets, tmp_path, transformers, peft):
    needs_family(kind)
    model = make_model(kind)
    save_checkpoint(model, tmp_path / "base")
    base = getattr(transformers, HF_AUTO[kind]).from_pretrained(tmp_path / "base")
    task = "CAUSAL_LM" if kind.endswith("lm") else "SEQ_CLS"
    config = peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=targets,
                             fan_in_fan_out=kind.startswith("gpt2"))
    peft_model = peft.get_peft_model(base, config)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad:  # lora_A, lora_B and the head peft trains (modules_to_save)
                p.add_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    inputs, _ = batch_for(model, padded="bert" in kind, left=False)
    theirs = hf_logits(peft_model, inputs)

    ours_model = load_checkpoint(tmp_path / "base", "lm" if kind.endswith("lm") else "classify", verbose=False)
    summary = load_adapter(ours_model, tmp_path / "adapter")
    assert "LoRA r=4" in summary
    peft_adapted = {n.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0]
                    for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    names = hf_names(ours_model)
    assert {names[n + ".weight"][:-len(".weight")] for n in lora_layers(ours_model)} == peft_adapted
    with torch.no_grad():
        ours = ours_model.eval()(**inputs)
    assert (ours - theirs).abs().max() <= 1e-5


def test_adapter_round_trip_in_minift(tmp_path):
    model = make_model("gpt2-cls")
    fresh = copy.deepcopy(model)
    add_lora(model, ["c_attn", "mlp.c_proj"], r=2, alpha=3, dropout=0.1)
    set_adapters(model)
    save_adapter(model, tmp_path / "a")
    summary = load_adapter(fresh, tmp_path / "a")
    assert summary == lora_summary(model)
    model.eval(), fresh.eval()
    inputs, _ = batch_for(model, padded=False)
    with torch.no_grad():
        assert torch.equal(model(**inputs), fresh(**inputs))
    assert sorted(lora_layers(fresh)) == sorted(lora_layers(model))
    assert all(lay.lora_dropout.p == 0.1 and lay.scale == 1.5 for lay in lora_layers(fresh).values())


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line each


@pytest.mark.parametrize("kwargs,message", [
    (dict(targets=["query"], r=0), "rank r=0"),
    (dict(targets=["query"], r=17), "larger than layer bert.encoder.layer.0.attention.self.query (16 in, 16 out)"),
    (dict(targets=["query"], alpha=0), "alpha=0 must be > 0"),
    (dict(targets=["query"], dropout=1.0), "dropout 1.0 must be in [0, 1)"),
    (dict(targets=["query", "q_proj"]), "'q_proj' matches no linear layer"),
    (dict(targets=[]), "no LoRA targets"),
])
def test_bad_settings(kwargs, message):
    model = make_model("bert-cls")
    with pytest.raises(MiniftError) as e:
        add_lora(model, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters()), "nothing changed"


def test_unmatched_target_names_the_layers_that_exist():
    with pytest.raises(MiniftError, match=r"this model's are: transformer\.h\.\*\.attn\.c_attn, "
                                          r"transformer\.h\.\*\.attn\.c_proj, transformer\.h\.\*\.mlp\.c_fc"):
        add_lora(make_model("gpt2-lm"), "query")


def test_attaching_twice_is_an_error():
    model = make_model("bert-cls")
    add_lora(model, "query")
    with pytest.raises(MiniftError, match="already has LoRA layers"):
        add_lora(model, "value")


def test_adapter_for_another_base_model(tmp_path):
    deep = make_model("bert-cls", num_hidden_layers=3)
    add_lora(deep, "value", r=2)
    save_adapter(deep, tmp_path / "deep", base_model_name_or_path="a-3-layer-bert")
    with pytest.raises(MiniftError, match=r"adapts layer bert\.encoder\.layer\.2\.attention\.self\.value, which "
                                          r"this model does not have: it was saved for a-3-layer-bert"):
        load_adapter(make_model("bert-cls"), tmp_path / "deep")

    wide = make_model("bert-cls", hidden_size=24, intermediate_size=32)
    add_lora(wide, "value", r=2)
    save_adapter(wide, tmp_path / "wide", base_model_name_or_path="a-24-wide-bert")
    with pytest.raises(MiniftError, match=r"lora_A of bert\.encoder\.layer\.0\.attention\.self\.value is \(2, 24\), "
                                          r"this model needs \(2, 16\): it was saved for a-24-wide-bert"):
        load_adapter(make_model("bert-cls"), tmp_path / "wide")

    five = make_model("bert-cls", num_labels=5)
    add_lora(five, "value", r=2)
    save_adapter(five, tmp_path / "five")
    with pytest.raises(MiniftError, match=r"classifier\.bias is \(5,\), this model's \(3,\).*another number of labels"):
        load_adapter(make_model("bert-cls"), tmp_path / "five")

    gpt = make_model("gpt2-lm")
    add_lora(gpt, "c_attn", r=2)
    save_adapter(gpt, tmp_path / "gpt")
    model = make_model("bert-cls")
    with pytest.raises(MiniftError, match=r"adapts layer transformer\.h\.0\.attn\.c_attn, which this model does not have"):
        load_adapter(model, tmp_path / "gpt")
    assert not lora_layers(model), "a failed load leaves the model as it was"

    with pytest.raises(MiniftError, match="not an adapter folder"):
        load_adapter(make_model("bert-cls"), tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Training with adapters resumes exactly, and AdamW keeps state for the adapters and the head only

def lora_run(out, max_steps, resume=False, save_every=0):
    """train() a tiny BERT with TrainConfig(lora_r=4) (dropout on) on synthetic rows: train() attaches the
    adapters itself. The same seed builds the same model."""
    from minift.batching import TrainData
    from minift.config import TrainConfig
    from minift.train import train

    torch.manual_seed(0)
    model = make_model("bert-cls")
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(2, 50, (int(n),), generator=g).tolist(), "label": i % 3}
            for i, n in enumerate(torch.randint(4, 12, (24,), generator=g))]
    # a constant lr: the plan of an 8-step run and of a 4-step run then agree on the first 4 steps
    cfg = TrainConfig(batch_size=4, lr=1e-2, max_steps=max_steps, save_every=save_every, log_every=1,
                      precision="fp32", epochs=2, schedule="constant", warmup_ratio=0.0, lora_r=4, lora_alpha=8,
                      lora_dropout=0.1, lora_targets=["query", "value"])
    train(model, TrainData(rows, None, pad_id=0), cfg, out, resume=resume)
    return model


def test_training_with_adapters_resumes_bitwise(tmp_path):
    from safetensors.torch import load_file

    straight = lora_run(tmp_path / "straight", 8)
    lora_run(tmp_path / "split", 4, save_every=4)
    resumed = lora_run(tmp_path / "split", 8, resume=True)
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    untrained = make_model("bert-cls")
    assert not torch.equal(straight.classifier.weight, untrained.classifier.weight)
    # TrainConfig(lora_r=4) alone: adapters on query and value, and only they and the head moved
    assert sorted(lora_layers(straight)) == [f"bert.encoder.layer.{i}.attention.self.{k}" for i in (0, 1)
                                             for k in ("query", "value")]
    base = dict(untrained.named_parameters())
    moved = {n for n, p in straight.named_parameters() if n in base and not torch.equal(p, base[n])}
    assert moved and all(n.startswith(("classifier.", "bert.pooler.")) for n in moved), sorted(moved)
    state = load_file(str(tmp_path / "split" / "checkpoint" / "optimizer.safetensors"))
    kept = {k.split(".", 1)[1] for k in state if k.startswith("exp_avg.")}
    assert kept and all(".lora_" in k or k.startswith(("classifier.", "bert.pooler.")) for k in kept), sorted(kept)[:5]
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    assert kept == trainable  # frozen tensors: no optimizer state


def test_the_lora_flag_takes_the_lora_recipe(tmp_path, monkeypatch):
    """`minift finetune --lora` trains with recipe.LORA_TRAIN on top of MAIN_TRAIN; a flag still wins, and
    without --lora the main job's recipe is untouched."""
    import minift.classify
    from minift import cli
    from minift.config import TrainConfig
    from minift.recipe import LORA_TRAIN, MAIN_TRAIN

    seen = {}
    monkeypatch.setattr(minift.classify, "finetune_classifier", lambda *args, **kw: seen.update(cfg=kw["cfg"]))
    cli.main(["finetune", "--lora", "--out", str(tmp_path)])
    assert LORA_TRAIN and vars(seen["cfg"]) == vars(TrainConfig(**{**MAIN_TRAIN, **LORA_TRAIN, "lora_r": 8}))
    cli.main(["finetune", "--lora", "--lr", "2e-3", "--out", str(tmp_path)])
    assert seen["cfg"].lr == 2e-3 and seen["cfg"].lora_r == 8
    cli.main(["finetune", "--out", str(tmp_path)])
    assert vars(seen["cfg"]) == vars(TrainConfig(**MAIN_TRAIN))
