"""Preference tuning (minift/preference.py): the sequence log-probs and their hand-written backward against autograd
in float64 (Llama and GPT-2, full fine-tuning and LoRA, dropout on, the chunked head), each loss's derived gradient
against autograd, micro-batches that add up, the reference by switched-off adapters equal to a frozen copy, and the
losses and metrics against TRL itself: DPOTrainer on a tiny random Llama (sigmoid and IPO; a frozen reference copy
and a peft adapter switched off), CPOTrainer.cpo_loss (cDPO's smoothing, SimPO) and ORPOTrainer.odds_ratio_loss.
KTO likewise: its gradient against autograd (float64, full and LoRA, dropout on), micro-batches that add up, its
reference point from mismatched rows, and KTOTrainer itself (loss, metrics, gradients; a frozen copy and a peft
adapter switched off). TRL and peft are the oracle only (importorskip)."""
import copy
import math
import types

import pytest
import torch

from minift.checkpoints import build_model
from minift.errors import MiniftError
from minift.freeze import blocks
from minift.lora import add_lora, lora_layers
from minift.preference import (LOSS_TYPES, count_chosen_tokens, dpo_loss, dpo_step, frozen_copy, ipo_loss, kto_batch,
                               kto_kl, kto_loss, kto_mismatched_batch, kto_step, orpo_odds_loss, pair_loss,
                               preference_batch, reference_logprobs, sequence_logprobs, sequence_logprobs_backward,
                               simpo_loss)

TOL = 1e-10  # float64 gradients, relative to the largest entry of autograd's
CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, attention_dropout=0.2),
    "gpt2": dict(model_type="gpt2", vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.2,
                 embd_pdrop=0.2, attn_pdrop=0.2),
}
# three pairs: prompts and completions of different lengths, so rows are padded and counts differ
PROMPTS, CHOSEN, REJECTED = ([[1, 3, 4], [8, 9], [20, 21, 22, 23]], [[5, 6, 2], [10, 2], [30, 2]],
                             [[7, 2], [11, 12, 13, 2], [31, 32, 2]])
NO_DROPOUT = {"llama": dict(attention_dropout=0.0), "gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}
SETTINGS = dict(beta=0.5, label_smoothing=0.1, simpo_gamma=0.3)


def pairs_batch(pairs=slice(None)):
    return preference_batch(PROMPTS[pairs], CHOSEN[pairs], REJECTED[pairs], pad_id=0)


def make_policy(family, lora=False, dropout=True):
    """(policy, reference): a tiny float64 model moved off its init; with LoRA, adapters with non-zero B (trained) and
    no reference (the adapters switch off), else the policy's starting point frozen and the policy moved on from it."""
    torch.manual_seed(0)
    model = build_model({**CONFIGS[family], **({} if dropout else NO_DROPOUT[family])}, "lm").double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if lora:
        add_lora(model, "all-linear", r=2, alpha=4, dropout=0.1 if dropout else 0.0)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(0, 0.3)
        return model.train(), None
    reference = frozen_copy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.train(), reference


def trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def autograd_loss(model, batch, loss_type, reference, num_pairs, num_chosen_tokens):
    """The same loss with autograd through the model's forward (the reference of the hand-written backward)."""
    ref = reference_logprobs(model, batch, reference)
    policy = sequence_logprobs(model, batch)
    losses, _, _ = pair_loss(loss_type, policy, ref, SETTINGS["beta"], SETTINGS["label_smoothing"], SETTINGS["simpo_gamma"])
    loss = losses.sum() / num_pairs
    if loss_type == "orpo":
        loss = loss - policy.sums.chunk(2)[0].sum() / num_chosen_tokens
    return loss


def assert_grads_close(ours, ref, tol=TOL):
    assert ours.keys() == ref.keys() and ours
    for name in ref:
        assert ref[name].abs().max() > 0, name
        err = (ours[name] - ref[name]).abs().max() / ref[name].abs().max()
        assert err <= tol, f"{name}: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------------------------
# Gradients through the model: hand-written against autograd, float64, dropout on


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("lora", [False, True])
def test_rpo_nll_term_gradient_matches_autograd(lora, loss_type):
    """rpo_alpha adds alpha x the chosen answers' mean token NLL: loss and every gradient as autograd's, float64."""
    model, reference = make_policy("llama", lora)
    batch, alpha = pairs_batch(), 0.7
    torch.manual_seed(5)
    loss, metrics = dpo_step(model, batch, loss_type, **SETTINGS, reference=reference, rpo_alpha=alpha)
    ours = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    ref = reference_logprobs(model, batch, reference)  # as dpo_step: the reference first (eval mode: no dropout draws)
    policy = sequence_logprobs(model, batch)  # then the policy, with dpo_step's dropout masks
    losses, _, _ = pair_loss(loss_type, policy, ref, SETTINGS["beta"], SETTINGS["label_smoothing"], SETTINGS["simpo_gamma"])
    policy_nll = -policy.sums.chunk(2)[0].sum() / count_chosen_tokens(batch)
    ref_loss = losses.sum() / 3 + alpha * policy_nll
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-12) and metrics["nll_loss"] == pytest.approx(policy_nll.item())
    assert_grads_close(ours, trainable_grads(model))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("family, lora", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)])
