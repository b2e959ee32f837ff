"""minift.optim against its references: torch.optim.AdamW, torch.nn.utils.clip_grad_norm_ and the
Hugging Face schedules (the only places those are allowed to appear)."""

import json
import math

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from minift.checkpoints import build_model
from minift.errors import MiniftError
from minift.layers import Embedding
from minift.optim import AdamW, LRSchedule, clip_grad_norm, describe_groups, param_groups, warmup_steps_for

# A small model's parameters, named like BERT's; "frozen.weight" never gets a gradient. The body (what
# freeze.base_model finds: the module with `stages`) holds all but the classifier, as in a real model.
SHAPES = [("bert.embeddings.word_embeddings.weight", (50, 8)), ("bert.embeddings.LayerNorm.weight", (8,)),
          ("bert.embeddings.LayerNorm.bias", (8,)), ("bert.layer.0.dense.weight", (16, 8)),
          ("bert.layer.0.dense.bias", (16,)), ("bert.layer.0.LayerNorm.weight", (16,)),
          ("classifier.weight", (3, 16)), ("classifier.bias", (3,)), ("bert.frozen.weight", (4, 4))]
FROZEN = "bert.frozen.weight"


class Body(torch.nn.Module):
    def stages(self):
        return []


def module_of(named):
    """A model whose parameters are `named`, at their dotted paths: `word_embeddings` is a real Embedding
    (param_groups finds tables by type), `bert` the body."""
    root = torch.nn.Module()
    for name, p in named:
        *path, leaf = name.split(".")
        parent = root
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, Embedding(1, 1) if part == "word_embeddings" else
                                  Body() if part == "bert" else torch.nn.Module())
            parent = getattr(parent, part)
        parent.register_parameter(leaf, p)
    return root


def make_params(dtype):
    g = torch.Generator().manual_seed(0)
    return [(name, torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dtype))) for name, shape in SHAPES]


def set_grads(named, step):
    g = torch.Generator().manual_seed(1000 + step)  # same random grads for every copy of the model
    for name, p in named:
        p.grad = None if name == FROZEN else torch.randn(p.shape, generator=g, dtype=p.dtype)


def run_minift(named, steps, sched, start=0, opt=None):
    opt = opt or AdamW(param_groups(module_of(named), 0.1), lr=1.0, betas=(0.9, 0.98), eps=1e-6)
    for step in range(start, start + steps):
        set_grads(named, step)
        opt.step(lr=sched(step))
    return opt


def run_torch(named, steps, sched):
    groups = param_groups(module_of(named), 0.1)
    opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                            lr=1.0, betas=(0.9, 0.98), eps=1e-6)
    for step in range(steps):
        set_grads(named, step)
        for g in opt.param_groups:
            g["lr"] = sched(step)
        opt.step()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_adamw_matches_torch(dtype, tol):
    sched = LRSchedule(1e-2, 200, warmup_steps=20, decay="cosine", floor=1e-3)
    ours, theirs = make_params(dtype), [(n, torch.nn.Parameter(p.clone())) for n, p in make_params(dtype)]
    run_minift(ours, 200, sched)
    run_torch(theirs, 200, sched)
    diff = max((a - b).abs().max().item() for (_, a), (_, b) in zip(ours, theirs))
    start = make_params(dtype)
    moved = min((a - p0).abs().max().item() for (n, a), (_, p0) in zip(ours, start) if n != FROZEN)
    print(f"AdamW vs torch.optim.AdamW, {dtype}: max abs diff {diff:.3g}")
    assert diff <= tol
    assert moved > 1e-2  # the comparison means something only if the weights really moved
    assert torch.equal(dict(ours)[FROZEN], make_params(dtype)[-1][1])  # no grad: not even decayed


def test_adamw_groups_decay_only_matrices():
    named = make_params(torch.float32)
    opt = AdamW(param_groups(module_of(named), 0.5), lr=0.1)
    for _, p in named:
        p.grad = torch.zeros_like(p)  # zero gradient: the only change is weight decay
    before = {n: p.clone() for n, p in named}
    opt.step()
    for n, p in named:
        factor = 1 - 0.1 * 0.5 if n in ("bert.layer.0.dense.weight", "classifier.weight", FROZEN) else 1.0
        assert torch.allclose(p, before[n] * factor), n


