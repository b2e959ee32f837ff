# %% [markdown]
# # Stage 2: define the task
#
# The same pretrained body can be trained for very different jobs. What decides the job is two small
# things bolted on at the end: the **head** (what turns hidden states into predictions) and the **loss**
# (what counts as a mistake). This stage builds both for the two tasks minift knows:
#
# 1. **Classification** (tweet sentiment): one vector per text -> a linear layer -> 3 logits ->
#    cross-entropy against the true class.
# 2. **Causal language modelling / instruction tuning** (GPT-2): a logit over the vocabulary at every
#    position -> cross-entropy against the *next* token, counted only on the response, never on the
#    prompt or padding (those labels are -100).
#
#     python tutorials/02_define_task.py [--quick]      # a few seconds; no training here
#
# We check both losses by hand: an untrained 3-way classifier should be as unsure as a coin with three
# faces (loss ln 3), and masked positions must carry no loss at all.

# %%
import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import minift
from minift.batching import collate
from minift.checkpoints import build_model
from minift.corpora import TWEET_LABELS, load_classification_splits
from minift.data import read_jsonl
from minift.tasks import ALPACA_TEMPLATE, encode_classification, encode_instruction, show_supervised

parser = argparse.ArgumentParser(description="Stage 2: the head and the loss")
parser.add_argument("--quick", action="store_true", help="the same lesson (it is already quick); for CI")
args = parser.parse_args()
t_start = time.perf_counter()
torch.manual_seed(0)
DATA = Path(__file__).resolve().parent / "data" / "instructions.jsonl"

# %% [markdown]
# ## 2.1 Classification: from token vectors to one vector per text
#
# The encoder gives one 384-number vector per token. A classifier needs one per *text*. Two common ways:
# - **[CLS] pooling** (BERT's way): take the vector of the first token, `[CLS]`, through the pretrained
#   pooler (a dense layer + tanh). The pooler's weights come from the checkpoint.
# - **mean pooling** (sentence-transformers' way, how MiniLM was trained): average the vectors of the real
#   tokens. No pooler needed, so the loader says it dropped it.
#
# Either way, the head is a new `Linear(384, 3)`: `classifier.weight` and `classifier.bias`, which the
# checkpoint does not have. The load report names them: they start random and are learnt from scratch.

# %%
print("== [CLS] pooling ==")
clf = minift.load("minilm", task="classify", num_labels=3, pooling="cls")
print("\n== mean pooling ==")
clf_mean = minift.load("minilm", task="classify", num_labels=3, pooling="mean")
assert clf.load_report.new_head == ["classifier.weight", "classifier.bias"]
assert "pooler.dense.weight" in clf_mean.load_report.dropped_head  # mean pooling has no use for it
print(f"\nthe new head: classifier.weight {tuple(clf.classifier.weight.shape)}, "
      f"classifier.bias {tuple(clf.classifier.bias.shape)}")

# %% [markdown]
# ## 2.2 Logits and the cross-entropy loss
#
# We run a batch of 16 real tweets through. The logits have shape [batch, classes]: one score per class.
# Softmax turns them into probabilities; the loss is minus the log of the probability given to the true
# class, averaged over the batch. A fresh head has tiny random weights, so all three logits are near 0,
# every class gets about 1/3, and the loss is about -ln(1/3) = ln 3 = 1.0986. That is the number to expect
# at step 0 of any 3-class fine-tune; if you see 5.0, something is wrong before training starts.

# %%
splits, label_names = load_classification_splits()  # the offline tweet splits (made once, reused)
assert tuple(label_names) == TWEET_LABELS
tok = minift.load_tokenizer("minilm")
rows = splits["train"][:16]
examples = encode_classification(rows, tok, label_names, max_length=64)
batch = collate(examples, tok.pad_id)
print(f"\nbatch: input_ids {tuple(batch['input_ids'].shape)}, labels {batch['labels'].tolist()}")

