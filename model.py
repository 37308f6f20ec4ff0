"""
A Llama 2 decoder, as in llama2.c: RMSNorm, rotary position embeddings (RoPE),
grouped-query attention, a SwiGLU feed-forward, tied input/output embeddings, and a
key/value cache so generation costs one token's work per step.

The model reads first as the reference: one forward pass, which training runs and which a
KV cache passes through when generating. Generation's fast path on the CPU, FastDecoder
(the same steps on the weights laid out for one token at a time), is apart in the last
section and computes the same. LoRA (fine-tuning a low-rank update of chosen weights instead
of the weights) has its own section, before the KV cache. The parameter names are llama2.c's
(tok_embeddings, layers.N.attention.wq, ...), so its tools and ours read the same checkpoints.
This file imports nothing of ours.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 0        # < n_heads: grouped-query attention (0: = n_heads)
    vocab_size: int = 4096
    hidden_dim: int = 0        # 0: derived from dim and multiple_of, as in Llama
    multiple_of: int = 32      # the feed-forward width is rounded up to a multiple of this
    norm_eps: float = 1e-5
    max_seq_len: int = 256
    dropout: float = 0.0
    n_experts: int = 0         # > 0: each feed-forward is a mixture of this many experts
    n_experts_per_tok: int = 2 # ... of which each token uses this many (top-k)

    def __post_init__(self):
        if not self.n_kv_heads:
            self.n_kv_heads = self.n_heads
        if not self.hidden_dim:  # 4*dim, times 2/3 because SwiGLU has three matrices
            h = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)
        assert self.dim % self.n_heads == 0, "n_heads must divide dim"
        assert self.n_heads % self.n_kv_heads == 0, "n_kv_heads must divide n_heads"
        assert (self.dim // self.n_heads) % 2 == 0, "RoPE needs an even head_dim"
        assert not self.n_experts or 1 <= self.n_experts_per_tok <= self.n_experts, \
            "n_experts_per_tok must be between 1 and n_experts"


# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 even under bf16 autocast: the mean of squares needs range
        # (F.rms_norm is x * rsqrt(mean(x^2) + eps), bit for bit, in one call instead of five)
        return F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).type_as(x) * self.weight


def precompute_freqs(head_dim, end, theta=10000.0):
    """cos and sin of the rotation angle pos * theta^(-2i/head_dim): (end, head_dim/2)"""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(end).float(), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rotary_emb(x, cos2, sin2):
    """Rotate each adjacent pair (x0, x1) = (x[2i], x[2i+1]) of every head by its position's
    angle, as llama2.c's run.c does: (x0 cos - x1 sin, x1 cos + x0 sin). x (B, T, H, head_dim);
    cos2 (T, head_dim) holds each cos twice, sin2 each pair's (-sin, sin), so that this is
    x * cos2 + (x1, x0) * sin2: bit-identical to the pairwise formula, in a third of the calls."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) in each pair
    return (xf * cos2[:, None] + swapped * sin2[:, None]).type_as(x)


class Attention(nn.Module):
    def __init__(self, args, layer_id):
        super().__init__()
        self.layer_id = layer_id  # which of the cache's layers holds this one's keys and values
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.resid_dropout = nn.Dropout(args.dropout)
        self.dropout = args.dropout

    def forward(self, x, freqs_cos, freqs_sin, cache=None):
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        # QKV: each position's query, key and value vector in every head
        q = self.wq(x).view(B, T, H, D)   # (B, T, n_heads, head_dim)
        k = self.wk(x).view(B, T, KV, D)  # (B, T, n_kv_heads, head_dim)
        v = self.wv(x).view(B, T, KV, D)  # (B, T, n_kv_heads, head_dim)
        # RoPE: rotate queries and keys by their positions, so that q.k depends on their distance
        q = apply_rotary_emb(q, freqs_cos, freqs_sin)
        k = apply_rotary_emb(k, freqs_cos, freqs_sin)
        if cache is not None:  # generating: the keys and values of the earlier positions too
            k, v = cache.update(self.layer_id, k, v)  # (B, S, n_kv_heads, head_dim), S >= T
        # heads as batch: (B, n_heads, T, head_dim), and k, v (B, n_kv_heads, S, head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # causal self-attention, flash attention on CUDA; enable_gqa lets n_heads/n_kv_heads
        # query heads share a key/value head without materialising repeated copies
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, k.size(2), x.device),
                                           is_causal=k.size(2) == T, enable_gqa=H != KV,
                                           dropout_p=self.dropout if self.training else 0.0)
        # concat the heads: (B, n_heads, T, head_dim) -> (B, T, n_heads * head_dim)
        y = y.transpose(1, 2).contiguous().view(B, T, H * D)
        return self.resid_dropout(self.wo(y))  # (B, T, dim)


