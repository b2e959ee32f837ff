"""Mixture of experts (Mixtral, Qwen3-MoE, OLMoE): a router sends each token to k of E expert MLPs.

A dense block's MLP runs every token through one SwiGLU. A sparse block has E smaller ones (the experts) and a
router, a Linear layer with one logit per expert (checkpoint key `mlp.gate.weight`):

    p = softmax(x W_gate^T)                       the router's probabilities over the E experts (in fp32)
    chosen = the k largest p                      k experts per token (Mixtral: 2 of 8; Qwen3-30B-A3B: 8 of 128)
    w = p[chosen], or p[chosen] / their sum       the kept weights (renormalised when norm_topk_prob; Mixtral always)
    y = sum over the chosen e of  w_e * expert_e(x)

A token pays for k experts, not E: that is the point (Mixtral 8x7B holds 47B parameters and uses 13B per token).

The backward, by hand:
- the choice is a step function of the logits: no gradient goes through *which* experts were chosen;
- the kept weights get one: dw_e = dy . expert_e(x) for each chosen e. It goes back through the renormalisation
  and the softmax, which couples every logit (so the experts not chosen get a gradient too), then the router's Linear;
- each expert's backward sees only its own tokens, and the input gradients of a token's k experts add up in its row
  (a scatter-add), with the router's share beside them. An expert that got no token runs on zero rows: its weights'
  gradient is zero (as for a slice of transformers 5's fused expert tensor), never missing.

Dispatch and combine by sorting: the (token, slot) pairs are sorted by expert, so each expert reads one contiguous
slice of rows (one matmul per expert), and `index_add_` puts the weighted outputs back on their tokens.

The load-balancing loss (`load_balancing_loss`, transformers' load_balancing_loss_func) keeps the router from
sending everything to a few experts.
"""
import torch
from torch import nn

from ..layers import Linear, cast_for_matmul, fp32_dtype, keeps_for_backward


class SparseMoeBlock(nn.Module):
    """The router `gate` (hidden -> one logit per expert, no bias) and the `experts` (modules with forward and
    backward from hidden to hidden: in every model minift runs, Llama's SwiGLU MLP)."""

    def __init__(self, hidden_size, experts, top_k, norm_topk_prob):
        super().__init__()
        self.gate = Linear(hidden_size, len(experts), bias=False)
        self.experts = nn.ModuleList(experts)
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        # True: a training forward leaves (probs, chosen) in self.routing for the load-balancing loss to read (the
        # language model sets it before each forward from its config's output_router_logits, and its loss takes them)
        self.records_routing = False

    def extra_repr(self):
        return f"experts={len(self.experts)}, top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}"

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, hidden): the tokens, wherever they sit in the batch
        xm = cast_for_matmul(x)  # (under bf16 autocast: cast once, not once per expert)
        logits = self.gate(xm)
        probs = torch.softmax(logits, dim=-1, dtype=fp32_dtype(logits))  # (N, E)
        top, chosen = probs.topk(self.top_k, dim=-1)  # (N, k); a tie goes to whichever topk picks, as in transformers
        weights = top / top.sum(-1, keepdim=True) if self.norm_topk_prob else top
        # dispatch: the N * k (token, slot) pairs sorted by expert (stable: tokens keep their order within an expert)
        order = chosen.reshape(-1).argsort(stable=True)
        token = order // self.top_k  # the token of each sorted pair
        counts = torch.bincount(chosen.reshape(-1), minlength=len(self.experts)).tolist()  # rows per expert, 0 too
        outs = torch.cat([expert(rows) for expert, rows in zip(self.experts, xm[token].split(counts))])
        w = weights.reshape(-1)[order]  # each sorted pair's weight
        # combine: a token's k weighted outputs added into its row, expert by expert (as transformers adds them)
        y = torch.zeros_like(x).index_add_(0, token, (outs * w[:, None].to(outs.dtype)).to(x.dtype))
        if keeps_for_backward(self):
            # keeps: the router's softmax and choice, the kept weights before and after renormalising, where each
            # sorted pair came from, the rows per expert, and the experts' outputs (for the weights' gradient)
            self.probs, self.chosen, self.top, self.weights = probs, chosen, top, weights
            self.order, self.token, self.counts, self.outs, self.w = order, token, counts, outs, w
        if self.training and self.records_routing:  # (frozen or not: the loss counts every layer's routing)
            self.routing = (probs, chosen)  # keeps: for the load-balancing loss, which takes them
        return y.view(shape)

    def backward(self, dy):
        shape = dy.shape
        dy = dy.reshape(-1, shape[-1])
        probs, chosen, top, weights = self.probs, self.chosen, self.top, self.weights
        order, token, counts, outs, w = self.order, self.token, self.counts, self.outs, self.w
        del self.probs, self.chosen, self.top, self.weights, self.order, self.token, self.counts, self.outs, self.w
        aux = self.__dict__.pop("aux_dprobs", None)  # the load-balancing loss's gradient, if the loss set one
        self.__dict__.pop("routing", None)  # (a recomputed forward records it again: nobody reads that copy)
        dpairs = dy[token]  # each sorted pair's share: its token's output gradient
        # each expert's backward on its own rows only; a token's input gradient is the sum over its k experts
        dparts = (dpairs * w[:, None].to(dpairs.dtype)).split(counts)
        dxs = torch.cat([expert.backward(d) for expert, d in zip(self.experts, dparts)])
        dx = torch.zeros_like(dy).index_add_(0, token, dxs.to(dy.dtype))
        # y = sum_e w_e out_e, so dw_e = dy . out_e, put back in (token, slot) order
        dw = (dpairs * outs).sum(-1, dtype=probs.dtype)
        dweights = torch.empty_like(dw).index_put_((order,), dw).view_as(weights)
        dlogits = route_backward(dweights, probs, chosen, top, weights, self.norm_topk_prob, aux)
        return dx.add_(self.gate.backward(dlogits)).view(shape)  # x fed the router and the experts: gradients add


