"""The reward model (reward.py): Bradley-Terry with its margin and centring against TRL 1.16.0's RewardTrainer on a tiny
transformers LlamaForSequenceClassification (loss, metrics and every weight's gradient, float64) and against autograd
(full and LoRA); best/ loads in transformers' AutoModelForSequenceClassification with the same scores; the job learns
pairs; a reward model trained here is GRPO's reward (--reward-model) and raises what it rewards; bad settings and
rows are one line.

TRL and transformers are oracles only (importorskip)."""
import json
import math
import types

import pytest
import torch

import minift.checkpoints
import minift.grpo
import minift.reward
from minift.checkpoints import build_model, load_checkpoint
from minift.config import TrainConfig
from minift.errors import MiniftError
from minift.grpo import GRPOSettings, finetune_grpo, reward_from_model
from minift.lora import add_lora, lora_layers
from minift.reward import (RewardObjective, RewardSettings, bradley_terry_loss, encode_pairs, finetune_reward, pair_of,
                           scored_text)
from minift.tokenizer import Tokenizer
from test_faults import cli_error
from test_instruct import WORDS, tiny  # noqa: F401  (tiny: a fixture)

HF_TOL = 1e-6  # float64 models, but transformers computes RoPE's cos and sin in float32
# three pairs of token ids (no 0: the pad id), of different lengths, so rows are padded
CHOSEN, REJECTED, MARGINS = [[3, 4, 5, 6], [7, 8], [9, 10, 11]], [[3, 4, 12], [7, 13, 14, 15, 16], [9, 17]], [0.5, 0.0, 1.5]


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    """A tiny HF Llama reward model (num_labels 1, float64), TRL's RewardTrainer on it, and minift's load of it."""
    pytest.importorskip("trl")
    transformers = pytest.importorskip("transformers")
    import datasets
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
    from trl import RewardConfig, RewardTrainer
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tok = HFTokenizer(models.WordLevel({f"w{i}": i for i in range(50)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2", pad_token="w0")
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      attn_implementation="eager", pad_token_id=0, eos_token_id=2, num_labels=1)
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(config).double()
    with torch.no_grad():
        hf.score.weight.normal_(0, 0.5)  # rewards of a size whose differences matter
    folder = tmp_path_factory.mktemp("reward")
    hf.save_pretrained(folder / "model")
    data = datasets.Dataset.from_dict({"chosen": ["w3 w4"], "rejected": ["w5"]})  # unused rows

    def trainer(center=None):
        args = RewardConfig(output_dir=str(folder / "out"), report_to=[], use_cpu=True, bf16=False,
                            center_rewards_coefficient=center)
        return RewardTrainer(model=hf, args=args, train_dataset=data, processing_class=hf_tok)

    def ours():
        return load_checkpoint(folder / "model", "classify", verbose=False).double().train()

    return types.SimpleNamespace(trainer=trainer, hf=hf, ours=ours, folder=folder)


def trl_inputs(margin):
    from trl.trainer.reward_trainer import DataCollatorForPreference
    rows = [{"chosen_ids": c, "rejected_ids": r, **({"margin": m} if margin else {})}
            for c, r, m in zip(CHOSEN, REJECTED, MARGINS)]
    inputs = DataCollatorForPreference(pad_token_id=0)(rows)
    if margin:
        inputs["margin"] = inputs["margin"].double()
    return inputs


def our_examples(margin):
    return [{"input_ids": c, "rejected": r, **({"margin": m} if margin else {})} for c, r, m in zip(CHOSEN, REJECTED, MARGINS)]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (False, 0.01)])
def test_reward_trainer_loss_metrics_and_gradients(trl_setup, margin, center):
    """TRL's RewardTrainer.compute_loss (its backward into the HF model's .grad) and RewardObjective.gradients on the
    same weights and pairs: the loss, accuracy, margin and every weight's gradient."""
    trainer = trl_setup.trainer(center)
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, trl_inputs(margin))
    loss.backward()
    theirs = {k: v[0] for k, v in trainer._metrics["train"].items()}
    model = trl_setup.ours()
    objective = RewardObjective(Tokenizer.__new__(Tokenizer), RewardSettings(center))
    objective.tok.pad_id = 0
    ours, metrics = objective.gradients(model, [objective.collate(our_examples(margin), "cpu")])
    assert ours == pytest.approx(loss.item(), rel=HF_TOL)
    assert metrics["accuracy"] == pytest.approx(theirs["accuracy"]) and 0 < metrics["accuracy"] < 1
    assert metrics["margin"] == pytest.approx(theirs["margin"], rel=HF_TOL)
    hf_grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    our_grads = grads(model)
    assert our_grads.keys() == hf_grads.keys()
    for name, g in hf_grads.items():
        err = (our_grads[name] - g).abs().max() / g.abs().max()
        assert err <= HF_TOL, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("lora", [False, True])
