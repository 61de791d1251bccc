"""The backward passes (flash's own; naive's, which blocked and fused train with): gradients
against the float64 reference under autograd (nanogpt.reference.compare_gradients: 4x PyTorch's
own float32 error), over the forward tests' awkward shapes, tiles, scales and layouts, random
problems (hypothesis), gradcheck, opcheck, a compiled training step, fully masked rows.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import nanogpt  # nanogpt.VARIANTS: the dispatch table, read at collection
from conftest import SHAPES
from nanogpt.reference import compare_gradients

VARIANTS = nanogpt.VARIANTS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread (as test_properties.py, for the same reason: on this shared machine
    every OpenMP region can wait milliseconds for a busy second thread); test_threads below
    runs the backward's two threading modes on 1 and 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def qkv(B, H, Nq, Nk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g) for n in (Nq, Nk, Nk)]


def grads(ext, q, k, v, dout, **kw):
    """(dq, dk, dv) of Σ attention(q, k, v)·dout through nanogpt.attention's autograd."""
    ins = [t.detach().requires_grad_() for t in (q, k, v)]
    out = ext.attention(*ins, **kw)
    return torch.autograd.grad(out, ins, dout)


def check(ext, q, k, v, variant, causal=False, scale=None, dout=None, **tiles):
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)) if dout is None else dout
    g = grads(ext, q, k, v, dout, variant=variant, causal=causal, scale=scale, **tiles)
    for t, ref in zip(g, (q, k, v)):
        assert t.shape == ref.shape and t.dtype == torch.float32
    for name, ok, err, bound in compare_gradients(g, q, k, v, dout, causal, scale):
        assert ok, f"{variant} {name}: max error {err:.3g} > bound {bound:.3g} (4x torch's float32 error)"
    return g


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gradients_match_float64(ext, variant, causal, shape):
    check(ext, *qkv(*shape), variant, causal)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("d", [1, 3, 16, 31, 48, 80, 128])
def test_head_dims(ext, variant, d):
    check(ext, *qkv(2, 2, 37, 41, d, seed=d), variant, causal=bool(d % 2))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_custom_scale(ext, variant, scale):
    check(ext, *qkv(1, 2, 50, 50, 24), variant, causal=True, scale=scale)


@pytest.mark.parametrize("nq", [1, 3, 8])
def test_few_queries_train_on_the_tiles(ext, nq):
    """A few queries, the decode path's shapes: the forward that keeps the LSE takes the tiles (the
    same LSE as tiles asked for), whose sums the backward recomputes P = exp(s − LSE) with. The
    decode path sums in another order: 120 problems with large scores (a /tmp script), gradients
    from its LSE were 2.2× further from float64 at the median, and worse in 92 of them."""
    g = torch.Generator().manual_seed(nq)
    q, k, v = (torch.randn(*s, generator=g) for s in ((1, 2, nq, 160), (1, 1, 200, 160), (1, 1, 200, 160)))
    lse = torch.ops.nanogpt.attention_lse(q, k, v, "flash", True, 1.0, 0, 0, True)[1]
    tiles = torch.ops.nanogpt.attention_lse(q, k, v, "flash", True, 1.0, 16, 0, True)[1]
    assert ext.extension().flash_path(nq, 0, 0) == "decode"  # what inference takes
    assert torch.equal(lse, tiles)


