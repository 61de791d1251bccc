"""The attention op and the KV cache shared by the models. The op is chosen by name:

  "torch"    torch's SDPA (the training default; every choice has a backward)
  "manual"   plain torch ops, softmax(QKᵀ/√hs + causal mask)V (the course's reference path)
  any name in nanogpt.VARIANTS: the C++/ISPC kernel's output is what the model uses.

Causal masks align bottom-right: the Tq queries are the LAST Tq positions of the Tk keys, which
is what a KV-cache decoding step (Tq=1, Tk=cached+1) needs.
"""
import time

import torch
import torch.nn.functional as F
from torch import nn

from nanogpt.reference import attention_reference, sdpa


def attend(q, k, v, attention):
    """q (B, H, Tq, hs), k and v (B, Hk, Tk, hs) with Hk dividing H (grouped-query attention:
    query head h reads kv head h // (H/Hk), SDPA's enable_gqa semantics) -> (B, H, Tq, hs)."""
    if attention == "torch":
        return sdpa(q, k, v, causal=True)  # SDPA, given the bottom-right mask when Tq != Tk
    if attention == "manual":
        return attention_reference(q, k, v, causal=True)  # plain torch ops: the course's path
    import nanogpt  # the compiled extension; imported here so "torch"/"manual" never need it
    # q may be a transposed view and k/v views into the cache: the kernel reads them in place
    # (it only needs the last dim contiguous), shared kv heads included. Default scale 1/sqrt(hs).
    return nanogpt.attention(q, k, v, variant=attention, causal=True, enable_gqa=k.size(1) != q.size(1))


def check_attention(attention):
    """Raise ValueError unless attention is "torch", "manual" or a name in nanogpt.VARIANTS."""
    if attention in ("torch", "manual"):
        return
    import nanogpt
    if attention not in nanogpt.VARIANTS:  # reading VARIANTS builds or loads the extension
        raise ValueError(f"unknown attention {attention!r}: expected 'torch', 'manual' or one of {nanogpt.VARIANTS}")


class KVCache:
    """Per-layer keys and values of the tokens seen so far, preallocated to the context length.

    k[l], v[l] are (B, n_heads, context, hs) (the kv heads, for grouped-query attention); the
    first `length` positions are filled, and append returns views (B, n_heads, length+T, hs)
    (last dim contiguous, no copy). The model advances `length` once all layers have appended.
    """

    def __init__(self, n_layer, batch_size, n_heads, context, head_size, device=None, dtype=torch.float32):
        shape = (batch_size, n_heads, context, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0  # number of cached positions = absolute position of the next token

    def reset(self):
        self.length = 0

    def append(self, layer, k, v):
        # k, v (B, n_heads, T, hs) of the new tokens at positions length .. length+T-1 (any
        # strides: written in place into the preallocated cache)
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class TimedAttention:
    """Mixin for a model's attention module (which sets self.attention): with `timing` on,
    timed_attend adds the seconds spent in attend() itself, not the projections, to
    `attn_seconds` (the attention share that inference prints)."""

    timing = False
    attn_seconds = 0.0

    def timed_attend(self, q, k, v):
        if not self.timing:
            return attend(q, k, v, self.attention)
        t0 = time.perf_counter()
        y = attend(q, k, v, self.attention)
        self.attn_seconds += time.perf_counter() - t0
        return y


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) that, with `kernels` on and no gradient wanted,
    runs nanogpt::linear: a decoding step's few rows against the weight, its rows split over the
    threads (torch's matrix-vector product uses one). Prefill and training stay F.linear."""

    kernels = False

    def forward(self, x):
        if self.kernels and not torch.is_grad_enabled():
            return _linear_op(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _linear_op(x, weight, bias):
    return torch.ops.nanogpt.linear.default(x, weight, bias)  # more than 4 rows: at::linear inside


class AttentionChoice:
    """Mixin for a model (an nn.Module with a .config.attention) whose layers are TimedAttention
    and whose projections are Linear."""

    def _attention_layers(self):
        return [m for m in self.modules() if isinstance(m, TimedAttention)]

    def set_attention(self, attention):
        """Switch the attention op of every layer (e.g. train with "torch", sample with a kernel)."""
        check_attention(attention)
        self.config.attention = attention
        for m in self._attention_layers():
            m.attention = attention
        for m in self.modules():  # our kernels own the decoding step's projections too
            if isinstance(m, Linear):
                m.kernels = attention not in ("torch", "manual")

    def set_attention_timing(self, on):
        for m in self._attention_layers():
            m.timing = on
            m.attn_seconds = 0.0
        if self._decoder is not None:
            self._decoder.attention_seconds = 0.0

    def attention_seconds(self):
        stepped = self._decoder.attention_seconds if self._decoder is not None else 0.0
        return sum(m.attn_seconds for m in self._attention_layers()) + stepped

    _decoder = None  # the last decoder(): its attention time (its predecessors' included) counts below

    def weights_to(self, dtype):
        """The weights (parameters) in dtype, e.g. torch.bfloat16 for inference; buffers keep
        theirs (Module.to would also cast Llama's complex rope table to a real dtype, dropping its
        imaginary part). The KV cache (new_kv_cache) follows the weights. Returns self."""
        for p in self.parameters():
            p.data = p.data.to(dtype)
        return self

    def decoder(self, cache):
        """The whole decoding step in C++ (csrc/decode_model.cpp) over this model's weights and
        `cache`, in place (no copies): .step(tokens (B,), pos) -> logits (B, vocab), appending the
        tokens' keys and values at pos. None for the plain-PyTorch attentions ("torch", "manual"),
        whose steps stay Python's."""
        if self.config.attention in ("torch", "manual"):
            return None
        import nanogpt

        def weight(t):  # the parameter's storage itself (contiguous already); empty for an absent bias
            return torch.empty(0) if t is None else t.detach().contiguous()

        arch, tensors, layers = self._decoder_spec()  # the model's own description of its step
        seconds = self._decoder.attention_seconds if self._decoder is not None else 0.0
        self._decoder = nanogpt.extension().DecodeModel(
            variant=self.config.attention, k_cache=cache.k, v_cache=cache.v, **arch,
            **{name: weight(t) for name, t in tensors.items()}, layers=[[weight(t) for t in ws] for ws in layers])
        self._decoder.attention_seconds = seconds  # one sample after another: the time adds up
        return self._decoder
