"""A quantized frozen base under LoRA (minift/quantize.py, TrainConfig.quantize): the blocks are GGUF's, byte for byte
(gguf.py's dequantizers read them back), rounded within half a step; the sliced forward and input gradient equal
the matmul with the dequantized weight; a model with a q8_0/q4_0/q4_1 base gives the outputs and the adapter
gradients of the same model on the dequantized fp64 base; train() runs, and best/ is the merged full-precision
model."""
import copy

import numpy as np
import pytest
import torch

from minift.batching import TrainData
from minift.checkpoints import build_model, load_checkpoint
from minift.config import TrainConfig
from minift.errors import MiniftError
from minift.gguf import DEQUANTIZE, convert_gguf
from minift.lora import lora_layers
from minift.memory import estimate_memory
from minift.quantize import KINDS, QuantizedWeight, quantize_base
from minift.objective import forward_backward
from minift.train import prepare_model, train
from test_freeze import batch, lm_rows

LLAMA = dict(model_type="llama", vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
GPT2 = dict(model_type="gpt2", vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0)
GGML_TYPE = {"q8_0": 8, "q4_0": 2, "q4_1": 3}


def gguf_bytes(qw):
    """The blocks as a GGUF file holds them: per block d (fp16), [m (fp16)], then the quants."""
    parts = [qw.d.numpy().view(np.uint8).reshape(*qw.d.shape, 2)]
    if qw.m is not None:
        parts.append(qw.m.numpy().view(np.uint8).reshape(*qw.m.shape, 2))
    parts.append(qw.q.numpy().view(np.uint8))
    return np.concatenate(parts, axis=-1).reshape(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_are_ggufs_and_round_within_half_a_step(kind):
    torch.manual_seed(0)
    w = torch.randn(64, 96) * 0.05
    w[3, :32] = 0  # a block of zeros: scale 0, no division by it
    qw = QuantizedWeight.quantize(w, kind)
    back = qw.dequantize()
    theirs = DEQUANTIZE[GGML_TYPE[kind]](gguf_bytes(qw)).reshape(64, 96)  # llama.cpp's layout, read by gguf.py
    assert torch.equal(back, torch.from_numpy(theirs))
    step = qw.d.float().abs().repeat_interleave(32, dim=1)
    # to the nearest step, found with the fp32 scale; the stored fp16 scale moves q * d by up to 127 x 2^-11 of d.
    # Q4_0 maps the largest magnitude to -8, so on the other side +8 steps are cut to +7: up to a whole step
    bound = 1.0 if kind == "q4_0" else 0.5 + 127 / 2048
    assert ((back - w).abs() <= step * bound + 1e-7).all()
    assert ((back - w).abs() > step * 0.45).any()  # and the bound is not loose: some values are that far
    assert torch.equal(back[3, :32], torch.zeros(32))
    assert qw.nbytes() == {"q8_0": 34, "q4_0": 18, "q4_1": 20}[kind] * 64 * 96 // 32


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_equal_gguf_pys_quantizer_bit_for_bit(kind):
    """gguf-py's quantizers (its np_roundf: C's roundf, exactly) as the oracle, on random blocks and on the value that
    floor(x + 0.5) rounds wrongly in float32: 0.49999997 of a step is 0, not 1."""
    gguf = pytest.importorskip("gguf")
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    w[0, :32] = torch.tensor([127.0, 0.49999997, -0.49999997, 2.5, -2.5] + [0.0] * 27)  # q8_0's step is exactly 1 here
    qw = QuantizedWeight.quantize(w, kind)
    theirs = gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, kind.upper()))
    assert np.array_equal(gguf_bytes(qw), theirs.reshape(-1))
    if kind == "q8_0":
        assert qw.q[0, 0, :5].tolist() == [127, 0, 0, 3, -3]


