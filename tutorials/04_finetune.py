# %% [markdown]
# # Stage 4: fine-tune
#
# One optimizer step is six lines:
#
#     logits = model(input_ids, attention_mask)          # forward (keeps what backward needs)
#     loss, dlogits = model.loss(logits, labels)          # cross-entropy, and its gradient w.r.t. the logits
#     model.backward(dlogits)                             # hand-written backward: fills every p.grad
#     grad_norm = clip_grad_norm(params, 1.0)             # one bad batch cannot throw the model far
#     optimizer.step(schedule(step))                      # AdamW with this step's learning rate
#     optimizer.zero_grad()
#
# We first write a few steps out by hand, check our hand-written gradient against PyTorch's autograd, and
# then run the real thing with `minift.classify.finetune_classifier`, which wraps the same steps in
# `minift.train.train` (batching, evaluation, checkpoints, logging). The loop's step is the function
# `minift.step.train_step`: its body is these six lines, the first three for each micro-batch in the
# objective's `gradients` (for the model's own loss `minift.objective.forward_backward`; preference tuning and
# RL bring their own objective, stages 10-11); put a breakpoint there to watch a real run.
#
#     python tutorials/04_finetune.py --quick    # < 1 min: 400 training rows, 1 epoch, bf16 where the CPU has it
#     python tutorials/04_finetune.py            # the default recipe: 29,794 rows, 1 epoch (~4-20 min, 2 cores)
#
# Writes runs/tutorials/04_finetune/{quick,full}/: best/ (the best model by validation accuracy, which
# stage 7 deploys), checkpoint/ (to resume), log.jsonl, results.json.

# %%
import argparse
import shutil
import time
from pathlib import Path

import torch

import minift
from minift import TrainConfig, recipe
from minift.batching import batch_order, collate
from minift.classify import finetune_classifier
from minift.corpora import load_classification_splits
from minift.optim import AdamW, LRSchedule, clip_grad_norm, describe_groups, param_groups
from minift.resume import read_log
from minift.tasks import encode_classification
from minift.train import set_dropout

parser = argparse.ArgumentParser(description="Stage 4: the training loop, by hand and for real")
parser.add_argument("--quick", action="store_true", help="a few hundred rows, 1 epoch (for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
out = Path(args.runs) / "04_finetune" / ("quick" if args.quick else "full")
t_start = time.perf_counter()
minift.seed_everything(0)

# %% [markdown]
# ## 4.1 The pieces
#
# The model from stage 2 (MiniLM + [CLS] pooling + a new 3-way head), the tokenized tweets from stage 3,
# and the optimizer side:
# - **parameter groups**: weight decay (AdamW's pull toward zero) applies to the big matrices only, not to
#   biases, LayerNorm gains or embeddings;
# - **AdamW**: per-number step sizes from running averages of the gradient and its square;
# - **the learning-rate schedule**: warm up linearly from 0 (Adam's first estimates are noisy and a
#   pretrained model is easy to knock off course), then decay linearly to 0. It counts optimizer steps.

# %%
tok = minift.load_tokenizer("minilm")
splits, label_names = load_classification_splits()
model = minift.load("minilm", task="classify", num_labels=len(label_names))
model.train()  # dropout on; and, with autograd off, each layer keeps what its backward needs
examples = encode_classification(splits["train"][:256], tok, label_names, max_length=64)
lengths = [len(e["input_ids"]) for e in examples]

groups = param_groups(model, weight_decay=0.01)
params = [p for g in groups for p in g["params"]]
print(describe_groups(groups))
n_steps = 5
optimizer = AdamW(groups, lr=5e-5)
schedule = LRSchedule(5e-5, total_steps=n_steps, warmup_steps=1, decay="linear")
print(schedule.describe())

# %% [markdown]
# ## 4.2 A few steps, written out
#
# Training runs under `torch.no_grad()`: PyTorch builds no graph, our layers' `backward` methods do all the
# work (see minift/layers.py, where each forward sits beside its backward). Watch three numbers:
# the loss (starts near ln 3 = 1.10), the gradient norm *before* clipping (what clipping reacts to), and the
# learning rate (0 at step 0: the warmup starts from nothing, as Hugging Face's schedules do).

# %%
order = batch_order(lengths, 8, seed=0, epoch=0, group_by_length=True)  # small batches: this is a demo
print(f"\n{'step':>4} {'loss':>8} {'grad norm':>10} {'lr':>10}  batch (rows, tokens)")
for step, indices in enumerate(order[:n_steps]):
    batch = collate([examples[i] for i in indices], tok.pad_id)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["attention_mask"])       # 1. forward
        loss, dlogits = model.loss(logits, batch["labels"])               # 2. loss and dL/dlogits
        model.backward(dlogits)                                           # 3. backward: fills p.grad
    grad_norm = clip_grad_norm(params, max_norm=1.0)                      # 4. clip (returns the norm before)
    lr = schedule(step)
    optimizer.step(lr)                                                    # 5. AdamW update
    optimizer.zero_grad()                                                 # 6. forget this step's gradients
    print(f"{step:>4} {loss.item():>8.4f} {grad_norm:>10.3f} {lr:>10.2e}  {tuple(batch['input_ids'].shape)}")

