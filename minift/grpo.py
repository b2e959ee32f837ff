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
import inspect
import math
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import distributed, recipe
from .batching import TrainData, pad_rows
from .checkpoints import load_checkpoint
from .config import TrainConfig, check_fields, check_own_loss_config
from .corpora import arithmetic_splits, limit_rows, load_jsonl_splits
from .errors import MiniftError
from .evals import parse_answer
from .hub import resolve_model
from .outputs import after_training, finish, load_best, weights_moved
from .preference import frozen_copy, reference_logprobs
from .rl import (IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, SCALE_REWARDS, check_loss_settings, group_advantages,
                 grpo_step, sample_rollouts, truncated)
from .tasks import check_turns, format_instruction
from .tokenizer import Tokenizer
from .train import evaluate_like_training, pick_device, seed_everything, train


# ---------------------------------------------------------------------------------------------------------
# Rewards: functions of the completions, as TRL calls them

def number_is_right(prompts, completions, answer, **columns):
    """The arithmetic task's reward: 1.0 where the completion's number (evals.parse_answer: its first line's last
    integer) is the row's answer, else 0.0. TRL's signature: the prompts, the completions, then the rows' other
    fields by name (one value per completion)."""
    return [float(parse_answer(c, "number") == parse_answer(a, "number")) for c, a in zip(completions, answer)]


def final_answer_is_right(prompts, completions, answer, **columns):
    """The reasoning track's reward (`--reward minift.grpo:final_answer_is_right`): 1.0 where a worked solution's final
    number (evals.parse_answer "final": after its last "####", else its last number) is the row's answer, else 0.0."""
    return [float(parse_answer(c, "final") == parse_answer(a, "final")) for c, a in zip(completions, answer)]


def load_reward(spec):
    """The reward: a function, or `module:function` (e.g. my_rewards:length_penalty), the module imported as Python
    would (from the working folder or PYTHONPATH). Anything that goes wrong is one line naming the module."""
    if callable(spec):
        return spec
    module, _, name = (spec if isinstance(spec, str) else "").partition(":")
    if not module or not name:
        raise MiniftError(f"--reward {spec!r}: give module:function, e.g. my_rewards:is_right (a file my_rewards.py "
                          "on the path, with def is_right(prompts, completions, **columns) -> list of floats)")
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        raise MiniftError(f"--reward {spec}: cannot import {module} ({e}); is {module}.py in the working folder or on "
                          "PYTHONPATH?") from None
    except Exception as e:  # a syntax error, or its own code failing as it is imported
        raise MiniftError(f"--reward {spec}: importing {module} failed with {where_raised(e)}; fix the module") from None
    fn = getattr(found, name, None)
    if fn is None:
        raise MiniftError(f"--reward {spec}: {module} has no {name}; it defines "
                          + ", ".join(n for n in vars(found) if not n.startswith("_"))[:200])
    if not callable(fn):
        raise MiniftError(f"--reward {spec}: {name} is not a function")
    return fn


def load_rewards(spec):
    """The reward functions: one (a function, or `module:function`) or several, each with its weight (reward_weights):
    a list of them, or a comma-separated text (my_rewards:is_right,my_rewards:is_short)."""
    specs = spec.split(",") if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple)) else [spec]
    return [load_reward(s.strip() if isinstance(s, str) else s) for s in specs]


def reward_name(reward):
    return f"{reward.__module__}:{getattr(reward, '__name__', type(reward).__name__)}"


def where_raised(e):
    """An exception as one line: its type, message and the innermost file:line of the traceback."""
    last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} ({e.filename}, line {e.lineno})"
    return f"{type(e).__name__}: {e}" + (f" ({last.filename}, line {last.lineno})" if last else "")


def check_reward_call(reward, columns):
    """The reward function can be called as TRL calls it: f(prompts=..., completions=..., **the rows' other fields)."""
    try:
        inspect.signature(reward).bind(prompts=[], completions=[], **{c: [] for c in columns})
    except TypeError as e:
        fields = ", ".join(f"{c}=" for c in columns)
        raise MiniftError(f"the reward function {reward_name(reward)}{inspect.signature(reward)} cannot be called as "
                          f"f(prompts=, completions={', ' + fields if fields else ''}) ({e}): write it as def f(prompts, "
                          "completions, **columns)") from None
    except ValueError:
        pass  # a builtin without a signature: it is called as it is


