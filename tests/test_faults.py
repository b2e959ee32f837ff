"""Issue 17: faults and bad inputs. Nothing lost, nothing silently wrong, no traceback on the command line.

Part 1 interrupts a real training process (a child in its own session, so that os.killpg(SIGINT) is a real
Ctrl-C even when the test runner sits in a background shell that ignores SIGINT) at named moments: during a
step, during a save, during a mid-run and the final evaluation, right after an earlier run was moved aside,
with SIGTERM and with SIGKILL. Each run is then resumed and compared BITWISE with an uninterrupted run:
weights, AdamW state (with the RNG states), best/ model, the loop state and log.jsonl.

To land a signal at an exact moment, the child wraps a function (evaluate, train_step, a save) so that it
prints a marker and waits; the parent reads the marker, sends the signal, then creates a "sent" file that
ends the wait. A held signal (during a step or a save) therefore arrives while the work is really under way.

Part 2 runs the bad inputs through `minift.cli.main` on a tiny random-init checkpoint (16 wide, MiniLM's
tokenizer.json) and asserts exit status 2, one `minift: error:` line and no traceback.
Torch runs on one thread (see tests/test_train.py: bitwise equality between processes needs it).
"""
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import PAD, _one_thread, cls_examples, make_model  # noqa: F401  (_one_thread: autouse, one torch thread)

from minift.batching import TrainData
from minift.config import TrainConfig
from minift.errors import MiniftError

TM = importlib.import_module("minift.train")
STEP = importlib.import_module("minift.step")
RESUME = importlib.import_module("minift.resume")
OUTPUTS = importlib.import_module("minift.outputs")
OBJECTIVE = importlib.import_module("minift.objective")
HERE = Path(__file__).resolve().parent
CLOCK_FIELDS = ("tokens_per_s", "seconds", "eval_seconds")  # the log's wall-clock fields: the rest repeats exactly



# ---------------------------------------------------------------------------------------------------------
# The run that every fault test interrupts: 24 examples in batches of 4 = 6 steps an epoch, 2 epochs = 12
# steps, an evaluation every 3 steps (4 of them, the last at step 12), patience 2, the checkpoint's dropout
# (0.1, so the torch RNG must be restored exactly), warmup then linear decay.

def fault_config(**kw):
    return TrainConfig(**{**dict(epochs=2, batch_size=4, lr=1e-2, log_every=1, eval_every=3, patience=2,
                                 warmup_ratio=0.2, precision="fp32", device="cpu"), **kw})


def fault_run(out, resume=False, **kw):
    model = make_model()
    return TM.train(model, TrainData(cls_examples(24), cls_examples(8, seed=1), PAD), fault_config(**kw), out,
                    resume=resume)


def wait_for_parent(out, marker):
    """(In the child.) Say where we are, then wait until the parent has sent its signal."""
    print(marker, flush=True)
    sent = Path(out) / ".sent"
    for _ in range(3000):
        if sent.exists():
            return
        time.sleep(0.01)
    raise RuntimeError("the parent never signalled")


def child_run(out, moment, at):
    """(In a child process.) fault_run(out), paused at the `at`-th call of `moment` until the parent signals."""
    calls = {"n": 0}

    def hit():
        calls["n"] += 1
        return calls["n"] == at

    if moment == "step":  # inside the step: after forward/backward/update, before it is counted
        real = TM.train_step

        def train_step(*args, **kw):
            result = real(*args, **kw)
            if hit():
                wait_for_parent(out, "in-step")
            return result
        TM.train_step = train_step
    elif moment == "save":  # halfway through writing the checkpoint's optimizer state
        real = RESUME.save_file

        def save_file(*args, **kw):
            if hit():
                wait_for_parent(out, "in-save")
            return real(*args, **kw)
        RESUME.save_file = save_file
    elif moment == "eval":  # during a validation pass
        real = OBJECTIVE.evaluate

        def evaluate(*args, **kw):
            if hit():
                wait_for_parent(out, "in-eval")
            return real(*args, **kw)
        OBJECTIVE.evaluate = evaluate
    elif moment == "best":  # while the best model so far is written to best/ (outputs.export_best)
        real = OUTPUTS.save_checkpoint

        def save_checkpoint(*args, **kw):
            if hit():
                wait_for_parent(out, "in-best")
            return real(*args, **kw)
        OUTPUTS.save_checkpoint = save_checkpoint
    elif moment == "earlier":  # the earlier run has just been moved aside; the new one has saved nothing yet
        real = TM.move_earlier_run_aside

        def move(folder):
            real(folder)
            wait_for_parent(out, "moved-aside")
        TM.move_earlier_run_aside = move
    try:
        fault_run(out)
    except KeyboardInterrupt:
        sys.exit(130)


