"""The chunked LM loss (heads.chunked_lm_loss, TrainConfig.chunked_loss): the head and the cross-entropy a chunk of
positions at a time give the loss and every gradient of the plain head + loss (float64), tied and untied heads,
with prompt/pad positions and LoRA; the logits of the whole batch never exist; evaluation still gets logits."""
import copy

import pytest
import torch

import minift.heads
from minift.batching import TrainData
from minift.checkpoints import build_model
from minift.config import TrainConfig, check_config
from minift.errors import MiniftError
from minift.memory import estimate_memory, format_memory, kept_tensors, levers_by_gain, storage_bytes
from minift.objective import forward_backward
from minift.train import prepare_model, train
from test_freeze import CONFIGS, batch, lm_rows

CASES = {  # name: (config, settings)
    "gpt2 (tied)": (CONFIGS["gpt2"], {}),
    "llama untied": (CONFIGS["llama"], {}),
    "llama tied": ({**CONFIGS["llama"], "tie_word_embeddings": True}, {}),
    "llama tied, LoRA (head frozen)": ({**CONFIGS["llama"], "tie_word_embeddings": True}, {"lora_r": 4}),
    "gpt2, dropout, recompute": (CONFIGS["gpt2"], {"dropout": 0.1, "recompute": 1}),
}


def prompt_masked(b):
    """The first 3 positions of every row are a prompt (-100), as in the instruction job."""
    labels = b["labels"].clone()
    labels[:, :3] = -100
    return {**b, "labels": labels}


def grads(model, b, num_targets):
    model.train()
    torch.manual_seed(0)
    loss = forward_backward(model, b, num_targets)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("chunk", [1, 4, 5, 1000])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_loss_gives_the_plain_gradients(case, chunk):
    config, settings = CASES[case]
    torch.manual_seed(0)
    plain = build_model(config, "lm").double()
    chunked = copy.deepcopy(plain)
    torch.manual_seed(1)
    prepare_model(plain, TrainConfig(**settings))
    torch.manual_seed(1)
    prepare_model(chunked, TrainConfig(**settings, chunked_loss=chunk))
    b = prompt_masked(batch("lm"))
    num_targets = 2 * plain.count_targets(b["labels"])  # as in a step of two micro-batches
    loss_plain, g_plain = grads(plain, b, num_targets)
    loss_chunked, g_chunked = grads(chunked, b, num_targets)
    assert loss_chunked == pytest.approx(loss_plain, rel=1e-12)
    assert g_plain.keys() == g_chunked.keys() and g_plain
    for name in g_plain:
        torch.testing.assert_close(g_chunked[name], g_plain[name], rtol=1e-10, atol=1e-13, msg=name)


def test_the_whole_batch_of_logits_never_exists(monkeypatch):
    torch.manual_seed(0)
    model = build_model(CONFIGS["llama"], "lm")
    prepare_model(model, TrainConfig(chunked_loss=4))
    seen = []
    real = minift.heads.cross_entropy

    def spy(logits, *args, **kwargs):
        seen.append(tuple(logits.shape))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(minift.heads, "cross_entropy", spy)
    b = prompt_masked(batch("lm"))  # 3 rows x 7 positions
    model.train()
    forward_backward(model, b, model.count_targets(b["labels"]))
    assert seen and all(rows <= 4 and vocab == 50 for rows, vocab in seen)
    assert sum(rows for rows, _ in seen) < 3 * 7  # chunks with no target (the first one: prompt only) are skipped
    m = estimate_memory(model, b)
    assert m["logits"] == 2 * 4 * 50 * 4  # 4 positions at once, logits and log-probs in fp32
    model.loss_chunk = 0
    assert estimate_memory(model, b)["logits"] == 2 * 21 * 50 * 4


def test_evaluation_and_generation_still_get_logits():
    torch.manual_seed(0)
    model = build_model(CONFIGS["gpt2"], "lm")
    prepare_model(model, TrainConfig(chunked_loss=4))
    b = batch("lm")
    model.eval()
    with torch.no_grad():
        logits = model(b["input_ids"], b["attention_mask"])
        loss, dlogits = model.loss(logits, b["labels"])
    assert logits.shape == (3, 7, 50) and dlogits is None and torch.isfinite(loss)
    assert model.generate(b["input_ids"][:1, :3], max_new_tokens=2).shape == (1, 5)


