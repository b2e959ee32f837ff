"""The preference job (dpo.py: DPO and KTO) and the RL job (grpo.py) on the loop's skeleton: pair rows of each format,
KTO's unpaired rows (and pairs split in two), on-policy pairs that differ in the answer only, the objectives' gradients
(micro-batches add up, KTO's reference point measured on the whole step; GRPO's equals autograd's on the same
samples), each job learns what it is given, a run stopped during the update (DPO, KTO) or the rollouts (GRPO) resumes
to the straight run bitwise, and bad settings are one line.

A tiny random-init Llama with a ChatML tokenizer (test_instruct's `tiny`): a few seconds each."""
import copy
import json
import math

import pytest
import torch

import minift.dpo
import minift.grpo
import minift.preference
from minift.checkpoints import load_checkpoint
from minift.config import TrainConfig
from minift.corpora import load_jsonl_splits
from minift.dpo import (DPOSettings, KTOObjective, KTOSettings, PreferenceObjective, encode_pairs, encode_unpaired,
                        finetune_dpo, finetune_kto, on_policy_pairs, pair_texts, swap_number, unpaired_texts)
from minift.errors import MiniftError
from minift.grpo import GRPOObjective, GRPOSettings, encode_prompts, finetune_grpo, load_reward, number_is_right
from minift.lora import add_lora, lora_layers
from minift.preference import frozen_copy, sequence_logprobs
from minift.rl import group_advantages
from minift.tokenizer import Tokenizer
from test_faults import assert_same_outcome, cli_error, outcome, stop_on_call
from test_instruct import SYSTEM, WORDS, rows_of_each_format, tiny  # noqa: F401  (tiny: a fixture)


def pair_rows(n=40):
    """Questions about three words; the chosen answer is the first word in capitals, the rejected one in lower case."""
    rows = []
    for i in range(n):
        words = [WORDS[(i * k + k) % len(WORDS)] for k in (1, 3, 5)]
        rows.append({"prompt": "first word of: " + " ".join(words), "chosen": words[0].upper(), "rejected": words[0]})
    return rows


def cfg(**kw):
    return TrainConfig(**{"epochs": 1, "batch_size": 4, "lr": 1e-2, "metric": "loss", "lora_r": 4, "eval_every": 2,
                          "max_steps": 4, "precision": "fp32", "device": "cpu", "dropout": 0.0, "warmup_ratio": 0.0, **kw})


def model_and_tok(tiny, lora=True, dtype=torch.float32):  # noqa: F811
    folder, tok = tiny
    model = load_checkpoint(folder, "lm", verbose=False).to(dtype)
    if lora:
        torch.manual_seed(1)
        add_lora(model, "all-linear", r=2, alpha=4)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(0, 0.3)  # off the base: the loss is not log 2 and the reference differs
    return model.train(), tok


# ---------------------------------------------------------------------------------------------------------
# Pairs