def child_cmd(code, *args):
    # A process started from a background shell inherits SIGINT ignored (and Python keeps it so): give the child
    # what a terminal's Ctrl-C meets, Python's own KeyboardInterrupt handler
    prelude = (f"import signal, sys, torch; signal.signal(signal.SIGINT, signal.default_int_handler); "
               f"torch.set_num_threads(1); sys.path.insert(0, {str(HERE)!r}); import test_faults as F\n")
    return [sys.executable, "-c", prelude + code, *map(str, args)]


def interrupt(out, moment, at, sig, group=True):
    """Start child_run in a new session, send `sig` when it reaches the moment; return its exit status."""
    out.mkdir(parents=True, exist_ok=True)
    (out / ".sent").unlink(missing_ok=True)
    proc = subprocess.Popen(child_cmd("F.child_run(sys.argv[1], sys.argv[2], int(sys.argv[3]))", out, moment, at),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith(("in-", "moved-aside")):
                break
        else:
            proc.wait(timeout=60)
            raise AssertionError(f"the child never reached {moment}: {proc.stderr.read()[-3000:]}")
        if group:
            os.killpg(proc.pid, sig)  # what Ctrl-C in a terminal does: the whole process group gets it
        else:
            os.kill(proc.pid, sig)  # what `kill`, `timeout` and schedulers do
        (out / ".sent").touch()
        proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    (out / ".sent").unlink(missing_ok=True)
    return proc.returncode


def full_log(out):
    """Every record of log.jsonl, steps and evaluations, without the wall-clock fields (allowed to vary)."""
    records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in CLOCK_FIELDS} for r in records]


def outcome(out):
    """What a finished run leaves: tensors of the checkpoint, its optimizer state, best/, the loop state, the log."""
    out = Path(out)
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["state"]
    state.pop("log_bytes")  # the log's length includes the throughput digits
    return {"weights": load_file(str(out / "checkpoint" / "model.safetensors")),
            "optimizer": load_file(str(out / "checkpoint" / "optimizer.safetensors")),
            "best": load_file(str(out / "best" / "model.safetensors")),
            "state": state, "log": full_log(out)}


def assert_same_outcome(a, b):
    for part in ("weights", "optimizer", "best"):
        assert a[part].keys() == b[part].keys(), part
        different = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not different, f"{part}: {len(different)} tensors differ, first {different[0]}"
    assert a["state"] == b["state"]
    assert a["log"] == b["log"]


def stop_on_call(monkeypatch, module, name, at):
    """Replace module.name by itself raising KeyboardInterrupt on its `at`-th call (a Ctrl-C at that moment)."""
    real, calls = getattr(module, name), []

    def stopping(*args, **kw):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(module, name, stopping)


_straight = {}


def straight(tmp_path_factory):
    """The uninterrupted run, once per session."""
    if "out" not in _straight:
        out = tmp_path_factory.mktemp("straight")
        result = fault_run(out)
        _straight.update(out=out, result=result, outcome=outcome(out))
    return _straight


def resume_to_end(out):
    result = fault_run(out, resume=True)
    return result, outcome(out)


def test_the_straight_run_evaluates_and_moves(tmp_path_factory):
    s = straight(tmp_path_factory)
    evals = [r for r in s["outcome"]["log"] if "eval" in r]
    assert [r["step"] for r in evals] == [3, 6, 9, 12]
    assert s["result"]["steps"] == 12
    losses = [r["loss"] for r in s["outcome"]["log"] if "loss" in r]
    assert len(set(losses)) == 12  # the steps really differ: a comparison of equal runs could not fail


