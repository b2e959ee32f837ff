"""Stages 2-3 of fine-tuning: define the task and prepare the dataset.

    read -> clean (with a report) -> split (seeded, stratified) -> tokenize once -> pad per batch

A row is a plain dict: {"text": ..., "label": ...} for classification, {"instruction", "input",
"output"} (or {"prompt", "response"}) for instruction tuning. Every step returns new rows and says what it
did: nothing is dropped without being counted.

    rows = read_csv("tweets.csv", {"text": "text", "label": "sentiment"})
    rows, report = clean(rows, labels=TWEET_LABELS); print(report)
    splits = split(rows, (0.8, 0.1, 0.1), seed=0)
    train = encode_classification(splits["train"], tok, TWEET_LABELS, max_length=64)
    for idx in batch_order([len(e["input_ids"]) for e in train], 32, seed=0, epoch=0):
        batch = collate([train[i] for i in idx], tok.pad_id)
"""
import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .errors import MiniftError

# ---------------------------------------------------------------------------------------------------
# 1. Readers


class Rows(list):
    """A list of row dicts that also remembers how many bytes of its file were not valid UTF-8.

    Readers return it so that clean() can put that count in its report; otherwise it is a plain list
    (slicing or filtering it gives a plain list, and the count is then simply not reported)."""

    def __init__(self, rows=(), invalid_utf8_bytes=0):
        super().__init__(rows)
        self.invalid_utf8_bytes = invalid_utf8_bytes


_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _read_utf8(path):
    """The text of a file and how many of its bytes were not UTF-8 (each now one U+FFFD)."""
    path = Path(path)
    if not path.is_file():
        raise MiniftError(f"{path}: no such file; check the path")
    # surrogateescape turns each byte that is not UTF-8 into one stand-in character, so we can count
    # them exactly, then swap each for U+FFFD (as errors="replace" would). utf-8-sig drops Excel's BOM.
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    text, bad = _BAD_BYTE.subn("\ufffd", text)
    if not text.strip():
        raise MiniftError(f"{path}: the file is empty; check the path or export the data again")
    return text, bad


def read_csv(path, columns, delimiter=None):
    """Rows of a CSV file (or TSV: .tsv/.tab, or delimiter="\\t") as dicts {our field: value}.

    columns maps our field names to the file's column names: {"text": "tweet", "label": "sentiment"}."""
    text, bad = _read_utf8(path)
    if delimiter is None:
        delimiter = "\t" if Path(path).suffix.lower() in (".tsv", ".tab") else ","
    # TSV files rarely quote fields, and one stray " in a tweet would swallow the lines after it.
    # strict: an unclosed quote is an error, not a field that quietly eats the rest of the file.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    rows, end = Rows(invalid_utf8_bytes=bad), 0
    try:
        header = next(reader)
        for col in columns.values():
            if col not in header:
                raise MiniftError(f"{path}:1: no column {col!r}; the columns are {', '.join(header)}; "
                                  f"fix the columns mapping")
        where = {field: header.index(col) for field, col in columns.items()}
        end = reader.line_num
        for values in reader:
            start, end = end + 1, reader.line_num  # a quoted field may span lines
            if not values:
                continue  # a blank line
            if len(values) != len(header):
                hint = f" (the row runs to line {end}: a stray quote?)" if end > start else ""
                raise MiniftError(f"{path}:{start}: {len(values)} fields, but the header has "
                                  f"{len(header)}{hint}; quote fields that contain {delimiter!r}")
            rows.append({field: values[i] for field, i in where.items()})
    except csv.Error as e:
        raise MiniftError(f"{path}:{end + 1}: {e}; check the quotes in the row that starts here") from None
    if not rows:
        raise MiniftError(f"{path}: a header but no rows; check the file")
    return rows