def test_pair_rows_of_each_format_give_the_same_texts(tiny):  # noqa: F811
    _, tok = tiny
    ask = [{"role": "user", "content": "first word of: red cat"}]
    formats = [{"prompt": "first word of: red cat", "chosen": "RED", "rejected": "CAT"},
               {"prompt": ask, "chosen": [{"role": "assistant", "content": "RED"}],
                "rejected": [{"role": "assistant", "content": "CAT"}]},
               {"chosen": ask + [{"role": "assistant", "content": "RED"}],
                "rejected": ask + [{"role": "assistant", "content": "CAT"}]}]
    texts = [pair_texts(row, tok, "row") for row in formats]
    assert texts[0] == texts[1] == texts[2]
    assert texts[0] == (SYSTEM + "<|im_start|>user\nfirst word of: red cat<|im_end|>\n<|im_start|>assistant\n", "RED", "CAT")
    (example,), dropped = encode_pairs(formats[:1], tok, 256)
    assert dropped == 0 and example["chosen"][-1] == example["rejected"][-1] == tok.eos_id
    assert tok.decode(example["chosen"]) == "RED" and tok.decode(example["input_ids"], skip_special_tokens=False) == texts[0][0]
    for bad, says in [({"prompt": "x", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
                      ({"chosen": ask + [{"role": "assistant", "content": "a"}],
                        "rejected": [{"role": "assistant", "content": "b"}]},
                       "share every turn but the last"),
                      ({"prompt": "x", "chosen": "a", "rejected": " "}, "non-empty texts")]:
        with pytest.raises(MiniftError, match=says):
            pair_texts(bad, tok, "row 3")


def kto_rows(n=40):
    """pair_rows' questions, unpaired: each row one answer, the capitalised word desirable, the lower-case one not."""
    return [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"], "label": bool(i % 2)}
            for i, r in enumerate(pair_rows(n))]


def test_kto_rows_of_each_format(tiny):  # noqa: F811
    """TRL's unpaired rows as texts or chat turns give the same texts; a pair row is split into a desirable and an
    undesirable row (TRL's unpair_preference_dataset); what is not a KTO row is one line."""
    _, tok = tiny
    ask = [{"role": "user", "content": "first word of: red cat"}]
    prompt = SYSTEM + "<|im_start|>user\nfirst word of: red cat<|im_end|>\n<|im_start|>assistant\n"
    assert unpaired_texts({"prompt": "first word of: red cat", "completion": "RED", "label": True}, tok, "row") == \
        unpaired_texts({"prompt": ask, "completion": [{"role": "assistant", "content": "RED"}], "label": True}, tok, "row") \
        == [(prompt, "RED", True)]
    assert unpaired_texts({"prompt": "first word of: red cat", "chosen": "RED", "rejected": "CAT"}, tok, "row") == \
        [(prompt, "RED", True), (prompt, "CAT", False)]
    examples, dropped = encode_unpaired([{"prompt": "first word of: red cat", "chosen": "RED", "rejected": "CAT",
                                          "answer": "RED"}], tok, 256)
    assert dropped == 0 and [e["label"] for e in examples] == [True, False] and examples[0]["answer"] == "RED"
    assert tok.decode(examples[1]["completion"]) == "CAT" and examples[1]["completion"][-1] == tok.eos_id
    for bad, says in [({"prompt": "x", "completion": "a"}, "needs 'prompt', 'completion' and 'label'"),
                      ({"prompt": "x", "completion": "a", "label": 1}, "give true"),
                      ({"prompt": "x", "completion": " ", "label": False}, "non-empty text"),
                      ({"prompt": "x", "chosen": "a", "rejected": "a"}, "the same answer")]:
        with pytest.raises(MiniftError, match=says):
            unpaired_texts(bad, tok, "row 3")


def test_on_policy_pairs_differ_in_the_number_only():
    rows = [{"prompt": "What is 3 + 4?", "answer": "7"}, {"prompt": "What is 2 - 5?", "answer": "-3"},
            {"prompt": "What is 1 + 1?", "answer": "2"}]
    replies = ["3 + 4 = 8\nbecause", "-3", "I do not know"]  # wrong (in words), right, no number at all
    scored = minift.evals.score_replies(replies, [r["answer"] for r in rows], "number")["items"]
    pairs = on_policy_pairs(rows, scored, seed=0)
    assert pairs[0] == {"prompt": "What is 3 + 4?", "chosen": "3 + 4 = 7", "rejected": "3 + 4 = 8", "answer": "7"}
    assert pairs[1]["chosen"] == "-3" and pairs[1]["rejected"] in ("-4", "-2")  # a near miss of the right reply
    assert pairs[2]["chosen"] == "2" and pairs[2]["rejected"] not in ("2", "")
    assert swap_number("12 apples, 12", "12", "13") == "12 apples, 13"


# ---------------------------------------------------------------------------------------------------------
# The objectives' gradients

def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type,lora", [("sigmoid", True), ("sigmoid", False), ("orpo", True)])
def test_preference_micro_batches_add_up_to_the_batch(tiny, loss_type, lora):  # noqa: F811
    model, tok = model_and_tok(tiny, lora, torch.float64)
    reference = None if lora else frozen_copy(model)
    if not lora:  # the policy moved off its reference
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    examples, _ = encode_pairs(pair_rows(6), tok, 256)
    objective = PreferenceObjective(tok, DPOSettings(loss_type=loss_type, beta=0.5), reference)
    results = []
    for pieces in ([examples], [examples[:2], examples[2:]]):
        model.zero_grad()
        loss, metrics = objective.gradients(model, [objective.collate(p, "cpu") for p in pieces])
        results.append((loss, metrics, grads(model)))
    (loss1, m1, g1), (loss2, m2, g2) = results
    assert math.isclose(loss1, loss2, rel_tol=1e-12) and loss1 != math.log(2)
    assert m1.keys() == m2.keys() and all(math.isclose(m1[k], m2[k], rel_tol=1e-6, abs_tol=1e-12) for k in m1), (m1, m2)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("lora", [True, False])
def test_kto_micro_batches_add_up_to_the_batch(tiny, lora):  # noqa: F811
    """One micro-batch of 6 rows or two of 2 and 4: the reference point is measured on the step's rows rotated as one
    (each prompt with the previous row's answer), so the loss, TRL's figures and the gradients are the same. Full
    fine-tuning: of the model and a noisier copy, the one above the other on the mismatched rows is the policy, so
    that the reference point is in play (not clamped to 0)."""
    model, tok = model_and_tok(tiny, lora, torch.float64)  # under LoRA, the adapters moved it off its reference
    examples, _ = encode_unpaired(kto_rows(6), tok, 256)
    settings, reference = KTOSettings(beta=0.5, desirable_weight=1.5), None
    if not lora:
        noisy = copy.deepcopy(model)
        with torch.no_grad():
            for p in noisy.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        reference = frozen_copy(noisy)
        if KTOObjective(tok, settings, reference).gradients(model, [KTOObjective(tok).collate(examples, "cpu")])[1]["kl"] == 0:
            model, reference = noisy, frozen_copy(model)
    objective = KTOObjective(tok, settings, reference)
    results = []
    for pieces in ([examples], [examples[:2], examples[2:]]):
        model.zero_grad()
        loss, metrics = objective.gradients(model, [objective.collate(p, "cpu") for p in pieces])
        results.append((loss, metrics, grads(model)))
    (loss1, m1, g1), (loss2, m2, g2) = results
    assert math.isclose(loss1, loss2, rel_tol=1e-12) and (m1["kl"] > 0.01 or lora)
    assert m1.keys() == m2.keys() and all(math.isclose(m1[k], m2[k], rel_tol=1e-9, abs_tol=1e-12) for k in m1), (m1, m2)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-10, atol=1e-14)


def test_grpo_gradient_is_autograds_on_the_same_samples(tiny):  # noqa: F811
    """The step's gradient = autograd's of the GRPO surrogate on the samples it drew: with one update per sample batch
    the ratio is 1, so d/d theta of the loss is -sum over completion tokens of A_i d log p(token) / (all tokens)."""
    model, tok = model_and_tok(tiny, True, torch.float64)
    prompts = encode_prompts([{"prompt": f"first word of: {w}", "answer": w} for w in WORDS[:3]], tok, 256)

    def reward(prompts, completions, **columns):  # by length: rewards that differ within a group
        return [float(len(c) % 3) for c in completions]

    objective = GRPOObjective(tok, reward, GRPOSettings(reward=reward, group_size=4, max_new_tokens=5, temperature=1.0))
    torch.manual_seed(3)
    model.zero_grad()
    loss, metrics = objective.gradients(model, [objective.collate(prompts, "cpu")])
    ours = grads(model)
    torch.manual_seed(3)  # the same draws again
    rollouts, scores = objective.sample(model, objective.collate(prompts, "cpu"))
    rewards = objective.weighted(scores)  # one reward function, weight 1: its scores
    advantages = group_advantages(rewards, 4)
    assert advantages.abs().sum() > 0 and metrics["frac_reward_zero_std"] < 1
    assert math.isclose(metrics["reward"], rewards.mean().item(), rel_tol=1e-12)
    model.zero_grad()
    with torch.enable_grad():
        logps = sequence_logprobs(model.eval(), rollouts.batch())  # eval: the same forward, no dropout here anyway
        surrogate = -(advantages[:, None] * logps.tokens * logps.mask).sum() / logps.mask.sum()
        surrogate.backward()
    assert abs(loss) < 1e-12  # the ratio is 1: the loss is -mean(A) over tokens ~ 0 ...
    for name, g in grads(model).items():  # ... but its gradient is not
        torch.testing.assert_close(ours[name], g, rtol=1e-9, atol=1e-12)
    assert any(g.abs().max() > 1e-6 for g in ours.values())


def stubbed_samples(tiny, monkeypatch, settings, rewards, ended):  # noqa: F811
    """A GRPO objective whose sampling returns fixed answers: 2 prompts x G = 4 real samples of the tiny model, rows
    `ended` made to say EOS at their 3rd token (the others cut at max_new_tokens), and fixed rewards. Returns (model,
    objective, the rollout batch, the rewards)."""
    model, tok = model_and_tok(tiny, True, torch.float64)
    prompts = encode_prompts([{"prompt": f"first word of: {w}"} for w in WORDS[:2]], tok, 256)
    objective = GRPOObjective(tok, has_an_e, settings)
    torch.manual_seed(0)
    rollouts, _ = objective.sample(model, objective.collate(prompts, "cpu"))
    rollouts.completion_ids[ended, 2] = tok.eos_id
    rollouts.completion_ids[ended, 3:] = tok.eos_id
    rollouts.completion_mask = minift.rl.completion_mask(rollouts.completion_ids, [tok.eos_id])
    scores = torch.tensor(rewards, dtype=torch.float64)[:, None]
    monkeypatch.setattr(objective, "sample", lambda model, batch: (rollouts, scores))
    return model, objective, rollouts.batch(), scores[:, 0], prompts


def surrogate_grads(model, batch, advantages, rows):
    """autograd's gradient of the on-policy GRPO surrogate (dapo: the mean over the counted tokens) over `rows` only."""
    model.zero_grad()
    with torch.enable_grad():
        logps = sequence_logprobs(model.eval(), batch)
        mask = logps.mask & rows[:, None]
        (-(advantages[:, None] * logps.tokens * mask).sum() / mask.sum()).backward()
    model.train()
    return grads(model)


@pytest.mark.parametrize("switch", ["mask_truncated_completions", "skip_zero_std_groups"])
def test_grpo_switches_leave_out_their_answers(tiny, monkeypatch, switch):  # noqa: F811
    """mask_truncated_completions: the answers cut at max_new_tokens keep their rewards in the advantages but leave the
    loss and the token count; skip_zero_std_groups: a group whose rewards are all equal leaves the step. Either way the
    gradient is autograd's of the surrogate over the answers left (and differs from the switch off)."""
    ended = [0, 1, 4, 6]
    rewards = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0] if switch == "skip_zero_std_groups" else \
        [1.0, 0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 3.0]
    settings = GRPOSettings(reward=has_an_e, group_size=4, max_new_tokens=5, temperature=1.0, **{switch: True})
    model, objective, batch, rewards, prompts = stubbed_samples(tiny, monkeypatch, settings, rewards, ended)
    advantages = group_advantages(rewards, 4)
    model.zero_grad()
    loss, metrics = objective.gradients(model, [objective.collate(prompts, "cpu")])
    ours = grads(model)
    if switch == "mask_truncated_completions":
        rows = torch.zeros(8, dtype=torch.bool)
        rows[ended] = True
        assert metrics["completions/clipped_ratio"] == 0.5
    else:
        rows = torch.arange(8) < 4  # the second group's rewards are all 1
        assert metrics["frac_reward_zero_std"] == 0.5
    expected = surrogate_grads(model, batch, advantages, rows)
    for name, g in expected.items():
        torch.testing.assert_close(ours[name], g, rtol=1e-9, atol=1e-12)
    everything = surrogate_grads(model, batch, advantages, torch.ones(8, dtype=torch.bool))
    assert any((everything[n] - g).abs().max() > 1e-6 for n, g in expected.items())  # the switch changed something


