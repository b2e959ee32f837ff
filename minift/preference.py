"""Preference tuning: learn from pairs (prompt, chosen answer, rejected answer) instead of from one right answer.

Everything these losses need from the model is the log-probability of a whole completion, log pi(y | x): the sum of
the log-probabilities of its tokens. So this file has two layers:
- `sequence_logprobs` and its backward: per-token log-probs of the supervised tokens (the same shifted labels as
  CausalLM.loss: position t predicts token t+1, -100 is not a target), their sum and count per sequence; given the
  gradient of any loss with respect to them, `sequence_logprobs_backward` turns it into the gradient of the logits,
  dlogits = g * (onehot(y) - softmax(z)), and runs the model's hand-written backward.
- the losses, functions of the sequence log-probs only, each with its gradient derived in its docstring: DPO with
  conservative label smoothing (cDPO), IPO, SimPO and ORPO, as TRL 1.16.0 writes them (DPOTrainer._compute_loss,
  experimental CPOTrainer.cpo_loss and ORPOTrainer.odds_ratio_loss), with TRL's metric names; and KTO
  (KTOTrainer._compute_loss), which needs no pairs: each completion is labelled desirable or not on its own.

`dpo_step` puts them together: one forward of the chosen and rejected rows concatenated (TRL's concatenated
forward), the reference policy's log-probs without gradient (under LoRA the same model with its adapters off, for
full fine-tuning a frozen copy), the loss summed over the pairs and divided by the pairs of the whole optimizer step
(so micro-batches add up to the big batch, as step.py divides by the step's target count), and the backward.
`kto_step` does the same for unpaired rows, with KTO's reference point `kto_kl` measured on the batch first.
"""
import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batching import pad_rows
from .errors import MiniftError
from .layers import accumulate_grad, fp32_dtype, cast_for_matmul, keeps_for_backward
from .lora import lora_layers

# ---------------------------------------------------------------------------------------------------------
# Sequence log-probabilities, forward and backward


@dataclass
class SequenceLogprobs:
    """What sequence_logprobs returns. tokens (B, T): log p(label[t+1] | tokens <= t) where label[t+1] is a target,
    0 elsewhere; mask (B, T): where there is a target; sums (B,): log p of each sequence's supervised tokens; counts
    (B,): how many there are. `kept` is what the backward needs (None in eval mode or with autograd on)."""
    tokens: torch.Tensor
    mask: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor
    kept: tuple = None


def shifted_targets(labels):
    """Position t's target is label t+1 (the last position has none): CausalLM.loss's shift, without copying logits."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def sequence_logprobs(model, batch):
    """Run the model on `batch` (input_ids, attention_mask, labels, ...) and return its SequenceLogprobs.

    In a training forward (train mode, autograd off) it keeps the log-softmax of the (B, T, V) logits, which the
    backward turns into dlogits in place: the logits and one tensor of their size, as CausalLM.loss holds. With the
    chunked head (TrainConfig.chunked_loss) it keeps the hidden states instead and the logits exist a chunk at a time,
    here and again in the backward. With autograd on, `tokens` and `sums` carry the graph (the tests' reference)."""
    if getattr(model, "task", None) != "lm":
        raise MiniftError("sequence log-probabilities need a language model (task 'lm'): load it with task='lm'")
    if "labels" not in batch:
        raise MiniftError("the batch has no labels: give the completion tokens as labels, -100 on prompt and padding")
    targets = shifted_targets(torch.as_tensor(batch["labels"], device=batch["input_ids"].device))
    mask = targets != -100
    safe = targets.masked_fill(~mask, 0)  # any id works where there is no target: its log-prob is zeroed below
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    if model.head_is_deferred():  # `out` are the hidden states: the head a chunk of positions at a time
        tokens, kept = _chunked_head_logprobs(out, model.head_weight(), safe, mask, model.loss_chunk, model.final_softcap)
    else:
        logprobs = torch.log_softmax(out, dim=-1, dtype=fp32_dtype(out))
        del out  # the logits are not needed again: the softmax is exp(logprobs)
        tokens = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1).masked_fill(~mask, 0.0)
        kept = ("logprobs", logprobs, safe, mask) if keeps_for_backward(model) else None
    return SequenceLogprobs(tokens, mask, tokens.sum(-1), mask.sum(-1), kept)


