"""The main job's defaults, in one place: all-MiniLM-L6-v2 fine-tuned on 3-class tweet sentiment.

`minift finetune`, `finetune_classifier()`, `minift sweep`, the tutorials and bench/ all start from these:
MAIN_JOB (what is trained on what) and MAIN_TRAIN (how: on top of TrainConfig's generic defaults). Change
the recipe here and everything that says "the default" changes with it.
"""
MODEL = "minilm"  # a name (minilm, smollm2, gpt2) or a checkpoint folder
DATA = None  # None: the bundled tweets (negative / neutral / positive), split 80/10/10 with the seed
OUT = "runs/minilm-tweets"
SWEEP_OUT = "runs/sweep"  # `minift sweep`: one folder per trial under it, and the table
MAX_LENGTH = 64  # tokens per text; the length report before training says how many a length cuts
POOLING = "mean"  # all-MiniLM-L6-v2 was trained to make mean-pooled sentence vectors

MAIN_JOB = {"model": MODEL, "data": DATA, "out": OUT, "max_length": MAX_LENGTH, "pooling": POOLING}

# How the main job trains, where it differs from TrainConfig's generic defaults (2 epochs at lr 5e-5, every
# weight trained, the checkpoint's dropout). Chosen on the validation split by bench/recipe_search.py (the
# table and the rules: bench/RESULTS.md and tutorial 06): one epoch at a higher peak lr, the embeddings and the
# two lowest of MiniLM's six blocks frozen (the backward stops above them), dropout off (the masks cost a third
# of a step on a CPU, and one pass over the data does not over-fit). Tuned for MiniLM on the tweets: for another
# model or data set, sweep (stage 6), or pass --epochs 2 --lr 5e-5 --freeze '' --dropout 0.1 to get
# TrainConfig's generic recipe back.
MAIN_TRAIN = {"epochs": 1, "lr": 1.5e-4, "freeze": ["layers:2"], "dropout": 0.0}

# `minift finetune --lora` (rank 8 adapters on every linear layer), on top of MAIN_TRAIN: adapters start at
# zero and hold few numbers, so they want a larger lr, and they go in every block (no frozen blocks below
# them). The most accurate of four trials on validation (bench/recipe_search.py --lora; bench/RESULTS.md).
LORA_TRAIN = {"lr": 1e-3, "freeze": []}

# The instruction-tuning job (`minift finetune --task instruct`): SmolLM2-135M-Instruct answers the tweets in
# one word (or your JSONL file of prompt/response rows), judged by validation loss and exact match.
INSTRUCT_JOB = {"model": "smollm2", "data": None, "out": "runs/smollm2-instruct", "max_length": 256,
                "pooling": POOLING}
INSTRUCT_TRAIN = {"epochs": 1, "batch_size": 8, "lr": 3e-5, "warmup_ratio": 0.05, "metric": "loss"}

# The preference-tuning job (`minift finetune --task dpo`): SmolLM2 on the arithmetic task's on-policy pairs (or your
# JSONL file of prompt/chosen/rejected rows), LoRA adapters (the reference is then the model with them off), dropout off
# as TRL has it (its masks would differ between the policy and the reference). DPO_SETTINGS: on top of dpo.DPOSettings
# (TRL's defaults: sigmoid DPO, beta 0.1). rpo_alpha 1 adds the chosen answers' NLL (RPO): plain DPO took the
# validation exact match from 0.53 to 0.17 here, its chosen log-probs falling (-10.7 -> -15.2) as the answers grew
# into sentences cut off before their number; with the NLL term the chosen log-probs rose (-9.1 -> -8.2) and exact
# match went to 0.73 (bench/RESULTS.md). metric auto: best/ by exact match on the task (DPO's validation loss did not
# track it: plain DPO's best/ by loss was its worst by exact match), by the loss on held-out pairs for a file.
DPO_JOB = {"model": "smollm2", "data": None, "out": "runs/smollm2-dpo", "max_length": 256}
DPO_SETTINGS = {"rpo_alpha": 1.0}
DPO_TRAIN = {"epochs": 1, "batch_size": 8, "lr": 5e-4, "warmup_ratio": 0.1, "metric": "auto", "dropout": 0.0,
             "lora_r": 8, "eval_every": 5}

