# %% [markdown]
# # The decoder track: instruction-tune a real LLM (SmolLM2-135M-Instruct)
#
# Stage 4 fine-tuned an encoder with a new classification head. A decoder needs no new head: it answers in
# words. We give SmolLM2 the tweets of the default task as instructions,
#
#     user:      Answer with one word: negative, neutral or positive.  Tweet: <the tweet>
#     assistant: negative<|im_end|>
#
# and score it by **exact match**: generate up to 4 tokens greedily, and count the answers that are the
# label word (case and a final full stop do not matter). The same score before fine-tuning (zero-shot) and
# after says whether fine-tuning did anything. Three things make it work:
#
# 1. the chat template: the prompt the model was tuned on (ChatML for SmolLM2) matters more than any
#    hyperparameter;
# 2. prompt masking: the loss trains only the answer and its end-of-turn token `<|im_end|>` (so the
#    model learns to stop); every prompt token has label -100;
# 3. full-parameter training of all 134.5M weights with our hand-written backward (stage 4's loop).
#
#     python tutorials/09_instruction_tuning.py --quick   # CI: 32 training rows, 4 steps, 16 rows scored
#     python tutorials/09_instruction_tuning.py           # 2,400 training rows, 300 steps, 300 rows scored
#
# Measured on this project's 2-core Xeon (AMX, bf16 matmuls), idle: --quick takes 46 s (about 3 s a training
# step of 8 x ~80 tokens; zero-shot exact match 0.1875 -> 0.3750 on 16 rows after 4 steps: the model learns
# the one-word format first). A middle size, `minift finetune --task instruct --limit 800` (the same job:
# 100 steps on 800 rows, 200 rows scored), took 9.2 minutes: exact match on 200 validation rows 0.19
# zero-shot -> 0.695 tuned, 0.655 on 200 test rows (MiniLM's classifier: 0.81). The full run here (300
# steps + 300 rows scored twice) was not run; at that pace, about 25 minutes. The SmolLM2 weights are
# fetched and converted on first use (`minift.hub.fetch_smollm2`). Writes
# runs/tutorials/09_instruction_tuning/{quick,full}/: best/ (lowest validation loss, with the chat
# template), log.jsonl, results.json.

# %%
import argparse
import shutil
import time
from pathlib import Path

import minift
from minift import TrainConfig
from minift.batching import collate
from minift.corpora import TWEET_INSTRUCTION, load_instruction_splits
from minift.instruct import finetune_instruct
from minift.tasks import encode_instruction, format_instruction, show_supervised

parser = argparse.ArgumentParser(description="instruction-tune SmolLM2 on the tweets, exact match before/after")
parser.add_argument("--quick", action="store_true", help="a few steps on a few rows (for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
out = Path(args.runs) / "09_instruction_tuning" / ("quick" if args.quick else "full")
t_start = time.perf_counter()
shutil.rmtree(out, ignore_errors=True)  # a fresh run

# The MiniLM classifier of stage 4 on the same split (tutorials/README.md: the main job, 4.6 minutes on
# this 2-core CPU): test accuracy 0.8153. Not retrained here.
MINILM_TEST_ACCURACY = 0.8153

# %% [markdown]
# ## 1. The chat template
#
# SmolLM2-135M-*Instruct* was tuned on ChatML conversations. Its tokenizer_config.json carries the
# template; `apply_chat_template` writes it (with the default system prompt the template adds when the
# conversation has none) and ends with the generation prompt `<|im_start|>assistant\n`: the model's turn.

# %%
tok = minift.load_tokenizer("smollm2")
tweet = "Self-driving cars will save lives, I am sure of it"
prompt = tok.apply_chat_template([{"role": "user", "content": TWEET_INSTRUCTION.format(text=tweet)}])
print(prompt)
print(f"end of turn: {tok.id_to_token(tok.eos_id)!r} (id {tok.eos_id}), also the padding id {tok.pad_id}")

# %% [markdown]
# ## 2. Prompt masking: which tokens are trained
#
# The tweets, with the same stratified 80/10/10 split as the classifier (seed 0), become prompt/response
# rows; `format_instruction` wraps a row's prompt in the chat template (section 1), and `encode_instruction`
# tokenizes prompt and response apart (the boundary is exact), joins them and the end-of-turn token, and
# labels the prompt -100. `show_supervised` prints what the loss sees: `·` for a masked token.

# %%
splits = load_instruction_splits(None)  # the rows as they are: {"prompt": the instruction, "response": the label}
row = splits["train"][0]
(example,), _ = encode_instruction([row], tok, max_length=256)
print(show_supervised(collate([example], tok.pad_id), tok))
prompt, _ = format_instruction(row, tok)  # what encode_instruction tokenized as the prompt: the chat template's
n_prompt = len(tok.encode(prompt, add_special_tokens=False))
assert example["labels"][:n_prompt] == [-100] * n_prompt, "every prompt token is masked"
assert example["labels"][-1] == tok.eos_id, "the end-of-turn token keeps its label"
print(f"{len(example['input_ids'])} tokens, {n_prompt} of them prompt (masked); trained: "
      f"{tok.decode(example['labels'][n_prompt:], skip_special_tokens=False)!r}")

# %% [markdown]
# ## 3. Zero-shot, fine-tune, score again
#
# `finetune_instruct` is the job `minift finetune --task instruct` runs: it prints greedy answers to 3
# validation prompts and the zero-shot exact match, the memory estimate (weights, gradients, AdamW state,
# activations), trains with validation loss as "best", reloads best/ and prints the validation loss,
# perplexity, the answers and the exact match again. A full fine-tune of a pretrained LLM takes a small
# learning rate; the rows are short, so batches of 8 cost a few seconds a step on 2 cores.

# %%
if args.quick:
    rows, score_rows = 32, 16
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-4, warmup_ratio=0.0, metric="loss", seed=0)
else:
    rows, score_rows = 2400, 300
    cfg = TrainConfig(epochs=1, batch_size=8, lr=5e-5, warmup_ratio=0.05, metric="loss", eval_every=100, seed=0)
report = finetune_instruct("smollm2", data=None, out=out, cfg=cfg, max_length=256, limit=rows, test=False,
                           score_rows=score_rows)

# %% [markdown]
# ## 4. Did it work?
#
# Zero-shot, SmolLM2 often answers with a sentence or lists the three words, which exact match counts as
# wrong. Fine-tuning teaches the format first (one word, then `<|im_end|>`), and with more steps the
# sentiment itself. The MiniLM classifier beside it was trained on all 29,794 rows (stage 4, the main job).

# %%
before, after = report["exact_match_before"], report["exact_match_after"]
print(f"\nexact match on {score_rows} validation tweets: zero-shot {before:.4f} -> instruction-tuned {after:.4f} "
      f"({report['steps']} steps on {report['train_rows']} rows, {report['seconds']:.0f} s of training)")
print(f"the MiniLM classifier (stage 4, full recipe; tutorials/README.md): test accuracy {MINILM_TEST_ACCURACY:.4f}")
if not args.quick:
    assert after > before, "a few hundred steps should beat the zero-shot score"

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
