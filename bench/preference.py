"""One DPO step side by side in one run: minift's `dpo_step` vs TRL 1.16.0's DPOTrainer on the same batch of pairs,
SmolLM2-135M-Instruct, full fine-tuning (a frozen reference copy) and LoRA (the adapters off as the reference), fp32
and bf16 autocast. Seconds per step, and the loss of each side (they must agree).

    python bench/preference.py                # 4 pairs (8 rows of 56-120 tokens), fp32 and bf16, 3 timed rounds
    python bench/preference.py --quick        # 1 pair, fp32, 1 timed round (a few minutes on 2 busy cores)
    python bench/preference.py --precision fp32 --modes full --rounds 10

A step is what one DPO micro-step costs: the policy's forward of the chosen and rejected rows concatenated, the
reference's log-probs (no gradient), the sigmoid DPO loss (beta 0.1) and the backward into .grad; no optimizer step
on either side (AdamW is the same few lines on both and would move the weights between rounds). minift: `dpo_step`
(hand-written backward, the fp32 log-softmax kept); TRL: `DPOTrainer.compute_loss` (its concatenated forward through
its fused chunked LM head, the reference forward, its loss) then `loss.backward()`, as its training_step does. bf16:
minift under `minift.train.autocast(device, "bf16")` around the whole step, as train.py runs a step; TRL under
`torch.autocast("cpu", torch.bfloat16)` around compute_loss (policy and reference forwards), the backward outside it
(as the Trainer with DPOConfig(bf16=True) does); weights stay fp32 on both sides. TRL's trainer is built with
bf16=False: its default bf16=True would have accelerate run the reference forward under bf16 autocast even in the
fp32 configuration (found here: the fp32 losses then parted by 4.5e-3).

The batch: 4 hand-written ChatML prompts (SmolLM2's default system prompt), each with a chosen and a rejected answer
ending in <|im_end|>; TRL's DataCollatorForPreference and minift's preference_batch give the same rows (checked). So
that the loss is not log 2 on both sides trivially, the policy is the pretrained model moved off it by seeded noise
(2% of each tensor's std, the same on both sides), the reference the pretrained model; under LoRA the adapters' B is
drawn (std 0.02, seeded) on TRL's new peft adapter (r 8, alpha 16, every linear layer, no dropout) and minift loads
that same adapter. Every configuration's step takes turns with the others, one step of each per round (in reverse
order every other round), after one warm-up round; times are medians over rounds, a ratio is the median over rounds
of TRL's time / minift's within a round (above 1: minift is faster). Both sides run in this one process with the same
torch threads. Needs trl, peft and transformers (the test extra).
"""
import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import minift
from minift.hub import resolve_model
from minift.lora import load_adapter
from minift.preference import dpo_step, frozen_copy, preference_batch
from minift.train import autocast
from lora import cpu_name  # bench/lora.py's: the CPU's model name, for every figure

BETA = 0.1
LORA = dict(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
PAIRS = [
    ("What is the capital of France, and why is it famous?",
     "The capital of France is Paris. It is famous for its art, fashion and food, for museums such as the Louvre, "
     "and for landmarks like the Eiffel Tower and Notre-Dame cathedral on the banks of the Seine.",
     "France is a country in Europe. It has many cities."),
    ("Give me three tips for sleeping better.",
     "1. Go to bed and wake up at the same time every day, even at weekends. 2. Keep your bedroom dark, quiet and "
     "cool, and leave your phone outside it. 3. Avoid coffee after lunch and heavy meals late in the evening.",
     "Sleep is important. You should try to sleep more, because sleeping is good for you and most people do not "
     "sleep enough. Sleeping better means you sleep better."),
    ("Explain in one paragraph what a prime number is.",
     "A prime number is a whole number greater than 1 whose only divisors are 1 and itself. For example, 7 is prime "
     "because nothing but 1 and 7 divides it evenly, while 8 is not, since 2 and 4 divide it. The first primes are "
     "2, 3, 5, 7, 11 and 13, and there are infinitely many of them, as Euclid proved.",
     "A prime number is any odd number, like 9 or 15."),
    ("Write a short, friendly reply declining an invitation to a party on Saturday.",
     "Thank you so much for inviting me! I would have loved to come, but I already have plans on Saturday that I "
     "cannot move. I hope you all have a wonderful time, and let's catch up soon over coffee.",
     "No. I am busy."),
]


def encode_pairs(tok, pairs):
    """(prompt ids, chosen ids, rejected ids) per pair: the ChatML prompt up to the assistant's turn, answers + <|im_end|>."""
    out = []
    for prompt, chosen, rejected in pairs:
        p = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]), add_special_tokens=False)
        out.append((p, tok.encode(chosen + "<|im_end|>", add_special_tokens=False),
                    tok.encode(rejected + "<|im_end|>", add_special_tokens=False)))
    return out


def seeded_noise(model, scale=0.02):
    """name -> noise of scale * the tensor's std, the same for any model with these parameter names (minift's are HF's)."""
    noise = {}
    for i, (name, p) in enumerate(sorted(model.named_parameters())):
        g = torch.Generator().manual_seed(1000 + i)
        noise[name] = torch.randn(p.shape, generator=g, dtype=p.dtype) * (scale * p.detach().float().std().item())
    return noise


