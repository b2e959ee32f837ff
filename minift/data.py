"""Stage 3, the dataset: read -> clean (with a report) -> split (seeded, stratified) -> save, and look at it.

A row is a plain dict: {"text": ..., "label": ...} for classification, {"instruction", "input",
"output"} (or {"prompt", "response"}) for instruction tuning, {"tokens": [...], "tags": [...]} for tagging
(read_conll). Every step returns new rows and says what it
did: nothing is dropped without being counted. Turning rows into token ids is the task's job (tasks.py),
batching them the loop's (batching.py).

    rows = read_csv("reviews.csv", {"text": "review", "label": "stars"})
    rows, report = clean(rows); print(report)
    splits = split(rows, (0.8, 0.1, 0.1), seed=0)
    print(length_report(splits["train"], tok, max_length=64))
"""
import csv
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from .errors import MiniftError
from .files import sha256_of

# ---------------------------------------------------------------------------------------------------
# 1. Readers


class Rows(list):
    """A list of row dicts that also remembers how many bytes of its file were not valid UTF-8 and, for a
    JSONL file, the line each row came from.

    Readers return it so that clean() can put that count in its report and row checks can name the file's
    line; otherwise it is a plain list (slicing or filtering it gives a plain list, without them)."""

    def __init__(self, rows=(), invalid_utf8_bytes=0, lines=None):
        super().__init__(rows)
        self.invalid_utf8_bytes = invalid_utf8_bytes
        self.lines = lines


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
    rows = Rows(invalid_utf8_bytes=bad, lines=[n for n, _ in numbered])
    for n, obj in numbered:
        if not isinstance(obj, dict):
            raise MiniftError(f"{path}:{n}: a JSON {type(obj).__name__}, not an object; each row must "
                              f"be one {{...}}")
        for col in (columns or {}).values():
            if col not in obj:
                raise MiniftError(f"{path}:{n}: no key {col!r}; the keys are {', '.join(obj)}; fix the "
                                  f"columns mapping")
        row = dict(obj) if columns is None else {f: obj[c] for f, c in columns.items()}
        _check_values(row, path, n, columns or {f: f for f in row})
        rows.append(row)
    return rows


BIO_TAG = re.compile(r"O|[BI]-\S+")  # outside, or the beginning / inside of an entity of a type: B-person, I-person


def read_conll(path):
    """Sentences of a CoNLL file as rows {"tokens": [...], "tags": [...]}: one token and its tag per line (separated
    by a tab or spaces; the tag is the last column, so CoNLL-2003's token POS chunk tag lines read too), a blank line
    (or one of only spaces and tabs) between sentences, -DOCSTART- lines (document markers) skipped. Tags are BIO:
    O, B-TYPE or I-TYPE. rows.lines holds the line each sentence starts on."""
    text, bad = _read_utf8(path)
    rows = Rows(invalid_utf8_bytes=bad, lines=[])
    tokens, tags = [], []
    for n, line in enumerate(text.split("\n") + [""], 1):  # a last blank line ends the last sentence
        fields = line.split()
        if fields[:1] == ["-DOCSTART-"] or not fields:
            if tokens:
                rows.append({"tokens": tokens, "tags": tags})
                tokens, tags = [], []
            continue
        if len(fields) < 2:
            raise MiniftError(f"{path}:{n}: {line.strip()[:40]!r} is one column; a CoNLL line is a token and its tag "
                              "separated by a tab or spaces (a blank line between sentences)")
        if not BIO_TAG.fullmatch(fields[-1]):
            raise MiniftError(f"{path}:{n}: tag {fields[-1][:40]!r} is not O, B-TYPE or I-TYPE: minift reads BIO tags "
                              "(convert BIOES or other schemes first)")
        if not tokens:
            rows.lines.append(n)
        tokens.append(fields[0])
        tags.append(fields[-1])
    if not rows:
        raise MiniftError(f"{path}: no sentence in it; a CoNLL file has one token and its tag per line")
    return rows


TEXT_FIELDS = ("text", "instruction", "input", "output", "prompt", "response")


