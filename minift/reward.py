"""The reward-model job: `minift finetune --task reward` trains a judge, a model with a one-number head that scores a
prompt and an answer, so that the chosen answer of a pair scores above the rejected one.

    pairs (a JSONL file of prompt/chosen/rejected rows, TRL's layouts; or the arithmetic task's) -> encode_pairs ->
    train (train.py, with RewardObjective as its loss) -> report (outputs.py)

The model is a heads.Classifier with one output (num_labels=1): a decoder's head reads the last real token (the one
that has seen the whole text), as transformers' ...ForSequenceClassification does; an encoder's its pooled vector.
best/ is then a checkpoint that transformers' AutoModelForSequenceClassification loads with num_labels=1 (config.json
names the ...ForSequenceClassification architecture, num_labels 1, id2label {"0": "reward"}, the pad token it finds
the last real token by). The loss is Bradley-Terry's, as TRL's RewardTrainer computes it: the chosen answer wins
with probability sigmoid(r_c - r_r), and the loss is its negative log, with a pair's optional margin m (TRL's "margin"
column: by how much the chosen is better) and TRL's optional center_rewards_coefficient c (rewards near 0 on average):
    loss = -log sigmoid(r_c - r_r - m) + c (r_c + r_r)^2
    d loss / d r_c = -sigmoid(-(r_c - r_r - m)) + 2 c (r_c + r_r),   d loss / d r_r = sigmoid(-(r_c - r_r - m)) + 2 c (r_c + r_r)
(d/dz -log sigmoid(z) = -sigmoid(-z)). Those two numbers per pair are the head's dlogits; the classifier's own backward
does the rest. It is judged by its accuracy on held-out pairs: how often the chosen answer scores higher.

A reward model trained here is GRPO's reward: `minift finetune --task grpo --reward-model OUT/best`
(grpo.reward_from_model) scores each prompt + completion as scored_text writes them here.
"""
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import distributed, recipe
from .batching import TrainData, pad_rows
from .checkpoints import load_checkpoint
from .config import TrainConfig, check_fields, check_own_loss_config
from .corpora import arithmetic_splits, limit_rows, load_jsonl_splits
from .errors import MiniftError
from .hub import resolve_model
from .layers import fp32_dtype
from .outputs import after_training, finish, load_best, weights_moved
from .tasks import check_turns, format_instruction
from .tokenizer import Tokenizer
from .train import evaluate_like_training, pick_device, seed_everything, train


# ---------------------------------------------------------------------------------------------------------
# The loss

def bradley_terry_loss(chosen, rejected, margin=None, center_rewards_coefficient=None):
    """Per pair: the loss and its derivatives with respect to the two rewards (the module's docstring derives them).
    chosen, rejected (N,) rewards; margin (N,) or None. Returns (losses (N,), d / d chosen, d / d rejected)."""
    z = chosen - rejected - (0 if margin is None else margin)
    losses, d = -F.logsigmoid(z), -torch.sigmoid(-z)
    d_chosen, d_rejected = d, -d
    if center_rewards_coefficient:
        c, total = center_rewards_coefficient, chosen + rejected
        losses = losses + c * total ** 2
        d_chosen, d_rejected = d_chosen + 2 * c * total, d_rejected + 2 * c * total
    return losses, d_chosen, d_rejected


def pair_metrics(chosen, rejected):
    """TRL's RewardTrainer figures, means over the pairs: accuracy (the chosen one scores higher) and margin."""
    return {"accuracy": (chosen > rejected).double().mean().item(), "margin": (chosen - rejected).mean().item()}


# ---------------------------------------------------------------------------------------------------------
# The settings

