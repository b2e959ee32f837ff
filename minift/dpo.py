"""The preference-tuning job: `minift finetune --task dpo` teaches a decoder which of two answers is better.

    pairs (a JSONL file, or the arithmetic task's on-policy pairs) -> encode_pairs -> train (train.py, with
    PreferenceObjective as its loss) -> report (outputs.py), the task's exact match before and after

It stands beside classify.py and instruct.py on the same skeleton. The loop is train.py's, unchanged: what differs
is the objective it is given (batching.TrainData.objective): how pairs become a batch, DPO's step (preference.py's
dpo_step: the reference log-probs, the loss, its hand-written backward) and how a model is judged on held-out pairs.
"""
import random
import time
from pathlib import Path

import torch

from . import distributed, recipe
from .batching import TrainData
from .checkpoints import load_checkpoint
from .config import TrainConfig
from .corpora import arithmetic_splits, limit_rows, load_jsonl_splits
from .data import check_max_length
from .errors import MiniftError
from .evals import exact_match
from .hub import resolve_model
from .outputs import finish, load_best, snapshot, weights_moved
from .preference import (NEEDS_REFERENCE, check_preference_settings, count_chosen_tokens, count_pairs,
                         dpo_step, frozen_copy, logprobs_without_grad, pair_loss, preference_batch, reference_logprobs)
from .tasks import format_instruction
from .tokenizer import Tokenizer
from .train import pick_device, seed_everything, train


# ---------------------------------------------------------------------------------------------------------
# Pairs: read, turned into texts, encoded

def pair_texts(row, tok, where):
    """A pair row -> (prompt text, chosen text, rejected text), the prompt in the model's chat template. Rows are
    TRL's formats: {"prompt", "chosen", "rejected"} as texts, or as chat messages (prompt: a list of turns, chosen /
    rejected: the assistant's turn), or {"chosen", "rejected"} as whole conversations that differ in the last turn."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise MiniftError(f"{where}: a preference row needs 'chosen' and 'rejected' (and 'prompt', unless they are "
                          "whole conversations); it has " + ", ".join(row if isinstance(row, dict) else ["no fields"]))
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        prompt = row["prompt"]
    elif isinstance(chosen, list) and isinstance(rejected, list) and chosen[:-1] == rejected[:-1] and chosen[:-1]:
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    else:
        raise MiniftError(f"{where}: without a 'prompt', 'chosen' and 'rejected' must be conversations that share every "
                          "turn but the last (the two answers)")
    replies = [c[-1].get("content") if isinstance(c, list) and c and isinstance(c[-1], dict) else c
               for c in (chosen, rejected)]
    if not all(isinstance(r, str) and r.strip() for r in replies):
        raise MiniftError(f"{where}: 'chosen' and 'rejected' must be non-empty texts (or end with an assistant turn)")
    turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    prompt_text = format_instruction({"messages": turns + [{"role": "assistant", "content": replies[0]}]}, tok, where)[0]
    return prompt_text, replies[0], replies[1]


def encode_pairs(rows, tok, max_length):
    """Pair rows -> examples {"input_ids": the prompt's tokens, "chosen", "rejected": each answer's tokens and EOS},
    prompt + answer cut to max_length; a pair whose prompt alone fills it is dropped. Returns (examples, dropped)."""
    check_max_length(max_length)
    if tok.eos_id is None:
        raise MiniftError("this tokenizer has no end-of-text token; preference tuning needs one to end the answers")
    examples, dropped = [], 0
    for n, row in enumerate(rows, 1):
        prompt, chosen, rejected = pair_texts(row, tok, f"pair {n}")
        p = tok.encode(prompt, add_special_tokens=False)
        room = max_length - len(p)
        if room < 1:
            dropped += 1
            continue
        answers = [(tok.encode(a, add_special_tokens=False) + [tok.eos_id])[:room] for a in (chosen, rejected)]
        examples.append({"input_ids": p, "chosen": answers[0], "rejected": answers[1]})
    return examples, dropped


def first_line(reply):
    return reply.strip().splitlines()[0] if reply.strip() else ""


def swap_number(reply, old, new):
    """The reply's first line with its last `old` number replaced by `new`: the same words, another answer."""
    line = first_line(reply)
    at = line.rfind(old) if old else -1
    return line[:at] + new + line[at + len(old):] if at >= 0 else new


def on_policy_pairs(model, tok, rows, seed=0):
    """Pairs from the model's own greedy replies to the arithmetic rows (their first line): a wrong reply is the
    rejected answer and the same reply with the right number the chosen one; a right reply is the chosen one and,
    rejected, the same reply with a near miss (the answer +-1). Each pair differs in the number only: what DPO learns
    is the arithmetic. A reply with no number at all: the bare right number against a bare wrong one."""
    scored = exact_match(model, tok, rows, kind="number")["items"]
    rng, pairs = random.Random(seed), []
    for row, s in zip(rows, scored):
        reply, right, said = s["reply"], row["answer"], s["parsed"]
        if said == right:
            chosen, rejected = first_line(reply), swap_number(reply, right, str(int(right) + rng.choice((-1, 1))))
        elif said:
            chosen, rejected = swap_number(reply, said, right), first_line(reply)
        else:
            chosen, rejected = right, "1" if right == "0" else "0"
        pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected})
    return pairs


