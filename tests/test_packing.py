"""Packing (batching.pack_examples, TrainConfig.packing): rows packed best-fit into sequences, positions restarting
per row, a block-diagonal causal mask (heads.attention_allowed); a packed batch gives the loss, the target count
and the gradients of the same rows unpacked (float64, GPT-2 and Llama), and train() runs on packed rows."""
import copy

import pytest
import torch

from minift.batching import TrainData, collate, pack_examples
from minift.checkpoints import build_model
from minift.config import TrainConfig
from minift.errors import MiniftError
from minift.objective import forward_backward
from minift.train import train
from test_freeze import CONFIGS


def rows(lengths, seed=0, prompt=2):
    """Instruction-like rows: the first `prompt` labels of each are -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * min(prompt, n - 1) + ids[min(prompt, n - 1):]})
    return out


def test_best_fit_decreasing_with_positions_documents_and_first_labels():
    examples = rows([3, 5, 1, 4, 3, 11])
    packed = pack_examples(examples, 8)
    # longest first: 11 alone (longer than 8); 5 opens a sequence (room 3), 4 does not fit there (a new one, room
    # 4), a 3 fills the first exactly, the other 3 and the 1 fill the second
    assert [len(p["input_ids"]) for p in packed] == [11, 8, 8]
    assert packed[1]["input_ids"] == examples[1]["input_ids"] + examples[0]["input_ids"]
    assert packed[2]["input_ids"] == examples[3]["input_ids"] + examples[4]["input_ids"] + examples[2]["input_ids"]
    assert packed[2]["document_ids"] == [1] * 4 + [2] * 3 + [3]
    assert packed[2]["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0]
    assert packed[2]["labels"] == [-100] + examples[3]["labels"][1:] + [-100] + examples[4]["labels"][1:] + [-100]
    batch = collate(packed, pad_id=0)
    assert batch["document_ids"][0].tolist() == [1] * 11 and batch["document_ids"][1].tolist() == [1] * 5 + [2] * 3 + [0] * 3
    with pytest.raises(MiniftError, match="packing is for language-model examples"):
        pack_examples([{"input_ids": [1, 2], "label": 0}], 8)


@pytest.mark.parametrize("config", [CONFIGS["gpt2"], CONFIGS["llama"], {**CONFIGS["llama"], "tie_word_embeddings": True}],
                         ids=["gpt2", "llama", "llama tied"])
def test_a_packed_batch_gives_the_gradients_of_its_rows_unpacked(config):
    torch.manual_seed(0)
    plain = build_model(config, "lm").double().train()
    packed_model = copy.deepcopy(plain)
    examples = rows([7, 3, 5, 2, 6, 4, 9])
    unpacked, packed = collate(examples, pad_id=0), collate(pack_examples(examples, 12), pad_id=0)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]  # fewer rows: that is the point
    n = plain.count_targets(unpacked["labels"])
    assert packed_model.count_targets(packed["labels"]) == n  # the loss is normalised by the same count
    loss_plain = forward_backward(plain, unpacked, n)
    loss_packed = forward_backward(packed_model, packed, n)
    assert loss_packed == pytest.approx(loss_plain, rel=1e-12)
    grads = {k: p.grad for k, p in packed_model.named_parameters()}
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-13, msg=name)
    # and without the block-diagonal mask the rows see each other: the gradients differ
    leaky = copy.deepcopy(plain)
    leaky.zero_grad(set_to_none=True)
    forward_backward(leaky, {k: v for k, v in packed.items() if k != "document_ids"}, n)
    assert any(not torch.allclose(q.grad, grads[k]) for k, q in leaky.named_parameters())


def test_train_runs_on_packed_rows_and_refuses_packing_a_classifier(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model(CONFIGS["gpt2"], "lm")
    examples = rows([4, 9, 6, 3, 8, 5, 7, 2] * 2)
    cfg = TrainConfig(batch_size=2, max_steps=3, precision="fp32", metric="loss", packing=16, log_every=1)
    result = train(model, TrainData(examples, examples[:4], pad_id=0), cfg, tmp_path / "packed")
    assert "packing: 16 rows into 6 sequences of up to 16 tokens, 92% full" in capsys.readouterr().out
    assert result is not None
    with pytest.raises(MiniftError, match="packing is for language-model examples"):
        train(build_model(CONFIGS["gpt2"], "classify", num_labels=2),
              TrainData([{"input_ids": [1, 2], "label": 0}] * 4, [], pad_id=0), TrainConfig(packing=8), tmp_path / "c")