# KTO (`minift finetune --task kto`): the same model and task, each on-policy pair split into a desirable and an
# undesirable row (or your JSONL file of prompt/completion/label rows). KTO_SETTINGS: on top of dpo.KTOSettings (TRL's
# KTOConfig defaults: beta 0.1, both weights 1: the split pairs give as many rows of each kind). KTO_TRAIN: DPO_TRAIN's
# loop with batches of 16 rows, the rows of DPO's 8 pairs (not tuned for KTO yet).
KTO_JOB = {"model": "smollm2", "data": None, "out": "runs/smollm2-kto", "max_length": 256}
KTO_SETTINGS = {}
KTO_TRAIN = {**DPO_TRAIN, "batch_size": 16}

# The RL job (`minift finetune --task grpo`): SmolLM2 samples 8 answers to each arithmetic question (or your JSONL
# file's prompts) and is rewarded where the number is right (grpo.number_is_right, or --reward module:function).
# GRPO_SETTINGS: on top of grpo.GRPOSettings (TRL's defaults: beta 0, no reference; loss_type dapo). temperature 0.5:
# at TRL's 1.0 SmolLM2 gets 0.09 of them right, at 0.5 0.47 with a spread of rewards in 62% of the groups (a group
# whose answers score alike teaches nothing); 16 new tokens: the answer is a number.
GRPO_JOB = {"model": "smollm2", "data": None, "out": "runs/smollm2-grpo", "max_length": 256}
GRPO_SETTINGS = {"group_size": 8, "max_new_tokens": 16, "temperature": 0.5}
GRPO_TRAIN = {"epochs": 1, "batch_size": 4, "lr": 5e-4, "warmup_ratio": 0.1, "metric": "reward", "dropout": 0.0,
              "lora_r": 8, "eval_every": 5}

# English -> French on Bible verses (tutorials/15_translation.py; `minift finetune --task instruct --data bible-en-fr
# --suite translation` with these as flags): Qwen2.5-Coder-0.5B-Instruct, which knows some French already (chrF 27.8
# zero-shot on 16 validation verses, SmolLM2-135M 12.1: it answers in English or loops), LoRA adapters in every
# linear layer (full fine-tuning would keep AdamW's state for 494M weights), the loss a chunk of positions at a time
# (its 151,936-word vocabulary makes the logits the largest tensor) and two micro-batches of 4 (the activations of 8
# rows at once would double). best/ by validation loss. Measured (AMD EPYC, tutorials/README.md): 100 held-out verses
# chrF 32.2 -> 34.9, BLEU 5.8 -> 9.0.
TRANSLATION_JOB = {"model": "qwen2.5-coder-0.5b", "data": "bible-en-fr", "out": "runs/qwen-translation",
                   "max_length": 256}
TRANSLATION_TRAIN = {"epochs": 1, "batch_size": 8, "grad_accum": 2, "lr": 2e-4, "warmup_ratio": 0.05, "metric": "loss",
                     "dropout": 0.0, "lora_r": 16, "lora_alpha": 32, "chunked_loss": 512}

