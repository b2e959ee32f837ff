"""GRPO (minift/rl.py): group advantages by hand and against TRL's formula, the loss, its per-token gradient and its
metrics against TRL's own GRPOTrainer._compute_loss (every loss_type with CISPO, token and sequence (GSPO) ratios,
beta 0 and not, clipping on both sides, a completion masked out whole), the gradient through the model against
autograd (Llama and GPT-2, full fine-tuning and LoRA, dropout on), micro-batches that add up, a group of equal rewards
giving exactly no gradient, and sample_rollouts (seeded, masks stop after EOS). TRL is the oracle only (importorskip)."""
import copy
import types
from collections import defaultdict

import pytest
import torch

from minift.checkpoints import build_model
from minift.errors import MiniftError
from minift.lora import add_lora, lora_layers
from minift.preference import frozen_copy, logprobs_without_grad, reference_logprobs, sequence_logprobs
from minift.rl import LOSS_TYPES, completion_mask, group_advantages, grpo_loss, grpo_step, sample_rollouts
from test_preference import CONFIGS, NO_DROPOUT, assert_grads_close, trainable_grads

TOL = 1e-10


# ---------------------------------------------------------------------------------------------------------
# Advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two prompts, G = 4; the second's all equal
    std = (1 / 3) ** 0.5  # Bessel: sum of squares 4 * 0.25 over G - 1 = 3
    a = group_advantages(rewards, 4)
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (std + 1e-4))
    assert a[4:].abs().max() == 0  # equal rewards: no advantage at all
    torch.testing.assert_close(group_advantages(rewards, 4, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    torch.testing.assert_close(group_advantages(rewards, 4, "batch"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (rewards.std() + 1e-4))
    assert group_advantages([1, 1, 0, 0], 2).tolist() == [0.0, 0.0, 0.0, 0.0]  # 0/1 rewards as a list; equal groups
    assert group_advantages([1, 0], 2).dtype == torch.get_default_dtype()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trls_formula(scale):
    """TRL's _generate_and_score_completions, transcribed (its advantage code is inline there), with its own nanstd."""
    nanstd = pytest.importorskip("trl.trainer.utils").nanstd
    G = 4
    rewards = torch.randn(12, dtype=torch.float64)
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    trl = rewards - mean
    if scale != "none":
        trl = trl / (std + 1e-4)
    # nanstd's Bessel factor count / (count - 1) divides integer tensors: float32, so 1.5e-8 apart
    torch.testing.assert_close(group_advantages(rewards, G, scale), trl, rtol=1e-7, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# The loss against TRL's GRPOTrainer._compute_loss, called on a stand-in for its trainer


class TRLStandIn:
    """What GRPOTrainer._compute_loss reads from its trainer: the settings, and the policy's per-token log-probs
    (which it would get from its model) given directly. No vLLM, no entropy masking or bonus, token-level ratios."""

    def __init__(self, logps, beta, loss_type, epsilon, epsilon_high, max_completion_length, level="token"):
        self.logps, self.beta, self.loss_type = logps, beta, loss_type
        self.epsilon_low, self.epsilon_high, self.max_completion_length = epsilon, epsilon_high, max_completion_length
        self.top_entropy_quantile, self.off_policy_mask_threshold, self.importance_sampling_level = 1.0, None, level
        self.args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
        self.use_vllm, self.vllm_importance_sampling_correction = False, False
        self.model, self.current_gradient_accumulation_steps = types.SimpleNamespace(training=True), 1
        self._entropy_bonus_enabled, self.aux_loss_enabled = False, False
        self._metrics = {"train": defaultdict(list)}
        self.accelerator = types.SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t)

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self.logps, torch.zeros_like(self.logps), None


def fixed_completions(B=6, T=7, seed=0):
    """Per-token log-probs of the policy, the sampling policy (moved, so that ratios leave [0.8, 1.28] both ways, per
    token and, by a shift per completion, per completion too) and the reference, a completion mask of different
    lengths, and advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    shift = torch.tensor([-0.5, 0.1, 0.0, 0.5, 0.2, -0.1], dtype=torch.float64)[:, None]  # old = logps - log ratio
    old = logps + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64) + shift
    ref = logps + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.arange(T) < torch.tensor([7, 3, 5, 1, 6, 4])[:, None]).long()
    advantages = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9, -0.3], dtype=torch.float64)
    return logps, old, ref, mask, advantages


@pytest.mark.parametrize("masked_row", [False, True])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_matches_trl(loss_type, beta, level, masked_row):
    """Every loss_type (cispo with eps_max 1.2, so that some ratios pass it), token and sequence (GSPO) ratios, and a
    completion masked out whole (mask_truncated_completions' zeros): TRL's loss, per-token gradient and figures."""
    trl = pytest.importorskip("trl")
    logps, old, ref, mask, advantages = fixed_completions()
    if masked_row:
        mask[2] = 0
    B, T = mask.shape
    high = 1.2 if loss_type == "cispo" else 0.28
    theirs_logps = logps.clone().requires_grad_(True)
    stand_in = TRLStandIn(theirs_logps, beta, loss_type, 0.2, high, T, level)
    inputs = dict(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask, advantages=advantages,
                  old_per_token_logps=old, ref_per_token_logps=ref, num_items_in_batch=mask.sum())
    trl_loss = trl.GRPOTrainer._compute_loss(stand_in, None, inputs)
    trl_loss.backward()
    metrics = {k: v[0] for k, v in stand_in._metrics["train"].items()}
    loss, dlogps, ours = grpo_loss(logps, old, ref if beta else None, advantages, mask, beta=beta, epsilon=0.2,
                                   epsilon_high=high, loss_type=loss_type, max_completion_length=T,
                                   importance_sampling_level=level)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-12)
    torch.testing.assert_close(dlogps, theirs_logps.grad, rtol=1e-12, atol=1e-15)
    if loss_type == "cispo":
        assert ours.keys() - {"kl"} == {"cispo_clip_ratio"}
        assert 0 < ours["cispo_clip_ratio"] == pytest.approx(metrics["cispo_clip_ratio"], rel=1e-6)
    else:
        for name in ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]:
            assert ours[name] == pytest.approx(metrics[name], rel=1e-6), name  # TRL counts in float32
        assert ours["clip_ratio/low_mean"] > 0 and ours["clip_ratio/high_mean"] > 0  # both sides clipped somewhere
    if masked_row:
        assert dlogps[2].abs().max() == 0  # a completion masked out whole gets no gradient
    if beta:
        assert ours["kl"] == pytest.approx(metrics["kl"], rel=1e-12)
    else:
        assert "kl" not in ours and "kl" not in metrics


def test_without_old_logps_the_ratio_is_one():
    """TRL's on-policy case (num_iterations 1): old = this policy's, detached; then d l / d logp = -A on every token."""
    logps, _, _, mask, advantages = fixed_completions()
    _, dlogps, metrics = grpo_loss(logps, None, None, advantages, mask, loss_type="dapo")
    torch.testing.assert_close(dlogps, -advantages[:, None] * mask / mask.sum())
    assert metrics["clip_ratio/region_mean"] == 0


def test_the_clip_and_the_kl_are_in_the_gradient():
    """Mutation checks: the gradient with the clipped tokens' zeros put back, or with beta's KL term dropped, differs."""
    logps, old, ref, mask, advantages = fixed_completions()
    _, clipped, _ = grpo_loss(logps, old, None, advantages, mask)
    _, unclipped, _ = grpo_loss(logps, old, None, advantages, mask, epsilon=100.0, epsilon_high=100.0)
    assert (clipped == 0).sum() > (mask == 0).sum() and not torch.allclose(clipped, unclipped)
    _, with_kl, _ = grpo_loss(logps, old, ref, advantages, mask, beta=0.5)
    torch.testing.assert_close(with_kl - clipped, 0.5 * (1 - torch.exp(ref - logps)) * mask / mask.sum())


# ---------------------------------------------------------------------------------------------------------
# Through the model


def rollout_batch(vocab=50):
    """4 completions (two prompts x G = 2): prompts left-padded, completions of different lengths ending in EOS (2)."""
    ids = torch.tensor([[0, 5, 6, 7, 8, 2, 0], [0, 5, 6, 9, 2, 2, 2], [11, 12, 13, 14, 15, 16, 2], [11, 12, 13, 17, 2, 2, 2]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompts: 3 positions
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_policy(family, lora, dropout=True):
    torch.manual_seed(0)
    model = build_model({**CONFIGS[family], **({} if dropout else NO_DROPOUT[family])}, "lm").double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    reference = None if lora else frozen_copy(model)
    if lora:
        add_lora(model, "all-linear", r=2, alpha=4, dropout=0.1 if dropout else 0.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
        if not lora:
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model.train(), reference


@pytest.mark.parametrize("loss_type, level", [("grpo", "token"), ("dapo", "token"), ("dapo", "sequence"),
                                              ("cispo", "token"), ("cispo", "sequence")])
@pytest.mark.parametrize("family, lora", [("llama", False), ("llama", True), ("gpt2", False), ("gpt2", True)])
def test_grpo_step_gradients_match_autograd(family, lora, loss_type, level):
    model, reference = make_policy(family, lora)
    batch = rollout_batch()
    old = logprobs_without_grad(model, batch).tokens + 0.3 * torch.randn(batch["input_ids"].shape, dtype=torch.float64)
    ref = reference_logprobs(model, batch, reference).tokens
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    settings = dict(beta=0.1, epsilon=0.2, epsilon_high=1.2 if loss_type == "cispo" else 0.28, loss_type=loss_type,
                    importance_sampling_level=level)
    torch.manual_seed(5)
    loss, metrics = grpo_step(model, batch, advantages, old, ref, **settings)
    ours = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    lp = sequence_logprobs(model, batch)
    ref_loss, _, _ = grpo_loss(lp.tokens, old, ref, advantages, lp.mask, **settings)
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-12)
    assert_grads_close(ours, trainable_grads(model))
    assert metrics["kl"] > 0 and (level == "sequence" or loss_type == "cispo" or metrics["clip_ratio/region_mean"] > 0)


@pytest.mark.parametrize("loss_type, level", [("grpo", "token"), ("dapo", "token"), ("dr_grpo", "token"),
                                              ("cispo", "token"), ("dapo", "sequence")])
def test_micro_batches_add_up(loss_type, level):
    big, reference = make_policy("llama", lora=False, dropout=False)
    small = copy.deepcopy(big)
    batch = rollout_batch()
    old = logprobs_without_grad(big, batch).tokens + 0.3 * torch.randn(batch["input_ids"].shape, dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    settings = dict(loss_type=loss_type, max_completion_length=4, importance_sampling_level=level, epsilon_high=1.2)
    num_tokens = int(sequence_logprobs(big.eval(), batch).mask.sum())
    big.train()
    loss_big, _ = grpo_step(big, batch, advantages, old, **settings)
    loss_small = 0.0
    for rows in (slice(0, 1), slice(1, 4)):
        part = {k: v[rows] for k, v in batch.items()}
        loss_small += grpo_step(small, part, advantages[rows], old[rows], num_tokens=num_tokens, num_sequences=4,
                                **settings)[0]
    assert loss_small == pytest.approx(loss_big, rel=1e-12)
    assert_grads_close(trainable_grads(small), trainable_grads(big), tol=1e-12)


@pytest.mark.parametrize("lora", [False, True])
def test_a_group_of_equal_rewards_gives_no_gradient(lora):
    """The "GRPO loss is flat" question: every sample of a prompt scored the same -> advantages 0 -> loss 0 and every
    gradient exactly 0 (beta 0): nothing to learn from that prompt. With beta > 0 only the KL pull remains."""
    model, reference = make_policy("llama", lora)
    batch = rollout_batch()
    advantages = group_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), 2).double()
    assert advantages.abs().max() == 0
    loss, _ = grpo_step(model, batch, advantages, logprobs_without_grad(model, batch).tokens)
    assert loss == 0
    assert all(g.abs().max() == 0 for g in trainable_grads(model).values())
    model.zero_grad(set_to_none=True)
    grpo_step(model, batch, advantages, None, reference_logprobs(model, batch, reference).tokens, beta=0.1)
    assert any(g.abs().max() > 0 for g in trainable_grads(model).values())


# ---------------------------------------------------------------------------------------------------------
# Rollouts


def tiny_sampler():
    """A tiny Llama over 8 tokens, EOS = 2: likely enough that some samples end early and some do not."""
    torch.manual_seed(0)
    config = {**CONFIGS["llama"], "vocab_size": 8, "eos_token_id": 2, "pad_token_id": 0}
    return build_model(config, "lm").eval()


def test_completion_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 4], [2, 2, 2, 2], [5, 6, 2, 2]])
    assert completion_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert completion_mask(ids, [7, 2]).tolist()[1] == [1, 1, 1, 0]  # several EOS ids


def test_sample_rollouts_is_seeded_and_masks_stop_after_eos():
    model = tiny_sampler()
    prompts = [[3, 4, 5], [6, 7]]

    def sample(seed):
        return sample_rollouts(model, None, prompts, group_size=4, max_new_tokens=10, temperature=1.0, top_p=0.95,
                               generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.completion_mask, b.completion_mask)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert a.prompt_ids.tolist() == [[3, 4, 5]] * 4 + [[0, 6, 7]] * 4  # prompt by prompt, left-padded
    assert a.prompt_mask.tolist() == [[1, 1, 1]] * 4 + [[0, 1, 1]] * 4
    ended = 0
    for ids, mask in zip(a.completion_ids.tolist(), a.completion_mask.tolist()):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n)  # one run of 1s from the start
        if 2 in ids:
            ended += 1
            assert ids.index(2) == n - 1 and all(t == 2 for t in ids[n:])  # up to and including EOS; EOS pads after
        else:
            assert n == len(ids) == 10  # no EOS: every sampled token, up to max_new_tokens
    assert 0 < ended < 8  # both kinds of rows were seen
    batch = a.batch()
    assert batch["labels"][:, :3].eq(-100).all()
    assert torch.equal(batch["labels"][:, 3:].ne(-100), a.completion_mask.bool())
    lp = sequence_logprobs(model, batch)
    assert lp.counts.tolist() == a.completion_mask.sum(1).tolist()  # every completion token is a target


def test_sample_rollouts_with_a_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    from minift.tokenizer import Tokenizer
    words = {"[PAD]": 0, "a": 1, "</s>": 2, "b": 3, "c": 4, "d": 5, "e": 6, "f": 7}
    hf = HFTokenizer(models.WordLevel(words, unk_token="[PAD]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = Tokenizer(hf, {"eos_token": "</s>", "pad_token": "[PAD]"})
    rollouts = sample_rollouts(tiny_sampler(), tok, ["b c d", "e"], group_size=2, max_new_tokens=6,
                               generator=torch.Generator().manual_seed(0))
    assert rollouts.prompt_ids.tolist()[2] == [0, 0, 6] and len(rollouts.texts) == 4
    for text, ids, mask in zip(rollouts.texts, rollouts.completion_ids, rollouts.completion_mask):
        assert text == tok.decode(ids[mask.bool()])


def test_refusals():
    logps, old, ref, mask, advantages = fixed_completions()
    for kwargs, words in [(dict(loss_type="ppo"), "is not one of grpo"), (dict(beta=-1), "must be >= 0"),
                          (dict(beta=0.1), "needs the reference"), (dict(loss_type="dr_grpo"), "max_completion_length"),
                          (dict(epsilon=0), "must be > 0")]:
        with pytest.raises(MiniftError, match=words):
            grpo_loss(logps, old, None, advantages, mask, **kwargs)
    with pytest.raises(MiniftError, match="scale_rewards='std'"):
        group_advantages([1.0, 0.0], 2, "std")
    with pytest.raises(MiniftError, match="in groups of 4"):
        group_advantages([1.0, 0.0, 1.0], 4)
    with pytest.raises(MiniftError, match="need a tokenizer"):
        sample_rollouts(tiny_sampler(), None, ["hi"], 2)