def test_gradients_against_autograd(lora):
    """Our backward (the classifier's, fed Bradley-Terry's two numbers per pair) against autograd through the same
    model, float64, margins and centring on, two micro-batches adding up to the batch."""
    torch.manual_seed(1)
    model = build_model(dict(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0), "classify",
                        num_labels=1).double().train()
    if lora:
        add_lora(model, "all-linear", r=2, alpha=4)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.normal_(0, 0.3)
    objective = RewardObjective(types.SimpleNamespace(pad_id=0), RewardSettings(0.05))
    examples = our_examples(True)
    with torch.enable_grad():
        batch = objective.collate(examples, "cpu")
        rewards = model(batch["input_ids"], batch["attention_mask"])[:, 0]
        chosen, rejected = rewards.chunk(2)
        ref = (-torch.nn.functional.logsigmoid(chosen - rejected - batch["margin"]) + 0.05 * (chosen + rejected) ** 2).mean()
        ref.backward()
    ref_grads = grads(model)
    model.zero_grad()
    loss, _ = objective.gradients(model, [objective.collate(examples[:1], "cpu"), objective.collate(examples[1:], "cpu")])
    assert math.isclose(loss, ref.item(), rel_tol=1e-12)
    ours = grads(model)
    assert ours.keys() == ref_grads.keys() and ("score.weight" in ours)
    for name, g in ref_grads.items():
        err = (ours[name] - g).abs().max() / g.abs().max()
        assert err <= 1e-10, f"{name}: relative error {err:.2e}"


def test_bradley_terry_by_hand():
    losses, dc, dr = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(losses, torch.tensor([math.log(2), math.log(2)]))  # 2 - 1 - margin 1 = 0, and 0 - 0
    assert torch.allclose(dc, torch.tensor([-0.5, -0.5])) and torch.allclose(dr, -dc)


# ---------------------------------------------------------------------------------------------------------
# Pairs

def test_pair_rows_of_each_layout(tiny):  # noqa: F811
    _, tok = tiny
    ask = [{"role": "user", "content": "first word of: red cat"}]
    layouts = [{"prompt": "first word of: red cat", "chosen": "RED", "rejected": "CAT"},
               {"prompt": ask, "chosen": [{"role": "assistant", "content": "RED"}],
                "rejected": [{"role": "assistant", "content": "CAT"}]},
               {"chosen": ask + [{"role": "assistant", "content": "RED"}],
                "rejected": ask + [{"role": "assistant", "content": "CAT"}]}]
    encoded = [encode_pairs([row], tok, 256)[0][0] for row in layouts]
    assert encoded[0] == encoded[1] == encoded[2]
    assert tok.decode(encoded[0]["input_ids"], skip_special_tokens=False).endswith(
        "<|im_start|>user\nfirst word of: red cat<|im_end|>\n<|im_start|>assistant\nRED")  # no end token: scored on RED
    for bad, says in [({"prompt": "x", "chosen": "a"}, "needs 'chosen' and 'rejected'"),
                      ({"prompt": "x", "chosen": "a", "rejected": "a "}, "the same answer"),
                      ({"prompt": "x", "chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a number"),
                      ({"chosen": "a", "rejected": "b"}, "must be conversations")]:
        with pytest.raises(MiniftError, match=says):
            pair_of(bad, "pairs.jsonl:3")
    assert encode_pairs(layouts[:1], tok, 8) == ([], 1)  # longer than max_length: dropped, as TRL drops it


# ---------------------------------------------------------------------------------------------------------
# The job, transformers loading its best/, and GRPO's reward

def e_pairs(tok, n=240, seed=0):
    """Pairs a random policy's one-token answers can be judged by: chosen a token with an 'e' in it, rejected one
    without (the tiny tokenizer's own tokens, so that GRPO's samples look like them)."""
    texts = [tok.decode([i]) for i in range(tok.vocab_size)]
    texts = [t for t in texts if t.strip() and t == t.strip()]
    with_e, without = [t for t in texts if "e" in t], [t for t in texts if "e" not in t]
    rng = __import__("random").Random(seed)
    return [{"prompt": f"say {rng.choice(WORDS)} {rng.choice(WORDS)}", "chosen": rng.choice(with_e),
             "rejected": rng.choice(without)} for _ in range(n)]


def cfg(**kw):
    return TrainConfig(**{"epochs": 2, "batch_size": 8, "lr": 3e-2, "lora_r": 0, "eval_every": 10, "metric": "auto",
                          "precision": "fp32", "device": "cpu", "dropout": 0.0, "warmup_ratio": 0.0, **kw})


@pytest.fixture(scope="module")
def judge(tiny, tmp_path_factory):  # noqa: F811
    """A reward model trained by the job on e_pairs (the tiny Llama with a one-number head): its run folder."""
    folder, tok = tiny
    tmp = tmp_path_factory.mktemp("judge")
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in e_pairs(tok)))
    report = finetune_reward(str(folder), str(data), str(tmp / "run"), cfg())
    return types.SimpleNamespace(out=tmp / "run", report=report, data=data)


