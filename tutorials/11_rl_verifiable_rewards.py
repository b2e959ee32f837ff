# %% [markdown]
# # Reinforcement learning with verifiable rewards: GRPO on SmolLM2-135M-Instruct
#
# **The question of this lesson: when a program can check an answer but nobody wrote the answers down, how does a
# model learn from its own attempts, and what in GRPO's update tells it which attempt was better?**
#
# Tutorials 09 and 10 needed answers (or pairs of answers) written in advance. For some tasks a program can
# *check* an answer instead: is the sum right, do the tests pass. Then the model can learn from its own attempts.
# GRPO (Group Relative Policy Optimization, Shao et al. 2024, DeepSeekMath) does it without a value network:
#
# 1. sample G completions of each prompt (a *group*);
# 2. score each with the checker (reward 1 if right, 0 if not);
# 3. advantage = (reward - the group's mean) / the group's std: better or worse than its siblings;
# 4. push up the log-probs of the tokens of the better completions and down those of the worse ones, with PPO's
#    clipped ratio against the policy that sampled them and, optionally, a KL penalty (k3) to the reference.
#
# The task: single-digit sums, "What is 7 + 5? Answer with the number only." Sampled at temperature 0.5 SmolLM2 is
# right about half the time and most groups of 4 hold a right and a wrong answer: something to learn from (at 1.0
# it is rarely right; two-digit sums it almost never gets: no group would have a right answer). Sections 1-8 write
# the rounds out; section 9 hands the same prompts and reward to the training loop as an *objective*, which is
# what `minift finetune --task grpo` does.
#
#     python tutorials/11_rl_verifiable_rewards.py --quick   # CI: 2 rounds of 2 prompts x G=4, 4 held-out sums
#     python tutorials/11_rl_verifiable_rewards.py           # 20 rounds of 8 prompts x G=4, 24 held-out sums
#
# Measured runs: tutorials/README.md. Writes runs/tutorials/11_rl_verifiable_rewards/{quick,full}/ (section 9's run).

# %%
import argparse
import itertools
import json
import random
import shutil
import time
from pathlib import Path

import torch

import minift
from minift.grpo import GRPOObjective, GRPOSettings, encode_prompts
from minift.checkpoints import build_model
from minift.evals import parse_answer
from minift.lora import add_lora, lora_summary
from minift.optim import AdamW, clip_grad_norm, param_groups
from minift.preference import logprobs_without_grad, reference_logprobs
from minift.rl import clipped_surrogate, group_advantages, grpo_loss, grpo_step, k3_kl, sample_rollouts, token_weights