def test_adamw_resume_is_bitwise():
    sched = LRSchedule(1e-2, 100, warmup_steps=10)
    straight = make_params(torch.float32)
    run_minift(straight, 100, sched)

    first = make_params(torch.float32)
    opt = run_minift(first, 50, sched)
    tensors, meta = opt.state_dict()
    tensors, meta = st_load(st_save(tensors)), json.loads(json.dumps(meta))  # through the real file formats
    resumed = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in first]  # leaves, as a model's are
    fresh = AdamW(param_groups(module_of(resumed), 0.1))  # default hyperparameters: load must restore the saved ones
    fresh.load_state_dict(tensors, meta)
    assert fresh.t == 50 and fresh.betas == (0.9, 0.98) and fresh.eps == 1e-6
    run_minift(resumed, 50, sched, start=50, opt=fresh)
    for (n, a), (_, b) in zip(straight, resumed):
        assert torch.equal(a, b), n


def test_load_state_dict_names_the_problem():
    named = make_params(torch.float32)
    tensors, meta = AdamW(param_groups(module_of(named), 0.1)).state_dict()
    assert set(tensors) == {f"{kind}.{n}" for kind in ("exp_avg", "exp_avg_sq") for n, _ in SHAPES}
    assert meta == {"step": 0, "lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": [0.1, 0.0]}
    missing = {k: v for k, v in tensors.items() if k != "exp_avg.classifier.bias"}
    extra = tensors | {"exp_avg.pooler.dense.weight": torch.zeros(8, 8)}
    shaped = tensors | {"exp_avg_sq.classifier.weight": torch.zeros(16, 3)}
    for bad, name in [(missing, "exp_avg.classifier.bias"), (extra, "exp_avg.pooler.dense.weight"),
                      (shaped, "exp_avg_sq.classifier.weight")]:
        with pytest.raises(MiniftError, match=name.replace(".", r"\.")):
            AdamW(param_groups(module_of(named), 0.1)).load_state_dict(bad, meta)


def test_zero_grad_sets_none():
    named = make_params(torch.float32)
    opt = AdamW(param_groups(module_of(named), 0.1))
    set_grads(named, 0)
    opt.zero_grad()
    assert all(p.grad is None for _, p in named)


# --- param_groups ------------------------------------------------------------------------------------------

def weight(*shape):
    """A trainable tensor (param_groups leaves frozen ones out)."""
    return torch.nn.Parameter(torch.zeros(*shape))


def test_param_groups_leave_frozen_tensors_out():
    named = [("a.weight", weight(3, 3)), ("b.weight", weight(3, 3).requires_grad_(False)), ("c.bias", weight(3))]
    decay, plain = param_groups(module_of(named), 0.01)
    assert decay["names"] == ["a.weight"] and plain["names"] == ["c.bias"]


def test_param_groups_bert_by_type():
    """No decay for biases, norm gains and embedding tables, found by what they are, not by their names."""
    cfg = {"model_type": "bert", "vocab_size": 30, "hidden_size": 4, "num_hidden_layers": 1,
           "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 16}
    model = build_model(cfg, "classify", num_labels=3)
    decay, plain = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert all(name.endswith("weight") and model.get_parameter(name).ndim == 2 for name in decay["names"])
    assert "classifier.weight" in decay["names"] and "bert.pooler.dense.weight" in decay["names"]
    embeddings = [n for n in plain["names"] if "_embeddings." in n]
    assert embeddings == ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                          "bert.embeddings.token_type_embeddings.weight"]
    assert {n for n in plain["names"] if n not in embeddings} == {n for n, p in model.named_parameters() if p.ndim < 2}
    assert len(decay["names"]) + len(plain["names"]) == len(list(model.parameters()))


def test_param_groups_gpt2_tied_weight_and_llama_embedding():
    gpt2 = build_model({"model_type": "gpt2", "vocab_size": 50, "n_embd": 8, "n_layer": 1, "n_head": 2,
                        "n_positions": 16}, "lm")
    decay, plain = param_groups(gpt2, 0.1)
    assert decay["names"] == ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                              "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]
    assert plain["names"][:2] == ["transformer.wte.weight", "transformer.wpe.weight"]
    wte = gpt2.transformer.wte.weight  # also the LM head's (heads.TiedLMHead): one tensor, updated once
    assert sum(p is wte for g in (decay, plain) for p in g["params"]) == 1
    # Llama names its table embed_tokens; the rule finds it by type all the same (d758b89 decayed it).
    llama = build_model({"model_type": "llama", "vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16,
                         "tie_word_embeddings": True}, "lm")
    decay, plain = param_groups(llama, 0.1)
    assert "model.embed_tokens.weight" in plain["names"] and "model.embed_tokens.weight" not in decay["names"]
    assert all(llama.get_parameter(n).ndim == 2 for n in decay["names"])