def sequence_logprobs_backward(model, logprobs, dlogps):
    """The gradient of the loss with respect to the log-probs, back through the softmax and the model into .grad.

    dlogps: (B, T), d loss / d tokens[b, t], or (B,), d loss / d sums[b] (the same for every token of the sequence,
    since d sums / d tokens = 1). For one target y with logits z, log p(y) = z_y - logsumexp(z), so
        d log p(y) / d z_v = onehot(y)_v - softmax(z)_v,   and   dlogits = g * (onehot(y) - softmax(z))
    at each supervised position (g is dlogps there), 0 elsewhere (g = 0: nothing was picked there)."""
    if logprobs.kept is None:
        raise MiniftError("these log-probs kept nothing for a backward: compute them in train mode under torch.no_grad()"
                          " (autograd on: call .backward() on the loss instead), and backward only once")
    kind, *kept = logprobs.kept
    logprobs.kept = None  # a backward uses them up, like every layer's
    mask = kept[-1]
    g = dlogps.unsqueeze(-1).expand(mask.shape) if dlogps.dim() == 1 else dlogps
    if g.shape != mask.shape:
        raise MiniftError(f"dlogps of shape {tuple(dlogps.shape)} for log-probs of shape {tuple(mask.shape)}: give "
                          "one number per sequence or per position")
    g = g.masked_fill(~mask, 0.0)
    if kind == "chunked":
        return model.backward(_chunked_head_backward(model.head_weight(), model.final_softcap, *kept, g))
    full, safe, _ = kept
    g = g.to(full.dtype).unsqueeze(-1)
    dlogits = full.exp_().mul_(-g)  # -g * softmax(z), in place of the log-softmax (no second (B, T, V) tensor)
    dlogits.scatter_add_(-1, safe.unsqueeze(-1), g)  # + g * onehot(y)
    return model.backward(dlogits)


def _capped_logits(hidden, weight, softcap):
    """hidden @ weight.T, then Gemma 2's cap c tanh(z / c) where the model has one (a layers.SoftCap)."""
    logits = hidden @ weight.T
    return logits if softcap is None else torch.tanh(logits / softcap.cap) * softcap.cap


def _chunked_head_logprobs(hidden, weight, safe, mask, chunk, softcap=None):
    """The picked log-probs with logits = hidden @ weight.T made `chunk` positions at a time, chunks with no target
    skipped (heads.chunked_lm_loss's way). Only a training forward defers the head, so it always keeps: the hidden
    states, from which the backward makes each chunk's logits again (one more head matmul, no (B, T, V) tensor)."""
    flat = cast_for_matmul(hidden.reshape(-1, hidden.shape[-1]))
    safe_flat, mask_flat = safe.reshape(-1), mask.reshape(-1)
    tokens = torch.zeros(len(flat), dtype=fp32_dtype(flat), device=flat.device)
    for part in _chunks_with_targets(mask_flat, chunk):
        part_logprobs = torch.log_softmax(_capped_logits(flat[part], weight, softcap), dim=-1, dtype=tokens.dtype)
        tokens[part] = part_logprobs.gather(-1, safe_flat[part, None]).squeeze(-1)
    tokens = tokens.masked_fill(~mask_flat, 0.0).view(mask.shape)
    return tokens, ("chunked", flat, safe_flat, chunk, hidden.shape, mask)


def _chunked_head_backward(weight, softcap, flat, safe_flat, chunk, hidden_shape, mask, g):
    """dlogits = g * (onehot(y) - softmax(z)) a chunk at a time (through a cap: times 1 - tanh^2); dW += dlogits^T h,
    dh = dlogits W. Returns dhidden."""
    g = g.reshape(-1)
    dhidden = torch.zeros_like(flat)
    for part in _chunks_with_targets(mask.reshape(-1), chunk):
        gp = g[part].unsqueeze(-1)
        logits = _capped_logits(flat[part], weight, softcap)
        dlogits = torch.softmax(logits, dim=-1, dtype=fp32_dtype(flat)).mul_(-gp.to(fp32_dtype(flat)))
        dlogits.scatter_add_(-1, safe_flat[part, None], gp.to(dlogits.dtype))
        if softcap is not None:
            dlogits.mul_(1 - (logits / softcap.cap) ** 2)
        dlogits = cast_for_matmul(dlogits)
        if weight.requires_grad:  # a tied head's weight is the embedding: its own backward adds to this later
            accumulate_grad(weight, dlogits.T @ flat[part])
        dhidden[part] = dlogits @ weight
    return dhidden.view(hidden_shape)


