"""Generation speed with a KV cache, side by side in one run: minift's `generate` vs transformers' greedy
`generate` on the same weights (an offline decoder: SmolLM2-135M-Instruct by default), tokens per second.

    python bench/generate.py                  # batch 1 and 4, 64 new tokens, 5 rounds taking turns
    python bench/generate.py --model gemma3-270m --rounds 3      # or qwen2.5-coder-0.5b, or a checkpoint folder

Both decode greedily with eos disabled, so both produce exactly `--new` tokens per row; the outputs are
checked to be identical. Needs transformers (the test extra).
"""
import argparse
import statistics
import time

import torch

import minift
from minift.report import cpu_name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default="smollm2", help="a named offline decoder or a checkpoint folder")
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    path = minift.resolve_model(args.model)
    ours = minift.load(path, task="lm", verbose=False).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = minift.load_tokenizer(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}])
    print(f"{args.model}; {cpu_name()}, capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32; {args.new} new tokens, greedy")
    for rows in (1, 4):
        batch = tok([prompt] * rows, add_special_tokens=False)
        ids, mask = batch["input_ids"], batch["attention_mask"]

        def run_ours():
            return ours.generate(ids, max_new_tokens=args.new, attention_mask=mask, eos_token_id=-1)

        def run_theirs():
            with torch.no_grad():
                return theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False,
                                       eos_token_id=None, pad_token_id=tok.pad_id, min_new_tokens=args.new)

        times = {"minift": [], "transformers": []}
        outs = {}
        for r in range(args.rounds + 1):
            for label, fn in list({"minift": run_ours, "transformers": run_theirs}.items())[::1 if r % 2 else -1]:
                t = time.perf_counter()
                outs[label] = fn()
                if r:  # round 0 warms up
                    times[label].append(time.perf_counter() - t)
        same = torch.equal(outs["minift"], outs["transformers"])
        rate = {k: rows * args.new / statistics.median(v) for k, v in times.items()}
        ratio = statistics.median(t / m for m, t in zip(times["minift"], times["transformers"]))
        print(f"batch {rows}: minift {rate['minift']:.1f} tokens/s, transformers {rate['transformers']:.1f} tokens/s, "
              f"minift x{ratio:.2f} (median of per-round ratios); identical tokens: {same}")


if __name__ == "__main__":
    main()
