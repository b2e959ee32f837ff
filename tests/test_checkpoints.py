"""checkpoints.py: HF -> minift -> HF round trips, weight tying, atomic writes, and the errors a user sees
for a bad checkpoint folder (each a one-line MiniftError that names the problem)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minift.checkpoints import build_model, load_checkpoint, save_checkpoint
from minift.files import atomic_write
from minift.errors import MiniftError


def one_line(excinfo):
    message = str(excinfo.value)
    assert message and "\n" not in message, f"MiniftError must be one line: {message!r}"
    return message


def rewrite_tensors(folder, change):
    """Load model.safetensors, let change(dict) edit it, write it back."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# --- round trip ------------------------------------------------------------------------------------------

ROUND_TRIPS = [  # (HF class saved, our task, HF class that reads our save)
    ("BertForSequenceClassification", "classify", "BertForSequenceClassification"),
    ("BertModel", "encode", "BertModel"),
    ("RobertaModel", "encode", "RobertaModel"),
    ("RobertaForSequenceClassification", "classify", "RobertaForSequenceClassification"),
    ("GPT2LMHeadModel", "lm", "GPT2LMHeadModel"),
    ("GPT2Model", "lm", "GPT2Model"),
    ("GPT2ForSequenceClassification", "classify", "GPT2ForSequenceClassification"),
]


@pytest.mark.parametrize("size", [0, 1])
@pytest.mark.parametrize("hf_cls, task, reader", ROUND_TRIPS)
def test_round_trip_gives_back_the_exact_tensors(hf_cls, task, reader, size, hf_checkpoint, padded_batch,
                                                 transformers, tmp_path):
    extra = dict(num_labels=3, pad_token_id=0) if hf_cls == "GPT2ForSequenceClassification" else \
        dict(num_labels=3) if task == "classify" else {}
    hf, folder = hf_checkpoint(hf_cls, size, **extra)
    ours = load_checkpoint(folder, task=task, verbose=False)
    out = save_checkpoint(ours, tmp_path / "ours")
    assert not list(out.glob("*.tmp")), "a .tmp file was left behind"
    back, info = getattr(transformers, reader).from_pretrained(out, attn_implementation="eager",
                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    original, returned = hf.state_dict(), back.eval().state_dict()
    assert original.keys() == returned.keys()
    for key, t in original.items():
        assert torch.equal(returned[key], t), f"{key} changed in the round trip"
    pad = 1 if hf_cls.startswith("Roberta") else 0
    ids, mask = padded_batch([7, 4, 2], "right", hf.config.vocab_size, pad)
    with torch.no_grad():
        a, b = hf(input_ids=ids, attention_mask=mask), back(input_ids=ids, attention_mask=mask)
    key = "logits" if "logits" in a else "last_hidden_state"
    assert torch.equal(a[key], b[key])
    # and minift reads its own save to the same parameters
    again = load_checkpoint(out, task=task, verbose=False)
    for (n, p), (m, q) in zip(ours.named_parameters(), again.named_parameters()):
        assert n == m and torch.equal(p, q), n


def test_conv1d_weights_are_transposed_on_load(hf_checkpoint):
    hf, folder = hf_checkpoint("GPT2LMHeadModel", 1)  # n_inner 80 != n_embd 48: no square matrix hides a bug
    ours = load_checkpoint(folder, task="lm", verbose=False)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        h, o = hf.transformer.h[1].get_submodule(name), ours.transformer.h[1].get_submodule(name)
        assert torch.equal(o.weight, h.weight.T), name  # HF Conv1D (in, out), ours Linear (out, in)
        assert torch.equal(o.bias, h.bias)


def test_gpt2_weight_tying_survives_load_step_and_save(hf_checkpoint, padded_batch, transformers, tmp_path):
    hf, folder = hf_checkpoint("GPT2LMHeadModel", 0)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    ours = load_checkpoint(folder, task="lm", verbose=False)
    wte = ours.transformer.wte.weight
    assert sum(p is wte for p in ours.parameters()) == 1
    assert not any("lm_head" in n for n, _ in ours.named_parameters()), "the head is wte, not a copy"
    with torch.no_grad():
        wte.add_(torch.randn_like(wte) * 0.1)  # a "training step" on the tied weight
    ids, mask = padded_batch([6, 3], "right", hf.config.vocab_size, 0)
    with torch.no_grad():
        expect = ours.eval()(ids, mask)
    out = save_checkpoint(ours, tmp_path / "ours")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # one tensor on disk
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) is True
    back = transformers.GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr(), "HF must re-tie the head"
    assert torch.equal(back.lm_head.weight, wte)
    with torch.no_grad():
        got = back(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (got[keep] - expect[keep]).abs().max() <= 1e-5


def test_label_names_are_saved_for_transformers(hf_checkpoint, transformers, tmp_path):
    _, folder = hf_checkpoint("BertModel", 0)
    ours = load_checkpoint(folder, task="classify", num_labels=3, verbose=False)
    assert [n for n in ours.load_report.new_head] == ["classifier.weight", "classifier.bias"]
    assert ours.label_names is None and ours.max_length is None  # the file names no classes yet
    # What is saved beside the weights rides on the model: its class names, max_length and tokenizer.
    ours.label_names, ours.max_length, ours.tokenizer_file = ["neg", "neu", "pos"], 48, folder / "tokenizer.json"
    (folder / "tokenizer.json").write_text("{}")
    out = save_checkpoint(ours, tmp_path / "ours")
    back = transformers.BertForSequenceClassification.from_pretrained(out)
    assert back.config.id2label == {0: "neg", 1: "neu", 2: "pos"} and back.classifier.weight.shape[0] == 3
    assert torch.equal(back.classifier.weight, ours.classifier.weight)
    assert (out / "tokenizer.json").read_text() == "{}"
    again = load_checkpoint(out, task="classify", verbose=False)
    assert again.config.num_labels == 3 and again.label_names == ["neg", "neu", "pos"] and again.max_length == 48
    assert again.source == str(out) and again.tokenizer_file == out / "tokenizer.json"


def test_a_mean_pooled_classifier_claims_only_its_encoder(hf_checkpoint, padded_batch, transformers, tmp_path):
    """transformers' BertForSequenceClassification pools [CLS] through a pooler: a mean-pooled classifier must not
    claim it. It says BertModel, which transformers computes the same; mean pooling + its classifier tensors
    then give minift's logits. A [CLS]-pooled one still claims (and loads as) the classifier."""
    hf, folder = hf_checkpoint("BertModel", 0)
    ours = load_checkpoint(folder, task="classify", num_labels=3, pooling="mean", verbose=False).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        ours.classifier.weight.normal_()
    out = save_checkpoint(ours, tmp_path / "mean")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["pooling"] == "mean"
    ids, mask = padded_batch([7, 3], "right", hf.config.vocab_size)
    body = transformers.AutoModel.from_pretrained(out).eval()
    assert type(body).__name__ == "BertModel"
    head = load_file(out / "model.safetensors")
    with torch.no_grad():
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        theirs = torch.nn.functional.linear(pooled, head["classifier.weight"], head["classifier.bias"])
        mine = ours(ids, mask)
    assert (theirs - mine).abs().max() <= 1e-5
    again = load_checkpoint(out, task="classify", verbose=False).eval()  # and minift reads it back as it was
    with torch.no_grad():
        assert torch.equal(again(ids, mask), mine)

    cls = load_checkpoint(folder, task="classify", num_labels=3, pooling="cls", verbose=False)
    out = save_checkpoint(cls, tmp_path / "cls")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]