# The reasoning track (tutorials/16_reasoning.py): SmolLM2 on GSM-style problems, first supervised on the worked
# solutions of the training generators (`--task instruct --data gsm --suite gsm`), then GRPO from that model with the
# exact-answer reward (`--task grpo --data gsm --reward minift.grpo:final_answer_is_right`), the gsm suite (held-out
# generators) at each stage. Solutions run to 220 SmolLM2 tokens (max_length 512 holds prompt and solution; 256 new
# tokens hold an answer; two micro-batches of 4 and the loss by chunks keep the step's memory down); GRPO samples at
# temperature 0.7 so that a group of 4 holds right and wrong answers; its update runs two micro-batches of 2 prompts x 4
# answers x up to 400 tokens, each block keeping only its input (a step of 16 such rows at once took 13 GB and was
# killed here).
GSM_SFT_JOB = {"model": "smollm2", "data": "gsm", "out": "runs/smollm2-gsm-sft", "max_length": 512}
GSM_SFT_TRAIN = {"epochs": 1, "batch_size": 8, "grad_accum": 2, "lr": 1e-4, "warmup_ratio": 0.05, "metric": "loss",
                 "chunked_loss": 512}
GSM_GRPO_SETTINGS = {"reward": "minift.grpo:final_answer_is_right", "group_size": 4, "max_new_tokens": 256,
                     "temperature": 0.7}
GSM_GRPO_TRAIN = {"epochs": 1, "batch_size": 4, "grad_accum": 2, "recompute": 1, "lr": 5e-4, "warmup_ratio": 0.1,
                  "metric": "reward", "dropout": 0.0, "lora_r": 8, "eval_every": 8}
# The named-entity job (`minift finetune --task ner`): all-MiniLM-L6-v2 tags each word of the tweets of hub.fetch_ner
# (or your CoNLL file) with one of 21 BIO tags, a new linear head on every token; best/ by entity-level F1 on
# validation (metric auto). max_length 128: the longest tweet is 75 tokens, so no word is cut. Every weight trains,
# the new head at 10x the lr: with the head at the body's lr 1e-4 the validation entity F1 was 0.13 after one epoch
# and 0.50 after five, with head_lr_scale 10 0.26 and 0.60 (the same seed and split, 575 steps each, AMD EPYC).
NER_JOB = {"model": MODEL, "data": None, "out": "runs/minilm-ner", "max_length": 128}
NER_TRAIN = {"epochs": 5, "batch_size": 16, "lr": 1e-4, "head_lr_scale": 10, "metric": "auto"}

# The distillation job (`minift finetune --task distill`): Qwen2.5-Coder-0.5B-Instruct (the student) learns from
# Qwen2.5-Coder-1.5B-Instruct (the teacher: same tokenizer) on two-digit sums and differences (corpora.two_digit_splits:
# zero-shot the student gets 0.76 of the test questions and 0.78 of validation's, the teacher all, greedy, measured;
# or your JSONL file's prompt/response rows).
# DISTILL_SETTINGS: on top of distill.DistillSettings (TRL's GKD defaults: beta 0.5, lmbda 0.5); 16 new tokens: the
# answer is a number. chunked_loss 64: both heads (151,936 rows) run 64 positions at a time, so a batch's logits never
# exist whole.
DISTILL_JOB = {"model": "qwen2.5-coder-0.5b", "data": None, "out": "runs/qwen-distill", "max_length": 256}
DISTILL_SETTINGS = {"teacher": "qwen2.5-coder-1.5b", "max_new_tokens": 16}
DISTILL_TRAIN = {"epochs": 1, "batch_size": 8, "lr": 5e-4, "warmup_ratio": 0.1, "metric": "auto", "dropout": 0.0,
                 "lora_r": 8, "eval_every": 5, "chunked_loss": 64}

# The reward-model job (`minift finetune --task reward`): SmolLM2 with a one-number head (num_labels=1) learns to score
# the arithmetic task's right answers above near misses (or your JSONL file's prompt/chosen/rejected pairs), LoRA
# adapters and the new head; best/ by accuracy on held-out pairs. REWARD_SETTINGS: on top of reward.RewardSettings
# (TRL's default: no centring).
REWARD_JOB = {"model": "smollm2", "data": None, "out": "runs/smollm2-reward", "max_length": 256}
REWARD_SETTINGS = {}
REWARD_TRAIN = {"epochs": 3, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.1, "metric": "auto", "dropout": 0.0,
                "lora_r": 8, "eval_every": 10}