for name, model in (("[CLS] pooling", clf), ("mean pooling", clf_mean)):
    model.eval()  # no dropout, and nothing kept for a backward
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"])
        loss, _ = model.loss(logits, batch["labels"])
    probs = logits.softmax(-1)
    print(f"\n{name}: logits shape {tuple(logits.shape)}  (batch x {len(label_names)} classes)")
    for r, row_logits, p in list(zip(rows, logits.tolist(), probs.tolist()))[:3]:
        print(f"  {r['text'][:48]!r:<52} logits {[round(v, 3) for v in row_logits]}  probs {[round(v, 3) for v in p]}")
    print(f"  untrained loss {loss.item():.4f}   ln 3 = {math.log(3):.4f}")
    # the same loss by hand: mean over the batch of -log p(true class)
    by_hand = -probs.log()[torch.arange(len(rows)), batch["labels"]].mean()
    assert torch.allclose(loss, by_hand, atol=1e-5)
    assert abs(loss.item() - math.log(3)) < 0.3, "an untrained 3-way head should have a loss near ln 3"

# %% [markdown]
# ## 2.3 Causal language modelling: every position predicts the next token
#
# A decoder such as GPT-2 outputs, at every position t, a score for every token of the vocabulary: its
# guess for token t+1. The labels are the input ids themselves; the loss shifts them by one (position t is
# scored against `labels[t+1]`), as in Hugging Face.
#
# For **instruction tuning** we train on (instruction, input, output) rows such as those of Stanford
# Alpaca. The prompt (a fixed template around the instruction) and the response are joined into one
# sequence, then an end-of-text token so the model learns to stop. We want the model to learn to *answer*,
# not to reproduce the prompt: so every prompt label is set to -100, which the loss skips. The prompt is
# still in the input: the model reads it, it is just never graded on predicting it. Padding gets -100
# too. EOS keeps its label.
#
# To see this with real tokens we need a GPT-2-style tokenizer. GPT-2's own (50,257 tokens) comes with its
# weights; we train a small byte-level BPE on our instruction data instead, in a second, with the
# `tokenizers` library. Byte-level means any text can be spelled from 256 byte tokens, and merges of
# frequent pairs make longer tokens.

# %%
instructions = read_jsonl(DATA)
print(f"\n{len(instructions)} instruction rows from {DATA.name}, e.g. {dict(instructions[6])}")


def train_bpe(texts, vocab_size=600):
    """A GPT-2-style byte-level BPE tokenizer, trained on `texts`, with <|endoftext|> as token 0."""
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return minift.Tokenizer(bpe)  # minift's wrapper: finds <|endoftext|> and pads with it


corpus = list(ALPACA_TEMPLATE.values()) + [f"{r['instruction']} {r['input']} {r['output']}" for r in instructions]
bpe_tok = train_bpe(corpus)
print(f"byte-level BPE: {bpe_tok.vocab_size} tokens, end-of-text id {bpe_tok.eos_id}, pad id {bpe_tok.pad_id}")
sample = "What is 6 times 7?"
print(f"{sample!r} -> {[bpe_tok.id_to_token(i) for i in bpe_tok.encode(sample)]}  (Ġ marks a space)")

# %% [markdown]
# `encode_instruction` builds (input_ids, labels) pairs (the prompt is `format_instruction`'s: Alpaca's
# template, as this tokenizer has no chat template); `collate` pads a batch on the right (labels with
# -100); `show_supervised` prints each row with only the trained tokens visible (a `·` stands for a run of
# prompt tokens). Only the answer and the end-of-text token are learnt. In the table below `labels[t]` is
# the token at t itself (or -100); the loss pairs it with the logits at t-1, which is where the shift by
# one happens: the logits at '\n' are graded on predicting '2'.

# %%
lm_rows = [instructions[i] for i in (0, 6, 14)]
lm_examples, dropped = encode_instruction(lm_rows, bpe_tok, max_length=128)
lm_batch = collate(lm_examples, bpe_tok.pad_id, padding_side="right")
print(f"\nbatch: input_ids {tuple(lm_batch['input_ids'].shape)}, labels {tuple(lm_batch['labels'].shape)}, "
      f"dropped {dropped}")
print(show_supervised(lm_batch, bpe_tok))

