"""The one plain reference: softmax(QKᵀ·scale + mask)V with torch ops, any dtype.

Causal masks are aligned bottom-right (query i sees keys j <= i + Nk - Nq), as in our kernels;
a query that sees no key gets a zero row, as SDPA gives. Run it in float64 to check kernels.
"""
from __future__ import annotations

import math

import torch


def causal_mask(nq: int, nk: int, device=None) -> torch.Tensor:
    """(nq, nk) bool, True where query i may see key j (bottom-right aligned)."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i + (nk - nq)


def attention_reference(q, k, v, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """q (B, H, Nq, d), k and v (B, H, Nk, d) -> (B, H, Nq, d), in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, Nq, Nk)
    if not causal:
        return torch.softmax(s, dim=-1) @ v
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return p.masked_fill(~mask.any(-1, keepdim=True), 0.0) @ v  # rows that see no key: 0


def sdpa(q, k, v, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """torch's SDPA with our bottom-right causal alignment (an explicit mask when Nq != Nk)."""
    import torch.nn.functional as F

    if causal and q.shape[-2] != k.shape[-2]:
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def compare_to_sdpa(out, q, k, v, causal: bool = False, scale: float | None = None):
    """(ok, our max error, bound): out against a float64 reference, allowed twice SDPA's own
    float32 error on the same inputs plus 4 ulps of the largest output."""
    exact = attention_reference(q.double(), k.double(), v.double(), causal, scale)
    ours = (out.double() - exact).abs().max().item() if out.numel() else 0.0
    theirs = (sdpa(q, k, v, causal, scale).double() - exact).abs().max().item() if out.numel() else 0.0
    top = exact.abs().max().item() if exact.numel() else 0.0
    bound = 2 * theirs + 4 * torch.finfo(torch.float32).eps * max(1.0, top)
    return ours <= bound, ours, bound
