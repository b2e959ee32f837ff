# %% [markdown]
# # Learning from a teacher and from a judge: distillation and a reward model
#
# **The question of this lesson: a 0.5B model answers about three in four two-digit sums and differences right, a
# 1.5B model of the same family all of them. What does the small one gain from the big one's token probabilities over
# what it gains from the right answers alone (SFT), and more from its own answers scored by the teacher (on-policy)
# than from fixed text (offline)? And where no program can check an answer, can a model trained on pairs of
# answers be the judge that RL needs?**
#
# Supervised fine-tuning shows the student one right token per position. A teacher shows a whole distribution:
# which other tokens were nearly as good, how sure it is (Hinton et al.'s "dark knowledge"). Distillation trains
# the student to match it, token by token: offline on fixed answers (KD), or on-policy on answers the student
# samples itself, every token scored by the teacher (GKD, Agarwal et al. 2024), so it learns where its own mistakes
# lead, not only on text it would never write. Sections 1-3 write the loss and its gradient out; 4-6 train the
# real pair (`minift finetune --task distill` is section 5's loop); 7 trains a judge (`--task reward`) and lets
# GRPO (tutorial 11) learn from it (`--task grpo --reward-model`).
#
#     python tutorials/14_distillation_and_reward_model.py --quick   # CI, a minute or two: the mechanics only
#     python tutorials/14_distillation_and_reward_model.py           # the real pair: Qwen2.5-Coder 1.5B -> 0.5B
#
# --quick does not run the real pair (its two models take minutes to load and a step takes seconds on a CPU): its
# student is a tiny random Llama with SmolLM2's tokenizer and its teacher SmolLM2-135M-Instruct, so its numbers
# show the mechanics, not a gain. Measured runs: tutorials/README.md. Writes runs/tutorials/14_distillation/.

# %%
import argparse
import gc
import json
import math
import shutil
import time
from pathlib import Path

import torch

import minift
from minift import recipe
from minift.checkpoints import build_model
from minift.corpora import arithmetic_splits, two_digit_splits
from minift.distill import DistillObjective, DistillSettings, distill_loss, distill_step, divergence, encode_rows, load_teacher
from minift.evals import exact_match
from minift.grpo import GRPOSettings, finetune_grpo, number_is_right
from minift.report import cpu_name
from minift.reward import RewardObjective, arithmetic_pairs, encode_pairs
from minift.tasks import encode_instruction

parser = argparse.ArgumentParser(description="distillation and a reward model")
parser.add_argument("--quick", action="store_true", help="tiny student, SmolLM2 as teacher, a few steps (for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
out = Path(args.runs) / "14_distillation" / ("quick" if args.quick else "full")
shutil.rmtree(out, ignore_errors=True)
t_start = time.perf_counter()
minift.seed_everything(0)
torch.set_num_threads(1)  # one thread: on a shared 2-core CPU two threads that wait for each other are slower

# %% [markdown]
# ## 1. One position: three divergences and their gradients
#
# The student's p = softmax(s / T) and the teacher's q = softmax(t / T) over the vocabulary, at one position.
# `beta` picks the divergence, as TRL names it:
# - 0: forward KL(q || p). The student must cover every token the teacher gives weight to (mode covering).
#   Its gradient with respect to the student's logits is (p - q) / T: the teacher's distribution is the target.
# - 1: reverse KL(p || q). The student is punished for weight where the teacher has none (mode seeking).
#   Gradient p (log p - log q - KL) / T.
# - between: GKD's generalised Jensen-Shannon divergence, with the mixture m = (1 - beta) p + beta q,
#   beta KL(q || m) + (1 - beta) KL(p || m), bounded (by log 2 at 0.5); gradient (1 - beta) p (log p - log m - KL(p || m)) / T.
# `distill.divergence`'s docstring derives the three. Here they are on a teacher sure of token 0 and a student
# that spreads its bets, and checked against autograd.

# %%
teacher_logits = torch.tensor([[4.0, 2.0, 1.0, 0.0, -2.0]], dtype=torch.float64)
student_logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
for beta in (0.0, 0.5, 1.0):
    s = student_logits.clone().requires_grad_()
    loss, grad = divergence(s.detach(), teacher_logits, beta)
    with torch.enable_grad():  # the same number by autograd: log-softmaxes and sums
        lp, lq = torch.log_softmax(s, -1), torch.log_softmax(teacher_logits, -1)
        if beta in (0.0, 1.0):
            (a, b) = (lq, lp) if beta == 0.0 else (lp, lq)
            ref = (a.exp() * (a - b)).sum()
        else:
            lm = torch.logaddexp(lp + math.log(1 - beta), lq + math.log(beta))
            ref = beta * (lq.exp() * (lq - lm)).sum() + (1 - beta) * (lp.exp() * (lp - lm)).sum()
        ref.backward()
    print(f"beta {beta}: divergence {loss.item():.4f}, d/ds {[round(g, 3) for g in grad[0].tolist()]} "
          f"(autograd {(grad - s.grad).abs().max().item():.1e} apart)")
    assert (grad - s.grad).abs().max() < 1e-12
print(f"forward KL at T = 2: {divergence(student_logits, teacher_logits, 0.0, 2.0)[0].item():.4f} (softer, closer)")

# %% [markdown]
# The temperature: T > 1 softens both distributions before they are compared, so small differences among the
# unlikely tokens count more. Hinton et al. multiply the softened loss by T^2, because its gradient shrinks about
# as 1/T^2; TRL does not, and neither does minift: the loss is the divergence itself (raise the lr for T > 1).
#
# ## 2. Through a model: the hand-written backward against autograd
#
# `distill_step` runs the teacher forward (no gradient, eval mode), then the student, the divergence over every
# position that has a target (the answer's tokens), and the student's hand-written backward. Two tiny Llamas in
# float64, the student's head with 4 rows more than its tokenizer's 46 tokens (as Qwen's head has more rows than
# its tokenizer has tokens: only the real tokens are compared), against autograd through the same loss.

# %%
tiny_config = dict(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
tiny_student = build_model(tiny_config, "lm").double().train()
tiny_teacher = build_model({**tiny_config, "hidden_size": 24, "num_attention_heads": 3, "num_key_value_heads": 1},
                           "lm").double().eval()
tiny_batch = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]),
              "labels": torch.tensor([[-100, -100, -100, 8, 9, 10], [-100, -100, 13, 14, 15, -100]])}
