# %% [markdown]
# # Stage 3: prepare the data
#
#     read -> clean (with a report) -> split (seeded, stratified) -> look at lengths -> tokenize -> batch
#
# Our task: 3-class sentiment (negative / neutral / positive) of 38,158 tweets about self-driving cars,
# airlines and stocks. Real data is noisy, and every step below says what it did: nothing is dropped
# without being counted. At the end we meet the one trick that makes CPU training much cheaper: batching
# texts of similar length together, so the batches carry less padding.
#
#     python tutorials/03_prepare_data.py            # ~10 s: length statistics over all training rows
#     python tutorials/03_prepare_data.py --quick    # ~5 s: statistics over a 4,000-row sample
#
# Writes runs/tutorials/03_prepare_data/splits/ (train/validation/test.jsonl + split.json).

# %%
import argparse
import time
from pathlib import Path


import minift
from minift.batching import batch_order, collate
from minift.corpora import TWEET_LABELS, load_tweets, split_folder
from minift.data import clean, format_stats, load_splits, repair_mojibake, save_splits, split, stats
from minift.tasks import encode_classification

parser = argparse.ArgumentParser(description="Stage 3: read, clean, split, tokenize, batch")
parser.add_argument("--quick", action="store_true", help="length statistics on a sample (for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
out = Path(args.runs) / "03_prepare_data"
t_start = time.perf_counter()

# %% [markdown]
# ## 3.1 Read, and look at the raw rows
#
# The corpus is a CSV (columns sentiment, confidence, text). `load_tweets` reads it as rows
# `{"text", "label"}`. Look before you clean: this file was written through a broken text encoder, so
# 27 thousand bytes are not valid UTF-8 at all (they come out as U+FFFD, shown as �), garbled emoji and
# curly quotes survive as junk like `բ_`, and there are HTML entities (`&amp;`), doubled spaces and
# duplicate tweets (retweets).

# %%
csv_path = minift.hub.fetch_tweets()
raw = load_tweets(csv_path)
print(f"{csv_path.name}: {len(raw):,} rows, {raw.invalid_utf8_bytes:,} bytes that are not UTF-8")
print(f"first row: {raw[0]}")
noisy = [r for r in raw if "\ufffd" in r["text"]]
shown = [r for r in noisy if "\ufffd" in r["text"][:60]]
print(f"\n{len(noisy):,} rows hold U+FFFD, e.g. (raw -> repaired):")
for r in shown[:4]:
    print(f"  {r['text'][:70]!r}\n  -> {repair_mojibake(r['text'])[:70]!r}")
assert raw.invalid_utf8_bytes > 0 and noisy

# %% [markdown]
# ## 3.2 Clean, with a report
#
# `clean` drops empty texts, labels outside our three and exact duplicates (judged on the text as read),
# repairs what it can of the encoding (drops the U+FFFD and undoes UTF-8-read-as-cp1252, `â€™` -> `’`,
# where it finds it) and collapses whitespace. It leaves URLs, @names and `&amp;` as written: the model
# sees them in tweets it will classify later, too. Every number in the report adds up:
# rows read - drops = rows kept.

# %%
rows, report = clean(raw, labels=TWEET_LABELS)
print(f"\n{report}")
drops = report.dropped_empty + report.dropped_unknown_label + report.dropped_duplicate + report.dropped_too_long
assert report.rows_in - drops == report.rows_out == len(rows)
assert not any("\ufffd" in r["text"] or "  " in r["text"] for r in rows)

# %% [markdown]
# ## 3.3 Split 80 / 10 / 10, stratified, seeded
#
# - **train** (80%): the model learns from it.
# - **validation** (10%): we choose settings (learning rate, epochs, the best checkpoint) by it.
# - **test** (10%): held out, looked at *once* at the very end (stage 7). Choosing anything by the test
#   score turns it into a second validation set, and the number stops being an honest estimate.
#
# *Stratified*: each class is cut in the same proportions, so all three splits have the same label
# balance (with 3,700 rows per held-out split, a plain random cut would be close too; with a small or
# very skewed dataset it would not). *Seeded*: the same seed gives the same split on every machine, so
# the test set stays the same set across runs. `split` shuffles each split too (the file is sorted by
# topic), so its first k rows are a fair sample.

# %%
splits = split(rows, (0.8, 0.1, 0.1), seed=0)
print()
for name, part in splits.items():
    s = stats(part)
    balance = "  ".join(f"{label} {n / s['rows']:.1%}" for label, n in s["labels"].items())
    print(f"{name:<11} {s['rows']:>6,} rows   {balance}")
shares = {name: {k: n / len(part) for k, n in stats(part)["labels"].items()} for name, part in splits.items()}
for label in TWEET_LABELS:
    assert max(s[label] for s in shares.values()) - min(s[label] for s in shares.values()) < 0.002
assert sum(len(p) for p in splits.values()) == len(rows)

save_splits(splits, out / "splits", seed=0, fractions=(0.8, 0.1, 0.1), source=str(csv_path))
print(f"saved to {out / 'splits'} (with split.json saying how they were made)")
# `minift finetune` (and stage 4) made this same split once and keep it in data/splits/tweets-seed0:
# the same seed gives the same rows, row for row.
saved = split_folder()
if (saved / "split.json").is_file():
    assert [r["text"] for r in load_splits(saved)["test"]] == [r["text"] for r in splits["test"]]
    print(f"identical, row for row, to the split minift finetune uses ({saved})")

# %% [markdown]
# ## 3.4 How long are the texts, in tokens?
#
# A transformer's cost grows with sequence length (attention quadratically), and every text is cut to
# `max_length` tokens. So we count tokens with the model's own tokenizer before choosing it. Tweets are
# short: a max_length of 64 truncates only 0.2% of the rows and halves the worst case against 128.

# %%
tok = minift.load_tokenizer("minilm")
train = splits["train"] if not args.quick else splits["train"][:4000]
length_stats = stats(train, tok, max_length=64)
print(f"\ntoken lengths of {'all' if not args.quick else 'a sample of'} {len(train):,} training rows:")
print(format_stats(length_stats))
longest = max(train, key=lambda r: len(tok.encode(r["text"])))
print(f"the longest row ({len(tok.encode(longest['text']))} tokens): {longest['text'][:110]!r}...")
assert length_stats["tokens"]["p99"] <= 64, "max_length 64 should keep 99% of the tweets whole"

# %% [markdown]
# ## 3.5 Tokenize once, pad per batch, mask
#
# `encode_classification` turns each row into token ids (cut to max_length, `[CLS]` ... `[SEP]`) and a
# class index, once, up front. Padding waits until a batch is formed: `collate` pads every row to the
# longest row *of that batch* and builds the attention mask (1 = real token, 0 = padding, which attention
# ignores). Labels are class indices, one per row.

# %%
encoded = encode_classification(train, tok, TWEET_LABELS, max_length=64)
print(f"\nrow 0: {train[0]['text']!r} ({train[0]['label']})\n  -> {encoded[0]}")
batch = collate([encoded[i] for i in range(4)], tok.pad_id)
print("\none batch of 4, collated:")
for key, value in batch.items():
    print(f"{key} {tuple(value.shape)}\n{value}")
assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_id).all()