@pytest.mark.parametrize("moment, at, sig, group", [
    ("step", 5, signal.SIGINT, True),  # Ctrl-C inside step 5: the step finishes, is saved, and counts
    ("step", 5, signal.SIGTERM, False),  # `kill`: saved like Ctrl-C
    ("save", 2, signal.SIGINT, True),  # Ctrl-C while the step-6 checkpoint is written: the save finishes
    ("eval", 2, signal.SIGINT, True),  # Ctrl-C during the mid-run evaluation at step 6
    ("eval", 4, signal.SIGINT, True),  # Ctrl-C during the final evaluation (step 12)
    # Ctrl-C while best/ is written after the step-6 evaluation (the best): held until best/, the state and
    # the log record are all written, so the resumed run neither redoes nor loses that evaluation
    ("best", 2, signal.SIGINT, True),
    ("step", 8, signal.SIGKILL, True),  # no chance to save: resume from the step-6 checkpoint and its log
    ("save", 3, signal.SIGKILL, True),  # killed mid-save: the previous checkpoint is whole
])
def test_interrupted_run_resumes_to_the_straight_result(tmp_path, tmp_path_factory, moment, at, sig, group):
    reference = straight(tmp_path_factory)["outcome"]
    code = interrupt(tmp_path, moment, at, sig, group)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        # the log is as durable as the checkpoint it describes: exactly the records up to the checkpoint
        saved = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["state"]
        data = (tmp_path / "log.jsonl").read_bytes()
        assert len(data) >= saved["log_bytes"] > 0
        durable = [json.loads(line) for line in data[:saved["log_bytes"]].decode().splitlines()]
        durable = [{k: v for k, v in r.items() if k not in CLOCK_FIELDS} for r in durable]
        assert durable == [r for r in reference["log"] if r["step"] <= saved["step"]]
    else:
        assert code == 130, code
        saved = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["state"]
        if moment == "step":
            assert saved["step"] == 5
        if moment == "eval":
            assert saved["eval_due"] and saved["step"] == 3 * at
    result, got = resume_to_end(tmp_path)
    assert result["steps"] == 12
    assert_same_outcome(got, reference)


def test_sigkill_several_times_in_a_row_keeps_the_log(tmp_path, tmp_path_factory):
    reference = straight(tmp_path_factory)["outcome"]
    # killed in step 5 (checkpoint 3), resumed and killed in its 4th step (step 7: checkpoint 6), again (step 10:
    # checkpoint 9), then resumed to the end
    assert interrupt(tmp_path, "step", 5, signal.SIGKILL) == -signal.SIGKILL
    for at, saved_step in ((4, 6), (4, 9)):
        proc = subprocess.Popen(child_cmd("F.child_resume(sys.argv[1], int(sys.argv[2]))", tmp_path, at),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        for line in proc.stdout:
            if line.startswith("in-step"):
                break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["state"]
        assert state["step"] == saved_step
    _, got = resume_to_end(tmp_path)
    assert_same_outcome(got, reference)


def child_resume(out, at):
    """(In a child.) Resume, and pause inside the `at`-th step of this process."""
    calls = {"n": 0}
    real = TM.train_step

    def train_step(*args, **kw):
        result = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] == at:
            wait_for_parent(out, "in-step")
        return result
    TM.train_step = train_step
    fault_run(out, resume=True)


def test_ctrl_c_after_an_earlier_run_was_moved_aside_loses_nothing(tmp_path, tmp_path_factory):
    reference = straight(tmp_path_factory)["outcome"]
    fault_run(tmp_path, max_steps=4)  # the earlier run: 4 steps, checkpoint, best, log
    before = {name: (tmp_path / name).read_bytes() if (tmp_path / name).is_file() else
              {f.name: f.read_bytes() for f in (tmp_path / name).iterdir()}
              for name in ("checkpoint", "best", "log.jsonl")}
    code = interrupt(tmp_path, "earlier", 1, signal.SIGINT)
    assert code == 130

    def assert_earlier_run_in_previous_1():
        for name, content in before.items():
            moved = tmp_path / "previous-1" / name
            got = moved.read_bytes() if moved.is_file() else {f.name: f.read_bytes() for f in moved.iterdir()}
            assert got == content, name

    # the earlier run is whole in previous-1/, and nothing of the new run pretends to be it
    assert_earlier_run_in_previous_1()
    assert not (tmp_path / "checkpoint").exists()
    with pytest.raises(MiniftError, match="nothing to resume"):
        fault_run(tmp_path, resume=True)
    # the same command again (not --resume) now runs to exactly the straight result; the interrupted run left
    # no files of its own, so nothing more is moved aside: previous-1/ still holds the earlier run, untouched
    fault_run(tmp_path)
    assert_same_outcome(outcome(tmp_path), reference)
    assert_earlier_run_in_previous_1()
    assert not (tmp_path / "previous-2").exists()


# ---------------------------------------------------------------------------------------------------------
# Part 2: bad inputs through the `minift` command: exit status 2, one line `minift: error: ...`, no traceback

from minift import cli  # noqa: E402
from minift.checkpoints import build_model, save_checkpoint  # noqa: E402

