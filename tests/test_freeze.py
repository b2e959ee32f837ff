"""Frozen weights cost nothing (minift/freeze.py), what backward keeps (minift/memory.py), and the family seam:
a third family is one file and one dict entry (checkpoints.FAMILIES).

With parts frozen the remaining gradients must equal the full model's in float64; frozen tensors get no
.grad and no AdamW state; the stages below the lowest trainable one keep nothing in forward.
"""
import types
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from minift import checkpoints
from minift.checkpoints import build_model, load_checkpoint, save_checkpoint
from minift.errors import MiniftError
from minift.freeze import count_trainable, freeze, mark_frozen_below
from minift.batching import TrainData
from minift.config import TrainConfig
from minift.heads import Backbone, Classifier
from minift.layers import Embedding, LayerNorm, Linear, frozen_below
from minift.lora import load_adapter, lora_layers
from minift.memory import estimate_memory, format_kept, kept_for_backward, kept_tensors, storage_bytes
from minift.optim import AdamW, param_groups
from minift.objective import forward_backward

CONFIGS = {
    "bert": dict(model_type="bert", vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                 intermediate_size=24, max_position_embeddings=32, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0),
    "gpt2": dict(model_type="gpt2", vocab_size=50, n_positions=32, n_embd=16, n_layer=3, n_head=2, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0),
    "llama": dict(model_type="llama", vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32),
}