def _chunks_with_targets(mask_flat, chunk):
    """The slices of `chunk` positions that hold at least one target."""
    for start in range(0, len(mask_flat), chunk):
        part = slice(start, start + chunk)
        if mask_flat[part].any():
            yield part


# ---------------------------------------------------------------------------------------------------------
# The reference policy: log-probs without gradient, dropout off, nothing kept


def logprobs_without_grad(model, batch):
    """SequenceLogprobs of a forward in eval mode under no_grad (dropout off, nothing kept); the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return sequence_logprobs(model, batch)
    finally:
        model.train(was_training)


@contextlib.contextmanager
def adapters_off(model):
    """The base model's forward, as peft's disable_adapter(): every LoRA layer gives x W^T + b alone. Under LoRA this
    is the reference policy for free (B starts at 0, so the base model is the policy at step 0): no second copy."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise MiniftError("this model has no LoRA adapters to switch off: give a frozen reference copy instead "
                          "(reference=frozen_copy(model))")
    if any(layer.merged for layer in layers):
        raise MiniftError("the adapters are merged into the weights and cannot be switched off: unmerge_lora(model) first")
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def frozen_copy(model):
    """The reference policy of full fine-tuning: a copy of the model as it is now, every weight frozen, in eval mode."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
        p.grad = None
    return reference


def reference_logprobs(model, batch, reference=None):
    """The reference policy's SequenceLogprobs of `batch`: `reference` (a frozen copy) if given, else `model` itself
    with its LoRA adapters off."""
    if reference is not None:
        return logprobs_without_grad(reference, batch)
    with adapters_off(model):
        return logprobs_without_grad(model, batch)


# ---------------------------------------------------------------------------------------------------------
# The losses. Each takes the sequence log-probs (summed over the completion's tokens) of a batch of pairs and returns
# (loss per pair, (d loss / d chosen, d loss / d rejected), metrics); metrics are means over the pairs, named as TRL
# logs them. The sigmoid's two derivatives that all of them use:
#     d/dz -log sigmoid(z) = -sigmoid(-z),        d/dz -log sigmoid(-z) = sigmoid(z).


def reward_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    """TRL's preference metrics: the implicit rewards, how often the chosen one wins, by how much, and the log-probs."""
    return {"rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            "logps/chosen": chosen_logps.mean().item(), "logps/rejected": rejected_logps.mean().item()}


def smoothed_sigmoid_loss(z, label_smoothing):
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the label is flipped with probability eps (cDPO).
    Returns (loss, d loss / dz) with d loss / dz = -(1 - eps) sigmoid(-z) + eps sigmoid(z)."""
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, label_smoothing * torch.sigmoid(z) - (1 - label_smoothing) * torch.sigmoid(-z)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.0):
    """DPO (Rafailov et al., 2023), conservative with label_smoothing eps (cDPO; eps 0 is plain DPO):
        h = (chosen - ref_chosen) - (rejected - ref_rejected),    loss = -(1 - eps) log s(beta h) - eps log s(-beta h)
    with s the sigmoid. By the chain rule, with z = beta h:
        d loss / dh = beta * (-(1 - eps) s(-beta h) + eps s(beta h)),   d / d chosen = d / dh,   d / d rejected = -d / dh.
    TRL 1.16's loss_type "sigmoid" is eps = 0 (its label_smoothing moved to "robust" and "exo_pair"); this smoothed form
    is TRL's older sigmoid DPO and its CPO/SimPO sigmoid. Rewards beta * (logp - ref_logp), as TRL logs them."""
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    losses, dz = smoothed_sigmoid_loss(beta * h, label_smoothing)
    dh = beta * dz
    metrics = reward_metrics(beta * (chosen - ref_chosen), beta * (rejected - ref_rejected), chosen, rejected)
    return losses, (dh, -dh), metrics


def ipo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_counts, rejected_counts, beta=0.1):
    """IPO (Azar et al., 2023, eq. 17), with TRL's length normalisation (the log-ratios averaged per completion token;
    beta is the paper's tau):
        h = (chosen - ref_chosen) / n_chosen - (rejected - ref_rejected) / n_rejected,   loss = (h - 1 / (2 beta))^2
        d loss / dh = 2 (h - 1 / (2 beta)),   d / d chosen = (d loss / dh) / n_chosen,   d / d rejected = -(...) / n_rejected.
    Rewards and logps are logged unnormalised, as TRL does."""
    n_chosen, n_rejected = chosen_counts.clamp(min=1), rejected_counts.clamp(min=1)
    h = (chosen - ref_chosen) / n_chosen - (rejected - ref_rejected) / n_rejected
    losses = (h - 1 / (2 * beta)) ** 2
    dh = 2 * (h - 1 / (2 * beta))
    metrics = reward_metrics(beta * (chosen - ref_chosen), beta * (rejected - ref_rejected), chosen, rejected)
    return losses, (dh / n_chosen, -dh / n_rejected), metrics