def test_step_gradients_match_autograd(family, lora, loss_type):
    model, reference = make_policy(family, lora)
    batch = pairs_batch()
    torch.manual_seed(5)  # the same dropout masks in both passes (the reference forward, in eval mode, draws none)
    loss, metrics = dpo_step(model, batch, loss_type, **SETTINGS, reference=reference)
    ours = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    ref_loss = autograd_loss(model, batch, loss_type, reference, 3, count_chosen_tokens(batch))
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-12)
    assert_grads_close(ours, trainable_grads(model))
    assert set(metrics) >= {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                            "logps/chosen", "logps/rejected"}
    if lora:
        assert all(".lora_" in n for n in ours)  # the base stays frozen


@pytest.mark.parametrize("lever", ["chunked head", "recompute"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_memory_levers_give_the_plain_gradients(family, lever):
    """The chunked head (TrainConfig.chunked_loss: forward returns hidden states, the log-probs are made 4 positions at
    a time, again in the backward) and recompute (blocks run their forward again in the backward): dropout on."""
    model, reference = make_policy(family)
    other = copy.deepcopy(model)
    if lever == "chunked head":
        other.loss_chunk = 4  # what train.prepare_model sets from TrainConfig(chunked_loss=4)
    else:
        for block in blocks(other):
            block.recompute = True
    batch = pairs_batch()
    for m in (model, other):
        torch.manual_seed(5)
        dpo_step(m, batch, "sigmoid", **SETTINGS, reference=reference)
    assert_grads_close(trainable_grads(other), trainable_grads(model), tol=1e-12)


def test_micro_batches_add_up_to_the_big_batch():
    """Pairs 0-1 and pair 2 as two micro-batches, each divided by the step's 3 pairs (and ORPO's chosen tokens)."""
    for loss_type in LOSS_TYPES:
        big, reference = make_policy("llama", dropout=False)  # the two runs would draw different masks
        small = copy.deepcopy(big)
        loss_big, _ = dpo_step(big, pairs_batch(), loss_type, **SETTINGS, reference=reference)
        n_tokens = count_chosen_tokens(pairs_batch())
        loss_small = sum(dpo_step(small, pairs_batch(part), loss_type, **SETTINGS, reference=reference, num_pairs=3,
                                  num_chosen_tokens=n_tokens)[0] for part in (slice(0, 2), slice(2, 3)))
        assert loss_small == pytest.approx(loss_big, rel=1e-12), loss_type
        assert_grads_close(trainable_grads(small), trainable_grads(big), tol=1e-12)


def test_sequence_logprobs_are_the_shifted_token_logprobs():
    """tokens[b, t] = log softmax(logits[b, t])[input[b, t+1]] where label t+1 is a target; sums and counts follow."""
    model, _ = make_policy("llama")
    batch = pairs_batch()
    lp = sequence_logprobs(model.eval(), batch)
    with torch.no_grad():
        logprobs = model(batch["input_ids"], batch["attention_mask"]).log_softmax(-1)
    b, t = 1, 2  # row 1 = pair 1's chosen: prompt [8, 9], completion [10, 2]: position 1 predicts 10, 2 predicts 2
    assert lp.mask[b].nonzero().flatten().tolist() == [1, 2]
    assert lp.tokens[b, t].item() == logprobs[b, t, 2].item()
    assert lp.sums[b].item() == pytest.approx((logprobs[b, 1, 10] + logprobs[b, 2, 2]).item(), rel=1e-14)
    assert lp.counts.tolist() == [3, 2, 2, 2, 4, 3] and lp.kept is None  # eval: nothing kept for a backward


def test_the_backward_needs_the_softmax():
    """Per-token dlogps through the backward against autograd; and a mutation it must catch: with the softmax term
    dropped (kept log-probs of -inf: dlogits = g * onehot alone) the gradients are far from autograd's."""
    model, _ = make_policy("gpt2")
    batch = pairs_batch()
    g = torch.randn(batch["input_ids"].shape, dtype=torch.float64)

    def grads_of(run):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        run()
        return trainable_grads(model)

    def manual(mutate=False):
        with torch.no_grad():
            lp = sequence_logprobs(model, batch)
            if mutate:
                kind, logprobs, safe, mask = lp.kept
                lp.kept = (kind, torch.full_like(logprobs, -math.inf), safe, mask)
            sequence_logprobs_backward(model, lp, g)

    reference = grads_of(lambda: (sequence_logprobs(model, batch).tokens * g).sum().backward())
    assert_grads_close(grads_of(manual), reference)
    with pytest.raises(AssertionError):
        assert_grads_close(grads_of(lambda: manual(mutate=True)), reference, tol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# Each loss's derived gradient against autograd of its own forward, and a mutation it must catch


def random_pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(n, generator=g, dtype=torch.float64) * 8 + 0.5) for _ in range(4)]
    counts = [torch.randint(1, 6, (n,), generator=g) for _ in range(2)]
    return logps, counts


LOSSES = {
    "sigmoid": lambda c, r, rc, rr, nc, nr: dpo_loss(c, r, rc, rr, beta=0.7, label_smoothing=0.2),
    "ipo": lambda c, r, rc, rr, nc, nr: ipo_loss(c, r, rc, rr, nc, nr, beta=0.7),
    "simpo": lambda c, r, rc, rr, nc, nr: simpo_loss(c, r, nc, nr, beta=2.0, gamma=0.4, label_smoothing=0.2),
    "orpo": lambda c, r, rc, rr, nc, nr: orpo_odds_loss(c, r, nc, nr, beta=0.3),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_loss_gradient_is_its_derivative(name):
    (chosen, rejected, ref_chosen, ref_rejected), (n_chosen, n_rejected) = random_pairs()
    chosen.requires_grad_(True)
    rejected.requires_grad_(True)
    losses, (d_chosen, d_rejected), _ = LOSSES[name](chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected)
    losses.sum().backward()
    torch.testing.assert_close(d_chosen.detach(), chosen.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d_rejected.detach(), rejected.grad, rtol=1e-12, atol=1e-14)


def test_dpo_numbers_by_hand():
    """One pair worked out: h = (-2 - -3) - (-4 - -3.5) = 1.5, beta 0.2, eps 0.1."""
    t = torch.tensor
    losses, (dc, dr), m = dpo_loss(t([-2.0]), t([-4.0]), t([-3.0]), t([-3.5]), beta=0.2, label_smoothing=0.1)
    s = 1 / (1 + math.exp(-0.3))  # sigmoid(beta h)
    assert losses.item() == pytest.approx(-0.9 * math.log(s) - 0.1 * math.log(1 - s), rel=1e-6)
    assert dc.item() == pytest.approx(0.2 * (0.1 * s - 0.9 * (1 - s)), rel=1e-6) and dr.item() == -dc.item()
    assert m["rewards/chosen"] == pytest.approx(0.2) and m["rewards/rejected"] == pytest.approx(-0.1)
    assert m["rewards/margins"] == pytest.approx(0.3) and m["rewards/accuracies"] == 1.0
    # mutation: without the smoothing term the loss is plain DPO's, a different number
    plain, _, _ = dpo_loss(t([-2.0]), t([-4.0]), t([-3.0]), t([-3.5]), beta=0.2)
    assert plain.item() == pytest.approx(-math.log(s), rel=1e-6) and plain.item() != pytest.approx(losses.item(), rel=1e-3)


def test_lora_step_zero_is_log_two():
    """B = 0 and dropout off: the policy is its reference, every log-ratio is 0, the loss log 2, the rewards 0."""
    torch.manual_seed(0)
    model = build_model({**CONFIGS["llama"], **NO_DROPOUT["llama"]}, "lm").double().train()  # as TRL's disable_dropout
    add_lora(model, "all-linear", r=2, alpha=4)
    loss, metrics = dpo_step(model, pairs_batch(), "sigmoid", beta=0.1)
    assert loss == pytest.approx(math.log(2), rel=1e-12)
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/margins"] == 0
    assert all(layer.lora_A.grad.abs().max() == 0 and layer.lora_B.grad.abs().max() > 0
               for layer in lora_layers(model).values())  # B = 0: A's gradient is 0, B's is not (as in SFT)


# ---------------------------------------------------------------------------------------------------------
# The reference policy


def test_adapters_off_is_the_frozen_base_bitwise():
    torch.manual_seed(0)
    base = build_model(CONFIGS["llama"], "lm").double()
    frozen = frozen_copy(base)
    add_lora(base, "all-linear", r=2, alpha=4, dropout=0.1)
    with torch.no_grad():
        for layer in lora_layers(base).values():
            layer.lora_B.normal_(0, 0.3)
    base.train()
    batch = pairs_batch()
    by_adapters_off = reference_logprobs(base, batch)
    by_copy = reference_logprobs(base, batch, reference=frozen)
    assert torch.equal(by_adapters_off.tokens, by_copy.tokens) and torch.equal(by_adapters_off.sums, by_copy.sums)
    assert base.training and all(layer.enabled for layer in lora_layers(base).values())  # all put back
    policy = reference_logprobs(base, batch, reference=base)  # the adapters on: another distribution
    assert (policy.sums - by_copy.sums).abs().min() > 1e-3


def test_refusals():
    model, reference = make_policy("llama")
    batch = pairs_batch()
    for kwargs, words in [(dict(loss_type="kto"), "is not one of sigmoid"), (dict(beta=0), "beta=0 must be > 0"),
                          (dict(label_smoothing=0.5), "label_smoothing=0.5"), (dict(reference=None), "no LoRA adapters")]:
        with pytest.raises(MiniftError, match=words):
            dpo_step(model, batch, **{"reference": reference, **kwargs})
    with pytest.raises(MiniftError, match="even number of rows"):
        dpo_step(model, {k: v[:3] for k, v in batch.items()}, reference=reference)
    with pytest.raises(MiniftError, match="no completion token"):
        dpo_step(model, preference_batch([[1, 2]], [[3]], [[]], pad_id=0), reference=reference)
    with pytest.raises(MiniftError, match="one chosen and one rejected"):
        preference_batch([[1]], [[2]], [], pad_id=0)
    with torch.no_grad():
        lp = sequence_logprobs(model, batch)
        sequence_logprobs_backward(model, lp, torch.ones(6, dtype=torch.float64))
        with pytest.raises(MiniftError, match="backward only once"):
            sequence_logprobs_backward(model, lp, torch.ones(6, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# TRL as the oracle: DPOTrainer on a tiny random Llama (transformers), the same pairs through minift


def exact_logprob_head(hidden, weight, bias, labels, temperature, chunk, softcap, scale, outputs):
    """TRL's fused LM-head kernel computes in float32 by design; this float64-honest stand-in (plain log_softmax)
    makes the rest of TRL's DPO code checkable to 1e-10. Same outputs: log_probs, entropy, -, mean_logits, is_top1."""
    logits = (hidden @ weight.T) * scale / temperature
    logprobs = logits.log_softmax(-1)
    return (logprobs.gather(-1, labels[:, None]).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1), None,
            logits.mean(-1), logits.argmax(-1) == labels)


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    """A tiny HF Llama policy and reference (float64), TRL's DPOTrainer on them, and minift's loads of both."""
    pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    import datasets
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    from trl import DPOConfig, DPOTrainer
    from minift.checkpoints import load_checkpoint
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tok = HFTokenizer(models.WordLevel({f"w{i}": i for i in range(50)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2", pad_token="w0")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=False, attn_implementation="eager", pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).double()
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("trl")
    policy.save_pretrained(folder / "policy")
    ref.save_pretrained(folder / "ref")
    data = datasets.Dataset.from_dict({"prompt": ["w3 w4"], "chosen": [" w5"], "rejected": [" w6"]})  # unused rows

    def trainer(model, ref_model, beta, peft_config=None):
        # bf16=False: TRL's CPU default (bf16=True) runs its reference forward under bf16 autocast even for float32
        # and float64 models, which would make the oracle a bf16 one
        args = DPOConfig(output_dir=str(folder / "out"), beta=beta, loss_type=["sigmoid"], report_to=[], use_cpu=True,
                         bf16=False)
        return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=hf_tok,
                          peft_config=peft_config)

    def ours(name):
        return load_checkpoint(folder / name, task="lm", verbose=False).double()

    return types.SimpleNamespace(trainer=trainer, policy=policy, ref=ref, ours=ours, folder=folder, tokenizer=hf_tok)


def trl_inputs():
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    collate = DataCollatorForPreference(pad_token_id=0)
    return collate([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)])


def trl_loss(trainer, loss_type):
    """TRL's loss (with its backward into the HF model's .grad) and its logged metrics for our three pairs."""
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer._metrics["train"].clear()
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, trl_inputs())
    loss.backward()
    return loss.item(), {k: v[0] for k, v in trainer._metrics["train"].items()}


HF_TOL = 1e-6  # float64 models, but transformers computes RoPE's cos and sin in float32 (relative differences ~3e-8)
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]


def test_the_pair_batch_is_trls(trl_setup):
    inputs, ours = trl_inputs(), pairs_batch()
    assert torch.equal(ours["input_ids"], inputs["input_ids"])
    assert torch.equal(ours["attention_mask"], inputs["attention_mask"])
    assert torch.equal(ours["labels"], inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_trainer_full_fine_tuning(trl_setup, loss_type, monkeypatch):
    """TRL's DPOTrainer (frozen reference model) and dpo_step: loss, the six metrics and every weight's gradient."""
    import trl.trainer.utils
    monkeypatch.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", types.SimpleNamespace(apply=exact_logprob_head))
    trainer = trl_setup.trainer(copy.deepcopy(trl_setup.policy), copy.deepcopy(trl_setup.ref), beta=0.3)
    loss, metrics = trl_loss(trainer, loss_type)
    model, reference = trl_setup.ours("policy").train(), frozen_copy(trl_setup.ours("ref"))
    our_loss, our_metrics = dpo_step(model, pairs_batch(), loss_type, beta=0.3, reference=reference)
    assert our_loss == pytest.approx(loss, rel=HF_TOL)
    for name in METRICS:
        assert our_metrics[name] == pytest.approx(metrics[name], rel=HF_TOL, abs=HF_TOL), name
    hf_grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    assert_grads_close(trainable_grads(model), {n: hf_grads[n] for n in trainable_grads(model)}, tol=HF_TOL)


def test_dpo_trainer_as_shipped_float32(trl_setup):
    """TRL unpatched (its float32 fused head) on the float32 models: the loss to 1e-5; the rewards, differences of two
    float32 sums of about -10, to 5e-5 (measured: 7e-6)."""
    trainer = trl_setup.trainer(copy.deepcopy(trl_setup.policy).float(), copy.deepcopy(trl_setup.ref).float(), beta=0.3)
    loss, metrics = trl_loss(trainer, "sigmoid")
    model, reference = trl_setup.ours("policy").float().train(), frozen_copy(trl_setup.ours("ref").float())
    our_loss, our_metrics = dpo_step(model, pairs_batch(), "sigmoid", beta=0.3, reference=reference)
    assert our_loss == pytest.approx(loss, rel=1e-5)
    for name in METRICS:
        assert our_metrics[name] == pytest.approx(metrics[name], rel=1e-5, abs=5e-5), name


def test_dpo_trainer_lora_reference_is_the_adapters_off(trl_setup, monkeypatch):
    """A new peft LoRA adapter (TRL's peft_config; its reference is then the adapters disabled), trained B; minift loads
    the same adapter and switches its adapters off: the same loss, metrics and adapter gradients. (A PeftModel passed
    in instead gets TRL's "ref" adapter, a copy of the starting adapter, not the base model.)"""
    peft = pytest.importorskip("peft")
    import trl.trainer.utils
    from minift.lora import load_adapter
    monkeypatch.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", types.SimpleNamespace(apply=exact_logprob_head))
    lora = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    trainer = trl_setup.trainer(copy.deepcopy(trl_setup.ref), None, beta=0.3, peft_config=lora)  # a new adapter
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # trained: the policy is no longer the base model
    trainer.model.save_pretrained(trl_setup.folder / "adapter")
    loss, metrics = trl_loss(trainer, "sigmoid")
    model = trl_setup.ours("ref")
    load_adapter(model, trl_setup.folder / "adapter")
    model.double().train()
    our_loss, our_metrics = dpo_step(model, pairs_batch(), "sigmoid", beta=0.3)
    assert our_loss == pytest.approx(loss, rel=HF_TOL)
    for name in METRICS:
        assert our_metrics[name] == pytest.approx(metrics[name], rel=HF_TOL, abs=HF_TOL), name
    hf_grads = {n.replace("base_model.model.", "").replace(".default.weight", ""): p.grad
                for n, p in trainer.model.named_parameters() if p.requires_grad}
    ours = trainable_grads(model)
    assert len(ours) == 12
    assert_grads_close(ours, {n: hf_grads[n] for n in ours}, tol=HF_TOL)


def cpo_self(loss_type, beta, label_smoothing=0.0, gamma=0.5):
    """What CPOTrainer.cpo_loss reads from its trainer."""
    return types.SimpleNamespace(alpha=0.0, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                                 simpo_gamma=gamma, accelerator=types.SimpleNamespace(device="cpu"))


def test_cdpo_smoothing_and_simpo_match_trl_cpo_loss():
    """CPOTrainer.cpo_loss's sigmoid on the log-ratios is cDPO's smoothed loss; its simpo on the average log-probs
    (what its concatenated_forward passes for loss_type simpo) is SimPO with gamma."""
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    (chosen, rejected, ref_chosen, ref_rejected), (n_chosen, n_rejected) = random_pairs()
    ours, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.7, label_smoothing=0.2)
    theirs, _, _ = cpo.CPOTrainer.cpo_loss(cpo_self("sigmoid", 0.7, 0.2), chosen - ref_chosen, rejected - ref_rejected)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    ours, _, metrics = simpo_loss(chosen, rejected, n_chosen, n_rejected, beta=2.0, gamma=0.4, label_smoothing=0.2)
    theirs, chosen_rewards, rejected_rewards = cpo.CPOTrainer.cpo_loss(cpo_self("simpo", 2.0, 0.2, 0.4),
                                                                       chosen / n_chosen, rejected / n_rejected)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-12)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), rel=1e-12)