def _check_values(row, path, n, columns):
    """JSON can hold a number or null where a text belongs; a CSV cannot. Catch it here, with the line."""
    for field, value in row.items():
        if field in TEXT_FIELDS and not isinstance(value, str):
            if field == "input" and value is None:
                continue  # Alpaca-style data writes "no input" as null as well as ""
            if field == "prompt" and isinstance(value, list) and all(isinstance(turn, dict) for turn in value):
                continue  # chat turns [{"role", "content"}, ...]: TRL's conversational layout (the jobs check them)
            raise MiniftError(f"{path}:{n}: column {columns[field]!r} holds {_json_kind(value)}, not a text; "
                              f"write it as a string (\"...\") or drop the row")
        if field == "label" and (value is None or isinstance(value, (list, dict))):
            raise MiniftError(f"{path}:{n}: column {columns[field]!r} holds {_json_kind(value)}, not a "
                              f"label; give every row a label (a text or a number) or drop the row")


def _json_kind(value):
    kind = {type(None): "null", bool: "a boolean", list: "a list", dict: "an object"}.get(type(value), "a number")
    return kind if value is None else f"{kind} ({json.dumps(value)[:30]})"


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
        if not isinstance(text, str):
            raise MiniftError(f"row {n}: 'text' is {type(text).__name__} {text!r}, not a string; "
                              f"convert or drop such rows before clean()")
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


def save_splits(splits, folder, seed=None, fractions=None, source=None, sha256=None, columns=None):
    """Write train.jsonl, validation.jsonl, test.jsonl and split.json (how they were made) to folder.

    split.json is written last (and removed first), so a folder that has one holds complete splits."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "split.json").unlink(missing_ok=True)
    for name in SPLIT_NAMES:
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in splits[name]:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    info = {"seed": seed, "fractions": list(fractions) if fractions else None, "source": source,
            "counts": {name: len(splits[name]) for name in SPLIT_NAMES}}
    if sha256 is not None:
        info["sha256"] = sha256  # of the source file's bytes: cached_splits() checks it before reuse
    if columns is not None:
        info["columns"] = columns
    (folder / "split.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def load_splits(folder, columns=None):
    """The splits in folder (as save_splits wrote them): {"train": rows, "validation": rows, "test": rows}.

    columns maps our fields to the files' keys, as in read_jsonl (None keeps every key)."""
    folder = Path(folder)
    splits = {}
    for name in SPLIT_NAMES:
        path = folder / f"{name}.jsonl"
        if not path.is_file():
            raise MiniftError(f"{path}: missing; point at a folder written by save_splits")
        splits[name] = read_jsonl(path, columns) if path.stat().st_size else Rows(lines=[])  # a 0-fraction split
    return splits


def cached_splits(source, folder, read, seed=0, fractions=(0.8, 0.1, 0.1), columns=None):
    """The splits of a data file, made once and kept in folder, so the test set stays the same held-out
    set across runs. read() reads and cleans the file's rows; they are split with (seed, fractions).

    The splits are reused only while split.json says they came from this very content of the file (its
    sha256) and these columns; otherwise they are made again, with a note that says why. The same file and
    seed give the same rows in each split, so remaking the splits of an unchanged file changes nothing."""
    source, folder = Path(source), Path(folder)
    sha256 = sha256_of(source) if source.is_file() else None
    why = _why_remake(source, folder, seed, columns, sha256)
    if why is None:
        if sha256 is None:
            print(f"note: {source} is not there, so the splits in {folder} are used without checking them")
        return load_splits(folder)
    if why:
        print(f"note: {why}; making the splits again")
    splits = split(read(), fractions, seed)
    save_splits(splits, folder, seed=seed, fractions=fractions, source=str(source), sha256=sha256,
                columns=columns)
    print(f"splits saved in {folder} (the test set stays held out across runs)")
    return splits


def _why_remake(source, folder, seed, columns, sha256):
    """None: the splits in folder are good to reuse. "": there are none yet. Else the reason to remake."""
    info_path = folder / "split.json"
    if not info_path.is_file():
        return ""
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{info_path} is not valid JSON"
    if not isinstance(info, dict):
        return f"{info_path} is not a JSON object"
    if info.get("seed") != seed:
        raise MiniftError(f"{folder} holds splits made with seed {info.get('seed')}, not {seed}; pass "
                          f"seed={info.get('seed')} or another folder")
    if sha256 is None:
        return None  # the file is gone: nothing to check against (the caller says so)
    if "sha256" not in info:
        return f"{info_path} records no hash of {source.name} (made by an older minift)"
    if info["sha256"] != sha256:
        return (f"{source} changed since the splits in {folder} were made (sha256 {info['sha256'][:12]}, "
                f"now {sha256[:12]})")
    if columns is not None and info.get("columns") != columns:
        return f"the splits in {folder} were made with columns {info.get('columns')}, not {columns}"
    return None


