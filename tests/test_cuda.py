"""The training loop on a CUDA GPU against the same loop on the CPU (skipped without a GPU).

Same tiny models and synthetic data as tests/test_train.py. Dropout is off wherever CUDA is compared with
the CPU: the two devices have different random generators, so their dropout masks differ by design.
"""
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_train as T  # noqa: E402  (the helpers: tiny models, synthetic examples, run())

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """TF32 rounds fp32 matmul inputs to 10 bits; the comparisons below need true fp32 on the GPU."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_num_threads()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_num_threads(1)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
    torch.set_num_threads(before[2])


def max_gap(a, b):
    return max((x.detach().cpu() - y.detach().cpu()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_cuda_and_cpu_train_the_same_in_fp32(kind, tmp_path):
    # 40 examples in batches of 8: 10 steps are 2 epochs. The devices add in different orders (cuBLAS vs
    # oneDNN, atomics in index_add_): ~1e-7 relative per op. On the CPU, two such orderings (grad_accum 1 vs 2)
    # end 10 steps of lr 3e-3 within ~5e-6 of each other, so 1e-4 has a 20x margin and is still far below
    # what a device bug (a tensor left on the CPU, a wrong dtype, a mask built on the wrong device) would do.
    cfg = dict(batch_size=8, max_steps=10, dropout=0.0, lr=3e-3)
    cpu, on_cpu = T.run(T.config(kind, device="cpu", **cfg), tmp_path / "cpu", kind, n=40)
    gpu, on_gpu = T.run(T.config(kind, device="cuda", **cfg), tmp_path / "cuda", kind, n=40)
    assert all(p.is_cuda for p in gpu.parameters())
    assert len(on_cpu) == len(on_gpu) == 10
    for a, b in zip(on_cpu, on_gpu):
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a, b)
        assert a["lr"] == b["lr"]
    assert max_gap(cpu, gpu) < 1e-4


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_bf16_on_cuda_runs_and_stays_finite(kind, tmp_path):
    cfg = dict(batch_size=8, max_steps=5, dropout=0.0, device="cuda", schedule="constant", warmup_ratio=0.0)
    _, fp32 = T.run(T.config(kind, **cfg), tmp_path / "fp32", kind)
    model, bf16 = T.run(T.config(kind, precision="bf16", **cfg), tmp_path / "bf16", kind)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())  # fp32 master weights
    for a, b in zip(fp32, bf16):
        assert torch.isfinite(torch.tensor([b["loss"], b["grad_norm"]])).all()
        assert abs(a["loss"] - b["loss"]) < 0.05  # the bound of the CPU bf16 test (see test_train.py)


def test_checkpoint_saved_on_cuda_resumes_on_cpu(tmp_path):
    plan = dict(schedule="constant", warmup_ratio=0.0, dropout=0.0)  # see the resume test in test_train.py
    T.run(T.config(device="cuda", max_steps=3, save_every=3, **plan), tmp_path / "split")
    opt = load_file(str(tmp_path / "split" / "checkpoint" / "optimizer.safetensors"))
    assert "rng.torch_cuda0" in opt  # a GPU checkpoint carries the CUDA generator too
    resumed, records = T.run(T.config(device="cpu", max_steps=6, **plan), tmp_path / "split", resume=True)
    assert all(not p.is_cuda for p in resumed.parameters())
    assert T.trainer_state(tmp_path / "split" / "checkpoint")["optimizer"]["step"] == 6
    straight, reference = T.run(T.config(device="cuda", max_steps=6, **plan), tmp_path / "straight")
    assert [r["step"] for r in records] == list(range(1, 7))
    for a, b in zip(records, reference):
        assert abs(a["loss"] - b["loss"]) < 1e-4
    assert max_gap(resumed, straight) < 1e-4


def test_generate_on_cuda_matches_cpu():
    model = T.make_model("gpt2").eval()
    prompt = torch.tensor([[5, 9, 12, 3], [7, 7, 1, 30]])
    on_cpu = model.generate(prompt, max_new_tokens=8)
    on_gpu = model.to("cuda").generate(prompt.cuda(), max_new_tokens=8)
    assert torch.equal(on_gpu.cpu(), on_cpu)
