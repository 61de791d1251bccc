"""Property tests (hypothesis): random shapes, masks, scales, tiles and input layouts, every
variant against a float64 reference and against itself.

Examples are derandomized (the same ones on every run and machine) and no database is kept.
2400 examples in all, each running every variant in nanogpt.VARIANTS:
  test_matches_float64_reference 1000   error within compare_to_sdpa's bound (2x SDPA's + score conditioning)
  test_layouts_give_the_same_bits 500   strided, sliced, transposed, expanded inputs == contiguous
  test_query_rows_are_independent 500   a slice of the queries (a suffix if causal) == that slice
  test_heads_are_independent      400   one (b, h) alone == its slice of the batched call
Kernels allocate with at::empty: these tests fill fresh memory with NaN (torch's deterministic
mode), so an output element or scratch value that is read before written shows up as NaN.
They run on one thread (see one_thread); test_threads.py compares threads against one.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nanogpt  # nanogpt.VARIANTS: the dispatch table, read at collection
from conftest import nan_filled_empty
from nanogpt.reference import compare_to_sdpa

# (B, H, N, d) layouts with the values of a contiguous tensor; the padding around a slice is
# NaN, so a kernel that reads outside its rows or columns produces NaN.
LAYOUTS = (
    "contiguous",
    "nanogpt",  # (B, T, H, hs).transpose(1, 2): last dim contiguous, read in place
    "course_k",  # (B, H, d, N).transpose(-2, -1): last dim strided (the course's K), copied once
    "sliced",  # [:, :, ::2, 1:d+1] of a NaN-padded tensor: row stride 2·(d+3), offset 1
    "expand_batch",  # (1, H, N, d).expand(B, ...): zero batch stride
    "expand_head",  # (B, 1, N, d).expand(B, H, ...): zero head stride (shared K/V heads)
)


def values(shape, layout, g, magnitude=1.0):
    """A contiguous (B, H, N, d) tensor whose values the layout can hold (an expanded layout
    repeats one batch or head)."""
    B, H, N, d = shape
    if layout == "expand_batch":
        shape = (1, H, N, d)
    elif layout == "expand_head":
        shape = (B, 1, N, d)
    return (torch.randn(shape, generator=g) * magnitude).expand(B, H, N, d).contiguous()


def laid_out(x, layout):
    """The values of contiguous x in the given layout (a view; x is not modified)."""
    B, H, N, d = x.shape
    if layout == "contiguous":
        return x.clone()
    if layout == "nanogpt":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "course_k":
        return x.transpose(-2, -1).contiguous().transpose(-2, -1)
    if layout == "sliced":
        base = torch.full((B, H, 2 * N, d + 3), float("nan"))
        base[:, :, ::2, 1 : d + 1] = x
        return base[:, :, ::2, 1 : d + 1]
    if layout == "expand_batch":
        return x[:1].clone().expand(B, H, N, d)
    if layout == "expand_head":
        return x[:, :1].clone().expand(B, H, N, d)
    raise ValueError(layout)


@dataclasses.dataclass(frozen=True)
class Problem:
    B: int
    H: int
    Nq: int
    Nk: int
    d: int
    causal: bool
    scale: float | None
    br: int | None
    bc: int | None
    layouts: tuple[str, str, str]  # of q, k, v
    magnitude: float  # of q: 4 gives scores of ±10²-ish, where a softmax without a running max would fail
    seed: int

    def tensors(self):
        """(q, k, v) contiguous, and the same values in this problem's layouts."""
        g = torch.Generator().manual_seed(self.seed)
        shapes = [(self.B, self.H, n, self.d) for n in (self.Nq, self.Nk, self.Nk)]
        mags = (self.magnitude, 1.0, 1.0)
        plain = [values(s, lay, g, m) for s, lay, m in zip(shapes, self.layouts, mags)]
        return plain, [laid_out(x, lay) for x, lay in zip(plain, self.layouts)]

    def kwargs(self):
        return dict(causal=self.causal, scale=self.scale, br=self.br, bc=self.bc)