def test_the_sliced_matmuls_equal_the_whole_ones(monkeypatch):
    import minift.quantize
    monkeypatch.setattr(minift.quantize, "ROWS", 7)  # several slices, the last one short
    torch.manual_seed(0)
    qw = QuantizedWeight.quantize(torch.randn(30, 64), "q4_1").double()
    w = qw.dequantize(torch.float64)
    x, dy = torch.randn(2, 5, 64, dtype=torch.float64), torch.randn(2, 5, 30, dtype=torch.float64)
    torch.testing.assert_close(qw.linear(x), x @ w.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(qw.linear_backward(dy), dy @ w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config, task", [(LLAMA, "lm"), (GPT2, "lm"), (LLAMA, "classify")], ids=["llama", "gpt2", "llama-cls"])
def test_a_quantized_base_gives_the_outputs_and_adapter_gradients_of_its_dequantized_weights(config, task, kind,
                                                                                           monkeypatch):
    import minift.quantize
    monkeypatch.setattr(minift.quantize, "ROWS", 24)  # layers of 32 to 96 outputs: one to four slices
    torch.manual_seed(0)
    quantized = build_model(config, task, num_labels=3).double()
    torch.manual_seed(1)
    prepare_model(quantized, TrainConfig(lora_r=4, quantize=kind))
    reference = copy.deepcopy(quantized)
    for layer in lora_layers(reference).values():  # the same model on the dequantized weights, plain fp64
        layer.weight = torch.nn.Parameter(layer.quantized.dequantize(torch.float64), requires_grad=False)
        layer.quantized = None
    for layer in lora_layers(quantized).values():
        assert layer.quantized is not None and "weight" not in dict(layer.named_parameters())
    with torch.no_grad():
        for layer in lora_layers(quantized).values():  # B = 0 at the start: give the adapters something to say
            layer.lora_B.normal_()
        for a, b in zip(lora_layers(quantized).values(), lora_layers(reference).values()):
            b.lora_B.copy_(a.lora_B)
    b = batch(task)
    quantized.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(quantized(b["input_ids"], b["attention_mask"]),
                                   reference(b["input_ids"], b["attention_mask"]), rtol=1e-12, atol=1e-12)
    for m in (quantized, reference):
        m.train()
        forward_backward(m, b, m.count_targets(b["labels"]))
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in quantized.named_parameters() if p.requires_grad}
    assert ours.keys() == grads.keys() and any("lora_A" in n for n in ours)
    for name in grads:
        torch.testing.assert_close(ours[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_train_with_a_q4_base_saves_the_merged_full_precision_best(tmp_path):
    torch.manual_seed(0)
    model = build_model(LLAMA, "lm")
    full_bytes = estimate_memory(model, batch("lm"))["weights"]
    rows = lm_rows()
    cfg = TrainConfig(batch_size=4, lr=1e-2, max_steps=3, precision="fp32", metric="loss", lora_r=4, quantize="q4_0")
    train(model, TrainData(rows, rows[:4], pad_id=0), cfg, tmp_path / "q")
    assert estimate_memory(model, batch("lm"))["weights"] < 0.6 * full_bytes  # the blocks, not fp32 weights
    best = load_checkpoint(tmp_path / "q" / "best", "lm", verbose=False).eval()
    layer = next(iter(lora_layers(model).values()))
    name = next(iter(lora_layers(model)))
    merged = layer.quantized.dequantize() + layer.scale * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(best.get_submodule(name).weight, merged, rtol=0, atol=1e-6)
    model.eval()
    b = batch("lm")
    with torch.no_grad():
        torch.testing.assert_close(best(b["input_ids"], b["attention_mask"]), model(b["input_ids"], b["attention_mask"]),
                                   rtol=1e-4, atol=1e-5)


def test_quantize_needs_adapters_and_blocks_of_32():
    with pytest.raises(MiniftError, match="set lora_r"):
        prepare_model(build_model(LLAMA, "lm"), TrainConfig(quantize="q8_0"))
    model = build_model(LLAMA, "lm")
    total = sum(p.numel() for p in model.parameters())
    line = prepare_model(model, TrainConfig(lora_r=2, quantize="q8_0"))  # the blocks still count as parameters
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"frozen weights in q8_0 blocks: trainable {adapters:,} of {total + adapters:,} parameters" in line
    with pytest.raises(MiniftError, match="multiple of 32"):
        prepare_model(build_model({**LLAMA, "hidden_size": 16, "intermediate_size": 24}, "lm"),
                      TrainConfig(lora_r=2, quantize="q4_0"))
    with pytest.raises(MiniftError, match="set lora_r"):
        quantize_base(build_model(LLAMA, "lm"), "q4_0")


def test_a_run_on_a_quantized_base_resumes_exactly(tmp_path):
    """The checkpoint holds the adapters, the head and AdamW; the blocks are made again from the base on resume,
    the same blocks: stopping after step 2 and resuming ends bitwise where 4 straight steps end."""
    def run(out, steps, resume=False):
        torch.manual_seed(0)
        model = build_model(LLAMA, "lm")
        rows = lm_rows()
        cfg = TrainConfig(batch_size=4, lr=1e-2, max_steps=steps, precision="fp32", metric="loss", lora_r=4,
                          quantize="q4_1", schedule="constant", warmup_ratio=0.0, save_every=2, lora_dropout=0.1)
        train(model, TrainData(rows, rows[:4], pad_id=0), cfg, out, resume=resume)
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "stopped", 2)
    resumed = run(tmp_path / "stopped", 4, resume=True)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_smollm2s_weights_come_back_bit_for_bit_from_q4_1(smollm2_dir):
    """The offline SmolLM2 was converted from llama.cpp's Q4_1 file: quantizing its weights to q4_1 again with
    llama.cpp's rounding must give the same blocks, so dequantizing them gives every weight back exactly."""
    model = load_checkpoint(smollm2_dir, "lm", verbose=False)
    matrices = {n: p.detach() for n, p in model.named_parameters() if n.startswith(("model.layers.0.", "model.layers.29."))
                and p.ndim == 2}
    assert len(matrices) == 14
    for name, w in matrices.items():
        assert torch.equal(QuantizedWeight.quantize(w, "q4_1").dequantize(), w), name


# ---------------------------------------------------------------------------------------------------
# quantize="source": the GGUF file's own blocks (gguf_blocks.safetensors beside the converted weights)

SOURCE_TYPES = {"attn_q": "Q4_K", "attn_k": "Q6_K", "attn_v": "Q5_0", "attn_output": "Q8_0", "ffn_gate": "Q3_K",
                "ffn_up": "F16", "ffn_down": "Q5_K"}


def source_gguf(folder):
    """A 2-layer Llama GGUF (rows of 256, as K-quants need) whose matrices are random blocks of seven types, the second
    layer's attn_output in F32 (a matrix the file did not quantize), converted into folder. Returns the GGUF's path."""
    from test_gguf import V, smollm_style_tokenizer, tokenizer_kv, write_gguf
    from test_gguf_blocks import random_blocks
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    tok = smollm_style_tokenizer()
    hidden, ff, heads, kv_heads, vocab = 256, 512, 4, 2, tok.get_vocab_size()
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden // 2, hidden), "attn_v": (hidden // 2, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden), "ffn_down": (hidden, ff)}
    rng = np.random.default_rng(0)

    def blocks(shape, qtype, seed):
        if qtype in (Q.F16, Q.F32):
            return (rng.standard_normal(shape) * 0.05).astype(np.float16 if qtype == Q.F16 else np.float32)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        return random_blocks(qtype, shape[0] * shape[1] // block, seed).reshape(shape[0], -1)

    tensors = [("token_embd.weight", blocks((vocab, hidden), Q.Q8_0, 1), Q.Q8_0),
               ("output_norm.weight", (1 + rng.standard_normal(hidden) * 0.1).astype(np.float32), Q.F32)]
    for i in range(2):
        tensors += [(f"blk.{i}.{n}.weight", (1 + rng.standard_normal(hidden) * 0.1).astype(np.float32), Q.F32)
                    for n in ("attn_norm", "ffn_norm")]
        for j, (part, kind) in enumerate(SOURCE_TYPES.items()):
            qtype = Q.F32 if (i, part) == (1, "attn_output") else Q[kind]
            tensors.append((f"blk.{i}.{part}.weight", blocks(shapes[part], qtype, 10 * i + j), qtype))
    kv = [("llama.block_count", 2, V.UINT32), ("llama.context_length", 64, V.UINT32),
          ("llama.embedding_length", hidden, V.UINT32), ("llama.feed_forward_length", ff, V.UINT32),
          ("llama.attention.head_count", heads, V.UINT32), ("llama.attention.head_count_kv", kv_heads, V.UINT32),
          ("llama.rope.freq_base", 10000.0, V.FLOAT32), ("llama.attention.layer_norm_rms_epsilon", 1e-5, V.FLOAT32),
          ("llama.vocab_size", vocab, V.UINT32)]
    path = write_gguf(folder.parent / "source.gguf", tensors, kv + tokenizer_kv(tok))
    convert_gguf(path, folder)
    return path


def test_source_blocks_are_the_files_bytes_and_give_its_outputs_and_gradients(tmp_path, monkeypatch):
    """Each adapted layer keeps the file's bytes (q/k rows in Hugging Face's order: llama.cpp's permutation undone on
    whole rows of blocks), an F32 matrix stays a weight; outputs and adapter gradients equal those of the same model on
    the dequantized weights (float64), and the memory estimate counts the blocks' bytes."""
    import minift.quantize
    from minift.gguf import raw_rows, read_gguf, unpermute
    monkeypatch.setattr(minift.quantize, "ROWS", 96)  # several slices a layer, the last one short
    file = read_gguf(source_gguf(tmp_path / "folder"))
    torch.manual_seed(0)
    model = load_checkpoint(tmp_path / "folder", "lm", verbose=False).double()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepare_model(model, TrainConfig(lora_r=4, quantize="source"))
    layers = lora_layers(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        i, part = name.split(".")[2], name.split(".")[-1]
        gguf_part = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[part]
        if (i, gguf_part) == ("1", "attn_output"):
            assert layer.quantized is None and torch.equal(layer.weight, weights[f"{name}.weight"])
            continue
        raw = raw_rows(file, f"blk.{i}.{gguf_part}.weight")
        if gguf_part in ("attn_q", "attn_k"):
            raw = unpermute(raw, 4 if gguf_part == "attn_q" else 2)
        assert np.array_equal(layer.quantized.raw.numpy(), raw), name  # the file's bytes, bit for bit
        assert SOURCE_TYPES[gguf_part] in layer.quantized.extra_repr()
        assert torch.equal(layer.quantized.dequantize(torch.float64), weights[f"{name}.weight"]), name
        assert "weight" not in dict(layer.named_parameters())
    reference = copy.deepcopy(model)
    for layer in lora_layers(reference).values():
        if layer.quantized is not None:
            layer.weight = torch.nn.Parameter(layer.quantized.dequantize(torch.float64), requires_grad=False)
            layer.quantized = None
    with torch.no_grad():
        for a, b in zip(lora_layers(model).values(), lora_layers(reference).values()):
            a.lora_B.normal_()
            b.lora_B.copy_(a.lora_B)
    b = batch("lm")
    b["input_ids"] = b["input_ids"] % 300
    for m in (model, reference):
        m.train()
        forward_backward(m, b, m.count_targets(b["labels"]))
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert ours.keys() == grads.keys() and len(ours) == 28
    for name in grads:
        torch.testing.assert_close(ours[name], grads[name], rtol=1e-10, atol=1e-12, msg=name)
    model.float()
    blocks = sum(layer.quantized.raw.numel() for layer in layers.values() if layer.quantized is not None)
    rest = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if t.dtype != torch.uint8)
    assert blocks == 1_059_328 and estimate_memory(model, b)["weights"] == rest + blocks  # the blocks at their bytes


def test_a_source_run_resumes_exactly_and_refuses_what_has_no_blocks(tmp_path):
    source_gguf(tmp_path / "folder")

    def run(out, steps, resume=False):
        torch.manual_seed(0)
        model = load_checkpoint(tmp_path / "folder", "lm", verbose=False)
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in lm_rows()]
        cfg = TrainConfig(batch_size=4, lr=1e-3, max_steps=steps, precision="fp32", metric="loss", lora_r=4,
                          quantize="source", schedule="constant", warmup_ratio=0.0, save_every=2, lora_dropout=0.1)
        train(model, TrainData(rows, rows[:4], pad_id=0), cfg, out, resume=resume)
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "stopped", 2)
    resumed = run(tmp_path / "stopped", 4, resume=True)
    assert straight.keys() == resumed.keys() and len(straight) == 28
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # best/ is merged full precision and holds no blocks: another run on it with "source" is refused in one line
    for folder, words in ((tmp_path / "straight" / "best", "has no gguf_blocks.safetensors"), (None, "load the model")):
        model = load_checkpoint(folder, "lm", verbose=False) if folder else build_model(LLAMA, "lm")
        with pytest.raises(MiniftError, match=words) as e:
            prepare_model(model, TrainConfig(lora_r=2, quantize="source"))
        assert "\n" not in str(e.value)
    model = load_checkpoint(tmp_path / "folder", "lm", verbose=False)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] += 1e-3  # a folder whose weights moved since its conversion
    with pytest.raises(MiniftError, match="up_proj: the GGUF blocks .* do not give this model's weights") as e:
        prepare_model(model, TrainConfig(lora_r=2, quantize="source"))


