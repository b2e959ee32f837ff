"""Rollout sampling speed side by side in one run: minift's `sample_rollouts` (prompts x G rows: each prompt read once,
its G samples sharing its keys and values, the KV cache written in place) vs transformers' `model.generate` on the same
rows, tokens/s, for SmolLM2-135M-Instruct (its real weights) and a Qwen2.5-Coder-0.5B shape (random weights: 24 layers,
896 wide, 14 query and 2 k/v heads, a 151,936-token vocabulary).

    python bench/rollouts.py                     # both models, 4 prompts x G 4 = 16 rows, 64 new tokens, fp32 and bf16
    python bench/rollouts.py --models smollm2    # one of them; --rounds 3 (default), --precision fp32
    python bench/rollouts.py --quick             # SmolLM2, 2 prompts x G 2, 32 new tokens, fp32, 2 rounds
    python bench/rollouts.py --profile           # also: where each side's time goes (torch.profiler, one call each)

Both sample (temperature 1.0, top_p 0.95, no top-k: transformers' default top_k 50 is switched off with top_k=0)
exactly --new tokens per row: minift with EOS disabled (eos_token_id=-1), transformers with min_new_tokens =
max_new_tokens (so its EOS is masked out for every step; one masked_fill a step more for it). The counts are checked.
With no row finishing early, minift's dropping of finished rows never acts here: what is measured is the cache, the
shared prompts and the sampling (top-p without sorting the vocabulary). transformers gets the very prompt rows minift
built (prompt_ids and prompt_mask of sample_rollouts' output, left-padded ChatML prompts of different lengths, each
repeated G times), its default cache (DynamicCache) and attention (sdpa). Timed: minift's whole sample_rollouts call
(it also encodes the prompts, builds the completion mask and decodes the texts: a few ms), transformers' generate
alone. bf16: each side's model loaded with its weights in bfloat16, no autocast. One model and precision at a time
(the pair loaded, one warm-up call each, then --rounds rounds of one call each, taking turns, in reverse order every
other round, then freed), in this one process with the same torch threads; rates are rows x new tokens / the median
time, the ratio is the median over rounds of transformers' time / minift's within a round (above 1: minift is
faster). Sampling is seeded on both sides; the tokens differ (two RNG streams), the work does not. Needs
transformers (the test extra).
"""
import argparse
import gc
import statistics
import tempfile
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
QWEN_CODER_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False, bos_token_id=151643,
                      eos_token_id=151643)  # Qwen2.5-Coder-0.5B's config.json, the numbers that shape the work
NAMES = {"smollm2": "SmolLM2-135M-Instruct", "qwen-shape": "Qwen2.5-Coder-0.5B shape, random weights"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "qwen-shape"], choices=list(NAMES))
    ap.add_argument("--prompts", type=int, default=4, choices=range(1, len(PROMPTS) + 1))
    ap.add_argument("--group", type=int, default=4, help="G: samples per prompt")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--quick", action="store_true", help="SmolLM2, 2 prompts x G 2, 32 new tokens, fp32, 2 rounds")
    ap.add_argument("--profile", action="store_true", help="profile one call of each side (each model, first precision)")
    args = ap.parse_args()
    if args.quick:
        args.models, args.prompts, args.group, args.new, args.rounds, args.precision = ["smollm2"], 2, 2, 32, 2, ["fp32"]
    import transformers

    transformers.logging.set_verbosity_error()
    smollm2 = resolve_model("smollm2")
    tok = minift.load_tokenizer(smollm2)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS[:args.prompts]]
    prompt_ids = [tok.encode(p) for p in prompts]  # the same ids for both models (all below either vocabulary)
    rows = args.prompts * args.group
    print(f"CPU: {cpu_name()}, capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"{args.prompts} prompts x G {args.group} = {rows} rows, {args.new} new tokens a row, temperature {TEMPERATURE}, "
          f"top_p {TOP_P}; {args.rounds} timed rounds after 1 warm-up, each model and precision in turn")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            path = smollm2 if name == "smollm2" else random_qwen_shape(transformers, scratch)
            for prec in args.precision:
                dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[prec]
                ours = minift.load(path, task="lm", dtype=dtype, verbose=False).eval()
                theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
                calls, shape = make_calls(ours, theirs, prompt_ids, tok.pad_id, args)
                minift_times, hf_times = timed_rounds(calls, rows * args.new, args.rounds)
                results.append((name, prec, shape, minift_times, hf_times))
                print(f"  {NAMES[name]}, {prec}: prompts left-padded to {shape[1]} tokens; minift "
                      f"{', '.join(f'{t:.2f}' for t in minift_times)} s, transformers "
                      f"{', '.join(f'{t:.2f}' for t in hf_times)} s", flush=True)
                if args.profile and prec == args.precision[0]:
                    profile(calls, f"{name} {prec}")
                del ours, theirs, calls
                gc.collect()
    print("\n| model | precision | minift tokens/s | transformers tokens/s | transformers time / minift time |")
    print("|---|---|---|---|---|")
    for name, prec, _, m, t in results:
        ratio = statistics.median(b / a for a, b in zip(m, t))
        print(f"| {NAMES[name]} | {prec} | {rows * args.new / statistics.median(m):.1f} | "
              f"{rows * args.new / statistics.median(t):.1f} | x{ratio:.2f} |")
    print(f"\n(tokens/s = {rows} rows x {args.new} new tokens / median seconds a call; above x1: minift is faster)")


def random_qwen_shape(transformers, scratch):
    """A Qwen2 checkpoint of Qwen2.5-Coder-0.5B's shape with random weights (seed 0), written once into `scratch`."""
    folder = f"{scratch}/qwen-shape"
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN_CODER_05B))
    model.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def make_calls(ours, theirs, prompt_ids, pad_id, args):
    """Two functions of a seed, each sampling the rollouts once and returning how many tokens it produced."""
    first = sample_rollouts(ours, None, prompt_ids, args.group, max_new_tokens=1, temperature=TEMPERATURE, top_p=TOP_P,
                            eos_token_id=-1)  # the prompt rows, exactly as minift lays them out
    ids, mask = first.prompt_ids, first.prompt_mask

    def run_ours(seed):
        g = torch.Generator().manual_seed(seed)
        out = sample_rollouts(ours, None, prompt_ids, args.group, max_new_tokens=args.new, temperature=TEMPERATURE,
                              top_p=TOP_P, generator=g, eos_token_id=-1)
        assert torch.equal(out.prompt_ids, ids)
        return out.completion_mask.sum().item()

    def run_theirs(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE,
                                  top_p=TOP_P, top_k=0, max_new_tokens=args.new, min_new_tokens=args.new,
                                  eos_token_id=None, pad_token_id=pad_id)
        return out[:, ids.shape[1]:].numel()

    return {"minift": run_ours, "transformers": run_theirs}, tuple(ids.shape)


def timed_rounds(calls, tokens, rounds):
    """One warm-up call each, then `rounds` rounds of one call each, the order reversed every other round."""
    times = {side: [] for side in calls}
    for r in range(1 + rounds):
        for side in list(calls)[::1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            n = calls[side](r)
            if r:
                times[side].append(time.perf_counter() - t)
            assert n == tokens, (side, n)
    return times["minift"], times["transformers"]


def profile(calls, what):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for side in calls:
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            calls[side](99)
        print(f"\n{side} ({what}), one call, top ops by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


if __name__ == "__main__":
    main()
