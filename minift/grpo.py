"""The RL job: `minift finetune --task grpo` rewards a decoder's own sampled answers with a Python function.

    prompts (a JSONL file, or the arithmetic task) -> encode_prompts -> train (train.py, with GRPOObjective as
    its loss: sample G answers per prompt, reward them, group advantages, rl.py's grpo_step) -> report

The third job on the skeleton of classify.py and instruct.py. Each optimizer step samples its own data: the batch's
prompts x G answers in one batched generate (rl.sample_rollouts), drawn from the global torch RNG, which the loop
saves with every checkpoint, so a resumed run samples exactly what the straight run did. With one update per batch
of samples (TRL's num_iterations=1) the sampling policy is the policy: the ratio is 1 and the loss's value starts
near 0 while its gradient, A * d log p, does not. Watch the reward instead (logged per step, judged on validation).
"""
import importlib
import time
from pathlib import Path

import torch

from . import distributed, recipe
from .batching import TrainData
from .checkpoints import load_checkpoint
from .config import TrainConfig
from .corpora import arithmetic_splits, limit_rows, load_jsonl_splits
from .errors import MiniftError
from .evals import padded, parse_answer
from .hub import resolve_model
from .outputs import finish, load_best, snapshot, weights_moved
from .preference import frozen_copy, reference_logprobs
from .rl import check_loss_settings, group_advantages, grpo_step, sample_rollouts
from .tasks import format_instruction
from .tokenizer import Tokenizer
from .train import evaluate_like_training, pick_device, seed_everything, train


# ---------------------------------------------------------------------------------------------------------
# Rewards: functions of the completions, as TRL calls them

def number_is_right(prompts, completions, answer, **columns):
    """The arithmetic task's reward: 1.0 where the completion's number (evals.parse_answer: its first line's last
    integer) is the row's answer, else 0.0. TRL's signature: the prompts, the completions, then the rows' other
    fields by name (one value per completion)."""
    return [float(parse_answer(c, "number") == parse_answer(a, "number")) for c, a in zip(completions, answer)]


def load_reward(spec):
    """`module:function` (e.g. my_rewards:length_penalty) -> the function; the module is imported as Python would."""
    module, _, name = (spec or "").partition(":")
    if not module or not name:
        raise MiniftError(f"--reward {spec!r}: give module:function, e.g. my_rewards:is_right (a file my_rewards.py "
                          "on the path, with def is_right(prompts, completions, **columns) -> list of floats)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise MiniftError(f"--reward {spec}: cannot load it ({e}); is {module}.py on the path (PYTHONPATH)?") from None
    if not callable(fn):
        raise MiniftError(f"--reward {spec}: {name} is not a function")
    return fn


def rewards_of(reward, prompts, completions, columns):
    """The reward function called on a batch, its answer checked: one finite number per completion."""
    values = reward(prompts=prompts, completions=completions, **columns)
    try:
        values = torch.tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError):
        raise MiniftError(f"the reward function {reward.__name__} must return one number per completion, not "
                          f"{str(values)[:60]}") from None
    if len(values) != len(completions) or not torch.isfinite(values).all():
        raise MiniftError(f"the reward function {reward.__name__} gave {len(values)} values for {len(completions)} "
                          "completions (or a NaN/inf): return one finite number per completion")
    return values


# ---------------------------------------------------------------------------------------------------------
# Prompts: read and encoded

def encode_prompts(rows, tok, max_length):
    """Rows -> examples {"input_ids": the prompt in the chat template, "prompt": as written, "columns": the other
    fields}; a prompt longer than max_length is refused (the answers would have no room)."""
    examples = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), (str, list)) or not row["prompt"]:
            raise MiniftError(f"prompt row {n}: needs a 'prompt' (a text or chat turns); it has "
                              + ", ".join(row if isinstance(row, dict) else ["no fields"]))
        turns = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        # format_instruction is the one formatter (chat template or not); it wants an answer turn, which is dropped
        text = format_instruction({"messages": turns + [{"role": "assistant", "content": "-"}]}, tok, f"prompt row {n}")[0]
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) >= max_length:
            raise MiniftError(f"prompt row {n} has {len(ids)} tokens, max_length is {max_length}: raise --max-length")
        examples.append({"input_ids": ids, "prompt": row["prompt"],
                         "columns": {k: v for k, v in row.items() if k != "prompt"}})
    return examples


# ---------------------------------------------------------------------------------------------------------
# The objective: what train() does with prompts

