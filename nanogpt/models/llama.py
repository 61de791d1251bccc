"""
The Llama architecture in one file, computed as llama2.c's run.c computes it.

  x = embedding(token)
  per layer:  x += wo · attention(rope(wq·rms(x)), rope(wk·rms(x)), wv·rms(x))     (causal)
              x += w2 · (silu(w1·rms(x)) * w3·rms(x))                                (SwiGLU)
  logits = output · rms(x)                       (output tied to the embedding, or not)

RMSNorm: x / sqrt(mean(x²) + eps) · weight (eps 1e-5 in llama2.c). Rotary embeddings rotate
ADJACENT pairs (x[2i], x[2i+1]) of each head by angle pos·θ_i, θ_i = theta^(-2i/hs): as llama2.c
(and Meta's checkpoints). Hugging Face rotates halves (x[i], x[i+hs/2]) instead, so its q/k
projections are rows permuted: nanogpt/formats/hf.py undoes that on import.

Grouped-query attention: n_kv_heads (dividing n_heads) key/value heads, query head h reads kv
head h // (n_heads / n_kv_heads); the cache holds only the kv heads, and the kernels read them
in place (nanogpt/models/attend.py). Speed for decoding one token (Nq=1): q, k, v come from ONE
fused projection (wqkv), w1 and w3 from one (w13); the RoPE table is precomputed as complex
numbers so q and k rotate in one multiplication; the cache is written in place.

The models never parse files: nanogpt/formats/llama2c.py and hf.py fill a Llama's state dict.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanogpt.models.attend import AttentionChoice, KVCache, Linear, TimedAttention, check_attention


@dataclass
class LlamaConfig:
    dim: int = 288              # model width (llama2.c's stories15M shape by default)
    hidden_dim: int = 768       # SwiGLU width
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 6         # key/value heads; < n_heads is grouped-query attention
    vocab_size: int = 32000
    max_seq_len: int = 256      # context length: RoPE table and KV cache size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True  # output classifier = token embedding matrix
    attention: str = "torch"    # "torch", "manual" or a name in nanogpt.VARIANTS

    def check(self):
        """Raise ValueError naming the first field that cannot describe a Llama."""
        for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head size {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"norm_eps and rope_theta must be positive, got {self.norm_eps}, {self.rope_theta}")

    @property
    def head_size(self):
        return self.dim // self.n_heads


def rope_table(head_size, max_seq_len, theta=10000.0):
    """(max_seq_len, 1, head_size/2) complex64: e^{i·pos·θ_j}, θ_j = theta^(-2j/head_size); the
    1 broadcasts over the heads.

    The angle pos·θ_j is formed in float32 as run.c (and transformers) form it, then cos/sin are
    taken in float64 and rounded: the table matches theirs to float rounding at every position."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))  # (hs/2,)
    angle = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]  # float32
    table = torch.polar(torch.ones_like(angle, dtype=torch.float64), angle.double()).to(torch.complex64)
    return table[:, None, :]


def apply_rope(x, freqs):
    """x (B, T, nh, hs/2, 2) real, freqs (T, 1, hs/2) complex -> (B, T, nh, hs/2, 2): each
    adjacent pair (x[2j], x[2j+1]) of a head, read as the complex number x[2j] + i·x[2j+1],
    times freqs[t, 0, j]."""
    if x.dtype != torch.float32:  # a bfloat16 model: there are no bfloat16 complex numbers
        return apply_rope(x.float(), freqs).to(x.dtype)
    return torch.view_as_real(torch.view_as_complex(x) * freqs)


