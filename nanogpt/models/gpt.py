"""
A character-level GPT in one file, after nanoGPT's model.py.

The attention op is pluggable (GPTConfig.attention):
  "torch"    F.scaled_dot_product_attention (training uses it by default; every choice has a backward).
  "manual"   plain torch ops, softmax(QK^T / sqrt(hs) + causal mask) V (the course's reference path).
  any name in nanogpt.VARIANTS: the C++/ISPC kernel's output is what the model uses.

Inference can use a KV cache (KVCache below): the prompt is run once (prefill), then each new
token is ONE query attending to all cached keys (Nq=1, Nk=T) with causal=True; the extension
aligns the causal mask bottom-right, so query i sees keys j <= i + (Nk - Nq).
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanogpt.reference import attention_reference, sdpa


@dataclass
class GPTConfig:
    block_size: int = 2048      # max context length = number of position embeddings
    vocab_size: int = 65        # characters of the training text
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True           # bias in Linears and LayerNorms, like GPT-2
    attention: str = "torch"    # "torch", "manual" or a name in nanogpt.VARIANTS


# -----------------------------------------------------------------------------
# attention: q (B, nh, Tq, hs), k and v (B, nh, Tk, hs) with Tq <= Tk; the Tq queries are the
# LAST Tq positions of the Tk keys, so the causal mask is aligned bottom-right.

def attend(q, k, v, attention):
    """Causal attention with the chosen implementation; returns (B, nh, Tq, hs)."""
    if attention == "torch":
        return sdpa(q, k, v, causal=True)  # SDPA, given the bottom-right mask when Tq != Tk
    if attention == "manual":
        return attention_reference(q, k, v, causal=True)  # plain torch ops: the course's path
    import nanogpt  # the compiled extension; imported here so "torch"/"manual" never need it
    # q is a transposed view and k/v may be views into the cache: the kernel reads them in place
    # (it only needs the last dim contiguous). Default scale is 1/sqrt(hs).
    return nanogpt.attention(q, k, v, variant=attention, causal=True)


def check_attention(attention):
    """Raise ValueError unless attention is "torch", "manual" or a name in nanogpt.VARIANTS."""
    if attention in ("torch", "manual"):
        return
    import nanogpt
    if attention not in nanogpt.VARIANTS:  # reading VARIANTS builds or loads the extension
        raise ValueError(f"unknown attention {attention!r}: expected 'torch', 'manual' or one of {nanogpt.VARIANTS}")


# -----------------------------------------------------------------------------

class KVCache:
    """Per-layer keys and values of the tokens seen so far, preallocated to block_size.

    k[l], v[l] are (B, nh, block_size, hs); the first `length` positions are filled, and
    keys(l) / values(l) return views (B, nh, length, hs) (last dim contiguous, no copy).
    """

    def __init__(self, config, batch_size, device=None, dtype=torch.float32):
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # number of cached positions = absolute position of the next token

    def reset(self):
        self.length = 0

    def append(self, layer, k, v):
        # k, v (B, nh, T, hs) of the new tokens at positions length .. length+T-1; returns the
        # views of all keys/values (B, nh, length+T, hs). `length` itself advances in GPT.forward.
        T = k.size(2)
        end = self.length + T
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attention = config.attention
        self.layer_idx = layer_idx
        # when timing is on, the seconds spent in the attention op itself (not the projections)
        self.timing = False
        self.attn_seconds = 0.0

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()  # batch, new tokens, n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.append(self.layer_idx, k, v)  # (B, nh, Tk, hs), Tk = cached + T

        if self.training and self.attn_dropout_p > 0:
            # only for training with dropout; SDPA applies it to the attention weights
            assert self.attention == "torch", "attention dropout is only implemented for attention='torch'"
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout_p, is_causal=True)
        elif self.timing:
            t0 = time.perf_counter()
            y = attend(q, k, v, self.attention)
            self.attn_seconds += time.perf_counter() - t0
        else:
            y = attend(q, k, v, self.attention)  # (B, nh, T, hs)

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        check_attention(config.attention)  # once here, not on every attention call
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output projection is the token embedding matrix
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2: scale the init of residual projections by 1/sqrt(2 * n_layer)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out the position embeddings (the token embeddings
        count, as they are tied to lm_head), like nanoGPT."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_attention(self, attention):
        """Switch the attention op of every layer (e.g. train with "torch", sample with a kernel)."""
        check_attention(attention)
        self.config.attention = attention
        for block in self.transformer.h:
            block.attn.attention = attention

    def set_attention_timing(self, on):
        for block in self.transformer.h:
            block.attn.timing = on
            block.attn.attn_seconds = 0.0

    def attention_seconds(self):
        return sum(block.attn.attn_seconds for block in self.transformer.h)

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids. Without a cache they sit at positions 0..T-1; with one, at
        kv_cache.length .. kv_cache.length+T-1, and their keys/values are appended to the cache.

        Returns (logits, loss): with targets, logits (B, T, vocab) and the mean cross-entropy;
        without, logits (B, 1, vocab) of the last position only (all that sampling needs).
        """
        device = idx.device
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"cannot forward positions {start}..{start + T - 1}: block_size is {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=device)  # (T,) absolute positions

        tok_emb = self.transformer.wte(idx)  # (B, T, n_embd)
        pos_emb = self.transformer.wpe(pos)  # (T, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.length += T  # every layer has appended its T new keys/values

        if targets is not None:
            logits = self.lm_head(x)  # (B, T, vocab)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # (B, 1, vocab); list index keeps the time dim
            loss = None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, wpe_lr_scale=1.0):
        # decay 2D tensors (matmul weights, embeddings); not biases and LayerNorm gains. Each group's
        # "lr_scale" multiplies the scheduled LR; the position embeddings may get their own.
        wpe = self.transformer.wpe.weight
        params = [p for p in self.parameters() if p.requires_grad and p is not wpe]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
                  {"params": [wpe], "weight_decay": weight_decay, "lr_scale": wpe_lr_scale}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, kv_cache=True):
        """Sample max_new_tokens after idx (B, T); returns (idx (B, T + max_new_tokens), n_crops).

        Context cropping (as nanoGPT): when the sequence is longer than block_size, the model sees
        only the last block_size tokens. The position embeddings are absolute, so after a crop
        every kept token has a new position and its cached keys/values are stale: with the cache
        we drop it and re-prefill the cropped window, and since the window then slides by one each
        step, every step past block_size is a full re-prefill (no cache benefit there).
        n_crops counts the steps that cropped. Both paths draw exactly one torch.multinomial per
        token from `generator`, so with the same seed they produce the same tokens.
        """
        block_size = self.config.block_size
        cache = KVCache(self.config, idx.size(0), device=idx.device) if kv_cache else None
        n_crops = 0
        for _ in range(max_new_tokens):
            cropped = idx.size(1) > block_size
            n_crops += cropped
            if cache is None:
                logits, _ = self(idx[:, -block_size:])
            else:
                if cropped or cache.length == 0:
                    cache.reset()  # prefill (the prompt, or the cropped window at positions 0..)
                    logits, _ = self(idx[:, -block_size:], kv_cache=cache)
                else:
                    logits, _ = self(idx[:, cache.length:], kv_cache=cache)  # the new token(s) only
            logits = logits[:, -1, :] / temperature  # (B, vocab)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx, n_crops