def test_orpo_matches_trl_odds_ratio_loss():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    (chosen, rejected, _, _), (n_chosen, n_rejected) = random_pairs()
    chosen, rejected = chosen.float(), rejected.float()  # TRL's odds_ratio_loss computes in float32
    ours, _, metrics = orpo_odds_loss(chosen, rejected, n_chosen, n_rejected, beta=0.3)
    fake = types.SimpleNamespace(beta=0.3, accelerator=types.SimpleNamespace(device="cpu"))
    theirs, chosen_rewards, _, log_odds_ratio, log_odds_chosen = orpo.ORPOTrainer.odds_ratio_loss(
        fake, chosen / n_chosen, rejected / n_rejected)
    torch.testing.assert_close(ours, -theirs, rtol=1e-6, atol=0)  # TRL's loss is nll - mean(theirs)
    assert metrics["log_odds_ratio"] == pytest.approx(log_odds_ratio.item(), rel=1e-6)
    assert metrics["log_odds_chosen"] == pytest.approx(log_odds_chosen.item(), rel=1e-6)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# KTO: unpaired rows, the reference point from mismatched rows, and KTOTrainer as the oracle

# four unpaired rows (TRL's prompt / completion / label): desirable ones and undesirable ones, of different lengths
KTO_PROMPTS, KTO_COMPLETIONS = [[1, 3, 4], [8, 9], [20, 21, 22, 23], [5, 6]], [[5, 6, 2], [10, 2], [30, 31, 2], [7, 2]]
KTO_LABELS = [True, False, True, False]
KTO_SETTINGS = dict(beta=0.3, desirable_weight=1.3, undesirable_weight=0.7)