def test_a_faster_head_gets_its_own_groups_and_matches_torch_per_group_lr():
    """head_lr_scale: the head's tensors move to groups of their own whose lr is the schedule's times the scale;
    the same as torch.optim.AdamW given that lr for those groups."""
    named = make_params(torch.float64)
    groups = param_groups(module_of(named), 0.1, head_lr_scale=10)  # the head: what lies outside the body
    assert [g["names"] for g in groups[2:]] == [["classifier.weight"], ["classifier.bias"]]
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.1, 1.0), (0.0, 1.0), (0.1, 10), (0.0, 10)]
    assert "classifier.weight" not in groups[0]["names"] and "classifier.bias" not in groups[1]["names"]
    assert describe_groups(groups).endswith("| decay at lr x10: 1 tensors, 48 params | no decay at lr x10: 1 tensors, 3 params")
    assert len(param_groups(module_of(named), 0.1)) == 2  # scale 1: no groups of its own

    sched = LRSchedule(1e-3, 50, warmup_steps=5)
    theirs = [(n, torch.nn.Parameter(p.clone())) for n, p in named]
    ours_opt = AdamW(groups, lr=1.0, betas=(0.9, 0.98), eps=1e-6)
    their_groups = param_groups(module_of(theirs), 0.1, head_lr_scale=10)
    torch_opt = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"], "scale": g["lr_scale"]}
                                   for g in their_groups], lr=1.0, betas=(0.9, 0.98), eps=1e-6)
    for step in range(50):
        set_grads(named, step)
        set_grads(theirs, step)
        ours_opt.step(lr=sched(step))
        for g in torch_opt.param_groups:
            g["lr"] = sched(step) * g["scale"]
        torch_opt.step()
    diff = max((a - b).abs().max().item() for (_, a), (_, b) in zip(named, theirs))
    start = dict(make_params(torch.float64))
    head_moved = (dict(named)["classifier.weight"] - start["classifier.weight"]).abs().max().item()
    body_moved = (dict(named)["bert.layer.0.dense.weight"] - start["bert.layer.0.dense.weight"]).abs().max().item()
    assert diff < 1e-12
    assert head_moved > 5 * body_moved  # the head really took bigger steps


# --- clip_grad_norm -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(max_norm):
    g = torch.Generator().manual_seed(0)
    ours = [torch.zeros(s) for s in [(10, 7), (7,), (3, 3, 3)]] + [torch.zeros(5)]  # the last has no grad
    for p in ours[:3]:
        p.grad = torch.randn(p.shape, generator=g)
    theirs = [torch.nn.Parameter(p.clone()) for p in ours]
    for a, b in zip(ours, theirs):
        b.grad = None if a.grad is None else a.grad.clone()
    before = torch.cat([p.grad.flatten() for p in ours[:3]]).norm().item()
    norm = clip_grad_norm(ours, max_norm)
    ref = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert isinstance(norm, float) and norm == ref.item()
    assert norm == pytest.approx(before, rel=1e-6)  # the norm before clipping
    for a, b in zip(ours[:3], theirs[:3]):
        assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=0)
    after = torch.cat([p.grad.flatten() for p in ours[:3]]).norm().item()
    assert after == pytest.approx(min(before, max_norm), rel=1e-5)


def test_clip_grad_norm_leaves_nonfinite_alone():
    p, q = torch.zeros(3), torch.zeros(2)
    p.grad, q.grad = torch.tensor([1.0, float("inf"), 2.0]), torch.tensor([3.0, 4.0])
    assert clip_grad_norm([p, q], 1.0) == math.inf
    assert torch.equal(q.grad, torch.tensor([3.0, 4.0]))  # not clipped: the loop decides to skip the step


