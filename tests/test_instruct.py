"""Instruction tuning as a job (instruct.finetune_instruct): every row format becomes a chat prompt, the prompt
is masked from the loss while the end-of-turn token is not, the loss falls, best/ is saved with the chat template,
an out-of-memory error comes back as one line, and exact match counts what it should.

A tiny random-init Llama (hidden 16) with a small byte-level BPE tokenizer trained here and SmolLM2's ChatML
template: no download, a few seconds."""
import json
import math

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

import minift
from minift.checkpoints import build_model, load_checkpoint, save_checkpoint
from minift.errors import MiniftError
from minift.evaluate import evaluate
from minift.config import TrainConfig
from minift.corpora import load_instruction_splits
from minift.evals import exact_match, greedy_replies
from minift.instruct import finetune_instruct, tweet_items
from minift.tasks import encode_instruction, format_instruction

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]


def rows_of_each_format(n=48):
    """Three formats, one easy rule: the answer is the first word of the question, in capitals."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        q = f"{w} {WORDS[(i * 3 + 1) % len(WORDS)]} {WORDS[(i * 5 + 2) % len(WORDS)]}"
        if i % 3 == 0:
            rows.append({"prompt": f"first word of: {q}", "response": w.upper()})
        elif i % 3 == 1:
            rows.append({"instruction": "first word of", "input": q, "output": w.upper()})
        else:
            rows.append({"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"},
                                      {"role": "user", "content": f"first word of: {q}"},
                                      {"role": "assistant", "content": w.upper()}]})
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A checkpoint folder: random-init Llama + a ChatML tokenizer (eos = pad = <|im_end|>)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [SYSTEM, "first word of: ", "Below is an instruction", "say hi"] + [w + " " + w.upper() for w in WORDS]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
         "chat_template": SMOLLM2_TEMPLATE}))
    tok = minift.Tokenizer.from_file(folder)
    torch.manual_seed(0)
    config = dict(model_type="llama", vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    model = build_model(config, task="lm")
    model.tokenizer_file = folder / "tokenizer.json"  # saved beside the weights, with tokenizer_config.json
    save_checkpoint(model, folder)
    return folder, tok


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_of_each_format()))
    return path


def test_every_format_becomes_a_chat_prompt(tiny):
    _, tok = tiny
    prompt_row, instr_row, chat_row = (format_instruction(r, tok, n) for n, r in enumerate(rows_of_each_format(3), 1))
    assert prompt_row[0] == SYSTEM + "<|im_start|>user\nfirst word of: red green blue<|im_end|>\n<|im_start|>assistant\n"
    assert instr_row[0] == SYSTEM + "<|im_start|>user\nfirst word of\n\ngreen dog tree<|im_end|>\n<|im_start|>assistant\n"
    assert chat_row[0] == (SYSTEM + "<|im_start|>user\nsay hi<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
                                  "<|im_start|>user\nfirst word of: blue tree dog<|im_end|>\n<|im_start|>assistant\n")
    assert [response for _, response in (prompt_row, instr_row, chat_row)] == ["RED", "GREEN", "BLUE"]
    with pytest.raises(MiniftError, match="must end with the assistant's answer"):
        format_instruction({"messages": [{"role": "user", "content": "hi"}]}, tok, 7)
    # a turn whose content is not a text is named, with the rule it breaks (it was quoted the ending rule)
    with pytest.raises(MiniftError, match=r"row 7: turn 2 of 'messages' must be \{'role': a text, 'content': a text\}, "
                                          r"not \{\"role\": \"assistant\", \"content\": 5\}"):
        format_instruction({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}, tok, 7)
    with pytest.raises(MiniftError, match="row 4 has fields text, label"):
        format_instruction({"text": "x", "label": "y"}, tok, 4)


def test_without_a_chat_template_prompts_are_plain(tiny):
    folder, _ = tiny
    plain = minift.Tokenizer.from_file(folder / "tokenizer.json")
    plain.chat_template = None
    assert format_instruction({"prompt": "P", "response": "R"}, plain)[0] == "P"
    assert format_instruction({"instruction": "I", "output": "O"}, plain)[0].endswith("### Instruction:\nI\n\n### Response:\n")
    with pytest.raises(MiniftError, match="chat template"):
        format_instruction({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                      {"role": "assistant", "content": "a"}]}, plain)


@pytest.mark.parametrize("bad, says", [({"prompt": "q", "response": "  "}, "the response is empty"),
                                       ({"text": "x"}, "has fields text"),
                                       ({"messages": [{"role": "user", "content": "q"}]}, "'messages' must end")])
def test_a_bad_instruction_row_is_named_by_its_file_line(tmp_path, bad, says):
    """The split shuffles the rows: an error must name the line of the file, not a position in a split."""
    rows = [json.dumps(r) for r in rows_of_each_format(20)]
    rows[12] = json.dumps(bad)
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(rows[:5]) + "\n\n" + "\n".join(rows[5:]) + "\n")  # a blank line: row 13 is line 14
    with pytest.raises(MiniftError, match=f"rows.jsonl:14.*{says}"):
        load_instruction_splits(path, seed=0)
    folder = tmp_path / "splits"  # a folder of splits: the line of its file
    folder.mkdir()
    for name, part in [("train", rows[:2] + rows[12:13]), ("validation", rows[2:4]), ("test", rows[4:6])]:
        (folder / f"{name}.jsonl").write_text("\n".join(part) + "\n")
    with pytest.raises(MiniftError, match=f"train.jsonl:3.*{says}"):
        load_instruction_splits(folder, seed=0)


def test_prompt_masked_end_of_turn_supervised(tiny, data):
    _, tok = tiny
    splits = load_instruction_splits(data, seed=0)
    assert sum(len(v) for v in splits.values()) == 48
    for row in splits["train"][:9]:
        (ex,), dropped = encode_instruction([row], tok, max_length=256)
        prompt, response = format_instruction(row, tok)
        n_prompt = len(tok.encode(prompt, add_special_tokens=False))
        response = tok.encode(response, add_special_tokens=False)
        assert dropped == 0
        assert ex["labels"][:n_prompt] == [-100] * n_prompt  # every prompt token (system, turns, tags) masked
        assert ex["labels"][n_prompt:] == response + [tok.eos_id]  # the answer and its <|im_end|> trained
        assert ex["input_ids"][n_prompt:] == response + [tok.eos_id]
        assert tok.id_to_token(ex["labels"][-1]) == "<|im_end|>"
        assert tok.decode(ex["input_ids"][:n_prompt], skip_special_tokens=False) == prompt


def test_finetune_instruct_learns_and_saves_best(tiny, data, tmp_path, capsys):
    folder, tok = tiny
    out = tmp_path / "run"
    cfg = TrainConfig(epochs=20, batch_size=8, lr=1e-2, warmup_ratio=0.05, metric="loss", eval_every=25,
                      precision="fp32", device="cpu", weight_decay=0.0)
    base = load_checkpoint(folder, "lm", verbose=False)
    splits = load_instruction_splits(data, seed=0)
    val_ex, _ = encode_instruction(splits["validation"], tok, 256)
    loss_before = evaluate(base, val_ex, tok.pad_id)["loss"]
    report = finetune_instruct(str(folder), data=str(data), out=str(out), cfg=cfg, max_length=256)
    printed = capsys.readouterr().out
    assert "memory estimate: weights" in printed and "before fine-tuning:" in printed and "after fine-tuning:" in printed
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == report["steps"] == 100  # 38 rows / 8 -> 5 batches an epoch, 20 epochs
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, (losses[:5], losses[-5:])
    assert report["validation"]["loss"] < loss_before - 1.0, (report["validation"]["loss"], loss_before)
    assert math.isclose(report["validation"]["perplexity"], math.exp(report["validation"]["loss"]), rel_tol=1e-9)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "best" / name).is_file(), name
    best = load_checkpoint(out / "best", "lm", verbose=False)
    assert math.isclose(evaluate(best, val_ex, tok.pad_id)["loss"], report["validation"]["loss"], rel_tol=1e-6)
    assert minift.Tokenizer.from_file(out / "best").chat_template == SMOLLM2_TEMPLATE
    assert report["weights_moved"] > 0.01
    saved = json.loads((out / "results.json").read_text())
    assert saved["validation"]["loss"] == report["validation"]["loss"] and len(saved["samples_after"]) == 3
    # the format is learnt (a model this small learns the answers' prior, not the rule): one capitalised word
    # from the responses, then <|im_end|>; the untrained model babbles
    prompts = [format_instruction(r, tok)[0] for r in splits["train"]]
    answers = greedy_replies(best, tok, prompts, max_new_tokens=4)
    assert all(a in {w.upper() for w in WORDS} for a in answers), answers[:8]
    assert not any(a in {w.upper() for w in WORDS} for a in greedy_replies(base, tok, prompts, max_new_tokens=4))


def test_out_of_memory_is_one_line(tiny, data, tmp_path, monkeypatch):
    folder, _ = tiny
    real_forward = minift.models.llama.LlamaForCausalLM.forward

    def forward(self, *args, **kwargs):  # generation (eval mode) works; the training-mode forward runs out
        if self.training:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(minift.models.llama.LlamaForCausalLM, "forward", forward)
    cfg = TrainConfig(epochs=1, batch_size=8, metric="loss", device="cpu")
    with pytest.raises(MiniftError) as e:
        finetune_instruct(str(folder), data=str(data), out=str(tmp_path / "oom"), cfg=cfg, max_length=128, test=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("out of memory (CUDA out of memory")
    assert "batch_size (now 8" in msg and "max_length (the longest example has" in msg and "LoRA" in msg
    assert "recompute=1" in msg and "chunked_loss=1024" in msg  # a language model's two memory levers
    assert e.value.__cause__ is None and e.value.__suppress_context__

    def broken(self, *args, **kwargs):  # any other error is not dressed up as out-of-memory
        if self.training:
            raise RuntimeError("shape mismatch")
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(minift.models.llama.LlamaForCausalLM, "forward", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        finetune_instruct(str(folder), data=str(data), out=str(tmp_path / "oom2"), cfg=cfg, max_length=128, test=False)


class ScriptedModel(torch.nn.Module):
    """Stands in for a decoder: answers each prompt with a fixed text (checks the bookkeeping around generate:
    left padding, the answer cut after the prompt, the order restored after batching by length)."""
    task = "lm"

    def __init__(self, tok, answers):
        super().__init__()
        self.tok, self.answers, self.batches = tok, answers, []
        self.weight = torch.nn.Parameter(torch.zeros(1))  # (evals asks a model for its device)

    def generate(self, input_ids, max_new_tokens, attention_mask, eos_token_id):
        assert (attention_mask[:, -1] == 1).all()  # left-padded: every prompt ends at the right edge
        self.batches.append(len(input_ids))
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
            answer = self.tok.encode(self.answers[prompt], add_special_tokens=False)[:max_new_tokens]
            rows.append(ids + answer + [eos_token_id] * (max_new_tokens + 1 - len(answer)))
        return torch.tensor(rows)


def test_the_tweets_exact_match_counts_hand_made_cases(tiny):
    """The job scores the tweets with evals.exact_match, the one scorer: the reply's first word, case and the
    punctuation around it aside."""
    _, tok = tiny
    cases = [("a", "red", "red"), ("bb", "RED", "Red."), ("ccc", "blue", " blue "), ("dddd", "blue", "green"),
             ("eeeee", "cat", "cat dog"), ("f", "dog", "")]  # right, right, right, wrong, right (first word), wrong
    rows = [{"prompt": p * 9, "response": r} for p, r, _ in cases]
    # the model sees each prompt as exact_match writes it: wrapped in the chat template (format_instruction)
    model = ScriptedModel(tok, {format_instruction(row, tok)[0]: a for row, (_, _, a) in zip(rows, cases)})
    result = exact_match(model, tok, tweet_items(rows), batch_size=4, max_new_tokens=4)
    assert (result["correct"], result["n"], result["exact_match"]) == (4, 6, 4 / 6)
    assert [s["reply"].strip() for s in result["items"]] == ["red", "Red.", "blue", "green", "cat dog", ""]
    assert model.batches == [4, 2]
    with pytest.raises(MiniftError, match="at least one"):
        exact_match(model, tok, [])


def test_greedy_replies_batched_equal_one_at_a_time(tiny, data):
    folder, tok = tiny
    model = load_checkpoint(folder, "lm", verbose=False)
    prompts = [format_instruction(r, tok)[0] for r in load_instruction_splits(data, seed=0)["train"][:7]]
    batched = greedy_replies(model, tok, prompts, batch_size=7, max_new_tokens=4)
    alone = [greedy_replies(model, tok, [p], max_new_tokens=4)[0] for p in prompts]
    assert batched == alone
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    assert greedy_replies(model, tok, ids, batch_size=7, max_new_tokens=4) == batched  # token ids work alike
    assert len({len(i) for i in ids}) > 1  # padding was in play


def test_suites_are_scored_before_and_after(tiny, data, tmp_path, monkeypatch, capsys):
    """suites=[...]: the job scores evals.py's suites on the model as it came and on best/, and prints the change;
    the numbers are those run_suites gives for the base and for the saved best model."""
    from minift import evals
    folder, tok = tiny
    rows = load_instruction_splits(data, seed=0)["validation"]
    items = [{"prompt": r["prompt"], "answer": r["response"]} for r in rows if "prompt" in r]
    monkeypatch.setitem(evals.SUITES, "toy", lambda: evals.Suite("toy", "exact_match", items, "test rows",
                                                                 {"max_new_tokens": 4}))
    monkeypatch.setitem(evals.SUITES, "toy_text", lambda: evals.Suite("toy_text", "perplexity", ["the red cat sat"] * 3,
                                                                      "test text", {"max_length": 8, "stride": 4}))
    cfg = TrainConfig(epochs=4, batch_size=8, lr=1e-2, metric="loss", precision="fp32", device="cpu", weight_decay=0.0)
    report = finetune_instruct(str(folder), data=str(data), out=str(tmp_path / "run"), cfg=cfg, max_length=256,
                               test=False, suites=["toy", "toy_text"])
    printed = capsys.readouterr().out
    assert "the evaluation suites, before and after fine-tuning:" in printed and "change" in printed
    base = evals.run_suites(load_checkpoint(folder, "lm", verbose=False), tok, ["toy", "toy_text"])
    best = evals.run_suites(load_checkpoint(tmp_path / "run" / "best", "lm", verbose=False), tok, ["toy", "toy_text"])
    for when, expected in (("suites_before", base), ("suites_after", best)):
        assert report[when]["toy"]["exact_match"] == expected["toy"]["exact_match"]
        assert report[when]["toy_text"]["bpb"] == pytest.approx(expected["toy_text"]["bpb"], rel=1e-6)
    assert report["suites_after"]["toy_text"]["bpb"] != report["suites_before"]["toy_text"]["bpb"]  # it trained


def test_suites_on_a_classifier_job_are_refused_in_one_line(capsys):
    from minift.cli import main
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--suite", "tweets"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--suite scores a language model" in err[0], err
