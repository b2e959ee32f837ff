"""A BERT-family encoder (BERT, MiniLM, RoBERTa) built from minift's layers, with its backward.

Module names follow the Hugging Face checkpoint keys (`embeddings.word_embeddings`,
`encoder.layer.0.attention.self.query`, ...), so a checkpoint loads with (almost) the identity map and a
learner can hold this file beside `model.safetensors`.
"""
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..errors import MiniftError
from ..heads import (Backbone, Classifier, TokenClassifier, mean_pool, mean_pool_backward, pick_rows, pick_rows_backward,
                     positions_from_mask)
from ..layers import (GELU, Attention, Dropout, Embedding, LayerNorm, Linear, Tanh, frozen_below, keeps_for_backward,
                     merge_heads, split_heads)
from ..recompute import block_backward, block_forward


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    model_type: str = "bert"  # "roberta": positions start after pad_token_id, as fairseq did
    # task settings (ours, saved into config.json beside HF's keys)
    num_labels: int = 2
    pooling: str = "cls"  # "cls": BERT's pooler (tanh(dense([CLS]))); "mean": mean of the real tokens
    classifier_dropout: float | None = None  # None: use hidden_dropout_prob, as HF does

    @classmethod
    def from_dict(cls, d):
        if d.get("hidden_act", "gelu") not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise MiniftError(f"hidden_act {d['hidden_act']!r} is not supported: minift's BERT has gelu and gelu_new")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise MiniftError("only absolute position embeddings are supported (position_embedding_type='absolute')")
        known = {f.name for f in fields(cls)}
        if "id2label" in d and "num_labels" not in d:
            d = {**d, "num_labels": len(d["id2label"])}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})


class BertEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        pad = c.pad_token_id
        self.word_embeddings = Embedding(c.vocab_size, c.hidden_size, padding_idx=pad)
        # RoBERTa's positions start at pad+1 and its table has that many rows more; its pad row is unused
        self.position_embeddings = Embedding(c.max_position_embeddings, c.hidden_size,
                                             padding_idx=pad if c.model_type == "roberta" else None)
        self.token_type_embeddings = Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = LayerNorm(c.hidden_size, c.layer_norm_eps)
        self.dropout = Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids):
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))

    def backward(self, dout):
        d = self.LayerNorm.backward(self.dropout.backward(dout))
        self.word_embeddings.backward(d)  # a sum sends the same gradient to each term
        self.position_embeddings.backward(d)
        self.token_type_embeddings.backward(d)


class BertSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads = c.num_attention_heads
        self.query = Linear(c.hidden_size, c.hidden_size)
        self.key = Linear(c.hidden_size, c.hidden_size)
        self.value = Linear(c.hidden_size, c.hidden_size)
        self.attn = Attention(c.attention_probs_dropout_prob)

    def forward(self, x, allowed):
        q, k, v = (split_heads(f(x), self.n_heads) for f in (self.query, self.key, self.value))
        return merge_heads(self.attn(q, k, v, allowed))

    def backward(self, dout):
        dq, dk, dv = self.attn.backward(split_heads(dout, self.n_heads))
        # x fed all three projections: its gradient is the sum of the three
        return (self.query.backward(merge_heads(dq)) + self.key.backward(merge_heads(dk))
                + self.value.backward(merge_heads(dv)))


