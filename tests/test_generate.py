"""GPT2LMHeadModel.generate and pick_next_token: greedy against transformers, the KV cache against a
full recompute, left padding, EOS, top-k, top-p and seeded sampling; bad settings refused in one line. The cache
written in place (KVCache: its buffers never move with room given, a local layer slides), finished rows dropped
and a prompt read once for its samples: each the same tokens as the plain way."""
import json

import pytest
import torch

from minift.checkpoints import load_checkpoint
from minift.errors import MiniftError
from minift.generate import pick_next_token
from minift.models.gpt2 import GPT2Config, GPT2LMHeadModel


def small_lm(dtype=torch.float64, n_positions=64):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=61, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4))
    with torch.no_grad():
        for p in model.parameters():  # away from init, so that logits are peaked and greedy has no near-ties
            p.add_(torch.randn_like(p) * 0.2)
    return model.to(dtype).eval()


def greedy_without_cache(model, ids, n):
    """The slow, obviously right loop: run the whole sequence every step and take the argmax."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("size", [0, 1])
def test_greedy_equals_transformers(size, hf_checkpoint, padded_batch):
    hf, folder = hf_checkpoint("GPT2LMHeadModel", size, perturb=0.2)
    ours = load_checkpoint(folder, task="lm", verbose=False)
    # same-length prompts, and left-padded ones (HF derives positions from the mask during generation)
    for ids, mask in (padded_batch([5, 5, 5], "left", hf.config.vocab_size),
                      padded_batch([6, 2, 4], "left", hf.config.vocab_size)):
        with torch.no_grad():
            expect = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=15,
                                 pad_token_id=0)
        got = ours.generate(ids, max_new_tokens=15, attention_mask=mask)
        assert expect.shape == (3, ids.shape[1] + 15), "HF stopped early: an EOS was set"
        assert torch.equal(got, expect), f"\nours {got}\nHF   {expect}"


def test_kv_cache_equals_full_recompute():
    model = small_lm()
    prompt = torch.randint(0, 61, (2, 4))
    got = model.generate(prompt, max_new_tokens=25)
    assert torch.equal(got, greedy_without_cache(model, prompt, 25))
    # the logits too, step by step: cached one-token steps against the full sequence
    caches = model.new_cache()  # no capacity given: the buffers grow by doubling
    with torch.no_grad():
        step = model(got[:, :4], caches=caches)[:, -1]
        for t in range(4, got.shape[1]):
            full = model(got[:, :t])[:, -1]
            torch.testing.assert_close(step, full, rtol=0, atol=1e-12)
            step = model(got[:, t:t + 1], caches=caches)[:, -1]
    assert caches[0].length == got.shape[1] and caches[0].keys.shape[:2] == (2, 4)  # (B, heads, time, head_dim)


def test_left_padded_batch_continues_each_prompt_as_alone():
    model = small_lm()
    prompts = [torch.randint(0, 61, (n,)) for n in (7, 3, 5)]
    T = 7
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = p, 1
    batch = model.generate(ids, max_new_tokens=12, attention_mask=mask)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=12)
        assert torch.equal(batch[i, T:], alone[0, len(p):]), f"row {i} continued differently inside the batch"


def test_generate_stops_at_eos_and_pads_finished_rows():
    model = small_lm()
    prompt = torch.randint(0, 61, (3, 4))
    free = model.generate(prompt, max_new_tokens=20, eos_token_id=-1)  # -1: never an EOS
    eos = free[0, 4 + 5].item()  # row 0 says this token at its 6th step: call it EOS
    got = model.generate(prompt, max_new_tokens=20, eos_token_id=eos)
    new = free[:, 4:]
    first = [(r == eos).nonzero()[0].item() if (r == eos).any() else None for r in new]
    assert first[0] <= 5
    steps = 20 if None in first else max(first) + 1  # it stops once every row has ended
    assert got.shape == (3, 4 + steps)
    for i, f in enumerate(first):
        expect = new[i, :steps].clone()
        if f is not None:
            expect[f:] = eos  # after its EOS a row only repeats EOS
        assert torch.equal(got[i, 4:], expect)


def test_generate_restores_train_mode_and_checks_length():
    model = small_lm(n_positions=16).train()
    model.generate(torch.randint(0, 61, (1, 4)), max_new_tokens=3)
    assert model.training, "generate() must give the model back in the mode it found it"
    with pytest.raises(MiniftError) as e:
        model.generate(torch.randint(0, 61, (1, 10)), max_new_tokens=10)
    assert "longer than the model's 16 positions" in str(e.value) and "\n" not in str(e.value)


def test_top_k_1_is_greedy():
    model = small_lm()
    prompt = torch.randint(0, 61, (3, 4))
    g = torch.Generator().manual_seed(0)
    sampled = model.generate(prompt, max_new_tokens=15, temperature=1.5, top_k=1, generator=g)
    assert torch.equal(sampled, model.generate(prompt, max_new_tokens=15))


def test_seeded_sampling_is_reproducible():
    model = small_lm()
    prompt = torch.randint(0, 61, (3, 4))

    def sample(seed):
        return model.generate(prompt, max_new_tokens=20, temperature=1.0, top_p=0.95,
                              generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(7), sample(7), sample(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "a different seed should give a different sample"
    assert not torch.equal(a, model.generate(prompt, max_new_tokens=20)), "sampling is not greedy"


# --- the cache written in place, finished rows dropped, a prompt read once for its samples -----------------

def test_the_cache_is_written_in_place_when_it_has_room():
    """With the capacity given (as generate does) the buffers are allocated once: every step writes into them."""
    model = small_lm()
    prompt = torch.randint(0, 61, (2, 4))
    caches = model.new_cache(capacity=4 + 6)
    with torch.no_grad():
        ids = torch.cat([prompt, model(prompt, caches=caches)[:, -1].argmax(-1, keepdim=True)], 1)
        where = [c.keys.data_ptr() for c in caches]
        for _ in range(6):
            ids = torch.cat([ids, model(ids[:, -1:], caches=caches)[:, -1].argmax(-1, keepdim=True)], 1)
    assert [c.keys.data_ptr() for c in caches] == where and caches[0].keys.shape[2] == 10 == caches[0].length
    assert torch.equal(ids, greedy_without_cache(model, prompt, 7))


@pytest.mark.parametrize("window", [1, 2, 3, 5])
def test_a_local_cache_slides_and_gives_what_the_whole_cache_would(window):
    """A KVCache with a window returns, at every step, the last window - 1 positions before the step and the step's:
    the same keys as the whole history cut there, while its buffer stays within its window and as many steps."""
    from minift.generate import KVCache
    torch.manual_seed(0)
    local, whole = KVCache(window=window), KVCache()
    for T in [4, 1, 1, 3, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]:
        k, v = torch.randn(2, 3, T, 4), torch.randn(2, 3, T, 4)
        (k_local, v_local), (k_all, v_all) = local.add(k, v), whole.add(k, v)
        first = max(k_all.shape[2] - T - (window - 1), 0)
        assert torch.equal(k_local, k_all[:, :, first:]) and torch.equal(v_local, v_all[:, :, first:])
        assert local.keys.shape[2] <= window - 1 + max(4, window)
    assert whole.length == 20 and local.length < 20


def test_finished_rows_leave_the_batch_and_change_nothing():
    """Rows that said EOS are dropped from the batch and the cache: each row's tokens are those it gets alone."""
    model = small_lm()
    prompt = torch.randint(0, 61, (4, 4))
    free = model.generate(prompt, max_new_tokens=12, eos_token_id=-1)
    eos = free[1, 4 + 2].item()  # row 1 says it at its 3rd step
    got = model.generate(prompt, max_new_tokens=12, eos_token_id=eos)
    for i in range(4):
        alone = model.generate(prompt[i:i + 1], max_new_tokens=12, eos_token_id=eos)[0]
        assert torch.equal(got[i, :len(alone)], alone) and (got[i, len(alone):] == eos).all()
    assert (got == eos).any(1).sum() >= 1 and got.shape[1] > 4 + 3  # some finished early, the batch went on


