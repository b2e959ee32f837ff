"""The instruction-tuning job: a decoder (SmolLM2 by default) learns to answer prompts; prompt tokens are
masked from the loss, the response and its end-of-turn token are supervised.

`finetune_instruct()` is what `minift finetune --task instruct` runs (defaults in recipe.py): rows of
prompt/response, instruction/output or chat messages (a JSONL file), or the bundled tweets as "answer with
one word", scored by exact match before (zero-shot) and after tuning. It stands beside classify.py on the
same skeleton: corpora.py (splits), tasks.py (encoding), train.py (the loop), outputs.py (the report).
"""
import time
from pathlib import Path

from . import distributed, recipe
from .batching import TrainData
from .checkpoints import load_checkpoint
from .config import TrainConfig
from .corpora import limit_rows, load_instruction_splits
from .errors import MiniftError
from .evals import exact_match, greedy_replies, report as suite_report, run_suites
from .hub import resolve_model
from .outputs import after_training, finish, load_best, weights_moved
from .tasks import encode_instruction, format_instruction
from .tokenizer import Tokenizer
from .train import evaluate_like_training, pick_device, seed_everything, train


def tweet_items(rows):
    """The tweets' instruction rows as exact-match items: the answer is the label word (evals.parse_answer's "word":
    case, surrounding spaces and punctuation do not matter)."""
    return [{"prompt": r["prompt"], "answer": r["response"]} for r in rows]


def show_samples(title, model, tok, rows, max_new_tokens=40):
    """Greedy answers to a few prompts, printed beside the expected response; returns the answers."""
    prompts, responses = zip(*(format_instruction(r, tok, n) for n, r in enumerate(rows, 1)))
    answers = greedy_replies(model, tok, list(prompts), max_new_tokens=max_new_tokens)
    print(f"\n{title}")
    for prompt, response, answer in zip(prompts, responses, answers):
        question = prompt.rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0].replace("\n", " ")
        print(f"  {question[:70]!r}\n     -> {answer.strip()[:70]!r}  (expected {response[:40]!r})")
    return answers


def encode_splits(splits, tok, max_length):
    """Every split encoded (prompt masked, response and end of turn supervised), with what was dropped and how
    much of the training text the loss sees."""
    encoded = {}
    for k, v in splits.items():
        encoded[k], dropped = encode_instruction(v, tok, max_length)
        if dropped:
            print(f"{k}: {dropped} rows dropped (the prompt alone fills max_length {max_length})")
    if not encoded["train"] or not encoded["validation"]:
        raise MiniftError(f"no training or validation example is left within max_length {max_length}: raise it")
    n_sup = sum(sum(y != -100 for y in e["labels"]) for e in encoded["train"])
    print(f"{len(encoded['train'])} training rows, {len(encoded['validation'])} validation rows; {n_sup} of "
          f"{sum(len(e['input_ids']) for e in encoded['train'])} training tokens supervised (response + end of "
          "turn), the rest is prompt")
    return encoded


def finetune_instruct(model=recipe.INSTRUCT_JOB["model"], data=recipe.INSTRUCT_JOB["data"],
                      out=recipe.INSTRUCT_JOB["out"], cfg=None, max_length=recipe.INSTRUCT_JOB["max_length"],
                      limit=None, test=True, resume=False, score_rows=200, sample_rows=3, suites=None):
    """Instruction-tune a decoder on prompt -> response rows (a JSONL file; None: the tweets as "answer
    with one word"). Prints validation loss and perplexity, before/after samples and, for the tweets, exact
    match before (zero-shot) and after; returns the report (also in OUT/results.json).

    limit: the first `limit` training rows (corpora.limit_rows); score_rows: how many validation (and test)
    rows exact match generates for (generation is the slow part), and the items per evaluation suite; suites:
    evals.py's suites (e.g. ["tweets", "flatland"]) scored before and after, the change printed."""
    cfg = cfg or TrainConfig(**recipe.INSTRUCT_TRAIN)
    t0 = time.perf_counter()
    path = resolve_model(model)
    seed_everything(cfg.seed)
    net = load_checkpoint(path, "lm")  # first: an encoder is refused before any data is read
    tok = Tokenizer.from_file(path)
    splits = limit_rows(load_instruction_splits(data, cfg.seed), limit)
    encoded = encode_splits(splits, tok, max_length)
    net.max_length, device = max_length, pick_device(cfg.device)
    tweets, probes, scored = data is None, splits["validation"][:sample_rows], splits["validation"][:score_rows]
    report = {"model": str(path), "train_rows": len(encoded["train"]), "config": vars(cfg)}
    report["samples_before"] = show_samples("before fine-tuning:", net.to(device), tok, probes)
    if suites:  # the model as it came, on the suites: the baseline of the change printed at the end
        report["suites_before"] = run_suites(net, tok, suites, limit=score_rows)
    if tweets:  # a one-word answer: scored by exact match
        report["exact_match_before"] = exact_match(net, tok, tweet_items(scored), max_new_tokens=4)["exact_match"]
        print(f"zero-shot exact match on {len(scored)} validation rows: {report['exact_match_before']:.4f}")
    examples = TrainData(encoded["train"], encoded["validation"], tok.pad_id)
    report.update(train(net, examples, cfg, out, resume=resume))
    if not distributed.is_main():  # under torchrun only rank 0 evaluates and writes the report
        return report
    with after_training(out):
        best = load_best(out, "lm", device)
        report["validation"], report["weights_moved"] = report.pop("best_metrics"), weights_moved(best, path)
        report["samples_after"] = show_samples("after fine-tuning:", best, tok, probes)
        if tweets:
            report["exact_match_after"] = exact_match(best, tok, tweet_items(scored), max_new_tokens=4)["exact_match"]
            print(f"exact match on {len(scored)} validation rows: {report['exact_match_before']:.4f} zero-shot -> "
                  f"{report['exact_match_after']:.4f} fine-tuned")
        if suites:
            report["suites_after"] = run_suites(best, tok, suites, limit=score_rows)
            print("\nthe evaluation suites, before and after fine-tuning:\n"
                  + suite_report(report["suites_after"], baseline=report["suites_before"]))
        if test and encoded["test"]:
            report["test"] = evaluate_like_training(best, encoded["test"], examples, cfg, device)
            if tweets:
                report["test"]["exact_match"] = exact_match(best, tok, tweet_items(splits["test"][:score_rows]),
                                                            max_new_tokens=4)["exact_match"]
                print(f"test exact match on {min(score_rows, len(splits['test']))} rows: "
                      f"{report['test']['exact_match']:.4f}")
    return finish(report, out, t0, f"generate with:  minift generate {Path(out) / 'best'} \"...\"")