ids, labels = lm_batch["input_ids"][0].tolist(), lm_batch["labels"][0].tolist()
first = next(i for i, y in enumerate(labels) if y != -100)
print("\nrow 0 around the prompt/response boundary (position, token, label):")
for t in range(first - 3, min(first + 8, len(ids))):
    shown = bpe_tok.decode([ids[t]], skip_special_tokens=False)
    note = {first: "   <- first supervised token"}.get(t, "")
    if lm_batch["attention_mask"][0, t] == 0:
        note = "   <- padding (the same id as end-of-text), never a target"
    print(f"  {t:>3}  {shown!r:<16} {labels[t]:>5}{note}")
last = max(i for i, y in enumerate(labels) if y != -100)
assert labels[last] == bpe_tok.eos_id  # EOS keeps its label: the model learns to stop
assert all(y == -100 for y, m in zip(lm_batch["labels"][1].tolist(), lm_batch["attention_mask"][1].tolist())
           if m == 0)  # padding is never a target

# %% [markdown]
# ## 2.4 The LM loss, checked by hand
#
# A tiny GPT-2 with random weights (2 layers, 64 wide) is enough to check the loss: the head is GPT-2's
# own token embedding used backwards (weight tying), so the logits have one column per vocabulary entry.
# By hand: shift (drop the last position's logits and the first label), keep the positions whose label
# is not -100, average -log p(label) over them.

# %%
gpt = build_model({"model_type": "gpt2", "vocab_size": bpe_tok.vocab_size, "n_positions": 128, "n_embd": 64,
                   "n_layer": 2, "n_head": 4, "eos_token_id": bpe_tok.eos_id}, task="lm").eval()
with torch.no_grad():
    lm_logits = gpt(lm_batch["input_ids"], lm_batch["attention_mask"])
    lm_loss, _ = gpt.loss(lm_logits, lm_batch["labels"])
V = lm_logits.shape[-1]
shift_logits, shift_labels = lm_logits[:, :-1].reshape(-1, V), lm_batch["labels"][:, 1:].reshape(-1)
kept = shift_labels != -100
by_hand = F.cross_entropy(shift_logits[kept], shift_labels[kept])  # mean over supervised tokens only
everything = F.cross_entropy(shift_logits, lm_batch["input_ids"][:, 1:].reshape(-1))  # if nothing were masked
print(f"\nlogits {tuple(lm_logits.shape)} (batch x positions x vocabulary)")
print(f"model.loss            {lm_loss.item():.6f}  over {int(kept.sum())} supervised tokens")
print(f"by hand, masked       {by_hand.item():.6f}")
print(f"by hand, every token  {everything.item():.6f}  (what we would train on without the -100s)")
print(f"ln(vocabulary)        {math.log(V):.6f}  (an untrained LM is about this unsure)")
assert abs(lm_loss.item() - by_hand.item()) < 1e-5

# Masked positions carry no loss: scramble the logits wherever the next label is -100, and the loss does
# not move by a single bit.
scrambled = lm_logits.clone()
masked_positions = lm_batch["labels"][:, 1:] == -100
scrambled[:, :-1][masked_positions] = torch.randn(int(masked_positions.sum()), V) * 10
with torch.no_grad():
    loss_scrambled, _ = gpt.loss(scrambled, lm_batch["labels"])
print(f"loss after scrambling the logits at all {int(masked_positions.sum())} masked positions: "
      f"{loss_scrambled.item():.6f}")
assert loss_scrambled.item() == lm_loss.item()

# %% [markdown]
# ## Summary
#
# | task | head | one prediction per | loss over | untrained loss |
# |---|---|---|---|---|
# | classification | pooling + Linear(hidden, classes) (new) | text | every example | ln(classes) |
# | causal LM / instructions | the token embedding, tied (pretrained) | token | response + EOS tokens | ln(vocab) |
#
# Next, stage 3 prepares the data the classifier will learn from.

# %%
print(f"""
task            head                                  predicts per   loss counted on
classification  pooling + new Linear(384 -> 3)        text           every example (untrained: ln 3)
instruction LM  tied token embedding (pretrained)     token          response + EOS, prompt/pad -100

all checks passed ({time.perf_counter() - t_start:.1f} s)""")