with torch.enable_grad():
    logits, theirs = tiny_student(*list(tiny_batch.values())[:2]), tiny_teacher(*list(tiny_batch.values())[:2])
    targets = torch.nn.functional.pad(tiny_batch["labels"][:, 1:], (0, 1), value=-100).reshape(-1)
    ref, _ = distill_loss(logits.reshape(-1, 50), theirs.reshape(-1, 50).detach(), targets, 5, 0.5, 1.0, 46,
                          want_grad=False)
    ref.backward()
autograd = {n: p.grad.clone() for n, p in tiny_student.named_parameters()}
worst = 0.0
for chunk in (0, 2):  # 0: the whole logits at once; 2: both heads two positions at a time
    tiny_student.zero_grad()
    tiny_student.loss_chunk = chunk
    distill_step(tiny_student, tiny_teacher, tiny_batch, 5, 0.5, 1.0, 46)
    worst = max(worst, max(((p.grad - autograd[n]).abs().max() / autograd[n].abs().max()).item()
                           for n, p in tiny_student.named_parameters()))
print(f"distillation gradient, max relative error ||ours - autograd|| over every weight, whole and chunked: {worst:.1e}")
assert worst < 1e-10

# %% [markdown]
# ## 3. Why a chunk of positions at a time
#
# Qwen2.5's head has 151,936 rows. One batch of 8 rows x 60 tokens makes 480 x 151,936 logits: 278 MB in fp32,
# for the student and again for the teacher, and the divergence needs a few tensors of that size more. With
# `TrainConfig(chunked_loss=64)` both models stop at their hidden states (`CausalLM.hidden_states` for the
# teacher) and `distill_loss` makes 64 positions' logits at a time, skipping chunks without a target (the prompt):
# 37 MB per tensor, whatever the batch. The same numbers up to rounding (section 2 ran both). `bench/distill.py`
# measures the peak memory and the seconds of a 0.5B-shape student with a 1.5B-shape teacher, both ways.

# %%
print(f"logits of 8 x 60 positions x 151,936 tokens in fp32: {8 * 60 * 151936 * 4 / 2**20:.0f} MB; "
      f"of a 64-position chunk: {64 * 151936 * 4 / 2**20:.0f} MB")

# %% [markdown]
# ## 4. The pair and the task
#
# Qwen2.5-Coder-0.5B-Instruct (the student) and Qwen2.5-Coder-1.5B-Instruct (the teacher) share a tokenizer:
# `distill.check_same_tokens` compares them token by token before the job loads either model. The task
# (`corpora.two_digit_splits`): 300 sums and differences of two numbers 10-99, split 210/45/45. Why this one: it is
# checked by its number (exact match, no judge needed), the answers are a few tokens (a CPU can sample them), and
# the pair differs on it: zero-shot the student gets 0.76 of the test questions (0.78 of validation), most of its
# misses negative answers (15 of 21: 3 of the 18 negative answers right), the teacher all 90 (measured, greedy).
# (The one-digit arithmetic task of tutorials 10-11 is nearly solved by the student already on its validation
# split.) The teacher is frozen, so it is loaded once, in bf16 with its block matrices in q8_0 blocks
# (`load_teacher(..., "q8_0")`: 2.4 GB instead of 7.1 GB in fp32), read one tensor at a time.

