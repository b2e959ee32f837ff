"""The Gemma family (models/gemma.py): Gemma 3 text and Gemma 2. Every new piece's hand-written backward against
autograd in float64 (the (1 + w) RMSNorm, GeGLU, the soft caps, the scaled and capped attention, the sandwich
block, whole models with dropout, LoRA); logits, classifier logits, a save and greedy generation against
transformers 5 on random-init checkpoints (GQA 1-3 and MHA, tied and untied heads, both padding sides, windows of
2-4 under 7-token rows, soft-capping on and off, Gemma 3's linear RoPE scaling); a gemma3 (vision) checkpoint's
language model; the training levers (recompute, the chunked loss with the capped head, LoRA, freezing)."""
import json
import math

import pytest
import torch

from minift import checkpoints
from minift.errors import MiniftError
from minift.heads import attention_allowed
from minift.layers import RotaryEmbedding
from minift.models import gemma
from minift.models.gemma import (GeGLU, GemmaAttention, GemmaConfig, GemmaDecoderLayer, GemmaForCausalLM, GemmaMLP,
                                 GemmaModel, GemmaRMSNorm)
from test_layers import check_layer
from test_llama import (LEVERS, built, hf_inputs, lever_gradient_errors, levers_batch, model_grad_errors, perturb,
                        ragged, rel_err, set_adapters)

TOL = 1e-8

SHAPES = {
    # Gemma 3: q/k norms, local layers with their own RoPE base; GQA 2, head_dim 12 (not 32 / 4), 1 global in 3
    "gemma3-gqa2-tied": dict(model_type="gemma3_text", vocab_size=71, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                             query_pre_attn_scalar=16, sliding_window=3, rope_theta=1e6, rope_local_base_freq=1e4,
                             layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    # one k/v head, an untied head, biases, the global layers' RoPE scaled linearly (Gemma 3 4B and up)
    "gemma3-mqa-untied-linear": dict(model_type="gemma3_text", vocab_size=67, hidden_size=32, intermediate_size=40,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                     query_pre_attn_scalar=8, sliding_window=4, sliding_window_pattern=2,
                                     rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_word_embeddings=False,
                                     attention_bias=True, max_position_embeddings=64),
    # a final soft cap on Gemma 3 (its attention cap is ignored by transformers, so by minift too); GQA 3
    "gemma3-gqa3-finalcap": dict(model_type="gemma3_text", vocab_size=59, hidden_size=48, intermediate_size=40,
                                 num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                 query_pre_attn_scalar=32, sliding_window=2, sliding_window_pattern=3,
                                 final_logit_softcapping=1.5, attn_logit_softcapping=0.5, rms_norm_eps=1e-5),
    # Gemma 2: alternating local/global layers, soft caps small enough to bite (the real ones are 50 and 30)
    "gemma2-gqa2-caps": dict(model_type="gemma2", vocab_size=71, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             query_pre_attn_scalar=24, sliding_window=3, attn_logit_softcapping=0.5,
                             final_logit_softcapping=1.0),
    "gemma2-mha-nocap-untied": dict(model_type="gemma2", vocab_size=61, hidden_size=32, intermediate_size=40,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                    query_pre_attn_scalar=8, sliding_window=4, attn_logit_softcapping=None,
                                    final_logit_softcapping=None, tie_word_embeddings=False, attention_bias=True,
                                    rope_theta=500.0),
}
HF_CLASSES = {"gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
              "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification")}


def config(shape, **overrides):
    return GemmaConfig.from_dict({**SHAPES[shape], "eos_token_id": None, "bos_token_id": None, **overrides})


def make(kind, shape, **overrides):
    c = config(shape, pad_token_id=0, num_labels=3, **overrides)
    return perturb(gemma.TASKS[kind](c))