def test_load_report_and_skipped_buffers(hf_checkpoint):
    _, folder = hf_checkpoint("BertForMaskedLM", 0)  # a pretraining head (cls.*) and no pooler
    rewrite_tensors(folder, lambda t: t.update({"bert.embeddings.position_ids": torch.arange(40)[None]}))
    ours = load_checkpoint(folder, task="classify", verbose=False)
    r = ours.load_report
    assert r.skipped_buffers == ["bert.embeddings.position_ids"]
    assert r.dropped_head and all(k.startswith("cls.") for k in r.dropped_head)
    assert sorted(r.new_head) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                  "classifier.bias", "classifier.weight"]
    assert not r.missing and not r.unexpected and not r.mismatched
    assert len(r.loaded) + len(r.new_head) == len(list(ours.parameters()))


def test_gpt2_old_attention_bias_buffers_are_skipped(hf_checkpoint):
    _, folder = hf_checkpoint("GPT2LMHeadModel", 0)
    causal = torch.ones(1, 1, 40, 40).tril()
    rewrite_tensors(folder, lambda t: t.update({"transformer.h.0.attn.bias": causal,
                                                "transformer.h.0.attn.masked_bias": torch.tensor(-1e4)}))
    ours = load_checkpoint(folder, task="lm", verbose=False)
    assert sorted(ours.load_report.skipped_buffers) == ["transformer.h.0.attn.bias", "transformer.h.0.attn.masked_bias"]