def simpo_loss(chosen, rejected, chosen_counts, rejected_counts, beta=2.0, gamma=0.5, label_smoothing=0.0):
    """SimPO (Meng et al., 2024): no reference, the average log-prob per token as the reward, a target margin gamma
    (TRL's CPOTrainer with loss_type "simpo", simpo_gamma = gamma, cpo_alpha 0):
        a = logp / n,   z = beta (a_chosen - a_rejected) - gamma,   loss = -(1 - eps) log s(z) - eps log s(-z)
        d loss / d chosen = beta * (d loss / dz) / n_chosen,   d loss / d rejected = -beta * (d loss / dz) / n_rejected.
    Rewards beta * a and logps a (the averages), as TRL's CPOTrainer logs them."""
    n_chosen, n_rejected = chosen_counts.clamp(min=1), rejected_counts.clamp(min=1)
    avg_chosen, avg_rejected = chosen / n_chosen, rejected / n_rejected
    losses, dz = smoothed_sigmoid_loss(beta * (avg_chosen - avg_rejected) - gamma, label_smoothing)
    metrics = reward_metrics(beta * avg_chosen, beta * avg_rejected, avg_chosen, avg_rejected)
    return losses, (beta * dz / n_chosen, -beta * dz / n_rejected), metrics


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, without cancellation (TRL's and Maechler's branch at -log 2)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_loss(chosen, rejected, chosen_counts, rejected_counts, beta=0.1):
    """ORPO's odds-ratio term (Hong et al., 2024; TRL's ORPOTrainer.odds_ratio_loss), on the average log-probs a:
        log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)),   loss = -beta log s(log_odds)
    (ORPO adds the NLL of the chosen tokens: dpo_step does). Since d/da [a - log(1 - e^a)] = 1 + e^a / (1 - e^a)
    = 1 / (1 - e^a) = -1 / expm1(a):
        d loss / d log_odds = -beta s(-log_odds),
        d loss / d chosen = (d loss / d log_odds) * -1 / expm1(a_c) / n_c,   d / d rejected = (...) * 1 / expm1(a_r) / n_r.
    Rewards beta * a, logps a, and TRL's log_odds_ratio (mean log s(log_odds)) and log_odds_chosen (mean log_odds)."""
    n_chosen, n_rejected = chosen_counts.clamp(min=1), rejected_counts.clamp(min=1)
    avg_chosen, avg_rejected = chosen / n_chosen, rejected / n_rejected
    log_odds = (avg_chosen - avg_rejected) - (log1mexp(avg_chosen) - log1mexp(avg_rejected))
    losses = -beta * F.logsigmoid(log_odds)
    d_odds = -beta * torch.sigmoid(-log_odds)
    d_chosen = d_odds * -1 / torch.expm1(avg_chosen) / n_chosen
    d_rejected = d_odds / torch.expm1(avg_rejected) / n_rejected
    metrics = reward_metrics(beta * avg_chosen, beta * avg_rejected, avg_chosen, avg_rejected)
    metrics.update({"log_odds_ratio": F.logsigmoid(log_odds).mean().item(), "log_odds_chosen": log_odds.mean().item()})
    return losses, (d_chosen, d_rejected), metrics