def test_samples_of_one_prompt_read_it_once():
    """num_samples=G: each prompt's keys and values copied for its G samples, rows prompt by prompt; greedy gives G
    equal rows, and sampling draws what the same G rows repeated by hand draw (the same RNG, the same logits)."""
    model = small_lm()
    ids, mask = torch.randint(1, 61, (2, 5)), torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    by_hand = model.generate(ids.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0), max_new_tokens=8,
                             temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0), eos_token_id=-1)
    shared = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_samples=3, temperature=1.0, top_p=0.9,
                            generator=torch.Generator().manual_seed(0), eos_token_id=-1)
    assert torch.equal(shared, by_hand) and not torch.equal(shared[0], shared[1])
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_samples=3, eos_token_id=-1)
    assert torch.equal(greedy[:3], greedy[0].expand(3, -1)) and torch.equal(greedy[3:], greedy[3].expand(3, -1))


# --- pick_next_token on hand-made rows -------------------------------------------------------------------

# probabilities in a shuffled order, so that top-p must map its sorted choice back to the right columns
PROBS = torch.tensor([0.10, 0.60, 0.05, 0.25], dtype=torch.float64)  # sorted: 1 (.60), 3 (.25), 0 (.10), 2 (.05)


def sampled_set(logits, n=4000, **kw):
    g = torch.Generator().manual_seed(0)
    picks = pick_next_token(logits.repeat(n, 1), generator=g, **kw)
    return picks, set(picks.tolist())