def read_jsonl(path, columns=None):
    """Rows of a JSON-lines file, one object per line (a .json file holding one list works too).

    columns maps our fields to the file's keys, e.g. {"instruction": "instruction", "input": "input",
    "output": "output"} (Alpaca) or {"prompt": "question", "response": "answer"}; None keeps every key."""
    text, bad = _read_utf8(path)
    if text.lstrip().startswith("["):  # one JSON list, like the original alpaca_data.json
        try:
            numbered = list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise MiniftError(f"{path}:{e.lineno}: not JSON ({e.msg}); fix the file") from None
    else:
        numbered = []
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
            if line.strip():
                try:
                    numbered.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise MiniftError(f"{path}:{n}: not JSON ({e.msg}, column {e.colno}); each line "
                                      f"must be one JSON object") from None
    rows = Rows(invalid_utf8_bytes=bad)
    for n, obj in numbered:
        if not isinstance(obj, dict):
            raise MiniftError(f"{path}:{n}: a JSON {type(obj).__name__}, not an object; each row must "
                              f"be one {{...}}")
        for col in (columns or {}).values():
            if col not in obj:
                raise MiniftError(f"{path}:{n}: no key {col!r}; the keys are {', '.join(obj)}; fix the "
                                  f"columns mapping")
        rows.append(dict(obj) if columns is None else {f: obj[c] for f, c in columns.items()})
    return rows


def read_text(path):
    """A raw text file as one row, [{"text": the whole file}], for causal-LM training (pack_blocks)."""
    text, bad = _read_utf8(path)
    return Rows([{"text": text}], invalid_utf8_bytes=bad)


# ---------------------------------------------------------------------------------------------------
# 2. Cleaning, with a report

_URL = re.compile(r"https?://\S+|www\.\S+")
_USER = re.compile(r"(?<!\w)@\w+")  # (?<!\w): leave e-mail addresses alone
_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")


def repair_mojibake(text):
    """Undo UTF-8 that was read as cp1252 (â€™ -> ’, Ã© -> é); drop U+FFFD (those bytes are lost)."""
    return _NON_ASCII_RUN.sub(_undo_cp1252, text.replace("\ufffd", ""))


def _undo_cp1252(match):
    run = match.group()
    try:
        return run.encode("cp1252").decode("utf-8")
    except UnicodeError:  # a real é or emoji is not valid UTF-8 once written as cp1252: keep it
        return run


def mask_urls(text):
    return _URL.sub("http", text)  # the TweetEval convention


def mask_users(text):
    return _USER.sub("@user", text)  # the TweetEval convention


def collapse_whitespace(text):
    return " ".join(text.split())  # newlines too: meant for short texts such as tweets


@dataclass
class CleanReport:
    rows_in: int = 0
    invalid_utf8_bytes: int = 0
    dropped_empty: int = 0
    dropped_unknown_label: int = 0
    dropped_duplicate: int = 0
    dropped_too_long: int = 0
    changed_mojibake: int = 0
    changed_urls: int = 0
    changed_users: int = 0
    changed_whitespace: int = 0
    rows_out: int = 0

    def __str__(self):
        names = {"rows_in": "rows read", "invalid_utf8_bytes": "bytes not UTF-8 (now U+FFFD)",
                 "dropped_empty": "dropped: empty text", "dropped_unknown_label": "dropped: unknown label",
                 "dropped_duplicate": "dropped: exact duplicate", "dropped_too_long": "dropped: too long",
                 "changed_mojibake": "fixed: mojibake", "changed_urls": "changed: URL -> http",
                 "changed_users": "changed: @name -> @user", "changed_whitespace": "fixed: whitespace",
                 "rows_out": "rows kept"}
        lines = ["cleaning report"]
        lines += [f"  {names[f.name]:<30}{getattr(self, f.name):>9,}" for f in fields(self)]
        return "\n".join(lines)


def _apply(fix, text):
    new = fix(text)
    return new, int(new != text)


