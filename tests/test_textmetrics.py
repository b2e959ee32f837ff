"""BLEU and chrF (minift/textmetrics.py) against sacrebleu, the implementation papers report with, on its defaults:
the 13a tokens, the corpus scores, the sentence scores, chrF++; on sentences with accents, punctuation, numbers,
XML escapes, line breaks, and empty or one-word hypotheses. The same arithmetic in the same order: equal to 1e-9."""
import pytest

from minift.errors import MiniftError
from minift.textmetrics import (corpus_bleu, corpus_chrf, sentence_bleu, sentence_chrf, split_punctuation,
                                tokenize_13a)

sacrebleu = pytest.importorskip("sacrebleu")
from sacrebleu.metrics import BLEU, CHRF  # noqa: E402
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a  # noqa: E402

PAIRS = [  # (hypothesis, reference)
    ("Au commencement, Dieu créa les cieux et la terre.", "Au commencement, Dieu créa les cieux et la terre."),
    ("Au début, Dieu a créé le ciel et la terre.", "Au commencement, Dieu créa les cieux et la terre."),
    ("Dieu dit: Que la lumière soit! Et la lumière fut.", "Dieu dit : « Que la lumière soit ! » Et la lumière fut."),
    ("Jésus pleura.", "Jésus pleura."),
    ("", "Il prit la parole et dit:"),
    ("Job", "Job prit la parole et dit:"),
    ("L'Éternel frappa 50 070 hommes; c'était 3.5 fois plus, soit 1,024 en tout.",
     "L'Éternel frappa 50,070 hommes parmi le peuple (3,5 fois)."),
    ("Moïse &amp; Aaron &quot;parlèrent&quot; &lt;au peuple&gt;", 'Moïse & Aaron "parlèrent" <au peuple>'),
    ("Il dit:\nVa-t'en -\ncar l'heure est venue... N'est-ce pas?", "Il dit: Va-t'en, car l'heure est venue. N'est-ce pas?"),
    ("the the the the the the", "the cat is on the mat"),
    ("œuvre naïve à l'été — « bientôt »…", "oeuvre naive a l'ete -- \"bientot\"..."),
    ("99-100 [pages] {x} @y #z $5 ^_^ `q` ~ |", "99 - 100 pages"),
    ("Zut", "Z"),
    ("x <skipped> y", "x y"),
]


def test_the_13a_tokens_are_sacrebleus():
    theirs = Tokenizer13a()
    for text in [h for h, _ in PAIRS] + [r for _, r in PAIRS]:
        assert tokenize_13a(text) == theirs(text.rstrip()), text


def test_corpus_bleu_equals_sacrebleus():
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    ours, theirs = corpus_bleu(hyps, refs), BLEU().corpus_score(hyps, [refs])
    assert ours["score"] == pytest.approx(theirs.score, abs=1e-9) and 0 < ours["score"] < 100
    assert ours["precisions"] == pytest.approx(theirs.precisions, abs=1e-9)
    assert (ours["bp"], ours["sys_len"], ours["ref_len"]) == pytest.approx((theirs.bp, theirs.sys_len, theirs.ref_len))
    assert ours["matched"] == theirs.counts and ours["total"] == theirs.totals
    for k in range(1, len(PAIRS) + 1):  # every prefix of the corpus: short, with and without brevity penalty
        got, want = corpus_bleu(hyps[:k], refs[:k])["score"], BLEU().corpus_score(hyps[:k], [refs[:k]]).score
        assert got == pytest.approx(want, abs=1e-9), k


def test_sentence_bleu_equals_sacrebleus_and_is_not_the_corpus_score():
    sentence = [sentence_bleu(h, r)["score"] for h, r in PAIRS]
    for (h, r), ours in zip(PAIRS, sentence):
        assert ours == pytest.approx(sacrebleu.sentence_bleu(h, [r]).score, abs=1e-9), h


LONG = "Au commencement, Dieu créa les cieux et la terre, et la terre était informe et vide."
TWO = ([LONG, "Job"], [LONG, "Job prit la parole et dit:"])  # a long right answer and a one-word one


def test_a_corpus_score_is_not_the_mean_of_sentence_scores():
    """The long sentence's many n-grams outweigh the short one's few in the sums: BLEU 74.1 and chrF 82.8 for the
    corpus, where the means of the sentence scores are 50.1 and 56.0."""
    hyps, refs = TWO
    bleu, chrf = corpus_bleu(hyps, refs)["score"], corpus_chrf(hyps, refs)["score"]
    assert bleu == pytest.approx(BLEU().corpus_score(hyps, [refs]).score, abs=1e-9)
    assert chrf == pytest.approx(CHRF().corpus_score(hyps, [refs]).score, abs=1e-9)
    assert bleu - sum(sentence_bleu(h, r)["score"] for h, r in zip(hyps, refs)) / 2 > 20
    assert chrf - sum(sentence_chrf(h, r) for h, r in zip(hyps, refs)) / 2 > 20


def test_brevity_penalty_and_smoothing_cases():
    short = corpus_bleu(["le chat"], ["le chat est sur le tapis"])  # 2 of 6 words: bp = exp(1 - 6/2)
    assert short["bp"] == pytest.approx(2.718281828459045 ** -2) and short["total"] == [2, 1, 0, 0]
    assert short["score"] == BLEU().corpus_score(["le chat"], [["le chat est sur le tapis"]]).score == 0.0
    no_bigram = corpus_bleu(["chat le est"], ["le chat est"])  # unigrams match, no bigram: "exp" smoothing
    assert no_bigram["score"] == pytest.approx(BLEU().corpus_score(["chat le est"], [["le chat est"]]).score, abs=1e-9)
    assert no_bigram["precisions"][1] == pytest.approx(100 / (2 * 2))
    assert corpus_bleu(["", ""], ["a b", "c"])["score"] == 0.0


@pytest.mark.parametrize("word_order", [0, 2])  # chrF and chrF++
def test_corpus_and_sentence_chrf_equal_sacrebleus(word_order):
    hyps, refs = [h for h, _ in PAIRS], [r for _, r in PAIRS]
    metric = CHRF(word_order=word_order)
    ours = corpus_chrf(hyps, refs, word_order=word_order)
    assert ours["score"] == pytest.approx(metric.corpus_score(hyps, [refs]).score, abs=1e-9)
    for h, r in PAIRS:
        assert sentence_chrf(h, r, word_order=word_order) == pytest.approx(metric.sentence_score(h, [r]).score, abs=1e-9)
    for k in range(1, len(PAIRS) + 1):
        assert corpus_chrf(hyps[:k], refs[:k], word_order=word_order)["score"] == pytest.approx(
            metric.corpus_score(hyps[:k], [refs[:k]]).score, abs=1e-9)


def test_chrf_is_kinder_to_morphology_than_bleu():
    """Two verb endings wrong: BLEU loses every n-gram they are in (27.1), chrF only the characters (72.6)."""
    hyp, ref = "Ils mangeait le pain et buvait le vin", "Ils mangeaient le pain et buvaient le vin"
    assert sentence_chrf(hyp, ref) > 70 and sentence_bleu(hyp, ref)["score"] < 30
    assert split_punctuation("(Il dit: « oui », non!)") == ["(", "Il", "dit", ":", "«", "oui", "»", ",", "non!", ")"]


def test_empty_and_mismatched_corpora_are_one_line():
    for hyps, refs in (([], []), (["a"], ["a", "b"]), (["a", None], ["a", "b"])):
        for score in (corpus_bleu, corpus_chrf):
            with pytest.raises(MiniftError) as e:
                score(hyps, refs)
            assert "\n" not in str(e.value)
