"""
A Llama 2 decoder, as in llama2.c: RMSNorm, rotary position embeddings (RoPE),
grouped-query attention, a SwiGLU feed-forward, tied input/output embeddings, and a
key/value cache so generation costs one token's work per step.

The parameter names are llama2.c's (tok_embeddings, layers.N.attention.wq, ...), so its
tools and ours read the same checkpoints. This file imports nothing of ours.
"""

import math
from dataclasses import dataclass, fields

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

    def __post_init__(self):
        if not self.n_kv_heads:
            self.n_kv_heads = self.n_heads
        if not self.hidden_dim:  # 4*dim, times 2/3 because SwiGLU has three matrices
            h = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)
        assert self.dim % self.n_heads == 0, "n_heads must divide dim"
        assert self.n_heads % self.n_kv_heads == 0, "n_kv_heads must divide n_heads"
        assert (self.dim // self.n_heads) % 2 == 0, "RoPE needs an even head_dim"


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


def column_blocks(w, n):
    """(in, out) -> (n', in, out/n'), n' the largest divisor of out up to n: consecutive
    blocks of columns, for matmul_blocks"""
    n = max(d for d in range(1, n + 1) if w.size(1) % d == 0)
    return w.unflatten(1, (n, -1)).transpose(0, 1).contiguous()


def matmul_blocks(x, w):
    """x (B, T, in) times column_blocks' (n, in, out/n) -> (B, T, out). One bmm multiplies
    the n blocks on n threads at once, where CPU BLAS gives one row times a wide matrix
    to about one thread."""
    B, T, _ = x.shape
    y = torch.bmm(x.reshape(1, B * T, -1).expand(w.size(0), -1, -1), w)  # (n, B*T, out/n)
    return y.transpose(0, 1).reshape(B, T, -1)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads = args.n_heads, args.n_kv_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.resid_dropout = nn.Dropout(args.dropout)
        self.dropout = args.dropout
        self.wqkv_t = self.wo_t = None  # generation only: see Transformer.init_cache

    def forward(self, x, freqs_cos, freqs_sin, cache=None, start_pos=0):
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv_t is not None:  # generation: q, k, v in one matmul, q and k rotated at once
            qk, v = matmul_blocks(x, self.wqkv_t).split([(H + KV) * D, KV * D], dim=-1)
            q, k = apply_rotary_emb(qk.view(B, T, H + KV, D), freqs_cos, freqs_sin).split([H, KV], 2)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
            q = apply_rotary_emb(q.view(B, T, H, D), freqs_cos, freqs_sin)
            k = apply_rotary_emb(k.view(B, T, KV, D), freqs_cos, freqs_sin)
        v = v.view(B, T, KV, D)
        if cache is not None:  # write this step's keys/values, attend over all so far
            cache_k, cache_v = cache  # (B, max_len, n_kv_heads, head_dim)
            cache_k[:B, start_pos:start_pos + T] = k
            cache_v[:B, start_pos:start_pos + T] = v
            k, v = cache_k[:B, :start_pos + T], cache_v[:B, :start_pos + T]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T or S, head_dim)
        S = k.size(2)
        mask = None
        if T > 1 and S > T:  # a new block after cached tokens: causal, shifted by S - T
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        # flash attention on CUDA; enable_gqa lets n_heads/n_kv_heads query heads share a
        # key/value head without materialising repeated copies
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=(T > 1 and S == T),
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=H != KV)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.resid_dropout(self.wo(y) if self.wo_t is None else matmul_blocks(y, self.wo_t))


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.dropout = nn.Dropout(args.dropout)
        self.w13_t = self.w2_t = None  # generation only: see Transformer.init_cache

    def forward(self, x):  # SwiGLU: a gate (silu(w1 x)) times a value (w3 x)
        if self.w13_t is not None:  # generation: both in one matmul
            gate, value = matmul_blocks(x, self.w13_t).chunk(2, dim=-1)
        else:
            gate, value = self.w1(x), self.w3(x)
        h = F.silu(gate) * value
        return self.dropout(self.w2(h) if self.w2_t is None else matmul_blocks(h, self.w2_t))