def test_grpo_skips_a_step_whose_groups_all_scored_alike(tiny, monkeypatch):  # noqa: F811
    settings = GRPOSettings(reward=has_an_e, group_size=4, max_new_tokens=5, temperature=1.0, skip_zero_std_groups=True)
    model, objective, _, _, prompts = stubbed_samples(tiny, monkeypatch, settings, [1.0] * 4 + [0.0] * 4, [0])
    model.zero_grad()
    loss, metrics = objective.gradients(model, [objective.collate(prompts, "cpu")])
    assert loss == 0 and metrics["frac_reward_zero_std"] == 1 and not grads(model)


def is_short(prompts, completions, **columns):
    return [float(len(c) < 6) for c in completions]


def test_several_rewards_with_weights(tiny):  # noqa: F811
    """Two reward functions, weights 1 and -0.5: each completion's reward is the weighted sum (TRL's
    sum_then_normalize, transcribed), each function logged apart (rewards/NAME/mean, std)."""
    model, tok = model_and_tok(tiny, True, torch.float64)
    prompts = encode_prompts([{"prompt": f"first word of: {w}"} for w in WORDS[:3]], tok, 256)
    settings = GRPOSettings(reward=[has_an_e, is_short], reward_weights=[1, -0.5], group_size=4, max_new_tokens=4,
                            temperature=1.0)
    objective = GRPOObjective(tok, [has_an_e, is_short], settings)
    torch.manual_seed(0)
    rollouts, scores = objective.sample(model, objective.collate(prompts, "cpu"))
    assert scores.shape == (12, 2) and scores[:, 0].tolist() == has_an_e([], rollouts.texts)
    torch.testing.assert_close(objective.weighted(scores), (scores * torch.tensor([1.0, -0.5], dtype=torch.float64))
                               .nansum(dim=1))  # TRL: (rewards_per_func * reward_weights).nansum(dim=1)
    torch.manual_seed(0)
    _, metrics = objective.gradients(model, [objective.collate(prompts, "cpu")])
    assert metrics["rewards/has_an_e/mean"] == pytest.approx(scores[:, 0].mean().item())
    assert metrics["rewards/is_short/std"] == pytest.approx(scores[:, 1].std().item())
    assert metrics["reward"] == pytest.approx(objective.weighted(scores).mean().item())
    assert objective.settings()["reward"] == ["test_dpo_grpo_jobs:has_an_e", "test_dpo_grpo_jobs:is_short"]
    for spec, weights, says in [([has_an_e, is_short], [1.0], "give 2 finite number"),
                                ("a:f,b:g", ["x", "1"], "give numbers, one per reward function"),
                                ("a:f,nothing", None, "reward 'nothing': give module:function")]:
        with pytest.raises(MiniftError, match=says):
            GRPOSettings(reward=spec, reward_weights=weights).check()
    assert GRPOSettings(reward="a:f, b:g", reward_weights=["1", "0.5"]).check().reward_weights == [1.0, 0.5]
    assert [f.__name__ for f in minift.grpo.load_rewards("test_dpo_grpo_jobs:has_an_e, test_dpo_grpo_jobs:is_short")] \
        == ["has_an_e", "is_short"]


