"""The training loop (minift/train.py) with real numbers: accumulation, exact resume, crash safety, the
non-finite guard, Ctrl-C, dropout, seeding, the lr plan, bf16, the autograd mode and early stopping.

Every model here is a tiny random-init BERT classifier or GPT-2 LM (16 wide, 2 layers) on a few dozen
synthetic examples, so a whole train() takes about 0.1 s. Torch runs on one thread in this module: on a
2-core machine shared with other jobs, two threads make these tiny ops 3-20x slower (they spin on each
other), and one thread also keeps CPU results bitwise reproducible between this process and the child
processes that the resume and crash tests start.
"""
import dataclasses
import importlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from minift.batching import TrainData, collate
from minift.checkpoints import build_model
from minift.config import TrainConfig
from minift.errors import MiniftError
from minift.evaluate import evaluate
from minift.layers import Dropout
from minift.optim import AdamW, LRSchedule, param_groups, warmup_steps_for
from minift.resume import LoopState, load_training_state, save_training_state
from minift.objective import forward_backward
from minift.train import seed_everything, set_dropout, train

# `minift.train` is the train() function (minift/__init__.py re-exports it under the module's name), so
# monkeypatching the loop's globals needs the module object itself:
TM = importlib.import_module("minift.train")
STEP = importlib.import_module("minift.step")
OBJECTIVE = importlib.import_module("minift.objective")

PAD = 0
VOCAB = 64
CONFIGS = {
    "bert": dict(model_type="bert", vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32, max_position_embeddings=64),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=2, n_head=2),
}
HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# Helpers (the child processes import this module and use them too, so both sides build the same things)

def make_model(kind="bert", seed=0, dtype=None):
    torch.manual_seed(seed)
    model = build_model(CONFIGS[kind], task="classify" if kind == "bert" else "lm", num_labels=3)
    return model.to(dtype) if dtype is not None else model


def cls_examples(n, seed=0):
    """Ragged token sequences (3-12 tokens); the class is the first token mod 3, so there is something to learn."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [r.randrange(1, VOCAB) for _ in range(r.randint(3, 12))]
        out.append({"input_ids": ids, "label": ids[0] % 3})
    return out


def lm_examples(n, seed=0):
    """Instruction-style rows: a prompt of 1..L-2 tokens labelled -100, then supervised tokens (ragged counts)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        length = r.randint(4, 14)
        ids = [r.randrange(1, VOCAB) for _ in range(length)]
        prompt = r.randint(1, length - 2)
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def examples(kind, n, seed=0):
    return cls_examples(n, seed) if kind == "bert" else lm_examples(n, seed)


def config(kind="bert", **kw):
    """A TrainConfig for the tiny runs: batches of 4, logging every step, an lr that moves a 16-wide model."""
    base = dict(batch_size=4, lr=1e-2, log_every=1, metric="loss" if kind == "gpt2" else "accuracy", precision="fp32")
    return TrainConfig(**{**base, **kw})


def run(cfg, out, kind="bert", n=24, model=None, val=None, resume=False):
    """train() on `n` synthetic examples; returns (model, the per-step records of log.jsonl)."""
    model = make_model(kind) if model is None else model
    train(model, TrainData(examples(kind, n), val or [], PAD), cfg, out, resume=resume)
    return model, steps_logged(out)


def steps_logged(out):
    """The step records of log.jsonl, without the wall-clock throughput (the only field allowed to vary)."""
    records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records if "loss" in r]


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def trainer_state(folder):
    return json.loads((Path(folder) / "trainer_state.json").read_text())


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


def child(code, *args, timeout=120):
    """Run `code` in a fresh Python process, with this module imported as T (same helpers, same data)."""
    prelude = (f"import sys, torch; torch.set_num_threads(1); sys.path.insert(0, {str(HERE)!r}); "
               f"import test_train as T\n")
    return [sys.executable, "-c", prelude + code, *map(str, args)]


# ---------------------------------------------------------------------------------------------------------
# 1. Gradient accumulation: the loss of every micro-batch is divided by the targets of the whole step

