"""Reinforcement learning with verifiable rewards: GRPO (Shao et al., 2024, DeepSeekMath), as TRL 1.16.0's
GRPOTrainer computes it.

One round: sample G completions for each prompt (`sample_rollouts`), score each with a reward (a checker: is the
answer right?), turn the rewards into advantages relative to the other samples of the same prompt
(`group_advantages`: no value network), then push up the log-probs of the tokens of better-than-average completions
and down those of worse ones (`grpo_loss`), with PPO's clipped ratio against the policy that sampled them and,
optionally, a KL penalty to a reference policy. The log-probs and their backward are preference.py's
`sequence_logprobs`: a rollout batch is prompt + completion with the completion tokens as labels.

The newer variants are switches of the same loss, as TRL names them: GSPO's one ratio per completion
(importance_sampling_level "sequence"), CISPO's clipped, constant weight on the log-prob (loss_type "cispo"); and the
job's (grpo.py) masking of completions cut at max_new_tokens and skipping of groups whose rewards are all equal, each a
weight of 0 on tokens (`token_weights` weighs each token's loss).
"""
from dataclasses import dataclass

import torch

from .batching import pad_rows
from .errors import MiniftError
from .generate import generate
from .preference import sequence_logprobs, sequence_logprobs_backward

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo", "cispo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def group_advantages(rewards, group_size, scale_rewards="group", eps=1e-4):
    """Advantages from rewards (N,) laid out prompt by prompt: rows i*G ... i*G + G-1 are the G samples of prompt i.

        A = (r - mean of its group) / (std + eps)
    with std the group's (scale_rewards "group", TRL's default), the whole batch's ("batch") or no division ("none",
    Dr. GRPO). std is Bessel-corrected (torch.std, as TRL's nanstd) and eps is TRL's 1e-4. A group whose rewards are
    all equal gets advantage 0: it says nothing about which sample is better, so it gives no gradient."""
    rewards = torch.as_tensor(rewards)
    rewards = rewards if rewards.is_floating_point() else rewards.to(torch.get_default_dtype())  # 0/1 rewards too
    if scale_rewards not in SCALE_REWARDS:
        raise MiniftError(f"scale_rewards={scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}")
    if rewards.dim() != 1 or group_size < 2 or len(rewards) % group_size:
        raise MiniftError(f"{tuple(rewards.shape)} rewards in groups of {group_size}: give one reward per sample, "
                          "G >= 2 samples per prompt, prompt by prompt")
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.mean(1, keepdim=True)).view(-1)
    if scale_rewards == "group":
        advantages = advantages / (groups.std(1).repeat_interleave(group_size) + eps)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + eps)
    return advantages


