"""How close a translation is to its reference: BLEU and chrF, written out, with sacrebleu's defaults (what papers
report, and what the tests check us against: sacrebleu 2.x is the oracle).

    bleu = corpus_bleu(hypotheses, references)   # {"score": 0-100, "precisions", "bp", "sys_len", "ref_len", ...}
    chrf = corpus_chrf(hypotheses, references)   # {"score": 0-100, ...}; word_order=2: chrF++

One reference per hypothesis. Both are **corpus** scores: each sentence adds its n-gram counts to the corpus's, and
the score is computed once from the sums. That is not the mean of sentence scores: a corpus of one good long
sentence and one empty answer scores differently from the average of 100-ish and 0, and BLEU's brevity penalty is
judged on the whole corpus's length.

BLEU (Papineni et al. 2002): tokenize both sides (the "13a" tokenizer of WMT's mteval-v13a), count the hypothesis's
word 1- to 4-grams that the reference holds (each clipped to the reference's count), precision p_n = matched / total
for each n, then 100 * BP * exp(mean of log p_n), where the brevity penalty BP = exp(1 - ref_len / sys_len) when the
hypotheses are shorter than the references (else 1). A p_n of 0 would make the score 0: sacrebleu's default "exp"
smoothing (mteval's) puts 1 / (2^k * total) in its place, k counting the orders matched nowhere so far.

chrF (Popović 2015): character n-grams of orders 1-6, spaces removed; for each order the precision and recall of the
matched n-grams, averaged over the orders both sides have, then the F-score that weighs recall beta = 2 times as
much as precision. chrF++ (Popović 2017) adds word 1- and 2-grams as two more orders. Characters make it kinder than
BLEU to morphology (French endings, accents: "créa" and "créé" share "cré").
"""
import math
import re
from collections import Counter

from .errors import MiniftError

BLEU_ORDER = 4  # word n-grams 1..4
CHRF_ORDER, CHRF_BETA = 6, 2  # character n-grams 1..6; recall weighs beta times as much as precision
PUNCTUATION = set('!"#$%&\'()*+,-./:;<=>?@[\\]^_`{|}~')  # what chrF++ splits off a word's ends


def check_corpus(hypotheses, references):
    hypotheses, references = list(hypotheses), list(references)
    if not hypotheses or len(hypotheses) != len(references):
        raise MiniftError(f"{len(hypotheses)} hypotheses and {len(references)} references: give one reference per "
                          "hypothesis, and at least one of each")
    if not all(isinstance(t, str) for t in hypotheses + references):
        raise MiniftError("hypotheses and references must be texts (an empty hypothesis is '', not None)")
    return hypotheses, references


# ---------------------------------------------------------------------------------------------------
# BLEU

# mteval-v13a's tokenization as sacrebleu writes it (tokenizers/tokenizer_re.py), applied in this order:
TOKENIZE_13A = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # ASCII symbols and punctuation stand alone ...
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # ... and so do . and , unless they sit between digits (3.14, 1,000)
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit
]


def tokenize_13a(line):
    """'Au commencement, Dieu créa...' -> 'Au commencement , Dieu créa . . .': the tokens joined by one space."""
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:  # the XML escapes of WMT's files
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, spaced in TOKENIZE_13A:
        line = pattern.sub(spaced, line)
    return " ".join(line.split())


def word_ngrams(tokens, max_order):
    """Counter of every n-gram (a tuple of tokens) for n = 1..max_order."""
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def bleu_counts(hypothesis, reference, max_order=BLEU_ORDER):
    """One sentence's contribution to the corpus: (hyp_len, ref_len, matched per order, total per order)."""
    hyp, ref = tokenize_13a(hypothesis).split(), tokenize_13a(reference).split()
    ref_ngrams = word_ngrams(ref, max_order)
    matched, total = [0] * max_order, [0] * max_order
    for ngram, count in word_ngrams(hyp, max_order).items():
        total[len(ngram) - 1] += count
        matched[len(ngram) - 1] += min(count, ref_ngrams[ngram])  # clipped: "the the the" matches "the" once
    return len(hyp), len(ref), matched, total


def bleu_from_counts(sys_len, ref_len, matched, total, effective_order=False):
    """The score from the corpus's summed counts. effective_order (sentence BLEU): average only the orders the
    hypothesis has n-grams of, so that a 3-word sentence is not judged on 4-grams."""
    max_order = len(matched)
    bp = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    precisions = [0.0] * max_order
    result = {"bp": bp, "sys_len": sys_len, "ref_len": ref_len, "matched": matched, "total": total}
    if not any(matched):
        return {"score": 0.0, "precisions": precisions, **result}
    unmatched_orders, orders = 1.0, max_order
    for n in range(max_order):
        if total[n] == 0:  # hypotheses shorter than n + 1 words: no n-grams of this order
            break
        if effective_order:
            orders = n + 1
        if matched[n] == 0:  # "exp" smoothing: 1/2, 1/4, ... of one match
            unmatched_orders *= 2
            precisions[n] = 100.0 / (unmatched_orders * total[n])
        else:
            precisions[n] = 100.0 * matched[n] / total[n]
    # a precision left at 0 counts as log 0 = -9999999999 (sacrebleu's floor), which makes the score 0
    logs = [math.log(p) if p > 0 else -9999999999 for p in precisions[:orders]]
    return {"score": bp * math.exp(sum(logs) / orders), "precisions": precisions, **result}