# ---------------------------------------------------------------------------------------------------------
# The objective: what train() does with pairs

class PreferenceObjective:
    """DPO (or IPO, SimPO, ORPO) as the loop's loss. Examples: encode_pairs'. A batch: preference_batch's (the chosen
    rows, then the rejected ones). `reference`: a frozen copy of the model before training (full fine-tuning), or
    None: the model itself with its LoRA adapters off."""

    def __init__(self, pad_id, loss_type="sigmoid", beta=0.1, label_smoothing=0.0, reference=None, rpo_alpha=0.0):
        check_preference_settings(loss_type, beta, label_smoothing)
        self.pad_id, self.loss_type, self.beta, self.label_smoothing = pad_id, loss_type, beta, label_smoothing
        self.reference, self.rpo_alpha = reference, rpo_alpha
        self.nll_weight = 1.0 if loss_type == "orpo" else rpo_alpha  # of the chosen answers' NLL in the loss

    def settings(self):
        """What a resume must find the same (train.py's run_info)."""
        return {"loss_type": self.loss_type, "beta": self.beta, "label_smoothing": self.label_smoothing,
                "rpo_alpha": self.rpo_alpha}

    def check(self, model, data, cfg):
        if model.task != "lm":
            raise MiniftError("preference tuning needs a language model: load it with task='lm'")
        if cfg.metric != "loss":
            raise MiniftError(f"metric {cfg.metric!r}: preference tuning keeps the model with the lowest validation loss "
                              "(the loss on held-out pairs): use metric='loss'")
        if cfg.packing:
            raise MiniftError("packing puts rows of different texts in one sequence; a pair is two rows that must stay "
                              "apart: use packing=0")
        if self.loss_type in NEEDS_REFERENCE and self.reference is None and not cfg.lora_r:
            raise MiniftError(f"loss {self.loss_type!r} compares with a reference model: train LoRA adapters (the "
                              "reference is then the model with them off) or give reference=preference.frozen_copy(model)")
        if any("chosen" not in e or "rejected" not in e for e in data.train[:1] + data.validation[:1]):
            raise MiniftError("these examples are not pairs: encode them with dpo.encode_pairs")

    def collate(self, rows, device):
        batch = preference_batch([e["input_ids"] for e in rows], [e["chosen"] for e in rows],
                                 [e["rejected"] for e in rows], self.pad_id)
        return {k: v.to(device) for k, v in batch.items()}

    def memory_batch(self, rows, device):  # a step's forward sees the pairs' rows as they are
        return self.collate(rows, device)

    def gradients(self, model, batches, sync=None):
        """dpo_step over the micro-batches of one step, each divided by the step's pairs (and, for ORPO, chosen
        tokens) in every process, so the micro-batches add up to one batch. Returns (loss, metrics: means over pairs)."""
        pairs = sum(count_pairs(b) for b in batches)
        step_pairs = sync.count(pairs) if sync is not None else pairs
        tokens = sum(count_chosen_tokens(b) for b in batches) if self.nll_weight else None
        step_tokens = sync.count(tokens) if sync is not None and tokens else tokens
        if self.reference is not None:
            self.reference.to(batches[0]["input_ids"].device)
        loss, metrics = 0.0, {}
        for b in batches:
            part, m = dpo_step(model, b, self.loss_type, self.beta, self.label_smoothing, reference=self.reference,
                               num_pairs=step_pairs, num_chosen_tokens=step_tokens, rpo_alpha=self.rpo_alpha)
            loss += part
            for k, v in m.items():  # means over this process's pairs (nll_loss is a part of a sum already)
                metrics[k] = metrics.get(k, 0.0) + (v if k == "nll_loss" else v * count_pairs(b) / pairs)
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, model, examples, device, batch_size=16):
        """The loss and TRL's metrics over held-out pairs (eval mode: no dropout): means over pairs."""
        if not examples:
            raise MiniftError("no pairs to evaluate; is the split empty?")
        totals, n = {}, 0
        if self.reference is not None:
            self.reference.to(device)
        for i in range(0, len(examples), batch_size):
            batch = self.collate(examples[i:i + batch_size], device)
            policy = logprobs_without_grad(model, batch)
            ref = reference_logprobs(model, batch, self.reference) if self.loss_type in NEEDS_REFERENCE else None
            losses, _, metrics = pair_loss(self.loss_type, policy, ref, self.beta, self.label_smoothing)
            k = count_pairs(batch)
            metrics["loss"] = losses.mean().item()
            if self.nll_weight:  # + the chosen answers' NLL, as in training (per batch here)
                metrics["loss"] -= self.nll_weight * policy.sums.chunk(2)[0].sum().item() / count_chosen_tokens(batch)
            for name, v in metrics.items():
                totals[name] = totals.get(name, 0.0) + v * k
            n += k
        return {**{name: v / n for name, v in totals.items()}, "num_pairs": n}