parser = argparse.ArgumentParser(description="GRPO on SmolLM2 with a reward computed by code")
parser.add_argument("--quick", action="store_true", help="two small rounds (for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
out = Path(args.runs) / "11_rl_verifiable_rewards" / ("quick" if args.quick else "full")
t_start = time.perf_counter()
minift.seed_everything(0)
# One thread. On a 2-core machine that another job shares, two threads that wait for each other made a step
# about 10x slower here; on an idle machine one thread costs about 1.5x.
torch.set_num_threads(1)
rounds, n_prompts, G, n_heldout = (2, 2, 4, 4) if args.quick else (20, 8, 4, 24)
max_new_tokens = 8

# %% [markdown]
# ## 1. A reward computed by code
#
# The checker reads the reply's first line and takes its last integer (`evals.parse_answer`, the arithmetic
# suite's parser): "7 + 5 = 12" and "The answer is 12." score 1, "5 + 7 = 13" and "twelve" score 0. It is cheap
# and strict, and it cannot be talked round, which is what makes the reward *verifiable*. (It is also what the
# policy will learn to please: a checker that accepted any reply containing the right number somewhere would be
# gamed by replies listing many numbers.)

# %%
def reward(reply, problem):
    return 1.0 if parse_answer(reply, "number") == str(sum(problem)) else 0.0


assert reward("7 + 5 = 12", (7, 5)) == reward("The answer is 12.", (7, 5)) == 1.0
assert reward("5 + 7 = 13", (7, 5)) == reward("twelve", (7, 5)) == reward("13\n12", (7, 5)) == 0.0

tok = minift.load_tokenizer("smollm2")
model = minift.load("smollm2", task="lm", verbose=False)


def prompt_of(problem):
    a, b = problem
    return tok.apply_chat_template([{"role": "user", "content": f"What is {a} + {b}? Answer with the number only."}])


problems = [(a, b) for a in range(1, 10) for b in range(1, 10)]
random.Random(0).shuffle(problems)
heldout, train_problems = problems[:n_heldout], problems[n_heldout:]


def heldout_accuracy(model):
    """Greedy answers (temperature 0) to the held-out sums, scored by the checker."""
    out = sample_rollouts(model, tok, [prompt_of(p) for p in heldout], 1, max_new_tokens=max_new_tokens, temperature=0)
    return sum(reward(t, p) for t, p in zip(out.texts, heldout)) / len(heldout), out.texts


before, texts = heldout_accuracy(model)
print(f"greedy, before GRPO: {before:.3f} right on {n_heldout} held-out sums; e.g. "
      + "; ".join(f"{a} + {b}: {t!r}" for (a, b), t in zip(heldout[:3], texts)))

# %% [markdown]
# ## 2. Rollouts: G samples per prompt
#
# `sample_rollouts` repeats each prompt G times, prompt by prompt (rows i*G ... i*G + G-1 are prompt i's), and
# samples all of them in one left-padded, batched generate with a KV cache and a seeded generator (a run
# repeats exactly). The completion mask is 1 up to and including the first `<|im_end|>`, 0 after it (generate
# pads finished rows with it); `Rollouts.batch()` is then the training batch: prompt + completion, with the
# completion's tokens as labels (-100 on the prompt and after the end). Temperature decides how varied a group
# is: too low and all G samples agree (no spread, nothing to learn), too high and they are mostly wrong.

# %%
gen = torch.Generator().manual_seed(0)


def rollouts_of(problems, temperature):
    out = sample_rollouts(model, tok, [prompt_of(p) for p in problems], G, max_new_tokens=max_new_tokens,
                          temperature=temperature, generator=gen)
    rewards = torch.tensor([reward(t, problems[i // G]) for i, t in enumerate(out.texts)])
    return out, rewards


def spread_share(rewards):
    return (rewards.view(-1, G).std(1) > 0).float().mean().item()


stream = itertools.cycle(train_problems)  # round and round the training sums; each round samples them afresh


def next_prompts():
    return [next(stream) for _ in range(n_prompts)]


problems_0 = next_prompts()
rollouts, rewards = rollouts_of(problems_0, 0.5)
for _ in range(5):  # the lesson needs one group with a spread; draw more prompts until there is (rarely needed)
    if spread_share(rewards) > 0:
        break
    problems_0 = next_prompts()
    rollouts, rewards = rollouts_of(problems_0, 0.5)
assert spread_share(rewards) > 0
for i, (a, b) in enumerate(problems_0[:2]):
    print(f"{a} + {b}: " + " | ".join(f"{t!r} -> {r:.0f}" for t, r in zip(rollouts.texts[i * G:(i + 1) * G],
                                                                          rewards[i * G:(i + 1) * G].tolist())))
hot_rollouts, hot_rewards = rollouts_of(problems_0, 1.0)
print(f"{len(rewards)} samples at temperature 0.5: mean reward {rewards.mean():.3f}, groups with a spread "
      f"{spread_share(rewards):.2f}; at temperature 1.0: {hot_rewards.mean():.3f}, {spread_share(hot_rewards):.2f} "
      f"(on larger samples, measured before: 0.47 with 62% of the groups, and 0.09)")
batch = rollouts.batch()
P = rollouts.prompt_ids.shape[1]
assert all(torch.equal(rollouts.prompt_ids[i], rollouts.prompt_ids[i - i % G]) for i in range(len(rewards)))
assert (batch["labels"][:, :P] == -100).all(), "prompt tokens are not trained"
lengths = rollouts.completion_mask.sum(1)
for ids, n in zip(rollouts.completion_ids, lengths):  # the mask runs to the first <|im_end|>, or to the end
    ended = (ids == tok.eos_id).nonzero()
    assert n == (ended[0, 0] + 1 if len(ended) else len(ids))
print(f"completion lengths (tokens, <|im_end|> included): {lengths.tolist()}")

# %% [markdown]
# ## 3. Group advantages; a group of equal rewards teaches nothing
#
# A = (r - mean of its group) / (std of its group + 1e-4). A group whose samples all got the same reward (all
# right or all wrong) has A = 0 on every sample: it says nothing about which attempt was better, so it gives
# **no gradient at all**, whatever the model is. Only groups with a spread teach; their share is the first thing
# to watch. Checked on a tiny random Llama in float64: a batch of one flat group and one with a spread has
# exactly the gradient of the second group alone, and a batch of flat groups has a gradient of exactly 0.

# %%
advantages = group_advantages(rewards, G)
flat = (rewards.view(-1, G).std(1) == 0).repeat_interleave(G)
print(f"rewards    {rewards.tolist()}\nadvantages {[round(a, 3) for a in advantages.tolist()]}")
assert (advantages[flat] == 0).all() and (advantages[~flat] != 0).all()
assert abs(advantages.view(-1, G).sum(1)).max() < 1e-5, "advantages of a group sum to 0"


def tiny_llama():
    torch.manual_seed(0)
    return build_model(dict(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=24,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=32), "lm").double().train()


def tiny_grads(rows, tiny_rewards, num_tokens=None):
    tiny = tiny_llama()
    ids = torch.tensor([[1, 3, 4, 5, 6, 7], [1, 3, 4, 8, 9, 2], [1, 3, 4, 10, 2, 2], [1, 3, 4, 11, 12, 13],
                        [1, 5, 6, 7, 8, 9], [1, 5, 6, 14, 2, 2], [1, 5, 6, 15, 16, 2], [1, 5, 6, 17, 18, 19]])[rows]
    labels = ids.clone()
    labels[:, :3] = -100  # a 3-token prompt, a 3-token completion
    tiny_batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    A = group_advantages(torch.tensor(tiny_rewards, dtype=torch.float64), 4)
    grpo_step(tiny, tiny_batch, A, num_tokens=num_tokens)
    return torch.cat([p.grad.flatten() for p in tiny.parameters() if p.grad is not None])


both = tiny_grads(slice(None), [1, 1, 1, 1, 1, 0, 0, 1])  # group 1 flat (all right), group 2 with a spread
alone = tiny_grads(slice(4, 8), [1, 0, 0, 1], num_tokens=8 * 3)  # the same token count as the whole batch ("dapo")
only_flat = tiny_grads(slice(0, 4), [0, 0, 0, 0])
gap = ((both - alone).norm() / alone.norm()).item()
print(f"tiny Llama: gradient of (flat group + spread group) vs the spread group alone: {gap:.1e} apart; "
      f"a flat group's gradient: max |g| = {only_flat.abs().max().item()}")
assert gap < 1e-12 and alone.norm() > 0 and only_flat.abs().max() == 0

# %% [markdown]
# ## 4. The loss is ~0 at the start, the gradient is not
#
# One GRPO update per rollout batch (TRL's default, num_iterations=1) means the policy being trained *is* the one
# that sampled: the ratio r = pi / pi_old is exactly 1 and each token's loss is -A. With loss_type "grpo" (each
# completion's mean over its tokens, then the mean over completions) the loss is -mean(A) = 0, because the
# advantages of each group sum to 0; with "dapo" (the mean over all tokens: TRL's default and ours) it is
# -sum(A_i n_i) / N, not 0 only because completions differ in length n_i. Yet the gradient, -A d log pi for
# every token, is not 0: it is what moves the model. **Do not watch the GRPO loss**; watch section 7's columns.
#
# One more saving: the rows of flat groups cost a forward and a backward and add nothing, so we drop them before
# the update (DAPO's "dynamic sampling" draws more prompts instead; the "dapo" mean is then over the kept tokens).
# Fresh LoRA adapters (B = 0: the policy *is* the reference), then one real step on the rollouts of section 2.

# %%
add_lora(model, "all-linear", r=8, alpha=16)
print(lora_summary(model))
model.train()
groups = param_groups(model, weight_decay=0.0)
params = [p for g in groups for p in g["params"]]
optimizer = AdamW(groups, lr=3e-4)
settings = dict(beta=0.04, epsilon=0.2, loss_type="dapo")

keep = ~flat
kept = {k: v[keep] for k, v in batch.items()}
ref = reference_logprobs(model, kept)  # the adapters off; at step 0 also the policy that sampled (B = 0)
mask = ref.mask
grpo_value = grpo_loss(ref.tokens, None, None, advantages[keep], mask, loss_type="grpo")[0].item()
loss0, metrics0 = grpo_step(model, kept, advantages[keep], None, ref, **settings)
grad_norm = clip_grad_norm(params, 1.0)
optimizer.step()
optimizer.zero_grad()
print(f"step 0 on the {int(keep.sum())} rows of the groups with a spread: loss (dapo) {loss0:+.6f}, as loss_type "
      f"'grpo' {grpo_value:+.2e}; gradient norm {grad_norm:.4f}; kl {metrics0['kl']}")
assert abs(grpo_value) < 1e-6, "on-policy, 'grpo' averages -A over each group: 0"
assert grad_norm > 0, "the loss is ~0, the gradient is not"
assert metrics0["kl"] == 0.0, "at step 0 the policy is the reference (LoRA's B = 0): k3 is exactly 0"
w = token_weights(mask, "dapo")
assert abs(loss0 - (-(advantages[keep][:, None] * w).sum().item())) < 1e-6, "at ratio 1 the dapo loss is -sum(A w)"

# %% [markdown]
# ## 5. The clipped ratio, on a policy that has moved
#
# After that update the policy is no longer the one that sampled: r = exp(logp_new - logp_old) per token. A second
# update on the same rollouts (TRL's num_iterations=2) would use PPO's clipped objective
# -min(r A, clip(r, 1 - eps, 1 + eps) A): once a token has moved far enough in its advantage's direction (r > 1 + eps
# with A > 0, r < 1 - eps with A < 0), the clipped term is a constant and d loss / d logp is 0; elsewhere it is
# -A r. The old log-probs here are the reference's (at round 0 the sampler was the reference). eps is the usual
# 0.2, and then the tenth of it, 0.02, so that the lesson shows even where one step moved few tokens that far.

# %%
new = logprobs_without_grad(model, kept).tokens
old = ref.tokens
ratio = torch.exp(new - old)[mask]
print(f"ratio pi_new / pi_old over {int(mask.sum())} completion tokens: min {ratio.min():.3f}, median "
      f"{ratio.median():.3f}, max {ratio.max():.3f}")
assert (ratio != 1).any(), "the update changed the policy"
A_tok = advantages[keep][:, None].expand_as(new)
for eps in (0.2, 0.02):
    per_token, d, low, high = clipped_surrogate(new, old, A_tok, eps, eps)
    clipped = (low | high) & mask
    print(f"eps {eps}: {int(clipped.sum())} of {int(mask.sum())} tokens clipped ({int((low & mask).sum())} low, "
          f"{int((high & mask).sum())} high); their gradient is 0")
    r = torch.exp(new - old)
    assert (d[clipped] == 0).all() and torch.allclose(d[~clipped & mask], (-A_tok * r)[~clipped & mask])
    assert torch.equal(clipped, mask & (((r < 1 - eps) & (A_tok < 0)) | ((r > 1 + eps) & (A_tok > 0))))
# the derivative -A r (inside) and 0 (clipped) against autograd, on the same numbers
logp = new.clone().requires_grad_(True)
per_token, d, _, _ = clipped_surrogate(logp, old, A_tok, 0.02, 0.02)
per_token[mask].sum().backward()
assert torch.allclose(logp.grad[mask], d[mask], atol=1e-6)

# %% [markdown]
# ## 6. The KL term
#
# The k3 estimator of KL(policy || reference) per token (Schulman 2020): with d = logp_ref - logp,
# kl = exp(d) - d - 1 >= 0, exactly 0 where the policy equals the reference, and d kl / d logp = 1 - exp(d) pulls
# each token back toward the reference. beta weighs it (0.04 here, as TRL used to default; TRL's default is now 0:
# no reference forward at all, and `grpo_loss(..., beta=0, ref_logps=None)` is allowed).

# %%
kl, dkl = k3_kl(new, old)
print(f"k3 KL to the reference after one step: mean {kl[mask].mean():.2e} per token, max {kl[mask].max():.2e}")
assert (kl[mask] >= -1e-7).all() and kl[mask].max() > 0
with_kl = grpo_loss(new, old, old, advantages[keep], mask, beta=0.04)[1]
without = grpo_loss(new, old, None, advantages[keep], mask, beta=0.0)[1]
expected = (0.04 * dkl * token_weights(mask, "dapo").to(dkl.dtype)).masked_fill(~mask, 0)
assert torch.allclose(with_kl - without, expected, atol=1e-7), "the KL term adds beta * (1 - exp(d)) per token"

# %% [markdown]
# ## 7. GRPO rounds, and what to watch instead of the loss
#
# Each round: sample G completions of fresh prompts, score them, advantages, the reference's log-probs (adapters
# off), one update. Watch: the **mean reward** (is it learning?), the **share of groups with a spread** (0: nothing
# to learn from: change the temperature or the prompts), the **completion length** (the checker reads the first
# line only, so a reply cut off before its number scores 0 and short answers pay), the **KL** to the reference
# (how far the policy went; 0 at the very first step) and, with several updates per batch, the clip ratio. The
# loss column is there to show that it says little: with beta > 0 and completions of one length it is about
# beta * KL. When the groups are all right the share with a spread falls to 0 and learning stops, whatever the
# loss says: the prompts have become too easy (harder ones, or a higher temperature, bring the spread back).

# %%
print("round  reward mean  groups with spread  mean length  kl         loss")
history = []
for rnd in range(1, rounds):
    rollouts, rewards = rollouts_of(next_prompts(), 0.5)
    row = {"reward": rewards.mean().item(), "spread": spread_share(rewards),
           "length": rollouts.completion_mask.sum(1).float().mean().item()}
    keep = (rewards.view(-1, G).std(1) > 0).repeat_interleave(G)
    if keep.any():
        kept = {k: v[keep] for k, v in rollouts.batch().items()}
        loss, m = grpo_step(model, kept, group_advantages(rewards, G)[keep], None, reference_logprobs(model, kept),
                            **settings)
        clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        row.update(kl=m["kl"], loss=loss)
        history.append(row)
    print(f"{rnd:>5}  {row['reward']:>11.3f}  {row['spread']:>18.2f}  {row['length']:>11.2f}  "
          + (f"{row['kl']:.3e}  {row['loss']:+.5f}" if keep.any() else "no group with a spread: no update"))
assert all(h["kl"] > 0 for h in history), "after the first update the policy has left the reference"

# %% [markdown]
# ## 8. Did it learn?
#
# The greedy held-out sums of section 1 again, after the GRPO rounds, and how far the adapters moved.

# %%
after, texts = heldout_accuracy(model)
moved = sum((p.detach() ** 2).sum().item() for n, p in model.named_parameters() if "lora_B" in n) ** 0.5
print(f"held-out greedy accuracy on {n_heldout} sums: before {before:.3f} -> after GRPO {after:.3f} ({rounds} rounds "
      f"x {n_prompts} prompts x G={G}; ||lora_B|| = {moved:.4f}, 0 before); e.g. "
      + "; ".join(f"{a} + {b}: {t!r}" for (a, b), t in zip(heldout[:3], texts)))
assert moved > 0, "the adapters moved"

# %% [markdown]
# ## 9. The same rounds through the training loop: an objective
#
# `minift.train` runs any loss that keeps the *objective* contract (`minift/objective.py`). `grpo.GRPOObjective` is
# GRPO's: a batch is a few prompts; its `gradients` samples G answers of each (section 2, with the global RNG, which
# every checkpoint saves), rewards them with a function of TRL's signature `f(prompts, completions, **columns)` (the
# rows' other fields arrive by name: here `answer`), and runs `grpo_step` (sections 3-6); its `evaluate` is the mean
# reward of the greedy answers, which chooses best/. `grpo.GRPOSettings` holds TRL's names (group_size,
# temperature, beta, loss_type ...). The loop adds the rest: LoRA by `prepare_model`, the lr plan, checkpoints, an
# exact resume (the sampling too), best/, the log with GRPO's figures per step, a report page.

# %%
model = None  # (frees the hand-trained model: the loop puts fresh adapters on a fresh copy)


def sums_are_right(prompts, completions, answer, **columns):
    """Section 1's checker with TRL's signature: the row's answer arrives as a column."""
    return [1.0 if parse_answer(c, "number") == a else 0.0 for c, a in zip(completions, answer)]


def prompt_rows(problems):
    return [{"prompt": f"What is {a} + {b}? Answer with the number only.", "answer": str(a + b)} for a, b in problems]


settings = GRPOSettings(reward=sums_are_right, group_size=G, max_new_tokens=max_new_tokens, temperature=0.5)
objective = GRPOObjective(tok, sums_are_right, settings)
loop_steps = 2 if args.quick else 20
data = minift.TrainData(encode_prompts(prompt_rows(train_problems), tok, 256),
                        encode_prompts(prompt_rows(heldout), tok, 256), tok.pad_id, objective=objective)
assert data.validation[0]["input_ids"] == tok.encode(prompt_of(heldout[0]), add_special_tokens=False)
cfg = minift.TrainConfig(lora_r=8, lr=5e-4, batch_size=n_prompts, max_steps=loop_steps, eval_every=loop_steps,
                         metric="reward", dropout=0.0, warmup_ratio=0.0, weight_decay=0.0, precision="fp32",
                         log_every=1)
shutil.rmtree(out, ignore_errors=True)
result = minift.train(minift.load("smollm2", task="lm", verbose=False), data, cfg, out)
log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"eval"' not in line]
print(f"the loop: {result['steps']} steps of {n_prompts} prompts x G={G}; sampled reward per step "
      f"{[round(r['reward'], 3) for r in log]}; held-out greedy reward of best/ (step {result['best_step']}): "
      f"{result['best_metrics']['reward']:.3f}; report page {out / 'report.html'}")
assert result["steps"] == loop_steps and all("frac_reward_zero_std" in r for r in log)
assert (out / "best" / "model.safetensors").is_file() and (out / "checkpoint" / "trainer_state.json").is_file()

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
