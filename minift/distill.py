"""The distillation job: `minift finetune --task distill --teacher NAME` trains a small model (the student) to give a
bigger one's (the teacher's) token probabilities, not only its right answers.

    prompt/response rows (a JSONL file, or two-digit arithmetic) -> encode -> train (train.py, with DistillObjective as
    its loss: the teacher's and the student's logits on the same tokens, a divergence between them) -> report

Supervised fine-tuning gives the student one right token per position; the teacher gives a whole distribution (which
other tokens were nearly as good, how sure it is), the "dark knowledge" of Hinton et al. (2015). Two ways to pick the
tokens both models are scored on:
- offline (KD): the data's answers (or, seq_kd, the teacher's own sampled answers);
- on-policy (GKD, Agarwal et al. 2024): the student samples the answers itself and the teacher scores every token of
  them, so the student learns where its own mistakes take it, not only on text it would never write.
lmbda is the share of steps that are on-policy, drawn per optimizer step from the global torch RNG (which every
checkpoint saves: a resumed run draws what the straight run drew), as TRL's GKDTrainer draws per step.

The teacher never trains: it runs forward only, in eval mode, holds no optimizer state, and may keep its matrices in
8- or 4-bit blocks (quantize.py, as QLoRA keeps a frozen base). Teacher and student must share the tokenizer (the
divergence compares their probabilities token by token). With a 151,936-row head (Qwen2.5) a batch's logits are
(positions x 151,936) numbers twice over; with TrainConfig.chunked_loss both heads run a chunk of positions at a time
(distill_loss), so they never exist whole, and chunks with no target (the prompt) are skipped.
"""
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import distributed, recipe
from .batching import TrainData, collate, pad_rows
from .checkpoints import build_model, iter_safetensors, load_checkpoint, load_state, read_config
from .config import TrainConfig, check_fields, check_own_loss_config
from .corpora import limit_rows, load_instruction_splits, two_digit_splits
from .errors import MiniftError
from .evals import greedy_replies, score_replies
from .hub import resolve_model
from .layers import accumulate_grad, cast_for_matmul, check_targets, cross_entropy, fp32_dtype
from .lora import add_lora, lora_layers
from .outputs import after_training, finish, load_best, weights_moved
from .preference import shifted_targets
from .quantize import KINDS, quantize_base
from .rl import sample_rollouts
from .tasks import encode_instruction
from .tokenizer import Tokenizer
from .train import evaluate_like_training, pick_device, resolved_precision, seed_everything, train

ANSWER_TOKENS = 16  # new tokens of a greedy reply scored by exact match (the tasks' answers are short)


# ---------------------------------------------------------------------------------------------------------
# The divergences and their gradients, one position at a time (rows of a chunk)

def divergence(student_logits, teacher_logits, beta, temperature=1.0):
    """Per row: the divergence between the student's p = softmax(s / T) and the teacher's q = softmax(t / T), and its
    gradient with respect to the student's logits s, as TRL 1.16 defines it (GKDTrainer.generalized_jsd_loss, the
    DistillationTrainer's chunked kernel). (N, V) logits -> (loss (N,), dlogits (N, V)), in fp32 for bf16 logits.

    Every gradient goes through the softmax: for a loss L(p) with g = dL/dp, dL/dz_v = p_v (g_v - sum_u p_u g_u), z = s / T,
    and dL/ds = (dL/dz) / T.
    - beta 0, forward KL(q || p) = sum q (log q - log p): only -sum q log p depends on s, and since sum q = 1,
          dL/dz = p - q.                                  (the student spreads over everything the teacher allows)
    - beta 1, reverse KL(p || q) = sum p (log p - log q): g = log p - log q + 1, sum p g = KL + 1, so
          dL/dz = p (log p - log q - KL(p || q)).         (the student settles on what the teacher likes most)
    - in between, GKD's generalised Jensen-Shannon divergence, with the mixture m = (1 - beta) p + beta q:
          L = beta KL(q || m) + (1 - beta) KL(p || m).
      With dm/dp = 1 - beta: g = beta (-q (1 - beta) / m) + (1 - beta) (log p + 1 - log m - p (1 - beta) / m)
                               = (1 - beta) (log p - log m)      (the 1/m terms add to -(1 - beta) m / m = -(1 - beta)),
      sum p g = (1 - beta) KL(p || m), so
          dL/dz = (1 - beta) p (log p - log m - KL(p || m)).
      (At beta 0 or 1 this formula would be KL(p || p) = 0: TRL, and we, take the two KLs above there instead.)
    The T^2 convention: Hinton et al. multiply the softened loss by T^2, which keeps its gradient's size as T grows (the
    gradient carries 1/T, and (p - q) shrinks about as 1/T too). TRL does not, and neither do we: the loss is the
    divergence itself; with T > 1, raise the learning rate (or the loss) yourself."""
    dtype = fp32_dtype(student_logits)
    s = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # log p
    t = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # log q
    p = s.exp()
    if beta == 0:
        q = t.exp()
        return (q * (t - s)).sum(-1), (p - q) / temperature
    if beta == 1:
        kl = (p * (s - t)).sum(-1)
        return kl, p * (s - t - kl[:, None]) / temperature
    log_m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    kl_pm = (p * (s - log_m)).sum(-1)
    kl_qm = (t.exp() * (t - log_m)).sum(-1)
    return beta * kl_qm + (1 - beta) * kl_pm, (1 - beta) * p * (s - log_m - kl_pm[:, None]) / temperature