def kto_rows(rows=slice(None)):
    return kto_batch(KTO_PROMPTS[rows], KTO_COMPLETIONS[rows], pad_id=0), torch.tensor(KTO_LABELS[rows])


def kto_reference_point(model, reference):
    return kto_kl(model, [kto_mismatched_batch(KTO_PROMPTS, KTO_COMPLETIONS, pad_id=0)], reference)


def test_kto_loss_gradient_is_its_derivative():
    (logps, ref_logps, _, _), _ = random_pairs(n=8)
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    logps.requires_grad_(True)
    for kl in (0.0, 0.8):
        losses, dlogps, metrics = kto_loss(logps, ref_logps, desirable, kl, **KTO_SETTINGS)
        losses.sum().backward()
        torch.testing.assert_close(dlogps.detach(), logps.grad, rtol=1e-12, atol=1e-15)
        logps.grad = None
    h = (logps - ref_logps).detach()
    assert metrics["rewards/chosen"] == pytest.approx(0.3 * h[desirable].mean().item())
    assert metrics["rewards/margins"] == pytest.approx(0.3 * (h[desirable].mean() - h[~desirable].mean()).item())
    # by hand, one row each way: z = beta (h - kl) for a desirable row, beta (kl - h) for an undesirable one
    t = torch.tensor
    losses, d, _ = kto_loss(t([-2.0, -2.0]), t([-3.0, -3.0]), t([True, False]), 0.5, beta=0.2, desirable_weight=2.0)
    s = 1 / (1 + math.exp(-0.1))  # sigmoid(0.2 * (1 - 0.5))
    assert losses.tolist() == pytest.approx([2 * (1 - s), 1 - (1 - s)])
    assert d.tolist() == pytest.approx([-2 * 0.2 * s * (1 - s), 0.2 * s * (1 - s)])