# %%
if args.quick:  # the mechanics only: a tiny random student with SmolLM2's tokenizer, SmolLM2 as its teacher
    tok = minift.load_tokenizer("smollm2")
    teacher = load_teacher(minift.resolve_model("smollm2"))

    def fresh_student():
        torch.manual_seed(0)
        return build_model(dict(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                tie_word_embeddings=True, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id), "lm")
else:
    tok = minift.load_tokenizer("qwen2.5-coder-0.5b")
    teacher = load_teacher(minift.resolve_model("qwen2.5-coder-1.5b"), torch.bfloat16, "q8_0")

    def fresh_student():
        return minift.load("qwen2.5-coder-0.5b", task="lm", verbose=False)

splits = two_digit_splits()
n_val, n_test = (8, 8) if args.quick else (45, 45)
train_rows, val_rows, test_rows = splits["train"], splits["validation"][:n_val], splits["test"][:n_test]


def test_exact_match(model):
    return exact_match(model, tok, test_rows, kind="number", max_new_tokens=8)["exact_match"]


t0 = time.perf_counter()
results = {"teacher": {"exact_match": test_exact_match(teacher), "seconds": time.perf_counter() - t0}}
student = fresh_student()
t0 = time.perf_counter()
results["student zero-shot"] = {"exact_match": test_exact_match(student), "seconds": time.perf_counter() - t0}
print(f"zero-shot exact match on {n_test} held-out test questions: teacher {results['teacher']['exact_match']:.3f}, "
      f"student {results['student zero-shot']['exact_match']:.3f}")
replies = exact_match(student, tok, test_rows[:4], kind="number", max_new_tokens=8)["items"]
print("the student's replies: " + "; ".join(f"{r['answer']}: {r['reply']!r}" for r in replies))
del student

# %% [markdown]
# ## 5. Three ways to train the student, side by side
#
# The same 210 training rows, the same LoRA adapters (r 8), lr, steps and batches, the loop of stage 4 (`minift.train`):
# - SFT: the next-token loss on the right answers (the model's own loss: `TrainData` without an objective);
# - offline KD: `distill.DistillObjective` with lmbda 0: the divergence to the teacher on the same right answers;
# - on-policy: lmbda 1: each step the student samples an answer to each prompt, the teacher scores its tokens.
# beta 0.5 (GKD's JSD), T 1. Each run is judged once at its end, and its model then answers the held-out test
# questions. `minift finetune --task distill --lmbda 0` (or 1) is the second (third) run, with the job's defaults.

# %%
steps = 2 if args.quick else 26
cfg = minift.TrainConfig(lora_r=8, lr=1e-3, batch_size=8, max_steps=steps, eval_every=steps, warmup_ratio=0.1,
                         dropout=0.0, chunked_loss=64, metric="auto", log_every=1, epochs=1)
rows_examples, _ = encode_rows(train_rows, tok, 256)
val_examples, _ = encode_rows(val_rows, tok, 256)
plain_train, _ = encode_instruction(train_rows, tok, 256)
plain_val, _ = encode_instruction(val_rows, tok, 256)
assert [e["input_ids"] for e in plain_train] == [e["input_ids"] for e in rows_examples]  # the same rows
runs = {"SFT": minift.TrainData(plain_train, plain_val, tok.pad_id)}
for name, lmbda in (("offline KD", 0.0), ("on-policy", 1.0)):
    settings = DistillSettings(teacher="(loaded above)", lmbda=lmbda, max_new_tokens=8)
    runs[name] = minift.TrainData(rows_examples, val_examples, tok.pad_id,
                                  objective=DistillObjective(tok, teacher, settings))
for name, data in runs.items():
    t0 = time.perf_counter()
    student = fresh_student()
    minift.seed_everything(0)
    report = minift.train(student, data, cfg, out / name.replace(" ", "-"))
    seconds = time.perf_counter() - t0
    results[name] = {"exact_match": test_exact_match(student), "seconds": seconds, "steps": report["steps"],
                     "validation": report["best_metrics"]}
    print(f"{name}: {report['steps']} steps in {seconds / 60:.1f} min; test exact match "
          f"{results[name]['exact_match']:.3f}")
    del student
    gc.collect()

# %% [markdown]
# ## 6. Did it do anything?
#
# The student's exact match on the 45 held-out test questions (greedy, the first line's last number), zero-shot and
# after each run, beside the teacher's; the wall time of each run (its steps and its one evaluation) on this CPU.