def hf_model(transformers, shape, task="lm", **overrides):
    spec = {**SHAPES[shape], **overrides}
    config_cls, lm_cls, cls_cls = HF_CLASSES[spec.pop("model_type")]
    cfg = getattr(transformers, config_cls)(**spec, pad_token_id=0, attn_implementation="eager")
    torch.manual_seed(0)
    return perturb(getattr(transformers, lm_cls if task == "lm" else cls_cls)(cfg)).eval()


# ---- the new layers, one at a time ---------------------------------------------------------------------------

def test_gemma_rmsnorm_gradient_and_transformers(transformers):
    """x / rms(x) * (1 + w): the backward against autograd, the forward against transformers' Gemma3RMSNorm
    in fp32 and in bf16 (the (1 + w) in fp32: in bf16 1 + w would round w away)."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    norm = perturb(GemmaRMSNorm(24, eps=1e-6), scale=0.5)
    check_layer(norm, [torch.randn(3, 5, 24, dtype=torch.float64) * 2 + 0.5])
    ours, ref = perturb(GemmaRMSNorm(16, 1e-6), scale=0.01).float(), Gemma3RMSNorm(16, eps=1e-6)
    ref.weight.data.copy_(ours.weight)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    ours.bfloat16(), ref.bfloat16()
    torch.testing.assert_close(ours(x.bfloat16()), ref(x.bfloat16()), rtol=0, atol=0)
    assert GemmaRMSNorm(4, 1e-6).weight.abs().max() == 0  # a fresh norm is the identity gain


def test_geglu_and_mlp_gradients_and_transformers(transformers):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP
    gate, up = torch.randn(2, 5, 12, dtype=torch.float64) * 3, torch.randn(2, 5, 12, dtype=torch.float64)
    check_layer(GeGLU(), [gate, up])
    mlp = perturb(GemmaMLP(config("gemma3-gqa2-tied")), scale=0.3)
    check_layer(mlp, [torch.randn(2, 5, 32, dtype=torch.float64)])
    ref = Gemma3MLP(transformers.Gemma3TextConfig(hidden_size=32, intermediate_size=48))
    mlp.float()
    ref.load_state_dict(mlp.state_dict())
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp.eval()(x), ref(x), rtol=0, atol=1e-6)


class _Bound(torch.nn.Module):
    """GemmaAttention with its angles and mask fixed, so that x is its only input."""

    def __init__(self, attn, cos, sin, allowed):
        super().__init__()
        self.attn = attn
        for name, t in dict(cos=cos, sin=sin, allowed=allowed).items():  # buffers: not activations kept
            self.register_buffer(name, t, persistent=False)

    def forward(self, x):
        return self.attn(x, self.cos, self.sin, self.allowed)

    def backward(self, d):
        return self.attn.backward(d)


@pytest.mark.parametrize("shape", ["gemma3-gqa2-tied", "gemma3-gqa3-finalcap", "gemma2-gqa2-caps",
                                   "gemma2-mha-nocap-untied"])
@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_attention_gradient(shape, window, dropout, padded_batch):
    """q/k/v, Gemma 3's (1 + w) q/k norms or Gemma 2's capped scores, the query_pre_attn_scalar scale, RoPE, GQA,
    a window, padding on both sides."""
    c = config(shape, attention_dropout=dropout)
    attn = perturb(GemmaAttention(c, window), scale=0.3)
    _, mask = padded_batch([6, 3], "left", T=6)
    mask = torch.cat([mask, padded_batch([4], "right", T=6)[1]])
    cos, sin = RotaryEmbedding(c.head_dim, 100.0)((mask.cumsum(-1) - 1).clamp(min=0), torch.float64)
    x = torch.randn(3, 6, c.hidden_size, dtype=torch.float64) * 2
    check_layer(_Bound(attn, cos, sin, attention_allowed(mask, 6, window=window)), [x])


@pytest.mark.parametrize("shape", ["gemma3-gqa2-tied", "gemma2-gqa2-caps"])
def test_sandwich_block_gradient(shape, padded_batch):
    c = config(shape, attention_dropout=0.2)
    block = _Bound(perturb(GemmaDecoderLayer(c, 3), scale=0.3), *RotaryEmbedding(c.head_dim, 50.0)(
        torch.arange(6)[None].expand(2, 6), torch.float64), attention_allowed(torch.ones(2, 6), 6, window=3))
    check_layer(block, [torch.randn(2, 6, c.hidden_size, dtype=torch.float64)])


def test_embedding_scale_is_rounded_to_the_weights_dtype(transformers):
    """sqrt(hidden) in the weights' dtype, as transformers' Gemma3TextScaledWordEmbedding: in bf16 sqrt(640) =
    25.298 is 25.25, and the embedding output is bitwise transformers'."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding
    model = GemmaModel(config("gemma3-gqa2-tied", hidden_size=640, num_attention_heads=4, intermediate_size=8,
                              num_hidden_layers=1, layer_types=["full_attention"])).bfloat16()
    assert model.embed_scale().item() == 25.25 and model.embed_scale().dtype == torch.bfloat16
    ref = Gemma3TextScaledWordEmbedding(71, 640, 0, embed_scale=640 ** 0.5).bfloat16()
    ref.weight.data.copy_(model.embed_tokens.weight)
    ids = torch.randint(0, 71, (2, 5))
    assert torch.equal(model.embed_tokens(ids) * model.embed_scale(), ref(ids))