def causal_mask(T, S, device):
    """T new positions after S - T cached ones: row i sees positions 0 .. S - T + i. None
    where no mask is needed: no cached positions (is_causal says it), or one new token."""
    if S == T or T == 1:
        return None
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)

    def forward(self, x):  # SwiGLU: a gate (silu(w1 x)) times a value (w3 x)
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class MoEFeedForward(nn.Module):
    """A mixture of experts in place of the feed-forward (Mixtral's, as minimind teaches
    it): n_experts SwiGLU feed-forwards and a router, a linear layer scoring each expert for
    each token. A token goes to the k experts it scores highest, and gets the sum of their
    outputs weighted by the router's probabilities, renormalised over those k. The model
    holds n_experts feed-forwards; a token pays for k."""
    def __init__(self, args):
        super().__init__()
        self.k = args.n_experts_per_tok
        self.gate = nn.Linear(args.dim, args.n_experts, bias=False)  # the router
        self.experts = nn.ModuleList(FeedForward(args) for _ in range(args.n_experts))
        self.aux_loss = self.load = None  # of the last forward pass, for train.py

    def forward(self, x):
        shape, E = x.shape, len(self.experts)
        x = x.reshape(-1, shape[-1])                             # (N, dim): all the tokens
        probs = F.softmax(self.gate(x).float(), dim=-1)           # (N, E)
        weights, chosen = probs.topk(self.k, dim=-1)              # (N, k): the k best experts
        weights = (weights / weights.sum(-1, keepdim=True)).type_as(x)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):  # every expert, so each gets a gradient
            token, slot = torch.where(chosen == e)                # the tokens that chose e
            y.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        # load balancing (Switch Transformer's, as Mixtral's): E * sum_e load_e * P_e, load_e
        # the fraction of the N*k choices that went to expert e, P_e its mean probability.
        # 1 when the router spreads the tokens evenly; larger when a few experts take most.
        self.load = torch.bincount(chosen.flatten(), minlength=E).float() / chosen.numel()
        self.aux_loss = E * (self.load * probs.mean(0)).sum()
        return y.view(shape)


class TransformerBlock(nn.Module):
    def __init__(self, args, layer_id):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoEFeedForward(args) if args.n_experts else FeedForward(args)

    def forward(self, x, freqs_cos, freqs_sin, cache=None):
        h = x + self.attention(self.attention_norm(x), freqs_cos, freqs_sin, cache)
        return h + self.feed_forward(self.ffn_norm(h))


# -----------------------------------------------------------------------------
# the model