def step_gradients(kind, n_micro, per_micro_mean=False):
    """One optimizer step's gradient over the same 8 examples cut into n_micro micro-batches, as train() does."""
    model = make_model(kind, dtype=torch.float64).train()
    set_dropout(model, 0.0)
    rows = examples(kind, 8)
    size = 8 // n_micro
    pieces = [collate(rows[i:i + size], PAD) for i in range(0, 8, size)]
    num_targets = sum(model.count_targets(b["labels"]) for b in pieces)
    loss = sum(forward_backward(model, b, None if per_micro_mean else num_targets) for b in pieces)
    widths = [b["input_ids"].shape[1] for b in pieces]
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}, widths


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_grad_accumulation_8x1_equals_4x2_equals_2x4(kind):
    loss1, g1, (width,) = step_gradients(kind, 1)
    for n_micro in (2, 4):
        loss, g, widths = step_gradients(kind, n_micro)
        assert min(widths) < width  # ragged: the micro-batches are padded to other widths than the full batch
        assert loss == pytest.approx(loss1, rel=1e-12)
        # atol 1e-15: the key biases' gradient is exactly 0 in exact arithmetic (a softmax ignores a shift
        # shared by a whole row of scores) and ~1e-22 of rounding noise here; every other gradient is > 1e-4
        bad = [n for n in g1 if not torch.allclose(g[n], g1[n], rtol=1e-10, atol=1e-15)]
        assert not bad, f"{kind} {n_micro} micro-batches: gradients differ in {bad}"
    # the control: dividing each micro-batch by its own count (the classic bug) gives another gradient
    _, wrong, _ = step_gradients(kind, 4, per_micro_mean=True)
    assert max(((wrong[n] - g1[n]).abs().max() / g1[n].abs().max()).item() for n in g1 if g1[n].abs().max() > 0) > 0.5


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_train_with_grad_accum_4_matches_one_batch(kind, tmp_path):
    # 20 examples in batches of 8: the last batch has 4, so with grad_accum=4 it is 4 micro-batches of 1
    cfg = dict(batch_size=8, dropout=0.0, max_steps=4, lr=1e-2)
    one, r1 = run(config(kind, **cfg), tmp_path / "a", kind, n=20)
    four, r4 = run(config(kind, grad_accum=4, **cfg), tmp_path / "b", kind, n=20)
    # fp32: the micro-batches are padded to their own widths, so matmuls add in another order (rounding
    # ~1e-7 relative); 4 AdamW steps of lr 1e-2 carry that to ~1e-6 in the weights (measured 1e-6 at most).
    # 1e-5 leaves 10x margin and is still 1000x below the lr: a wrong normalisation moves weights by ~lr.
    for (name, a), b in zip(one.named_parameters(), four.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name
    assert len(r1) == len(r4) == 4
    for a, b in zip(r1, r4):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        # the norm is logged before clipping: per-micro-batch means would make it ~4x larger
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# 2. Exact resume: 2N steps straight == N steps, a fresh process, N more (bitwise on CPU)

# 22 examples in batches of 4: 6 batches per epoch (the last of 2). N = 4 stops mid-epoch (batch 4 of 6)
# and the second half crosses into epoch 1 (a new shuffle). Dropout stays at the checkpoint's 0.1, so the
# torch RNG must be restored exactly. The plan is a constant lr: max_steps also sets the plan's length,
# so with a decaying lr the N-step run would (by design) follow a different plan than the 2N-step one;
# a decaying plan with warmup is resumed in the Ctrl-C tests below.
RESUME_N = 4
RESUME_EXAMPLES = 22


def resume_config(max_steps, save_every=0):
    return config(max_steps=max_steps, save_every=save_every, schedule="constant", warmup_ratio=0.0, eval_every=3)


def resume_run(out, max_steps, save_every=0, resume=False):
    val = cls_examples(8, seed=1)
    return run(resume_config(max_steps, save_every), out, n=RESUME_EXAMPLES, val=val, resume=resume)


def test_resume_in_a_fresh_process_is_bitwise_exact(tmp_path):
    n = RESUME_N
    resume_run(tmp_path / "straight", 2 * n)
    resume_run(tmp_path / "split", n, save_every=n)
    saved = trainer_state(tmp_path / "split" / "checkpoint")["state"]
    assert (saved["step"], saved["epoch"], saved["batch"]) == (n, 0, n)  # mid-epoch: batch 4 of 6
    proc = subprocess.run(child("T.resume_run(sys.argv[1], 2 * T.RESUME_N, resume=True)", tmp_path / "split"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {tmp_path / 'split' / 'checkpoint'} at step {n}" in proc.stdout
    straight, split = tmp_path / "straight" / "checkpoint", tmp_path / "split" / "checkpoint"
    assert_bitwise_equal(weights(straight), weights(split))
    opt_a, opt_b = (load_file(str(f / "optimizer.safetensors")) for f in (straight, split))
    assert_bitwise_equal(opt_a, opt_b)  # AdamW m and v, and the RNG states to continue from
    # the data position; "best" and its patience count differ by design: the N-step run also evaluated at
    # its own last step
    position = [{k: trainer_state(f)["state"][k] for k in ("step", "epoch", "batch")} for f in (straight, split)]
    assert position[0] == position[1] == {"step": 2 * n, "epoch": 1, "batch": 2}
    a, b = steps_logged(tmp_path / "straight"), steps_logged(tmp_path / "split")
    assert [r["step"] for r in b] == list(range(1, 2 * n + 1))
    assert a[n:] == b[n:]  # steps N+1..2N: loss, lr, grad norm and epoch, exactly
    assert len({r["loss"] for r in a}) == 2 * n  # and the losses are not trivially equal


# ---------------------------------------------------------------------------------------------------------
# 3. Crash safety: SIGKILL while a checkpoint is written leaves the previous one loadable



def first_then_second_save(folder, crash):
    """(In a child.) Save a checkpoint at step 1, change every weight, then start saving step 2 and die
    either halfway through writing model.safetensors ("torn") or between the two renames of the swap."""
    import pathlib
    import time

    import safetensors.torch as st

    checkpoints = importlib.import_module("minift.checkpoints")
    folder = Path(folder)
    model = make_model()
    optimizer = AdamW(param_groups(model, 0.01))
    save_training_state(folder, model, optimizer, LoopState(step=1), TrainConfig(), None, None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if crash == "torn":
        def slow_save_file(tensors, path, metadata=None):
            data = st.save(tensors, metadata)
            with open(path, "wb") as f:  # the first half, on disk, then the writer stalls
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            print("mid-write", flush=True)
            time.sleep(60)

        checkpoints.save_file = slow_save_file
    else:
        rename = pathlib.Path.rename

        def rename_then_die(self, target):
            result = rename(self, target)
            if str(target).endswith(".old"):  # the old checkpoint moved aside, the new one not yet in place
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        pathlib.Path.rename = rename_then_die
    save_training_state(folder, model, optimizer, LoopState(step=2), TrainConfig(), None, None)


@pytest.mark.parametrize("crash", ["torn", "between_renames"])
def test_sigkill_during_checkpoint_save_leaves_previous_checkpoint(tmp_path, crash):
    folder = tmp_path / "checkpoint"
    proc = subprocess.Popen(child("T.first_then_second_save(sys.argv[1], sys.argv[2])", folder, crash),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if crash == "torn":
            assert proc.stdout.readline().strip() == "mid-write", proc.stderr.read()[-3000:]
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    if crash == "torn":  # the kill really landed mid-write: a half file sits in the new folder
        torn = tmp_path / "checkpoint.new" / "model.safetensors.tmp"
        assert torn.is_file() and torn.stat().st_size > 0
        assert folder.is_dir()
    else:
        assert not folder.exists() and (tmp_path / "checkpoint.old").is_dir()
    model = make_model(seed=123)
    optimizer = AdamW(param_groups(model, 0.01))
    state = load_training_state(folder, model, optimizer)
    assert state.step == 1
    first = make_model()  # the weights of the first save (the child built the same model, seed 0)
    assert_bitwise_equal(params_of(model), params_of(first))
    # the next save after a crash puts things straight: one checkpoint, no .new/.old left behind
    save_training_state(folder, model, optimizer, LoopState(step=5), TrainConfig(), None, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert load_training_state(folder, model, optimizer).step == 5


def test_normal_run_leaves_no_temporary_files(tmp_path):
    run(config(max_steps=3, save_every=1), tmp_path, val=cls_examples(6, seed=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "checkpoint", "log.jsonl", "report.html"]
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"]
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CPU-only machine (tests/test_cuda.py does the real thing)")
def test_checkpoint_with_cuda_rng_states_resumes_on_a_cpu_only_machine(tmp_path):
    """A checkpoint written on a GPU machine carries rng.torch_cuda0; a CPU run must still resume from it."""
    run(config(max_steps=2), tmp_path)
    opt_file = tmp_path / "checkpoint" / "optimizer.safetensors"
    tensors = load_file(str(opt_file))
    tensors["rng.torch_cuda0"] = torch.zeros(16, dtype=torch.uint8)
    save_file(tensors, str(opt_file))
    _, records = run(config(max_steps=4), tmp_path, resume=True)
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_resume_with_changed_settings_says_what_changed(tmp_path, capsys):
    run(config(max_steps=2), tmp_path)
    capsys.readouterr()
    run(config(max_steps=4, lr=1e-4), tmp_path, resume=True)
    out = capsys.readouterr().out
    assert "settings changed since the checkpoint" in out
    assert "max_steps 2 -> 4" in out and "-> 0.0001" in out
    run(config(max_steps=6, lr=1e-4), tmp_path, resume=True)  # the checkpoint now holds lr 1e-4
    note = next(line for line in capsys.readouterr().out.splitlines() if "settings changed" in line)
    assert "max_steps 4 -> 6" in note and " lr " not in note


# ---------------------------------------------------------------------------------------------------------
# 4. The non-finite guard

def blow_up(tmp_path, save_every=0):
    """2 good steps (checkpointed), then resume with lr 1e30: step 3 still has a finite loss, but its update
    throws the weights to ~1e30 and step 4's forward overflows."""
    plan = dict(schedule="constant", warmup_ratio=0.0)
    run(config(max_steps=2, **plan), tmp_path)
    before = weights(tmp_path / "checkpoint")
    with pytest.raises(MiniftError) as err:
        run(config(max_steps=10, lr=1e30, save_every=save_every, **plan), tmp_path, resume=True)
    return before, str(err.value)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    before, message = blow_up(tmp_path)
    assert "\n" not in message and "non-finite" in message
    assert "lr 1e+30" in message
    names = [n for n, _ in make_model().named_parameters()]
    assert any(name in message for name in names), message
    assert "at step" in message
    # the checkpoint from step 2 is untouched: same step, same (finite) weights, bit for bit
    assert trainer_state(tmp_path / "checkpoint")["state"]["step"] == 2
    after = weights(tmp_path / "checkpoint")
    assert_bitwise_equal(before, after)
    assert all(torch.isfinite(t).all() for t in after.values())


def test_non_finite_error_names_the_step_as_log_jsonl_numbers_it(tmp_path):
    _, message = blow_up(tmp_path)
    last_logged = steps_logged(tmp_path)[-1]["step"]  # 3: finite loss, lr 1e30
    assert f"at step {last_logged + 1}," in message, message


def test_non_finite_error_names_the_bad_weight(tmp_path):
    model = make_model()
    bad = "bert.encoder.layer.1.output.dense.weight"
    with torch.no_grad():
        dict(model.named_parameters())[bad][0, 0] = float("nan")
    with pytest.raises(MiniftError) as err:
        run(config(max_steps=3, warmup_ratio=0.0), tmp_path, model=model)
    assert bad in str(err.value), str(err.value)
    assert not (tmp_path / "checkpoint").exists()  # stopped before any update or save


# ---------------------------------------------------------------------------------------------------------
# 5. Ctrl-C: the loop saves a checkpoint and re-raises; resuming continues

INTERRUPT_AT = 4  # the 4th optimizer step; 24 examples in batches of 4: 6 steps per epoch, 2 epochs = 12


def interrupt_config(dropout):
    return config(epochs=2, dropout=dropout, warmup_ratio=0.2)  # linear decay after 3 warmup steps


_straight = {}


def straight_run(tmp_path_factory, dropout):
    """The uninterrupted 12 steps (weights and log), computed once per dropout setting."""
    if dropout not in _straight:
        out = tmp_path_factory.mktemp("straight")
        model, records = run(interrupt_config(dropout), out)
        _straight[dropout] = params_of(model), records
    return _straight[dropout]


def interrupt_then_resume(out, dropout, monkeypatch, where, at=INTERRUPT_AT):
    """Run until a Ctrl-C lands at the `at`-th call of `where`, then resume in this process to the end."""
    calls = {"n": 0}

    def hit():
        calls["n"] += 1
        return calls["n"] == at

    if where == "clip":  # before the update: the step's forward and backward are done, nothing is applied
        real_clip = STEP.clip_grad_norm

        def clip(*args):
            if hit():
                raise KeyboardInterrupt
            return real_clip(*args)

        monkeypatch.setattr(STEP, "clip_grad_norm", clip)
    elif where == "zero_grad":  # a real SIGINT after AdamW has updated the weights, before the step is counted
        real_zero_grad = AdamW.zero_grad

        def zero_grad(self):
            if hit():
                os.kill(os.getpid(), signal.SIGINT)
            real_zero_grad(self)

        monkeypatch.setattr(AdamW, "zero_grad", zero_grad)
    else:  # "epoch_end": a real SIGINT in the progress bar's update, after the last step of epoch 0 is counted
        class Bar(TM.tqdm):
            def update(self, n=1):
                if hit():
                    os.kill(os.getpid(), signal.SIGINT)
                return super().update(n)

        monkeypatch.setattr(TM, "tqdm", Bar)
    # a runner started in the background may have Ctrl-C (SIGINT) ignored; these tests need Python's handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run(interrupt_config(dropout), out)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.undo()
    saved = trainer_state(out / "checkpoint")
    # a resume that cannot make progress must fail the test, not hang it
    real_order, orders = TM.batch_order, {"n": 0}

    def batch_order(*args, **kw):
        orders["n"] += 1
        if orders["n"] > 20:
            raise RuntimeError("the resumed loop makes no progress")
        return real_order(*args, **kw)

    monkeypatch.setattr(TM, "batch_order", batch_order)
    model, records = run(interrupt_config(dropout), out, resume=True)
    return saved, params_of(model), records


def test_interrupt_saves_the_steps_done_and_resume_finishes_exactly(tmp_path, tmp_path_factory, monkeypatch,
                                                                     capsys):
    ref_params, ref_records = straight_run(tmp_path_factory, 0.0)
    saved, params, records = interrupt_then_resume(tmp_path, 0.0, monkeypatch, "clip")
    # clip_grad_norm runs before optimizer.step and before state["step"] += 1, so the 4th step is not
    # applied and the checkpoint holds step k-1 = 3, pointing at batch 3 to redo it
    assert (saved["state"]["step"], saved["state"]["batch"], saved["optimizer"]["step"]) == (INTERRUPT_AT - 1,) * 3
    assert f"interrupted at step {INTERRUPT_AT - 1}" in capsys.readouterr().out
    # dropout off: nothing random inside a step, so the resumed run must match the straight one bitwise,
    # through the warmup/decay plan, AdamW's state and the data position
    assert_bitwise_equal(params, ref_params)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records == ref_records


def test_interrupt_resume_is_exact_with_dropout(tmp_path, tmp_path_factory, monkeypatch):
    ref_params, ref_records = straight_run(tmp_path_factory, None)  # the checkpoint's dropout, 0.1
    _, params, records = interrupt_then_resume(tmp_path, None, monkeypatch, "clip")
    assert records == ref_records
    assert_bitwise_equal(params, ref_params)


def test_interrupt_after_the_update_saves_a_consistent_checkpoint(tmp_path, tmp_path_factory, monkeypatch):
    ref_params, ref_records = straight_run(tmp_path_factory, 0.0)
    saved, params, records = interrupt_then_resume(tmp_path, 0.0, monkeypatch, "zero_grad")
    assert saved["state"]["step"] == saved["optimizer"]["step"]
    assert_bitwise_equal(params, ref_params)


def test_interrupt_at_the_end_of_an_epoch_resumes(tmp_path, tmp_path_factory, monkeypatch):
    ref_params, ref_records = straight_run(tmp_path_factory, 0.0)
    saved, params, records = interrupt_then_resume(tmp_path, 0.0, monkeypatch, "epoch_end", at=6)
    assert_bitwise_equal(params, ref_params)


# ---------------------------------------------------------------------------------------------------------
# 6. Dropout

@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_drops_p_and_rescales(p):
    layer = Dropout(p).train()
    y = layer(torch.ones(1000, 1000))
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.01  # the std of the fraction is sqrt(p(1-p)/1e6) < 5e-4
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))  # survivors scaled: the mean is kept
    assert torch.equal(layer.eval()(torch.ones(10, 10)), torch.ones(10, 10))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_eval_forwards_are_deterministic_and_train_forwards_are_not(kind):
    model = make_model(kind)
    batch = collate(examples(kind, 4), PAD)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(batch["input_ids"], batch["attention_mask"]),
                           model(batch["input_ids"], batch["attention_mask"]))
        model.train()
        a = model(batch["input_ids"], batch["attention_mask"])
        b = model(batch["input_ids"], batch["attention_mask"])
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_evaluate_restores_the_mode_and_ignores_dropout(mode):
    model = make_model()
    model.train(mode == "train")
    val = cls_examples(16, seed=1)
    first, second = evaluate(model, val, PAD), evaluate(model, val, PAD, batch_size=5)
    assert model.training == (mode == "train")
    assert all(m.training == (mode == "train") for m in model.modules())
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-6)  # no dropout, and batch size does not matter


# ---------------------------------------------------------------------------------------------------------
# 7. Seeding

def test_seed_everything_seeds_python_numpy_and_torch():
    seed_everything(3)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    seed_everything(4)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) != a


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    def seeded(seed, out):
        seed_everything(seed)  # the model's random init follows the seed ...
        model = build_model(CONFIGS["bert"], task="classify", num_labels=3)
        return run(config(max_steps=4, seed=seed), out, model=model)[1]  # ... and so do dropout and shuffling

    a, b, c = seeded(1, tmp_path / "a"), seeded(1, tmp_path / "b"), seeded(2, tmp_path / "c")
    assert a == b
    assert [r["loss"] for r in a] != [r["loss"] for r in c]
    # cfg.seed alone (same init) also changes the run: the data order and the dropout masks
    d = run(config(max_steps=4, seed=2), tmp_path / "d", model=make_model(seed=1))[1]
    e = run(config(max_steps=4, seed=1), tmp_path / "e", model=make_model(seed=1))[1]
    assert [r["loss"] for r in d] != [r["loss"] for r in e]


# ---------------------------------------------------------------------------------------------------------
# 8. The lr plan counts optimizer steps

def test_schedule_counts_optimizer_steps_not_micro_batches(tmp_path, capsys):
    # 24 examples, batches of 8 in 4 micro-batches of 2: 3 optimizer steps (12 micro-batches) per epoch
    cfg = config(batch_size=8, grad_accum=4, epochs=3, lr=1e-3, warmup_ratio=0.2)
    _, records = run(cfg, tmp_path)
    plan = LRSchedule(1e-3, 9, warmup_steps_for(9, 0.2), "linear")
    assert plan.warmup == 2
    assert [r["step"] for r in records] == list(range(1, 10))
    assert [r["lr"] for r in records] == [plan(i) for i in range(9)]
    assert records[0]["lr"] == 0 and records[2]["lr"] == 1e-3  # warmup from 0, peak at step 3
    out = capsys.readouterr().out
    assert "lr plan: 9 optimizer steps, warmup 2 (22%), peak 0.001, linear decay to 0" in out


# ---------------------------------------------------------------------------------------------------------
# 9. bf16 autocast on CPU

@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="this CPU has no native bf16 matmul (AVX512-BF16 or AMX): minift refuses bf16 on it")
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_bf16_on_cpu_trains_close_to_fp32(kind, tmp_path):
    cfg = dict(batch_size=8, max_steps=5, schedule="constant", warmup_ratio=0.0)
    start = params_of(make_model(kind))
    fp32, r32 = run(config(kind, **cfg), tmp_path / "fp32", kind)
    bf16, r16 = run(config(kind, precision="bf16", **cfg), tmp_path / "bf16", kind)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # fp32 master weights
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "checkpoint" / "optimizer.safetensors")).values()
            if t.is_floating_point()} == {torch.float32}  # and fp32 AdamW state
    deltas = [abs(a["loss"] - b["loss"]) for a, b in zip(r32, r16)]
    # bf16 keeps 8 significant bits (rounding 2^-9 ~ 0.2%): the losses (1.1 and 4.1 here) differ by 1e-3
    # at most over these 5 steps (measured); 0.05 is a loose bound that still catches NaN, a wrong cast or
    # a mask that overflows, and a non-zero delta shows that bf16 really ran
    assert all(d < 0.05 for d in deltas) and max(deltas) > 0, deltas
    assert r16[0]["grad_norm"] == pytest.approx(r32[0]["grad_norm"], rel=0.02)  # same weights, same gradient
    # the weights moved the same way: the fp32/bf16 gap is a fraction of the distance travelled (measured
    # 0.05 BERT, 0.09 GPT-2; Adam's sign-like first steps turn bf16 noise on near-zero gradients into full steps)
    moved = sum((fp32_p.detach() - start[n]).pow(2).sum() for n, fp32_p in fp32.named_parameters()).sqrt()
    gap = sum((a.detach() - b.detach()).pow(2).sum() for a, b in zip(fp32.parameters(), bf16.parameters())).sqrt()
    assert gap < 0.25 * moved, (gap, moved)