# ---------------------------------------------------------------------------------------------------------
# The jobs learn what they are given

def test_the_dpo_job_learns_the_pairs(tiny, tmp_path, capsys):  # noqa: F811
    folder, tok = tiny
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pair_rows()))
    report = finetune_dpo(str(folder), str(data), str(tmp_path / "run"), cfg(max_steps=16, eval_every=4, epochs=3, lora_r=0),
                          DPOSettings(rpo_alpha=0.0))
    printed = capsys.readouterr().out
    assert "memory estimate: weights" in printed and "reference: a frozen copy of the model as loaded" in printed
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "eval" not in r]
    assert len(steps) == 16 and all("rewards/margins" in r for r in steps)
    assert math.isclose(steps[0]["loss"], math.log(2), rel_tol=1e-6)  # step 1: the policy is the reference
    v = report["validation"]
    assert v["loss"] < 0.6 and v["rewards/margins"] > 0.2 and v["rewards/accuracies"] == 1.0, v  # measured 0.40
    # one number per model and split: best/ judged again (the reference loaded anew) gives the same loss
    best = load_checkpoint(tmp_path / "run" / "best", "lm", verbose=False)
    judge = PreferenceObjective(tok, reference=load_checkpoint(folder, "lm", verbose=False))
    val, _ = encode_pairs(load_jsonl_splits(data)["validation"], tok, 256)
    assert math.isclose(judge.evaluate(best, val, "cpu")["loss"], v["loss"], rel_tol=1e-4)
    assert report["test"]["num_pairs"] == 4 and json.loads((tmp_path / "run" / "results.json").read_text())["test"]


