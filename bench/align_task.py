"""The arithmetic task before and after each way of tuning, on SmolLM2-135M-Instruct: zero-shot, SFT (the
instruction job), DPO (the preference job, on-policy pairs) and GRPO (the RL job, reward = the number is right),
each from the same base model, each scored once on the same held-out test questions. Wall time of each job.

    python bench/align_task.py              # the whole task: 140 training questions, 30 validation, 30 test
    python bench/align_task.py --limit 24   # a quick try (24 training questions)
    python bench/align_task.py --only grpo --out runs/align

The task (corpora.arithmetic_splits): "What is a + b?" / "a - b" for every pair of digits, 200 questions split
70/15/15 with seed 0; a reply is right when its first line's last integer is the answer (evals.parse_answer), the
test questions are none of the training ones. Every job trains LoRA r=8 adapters (alpha 16) on every linear layer
with the precision auto picks (bf16 on a CPU with AVX512-BF16 or AMX, else fp32), one epoch; the settings are each
job's recipe (recipe.py: DPO_TRAIN, GRPO_TRAIN) and for SFT the same LoRA at the same lr over two epochs. The
figures go to OUT/align_task.json. Prints the CPU: compare figures only within one run.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lora import cpu_name  # noqa: E402

from minift import TrainConfig, load_checkpoint, load_tokenizer, recipe, resolve_model  # noqa: E402
from minift.corpora import arithmetic_splits, limit_rows  # noqa: E402
from minift.dpo import finetune_dpo  # noqa: E402
from minift.evals import exact_match  # noqa: E402
from minift.grpo import finetune_grpo  # noqa: E402
from minift.instruct import finetune_instruct  # noqa: E402

SFT_TRAIN = {**recipe.INSTRUCT_TRAIN, "epochs": 2, "lr": 5e-4, "lora_r": 8, "dropout": 0.0, "eval_every": 10}


def test_score(folder, questions):
    """Every method's model scored alike: greedy, fp32, the number in the first line of the reply."""
    model, tok = load_checkpoint(folder, "lm", verbose=False), load_tokenizer(folder)
    return exact_match(model, tok, questions, kind="number")["exact_match"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, help="training questions (default all 140)")
    parser.add_argument("--only", help="comma-separated: zero_shot,sft,dpo,grpo (default all)")
    parser.add_argument("--out", default="runs/align")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else ["zero_shot", "sft", "dpo", "grpo"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = limit_rows(arithmetic_splits(), args.limit)
    folder = out / "arithmetic"  # the task as instruction rows, for the SFT job
    folder.mkdir(exist_ok=True)
    for k, rows in splits.items():
        (folder / f"{k}.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                                                   for r in rows))
    model = str(resolve_model("smollm2"))
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"{len(splits['train'])} training, {len(splits['validation'])} validation, {len(splits['test'])} test questions")
    results = {}
    for name in only:
        t0 = time.perf_counter()
        if name == "zero_shot":
            results[name] = {"test": test_score(model, splits["test"])}
        elif name == "sft":
            finetune_instruct(model, str(folder), str(out / "sft"), TrainConfig(**SFT_TRAIN), test=False)
            results[name] = {"test": test_score(out / "sft" / "best", splits["test"])}
        elif name == "dpo":
            r = finetune_dpo(model, None, str(out / "dpo"), TrainConfig(**recipe.DPO_TRAIN), limit=args.limit, test=False)
            results[name] = {"test": test_score(out / "dpo" / "best", splits["test"]),
                             "validation_before": r["before"]["exact_match"],
                             "validation_after": r["validation"]["exact_match"]}
        elif name == "grpo":
            r = finetune_grpo(model, None, str(out / "grpo"), TrainConfig(**recipe.GRPO_TRAIN), limit=args.limit, test=False)
            results[name] = {"test": test_score(out / "grpo" / "best", splits["test"]),
                             "validation_before": r["reward_before"], "validation_after": r["validation"]["reward"]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"\n== {name}: test exact match {results[name]['test']:.4f} in {results[name]['seconds']:.0f} s\n", flush=True)
    print(f"CPU: {cpu_name()}")
    print(f"{'method':10s} {'test exact match':>17s} {'wall s':>8s}")
    for name, r in results.items():
        print(f"{name:10s} {r['test']:17.4f} {r['seconds']:8.0f}")
    (out / "align_task.json").write_text(json.dumps({"cpu": cpu_name(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
