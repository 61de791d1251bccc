"""bfloat16: q, k, v in bfloat16 give a bfloat16 output, checked against SDPA in bfloat16 and
the float64 reference (nanogpt.reference.compare_to_sdpa: at most twice SDPA-bfloat16's error).

flash reads bfloat16 itself: its tile path runs both matmuls on AMX where the CPU has it
(`bf16_amx`), else on vdpbf16ps where the CPU has AVX-512 BF16 and it outruns the FMA (`bf16_dot`),
else on float32 copies, as the other variants do; its decode path widens V as it reads it, and
takes its scores on vdpbf16ps where the tiles do, else widens K too. The `dot` fixture runs each
flash test on every path the CPU has.
"""
import pytest
import torch

import nanogpt
from conftest import SHAPES, nan_filled_empty, qkv
from nanogpt.reference import compare_to_sdpa, compare_gradients

VARIANTS = nanogpt.VARIANTS


PATHS = {"amx": "bf16_amx_cpu", "bf16_dot": "avx512_bf16", "float32_copies": None}  # path: the CPU it needs


@pytest.fixture(params=list(PATHS))
def dot(request, ext):
    """flash's bfloat16 tiles on AMX, on vdpbf16ps, then on float32 copies: each path this CPU
    can run, whichever it would choose by itself."""
    needs = PATHS[request.param]
    if needs and not ext.build_info()[needs]:
        pytest.skip(f"this CPU lacks {needs}: the tiles take another path")
    ext.extension().set_bf16_amx(request.param == "amx")
    ext.extension().set_bf16_dot(request.param == "bf16_dot")
    yield request.param
    ext.extension().set_bf16_amx(True)
    ext.extension().set_bf16_dot(None)


def bf16(*tensors):
    return [t.to(torch.bfloat16) for t in tensors]


def check(nanogpt, q, k, v, variant, causal=False, scale=None, **kw):
    with nan_filled_empty():  # an output element never written shows up as NaN
        out = nanogpt.attention(q, k, v, variant=variant, causal=causal, scale=scale, **kw)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.is_contiguous()
    ok, err, bound = compare_to_sdpa(out, q, k, v, causal, scale)
    assert ok, f"{variant}: max error {err:.3g} > bound {bound:.3g} (twice SDPA-bfloat16's error)"
    # tighter: the float32 kernel on the same (bfloat16) values, up to the rounding of P and of
    # the output to bfloat16 (each 2^-8 relative at most): 2^-7 of the largest value
    f32 = nanogpt.attention(q.float(), k.float(), v.float(), variant=variant, causal=causal, scale=scale, **kw)
    err32 = (out.float() - f32).abs().max().item() if out.numel() else 0.0
    assert err32 <= 2 ** -7 * max(v.float().abs().max().item() if v.numel() else 0.0, 1e-30), \
        f"{variant}: {err32:.3g} from the float32 kernel on the same values"
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flash_matches_sdpa_bf16(ext, dot, causal, shape):
    check(ext, *bf16(*qkv(*shape)), "flash", causal)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "flash"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 7, 5), (1, 2, 65, 7, 8), (1, 2, 63, 63, 32)], ids=str)
def test_other_variants_upcast(ext, variant, shape):
    check(ext, *bf16(*qkv(*shape)), variant, causal=True)


@pytest.mark.parametrize("d", [1, 2, 3, 16, 31, 48, 80, 128])
def test_flash_head_dims(ext, dot, d):
    check(ext, *bf16(*qkv(2, 2, 37, 41, d, seed=d)), "flash", causal=bool(d % 2))


@pytest.mark.parametrize("scale", [0.05, 3.0, 0.0, -0.7])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_scales(ext, dot, scale, causal):
    """A positive scale is folded into the exponent (max(scale·s) = scale·max(s)); zero and
    negative ones take the scores multiplied first."""
    check(ext, *bf16(*qkv(1, 2, 70, 90, 24, seed=7)), "flash", causal, scale=scale)