def test_unknown_precision_is_an_error(tmp_path):
    with pytest.raises(MiniftError, match="precision 'fp16' is unknown"):
        run(config(max_steps=1, precision="fp16"), tmp_path)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dropout_outside_0_1_is_an_error(tmp_path, p):
    with pytest.raises(MiniftError, match=r"dropout = .* is out of range: in \[0, 1\)"):
        run(config(max_steps=1, dropout=p), tmp_path)


# ---------------------------------------------------------------------------------------------------------
# 10. The autograd backward mode gives the same training as the hand-written backward

@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_autograd_and_manual_backward_train_the_same(kind, tmp_path):
    # float64, dropout on (0.1): both modes draw the same masks in the same order from the same seed.
    # Clipping is active at some steps (grad norm up to 1.9 against max 1.0).
    cfg = dict(batch_size=8, max_steps=5)
    manual, rm = run(config(kind, **cfg), tmp_path / "m", kind, model=make_model(kind, dtype=torch.float64))
    auto, ra = run(config(kind, backward="autograd", **cfg), tmp_path / "a", kind,
                   model=make_model(kind, dtype=torch.float64))
    # measured max |diff| 1.2e-14; atol 1e-12 for the key biases, which start at 0 and are moved only by
    # Adam's normalised step on their rounding-noise gradient (exactly 0 in exact arithmetic)
    for (name, a), b in zip(manual.named_parameters(), auto.parameters()):
        assert a.dtype == torch.float64
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name
    assert [r["loss"] for r in rm] == pytest.approx([r["loss"] for r in ra], rel=1e-12)
    other = run(config(kind, backward="autograd", seed=1, **cfg), tmp_path / "s", kind,
                model=make_model(kind, dtype=torch.float64))[0]  # the control: another seed is another run
    assert max((a - b).abs().max() for a, b in zip(auto.parameters(), other.parameters())) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# 11. Early stopping keeps the best model