@pytest.mark.parametrize("family, lora", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)])
def test_kto_step_gradients_match_autograd(family, lora):
    model, reference = make_policy(family, lora)
    batch, desirable = kto_rows()
    kl = 0.4  # a reference point away from 0 (kto_kl's own tests are below): it is a constant of the gradient
    torch.manual_seed(5)
    loss, metrics = kto_step(model, batch, desirable, kl, **KTO_SETTINGS, reference=reference)
    ours = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    ref = reference_logprobs(model, batch, reference)
    policy = sequence_logprobs(model, batch)
    losses, _, _ = kto_loss(policy.sums, ref.sums, desirable, kl, **KTO_SETTINGS)
    ref_loss = losses.mean()
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-12)
    assert_grads_close(ours, trainable_grads(model))
    assert set(metrics) == {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}


def test_kto_micro_batches_add_up():
    """Rows 0-1 and rows 2-3 as two micro-batches, each divided by the step's 4 rows, with the step's reference point."""
    big, reference = make_policy("llama", dropout=False)
    small = copy.deepcopy(big)
    kl = 0.4
    loss_big, _ = kto_step(big, *kto_rows(), kl, **KTO_SETTINGS, reference=reference)
    loss_small = sum(kto_step(small, *kto_rows(part), kl, **KTO_SETTINGS, reference=reference, num_rows=4)[0]
                     for part in (slice(0, 2), slice(2, 4)))
    assert loss_small == pytest.approx(loss_big, rel=1e-12)
    assert_grads_close(trainable_grads(small), trainable_grads(big), tol=1e-12)


