"""Rollout sampling speed side by side in one run: minift's `sample_rollouts` (prompts x G rows in one left-padded
generate with the KV cache) vs transformers' `model.generate` on the same rows, SmolLM2-135M-Instruct, tokens/s.

    python bench/rollouts.py                     # 4 prompts x G 4 = 16 rows, 64 new tokens, fp32 and bf16, 3 rounds
    python bench/rollouts.py --quick             # 2 prompts x G 2, 32 new tokens, fp32, 2 rounds
    python bench/rollouts.py --profile           # also: where each side's time goes (torch.profiler, one call each)

Both sample (temperature 1.0, top_p 0.95, no top-k: transformers' default top_k 50 is switched off with top_k=0)
exactly --new tokens per row: minift with EOS disabled (eos_token_id=-1), transformers with min_new_tokens =
max_new_tokens (so its EOS is masked out for every step; one masked_fill a step more for it). The counts are checked.
transformers gets the very prompt rows minift built (prompt_ids and prompt_mask of sample_rollouts' output, left-padded
ChatML prompts of different lengths, each repeated G times), its default cache (DynamicCache) and attention (sdpa).
Timed: minift's whole sample_rollouts call (it also encodes the prompts, builds the completion mask and decodes the
texts: a few ms), transformers' generate alone. bf16: each side's model loaded with its weights in bfloat16 (a
separate pair of models), no autocast. Every configuration takes turns with the others, one call of each per round
(in reverse order every other round), after one warm-up round, in this one process with the same torch threads; rates
are rows x new tokens / the median time, the ratio is the median over rounds of transformers' time / minift's within
a round (above 1: minift is faster). Sampling is seeded on both sides; the tokens differ (two RNG streams), the work
does not. Needs transformers (the test extra).
"""
import argparse
import statistics
import time

import torch

import minift
from minift.hub import resolve_model
from minift.rl import sample_rollouts
from lora import cpu_name  # bench/lora.py's: the CPU's model name, for every figure

PROMPTS = [
    "What is 17 + 25? Think step by step, then give the answer.",
    "Write a haiku about autumn leaves.",
    "Name three animals that live in the ocean and say one fact about each.",
    "Explain why the sky is blue in two sentences.",
    "A train leaves at 3 pm and travels for 2 hours and 45 minutes. When does it arrive?",
    "Give me a short motivational quote for a Monday morning.",
    "What is the difference between a list and a tuple in Python?",
    "Translate 'good morning, how are you?' into French.",
]
TEMPERATURE, TOP_P = 1.0, 0.95


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1))
    ap.add_argument("--group", type=int, default=4, help="G: samples per prompt")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--quick", action="store_true", help="2 prompts x G 2, 32 new tokens, fp32, 2 rounds")
    ap.add_argument("--profile", action="store_true", help="profile one call of each side (first precision)")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.group, args.new, args.rounds, args.precision = 2, 2, 32, 2, ["fp32"]
    import transformers

    transformers.logging.set_verbosity_error()
    path = resolve_model("smollm2")
    tok = minift.load_tokenizer(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS[:args.prompts]]
    rows = args.prompts * args.group
    print(f"CPU: {cpu_name()}, capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    calls = {}
    for prec in args.precision:
        ours = minift.load(path, task="lm", dtype=dtypes[prec], verbose=False).eval()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtypes[prec]).eval()
        calls[prec, "minift"], calls[prec, "transformers"], shape = make_calls(ours, theirs, tok, prompts, args)
    print(f"SmolLM2-135M-Instruct, {args.prompts} prompts x G {args.group} = {rows} rows, prompts left-padded to "
          f"{shape[1]} tokens, {args.new} new tokens a row, temperature {TEMPERATURE}, top_p {TOP_P}; "
          f"{args.rounds} timed rounds after 1 warm-up")

    configs = list(calls)
    times = {c: [] for c in configs}
    for r in range(1 + args.rounds):
        for c in configs[::1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            n = calls[c](r)
            if r:
                times[c].append(time.perf_counter() - t)
            assert n == rows * args.new, (c, n)
    print("\n| precision | minift tokens/s | transformers tokens/s | transformers time / minift time |")
    print("|---|---|---|---|")
    for prec in args.precision:
        m, t = times[prec, "minift"], times[prec, "transformers"]
        ratio = statistics.median(b / a for a, b in zip(m, t))
        print(f"| {prec} | {rows * args.new / statistics.median(m):.1f} | {rows * args.new / statistics.median(t):.1f} "
              f"| x{ratio:.2f} |")
    print(f"\n(tokens/s = {rows} rows x {args.new} new tokens / median seconds a call; above x1: minift is faster)")
    if args.profile:
        profile(calls, args.precision[0])


def make_calls(ours, theirs, tok, prompts, args):
    """Two functions of a seed, each sampling the rollouts once and returning how many tokens it produced."""
    first = sample_rollouts(ours, tok, prompts, args.group, max_new_tokens=1, temperature=TEMPERATURE, top_p=TOP_P,
                            eos_token_id=-1)  # the prompt rows, exactly as minift lays them out
    ids, mask = first.prompt_ids, first.prompt_mask

    def run_ours(seed):
        g = torch.Generator().manual_seed(seed)
        out = sample_rollouts(ours, tok, prompts, args.group, max_new_tokens=args.new, temperature=TEMPERATURE,
                              top_p=TOP_P, generator=g, eos_token_id=-1)
        assert torch.equal(out.prompt_ids, ids)
        return out.completion_mask.sum().item()

    def run_theirs(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE,
                                  top_p=TOP_P, top_k=0, max_new_tokens=args.new, min_new_tokens=args.new,
                                  eos_token_id=None, pad_token_id=tok.pad_id)
        return out[:, ids.shape[1]:].numel()

    return run_ours, run_theirs, tuple(ids.shape)


def profile(calls, prec):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for side in ("minift", "transformers"):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            calls[prec, side](99)
        print(f"\n{side} ({prec}), one call, top ops by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
