"""Recompute (minift/recompute.py): a block that keeps only its input and runs its forward again in backward
gives the same gradients, bit for bit, with dropout on (the same masks), under LoRA and freezing, and keeps
less; through train() the same weights after a few steps."""
import copy

import pytest
import torch

from minift.batching import TrainData
from minift.checkpoints import build_model
from minift.config import TrainConfig
from minift.memory import kept_for_backward
from minift.objective import forward_backward
from minift.train import prepare_model, train
from test_freeze import CONFIGS, batch, lm_rows

CASES = {  # name: (family, task, settings); dropout 0.1 wherever the family has it, so masks are in play
    "bert every block": ("bert", "classify", dict(recompute=1, dropout=0.1)),
    "gpt2 every other block": ("gpt2", "lm", dict(recompute=2, dropout=0.1)),
    "llama with LoRA dropout": ("llama", "lm", dict(recompute=1, lora_r=4, lora_dropout=0.1)),
    "bert frozen below, LoRA": ("bert", "classify", dict(recompute=1, dropout=0.1, lora_r=2, freeze=["layers:1"])),
}


def grads_and_kept(model, b, seed=0):
    model.train()
    torch.manual_seed(seed)
    kept = []
    real_backward = model.backward

    def backward(dlogits):  # between forward and backward: what the forward kept
        kept.append(sum(r[3] for r in kept_for_backward(model)))
        real_backward(dlogits)

    model.backward = backward
    forward_backward(model, b, model.count_targets(b["labels"]))
    del model.backward
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, kept[0], torch.get_rng_state()


@pytest.mark.parametrize("case", list(CASES))
def test_recomputed_gradients_are_bitwise_the_same(case):
    family, task, settings = CASES[case]
    torch.manual_seed(0)
    plain = build_model(CONFIGS[family], task, num_labels=3).double()
    recomputing = copy.deepcopy(plain)
    torch.manual_seed(1)  # (LoRA's A is drawn: the same draws for both)
    prepare_model(plain, TrainConfig(**{**settings, "recompute": 0}))
    torch.manual_seed(1)
    prepare_model(recomputing, TrainConfig(**settings))
    assert any(getattr(m, "recompute", False) for m in recomputing.modules())
    b = batch(task)
    g_plain, kept_plain, rng_plain = grads_and_kept(plain, b)
    g_ours, kept_ours, rng_ours = grads_and_kept(recomputing, b)
    assert g_plain.keys() == g_ours.keys()
    for name in g_plain:
        assert torch.equal(g_plain[name], g_ours[name]), name
    assert kept_ours < kept_plain  # the point of it
    assert torch.equal(rng_plain, rng_ours)  # the second forward leaves the run's RNG where it was
    assert kept_for_backward(recomputing) == []  # and backward freed what the second forward kept


def test_recompute_through_train_gives_the_same_weights(tmp_path):
    def run(recompute):
        torch.manual_seed(0)
        model = build_model(CONFIGS["gpt2"], "lm")
        rows = lm_rows()
        cfg = TrainConfig(batch_size=4, lr=1e-2, max_steps=4, precision="fp32", metric="loss", dropout=0.1,
                          recompute=recompute, log_every=1)
        train(model, TrainData(rows, rows[:4], pad_id=0), cfg, tmp_path / f"r{recompute}")
        return dict(model.named_parameters())

    plain, ours = run(0), run(1)
    for name in plain:
        assert torch.equal(plain[name], ours[name]), name
