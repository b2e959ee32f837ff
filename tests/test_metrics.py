"""minift.evaluate's metrics against scikit-learn, the majority baseline by hand, and the report."""

import math

import pytest
import sklearn.metrics as skm
import torch

from minift.errors import MiniftError
from minift.evaluate import classification_metrics, confusion_matrix, format_metrics, perplexity

NAMES = ["negative", "neutral", "positive", "sarcastic"]


def random_case(seed, n=300, k=4):
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.tensor([0.2, 0.5, 0.25, 0.05]), n, replacement=True, generator=g)
    preds = torch.randint(0, k, (n,), generator=g)
    if seed % 2 == 0:
        preds[preds == 3] = 1   # class 3 is never predicted: precision 0 by convention
    if seed % 3 == 0:
        labels[labels == 0] = 2  # class 0 never occurs: recall 0 by convention
    return preds, labels


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_sklearn(seed):
    preds, labels = random_case(seed)
    m = classification_metrics(preds, labels, 4, NAMES)
    y, yhat, ks = labels.numpy(), preds.numpy(), list(range(4))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, yhat), abs=1e-12)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, yhat, labels=ks, average="macro", zero_division=0), abs=1e-12)
    p, r, f, s = skm.precision_recall_fscore_support(y, yhat, labels=ks, zero_division=0)
    for i, name in enumerate(NAMES):
        c = m["per_class"][name]
        assert (c["precision"], c["recall"], c["f1"]) == pytest.approx((p[i], r[i], f[i]), abs=1e-12)
        assert c["support"] == s[i]
    assert m["confusion"] == skm.confusion_matrix(y, yhat, labels=ks).tolist()
    assert confusion_matrix(preds, labels, 4).dtype == torch.long
    assert m["num_examples"] == len(y)


def test_majority_baseline_by_hand():
    m = classification_metrics([0, 0, 0, 1, 2], [2, 2, 1, 0, 2], 3, ["neg", "neu", "pos"])
    assert m["majority_baseline"] == 3 / 5 and m["majority_label"] == "pos"
    assert m["accuracy"] == 1 / 5
    # A tie goes to the first label; no names: labels are named by their index.
    m = classification_metrics([1, 1, 1, 1], [0, 1, 1, 0], 2)
    assert m["majority_baseline"] == 0.5 and m["majority_label"] == "0" and list(m["per_class"]) == ["0", "1"]


def test_format_metrics_report():
    preds, labels = random_case(0)
    m = classification_metrics(preds, labels, 4, NAMES)
    text = format_metrics(m)
    print(text)
    lines = text.splitlines()
    assert f"{m['accuracy']:.4f}" in lines[0] and f"{m['macro_f1']:.4f}" in lines[0]
    assert f"majority baseline {m['majority_baseline']:.4f}" in lines[0] and "'neutral'" in lines[0]
    assert all(any(line.startswith(name) for line in lines) for name in NAMES)
    assert lines[-1].split()[1:] == [str(c) for c in m["confusion"][-1]]


def test_metric_errors():
    with pytest.raises(MiniftError, match="outside 0..2"):
        classification_metrics([0, 1], [0, 3], 3)
    with pytest.raises(MiniftError, match="2 predictions but 3 labels"):
        confusion_matrix([0, 1], [0, 1, 1], 3)
    with pytest.raises(MiniftError, match="label names"):
        classification_metrics([0, 1], [0, 1], 3, ["a", "b"])
    with pytest.raises(MiniftError, match="no examples"):
        classification_metrics([], [], 3)


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(10)) == pytest.approx(10.0)
    assert perplexity(torch.tensor(2.0)) == pytest.approx(math.e ** 2)
    assert perplexity(1e4) == math.inf
    assert math.isnan(perplexity(float("nan")))