# ---------------------------------------------------------------------------------------------------------
# The loss of a batch, a chunk of positions at a time

def distill_loss(student, teacher, targets, num_targets, beta, temperature, vocab, chunk=0, student_head=None,
                 teacher_head=None, crossentropy_weight=0.0, want_grad=True):
    """The divergence summed over the positions that have a target, divided by num_targets (the whole step's count, so
    micro-batches add up), and its gradient with respect to `student`.

    student, teacher: (N, d) hidden states with their heads' weights (student_head, teacher_head: logits = h @ W.T made
    `chunk` positions at a time, as heads.chunked_lm_loss does), or (N, V) logits (heads None). targets (N,): the
    shifted labels, -100 where nothing is learnt. Only the first `vocab` logits, the tokenizer's tokens, count: a head
    may have more rows than the tokenizer has tokens (Qwen2.5's 151,936 for 151,665 in Hugging Face's tokenizer); they
    get no probability and no gradient. crossentropy_weight: plus that times the student's next-token cross-entropy on
    the targets (the data's answers), at temperature 1. The head's weight gradient, dW = dlogits^T h, goes into
    student_head.grad (its first `vocab` rows). Returns (loss, dstudent); dstudent is None when not want_grad."""
    mask = targets != -100
    num_targets = check_targets(int(mask.sum()) if num_targets is None else num_targets)
    if student_head is not None:  # hidden states and head rows cast once for every chunk's matmuls (bf16 autocast;
        student, rows = cast_for_matmul(student), cast_for_matmul(student_head[:vocab])  # else each chunk casts anew)
    loss = torch.zeros((), device=student.device)
    dstudent = torch.zeros_like(student) if want_grad else None
    for start in range(0, len(student), chunk or len(student)):
        part = slice(start, start + (chunk or len(student)))
        if not mask[part].any():
            continue  # a prompt or padding: no target, no logits made
        zs = student[part, :vocab] if student_head is None else student[part] @ rows.T
        zt = teacher[part, :vocab] if teacher_head is None else teacher[part] @ teacher_head[:vocab].T
        per_position, dz = divergence(zs, zt, beta, temperature)
        weight = mask[part].to(per_position.dtype) / num_targets
        loss = loss + (per_position * weight).sum()
        if crossentropy_weight:
            ce, dce = cross_entropy(zs, targets[part], num_targets, want_grad=want_grad)
            loss = loss + crossentropy_weight * ce
        if not want_grad:
            continue
        dz = dz.mul_(weight[:, None])
        if crossentropy_weight:
            dz = dz.add_(dce, alpha=crossentropy_weight)
        dz = cast_for_matmul(dz)
        if student_head is None:
            dstudent[part, :vocab] = dz
            continue
        if student_head.requires_grad:
            add_to_head_rows(student_head, dz.T @ student[part])
        dstudent[part] = dz @ rows
    return loss, dstudent


def add_to_head_rows(weight, grad):
    """weight.grad[:len(grad)] += grad: the head's gradient on the tokenizer's rows (a tied head's is the embedding's
    .grad, which its own backward adds to later). The rows past the tokenizer's get 0."""
    if len(grad) == len(weight):
        return accumulate_grad(weight, grad)
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    weight.grad[:len(grad)] += grad.to(weight.dtype)