# %% [markdown]
# ## What the forward keeps for the backward
#
# With autograd off, a layer keeps only what its own backward needs (the "keeps:" comments in
# minift/layers.py): a Linear its input (for dW = dy^T x), the attention its probabilities, dropout its mask.
# `minift.memory.kept_for_backward` lists them after one forward of a default batch (32 tweets, up to 64
# tokens); the backward frees them all again.

# %%
from minift.memory import format_kept, kept_for_backward  # noqa: E402

default_batch = collate([examples[i] for i in batch_order(lengths, 32, seed=0, epoch=0)[0]], tok.pad_id)
with torch.no_grad():
    logits = model(default_batch["input_ids"], default_batch["attention_mask"])
print(format_kept(kept_for_backward(model), top=12))
with torch.no_grad():  # and the backward frees them (its gradients are thrown away here)
    model.backward(model.loss(logits, default_batch["labels"])[1])
optimizer.zero_grad()
assert kept_for_backward(model) == []

# %% [markdown]
# ## 4.3 Is our backward right? Compare with autograd
#
# The same forward with autograd *on* is the reference: PyTorch records the graph and `loss.backward()`
# differentiates it. With dropout switched off (so both passes see the same network) the two gradients
# must agree up to float32 rounding, for every one of the 105 parameter tensors. The tests do this in
# float64, layer by layer; here we do it once, on the whole model, on a real batch.
#
# One family of tensors needs care: the attention *key* biases. Their true gradient is exactly 0 (a bias
# added to every key shifts a whole row of attention scores by the same number, and softmax ignores such
# a shift), so both sides give float32 noise around 0 and a relative error between two noises means
# nothing. We check that both are ~0 and compare the rest.

# %%
set_dropout(model, 0.0)
batch = collate([examples[i] for i in order[n_steps]], tok.pad_id)
with torch.no_grad():  # ours
    loss_ours, dlogits = model.loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    model.backward(dlogits)
ours = {n: p.grad.clone() for n, p in model.named_parameters()}
optimizer.zero_grad()
with torch.enable_grad():  # autograd's
    loss_ref, _ = model.loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    loss_ref.backward()
reference = {n: p.grad.clone() for n, p in model.named_parameters()}
optimizer.zero_grad()
largest = max(g.norm().item() for g in reference.values())
zero = [n for n, g in reference.items() if g.norm() < 1e-6 * largest]  # gradient 0 in exact arithmetic
errors = {n: ((ours[n] - g).norm() / g.norm()).item() for n, g in reference.items() if n not in zero}
worst = max(errors, key=errors.get)
print(f"\nloss: ours {loss_ours.item():.6f}, autograd {loss_ref.item():.6f}")
print(f"{len(zero)} tensors with a zero gradient ({', '.join(sorted({n.split('.', 4)[-1] for n in zero}))}): "
      f"largest norm ours {max(ours[n].norm().item() for n in zero):.1e}, "
      f"autograd {max(reference[n].norm().item() for n in zero):.1e} (the largest gradient norm is {largest:.1e})")
