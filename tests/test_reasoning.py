"""The reasoning track: reasoning-gym's GSM-style generators loaded by path, problems split by generator (no test
generator feeds training), the final-number parser and the exact-answer reward, the gsm suite, and SFT then GRPO end
to end on a tiny random Llama (`--data gsm` for both jobs). The generators come from PyPI reasoning-gym 0.1.25 (a
7 MB wheel, fetched on first use; skipped where PyPI is unreachable)."""
import json
import sys

import pytest

from conftest import fetched
from minift import evals
from minift.checkpoints import load_checkpoint
from minift.config import TrainConfig
from minift.corpora import (GSM_HELD_OUT, GSM_PROBLEMS, gsm_generators, gsm_problems, gsm_splits, load_instruction_splits,
                            load_jsonl_splits)
from minift.errors import MiniftError
from minift.evals import final_number, parse_answer
from minift.grpo import GRPOSettings, final_answer_is_right, finetune_grpo, load_reward
from minift.instruct import finetune_instruct
from test_instruct import tiny  # noqa: F401  (the fixture: a random-init Llama with a ChatML tokenizer)


@pytest.fixture(scope="module")
def generators():
    from minift.hub import fetch_gsm_generators
    fetched(fetch_gsm_generators, "the GSM-symbolic generators (PyPI reasoning-gym 0.1.25)")
    return gsm_generators()


@pytest.mark.parametrize("text, number", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"), ("#### 1,024", "1024"), ("So it costs $2.50 in all.", "2.5"),
    ("#### 32.0", "32"), ("The answer is 5 apples, not 6.", "6"), ("#### 5 apples (not 7)", "5"),
    ("#### 4\nThen 9 more\n#### -12.", "-12"), ("no number here", ""), ("", ""), ("#### -0", "0"),
    ("1,234,567 in 2 steps", "2"), ("#### 100", "100")])
def test_the_final_number_of_a_worked_solution(text, number):
    assert final_number(text) == parse_answer(text, "final") == number


def test_the_reward_is_exact_on_the_final_number():
    completions = ["3 + 4 = 7\n#### 7", "#### 7.0", "7 then 8", "#### 8\nor 7", "", "It is 7."]
    assert final_answer_is_right(["p"] * 6, completions, answer=["7"] * 6, generator=[1] * 6) == [1, 1, 0, 0, 0, 1]
    assert load_reward("minift.grpo:final_answer_is_right") is final_answer_is_right


def test_the_generators_load_by_path_and_solutions_end_with_their_answer(generators):
    assert len(generators) == 85 and not {32, 35, 37, 61, 63, 65, 74, 76, 77, 79, 86, 87, 90, 97, 98} & set(generators)
    assert "reasoning_gym.utils" not in sys.modules and "reasoning_gym" not in sys.modules  # lent, then taken back
    for number, generate in generators.items():
        rows = gsm_problems(generate, number, 3)
        assert len({r["prompt"] for r in rows}) == 3
        for r in rows:
            assert "####" in r["response"] and final_number(r["response"]) == final_number(r["answer"]) != ""


def test_no_test_generator_feeds_training(generators):
    """The splits' generators are disjoint, and every row is what its generator draws (so its label can be trusted):
    regenerated from the generator it names, with the same seeds, it comes out the same."""
    splits = gsm_splits()
    owners = {k: {r["generator"] for r in v} for k, v in splits.items()}
    assert {k: len(v) for k, v in owners.items()} == {"train": 85 - sum(GSM_HELD_OUT.values()), **GSM_HELD_OUT}
    assert owners["train"].isdisjoint(owners["test"] | owners["validation"]) and owners["test"].isdisjoint(
        owners["validation"])
    for name, rows in splits.items():
        assert len(rows) == len(owners[name]) * GSM_PROBLEMS[name]
        for g in owners[name]:
            assert sorted(r["prompt"] for r in rows if r["generator"] == g) == sorted(
                r["prompt"] for r in gsm_problems(generators[g], g, GSM_PROBLEMS[name]))
    assert gsm_splits() == splits  # seeded: the same every time
    test_prompts = {r["prompt"] for r in splits["test"]}
    for read in (load_instruction_splits, lambda d: load_jsonl_splits(d)):  # --data gsm, as SFT and GRPO read it
        train = read("gsm")["train"]
        assert len(train) == len(splits["train"]) and not owners["test"] & {r["generator"] for r in train}
        assert not test_prompts & {r["prompt"] for r in train}
    suite = evals.load_suite("gsm")
    assert suite.items == [{"prompt": r["prompt"], "answer": r["answer"]} for r in splits["test"]]
    assert suite.items == evals.load_suite("gsm").items and suite.options["kind"] == "final"


def test_a_changed_generator_file_is_one_line(generators, tmp_path, monkeypatch):
    from minift.hub import data_dir, fetch_gsm_generators
    folder = tmp_path / "gsm_symbolic"
    folder.mkdir()
    for name in ("utils.py", "generators_00_49.py", "generators_50_99.py"):
        (folder / name).write_bytes((data_dir() / "gsm_symbolic" / name).read_bytes())
    (folder / "generators_50_99.py").write_text("import os\n")
    monkeypatch.setenv("MINIFT_DATA", str(tmp_path))
    with pytest.raises(MiniftError) as e:
        fetch_gsm_generators()
    assert "\n" not in str(e.value) and "generators_50_99.py has sha256" in str(e.value)


def test_sft_then_grpo_on_the_generators_end_to_end(tiny, generators, tmp_path):  # noqa: F811
    """The track's two jobs on `--data gsm` with a tiny model: SFT on worked solutions (the gsm suite scored before
    and after), then GRPO from its best/ with the exact-answer reward; the gsm suite of the GRPO model is
    deterministic."""
    folder, tok = tiny
    sft = finetune_instruct(str(folder), data="gsm", out=str(tmp_path / "sft"), max_length=1024, limit=16, test=False,
                            score_rows=4, suites=["gsm"],
                            cfg=TrainConfig(epochs=1, batch_size=8, lr=1e-2, metric="loss", precision="fp32"))
    assert sft["steps"] == 2 and sft["suites_before"]["gsm"]["size"] == 4 == sft["suites_after"]["gsm"]["size"]
    settings = GRPOSettings(reward="minift.grpo:final_answer_is_right", group_size=2, max_new_tokens=8, temperature=1.0)
    grpo = finetune_grpo(str(tmp_path / "sft" / "best"), data="gsm", out=str(tmp_path / "grpo"), settings=settings,
                         max_length=1024, limit=4, test=False,
                         cfg=TrainConfig(max_steps=2, batch_size=2, lr=1e-3, lora_r=4, metric="reward", dropout=0.0,
                                         eval_every=2, precision="fp32"))
    assert grpo["steps"] == 2 and grpo["grpo"]["reward"] == "minift.grpo:final_answer_is_right"
    log = [json.loads(line) for line in (tmp_path / "grpo" / "log.jsonl").read_text().splitlines()]
    assert all(0 <= r["reward"] <= 1 for r in log if "reward" in r and "eval" not in r)
    model = load_checkpoint(tmp_path / "grpo" / "best", "lm", verbose=False)
    first, again = evals.run_suites(model, tok, ["gsm"], limit=3), evals.run_suites(model, tok, ["gsm"], limit=3)
    assert first["gsm"]["items"] == again["gsm"]["items"] and first["gsm"]["n"] == 3
