"""Distillation (distill.py): the three divergences and their gradients against autograd (float64) and TRL 1.16.0
(GKDTrainer.generalized_jsd_loss; the DistillationTrainer's chunked kernel as shipped, in float32); a whole step's
gradients through tiny Llamas, chunked and not, full and LoRA, tied and untied heads, a head with more rows than the
tokenizer has tokens; the teacher frozen, read one tensor at a time, quantized; the job on tiny models: the student
moves toward the teacher offline and on-policy, a run stopped inside a step's backward (offline) or its sampling
(on-policy) resumes bitwise, bad settings and a teacher with other tokens are one line before any model loads.

TRL and transformers are oracles only (importorskip)."""
import copy
import json
import math

import pytest
import torch

import minift.distill
from minift.checkpoints import build_model, load_checkpoint, save_checkpoint
from minift.config import TrainConfig
from minift.distill import (DistillObjective, DistillSettings, check_same_tokens, distill_loss, distill_step, divergence,
                            encode_rows, finetune_distill, load_teacher)
from minift.errors import MiniftError
from minift.lora import add_lora, lora_layers
from test_faults import assert_same_outcome, cli_error, outcome, stop_on_call
from test_instruct import rows_of_each_format, tiny  # noqa: F401  (tiny: a fixture)

TOL = 1e-10  # float64 gradients, relative to the largest entry of autograd's
BETAS = [0.0, 0.3, 0.5, 1.0]


def trl_jsd(student_logits, teacher_logits, beta, temperature, labels=None, reduction="sum"):
    trl = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    return trl.GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                                temperature=temperature, reduction=reduction)


# ---------------------------------------------------------------------------------------------------------
# The divergences, one position at a time

