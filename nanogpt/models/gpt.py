"""
A character-level GPT in one file, after nanoGPT's model.py.

The attention op is pluggable (GPTConfig.attention, see nanogpt/models/attend.py): "torch" (SDPA,
the training default), "manual" (plain torch ops) or a kernel of nanogpt.VARIANTS; every choice
has a backward. GPT-2's weights load into it too (nanogpt/formats/hf.py; gelu="tanh").

Inference can use a KV cache (KVCache below): the prompt is run once (prefill), then each new
token is ONE query attending to all cached keys (Nq=1, Nk=T) with causal=True; the extension
aligns the causal mask bottom-right, so query i sees keys j <= i + (Nk - Nq). Generation and
sampling, shared with the other models, live in nanogpt/sample.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanogpt.models.attend import AttentionChoice, Linear, TimedAttention, check_attention
from nanogpt.models.attend import KVCache as SharedKVCache


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
    gelu: str = "none"          # GELU's approximation: "none" (exact erf) or "tanh" (GPT-2's)


def check_dropout(attention, dropout, training):
    """Raise ValueError for a model that would train with attention dropout it does not have.

    Only SDPA ("torch") drops attention weights; "manual" and the kernels have no dropout, so a
    training-mode model with attention dropout > 0 on them would silently differ from the model it
    claims to be. In eval mode dropout is off anyway, so any attention serves.
    """
    if training and dropout > 0 and attention != "torch":
        raise ValueError(f"attention {attention!r} has no dropout, but the model has dropout {dropout} and is "
                         f"in training mode: train with attention 'torch', set dropout 0, or call .eval() first")


# -----------------------------------------------------------------------------

class KVCache(SharedKVCache):
    """The shared KV cache (nanogpt/models/attend.py) shaped for a GPTConfig: k[l], v[l] are
    (B, nh, block_size, hs)."""

    def __init__(self, config, batch_size, device=None, dtype=torch.float32):
        super().__init__(config.n_layer, batch_size, config.n_head, config.block_size,
                         config.n_embd // config.n_head, device=device, dtype=dtype)


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(TimedAttention, nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout_p = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attention = config.attention
        self.layer_idx = layer_idx

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
            check_dropout(self.attention, self.attn_dropout_p, self.training)  # if set behind GPT's back
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout_p, is_causal=True)
        else:
            y = self.timed_attend(q, k, v)  # (B, nh, T, hs)

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
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


class GPT(AttentionChoice, nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        check_attention(config.attention)  # once here, not on every attention call
        check_dropout(config.attention, config.dropout, self.training)  # a new module is in training mode
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output projection is the token embedding matrix
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2: scale the init of residual projections by 1/sqrt(2 * n_layer)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.set_attention(config.attention)  # every layer's op and projections

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

    @property
    def context_length(self):
        return self.config.block_size

    def new_kv_cache(self, batch_size):
        return KVCache(self.config, batch_size, dtype=self.lm_head.weight.dtype)  # bfloat16 for a bfloat16 model

    def set_attention(self, attention):
        """Switch the attention op of every layer (e.g. train with "torch", sample with a kernel).
        ValueError for an unknown name, or a model in training mode with attention dropout on
        an attention that has none (check_dropout)."""
        check_attention(attention)
        check_dropout(attention, self._attn_dropout(), self.training)
        super().set_attention(attention)

    def _decoder_spec(self):
        """For AttentionChoice.decoder: (architecture, whole-model tensors, each layer's 12 tensors)
        in csrc/decode_model.cpp's order; None is an absent bias."""
        arch = dict(arch="gpt", n_heads=self.config.n_head, n_kv_heads=self.config.n_head, eps=1e-5,
                    gelu_tanh=self.config.gelu == "tanh")
        t = self.transformer
        tensors = dict(tok_emb=t.wte.weight, pos_emb=t.wpe.weight, rope=None, final_w=t.ln_f.weight,
                       final_b=t.ln_f.bias, classifier=self.lm_head.weight)
        layers = [[b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
                   b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
                   b.mlp.c_proj.weight, b.mlp.c_proj.bias] for b in t.h]
        return arch, tensors, layers

    def _attn_dropout(self):
        # the layers' own values: training may set them apart from config.dropout (train.py)
        return max((block.attn.attn_dropout_p for block in self.transformer.h), default=0.0)

    def train(self, mode=True):
        """nn.Module.train, refusing training mode with attention dropout the attention lacks."""
        check_dropout(self.config.attention, self._attn_dropout(), mode)
        return super().train(mode)

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids. Without a cache they sit at positions 0..T-1; with one, at
        kv_cache.length .. kv_cache.length+T-1, and their keys/values are appended to the cache.

        Returns (logits, loss): with targets, logits (B, T, vocab) and the mean cross-entropy;
        without, logits (B, 1, vocab) of the last position only (all that sampling needs).
        """
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"cannot forward positions {start}..{start + T - 1}: block_size is {self.config.block_size}")

        tok_emb = self.transformer.wte(idx)  # (B, T, n_embd)
        pos_emb = self.transformer.wpe.weight[start:start + T]  # (T, n_embd): absolute positions, a view
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