@pytest.mark.parametrize("hf_cls", ["BertForMaskedLM", "RobertaForMaskedLM"])
def test_encoder_checkpoint_without_pooler_loads_for_encode(hf_cls, hf_checkpoint, padded_batch, transformers):
    """Many encoder checkpoints have no pooler (BertForMaskedLM, RobertaForMaskedLM such as roberta-base).
    task='encode' never uses the pooler, so it must not be reported missing."""
    hf, folder = hf_checkpoint(hf_cls, 0)
    ours = load_checkpoint(folder, task="encode", verbose=False).eval()
    pad = 1 if hf_cls.startswith("Roberta") else 0
    ids, mask = padded_batch([7, 3], "right", hf.config.vocab_size, pad)
    base = hf.roberta if hf_cls.startswith("Roberta") else hf.bert
    with torch.no_grad():
        a = base(input_ids=ids, attention_mask=mask).last_hidden_state
        b = ours(ids, mask)
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max() <= 1e-4


# --- atomic writes -----------------------------------------------------------------------------------------

def test_atomic_write_replaces_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")
    atomic_write(path, lambda tmp: open(tmp, "wb").write(b"new contents"))
    assert path.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def crash(tmp):
    with open(tmp, "w") as f:
        f.write('{"half')  # a torn write ...
    raise KeyboardInterrupt  # ... then the process is interrupted


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"old": true}')
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert path.read_text() == '{"old": true}', "the old file must survive"


def test_atomic_write_leaves_no_tmp_when_the_writer_fails(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"old": true}')
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"], "no torn .tmp left behind"


def test_save_checkpoint_into_existing_folder_overwrites_cleanly(hf_checkpoint, tmp_path):
    _, folder = hf_checkpoint("BertForSequenceClassification", 0, num_labels=3)
    ours = load_checkpoint(folder, task="classify", verbose=False)
    out = save_checkpoint(ours, tmp_path / "ours")
    with torch.no_grad():
        ours.classifier.bias.add_(1.0)
    save_checkpoint(ours, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_file(out / "model.safetensors")["classifier.bias"], ours.classifier.bias.detach())


# --- bad input: one line, naming the problem ----------------------------------------------------------------

def test_folder_without_config(tmp_path):
    with pytest.raises(MiniftError) as e:
        load_checkpoint(tmp_path)
    assert "config.json" in one_line(e) and str(tmp_path) in one_line(e)