class Transformer(nn.Module):
    def __init__(self, params):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.dropout = nn.Dropout(params.dropout)
        self.layers = nn.ModuleList(TransformerBlock(params, i) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # tied weights: the classifier reuses the embedding table (fewer parameters,
        # and llama2.c's file format stores the shared matrix once)
        self.tok_embeddings.weight = self.output.weight
        cos, sin = precompute_freqs(params.dim // params.n_heads, params.max_seq_len)
        self.register_buffer("freqs_cos", cos.repeat_interleave(2, -1), persistent=False)
        self.register_buffer("freqs_sin", torch.stack([-sin, sin], -1).flatten(1), persistent=False)
        self.apply(self._init_weights)
        # the two projections that write into the residual stream get a smaller init, so
        # the stream's variance does not grow with depth (GPT-2's scaled init)
        for name, p in self.named_parameters():
            if name.endswith('wo.weight') or name.endswith('w2.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * params.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def trunk(self, tokens, cache=None):
        """tokens (B, T) -> the final hidden states (B, T, dim), normalised: what the output
        head reads (and the reward model's head). With a cache (a KVCache, for generation)
        the tokens continue the sequence the cache holds, at positions cache.pos.."""
        T, pos = tokens.size(1), cache.pos if cache is not None else 0
        if pos + T > (cache.max_len if cache is not None else self.params.max_seq_len):
            raise ValueError(f"positions {pos}..{pos + T - 1} exceed the context "
                             f"(max_seq_len {self.params.max_seq_len}, or the cache's length)")
        h = self.dropout(self.tok_embeddings(tokens))
        cos, sin = self.freqs_cos[pos:pos + T], self.freqs_sin[pos:pos + T]
        for layer in self.layers:
            h = layer(h, cos, sin, cache)
        if cache is not None:
            cache.pos += T
        return self.norm(h)

    def forward(self, tokens, targets=None, cache=None):
        """tokens (B, T). With targets (B, T): all logits and the mean cross-entropy over
        targets that are not -1. Without: logits of the last position only, (B, 1, V)."""
        h = self.trunk(tokens, cache)
        if targets is None:
            return self.output(h[:, -1:, :]), None  # a view: [-1] as a list would copy
        logits = self.output(h)
        # a mean over the counted targets; clamp so a row with nothing to learn gives 0
        n = (targets != -1).sum().clamp(min=1)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-1, reduction='sum') / n
        return logits, loss

    # -------------------------------------------------------------------------
    # training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the 2-D weights (matmuls, embeddings); not the norms' gains
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 fused=device_type == 'cuda')

    def aux_loss(self):
        """A mixture of experts' load-balancing loss of the last forward pass, the mean over
        the layers (1 when balanced; 0 for a dense model); train.py adds aux_loss_coef times it."""
        if not self.params.n_experts:
            return 0.0
        return sum(l.feed_forward.aux_loss for l in self.layers) / len(self.layers)

    def expert_load(self):
        """(n_layers, n_experts): the fraction of the last forward pass's token choices that
        went to each expert, per layer"""
        return torch.stack([l.feed_forward.load for l in self.layers])

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilization: achieved FLOP/s over peak_flops (PaLM, appendix B)."""
        N = self.active_params()
        p = self.params
        L, H, Q, T = p.n_layers, p.n_heads, p.dim // p.n_heads, p.max_seq_len
        flops_per_token = 6 * N + 12 * L * H * Q * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops

    def active_params(self):
        """The parameters a token is computed with: all of them, but for a mixture of
        experts only k of each layer's n_experts feed-forwards"""
        N, p = sum(w.numel() for w in self.parameters()), self.params
        if p.n_experts:
            per_expert = sum(w.numel() for w in self.layers[0].feed_forward.experts[0].parameters())
            N -= p.n_layers * (p.n_experts - p.n_experts_per_tok) * per_expert
        return N

    # -------------------------------------------------------------------------
    # generation

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=0.0,
                 stop_id=None, generator=None, repetition_penalty=1.0, exempt=(), fast=True):
        """Continue idx (B, T) by up to max_new_tokens tokens (fewer if the context fills
        up), with the KV cache: the prompt is processed in one pass, then one token per
        step. temperature 0 is greedy. stop_id: an id or a set of ids; generation ends
        when every row has produced one (rows that stopped are padded with it).
        repetition_penalty != 1 makes each token of the context so far less likely, but
        for the ids in exempt (see penalize_repeats). fast=False steps through forward()
        itself instead of FastDecoder, which computes the same."""
        B, T = idx.shape
        stops = {stop_id} if isinstance(stop_id, int) else set(stop_id or ())
        seen = Seen(B, self.params.vocab_size, exempt, idx)
        # the last new token is never run through the model, so it may sit at max_seq_len
        max_new_tokens = min(max_new_tokens, self.params.max_seq_len - T + 1)
        cache = KVCache(self, B, T + max_new_tokens - 1)
        decode = FastDecoder(self, cache) if fast else lambda tokens: self(tokens, cache=cache)[0]
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        logits = decode(idx)
        for step in range(max_new_tokens):
            last = penalize_repeats(logits[:, -1, :], seen.mask, repetition_penalty)
            nxt = sample_next(last, temperature, top_k, top_p, generator)
            seen.add(nxt[:, None])
            if stops:
                pad = next(iter(stops))
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                done |= torch.isin(nxt, torch.tensor(sorted(stops), device=idx.device))
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if stops and bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = decode(nxt[:, None])
        return idx


