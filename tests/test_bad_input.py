"""Bad input, as a new user gives it: each case is one `minift: error:` line that says what was wrong and what to do,
a non-zero exit, and nothing lost (issue 35's list). Settings are refused before any model is loaded; every
objective refuses what it cannot honour; the preference and RL jobs name a bad row by its file's line.

A tiny random-init Llama with a ChatML tokenizer (test_instruct's `tiny`): seconds each."""
import json
import re

import pytest
import torch

import minift.checkpoints
import minift.cli
import minift.dpo
import minift.evals
import minift.export
import minift.grpo
import minift.resume
from minift import TrainData
from minift.checkpoints import load_checkpoint
from minift.config import TrainConfig
from minift.dpo import DPOSettings, PreferenceObjective, encode_pairs, finetune_dpo
from minift.errors import MiniftError
from minift.grpo import GRPOObjective, GRPOSettings, encode_prompts, finetune_grpo
from minift.objective import SupervisedObjective
from test_dpo_grpo_jobs import pair_rows
from test_faults import cli_error
from test_instruct import WORDS, rows_of_each_format, tiny  # noqa: F401  (tiny: a fixture)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_rows(n=24):
    return [{"prompt": f"say {WORDS[i % len(WORDS)]}", "topic": WORDS[i % len(WORDS)]} for i in range(n)]