def add_noise(model, noise):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(noise[name])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=4, choices=range(1, len(PAIRS) + 1))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["full", "lora"])
    ap.add_argument("--quick", action="store_true", help="1 pair, fp32, 1 timed round")
    args = ap.parse_args()
    if args.quick:
        args.pairs, args.rounds, args.precision = 1, 1, ["fp32"]
    import datasets
    import peft
    import transformers
    import trl
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    path = resolve_model("smollm2")
    device = torch.device("cpu")
    tok = minift.load_tokenizer(path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    encoded = encode_pairs(tok, PAIRS[:args.pairs])
    prompts, chosen, rejected = map(list, zip(*encoded))
    batch = preference_batch(prompts, chosen, rejected, tok.pad_id)
    trl_batch = DataCollatorForPreference(pad_token_id=tok.pad_id)(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in encoded])
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])
    assert torch.equal(batch["labels"], trl_batch["input_ids"].masked_fill(trl_batch["completion_mask"] == 0, -100))
    lengths = batch["attention_mask"].sum(1).tolist()
    print(f"CPU: {cpu_name()}, capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft "
          f"{peft.__version__}")
    print(f"SmolLM2-135M-Instruct, {args.pairs} pairs = {len(lengths)} rows padded to {batch['input_ids'].shape[1]} "
          f"tokens (lengths {lengths}; {int((batch['labels'] != -100).sum())} completion tokens), sigmoid DPO beta {BETA}"
          f", no optimizer step; {args.rounds} timed rounds after 1 warm-up")

    base = minift.load(path, task="lm", verbose=False)
    noise = seeded_noise(base)
    tmp = Path(tempfile.mkdtemp(prefix="bench_preference_"))
    data = datasets.Dataset.from_dict({"prompt": ["hi"], "chosen": [" a"], "rejected": [" b"]})  # not used

    def trainer(model, ref_model, peft_config=None):
        # bf16=False: TRL's configs default to bf16=True, under which accelerate wraps the reference model's forward
        # in bf16 autocast (and only the Trainer's own training_step autocasts the policy's); here the precision is
        # the bench's: torch.autocast around the whole compute_loss, or none
        cfg = DPOConfig(output_dir=str(tmp / "out"), beta=BETA, loss_type=["sigmoid"], report_to=[], use_cpu=True,
                        bf16=False)
        return DPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=data, processing_class=hf_tok,
                          peft_config=peft_config)

    def hf_model():
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    steps = {}  # (mode, side) -> a function running one step in a given precision, returning the loss
    if "full" in args.modes:
        ours = copy.deepcopy(base)
        add_noise(ours, noise)
        ours.train()
        reference = frozen_copy(base)
        hf_policy = hf_model()
        add_noise(hf_policy, noise)
        steps["full", "minift"] = minift_step(ours, batch, reference, device)
        steps["full", "TRL"] = trl_step(trainer(hf_policy, hf_model()), trl_batch)
    if "lora" in args.modes:
        lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["targets"])
        theirs = trainer(hf_model(), None, peft_config=lora)  # a new adapter: its reference is the adapters disabled
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in sorted(theirs.model.named_parameters()):
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)  # trained: the policy is no longer the base
        theirs.model.save_pretrained(tmp / "adapter")
        ours = copy.deepcopy(base)
        load_adapter(ours, tmp / "adapter")
        ours.train()
        steps["lora", "minift"] = minift_step(ours, batch, None, device)
        steps["lora", "TRL"] = trl_step(theirs, trl_batch)
    del base

    configs = [(mode, side, prec) for prec in args.precision for mode in args.modes for side in ("minift", "TRL")]
    times = {c: [] for c in configs}
    losses = {}
    for r in range(1 + args.rounds):
        for mode, side, prec in configs[::1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            losses[mode, side, prec] = steps[mode, side](prec)
            if r:
                times[mode, side, prec].append(time.perf_counter() - t)
    print("\n| mode | precision | minift s/step | TRL s/step | TRL / minift | minift loss | TRL loss | gap |")
    print("|---|---|---|---|---|---|---|---|")
    for prec in args.precision:
        for mode in args.modes:
            m, t = times[mode, "minift", prec], times[mode, "TRL", prec]
            ratio = statistics.median(b / a for a, b in zip(m, t))
            lm, lt = losses[mode, "minift", prec], losses[mode, "TRL", prec]
            print(f"| {mode} | {prec} | {statistics.median(m):.3f} | {statistics.median(t):.3f} | x{ratio:.2f} | "
                  f"{lm:.6f} | {lt:.6f} | {abs(lm - lt):.1e} |")
    print("\nTRL / minift above 1: minift's step is faster. The loss is the mean over pairs of -log sigmoid(beta h).")


def minift_step(model, batch, reference, device):
    params = [p for p in model.parameters() if p.requires_grad]

    def step(precision):
        for p in params:
            p.grad = None
        with autocast(device, precision):
            loss, _ = dpo_step(model, batch, "sigmoid", beta=BETA, reference=reference)
        return loss

    return step


def trl_step(trainer, inputs):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.model.train()

    def step(precision):
        for p in params:
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        for values in trainer._metrics["train"].values():  # the logged metrics would grow round by round
            values.clear()
        return loss.item()

    return step


if __name__ == "__main__":
    main()