TINY = dict(model_type="bert", vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=64)
WORDS = {"pos": ["great", "lovely", "happy", "good", "fine"], "neg": ["awful", "sad", "bad", "terrible", "ugly"],
         "neu": ["table", "chair", "monday", "paper", "window"]}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_dir):
    """A random-init 16-wide BERT encoder (no classification head: "never fine-tuned") with MiniLM's
    tokenizer, and a 3-class CSV of 90 rows."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = build_model(TINY, task="encode")
    model.tokenizer_file = minilm_dir / "tokenizer.json"  # copied into the saved folder
    save_checkpoint(model, root / "model")
    lines = ["text,label"]
    for i in range(30):
        for label, words in WORDS.items():
            lines.append(f"{words[i % 5]} day number {i} {words[(i * 3) % 5]},{label}")
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return root


def quick(tiny, out, *extra):
    return ["finetune", "--model", str(tiny / "model"), "--data", str(tiny / "data.csv"), "--out", str(out),
            "--max-length", "16", "--batch-size", "8", "--max-steps", "3", "--eval-every", "3", "--lr", "1e-2",
            "--precision", "fp32", "--device", "cpu",
            "--freeze", "", "--dropout", "0.1", *extra]  # TrainConfig's generic recipe, not the main job's


def minift(argv):
    cli.main([str(a) for a in argv])


def cli_error(capsys, argv):
    """Run `minift argv`; assert exit status 2 and exactly one error line; return that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("minift: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("flag, value, says", [
    ("--batch-size", "0", "batch_size"), ("--grad-accum", "0", "grad_accum"), ("--log-every", "0", "log_every"),
    ("--seed", "-1", "seed"), ("--epochs", "nan", "epochs"), ("--epochs", "inf", "epochs"),
    ("--device", "tpu", "device"), ("--max-grad-norm", "-1", "gradient ascent"), ("--lr", "0", "trains nothing"),
    ("--batch-size", "8.5", "whole number"), ("--lr", "fast", "a number"), ("--group-by-length", "maybe", "true or false"),
    ("--precision", "fp16", "precision"), ("--warmup-ratio", "2", "warmup_ratio"),
])
def test_bad_setting_on_the_command_line(capsys, tmp_path, tiny, flag, value, says):
    line = cli_error(capsys, quick(tiny, tmp_path / "out", flag, value))
    assert says in line, line
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("toml, says", [('lr = "fast"', "lr = 'fast' is str"), ('epochs = "1"', "epochs = '1' is str"),
                                        ("batch_size = 8.5", "batch_size = 8.5 is float"),
                                        ("max_grad_norm = -1.0", "max_grad_norm"), ("lr = [", "cannot read")])
def test_bad_setting_in_the_toml_file(capsys, tmp_path, tiny, toml, says):
    (tmp_path / "s.toml").write_text(toml + "\n")
    argv = quick(tiny, tmp_path / "out", "--config", tmp_path / "s.toml")
    for flag in ("--lr", "--batch-size"):  # flags win over the file: leave these to it
        del argv[argv.index(flag):argv.index(flag) + 2]
    line = cli_error(capsys, argv)
    assert says in line, line


@pytest.mark.parametrize("text", ["5", "null", "true"])
def test_jsonl_text_that_is_not_a_string(capsys, tmp_path, tiny, text):
    rows = [json.dumps({"text": f"row {i}", "label": i % 2}) for i in range(20)]
    rows[3] = '{"text": %s, "label": 1}' % text
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    argv = quick(tiny, tmp_path / "out")
    argv[argv.index("--data") + 1] = str(tmp_path / "d.jsonl")
    line = cli_error(capsys, argv)
    assert "d.jsonl:4" in line, line


def test_texts_longer_than_the_models_positions_stop_before_the_first_step(capsys, tmp_path, tiny):
    """The tiny BERT has 64 positions; --max-length 128 lets one long text through. The run must stop in set-up
    (its memory estimate runs the longest batch), in one line, before a step or a checkpoint exists."""
    lines = (tiny / "data.csv").read_text().splitlines()
    lines[40] = " ".join(["word"] * 100) + ",pos"
    (tmp_path / "long.csv").write_text("\n".join(lines) + "\n")
    argv = quick(tiny, tmp_path / "out")
    argv[argv.index("--data") + 1] = str(tmp_path / "long.csv")
    argv[argv.index("--max-length") + 1] = "128"
    line = cli_error(capsys, argv)
    assert "longer than the model's" in line and "64" in line, line
    assert not (tmp_path / "out" / "checkpoint").exists() and not (tmp_path / "out" / "log.jsonl").exists()