def quick(folder, out, *flags):
    return ["finetune", "--model", str(folder), "--out", str(out), "--max-steps", "1", "--device", "cpu",
            "--precision", "fp32", *flags]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if anything loads a checkpoint: a setting must be refused before."""
    def loading(*args, **kw):
        raise AssertionError("a model was loaded before the bad setting was refused")
    for module in (minift.dpo, minift.grpo):  # not checkpoints': a job module imported under the patch keeps it
        monkeypatch.setattr(module, "load_checkpoint", loading)


# ---------------------------------------------------------------------------------------------------------
# Settings: refused at the door, before any model loads

@pytest.mark.parametrize("task, flags, says", [
    ("dpo", ["--beta", "-1"], "beta = -1.0 is out of range"),
    ("dpo", ["--loss-type", "hinge"], "loss_type 'hinge' is unknown"),
    ("dpo", ["--simpo-gamma", "-2"], "simpo_gamma = -2.0 is out of range"),
    ("dpo", ["--metric", "reward"], "use metric='loss' or 'exact_match'"),
    ("dpo", ["--packing", "64"], "use packing=0"),
    ("dpo", ["--label-smoothing", "0.5"], "label_smoothing = 0.5 is out of range: in [0, 0.5)"),
    ("dpo", ["--lora-dropout", "1"], "lora_dropout = 1.0 is out of range: in [0, 1)"),
    ("dpo", ["--warmup-ratio", "1.5"], "warmup_ratio = 1.5 is out of range: between 0 and 1"),
    ("grpo", ["--top-p", "0"], "top_p = 0.0 is out of range"),
    ("grpo", ["--top-p", "1.5"], "top_p = 1.5 is out of range: in (0, 1]"),
    ("grpo", ["--scale-rewards", "sometimes"], "scale_rewards 'sometimes' is unknown"),
    ("grpo", ["--epsilon", "0"], "epsilon = 0.0 is out of range"),
    ("grpo", ["--loss-type", "dr_grpo", "--max-new-tokens", "0"], "max_new_tokens = 0 is out of range"),
    ("grpo", ["--reward", "tests_no_such_module_x:f"], "cannot import tests_no_such_module_x"),
])
def test_a_bad_setting_is_refused_before_any_model_loads(capsys, tmp_path, tiny, no_model_loads, task, flags, says):  # noqa: F811
    folder, _ = tiny
    data = write_jsonl(tmp_path / "rows.jsonl", pair_rows() if task == "dpo" else prompt_rows())
    line = cli_error(capsys, quick(folder, tmp_path / "o", "--task", task, "--data", data, *flags))
    assert says in line, line


def test_the_python_api_refuses_a_bad_setting_before_any_model_loads(tmp_path, tiny, no_model_loads):  # noqa: F811
    folder, _ = tiny
    with pytest.raises(MiniftError, match="beta = 0 is out of range"):
        finetune_dpo(str(folder), None, str(tmp_path / "d"), settings=DPOSettings(beta=0))
    with pytest.raises(MiniftError, match="use backward='manual'"):
        finetune_grpo(str(folder), None, str(tmp_path / "g"), TrainConfig(backward="autograd", metric="reward"))
    with pytest.raises(MiniftError, match="group_size = 1 is out of range"):
        finetune_grpo(str(folder), None, str(tmp_path / "g"), settings=GRPOSettings(group_size=1))


def test_a_toml_key_of_another_method_is_refused(capsys, tmp_path, tiny):  # noqa: F811
    folder, _ = tiny
    toml = tmp_path / "s.toml"
    toml.write_text("group_size = 4\n")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    line = cli_error(capsys, quick(folder, tmp_path / "o", "--task", "dpo", "--data", data, "--config", toml))
    assert f"{toml}: group_size is a setting of --task grpo, not of --task dpo" in line


# ---------------------------------------------------------------------------------------------------------
# Each objective refuses what it cannot honour

@pytest.mark.parametrize("kind, setting, says", [
    ("dpo", dict(backward="autograd"), "use backward='manual'"),
    ("dpo", dict(packing=64), "use packing=0"),
    ("dpo", dict(metric="accuracy"), "use metric='loss' or 'exact_match'"),
    ("dpo", dict(metric="exact_match"), "these examples have no right answer to match"),
    ("grpo", dict(backward="autograd"), "use backward='manual'"),
    ("grpo", dict(packing=64), "nothing to pack"),
    ("grpo", dict(metric="loss"), "use metric='reward'"),
    ("lm", dict(metric="accuracy"), "a language model is judged by its validation loss"),
    ("lm", dict(metric="reward"), "metric 'reward' is GRPO's"),
    ("classify", dict(metric="exact_match"), "a classifier is judged by accuracy, macro_f1, loss"),
])
def test_each_objective_refuses_what_it_cannot_honour(tiny, kind, setting, says):  # noqa: F811
    folder, tok = tiny
    task = "classify" if kind == "classify" else "lm"
    model = load_checkpoint(folder, task, num_labels=2 if task == "classify" else None, verbose=False)
    if kind == "dpo":
        examples, _ = encode_pairs(pair_rows(4), tok, 256)
        objective = PreferenceObjective(tok)
    elif kind == "grpo":
        examples = encode_prompts(prompt_rows(4), tok, 256)
        objective = GRPOObjective(tok, minift.grpo.number_is_right)
    else:
        examples = [{"input_ids": [1, 2, 3], "label": 0}] if task == "classify" else [
            {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
        objective = SupervisedObjective()
    cfg = TrainConfig(lora_r=2, **{"metric": "reward" if kind == "grpo" else "loss", **setting})
    with pytest.raises(MiniftError, match=says):
        objective.check(model, TrainData(examples, examples, 0, objective=objective), cfg)
        objective.metric(model, cfg)


# ---------------------------------------------------------------------------------------------------------
# Rows: named by their file's line; the layouts the jobs document are read

def test_a_bad_pair_or_prompt_row_is_named_by_its_line(capsys, tmp_path, tiny, no_model_loads):  # noqa: F811
    folder, _ = tiny
    pairs = pair_rows()
    pairs[12] = {"prompt": "x", "chosen": "a"}  # line 13 of the file: the split would shuffle it elsewhere
    line = cli_error(capsys, quick(folder, tmp_path / "o", "--task", "dpo", "--data",
                                   write_jsonl(tmp_path / "pairs.jsonl", pairs)))
    assert "pairs.jsonl:13: a preference row needs 'chosen' and 'rejected'" in line, line
    prompts = prompt_rows()
    prompts[6] = {"prompt": [{"role": "user", "content": 44}]}
    line = cli_error(capsys, quick(folder, tmp_path / "o", "--task", "grpo", "--data",
                                   write_jsonl(tmp_path / "prompts.jsonl", prompts)))
    assert "prompts.jsonl:7: turn 1 of 'prompt' must be {'role': a text, 'content': a text}" in line, line


def test_a_pair_whose_answers_are_the_same_is_refused(capsys, tmp_path, tiny, no_model_loads):  # noqa: F811
    folder, _ = tiny
    same = [{**r, "rejected": r["chosen"]} for r in pair_rows()]
    line = cli_error(capsys, quick(folder, tmp_path / "o", "--task", "dpo", "--data",
                                   write_jsonl(tmp_path / "same.jsonl", same)))
    assert "same.jsonl:1: 'chosen' and 'rejected' are the same answer" in line, line


def test_the_conversational_pair_layouts_are_read_and_train(tmp_path, tiny):  # noqa: F811
    """TRL's chat layouts (prompt as turns and each answer an assistant turn; whole conversations differing in the
    last turn) go through the file reader and train, giving the same examples as the text layout."""
    folder, tok = tiny
    text = pair_rows(12)
    turns = [{"prompt": [{"role": "user", "content": r["prompt"]}],
              "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in text]
    whole = [{"chosen": t["prompt"] + t["chosen"], "rejected": t["prompt"] + t["rejected"]} for t in turns]
    encoded = [encode_pairs(minift.data.read_jsonl(write_jsonl(tmp_path / f"{k}.jsonl", rows)), tok, 256)[0]
               for k, rows in (("text", text), ("turns", turns), ("whole", whole))]
    assert encoded[0] == encoded[1] == encoded[2]
    cfg = TrainConfig(max_steps=1, batch_size=4, lora_r=2, metric="loss", device="cpu", precision="fp32", dropout=0.0,
                      warmup_ratio=0.0)
    report = finetune_dpo(str(folder), str(tmp_path / "turns.jsonl"), str(tmp_path / "run"), cfg, test=False)
    assert report["steps"] == 1


def test_too_few_rows_say_so_and_a_one_step_run_trains(capsys, tmp_path, tiny):  # noqa: F811
    """3 rows cannot be split 80/10/10 (it was a warm-up step at lr 0 or 'is the split empty?'); 10 rows make one step
    of 8 pairs, which warm-up no longer leaves at lr 0."""
    folder, _ = tiny
    for task, rows in (("dpo", pair_rows(3)), ("grpo", prompt_rows(3))):
        data = write_jsonl(tmp_path / "rows.jsonl", rows)
        line = cli_error(capsys, ["finetune", "--model", folder, "--out", tmp_path / "o", "--task", task, "--data", data])
        assert "rows.jsonl has 3 rows: too few to split into train, validation and test" in line
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(10))
    minift.cli.main([str(a) for a in ["finetune", "--model", folder, "--out", tmp_path / "o", "--device", "cpu",
                                      "--precision", "fp32", "--task", "dpo", "--data", data]])
    steps = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert len([r for r in steps if "eval" not in r]) == 1 and steps[0]["lr"] == 5e-4  # the job's peak lr


# ---------------------------------------------------------------------------------------------------------
# Reward functions that go wrong

REWARDS = {
    "syntax": ("def f(prompts, completions, **columns)\n    return [1.0]\n", "importing tests_reward_syntax failed with "
               "SyntaxError"),
    "import": ("1 / 0\n", "importing tests_reward_import failed with ZeroDivisionError: division by zero"),
    "signature": ("def f(completions):\n    return [1.0] * len(completions)\n", "cannot be called as f(prompts=, "
                  "completions=, topic=)"),
    "raises": ("def f(prompts, completions, **columns):\n    raise ValueError('no scores today')\n",
               "raised ValueError: no scores today"),
    "huge": ("def f(prompts, completions, **columns):\n    return [1e300 * (i % 2) for i in range(len(completions))]\n",
             "rewards as large as 1e+300: their spread overflows"),
    "nan": ("def f(prompts, completions, **columns):\n    return [float('nan')] * len(completions)\n", "NaN/inf"),
}


@pytest.mark.parametrize("case", list(REWARDS))
def test_a_reward_function_that_goes_wrong_is_one_line(capsys, tmp_path, tiny, monkeypatch, case):  # noqa: F811
    folder, _ = tiny
    code, says = REWARDS[case]
    (tmp_path / f"tests_reward_{case}.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows())
    line = cli_error(capsys, quick(folder, tmp_path / "o", "--task", "grpo", "--data", data, "--group-size", "2",
                                   "--max-new-tokens", "2", "--reward", f"tests_reward_{case}:f"))
    assert says in line, line
    if case == "raises":
        assert "tests_reward_raises.py, line 2" in line and "--resume" in line


def test_import_and_signature_problems_are_found_before_the_model_loads(capsys, tmp_path, tiny, monkeypatch,  # noqa: F811
                                                                         no_model_loads):
    folder, _ = tiny
    (tmp_path / "tests_reward_early.py").write_text("def f(completions):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows())
    line = cli_error(capsys, quick(folder, tmp_path / "o", "--task", "grpo", "--data", data, "--reward",
                                   "tests_reward_early:f"))
    assert "cannot be called as" in line


# ---------------------------------------------------------------------------------------------------------
# The loop's own cases

def test_packing_that_packs_nothing_is_refused(capsys, tmp_path, tiny):  # noqa: F811
    folder, _ = tiny
    data = write_jsonl(tmp_path / "rows.jsonl", rows_of_each_format())
    line = cli_error(capsys, quick(folder, tmp_path / "o", "--task", "instruct", "--data", data, "--packing", "40"))
    assert "packing=40 put no two rows together" in line


def test_a_full_disk_at_the_first_checkpoint_does_not_advise_a_resume(capsys, tmp_path, tiny, monkeypatch):  # noqa: F811
    folder, _ = tiny

    def full(*args, **kw):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(minift.resume, "save_file", full)
    data = write_jsonl(tmp_path / "rows.jsonl", rows_of_each_format())
    line = cli_error(capsys, quick(folder, tmp_path / "o", "--task", "instruct", "--data", data, "--warmup-ratio", "0"))
    assert "could not write the first checkpoint (No space left on device), so there is nothing to resume" in line
    assert "--resume" not in line


def test_a_resume_with_other_labels_names_the_labels(capsys, tmp_path):
    import test_train as T
    from minift.train import train
    model = T.make_model()
    model.label_names = ["a", "b", "c"]
    train(model, TrainData(T.cls_examples(24), T.cls_examples(8, seed=1), T.PAD), T.config(max_steps=2), tmp_path)
    other = T.make_model()
    other.label_names = ["x", "y", "z"]
    with pytest.raises(MiniftError, match=r"has the labels \['a', 'b', 'c'\], this one \['x', 'y', 'z'\]"):
        train(other, TrainData(T.cls_examples(24), T.cls_examples(8, seed=1), T.PAD), T.config(max_steps=4), tmp_path,
              resume=True)


def test_ctrl_c_while_a_job_scores_after_training_says_what_is_kept(capsys, tmp_path, tiny, monkeypatch):  # noqa: F811
    """Training done, then a Ctrl-C in the final scoring: the line names best/ and the checkpoint, and --resume scores
    them without a step more."""
    folder, _ = tiny
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows())
    argv = quick(folder, tmp_path / "o", "--task", "grpo", "--data", data, "--group-size", "2", "--max-new-tokens", "2",
                 "--reward", "test_bad_input:has_an_e", "--warmup-ratio", "0")
    real = minift.grpo.load_best
    with monkeypatch.context() as patch:
        patch.setattr(minift.grpo, "load_best", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(SystemExit) as exit_:
            minift.cli.main([str(a) for a in argv])
    assert exit_.value.code == 130
    out = capsys.readouterr().out
    assert f"interrupted after training, while scoring: best/ and the checkpoint are saved in {tmp_path / 'o'}" in out
    assert minift.grpo.load_best is real
    minift.cli.main([str(a) for a in argv + ["--resume"]])
    steps = [r for r in map(json.loads, (tmp_path / "o" / "log.jsonl").read_text().splitlines()) if "eval" not in r]
    assert [r["step"] for r in steps] == [1] and json.loads((tmp_path / "o" / "results.json").read_text())["test"]


def has_an_e(prompts, completions, **columns):
    return [float("e" in c) for c in completions]


# ---------------------------------------------------------------------------------------------------------
# minift evaluate

def test_evaluate_checks_every_name_before_scoring(capsys, tmp_path, tiny, monkeypatch):  # noqa: F811
    folder, _ = tiny
    scored = []
    monkeypatch.setattr(minift.evals, "run_suites", lambda *a, **kw: scored.append(a) or {})
    line = cli_error(capsys, ["evaluate", folder, "--compare", tmp_path / "nowhere", "--suite", "arithmetic"])
    assert "nowhere" in line and not scored
    assert "names no suite" in cli_error(capsys, ["evaluate", folder, "--suite", ""])
    assert "no suite 'maths'" in cli_error(capsys, ["evaluate", folder, "--suite", "arithmetic,maths"])
    minift.cli.main(["evaluate", str(folder), "--limit", "1"])  # a language model without --suite: the default suites
    assert "a language model: scoring the suites tweets, arithmetic, flatland" in capsys.readouterr().out
    assert scored and list(scored[-1][2]) == ["tweets", "arithmetic", "flatland"]


def test_evaluate_refuses_suites_for_a_classifier(capsys, tmp_path, tiny):  # noqa: F811
    folder, _ = tiny
    model = load_checkpoint(folder, "classify", num_labels=2, verbose=False)
    minift.checkpoints.save_checkpoint(model, tmp_path / "cls")
    line = cli_error(capsys, ["evaluate", tmp_path / "cls", "--suite", "tweets"])
    assert "is a classifier: --suite and --compare score language models" in line


def test_bigbench_gone_from_pypi_is_one_line(tmp_path, monkeypatch):
    import subprocess

    def pip(*args, **kw):
        return subprocess.CompletedProcess(args, 1, "", "Looking in links: x\nERROR: Could not find a version that "
                                           "satisfies the requirement bigbench==1.0.0 (from versions: 0.0.1)\nERROR: No "
                                           "matching distribution found for bigbench==1.0.0\n")
    monkeypatch.setattr(subprocess, "run", pip)
    with pytest.raises(MiniftError, match=r"PyPI no longer has bigbench==1.0.0 \(pip finds 0.0.1\)") as e:
        minift.evals.pip_download_sdist("bigbench", "1.0.0", tmp_path)
    assert "\n" not in str(e.value) and "Looking in links" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# Public functions given the wrong types

def test_public_functions_name_a_wrong_argument(tiny):  # noqa: F811
    folder, _ = tiny
    for num_labels in (0, -1, 2.5):
        with pytest.raises(MiniftError, match=f"num_labels {num_labels!r}: give the number of classes"):
            load_checkpoint(folder, "classify", num_labels=num_labels, verbose=False)
    with pytest.raises(MiniftError, match="config must be a dict of config.json's settings"):
        minift.checkpoints.build_model(TrainConfig(), "lm")
    with pytest.raises(MiniftError, match="settings must be a minift.TrainConfig, not dict"):
        minift.train(None, TrainData([{"input_ids": [1]}], [], 0), {"lr": 1e-4}, "out")
    with pytest.raises(MiniftError, match="dtype 'float64': give a torch floating-point dtype"):
        load_checkpoint(folder, "lm", dtype="float64")
    model = load_checkpoint(folder, "classify", num_labels=2, verbose=False)
    logits = model(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    with pytest.raises(MiniftError, match="labels are torch.float32: give class or token ids"):
        model.loss(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(MiniftError, match="labels must be a tensor"):
        model.loss(logits, "positive")


def test_more_mistakes_of_a_first_day(capsys, tmp_path, tiny, no_model_loads):  # noqa: F811
    """A GPU that is not there, --json naming a folder, --limit 0: one line each, before any model loads."""
    folder, _ = tiny
    if not torch.cuda.is_available():
        assert "torch sees no CUDA GPU" in cli_error(capsys, quick(folder, tmp_path / "o", "--device", "cuda"))
    assert f"--json {tmp_path} is a folder" in cli_error(capsys, ["evaluate", folder, "--json", tmp_path])
    assert "--limit 0: give the items per suite" in cli_error(capsys, ["evaluate", folder, "--limit", "0"])


def test_an_empty_prompt_and_a_csv_for_instructions_are_one_line(capsys, tmp_path, tiny):  # noqa: F811
    folder, _ = tiny
    assert "the prompt is empty" in cli_error(capsys, ["generate", folder, "  "])
    csv = tmp_path / "cls.csv"
    csv.write_text("text,label\n" + "".join(f"{w} is nice,pos\n" for w in WORDS))
    line = cli_error(capsys, quick(folder, tmp_path / "o", "--task", "instruct", "--data", csv))
    assert "cls.csv is a CSV file; instruction tuning reads JSONL rows" in line


# ---------------------------------------------------------------------------------------------------------
# minift export

def test_export_mistakes_are_one_line_and_leave_nothing(capsys, tmp_path, tiny, monkeypatch):  # noqa: F811
    """An adapter folder, a full disk, and matrices that cannot take the asked type (tiny's rows of 16 values are not
    blocks of 32: they stay f16, and the export says so)."""
    import minift.files
    folder, _ = tiny
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert "holds a LoRA adapter only: export the run's best/" in cli_error(capsys, ["export", adapter, tmp_path / "a.gguf"])

    def full(path, write):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(minift.export, "atomic_write", full)
        line = cli_error(capsys, ["export", folder, tmp_path / "b.gguf", "--type", "q8_0"])
    assert f"could not write {tmp_path / 'b.gguf'} (No space left on device): nothing was left" in line
    assert not (tmp_path / "b.gguf").exists() and minift.files.atomic_write is not full
    minift.cli.main(["export", str(folder), str(tmp_path / "c.gguf"), "--type", "q4_0"])
    out = capsys.readouterr().out
    assert "are not whole blocks of 32: they stay f16, not q4_0" in out and (tmp_path / "c.gguf").is_file()
    lm = load_checkpoint(folder, "lm", verbose=False)
    for bad, says in [("hello", "input_ids must be a tensor of token ids (batch, time), e.g. tok(texts)['input_ids'], "
                       "not str"), (torch.tensor([[1.0, 2.0]]), "not torch.float32 of shape (1, 2)"),
                      (torch.tensor([1, 2]), "of shape (batch, time), not torch.int64 of shape (2,)"),
                      (torch.tensor([[1, 10**6]]), "token ids from 1 to 1000000, but this model's vocabulary has")]:
        with pytest.raises(MiniftError, match=re.escape(says)):
            lm(bad)
