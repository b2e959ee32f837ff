"""Stage 2, the task: rows of text become the examples a model trains on.

    classification   {"text", "label"}                -> {"input_ids", "label": the model's class id}
    tagging          {"tokens", "tags"}               -> {"input_ids", "labels": a tag id on each word's first
                                                          token, -100 on the rest}
    instructions     {"instruction", "input", "output"}, {"prompt", "response"} or {"messages"}
                                                      -> {"input_ids", "labels": -100 on the prompt}

Tokenized once, not padded: batching.collate pads each batch. Labels are matched to the model's classes
by NAME, always (label_ids), so a data set that holds only some of a model's classes still lines up.
"""
import json

import numpy as np
import torch

from .data import check_max_length
from .errors import MiniftError

# ---------------------------------------------------------------------------------------------------
# 1. Classification

def class_names(rows, what="the training rows", at_least=2):
    """The classes of labelled rows as sorted texts: the label names a new classifier is built with.

    A classifier needs two classes at least; at_least=1 for data that is only scored (evaluate)."""
    missing = next((n for n, r in enumerate(rows, 1) if "label" not in r), None)
    if missing is not None:
        raise MiniftError(f"row {missing} of {what} has no 'label'; map one with columns={{'label': ...}} "
                          f"(--label-column) when reading")
    names = tuple(sorted({str(r["label"]) for r in rows}))
    if len(names) < at_least:
        found = f"only one class ({names[0]!r})" if names else "no rows"
        raise MiniftError(f"{what} have {found}; a classifier needs at least two classes: check the "
                          f"label column (--label-column) and the data")
    return names


def label_ids(rows, label_names):
    """Each row's label as the model's class id, matched by name: label_names[i] names class i (a
    model's id2label, or class_names() for a new one). A number is matched as text (2 as "2"), never
    taken as an id itself, so the data's classes mean what the model's classes mean."""
    index = {str(name): i for i, name in enumerate(label_names)}
    ids = []
    for n, row in enumerate(rows, 1):
        if "label" not in row:
            raise MiniftError(f"row {n} has no 'label' (it has {', '.join(row)}); map one with "
                              f"columns={{'label': ...}} when reading")
        name = str(row["label"])
        if name not in index:
            raise MiniftError(f"row {n}: label {row['label']!r} is not one of the model's labels "
                              f"({', '.join(map(str, label_names))}); drop such rows with "
                              f"clean(rows, labels=...) or use a model that has that class")
        ids.append(index[name])
    return ids


def encode_classification(rows, tokenizer, label_names, max_length):
    """[{"input_ids": [...], "label": class id}] (no padding: collate pads each batch).

    label_names[i] is the name of the model's class i; each row's label is matched to it by name."""
    check_max_length(max_length)
    ids = tokenizer.encode_batch([r["text"] for r in rows], max_length=max_length)
    return [{"input_ids": i, "label": y} for i, y in zip(ids, label_ids(rows, label_names))]


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
# 2. Tagging (named entities: a label for every word)

def encode_tagging(rows, tokenizer, tag_names, max_length):
    """Rows {"tokens": words, "tags": one BIO tag per word} -> ([{"input_ids", "labels"}], words_cut).

    A word may become several tokens ("Bieber" -> "bi", "##eber"): its tag id is the label of its first token
    and -100 that of the others, so each word is one target whatever its length, as transformers' examples do;
    special tokens get -100 too. Tags are matched to the model's by name (tag_names[i] is the name of output i).
    words_cut: the words that got no token (cut by max_length, or a character the tokenizer drops); a row left
    with no word is dropped (its words counted)."""
    check_max_length(max_length)
    index = {name: i for i, name in enumerate(tag_names)}
    examples, words_cut = [], 0
    encoded = tokenizer.encode_words([r["tokens"] for r in rows], max_length=max_length)
    for n, (row, (ids, word_ids)) in enumerate(zip(rows, encoded), 1):
        if len(row["tags"]) != len(row["tokens"]):
            raise MiniftError(f"row {n} has {len(row['tokens'])} words but {len(row['tags'])} tags: give one tag per word")
        unknown = next((t for t in row["tags"] if t not in index), None)
        if unknown is not None:
            raise MiniftError(f"row {n}: tag {unknown!r} is not one of the model's tags ({', '.join(tag_names)}); use a "
                              "model trained with it, or drop the row")
        labels, previous = [], None
        for w in word_ids:
            labels.append(-100 if w is None or w == previous else index[row["tags"][w]])
            previous = w
        labelled = sum(y != -100 for y in labels)
        words_cut += len(row["tokens"]) - labelled
        if labelled:
            examples.append({"input_ids": ids, "labels": labels})
    return examples, words_cut


