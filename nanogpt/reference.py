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


def repeat_kv(q, k, v):
    """k and v with Hk heads repeated to q's H (grouped-query attention, SDPA's enable_gqa):
    query head h reads kv head h // (H // Hk)."""
    group = q.shape[1] // max(k.shape[1], 1)
    if group <= 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def attention_reference(q, k, v, causal: bool = False, scale: float | None = None, rows=None) -> torch.Tensor:
    """q (B, H, Nq, d), k and v (B, H, Nk, d) or (B, Hk, Nk, d) with Hk dividing H (grouped-query
    attention) -> (B, H, Nq, d), in q's dtype.

    rows: optional query indices; then only those rows are computed, (B, H, len(rows), d),
    each with its own place on the causal diagonal (every row is independent of the others).
    """
    scale = 1.0 / math.sqrt(max(q.shape[-1], 1)) if scale is None else scale  # as the kernels
    k, v = repeat_kv(q, k, v)
    nq = q.shape[-2]
    if rows is not None:
        q = q[:, :, rows]
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, rows, Nk)
    if not causal:
        return torch.softmax(s, dim=-1) @ v
    mask = causal_mask(nq, k.shape[-2], q.device)
    mask = mask if rows is None else mask[rows]
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return p.masked_fill(~mask.any(-1, keepdim=True), 0.0) @ v  # rows that see no key: 0


def sdpa(q, k, v, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """torch's SDPA with our bottom-right causal alignment (an explicit mask when Nq != Nk);
    k and v may have fewer heads than q (grouped-query attention)."""
    import torch.nn.functional as F

    k, v = repeat_kv(q, k, v)
    if causal and q.shape[-2] == 1:  # one query, the last position: it sees every key
        causal = False
    if causal and q.shape[-2] != k.shape[-2]:
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def compare_to_sdpa(out, q, k, v, causal: bool = False, scale: float | None = None, max_scores: int = 1 << 24):
    """(ok, our max error, bound): out against a float64 reference.

    Allowed: twice SDPA's own error on the same inputs (float32, or bfloat16 for bfloat16
    inputs), plus float32's conditioning of the problem: a score q·k·scale carries a rounding error up to ε·scale·Σ|q_i k_i|, which the
    softmax turns into a relative error of the weights and so an error of that size times
    max|v| in the output (plus 4 ulps, in out's dtype, of the largest output). The second term matters where
    SDPA happens to round luckily on large scores; a real bug is orders of magnitude larger.

    When B·H·Nq·Nk exceeds max_scores, a spread of query rows (first and last included) is
    checked instead of all of them, so that a long sequence needs no N×N float64 matrix.
    """
    k, v = repeat_kv(q, k, v)
    B, H, nq, nk = q.shape[0], q.shape[1], q.shape[-2], k.shape[-2]
    rows = None
    if B * H * nq * nk > max_scores:
        rows = torch.linspace(0, nq - 1, steps=max(2, max_scores // max(1, B * H * nk))).round().long().unique()
    exact = attention_reference(q.double(), k.double(), v.double(), causal, scale, rows)
    ours = out if rows is None else out[:, :, rows]
    if rows is None:
        theirs = sdpa(q, k, v, causal, scale)
    else:
        mask = causal_mask(nq, nk, q.device)[rows] if causal else None
        theirs = torch.nn.functional.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask, scale=scale)
    if not out.numel():
        return True, 0.0, 0.0
    err = (ours.double() - exact).abs().max().item()
    torch_err = (theirs.double() - exact).abs().max().item()
    eps = torch.finfo(torch.float32).eps  # scores accumulate in float32 for bfloat16 inputs too
    out_eps = torch.finfo(out.dtype).eps  # the output is rounded to its own dtype
    qs = q.double() if rows is None else q.double()[:, :, rows]
    scale_ = 1.0 / math.sqrt(max(q.shape[-1], 1)) if scale is None else scale
    score_err = eps * abs(scale_) * (qs.abs() @ k.double().abs().transpose(-2, -1)).max().item() if nk else 0.0
    vmax = v.abs().max().item() if v.numel() else 0.0
    bound = 2 * torch_err + score_err * vmax + 4 * out_eps * max(1.0, exact.abs().max().item())
    return err <= bound, err, bound


def compare_gradients(grads, q, k, v, dout, causal: bool = False, scale: float | None = None):
    """[(name, ok, our max error, bound)] for grads = (dq, dk, dv) of Σ out·dout, each against
    the float64 reference under autograd.

    Allowed: four times PyTorch's own float32 error on the same inputs (this reference run in
    float32 under autograd; four, not the forward's two, as a backward chains more float32
    steps: D = rowsum(dO∘O), five matmuls), plus float32's conditioning of the scores times the
    largest gradient: a backward that recomputes P = exp(s − LSE) from a float32 LSE carries
    the LSE's rounding, ε·max|s|, as a relative error of every weight (as compare_to_sdpa's
    score term, and as in every FlashAttention backward), plus 16 ulps of the largest gradient.
    """
    def reference_grads(dtype):
        ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = attention_reference(*ins, causal, scale)
        return torch.autograd.grad(out, ins, dout.detach().to(dtype), allow_unused=True)

    exact, torch32 = reference_grads(torch.float64), reference_grads(torch.float32)
    eps = torch.finfo(torch.float32).eps
    scale_ = 1.0 / math.sqrt(max(q.shape[-1], 1)) if scale is None else scale
    nonempty = q.numel() and k.numel()
    kr = repeat_kv(q, k, k)[0]  # grouped kv heads: each query head's keys
    score_err = eps * abs(scale_) * (q.double().abs() @ kr.double().abs().transpose(-2, -1)).max().item() if nonempty else 0.0
    result = []
    for name, ours, ex, t32 in zip(("dq", "dk", "dv"), grads, exact, torch32):
        if ours.numel() == 0:
            result.append((name, True, 0.0, 0.0))
            continue
        err = (ours.double() - ex).abs().max().item()  # NaN (any NaN in ours) fails below
        bound = 4 * (t32.double() - ex).abs().max().item() + (score_err + 16 * eps) * max(1.0, ex.abs().max().item())
        result.append((name, err <= bound, err, bound))
    return result