# ---- whole models against autograd ------------------------------------------------------------------------

@pytest.mark.parametrize("kind,shape", [("lm", "gemma3-gqa2-tied"), ("lm", "gemma3-mqa-untied-linear"),
                                        ("lm", "gemma3-gqa3-finalcap"), ("lm", "gemma2-gqa2-caps"),
                                        ("classify", "gemma2-mha-nocap-untied"), ("classify", "gemma3-gqa2-tied"),
                                        ("encode", "gemma2-gqa2-caps")])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_model_gradients_match_autograd(kind, shape, dropout, padded_batch):
    model = make(kind, shape, attention_dropout=dropout)
    inputs, labels = ragged(model, padded_batch)
    errors = model_grad_errors(model, inputs, labels)
    assert len(errors) == len(list(model.parameters()))
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{kind} {shape} dropout {dropout}: {worst} relative error {errors[worst]:.3e}"


def test_training_path_keeps_nothing_after_backward(padded_batch):
    for kind, shape in [("lm", "gemma2-gqa2-caps"), ("lm", "gemma3-mqa-untied-linear"), ("classify", "gemma3-gqa2-tied")]:
        model = make(kind, shape, attention_dropout=0.1).train()
        inputs, labels = ragged(model, padded_batch)
        with torch.no_grad():
            loss, d = model.loss(model(**inputs), labels)
            model.backward(d)
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())
        left = {f"{m}.{a}" for m, mod in model.named_modules() for a, v in vars(mod).items()
                if isinstance(v, torch.Tensor)}
        assert not left, f"{kind} {shape}: still held after backward: {left}"


# ---- against transformers --------------------------------------------------------------------------------