class RewardModel(Transformer):
    """The Transformer with a scalar head added: the reward of an answer is reward_head(h),
    h the final hidden state at its last token (the <|im_end|> that closes it), plus, with
    likelihood=True, the answer's log-likelihood under the model's own next-token head,
    log p(answer | prompt). Trained on preference pairs (train.py --task=rm) so that the
    chosen answer scores higher. Why the likelihood: on a small model the head alone learns
    only what the last token shows (an answer cut off midway), while a language model
    already prefers answers that fit the request (what DPO's implicit reward rests on)."""
    def __init__(self, params, likelihood=True):
        super().__init__(params)
        self.likelihood = likelihood
        self.reward_head = nn.Linear(params.dim, 1, bias=False)
        nn.init.zeros_(self.reward_head.weight)  # the head starts at 0 for every answer

    def forward(self, tokens, targets):
        """tokens (B, T); targets (B, T) the answer's tokens where they are predicted, -1
        elsewhere, as in training (the answer ends with its <|im_end|>) -> rewards (B,)"""
        h = self.trunk(tokens)
        last = h[torch.arange(tokens.size(0)), last_tokens(targets)]  # (B, dim)
        reward = self.reward_head(last).squeeze(-1)
        if self.likelihood:
            reward = reward + token_logprobs(self.output(h), targets).sum(1)
        return reward


def token_logprobs(logits, targets):
    """log p(targets[t]) under logits[t] at every position: (B, T), 0 where targets is -1
    (not counted)"""
    logp = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1,
                            reduction='none')
    return logp.view(targets.shape)


def last_tokens(targets):
    """The position of each row's last token, where a reward model reads its score: the
    <|im_end|> that closes the answer, which sits in the tokens one after the last counted
    target (or the last counted position, if the row was cut there). (B, T) -> (B,)"""
    T = targets.size(1)
    last = T - 1 - (targets != -1).flip(1).int().argmax(1)  # the last counted target
    return (last + 1).clamp(max=T - 1)


class Seen:
    """Which ids each row's context holds so far, (B, V) bools, for the repetition penalty;
    the ids in exempt (BOS, EOS, the chat tokens: a turn must still end) are never held."""
    def __init__(self, batch_size, vocab_size, exempt, idx=None):
        self.mask = torch.zeros(batch_size, vocab_size, dtype=torch.bool)
        self.exempt = torch.tensor(sorted(exempt), dtype=torch.long)
        if idx is not None:
            self.add(idx)

    def add(self, ids):  # ids (B, T)
        self.mask = self.mask.to(ids.device).scatter_(1, ids, True)
        self.mask[:, self.exempt.to(ids.device)] = False