# ---------------------------------------------------------------------------------------------------------
# A batch of pairs, and one forward/backward over it

LOSS_TYPES = ("sigmoid", "ipo", "simpo", "orpo")
NEEDS_REFERENCE = ("sigmoid", "ipo")  # SimPO and ORPO are reference-free


def preference_batch(prompts, chosen, rejected, pad_id):
    """Token-id lists -> the concatenated batch TRL's DataCollatorForPreference makes: the rows prompt + chosen for
    every pair, then prompt + rejected, right-padded; labels are the completion tokens (-100 on prompt and padding)."""
    if not (len(prompts) == len(chosen) == len(rejected)) or not prompts:
        raise MiniftError(f"{len(prompts)} prompts, {len(chosen)} chosen and {len(rejected)} rejected completions: give "
                          "one chosen and one rejected completion per prompt (at least one pair)")
    rows = [(list(p), list(c)) for p, c in zip(prompts, chosen)] + [(list(p), list(r)) for p, r in zip(prompts, rejected)]
    ids, mask = pad_rows([p + c for p, c in rows], pad_id, "right")
    labels, _ = pad_rows([[-100] * len(p) + c for p, c in rows], -100, "right")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_pairs(batch):
    return len(batch["input_ids"]) // 2


def count_chosen_tokens(batch):
    """The supervised tokens of the chosen rows (ORPO's NLL term divides by the count over the whole step)."""
    return int((shifted_targets(torch.as_tensor(batch["labels"]))[:count_pairs(batch)] != -100).sum())


def check_preference_settings(loss_type, beta, label_smoothing):
    if loss_type not in LOSS_TYPES:
        raise MiniftError(f"preference loss {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise MiniftError(f"beta={beta!r} must be > 0: it scales the log-ratios (0.1 is usual for DPO, 2 for SimPO)")
    if not 0.0 <= label_smoothing < 0.5:
        raise MiniftError(f"label_smoothing={label_smoothing!r} must be in [0, 0.5): the chance a preference label is wrong")


def pair_loss(loss_type, policy, reference, beta, label_smoothing=0.0, simpo_gamma=0.5):
    """The loss `loss_type` of the pairs whose SequenceLogprobs are `policy` (and `reference`): chosen rows first."""
    chosen, rejected = policy.sums.chunk(2)
    n_chosen, n_rejected = policy.counts.chunk(2)
    if loss_type in NEEDS_REFERENCE:
        ref_chosen, ref_rejected = reference.sums.chunk(2)
        if loss_type == "sigmoid":
            return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing)
        return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected, beta)
    if loss_type == "simpo":
        return simpo_loss(chosen, rejected, n_chosen, n_rejected, beta, simpo_gamma, label_smoothing)
    return orpo_odds_loss(chosen, rejected, n_chosen, n_rejected, beta)