def load_folder(folder, task):
    return checkpoints.load_checkpoint(folder, task=task, verbose=False).eval()


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_lm_logits_match_transformers(shape, side, transformers, tmp_path, padded_batch):
    hf = hf_model(transformers, shape)
    hf.save_pretrained(tmp_path)
    ours = load_folder(tmp_path, "lm")
    assert not ours.load_report.missing and len(ours.load_report.loaded) == len(list(ours.parameters()))
    ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, side)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, mask)
    real = mask.bool()
    assert (out[real] - ref[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", ["gemma3-gqa2-tied", "gemma2-gqa2-caps"])
def test_classifier_logits_match_transformers(shape, transformers, tmp_path, padded_batch):
    hf = hf_model(transformers, shape, task="classify", num_labels=3)
    hf.save_pretrained(tmp_path)
    ours = load_folder(tmp_path, "classify")
    for side in ("left", "right"):
        ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, side)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            assert (ours(ids, mask) - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("shape,off", [("gemma2-gqa2-caps", dict(attn_logit_softcapping=None)),
                                       ("gemma2-gqa2-caps", dict(final_logit_softcapping=None)),
                                       ("gemma3-gqa3-finalcap", dict(final_logit_softcapping=None)),
                                       ("gemma3-gqa2-tied", dict(layer_types=["full_attention"] * 3)),
                                       ("gemma3-gqa2-tied", dict(rope_local_base_freq=1e6)),
                                       ("gemma3-mqa-untied-linear", dict(rope_scaling=None))])
def test_each_difference_changes_the_logits(shape, off, padded_batch):
    """The caps, the window and the local RoPE base bite in these shapes: the same weights without one give other
    logits, so the matches above check each. (Gemma 3 ignores its attention cap: turning it off changes nothing.)"""
    model = make("lm", shape).eval()
    other = GemmaForCausalLM(config(shape, pad_token_id=0, **off))
    other.load_state_dict(model.state_dict())
    ids, mask = padded_batch([7, 5], "left", model.config.vocab_size)
    with torch.no_grad():
        assert (model(ids, mask) - other.eval()(ids, mask))[mask.bool()].abs().max() > 1e-3
    same = GemmaForCausalLM(config("gemma3-gqa3-finalcap", pad_token_id=0, attn_logit_softcapping=None))
    assert same.model.layers[0].self_attn.attn.softcap is None and config("gemma3-gqa3-finalcap").qk_norm


@pytest.mark.parametrize("shape", ["gemma3-gqa2-tied", "gemma3-mqa-untied-linear", "gemma2-gqa2-caps",
                                   "gemma2-mha-nocap-untied"])
def test_checkpoint_round_trip_through_transformers(shape, transformers, tmp_path, padded_batch):
    """transformers -> minift (checkpoints.load_checkpoint) -> save_checkpoint -> transformers: the same
    architecture and bit for bit the same logits; a classifier loads from the saved folder."""
    hf = hf_model(transformers, shape)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_folder(tmp_path / "hf", "lm")
    checkpoints.save_checkpoint(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back) is type(hf) and type(back).__name__ == gemma.architecture(ours)
    ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, "left")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        again = back(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(ref, again)
    classifier = load_folder(tmp_path / "ours", "classify")
    assert classifier.load_report.new_head == ["score.weight"]


@pytest.mark.parametrize("shape", ["gemma3-gqa2-tied", "gemma2-gqa2-caps"])
def test_saved_from_scratch_loads_into_transformers(shape, transformers, tmp_path, padded_batch):
    """A model built from its config alone (no source config.json to carry keys along): save_checkpoint's
    config.json and safetensors give transformers the same logits."""
    ours = make("lm", shape).eval()
    checkpoints.save_checkpoint(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf).__name__ == gemma.architecture(ours)
    ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, "right")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, mask)
    assert (out[mask.bool()] - ref[mask.bool()]).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", list(SHAPES))
def test_greedy_generation_matches_transformers(shape, transformers, tmp_path, padded_batch):
    """Prompts of 6 and 3 tokens, left-padded, and 12 new ones, past every window: the local layers' caches
    trim themselves to w - 1 positions as transformers' do."""
    from minift.generate import generate
    hf = hf_model(transformers, shape, eos_token_id=None, bos_token_id=None)
    hf.save_pretrained(tmp_path)
    ours = load_folder(tmp_path, "lm")
    ids, mask = padded_batch([6, 3], "left", ours.config.vocab_size, pad_id=0)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert generate(ours, ids, max_new_tokens=12, attention_mask=mask, eos_token_id=-1).tolist() == ref.tolist()