def route_backward(dweights, probs, chosen, top, weights, norm_topk_prob, aux=None):
    """From the kept weights' gradient (N, k) to the router logits' gradient (N, E).

    Renormalised, w_j = p_j / S with S = the sum of the k kept p: dp_j = (dw_j - sum_i dw_i w_i) / S.
    The top-k choice passes nothing: the kept p get their gradient, the others none (before the softmax).
    `aux` (N, E): the load-balancing loss's gradient on the probabilities, which reaches every expert's p.
    Softmax: dlogit = p * (dp - sum(dp * p))."""
    if norm_topk_prob:
        dweights = (dweights - (dweights * weights).sum(-1, keepdim=True)) / top.sum(-1, keepdim=True)
    dprobs = torch.zeros_like(probs).scatter_(1, chosen, dweights)  # only the chosen columns (distinct per token)
    if aux is not None:
        dprobs += aux
    return dprobs.sub_((dprobs * probs).sum(-1, keepdim=True)).mul_(probs)


def load_balancing_loss(routings, num_experts, top_k, attention_mask=None):
    """Switch Transformer's auxiliary loss over every sparse layer, as transformers' load_balancing_loss_func:

        aux = E * sum_e f_e * P_e

    f_e: the share of the tokens' k choices that went to expert e, P_e: the mean router probability of e, both over
    the real tokens (attention_mask) of all sparse layers together. An even load (f_e = k / E, P_e = 1 / E) gives
    aux = k, the top_k; a router that favours a few experts gives more. f is a count: no gradient. So daux/dp for
    token t of any layer is E * f / rows on its real tokens: one (N, E) tensor, the same for every layer, returned
    beside the loss.

    routings: [(probs (N, E), chosen (N, k))] per sparse layer. Returns (aux, daux_dprobs)."""
    probs = routings[0][0]
    mask = (torch.ones(len(probs), device=probs.device) if attention_mask is None
            else attention_mask.reshape(-1).to(probs.device)).to(probs.dtype)
    rows = len(routings) * mask.sum()
    counts = sum(torch.zeros(num_experts, dtype=probs.dtype, device=probs.device).index_add_(
        0, chosen.reshape(-1), mask.repeat_interleave(top_k)) for _, chosen in routings)
    prob_sums = sum((p * mask[:, None]).sum(0) for p, _ in routings)
    f, P = counts / rows, prob_sums / rows
    return num_experts * (f * P).sum(), mask[:, None] * (num_experts * f / rows)
