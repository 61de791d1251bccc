"""Every variant against SDPA and a float64 reference, over awkward shapes.

Empty problems are in test_errors.py, thread counts in test_threads.py.
Tolerance is tied to float32 error (nanogpt.reference.compare_to_sdpa): a variant's error
against the float64 reference may be at most twice SDPA's own error on the same inputs, plus
float32's conditioning of the scores and a few ulps of the output.
"""
import itertools

import pytest
import torch

import nanogpt
from conftest import SHAPES, qkv
from nanogpt.reference import compare_to_sdpa

VARIANTS = nanogpt.VARIANTS  # the dispatch table, read at collection (builds or loads the extension)


def check(nanogpt, q, k, v, variant, causal=False, scale=None, **tiles):
    out = nanogpt.attention(q, k, v, variant=variant, causal=causal, scale=scale, **tiles)
    assert out.shape == q.shape and out.dtype == torch.float32 and out.is_contiguous()
    ok, err, bound = compare_to_sdpa(out, q, k, v, causal, scale)
    assert ok, f"{variant}: max error {err:.3g} > bound {bound:.3g} (twice SDPA's float32 error)"
    return out


def test_variants_come_from_the_dispatch_table(ext):
    assert [name for name, _ in ext.extension().variants()] == list(ext.VARIANTS)
    assert ext.VARIANTS[:4] == ("naive", "blocked", "fused", "flash")  # the course's ladder: part1..part4


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_sdpa_and_float64(ext, variant, causal, shape):
    check(ext, *qkv(*shape), variant, causal)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("d", [1, 3, 16, 31, 48, 80, 128])
def test_head_dims(ext, variant, d):
    check(ext, *qkv(2, 2, 37, 41, d, seed=d), variant, causal=bool(d % 2))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_custom_scale(ext, variant, scale):
    check(ext, *qkv(1, 2, 50, 50, 24), variant, causal=True, scale=scale)


@pytest.mark.parametrize("br,bc", list(itertools.product([1, 3, 16, 96, 256], [1, 3, 16, 96, 256])) + [(1000, 2000)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_tiles(ext, br, bc, causal):
    check(ext, *qkv(1, 2, 130, 130, 32, seed=br * 1000 + bc), "flash", causal, br=br, bc=bc)
    check(ext, *qkv(1, 1, 9, 200, 20, seed=br + bc), "flash", causal, br=br, bc=bc)


@pytest.mark.parametrize("br,bc", [(16, 16), (80, 40), (128, 96)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [8, 32, 64])
def test_flash_scores_that_rise_along_the_keys(ext, br, bc, causal, d):
    """Scores that step up by 10 (log2 units) every 7 keys up to key 147, then stay flat, for
    even queries, and down for odd ones: a tile taken against the running max of the keys
    before it (the ispc tile's lazy path) must raise that max mid-tile for some lanes and
    rescale what it has already taken; a wrong rescale weights a step's keys wrongly, and the
    flat keys after it (causal or not) keep that weight visible."""
    q, k, v = qkv(1, 2, 70, 300, d, seed=d)
    q[..., 0] = torch.tensor([1.0, -1.0]).repeat(35)
    k[..., 0] = (torch.arange(300) // 7).clamp(max=21) * 10.0 * d**0.5 / 1.4426950408889634  # log2 units
    check(ext, q, k, v, "flash", causal, br=br, bc=bc)


@pytest.mark.parametrize("tile", [1, 5, 8, 300])
def test_blocked_tiles(ext, tile):
    check(ext, *qkv(1, 2, 70, 70, 12), "blocked", True, br=tile, bc=tile + 2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_nanogpt_layout_is_read_in_place(ext, variant):
    """(B, T, H, hs).transpose(1, 2): strided, last dim contiguous, as nanoGPT passes it."""
    B, T, H, hs = 2, 45, 3, 16
    qkv_ = torch.randn(B, T, 3 * H * hs)
    q, k, v = (t.view(B, T, H, hs).transpose(1, 2) for t in qkv_.split(H * hs, dim=2))
    assert not q.is_contiguous() and q.stride(-1) == 1
    check(ext, q, k, v, variant, causal=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_other_strides(ext, variant):
    q, k, v = qkv(2, 2, 33, 33, 16)
    k_t = k.transpose(-2, -1).contiguous().transpose(-2, -1)  # the course's K: last dim strided
    v_exp = v[:1].expand(2, -1, -1, -1)  # a zero batch stride
    q_sl = torch.randn(2, 2, 66, 20)[:, :, ::2, 2:18]  # row stride 40, sliced columns
    check(ext, q_sl, k_t, v_exp, variant, causal=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_overflow_on_large_scores(ext, variant):
    """Scores of ±1e4: a softmax that skipped the running max would overflow to inf/NaN."""
    q, k, v = qkv(1, 2, 300, 300, 8)
    out = check(ext, q * 100, k * 100, v, variant, causal=True)
    assert torch.isfinite(out).all()


def test_opcheck(ext):
    q, k, v = qkv(1, 2, 20, 24, 8)
    for variant in VARIANTS:
        torch.library.opcheck(torch.ops.nanogpt.attention.default, (q, k, v, variant, True, None, 0, 0))


GQA_SHAPES = [  # (B, H, Hk, Nq, Nk, d)
    (1, 4, 1, 33, 33, 16), (2, 6, 2, 17, 40, 8), (1, 6, 3, 1, 77, 32), (1, 8, 8, 20, 20, 5), (2, 4, 2, 9, 3, 64),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", GQA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_grouped_query_attention(ext, variant, causal, shape):
    """k, v with Hk heads: query head h reads kv head h // (H // Hk), as SDPA's enable_gqa."""
    B, H, Hk, Nq, Nk, d = shape
    g = torch.Generator().manual_seed(Nq * Nk)
    q = torch.randn(B, H, Nq, d, generator=g)
    cache = torch.randn(2, B, Hk, Nk + 5, d, generator=g)  # k, v as views into a longer cache
    k, v = cache[0, :, :, :Nk], cache[1, :, :, :Nk]
    out = ext.attention(q, k, v, variant=variant, causal=causal, enable_gqa=True)
    assert compare_to_sdpa(out, q, k, v, causal)[0]
    if not causal or Nq == Nk:  # SDPA's own flag (its causal mask is top-left aligned)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_grouped_query_attention_errors(ext):
    q, k, v = torch.randn(1, 6, 5, 8), torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match=r"^k must have shape \(B, Hk, Nk, d\) with Hk dividing H"):
        ext.attention(q, k, v, enable_gqa=True)
    with pytest.raises(ValueError, match=r"^k must have shape .*pass enable_gqa=True"):
        ext.attention(q, k[:, :3], v[:, :3])
    with pytest.raises(TypeError, match="enable_gqa must be a bool"):
        ext.attention(q, k[:, :3], v[:, :3], enable_gqa=1)
    torch.library.opcheck(torch.ops.nanogpt.attention.default, (q, k[:, :3], v[:, :3], "flash", True, None, 0, 0, True))