def test_the_job_learns_the_pairs_and_transformers_loads_it(judge, tiny):  # noqa: F811
    """Accuracy on held-out pairs from about a coin's (a head drawn at random) to nearly all (measured 0.58 -> 1.0);
    best/ is a LlamaForSequenceClassification with one output that transformers scores as minift does."""
    transformers = pytest.importorskip("transformers")
    report = judge.report
    assert report["validation"]["accuracy"] >= 0.9 > report["before"]["accuracy"], (report["before"], report["validation"])
    assert report["test"]["num_pairs"] == 24
    config = json.loads((judge.out / "best" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["id2label"] == {"0": "reward"}
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(judge.out / "best").eval()
    assert hf.config.num_labels == 1
    _, tok = tiny
    examples, _ = encode_pairs(e_pairs(tok, 8, seed=1), tok, 256)
    objective = RewardObjective(tok)
    ours = load_checkpoint(judge.out / "best", "classify", verbose=False).eval()
    batch = objective.collate(examples, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, ours(**batch), rtol=1e-5, atol=1e-5)


def test_grpo_scores_completions_as_the_reward_model_was_trained(judge, tiny):  # noqa: F811
    """grpo.reward_from_model writes prompt + completion as reward.scored_text does: its scores are the model's
    rewards of the same pairs' texts."""
    _, tok = tiny
    rows = e_pairs(tok, 6, seed=2)
    score = reward_from_model(judge.out / "best")
    got = score(prompts=[r["prompt"] for r in rows], completions=[r["chosen"] for r in rows], topic=[None] * 6)
    model = load_checkpoint(judge.out / "best", "classify", verbose=False).eval()
    ids = [tok.encode(scored_text(r["prompt"], r["chosen"], tok), add_special_tokens=False) for r in rows]
    with torch.no_grad():
        want = [model(torch.tensor([i]))[0, 0].item() for i in ids]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_a_reward_model_drives_grpo(judge, tiny, tmp_path, capsys):  # noqa: F811
    """GRPO with --reward-model: one-token answers, the judge's score as the reward; the sampled answers' mean reward
    rises (measured -1.91 over the first 5 steps -> 2.13 over the last 5) and so does the greedy answer's on validation
    (-2.42 -> 2.88)."""
    folder, _ = tiny
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {w} {v}"}) + "\n" for w in WORDS for v in WORDS))
    report = finetune_grpo(str(folder), str(data), str(tmp_path / "run"),
                           cfg(metric="reward", max_steps=30, eval_every=10, epochs=6),
                           GRPOSettings(reward_model=str(judge.out / "best"), group_size=8, max_new_tokens=1,
                                        temperature=1.0))
    assert "reward minift.grpo:reward_model_score" in capsys.readouterr().out
    steps = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "eval" not in r]
    early, late = sum(r["reward"] for r in steps[:5]) / 5, sum(r["reward"] for r in steps[-5:]) / 5
    assert late > early + 1.0, (early, late)
    assert report["validation"]["reward"] > report["reward_before"]
    assert report["grpo"]["reward_model"] == str(judge.out / "best")


# ---------------------------------------------------------------------------------------------------------
# Bad settings: one line, before any model loads

def test_bad_settings_are_one_line_before_any_model_loads(tiny, judge, tmp_path, capsys, monkeypatch):  # noqa: F811
    folder, _ = tiny
    def loading(*args, **kw):
        raise AssertionError("a model was loaded before the bad setting was refused")
    for module in (minift.reward, minift.grpo):  # not checkpoints': a job module imported under the patch keeps it
        monkeypatch.setattr(module, "load_checkpoint", loading)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(11))
                   + json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    base = ["finetune", "--model", folder, "--out", tmp_path / "o", "--device", "cpu"]
    for argv, says in [
        (["--task", "reward", "--data", judge.data, "--center-rewards-coefficient", "-1"],
         "center_rewards_coefficient = -1.0 is out of range"),
        (["--task", "reward", "--data", judge.data, "--metric", "exact_match"], "use metric='accuracy' or 'loss'"),
        (["--task", "reward", "--data", judge.data, "--chunked-loss", "64"], "a reward model has one output"),
        (["--task", "reward", "--data", judge.data, "--packing", "64"], "use packing=0"),
        (["--task", "reward", "--data", judge.data, "--beta", "0.1"], "--beta is a setting of"),
        (["--task", "reward", "--data", bad], "bad.jsonl:12: 'chosen' and 'rejected' are the same answer"),
        (["--task", "grpo", "--reward-model", tmp_path], "no config.json there"),
        (["--task", "dpo", "--reward-model", judge.out / "best"], "--reward-model is a setting of --task grpo"),
    ]:
        line = cli_error(capsys, base + argv)
        assert says in line, (argv, line)