@pytest.mark.parametrize("br,bc", [(1, 1), (3, 17), (16, 16), (5, 96), (96, 48), (1000, 2000)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_tiles(ext, dot, br, bc, causal):
    check(ext, *bf16(*qkv(1, 2, 130, 130, 32, seed=br + bc)), "flash", causal, br=br, bc=bc)
    check(ext, *bf16(*qkv(1, 1, 9, 200, 20, seed=br * bc)), "flash", causal, br=br, bc=bc)


@pytest.mark.parametrize("nq", [1, 3, 8])
@pytest.mark.parametrize("nk", [1, 511, 1500])
def test_decode_path(ext, dot, nq, nk):
    """A KV-cache step in bfloat16 (several key spans merged at 1500); its scores on vdpbf16ps
    where the tiles use it (`bf16_dot`), else on the FMA."""
    check(ext, *bf16(*qkv(2, 3, nq, nk, 64, seed=nk)), "flash", causal=True)


@pytest.mark.parametrize("d", [1, 7, 20, 32, 33, 48, 56, 64, 80, 96, 100, 120, 128, 160])
@pytest.mark.parametrize("nq", [1, 3])
def test_decode_path_head_dims(ext, dot, nq, d):
    """Every way the decode path reads a bfloat16 row: whole vectors in pairs (even and odd
    features, put back in order), a last odd vector, a partial last vector (a masked load), both
    (d = 56 on AVX-512), and d > 128 in more than one slice of P·V; on vdpbf16ps, rows of 1 to 4
    vectors of 32 features, the last one whole or partial, and d > 128 on the FMA."""
    check(ext, *bf16(*qkv(1, 2, nq, 600, d, seed=d)), "flash", causal=True)


@pytest.mark.parametrize("nq", [1, 3])
def test_decode_path_strided_and_grouped(ext, dot, nq):
    """A KV-cache step reading bfloat16 rows in place: K and V rows spaced wider than d (fused
    k|v rows), a transposed q, and 6 query heads on 2 kv heads."""
    g = torch.Generator().manual_seed(nq)
    q = torch.randn(2, 6, 41, nq, generator=g).transpose(2, 3)[..., :37].to(torch.bfloat16)
    kv = torch.randn(2, 2, 900, 2 * 37 + 3, generator=g).to(torch.bfloat16)
    check(ext, q, kv[..., :37], kv[..., 37 + 3:], "flash", causal=True, enable_gqa=True)


def test_strided_and_grouped(ext, dot):
    """nanoGPT's transposed layout read in place, a zero batch stride, grouped kv heads."""
    B, T, H, hs = 2, 45, 4, 16
    x = torch.randn(B, T, 3 * H * hs).to(torch.bfloat16)
    q, k, v = (t.view(B, T, H, hs).transpose(1, 2) for t in x.split(H * hs, dim=2))
    check(ext, q, k, v, "flash", causal=True)
    q, k, v = bf16(*qkv(2, 4, 40, 40, 24))
    check(ext, q, k[:1, :2].expand(2, -1, -1, -1), v[:, :2], "flash", causal=True, enable_gqa=True)
    check(ext, q[:, :, :3], k[:, :1], v[:, :1], "flash", causal=True, enable_gqa=True)  # decode path


def test_large_scores_stay_finite(ext, dot):
    """Scores of a few thousand: the running max keeps every exp2 in range."""
    q, k, v = qkv(1, 2, 100, 100, 32, seed=3)
    q = q * 60
    out = check(ext, *bf16(q, k, v), "flash", causal=True)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("nk", [64, 70])  # 64: one whole (unmasked) step; 70: a masked one follows
def test_row_of_minus_inf_scores(ext, dot, nk):
    """A query whose every score is -inf gets a zero row, as in float32 and SDPA: its weights are
    exactly 0 even in a step with no masked lane (where the exponential may round tiny ones up)."""
    q, k, v = qkv(1, 2, 20, nk, 8, seed=4)  # 20 queries: the tiles, not the decode path
    k[..., 0] = -k[..., 0].abs() - 1
    q[0, 1, 5] = 0
    q[0, 1, 5, 0] = float("inf")  # inf · (k's negative feature 0) = -inf for every key
    q, k, v = bf16(q, k, v)
    out = ext.attention(q, k, v)
    assert (out[0, 1, 5] == 0).all()
    others = torch.ones(2, 20, dtype=torch.bool)
    others[1, 5] = False  # as the float32 kernel on the same values (check's bound)
    f32 = ext.attention(q.float(), k.float(), v.float())
    assert (out[0][others].float() - f32[0][others]).abs().max() <= 2 ** -7 * v.float().abs().max()


def test_dtypes_must_match(ext):
    q, k, v = qkv(1, 1, 4, 4, 8)
    with pytest.raises(TypeError, match="k and v must have q's dtype"):
        ext.attention(q.bfloat16(), k, v.bfloat16())
    with pytest.raises(TypeError, match="q must be float32 or bfloat16"):
        ext.attention(q.half(), k.half(), v.half())


@pytest.mark.parametrize("causal", [False, True])
def test_lse_over_many_steps(ext, dot, causal):
    """The log-sum-exp the backward reads, after 64 key steps: each step rescales the running sum
    by 2^(m_old - m_new), so an exponential that missed 2^0 = 1 would drift it step by step
    (7e-5 a step did: 4.6e-3 here)."""
    q, k, v = bf16(*qkv(1, 2, 16, 4096, 32, seed=11))
    lse = torch.ops.nanogpt.attention_lse(q, k, v, "flash", causal, None, 0, 0, False)[1]
    s = q.double() @ k.double().transpose(-1, -2) / 32 ** 0.5
    if causal:  # bottom-right: query i sees keys j <= i + Nk - Nq
        s = s.masked_fill(torch.ones(16, 4096, dtype=torch.bool).triu(4096 - 16 + 1), float("-inf"))
    err = (lse.double() - torch.logsumexp(s, -1)).abs().max().item()
    assert err <= 1e-3, f"log-sum-exp off by {err:.3g}"


@pytest.mark.parametrize("variant", ["naive", "flash"])
@pytest.mark.parametrize("nq,nk", [(33, 33), (3, 40)])  # (3, 40): flash's forward on the decode path
def test_training_in_bf16(ext, variant, nq, nk):
    """Gradients of bfloat16 inputs are bfloat16, and close to the float64 ones (the backward
    runs on float32 copies: its error is the inputs' and outputs' bfloat16 rounding)."""
    q, k, v = bf16(*qkv(2, 2, nq, nk, 16, seed=5))
    dout = torch.randn(q.shape).bfloat16()
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ext.attention(*ins, variant=variant, causal=True)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, ins, dout)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    exact = compare_gradients([g.float() for g in grads], q.float(), k.float(), v.float(), dout.float(), causal=True)
    for name, _, err, _ in exact:
        ref = {"dq": grads[0], "dk": grads[1], "dv": grads[2]}[name].float().abs().max().item()
        assert err <= 0.02 * max(ref, 1.0), f"{name}: error {err:.3g} against float64 (largest {ref:.3g})"