def rewards_of(reward, prompts, completions, columns):
    """The reward function called on a batch, its answer checked: one finite number per completion, of a size whose
    spread can be computed (the group advantages square them)."""
    try:
        values = reward(prompts=prompts, completions=completions, **columns)
    except Exception as e:
        raise MiniftError(f"the reward function {reward_name(reward)} raised {where_raised(e)}; fix it, then run the "
                          "same command with --resume (the last checkpoint is kept)") from None
    try:
        values = torch.tensor([float(v) for v in values], dtype=torch.float64)
    except (TypeError, ValueError):
        raise MiniftError(f"the reward function {reward_name(reward)} must return one number per completion, not "
                          f"{str(values)[:60]}") from None
    if len(values) != len(completions) or not torch.isfinite(values).all():
        raise MiniftError(f"the reward function {reward_name(reward)} gave {len(values)} values for {len(completions)} "
                          "completions (or a NaN/inf): return one finite number per completion")
    if not torch.isfinite(values.square().sum()):
        raise MiniftError(f"the reward function {reward_name(reward)} gave rewards as large as {values.abs().max():.3g}: "
                          "their spread overflows (it squares them) and every advantage would be 0; return rewards "
                          "of a moderate size, e.g. in [-1e6, 1e6]")
    return values


def reward_from_model(folder, device="cpu", batch_size=16):
    """A reward model trained by `minift finetune --task reward` (its best/ folder) as the reward function: each
    prompt + completion written as reward.scored_text writes a pair's answers (the prompt in the judge's chat template,
    the completion after it, no end token), scored in batches; the head's one number is the reward."""
    if not (Path(folder) / "config.json").is_file():
        raise MiniftError(f"--reward-model {folder}: no config.json there; give the best/ folder of a minift finetune "
                          "--task reward run")
    judge = load_checkpoint(folder, "classify", verbose=False).to(device).eval()
    if judge.config.num_labels != 1:
        raise MiniftError(f"--reward-model {folder} has {judge.config.num_labels} outputs; a reward model has one "
                          "(minift finetune --task reward trains one)")
    tok = Tokenizer.from_file(folder)

    @torch.no_grad()
    def reward_model_score(prompts, completions, **columns):
        turns = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
        texts = [format_instruction({"messages": t + [{"role": "assistant", "content": "-"}]}, tok)[0] + c
                 for t, c in zip(turns, completions)]  # (the answer turn is dropped: a completion may be empty)
        scores = []
        for i in range(0, len(texts), batch_size):  # the template carries its special tokens; plain text gets them
            rows = tok.encode_batch(texts[i:i + batch_size], add_special_tokens=tok.chat_template is None)
            scores += judge(*pad_rows(rows, tok.pad_id, "right", device))[:, 0].float().tolist()
        return scores
    return reward_model_score


# ---------------------------------------------------------------------------------------------------------
# The settings

