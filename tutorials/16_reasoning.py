# %% [markdown]
# # A reasoning track: worked solutions first (SFT), then rewards for right answers (GRPO)
#
# **The question of this lesson: can a small model learn to solve word problems it has never seen the like of, and
# what does each stage add: imitating worked solutions (SFT), then being rewarded only for the right final number
# (GRPO)?**
#
# The problems are GSM8K's grade-school stories turned into templates: reasoning-gym's `gsm_symbolic` generators
# draw names and numbers and write the question, a worked solution ending `#### N`, and N. Training problems and
# test problems come from **different generators**: a test problem is a story the model never saw, not a known story
# with other numbers, so a gain on it is a gain in solving, not in recall.
#
# 1. the problems, split by generator;
# 2. the checker: the final number of a solution, and the reward built on it;
# 3. zero-shot: SmolLM2-135M-Instruct on the held-out problems;
# 4. SFT: the instruction job trains on worked solutions (`minift finetune --task instruct --data gsm`);
# 5. GRPO from the SFT model: samples rewarded 1 when their final number is right (`--task grpo --data gsm --reward
#    minift.grpo:final_answer_is_right`);
# 6. the held-out accuracy at each stage, side by side.
#
#     python tutorials/16_reasoning.py --quick   # CI: 4 solutions (1 step), 1 GRPO step, 2 held-out problems
#     python tutorials/16_reasoning.py           # recipe.py's GSM_* jobs: 480 solutions, 16 GRPO steps, 60 problems
#
# Measured runs: tutorials/README.md. Writes runs/tutorials/16_reasoning/{quick,full}/{sft,grpo}/.

# %%
import argparse
import random
import shutil
import time
from pathlib import Path

import torch

import minift
from minift import evals, recipe
from minift.config import TrainConfig
from minift.corpora import GSM_INSTRUCTION, gsm_generators, gsm_splits
from minift.data import save_splits
from minift.evals import final_number
from minift.grpo import GRPOSettings, final_answer_is_right, finetune_grpo
from minift.instruct import finetune_instruct

