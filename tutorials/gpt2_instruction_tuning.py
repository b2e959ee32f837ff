# %% [markdown]
# # The GPT-2 track: instruction tuning
#
# The classifier track taught a model to pick one of three labels. Instruction tuning teaches a *decoder*
# to answer: given "What is 6 times 7?", write "6 times 7 is 42." and stop. The recipe (Stanford Alpaca's):
#
# 1. wrap each (instruction, input, output) row in a fixed prompt template;
# 2. train the ordinary next-token loss, but only on the response and the end-of-text token (the prompt's
#    labels are -100, stage 2 showed why and how);
# 3. generate with the same template, greedily, until end-of-text.
#
# Our data is tutorials/data/instructions.jsonl: 42 hand-written rows (arithmetic, words, a few facts).
# Real instruction sets have tens of thousands; 42 rows can only show the mechanics, and the model will
# mostly memorise them. That is fine: the point is to see every piece move.
#
#     python tutorials/gpt2_instruction_tuning.py --quick   # < 1 min: a tiny random-init GPT-2
#     python tutorials/gpt2_instruction_tuning.py           # GPT-2 124M if weights/gpt2 exists (minutes),
#                                                          # else the tiny model, trained longer
#
# GPT-2's weights (500 MB) are not shipped offline. Where you are online: `minift download gpt2`
# (or copy config.json, model.safetensors and tokenizer.json from the Hugging Face repo
# openai-community/gpt2 into weights/gpt2/). Without them this script builds a tiny GPT-2 from scratch with
# a byte-level BPE tokenizer trained here, so the same pipeline still runs end to end.
#
# Writes runs/tutorials/gpt2_instruction_tuning/{quick,full}/: log.jsonl, best/ (lowest validation loss),
# checkpoint/, tokenizer.json (the tiny model's).

# %%
import argparse
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import minift
from minift import TrainConfig, TrainData, train
from minift.checkpoints import build_model
from minift.data import read_jsonl, split
from minift.resume import read_log
from minift.tasks import ALPACA_TEMPLATE, encode_instruction