def dpo_step(model, batch, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, simpo_gamma=0.5, reference=None,
             num_pairs=None, num_chosen_tokens=None, rpo_alpha=0.0):
    """One forward and hand-written backward over a batch of pairs (preference_batch's layout); fills .grad, takes no
    optimizer step. Returns (loss, metrics).

    The loss is the sum over this batch's pairs divided by `num_pairs`, the pairs of the whole optimizer step (default:
    this batch's), so the micro-batches of a step add up to the loss and gradient of one big batch; ORPO's NLL term is
    divided by `num_chosen_tokens` (the step's chosen tokens) the same way. The reference log-probs (sigmoid, ipo) come
    from `reference` (a frozen copy, full fine-tuning) or, if None, the model with its LoRA adapters off.

    rpo_alpha > 0 adds rpo_alpha x the chosen answers' NLL to any loss (RPO, Pang et al. 2024, "Iterative Reasoning
    Preference Optimization"; TRL's DPOConfig.rpo_alpha before 1.x): DPO alone may lower the chosen answer's
    log-prob as long as the rejected one falls faster, and the probability goes elsewhere (to longer answers, say);
    the NLL term holds the chosen answer up. ORPO's NLL term is the same with weight 1."""
    check_preference_settings(loss_type, beta, label_smoothing)
    if not rpo_alpha >= 0:
        raise MiniftError(f"rpo_alpha={rpo_alpha!r} must be >= 0: the weight of the chosen answers' NLL (RPO uses 1)")
    if len(batch["input_ids"]) % 2:
        raise MiniftError(f"a batch of pairs has an even number of rows (chosen ones, then rejected ones), not "
                          f"{len(batch['input_ids'])}: build it with preference_batch")
    ref = reference_logprobs(model, batch, reference) if loss_type in NEEDS_REFERENCE else None
    with torch.no_grad():
        policy = sequence_logprobs(model, batch)
        if not policy.counts.all():
            raise MiniftError(f"row {int((policy.counts == 0).nonzero()[0])} of the batch has no completion token: "
                              "every chosen and rejected completion needs at least one labelled token")
        losses, (d_chosen, d_rejected), metrics = pair_loss(loss_type, policy, ref, beta, label_smoothing, simpo_gamma)
        num_pairs = num_pairs or count_pairs(batch)
        loss = losses.sum() / num_pairs
        dlogps = torch.cat([d_chosen, d_rejected]) / num_pairs  # one number per sequence: the same for its tokens
        nll_weight = 1.0 if loss_type == "orpo" else rpo_alpha
        if nll_weight:  # + the NLL of the chosen tokens: -sum of their log-probs / their count
            num_chosen_tokens = num_chosen_tokens or count_chosen_tokens(batch)
            nll = -policy.sums.chunk(2)[0].sum() / num_chosen_tokens
            loss = loss + nll_weight * nll
            metrics["nll_loss"] = nll.item()
            is_chosen = (torch.arange(len(dlogps), device=dlogps.device) < count_pairs(batch)).to(dlogps.dtype)
            dlogps = dlogps - nll_weight * is_chosen / num_chosen_tokens  # d nll / d token log-prob, chosen rows only
        sequence_logprobs_backward(model, policy, dlogps)
    return loss.item(), metrics


# ---------------------------------------------------------------------------------------------------------
# KTO: unpaired rows, each completion labelled desirable or undesirable on its own


def kto_loss(logps, ref_logps, desirable, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al., 2024, eq. 7), as TRL 1.16's KTOTrainer computes it. A row is one completion, labelled
    desirable or undesirable, with no partner: its implied reward is the log-ratio h = logp - ref_logp, judged against
    a reference point z0, how far the policy has moved from the reference in general (kto_kl; a constant here):
        desirable:    loss = w_d (1 - s(z)),   z = beta (h - z0)
        undesirable:  loss = w_u (1 - s(z)),   z = beta (z0 - h)
    with s the sigmoid. Since d/dz (1 - s(z)) = -s(z) (1 - s(z)) = -s(z) s(-z), and dz / d logp = +beta or -beta:
        d loss / d logp = -w_d beta s(z) s(-z)  (desirable: its log-prob is pushed up)
                        = +w_u beta s(z) s(-z)  (undesirable: pushed down)
    largest at z = 0 and vanishing for a row already far on its side: a loss that saturates, as prospect theory's
    value function does. logps, ref_logps: (B,) summed completion log-probs; desirable: (B,) booleans. Returns (loss
    per row, d loss / d logps, metrics: TRL's means over this batch's desirable rows (".../chosen") and undesirable ones
    (".../rejected"), where it has any, and the kl it was given)."""
    h = logps - ref_logps
    sign = desirable.to(h.dtype) * 2 - 1  # +1 desirable, -1 undesirable
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(h.dtype)
    z = beta * sign * (h - kl)
    losses = weight * (1 - torch.sigmoid(z))
    dlogps = -weight * beta * sign * torch.sigmoid(z) * torch.sigmoid(-z)
    return losses, dlogps, kto_metrics(beta * h, logps, desirable, kl)


def kto_metrics(rewards, logps, desirable, kl):
    """TRL's KTO figures: rewards (beta h) and log-probs averaged over the desirable and the undesirable rows apart,
    their margin where both are present, and the reference point kl."""
    metrics = {"kl": float(kl)}
    for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
        if rows.any():
            metrics[f"rewards/{name}"], metrics[f"logps/{name}"] = rewards[rows].mean().item(), logps[rows].mean().item()
    if desirable.any() and not desirable.all():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def kto_batch(prompts, completions, pad_id, max_length=None):
    """Token-id lists -> the batch of TRL's DataCollatorForUnpairedPreference: the rows prompt + completion,
    right-padded (each cut to max_length if given), labels the completion's tokens (-100 on prompt and padding)."""
    if len(prompts) != len(completions) or not prompts:
        raise MiniftError(f"{len(prompts)} prompts and {len(completions)} completions: give one completion per prompt "
                          "(at least one row)")
    rows = [(list(p) + list(c))[:max_length] for p, c in zip(prompts, completions)]
    labels = [([-100] * len(p) + list(c))[:max_length] for p, c in zip(prompts, completions)]
    ids, mask = pad_rows(rows, pad_id, "right")
    labels, _ = pad_rows(labels, -100, "right")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def kto_mismatched_batch(prompts, completions, pad_id, max_length=None):
    """The rows KTO measures its reference point on: each prompt with the completion of the row before it (the first
    with the last's), TRL's rotation (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}). The same completions as the batch's,
    so that the KL they give is the policy's drift on this text, answering prompts it was not written for."""
    return kto_batch(prompts, completions[-1:] + completions[:-1], pad_id, max_length)