def clean(rows, labels=None, *, drop_empty=True, dedupe=True, normalize_urls=False,
          normalize_users=False, fix_whitespace=True, fix_mojibake=True, max_tokens=None, tokenizer=None):
    """Drop and fix rows by simple rules on row["text"]; returns (new rows, CleanReport).

    Drops: empty text; a label not in `labels` (when given); an exact duplicate of an earlier text;
    more than max_tokens tokens (when given, with a tokenizer). rows_in - rows_out = all the drops."""
    if max_tokens is not None and tokenizer is None:
        raise MiniftError("clean(max_tokens=...) needs tokenizer= to count tokens; pass one")
    report = CleanReport(rows_in=len(rows), invalid_utf8_bytes=getattr(rows, "invalid_utf8_bytes", 0))
    seen, kept = set(), []
    for n, row in enumerate(rows, 1):
        if "text" not in row:
            raise MiniftError(f"row {n} has no 'text' (it has {', '.join(row)}); map one with "
                              f"columns={{'text': ...}} when reading")
        text = row["text"]
        if drop_empty and not text.strip():
            report.dropped_empty += 1
            continue
        if labels is not None and row.get("label") not in labels:
            report.dropped_unknown_label += 1
            continue
        # Duplicates are judged on the text as read, before any fixing: "exact" means the same
        # characters in the file. (On the tweets this keeps 37,243 rows; after fixing it would be 37,233.)
        if dedupe:
            if text in seen:
                report.dropped_duplicate += 1
                continue
            seen.add(text)
        # Mojibake first, so the URL and @user patterns see clean text; whitespace last, to tidy up
        # the gaps the other fixes leave.
        if fix_mojibake:
            text, changed = _apply(repair_mojibake, text)
            report.changed_mojibake += changed
        if normalize_urls:
            text, changed = _apply(mask_urls, text)
            report.changed_urls += changed
        if normalize_users:
            text, changed = _apply(mask_users, text)
            report.changed_users += changed
        if fix_whitespace:
            text, changed = _apply(collapse_whitespace, text)
            report.changed_whitespace += changed
        if drop_empty and not text.strip():  # e.g. a text that was only U+FFFD
            report.dropped_empty += 1
            continue
        kept.append({**row, "text": text})
    if max_tokens is not None:
        lengths = [len(ids) for ids in tokenizer.encode_batch([r["text"] for r in kept])]
        report.dropped_too_long = sum(n > max_tokens for n in lengths)
        kept = [r for r, n in zip(kept, lengths) if n <= max_tokens]
    report.rows_out = len(kept)
    return kept, report


# ---------------------------------------------------------------------------------------------------
# 3. Splits and statistics

SPLIT_NAMES = ("train", "validation", "test")