def lm_rows(n=16, seed=1):
    """n language-model rows of 4 to 11 random tokens, every token a target: a few steps of train() on a toy."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": ids, "labels": ids} for ids in
            (torch.randint(1, 50, (int(k),), generator=g).tolist() for k in torch.randint(4, 12, (n,), generator=g))]


def batch(task, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    labels = torch.tensor([0, 2, 1]) if task == "classify" else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads_after_step(model, b):
    model.train()
    mark_frozen_below(model)
    forward_backward(model, b, model.count_targets(b["labels"]))
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind, task", [("bert", "classify"), ("gpt2", "classify"), ("gpt2", "lm"),
                                        ("llama", "classify"), ("llama", "lm")])
@pytest.mark.parametrize("patterns", [["embeddings"], ["layers:2"], ["layers:1", "*.mlp.*"]])
def test_frozen_parts_leave_the_other_gradients_unchanged(kind, task, patterns):
    torch.manual_seed(0)
    full = build_model(CONFIGS[kind], task, num_labels=3).double()
    part = build_model(CONFIGS[kind], task, num_labels=3).double()
    part.load_state_dict(full.state_dict())
    if kind != "bert" and "*.mlp.*" in patterns:
        patterns = ["layers:1", "*.mlp.c_fc.*" if kind == "gpt2" else "*.mlp.gate_proj.*"]
    if kind == "bert" and "*.mlp.*" in patterns:
        patterns = ["layers:1", "*.intermediate.*"]
    frozen = set(freeze(part, patterns))
    b = batch(task)
    g_full, g_part = grads_after_step(full, b), grads_after_step(part, b)
    assert frozen and len(frozen) < len(g_full)
    for name, g in g_part.items():
        p = dict(part.named_parameters())[name]
        if not p.requires_grad:
            assert g is None, f"{name} is frozen but got a gradient"
        else:
            torch.testing.assert_close(g, g_full[name], rtol=1e-12, atol=1e-14, msg=name)
    # nothing was kept and left over: backward freed every kept tensor, and the frozen stages kept none
    assert kept_for_backward(part) == []
    optimizer = AdamW(param_groups(part, 0.01))
    state = optimizer.state_dict()[0]
    assert not any(key.split(".", 1)[1] in frozen for key in state), "AdamW keeps state for a frozen tensor"
    trainable, total = count_trainable(part)
    assert trainable < total


def test_stages_below_the_lowest_trainable_keep_nothing():
    torch.manual_seed(0)
    model = build_model(CONFIGS["bert"], "classify", num_labels=3)
    freeze(model, ["layers:2"])
    model.train()
    with torch.no_grad():
        model(batch("classify")["input_ids"])
    owners = {row[0] for row in kept_for_backward(model)}
    assert not any(o.startswith(("bert.embeddings", "bert.encoder.layer.0.", "bert.encoder.layer.1.")) for o in owners)
    assert any(o.startswith("bert.encoder.layer.2.") for o in owners)
    assert frozen_below(model.bert.encoder.layer[1]) and not frozen_below(model.bert.encoder.layer[2])


def test_a_frozen_linear_computes_no_weight_gradient():
    layer = Linear(4, 3)
    layer.weight.requires_grad_(False)
    layer.train()
    x, dy = torch.randn(2, 4), torch.randn(2, 3)
    with torch.no_grad():
        layer(x)
        dx = layer.backward(dy)
    assert layer.weight.grad is None and layer.bias.grad is not None and not hasattr(layer, "x")
    torch.testing.assert_close(dx, dy @ layer.weight)


def test_freeze_pattern_that_matches_nothing_is_a_clear_error():
    model = build_model(CONFIGS["bert"], "classify", num_labels=3)
    with pytest.raises(MiniftError, match="matches no parameter"):
        freeze(model, ["encoder.layers.9"])
    with pytest.raises(MiniftError, match="layers:N"):
        freeze(model, ["layers:two"])


def test_freezing_every_block_says_only_the_head_trains(capsys):
    model = build_model(CONFIGS["bert"], "classify", num_labels=3)
    depth = len(model.bert.encoder.layer)
    freeze(model, [f"layers:{depth - 1}"])
    assert "note:" not in capsys.readouterr().out
    freeze(model, [f"layers:{depth}"])
    assert f"note: layers:{depth} freezes all {depth} blocks of this model: only the head trains" in capsys.readouterr().out
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias",
                                                                            "bert.pooler.dense.weight", "bert.pooler.dense.bias"}


def test_kept_tensors_are_listed_and_the_estimate_adds_up(capsys):
    torch.manual_seed(0)
    model = build_model(CONFIGS["bert"], "classify", num_labels=3)
    b = batch("classify")
    model.train()
    with torch.no_grad():
        model(b["input_ids"], b["attention_mask"])
    rows = kept_for_backward(model)
    assert rows and all(size > 0 for *_, size in rows)
    assert ("bert.encoder.layer.0.attention.self.query", "x", (3, 7, 16), 3 * 7 * 16 * 4) in rows
    assert "total:" in format_kept(rows)
    # q, k and v keep the same input: a row each, one storage in memory
    shared = {t.untyped_storage().data_ptr() for o, n, t in kept_tensors(model) if o.endswith(("query", "key", "value"))
              and o.startswith("bert.encoder.layer.0.") and n == "x"}
    assert len(shared) == 1
    held = storage_bytes(list(kept_tensors(model)))
    assert held < sum(r[3] for r in rows)
    m = estimate_memory(model, b)
    assert m["activations"] == held  # the same forward keeps the same tensors, each storage counted once
    assert m["weights"] == sum(p.numel() * 4 for p in model.parameters()) == m["gradients"]
    assert kept_for_backward(model) == []  # and the estimate leaves nothing kept behind


# ---------------------------------------------------------------------------------------------------------
# A third family is one file and one dict entry: a toy family written here as a module. Its names are
# none of BERT's, GPT-2's or Llama's (the table is `lookup`, the blocks `floors`, the norm `calm`, the head
# `judge`), and its checkpoint keys differ from ours (`toy.` for `body.`): every generic module must find
# them through the family's constants, not by name.

@dataclass
class ToyConfig:
    vocab_size: int = 20
    hidden_size: int = 8
    num_labels: int = 2
    model_type: str = "toy"

    @classmethod
    def from_dict(cls, d):
        return cls(**{k: d[k] for k in ("vocab_size", "hidden_size", "num_labels") if k in d})


class ToyFloor(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.mix, self.calm = Linear(c.hidden_size, c.hidden_size), LayerNorm(c.hidden_size, 1e-5)

    def forward(self, x):
        return self.calm(self.mix(x))

    def backward(self, dout):
        return self.mix.backward(self.calm.backward(dout))


class ToyModel(Backbone):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.lookup = Embedding(c.vocab_size, c.hidden_size)
        self.floors = nn.ModuleList([ToyFloor(c), ToyFloor(c)])

    def stages(self):
        return [self.lookup, *self.floors]

    def forward(self, input_ids, attention_mask=None):
        h = self.lookup(input_ids)
        for floor in self.floors:
            h = floor(h)
        return h

    def backward(self, dh):
        for floor in reversed(self.floors):
            if frozen_below(floor):
                return
            dh = floor.backward(dh)
        self.lookup.backward(dh)


class ToyClassifier(Classifier):
    """Mean of two linear+norm floors over the embeddings, then a head: enough to load, train and save."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.body = ToyModel(c)
        self.judge = Linear(c.hidden_size, c.num_labels)

    def forward(self, input_ids, attention_mask=None):
        h = self.body(input_ids)
        self.T = h.shape[1]
        return self.judge(h.mean(1))

    def backward(self, dlogits):
        dmean = self.judge.backward(dlogits)
        self.body.backward(dmean.unsqueeze(1).expand(-1, self.T, -1) / self.T)


