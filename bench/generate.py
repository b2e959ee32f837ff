"""Generation speed with a KV cache, side by side in one run: minift's `generate` vs transformers' greedy
`generate` on the same weights (SmolLM2-135M-Instruct, the offline decoder), tokens per second.

    python bench/generate.py                  # batch 1 and 4, 64 new tokens, 5 rounds taking turns

Both decode greedily with eos disabled, so both produce exactly `--new` tokens per row; the outputs are
checked to be identical. Needs transformers (the test extra).
"""
import argparse
import platform
import statistics
import time

import torch

import minift
from minift.hub import fetch_smollm2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    path = fetch_smollm2()
    ours = minift.load(path, task="lm", verbose=False).eval()
    theirs = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    tok = minift.load_tokenizer(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}])
    print(f"CPU {platform.processor() or platform.machine()}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; {args.new} new tokens, greedy")
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