def kto_kl(model, mismatched_batches, reference=None, sync=None):
    """KTO's reference point z0 (TRL's "kl"): the mean over the mismatched rows of logp - ref_logp, clamped at 0, as a
    number with no gradient (a baseline, not something to train): an estimate of KL(policy || reference), since
    E_policy[log policy - log reference] is that KL (here over completions the policy did not sample: a biased but
    cheap estimate, the paper's). Forwards in eval mode (TRL's policy runs in train mode, the same with dropout off:
    its disable_dropout default); a list of batches gives one mean over all their rows. sync (a
    distributed.Distributed, under torchrun): the mean over every process's rows, so that all use one reference point,
    the one a single process would (TRL averages the processes' means: the same where they hold as many rows)."""
    diffs = torch.cat([logprobs_without_grad(model, b).sums - reference_logprobs(model, b, reference).sums
                       for b in mismatched_batches])
    total, rows = diffs.sum(), len(diffs)
    if sync is not None:
        total, rows = sync.total(total), sync.count(rows)
    return max(float(total) / rows, 0.0)


def kto_step(model, batch, desirable, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, reference=None,
             num_rows=None):
    """One forward and hand-written backward of kto_loss over a batch of unpaired rows (kto_batch's); fills .grad,
    takes no optimizer step. Returns (loss, metrics). desirable: (B,) booleans; kl: the reference point (kto_kl of the
    step's mismatched rows); the reference log-probs come from `reference` (a frozen copy) or, if None, the model with
    its LoRA adapters off. The loss is the sum over the rows divided by `num_rows`, the rows of the whole optimizer step
    (default: this batch's): TRL's mean over the batch, and micro-batches add up to one big batch."""
    if not beta > 0 or not (desirable_weight > 0 and undesirable_weight > 0):
        raise MiniftError(f"beta={beta!r}, desirable_weight={desirable_weight!r}, undesirable_weight={undesirable_weight!r}:"
                          " each must be > 0 (TRL's defaults: 0.1, 1.0, 1.0)")
    desirable = torch.as_tensor(desirable, dtype=torch.bool, device=batch["input_ids"].device)
    if desirable.shape != (len(batch["input_ids"]),):
        raise MiniftError(f"{tuple(desirable.shape)} labels for {len(batch['input_ids'])} rows: give one desirable "
                          "(True) or undesirable (False) per row")
    ref = reference_logprobs(model, batch, reference)
    with torch.no_grad():
        policy = sequence_logprobs(model, batch)
        if not policy.counts.all():
            raise MiniftError(f"row {int((policy.counts == 0).nonzero()[0])} of the batch has no completion token: every "
                              "completion needs at least one labelled token")
        losses, dlogps, metrics = kto_loss(policy.sums, ref.sums, desirable, kl, beta, desirable_weight, undesirable_weight)
        num_rows = num_rows or len(losses)
        sequence_logprobs_backward(model, policy, dlogps / num_rows)
    return losses.sum().item() / num_rows, metrics