def test_clip_grad_norm_bf16_grads_norm_in_fp32():
    p = torch.zeros(4096, dtype=torch.bfloat16)
    p.grad = torch.full((4096,), 0.1, dtype=torch.bfloat16)
    expected = p.grad.float().norm().item()
    assert clip_grad_norm([p], 1.0) == pytest.approx(expected, rel=1e-6)
    assert p.grad.dtype == torch.bfloat16 and p.grad.float().norm().item() == pytest.approx(1.0, rel=1e-2)


# --- LRSchedule ----------------------------------------------------------------------------------------------

PEAK, TOTAL, WARM, FLOOR = 1e-3, 100, 10, 1e-4
TAIL = 0.5 * (1 + math.cos(math.pi * 89 / 90))  # cosine fraction left at step 99


@pytest.mark.parametrize("decay, floor, expected", [
    # steps:            0    5 (mid-warmup)  10 (peak)  55 (middle)                99 (last update)              100
    ("linear", 0.0,    [0.0, PEAK / 2,      PEAK,      PEAK * 45 / 90,            PEAK / 90,                    0.0]),
    ("linear", FLOOR,  [0.0, PEAK / 2,      PEAK,      FLOOR + 9e-4 / 2,          FLOOR + 9e-4 / 90,            FLOOR]),
    ("cosine", 0.0,    [0.0, PEAK / 2,      PEAK,      PEAK / 2,                  PEAK * TAIL,                  0.0]),
    ("cosine", FLOOR,  [0.0, PEAK / 2,      PEAK,      FLOOR + 9e-4 / 2,          FLOOR + 9e-4 * TAIL,          FLOOR]),
    ("constant", 0.0,  [0.0, PEAK / 2,      PEAK,      PEAK,                      PEAK,                         PEAK]),
])
def test_schedule_hand_values(decay, floor, expected):
    sched = LRSchedule(PEAK, TOTAL, warmup_steps=WARM, decay=decay, floor=floor)
    got = [sched(s) for s in (0, 5, 10, 55, 99, 100)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert sched(500) == pytest.approx(expected[-1])  # past the end: stays at the floor


def test_schedule_without_warmup_starts_at_peak():
    assert LRSchedule(PEAK, TOTAL)(0) == PEAK
    assert LRSchedule(PEAK, TOTAL, decay="cosine")(0) == PEAK


def _hf_lrs(make, total, warmup, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=PEAK)
    sched = make(opt, warmup, total, **kw)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])  # the lr the next update uses
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("total, warmup", [(100, 10), (1862, 112), (7, 0), (5, 5)])
def test_schedule_matches_transformers(total, warmup):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    linear = LRSchedule(PEAK, total, warmup_steps=warmup)
    assert [linear(s) for s in range(total)] == _hf_lrs(get_linear_schedule_with_warmup, total, warmup)  # exact
    cosine = LRSchedule(PEAK, total, warmup_steps=warmup, decay="cosine")
    assert [cosine(s) for s in range(total)] == pytest.approx(_hf_lrs(get_cosine_schedule_with_warmup, total, warmup),
                                                              rel=1e-12, abs=1e-18)


def test_schedule_plan_and_errors():
    total = 1862
    warmup = warmup_steps_for(total, 0.06)
    assert warmup == 112  # ceil(111.72)
    assert LRSchedule(5e-5, total, warmup).describe() == \
        "lr plan: 1862 optimizer steps, warmup 112 (6%), peak 5e-05, linear decay to 0"
    assert LRSchedule(5e-5, total, warmup, "cosine", 1e-6).describe().endswith("cosine decay to 1e-06")
    for kwargs in [dict(decay="step"), dict(warmup_steps=101), dict(floor=1.0), dict(decay="constant", floor=1e-5)]:
        with pytest.raises(MiniftError):
            LRSchedule(1e-3, 100, **kwargs)
    with pytest.raises(MiniftError):
        warmup_steps_for(100, 6)
    # warm-up starts at lr 0: a run of one step (or all warm-up) still trains its last step at the peak
    assert [warmup_steps_for(n, 0.06) for n in (1, 2, 17, 18)] == [0, 1, 2, 2] and warmup_steps_for(10, 1.0) == 9
    plan = LRSchedule(5e-5, 1, warmup_steps_for(1, 0.1))
    assert plan(0) == 5e-5
