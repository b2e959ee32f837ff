"""The instruction-tuning job: a decoder (SmolLM2 by default) learns to answer prompts; prompt tokens are
masked from the loss, the response and its end-of-turn token are supervised.

`finetune_instruct()` is what `minift finetune --task instruct` runs (defaults in recipe.py): rows of
prompt/response, instruction/output or chat messages (a JSONL file), or the bundled tweets as "answer with
one word", scored by exact match before (zero-shot) and after tuning.
"""
import json
import time
from pathlib import Path

import torch

from . import distributed, recipe
from .batching import collate
from .checkpoints import load_checkpoint
from .data import load_splits, read_jsonl, split
from .errors import MiniftError
from .evaluate import evaluate
from .finetune import load_best, load_classification_splits, weights_moved
from .hub import resolve_model
from .lora import add_lora
from .memory import estimate_memory, format_memory
from .tasks import ALPACA_TEMPLATE, encode_instruction
from .tokenizer import Tokenizer
from .train import TrainConfig, pick_device, seed_everything, train


# The tweets as an instruction task: the response is the label word itself.
TWEET_INSTRUCTION = "Answer with one word: negative, neutral or positive.\n\nTweet: {text}"


def chat_or_plain(tok, messages):
    """The prompt text for a conversation: the tokenizer's chat template when it has one (the format the
    model was tuned on matters more than any hyperparameter), else the user's words as written."""
    if tok.chat_template is not None:
        return tok.apply_chat_template(messages, add_generation_prompt=True)
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise MiniftError("chat 'messages' rows need a tokenizer with a chat template (tokenizer_config.json); "
                          "this one has none: give prompt/response rows instead")
    return messages[0]["content"]


