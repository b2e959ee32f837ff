# %% [markdown]
# # Stage 4b: fine-tune with LoRA (low-rank adapters)
#
# Stage 4 trained every one of MiniLM's 22.6 million numbers. LoRA (Hu et al., 2021) freezes them all and
# learns, beside each chosen linear layer, a small update of low rank:
#
#     y = x W^T + b  +  (alpha / r) * dropout(x) A^T B^T        A: (r, in), B: (out, r)
#
# For MiniLM's 384 x 384 query projection and r = 8 that is 2 * 8 * 384 = 6,144 numbers instead of 147,456.
# B starts at zero, so training starts from the pretrained model exactly; A starts random, so B's first
# gradient is not zero. After training the update B A folds into W (merge) and inference costs nothing
# extra; or it stays apart as a 300-kB adapter file that peft loads too.
#
#     python tutorials/04b_lora.py --quick    # < 1 min: 400 training rows, 1 epoch
#     python tutorials/04b_lora.py            # the full tweet set, 2 epochs (about 13 min on 2 cores with bf16)
#
# Writes runs/tutorials/04b_lora/{quick,full}/: the training run, adapter/ (peft's layout) and merged/ (a
# plain checkpoint that transformers loads).

# %%
import argparse
import shutil
import time
from pathlib import Path

import torch

import minift
from minift import recipe
from minift.batching import collate
from minift.corpora import load_classification_splits
from minift.layers import Linear
from minift.lora import (LoRALinear, add_lora, load_adapter, lora_layers, merge_and_unload, merge_lora, save_adapter,
                         unmerge_lora)
from minift.tasks import encode_classification