# %%
print(f"\n{'':22s} test exact match   minutes")
for name, r in results.items():
    print(f"{name:22s} {r['exact_match']:.3f}              {r['seconds'] / 60:.1f}")
print(f"CPU: {cpu_name()}")
(out / "results.json").write_text(json.dumps(results, indent=2, default=str))
del teacher
gc.collect()

# %% [markdown]
# ## 7. A judge learnt from pairs, as GRPO's reward
#
# GRPO (tutorial 11) needs a reward. A program gave it there (is the number right?). Where none can, people train a
# reward model: a model with a one-number head, trained on pairs (a prompt, a better and a worse answer) so that
# the better one scores higher: the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) (`reward.py`, as TRL's
# RewardTrainer). Here: SmolLM2 learns to score the right answer of a one-digit sum above a near miss (the answer
# +-1 to 3), then it is GRPO's reward (`GRPOSettings(reward_model=...)`, `--reward-model`) and the checker only
# judges the result. Its best/ is a ...ForSequenceClassification with num_labels 1, which transformers loads.

# %%
arith = arithmetic_splits()
pairs = {k: arithmetic_pairs(v) for k, v in arith.items()}
judge_base = "smollm2"
if args.quick:  # the tiny student of section 4 as the judge's body and as GRPO's policy: seconds, not minutes
    judge_base = out / "tiny-student"
    tiny = fresh_student()
    tiny.tokenizer_file = minift.resolve_model("smollm2") / "tokenizer.json"
    minift.save_checkpoint(tiny, judge_base)
smol_tok = minift.load_tokenizer(judge_base)
pair_examples = {k: encode_pairs(v, smol_tok, 256)[0] for k, v in pairs.items()}
if args.quick:
    pair_examples = {k: v[:16] for k, v in pair_examples.items()}
judge = minift.load(judge_base, task="classify", num_labels=1, verbose=False)
judge.label_names = ["reward"]
judge_cfg = minift.TrainConfig(**{**recipe.REWARD_TRAIN, "max_steps": 2 if args.quick else 0, "log_every": 1,
                                  "eval_every": 2 if args.quick else 10})
judge_data = minift.TrainData(pair_examples["train"], pair_examples["validation"], smol_tok.pad_id,
                              objective=RewardObjective(smol_tok))
t0 = time.perf_counter()
judge_report = minift.train(judge, judge_data, judge_cfg, out / "judge")
print(f"reward model: held-out pair accuracy {judge_report['best_metrics']['accuracy']:.3f} (best, step "
      f"{judge_report['best_step']}) after {judge_report['steps']} steps, {(time.perf_counter() - t0) / 60:.1f} min")
del judge
gc.collect()

grpo_cfg = minift.TrainConfig(**{**recipe.GRPO_TRAIN, "max_steps": 2 if args.quick else 20, "eval_every": 2 if args.quick
                                 else 10, "log_every": 1})
grpo_settings = GRPOSettings(**{**recipe.GRPO_SETTINGS, "reward_model": str(out / "judge" / "best"),
                                "group_size": 4 if args.quick else 8, "max_new_tokens": 4 if args.quick else 8})
t0 = time.perf_counter()
heldout = arith["test"][:8] if args.quick else arith["test"]
policy = minift.load(judge_base, task="lm", verbose=False)
right_before = exact_match(policy, smol_tok, heldout, kind="number", max_new_tokens=8)["exact_match"]
del policy
grpo_report = finetune_grpo(str(judge_base), None, str(out / "grpo"), grpo_cfg, grpo_settings,
                            limit=8 if args.quick else None, test=False)
tuned = minift.load(out / "grpo" / "best", task="lm", verbose=False)
right_after = exact_match(tuned, smol_tok, heldout, kind="number", max_new_tokens=8)["exact_match"]
print(f"GRPO with the reward model: the judge's mean reward of the greedy answers {grpo_report['reward_before']:.3f} "
      f"-> {grpo_report['validation']['reward']:.3f}; right by the checker on {len(heldout)} held-out sums "
      f"{right_before:.3f} -> {right_after:.3f}; {(time.perf_counter() - t0) / 60:.1f} min")
assert number_is_right(["q"], ["7"], answer=["7"]) == [1.0]
results["reward model"] = {"accuracy": judge_report["best_metrics"]["accuracy"]}
results["GRPO with it"] = {"judge_before": grpo_report["reward_before"], "judge_after": grpo_report["validation"]["reward"],
                           "right_before": right_before, "right_after": right_after}
(out / "results.json").write_text(json.dumps(results, indent=2, default=str))
print(f"results in {out / 'results.json'}")
print(f"\nall checks passed ({(time.perf_counter() - t_start) / 60:.1f} min)")