class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, freqs_cos, freqs_sin, cache=None, start_pos=0):
        h = x + self.attention(self.attention_norm(x), freqs_cos, freqs_sin, cache, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


# -----------------------------------------------------------------------------
# the model

class Transformer(nn.Module):
    def __init__(self, params):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.dropout = nn.Dropout(params.dropout)
        self.layers = nn.ModuleList(TransformerBlock(params) for _ in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        # tied weights: the classifier reuses the embedding table (fewer parameters,
        # and llama2.c's file format stores the shared matrix once)
        self.tok_embeddings.weight = self.output.weight
        cos, sin = precompute_freqs(params.dim // params.n_heads, params.max_seq_len)
        self.register_buffer("freqs_cos", cos.repeat_interleave(2, -1), persistent=False)
        self.register_buffer("freqs_sin", torch.stack([-sin, sin], -1).flatten(1), persistent=False)
        self.cache, self.output_t = None, None  # generation only: see init_cache
        self.apply(self._init_weights)
        # the two projections that write into the residual stream get a smaller init, so
        # the stream's variance does not grow with depth (GPT-2's scaled init)
        for name, p in self.named_parameters():
            if name.endswith('wo.weight') or name.endswith('w2.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * params.n_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, targets=None, start_pos=None):
        """tokens (B, T). With targets (B, T): all logits and the mean cross-entropy over
        targets that are not -1. Without: logits of the last position only, (B, 1, V).
        With start_pos (after init_cache): tokens sit at positions start_pos.. and the
        keys/values of earlier positions come from the cache."""
        B, T = tokens.shape
        pos = start_pos or 0
        if pos + T > self.params.max_seq_len:
            raise ValueError(f"positions {pos}..{pos + T - 1} exceed max_seq_len "
                             f"{self.params.max_seq_len}")
        h = self.dropout(self.tok_embeddings(tokens))
        cos, sin = self.freqs_cos[pos:pos + T], self.freqs_sin[pos:pos + T]
        for i, layer in enumerate(self.layers):
            cache = self.cache[i] if start_pos is not None else None
            h = layer(h, cos, sin, cache, pos)
        h = self.norm(h)
        if targets is None:
            h = h[:, -1:, :]  # a view: [-1] as a list would copy
            return (matmul_blocks(h, self.output_t) if self.output_t is not None else self.output(h)), None
        logits = self.output(h)
        # a mean over the counted targets; clamp so a row with nothing to learn gives 0
        n = (targets != -1).sum().clamp(min=1)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-1, reduction='sum') / n
        return logits, loss

    def init_cache(self, batch_size, max_len=None):
        """Prepare for generation: one (keys, values) buffer pair per layer, (B, max_len,
        n_kv_heads, head_dim), and the weights decoding multiplies by, fused, transposed and
        cut into one block of columns per thread. free_cache() undoes it.

        Decoding one token is a row times each matrix, and CPU BLAS reads a cold (in, out)
        matrix fast only when it is wide: one 288x864 q|k|v product takes 86 us where three
        288x288 ones take 147, 288x1536 w1|w3 121 us against 2 x 83, the 288x32000
        classifier 2.1 ms against 5.5 ms for the (out, in) layout (one core of this
        project's CI machine, weights in DRAM). It also gives such a product about one
        thread; a bmm over column blocks gives each thread its own: all of the 15M shape's
        matrices, once per token, 2 threads, 4.9 ms as plain products, 3.7 ms in blocks."""
        p = self.params
        max_len = min(max_len or p.max_seq_len, p.max_seq_len)
        w = self.output.weight
        shape = (batch_size, max_len, p.n_kv_heads, p.dim // p.n_heads)
        self.cache = [(torch.zeros(shape, dtype=w.dtype, device=w.device),
                       torch.zeros(shape, dtype=w.dtype, device=w.device)) for _ in self.layers]
        threads = torch.get_num_threads() if w.device.type == 'cpu' else 1

        def fused(*ms):  # the matrices side by side as (in, out), in column blocks
            return column_blocks(torch.cat([m.weight.detach().t() for m in ms], dim=1), threads)
        for layer in self.layers:
            a, f = layer.attention, layer.feed_forward
            a.wqkv_t, f.w13_t = fused(a.wq, a.wk, a.wv), fused(f.w1, f.w3)
            a.wo_t, f.w2_t = fused(a.wo), fused(f.w2)
        self.output_t = fused(self.output)

    def free_cache(self):
        self.cache, self.output_t = None, None
        for layer in self.layers:
            layer.attention.wqkv_t = layer.feed_forward.w13_t = None
            layer.attention.wo_t = layer.feed_forward.w2_t = None

    # -------------------------------------------------------------------------
    # training helpers

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the 2-D weights (matmuls, embeddings); not the norms' gains
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas,
                                 fused=device_type == 'cuda')

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops):
        """Model FLOPs utilization: achieved FLOP/s over peak_flops (PaLM, appendix B)."""
        N = sum(p.numel() for p in self.parameters())
        p = self.params
        L, H, Q, T = p.n_layers, p.n_heads, p.dim // p.n_heads, p.max_seq_len
        flops_per_token = 6 * N + 12 * L * H * Q * T
        return flops_per_token * T * fwdbwd_per_iter / dt / peak_flops

    # -------------------------------------------------------------------------
    # generation

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=0.0,
                 stop_id=None, generator=None):
        """Continue idx (B, T) by up to max_new_tokens tokens (fewer if the context fills
        up), with the KV cache: the prompt is processed in one pass, then one token per
        step. temperature 0 is greedy. stop_id: an id or a set of ids; generation ends
        when every row has produced one (rows that stopped are padded with it)."""
        B, T = idx.shape
        stops = {stop_id} if isinstance(stop_id, int) else set(stop_id or ())
        # the last new token is never run through the model, so it may sit at max_seq_len
        max_new_tokens = min(max_new_tokens, self.params.max_seq_len - T + 1)
        self.init_cache(B, T + max_new_tokens - 1)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        logits, _ = self(idx, start_pos=0)
        for step in range(max_new_tokens):
            nxt = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            if stops:
                pad = next(iter(stops))
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                done |= torch.isin(nxt, torch.tensor(sorted(stops), device=idx.device))
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            if stops and bool(done.all()) or step == max_new_tokens - 1:
                break
            logits, _ = self(nxt[:, None], start_pos=T + step)
        self.free_cache()
        return idx


def sample_next(logits, temperature, top_k=0, top_p=0.0, generator=None):
    """logits (B, V) -> next ids (B,). Greedy at temperature 0; otherwise top-k and then
    top-p (nucleus) filtering of the tempered distribution, and one uniform draw per row
    through the cumulative distribution (torch.multinomial costs ~20x more on 32k tokens)."""
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
# checkpoints

def load_checkpoint(path, device='cpu'):
    """Read a checkpoint as data (weights_only: no pickled code runs) and rebuild the
    model. A missing, truncated or foreign file ends the program with one line."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"error: {path} not found — train a model first (python train.py)")
    except Exception as e:  # truncated zips, foreign pickles, garbage: all mean "unreadable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error: {path} is not a readable checkpoint ({first[:160]}) — "
                         "was it truncated, or written by another program?")
    if not isinstance(ckpt, dict) or not {'model', 'model_args'} <= ckpt.keys():
        raise SystemExit(f"error: {path} has no 'model' and 'model_args' — not a checkpoint of ours")
    known = {f.name for f in fields(ModelArgs)}
    model = Transformer(ModelArgs(**{k: v for k, v in ckpt['model_args'].items() if k in known}))
    state = {k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()}
    model.load_state_dict(state)
    return model.to(device), ckpt
