"""Every tutorial runs, top to bottom, in --quick mode, and prints what it teaches.

Each runs as its own process (as a learner would run it: `python tutorials/NN_name.py --quick`) from the
repository root, writing into a temporary runs folder (`--runs`) rather than runs/tutorials. The tutorials
assert their own lessons; here we check the exit code and one line that shows the lesson was reached.
They share one runs folder in file order, so stage 7 finds stage 4's checkpoint (run alone, 07 trains a
quick one itself). Quick mode keeps each to seconds or a few minutes on a 2-core CPU (tutorials/README.md, the quick column).
"""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"

# tutorial -> a line its quick run must print (None: only the exit code is checked)
KEY_LINES = {
    "01_choose_model.py": "paraphrase pair (0, 1)",
    "02_define_task.py": "loss after scrambling the logits at all",
    "03_prepare_data.py": "grouped by length   padding",
    "04_finetune.py": "max relative error ||ours - autograd||",
    "04b_lora.py": "merged vs unmerged logits",
    "05_evaluate.py": "all checks passed",
    "06_tune_hyperparameters.py": "best on validation accuracy",
    "08_data_parallel.py": "two processes reached the weights of one",
    "09_instruction_tuning.py": "the MiniLM classifier (stage 4",
    "10_preference_tuning.py": "DPO gradient, max relative error ||ours - autograd||",
    "11_rl_verifiable_rewards.py": "held-out greedy accuracy on",
    "12_evaluate_and_export.py": "f16 read back by minift: max |logit",
    "13_named_entities.py": "(head drawn at random) ->",
    "14_distillation_and_reward_model.py": "distillation gradient, max relative error ||ours - autograd||",
    "15_translation.py": "after LoRA tuning",
    "16_reasoning.py": "held-out accuracy on",
    "gpt2_instruction_tuning.py": "training answers reproduced exactly after training",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("tutorial-runs")


def run_tutorial(name, runs, *extra):
    path = TUTORIALS / name
    if not path.is_file():
        pytest.skip(f"tutorials/{name} does not exist yet")
    cmd = [sys.executable, str(path), "--quick", *extra]
    if '"--runs"' in path.read_text():  # tutorials that write files take --runs; keep them out of the repo
        cmd += ["--runs", str(runs)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-4000:]
        pytest.fail(f"{' '.join(cmd)} ran past 300 s (--quick should take seconds to a few minutes)\n--- stdout (tail)\n"
                    f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}")
    assert done.returncode == 0, (f"{' '.join(cmd)} exited with {done.returncode}\n--- stdout (tail)\n"
                                  f"{done.stdout[-4000:]}\n--- stderr (tail)\n{done.stderr[-4000:]}")
    return done.stdout


@pytest.mark.parametrize("name", list(KEY_LINES))
def test_tutorial_quick(name, runs):
    out = run_tutorial(name, runs)
    if KEY_LINES[name] is not None:
        assert KEY_LINES[name] in out
        assert "all checks passed" in out


def test_test_and_deploy_looks_at_the_test_set_once(runs):
    first = run_tutorial("07_test_and_deploy.py", runs)
    assert "for the first time" in first
    assert "logits before saving and after reloading identical: True" in first
    assert "all checks passed" in first
    second = run_tutorial("07_test_and_deploy.py", runs)  # no --again: refused, and exit 0 (the lesson)
    assert "refused: the test set in" in second and "already looked at" in second
    assert "all checks passed" not in second