def test_early_stopping_with_a_metric_that_cannot_improve(tmp_path):
    # lr 1e-30: the weights never change (each update is far below fp32's rounding of weights near 0.02), so
    # accuracy is the same at every evaluation (lr 0 itself is refused: it trains nothing). The first evaluation
    # sets "best"; an equal value is not an improvement, so with patience 1 the second evaluation stops it.
    model = make_model()
    start = params_of(model)
    result = train(model, TrainData(cls_examples(24), cls_examples(8, seed=1), PAD),
                   config(lr=1e-30, eval_every=1, patience=1), tmp_path)
    assert result["stopped_early"] and result["steps"] == 2 and result["best_step"] == 1
    evals = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "eval" in r] == [1, 2]
    assert_bitwise_equal(weights(tmp_path / "best"), start)


@pytest.mark.parametrize("metric, values, best_step", [("accuracy", [0.5, 0.5], 1), ("loss", [1.0, 0.9, 0.95], 2)])
def test_early_stopping_keeps_the_model_of_the_best_evaluation(tmp_path, monkeypatch, metric, values, best_step):
    # scripted metrics while the weights do move (lr 1e-2): best/ must hold the model as it was at the best
    # evaluation, not the last one; for "loss" lower is better
    seen = []

    def scripted(model, *args, **kw):
        seen.append(params_of(model))
        return {"loss": 1.0, "accuracy": 0.5, metric: values[len(seen) - 1]}

    monkeypatch.setattr(OBJECTIVE, "evaluate", scripted)
    model = make_model()
    result = train(model, TrainData(cls_examples(24), cls_examples(8, seed=1), PAD),
                   config(eval_every=1, patience=1, metric=metric), tmp_path)
    assert result["stopped_early"] and result["steps"] == len(values) and result["best_step"] == best_step
    assert_bitwise_equal(weights(tmp_path / "best"), seen[best_step - 1])
    assert not all(torch.equal(seen[-1][n], seen[best_step - 1][n]) for n in seen[-1])  # the model did move