@pytest.mark.parametrize("shape", ["gemma3-gqa2-tied", "gemma2-gqa2-caps"])
def test_windowed_cache_keeps_only_the_window(shape, padded_batch):
    model = make("lm", shape).eval()
    ids, mask = padded_batch([11, 6], "left", model.config.vocab_size, pad_id=0)
    with torch.no_grad():
        full = model(ids, mask)
        caches = model.new_cache()
        steps = [model(ids[:, :5], mask[:, :5], caches=caches)]
        steps += [model(ids[:, t:t + 1], mask[:, :t + 1], caches=caches) for t in range(5, 11)]
    real = mask.bool()
    assert (torch.cat(steps, 1)[real] - full[real]).abs().max() <= 1e-5
    windows = [model.config.window_of(i) for i in range(model.config.num_hidden_layers)]
    # a global layer holds all 11 positions; a local one at most its window and room for as many steps (or the prompt's 5)
    assert all(c.length == 11 if w is None else c.keys.shape[2] <= w - 1 + max(5, w) for c, w in zip(caches, windows))
    assert None in windows and any(windows)


def test_gemma3_vision_checkpoint_loads_its_language_model(transformers, tmp_path, padded_batch):
    """A gemma3 checkpoint (Gemma3ForConditionalGeneration: a vision tower, a projector and the language model
    under language_model.): minift loads the language model, reports the vision parts dropped, and gives the text
    logits transformers gives without an image; saved, it is a Gemma3ForCausalLM."""
    text = {k: v for k, v in SHAPES["gemma3-gqa2-tied"].items() if k != "model_type"}
    vision = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config={**text, "pad_token_id": 0}, vision_config=vision, mm_tokens_per_image=4)
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = perturb(transformers.Gemma3ForConditionalGeneration(cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_folder(tmp_path / "hf", "lm")
    assert ours.config.model_type == "gemma3_text" and ours.config.sliding_window == 3
    assert any(k.startswith("vision_tower.") for k in ours.load_report.dropped_head)
    ids, mask, positions = hf_inputs(padded_batch, ours.config.vocab_size, "left")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = ours(ids, mask)
    assert (out[mask.bool()] - ref[mask.bool()]).abs().max() <= 1e-5
    checkpoints.save_checkpoint(ours, tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back).__name__ == "Gemma3ForCausalLM"
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert (again[mask.bool()] - ref[mask.bool()]).abs().max() <= 1e-5


# ---- reading config.json --------------------------------------------------------------------------------

def test_config_spellings_and_defaults():
    """Gemma 3's RoPE: older files (rope_theta, rope_local_base_freq, rope_scaling for the global layers) and
    transformers 5's rope_parameters nested by layer kind read the same; layer_types from sliding_window_pattern
    (Gemma 3: 5 local, 1 global) or alternating (Gemma 2); Gemma 2's soft caps default to 50 and 30 when the keys
    are missing, and null turns them off."""
    base = dict(model_type="gemma3_text", num_hidden_layers=7, hidden_size=32, num_attention_heads=4,
                num_key_value_heads=1, head_dim=8)
    old = GemmaConfig.from_dict({**base, "rope_theta": 5e5, "rope_local_base_freq": 2e4,
                                 "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    new = GemmaConfig.from_dict({**base, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}}})
    for c in (old, new):
        assert (c.rope_theta, c.rope_local_base_freq, c.rope_scaling) == (5e5, 2e4, {"rope_type": "linear", "factor": 8.0})
        assert c.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    assert GemmaConfig.from_dict(base).rope_theta == 1e6 and GemmaConfig.from_dict(base).sliding_window == 4096
    g2 = GemmaConfig.from_dict({**base, "model_type": "gemma2", "num_hidden_layers": 3})
    assert g2.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping, g2.rope_theta) == (50.0, 30.0, 10000.0)
    off = GemmaConfig.from_dict({**base, "model_type": "gemma2", "attn_logit_softcapping": None,
                                 "final_logit_softcapping": None})
    assert off.attn_logit_softcapping is None and off.final_logit_softcapping is None
    g3 = GemmaConfig.from_dict({**base, "attn_logit_softcapping": 50.0})
    assert g3.attn_logit_softcapping is None  # transformers' Gemma 3 never caps its scores


@pytest.mark.parametrize("extra,words", [
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(hidden_activation="silu"), "hidden_activation"),
    (dict(model_type="gemma3n_text"), "gemma3n_text"),
    (dict(layer_types=["full_attention"]), "layer_types"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}), "local"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "'dynamic'"),
    (dict(num_key_value_heads=3), "multiple"),
])
def test_refusals(extra, words):
    with pytest.raises(MiniftError) as e:
        GemmaConfig.from_dict({**SHAPES["gemma3-gqa2-tied"], **extra})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_architecture_names():
    assert [gemma.architecture(gemma.TASKS[t](config("gemma3-gqa2-tied"))) for t in ("lm", "classify", "encode")] == [
        "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification", "Gemma3TextModel"]
    assert [gemma.architecture(gemma.TASKS[t](config("gemma2-gqa2-caps"))) for t in ("lm", "classify", "encode")] == [
        "Gemma2ForCausalLM", "Gemma2ForSequenceClassification", "Gemma2Model"]


