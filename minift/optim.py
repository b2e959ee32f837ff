"""The optimizer side of training: which weights decay, AdamW, the learning-rate plan, gradient clipping.

Everything here is plain tensor arithmetic; torch.optim is used only by the tests, as the reference we
must agree with."""

import math

import torch

from .errors import MiniftError
from .freeze import head_names
from .layers import Embedding


# ---------------------------------------------------------------------------------------------------------
# Parameter groups: weight decay pulls weights toward zero, which makes sense for the big matrices but not
# for biases and norm gains (a LayerNorm weight of 0 would switch the layer off), nor, by custom, for
# embedding tables. The rule goes by what a tensor IS (1-D, or an Embedding's table), never by its name, so it
# holds for every family, whatever it calls its parts (BERT's word_embeddings, GPT-2's wte, Llama's embed_tokens).

def no_decay_tensors(model):
    """The ids of the tensors that get no weight decay: biases and norm gains (1-D) and embedding tables (which
    a tied LM head shares)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, Embedding)}
    return {id(p) for p in model.parameters() if p.ndim < 2 or id(p) in tables}


def param_groups(model, weight_decay, head_lr_scale=1.0):
    """Split the model's trainable tensors into a decay group and a no-decay group for AdamW. A frozen
    tensor (requires_grad False) is left out: it gets no update and AdamW keeps no state for it.

    head_lr_scale != 1: the new, randomly drawn head (a classifier's: the parameters outside the model's body)
    gets groups of its own whose lr is the schedule's times head_lr_scale: the head starts from nothing, the
    body from pretrained weights, so the head can take bigger steps."""
    def group(decays, scale):
        return {"names": [], "params": [], "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
    no_decay = no_decay_tensors(model)
    head = head_names(model) if head_lr_scale != 1 else set()
    groups = {(True, False): group(True, 1.0), (False, False): group(False, 1.0)}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:  # a tied weight (GPT-2's lm_head is wte) is updated once
            continue
        seen.add(id(p))
        key = (id(p) not in no_decay, name in head)
        g = groups.setdefault(key, group(key[0], head_lr_scale if key[1] else 1.0))
        g["names"].append(name)
        g["params"].append(p)
    return list(groups.values())  # decay, no decay, then the head's groups if it has its own lr


def _count(n):
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)


def describe_groups(groups):
    """One line: how many tensors and numbers get weight decay and how many don't (and a faster head's)."""
    parts = []
    for g in groups:
        if not g["params"]:
            continue  # (weight_decay 0 leaves the decay group empty)
        numel = sum(p.numel() for p in g["params"])
        label = "decay" if g["weight_decay"] else "no decay"
        if g.get("lr_scale", 1) != 1:  # a head with its own lr (param_groups' head_lr_scale)
            label += f" at lr x{g['lr_scale']:g}"
        parts.append(f"{label}: {len(g['params'])} tensors, {_count(numel)} params")
    return " | ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# AdamW (Loshchilov & Hutter), written to match PyTorch's AdamW. For each parameter it keeps two running
# averages: m of the gradient (momentum) and v of the squared gradient (a per-number scale). The update is
# m / sqrt(v): a step of about lr in every coordinate, whatever the gradient's size.

class AdamW:
    def __init__(self, groups, lr=5e-5, betas=(0.9, 0.999), eps=1e-8, owned=None):
        if not all(0.0 <= b < 1.0 for b in betas):
            raise MiniftError(f"AdamW betas must be in [0, 1), got {tuple(betas)}; the usual are (0.9, 0.999)")
        groups = list(groups)
        if not groups or any(not isinstance(g, dict) or "names" not in g for g in groups):
            raise MiniftError("AdamW needs groups of named parameters: AdamW(param_groups(model, weight_decay=0.01)), "
                              "not model.parameters()")
        self.groups, self.lr, self.betas, self.eps = groups, lr, tuple(betas), eps
        self.params = [p for g in groups for p in g["params"]]
        self.names = [n for g in groups for n in g["names"]]
        # owned: the names of the tensors this process updates and keeps m and v for; None: all of them. Under
        # ZeRO (distributed.py) each process owns a share, and sends the others its tensors after each step.
        self.owned = set(self.names) if owned is None else set(owned)
        self.t = 0  # optimizer steps taken; one count for all parameters (they all step together)
        # State has the parameter's dtype: minift keeps fp32 master weights, so m and v are fp32 too.
        mine = [(n, p) for n, p in zip(self.names, self.params) if n in self.owned]
        self.exp_avg = {n: torch.zeros_like(p) for n, p in mine}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in mine}
        # Room for one parameter's denominator, reused by all: a fresh tensor as big as the word embedding
        # (47 MB in MiniLM) at every step costs more in page faults than the arithmetic itself.
        biggest = max((p for _, p in mine), key=torch.numel, default=torch.zeros(0))
        self.scratch = torch.empty(biggest.numel(), dtype=biggest.dtype, device=biggest.device)

    @torch.no_grad()
    def step(self, lr=None):
        """One update of every parameter that has a .grad, with this step's lr (from the schedule)."""
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.t += 1
        bc1 = 1 - b1 ** self.t  # m and v start at 0, so early averages are too small:
        bc2 = 1 - b2 ** self.t  # dividing by (1 - beta^t) undoes that bias
        for g in self.groups:
            wd, group_lr = g["weight_decay"], lr * g.get("lr_scale", 1.0)
            for name, p in zip(g["names"], g["params"]):
                # No gradient: frozen or unused. (torch counts steps per parameter, we count one t for all;
                # the same as long as a parameter has a gradient at every step or at none.)
                if p.grad is None or name not in self.owned:
                    continue
                m, v = self.exp_avg[name], self.exp_avg_sq[name]
                p.mul_(1 - group_lr * wd)                           # decoupled decay: shrink p, not the gradient
                m.lerp_(p.grad, 1 - b1)                             # m = b1*m + (1-b1)*g, as torch writes it
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)   # v = b2*v + (1-b2)*g*g
                same_kind = p.dtype == self.scratch.dtype and p.device == self.scratch.device
                denom = self.scratch[:p.numel()].view_as(p) if same_kind else torch.empty_like(p)
                torch.sqrt(v, out=denom).div_(math.sqrt(bc2)).add_(self.eps)  # sqrt of corrected v; eps keeps it > 0
                p.addcdiv_(m, denom, value=-group_lr / bc1)         # p -= lr * (m/bc1) / denom

    def zero_grad(self):
        """Drop the gradients, so the next backward assigns .grad and later micro-batches add to it."""
        for g in self.groups:
            for p in g["params"]:
                p.grad = None

    def state_dict(self):
        """(tensors, meta): tensors for a safetensors file, meta for a JSON file. The tensors are the live
        state, not copies: save them before the next step. Under ZeRO, only this process's share."""
        tensors = {f"exp_avg.{n}": m for n, m in self.exp_avg.items()}
        tensors |= {f"exp_avg_sq.{n}": v for n, v in self.exp_avg_sq.items()}
        meta = {"step": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": [g["weight_decay"] for g in self.groups]}
        return tensors, meta

    def load_state_dict(self, tensors, meta):
        """Restore exactly what state_dict saved; any mismatch with our parameters is an error. The file holds
        every tensor's state (ZeRO's rank 0 gathers them to save); this process takes its own share of it."""
        expected = self.state_dict()[0]
        every = {f"{kind}.{n}" for kind in ("exp_avg", "exp_avg_sq") for n in self.names}
        missing, extra = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - every)
        if missing:
            raise MiniftError(f"optimizer state lacks '{missing[0]}'; was it saved for a different model?")
        if extra:
            raise MiniftError(f"optimizer state has '{extra[0]}', which is no parameter here; "
                              f"was it saved for a different model?")
        tensors = {k: v for k, v in tensors.items() if k in expected}
        for key, value in tensors.items():
            if value.shape != expected[key].shape:
                raise MiniftError(f"optimizer state '{key}' has shape {tuple(value.shape)}, the parameter "
                                  f"{tuple(expected[key].shape)}; was it saved for a different model?")
        if len(meta["weight_decay"]) != len(self.groups):
            raise MiniftError(f"optimizer state has {len(meta['weight_decay'])} parameter groups, we have "
                              f"{len(self.groups)}; build the groups the same way as when it was saved")
        for key, value in tensors.items():
            expected[key].copy_(value)  # copy into our tensors, so they stay ours (dtype and device)
        self.t, self.lr, self.betas, self.eps = meta["step"], meta["lr"], tuple(meta["betas"]), meta["eps"]
        for g, wd in zip(self.groups, meta["weight_decay"]):
            g["weight_decay"] = wd