_BINS = ((0, 16), (17, 32), (33, 64), (65, 128), (129, 256), (257, 512), (513, None))  # token counts


def token_lengths(rows, tokenizer):
    """The number of tokens of each row's text, special tokens included (as max_length counts them)."""
    missing = next((n for n, r in enumerate(rows, 1) if not isinstance(r.get("text"), str)), None)
    if missing is not None:
        raise MiniftError(f"row {missing} has no text to measure (a 'text' string); map one with "
                          f"columns={{'text': ...}} when reading")
    return np.array([len(ids) for ids in tokenizer.encode_batch([r["text"] for r in rows])])


def stats(rows, tokenizer=None, max_length=None):
    """Row count, label balance and (with a tokenizer) token lengths: percentiles, a histogram, and how
    many rows max_length would truncate."""
    out = {"rows": len(rows)}
    if rows and all("label" in r for r in rows):
        out["labels"] = dict(sorted(Counter(r["label"] for r in rows).items(), key=lambda kv: str(kv[0])))
    if tokenizer is None or not rows:
        return out
    lengths = token_lengths(rows, tokenizer)
    out["tokens"] = {"min": int(lengths.min()), "p50": int(np.percentile(lengths, 50)),
                     "p90": int(np.percentile(lengths, 90)), "p95": int(np.percentile(lengths, 95)),
                     "p99": int(np.percentile(lengths, 99)), "max": int(lengths.max()),
                     "mean": round(float(lengths.mean()), 1)}
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
        lines.append(f"tokens    min {t['min']}  median {t['p50']}  p90 {t['p90']}  p95 {t['p95']}  "
                     f"p99 {t['p99']}  max {t['max']}  mean {t['mean']}")
        top = max(count for _, count in s["histogram"])
        for label, count in s["histogram"]:
            lines.append(f"  {label:>8} {count:>8,} {'#' * round(30 * count / top)}")
    if "truncated" in s:
        lines.append(f"max_length {s['max_length']} truncates {s['truncated']:,} rows "
                     f"({s['truncated'] / s['rows']:.2%})")
    return "\n".join(lines)


def check_max_length(max_length):
    """Tokens per text must leave room for a text between the special tokens."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise MiniftError(f"max_length {max_length!r} must be a whole number of tokens, at least 4 (64 or 128 "
                          "are usual; the length report before training suggests one)")


def length_report(rows, tokenizer, max_length, model_max=None):
    """Before training: token-length percentiles of the rows' texts, the share of rows that max_length
    cuts, and, when that is more than 5%, a max_length that keeps 95% of the rows whole (rounded up to
    a multiple of 8, and at most model_max, the model's longest input, when given)."""
    check_max_length(max_length)
    if not rows:
        raise MiniftError("length_report got no rows; is the training split empty?")
    lengths = token_lengths(rows, tokenizer)
    p50, p90, p95, p99 = (int(np.percentile(lengths, q)) for q in (50, 90, 95, 99))
    cut = int((lengths > max_length).sum())
    lines = [f"token lengths of {len(rows):,} rows: p50 {p50}  p90 {p90}  p95 {p95}  p99 {p99}  "
             f"max {int(lengths.max())}",
             f"max_length {max_length} cuts {cut:,} rows ({cut / len(rows):.1%})"]
    if 100 * cut > 5 * len(rows):  # more than 5%, in whole numbers (1 of 20 is not more)
        # The shortest length that leaves at most 5% of the rows longer: the ceil(0.95 n)-th shortest.
        keep95 = int(np.sort(lengths)[-(-95 * len(rows) // 100) - 1])
        suggested = 8 * math.ceil(keep95 / 8)
        if model_max is not None:
            suggested = min(suggested, model_max)
        still_cut = int((lengths > suggested).sum())
        lines[-1] += (f", more than 5%, and the model never sees their ends: max_length {suggested} would cut "
                      f"{still_cut:,} ({still_cut / len(rows):.1%}), at about {suggested / max_length:.1f}x "
                      f"the time per step (--max-length {suggested})")
    return "\n".join(lines)