# ---- LoRA, freezing, recompute, the chunked loss, preference log-probs, the memory estimate -------------------

@pytest.mark.parametrize("lever", list(LEVERS))
@pytest.mark.parametrize("shape", ["gemma3-gqa2-tied", "gemma2-gqa2-caps", "gemma3-mqa-untied-linear"])
def test_training_levers_keep_the_gradients(shape, lever, padded_batch):
    """recompute (bitwise), the chunked loss (Gemma 2's capped head a chunk at a time), LoRA under both: the
    plain hand-written run's gradients, float64."""
    settings, reference = LEVERS[lever]
    assert lever_gradient_errors(SHAPES[shape], settings, reference, padded_batch) < 1e-12


def test_frozen_layers_leave_the_other_gradients(padded_batch):
    from minift.freeze import freeze
    from minift.objective import forward_backward
    runs = []
    for patterns in ([], ["layers:2"]):
        model = built(SHAPES["gemma3-gqa2-tied"], "classify").double().train()
        if patterns:
            freeze(model, patterns)
        b = levers_batch(model, padded_batch)
        forward_backward(model, b, model.count_targets(b["labels"]))
        runs.append({n: p.grad for n, p in model.named_parameters()})
    full, frozen = runs
    trained = [n for n, g in frozen.items() if g is not None]
    assert frozen["model.layers.1.self_attn.q_norm.weight"] is None and "model.layers.2.mlp.up_proj.weight" in trained
    assert max(rel_err(frozen[n], full[n]) for n in trained) < TOL


@pytest.mark.parametrize("shape", ["gemma3-gqa2-tied", "gemma2-gqa2-caps"])
def test_lora_gradients_match_autograd(shape, padded_batch):
    from minift.lora import add_lora, lora_layers
    model = built(SHAPES[shape])
    add_lora(model, "all-linear", r=4, alpha=8, dropout=0.1)
    assert {n.rpartition(".")[2] for n in lora_layers(model)} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"}
    set_adapters(model)
    b = levers_batch(model, padded_batch)
    errors = model_grad_errors(model, {k: v for k, v in b.items() if k != "labels"}, b["labels"])
    assert set(errors) == {n for n, p in model.named_parameters() if p.requires_grad} and max(errors.values()) < TOL