def check_loss_settings(loss_type, beta, epsilon, epsilon_high, max_completion_length, importance_sampling_level="token"):
    if loss_type not in LOSS_TYPES:
        raise MiniftError(f"GRPO loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise MiniftError(f"importance_sampling_level={importance_sampling_level!r} is not one of "
                          f"{', '.join(IMPORTANCE_SAMPLING_LEVELS)} (sequence: GSPO)")
    if not beta >= 0:
        raise MiniftError(f"beta={beta!r}: the KL coefficient must be >= 0 (0 is TRL's default: no reference model)")
    if not (epsilon > 0 and epsilon_high > 0):
        raise MiniftError(f"clip epsilon {epsilon!r} / {epsilon_high!r} must be > 0 (0.2 is usual; DAPO's high is 0.28)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise MiniftError("loss_type 'dr_grpo' divides by max_completion_length: give it (the rollouts' max_new_tokens)")


def clipped_surrogate(logps, old_logps, A, epsilon, epsilon_high):
    """PPO's clipped objective, l = -min(r A, clip(r, 1 - eps, 1 + eps_high) A) with r = exp(logp - old_logp), the
    ratio of the policy to the one that sampled (per token; GSPO passes each completion's mean log-prob per token).
    Since d r / d logp = r: d l / d logp = -A r where r A is the smaller term (inside the clip range both are), and 0
    where the clipped term is (r > 1 + eps_high with A > 0, r < 1 - eps with A < 0: clip(r) is a constant there).
    Returns (l, d l / d logp, low_clipped, high_clipped)."""
    ratio = torch.exp(logps - old_logps)
    loss = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A)
    low_clipped, high_clipped = (ratio < 1 - epsilon) & (A < 0), (ratio > 1 + epsilon_high) & (A > 0)
    return loss, torch.where(low_clipped | high_clipped, 0.0, -A * ratio), low_clipped, high_clipped


def cispo_surrogate(logps, log_ratio, A, epsilon_high):
    """CISPO (MiniMax-M1, 2025): l = -sg(min(r, eps_max)) A logp, the ratio clipped from above and held constant
    (sg: no gradient through it), so every token keeps a gradient, d l / d logp = -min(r, eps_max) A, where PPO's clip
    would zero it (TRL's epsilon_high is eps_max here: 5.0 in ScaleRL). Returns (l, d l / d logp, clipped: r > eps_max
    with A > 0, TRL's cispo_clip_ratio)."""
    weight = torch.clamp(torch.exp(log_ratio), max=epsilon_high).detach()
    return -weight * A * logps, -weight * A, (torch.exp(log_ratio) > epsilon_high) & (A > 0)


def k3_kl(logps, ref_logps):
    """The k3 estimator of KL(policy || reference) per token (Schulman): kl = exp(ref - logp) - (ref - logp) - 1 >= 0.
    d kl / d logp = -exp(ref - logp) + 1. Returns (kl, d kl / d logp)."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1, 1 - torch.exp(diff)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta=0.0, epsilon=0.2, epsilon_high=None, loss_type="dapo",
              num_tokens=None, num_sequences=None, max_completion_length=None, importance_sampling_level="token"):
    """GRPO's loss of a batch of completions, as TRL's GRPOTrainer._compute_loss. Returns (loss, d loss / d logps (B, T),
    metrics: TRL's clip_ratio/low_mean, high_mean, region_mean (cispo: cispo_clip_ratio) and, when beta > 0, kl).

    logps, old_logps (the policy that sampled them; None: this one, ratio 1), ref_logps (None when beta is 0): (B, T)
    per-token log-probs; advantages: (B,) one per completion (or (B, T)); mask (B, T): the completion's tokens that
    count (0 on a completion masked out whole). The ratio r: per token, exp(logp - old_logp), or with
    importance_sampling_level "sequence" (GSPO, Zheng et al. 2025) one per completion, exp(mean over its tokens of
    logp - old_logp), the geometric mean of its tokens' ratios. Per token l = the surrogate (clipped_surrogate, or
    CISPO's) + beta * k3_kl, and the loss is sum over tokens of w * l, w from token_weights (TRL's loss_type).

    The gradient: per token, w * d l / d logp. GSPO's ratio depends on every token of its completion: a token's
    log-prob moves log r by 1 / n, so each of the completion's tokens gets (sum over its tokens of w * d l / d log r) / n.
    num_sequences is the step's number of completions (default: this batch's), num_tokens its tokens, so micro-batches
    add up."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    check_loss_settings(loss_type, beta, epsilon, epsilon_high, max_completion_length, importance_sampling_level)
    if beta != 0 and ref_logps is None:
        raise MiniftError(f"beta={beta} needs the reference policy's log-probs (ref_logps); or set beta=0")
    mask = mask.bool()
    old_logps = logps.detach() if old_logps is None else old_logps
    for name, x in (("old_logps", old_logps), ("ref_logps", ref_logps), ("mask", mask)):
        if x is not None and x.shape != logps.shape:
            raise MiniftError(f"{name} of shape {tuple(x.shape)} for logps of shape {tuple(logps.shape)}: compute both "
                              "on the same rollout batch (one number per position)")
    if advantages.shape not in (logps.shape[:1], logps.shape):
        raise MiniftError(f"{tuple(advantages.shape)} advantages for {len(logps)} completions: give one per completion")
    A = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    weights = token_weights(mask, loss_type, num_tokens, num_sequences, max_completion_length).to(logps.dtype)
    now, then, lengths = logps.masked_fill(~mask, 0.0), old_logps.masked_fill(~mask, 0.0), mask.sum(-1, keepdim=True)
    if importance_sampling_level == "sequence":  # GSPO: each completion's mean log-prob per token, (B, 1): one ratio
        lengths = lengths.clamp(min=1)
        now, then = now.sum(-1, keepdim=True) / lengths, then.sum(-1, keepdim=True) / lengths
    if loss_type == "cispo":
        per_token, dlogps, clipped = cispo_surrogate(logps, now - then, A, epsilon_high)
        dlogps = weights * dlogps
        ratio_metrics = {"cispo_clip_ratio": clipped}
    else:
        per_token, dnow, low, high = clipped_surrogate(now, then, A, epsilon, epsilon_high)
        dlogps = weights * dnow
        if importance_sampling_level == "sequence":  # each token moves its completion's mean by 1 / n
            dlogps = dlogps.sum(-1, keepdim=True) * mask / lengths
        ratio_metrics = {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high}
    if beta != 0:
        kl, dkl = k3_kl(logps, ref_logps)
        per_token, dlogps = per_token + beta * kl, dlogps + weights * beta * dkl
    loss = (per_token * weights).sum()  # (a completion's ratio, (B, 1), broadcast over its tokens)

    def masked_mean(x):  # over the tokens, or over the completions for a ratio per completion (TRL's)
        if x.shape[-1] == 1 and mask.shape[-1] != 1:
            return x.to(logps.dtype).mean().item()
        return (x.to(logps.dtype) * mask).sum().item() / max(int(mask.sum()), 1)

    metrics = {name: masked_mean(x) for name, x in ratio_metrics.items()}
    if beta != 0:
        metrics["kl"] = masked_mean(kl.detach())
    return loss, dlogps.masked_fill(~mask, 0.0), metrics