def distill_step(model, teacher, batch, num_targets, beta, temperature, vocab, crossentropy_weight=0.0):
    """One micro-batch (input_ids, attention_mask, labels): the teacher's forward (no gradient), the student's, the
    loss and its hand-written backward into .grad. With the chunked head (TrainConfig.chunked_loss, which sets
    model.loss_chunk) both forwards stop at the hidden states and distill_loss runs both heads a chunk at a time;
    without, both give their whole logits. Returns the loss (a float)."""
    inputs = (batch["input_ids"], batch["attention_mask"])
    targets = shifted_targets(batch["labels"]).reshape(-1)
    with torch.no_grad():
        out = model(*inputs)
        chunked = model.head_is_deferred()
        theirs = teacher.hidden_states(*inputs) if chunked else teacher(*inputs)
        loss, dout = distill_loss(out.reshape(-1, out.shape[-1]), theirs.reshape(-1, theirs.shape[-1]), targets,
                                  num_targets, beta, temperature, vocab, model.loss_chunk if chunked else 0,
                                  model.head_weight() if chunked else None, teacher.head_weight() if chunked else None,
                                  crossentropy_weight)
        model.backward(dout.view(out.shape))
    return loss.item()


# ---------------------------------------------------------------------------------------------------------
# The teacher: loaded frozen, one tensor at a time, perhaps in blocks; the same tokens as the student