def split(rows, fractions=(0.8, 0.1, 0.1), seed=0, stratify="label"):
    """Seeded split into train/validation/test; with stratify, each class is cut in the same fractions.

    Per class: shuffle with default_rng(seed), cut at round(cumulative fraction * n). Every row lands in
    exactly one split. Each split comes out shuffled (files are often sorted by label), so that its first
    k rows are a fair sample of it."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise MiniftError(f"fractions={tuple(fractions)}; give three fractions (train, validation, "
                          f"test) that are >= 0 and sum to 1")
    if stratify is not None and any(stratify not in r for r in rows):
        raise MiniftError(f"split(stratify={stratify!r}) needs {stratify!r} in every row; "
                          f"pass stratify=None for a plain random split")
    groups = {}  # class -> row indices; dict order = first appearance, so the result is deterministic
    for i, row in enumerate(rows):
        groups.setdefault(row[stratify] if stratify is not None else None, []).append(i)
    rng = np.random.default_rng(seed)
    parts = [[] for _ in SPLIT_NAMES]
    for indices in groups.values():
        shuffled = rng.permutation(indices).tolist()
        n = len(shuffled)
        # Cutting at cumulative points makes the parts add up to n exactly, whatever the rounding.
        cuts = [0, round(fractions[0] * n), round((fractions[0] + fractions[1]) * n), n]
        for k in range(3):
            parts[k] += shuffled[cuts[k]:cuts[k + 1]]
    return {name: [rows[i] for i in rng.permutation(part).tolist()] for name, part in zip(SPLIT_NAMES, parts)}


def save_splits(splits, folder, seed=None, fractions=None, source=None):
    """Write train.jsonl, validation.jsonl, test.jsonl and split.json (how they were made) to folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in SPLIT_NAMES:
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in splits[name]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    info = {"seed": seed, "fractions": list(fractions) if fractions else None, "source": source,
            "counts": {name: len(splits[name]) for name in SPLIT_NAMES}}
    (folder / "split.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def load_splits(folder):
    """The splits save_splits wrote: {"train": rows, "validation": rows, "test": rows}."""
    folder = Path(folder)
    splits = {}
    for name in SPLIT_NAMES:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise MiniftError(f"{path}: missing; point at a folder written by save_splits")
        splits[name] = read_jsonl(path) if path.stat().st_size else []  # a 0-fraction split is empty
    return splits


_BINS = ((0, 16), (17, 32), (33, 64), (65, 128), (129, 256), (257, 512), (513, None))  # token counts


def stats(rows, tokenizer=None, max_length=None):
    """Row count, label balance and (with a tokenizer) token lengths: percentiles, a histogram, and how
    many rows max_length would truncate."""
    out = {"rows": len(rows)}
    if rows and all("label" in r for r in rows):
        out["labels"] = dict(sorted(Counter(r["label"] for r in rows).items(), key=lambda kv: str(kv[0])))
    if tokenizer is None or not rows:
        return out
    lengths = np.array([len(ids) for ids in tokenizer.encode_batch([r["text"] for r in rows])])
    out["tokens"] = {"min": int(lengths.min()), "p50": int(np.percentile(lengths, 50)),
                     "p90": int(np.percentile(lengths, 90)), "p99": int(np.percentile(lengths, 99)),
                     "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)}
    hist = []
    for lo, hi in _BINS:
        inside = (lengths >= lo) & (lengths <= (hi if hi is not None else lengths.max()))
        hist.append((f"{lo}-{hi}" if hi is not None else f"{lo}+", int(inside.sum())))
    while hist[-1][1] == 0:
        hist.pop()  # no empty bins above the longest row
    out["histogram"] = hist
    if max_length is not None:
        out["max_length"] = max_length
        out["truncated"] = int((lengths > max_length).sum())
    return out


def format_stats(s):
    """stats() as a few readable lines."""
    lines = [f"rows      {s['rows']:,}"]
    if "labels" in s:
        balance = [f"{label} {n:,} ({n / s['rows']:.1%})" for label, n in s["labels"].items()]
        lines.append("labels    " + "   ".join(balance))
    if "tokens" in s:
        t = s["tokens"]
        lines.append(f"tokens    min {t['min']}  median {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  "
                     f"max {t['max']}  mean {t['mean']}")
        top = max(count for _, count in s["histogram"])
        for label, count in s["histogram"]:
            lines.append(f"  {label:>8} {count:>8,} {'#' * round(30 * count / top)}")
    if "truncated" in s:
        lines.append(f"max_length {s['max_length']} truncates {s['truncated']:,} rows "
                     f"({s['truncated'] / s['rows']:.2%})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# 4. Tokenize once, pad per batch

def encode_classification(rows, tokenizer, label_names, max_length):
    """[{"input_ids": [...], "label": class index}] (no padding: collate pads each batch)."""
    ids = tokenizer.encode_batch([r["text"] for r in rows], max_length=max_length)
    return [{"input_ids": i, "label": _label_id(r["label"], label_names, n)}
            for n, (r, i) in enumerate(zip(rows, ids), 1)]


def _label_id(label, label_names, n):
    if isinstance(label, int) and 0 <= label < len(label_names):
        return label  # already an index
    if label not in label_names:
        raise MiniftError(f"row {n}: label {label!r} is not one of {tuple(label_names)}; drop such rows "
                          f"with clean(rows, labels=...)")
    return list(label_names).index(label)


# The prompts of Stanford Alpaca, with and without an input. Its train.py ends them at "### Response:";
# we add the newline (as alpaca-lora and torchtune do), so the response starts on a line of its own.
ALPACA_TEMPLATE = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"),
}


def _prompt_and_response(row, template, n):
    if "prompt" in row and "response" in row:
        return row["prompt"], row["response"]  # the prompt is used as written, no template
    if "instruction" in row and "output" in row:
        key = "prompt_input" if row.get("input") else "prompt_no_input"
        return template[key].format(instruction=row["instruction"], input=row.get("input")), row["output"]
    raise MiniftError(f"row {n} has fields {', '.join(row)}; an instruction row needs instruction and "
                      f"output (input optional) or prompt and response; map them with columns= when reading")


def encode_instruction(rows, tokenizer, max_length, template=ALPACA_TEMPLATE):
    """Prompt + response + EOS as one sequence; returns (examples, dropped).

    labels[i] is the target for position i (the model's loss shifts by one, as in Hugging Face):
    -100 on every prompt token, the token itself on the response and on EOS (so the model learns to
    stop). Too long: cut from the right, so the prompt survives if it fits; an example left with no
    supervised token is dropped and counted in `dropped`."""
    if tokenizer.eos_id is None:
        raise MiniftError("this tokenizer has no end-of-text token; instruction tuning needs one to stop")
    if not rows:
        return [], 0
    prompts, responses = zip(*(_prompt_and_response(r, template, n) for n, r in enumerate(rows, 1)))
    # Prompt and response are tokenized apart, so the boundary between them is exact.
    prompt_ids = tokenizer.encode_batch(prompts, add_special_tokens=False)
    response_ids = tokenizer.encode_batch(responses, add_special_tokens=False)
    examples, dropped = [], 0
    for p, r in zip(prompt_ids, response_ids):
        r = r + [tokenizer.eos_id]
        ids = (p + r)[:max_length]
        labels = ([-100] * len(p) + r)[:max_length]
        if all(label == -100 for label in labels):
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, dropped


def pack_blocks(texts, tokenizer, block_size):
    """Causal-LM examples from raw text: documents joined with EOS after each, cut into full blocks.

    labels == input_ids (the loss shifts). The tail shorter than one block is left out."""
    if tokenizer.eos_id is None:
        raise MiniftError("this tokenizer has no end-of-text token to separate documents")
    stream = []
    for ids in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream += ids + [tokenizer.eos_id]  # marks where one document ends and the next begins
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise MiniftError(f"the text is {len(stream)} tokens, less than one block of {block_size}; "
                          f"use a smaller block_size or more text")
    blocks = [stream[k * block_size:(k + 1) * block_size] for k in range(n_blocks)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def _pad(seq, value, n, side):
    return seq + [value] * n if side == "right" else [value] * n + seq


def collate(examples, pad_id, padding_side="right"):
    """Pad a list of examples to the longest one: input_ids, attention_mask, labels (LongTensors).

    Classification: labels is [B]. Language modelling / instructions: labels is [B, T], padded with -100
    on the same side as input_ids, so padding is never a target."""
    if not examples:
        raise MiniftError("collate got no examples; check the batch indices")
    if padding_side not in ("right", "left"):
        raise MiniftError(f"padding_side={padding_side!r}; use 'right' or 'left'")
    width = max(len(e["input_ids"]) for e in examples)
    ids, mask, labels = [], [], []
    for e in examples:
        n_pad = width - len(e["input_ids"])
        ids.append(_pad(e["input_ids"], pad_id, n_pad, padding_side))
        mask.append(_pad([1] * len(e["input_ids"]), 0, n_pad, padding_side))
        labels.append(e["label"] if "label" in e else _pad(e["labels"], -100, n_pad, padding_side))
    return {"input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long)}


def batch_order(lengths, batch_size, seed, epoch, shuffle=True, group_by_length=False, drop_last=False):
    """The batches of one epoch, as lists of example indices; each index appears exactly once.

    It depends only on (seed, epoch), so a resumed run rebuilds the same order and skips to batch k.
    group_by_length: shuffle, sort each chunk of 50 batches by length (longest first), cut into batches,
    shuffle the batches. Rows of similar length share a batch: less padding, still random."""
    rng = np.random.default_rng((seed, epoch))
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if group_by_length:
        chunk = 50 * batch_size
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")]
                                for c in np.split(order, range(chunk, len(order), chunk))])
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length and shuffle:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches


def show_supervised(batch, tokenizer):
    """Each row of an LM/instruction batch with only the tokens the loss trains on visible; the others
    (prompt) show as '·', padding is left out. Newlines show as \\n."""
    if batch["labels"].dim() != 2:
        raise MiniftError("show_supervised needs a language-model batch (labels per token), not one "
                          "label per row")
    lines = []
    for b, (labels, mask) in enumerate(zip(batch["labels"].tolist(), batch["attention_mask"].tolist())):
        parts, run = [], []
        for label, m in zip(labels + [-100], mask + [1]):  # a final -100 flushes the last run (its · is cut)
            if not m:
                continue
            if label != -100:
                run.append(label)
                continue
            if run:  # decode runs together: byte-level tokens only make sense side by side
                parts.append(tokenizer.decode(run, skip_special_tokens=False).replace("\n", "\\n"))
                run = []
            parts.append("·")
        n_sup = sum(label != -100 for label in labels)
        lines.append(f"row {b} ({n_sup} of {sum(mask)} tokens trained): " + "".join(parts[:-1]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# 5. Class weights

def class_weights(rows_or_labels, num_labels):
    """Inverse-frequency weights for the loss, scaled to mean 1 (a rare class counts more)."""
    labels = [r["label"] if isinstance(r, dict) else r for r in rows_or_labels]
    if not all(isinstance(y, (int, np.integer)) and 0 <= y < num_labels for y in labels):
        raise MiniftError(f"class_weights needs class indices 0..{num_labels - 1}; pass rows from "
                          f"encode_classification or a list of label ids")
    counts = np.bincount(np.array(labels, dtype=np.int64), minlength=num_labels)
    if (counts == 0).any():
        raise MiniftError(f"class {int(np.argmin(counts))} has no examples, so it has no weight; "
                          f"check the labels or num_labels")
    weights = 1.0 / counts
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------
# 6. The default task: 3-class tweet sentiment

TWEET_LABELS = ("negative", "neutral", "positive")
TWEET_COLUMNS = {"text": "text", "label": "sentiment"}
TWEET_FRACTIONS = (0.8, 0.1, 0.1)


def load_tweets(csv_path):
    """The tweet corpus (columns sentiment, confidence, text) as rows {"text", "label"}."""
    return read_csv(csv_path, TWEET_COLUMNS)


def tweet_splits(csv_path, folder, seed=0):
    """The train/validation/test tweets. Made once (clean, split 80/10/10 stratified, save to folder)
    and loaded from folder ever after, so the test set stays the same held-out set across runs."""
    folder = Path(folder)
    if (folder / "split.json").is_file():
        saved = json.loads((folder / "split.json").read_text(encoding="utf-8")).get("seed")
        if saved != seed:
            raise MiniftError(f"{folder} holds splits made with seed {saved}, not {seed}; pass "
                              f"seed={saved} or another folder")
        return load_splits(folder)
    # Drop empty and duplicate texts, fix mojibake and whitespace; keep URLs and @names as written.
    # clean() judges duplicates on the text as read: 37,243 rows, 29,794 of them train with seed 0.
    rows, report = clean(load_tweets(csv_path), TWEET_LABELS)
    print(report)
    splits = split(rows, TWEET_FRACTIONS, seed)
    save_splits(splits, folder, seed=seed, fractions=TWEET_FRACTIONS, source=str(csv_path))
    return splits