@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_and_its_gradient(beta, temperature):
    """Our loss per row against TRL's generalized_jsd_loss (reduction none, summed over the vocabulary) and our
    dlogits against autograd through TRL's (float64)."""
    torch.manual_seed(0)
    student = (torch.randn(6, 13, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(6, 13, dtype=torch.float64) * 3
    ours, dlogits = divergence(student.detach(), teacher, beta, temperature)
    theirs = trl_jsd(student, teacher, beta, temperature, reduction="none").sum(-1)
    assert ours.dtype == torch.float64 and (ours > 0).all()
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-12, atol=1e-15)
    weights = torch.rand(6, dtype=torch.float64)  # any upstream gradient, one per row
    (theirs * weights).sum().backward()
    torch.testing.assert_close(dlogits * weights[:, None], student.grad, rtol=1e-10, atol=1e-14)


def test_the_two_kls_and_the_jsd_are_what_they_say():
    """beta 0 is KL(teacher || student), 1 is KL(student || teacher), 0.5 the Jensen-Shannon divergence (symmetric,
    at most log 2); each is 0 when the two distributions are the same, and the gradient too."""
    torch.manual_seed(1)
    s, t = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    p, q = s.softmax(-1), t.softmax(-1)
    torch.testing.assert_close(divergence(s, t, 0.0)[0], (q * (q.log() - p.log())).sum(-1))
    torch.testing.assert_close(divergence(s, t, 1.0)[0], (p * (p.log() - q.log())).sum(-1))
    torch.testing.assert_close(divergence(s, t, 0.5)[0], divergence(t, s, 0.5)[0])
    assert (divergence(s, t, 0.5)[0] <= math.log(2)).all()
    for beta in BETAS:
        loss, grad = divergence(s, s + 5.0, beta)  # a constant shift: the same softmax
        assert loss.abs().max() < 1e-12 and grad.abs().max() < 1e-12


def test_the_temperature_softens_and_the_gradient_carries_one_over_t():
    """TRL's convention, which we follow: no T^2 factor. The forward KL's gradient is (p_T - q_T) / T."""
    s, t = torch.tensor([[2.0, 0.0, -1.0]], dtype=torch.float64), torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    loss, grad = divergence(s, t, 0.0, temperature=2.0)
    torch.testing.assert_close(grad, ((s / 2).softmax(-1) - (t / 2).softmax(-1)) / 2)
    assert loss.item() < divergence(s, t, 0.0)[0].item()  # softer distributions, closer together


# ---------------------------------------------------------------------------------------------------------
# The loss of a batch, chunked and not, and the head's rows past the tokenizer's

@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distill_loss_chunked_equals_whole_and_autograd(beta):
    """Hidden states and two heads (the student's with 3 rows more than the tokenizer's 17 tokens), chunks of 4
    positions, chunks without a target skipped: loss, d hidden and d head against autograd through whole logits."""
    torch.manual_seed(2)
    n, vocab, rows = 11, 17, 20
    hs, ht = torch.randn(n, 6, dtype=torch.float64), torch.randn(n, 9, dtype=torch.float64)
    ws = torch.randn(rows, 6, dtype=torch.float64).requires_grad_()
    wt = torch.randn(rows + 2, 9, dtype=torch.float64)
    targets = torch.tensor([-100] * 5 + [3, 7, -100, 1, 16, -100])  # positions 0-4: a prompt (two chunks skipped)
    hs_ = hs.clone().requires_grad_()
    ref = trl_jsd((hs_ @ ws.T)[:, :vocab][None], (ht @ wt.T)[:, :vocab][None], beta, 1.5, labels=targets[None],
                  reduction="batchmean")  # the mean over the 4 targets: what num_targets=4 divides by
    ref.backward()
    dws_ref, ws.grad = ws.grad, None
    for chunk in (0, 4):
        with torch.no_grad():
            loss, dh = distill_loss(hs, ht, targets, 4, beta, 1.5, vocab, chunk, ws, wt)
        assert math.isclose(loss.item(), ref.item(), rel_tol=1e-12)
        torch.testing.assert_close(dh, hs_.grad, rtol=TOL, atol=1e-14)
        torch.testing.assert_close(ws.grad, dws_ref, rtol=TOL, atol=1e-14)
        assert ws.grad[vocab:].abs().max() == 0  # the rows past the tokenizer's learn nothing
        ws.grad = None


def test_distill_loss_with_the_next_token_loss_mixed_in():
    torch.manual_seed(3)
    logits = torch.randn(7, 10, dtype=torch.float64).requires_grad_()
    teacher = torch.randn(7, 10, dtype=torch.float64)
    targets = torch.tensor([-100, 2, 5, -100, 9, 0, 1])
    with torch.no_grad():
        loss, dlogits = distill_loss(logits, teacher, targets, 8, 0.5, 1.0, 10, crossentropy_weight=0.25)
    mask = targets != -100
    ref = (trl_jsd(logits[mask][None], teacher[mask][None], 0.5, 1.0, reduction="sum")
           + 0.25 * torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")) / 8
    ref.backward()
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-12)
    torch.testing.assert_close(dlogits, logits.grad, rtol=TOL, atol=1e-14)


def test_trls_chunked_kernel_as_shipped_float32():
    """TRL's DistillationTrainer kernel (float32 by design, its torch path on a CPU) on the same hidden states and
    heads: the loss and d hidden within float32's rounding."""
    trainer = pytest.importorskip("trl.trainer.distillation_trainer")
    torch.manual_seed(4)
    hs, ht = torch.randn(2, 5, 8), torch.randn(2, 5, 12)
    ws, wt = torch.randn(30, 8) * 0.5, torch.randn(30, 12) * 0.5
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    hs_ = hs.clone().requires_grad_()
    theirs, _, _ = trainer._chunked_divergence_loss(hs_, ht, ws, wt, mask, beta=0.5, num_items_in_batch=6,
                                                    temperature=1.3)
    theirs.backward()
    targets = torch.where(mask.bool(), 0, -100).reshape(-1)  # any id: only the mask matters to the divergence
    loss, dh = distill_loss(hs.reshape(-1, 8), ht.reshape(-1, 12), targets, 6, 0.5, 1.3, 30, 4, ws, wt)
    assert math.isclose(loss.item(), theirs.item(), rel_tol=1e-5)
    torch.testing.assert_close(dh.view(2, 5, 8), hs_.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# A whole step through tiny Llamas: the hand-written backward against autograd

ROWS, VOCAB = 50, 46  # the heads' rows, the tokenizer's tokens (the 4 rows past them never count)
STUDENT = dict(model_type="llama", vocab_size=ROWS, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
TEACHER = dict(STUDENT, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=3,
               num_key_value_heads=1, tie_word_embeddings=False)


def tiny_pair(tied=True, lora=False):
    torch.manual_seed(5)
    student = build_model({**STUDENT, "tie_word_embeddings": tied}, "lm").double().train()
    teacher = build_model(TEACHER, "lm").double().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if lora:
        add_lora(student, "all-linear", r=2, alpha=4)
        with torch.no_grad():
            for layer in lora_layers(student).values():
                layer.lora_B.normal_(0, 0.3)
    return student, teacher


def step_batch():
    """Three rows, right-padded: prompt tokens (labels -100), answers of 2-4 tokens, padding."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 0], [11, 12, 13, 14, 15, 0, 0], [16, 17, 18, 19, 20, 21, 22]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10, -100], [-100, -100, 13, 14, 15, -100, -100],
                           [-100, -100, -100, -100, 20, 21, 45]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def autograd_step(model, teacher, batch, beta, temperature, num_targets):
    with torch.enable_grad():
        logits = model(batch["input_ids"], batch["attention_mask"])
        theirs = teacher(batch["input_ids"], batch["attention_mask"])
        loss = trl_jsd(logits[:, :-1, :VOCAB], theirs[:, :-1, :VOCAB], beta, temperature, labels=batch["labels"][:, 1:],
                       reduction="sum") / num_targets
        loss.backward()
    return loss.item()


@pytest.mark.parametrize("tied,lora", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_step_equals_autograd_chunked_and_not(tied, lora, beta):
    """distill_step's hand-written backward (the whole logits, and both heads 2 positions at a time) gives autograd's
    gradients through TRL's loss on the same models, for every trainable weight (float64, within 1e-10)."""
    student, teacher = tiny_pair(tied, lora)
    batch, num_targets = step_batch(), 10
    ref_loss = autograd_step(student, teacher, batch, beta, 1.7, num_targets)
    ref = grads(student)
    assert ref and all(g.abs().max() > 0 for g in ref.values())
    for chunk in (0, 2):
        student.zero_grad()
        student.loss_chunk = chunk
        loss = distill_step(student, teacher, batch, num_targets, beta, 1.7, VOCAB)
        assert math.isclose(loss, ref_loss, rel_tol=1e-12)
        ours = grads(student)
        assert ours.keys() == ref.keys()
        for name, g in ref.items():
            err = (ours[name] - g).abs().max() / g.abs().max()
            assert err <= TOL, f"chunk {chunk}, {name}: relative error {err:.2e}"
        if not lora:  # the head's rows past the tokenizer's get nothing (no input token is one of them either)
            assert student.head_weight().grad[VOCAB:].abs().max() == 0
    assert all(p.grad is None for p in teacher.parameters())  # the teacher never trains


def test_micro_batches_add_up_to_the_batch():
    student, teacher = tiny_pair()
    batch = step_batch()
    distill_step(student, teacher, batch, 10, 0.5, 1.0, VOCAB)
    whole = grads(student)
    student.zero_grad()
    for rows in (slice(0, 1), slice(1, 3)):
        distill_step(student, teacher, {k: v[rows] for k, v in batch.items()}, 10, 0.5, 1.0, VOCAB)
    for name, g in grads(student).items():
        torch.testing.assert_close(g, whole[name], rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------
# The teacher: read one tensor at a time, frozen, quantized; the same tokens as the student

@pytest.fixture(scope="module")
def teacher_folder(tiny, tmp_path_factory):  # noqa: F811
    """A bigger random Llama with the tiny student's tokenizer (test_instruct's ChatML tokenizer), saved with it."""
    student_folder, tok = tiny
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(7)
    config = dict(model_type="llama", vocab_size=tok.vocab_size + 3, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    teacher = build_model(config, "lm")
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40)  # a confident teacher: sharper distributions than a random init's
    teacher.tokenizer_file = student_folder / "tokenizer.json"
    save_checkpoint(teacher, folder)
    return folder


def test_the_teacher_is_read_one_tensor_at_a_time_and_frozen(teacher_folder):
    whole = load_checkpoint(teacher_folder, "lm", verbose=False)
    teacher = load_teacher(teacher_folder)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    ours, theirs = dict(teacher.named_parameters()), dict(whole.named_parameters())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    bf16 = load_teacher(teacher_folder, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE's angles keep their digits


def test_a_quantized_teacher_holds_blocks_and_gives_the_blocks_logits(teacher_folder):
    """q8_0: each block matrix is a QuantizedWeight (its fp32 weight gone), the adapters that carry them are off, and
    the logits are those of the teacher with every such matrix dequantized (float32 rounding apart)."""
    ids = torch.tensor([[5, 9, 40, 7, 3]])
    teacher = load_teacher(teacher_folder, torch.float32, "q8_0")
    layers = lora_layers(teacher)
    assert layers and all(layer.quantized is not None and not hasattr(layer, "weight") and not layer.enabled
                          for layer in layers.values())
    assert not any(p.requires_grad for p in teacher.parameters())
    plain = load_checkpoint(teacher_folder, "lm", verbose=False).eval()
    with torch.no_grad():
        for name, layer in layers.items():
            plain.get_submodule(name).weight.copy_(layer.quantized.dequantize())
        torch.testing.assert_close(teacher(ids), plain(ids), rtol=1e-5, atol=1e-5)
        assert teacher.hidden_states(ids).shape == (1, 5, 32)


def test_a_teacher_with_other_tokens_is_refused(tiny):  # noqa: F811
    _, tok = tiny
    other = copy.deepcopy(tok)
    other._tok.add_tokens(["<extra>"])
    other.vocab_size += 1
    with pytest.raises(MiniftError, match="distillation compares their probabilities token by token"):
        check_same_tokens(tok, other)
    renamed = copy.deepcopy(tok)
    renamed.id_to_token = lambda i: "<renamed>" if i == 57 else tok.id_to_token(i)
    with pytest.raises(MiniftError, match="token 57 is .* for the student and '<renamed>' for the teacher"):
        check_same_tokens(tok, renamed)
    check_same_tokens(tok, copy.deepcopy(tok))


# ---------------------------------------------------------------------------------------------------------
# The job on tiny models

def cfg(**kw):
    return TrainConfig(**{"epochs": 4, "batch_size": 4, "lr": 1e-2, "metric": "loss", "lora_r": 0, "eval_every": 4,
                          "max_steps": 8, "precision": "fp32", "device": "cpu", "dropout": 0.0, "warmup_ratio": 0.0,
                          "chunked_loss": 8, **kw})


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_of_each_format()))
    return path


def steps_of(out):
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval" not in r]


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_the_job_moves_the_student_toward_the_teacher(tiny, teacher_folder, data, tmp_path, lmbda):  # noqa: F811
    """Offline (the data's answers) and on-policy (the student's own samples): the divergence to the teacher on the
    held-out rows' answers falls (measured: offline 0.625 -> 0.343, on-policy 0.625 -> 0.404), the teacher's file is
    untouched, and every step says which kind it was."""
    folder, _ = tiny
    before = load_checkpoint(teacher_folder, "lm", verbose=False).state_dict()
    report = finetune_distill(str(folder), str(data), str(tmp_path / "run"), cfg(max_steps=12, lr=0.1),
                              DistillSettings(teacher=str(teacher_folder), lmbda=lmbda, max_new_tokens=6))
    steps = steps_of(tmp_path / "run")
    assert len(steps) == 12 and all(r["on_policy"] == lmbda for r in steps)
    assert report["validation"]["loss"] < 0.75 * report["before"]["loss"], (report["before"], report["validation"])
    after = load_checkpoint(teacher_folder, "lm", verbose=False).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert report["test"]["num_tokens"] > 0 and report["distill"]["lmbda"] == lmbda


def test_seq_kd_trains_on_the_teachers_answers(tiny, teacher_folder, data, monkeypatch):  # noqa: F811
    """seq_kd: offline steps sample the answers from the teacher (not the student, not the data)."""
    folder, tok = tiny
    sampled_by = []
    real = minift.distill.sample_rollouts

    def spy(model, *args, **kw):
        sampled_by.append(model)
        return real(model, *args, **kw)
    monkeypatch.setattr(minift.distill, "sample_rollouts", spy)
    teacher = load_teacher(teacher_folder)
    objective = DistillObjective(tok, teacher, DistillSettings(teacher=str(teacher_folder), lmbda=0.0, seq_kd=True,
                                                               max_new_tokens=4))
    examples, _ = encode_rows(rows_of_each_format(6), tok, 256)
    student = load_checkpoint(folder, "lm", verbose=False).train()
    loss, metrics = objective.gradients(student, [objective.collate(examples, "cpu")])
    assert sampled_by == [teacher] and metrics["on_policy"] == 0.0 and loss > 0
    assert 1 <= metrics["answer_tokens"] <= 4


@pytest.mark.parametrize("where", ["backward", "sampling"])
def test_a_run_stopped_mid_step_resumes_bitwise(tiny, teacher_folder, data, tmp_path, monkeypatch, where):  # noqa: F811
    """Offline, stopped inside the 3rd step's distill_step (dropout on: its masks come back too); lmbda 0.5, stopped
    inside the sampling of an on-policy step (the coin and the sampling RNG come back): resumed, the same weights,
    AdamW state, best/, loop state and log as the straight run."""
    folder, _ = tiny
    if where == "backward":
        settings, train = DistillSettings(teacher=str(teacher_folder), lmbda=0.0), cfg(dropout=0.1, save_every=1)
        name, at = "distill_step", 3
    else:
        settings, train = DistillSettings(teacher=str(teacher_folder), lmbda=0.5, max_new_tokens=4), cfg(save_every=1)
        name, at = "sample_rollouts", 2

    def run(out, resume=False):
        return finetune_distill(str(folder), str(data), str(out), train, settings, resume=resume, test=False)
    run(tmp_path / "straight")
    kinds = [r["on_policy"] for r in steps_of(tmp_path / "straight")]
    assert where == "backward" or 0 < sum(kinds) < len(kinds), kinds  # both kinds of step happened
    with monkeypatch.context() as patch:
        stop_on_call(patch, minift.distill, name, at)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "stopped")
    saved = json.loads((tmp_path / "stopped" / "checkpoint" / "trainer_state.json").read_text())["state"]["step"]
    assert 0 < saved < 8
    run(tmp_path / "stopped", resume=True)
    assert_same_outcome(outcome(tmp_path / "straight"), outcome(tmp_path / "stopped"))


# ---------------------------------------------------------------------------------------------------------
# Bad settings: one line, before any model loads

@pytest.fixture
def no_model_loads(monkeypatch):
    def loading(*args, **kw):
        raise AssertionError("a model was loaded before the bad setting was refused")
    # the job's own names only: patching checkpoints.load_checkpoint would be bound for good by a job module first
    # imported while the patch holds (cli imports them lazily), and break every later test that loads through it
    for module, name in ((minift.distill, "load_checkpoint"), (minift.distill, "load_teacher")):
        monkeypatch.setattr(module, name, loading)


def other_tokens_teacher(teacher_folder, tmp_path):
    """The teacher with one token more in its tokenizer."""
    import shutil
    import tokenizers
    folder = tmp_path / "other-teacher"
    shutil.copytree(teacher_folder, folder)
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens(["<extra>"])
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_bad_settings_are_one_line_before_any_model_loads(tiny, teacher_folder, data, tmp_path, capsys,  # noqa: F811
                                                          no_model_loads):
    folder, _ = tiny
    base = ["finetune", "--task", "distill", "--model", folder, "--data", data, "--teacher", teacher_folder,
            "--out", tmp_path / "o", "--device", "cpu"]
    for argv, says in [
        (["--beta", "1.5"], "beta = 1.5 is out of range: between 0 (forward KL) and 1 (reverse KL)"),
        (["--lmbda", "-0.1"], "lmbda = -0.1 is out of range"),
        (["--lmbda", "1.5"], "lmbda = 1.5 is out of range: between 0 (offline only) and 1"),
        (["--temperature", "0"], "temperature = 0.0 is out of range"),
        (["--max-new-tokens", "0"], "max_new_tokens = 0 is out of range"),
        (["--crossentropy-weight", "-1"], "crossentropy_weight = -1.0 is out of range"),
        (["--teacher-quantize", "q3_k"], "teacher_quantize 'q3_k' is unknown: choose none, q8_0, q4_0, q4_1"),
        (["--seq-kd", "maybe"], "--seq-kd 'maybe': expected true or false"),
        (["--metric", "accuracy"], "use metric='loss' or 'exact_match'"),
        (["--packing", "64"], "use packing=0"),
        (["--backward", "autograd"], "use backward='manual'"),
        (["--group-size", "4"], "--group-size is a setting of --task grpo, not of --task distill"),
        (["--teacher", tmp_path / "nowhere"], "is not a folder"),
        (["--teacher", other_tokens_teacher(teacher_folder, tmp_path)], "their probabilities token by token"),
    ]:
        line = cli_error(capsys, base + argv)
        assert says in line, (argv, line)
    with pytest.raises(MiniftError, match="teacher is empty"):
        DistillSettings(teacher="").check()


def test_the_two_digit_task():
    """300 distinct questions, each answer right, split 210/45/45 the same way every time (the held-out questions of
    every run are the same)."""
    from minift.corpora import two_digit_splits
    splits = two_digit_splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 210, "validation": 45, "test": 45}
    rows = [r for v in splits.values() for r in v]
    assert len({r["prompt"] for r in rows}) == 300 and splits == two_digit_splits()
    for r in rows:
        a, op, b = r["prompt"].split("?")[0].split()[-3:]
        assert r["answer"] == r["response"] == str(int(a) + int(b) if op == "+" else int(a) - int(b))
    assert 0.15 < sum(r["answer"].startswith("-") for r in rows) / 300 < 0.35  # negative: the student's weak spot (75)