class RMSNorm(nn.Module):

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention(TimedAttention, nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_size = config.n_heads, config.n_kv_heads, config.head_size
        # rows: wq (n_heads·hs), then wk and wv (n_kv_heads·hs each)
        self.wqkv = Linear(config.dim, (config.n_heads + 2 * config.n_kv_heads) * config.head_size, bias=False)
        self.wo = Linear(config.n_heads * config.head_size, config.dim, bias=False)
        self.attention = config.attention
        self.layer_idx = layer_idx

    def forward(self, x, freqs, kv_cache=None):
        B, T, _ = x.shape
        H, Hk, hs = self.n_heads, self.n_kv_heads, self.head_size
        qkv = self.wqkv(x)  # (B, T, (H + 2Hk)·hs)
        qk = apply_rope(qkv[..., :(H + Hk) * hs].view(B, T, H + Hk, hs // 2, 2), freqs)  # q and k heads at once
        qk = qk.view(B, T, H + Hk, hs)  # the fresh (contiguous) output of the rotation
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, hs)
        k = qk[:, :, H:].transpose(1, 2)  # (B, Hk, T, hs)
        v = qkv[..., (H + Hk) * hs:].view(B, T, Hk, hs).transpose(1, 2)  # (B, Hk, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)  # (B, Hk, Tk, hs), Tk = cached + T
        y = self.timed_attend(q, k, v)  # (B, H, T, hs), causal bottom-right
        y = y.transpose(1, 2).reshape(B, T, H * hs)  # a view when T == 1
        return self.wo(y)


class FeedForward(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.hidden_dim = config.hidden_dim
        self.w13 = Linear(config.dim, 2 * config.hidden_dim, bias=False)  # rows: w1 (gate), then w3 (up)
        self.w2 = Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).split(self.hidden_dim, dim=-1)  # (B, T, hidden) each
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-RMSNorm transformer block."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x, freqs, kv_cache=None):
        x = x + self.attention(self.attention_norm(x), freqs, kv_cache)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(AttentionChoice, nn.Module):

    def __init__(self, config):
        super().__init__()
        config.check()
        check_attention(config.attention)
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.n_layers)])
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # not a parameter and not saved: a function of the config
        self.register_buffer("freqs", rope_table(config.head_size, config.max_seq_len, config.rope_theta),
                             persistent=False)
        for name, p in self.named_parameters():  # llama2.c's init: N(0, 0.02), residual outputs scaled
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                torch.nn.init.normal_(p, mean=0.0, std=std)
        self.set_attention(config.attention)  # every layer's op and projections

    @property
    def context_length(self):
        return self.config.max_seq_len

    def new_kv_cache(self, batch_size):
        c = self.config
        return KVCache(c.n_layers, batch_size, c.n_kv_heads, c.max_seq_len, c.head_size,
                       dtype=self.output.weight.dtype)  # bfloat16 for a bfloat16 model

    def _decoder_spec(self):
        """For AttentionChoice.decoder: (architecture, whole-model tensors, each layer's 12 tensors)
        in csrc/decode_model.cpp's order; None is an absent bias (a Llama has none)."""
        c = self.config
        arch = dict(arch="llama", n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, eps=c.norm_eps, gelu_tanh=False)
        tensors = dict(tok_emb=self.tok_embeddings.weight, pos_emb=None, rope=torch.view_as_real(self.freqs),
                       final_w=self.norm.weight, final_b=None, classifier=self.output.weight)
        layers = [[b.attention_norm.weight, None, b.attention.wqkv.weight, None, b.attention.wo.weight, None,
                   b.ffn_norm.weight, None, b.feed_forward.w13.weight, None, b.feed_forward.w2.weight, None]
                  for b in self.layers]
        return arch, tensors, layers

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids at positions 0..T-1, or with a cache at kv_cache.length.. (their
        keys/values are appended to it). Returns (logits, loss): with targets, logits (B, T, vocab)
        and the mean cross-entropy; without, the last position's logits (B, 1, vocab)."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.max_seq_len:
            raise ValueError(f"cannot forward positions {start}..{start + T - 1}: max_seq_len is {self.config.max_seq_len}")
        x = self.tok_embeddings(idx)  # (B, T, dim)
        freqs = self.freqs[start:start + T]  # (T, 1, hs/2)
        for layer in self.layers:
            x = layer(x, freqs, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T  # every layer has appended its T new keys/values
        if targets is None:
            return self.output(self.norm(x[:, -1:])), None  # (B, 1, vocab)
        logits = self.output(self.norm(x))  # (B, T, vocab)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