def test_kto_reference_point():
    """Mismatched rows are the batch's prompts with the completions rotated by one (TRL's); the reference point is their
    mean log-ratio, clamped at 0; the policy as its own reference gives 0 exactly."""
    batch = kto_mismatched_batch(KTO_PROMPTS, KTO_COMPLETIONS, pad_id=0)
    assert batch["input_ids"][0].tolist()[:5] == [1, 3, 4, 7, 2] and batch["input_ids"][1].tolist()[:5] == [8, 9, 5, 6, 2]
    model, reference = make_policy("llama")
    diff = reference_logprobs(model, batch, model).sums - reference_logprobs(model, batch, reference).sums
    assert kto_kl(model, [batch], reference) == pytest.approx(max(diff.mean().item(), 0.0), rel=1e-12)
    assert kto_kl(model, [batch], model) == 0.0
    halves = [kto_batch(KTO_PROMPTS[p], [KTO_COMPLETIONS[i - 1] for i in range(4)][p], 0) for p in (slice(0, 1), slice(1, 4))]
    assert kto_kl(model, halves, reference) == pytest.approx(kto_kl(model, [batch], reference), rel=1e-12)

    class OtherProcessHolds:  # distributed.Distributed's two calls, as rank 0 sees them when rank 1 has the 3 other rows
        def total(self, value):
            other = reference_logprobs(model, halves[1], model).sums - reference_logprobs(model, halves[1], reference).sums
            return float(value) + float(other.sum())

        def count(self, rows):
            return rows + 3
    one_row = kto_kl(model, halves[:1], reference)
    assert kto_kl(model, halves[:1], reference, OtherProcessHolds()) == pytest.approx(kto_kl(model, [batch], reference),
                                                                                      rel=1e-12)
    # not the mean of the two processes' means (TRL's gather), which weighs rank 0's one row as much as 3
    assert abs(kto_kl(model, [batch], reference) - (one_row + kto_kl(model, halves[1:], reference)) / 2) > 1e-3