def test_the_time_estimate_times_only_steps_of_shapes_already_seen(tmp_path, monkeypatch, capsys):
    """A step on a new batch shape also builds its kernels; the estimate counts only shapes seen before, and
    says so. 24 rows of one length in batches of 4: every step after the first has a shape seen before."""
    T = importlib.import_module("minift.train")  # the module (minift.train, the attribute, is the function)
    monkeypatch.setattr(T, "ESTIMATE_AFTER", 4)
    monkeypatch.setattr(T, "ESTIMATE_SECONDS", 0.0)
    rows = [{"input_ids": [1 + i % 7] * 6, "label": i % 3} for i in range(24)]
    train(make_model(), TrainData(rows, rows[:8], PAD), config(epochs=1), tmp_path)
    out = capsys.readouterr().out
    assert out.count("time estimate:") == 1
    assert "for the 1 steps left and 1 evaluation (" in out and "over 4 steps of batch shapes already seen" in out

    # a bare Run (every required field None, a fresh StepClock): note_step_time needs only the clock and dist
    required = [f for f in dataclasses.fields(T.Run)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    run = T.Run(*[None] * len(required))
    assert run.dist is None and run.clock == T.StepClock()
    for length in (5, 5, 9, 5, 9, 12):
        T.note_step_time(run, [{"input_ids": torch.zeros(4, length)}], seconds=length / 10)
    assert run.clock.timing == [(0.5, 20), (0.5, 20), (0.9, 36)]  # the first 5, the first 9 and the 12 are not counted
    assert not run.clock.estimated  # 3 steps, 1.9 s: not yet


def test_head_lr_scale_moves_the_new_head_faster_and_the_body_the_same(tmp_path):
    """One step, no warmup: Adam's first update is lr x sign(gradient) per number, so the classifier moves
    head_lr_scale times as far as at scale 1, and the body moves exactly as far in both runs."""
    start = params_of(make_model())
    moved = {}
    for scale in (1.0, 10.0):
        model, _ = run(config(max_steps=1, warmup_ratio=0.0, weight_decay=0.0, head_lr_scale=scale), tmp_path / str(scale))
        moved[scale] = {n: (p.detach() - start[n]).abs() for n, p in model.named_parameters()}
    head = [n for n in moved[1.0] if n.startswith("classifier.")]
    assert head == ["classifier.weight", "classifier.bias"]
    for n in moved[1.0]:
        if n in head:
            changed = moved[1.0][n] > 0
            assert changed.any() and torch.allclose(moved[10.0][n][changed], 10 * moved[1.0][n][changed], rtol=1e-4), n
        else:
            assert torch.equal(moved[10.0][n], moved[1.0][n]), n


def test_head_lr_scale_is_for_classifiers(tmp_path):
    with pytest.raises(MiniftError, match="head_lr_scale is for a classifier"):
        run(config("gpt2", max_steps=1, head_lr_scale=10.0), tmp_path, kind="gpt2")
    with pytest.raises(MiniftError, match="head_lr_scale = 0.0 is out of range"):
        run(config(max_steps=1, head_lr_scale=0.0), tmp_path)