def broken_checkpoint(tiny, tmp_path, config=None, index=None):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((tiny / "model" / "tokenizer.json").read_bytes())
    (folder / "config.json").write_text(config if config is not None else (tiny / "model" / "config.json").read_text())
    if index is None:
        (folder / "model.safetensors").write_bytes((tiny / "model" / "model.safetensors").read_bytes())
    else:
        (folder / "model.safetensors.index.json").write_text(index)
    return folder


@pytest.mark.parametrize("config", ["[1, 2]", "null", "{"])
def test_config_json_that_is_not_an_object(capsys, tmp_path, tiny, config):
    folder = broken_checkpoint(tiny, tmp_path, config=config)
    for argv in (["info", folder], ["predict", folder, "hello"], quick(tiny, tmp_path / "out", "--model", folder)):
        assert "config.json" in cli_error(capsys, argv)


@pytest.mark.parametrize("index", ["{", "[]", '{"weight_map": 3}', '{"weight_map": {"a": 7}}', '{"metadata": {}}',
                                   '{"weight_map": {"a": "missing.safetensors"}}'])
def test_malformed_safetensors_index(capsys, tmp_path, tiny, index):
    folder = broken_checkpoint(tiny, tmp_path, index=index)
    line = cli_error(capsys, ["predict", folder, "hello"])
    assert "model.safetensors.index.json" in line or "missing.safetensors" in line, line


def test_truncated_optimizer_state_on_resume(capsys, tmp_path, tiny):
    cli.main(quick(tiny, tmp_path / "out"))
    opt = tmp_path / "out" / "checkpoint" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    line = cli_error(capsys, quick(tiny, tmp_path / "out", "--resume"))
    assert "checkpoint" in line and "damaged" in line and "without --resume" in line, line


def test_output_folder_that_is_a_file(capsys, tmp_path, tiny):
    (tmp_path / "out").write_text("not a folder")
    line = cli_error(capsys, quick(tiny, tmp_path / "out"))
    assert str(tmp_path / "out") in line and "--out" in line, line


def test_output_folder_that_cannot_be_written(capsys, tmp_path, tiny, monkeypatch):
    # root ignores permission bits (chmod 0o500 would not stop it), so the refusal of the OS is simulated
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kw):
        if str(self).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    line = cli_error(capsys, quick(tiny, tmp_path / "ro" / "out"))
    assert "Permission denied" in line and "--out" in line, line


def test_full_disk_keeps_the_previous_checkpoint(capsys, tmp_path, monkeypatch):
    """A disk that fills up during the second save: one line that says the step-2 checkpoint is intact, and a
    resume from it later (disk freed) ends exactly where an uninterrupted run ends."""
    import errno

    real_save_file, saves = RESUME.save_file, {"n": 0}

    def save_file(*args, **kw):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(*args, **kw)

    monkeypatch.setattr(RESUME, "save_file", save_file)
    with pytest.raises(MiniftError) as err:
        fault_run(tmp_path / "full", save_every=2, max_steps=6)
    message = str(err.value)
    assert "\n" not in message and "No space left on device" in message and "intact" in message, message
    state = json.loads((tmp_path / "full" / "checkpoint" / "trainer_state.json").read_text())["state"]
    assert state["step"] == 2
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["best", "checkpoint", "log.jsonl"]  # no .new
    monkeypatch.undo()
    fault_run(tmp_path / "full", save_every=2, max_steps=6, resume=True)
    fault_run(tmp_path / "ref", save_every=2, max_steps=6)
    a, b = outcome(tmp_path / "full"), outcome(tmp_path / "ref")
    assert_same_outcome(a, b)


def test_one_invalid_value_fails_its_trial_not_the_sweep(capsys, tmp_path, tiny):
    capsys.readouterr()
    minift(["sweep", "--model", tiny / "model", "--data", tiny / "data.csv", "--out", tmp_path / "sweep",
              "--max-length", "16", "--limit", "40", "--batch-size", "8", "--max-steps", "2", "--precision", "fp32",
              "--device", "cpu", "--lr", "1e-2,-1"])
    records = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "failed"]
    assert "lr = -1.0 is out of range" in records[1]["error"]
    assert 0 <= records[0]["val_accuracy"] <= 1