def test_kto_refusals():
    model, reference = make_policy("llama")
    batch, desirable = kto_rows()
    for kwargs, words in [(dict(beta=0), "beta=0"), (dict(desirable_weight=-1), "desirable_weight=-1")]:
        with pytest.raises(MiniftError, match=words):
            kto_step(model, batch, desirable, 0.0, reference=reference, **kwargs)
    with pytest.raises(MiniftError, match="3 labels for 4 rows|\\(3,\\) labels for 4 rows"):
        kto_step(model, batch, desirable[:3], 0.0, reference=reference)
    with pytest.raises(MiniftError, match="no completion token"):
        kto_step(model, kto_batch([[1, 2]], [[]], 0), [True], 0.0, reference=reference)


def kto_trainer(trl_setup, model, ref_model, peft_config=None):
    from trl import KTOConfig, KTOTrainer
    import datasets
    data = datasets.Dataset.from_dict({"prompt": ["w3 w4", "w5"], "completion": [" w5", " w6"], "label": [True, False]})
    args = KTOConfig(output_dir=str(trl_setup.folder / "kto"), **KTO_SETTINGS, per_device_train_batch_size=4,
                     max_length=None, report_to=[], use_cpu=True)
    return KTOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data,
                      processing_class=trl_setup.tokenizer, peft_config=peft_config)