@dataclass
class GRPOSettings:
    """How answers are sampled, rewarded and learnt from, with TRL's GRPOConfig names (its num_generations is
    group_size here, max_completion_length max_new_tokens) and defaults. recipe.GRPO_SETTINGS holds the job's own
    choices on top. `minift finetune --task grpo` has a flag per field (--group-size ...), and a TOML file a key.
    skip_zero_std_groups has no TRL name (TRL 1.16 has no such switch; it logs the share as frac_reward_zero_std)."""
    reward: object = "minift.grpo:number_is_right"  # module:function (or a function): f(prompts, completions, **columns);
    # several: comma-separated (or a list), each reward the sum of theirs times reward_weights (TRL's sum_then_normalize)
    group_size: int = 8  # answers sampled per prompt: advantages compare them within the group
    max_new_tokens: int = 256  # tokens per answer at most
    temperature: float = 1.0  # of the sampling (> 0)
    top_p: float | None = None  # nucleus sampling; None: no cut
    beta: float = 0.0  # the KL term's weight (0: no reference model)
    epsilon: float = 0.2  # the clip range below 1 of the ratio ...
    epsilon_high: float | None = None  # ... and above it (None: epsilon; DAPO uses 0.28)
    loss_type: str = "dapo"  # grpo | dapo | bnpo | dr_grpo: how token losses are averaged; cispo (rl.py)
    scale_rewards: str = "group"  # group | batch | none: what the advantages are divided by
    importance_sampling_level: str = "token"  # token | sequence: one ratio per completion (GSPO)
    mask_truncated_completions: bool = False  # answers cut at max_new_tokens (no EOS) leave the loss and its counts
    skip_zero_std_groups: bool = False  # groups whose answers all scored alike leave the step (no forward, no counts)
    reward_weights: list | None = None  # one weight per reward function (None: 1 each)
    reward_model: str | None = None  # a reward model's folder (--task reward's best/): its score is the reward instead

    def check(self, cfg=None):
        """Each field's type and range, and what the loop's settings must be for GRPO, in one line each, before anything
        is loaded. Returns self."""
        check_fields(self, {"loss_type": LOSS_TYPES, "scale_rewards": SCALE_REWARDS,
                            "importance_sampling_level": IMPORTANCE_SAMPLING_LEVELS}, RANGES)
        specs = self.reward.split(",") if isinstance(self.reward, str) else \
            self.reward if isinstance(self.reward, (list, tuple)) else [self.reward]
        for spec in specs:
            if not (callable(spec) or (isinstance(spec, str) and ":" in spec)):
                raise MiniftError(f"reward {spec!r}: give module:function (e.g. my_rewards:is_right) or a function; "
                                  "several comma-separated")
        if self.reward_weights is not None:
            self.reward_weights = reward_weights(self.reward_weights, len(specs))
        if self.loss_type == "cispo" and self.epsilon_high is None:
            raise MiniftError("loss_type 'cispo' caps the ratio at epsilon_high itself (not 1 + it): give epsilon_high "
                              "(5.0 is ScaleRL's)")
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        check_loss_settings(self.loss_type, self.beta, self.epsilon, high, self.max_new_tokens,
                            self.importance_sampling_level)
        if cfg is None:
            return self
        check_own_loss_config(cfg, "GRPO", ("reward",), "the model with the highest mean reward on validation",
                              "GRPO samples its rows itself, there is nothing to pack", "rl.py's grpo_step")
        return self


def reward_weights(weights, count):
    """reward_weights as numbers (the command line gives texts), one per reward function, or one line that says so."""
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        raise MiniftError(f"reward_weights {weights!r}: give numbers, one per reward function (e.g. 1,0.5)") from None
    if len(weights) != count or not all(math.isfinite(w) for w in weights):
        raise MiniftError(f"reward_weights {weights}: give {count} finite number(s), one per reward function")
    return weights


RANGES = {"group_size": (2, True, "GRPO compares the samples of a prompt, give at least 2 (8 is usual)"),
          "max_new_tokens": (1, True, "at least 1 token per answer (e.g. 64)"),
          "temperature": (0, False, "GRPO samples its answers, give a temperature > 0 (e.g. 0.7)"),
          "top_p": (0, False, "in (0, 1], e.g. 0.95 (None: no cut)", 1, True), "beta": (0, True, ">= 0 (0: no reference model)"),
          "epsilon": (0, False, "> 0, e.g. 0.2"), "epsilon_high": (0, False, "> 0, e.g. 0.28 (None: epsilon)")}


# ---------------------------------------------------------------------------------------------------------
# Prompts: read and encoded

def check_prompt_row(row, where):
    """A prompt row: {"prompt": a text or chat turns, ...other fields, which reach the reward function by name}."""
    if not isinstance(row, dict) or "prompt" not in row:
        raise MiniftError(f"{where}: a prompt row needs a 'prompt' (a text or chat turns); it has "
                          + (", ".join(row) if isinstance(row, dict) else "no fields"))
    prompt = row["prompt"]
    if isinstance(prompt, list):
        check_turns(prompt, where, "'prompt'")
    elif not (isinstance(prompt, str) and prompt.strip()):
        raise MiniftError(f"{where}: 'prompt' must be a non-empty text or a list of chat turns")