@st.composite
def problems(draw, max_n=80, max_d=70):
    nq = draw(st.integers(1, max_n))
    nk = draw(st.one_of(st.just(nq), st.integers(0, max_n)))  # about half the time Nq == Nk
    return Problem(
        B=draw(st.integers(1, 3)), H=draw(st.integers(1, 3)), Nq=nq, Nk=nk, d=draw(st.integers(1, max_d)),
        causal=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.01, 4.0))),
        br=draw(st.one_of(st.none(), st.integers(1, 100))),
        bc=draw(st.one_of(st.none(), st.integers(1, 100))),
        layouts=tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3)),
        magnitude=draw(st.sampled_from([1.0, 1.0, 4.0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def hyp(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread. On this shared 2-core machine, with another CPU-bound job running,
    every OpenMP region waits milliseconds for its second thread (naive on 3x3x80x70: ~200 ms
    instead of 0.4 ms). The multi-threaded paths are checked against one thread in test_threads.py."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def nan_filled():
    """torch.empty and the kernels' at::empty fill fresh memory with NaN for this module."""
    with nan_filled_empty():
        yield


def run(ext, variant, q, k, v, p: Problem, **override):
    kwargs = {**p.kwargs(), **override}
    snapshot = [t.clone() for t in (q, k, v)]
    out = ext.attention(q, k, v, variant=variant, **kwargs)
    assert out.shape == q.shape and out.dtype == torch.float32 and out.is_contiguous(), (variant, out.shape)
    for before, after in zip(snapshot, (q, k, v)):  # inputs are read, never written
        assert torch.equal(before, after), f"{variant} wrote into an input"
    return out


@hyp(1000)
@given(p=problems())
def test_matches_float64_reference(ext, p):
    (q, k, v), (qs, ks, vs) = p.tensors()
    for variant in ext.VARIANTS:
        out = run(ext, variant, qs, ks, vs, p)
        ok, err, bound = compare_to_sdpa(out, q, k, v, p.causal, p.scale)
        assert ok, f"{variant}: max error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("variant", nanogpt.VARIANTS)
def test_error_within_bound(ext, variant):
    """compare_to_sdpa's bound, on 500 fixed problems with large scores (where SDPA may round luckily)."""
    g = torch.Generator().manual_seed(149)
    missed = []
    for i in range(500):
        nq, nk, d = (int(x) for x in torch.randint(1, 17, (3,), generator=g))
        d, nk = 4 * d, max(nk, 2)
        scale = 2.0 + 2.0 * torch.rand((), generator=g).item()
        q, k, v = (torch.randn(1, 1, n, d, generator=g) for n in (nq, nk, nk))
        ok, err, bound = compare_to_sdpa(ext.attention(q, k, v, variant=variant, scale=scale), q, k, v, False, scale)
        if not ok:
            missed.append(f"(Nq={nq}, Nk={nk}, d={d}, scale={scale:.3f}): {err:.3g} > {bound:.3g}")
    assert not missed, f"{variant}: {len(missed)} of 500 problems miss the bound, e.g. " + "; ".join(missed[:3])


@hyp(500)
@given(p=problems())
def test_layouts_give_the_same_bits(ext, p):
    """In-place strided reads and the one copy of a strided last dim change no arithmetic."""
    (q, k, v), (qs, ks, vs) = p.tensors()
    for variant in ext.VARIANTS:
        expected = run(ext, variant, q, k, v, p)
        assert torch.equal(run(ext, variant, qs, ks, vs, p), expected), variant


@hyp(500)
@given(p=problems(), data=st.data())
def test_query_rows_are_independent(ext, p, data):
    """Rows [a, b) of the queries alone give rows [a, b) of the full output (where flash serves
    the two calls by different paths, decode and tiles, both within float32's bound of the exact
    rows). With causal=True
    only a suffix (b = Nq) keeps each row's keys, since the mask is aligned bottom-right:
    that is KV-cache decoding, where the last queries see every cached key."""
    (q, k, v), _ = p.tensors()
    a = data.draw(st.integers(0, p.Nq - 1), label="a")
    b = p.Nq if p.causal else data.draw(st.integers(a + 1, p.Nq), label="b")
    path = ext.extension().flash_path
    for variant in ext.VARIANTS:
        full = run(ext, variant, q, k, v, p)
        part = run(ext, variant, q[:, :, a:b], k, v, p)
        if variant == "flash" and path(b - a, p.br or 0, p.bc or 0) != path(p.Nq, p.br or 0, p.bc or 0):
            # decode path vs tile path: each within the float32 bound of the exact rows (README)
            ok, err, bound = compare_to_sdpa(part, q[:, :, a:b], k, v, p.causal, p.scale)
            assert ok and (part - full[:, :, a:b]).abs().max().item() <= 2 * bound, variant
            continue
        torch.testing.assert_close(part, full[:, :, a:b], rtol=2e-6, atol=2e-6, msg=lambda m: f"{variant}: {m}")


@hyp(400)
@given(p=problems(max_n=48, max_d=40))
def test_heads_are_independent(ext, p):
    """Each (b, h) is its own problem: alone, it gives bitwise its slice of the batched call,
    and a repeated call gives the same bits."""
    (q, k, v), (qs, ks, vs) = p.tensors()
    for variant in ext.VARIANTS:
        out = run(ext, variant, qs, ks, vs, p)
        assert torch.equal(run(ext, variant, qs, ks, vs, p), out), f"{variant}: a repeated call differs"
        for b in range(p.B):
            for h in range(p.H):
                s = (slice(b, b + 1), slice(h, h + 1))
                alone = run(ext, variant, qs[s], ks[s], vs[s], p)
                assert torch.equal(alone, out[s]), f"{variant}: head (b={b}, h={h}) alone differs"