print(f"the other {len(errors)} tensors: max relative error ||ours - autograd|| / ||autograd|| = {errors[worst]:.2e} "
      f"({worst}); median {sorted(errors.values())[len(errors) // 2]:.2e}")
assert all(n.endswith("attention.self.key.bias") for n in zero)
assert all(ours[n].norm() < 1e-6 * largest for n in zero)
assert errors[worst] < 1e-4, "the hand-written backward disagrees with autograd"
del model, optimizer

# %% [markdown]
# ## 4.4 The real thing
#
# `finetune_classifier` does stages 2-4 in one call: tokenize the splits, load MiniLM with a new head, run
# `minift.train.train` (the loop above, plus batching by length, evaluation on the validation set at the
# end of each epoch, saving the best model, resumable checkpoints) and report. `test=False`: the test set
# waits for stage 7, where we look at it once.
#
# The default recipe is the main job's (`minift finetune`; minift/recipe.py: MAIN_JOB and MAIN_TRAIN on top of
# `TrainConfig()`): MiniLM with mean pooling, max_length 64, 1 epoch, batch 32, AdamW lr 1.5e-4, weight decay
# 0.01, 6% warmup then linear decay, clipping at 1.0, the embeddings and the two lowest blocks frozen
# (`freeze=["layers:2"]`), dropout off, bf16 where the hardware multiplies bf16 natively (else fp32). Stage 6
# shows how that recipe was chosen, on the validation split, from the time each lever saves and the accuracy
# it costs. `--quick` differs on purpose: 400 rows, 1 epoch (25 steps), batch 16, lr 1e-4 and TrainConfig's
# generic rest (every weight trained, the checkpoint's dropout), so that something visible happens in under a
# minute.
#
# The number to beat is the **majority baseline**: always answer the most common class. On these tweets it
# scores 0.43; a model below it has learnt nothing useful.

# %%
if args.quick:
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-4, log_every=5)
    limit = 400
else:
    cfg = TrainConfig(**recipe.MAIN_TRAIN)  # the default recipe
    limit = None
shutil.rmtree(out, ignore_errors=True)  # a fresh run (train() would move an earlier run aside, to previous-1/)
report = finetune_classifier("minilm", out=str(out), cfg=cfg, limit=limit, test=False)

# %% [markdown]
# ## 4.5 Did it learn?
#
# The log has one line per optimizer step (loss, lr, gradient norm) and one per evaluation.

# %%
steps, _ = read_log(out / "log.jsonl")  # (training records, evaluation records)
losses = [r["loss"] for r in steps]
k = max(3, len(losses) // 5)
first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
val = report["validation"]
precision = report["precision"]  # what "auto" became on this machine
print(f"\n{len(losses)} optimizer steps in {report['seconds']:.0f} s ({report['seconds'] / len(losses):.2f} s/step, "
      f"{precision}); training loss, mean of the first {k} steps {first:.4f} -> last {k} steps {last:.4f}")
print(f"validation accuracy {val['accuracy']:.4f}  macro-F1 {val['macro_f1']:.4f}  on {val['num_examples']} rows;  "
      f"majority baseline {val['majority_baseline']:.4f} (always '{val['majority_label']}')")
print(f"weights moved {report['weights_moved']:.4f} from the pretrained ones; best model: {out / 'best'}")
assert last < first, "the training loss should go down"
if not args.quick:
    assert val["accuracy"] > val["majority_baseline"], "the fine-tuned model should beat the majority baseline"

# %%
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