def token_weights(mask, loss_type, num_tokens=None, num_sequences=None, max_completion_length=None):
    """The weight of each token's loss in the batch's loss (0 off the mask: masked-out completions too):
        "grpo":    each completion's mean over its tokens, then the mean over completions: w = 1 / (n_i * num_sequences)
        "dapo", "cispo": the mean over every token of the step: w = 1 / num_tokens (the whole step's count; default
                   this batch's)
        "bnpo":    the mean over this batch's tokens (TRL's bnpo, local: micro-batches of a step do not add up exactly)
        "dr_grpo": w = 1 / (num_sequences * max_completion_length), a constant (Dr. GRPO: no length bias)"""
    mask = mask.to(torch.float64)
    num_sequences = num_sequences or len(mask)
    if loss_type == "grpo":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * num_sequences)
    if loss_type in ("dapo", "cispo"):
        return mask / (num_tokens or mask.sum().clamp(min=1))
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1)
    return mask / (num_sequences * max_completion_length)


# ---------------------------------------------------------------------------------------------------------
# Rollouts: G samples per prompt, in one batched generate


@dataclass
class Rollouts:
    """prompt_ids/prompt_mask (N, P) left-padded; completion_ids/completion_mask (N, C): the sampled tokens, the mask
    1 up to and including the first EOS (0 after it: generate pads finished rows with EOS). N = prompts x G, prompt by
    prompt (rows i*G ... i*G + G-1 are prompt i's, as group_advantages expects). texts: the decoded completions."""
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    group_size: int
    texts: list = None

    def batch(self):
        """The training batch: prompt + completion, the completion's tokens as labels (-100 on prompt and after EOS)."""
        ids = torch.cat([self.prompt_ids, self.completion_ids], dim=1)
        mask = torch.cat([self.prompt_mask, self.completion_mask], dim=1)
        labels = torch.cat([torch.full_like(self.prompt_ids, -100),
                            self.completion_ids.masked_fill(self.completion_mask == 0, -100)], dim=1)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def completion_mask(completion_ids, eos_ids):
    """1 up to and including each row's first EOS (every token if it has none), 0 after: TRL's completion mask."""
    is_eos = torch.isin(completion_ids, torch.as_tensor(eos_ids, device=completion_ids.device))
    C = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), C)
    return (torch.arange(C, device=completion_ids.device) <= first_eos[:, None]).long()