def penalize_repeats(logits, seen, penalty):
    """CTRL's repetition penalty (Keskar et al. 2019), as transformers and llama.cpp apply
    it: each token already in the context (seen, (B, V) bools) gets less likely, its logit
    divided by penalty when positive and multiplied by it when negative. run.c's -r."""
    if penalty == 1:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def sample_next(logits, temperature, top_k=0, top_p=0.0, generator=None):
    """logits (B, V) -> next ids (B,). Greedy at temperature 0; otherwise top-k and then
    top-p (nucleus) filtering of the tempered distribution, and one uniform draw per row
    through the cumulative distribution (torch.multinomial is much slower on 32k tokens)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits, ids = logits.float() / temperature, None
    if top_k and top_k < logits.size(-1):  # go on with the k largest (B, k) and their ids
        logits, ids = torch.topk(logits, top_k)
    probs = F.softmax(logits, dim=-1)
    if 0 < top_p < 1:  # keep the smallest set of tokens whose probability exceeds top_p
        # as llama2.c: a token below (1 - top_p) / (V - 1) can never be in that set, so
        # only the few above it need sorting
        k = int((probs >= (1 - top_p) / (probs.size(-1) - 1)).sum(-1).max())
        top, order = torch.topk(probs, max(k, 1))
        top = top.masked_fill(top.cumsum(-1) - top > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, top)
    cdf = probs.cumsum(-1)
    coin = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, coin).clamp(max=cdf.size(-1) - 1)  # (B, 1)
    return (pick if ids is None else ids.gather(-1, pick))[:, 0]


# -----------------------------------------------------------------------------
# LoRA: fine-tune a small adapter instead of every weight (Hu et al. 2021)

LORA_TARGETS = ('wq', 'wk', 'wv', 'wo', 'w1', 'w2', 'w3')  # the linear layers that may get one


class LoRA(nn.Module):
    """A linear layer whose weight W (out, in) stays frozen, plus a trainable low-rank update:
    y = W x + (alpha / r) * B A x, with A (r, in) and B (out, r). Fine-tuning learns
    r * (in + out) numbers instead of in * out, and AdamW keeps its state for those only. B
    starts at zero, so BA = 0 and training starts exactly from the base model; A starts random
    (nn.Linear's init, as PEFT's), or B's gradient, which flows through A x, would be zero too.
    alpha / r spares retuning the learning rate when r changes (the paper's reason). After
    training, W + (alpha / r) B A is one matrix again (merged_weight): the merged model costs
    nothing extra to run. The frozen weight keeps its name (wq.weight), beside wq.lora_A and
    wq.lora_B, so the base model's checkpoint loads into a model with adapters."""

    def __init__(self, linear, rank, alpha, dropout=0.0):
        super().__init__()
        self.weight = linear.weight.requires_grad_(False)  # W, the base model's own tensor
        out_features, in_features = self.weight.shape
        like = dict(dtype=self.weight.dtype, device=self.weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)  # on the adapter's input only

    def forward(self, x):
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # B A x, (..., out)
        return F.linear(x, self.weight) + self.scale * update

    def merged_weight(self):
        return self.weight + self.scale * (self.lora_B @ self.lora_A)


def weight_of(linear):
    """The weight a linear layer computes with: W, or with a LoRA W + (alpha / r) B A"""
    return linear.merged_weight() if isinstance(linear, LoRA) else linear.weight


def add_lora(model, rank, alpha, dropout=0.0, targets=('wq', 'wk', 'wv', 'wo')):
    """Freeze every weight of model and put a LoRA on each linear layer named in targets (of
    LORA_TARGETS; in a mixture of experts, w1..w3 of every expert). Then only the adapters
    require a gradient, which is what configure_optimizers hands to AdamW."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(module, name, LoRA(child, rank, alpha, dropout))
    return model


def merge_lora(model):
    """Fold each LoRA into a plain linear layer of weight W + (alpha / r) B A: the model computes
    what it did, with no adapters and every weight trainable (to fine-tune it further)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRA):
                out_features, in_features = child.weight.shape
                linear = nn.Linear(in_features, out_features, bias=False, device='meta')
                linear.weight = nn.Parameter(child.merged_weight().detach())
                setattr(module, name, linear)
    return model.requires_grad_(True)


def lora_weights(model):
    """The adapters' tensors by name (layers.0.attention.wq.lora_A, ...): all that a LoRA
    checkpoint stores of the model, beside the name and hash of its base"""
    return {k: v for k, v in model.state_dict().items() if k.endswith(('.lora_A', '.lora_B'))}


def without_adapters(model):
    """The base model under model's adapters: a Transformer of its own, for DPO's and RL's
    frozen reference, whose weights are model's frozen tensors themselves (nothing is
    copied, and the adapters' training never moves them)."""
    with torch.device('meta'):  # the structure only: the weights come from model
        base = Transformer(model.params)
    base.requires_grad_(False)  # load_state_dict(assign=True) gives model's tensors this flag
    weights = {k: v for k, v in model.state_dict(keep_vars=True).items()
               if not k.endswith(('.lora_A', '.lora_B'))}
    base.load_state_dict(weights, assign=True)
    base.freqs_cos, base.freqs_sin = model.freqs_cos, model.freqs_sin  # (not in a state dict)
    return base.eval()


# -----------------------------------------------------------------------------
# the KV cache

class KVCache:
    """What generation keeps between steps: each layer's keys and values of the positions
    so far, (B, max_len, n_kv_heads, head_dim), and pos, the position the next token takes.
    model(tokens, cache=cache) adds the tokens' keys and values and attends over all of
    them. Nothing is stored on the model: drop the cache and its memory is freed."""

    def __init__(self, model, batch_size, max_len=None):
        p, w = model.params, model.output.weight
        self.max_len = min(max_len or p.max_seq_len, p.max_seq_len)
        self.pos = 0
        shape = (batch_size, self.max_len, p.n_kv_heads, p.dim // p.n_heads)
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in model.layers]
        self.v = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in model.layers]

    def update(self, layer, k, v):
        """Keep k, v (B, T, n_kv_heads, head_dim) of positions pos..pos+T-1 in layer's slots;
        returns the keys and values of every position so far, (B, pos + T, ...). The
        model moves pos on once all its layers have run."""
        B, S = k.size(0), self.pos + k.size(1)
        self.k[layer][:B, self.pos:S], self.v[layer][:B, self.pos:S] = k, v
        return self.k[layer][:B, :S], self.v[layer][:B, :S]