# ---------------------------------------------------------------------------------------------------------
# The learning-rate plan: rise linearly from 0 to the peak over the warmup (Adam's first steps are noisy,
# and a pretrained model is easy to knock off its feet), then hold or decay to the floor.

class LRSchedule:
    def __init__(self, peak_lr, total_steps, warmup_steps=0, decay="linear", floor=0.0):
        if decay not in ("constant", "linear", "cosine"):
            raise MiniftError(f"unknown lr decay '{decay}'; use 'constant', 'linear' or 'cosine'")
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise MiniftError(f"lr plan needs 0 <= warmup ({warmup_steps}) <= total steps ({total_steps}) "
                              f"and at least one step; check epochs, batch size and warmup")
        if not 0.0 <= floor <= peak_lr:
            raise MiniftError(f"lr floor {floor:g} must be between 0 and the peak {peak_lr:g}")
        if decay == "constant" and floor:
            raise MiniftError("a constant lr has no floor to decay to; drop the floor or use linear/cosine decay")
        self.peak, self.total, self.warmup, self.decay, self.floor = peak_lr, total_steps, warmup_steps, decay, floor

    def __call__(self, step):
        """The lr for optimizer step `step` (0-based), as Hugging Face's schedules compute it."""
        if step < self.warmup:
            return self.peak * (step / self.warmup)
        if self.decay == "constant":
            return self.peak
        if self.decay == "linear":  # fraction of the peak left: 1 when warmup ends, 0 at total_steps
            fraction = max(0.0, (self.total - step) / max(1, self.total - self.warmup))
        else:  # cosine: progress runs 0 -> 1, the fraction follows half a cosine wave from 1 down to 0
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            fraction = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.floor + (self.peak - self.floor) * fraction

    def describe(self):
        pct = round(100 * self.warmup / self.total)
        end = "then constant" if self.decay == "constant" else f"{self.decay} decay to {self.floor:g}"
        return (f"lr plan: {self.total} optimizer steps, warmup {self.warmup} ({pct}%), "
                f"peak {self.peak:g}, {end}")