def encode_prompts(rows, tok, max_length):
    """Rows -> examples {"input_ids": the prompt in the chat template, "prompt": as written, "columns": the other
    fields}; a prompt longer than max_length is refused (the answers would have no room)."""
    examples = []
    for n, row in enumerate(rows, 1):
        check_prompt_row(row, f"prompt {n}")
        turns = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        # format_instruction is the one formatter (chat template or not); it wants an answer turn, which is dropped
        text = format_instruction({"messages": turns + [{"role": "assistant", "content": "-"}]}, tok, f"prompt {n}")[0]
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) >= max_length:
            raise MiniftError(f"the prompt {turns[-1]['content'][:40]!r} has {len(ids)} tokens and max_length is "
                              f"{max_length}: raise --max-length (its answers need room after it)")
        examples.append({"input_ids": ids, "prompt": row["prompt"],
                         "columns": {k: v for k, v in row.items() if k != "prompt"}})
    return examples


# ---------------------------------------------------------------------------------------------------------
# The objective: what train() does with prompts

class GRPOObjective:
    """GRPO as the loop's objective (objective.py). A batch: its prompts (left-padded ids, for the loop's token count,
    and the rows). A step samples group_size answers per prompt, rewards them, and runs grpo_step over them.
    `reward`: the function (load_reward's). `reference`: None with beta 0 (no KL term) or under LoRA (the adapters
    off), else a frozen copy of the model before training."""

    def __init__(self, tok, reward, settings=None, reference=None):
        self.tok, self.reference = tok, reference
        self.rewards = list(reward) if isinstance(reward, (list, tuple)) else [reward]  # the functions
        self.grpo = settings or GRPOSettings(reward=reward)
        self.grpo.check()
        self.weights = torch.tensor(self.grpo.reward_weights or [1.0] * len(self.rewards), dtype=torch.float64)
        if len(self.weights) != len(self.rewards):
            raise MiniftError(f"{len(self.weights)} reward_weights for {len(self.rewards)} reward functions: give one each")
        high = self.grpo.epsilon if self.grpo.epsilon_high is None else self.grpo.epsilon_high
        self.loss_settings = {"beta": self.grpo.beta, "epsilon": self.grpo.epsilon, "epsilon_high": high,
                              "loss_type": self.grpo.loss_type,
                              "importance_sampling_level": self.grpo.importance_sampling_level}

    def settings(self):
        """What a resume must find the same (train.py's run_info)."""
        names = [reward_name(r) for r in self.rewards]
        return {**asdict(self.grpo), "reward": names[0] if len(names) == 1 else names}

    def metric(self, model, cfg):
        return "reward"  # (GRPOSettings.check refused any other)

    def check(self, model, data, cfg):
        self.grpo.check(cfg)
        if model.task != "lm":
            raise MiniftError("GRPO needs a language model: load it with task='lm'")
        if self.grpo.beta and self.reference is None and not cfg.lora_r:
            raise MiniftError("beta > 0 compares with a reference model: train LoRA adapters (the reference is the model "
                              "with them off), give reference=preference.frozen_copy(model), or set beta 0")
        if any("prompt" not in e for e in data.train[:1] + data.validation[:1]):
            raise MiniftError("these examples are not prompts: encode them with grpo.encode_prompts")

    def collate(self, rows, device):
        ids, mask = pad_rows([e["input_ids"] for e in rows], self.tok.pad_id, "left", device)
        return {"input_ids": ids, "attention_mask": mask, "rows": rows}

    def memory_batch(self, rows, device):
        """The update's batch at its largest: each prompt G times, followed by max_new_tokens answer tokens."""
        n = self.grpo.max_new_tokens
        ids, mask = pad_rows([e["input_ids"] + [self.tok.eos_id] * n for e in rows for _ in range(self.grpo.group_size)],
                             self.tok.pad_id, "left", device)
        labels = ids.clone()
        labels[:, :ids.shape[1] - n] = -100  # left-padded: every answer ends the row
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @torch.no_grad()
    def sample(self, model, batch):
        """G answers per prompt of the batch (rl.sample_rollouts: one generate, the global RNG), and each reward
        function's scores of them, (answers, functions)."""
        rows, g = batch["rows"], self.grpo
        rollouts = sample_rollouts(model, self.tok, [e["input_ids"] for e in rows], g.group_size, g.max_new_tokens,
                                   g.temperature, g.top_p, eos_token_id=self.tok.eos_id)
        return rollouts, self.score(rows, rollouts.texts, g.group_size)

    def score(self, rows, completions, times=1):
        """Each reward function's score of each completion, (completions, functions): rows[i]'s completions are
        completions[i * times:(i + 1) * times], and a function sees each row's prompt and fields once per completion."""
        columns = {k: [e["columns"][k] for e in rows for _ in range(times)] for k in rows[0]["columns"]}
        prompts = [e["prompt"] for e in rows for _ in range(times)]
        return torch.stack([rewards_of(f, prompts, completions, columns) for f in self.rewards], dim=1)

    def weighted(self, scores):
        """The reward of each completion: its functions' scores times reward_weights, summed (TRL's
        sum_then_normalize: the group advantages then compare these sums)."""
        return scores @ self.weights

    def gradients(self, model, batches, sync=None):
        """Sample every micro-batch's answers first (the step's token count divides the loss), then grpo_step on
        each. With mask_truncated_completions an answer cut at max_new_tokens keeps its reward in its group's
        advantages but gets mask 0: no token of it counts. With skip_zero_std_groups a group whose rewards are all
        equal (advantages 0: nothing to learn) leaves the step before its forward: its answers count nowhere (TRL has
        no such switch; DAPO's dynamic sampling would sample more prompts instead). Returns (loss, metrics: TRL's names,
        over this process's samples)."""
        g, steps = self.grpo, []
        sampled = [self.sample(model, b) for b in batches]
        for rollouts, scores in sampled:
            rewards = self.weighted(scores)
            batch, advantages = rollouts.batch(), group_advantages(rewards, g.group_size, g.scale_rewards)
            if g.mask_truncated_completions:  # labels -100 on the cut answers: sequence_logprobs' mask leaves them out
                batch["labels"][truncated(rollouts, self.tok.eos_id)] = -100
            if g.skip_zero_std_groups:
                spread = (rewards.view(-1, g.group_size).std(1) > 0).repeat_interleave(g.group_size)
                batch, advantages = {k: v[spread] for k, v in batch.items()}, advantages[spread]
            steps.append((batch, advantages))
        tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b, _ in steps)
        sequences = sum(len(a) for _, a in steps)
        if sync is not None:
            tokens, sequences = sync.count(tokens), sync.count(sequences)
        loss, clipped, ran = 0.0, {}, [a for _, a in steps if len(a)]
        for batch, advantages in steps:
            if not len(advantages):
                continue  # every group of this micro-batch was skipped
            ref = None
            if g.beta:
                ref = reference_logprobs(model, batch, self.reference.to(batch["input_ids"].device)
                                         if self.reference is not None else None)
            part, m = grpo_step(model, batch, advantages, ref_logps=ref, num_tokens=tokens, num_sequences=sequences,
                                max_completion_length=g.max_new_tokens, **self.loss_settings)
            loss += part
            for k, v in m.items():
                clipped[k] = clipped.get(k, 0.0) + v / len(ran)
        return loss, {**self.sample_metrics(sampled), **clipped}

    def sample_metrics(self, sampled):
        """TRL's figures of a step's samples: the reward (mean, spread within groups, share of groups with none), each
        function's mean and spread, the answers' mean length and the share cut at max_new_tokens."""
        g = self.grpo
        scores = torch.cat([s for _, s in sampled])
        groups = self.weighted(scores).view(-1, g.group_size)  # one row of G rewards per prompt
        lengths = torch.cat([r.completion_mask.sum(1) for r, _ in sampled]).double()
        cut = torch.cat([truncated(r, self.tok.eos_id) for r, _ in sampled]).double()
        metrics = {"reward": groups.mean().item(), "reward_std": groups.std(1).mean().item(),
                   "frac_reward_zero_std": (groups.std(1) == 0).double().mean().item(),
                   "completions/mean_length": lengths.mean().item(), "completions/clipped_ratio": cut.mean().item()}
        for f, column in zip(self.rewards, scores.T):
            name = getattr(f, "__name__", type(f).__name__)
            metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = column.mean().item(), column.std().item()
        return metrics

    @torch.no_grad()
    def evaluate(self, model, examples, device, batch_size=32):
        """The mean reward of the greedy answer (one per prompt, no sampling: the same number every time)."""
        if not examples:
            raise MiniftError("no prompts to evaluate; is the split empty?")
        total = 0.0
        for i in range(0, len(examples), batch_size):
            rows = examples[i:i + batch_size]
            answers = sample_rollouts(model, self.tok, [e["input_ids"] for e in rows], 1, self.grpo.max_new_tokens,
                                      temperature=0.0, eos_token_id=self.tok.eos_id).texts
            total += self.weighted(self.score(rows, answers)).sum().item()
        return {"reward": total / len(examples), "num_prompts": len(examples)}