@dataclass
class RewardSettings:
    """How the reward model learns, with TRL's RewardConfig name. A pair's margin comes from its row ("margin", as in
    TRL). `minift finetune --task reward` has a flag per field, and a TOML file a key."""
    center_rewards_coefficient: float | None = None  # + c (r_c + r_r)^2: rewards centred on 0 (0.01 is TRL's advice)

    def check(self, cfg=None):
        """Each field's type and range, and what the loop's settings must be for a reward model, in one line each,
        before anything is loaded. Returns self."""
        check_fields(self, {}, RANGES)
        if cfg is None:
            return self
        check_own_loss_config(cfg, "a reward model", ("accuracy", "loss"), "the best accuracy on held-out pairs (how "
                              "often the chosen answer scores higher) or their lowest loss", "packing puts rows of "
                              "different texts in one sequence; a reward model scores each text alone",
                              "reward.py: Bradley-Terry's loss")
        if cfg.chunked_loss:
            raise MiniftError("chunked_loss splits a language model's head; a reward model has one output: use 0")
        return self


RANGES = {"center_rewards_coefficient": (0, True, ">= 0, e.g. 0.01 (None: no centring)")}


# ---------------------------------------------------------------------------------------------------------
# Pairs: read, written as the texts the model scores, encoded

def pair_of(row, where):
    """A pair row in one of TRL's layouts -> (prompt: a text or chat turns, chosen answer, rejected answer): texts
    {"prompt", "chosen", "rejected"}; the prompt as chat turns and each answer as an assistant turn (a list of one);
    or no prompt and two whole conversations that share every turn but the last. A "margin", if given, is a number."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise MiniftError(f"{where}: a pair row needs 'chosen' and 'rejected' (and 'prompt', unless they are whole "
                          "conversations); it has " + (", ".join(row) if isinstance(row, dict) else "no fields"))
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen[:-1] == rejected[:-1] and chosen[:-1]):
            raise MiniftError(f"{where}: without a 'prompt', 'chosen' and 'rejected' must be conversations that share "
                              "every turn but the last (the two answers)")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    if isinstance(prompt, list):
        check_turns(prompt, where, "'prompt'")
    elif not (isinstance(prompt, str) and prompt.strip()):
        raise MiniftError(f"{where}: 'prompt' must be a non-empty text or a list of chat turns")
    answers = [check_turns(a, where, f"'{k}'")[-1]["content"] if isinstance(a, list) else a
               for k, a in (("chosen", chosen), ("rejected", rejected))]
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise MiniftError(f"{where}: 'chosen' and 'rejected' must be non-empty texts (or end with an assistant turn)")
    if answers[0].strip() == answers[1].strip():
        raise MiniftError(f"{where}: 'chosen' and 'rejected' are the same answer ({answers[0][:40]!r}): a pair teaches "
                          "only by its difference; fix the row or drop it")
    if "margin" in row and (isinstance(row["margin"], bool) or not isinstance(row["margin"], (int, float))):
        raise MiniftError(f"{where}: 'margin' must be a number (by how much the chosen answer is better), not "
                          f"{row['margin']!r}")
    return prompt, answers[0], answers[1]


def check_pair_row(row, where):
    pair_of(row, where)


def scored_text(prompt, answer, tok):
    """What the reward model reads: the prompt in the model's chat template (tasks.format_instruction, the one
    formatter) and the answer after it, with no end token, so that the score sits on the answer's last token. GRPO's
    reward_from_model writes its prompts and completions the same way."""
    turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    # format_instruction wants an answer turn (a sampled answer may be empty): its prompt part is all that is kept
    return format_instruction({"messages": turns + [{"role": "assistant", "content": "-"}]}, tok)[0] + answer


def encode_pairs(rows, tok, max_length):
    """Pair rows -> examples {"input_ids": the chosen text's tokens, "rejected": the rejected one's, and "margin" where
    the row has one}. A pair with a text longer than max_length is dropped, as TRL drops it (its score would sit on
    a token that cut the answer short). Returns (examples, dropped)."""
    examples, dropped = [], 0
    for n, row in enumerate(rows, 1):
        prompt, chosen, rejected = pair_of(row, f"pair {n}")
        # the chat template carries its special tokens; plain text (an encoder's) gets the tokenizer's own
        ids = [tok.encode(scored_text(prompt, a, tok), add_special_tokens=tok.chat_template is None)
               for a in (chosen, rejected)]
        if max(len(i) for i in ids) > max_length:
            dropped += 1
            continue
        examples.append({"input_ids": ids[0], "rejected": ids[1],
                         **({"margin": float(row["margin"])} if "margin" in row else {})})
    return examples, dropped


def arithmetic_pairs(rows, seed=0):
    """The arithmetic task as pairs: the right number against a near miss (the answer +-1 to 3), so the judge must
    check the sum to tell them apart. Each keeps its row's "answer"."""
    rng = random.Random(seed)
    return [{"prompt": r["prompt"], "chosen": r["answer"], "answer": r["answer"],
             "rejected": str(int(r["answer"]) + rng.choice((-3, -2, -1, 1, 2, 3)))} for r in rows]