def test_the_kto_job_learns_the_rows(tiny, tmp_path, capsys):  # noqa: F811
    """Unpaired rows (capitals desirable, lower case not): the desirable rows' reward rises above the undesirable ones'
    and the validation loss falls; best/ judged again gives the same loss; the test split is scored once."""
    folder, tok = tiny
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in kto_rows(60)))
    report = finetune_kto(str(folder), str(data), str(tmp_path / "run"), cfg(max_steps=16, eval_every=4, epochs=3,
                                                                             lora_r=0))
    printed = capsys.readouterr().out
    assert "KTO, beta 0.1" in printed and "reference: a frozen copy of the model as loaded" in printed
    steps = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "eval" not in r]
    assert len(steps) == 16 and all("kl" in r for r in steps) and steps[0]["kl"] == 0  # step 1: the policy is the reference
    assert math.isclose(steps[0]["loss"], 0.5, rel_tol=1e-6)  # 1 - sigmoid(0) for every row
    before, v = report["before"], report["validation"]
    assert v["loss"] < before["loss"] - 0.02 and v["rewards/margins"] > 0.3, (before, v)  # measured 0.471, 0.42
    best = load_checkpoint(tmp_path / "run" / "best", "lm", verbose=False)
    judge = KTOObjective(tok, reference=load_checkpoint(folder, "lm", verbose=False), max_length=256)
    val, _ = encode_unpaired(load_jsonl_splits(data)["validation"], tok, 256)
    assert math.isclose(judge.evaluate(best, val, "cpu")["loss"], v["loss"], rel_tol=1e-4)
    assert report["test"]["num_rows"] == 6 and report["kto"] == {"beta": 0.1, "desirable_weight": 1.0,
                                                                 "undesirable_weight": 1.0}