@pytest.mark.parametrize("br,bc", [(1, 1), (3, 5), (16, 16), (17, 200), (48, 37), (96, 256), (1000, 2000)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_tiles(ext, br, bc, causal):
    """Tiles that divide nothing (the backward rounds Br up to a multiple of 16)."""
    check(ext, *qkv(1, 2, 130, 130, 32, seed=br + bc), "flash", causal, br=br, bc=bc)
    check(ext, *qkv(1, 1, 9, 200, 20, seed=br * bc), "flash", causal, br=br, bc=bc)
    check(ext, *qkv(1, 1, 200, 9, 20, seed=br * bc), "flash", causal, br=br, bc=bc)


@pytest.mark.parametrize("variant", VARIANTS)
def test_nanogpt_layout_and_strided_grad(ext, variant):
    """(B, T, H, hs).transpose(1, 2) inputs read in place; a transposed grad_out."""
    B, T, H, hs = 2, 45, 3, 16
    qkv_ = torch.randn(B, T, 3 * H * hs)
    q, k, v = (t.view(B, T, H, hs).transpose(1, 2) for t in qkv_.split(H * hs, dim=2))
    dout = torch.randn(B, T, H, hs).transpose(1, 2)
    assert not q.is_contiguous() and q.stride(-1) == 1 and not dout.is_contiguous()
    check(ext, q, k, v, variant, causal=True, dout=dout)


@pytest.mark.parametrize("variant", VARIANTS)
def test_other_strides(ext, variant):
    q, k, v = qkv(2, 2, 33, 33, 16)
    k_t = k.transpose(-2, -1).contiguous().transpose(-2, -1)  # last dim strided: copied once
    v_exp = v[:1].expand(2, -1, -1, -1)  # a zero batch stride
    q_sl = torch.randn(2, 2, 66, 20)[:, :, ::2, 2:18]  # row stride 40, sliced columns
    dout = torch.randn(2, 2, 33, 1).expand(-1, -1, -1, 16)  # a zero last-dim stride
    check(ext, q_sl, k_t, v_exp, variant, causal=True, dout=dout)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fully_masked_rows_get_zero_gradients(ext, variant):
    """Causal with Nq > Nk: queries 0 .. Nq-Nk-1 see no key; their output is a constant 0,
    so their dq is exactly 0 (not NaN), and they add nothing to dk, dv."""
    q, k, v = qkv(2, 2, 40, 9, 16)
    dq, dk, dv = check(ext, q, k, v, variant, causal=True)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert torch.equal(dq[:, :, :31], torch.zeros_like(dq[:, :, :31]))
    # The seeing rows alone give the same dk and dv.
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    _, dk2, dv2 = grads(ext, q[:, :, 31:], k, v, dout[:, :, 31:], variant=variant, causal=True)
    torch.testing.assert_close(dk2, dk, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dv2, dv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_large_scores(ext, variant):
    """Scores of ±1e3: the backward's P must come from the same safe softmax."""
    q, k, v = qkv(1, 2, 100, 100, 8)
    dq, dk, dv = check(ext, q * 30, k * 30, v, variant, causal=True)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_empty(ext, variant):
    for shape in [(1, 2, 0, 5, 8), (1, 2, 4, 0, 8), (1, 2, 4, 5, 0)]:
        q, k, v = qkv(*shape)
        dq, dk, dv = grads(ext, q, k, v, torch.ones(q.shape), variant=variant)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert not dq.any() and not dk.any() and not dv.any()


# ---------------------------------------------------------------------------------------
# Threads: whole heads per thread, or one head's key blocks split across threads


@pytest.mark.parametrize("B,H,N", [(1, 1, 700), (1, 3, 700), (2, 2, 700), (2, 2, 704)])
def test_threads(ext, B, H, N):
    q, k, v = qkv(B, H, N, N, 32, seed=B * H)
    try:
        # on 2 threads: B·H = 1 and 3 split each head's key blocks, 4 does not; N = 704 (a
        # multiple of 16, unsplit heads) accumulates dQ in the output itself, 700 in buffers
        for n in (1, 2):
            torch.set_num_threads(n)
            check(ext, q, k, v, "flash", causal=True)
    finally:
        torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------
# Random problems


@st.composite
def problems(draw, max_n=70, max_d=40):
    nq = draw(st.integers(1, max_n))
    return dict(
        shape=(draw(st.integers(1, 2)), draw(st.integers(1, 3)), nq,
               draw(st.one_of(st.just(nq), st.integers(1, max_n))), draw(st.integers(1, max_d))),
        causal=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.01, 3.0))),
        br=draw(st.one_of(st.none(), st.integers(1, 80))),
        bc=draw(st.one_of(st.none(), st.integers(1, 80))),
        transposed=draw(st.booleans()),  # nanoGPT's layout for q, k, v and grad_out
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@pytest.fixture
def nan_filled_empty():
    """at::empty fills fresh memory with NaN: scratch read before it is written shows up."""
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.utils.deterministic.fill_uninitialized_memory = before[1]


@settings(max_examples=150, deadline=None, derandomize=True, database=None, print_blob=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_random_problems(ext, nan_filled_empty, p):
    q, k, v = qkv(*p["shape"], seed=p["seed"])
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(p["seed"] + 1))
    if p["transposed"]:
        q, k, v, dout = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, dout))
    for variant in VARIANTS:
        tiles = dict(br=p["br"], bc=p["bc"]) if variant in ("flash", "blocked") else {}
        check(ext, q, k, v, variant, p["causal"], p["scale"], dout=dout, **tiles)