class BertAddNorm(nn.Module):
    """LayerNorm(residual + dropout(dense(h))): HF's BertSelfOutput and BertOutput, which are the same."""

    def __init__(self, d_in, d_out, c):
        super().__init__()
        self.dense = Linear(d_in, d_out)
        self.dropout = Dropout(c.hidden_dropout_prob)
        self.LayerNorm = LayerNorm(d_out, c.layer_norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(residual + self.dropout(self.dense(h)))

    def backward(self, dout):
        d = self.LayerNorm.backward(dout)
        return self.dense.backward(self.dropout.backward(d)), d  # (dh, dresidual)


class BertAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertAddNorm(c.hidden_size, c.hidden_size, c)


class BertIntermediate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = Linear(c.hidden_size, c.intermediate_size)
        self.act = GELU("none" if c.hidden_act == "gelu" else "tanh")

    def forward(self, x):
        return self.act(self.dense(x))

    def backward(self, dout):
        return self.dense.backward(self.act.backward(dout))


class BertLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertAddNorm(c.intermediate_size, c.hidden_size, c)

    def forward(self, x, allowed):
        h = self.attention.output(self.attention.self(x, allowed), x)
        return self.output(self.intermediate(h), h)

    def backward(self, dout):  # the forward, read from the bottom up
        di, dh = self.output.backward(dout)
        dh = dh + self.intermediate.backward(di)
        da, dx = self.attention.output.backward(dh)
        return dx + self.attention.self.backward(da)


class BertBackbone(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dense = Linear(c.hidden_size, c.hidden_size)
        self.activation = Tanh()

    def forward(self, hidden, attention_mask):
        # the [CLS] token: the first real token (with left padding it is not at position 0)
        first = attention_mask.argmax(-1)
        if keeps_for_backward(self):
            self.first, self.hidden_shape = first, hidden.shape  # keeps: where the picked rows came from
        return self.activation(self.dense(pick_rows(hidden, first)))

    def backward(self, dout):
        dcls = self.dense.backward(self.activation.backward(dout)).to(dout.dtype)
        dhidden = pick_rows_backward(dcls, self.first, self.hidden_shape)
        del self.first, self.hidden_shape
        return dhidden


class BertModel(Backbone):
    """Token ids -> contextual vectors (last hidden states), and the pooled [CLS] vector."""

    def __init__(self, c, add_pooler=True):
        super().__init__()
        self.config = c
        self.embeddings = BertEmbeddings(c)
        self.encoder = BertBackbone(c)
        self.pooler = BertPooler(c) if add_pooler else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        offset = self.config.pad_token_id + 1 if self.config.model_type == "roberta" else 0
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, offset)
        longest = self.config.max_position_embeddings - offset  # RoBERTa's first rows are not positions
        if input_ids.shape[1] > longest:
            raise MiniftError(f"sequence of {input_ids.shape[1]} tokens is longer than the model's "
                              f"{longest} positions: lower max_length")
        allowed = attention_mask.bool()[:, None, None, :]  # every query may see every real key
        x = self.embeddings(input_ids, token_type_ids, position_ids)
        for layer in self.encoder.layer:
            x = block_forward(layer, x, allowed)
        return x

    def stages(self):
        """The parts of the forward in order; backward stops below the lowest trainable one (freeze.py)."""
        return [self.embeddings, *self.encoder.layer]

    def backward(self, dhidden):
        for layer in reversed(self.encoder.layer):
            if frozen_below(layer):
                return  # no trainable weight below this layer: no gradient left to compute
            dhidden = block_backward(layer, dhidden)
        if not frozen_below(self.embeddings):
            self.embeddings.backward(dhidden)


class BertForSequenceClassification(Classifier):
    """Backbone -> one vector per text ([CLS] through the pooler, or the mean of the real tokens) -> logits."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.bert = BertModel(c, add_pooler=c.pooling == "cls")
        p = c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout
        self.dropout = Dropout(p)
        self.classifier = Linear(c.hidden_size, c.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids, attention_mask, token_type_ids, position_ids)
        if self.config.pooling == "cls":
            pooled = self.bert.pooler(hidden, attention_mask)
        else:
            pooled, pooled_tokens = mean_pool(hidden, attention_mask)
            if keeps_for_backward(self):
                self.pooled_tokens = pooled_tokens  # keeps: which tokens were averaged
        return self.classifier(self.dropout(pooled))

    def backward(self, dlogits):
        dpooled = self.dropout.backward(self.classifier.backward(dlogits))
        if self.config.pooling == "cls":
            dhidden = self.bert.pooler.backward(dpooled)
        else:
            dhidden = mean_pool_backward(dpooled, self.pooled_tokens)
            del self.pooled_tokens
        self.bert.backward(dhidden)


class BertForTokenClassification(TokenClassifier):
    """Backbone -> one vector per token -> logits per token (named entities). No pooler, as in transformers'
    BertForTokenClassification, whose names (`bert.`, `classifier.weight/bias`) these are."""

    def __init__(self, c):
        super().__init__()
        self.config = c
        self.bert = BertModel(c, add_pooler=False)
        self.dropout = Dropout(c.hidden_dropout_prob if c.classifier_dropout is None else c.classifier_dropout)
        self.classifier = Linear(c.hidden_size, c.num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        return self.classifier(self.dropout(self.bert(input_ids, attention_mask, token_type_ids, position_ids)))

    def backward(self, dlogits):  # every token's hidden vector gets its own logits' gradient back
        self.bert.backward(self.dropout.backward(self.classifier.backward(dlogits)))


# ---------------------------------------------------------------------------------------------------------
# The family's checkpoint knowledge, which checkpoints.py looks up by config.json's model_type.

MODEL_TYPES = ("bert", "roberta")
Config = BertConfig
TASKS = {"classify": BertForSequenceClassification, "tag": BertForTokenClassification, "encode": BertModel}
NEW_HEADS = ("classifier.", "bert.pooler.", "pooler.")  # ours, may be missing from a file: trained from scratch
LABEL_HEAD = "classifier.weight"  # the layer with one row per class (its number of rows is num_labels)
DEFAULT_TASK = "encode"  # what the pretrained checkpoint computes: sentence vectors
FAN_IN_FAN_OUT = False  # weights are (out, in) in HF's files, as in nn.Linear
UNUSED_HEADS = ("cls.", "lm_head.", "bert.pooler.", "pooler.")  # the masked-LM head; a pooler that mean pooling skips
ARCHITECTURE = {BertForSequenceClassification: "ForSequenceClassification",
                BertForTokenClassification: "ForTokenClassification", BertModel: "Model"}


def hf_to_ours(key, tensor, model):
    """A checkpoint key -> (our parameter name, tensor), or (None, tensor) for a buffer we do not keep.
    A BertModel file says `embeddings...`, a task model's `bert.embeddings...`, RoBERTa's `roberta.`."""
    if key.endswith("position_ids"):
        return None, tensor
    if model.config.model_type == "roberta":
        key = key.replace("roberta.", "bert.", 1) if key.startswith("roberta.") else key
        # RobertaForSequenceClassification's head is BERT's pooler + classifier under other names
        key = key.replace("classifier.dense.", "bert.pooler.dense.").replace("classifier.out_proj.", "classifier.")
    if isinstance(model, BertModel):  # a task model's checkpoint loaded into a bare encoder
        return (key[len("bert."):] if key.startswith("bert.") else key), tensor
    if not key.startswith(("bert.", "classifier.", "cls.", "lm_head.")):
        key = "bert." + key
    return key, tensor


def hf_state_dict(model):
    """Our parameters under the names transformers expects."""
    if model.config.model_type == "roberta" and isinstance(model, BertForSequenceClassification) \
            and model.config.pooling != "cls":
        raise MiniftError("transformers' RoBERTa classifier uses [CLS] pooling: train with pooling='cls' to export it")
    out = {}
    for name, p in model.named_parameters():
        if model.config.model_type == "roberta":
            if isinstance(model, BertForSequenceClassification):  # its token classifier keeps BERT's names
                name = name.replace("bert.pooler.dense.", "classifier.dense.").replace(
                    "classifier.weight", "classifier.out_proj.weight").replace("classifier.bias", "classifier.out_proj.bias")
            name = name.replace("bert.", "roberta.", 1)
        out[name] = p.detach()
    return out


def architecture(model):
    """The `architectures` entry of config.json. A mean-pooled classifier claims only its encoder (BertModel):
    transformers' BertForSequenceClassification would read [CLS] through a pooler this model never trained, and
    answer differently. transformers' BertModel computes the same hidden states; the head is mean pooling and
    the `classifier` tensors in the file (config.json's "pooling": "mean" says so)."""
    name = ARCHITECTURE[type(model)]
    if isinstance(model, BertForSequenceClassification) and model.config.pooling != "cls":
        name = ARCHITECTURE[BertModel]
    return ("Roberta" if model.config.model_type == "roberta" else "Bert") + name