def has_an_e(prompts, completions, **columns):
    """A reward a random model can find: 1 when the completion holds an 'e' (a fifth of the tiny model's first tokens)."""
    return [float("e" in c) for c in completions]


def test_the_grpo_job_raises_the_reward(tiny, tmp_path, capsys):  # noqa: F811
    """One-token answers (a bandit): the share of sampled answers with an 'e' goes from about a tenth to nearly all
    (measured 0.09 -> 0.98 over 30 steps), and the greedy answer follows."""
    folder, _ = tiny
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w} {v}", "topic": w}) + "\n" for w in WORDS for v in WORDS))
    settings = cfg(metric="reward", max_steps=30, eval_every=10, lr=3e-2, batch_size=8, epochs=6, lora_r=0)
    report = finetune_grpo(str(folder), str(data), str(tmp_path / "run"), settings,
                           GRPOSettings(reward="test_dpo_grpo_jobs:has_an_e", group_size=8, max_new_tokens=1,
                                        temperature=1.0))
    printed = capsys.readouterr().out
    assert "memory estimate: weights" in printed and "reward test_dpo_grpo_jobs:has_an_e" in printed
    steps = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "eval" not in r]
    assert len(steps) == 30 and all(0 <= r["frac_reward_zero_std"] <= 1 for r in steps)
    early, late = sum(r["reward"] for r in steps[:5]) / 5, sum(r["reward"] for r in steps[-5:]) / 5
    assert late > early + 0.5, (early, late)  # the sampled answers' mean reward
    assert report["validation"]["reward"] == 1.0 and report["reward_before"] < 1.0
    assert report["test"]["num_prompts"] == 6 and report["grpo"]["group_size"] == 8