def corpus_bleu(hypotheses, references, max_order=BLEU_ORDER):
    """BLEU of a corpus (0-100): every sentence's n-gram counts and lengths summed, then one score."""
    hypotheses, references = check_corpus(hypotheses, references)
    sys_len, ref_len, matched, total = 0, 0, [0] * max_order, [0] * max_order
    for hyp, ref in zip(hypotheses, references):
        h, r, m, t = bleu_counts(hyp, ref, max_order)
        sys_len, ref_len = sys_len + h, ref_len + r
        matched, total = [a + b for a, b in zip(matched, m)], [a + b for a, b in zip(total, t)]
    return bleu_from_counts(sys_len, ref_len, matched, total)


def sentence_bleu(hypothesis, reference, max_order=BLEU_ORDER):
    """BLEU of one sentence, with the effective order (sacrebleu.sentence_bleu): for reading examples one by one,
    not for reporting (average sentence BLEU is not corpus BLEU)."""
    return bleu_from_counts(*bleu_counts(hypothesis, reference, max_order), effective_order=True)


# ---------------------------------------------------------------------------------------------------
# chrF and chrF++

def char_ngrams(text, order):
    """Counters of character n-grams for n = 1..order, whitespace removed first."""
    text = "".join(text.split())
    return [Counter(text[i:i + n] for i in range(len(text) - n + 1)) for n in range(1, order + 1)]


def split_punctuation(text):
    """chrF++'s words: split on whitespace, and one punctuation mark taken off a word's end (else its start)."""
    words = []
    for w in text.split():
        if len(w) > 1 and w[-1] in PUNCTUATION:
            words += [w[:-1], w[-1]]
        elif len(w) > 1 and w[0] in PUNCTUATION:
            words += [w[0], w[1:]]
        else:
            words.append(w)
    return words


def chrf_counts(hypothesis, reference, char_order=CHRF_ORDER, word_order=0):
    """One sentence's [hyp n-grams, ref n-grams, matched] per order (the character orders, then the word orders)."""
    hyp, ref = char_ngrams(hypothesis, char_order), char_ngrams(reference, char_order)
    hyp_words, ref_words = split_punctuation(hypothesis), split_punctuation(reference)
    for n in range(1, word_order + 1):
        hyp.append(Counter(" ".join(hyp_words[i:i + n]) for i in range(len(hyp_words) - n + 1)))
        ref.append(Counter(" ".join(ref_words[i:i + n]) for i in range(len(ref_words) - n + 1)))
    counts = []
    for h, r in zip(hyp, ref):
        matched = sum(min(c, r[g]) for g, c in h.items())
        # sacrebleu counts no hypothesis n-grams where the reference has none of that order (a reference too short)
        counts.append([sum(h.values()) if r else 0, sum(r.values()), matched])
    return counts


def chrf_from_counts(counts, beta=CHRF_BETA):
    """The F-beta score (0-100) of the precision and recall averaged over the orders where both sides have
    n-grams."""
    precision, recall, orders = 0.0, 0.0, 0
    for n_hyp, n_ref, matched in counts:
        if n_hyp > 0 and n_ref > 0:
            precision += matched / n_hyp
            recall += matched / n_ref
            orders += 1
    if orders:
        precision, recall = precision / orders, recall / orders
    if precision + recall == 0:
        return 0.0
    factor = beta ** 2
    return 100 * ((1 + factor) * precision * recall / (factor * precision + recall))


def corpus_chrf(hypotheses, references, char_order=CHRF_ORDER, word_order=0, beta=CHRF_BETA):
    """chrF of a corpus (0-100): the n-gram counts of every sentence summed per order, then one score.
    word_order=2 gives chrF++."""
    hypotheses, references = check_corpus(hypotheses, references)
    total = [[0, 0, 0] for _ in range(char_order + word_order)]
    for hyp, ref in zip(hypotheses, references):
        for order, counts in zip(total, chrf_counts(hyp, ref, char_order, word_order)):
            for k in range(3):
                order[k] += counts[k]
    return {"score": chrf_from_counts(total, beta), "counts": total, "char_order": char_order,
            "word_order": word_order, "beta": beta}


def sentence_chrf(hypothesis, reference, char_order=CHRF_ORDER, word_order=0, beta=CHRF_BETA):
    """chrF of one sentence (0-100), for reading examples one by one."""
    return chrf_from_counts(chrf_counts(hypothesis, reference, char_order, word_order), beta)