def load_teacher(path, dtype=torch.float32, quantize="none"):
    """The teacher: its weights made in `dtype` (bf16: the 1.5B takes 3.5 GB) and read one tensor at a time, every
    weight frozen, in eval mode. quantize (q8_0, q4_0, q4_1): its block matrices in llama.cpp's blocks (quantize.py):
    each gets a rank-1 LoRA adapter switched off, the layer quantize_base puts in blocks, so its forward is x W^T from
    the blocks alone, as QLoRA's frozen base (the embeddings, norms and head stay in `dtype`)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype from the start: never a whole fp32 copy
    try:
        teacher = build_model(read_config(path), "lm")
    finally:
        torch.set_default_dtype(default)
    load_state(teacher, iter_safetensors(path))  # one tensor at a time: never the whole file
    if quantize != "none":
        add_lora(teacher, "all-linear", r=1, alpha=1)
        quantize_base(teacher, quantize)
        for layer in lora_layers(teacher).values():
            layer.enabled = False
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def check_same_tokens(student_tok, teacher_tok, student="the student", teacher="the teacher"):
    """The divergence compares the two models' probabilities of token i: it must be the same token for both. One line
    naming the first difference otherwise."""
    if student_tok.vocab_size != teacher_tok.vocab_size:
        raise MiniftError(f"{teacher} has {teacher_tok.vocab_size} tokens and {student} {student_tok.vocab_size}: "
                          "distillation compares their probabilities token by token; pick a teacher with the student's "
                          "tokenizer (e.g. qwen2.5-coder-1.5b for qwen2.5-coder-0.5b)")
    for i in range(student_tok.vocab_size):
        if student_tok.id_to_token(i) != teacher_tok.id_to_token(i):
            raise MiniftError(f"token {i} is {student_tok.id_to_token(i)!r} for {student} and "
                              f"{teacher_tok.id_to_token(i)!r} for {teacher}: their tokenizers differ; pick a teacher "
                              "with the student's tokenizer")


# ---------------------------------------------------------------------------------------------------------
# The settings

@dataclass
class DistillSettings:
    """How the student learns from the teacher, with TRL's names: GKDConfig's beta, lmbda, seq_kd, max_new_tokens
    (GKD's defaults, but beta's, which is TRL's DistillationConfig's), temperature as DistillationConfig uses it (the
    loss's and the samples'). recipe.DISTILL_SETTINGS holds the job's own choices on top. `minift finetune --task
    distill` has a flag per field (--teacher, --beta ...), and a TOML file a key."""
    teacher: str = "qwen2.5-coder-1.5b"  # a name or a checkpoint folder, with the student's tokenizer
    beta: float = 0.5  # 0: forward KL(teacher || student), 1: reverse KL(student || teacher), between: GKD's JSD
    temperature: float = 1.0  # softens both distributions in the loss, and the temperature the answers are sampled at
    lmbda: float = 0.5  # the share of steps on the student's own sampled answers (on-policy); 0: offline only
    seq_kd: bool = False  # offline steps on the teacher's sampled answers instead of the data's (sequence-level KD)
    max_new_tokens: int = 128  # tokens per sampled answer at most (on-policy and seq_kd)
    crossentropy_weight: float = 0.0  # + this x the next-token loss on the data's answers (offline steps)
    teacher_quantize: str = "none"  # q8_0 | q4_0 | q4_1: the teacher's block matrices in 8- or 4-bit blocks

    def check(self, cfg=None):
        """Each field's type and range, and what the loop's settings must be for distillation, in one line each, before
        anything is loaded. Returns self."""
        check_fields(self, {"teacher_quantize": ("none",) + KINDS}, RANGES)
        if not self.teacher:
            raise MiniftError("teacher is empty: name the teacher (e.g. qwen2.5-coder-1.5b) or give its folder")
        if cfg is not None:
            check_own_loss_config(cfg, "distillation", ("loss", "exact_match"), "the student closest to the teacher on "
                                  "validation, or on a task with answers the best exact match", "packing mixes rows "
                                  "in one sequence, and on-policy steps sample their own rows", "distill.py")
        return self


RANGES = {"beta": (0, True, "between 0 (forward KL) and 1 (reverse KL); 0.5 is GKD's Jensen-Shannon divergence", 1, True),
          "lmbda": (0, True, "between 0 (offline only) and 1 (every step on the student's own answers)", 1, True),
          "temperature": (0, False, "> 0, e.g. 1.0 (it softens both distributions, and samples the answers)"),
          "max_new_tokens": (1, True, "at least 1 token per sampled answer (e.g. 64)"),
          "crossentropy_weight": (0, True, ">= 0: the weight of the next-token loss on the data's answers (0 = none)")}


# ---------------------------------------------------------------------------------------------------------
# Rows: encoded as instruction rows, with their answer where they have one

def encode_rows(rows, tok, max_length):
    """Prompt/response rows -> tasks.encode_instruction's examples (prompt masked, response and EOS supervised), each
    with its row's "answer" where it has one (the task's right number). Returns (examples, dropped)."""
    examples, dropped = [], 0
    for row in rows:  # one at a time: a dropped row must not shift the answers of the next ones
        encoded, lost = encode_instruction([row], tok, max_length)
        examples += [{**e, **({"answer": row["answer"]} if "answer" in row else {})} for e in encoded]
        dropped += lost
    return examples, dropped


def prompt_of(example):
    """An encoded example's prompt: its tokens before the first supervised one."""
    first = next(i for i, label in enumerate(example["labels"]) if label != -100)
    return example["input_ids"][:first]


def answer_kind(answers):
    """How exact match reads a reply (evals.parse_answer): its last integer where every answer is one, else its line."""
    return "number" if all(a.lstrip("-").isdigit() for a in answers) else "line"


# ---------------------------------------------------------------------------------------------------------
# The objective: what train() does with the rows

class DistillObjective:
    """Distillation as the loop's objective (objective.py). Examples: encode_rows'. A batch: batching.collate's (the
    prompt and the data's answer, right-padded), with the rows. Each step is on-policy with probability lmbda (the
    student samples an answer to each prompt), else offline (the data's answers, or with seq_kd the teacher's
    samples); then distill_step on each micro-batch. `teacher`: load_teacher's (frozen, eval mode)."""

    def __init__(self, tok, teacher, settings=None):
        self.tok, self.teacher, self.distill = tok, teacher, (settings or DistillSettings()).check()
        self.vocab = tok.vocab_size  # the tokenizer's tokens: the logits compared
        self.answers = False  # set by check(): whether the validation rows carry right answers

    def settings(self):
        """What a resume must find the same (train.py's run_info)."""
        return asdict(self.distill)

    def metric(self, model, cfg):
        offered = ("exact_match", "loss") if self.answers else ("loss",)
        if cfg.metric == "auto":
            return offered[0]
        if cfg.metric not in offered:
            raise MiniftError(f"metric {cfg.metric!r}: these rows have no 'answer' to match: use metric='loss'")
        return cfg.metric

    def check(self, model, data, cfg):
        self.distill.check(cfg)
        for who, net in (("the student", model), ("the teacher", self.teacher)):
            if net.task != "lm":
                raise MiniftError(f"distillation needs language models: load {who} with task='lm'")
            if net.final_softcap is not None:
                raise MiniftError(f"{who} caps its logits (Gemma 2's soft cap), which distill.py does not compute: "
                                  "distil a model without final_logit_softcapping")
            if net.head_weight().shape[0] < self.vocab:
                raise MiniftError(f"{who}'s head has {net.head_weight().shape[0]} rows for a tokenizer of {self.vocab} "
                                  "tokens: give the tokenizer that belongs to the models")
        if any("labels" not in e for e in data.train[:1] + data.validation[:1]):
            raise MiniftError("these examples have no labels: encode them with distill.encode_rows")
        self.answers = all("answer" in e for e in data.validation)
        self.metric(model, cfg)

    def collate(self, rows, device):
        batch = {k: v.to(device) for k, v in collate(rows, self.tok.pad_id).items()}
        return {**batch, "rows": rows}

    def memory_batch(self, rows, device):
        """The largest batch a step's forward sees: the rows as they are, or (on-policy, seq_kd) each prompt followed
        by max_new_tokens sampled tokens, whichever is longer."""
        if not self.distill.lmbda and not self.distill.seq_kd:
            return {k: v.to(device) for k, v in collate(rows, self.tok.pad_id).items()}
        sampled = [prompt_of(e) + [self.tok.eos_id] * self.distill.max_new_tokens for e in rows]
        ids, mask = pad_rows([max(e["input_ids"], s, key=len) for e, s in zip(rows, sampled)], self.tok.pad_id,
                             "right", device)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def sample(self, sampler, batch):
        """A batch of the same prompts with one answer each sampled by `sampler` (rl.sample_rollouts: one batched
        generate, the global RNG), the sampled tokens (up to their EOS) as labels."""
        s = self.distill
        rollouts = sample_rollouts(sampler, self.tok, [prompt_of(e) for e in batch["rows"]], 1, s.max_new_tokens,
                                   s.temperature, eos_token_id=self.tok.eos_id)
        return rollouts.batch()

    def gradients(self, model, batches, sync=None):
        """One step: on-policy with probability lmbda, drawn from the global torch RNG (so a resume draws the same),
        the answers sampled for every micro-batch first (the step's target count divides the loss); then distill_step
        on each. Returns (loss, metrics: on_policy 1 or 0, the answers' mean length in tokens)."""
        s = self.distill
        self.teacher.to(batches[0]["input_ids"].device)
        on_policy = bool(torch.rand(()) < s.lmbda)
        if on_policy or s.seq_kd:
            batches = [self.sample(model if on_policy else self.teacher, b) for b in batches]
        tokens = sum(model.count_targets(b["labels"]) for b in batches)
        step_tokens = sync.count(tokens) if sync is not None else tokens
        weight = 0.0 if on_policy else s.crossentropy_weight  # the next-token loss teaches the data's answers only
        loss = sum(distill_step(model, self.teacher, b, step_tokens, s.beta, s.temperature, self.vocab, weight)
                   for b in batches)
        return loss, {"on_policy": float(on_policy), "answer_tokens": tokens / sum(len(b["labels"]) for b in batches)}

    @torch.no_grad()
    def evaluate(self, model, examples, device, batch_size=16):
        """The loss on held-out rows (eval mode): the divergence to the teacher per answer token (plus the weighted
        next-token loss, as offline steps train it); where the rows carry answers, the exact match of the student's
        greedy replies to their prompts."""
        if not examples:
            raise MiniftError("no rows to evaluate; is the split empty?")
        s, was_training, total, n = self.distill, model.training, 0.0, 0
        self.teacher.to(device)
        model.eval()
        try:
            for i in range(0, len(examples), batch_size):
                batch = self.collate(examples[i:i + batch_size], device)
                inputs = (batch["input_ids"], batch["attention_mask"])
                targets = shifted_targets(batch["labels"]).reshape(-1)
                ours, theirs = model.hidden_states(*inputs), self.teacher.hidden_states(*inputs)
                k = int((targets != -100).sum())
                loss, _ = distill_loss(ours.reshape(-1, ours.shape[-1]), theirs.reshape(-1, theirs.shape[-1]), targets,
                                       k, s.beta, s.temperature, self.vocab, model.loss_chunk, model.head_weight(),
                                       self.teacher.head_weight(), s.crossentropy_weight, want_grad=False)
                total, n = total + loss.item() * k, n + k
        finally:
            model.train(was_training)
        result = {"loss": total / n, "num_tokens": n}
        if all("answer" in e for e in examples):
            replies = greedy_replies(model, self.tok, [prompt_of(e) for e in examples], ANSWER_TOKENS, batch_size)
            answers = [e["answer"] for e in examples]
            result["exact_match"] = score_replies(replies, answers, answer_kind(answers))["exact_match"]
        return result


# ---------------------------------------------------------------------------------------------------------
# The job

def finetune_distill(model=recipe.DISTILL_JOB["model"], data=recipe.DISTILL_JOB["data"], out=recipe.DISTILL_JOB["out"],
                     cfg=None, settings=None, max_length=recipe.DISTILL_JOB["max_length"], limit=None, test=True,
                     resume=False):
    """Distil settings.teacher into `model` on prompt/response rows (a JSONL file; None: corpora.two_digit_splits, best/
    chosen by exact match). settings: DistillSettings (None: recipe.DISTILL_SETTINGS). The two tokenizers are compared
    before either model loads; the teacher is loaded frozen, in bf16 where the run computes in bf16 or its blocks are
    quantized (else fp32). Prints the validation loss (and exact match) before and after; returns the report (also in
    OUT/results.json)."""
    cfg = cfg or TrainConfig(**recipe.DISTILL_TRAIN)
    settings = (settings or DistillSettings(**recipe.DISTILL_SETTINGS)).check(cfg)  # before anything is loaded
    t0 = time.perf_counter()
    rows = two_digit_splits() if data is None else load_instruction_splits(data, cfg.seed)
    rows = {k: v for k, v in limit_rows(rows, limit).items() if k != "test" or test}
    path, teacher_path = resolve_model(model), resolve_model(settings.teacher)
    tok = Tokenizer.from_file(path)
    check_same_tokens(tok, Tokenizer.from_file(teacher_path), str(path), str(teacher_path))
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    net = load_checkpoint(path, "lm")
    bf16 = resolved_precision(cfg.precision, device) == "bf16" or settings.teacher_quantize != "none"
    teacher = load_teacher(teacher_path, torch.bfloat16 if bf16 else torch.float32, settings.teacher_quantize)
    encoded = {}
    for k, v in rows.items():
        encoded[k], dropped = encode_rows(v, tok, max_length)
        if dropped:
            print(f"{k}: {dropped} rows dropped (the prompt alone fills max_length {max_length})")
    if not encoded["train"] or not encoded["validation"]:
        raise MiniftError(f"no training or validation row is left within max_length {max_length}: raise it")
    net.max_length = max_length
    objective = DistillObjective(tok, teacher, settings)
    teacher_bytes = sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])
    print(f"{len(encoded['train'])} training rows, {len(encoded['validation'])} validation rows; teacher {teacher_path} "
          f"({teacher_bytes / 2**30:.2f} GB of weights, frozen, not in the memory estimate); beta {settings.beta}, "
          f"temperature {settings.temperature}, lmbda {settings.lmbda} (the share of on-policy steps)")
    report = {"model": str(path), "config": vars(cfg), "distill": asdict(settings), "train_rows": len(encoded["train"])}
    train_data = TrainData(encoded["train"], encoded["validation"], tok.pad_id, objective=objective)
    # measured as the loop measures validation (its precision): before and after are comparable
    report["before"] = evaluate_like_training(net.to(device), encoded["validation"], train_data, cfg, device)
    report.update(train(net, train_data, cfg, out, resume=resume))
    if not distributed.is_main():
        return report
    with after_training(out):
        best = load_best(out, "lm", device)
        report["validation"], report["weights_moved"] = report.pop("best_metrics"), weights_moved(best, path)
        for name in ("exact_match", "loss"):
            if name in report["validation"]:
                print(f"validation {name}: {report['before'][name]:.4f} before -> {report['validation'][name]:.4f} "
                      "after distillation")
        if test and encoded.get("test"):  # the one look at the test split
            report["test"] = evaluate_like_training(best, encoded["test"], train_data, cfg, device)
    return finish(report, out, t0, f"generate with:  minift generate {Path(out) / 'best'} \"...\"")
