"""The preference-tuning job: `minift finetune --task dpo` teaches a decoder which of two answers is better, and
`--task kto` which answers are good and which are bad, one at a time (no pairs needed).

    pairs (a JSONL file, or the arithmetic task's on-policy pairs) -> encode_pairs -> train (train.py, with
    PreferenceObjective as its loss) -> report (outputs.py)
    unpaired rows (prompt, completion, label; or pairs, split in two) -> encode_unpaired -> train (KTOObjective)

It stands beside classify.py and instruct.py on the same skeleton. The loop is train.py's, unchanged: what differs
is the objective it is given (objective.py's contract): how pairs (or rows) become a batch, the step (preference.py's
dpo_step or kto_step: the reference log-probs, the loss, its hand-written backward) and how a model is judged on
held-out pairs. DPOSettings (KTOSettings) says how the loss is computed; every setting is checked before anything
loads.
"""
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import distributed, recipe
from .batching import TrainData
from .checkpoints import load_checkpoint
from .config import TrainConfig, check_fields, check_own_loss_config
from .corpora import arithmetic_splits, limit_rows, load_jsonl_splits
from .data import check_max_length
from .errors import MiniftError
from .evals import exact_match, greedy_replies, score_replies
from .hub import resolve_model
from .lora import lora_layers
from .outputs import after_training, finish, load_best, weights_moved
from .preference import (LOSS_TYPES, NEEDS_REFERENCE, count_chosen_tokens, count_pairs, dpo_step, frozen_copy, kto_batch,
                         kto_kl, kto_loss, kto_mismatched_batch, kto_step, logprobs_without_grad, pair_loss,
                         preference_batch, reference_logprobs)
from .tasks import check_turns, format_instruction
from .tokenizer import Tokenizer
from .train import evaluate_like_training, pick_device, seed_everything, train


# ---------------------------------------------------------------------------------------------------------
# The settings

@dataclass
class DPOSettings:
    """How the preference loss is computed, with TRL's names and defaults (DPOConfig; CPOConfig's simpo_gamma).
    recipe.DPO_SETTINGS holds the job's own choices on top (rpo_alpha 1). `minift finetune --task dpo` has a flag per
    field (--loss-type, --beta ...), and a TOML file a key."""
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | simpo | orpo (preference.py)
    beta: float = 0.1  # DPO, IPO: how far from the reference; SimPO (2 is usual), ORPO: the scale of the rewards
    label_smoothing: float = 0.0  # sigmoid, simpo: the chance that a pair's preference is wrong (cDPO), below 0.5
    rpo_alpha: float = 0.0  # weight of the chosen answers' NLL added to the loss (RPO); orpo adds it with weight 1
    simpo_gamma: float = 0.5  # simpo: the target margin between the chosen and rejected average log-probs

    def check(self, cfg=None):
        """Each field's type and range, and what the loop's settings must be for preference tuning, in one line each,
        before anything is loaded. Returns self."""
        check_fields(self, {"loss_type": LOSS_TYPES}, RANGES)
        if cfg is not None:
            check_preference_config(cfg)
        return self


RANGES = {"beta": (0, False, "> 0: it scales the log-ratios (0.1 is usual for DPO, 2 for SimPO)"),
          "label_smoothing": (0, True, "in [0, 0.5): the chance that a pair's label is wrong (0 = none)", 0.5, False),
          "rpo_alpha": (0, True, ">= 0: the weight of the chosen answers' NLL (0 = none, RPO uses 1)"),
          "simpo_gamma": (0, True, ">= 0: SimPO's target margin (0.5 is TRL's)")}


@dataclass
class KTOSettings:
    """KTO's loss (preference.kto_loss), with TRL's KTOConfig names and defaults. recipe.KTO_SETTINGS holds the job's
    own choices on top. `minift finetune --task kto` has a flag per field (--beta, --desirable-weight ...)."""
    beta: float = 0.1  # how far from the reference, as DPO's
    desirable_weight: float = 1.0  # the weight of a desirable row's loss, and of an undesirable one's: with unequal
    undesirable_weight: float = 1.0  # numbers n_d, n_u of each, the paper keeps w_d n_d / (w_u n_u) in [1, 4/3]

    def check(self, cfg=None):
        """Each field's type and range, and the loop's settings as preference tuning needs them, one line each."""
        check_fields(self, {}, KTO_RANGES)
        if cfg is not None:
            check_preference_config(cfg)
            if cfg.batch_size < 2:
                raise MiniftError("KTO's reference point pairs each prompt with another row's completion of the same "
                                  "step: give batch_size >= 2 (TRL refuses 1 too)")
        return self