def toy_family():
    toy = types.ModuleType("toy")
    toy.MODEL_TYPES, toy.Config = ("toy",), ToyConfig
    toy.TASKS = {"classify": ToyClassifier, "encode": ToyModel}
    toy.NEW_HEADS, toy.UNUSED_HEADS, toy.LABEL_HEAD = ("judge.",), (), "judge.weight"
    toy.DEFAULT_TASK, toy.FAN_IN_FAN_OUT = "encode", False
    toy.hf_to_ours = lambda key, t, model: (key.replace("toy.", "body.", 1), t)
    toy.hf_state_dict = lambda model: {n.replace("body.", "toy.", 1): p.detach() for n, p in model.named_parameters()}
    toy.architecture = lambda model: "ToyForSequenceClassification"
    return toy


def toy_examples(n=16):
    return [{"input_ids": [1 + i % 5, 2 + i % 7, 3], "label": i % 2} for i in range(n)]


def test_a_toy_third_family_loads_trains_and_saves(tmp_path, monkeypatch):
    from minift.train import train

    monkeypatch.setitem(checkpoints.FAMILIES, "toy", toy_family())  # the one dict entry
    torch.manual_seed(0)
    model = build_model({"model_type": "toy", "vocab_size": 20, "hidden_size": 8}, "classify", num_labels=2)
    save_checkpoint(model, tmp_path / "base")
    loaded = load_checkpoint(tmp_path / "base", "classify", verbose=False)
    for (n, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert torch.equal(a, b), n
    examples = toy_examples()
    before = loaded.judge.weight.detach().clone()
    train(loaded, TrainData(examples, examples[:4], pad_id=0),
          TrainConfig(batch_size=4, epochs=1, lr=1e-2, precision="fp32", log_every=1), tmp_path / "run")
    assert not torch.equal(before, loaded.judge.weight)
    again = load_checkpoint(tmp_path / "run" / "best", "classify", verbose=False)
    assert isinstance(again, ToyClassifier)


def test_the_toy_family_under_freeze_lora_decay_and_export(tmp_path, monkeypatch):
    """Freeze, param_groups, LoRA through train(), save_adapter's peft layout and the merged best/ find the
    toy's head, tables and norms by the family's constants and by type, whatever they are called."""
    from minift.train import train

    monkeypatch.setitem(checkpoints.FAMILIES, "toy", toy_family())
    torch.manual_seed(0)
    model = build_model({"model_type": "toy", "vocab_size": 20, "hidden_size": 8}, "classify", num_labels=2)
    decay, plain = param_groups(model, 0.1)
    assert decay["names"] == ["body.floors.0.mix.weight", "body.floors.1.mix.weight", "judge.weight"]
    assert plain["names"] == ["body.lookup.weight", "body.floors.0.mix.bias", "body.floors.0.calm.weight",
                              "body.floors.0.calm.bias", "body.floors.1.mix.bias", "body.floors.1.calm.weight",
                              "body.floors.1.calm.bias", "judge.bias"]
    assert freeze(model, ["embeddings"]) == ["body.lookup.weight"]
    assert freeze(model, ["layers:1"]) == ["body.floors.0.calm.bias", "body.floors.0.calm.weight",
                                           "body.floors.0.mix.bias", "body.floors.0.mix.weight", "body.lookup.weight"]

    base = build_model({"model_type": "toy", "vocab_size": 20, "hidden_size": 8}, "classify", num_labels=2)
    save_checkpoint(base, tmp_path / "base")
    model = load_checkpoint(tmp_path / "base", "classify", verbose=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    examples = toy_examples()
    train(model, TrainData(examples, examples[:4], pad_id=0),
          TrainConfig(batch_size=4, epochs=1, lr=1e-2, precision="fp32", lora_r=2), tmp_path / "run")
    # train() attached the adapters itself: on every linear layer of the body, not on the new head, which trains
    assert sorted(lora_layers(model)) == ["body.floors.0.mix", "body.floors.1.mix"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"body.floors.{i}.mix.lora_{ab}" for i in (0, 1) for ab in "AB"} | {"judge.weight", "judge.bias"}
    moved = {n for n, p in model.named_parameters() if n in start and not torch.equal(p, start[n])}
    assert moved == {"judge.weight", "judge.bias"}  # the base weights are where they were
    # adapter/ in peft's layout, under the family's checkpoint keys (toy.), with the head as modules_to_save
    from safetensors.torch import load_file
    keys = set(load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert keys == {f"base_model.model.toy.floors.{i}.mix.lora_{ab}.weight" for i in (0, 1) for ab in "AB"} | \
        {"base_model.model.judge.weight", "base_model.model.judge.bias"}
    # best/ is a plain checkpoint (merged); base + adapter/ gives the same logits
    best = load_checkpoint(tmp_path / "run" / "best", "classify", verbose=False).eval()
    assert not lora_layers(best) and not best.load_report.new_head
    again = load_checkpoint(tmp_path / "base", "classify", verbose=False)
    load_adapter(again, tmp_path / "run" / "adapter")
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.testing.assert_close(best(ids), again.eval()(ids), rtol=1e-5, atol=1e-6)