@pytest.mark.parametrize("top_p, keep", [(0.5, {1}), (0.6 - 1e-6, {1}), (0.7, {1, 3}), (0.84, {1, 3}),
                                         (0.9, {1, 3, 0}), (0.96, {1, 3, 0, 2}), (1.0, {1, 3, 0, 2})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, keep):
    picks, seen = sampled_set(PROBS.log()[None], temperature=1.0, top_p=top_p)
    assert seen == keep, f"top_p={top_p}: sampled {sorted(seen)}, expected {sorted(keep)}"
    # within the kept set, the probabilities are renormalised, not flattened
    kept = torch.tensor(sorted(keep))
    expect = PROBS[kept] / PROBS[kept].sum()
    freq = torch.stack([(picks == k).double().mean() for k in kept])
    torch.testing.assert_close(freq, expect, rtol=0, atol=0.03)


@pytest.mark.parametrize("top_p, spread", [(0.5, 1.5), (0.9, 3.0), (0.95, 0.05)])
def test_top_p_by_rejection_draws_the_sorted_nucleus(top_p, spread):
    """sample_nucleus never sorts: each token's frequency over 40,000 draws is its probability renormalised over the
    nucleus that sorting finds (the smallest likeliest set reaching top_p), within 0.01, and no other token is drawn;
    peaked and nearly flat (the nucleus nearly everything) distributions alike."""
    torch.manual_seed(0)
    logits = torch.randn(1, 40, dtype=torch.float64) * spread
    probs = logits.softmax(-1)[0]
    order = probs.argsort(descending=True)
    nucleus = order[:int(((probs[order].cumsum(0) - probs[order]) <= top_p).sum())]
    expect = torch.zeros(40, dtype=torch.float64)
    expect[nucleus] = probs[nucleus] / probs[nucleus].sum()
    picks, seen = sampled_set(logits, n=40000, temperature=1.0, top_p=top_p)
    assert seen == set(nucleus.tolist()) and 1 < len(seen) < 40
    torch.testing.assert_close(torch.bincount(picks, minlength=40).double() / 40000, expect, rtol=0, atol=0.01)


def test_top_k_keeps_the_k_largest():
    _, seen = sampled_set(PROBS.log()[None], temperature=1.0, top_k=2)
    assert seen == {1, 3}


def test_temperature_zero_is_argmax_and_temperature_flattens():
    logits = PROBS.log()[None].repeat(2, 1)
    assert pick_next_token(logits).tolist() == [1, 1]
    picks, _ = sampled_set(PROBS.log()[None], temperature=1e3)  # nearly uniform
    freq = torch.stack([(picks == k).double().mean() for k in range(4)])
    torch.testing.assert_close(freq, torch.full((4,), 0.25, dtype=torch.float64), rtol=0, atol=0.03)


def test_pick_next_token_rows_are_independent():
    logits = torch.tensor([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    g = torch.Generator().manual_seed(0)
    assert pick_next_token(logits, temperature=1.0, top_k=1, generator=g).tolist() == [1, 0, 2]
    assert pick_next_token(logits, temperature=1.0, top_p=0.5, generator=g).tolist() == [1, 0, 2]


# --- bad settings: one line that names the setting, before any work ---------------------------------------

BAD_SETTINGS = [  # each used to give gibberish (-1 inverts the distribution), a traceback, or pass silently
    ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("top_k", 0), ("top_k", -3), ("top_k", 2.5),
    ("top_p", 1.5), ("top_p", 0.0), ("top_p", -0.2), ("top_p", float("nan")),
    ("max_new_tokens", -5), ("max_new_tokens", 0), ("max_new_tokens", 2.0),
]


@pytest.mark.parametrize("name, value", BAD_SETTINGS)
def test_bad_sampling_settings_are_refused_in_one_line(name, value):
    model = small_lm().train()
    with pytest.raises(MiniftError) as e:
        model.generate(torch.randint(0, 61, (2, 4)), **{"temperature": 1.0, name: value})
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{name}={value!r}:"), message
    assert model.training, "refused before generate() switched the model to eval mode"


def test_edge_settings_are_accepted():
    model = small_lm()
    prompt = torch.randint(0, 61, (2, 4))
    g = torch.Generator().manual_seed(0)
    out = model.generate(prompt, max_new_tokens=1, temperature=0.5, top_k=10**6, top_p=1.0, generator=g)
    assert out.shape == (2, 5)
    assert torch.equal(model.generate(prompt, max_new_tokens=3, temperature=0), model.generate(prompt, max_new_tokens=3))


def test_empty_prompt_is_refused():
    model = small_lm()
    for ids, mask in ((torch.zeros(2, 0, dtype=torch.long), None),
                      (torch.randint(0, 61, (2, 3)), torch.tensor([[1, 1, 1], [0, 0, 0]]))):  # row 1: all padding
        with pytest.raises(MiniftError) as e:
            model.generate(ids, attention_mask=mask, max_new_tokens=3)
        assert str(e.value) == "the prompt is empty: give some text to continue"


@pytest.fixture
def gpt2_folder(hf_checkpoint):
    """A tiny random GPT-2 folder with a word-level tokenizer and no chat template (plain continuation)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    _, folder = hf_checkpoint("GPT2LMHeadModel", 0)
    tok = HFTokenizer(models.WordLevel({"[UNK]": 0, "<|endoftext|>": 1, "hi": 2, "there": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return folder


@pytest.mark.parametrize("flags, name", [(["--temperature", "-1"], "temperature"),
                                         (["--temperature", "nan"], "temperature"),
                                         (["--top-k", "0"], "top_k"), (["--top-k", "-3"], "top_k"),
                                         (["--top-p", "1.5"], "top_p"), (["--max-new-tokens", "-5"], "max_new_tokens")])
def test_command_line_refuses_bad_settings(gpt2_folder, capsys, flags, name):
    from minift.cli import main
    with pytest.raises(SystemExit) as e:
        main(["generate", str(gpt2_folder), "hi", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"minift: error: {name}="), err


def test_command_line_generates_and_refuses_an_empty_prompt(gpt2_folder, capsys):
    from minift.cli import main
    main(["generate", str(gpt2_folder), "hi there", "--max-new-tokens", "3"])  # the folder itself is fine
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["generate", str(gpt2_folder), ""])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "minift: error: the prompt is empty: give some text to continue (or a question, for a chat model)"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3", "gemma2"])
def test_last_logits_are_the_last_position_of_the_whole_forward(family, padded_batch):
    """last_logits runs the head on each row's last position only: the same numbers as the whole forward's last
    position, from a left-padded prompt and then from one cached token (generation's two calls); the final soft cap
    (Gemma 2) included. A Gemma model with its head untied too (lm_head its own Linear)."""
    from test_freeze import CONFIGS
    from test_gemma import SHAPES

    from minift.checkpoints import build_model
    config = {"gpt2": CONFIGS["gpt2"], "llama": CONFIGS["llama"], "gemma3": SHAPES["gemma3-mqa-untied-linear"],
              "gemma2": SHAPES["gemma2-gqa2-caps"]}[family]
    model = build_model({**config, "eos_token_id": None, "bos_token_id": None}, "lm").double().eval()
    head = getattr(model, "lm_head", None) or getattr(model, "tied_head", None) or model.head
    positions = []  # how many positions each call of the head saw
    head.register_forward_hook(lambda module, args, out: positions.append(out.shape[1]))
    ids, mask = padded_batch([6, 3, 5], "left", 50)
    with torch.no_grad():
        whole = model(ids, mask)[:, -1]
        caches = model.new_cache()
        torch.testing.assert_close(model.last_logits(ids, mask, caches), whole, rtol=0, atol=1e-12)
        step = torch.tensor([[7], [8], [9]])
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        whole = model(torch.cat([ids, step], 1), mask)[:, -1]
        torch.testing.assert_close(model.last_logits(step, mask, caches), whole, rtol=0, atol=1e-12)
        model(ids)  # and the next forward is whole again
    assert positions == [6, 1, 7, 1, 6] and not model.last_only