# %% [markdown]
# ## 3.6 Group by length: less padding, same examples
#
# A random batch pads every row to its longest member, and that padding is computed like real tokens
# (then thrown away). `batch_order(..., group_by_length=True)` shuffles, sorts each chunk of 50 batches
# by length, cuts it into batches and shuffles the batches: every example still appears once per epoch,
# the order is still random from batch to batch, but rows inside a batch have similar lengths.

# %%
lengths = [len(e["input_ids"]) for e in encoded]


def padding_of(batches):
    """(fraction of the padded batch that is padding, tokens processed)."""
    real = sum(lengths[i] for b in batches for i in b)
    processed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - real / processed, processed


plain = batch_order(lengths, 32, seed=0, epoch=0, group_by_length=False)
grouped = batch_order(lengths, 32, seed=0, epoch=0, group_by_length=True)
assert sorted(i for b in plain for i in b) == sorted(i for b in grouped for i in b) == list(range(len(lengths)))
pad_plain, cost_plain = padding_of(plain)
pad_grouped, cost_grouped = padding_of(grouped)
print(f"\nbatches of 32 over {len(lengths):,} rows:")
print(f"  random batches      padding {pad_plain:6.1%}   tokens processed {cost_plain:>9,}")
print(f"  grouped by length   padding {pad_grouped:6.1%}   tokens processed {cost_grouped:>9,}  "
      f"({1 - cost_grouped / cost_plain:.0%} less work)")
print(f"  lengths in the first grouped batch: {sorted(lengths[i] for i in grouped[0])}")
assert pad_grouped < pad_plain

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