def test_the_arithmetic_reward():
    assert number_is_right(["q"] * 4, ["7", "The answer is 7.", "8", ""], answer=["7", "7", "7", "7"]) == [1.0, 1.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------------------
# Exact resume: stopped in the middle of a step, resumed to the straight run's bits

@pytest.mark.parametrize("job", ["dpo", "kto", "grpo"])
def test_a_run_stopped_mid_step_resumes_bitwise(tiny, tmp_path, monkeypatch, job):  # noqa: F811
    """DPO and KTO stopped inside the backward of step 3 (dropout on: its masks come back too), GRPO inside the
    rollouts of step 3 (the sampling RNG comes back), then resumed: the same weights, AdamW state, best/, loop state
    and log."""
    folder, _ = tiny
    data = tmp_path / "rows.jsonl"
    if job in ("dpo", "kto"):
        data.write_text("".join(json.dumps(r) + "\n" for r in (pair_rows() if job == "dpo" else kto_rows())))
        settings = cfg(dropout=0.1, max_steps=5, eval_every=2, save_every=1)
        module, name, at = minift.preference, "sequence_logprobs_backward", 3  # the 3rd step's backward

        def run(out, resume=False):
            return finetune_dpo(str(folder), str(data), str(out), settings, DPOSettings() if job == "dpo" else KTOSettings(),
                                resume=resume, test=False)
    else:
        data.write_text("".join(json.dumps({"prompt": f"say {w}"}) + "\n" for w in WORDS * 3))
        settings = cfg(metric="reward", max_steps=5, eval_every=2, save_every=1, batch_size=2)
        module, name, at = minift.grpo, "sample_rollouts", 5  # the score before, steps 1-2, step 2's evaluation, step 3

        def run(out, resume=False):
            return finetune_grpo(str(folder), str(data), str(out), settings, GRPOSettings(
                reward=has_an_e, group_size=4, max_new_tokens=3, temperature=1.0), resume=resume, test=False)
    run(tmp_path / "straight")
    with monkeypatch.context() as patch:
        stop_on_call(patch, module, name, at)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "stopped")
    saved = json.loads((tmp_path / "stopped" / "checkpoint" / "trainer_state.json").read_text())["state"]["step"]
    assert 0 < saved < 5
    run(tmp_path / "stopped", resume=True)
    assert_same_outcome(outcome(tmp_path / "straight"), outcome(tmp_path / "stopped"))


# ---------------------------------------------------------------------------------------------------------
# Bad settings are one line