parser = argparse.ArgumentParser(description="SFT then GRPO on GSM-style problems, held-out accuracy at each stage")
parser.add_argument("--quick", action="store_true", help="a few rows and steps (for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
out = Path(args.runs) / "16_reasoning" / ("quick" if args.quick else "full")
shutil.rmtree(out, ignore_errors=True)
t_start = time.perf_counter()
torch.set_num_threads(1)  # one thread: on a 2-core machine that others share, two threads wait for each other
minift.seed_everything(0)
# quick: 4 training solutions, 2 held-out problems answered in 16 tokens at most (too few for a solution: the
# pipeline, not the numbers); full: the recipe's jobs and the whole gsm suite (60 problems, 256 tokens)
sft_rows, grpo_prompts, grpo_steps, n_test, new_tokens = (4, 2, 1, 2, 16) if args.quick else (480, 64, 16, 60, 256)

# %% [markdown]
# ## 1. The problems, split by generator
#
# `corpora.gsm_generators()` unpacks three files from the reasoning-gym wheel (the two generator files and the
# `utils.py` they import; the package itself would pull heavy dependencies) and runs them by path. Each generator is
# a function of a `random.Random`: two draws of one generator are one story with other names and numbers. 85 of the
# 100 work (gsm_symbolic.py lists the 15 that need fixing); 15 of them are held out for test and 10 for validation,
# the other 60 train: 20 problems drawn from each training generator, 4 from each held-out one.

# %%
generators = gsm_generators()
splits = gsm_splits()
owners = {k: sorted({r["generator"] for r in v}) for k, v in splits.items()}
print(f"{len(generators)} generators; " + "; ".join(f"{k}: {len(v)} problems from {len(owners[k])} generators"
                                                 for k, v in splits.items()))
print(f"test generators: {owners['test']}")
assert not set(owners["train"]) & (set(owners["test"]) | set(owners["validation"])), "a held-out generator trains"
g = owners["train"][0]
for draw in (1, 2):
    problem = generators[g](random.Random(draw), 1.0)
    print(f"\ngenerator {g}, draw {draw}:\n{problem['question']}\n--- its worked solution:\n"
          f"{problem['metadata']['answer_cot']}")
print(f"\nthe prompt adds one line:\n{GSM_INSTRUCTION.format(question='...')}")
data = "gsm"  # the folder corpora.gsm_splits wrote (`--data gsm`)
if args.quick:  # the jobs score every validation row (16 at least with --limit): quick mode keeps 4 of each split
    data = out / "gsm-few"
    save_splits({k: v[:4] for k, v in splits.items()}, data)

# %% [markdown]
# ## 2. The checker: the final number
#
# A worked solution ends with `#### N`. `evals.final_number` reads the first number after the last `####` and, where
# there is none (a model that never learnt the format), the reply's last number, lm-evaluation-harness's "flexible
# extract" for GSM8K; commas and trailing zeros do not matter (`1,024` is `1024`, `32.0` is `32`). The GRPO reward is
# that check with TRL's signature, `f(prompts, completions, answer, **columns)`: the row's `answer` arrives by name.

# %%
cases = [("3 + 4 = 7 apples.\n#### 7", "7"), ("#### 1,024", "1024"), ("It costs $2.50.", "2.5"), ("#### 32.0", "32"),
         ("#### 5 (not 7)", "5"), ("no number", "")]
for text, expected in cases:
    print(f"{text!r:32} -> {final_number(text)!r}")
    assert final_number(text) == expected
rewards = final_answer_is_right(["q"] * 3, ["#### 7", "7 or 8", "The total is 7."], answer=["7"] * 3)
print(f"rewards for '#### 7', '7 or 8', 'The total is 7.' when the answer is 7: {rewards}")
assert rewards == [1.0, 0.0, 1.0]

# %% [markdown]
# ## 3. Zero-shot
#
# The held-out problems (the `gsm` suite: 4 from each test generator) asked through the chat template, answered
# greedily. `accuracy` is `evals.exact_match` with the "final" parser, what `minift evaluate MODEL --suite gsm`
# prints (quick mode caps the answers' length).

# %%
suite = evals.load_suite("gsm")
items = suite.items[:n_test]
tok = minift.load_tokenizer("smollm2")


def accuracy(model_path):
    model = minift.load(model_path, task="lm", verbose=False)
    result = evals.exact_match(model, tok, items, kind="final", max_new_tokens=new_tokens)
    return result["exact_match"], result["items"]


stages = {}
stages["zero-shot"], replies = accuracy("smollm2")
print(f"zero-shot: {stages['zero-shot']:.3f} right on {len(items)} held-out problems; the first reply:\n"
      f"{replies[0]['reply'][:400]}\n(parsed {replies[0]['parsed']!r}, answer {replies[0]['answer']!r})")

# %% [markdown]
# ## 4. SFT on worked solutions
#
# The instruction job (tutorial 09) on `--data gsm`: prompt masked, the worked solution and its end of turn trained.
# The model learns the *format* (steps, then `#### N`) and the arithmetic moves of 60 templates.

# %%
sft_cfg = TrainConfig(**{**recipe.GSM_SFT_TRAIN, **({"batch_size": 4, "grad_accum": 1} if args.quick else {})})
sft = finetune_instruct("smollm2", data=data, out=out / "sft", cfg=sft_cfg, max_length=recipe.GSM_SFT_JOB["max_length"],
                        limit=sft_rows, test=False, score_rows=4, sample_rows=1)
stages["SFT"], replies = accuracy(out / "sft" / "best")
print(f"after SFT ({sft['steps']} steps on {sft['train_rows']} solutions): {stages['SFT']:.3f}; the first reply:\n"
      f"{replies[0]['reply'][:400]}")

# %% [markdown]
# ## 5. GRPO with the exact-answer reward
#
# From the SFT model: each step samples 4 solutions of each prompt (temperature 0.7), rewards a solution 1 when its
# final number is right, and pushes up the tokens of the better ones in each group (tutorial 11 writes the step out).
# No worked solution is needed any more: only the answer. LoRA adapters (rank 8); best/ by the mean greedy reward on
# validation prompts (from the validation generators).

# %%
settings = GRPOSettings(**{**recipe.GSM_GRPO_SETTINGS, "max_new_tokens": new_tokens,
                            **({"group_size": 2} if args.quick else {})})
grpo_cfg = TrainConfig(**{**recipe.GSM_GRPO_TRAIN, "max_steps": grpo_steps,
                          **({"batch_size": 2, "grad_accum": 1, "eval_every": 1} if args.quick else {})})
grpo = finetune_grpo(out / "sft" / "best", data=data, out=out / "grpo", cfg=grpo_cfg, settings=settings,
                     max_length=recipe.GSM_SFT_JOB["max_length"], limit=grpo_prompts, test=False)
stages["SFT + GRPO"], replies = accuracy(out / "grpo" / "best")

# %% [markdown]
# ## 6. Each stage on the held-out generators

# %%
print(f"\nheld-out accuracy on {len(items)} problems of {len(owners['test'])} generators no training row came from:")
for stage, value in stages.items():
    print(f"  {stage:<12} {value:.3f}")
print(f"(GRPO: mean greedy reward on validation {grpo['reward_before']:.3f} before -> {grpo['validation']['reward']:.3f})")
assert sft["steps"] >= 1 and grpo["steps"] == grpo_steps
assert (out / "grpo" / "best" / "model.safetensors").is_file()

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