KTO_RANGES = {"beta": (0, False, "> 0: it scales the log-ratios (0.1 is TRL's)"),
              "desirable_weight": (0, False, "> 0: the weight of a desirable row's loss (1.0 is TRL's)"),
              "undesirable_weight": (0, False, "> 0: the weight of an undesirable row's loss (1.0 is TRL's)")}


def check_preference_config(cfg):
    """What the loop's settings must be for preference tuning (DPO and KTO alike), in one line each."""
    check_own_loss_config(cfg, "preference tuning", ("loss", "exact_match"), "the model with the lowest validation "
                          "loss (the loss on held-out pairs), or on a task with answers the best exact match",
                          "packing puts rows of different texts in one sequence; a pair is two rows that must stay apart "
                          "(and KTO pairs rows with each other's prompts)", "preference.py's dpo_step and kto_step")


# ---------------------------------------------------------------------------------------------------------
# Pairs: read, turned into texts, encoded

def check_pair_row(row, where):
    """A pair row in one of TRL's three layouts: {"prompt", "chosen", "rejected"} as texts; the prompt as chat turns
    and each answer as the assistant's turn (a list of one turn); or {"chosen", "rejected"} as whole conversations
    that share every turn but the last. Answers that are empty or the same are refused: the pair teaches nothing."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise MiniftError(f"{where}: a preference row needs 'chosen' and 'rejected' (and 'prompt', unless they are "
                          "whole conversations); it has " + (", ".join(row) if isinstance(row, dict) else "no fields"))
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        if not isinstance(row["prompt"], str):
            check_turns(row["prompt"], where, "'prompt'")
    elif not (isinstance(chosen, list) and isinstance(rejected, list) and chosen[:-1] == rejected[:-1] and chosen[:-1]):
        raise MiniftError(f"{where}: without a 'prompt', 'chosen' and 'rejected' must be conversations that share every "
                          "turn but the last (the two answers)")
    answers = [check_turns(a, where, f"'{k}'")[-1]["content"] if isinstance(a, list) else a
               for k, a in (("chosen", chosen), ("rejected", rejected))]
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise MiniftError(f"{where}: 'chosen' and 'rejected' must be non-empty texts (or end with an assistant turn)")
    if answers[0].strip() == answers[1].strip():
        raise MiniftError(f"{where}: 'chosen' and 'rejected' are the same answer ({answers[0][:40]!r}): a pair teaches "
                          "only by its difference; fix the row or drop it")


def pair_texts(row, tok, where):
    """A pair row (check_pair_row's layouts) -> (prompt text in the model's chat template, chosen text, rejected text)."""
    check_pair_row(row, where)
    chosen, rejected = row["chosen"], row["rejected"]
    prompt = row.get("prompt")
    if prompt is None:  # whole conversations: the shared turns are the prompt
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    replies = [c[-1]["content"] if isinstance(c, list) else c for c in (chosen, rejected)]
    turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    prompt_text = format_instruction({"messages": turns + [{"role": "assistant", "content": replies[0]}]}, tok, where)[0]
    return prompt_text, replies[0], replies[1]


def encode_pairs(rows, tok, max_length):
    """Pair rows -> examples {"input_ids": the prompt's tokens, "chosen", "rejected": each answer's tokens and EOS, and
    the row's "answer" where it has one (the task's right number)}, prompt + answer cut to max_length; a pair whose
    prompt alone fills it is dropped. Returns (examples, dropped)."""
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
        examples.append({"input_ids": p, "chosen": answers[0], "rejected": answers[1],
                         **({"answer": row["answer"]} if "answer" in row else {})})
    return examples, dropped


def check_unpaired_row(row, where):
    """A KTO row in TRL's unpaired layout, {"prompt", "completion", "label"}: the prompt a text or chat turns, the
    completion a text (or the assistant's turn, a list of one), the label true (desirable) or false (undesirable). A
    pair row (check_pair_row's layouts) is taken too: it becomes two rows, as TRL's unpair_preference_dataset does."""
    if isinstance(row, dict) and "chosen" in row and "rejected" in row:
        return check_pair_row(row, where)
    if not isinstance(row, dict) or not {"prompt", "completion", "label"} <= set(row):
        raise MiniftError(f"{where}: a KTO row needs 'prompt', 'completion' and 'label' (true: desirable, false: not), "
                          "or 'chosen' and 'rejected' (a pair, split in two); it has "
                          + (", ".join(row) if isinstance(row, dict) else "no fields"))
    if not isinstance(row["label"], bool):
        raise MiniftError(f"{where}: 'label' is {row['label']!r}: give true (a desirable completion) or false")
    if not isinstance(row["prompt"], str):
        check_turns(row["prompt"], where, "'prompt'")
    completion = row["completion"]
    if isinstance(completion, list):
        completion = check_turns(completion, where, "'completion'")[-1]["content"]
    if not (isinstance(completion, str) and completion.strip()):
        raise MiniftError(f"{where}: 'completion' must be a non-empty text (or end with an assistant turn)")


def unpaired_texts(row, tok, where):
    """An unpaired row (or a pair, split) -> [(prompt text in the model's chat template, completion text, label)]."""
    check_unpaired_row(row, where)
    if "chosen" in row and "rejected" in row:
        prompt, chosen, rejected = pair_texts(row, tok, where)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    completion = row["completion"][-1]["content"] if isinstance(row["completion"], list) else row["completion"]
    turns = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    prompt = format_instruction({"messages": turns + [{"role": "assistant", "content": completion}]}, tok, where)[0]
    return [(prompt, completion, row["label"])]


def encode_unpaired(rows, tok, max_length):
    """KTO rows -> examples {"input_ids": the prompt's tokens, "completion": the answer's tokens and EOS, "label", and
    the row's "answer" where it has one}, prompt + completion cut to max_length; a row whose prompt alone fills it is
    dropped. Returns (examples, dropped)."""
    check_max_length(max_length)
    if tok.eos_id is None:
        raise MiniftError("this tokenizer has no end-of-text token; preference tuning needs one to end the answers")
    examples, dropped = [], 0
    for n, row in enumerate(rows, 1):
        for prompt, completion, label in unpaired_texts(row, tok, f"row {n}"):
            p = tok.encode(prompt, add_special_tokens=False)
            if len(p) >= max_length:
                dropped += 1
                continue
            examples.append({"input_ids": p, "completion": (tok.encode(completion, add_special_tokens=False)
                                                            + [tok.eos_id])[:max_length - len(p)],
                             "label": label, **({"answer": row["answer"]} if "answer" in row else {})})
    return examples, dropped


def first_line(reply):
    return reply.strip().splitlines()[0] if reply.strip() else ""


def swap_number(reply, old, new):
    """The reply's first line with its last `old` number replaced by `new`: the same words, another answer."""
    line = first_line(reply)
    at = line.rfind(old) if old else -1
    return line[:at] + new + line[at + len(old):] if at >= 0 else new


def on_policy_pairs(rows, scored, seed=0):
    """Pairs from the model's own greedy replies to the arithmetic rows (`scored`: evals.exact_match's items for
    them, kind "number"): a wrong reply is the rejected answer and the same reply with the right number the chosen one;
    a right reply is the chosen one and, rejected, the same reply with a near miss (the answer +-1). Each pair differs
    in the number only: what DPO learns is the arithmetic. A reply with no number at all: the bare right number
    against a bare wrong one. Each pair keeps its row's "answer", so the job can score exact match on it."""
    rng, pairs = random.Random(seed), []
    for row, s in zip(rows, scored):
        reply, right, said = s["reply"], row["answer"], s["parsed"]
        if said == right:
            chosen, rejected = first_line(reply), swap_number(reply, right, str(int(right) + rng.choice((-1, 1))))
        elif said:
            chosen, rejected = swap_number(reply, said, right), first_line(reply)
        else:
            chosen, rejected = right, "1" if right == "0" else "0"
        pairs.append({"prompt": row["prompt"], "chosen": chosen, "rejected": rejected, "answer": right})
    return pairs


# ---------------------------------------------------------------------------------------------------------
# The objectives: what train() does with pairs (DPO and its kin) or with unpaired rows (KTO)

def judged_by(answers, cfg):
    """The figure that chooses best/: cfg.metric, or with 'auto' exact match where the examples carry the task's right
    answers, else the validation loss."""
    offered = ("exact_match", "loss") if answers else ("loss",)
    if cfg.metric == "auto":
        return offered[0]
    if cfg.metric not in offered:
        raise MiniftError(f"metric {cfg.metric!r}: these examples have no right answer to match (only the task's do): "
                          "use metric='loss'")
    return cfg.metric


class PreferenceObjective:
    """DPO (or IPO, SimPO, ORPO) as the loop's objective (objective.py). Examples: encode_pairs'. A batch:
    preference_batch's (the chosen rows, then the rejected ones). `reference`: a frozen copy of the model before
    training (full fine-tuning), or None: the model itself with its LoRA adapters off. Where every example carries
    its "answer" (the arithmetic task), evaluate() also scores the greedy reply's number: exact_match."""

    def __init__(self, tok, settings=None, reference=None):
        self.tok, self.dpo, self.reference = tok, (settings or DPOSettings()).check(), reference
        self.nll_weight = 1.0 if self.dpo.loss_type == "orpo" else self.dpo.rpo_alpha
        self.answers = False  # set by check(): whether the validation pairs carry right answers

    def settings(self):
        """What a resume must find the same (train.py's run_info)."""
        return asdict(self.dpo)

    def metric(self, model, cfg):
        return judged_by(self.answers, cfg)

    def check(self, model, data, cfg):
        self.dpo.check(cfg)
        if model.task != "lm":
            raise MiniftError("preference tuning needs a language model: load it with task='lm'")
        if self.dpo.loss_type in NEEDS_REFERENCE and self.reference is None and not cfg.lora_r:
            raise MiniftError(f"loss {self.dpo.loss_type!r} compares with a reference model: train LoRA adapters "
                              "(the reference is then the model with them off) or give reference=preference.frozen_copy(model)")
        if any("chosen" not in e or "rejected" not in e for e in data.train[:1] + data.validation[:1]):
            raise MiniftError("these examples are not pairs: encode them with dpo.encode_pairs")
        self.answers = all("answer" in e for e in data.validation)
        self.metric(model, cfg)

    def collate(self, rows, device):
        batch = preference_batch([e["input_ids"] for e in rows], [e["chosen"] for e in rows],
                                 [e["rejected"] for e in rows], self.tok.pad_id)
        return {k: v.to(device) for k, v in batch.items()}

    def memory_batch(self, rows, device):  # a step's forward sees the pairs' rows as they are
        return self.collate(rows, device)

    def gradients(self, model, batches, sync=None):
        """dpo_step over the micro-batches of one step, each divided by the step's pairs (and, for the NLL term, its
        chosen tokens) in every process, so the micro-batches add up to one batch. Returns (loss, metrics: means over
        pairs)."""
        pairs = sum(count_pairs(b) for b in batches)
        step_pairs = sync.count(pairs) if sync is not None else pairs
        tokens = sum(count_chosen_tokens(b) for b in batches) if self.nll_weight else None
        step_tokens = sync.count(tokens) if sync is not None and tokens else tokens
        if self.reference is not None:
            self.reference.to(batches[0]["input_ids"].device)
        loss, metrics = 0.0, {}
        for b in batches:
            part, m = dpo_step(model, b, **asdict(self.dpo), reference=self.reference, num_pairs=step_pairs,
                               num_chosen_tokens=step_tokens)
            loss += part
            for k, v in m.items():  # means over this process's pairs (nll_loss is a part of a sum already)
                metrics[k] = metrics.get(k, 0.0) + (v if k == "nll_loss" else v * count_pairs(b) / pairs)
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, model, examples, device, batch_size=16):
        """The loss and TRL's metrics over held-out pairs (eval mode: no dropout), means over pairs; where the pairs
        carry answers, the exact match of the greedy replies to their prompts."""
        if not examples:
            raise MiniftError("no pairs to evaluate; is the split empty?")
        s, totals, n = self.dpo, {}, 0
        if self.reference is not None:
            self.reference.to(device)
        for i in range(0, len(examples), batch_size):
            batch = self.collate(examples[i:i + batch_size], device)
            policy = logprobs_without_grad(model, batch)
            ref = None
            if s.loss_type in NEEDS_REFERENCE:  # (a model whose LoRA adapters are not on yet is its own reference)
                ref = policy if self.reference is None and not lora_layers(model) else \
                    reference_logprobs(model, batch, self.reference)
            losses, _, metrics = pair_loss(s.loss_type, policy, ref, s.beta, s.label_smoothing, s.simpo_gamma)
            k = count_pairs(batch)
            metrics["loss"] = losses.mean().item()
            if self.nll_weight:  # + the chosen answers' NLL, as in training (per batch here)
                metrics["loss"] -= self.nll_weight * policy.sums.chunk(2)[0].sum().item() / count_chosen_tokens(batch)
            for name, v in metrics.items():
                totals[name] = totals.get(name, 0.0) + v * k
            n += k
        result = {**{name: v / n for name, v in totals.items()}, "num_pairs": n}
        if all("answer" in e for e in examples):
            replies = greedy_replies(model, self.tok, [e["input_ids"] for e in examples], max_new_tokens=16,
                                     batch_size=batch_size)
            result["exact_match"] = score_replies(replies, [e["answer"] for e in examples], "number")["exact_match"]
        return result


class KTOObjective:
    """KTO as the loop's objective (objective.py). Examples: encode_unpaired's. A micro-batch: kto_batch's rows, their
    labels ("desirable") and the examples themselves ("rows"), from which a step makes its mismatched rows.
    `reference`: a frozen copy of the model before training (full fine-tuning), or None: the model with its LoRA
    adapters off. Where every example carries its "answer" (the arithmetic task), evaluate() also scores the greedy
    reply's number: exact_match."""

    def __init__(self, tok, settings=None, reference=None, max_length=None):
        self.tok, self.kto, self.reference = tok, (settings or KTOSettings()).check(), reference
        self.max_length = max_length  # mismatched rows (a prompt with another row's answer) are cut to it too
        self.answers = False  # set by check(): whether the validation rows carry right answers

    def settings(self):
        return asdict(self.kto)

    def metric(self, model, cfg):
        return judged_by(self.answers, cfg)

    def check(self, model, data, cfg):
        self.kto.check(cfg)
        if model.task != "lm":
            raise MiniftError("KTO needs a language model: load it with task='lm'")
        if self.reference is None and not cfg.lora_r:
            raise MiniftError("KTO compares with a reference model: train LoRA adapters (the reference is then the model "
                              "with them off) or give reference=preference.frozen_copy(model)")
        if any("completion" not in e or "label" not in e for e in data.train[:1] + data.validation[:1]):
            raise MiniftError("these examples are not KTO rows: encode them with dpo.encode_unpaired")
        self.answers = all("answer" in e for e in data.validation)
        self.metric(model, cfg)

    def batch(self, prompts, completions, device):
        return {k: v.to(device) for k, v in kto_batch(prompts, completions, self.tok.pad_id, self.max_length).items()}

    def collate(self, rows, device):
        return {**self.batch([e["input_ids"] for e in rows], [e["completion"] for e in rows], device),
                "desirable": torch.tensor([e["label"] for e in rows], device=device), "rows": rows}

    def memory_batch(self, rows, device):  # a step's training forward sees the rows as they are
        return self.batch([e["input_ids"] for e in rows], [e["completion"] for e in rows], device)

    def reference_of(self, model):
        """What kto_kl and reference_logprobs compare with: the frozen copy, the model with its adapters off (None), or,
        before any adapter is on (the score before training), the model itself."""
        return self.reference if self.reference is not None or lora_layers(model) else model

    def gradients(self, model, batches, sync=None):
        """The step's reference point first: each prompt of the step with the completion of the row before it (TRL's
        rotation, over the step's rows: one micro-batch, as in TRL, or several, which then add up to one batch), cut
        like the micro-batches; then kto_step on each, divided by the step's rows in every process. Under several
        processes the reference point is the mean over all their rows (kto_kl with sync). Returns (loss, metrics)."""
        rows = [e for b in batches for e in b["rows"]]
        step_rows = sync.count(len(rows)) if sync is not None else len(rows)
        device = batches[0]["input_ids"].device
        if self.reference is not None:
            self.reference.to(device)
        completions = [e["completion"] for e in rows]
        rotated, mismatched, start = completions[-1:] + completions[:-1], [], 0  # kto_mismatched_batch's, step-wide
        for b in batches:
            end = start + len(b["rows"])
            mismatched.append(self.batch([e["input_ids"] for e in rows[start:end]], rotated[start:end], device))
            start = end
        kl = kto_kl(model, mismatched, self.reference, sync)
        loss, parts = 0.0, []
        for b in batches:
            inputs = {k: b[k] for k in ("input_ids", "attention_mask", "labels")}
            part, m = kto_step(model, inputs, b["desirable"], kl, **asdict(self.kto), reference=self.reference,
                               num_rows=step_rows)
            loss += part
            parts.append((m, b["desirable"]))
        return loss, merge_kto_metrics(parts)

    @torch.no_grad()
    def evaluate(self, model, examples, device, batch_size=16):
        """The loss and TRL's figures over held-out rows (eval mode), each batch's reference point from its own rows (as
        TRL evaluates); where the rows carry answers, the exact match of the greedy replies to their prompts (each
        prompt once: a pair split in two gives one prompt two rows)."""
        if not examples:
            raise MiniftError("no rows to evaluate; is the split empty?")
        k, parts, reference = self.kto, [], self.reference_of(model)
        if self.reference is not None:
            self.reference.to(device)
        for i in range(0, len(examples), batch_size):
            b = self.collate(examples[i:i + batch_size], device)
            mismatched = kto_mismatched_batch([e["input_ids"] for e in b["rows"]], [e["completion"] for e in b["rows"]],
                                              self.tok.pad_id, self.max_length)
            kl = kto_kl(model, [{name: t.to(device) for name, t in mismatched.items()}], reference)
            inputs = {name: b[name] for name in ("input_ids", "attention_mask", "labels")}
            policy = logprobs_without_grad(model, inputs)
            ref = reference_logprobs(model, inputs, reference)
            losses, _, metrics = kto_loss(policy.sums, ref.sums, b["desirable"], kl, k.beta, k.desirable_weight,
                                          k.undesirable_weight)
            parts.append(({**metrics, "loss": losses.mean().item()}, b["desirable"]))
        result = {**merge_kto_metrics(parts), "num_rows": len(examples)}
        if all("answer" in e for e in examples):
            first = list({tuple(e["input_ids"]): e for e in examples}.values())  # each prompt once
            replies = greedy_replies(model, self.tok, [e["input_ids"] for e in first], max_new_tokens=16,
                                     batch_size=batch_size)
            result["exact_match"] = score_replies(replies, [e["answer"] for e in first], "number")["exact_match"]
        return result


def merge_kto_metrics(parts):
    """Per-batch KTO figures [(metrics, desirable)] -> one set: ".../chosen" weighted by each batch's desirable rows,
    ".../rejected" by its undesirable ones, the rest (kl, loss) by all its rows; the margin from the merged means."""
    totals, weights = {}, {}
    for metrics, desirable in parts:
        rows = {"chosen": int(desirable.sum()), "rejected": int((~desirable).sum())}
        for name, value in metrics.items():
            w = rows.get(name.rsplit("/", 1)[-1], len(desirable))
            totals[name], weights[name] = totals.get(name, 0.0) + value * w, weights.get(name, 0) + w
    merged = {name: totals[name] / weights[name] for name in totals if name != "rewards/margins"}
    if "rewards/chosen" in merged and "rewards/rejected" in merged:
        merged["rewards/margins"] = merged["rewards/chosen"] - merged["rewards/rejected"]
    return merged


# ---------------------------------------------------------------------------------------------------------
# The job

def finetune_dpo(model=recipe.DPO_JOB["model"], data=recipe.DPO_JOB["data"], out=recipe.DPO_JOB["out"], cfg=None,
                 settings=None, max_length=recipe.DPO_JOB["max_length"], limit=None, test=True, resume=False):
    """Preference-tune a decoder on pairs (a JSONL file; None: the arithmetic task, with pairs from the model's own
    replies, best/ chosen by exact match). settings: DPOSettings (None: recipe.DPO_SETTINGS), or KTOSettings for KTO on
    unpaired rows (finetune_kto). LoRA (cfg.lora_r > 0): the reference is the model with its adapters off; full
    fine-tuning: a frozen copy of the model as loaded. Prints the validation loss, rewards and accuracy (and exact
    match) before and after; returns the report (also in OUT/results.json)."""
    cfg = cfg or TrainConfig(**recipe.DPO_TRAIN)
    settings = (settings or DPOSettings(**recipe.DPO_SETTINGS)).check(cfg)  # before anything is loaded
    kto = isinstance(settings, KTOSettings)
    t0 = time.perf_counter()
    task = data is None
    rows = arithmetic_splits() if task else load_jsonl_splits(
        data, cfg.seed, check_unpaired_row if kto else check_pair_row,
        "prompt/completion/label rows (or pairs)" if kto else "prompt/chosen/rejected rows")
    rows = {k: v for k, v in limit_rows(rows, limit).items() if k != "test" or test}
    path = resolve_model(model)
    seed_everything(cfg.seed)
    net = load_checkpoint(path, "lm")
    tok = Tokenizer.from_file(path)
    device = pick_device(cfg.device)
    net.max_length = max_length
    if task:  # the arithmetic task: pairs made from the base model's own replies (on-policy); KTO splits each in two
        rows = {k: on_policy_pairs(v, exact_match(net.to(device), tok, v, kind="number")["items"], cfg.seed)
                for k, v in rows.items()}
    kind, encoded = "rows" if kto else "pairs", {}
    for k, v in rows.items():
        encoded[k], dropped = (encode_unpaired if kto else encode_pairs)(v, tok, max_length)
        if dropped:
            print(f"{k}: {dropped} {kind} dropped (the prompt alone fills max_length {max_length})")
    if not encoded["train"] or not encoded["validation"]:
        raise MiniftError(f"no training or validation {kind[:-1]} is left within max_length {max_length}: raise it")
    needs_reference = kto or settings.loss_type in NEEDS_REFERENCE
    objective = make_objective(tok, settings, None if cfg.lora_r or not needs_reference else frozen_copy(net), max_length)
    print(f"{len(encoded['train'])} training {kind}, {len(encoded['validation'])} validation {kind}; "
          + (f"KTO, beta {settings.beta}, weights {settings.desirable_weight} desirable / {settings.undesirable_weight} "
             f"undesirable ({sum(e['label'] for e in encoded['train'])} desirable training rows)" if kto else
             f"loss {settings.loss_type}, beta {settings.beta}, rpo_alpha {settings.rpo_alpha}") + "; reference: "
          + ("none (reference-free)" if not needs_reference else
             "the model with its LoRA adapters off" if objective.reference is None else
             "a frozen copy of the model as loaded (its weights' memory once more)"))
    report = {"model": str(path), "config": vars(cfg), "kto" if kto else "dpo": asdict(settings),
              f"train_{kind}": len(encoded["train"])}
    train_data = TrainData(encoded["train"], encoded["validation"], tok.pad_id, objective=objective)
    # measured as the loop measures validation (its precision): before and after are comparable
    report["before"] = evaluate_like_training(net.to(device), encoded["validation"], train_data, cfg, device)
    report.update(train(net, train_data, cfg, out, resume=resume))
    if not distributed.is_main():
        return report
    with after_training(out):
        best = load_best(out, "lm", device)
        report["validation"], report["weights_moved"] = report.pop("best_metrics"), weights_moved(best, path)
        for name in ("exact_match", "loss", "rewards/accuracies", "rewards/margins"):
            if name in report["validation"]:
                print(f"validation {name}: {report['before'][name]:.4f} before -> {report['validation'][name]:.4f} "
                      f"after {'kto' if kto else settings.loss_type}")
        if test and encoded["test"]:  # the one look at the test split; best/ is merged: the reference is loaded anew
            judge = make_objective(tok, settings, load_checkpoint(path, "lm", verbose=False) if needs_reference else None,
                                   max_length)
            report["test"] = evaluate_like_training(best, encoded["test"], TrainData([], [], tok.pad_id, objective=judge),
                                                    cfg, device)
    return finish(report, out, t0, f"generate with:  minift generate {Path(out) / 'best'} \"...\"")


def make_objective(tok, settings, reference, max_length):
    """KTOObjective for KTOSettings, PreferenceObjective for DPOSettings."""
    if isinstance(settings, KTOSettings):
        return KTOObjective(tok, settings, reference, max_length)
    return PreferenceObjective(tok, settings, reference)


def finetune_kto(model=recipe.KTO_JOB["model"], data=recipe.KTO_JOB["data"], out=recipe.KTO_JOB["out"], cfg=None,
                 settings=None, max_length=recipe.KTO_JOB["max_length"], limit=None, test=True, resume=False):
    """KTO on unpaired rows: a JSONL file of {"prompt", "completion", "label"} rows (pairs are split in two, a desirable
    and an undesirable row), or None: the arithmetic task's on-policy pairs, split. finetune_dpo with settings a
    KTOSettings (None: recipe.KTO_SETTINGS) and recipe.KTO_TRAIN's loop."""
    return finetune_dpo(model, data, out, cfg or TrainConfig(**recipe.KTO_TRAIN), settings or KTOSettings(**recipe.KTO_SETTINGS),
                        max_length, limit, test, resume)