def test_bad_settings_are_one_line(tiny, tmp_path, capsys):  # noqa: F811
    folder, tok = tiny
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in pair_rows()))
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in rows_of_each_format()))
    base = ["finetune", "--model", str(folder), "--out", str(tmp_path / "o"), "--max-steps", "1", "--device", "cpu"]
    for argv, says in [
        (["--task", "dpo", "--data", str(pairs), "--group-size", "4"], "--group-size is a setting of --task grpo, not of "
         "--task dpo"),
        (["--task", "grpo", "--rpo-alpha", "1"], "--rpo-alpha is a setting of --task dpo, not of --task grpo"),
        (["--task", "instruct", "--beta", "1"], "--beta is a setting of --task dpo, --task kto, --task grpo and --task "
         "distill, not of --task instruct"),
        (["--task", "kto", "--loss-type", "ipo"], "--loss-type is a setting of --task dpo and --task grpo, not of --task kto"),
        (["--task", "kto", "--data", str(pairs), "--desirable-weight", "0"], "desirable_weight = 0.0 is out of range"),
        (["--task", "kto", "--data", str(pairs), "--batch-size", "1"], "give batch_size >= 2"),
        (["--task", "dpo", "--undesirable-weight", "2"], "--undesirable-weight is a setting of --task kto, not of --task dpo"),
        (["--task", "kto", "--data", str(rows)], "a KTO row needs 'prompt', 'completion' and 'label'"),
        (["--task", "grpo", "--reward", "nowhere"], "give module:function"),
        (["--task", "grpo", "--reward", "no_such_module_here:f"], "cannot import no_such_module_here"),
        (["--task", "grpo", "--loss-type", "ipo"], "loss_type 'ipo' is unknown: choose grpo, bnpo, dapo, dr_grpo"),
        (["--task", "dpo", "--data", str(pairs), "--loss-type", "hinge"], "loss_type 'hinge' is unknown"),
        (["--task", "dpo", "--data", str(pairs), "--metric", "accuracy"], "use metric='loss' or 'exact_match'"),
        (["--task", "dpo", "--data", str(pairs), "--backward", "autograd"], "use backward='manual'"),
        (["--task", "grpo", "--backward", "autograd"], "use backward='manual'"),
        (["--task", "dpo", "--data", str(pairs), "--beta", "0"], "beta = 0.0 is out of range"),
        (["--task", "dpo", "--data", str(pairs), "--label-smoothing", "0.7"], "label_smoothing = 0.7"),
        (["--task", "grpo", "--group-size", "1"], "give at least 2"),
        (["--task", "grpo", "--temperature", "0"], "temperature > 0"),
        (["--task", "grpo", "--epsilon-high", "x"], "--epsilon-high 'x': expected a number (or none)"),
        (["--task", "grpo", "--loss-type", "cispo"], "give epsilon_high (5.0 is ScaleRL's)"),
        (["--task", "grpo", "--importance-sampling-level", "prompt"], "importance_sampling_level 'prompt' is unknown"),
        (["--task", "grpo", "--reward", "minift.grpo:number_is_right,minift.grpo:number_is_right", "--reward-weights",
          "1"], "give 2 finite number(s)"),
        (["--task", "grpo", "--mask-truncated-completions", "maybe"], "expected true or false"),
        (["--task", "dpo", "--data", str(tmp_path / "missing.jsonl")], "no such file or folder"),
        (["--task", "instruct", "--data", str(rows), "--metric", "reward"], "metric 'reward' is GRPO's"),
    ]:
        line = cli_error(capsys, base + argv)
        assert says in line, (argv, line)
    with pytest.raises(MiniftError, match="gave 1 values for 2 completions"):
        minift.grpo.rewards_of(lambda prompts, completions: [1.0], ["p", "p"], ["a", "b"], {})
    with pytest.raises(MiniftError, match="is not a function"):
        load_reward("math:pi")
    examples, _ = encode_pairs(pair_rows(4), Tokenizer.from_file(folder), 256)
    objective = PreferenceObjective(tok)
    with pytest.raises(MiniftError, match="compares with a reference model"):
        objective.check(load_checkpoint(folder, "lm", verbose=False), minift.TrainData(examples, examples, 0),
                        TrainConfig(metric="loss"))
