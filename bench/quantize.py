"""What a quantized base (TrainConfig.quantize) costs before any training, side by side in one run: SmolLM2-135M
zero-shot on the instruction job's validation rows (the tweets), with its adapted layers' weights as they are
(fp32) and as q8_0, q4_1 and q4_0 blocks (LoRA attached, B = 0: the adapters add nothing yet). Exact match, the
validation loss, the weights' bytes, and the seconds of one forward + backward of a LoRA step on 8 rows.

    python bench/quantize.py              # 64 validation rows
"""
import argparse
import platform
import time

import torch

from minift import Tokenizer, TrainConfig, recipe
from minift.batching import collate
from minift.checkpoints import load_checkpoint
from minift.corpora import load_instruction_splits
from minift.evaluate import evaluate
from minift.hub import resolve_model
from minift.evals import exact_match
from minift.instruct import tweet_items
from minift.memory import estimate_memory
from minift.objective import forward_backward
from minift.tasks import encode_instruction
from minift.train import prepare_model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=64)
    args = p.parse_args()
    folder = resolve_model("smollm2")
    tok = Tokenizer.from_file(folder)
    rows = load_instruction_splits(None, 0)["validation"][:args.rows]
    examples, _ = encode_instruction(rows, tok, recipe.INSTRUCT_JOB["max_length"])
    step_batch = collate(examples[:8], tok.pad_id)
    print(f"CPU: {platform.processor() or platform.machine()}, torch {torch.__version__}, capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; SmolLM2-135M-Instruct, "
          f"fp32 activations, {len(rows)} validation rows, LoRA r=8 on every linear layer of the blocks")
    print(f"{'base':6s} {'exact match':>11s} {'val loss':>9s} {'weights MB':>10s} {'fwd+bwd s':>9s}")
    for kind in ("none", "q8_0", "q4_1", "q4_0"):
        torch.manual_seed(0)
        model = load_checkpoint(folder, "lm", verbose=False)
        prepare_model(model, TrainConfig(lora_r=8, quantize=kind, metric="loss"))
        weights = estimate_memory(model, step_batch)["weights"]
        em = exact_match(model.eval(), tok, tweet_items(rows), max_new_tokens=4)["exact_match"]
        loss = evaluate(model, examples, tok.pad_id, batch_size=16)["loss"]
        model.train()
        t0 = time.perf_counter()
        with torch.no_grad():
            forward_backward(model, step_batch, model.count_targets(step_batch["labels"]))
        seconds = time.perf_counter() - t0
        print(f"{'fp32' if kind == 'none' else kind:6s} {em:11.4f} {loss:9.4f} {weights / 2**20:10.0f} {seconds:9.2f}")


if __name__ == "__main__":
    main()