# -----------------------------------------------------------------------------
# fast decoding on the CPU: the same steps, on the weights laid out for one token at a time

class FastDecoder:
    """FastDecoder(model, cache)(tokens) computes model(tokens, cache=cache)[0], faster on
    the CPU. A decoding step multiplies one row by each matrix, which CPU BLAS gives to about
    one thread, and it reads a cold matrix faster as (in, out) and wide. So the matrices read
    by the same input sit side by side (q|k|v, w1|w3), transposed, cut into one block of
    columns per thread for matmul_blocks. The copies are detached and made when the decoder
    is: it is for inference, on the weights of that moment (with LoRA, each W + (alpha / r) B A:
    weight_of); the model trains as if it never existed."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache
        w = model.output.weight
        threads = torch.get_num_threads() if w.device.type == 'cpu' else 1

        def fused(*linears):  # (out, in) weights -> column blocks of (in, sum of outs)
            return column_blocks(torch.cat([weight_of(m).detach().t() for m in linears], 1),
                                 threads)
        attn, ffn = [l.attention for l in model.layers], [l.feed_forward for l in model.layers]
        self.wqkv = [fused(a.wq, a.wk, a.wv) for a in attn]
        self.wo = [fused(a.wo) for a in attn]
        self.moe = model.params.n_experts > 0  # a mixture's feed-forward runs as the model's
        self.w13 = [] if self.moe else [fused(f.w1, f.w3) for f in ffn]
        self.w2 = [] if self.moe else [fused(f.w2) for f in ffn]
        self.output = fused(model.output)

    def __call__(self, tokens):
        """tokens (B, T) at positions cache.pos.. -> logits of the last one (B, 1, V): the
        steps of Transformer.forward, with q and k rotated in one call"""
        model, cache = self.model, self.cache
        B, T = tokens.shape
        p, pos = model.params, cache.pos
        H, KV, D = p.n_heads, p.n_kv_heads, p.dim // p.n_heads
        if pos + T > cache.max_len:
            raise ValueError(f"positions {pos}..{pos + T - 1} exceed the cache's {cache.max_len} "
                             f"(max_seq_len {p.max_seq_len})")
        cos, sin = model.freqs_cos[pos:pos + T], model.freqs_sin[pos:pos + T]
        mask = causal_mask(T, pos + T, tokens.device)
        h = model.tok_embeddings(tokens)
        for i, layer in enumerate(model.layers):
            x = layer.attention_norm(h)
            qk, v = matmul_blocks(x, self.wqkv[i]).split([(H + KV) * D, KV * D], dim=-1)
            q, k = apply_rotary_emb(qk.view(B, T, H + KV, D), cos, sin).split([H, KV], dim=2)
            k, v = cache.update(i, k, v.view(B, T, KV, D))  # (B, S, n_kv_heads, head_dim)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=not pos and T > 1,
                                               enable_gqa=H != KV)  # (B, n_heads, T, head_dim)
            h = h + matmul_blocks(y.transpose(1, 2).reshape(B, T, H * D), self.wo[i])
            if self.moe:
                h = h + layer.feed_forward(layer.ffn_norm(h))
            else:
                gate, value = matmul_blocks(layer.ffn_norm(h), self.w13[i]).chunk(2, dim=-1)
                h = h + matmul_blocks(F.silu(gate) * value, self.w2[i])
        cache.pos += T
        return matmul_blocks(model.norm(h[:, -1:, :]), self.output)


def column_blocks(w, n):
    """(in, out) -> (n', in, out/n'), n' the largest divisor of out up to n: consecutive
    blocks of columns, for matmul_blocks"""
    n = max(d for d in range(1, n + 1) if w.size(1) % d == 0)
    return w.unflatten(1, (n, -1)).transpose(0, 1).contiguous()


def matmul_blocks(x, w):
    """x (B, T, in) times column_blocks' (n, in, out/n) -> (B, T, out): one bmm multiplies
    the n blocks on n threads at once"""
    B, T, _ = x.shape
    y = torch.bmm(x.reshape(1, B * T, -1).expand(w.size(0), -1, -1), w)  # (n, B*T, out/n)
    return y.transpose(0, 1).reshape(B, T, -1)