# ---------------------------------------------------------------------------------------
# The ops: registration, gradcheck, opcheck, torch.compile, inference paying nothing


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradcheck(ext, variant):
    """Finite differences in float32 (the kernels' only dtype), hence the loose tolerances."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 5, 6, 3, seed=3))
    fn = lambda q, k, v: ext.attention(q, k, v, variant=variant, causal=True, scale=0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-2, atol=2e-3, rtol=2e-2, fast_mode=False)


def test_lse(ext):
    """attention_lse's second output: log Σ_j exp(scale·q·k_j) over visible keys (-inf for a
    row that sees none) for flash; an empty (B, H, 0) for variants whose backward needs none."""
    q, k, v = qkv(2, 2, 12, 9, 8)
    for variant, by, keeps in ext.extension().training():
        out, lse = torch.ops.nanogpt.attention_lse(q, k, v, variant, True, 0.5, 0, 0)
        torch.testing.assert_close(out, ext.attention(q, k, v, variant=variant, causal=True, scale=0.5))
        if not keeps:
            assert lse.shape == (2, 2, 0)
            continue
        s = (q.double() @ k.double().transpose(-2, -1)) * 0.5
        s = s.masked_fill(~nanogpt.causal_mask(12, 9), float("-inf"))
        torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-6)
        assert (lse[:, :, :3] == float("-inf")).all()


def test_training_table(ext):
    assert {name: by for name, by, _ in ext.extension().training()} == {
        "naive": "naive", "blocked": "naive", "fused": "naive", "flash": "flash"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck(ext, variant):
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 20, 24, 8))
    for op, args in [(torch.ops.nanogpt.attention_lse.default, (q, k, v, variant, True, None, 0, 0)),
                     (torch.ops.nanogpt.attention.default, (q, k, v, variant, False, 0.3, 5, 7))]:
        torch.library.opcheck(op, args)
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.nanogpt.attention_lse(q, k, v, variant, True, None, 0, 0)
    torch.library.opcheck(torch.ops.nanogpt.attention_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, variant, True, None, 0, 0))
    # grouped kv heads: 4 query heads on 2 kv heads, read in place forward and backward
    q, k, v = qkv(1, 4, 20, 24, 8)
    k, v = (t[:, :2].clone().requires_grad_() for t in (k, v))
    torch.library.opcheck(torch.ops.nanogpt.attention_lse.default, (q.requires_grad_(), k, v, variant, True, None, 0, 0, True))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.nanogpt.attention_lse(q, k, v, variant, True, None, 0, 0, True)
    torch.library.opcheck(torch.ops.nanogpt.attention_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, variant, True, None, 0, 0, True))


class Ops(TorchDispatchMode):
    """Records the ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_inference_pays_nothing(ext):
    """No gradient needed: the plain forward, no LSE. Needed: the forward with the LSE."""
    q, k, v = qkv(1, 2, 10, 10, 8)
    for grad, requires, expected in [(True, False, "nanogpt.attention.default"),
                                     (False, True, "nanogpt.attention.default"),
                                     (True, True, "nanogpt.attention_lse.default")]:
        ins = [t.clone().requires_grad_(requires) for t in (q, k, v)]
        with torch.set_grad_enabled(grad), Ops() as ops:
            ext.attention(*ins, causal=True)
        assert [s for s in ops.seen if s.startswith("nanogpt.")] == [expected]


def test_eager_inference_is_the_op(ext):
    """Eagerly, without gradients, nanogpt.attention calls the op's kernel directly: the same
    result as the op, and a tensor that needs no gradient."""
    q, k, v = qkv(2, 3, 5, 40, 16)
    for variant in VARIANTS:
        out = ext.attention(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, variant=variant, causal=True)
        assert not out.requires_grad
        assert torch.equal(out, torch.ops.nanogpt.attention(q, k, v, variant, True, None, 0, 0))