@pytest.mark.slow
def test_qwen_coder_lora_on_its_own_blocks():
    """Qwen2.5-Coder-0.5B (Q4_K_M): every adapted layer holds the file's bytes (Q4_K, Q5_0, Q6_K, Q8_0), in a seventh of
    the fp32 weights' room, and the model with untrained adapters gives the converted weights' logits."""
    from collections import Counter
    from minift import hub
    from minift.gguf import hf_name, raw_rows, read_gguf, type_name
    path = hub.weights_dir() / "gguf" / hub.SPLIT_GGUFS["qwen2.5-coder-0.5b"]["file"]
    if not path.is_file():
        pytest.skip(f"{path} not fetched")
    model = load_checkpoint(hub.fetch_split_model("qwen2.5-coder-0.5b"), "lm", verbose=False).eval()
    ids = torch.tensor([[151644, 872, 198, 7985, 264, 13027, 729, 429, 17431, 288, 264, 914, 13, 151645, 198]])
    with torch.no_grad():
        expected = model(ids)
    prepare_model(model, TrainConfig(lora_r=8, quantize="source"))
    file = read_gguf(path)
    names = {hf_name(n): n for n in file.tensors}
    types, held, fp32 = Counter(), 0, 0
    for name, layer in lora_layers(model).items():
        raw, t = layer.quantized.raw.numpy(), file.tensors[names[f"{name}.weight"]]
        assert np.array_equal(raw, raw_rows(file, t.name)), name
        assert layer.quantized.extra_repr().startswith(type_name(t.type) + " "), name
        types[type_name(t.type)] += 1
        held, fp32 = held + raw.nbytes, fp32 + 4 * t.shape[0] * t.shape[1]
    assert sum(types.values()) == 24 * 7 and set(types) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}, types
    print(f"blocks of {dict(types)}: {held / 2**20:.0f} MB for {fp32 / 2**20:.0f} MB of fp32 weights")
    assert held < fp32 / 5
    model.eval()
    with torch.no_grad():
        diff = (model(ids) - expected).abs().max().item()
    print(f"logits {diff:.2e} from the converted weights' (largest {expected.abs().max().item():.1f})")
    assert diff < 1e-4 * expected.abs().max().item(), diff  # the same weights, multiplied 256 rows at a time