# ---------------------------------------------------------------------------------------------------------
# The job

def finetune_dpo(model=recipe.DPO_JOB["model"], data=recipe.DPO_JOB["data"], out=recipe.DPO_JOB["out"], cfg=None,
                 max_length=recipe.DPO_JOB["max_length"], limit=None, test=True, resume=False,
                 loss_type=recipe.DPO_JOB["loss_type"], beta=recipe.DPO_JOB["beta"], label_smoothing=0.0,
                 rpo_alpha=recipe.DPO_JOB["rpo_alpha"]):
    """Preference-tune a decoder on pairs (a JSONL file; None: the arithmetic task, with pairs from the model's own
    replies). LoRA (cfg.lora_r > 0): the reference is the model with its adapters off; full fine-tuning: a frozen copy
    of the model as loaded. Prints the validation pairs' loss, rewards and accuracy, and on the arithmetic task the
    exact match before and after; returns the report (also in OUT/results.json)."""
    cfg = cfg or TrainConfig(**recipe.DPO_TRAIN)
    t0 = time.perf_counter()
    path = resolve_model(model)
    seed_everything(cfg.seed)
    net = load_checkpoint(path, "lm")
    tok = Tokenizer.from_file(path)
    device = pick_device(cfg.device)
    net.max_length, base = max_length, snapshot(net)
    report = {"model": str(path), "config": vars(cfg), "loss_type": loss_type, "beta": beta, "rpo_alpha": rpo_alpha}
    task = data is None
    if task:  # the arithmetic task: pairs made from the base model's own replies (on-policy)
        questions = limit_rows(arithmetic_splits(cfg.seed), limit)
        report["exact_match_before"] = exact_match(net.to(device), tok, questions["validation"], kind="number")["exact_match"]
        print(f"zero-shot exact match on {len(questions['validation'])} validation questions: {report['exact_match_before']:.4f}")
        splits = {k: on_policy_pairs(net, tok, v, cfg.seed) for k, v in questions.items() if k != "test"}
    else:
        splits = limit_rows(load_jsonl_splits(data, cfg.seed, "prompt/chosen/rejected rows"), limit)
    encoded = {}
    for k in ("train", "validation") + (("test",) if test and not task else ()):
        encoded[k], dropped = encode_pairs(splits[k], tok, max_length)
        if dropped:
            print(f"{k}: {dropped} pairs dropped (the prompt alone fills max_length {max_length})")
    if not encoded["train"] or not encoded["validation"]:
        raise MiniftError(f"no training or validation pair is left within max_length {max_length}: raise it")
    reference = None if cfg.lora_r or loss_type not in NEEDS_REFERENCE else frozen_copy(net)  # the model as loaded
    objective = PreferenceObjective(tok.pad_id, loss_type, beta, label_smoothing, reference, rpo_alpha)
    print(f"{len(encoded['train'])} training pairs, {len(encoded['validation'])} validation pairs; loss {loss_type}, "
          f"beta {beta}; reference: " + ("none (reference-free)" if loss_type not in NEEDS_REFERENCE else
                                          "the model with its LoRA adapters off" if reference is None else
                                          "a frozen copy of the model as loaded (its weights' memory once more)"))
    report["train_pairs"] = len(encoded["train"])
    report.update(train(net, TrainData(encoded["train"], encoded["validation"], tok.pad_id, objective=objective), cfg, out,
                        resume=resume))
    if not distributed.is_main():
        return report
    best = load_best(out, "lm", device)
    report["validation"], report["weights_moved"] = report.pop("best_metrics"), weights_moved(best, base)
    if task:
        report["exact_match_after"] = exact_match(best, tok, questions["validation"], kind="number")["exact_match"]
        print(f"exact match on {len(questions['validation'])} validation questions: {report['exact_match_before']:.4f} "
              f"zero-shot -> {report['exact_match_after']:.4f} after {loss_type}")
    if test:  # the one look at the test split
        if task:
            report["test"] = {"exact_match": exact_match(best, tok, questions["test"], kind="number")["exact_match"]}
        elif encoded["test"]:  # best/ is merged under LoRA: the reference is the model as loaded, again
            judge = PreferenceObjective(tok.pad_id, loss_type, beta, label_smoothing,
                                        load_checkpoint(path, "lm", verbose=False) if loss_type in NEEDS_REFERENCE else None,
                                        rpo_alpha)
            report["test"] = judge.evaluate(best, encoded["test"], device)
    return finish(report, out, t0, f"generate with:  minift generate {Path(out) / 'best'} \"...\"")