def test_plain_op_differentiated_directly(ext):
    """torch.ops.nanogpt.attention itself is differentiable: it recomputes the LSE first."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 30, 30, 16))
    out = torch.ops.nanogpt.attention(q, k, v, "flash", True, None, 0, 0)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    expected = grads(ext, q, k, v, dout, variant="flash", causal=True)
    for a, b in zip((dq, dk, dv), expected):
        assert torch.equal(a, b)


def test_double_backward_is_refused(ext):
    q, k, v = (t.requires_grad_() for t in qkv(1, 1, 6, 6, 4))
    out = ext.attention(q, k, v, causal=True)
    dq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match="no double backward"):
        dq.sum().backward()


def test_backward_bad_input(ext):
    q, k, v = qkv(1, 2, 6, 7, 4)
    out, lse = torch.ops.nanogpt.attention_lse(q, k, v, "flash", False, None, 0, 0)
    bwd = torch.ops.nanogpt.attention_backward
    with pytest.raises(ValueError, match=r"lse must have shape \(B, H, Nq\)"):
        bwd(out, q, k, v, out, lse[:, :, :3], "flash", False, None, 0, 0)
    with pytest.raises(ValueError, match=r"lse must have shape \(B, H, 0\)"):
        bwd(out, q, k, v, out, lse, "naive", False, None, 0, 0)
    with pytest.raises(ValueError, match="grad_out must have q's shape"):
        bwd(out[:, :1], q, k, v, out, lse, "flash", False, None, 0, 0)
    with pytest.raises(TypeError, match="lse must be float32"):
        bwd(out, q, k, v, out, lse.double(), "flash", False, None, 0, 0)
    with pytest.raises(ValueError, match="variant must be one of"):
        bwd(out, q, k, v, out, lse, "nope", False, None, 0, 0)
    # a bfloat16 grad_out or out with float32 q (or the reverse) is refused, never read as float32
    for name, args in [("grad_out", (out.bfloat16(), q, k, v, out)), ("out", (out, q, k, v, out.bfloat16())),
                       ("k", (out.bfloat16(), q.bfloat16(), k, v.bfloat16(), out.bfloat16()))]:
        with pytest.raises(TypeError, match=f"^{name} must have q's dtype"):
            bwd(*args, lse, "flash", False, None, 0, 0)


def test_compiled_training_step(ext):
    """One training step of a tiny GPT on flash under torch.compile: the same loss and the
    same gradients as eager (the ops' fake kernels and autograd registration at work)."""
    from nanogpt.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, vocab_size=11, n_layer=2, n_head=2, n_embd=32, attention="flash")
    eager = GPT(cfg)
    init = {name: t.clone() for name, t in eager.state_dict().items()}
    compiled_model = GPT(cfg)
    compiled_model.load_state_dict(init)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    idx = torch.randint(0, 11, (3, 32), generator=torch.Generator().manual_seed(1))
    targets = torch.roll(idx, -1, dims=1)
    results = []
    for model, run in ((eager, eager), (compiled_model, compiled)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _, loss = run(idx, targets)
        loss.backward()
        grads_ = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        results.append((loss.item(), grads_))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) > 4
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], rtol=1e-5, atol=1e-6, msg=name)
    sdpa_model = GPT(GPTConfig(**{**cfg.__dict__, "attention": "torch"}))
    sdpa_model.load_state_dict(init)
    _, loss = sdpa_model(idx, targets)
    assert loss.item() == pytest.approx(results[0][0], rel=1e-5)  # and flash is SDPA's math


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("H,Hk,Nq,Nk", [(4, 1, 33, 33), (6, 2, 5, 40), (6, 3, 1, 17)])
def test_grouped_query_attention_gradients(ext, variant, H, Hk, Nq, Nk):
    """enable_gqa under autograd: dk and dv of a kv head sum its query heads' gradients."""
    g = torch.Generator().manual_seed(H * Nk)
    q = torch.randn(2, H, Nq, 16, generator=g)
    k, v = (torch.randn(2, Hk, Nk, 16, generator=g) for _ in range(2))
    dout = torch.randn(q.shape, generator=g)
    got = grads(ext, q, k, v, dout, variant=variant, causal=True, enable_gqa=True)
    assert [t.shape for t in got] == [q.shape, k.shape, v.shape]
    for name, ok, err, bound in compare_gradients(got, q, k, v, dout, True, None):
        assert ok, f"{variant} {name}: max error {err:.3g} > bound {bound:.3g}"
    ins = [t.detach().requires_grad_() for t in (q, k, v)]  # the plain op differentiated directly
    out = torch.ops.nanogpt.attention(*ins, variant, True, None, 0, 0, True)
    direct = torch.autograd.grad(out, ins, dout)
    for a, b in zip(direct, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_training_reads_kv_in_place(ext):
    """Under autograd too, grouped kv heads reach the training ops as they are: nothing repeats
    or expands K and V, and the backward returns their gradients at their own shape."""
    q = torch.randn(1, 6, 9, 8, requires_grad=True)
    k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(2))
    with Ops() as ops:
        out = ext.attention(q, k, v, causal=True, enable_gqa=True)
        out.backward(torch.ones_like(out))
    assert [s for s in ops.seen if s.startswith("nanogpt.")] == ["nanogpt.attention_lse.default",
                                                                 "nanogpt.attention_backward.default"]
    assert not [s for s in ops.seen if "repeat" in s or "expand" in s]
    assert k.grad.shape == k.shape and v.grad.shape == v.shape


def test_grouped_query_attention_error_under_autograd(ext):
    q = torch.randn(1, 6, 5, 8, requires_grad=True)
    k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match=r"^k must have shape \(B, Hk, Nk, d\) with Hk dividing H"):
        ext.attention(q, k, v, enable_gqa=True)
