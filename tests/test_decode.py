"""flash's decode path (a few queries against many cached keys): which shapes take it, its
results against SDPA and the float64 reference, and the independence of a query's result from
the call it is part of (other queries, heads, threads)."""
import pytest
import torch

from nanogpt.reference import compare_to_sdpa, sdpa


def test_the_path_is_a_dispatch_decision(ext):
    path = ext.extension().flash_path
    assert [path(nq, 0, 0) for nq in (1, 4, 8)] == ["decode"] * 3
    assert path(9, 0, 0) == "tiles"
    assert path(1, 16, 0) == path(1, 0, 16) == "tiles"  # asked-for tiles are honoured
    for args, name in [((-1, 0, 0), "Nq"), ((1, -16, 0), "br must"), ((1, 0, -1), "bc must")]:
        with pytest.raises(ValueError, match=name):
            path(*args)


def cache_views(B, Hk, Nk, d, g, spare=7):
    """k, v as views into a longer preallocated cache: row stride d, head stride (Nk + spare)·d."""
    cache = torch.randn(2, B, Hk, Nk + spare, d, generator=g)
    return cache[0, :, :, :Nk], cache[1, :, :, :Nk]


@pytest.mark.parametrize("nq", [1, 2, 3, 8])
@pytest.mark.parametrize("nk", [1, 17, 511, 512, 513, 1500])
@pytest.mark.parametrize("d", [1, 7, 32, 33, 80, 100, 128])  # 80-128 on AVX-512: q in registers, 5-8 vectors
def test_decode_matches_sdpa_and_float64(ext, nq, nk, d):
    g = torch.Generator().manual_seed(nq * 10000 + nk * 10 + d)
    q = torch.randn(2, 3, nq, d, generator=g)
    k, v = cache_views(2, 3, nk, d, g)
    for causal in (False, True):
        out = ext.attention(q, k, v, causal=causal)
        ok, err, bound = compare_to_sdpa(out, q, k, v, causal)
        assert ok, f"causal={causal}: max error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("nq", [2, 5])
def test_decode_reads_rows_with_any_stride(ext, nq):
    """K and V rows spaced wider than d (a cache of fused k|v rows, say), and a transposed q."""
    g = torch.Generator().manual_seed(nq)
    q = torch.randn(1, 2, 35, nq, generator=g).transpose(2, 3)[..., :33]
    kv = torch.randn(1, 2, 700, 2 * 33 + 5, generator=g)
    k, v = kv[..., :33], kv[..., 33 + 5:]
    for causal in (False, True):
        ok, err, bound = compare_to_sdpa(ext.attention(q, k, v, causal=causal), q, k, v, causal)
        assert ok, f"causal={causal}: max error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("H,Hk", [(4, 1), (6, 2), (8, 8)])
def test_decode_grouped_query_attention(ext, H, Hk):
    g = torch.Generator().manual_seed(H * Hk)
    q = torch.randn(2, H, 1, 64, generator=g)
    k, v = cache_views(2, Hk, 1100, 64, g)
    out = ext.attention(q, k, v, causal=True, enable_gqa=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [16, 48, 100])  # P·V groups of 8 and of 2 queries on AVX-512; 100: no score groups
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_does_not_depend_on_its_call(ext, d, dtype):
    """Bitwise: a query among 3 or among 8 (score groups of 4 and 2 queries, padded), one head
    alone or among many, and one thread or all give the same output (key spans are fixed, not
    chosen per call). One or two float32 queries take the one-query dot products (on AVX2 one
    only), which sum in another order: the same within float32 rounding; a bfloat16 cache takes
    them in any company, as float32 heads of d > 64 do on AVX-512."""
    wide = ext.build_info()["cxx_simd"] == "avx512"

    def own_order(n):  # n float32 queries take the one-query dot products (csrc/decode.cpp)
        return n == 1 or (wide and (n == 2 or d > 64))

    g = torch.Generator().manual_seed(5 + d)
    q = torch.randn(2, 3, 8, d, generator=g).to(dtype)
    k, v = (x.to(dtype) for x in cache_views(2, 3, 2100, d, g))
    full = ext.attention(q, k, v, causal=True)
    for i in range(8):  # causal: a suffix of the queries keeps each one's keys
        other_order = dtype == torch.float32 and own_order(8 - i) != own_order(8)
        tol = dict(rtol=2e-6, atol=2e-6) if other_order else dict(rtol=0, atol=0)
        torch.testing.assert_close(ext.attention(q[:, :, i:], k, v, causal=True), full[:, :, i:], **tol)
    torch.testing.assert_close(ext.attention(q[1:, 2:], k[1:, 2:], v[1:, 2:], causal=True), full[1:, 2:], rtol=0, atol=0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.attention(q, k, v, causal=True)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(one, full, rtol=0, atol=0)


def test_decode_and_tiles_agree(ext):
    """The same rows through the decode path (8 queries) and the tile path (20 queries)."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 20, 32, generator=g)
    k, v = cache_views(1, 2, 900, 32, g)
    tiles = ext.attention(q, k, v, causal=True)
    decode = ext.attention(q[:, :, 12:], k, v, causal=True)
    torch.testing.assert_close(decode, tiles[:, :, 12:], rtol=2e-6, atol=2e-6)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("spoil", ["q nan", "k nan", "k inf", "v nan", "v inf", "q row -inf"])
@pytest.mark.parametrize("nk", [40, 1030])
def test_decode_non_finite_like_sdpa(ext, spoil, nk):
    g = torch.Generator().manual_seed(nk)
    q, k, v = torch.randn(1, 2, 3, 16, generator=g), torch.randn(1, 2, nk, 16, generator=g), torch.randn(1, 2, nk, 16, generator=g)
    {"q nan": lambda: q[0, 1, 2].__setitem__(0, NAN), "k nan": lambda: k[0, 0, nk - 3].__setitem__(1, NAN),
     "k inf": lambda: k[0, 1, 600 % nk].__setitem__(2, INF), "v nan": lambda: v[0, 0, 5].__setitem__(3, NAN),
     "v inf": lambda: v[0, 1, nk - 1].__setitem__(0, INF), "q row -inf": lambda: q[0, 0, 1].fill_(-INF)}[spoil]()
    expected = sdpa(q, k, v)
    out = ext.attention(q, k, v)
    assert torch.equal(out.isnan(), expected.isnan()) and torch.equal(out.isinf(), expected.isinf())
    finite = expected.isfinite()
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-5, atol=1e-6)


def test_decode_empty_and_keyless(ext):
    q = torch.randn(1, 2, 3, 8)
    assert torch.equal(ext.attention(q, torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)), torch.zeros(1, 2, 3, 8))
    out = ext.attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), causal=True)
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 8)) and out[0, 0, 2:].abs().sum() > 0  # rows that see no key