def test_config_that_is_not_json(hf_checkpoint):
    _, folder = hf_checkpoint("BertModel", 0)
    (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": 32,,}')
    with pytest.raises(MiniftError) as e:
        load_checkpoint(folder)
    assert "config.json" in one_line(e) and "not valid JSON" in one_line(e)


def test_missing_safetensors(hf_checkpoint):
    _, folder = hf_checkpoint("BertModel", 0)
    (folder / "model.safetensors").unlink()
    with pytest.raises(MiniftError) as e:
        load_checkpoint(folder, task="encode")
    assert "no model.safetensors" in one_line(e)


@pytest.mark.parametrize("keep", ["header", "half", "all_but_8"])
def test_truncated_safetensors(keep, hf_checkpoint):
    _, folder = hf_checkpoint("BertModel", 0)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    cut = {"header": 6, "half": len(data) // 2, "all_but_8": len(data) - 8}[keep]
    path.write_bytes(data[:cut])
    with pytest.raises(MiniftError) as e:
        load_checkpoint(folder, task="encode")
    msg = one_line(e)
    assert "model.safetensors" in msg and "truncated" in msg


def test_unsupported_model_type(hf_checkpoint):
    _, folder = hf_checkpoint("BertModel", 0)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(MiniftError) as e:
        load_checkpoint(folder)
    assert "'mamba'" in one_line(e) and "not supported" in one_line(e)


def test_unknown_task(hf_checkpoint):
    _, folder = hf_checkpoint("BertModel", 0)
    with pytest.raises(MiniftError) as e:
        load_checkpoint(folder, task="regress")
    assert "unknown task 'regress'" in one_line(e) and "classify" in one_line(e)


def test_lm_task_on_an_encoder():
    with pytest.raises(MiniftError) as e:
        build_model({"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2}, task="lm")
    assert "encoder" in one_line(e)


def test_tensor_of_the_wrong_shape_looks_transposed(hf_checkpoint):
    _, folder = hf_checkpoint("BertModel", 0)
    key = "encoder.layer.0.intermediate.dense.weight"  # (37, 32) stored as (32, 37)
    rewrite_tensors(folder, lambda t: t.update({key: t[key].T.contiguous()}))
    with pytest.raises(MiniftError) as e:
        load_checkpoint(folder, task="encode")
    msg = one_line(e)
    assert "wrong shape" in msg and key in msg and "(32, 37)" in msg and "(37, 32)" in msg
    assert "looks transposed" in msg


def test_tensor_of_the_wrong_shape(hf_checkpoint):
    _, folder = hf_checkpoint("BertModel", 0)
    key = "encoder.layer.1.attention.output.dense.bias"
    rewrite_tensors(folder, lambda t: t.update({key: torch.zeros(31)}))
    with pytest.raises(MiniftError) as e:
        load_checkpoint(folder, task="encode")
    msg = one_line(e)
    assert "wrong shape" in msg and key in msg and "(31,)" in msg and "transposed" not in msg


def test_gpt2_conv1d_saved_as_linear_looks_transposed(hf_checkpoint):
    _, folder = hf_checkpoint("GPT2LMHeadModel", 1)
    key = "transformer.h.2.mlp.c_fc.weight"  # Conv1D (48, 80); a Linear layout (80, 48) is the mistake
    rewrite_tensors(folder, lambda t: t.update({key: t[key].T.contiguous()}))
    with pytest.raises(MiniftError) as e:
        load_checkpoint(folder, task="lm")
    msg = one_line(e)
    assert key in msg and "looks transposed" in msg


def test_missing_tensor(hf_checkpoint):
    _, folder = hf_checkpoint("BertForSequenceClassification", 0, num_labels=3)
    rewrite_tensors(folder, lambda t: t.pop("bert.encoder.layer.1.output.dense.bias"))
    with pytest.raises(MiniftError) as e:
        load_checkpoint(folder, task="classify")
    msg = one_line(e)
    assert "missing: bert.encoder.layer.1.output.dense.bias" in msg


def test_many_missing_tensors_stay_on_one_line(hf_checkpoint):
    _, folder = hf_checkpoint("BertModel", 1)
    rewrite_tensors(folder, lambda t: [t.pop(k) for k in list(t) if k.startswith("encoder.layer.2.")])
    with pytest.raises(MiniftError) as e:
        load_checkpoint(folder, task="encode")
    msg = one_line(e)
    assert "missing: encoder.layer.2." in msg and "more" in msg


def test_unexpected_tensor(hf_checkpoint):
    _, folder = hf_checkpoint("GPT2LMHeadModel", 0)
    rewrite_tensors(folder, lambda t: t.update({"transformer.h.0.mlp.c_gate.weight": torch.zeros(4, 4)}))
    with pytest.raises(MiniftError) as e:
        load_checkpoint(folder, task="lm")
    msg = one_line(e)
    assert "unexpected: transformer.h.0.mlp.c_gate.weight" in msg


@pytest.mark.parametrize("hf_cls, task", [("BertModel", "encode"), ("RobertaModel", "encode"),
                                          ("BertForSequenceClassification", "classify"),
                                          ("GPT2LMHeadModel", "lm"), ("GPT2ForSequenceClassification", "classify")])
def test_sequence_longer_than_max_positions(hf_cls, task, hf_checkpoint):
    hf, folder = hf_checkpoint(hf_cls, 0, **({"pad_token_id": 0} if hf_cls.startswith("GPT2For") else {}))
    ours = load_checkpoint(folder, task=task, verbose=False).eval()
    c = hf.config
    # the longest text a model takes: its positions, less RoBERTa's pad_token_id + 1 offset
    longest = c.n_positions if hf_cls.startswith("GPT2") else \
        c.max_position_embeddings - (c.pad_token_id + 1 if hf_cls.startswith("Roberta") else 0)
    with torch.no_grad():
        ours(torch.full((1, longest), 5))  # fits exactly
        for n in (longest + 1, longest + 3):
            with pytest.raises(MiniftError) as e:
                ours(torch.full((1, n), 5))
            msg = one_line(e)
            assert f"{n} tokens" in msg and "longer" in msg


def test_weights_moved_is_measured_from_the_source_file_without_the_new_head(hf_checkpoint):
    """outputs.weights_moved reads w0 from the checkpoint one tensor at a time: the relative distance over the
    pretrained weights (a GPT-2 file: Conv1D matrices transposed on the way in), the new classification head left out;
    0 for the model as loaded."""
    from minift.outputs import weights_moved
    _, folder = hf_checkpoint("GPT2LMHeadModel", 0)
    model = load_checkpoint(folder, "classify", num_labels=3, verbose=False)
    assert weights_moved(model, folder) == 0.0
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("score")}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    moved = sum(float((dict(model.named_parameters())[n] - w).norm() ** 2) for n, w in pretrained.items())
    expect = (moved / sum(float(w.norm() ** 2) for w in pretrained.values())) ** 0.5
    assert weights_moved(model, folder) == pytest.approx(expect, rel=1e-6)
    with torch.no_grad():
        model.score.weight.add_(100.0)  # the new head moving does not count: it has no pretrained value
    assert weights_moved(model, folder) == pytest.approx(expect, rel=1e-6)