def warmup_steps_for(total_steps, warmup_ratio):
    """Warmup steps from a ratio of the total, rounded up as Hugging Face does, but at most total - 1: warm-up
    starts at lr 0, so a run made only of warm-up (one step at warmup_ratio 0.06, say) would give its first step
    lr 0 and train less than it says, or nothing at all; here the last step always trains at the peak."""
    if not 0.0 <= warmup_ratio <= 1.0:
        raise MiniftError(f"warmup ratio {warmup_ratio} must be between 0 and 1 (0.06 is usual)")
    return min(math.ceil(total_steps * warmup_ratio), max(total_steps - 1, 0))


# ---------------------------------------------------------------------------------------------------------
# Clipping: if one unlucky batch gives a huge gradient, shrink the whole gradient (all parameters together,
# so its direction is kept) to length max_norm.

@torch.no_grad()
def clip_grad_norm(params, max_norm, norm=None):
    """Scale all .grad in place so their global L2 norm is at most max_norm; return the norm before.
    `norm`: that norm when it was found elsewhere (ZeRO-2: each process holds a share of the gradients)."""
    grads = [p.grad for p in params if p.grad is not None]
    if norm is None:
        if not grads:
            return 0.0
        norm = torch.stack([g.float().norm() for g in grads]).norm()  # norm of the per-tensor norms, in fp32
    if not torch.isfinite(norm):  # inf/nan: scaling would wipe every gradient; let the loop decide
        return norm.item()
    if norm > max_norm:
        coef = max_norm / (norm + 1e-6)  # the same formula as torch.nn.utils.clip_grad_norm_
        for g in grads:
            g.mul_(coef)
    return norm.item()