# ---------------------------------------------------------------------------------------------------
# 3. Instructions (a causal LM learns the response)

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


def check_instruction_row(row, where):
    """What an instruction row must hold, whatever the model: one of the three formats, texts, an answer that
    is not empty. `where` names the row in the errors: the file's line when the file was just read."""
    if "messages" in row:
        msgs = check_turns(row["messages"], where, "'messages'")
        if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
            raise MiniftError(f"{where}: 'messages' must end with the assistant's answer ({{'role': 'assistant', "
                              "'content': ...}) after at least one other message")
        texts = [msgs[-1]["content"]]
    elif "prompt" in row and "response" in row:
        texts = [row["prompt"], row["response"]]
    elif "instruction" in row and "output" in row:
        texts = [row["instruction"], row["output"]]
    else:
        raise MiniftError(f"{where} has fields {', '.join(row)}; an instruction row needs prompt and response, "
                          f"instruction and output (input optional), or a chat 'messages' list")
    if not all(isinstance(t, str) for t in texts):
        raise MiniftError(f"{where}: prompt and response must be texts")
    if not texts[-1].strip():
        raise MiniftError(f"{where}: the response is empty, so the model would learn to answer nothing; fill it "
                          "in or drop the row")


def check_turns(turns, where, what="the chat turns"):
    """A conversation: a non-empty list of {"role": text, "content": text} turns, or one line naming the first turn
    that is not one. Returns the turns."""
    if not isinstance(turns, list) or not turns:
        raise MiniftError(f"{where}: {what} must be a list of chat turns [{{'role': ..., 'content': ...}}, ...], not "
                          f"{json.dumps(turns)[:40]}")
    for k, turn in enumerate(turns, 1):
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise MiniftError(f"{where}: turn {k} of {what} must be {{'role': a text, 'content': a text}}, not "
                              f"{json.dumps(turn)[:60]}")
    return turns


def format_instruction(row, tokenizer, n=0):
    """One instruction row -> (prompt text, response text): the one formatter every job and evaluation uses.

    A chat row's `messages` end with the assistant's answer (the response); everything before it is the
    prompt. prompt/response and instruction/output[/input] rows are one user turn. A tokenizer with a chat
    template (an instruction-tuned model) gets its template: the format the model was tuned on matters more
    than any hyperparameter. Without one, instruction rows get Stanford Alpaca's prompt and prompt rows are
    used as written. `n`: the row's number, for the error messages (the loaders have checked each row
    against its file's line already)."""
    check_instruction_row(row, f"row {n}")
    chat = tokenizer.chat_template is not None
    if "messages" in row:
        msgs = row["messages"]
        if chat:
            prompt = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True)
        elif len(msgs) == 2 and msgs[0].get("role") == "user":
            prompt = msgs[0].get("content")  # one user turn: its words as written
        else:
            raise MiniftError(f"row {n} is a conversation, but this tokenizer has no chat template (an instruction-"
                              "tuned decoder has one): give prompt/response rows, or a model with a chat template")
        response = msgs[-1]["content"]
    elif "prompt" in row and "response" in row:
        prompt, response = row["prompt"], row["response"]
    else:  # instruction and output (check_instruction_row made sure)
        if chat:
            prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        else:
            key = "prompt_input" if row.get("input") else "prompt_no_input"
            prompt = ALPACA_TEMPLATE[key].format(instruction=row["instruction"], input=row.get("input"))
        response = row["output"]
    if not isinstance(prompt, str):
        raise MiniftError(f"row {n}: prompt and response must be texts")
    if chat and "messages" not in row:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return prompt, response


def encode_instruction(rows, tokenizer, max_length):
    """Prompt + response + EOS as one sequence (format_instruction makes the prompt); returns (examples, dropped).

    labels[i] is the target for position i (the model's loss shifts by one, as in Hugging Face):
    -100 on every prompt token, the token itself on the response and on EOS (so the model learns to
    stop). Too long: cut from the right, so the prompt survives if it fits; an example left with no
    supervised token is dropped and counted in `dropped`."""
    check_max_length(max_length)
    if tokenizer.eos_id is None:
        raise MiniftError("this tokenizer has no end-of-text token; instruction tuning needs one to stop")
    if not rows:
        return [], 0
    prompts, responses = zip(*(format_instruction(r, tokenizer, n) for n, r in enumerate(rows, 1)))
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