def test_same_command_same_seed_same_result(capsys, tmp_path, tiny):
    # the new classification head is drawn after the seed is set: two runs are one run
    for name in ("a", "b", "c"):
        cli.main(quick(tiny, tmp_path / name, "--seed", "1" if name != "c" else "2"))
    a, b, c = (load_file(str(tmp_path / n / "best" / "model.safetensors")) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])  # the control: the seed matters
    ra, rb = (json.loads((tmp_path / n / "results.json").read_text()) for n in "ab")
    assert ra["validation"] == rb["validation"] and ra["test"] == rb["test"]


def test_fp32_report_reuses_the_best_evaluation(tmp_path, tiny, monkeypatch):
    """The report's validation metrics are the ones measured when the best model was chosen (no second pass
    over validation): the same numbers as the log's evaluation at best_step, and what evaluating the saved
    best/ model gives."""
    import minift.classify
    from minift.checkpoints import load_checkpoint
    from minift.corpora import load_classification_splits
    from minift.evaluate import evaluate
    from minift.tasks import encode_classification
    from minift.tokenizer import Tokenizer

    passes, real = [], minift.classify.evaluate_like_training
    monkeypatch.setattr(minift.classify, "evaluate_like_training", lambda *a, **kw: passes.append(1) or real(*a, **kw))
    cli.main(quick(tiny, tmp_path / "out", "--max-steps", "6", "--eval-every", "2"))
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(passes) == 1  # the test split only
    assert report["best_step"] in (2, 4, 6) and "best_metrics" not in report
    logged = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    at_best = next(r["eval"] for r in logged if "eval" in r and r["step"] == report["best_step"])
    assert at_best == {k: v for k, v in report["validation"].items() if isinstance(v, (int, float))}
    splits, names = load_classification_splits(tiny / "data.csv")
    tok = Tokenizer.from_file(tiny / "model")
    again = evaluate(load_checkpoint(tmp_path / "out" / "best", "classify", verbose=False),
                     encode_classification(splits["validation"], tok, names, 16), tok.pad_id, label_names=names)
    assert report["validation"]["confusion"] == again["confusion"]
    assert report["validation"]["accuracy"] == again["accuracy"]
    assert report["validation"]["loss"] == pytest.approx(again["loss"], rel=1e-5)


def test_evaluate_maps_a_label_subset_by_name(capsys, tmp_path, tiny):
    from minift.checkpoints import load_checkpoint
    from minift.classify import predict
    from minift.tokenizer import Tokenizer

    cli.main(quick(tiny, tmp_path / "out", "--max-steps", "6"))
    best = tmp_path / "out" / "best"
    rows = [(f"{w} day number {i} {w}", label) for i in range(7) for label, words in WORDS.items()
            if label in ("neu", "pos") for w in [words[i % 5]]]
    (tmp_path / "sub").mkdir()
    for split in ("train", "validation", "test"):
        (tmp_path / "sub" / f"{split}.jsonl").write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows))
    capsys.readouterr()
    minift(["evaluate", best, "--data", tmp_path / "sub", "--max-length", "16"])
    out = capsys.readouterr().out
    # the expected accuracy, from the model's own answers mapped by name
    model = load_checkpoint(best, "classify", verbose=False)
    names = [model.hf_config["id2label"][str(i)] for i in range(3)]
    assert model.label_names == names and model.max_length == 16  # what predict names and cuts by
    answers = predict(model, Tokenizer.from_file(best), [t for t, _ in rows], max_length=16)
    right = sum(a == y for (a, _), (_, y) in zip(answers, rows))
    assert 0 < right, "the control: this model gets some of them right, so 0.0 would be wrong"
    assert f"accuracy {right / len(rows):.4f}" in out or f"accuracy: {right / len(rows):.4f}" in out, out


def test_predict_with_an_untrained_head_warns(capsys, tiny):
    capsys.readouterr()
    minift(["predict", tiny / "model", "what a great day"])
    err = capsys.readouterr().err
    assert "warning" in err and "no trained classification head" in err and "Traceback" not in err


def test_adamw_of_model_parameters_is_one_line():
    from minift.optim import AdamW

    with pytest.raises(MiniftError) as err:
        AdamW(make_model().parameters())
    assert "param_groups" in str(err.value) and "\n" not in str(err.value)


def test_labels_as_a_python_list():
    model = make_model().eval()
    logits = torch.randn(3, 3)
    with torch.no_grad():
        a, _ = model.loss(logits, [0, 2, 1])
        b, _ = model.loss(logits, torch.tensor([0, 2, 1]))
    assert a == b and a > 0