def kto_trl_inputs():
    """TRL's collated rows, with the KL completions its _prepare_dataset makes: rotated by one within the batch."""
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference
    kl = KTO_COMPLETIONS[-1:] + KTO_COMPLETIONS[:-1]  # its add_kl_completion_ids: [ids[-1]] + ids[:-1]
    return DataCollatorForUnpairedPreference(pad_token_id=0)(
        [{"prompt_ids": p, "completion_ids": c, "KL_completion_ids": k, "label": y}
         for p, c, k, y in zip(KTO_PROMPTS, KTO_COMPLETIONS, kl, KTO_LABELS)])


def kto_trl_loss(trainer):
    trainer._metrics["train"].clear()
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, kto_trl_inputs())
    loss.backward()
    return loss.item(), {k: v[0] for k, v in trainer._metrics["train"].items()}


KTO_METRICS = ["kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"]


def test_kto_batches_are_trls(trl_setup):
    inputs = kto_trl_inputs()
    ours, mismatched = kto_rows()[0], kto_mismatched_batch(KTO_PROMPTS, KTO_COMPLETIONS, pad_id=0)
    for prefix, batch in (("", ours), ("KL_", mismatched)):
        assert torch.equal(batch["input_ids"], inputs[prefix + "input_ids"])
        assert torch.equal(batch["attention_mask"], inputs[prefix + "attention_mask"])
        assert torch.equal(batch["labels"], inputs[prefix + "input_ids"].masked_fill(inputs[prefix + "completion_mask"] == 0,
                                                                                        -100))


@pytest.mark.parametrize("policy, ref", [("policy", "ref"), ("ref", "policy")])
def test_kto_trainer_full_fine_tuning(trl_setup, monkeypatch, policy, ref):
    """TRL's KTOTrainer (frozen reference model) and kto_step: loss, TRL's metrics and every weight's gradient. With the
    two models one way the mismatched rows' mean log-ratio is below 0 (the reference point clamped to 0), the other way
    above (in play)."""
    import trl.trainer.utils
    monkeypatch.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", types.SimpleNamespace(apply=exact_logprob_head))
    trainer = kto_trainer(trl_setup, copy.deepcopy(getattr(trl_setup, policy)), copy.deepcopy(getattr(trl_setup, ref)))
    loss, metrics = kto_trl_loss(trainer)
    model, reference = trl_setup.ours(policy).train(), frozen_copy(trl_setup.ours(ref))
    kl = kto_reference_point(model, reference)
    our_loss, our_metrics = kto_step(model, *kto_rows(), kl, **KTO_SETTINGS, reference=reference)
    assert (metrics["kl"] == 0) if policy == "policy" else (metrics["kl"] > 0.01)
    assert our_loss == pytest.approx(loss, rel=HF_TOL)
    for name in KTO_METRICS:
        assert our_metrics[name] == pytest.approx(metrics[name], rel=HF_TOL, abs=HF_TOL), name
    hf_grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    assert_grads_close(trainable_grads(model), {n: hf_grads[n] for n in trainable_grads(model)}, tol=HF_TOL)


def test_kto_trainer_lora_reference_is_the_adapters_off(trl_setup, monkeypatch):
    """A new peft adapter with trained B under KTOTrainer (reference: the adapters disabled) and the same adapter in
    minift with its adapters switched off: the same loss, metrics and adapter gradients."""
    peft = pytest.importorskip("peft")
    import trl.trainer.utils
    from minift.lora import load_adapter
    monkeypatch.setattr(trl.trainer.utils, "_ChunkedLogProbFunction", types.SimpleNamespace(apply=exact_logprob_head))
    lora = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    trainer = kto_trainer(trl_setup, copy.deepcopy(trl_setup.ref), None, peft_config=lora)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    trainer.model.save_pretrained(trl_setup.folder / "kto_adapter")
    loss, metrics = kto_trl_loss(trainer)
    model = trl_setup.ours("ref")
    load_adapter(model, trl_setup.folder / "kto_adapter")
    model.double().train()
    our_loss, our_metrics = kto_step(model, *kto_rows(), kto_reference_point(model, None), **KTO_SETTINGS)
    assert our_loss == pytest.approx(loss, rel=HF_TOL)
    for name in KTO_METRICS:
        assert our_metrics[name] == pytest.approx(metrics[name], rel=HF_TOL, abs=HF_TOL), name
    hf_grads = {n.replace("base_model.model.", "").replace(".default.weight", ""): p.grad
                for n, p in trainer.model.named_parameters() if p.requires_grad}
    ours = trainable_grads(model)
    assert len(ours) == 12
    assert_grads_close(ours, {n: hf_grads[n] for n in ours}, tol=HF_TOL)