class GRPOObjective:
    """GRPO as the loop's loss. A batch: its prompts (left-padded ids, for the loop's token count, and the rows).
    A step samples group_size answers per prompt, rewards them, and runs grpo_step over them. `reference`: None with
    beta 0 (no KL term) or under LoRA (the adapters off), else a frozen copy of the model before training."""

    def __init__(self, tok, reward, group_size=8, max_new_tokens=16, temperature=1.0, top_p=None, beta=0.0,
                 epsilon=0.2, epsilon_high=None, loss_type="dapo", scale_rewards="group", reference=None):
        epsilon_high = epsilon if epsilon_high is None else epsilon_high
        check_loss_settings(loss_type, beta, epsilon, epsilon_high, max_new_tokens)
        if group_size < 2:
            raise MiniftError(f"group_size {group_size}: GRPO compares the samples of a prompt, give at least 2 (8 is usual)")
        if not temperature > 0:
            raise MiniftError(f"temperature {temperature}: GRPO samples its answers, give a temperature > 0 (e.g. 0.7)")
        self.tok, self.reward, self.reference = tok, reward, reference
        self.group_size, self.max_new_tokens, self.temperature, self.top_p = group_size, max_new_tokens, temperature, top_p
        self.loss_settings = {"beta": beta, "epsilon": epsilon, "epsilon_high": epsilon_high, "loss_type": loss_type}
        self.scale_rewards = scale_rewards

    def settings(self):
        """What a resume must find the same (train.py's run_info)."""
        return {"reward": f"{self.reward.__module__}:{self.reward.__name__}", "group_size": self.group_size,
                "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "scale_rewards": self.scale_rewards, **self.loss_settings}

    def check(self, model, data, cfg):
        if model.task != "lm":
            raise MiniftError("GRPO needs a language model: load it with task='lm'")
        if cfg.metric != "reward":
            raise MiniftError(f"metric {cfg.metric!r}: GRPO keeps the model with the highest mean reward on validation: "
                              "use metric='reward'")
        if cfg.packing:
            raise MiniftError("GRPO samples its rows itself, there is nothing to pack: use packing=0")
        if self.loss_settings["beta"] and self.reference is None and not cfg.lora_r:
            raise MiniftError("beta > 0 compares with a reference model: train LoRA adapters (the reference is the model "
                              "with them off), give reference=preference.frozen_copy(model), or set beta 0")
        if any("prompt" not in e for e in data.train[:1] + data.validation[:1]):
            raise MiniftError("these examples are not prompts: encode them with grpo.encode_prompts")

    def collate(self, rows, device):
        ids, mask = padded([e["input_ids"] for e in rows], self.tok.pad_id, "left", device)
        return {"input_ids": ids, "attention_mask": mask, "rows": rows}

    def memory_batch(self, rows, device):
        """The update's batch at its largest: each prompt G times, followed by max_new_tokens answer tokens."""
        ids, mask = padded([e["input_ids"] + [self.tok.eos_id] * self.max_new_tokens for e in rows
                            for _ in range(self.group_size)], self.tok.pad_id, "left", device)
        labels = ids.clone()
        labels[:, :ids.shape[1] - self.max_new_tokens] = -100  # left-padded: every answer ends the row
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @torch.no_grad()
    def sample(self, model, batch):
        """G answers per prompt of the batch (rl.sample_rollouts: one generate, the global RNG), and their rewards."""
        rows = batch["rows"]
        rollouts = sample_rollouts(model, self.tok, [e["input_ids"] for e in rows], self.group_size,
                                   self.max_new_tokens, self.temperature, self.top_p, eos_token_id=self.tok.eos_id)
        return rollouts, self.score(rows, rollouts.texts, self.group_size)

    def score(self, rows, completions, times=1):
        """The reward of each completion: rows[i]'s are completions[i * times:(i + 1) * times], and the reward function
        sees each row's prompt and fields once per completion."""
        columns = {k: [e["columns"][k] for e in rows for _ in range(times)] for k in rows[0]["columns"]}
        return rewards_of(self.reward, [e["prompt"] for e in rows for _ in range(times)], completions, columns)

    def gradients(self, model, batches, sync=None):
        """Sample every micro-batch's answers first (the step's token count divides the loss), then grpo_step on
        each. Returns (loss, metrics: TRL's names, over this process's samples)."""
        sampled = [self.sample(model, b) for b in batches]
        tokens, sequences = sum(int(r.completion_mask.sum()) for r, _ in sampled), sum(len(w) for _, w in sampled)
        if sync is not None:
            tokens, sequences = sync.count(tokens), sync.count(sequences)
        loss, clipped = 0.0, {}
        for rollouts, rewards in sampled:
            batch = rollouts.batch()
            advantages = group_advantages(rewards, self.group_size, self.scale_rewards)
            ref = None
            if self.loss_settings["beta"]:
                ref = reference_logprobs(model, batch, self.reference.to(batch["input_ids"].device)
                                         if self.reference is not None else None)
            part, m = grpo_step(model, batch, advantages, ref_logps=ref, num_tokens=tokens, num_sequences=sequences,
                                max_completion_length=self.max_new_tokens, **self.loss_settings)
            loss += part
            for k, v in m.items():
                clipped[k] = clipped.get(k, 0.0) + v / len(sampled)
        groups = torch.cat([w.view(-1, self.group_size) for _, w in sampled])  # one row of G rewards per prompt
        lengths = torch.cat([r.completion_mask.sum(1) for r, _ in sampled]).double()
        return loss, {"reward": groups.mean().item(), "reward_std": groups.std(1).mean().item(),
                      "frac_reward_zero_std": (groups.std(1) == 0).double().mean().item(),
                      "completions/mean_length": lengths.mean().item(), **clipped}

    @torch.no_grad()
    def evaluate(self, model, examples, device, batch_size=32):
        """The mean reward of the greedy answer (one per prompt, no sampling: the same number every time)."""
        if not examples:
            raise MiniftError("no prompts to evaluate; is the split empty?")
        total = 0.0
        for i in range(0, len(examples), batch_size):
            rows = examples[i:i + batch_size]
            answers = sample_rollouts(model, self.tok, [e["input_ids"] for e in rows], 1, self.max_new_tokens,
                                      temperature=0.0, eos_token_id=self.tok.eos_id).texts
            total += self.score(rows, answers).sum().item()
        return {"reward": total / len(examples), "num_prompts": len(examples)}


# ---------------------------------------------------------------------------------------------------------
# The job

SETTINGS = ("group_size", "max_new_tokens", "temperature", "beta", "loss_type")  # recipe.GRPO_JOB's, for the objective

def finetune_grpo(model=recipe.GRPO_JOB["model"], data=recipe.GRPO_JOB["data"], out=recipe.GRPO_JOB["out"], cfg=None,
                  max_length=recipe.GRPO_JOB["max_length"], limit=None, test=True, resume=False, reward=None,
                  **settings):
    """RL with a reward computed by code: `reward` (a function, or "module:function"; None: number_is_right, the
    arithmetic task's) on prompts (a JSONL file of rows with a 'prompt'; None: the arithmetic task). settings:
    GRPOObjective's (group_size, max_new_tokens, temperature, beta, loss_type, ...; recipe.GRPO_JOB's by default).
    Prints the mean greedy reward on validation before and after; returns the report (also in OUT/results.json)."""
    cfg = cfg or TrainConfig(**recipe.GRPO_TRAIN)
    settings = {**{k: v for k, v in recipe.GRPO_JOB.items() if k in SETTINGS}, **settings}
    t0 = time.perf_counter()
    path = resolve_model(model)
    seed_everything(cfg.seed)
    net = load_checkpoint(path, "lm")
    tok = Tokenizer.from_file(path)
    reward = load_reward(reward) if isinstance(reward, str) else reward or number_is_right
    rows = arithmetic_splits(cfg.seed) if data is None else load_jsonl_splits(data, cfg.seed, "rows with a 'prompt'")
    splits = limit_rows(rows, limit)
    encoded = {k: encode_prompts(v, tok, max_length) for k, v in splits.items() if k != "test" or test}
    device = pick_device(cfg.device)
    net.max_length, base = max_length, snapshot(net)
    reference = frozen_copy(net) if settings.get("beta") and not cfg.lora_r else None  # the model as loaded
    objective = GRPOObjective(tok, reward, reference=reference, **settings)
    print(f"{len(encoded['train'])} training prompts x {objective.group_size} samples, {len(encoded['validation'])} "
          f"validation prompts; reward {objective.settings()['reward']}")
    report = {"model": str(path), "config": vars(cfg), "grpo": objective.settings(), "train_prompts": len(encoded["train"])}
    train_data = TrainData(encoded["train"], encoded["validation"], tok.pad_id, objective=objective)
    # measured as the loop measures validation (its precision): before and after are comparable
    report["reward_before"] = evaluate_like_training(net.to(device), encoded["validation"], train_data, cfg, device)[
        "reward"]
    print(f"mean greedy reward on {len(encoded['validation'])} validation prompts before: {report['reward_before']:.4f}")
    report.update(train(net, train_data, cfg, out, resume=resume))
    if not distributed.is_main():
        return report
    best = load_best(out, "lm", device)
    report["validation"], report["weights_moved"] = report.pop("best_metrics"), weights_moved(best, base)
    print(f"mean greedy reward on validation: {report['reward_before']:.4f} before -> {report['validation']['reward']:.4f}")
    if test:  # the one look at the test split
        report["test"] = evaluate_like_training(best, encoded["test"], train_data, cfg, device)
    return finish(report, out, t0, f"generate with:  minift generate {Path(out) / 'best'} \"...\"")