def instruction_row(row, tok, n=0):
    """One row of any accepted format -> {"prompt": the full prompt text, "response": ...}.

    prompt/response and instruction/output[/input] become one user message; a chat row's `messages` end
    with the assistant's answer (the response), everything before it is the prompt. Without a chat template
    instruction rows get Stanford Alpaca's prompt and prompt rows are used as written."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2 or not isinstance(msgs[-1], dict) \
                or msgs[-1].get("role") != "assistant" or not isinstance(msgs[-1].get("content"), str):
            raise MiniftError(f"row {n}: 'messages' must be a list that ends with the assistant's answer "
                              f"({{'role': 'assistant', 'content': ...}}) after at least one other message")
        return {**row, "prompt": chat_or_plain(tok, msgs[:-1]), "response": msgs[-1]["content"]}
    if "prompt" in row and "response" in row:
        user, response = row["prompt"], row["response"]
    elif "instruction" in row and "output" in row:
        if tok.chat_template is None:  # encode_instruction's Alpaca template, with or without input
            user = ALPACA_TEMPLATE["prompt_input" if row.get("input") else "prompt_no_input"].format(
                instruction=row["instruction"], input=row.get("input"))
            return {**row, "prompt": user, "response": row["output"]}
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        response = row["output"]
    else:
        raise MiniftError(f"row {n} has fields {', '.join(row)}; an instruction row needs prompt and response, "
                          f"instruction and output (input optional), or a chat 'messages' list")
    if not isinstance(user, str) or not isinstance(response, str):
        raise MiniftError(f"row {n}: prompt and response must be texts")
    if tok.chat_template is None:
        return {**row, "prompt": user, "response": response}
    return {**row, "prompt": chat_or_plain(tok, [{"role": "user", "content": user}]), "response": response}


def load_instruction_splits(data, tok, seed=0):
    """{"train", "validation", "test"} rows with "prompt" and "response". No `data`: the tweets (the same
    stratified splits as the classifier job), the label word as the response. A JSONL file: split 80/10/10
    (seeded, not stratified). A folder: its train/validation/test.jsonl."""
    if data is None:
        splits, _ = load_classification_splits(None, seed=seed)
        splits = {k: [{"prompt": TWEET_INSTRUCTION.format(text=r["text"]), "response": r["label"]} for r in v]
                  for k, v in splits.items()}
    else:
        data = Path(data)
        if data.is_dir():
            splits = load_splits(data)
        elif data.is_file():
            splits = split(read_jsonl(data), (0.8, 0.1, 0.1), seed=seed, stratify=None)
        else:
            raise MiniftError(f"{data}: no such file or folder; give a JSONL file of prompt/response, "
                              f"instruction/output or chat 'messages' rows")
    splits = {k: [instruction_row(r, tok, n) for n, r in enumerate(v, 1)] for k, v in splits.items()}
    if not splits["train"] or not splits["validation"]:
        raise MiniftError(f"{len(splits['train'])} training and {len(splits['validation'])} validation rows: "
                          f"instruction tuning needs some of each (give at least 10 rows)")
    return splits


def normalise_answer(text):
    """What counts as "the same word": case, surrounding spaces and a final full stop do not matter."""
    return text.strip().strip(".!").strip().lower()


@torch.no_grad()
def exact_match(model, tok, rows, batch_size=16, max_new_tokens=4, device="cpu"):
    """The share of rows whose greedy answer (up to max_new_tokens, stopping at EOS) equals the row's
    response, after normalise_answer. Prompts are left-padded (a decoder continues from the right end) and
    batched by length. Returns {"exact_match", "correct", "total", "answers"} (answers in row order)."""
    if not rows:
        raise MiniftError("no rows to score; is the split empty?")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["prompt"]))
    answers = [None] * len(rows)
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        batch = tok([rows[j]["prompt"] for j in chunk], padding_side="left", add_special_tokens=False)
        batch = {k: v.to(device) for k, v in batch.items() if k != "token_type_ids"}
        out = model.generate(batch["input_ids"], max_new_tokens=max_new_tokens, attention_mask=batch["attention_mask"],
                             eos_token_id=tok.eos_id)
        for j, ids in zip(chunk, out[:, batch["input_ids"].shape[1]:].tolist()):
            answers[j] = tok.decode(ids)  # skips special tokens: the EOS (and EOS padding) after the answer
    correct = sum(normalise_answer(a) == normalise_answer(r["response"]) for a, r in zip(answers, rows))
    return {"exact_match": correct / len(rows), "correct": correct, "total": len(rows), "answers": answers}


def show_samples(title, model, tok, rows, max_new_tokens=40, device="cpu"):
    """Greedy answers to a few prompts, printed beside the expected response; returns the answers."""
    answers = exact_match(model, tok, rows, max_new_tokens=max_new_tokens, device=device)["answers"]
    print(f"\n{title}")
    for r, a in zip(rows, answers):
        question = r["prompt"].rsplit("<|im_start|>user\n", 1)[-1].split("<|im_end|>")[0].replace("\n", " ")
        print(f"  {question[:70]!r}\n     -> {a.strip()[:70]!r}  (expected {r['response'][:40]!r})")
    return answers


def out_of_memory_hint(e, cfg, max_length):
    """A torch out-of-memory error as one line that says what to lower."""
    return MiniftError(f"out of memory ({str(e).splitlines()[0][:80]}): lower batch_size (now {cfg.batch_size}; "
                       f"or raise grad_accum), max_length (now {max_length}), or train fewer weights "
                       f"(freeze=['embeddings', 'layers:N'] or LoRA)")


def is_out_of_memory(e):
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "memory" in str(e).lower())


def finetune_instruct(model=recipe.INSTRUCT_JOB["model"], data=None, out=recipe.INSTRUCT_JOB["out"], cfg=None,
                      max_length=recipe.INSTRUCT_JOB["max_length"], limit=None, test=True, resume=False,
                      score_rows=200, sample_rows=3):
    """Instruction-tune a decoder on prompt -> response rows (a JSONL file; None: the tweets as "answer
    with one word"). Prints the memory estimate, validation loss and perplexity, before/after samples and,
    for the tweets, exact match before (zero-shot) and after; returns the report (also in results.json).

    limit: the first `limit` training rows (validation and test cut to max(limit // 4, 16)); score_rows:
    how many validation (and test) rows exact match generates for (generation is the slow part)."""
    cfg = cfg or TrainConfig(**recipe.INSTRUCT_TRAIN)
    if cfg.metric != "loss":
        raise MiniftError("an instruction-tuned model is judged by its validation loss: use metric='loss'")
    t0 = time.perf_counter()
    path = resolve_model(model)
    tok = Tokenizer.from_file(path)
    splits = load_instruction_splits(data, tok, cfg.seed)
    if limit:  # generation and evaluation of a 135M decoder are slow on a CPU: keep the held-out rows few too
        splits = {k: v[:limit] if k == "train" else v[: max(limit // 4, 16)] for k, v in splits.items()}
    encoded = {}
    for k, v in splits.items():
        encoded[k], dropped = encode_instruction(v, tok, max_length)  # prompt/response: used as written
        if dropped:
            print(f"{k}: {dropped} rows dropped (the prompt alone fills max_length {max_length})")
    if not encoded["train"] or not encoded["validation"]:
        raise MiniftError(f"no training or validation example is left within max_length {max_length}: raise it")
    n_sup = sum(sum(y != -100 for y in e["labels"]) for e in encoded["train"])
    n_tok = sum(len(e["input_ids"]) for e in encoded["train"])
    print(f"{len(encoded['train'])} training rows, {len(encoded['validation'])} validation rows; {n_sup} of "
          f"{n_tok} training tokens supervised (response + end of turn), the rest is prompt")
    seed_everything(cfg.seed)
    net = load_checkpoint(path, "lm")
    if net.task != "lm":
        raise MiniftError(f"{path} is not a language model: instruction tuning needs a decoder (e.g. smollm2)")
    if cfg.lora_r:
        print(add_lora(net, cfg.lora_targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout))
    device = pick_device(cfg.device)
    net.to(device)
    base = {n: p.detach().cpu().clone() for n, p in net.named_parameters()}
    tweets = data is None  # a one-word answer: scored by exact match
    val_score = splits["validation"][:score_rows]
    report = {"model": str(path), "train_rows": len(encoded["train"]), "config": vars(cfg)}
    probes = splits["validation"][:sample_rows]
    report["samples_before"] = show_samples("before fine-tuning:", net, tok, probes, device=device)
    if tweets:
        report["exact_match_before"] = exact_match(net, tok, val_score, device=device)["exact_match"]
        print(f"zero-shot exact match on {len(val_score)} validation rows: {report['exact_match_before']:.4f}")
    try:
        longest = sorted(encoded["train"], key=lambda e: -len(e["input_ids"]))[:cfg.batch_size // cfg.grad_accum]
        print(format_memory(estimate_memory(net, {k: v.to(device) for k, v in collate(longest, tok.pad_id).items()})))
        result = train(net, encoded["train"], encoded["validation"], cfg, out, tok.pad_id,
                       tokenizer_file=path / "tokenizer.json", padding_side="right", resume=resume)
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError too
        if is_out_of_memory(e):
            raise out_of_memory_hint(e, cfg, max_length) from None
        raise
    if not distributed.is_main():  # under torchrun only rank 0 evaluates and writes the report
        return result
    best = load_best(Path(out), path, cfg, task="lm").to(device)
    report.update(result)
    report["weights_moved"] = weights_moved(best, base)
    report["validation"] = evaluate(best, encoded["validation"], tok.pad_id, device=device)
    print(f"\nvalidation (best step {result['best_step']}): loss {report['validation']['loss']:.4f}, "
          f"perplexity {report['validation']['perplexity']:.3f}")
    report["samples_after"] = show_samples("after fine-tuning:", best, tok, probes, device=device)
    if tweets:
        report["exact_match_after"] = exact_match(best, tok, val_score, device=device)["exact_match"]
        print(f"exact match on {len(val_score)} validation rows: {report['exact_match_before']:.4f} zero-shot -> "
              f"{report['exact_match_after']:.4f} fine-tuned")
    if test and encoded["test"]:
        report["test"] = evaluate(best, encoded["test"], tok.pad_id, device=device)
        print(f"\ntest (held out, looked at once): loss {report['test']['loss']:.4f}, "
              f"perplexity {report['test']['perplexity']:.3f}")
        if tweets:
            test_score = splits["test"][:score_rows]
            report["test"]["exact_match"] = exact_match(best, tok, test_score, device=device)["exact_match"]
            print(f"test exact match on {len(test_score)} rows: {report['test']['exact_match']:.4f}")
    report["wall_seconds"] = time.perf_counter() - t0
    print(f"\nweights moved {report['weights_moved']:.4f} (relative L2 distance from the pretrained ones)")
    print(f"best model saved in {Path(out) / 'best'}, log in {Path(out) / 'log.jsonl'}; "
          f"total {report['wall_seconds'] / 60:.1f} min")
    print(f"generate with:  minift generate {Path(out) / 'best'} \"...\"")
    (Path(out) / "results.json").write_text(json.dumps(report, indent=2, default=str))
    return report