parser = argparse.ArgumentParser(description="Stage 4b: LoRA, by hand and for real")
parser.add_argument("--quick", action="store_true", help="a few hundred rows, 1 epoch (for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
out = Path(args.runs) / "04b_lora" / ("quick" if args.quick else "full")
shutil.rmtree(out, ignore_errors=True)
t_start = time.perf_counter()
minift.seed_everything(0)

# %% [markdown]
# ## 4b.1 One LoRA layer, forward and backward
#
# `LoRALinear` (minift/lora.py) wraps a Linear: it keeps `weight` and `bias` (frozen) and adds `lora_A`,
# `lora_B`. Its backward, with h = dropout(x), u = h A^T (the r numbers in the bottleneck), s = alpha / r:
#
#     dB = s * dy^T u          (out, r)
#     du = s * dy B            (..., r)
#     dA = du^T h              (r, in)
#     dx = dy W + dropout_backward(du A)
#
# and no dW at all: the frozen W costs one matmul (dy W) in the backward instead of two. We check it against
# autograd in float64, dropout on (the same seed gives both passes the same dropout mask).

# %%
layer = LoRALinear(Linear(12, 10), r=4, alpha=8, dropout=0.2).double().train()
layer.weight.requires_grad_(False)
layer.bias.requires_grad_(False)
with torch.no_grad():
    layer.lora_B.normal_()  # as if trained a little: with B = 0, dA would be exactly 0
x, dy = torch.randn(3, 5, 12, dtype=torch.float64), torch.randn(3, 5, 10, dtype=torch.float64)

torch.manual_seed(1)
x_ref = x.clone().requires_grad_(True)
layer(x_ref).backward(dy)  # autograd's
ref = {"dA": layer.lora_A.grad.clone(), "dB": layer.lora_B.grad.clone(), "dx": x_ref.grad}
layer.zero_grad(set_to_none=True)
torch.manual_seed(1)
with torch.no_grad():  # ours
    layer(x)
    dx = layer.backward(dy)
ours = {"dA": layer.lora_A.grad, "dB": layer.lora_B.grad, "dx": dx}
for k in ref:
    err = ((ours[k] - ref[k]).abs().max() / ref[k].abs().max()).item()
    print(f"{k}: shape {tuple(ref[k].shape)}, max relative error vs autograd {err:.1e}")
    assert err < 1e-12
print(f"the frozen W got no gradient: weight.grad is {layer.weight.grad}")
assert layer.weight.grad is None

# %% [markdown]
# ## 4b.2 Attach adapters to MiniLM by name
#
# `add_lora(model, targets, r, alpha, dropout)` replaces the linear layers whose names match (a substring
# such as "query", an fnmatch pattern such as "*.layer.5.*", or "all-linear"), freezes everything else
# except the new classification head (it starts random, so it must learn), and says what trains.
# The usual choice from the LoRA paper: the query and value projections, r = 8, alpha = 16.

# %%
tok = minift.load_tokenizer(recipe.MODEL)
splits, label_names = load_classification_splits()
model = minift.load(recipe.MODEL, task="classify", num_labels=len(label_names), pooling=recipe.POOLING, verbose=False)
model.label_names = list(label_names)  # saved with it (config.json's id2label)
probe = encode_classification(splits["validation"][:64], tok, label_names, recipe.MAX_LENGTH)
batch = collate(probe, tok.pad_id)
model.eval()
with torch.no_grad():
    before = model(batch["input_ids"], batch["attention_mask"])
total = sum(p.numel() for p in model.parameters())
print(add_lora(model, ["query", "value"], r=8, alpha=16, dropout=0.1))
print(model.bert.encoder.layer[0].attention.self.query)
with torch.no_grad():
    after = model(batch["input_ids"], batch["attention_mask"])
print(f"step 0: the adapted model's logits equal the pretrained model's exactly: {torch.equal(before, after)} "
      f"(B = 0)")
assert torch.equal(before, after)
trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
head = sum(v for n, v in trainable.items() if "lora_" not in n)
print(f"trained: {len(trainable)} tensors; lora_A/lora_B {sum(v for n, v in trainable.items() if 'lora_' in n):,}, "
      f"the new head {head:,}; frozen: the {total - head:,} pretrained numbers")

# %% [markdown]
# ## 4b.3 Fine-tune
#
# The same loop as stage 4 (`minift.train`): it builds AdamW from the trainable tensors only (no moment
# estimates for the 22.6 M frozen numbers) and the backward stops below the lowest adapter (nothing is kept
# for the embeddings). LoRA's update starts small and is scaled by alpha / r, so it wants a larger learning
# rate than full fine-tuning: 5e-4 here (1e-3 for the short --quick run) against stage 4's 5e-5.
# The adapters are on already, so the settings keep `lora_r=0` (the default): `TrainConfig(lora_r=8)` would
# have train() add them itself (every linear layer, `lora_targets`), as `minift finetune --lora` does. When it
# keeps a best model, train() writes run/best/ as the merged plain checkpoint and run/adapter/ in peft's layout.

# %%
if args.quick:
    cfg = minift.TrainConfig(epochs=1, batch_size=16, lr=1e-3, log_every=5)
    train_rows = splits["train"][:400]
    val_rows = splits["validation"][:100]
else:
    cfg = minift.TrainConfig(lr=5e-4)
    train_rows, val_rows = splits["train"], splits["validation"]
train_ex = encode_classification(train_rows, tok, label_names, recipe.MAX_LENGTH)
val_ex = encode_classification(val_rows, tok, label_names, recipe.MAX_LENGTH)
result = minift.train(model, minift.TrainData(train_ex, val_ex, tok.pad_id), cfg, out / "run")
moved = max(layer.lora_B.abs().max().item() for layer in lora_layers(model).values())
print(f"{result['steps']} steps in {result['seconds']:.0f} s; best validation accuracy {result['best']:.4f} "
      f"(step {result['best_step']}); largest |B| entry now {moved:.3g} (it started at 0)")
assert moved > 0

# %% [markdown]
# ## 4b.4 Merge, unmerge, save
#
# `merge_lora` adds s * B A into each W: the plain matmul then gives the adapted output, so inference costs
# what the pretrained model costs. The outputs agree with the unmerged model up to float32 rounding.
# `save_adapter` writes the adapter in peft's layout (adapter_config.json + adapter_model.safetensors:
# `PeftModel.from_pretrained` loads it onto the transformers model); `merge_and_unload` gives back a plain
# model that `save_checkpoint` writes as an ordinary Hugging Face checkpoint.

# %%
model.eval()
with torch.no_grad():
    unmerged = model(batch["input_ids"], batch["attention_mask"])
    merge_lora(model)
    merged = model(batch["input_ids"], batch["attention_mask"])
    unmerge_lora(model)
diff = (merged - unmerged).abs().max().item()
print(f"merged vs unmerged logits: max difference {diff:.1e}; "
      f"fine-tuned vs pretrained: {(unmerged - before).abs().max().item():.3f}")
assert diff < 1e-5

save_adapter(model, out / "adapter", base_model_name_or_path=str(minift.resolve_model(recipe.MODEL)))
size = sum(f.stat().st_size for f in (out / "adapter").iterdir())
print(f"adapter: {out / 'adapter'} ({size / 1e3:.0f} kB, against "
      f"{(minift.resolve_model(recipe.MODEL) / 'model.safetensors').stat().st_size / 1e6:.0f} MB for the model)")

again = minift.load(recipe.MODEL, task="classify", num_labels=len(label_names), pooling=recipe.POOLING, verbose=False)
print("reloaded onto a fresh MiniLM:", load_adapter(again, out / "adapter"))
with torch.no_grad():
    assert torch.equal(again.eval()(batch["input_ids"], batch["attention_mask"]), unmerged)

plain = merge_and_unload(model)
minift.save_checkpoint(plain, out / "merged")  # with plain.label_names, set in 4b.2
reloaded = minift.load_checkpoint(out / "merged", verbose=False).eval()
with torch.no_grad():
    diff = (reloaded(batch["input_ids"], batch["attention_mask"]) - unmerged).abs().max().item()
print(f"merged checkpoint: {out / 'merged'}; reloaded as a plain model, max difference {diff:.1e}")
assert diff < 1e-5

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