# ---------------------------------------------------------------------------------------------------------
# The objective: what train() does with pairs

class RewardObjective:
    """Bradley-Terry as the loop's objective (objective.py). Examples: encode_pairs'. A batch: the chosen texts, then
    the rejected ones, right-padded (the head reads each row's last real token), and the pairs' margins."""

    def __init__(self, tok, settings=None):
        self.tok, self.reward = tok, (settings or RewardSettings()).check()

    def settings(self):
        return asdict(self.reward)

    def metric(self, model, cfg):
        if cfg.metric not in ("auto", "accuracy", "loss"):
            raise MiniftError(f"metric {cfg.metric!r}: a reward model is judged by 'accuracy' or 'loss'")
        return "accuracy" if cfg.metric == "auto" else cfg.metric

    def check(self, model, data, cfg):
        self.reward.check(cfg)
        if model.task != "classify" or model.config.num_labels != 1:
            raise MiniftError("a reward model is a classifier with one output: load it with task='classify', "
                              "num_labels=1")
        if any("rejected" not in e for e in data.train[:1] + data.validation[:1]):
            raise MiniftError("these examples are not pairs: encode them with reward.encode_pairs")
        if len({"margin" in e for e in data.train + data.validation}) > 1:
            raise MiniftError("some pairs have a 'margin' and some not: give every pair one (0 for none) or none")
        self.metric(model, cfg)

    def collate(self, rows, device):
        ids, mask = pad_rows([e["input_ids"] for e in rows] + [e["rejected"] for e in rows], self.tok.pad_id, "right",
                             device)
        batch = {"input_ids": ids, "attention_mask": mask}
        if "margin" in rows[0]:
            batch["margin"] = torch.tensor([e["margin"] for e in rows], dtype=torch.float64, device=device)
        return batch

    def memory_batch(self, rows, device):
        return self.collate(rows, device)

    def rewards(self, model, batch):
        """The head's one output for every row: (chosen rewards, rejected rewards), in fp32 (or float64)."""
        inputs = {k: v for k, v in batch.items() if k != "margin"}
        rewards = model(**inputs)[:, 0]
        return rewards.to(fp32_dtype(rewards)).chunk(2)

    def gradients(self, model, batches, sync=None):
        """Each micro-batch's forward, loss and backward, divided by the pairs of the whole step (every process).
        Returns (loss, metrics: accuracy and margin over this process's pairs)."""
        pairs = sum(len(b["input_ids"]) // 2 for b in batches)
        step_pairs = sync.count(pairs) if sync is not None else pairs
        loss, chosen_all, rejected_all = 0.0, [], []
        for b in batches:
            with torch.no_grad():
                chosen, rejected = self.rewards(model, b)
                losses, d_chosen, d_rejected = bradley_terry_loss(chosen, rejected, b.get("margin"),
                                                                  self.reward.center_rewards_coefficient)
                model.backward((torch.cat([d_chosen, d_rejected]) / step_pairs)[:, None])
            loss += losses.sum().item() / step_pairs
            chosen_all.append(chosen)
            rejected_all.append(rejected)
        return loss, pair_metrics(torch.cat(chosen_all), torch.cat(rejected_all))

    @torch.no_grad()
    def evaluate(self, model, examples, device, batch_size=16):
        """The loss, accuracy and margin over held-out pairs (eval mode), means over pairs."""
        if not examples:
            raise MiniftError("no pairs to evaluate; is the split empty?")
        was_training, chosen, rejected, losses = model.training, [], [], []
        model.eval()
        try:
            for i in range(0, len(examples), batch_size):
                batch = self.collate(examples[i:i + batch_size], device)
                c, r = self.rewards(model, batch)
                losses.append(bradley_terry_loss(c, r, batch.get("margin"), self.reward.center_rewards_coefficient)[0])
                chosen.append(c)
                rejected.append(r)
        finally:
            model.train(was_training)
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        return {"loss": torch.cat(losses).mean().item(), **pair_metrics(chosen, rejected), "num_pairs": len(chosen)}


# ---------------------------------------------------------------------------------------------------------
# The job

def finetune_reward(model=recipe.REWARD_JOB["model"], data=recipe.REWARD_JOB["data"], out=recipe.REWARD_JOB["out"],
                    cfg=None, settings=None, max_length=recipe.REWARD_JOB["max_length"], limit=None, test=True,
                    resume=False):
    """Train a reward model on pairs (a JSONL file; None: the arithmetic task's right answers against near misses).
    settings: RewardSettings (None: recipe.REWARD_SETTINGS). Prints the held-out pairs' accuracy before and after
    (before: the head drawn at random); returns the report (also in OUT/results.json)."""
    cfg = cfg or TrainConfig(**recipe.REWARD_TRAIN)
    settings = (settings or RewardSettings(**recipe.REWARD_SETTINGS)).check(cfg)  # before anything is loaded
    t0 = time.perf_counter()
    rows = arithmetic_splits() if data is None else load_jsonl_splits(data, cfg.seed, check_pair_row)
    rows = {k: v for k, v in limit_rows(rows, limit).items() if k != "test" or test}
    if data is None:
        rows = {k: arithmetic_pairs(v, cfg.seed) for k, v in rows.items()}
    path = resolve_model(model)
    seed_everything(cfg.seed)
    net = load_checkpoint(path, "classify", num_labels=1)
    net.label_names = ["reward"]  # config.json's id2label: what the one output is
    tok = Tokenizer.from_file(path)
    device = pick_device(cfg.device)
    encoded = {}
    for k, v in rows.items():
        encoded[k], dropped = encode_pairs(v, tok, max_length)
        if dropped:
            print(f"{k}: {dropped} pairs dropped (a text longer than max_length {max_length})")
    if not encoded["train"] or not encoded["validation"]:
        raise MiniftError(f"no training or validation pair is left within max_length {max_length}: raise it")
    net.max_length = max_length
    objective = RewardObjective(tok, settings)
    print(f"{len(encoded['train'])} training pairs, {len(encoded['validation'])} validation pairs; Bradley-Terry"
          + (f", center_rewards_coefficient {settings.center_rewards_coefficient}"
             if settings.center_rewards_coefficient else "") + ("; margins from the rows" if "margin" in
                                                                 encoded["train"][0] else ""))
    report = {"model": str(path), "config": vars(cfg), "reward": asdict(settings), "train_pairs": len(encoded["train"])}
    train_data = TrainData(encoded["train"], encoded["validation"], tok.pad_id, objective=objective)
    report["before"] = evaluate_like_training(net.to(device), encoded["validation"], train_data, cfg, device)
    report.update(train(net, train_data, cfg, out, resume=resume))
    if not distributed.is_main():
        return report
    with after_training(out):
        best = load_best(out, "classify", device)
        report["validation"], report["weights_moved"] = report.pop("best_metrics"), weights_moved(best, path)
        print(f"validation accuracy: {report['before']['accuracy']:.4f} before (a head drawn at random) -> "
              f"{report['validation']['accuracy']:.4f} after")
        if test and encoded.get("test"):  # the one look at the test split
            report["test"] = evaluate_like_training(best, encoded["test"], train_data, cfg, device)
    return finish(report, out, t0, f"use it as GRPO's reward:  minift finetune --task grpo --reward-model "
                                   f"{Path(out) / 'best'}")