def truncated(rollouts, eos_ids):
    """(N,) True where a completion never said EOS: cut at max_new_tokens (TRL's is_truncated)."""
    eos = torch.as_tensor(eos_ids, device=rollouts.completion_ids.device).reshape(-1)
    return ~torch.isin(rollouts.completion_ids, eos).any(1)


def sample_rollouts(model, tokenizer, prompts, group_size, max_new_tokens=64, temperature=1.0, top_p=None, top_k=None,
                    generator=None, eos_token_id=None):
    """Sample `group_size` completions for each prompt, all prompts x G rows in one left-padded generate() that reads
    each prompt once (num_samples: the G samples share its keys and values).

    prompts: texts (encoded by `tokenizer`; apply a chat template first if the model wants one) or lists of token ids
    (then tokenizer may be None). `generator` (a torch.Generator) makes the sampling reproducible. Returns Rollouts."""
    if group_size < 1 or not prompts:
        raise MiniftError(f"{len(prompts)} prompts x {group_size} samples: give at least one prompt and G >= 1 (GRPO needs"
                          " G >= 2 to compare samples)")
    if tokenizer is None and any(isinstance(p, str) for p in prompts):
        raise MiniftError("text prompts need a tokenizer: pass one, or give the prompts as lists of token ids")
    encoded = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    pad_id = getattr(tokenizer, "pad_id", None)
    pad_id = pad_id if pad_id is not None else (model.config.pad_token_id or 0)
    ids, mask = pad_rows(encoded, pad_id, "left", next(model.parameters()).device)
    out = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   attention_mask=mask, eos_token_id=eos_token_id, generator=generator, num_samples=group_size)
    prompt_ids, prompt_mask = ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    completion_ids = out[:, prompt_ids.shape[1]:]
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = [] if eos is None else eos if isinstance(eos, (list, tuple)) else [eos]
    mask = completion_mask(completion_ids, eos)
    texts = None if tokenizer is None else [tokenizer.decode(ids[m.bool()]) for ids, m in zip(completion_ids, mask)]
    return Rollouts(prompt_ids, prompt_mask, completion_ids, mask, group_size, texts)


def grpo_step(model, batch, advantages, old_logps=None, ref_logps=None, num_tokens=None, num_sequences=None, **settings):
    """One forward and hand-written backward of grpo_loss over a rollout batch (Rollouts.batch()); fills .grad, no
    optimizer step. old_logps / ref_logps: preference.logprobs_without_grad of the sampling policy and
    preference.reference_logprobs (SequenceLogprobs or their `tokens`) on this same batch. Returns (loss, metrics)."""
    old_logps, ref_logps = getattr(old_logps, "tokens", old_logps), getattr(ref_logps, "tokens", ref_logps)
    with torch.no_grad():
        logps = sequence_logprobs(model, batch)
        advantages = torch.as_tensor(advantages, dtype=logps.tokens.dtype, device=logps.tokens.device)
        loss, dlogps, metrics = grpo_loss(logps.tokens, old_logps, ref_logps, advantages, logps.mask,
                                          num_tokens=num_tokens, num_sequences=num_sequences, **settings)
        sequence_logprobs_backward(model, logps, dlogps)
    return loss.item(), metrics