parser = argparse.ArgumentParser(description="GPT-2 instruction tuning (a tiny random-init GPT-2 without weights)")
parser.add_argument("--quick", action="store_true", help="the tiny model, a short run (for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
out = Path(args.runs) / "gpt2_instruction_tuning" / ("quick" if args.quick else "full")
DATA = Path(__file__).resolve().parent / "data" / "instructions.jsonl"
t_start = time.perf_counter()
minift.seed_everything(0)
shutil.rmtree(out, ignore_errors=True)  # a fresh run (train() would move an earlier run aside, to previous-1/)
out.mkdir(parents=True)

# %% [markdown]
# ## 1. The model: pretrained GPT-2 if we have it, else a tiny one from scratch

# %%
rows = read_jsonl(DATA)  # {"instruction", "input", "output"}, Alpaca's fields
pretrained = False
if not args.quick:
    try:
        folder = minift.resolve_model("gpt2")
        pretrained = True
    except minift.MiniftError as e:
        print(f"no GPT-2 weights here: {e}\n")
if pretrained:
    print(f"GPT-2 124M from {folder}")
    model = minift.load(folder, task="lm")
    tok = minift.load_tokenizer(folder)
    tokenizer_file = folder / "tokenizer.json"
    template = ALPACA_TEMPLATE  # Stanford Alpaca's prompt, as GPT-2 instruction tunes usually use
else:
    print("the tiny track: a random-init GPT-2 and a byte-level BPE tokenizer trained on our 42 rows.\n"
          "(for the real one: `minift download gpt2` where you are online, or copy config.json,\n"
          " model.safetensors and tokenizer.json of openai-community/gpt2 into weights/gpt2/)\n")
    # Alpaca's template spends ~40 tokens of boilerplate on every row. A model with no pretraining gains
    # nothing from its wording, so the tiny track uses a short one (4x less compute per row). What matters
    # is to use the same template in training and in generation.
    template = {"prompt_input": "Q: {instruction}\nIn: {input}\nA: ", "prompt_no_input": "Q: {instruction}\nA: "}
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's: bytes, Ġ for a space
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(template.values()) + [" ".join(r.values()) for r in rows],
                            trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer_file = out / "tokenizer.json"
    bpe.save(str(tokenizer_file))
    tok = minift.Tokenizer.from_file(tokenizer_file)
    # GPT-2's shape, shrunk: 2 layers, 128 wide (GPT-2 small: 12 layers, 768 wide). No dropout: with 42
    # rows we want to see it learn them, not to regularise.
    config = {"model_type": "gpt2", "vocab_size": tok.vocab_size, "n_positions": 256, "n_embd": 128,
              "n_layer": 2, "n_head": 4, "eos_token_id": tok.eos_id, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
              "attn_pdrop": 0.0}
    model = build_model(config, task="lm")
n_params = sum(p.numel() for p in model.parameters())
print(f"{type(model).__name__}: {n_params / 1e6:.2f}M parameters, vocabulary {tok.vocab_size:,}, "
      f"end-of-text id {tok.eos_id}")

# %% [markdown]
# ## 2. The data: prompt + response + EOS, prompt labels -100
#
# We hold out a few rows as a validation set. With the tiny model they show what 42 rows cannot teach (a
# model that has seen no English besides these rows does not generalise); with GPT-2 they show whether
# the format carries over to new instructions.
#
# Each row goes to `encode_instruction` as a prompt/response row with the prompt already in our template:
# for a tokenizer without a chat template (GPT-2's, or ours) it uses such a prompt as written, so training
# sees exactly the prompt that generation will use.

# %%
def prompt_of(row):
    key = "prompt_input" if row.get("input") else "prompt_no_input"
    return template[key].format(instruction=row["instruction"], input=row.get("input"))


def prompt_rows(rows_):
    return [{"prompt": prompt_of(r), "response": r["output"]} for r in rows_]


parts = split(rows, (0.85, 0.15, 0.0), seed=0, stratify=None)
train_rows, val_rows = parts["train"], parts["validation"]
train_ex, dropped = encode_instruction(prompt_rows(train_rows), tok, max_length=256)
val_ex, _ = encode_instruction(prompt_rows(val_rows), tok, max_length=256)
print(f"\none training sequence (prompt + response + end-of-text):\n{tok.decode(train_ex[0]['input_ids'], False)!r}")
n_sup = sum(sum(y != -100 for y in e["labels"]) for e in train_ex)
n_tok = sum(len(e["input_ids"]) for e in train_ex)
print(f"\n{len(train_ex)} training rows ({dropped} dropped as too long), {len(val_ex)} validation rows; "
      f"{n_sup} of {n_tok} training tokens are supervised ({n_sup / n_tok:.0%}: the rest is prompt)")


@torch.no_grad()
def answer(rows_, max_new_tokens=24):
    """Greedy answers to rows' prompts: left-padded batch, generation stops at end-of-text."""
    batch = tok([prompt_of(r) for r in rows_], padding_side="left")  # a decoder continues from the right end
    out_ids = model.generate(batch["input_ids"], max_new_tokens=max_new_tokens,
                             attention_mask=batch["attention_mask"], eos_token_id=tok.eos_id)
    return [tok.decode(ids[batch["input_ids"].shape[1]:]).strip() for ids in out_ids]


def show(title, rows_, answers):
    print(f"\n{title}")
    for r, a in zip(rows_, answers):
        question = r["instruction"] + (f" [{r['input']}]" if r.get("input") else "")
        print(f"  {question:<58} -> {a!r:<34} (expected {r['output']!r})")


probe_train, probe_val = train_rows[:4], val_rows[:3]
before_train, before_val = answer(probe_train), answer(probe_val)
show("before training, rows it will train on:", probe_train, before_train)
show("before training, held-out rows:", probe_val, before_val)

# %% [markdown]
# ## 3. Train
#
# The same `train()` as the classifier: AdamW, warmup + linear decay, clipping, our hand-written backward
# (GPT-2's tied embedding gets the sum of its two gradients). Two settings differ:
# - `metric="loss"`: "best" means the lowest validation loss (there is no accuracy for free text);
# - `TrainData(..., padding_side="right")` for training (labels line up with inputs; generation uses left
#   padding).
#
# A pretrained GPT-2 needs a gentle lr (5e-5) and a few epochs; a random-init model needs a much larger
# lr (1e-3) and many more passes over the same 36 rows.

# %%
if pretrained:
    cfg = TrainConfig(epochs=3, batch_size=8, lr=5e-5, warmup_ratio=0.1, metric="loss", eval_every=5, log_every=5,
                      precision="auto")  # bf16 where the hardware has it
else:
    cfg = TrainConfig(epochs=30 if args.quick else 150, batch_size=8, lr=1e-3, warmup_ratio=0.05, metric="loss",
                      eval_every=50, log_every=50, group_by_length=False)
model.tokenizer_file = tokenizer_file  # copied into best/ and checkpoint/, beside the weights
result = train(model, TrainData(train_ex, val_ex, tok.pad_id, padding_side="right"), cfg, out)
steps, evals = read_log(out / "log.jsonl")  # (training records, evaluation records)
losses = [r["loss"] for r in steps]
k = max(2, len(losses) // 10)
first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
print(f"\n{len(losses)} steps in {result['seconds']:.0f} s; training loss, mean of the first {k} steps {first:.3f} "
      f"-> last {k} steps {last:.3f}; validation loss at the end {evals[-1]['eval']['loss']:.3f} "
      f"(best {result['best']:.3f} at step {result['best_step']}, saved in {out / 'best'})")
print("validation loss by step: " + ", ".join(f"{e['step']}: {e['eval']['loss']:.2f}" for e in evals))
assert last < first, "the training loss should fall"

# %% [markdown]
# ## 4. Generate again
#
# The same prompts, greedy decoding. On the rows it trained on, the model now answers in the right format
# and stops at end-of-text. Held-out rows tell the honest story: the tiny model has only ever seen 36
# answers and recombines them; a pretrained GPT-2 brings its knowledge of English, and instruction tuning
# mostly teaches it the format. (The tiny model's full run is a clean case of over-fitting: its training
# loss goes to ~0 while the validation loss bottoms out early and climbs; stage 5 is about exactly that,
# and `best/` keeps the checkpoint from the bottom.)

# %%
after_train, after_val = answer(probe_train), answer(probe_val)
show("after training, rows it trained on:", probe_train, after_train)
show("after training, held-out rows:", probe_val, after_val)
exact = sum(a == r["output"] for a, r in zip(after_train, probe_train))
print(f"\n{exact} of {len(probe_train)} training answers reproduced exactly after training "
      f"(before: {sum(a == r['output'] for a, r in zip(before_train, probe_train))})")
if not pretrained:
    assert exact >= 1, "the tiny model should have learnt to reproduce some training answers"

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