# ---------------------------------------------------------------------------------------------------------
# The job

def finetune_grpo(model=recipe.GRPO_JOB["model"], data=recipe.GRPO_JOB["data"], out=recipe.GRPO_JOB["out"], cfg=None,
                  settings=None, max_length=recipe.GRPO_JOB["max_length"], limit=None, test=True, resume=False):
    """RL with a reward computed by code on prompts (a JSONL file of rows with a 'prompt'; None: the arithmetic task).
    settings: GRPOSettings (None: recipe.GRPO_SETTINGS), its reward a function or "module:function" (the default,
    number_is_right, is the arithmetic task's). Prints the mean greedy reward on validation before and after; returns
    the report (also in OUT/results.json)."""
    cfg = cfg or TrainConfig(**recipe.GRPO_TRAIN)
    settings = (settings or GRPOSettings(**recipe.GRPO_SETTINGS)).check(cfg)  # before anything is loaded
    t0 = time.perf_counter()
    rows = arithmetic_splits() if data is None else load_jsonl_splits(data, cfg.seed, check_prompt_row,
                                                                      "rows with a 'prompt'")
    splits = {k: v for k, v in limit_rows(rows, limit).items() if k != "test" or test}
    rewards = [reward_from_model(settings.reward_model, pick_device(cfg.device))] if settings.reward_model else \
        load_rewards(settings.reward)
    for reward in rewards:
        check_reward_call(reward, [k for k in splits["train"][0] if k != "prompt"])
    path = resolve_model(model)
    seed_everything(cfg.seed)
    net = load_checkpoint(path, "lm")
    tok = Tokenizer.from_file(path)
    encoded = {k: encode_prompts(v, tok, max_length) for k, v in splits.items()}
    device = pick_device(cfg.device)
    net.max_length = max_length
    reference = frozen_copy(net) if settings.beta and not cfg.lora_r else None  # the model as loaded
    objective = GRPOObjective(tok, rewards, settings, reference)
    print(f"{len(encoded['train'])} training prompts x {settings.group_size} samples, {len(encoded['validation'])} "
          f"validation prompts; reward " + " + ".join(reward_name(f) + ("" if settings.reward_weights is None else f" x {w}")
                                                      for f, w in zip(rewards, objective.weights.tolist())))
    report = {"model": str(path), "config": vars(cfg), "grpo": objective.settings(), "train_prompts": len(encoded["train"])}
    train_data = TrainData(encoded["train"], encoded["validation"], tok.pad_id, objective=objective)
    # measured as the loop measures validation (its precision): before and after are comparable
    report["reward_before"] = evaluate_like_training(net.to(device), encoded["validation"], train_data, cfg, device)[
        "reward"]
    print(f"mean greedy reward on {len(encoded['validation'])} validation prompts before: {report['reward_before']:.4f}")
    report.update(train(net, train_data, cfg, out, resume=resume))
    if not distributed.is_main():
        return report
    with after_training(out):
        best = load_best(out, "lm", device)
        report["validation"], report["weights_moved"] = report.pop("best_metrics"), weights_moved(best, path)
        print(f"mean greedy reward on validation: {report['reward_before']:.4f} before -> "
              f"{report['validation']['reward']:.4f}")
        if test and encoded.get("test"):  # the one look at the test split
            report["test"] = evaluate_like_training(best, encoded["test"], train_data, cfg, device)
    return finish(report, out, t0, f"generate with:  minift generate {Path(out) / 'best'} \"...\"")