def test_chunked_loss_through_train_gives_the_same_weights(tmp_path):
    def run(chunk):
        torch.manual_seed(0)
        model = build_model(CONFIGS["gpt2"], "lm")
        rows = lm_rows()
        cfg = TrainConfig(batch_size=4, grad_accum=2, lr=1e-3, max_steps=4, precision="fp32", metric="loss",
                          chunked_loss=chunk, log_every=1)
        train(model, TrainData(rows, rows[:4], pad_id=0), cfg, tmp_path / f"c{chunk}")
        return dict(model.named_parameters())

    plain, ours = run(0), run(5)
    for name in plain:  # fp32, summed in another order: equal to rounding
        torch.testing.assert_close(ours[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_loss_is_refused_where_it_cannot_apply():
    with pytest.raises(MiniftError, match="chunked_loss .*classifier"):
        prepare_model(build_model(CONFIGS["gpt2"], "classify", num_labels=3), TrainConfig(chunked_loss=8))
    with pytest.raises(MiniftError, match="lm_head out of lora_targets"):
        prepare_model(build_model(CONFIGS["llama"], "lm"),
                      TrainConfig(chunked_loss=8, lora_r=2, lora_targets=["all-linear", "lm_head"]))
    with pytest.raises(MiniftError, match="chunked_loss = -1 is out of range"):
        check_config(TrainConfig(chunked_loss=-1))


def test_chunked_loss_under_bf16_autocast_is_close_to_the_plain_one():
    torch.manual_seed(0)
    plain = build_model({**CONFIGS["llama"], "tie_word_embeddings": True}, "lm")
    chunked = copy.deepcopy(plain)
    prepare_model(chunked, TrainConfig(chunked_loss=4))
    b = prompt_masked(batch("lm"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # runs on any CPU (slowly where bf16 is not native)
        loss_plain, g_plain = grads(plain, b, plain.count_targets(b["labels"]))
        loss_chunked, g_chunked = grads(chunked, b, plain.count_targets(b["labels"]))
    assert loss_chunked == pytest.approx(loss_plain, rel=1e-3)
    for name in g_plain:  # bf16 matmuls summed in another order: equal to bf16's 3 digits
        assert g_chunked[name].dtype == torch.float32
        err = (g_chunked[name] - g_plain[name]).norm() / g_plain[name].norm()
        assert err < 2e-2, (name, float(err))


def test_the_estimate_names_the_levers_not_on_with_what_they_give_back():
    torch.manual_seed(0)
    model = build_model(CONFIGS["gpt2"], "lm")
    prepare_model(model, TrainConfig())
    b = batch("lm")
    m = estimate_memory(model, b)
    assert set(m["levers"]) == {"recompute=1", "chunked_loss=1024"}
    assert not any(getattr(block, "recompute", False) for block in model.transformer.h)  # the marks put back
    assert 0 < m["levers"]["recompute=1"] < m["activations"]
    assert m["levers"]["chunked_loss=1024"] == 0  # 21 positions: under 1024, chunking changes nothing here
    assert levers_by_gain(m) == [f"recompute=1 (about {m['levers']['recompute=1'] / 2**20:.1f} MB back)"]
    assert format_memory(m).endswith(levers_by_gain(m)[0])

    # the claim, against a real backward with every block recomputing: what is kept at its peak (each block's
    # backward starts after its forward ran again) is at most the plain activations less the gain
    prepare_model(model, TrainConfig(recompute=1))
    peaks = []
    for block in model.transformer.h:
        real = block.backward
        block.backward = lambda d, real=real: peaks.append(storage_bytes(kept_tensors(model))) or real(d)
    model.train()
    forward_backward(model, b, model.count_targets(b["labels"]))
    estimated = m["activations"] - m["levers"]["recompute=1"]  # an upper bound: it counts the head's rows too,
    assert len(peaks) == 3 and 0.6 * estimated < max(peaks) <= estimated  # freed before the blocks' backward
    assert estimate_memory(model, b)["levers"] == {"chunked_loss=1024": 0}
    prepare_model(model, TrainConfig(recompute=1, chunked_loss=8))
    assert estimate_memory(model, b)["levers"] == {}


def test_out_of_memory_in_a_step_names_the_levers_with_the_estimates_numbers(tmp_path, monkeypatch):
    import importlib
    loop = importlib.import_module("minift.train")  # the module (minift.train is also the function)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(loop, "train_step", out_of_memory)
    torch.manual_seed(0)
    model = build_model(CONFIGS["gpt2"], "lm")
    rows = [{"input_ids": list(range(1, 9)), "labels": list(range(1, 9))}] * 8
    with pytest.raises(MiniftError) as e:
        train(model, TrainData(rows, rows[:2], pad_id=0), TrainConfig(batch_size=4, max_steps=1, precision="fp32",
                                                                      metric="loss"), tmp_path / "oom")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("out of memory (CUDA out of memory")
    assert msg.endswith("MB back)") and ", or recompute=1 (about 0.0 MB back)" in msg  # a tiny model: tiny numbers
    assert "chunked_loss" not in msg  # 32 positions: chunks of 1024 would give nothing back


def test_a_micro_batch_without_targets_adds_nothing_as_in_the_plain_loss():
    """The step's count comes from all its micro-batches: one whose rows are all prompt adds a loss of 0 and no
    gradient in both losses; a step with no target at all is an error in both."""
    b = batch("lm")
    silent = {**b, "labels": torch.full_like(b["labels"], -100)}
    for chunk in (0, 4):
        torch.manual_seed(0)
        model = build_model(CONFIGS["gpt2"], "lm")
        prepare_model(model, TrainConfig(chunked_loss=chunk))
        model.train()
        assert forward_backward(model, silent, 5) == 0.0
        assert all(p.grad is None or not p.grad.any() for p in model.parameters())
        with pytest.raises(MiniftError, match="no supervised token"):
            forward_backward(model, silent, model.count_targets(silent["labels"]))