@pytest.mark.parametrize("shape", ["gemma3-gqa2-tied", "gemma2-gqa2-caps"])
def test_lora_adapter_round_trip_with_peft(shape, transformers, tmp_path, padded_batch):
    """Our adapter in peft on transformers' Gemma gives our logits; peft's adapter loaded by minift gives peft's."""
    peft = pytest.importorskip("peft")
    from minift.lora import add_lora, load_adapter, save_adapter
    model = built(SHAPES[shape])
    checkpoints.save_checkpoint(model, tmp_path / "base")
    add_lora(model, "all-linear", r=4, alpha=8)
    set_adapters(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=tmp_path / "base")
    ids, mask, positions = hf_inputs(padded_batch, model.config.vocab_size, "left")
    real = mask.bool()

    def hf_base():
        return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")

    theirs = peft.PeftModel.from_pretrained(hf_base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert (model.eval()(ids, mask)[real] - ref[real]).abs().max() <= 1e-5
        plain = hf_base().eval()(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert (plain[real] - ref[real]).abs().max() > 1e-3
    # and back: peft's own adapter (its A and B drawn by peft, B moved off zero) loaded into a fresh minift model
    other = peft.get_peft_model(hf_base(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in other.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    other.save_pretrained(tmp_path / "peft")
    fresh = checkpoints.load_checkpoint(tmp_path / "base", task="lm", verbose=False)
    load_adapter(fresh, tmp_path / "peft")
    with torch.no_grad():
        want = other.eval()(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert (fresh.eval()(ids, mask)[real] - want[real]).abs().max() <= 1e-5


def test_chunked_preference_logprobs_through_the_capped_head(padded_batch):
    """preference.sequence_logprobs with the chunked head on Gemma 2 (final cap on): the log-probs and every
    gradient of the plain head's, float64."""
    from minift.preference import sequence_logprobs, sequence_logprobs_backward
    runs = []
    for chunk in (0, 3):
        model = built(SHAPES["gemma2-gqa2-caps"]).double().train()
        model.loss_chunk = chunk
        b = levers_batch(model, padded_batch)
        with torch.no_grad():
            lp = sequence_logprobs(model, b)
            sequence_logprobs_backward(model, lp, torch.linspace(-1, 1, len(lp.sums), dtype=torch.float64))
        runs.append((lp.tokens, {n: p.grad for n, p in model.named_parameters()}))
    (plain_tokens, plain), (chunk_tokens, chunked) = runs
    torch.testing.assert_close(chunk_tokens, plain_tokens, rtol=1e-12, atol=1e-12)
    assert max(rel_err(chunked[n], plain[n]) for n in plain) < 1e-12


def test_memory_estimate_and_kept_tensors(padded_batch):
    from minift.memory import estimate_memory, kept_for_backward
    model = built(SHAPES["gemma2-gqa2-caps"])
    b = levers_batch(model, padded_batch)
    m = estimate_memory(model, b)
    assert m["activations"] > 0 and m["levers"]["recompute=1"] > 0 and m["levers"]["chunked_loss=1024"] >= 0
    model.train()
    with torch.no_grad():
        model(b["input_ids"], b["attention_mask"])
    kept = {(owner, name) for owner, name, *_ in kept_for_backward(model)}
    assert ("final_softcap", "t") in kept and ("model.layers.0.self_attn.attn.softcap", "t") in kept
    assert ("model.layers.2.post_feedforward_layernorm", "xhat") in kept


def test_levers_through_train_reach_the_same_weights(tmp_path):
    """Through train(): four steps of a Gemma 2 (capped head) with recompute and the chunked loss reach the weights
    of four plain steps (the loop, AdamW and the levers together, fp32: equal to rounding)."""
    from minift.batching import TrainData
    from minift.config import TrainConfig
    from minift.train import train
    from test_freeze import lm_rows

    def run(extra):
        model = built({**SHAPES["gemma2-gqa2-caps"], "vocab_size": 50})
        rows = lm_rows()
        cfg = TrainConfig(batch_size=4, grad_accum=2, lr=1e-3, max_steps=4, precision="fp32", metric="loss",
                          log_every=1, **extra)
        train(model, TrainData(rows, rows[:4], pad_id=0), cfg, tmp_path / str(len(extra)))
        return dict(model.named_parameters())

    plain, ours = run({}), run(dict(recompute=1, chunked_loss=5))
    start = dict(built({**SHAPES["gemma2-gqa2-caps"], "vocab_size": 50}).named_parameters())
    for name in plain:
        torch.testing.assert_close(ours[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert max((plain[n] - start[n]).abs().max() for n in plain) > 1e-4  # it trained


def test_json_config_written_by_save_reads_back(tmp_path):
    model = make("lm", "gemma3-mqa-untied-linear")
    checkpoints.save_checkpoint(model, tmp_path)
    back = GemmaConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert back == model.config and math.isclose(back.rope_scaling["factor"], 4.0)


@pytest.mark.parametrize("shape", ["gemma2-gqa2-caps", "gemma3-gqa2-tied"])
@pytest.mark.parametrize("chunk", [0, 4])
def test_dpo_step_gradients_match_autograd(shape, chunk):
    """A DPO step (preference.dpo_step, the reference by switching the LoRA adapters off, dropout on, with and
    without the chunked head through Gemma 2's cap): the loss and every adapter gradient as autograd's, float64."""
    from minift.lora import add_lora
    from minift.preference import dpo_step, pair_loss, preference_batch, reference_logprobs, sequence_logprobs
    model = built({**SHAPES[shape], "vocab_size": 50, "attention_dropout": 0.2}).double()
    add_lora(model, "all-linear", r=2, alpha=4, dropout=0.1)
    set_adapters(model)
    model.train().loss_chunk = chunk
    batch = preference_batch([[1, 3, 4], [8, 9], [20, 21, 22, 23]], [[5, 6, 2], [10, 2], [30, 2]],
                             [[7, 2], [11, 12, 13, 2], [31, 32, 2]], pad_id=0)
    torch.manual_seed(5)
    loss, _ = dpo_step(model, batch, "sigmoid", beta=0.5, label_smoothing=0.1)
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    ref, policy = reference_logprobs(model, batch), sequence_logprobs(model, batch)
    losses, _, _ = pair_loss("sigmoid", policy, ref, 0.5, 0.1)
    (losses.sum() / 3).backward()
    assert loss == pytest.approx((losses.sum() / 3).item(), rel=1e-12)
    assert max(rel_err(ours[n], p.grad) for n, p in model.named_parameters() if p.requires_grad) < TOL


@pytest.mark.parametrize("shape", ["gemma2-gqa2-caps", "gemma3-gqa2-tied"])
def test_bf16_autocast_step_strays_from_fp32_as_transformers_does(shape, transformers, tmp_path, padded_batch):
    """Under bf16 autocast (precision="bf16": fp32 weights, bf16 matmuls; norms, softmax and the caps' tanh as the
    layers keep them) the hand-written step's gradients stray from its fp32 ones by bf16's rounding: measured
    1-3% of their norm here, as transformers' autograd step strays from its own (so within 2x of it); the
    master gradients stay fp32. The model cast to bf16 gives transformers' bf16 logits to bf16's rounding."""
    from minift.objective import forward_backward
    hf = hf_model(transformers, shape).train()
    hf.save_pretrained(tmp_path)
    b = levers_batch(load_folder(tmp_path, "lm"), padded_batch)
    positions = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    ours, theirs = [], []
    for autocast in (False, True):
        model = load_folder(tmp_path, "lm").train()
        hf.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            forward_backward(model, b, model.count_targets(b["labels"]))
            logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=positions).logits
            model.loss(logits.float(), b["labels"])[0].backward()  # the same loss, through transformers' autograd
        assert all(p.grad.dtype == torch.float32 for p in model.parameters())
        ours.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        theirs.append(torch.cat([p.grad.flatten() for p in hf.parameters() if p.grad is not None]))
    ours_gap, their_gap = ((run[1] - run[0]).norm() / run[0].norm() for run in (ours, theirs))
    assert 0 < ours_gap < 2 * their_gap and their_gap < 0.05
    model = load_folder(tmp_path, "lm").bfloat16()
    ids, mask, positions = hf_inputs(padded_batch, model.config.vocab_size, "left")
    with torch.no_grad():
        ref = hf.bfloat16().eval()(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
        out = model(ids, mask).float()
    assert (out - ref)[mask.bool()].abs().max() <= 0.05 * ref.abs().max()
