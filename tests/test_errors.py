"""Every bad input is a Python exception whose message names the argument, never a crash.

After each error the process must still work: the next good call (every variant) matches the
float64 reference. Empty problems are not errors: they give what SDPA gives.
"""
import numpy as np
import pytest
import torch

import nanogpt  # nanogpt.VARIANTS: the dispatch table, read at collection

from conftest import COURSE, course_args, course_reference, nan_filled_empty, qkv, run_python
from nanogpt.reference import compare_to_sdpa, sdpa


def good_call_works(ext):
    """The process survived the error: every variant still gives a correct result."""
    q, k, v = qkv(1, 2, 17, 19, 8, seed=1)
    for variant in ext.VARIANTS:
        ok, err, bound = compare_to_sdpa(ext.attention(q, k, v, variant=variant, causal=True), q, k, v, True)
        assert ok, f"{variant} after an error: max error {err:.3g} > bound {bound:.3g}"


def raises(ext, exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    good_call_works(ext)


def with_arg(name, bad, shape=(1, 2, 5, 4)):
    """(q, k, v) with the one named argument replaced by `bad`."""
    args = dict(zip("qkv", qkv(*shape[:3], shape[2], shape[3])))
    args[name] = bad
    return args["q"], args["k"], args["v"]


# ---------------------------------------------------------------------------------------
# q, k, v: type, rank, dtype, device, shapes


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("shape", [(2, 5, 4), (1, 1, 2, 5, 4), (5,), ()], ids=lambda s: f"rank{len(s)}")
def test_wrong_rank(ext, name, shape):
    q, k, v = with_arg(name, torch.randn(shape))
    raises(ext, ValueError, rf"^{name} must have 4 dimensions \(B, H, N, d\)", ext.attention, q, k, v)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [[[[[1.0]]]], np.zeros((1, 2, 5, 4), np.float32), None, 1.0],
                         ids=["list", "ndarray", "None", "float"])
def test_not_a_tensor(ext, name, bad):
    q, k, v = with_arg(name, bad)
    raises(ext, TypeError, rf"^{name} must be a torch.Tensor", ext.attention, q, k, v)


DTYPES = {torch.float64: "Double", torch.float16: "Half", torch.int32: "Int", torch.bool: "Bool"}


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wrong_dtype(ext, name, dtype):
    q, k, v = with_arg(name, torch.ones(1, 2, 5, 4, dtype=dtype))
    raises(ext, TypeError, rf"^{name} must be float32 or bfloat16, got {DTYPES[dtype]}", ext.attention, q, k, v)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_mixed_dtypes(ext, name):
    """float32 and bfloat16 are not mixed: k and v must have q's dtype."""
    q, k, v = with_arg(name, torch.ones(1, 2, 5, 4, dtype=torch.bfloat16))
    raises(ext, TypeError, r"^k and v must have q's dtype", ext.attention, q, k, v)


@pytest.mark.parametrize("name", ["q", "k", "v", "all"])
def test_not_on_the_cpu(ext, name):
    if name == "all":
        q, k, v = (t.to("meta") for t in qkv())
        name = "q"
    else:
        q, k, v = with_arg(name, torch.randn(1, 2, 5, 4, device="meta"))
    raises(ext, ValueError, rf"{name} must be on the CPU", ext.attention, q, k, v)


def test_sparse(ext):
    q, k, v = qkv()
    with pytest.raises((TypeError, ValueError, NotImplementedError), match="nanogpt::attention|q must"):
        ext.attention(q.to_sparse(), k, v)
    good_call_works(ext)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad,exc,match", [(lambda t: t.to("meta"), ValueError, "must be on the CPU"),
                                           (lambda t: t.to_sparse(), ValueError, "must be a dense"),
                                           (lambda t: t.double(), TypeError, "must be float32 or bfloat16")])
def test_direct_kernel_checks_its_arguments(ext, name, bad, exc, match):
    """The compiled entry point that eager inference calls, past the Python checks, makes the
    op's checks itself."""
    args = dict(zip("qkv", qkv()))
    args[name] = bad(args[name])
    raises(ext, exc, f"^{name} {match}", ext.extension().attention, *args.values(), "flash", False, None, 0, 0, False)


@pytest.mark.parametrize("dim,what", [(0, "B"), (1, "H"), (3, "d")])
def test_k_disagrees_with_q(ext, dim, what):
    q, k, v = qkv()
    shape = list(k.shape)
    shape[dim] += 1
    k = v = torch.randn(shape)
    raises(ext, ValueError, r"^k must have shape \(B, H, Nk, d\)", ext.attention, q, k, v)


@pytest.mark.parametrize("dim", [0, 1, 2, 3], ids=["B", "H", "Nk", "d"])
def test_v_disagrees_with_k(ext, dim):
    q, k, v = qkv(Nk=7)
    shape = list(v.shape)
    shape[dim] += 1
    raises(ext, ValueError, r"^v must have the same shape as k", ext.attention, q, k, torch.randn(shape))


# ---------------------------------------------------------------------------------------
# variant, causal, scale, br, bc


@pytest.mark.parametrize("variant", ["nope", "FLASH", "", "flash "])
def test_unknown_variant(ext, variant):
    raises(ext, ValueError, r"^variant must be one of " + ", ".join(nanogpt.VARIANTS) + "; got",
           ext.attention, *qkv(), variant=variant)


@pytest.mark.parametrize("variant", [None, 1, b"flash", ["flash"]], ids=repr)
def test_variant_not_a_str(ext, variant):
    raises(ext, TypeError, r"^variant must be a str", ext.attention, *qkv(), variant=variant)


@pytest.mark.parametrize("causal", [1, 0, None, "yes", torch.tensor(True)], ids=repr)
def test_causal_not_a_bool(ext, causal):
    raises(ext, TypeError, r"^causal must be a bool", ext.attention, *qkv(), causal=causal)


@pytest.mark.parametrize("scale", ["0.5", torch.tensor(0.5), True, [0.5]], ids=repr)
def test_scale_not_a_number(ext, scale):
    raises(ext, TypeError, r"^scale must be a number or None", ext.attention, *qkv(), scale=scale)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")], ids=str)
def test_scale_not_finite(ext, scale):
    raises(ext, ValueError, r"^scale must be a finite number", ext.attention, *qkv(), scale=scale)


def test_scale_that_overflows_float32(ext):
    raises(ext, ValueError, r"^scale must be a finite number", ext.attention, *qkv(), scale=1e300)


@pytest.mark.parametrize("name", ["br", "bc"])
@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (-(2**40), ValueError), (8.0, TypeError),
                                     (2.5, TypeError), (True, TypeError), (False, TypeError), ("8", TypeError)],
                         ids=repr)
def test_bad_tile(ext, name, bad, exc):
    raises(ext, exc, rf"^{name} must be a positive int or None", ext.attention, *qkv(), **{name: bad})


@pytest.mark.parametrize("variant", nanogpt.VARIANTS)
def test_huge_tiles_are_clamped(ext, variant):
    """A tile past N, even past int64, is still a valid positive int: clamped to N."""
    q, k, v = qkv(1, 2, 21, 19, 8)
    for br, bc in [(2**70, None), (None, 2**70), (2**63 - 1, None), (None, 2**63 - 1), (2**62, 2**62)]:
        with nan_filled_empty():
            out = ext.attention(q, k, v, variant=variant, causal=True, br=br, bc=bc)
        ok, err, bound = compare_to_sdpa(out, q, k, v, True)
        assert ok, f"br={br} bc={bc}: max error {err:.3g} > bound {bound:.3g}"


# ---------------------------------------------------------------------------------------
# The registered op, called directly (no Python wrapper)


def test_op_wrong_rank(ext):
    q, k, v = qkv()
    raises(ext, ValueError, r"^q must have 4 dimensions", torch.ops.nanogpt.attention, q[0], k, v, "flash", False, None, 0, 0)
    raises(ext, ValueError, r"^v must have 4 dimensions", torch.ops.nanogpt.attention, q, k, v[None], "naive", True, None, 0, 0)


def test_op_unknown_variant(ext):
    raises(ext, ValueError, r"^variant must be one of " + ", ".join(nanogpt.VARIANTS) + "; got 'nope'",
           torch.ops.nanogpt.attention, *qkv(), "nope", False, None, 0, 0)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_op_mixed_devices(ext, name):
    q, k, v = with_arg(name, torch.randn(1, 2, 5, 4, device="meta"))
    raises(ext, (TypeError, ValueError, RuntimeError), r"device|CPU|cpu|meta", torch.ops.nanogpt.attention,
           q, k, v, "flash", False, None, 0, 0)


def test_op_other_bad_arguments(ext):
    q, k, v = qkv()
    op = torch.ops.nanogpt.attention
    raises(ext, TypeError, r"^k must be a tensor, got None", op, q, None, v, "flash", False, None, 0, 0)
    raises(ext, RuntimeError, r"argument 'q'", op, [1.0], k, v, "flash", False, None, 0, 0)
    raises(ext, ValueError, r"^br must be a positive tile height", op, q, k, v, "flash", False, None, -1, 0)
    raises(ext, ValueError, r"^bc must be a positive tile width", op, q, k, v, "blocked", False, None, 0, -5)
    raises(ext, ValueError, r"^scale must be a finite number", op, q, k, v, "fused", False, float("nan"), 0, 0)
    raises(ext, TypeError, r"^q must be float32 or bfloat16", op, q.double(), k, v, "flash", False, None, 0, 0)


# ---------------------------------------------------------------------------------------
# Empty problems: what SDPA gives


EMPTY = [  # (B, H, Nq, Nk, d)
    (1, 2, 0, 5, 8),  # Nq = 0: empty output
    (1, 2, 4, 5, 0),  # d = 0: empty output
    (1, 2, 4, 0, 8),  # Nk = 0: zeros
    (1, 2, 0, 0, 8), (1, 1, 3, 0, 0), (0, 2, 4, 5, 8), (2, 0, 4, 5, 8),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", EMPTY, ids=lambda s: "x".join(map(str, s)))
def test_empty_like_sdpa(ext, shape, causal):
    q, k, v = qkv(*shape)
    expected = sdpa(q, k, v, causal)
    for variant in ext.VARIANTS:
        out = ext.attention(q, k, v, variant=variant, causal=causal)
        assert out.shape == q.shape and out.dtype == torch.float32 and out.is_contiguous()
        assert torch.equal(out, expected), variant
        assert compare_to_sdpa(out, q, k, v, causal)[0], variant  # the reference handles empties too
    assert torch.equal(ext.attention(q, k, v, scale=0.5, br=3, bc=2), sdpa(q, k, v, causal=False, scale=0.5))
    good_call_works(ext)


# ---------------------------------------------------------------------------------------
# The course's entry points (csrc/course.cpp): B, H, N, d and scratch shapes are checked


def entry_args(entry, bad=None, **sizes):
    """Valid arguments for one course entry point (B=1, H=2, N=6, d=4, Br=3, Bc=5), except for
    `bad` (a scratch tensor one element too long) and `sizes` (B, H, N or d in the integer
    arguments, disagreeing with Q, K and V)."""
    return course_args(entry, *qkv(1, 2, 6, 6, 4), **{**dict(B=1, H=2, N=6, d=4), **sizes}, br=3, bc=5, bad=bad)


def course_call_works(ext, entry):
    args = entry_args(entry)
    Q, K, V = args[:3]
    torch.testing.assert_close(getattr(ext.extension(), entry)(*args), course_reference(Q, K, V))
    good_call_works(ext)


@pytest.mark.parametrize("entry", COURSE)
@pytest.mark.parametrize("what", ["B", "H", "N", "d"])
@pytest.mark.parametrize("delta", [1, -1])
def test_course_sizes_disagree(ext, entry, what, delta):
    value = dict(B=1, H=2, N=6, d=4)[what] + delta
    args = entry_args(entry, **{what: value})
    msg = r"^B, H, N and d must be positive" if value <= 0 else r"^Q must have shape \(B, H, N, d\)"
    with pytest.raises(ValueError, match=msg):
        getattr(ext.extension(), entry)(*args)
    course_call_works(ext, entry)


@pytest.mark.parametrize("entry", COURSE)
@pytest.mark.parametrize("name", ["K", "V"])
def test_course_k_or_v_disagrees(ext, entry, name):
    args = entry_args(entry)
    args["QKV".index(name)] = torch.randn(1, 2, 7, 4)
    with pytest.raises(ValueError, match=rf"^{name} must have shape \(B, H, N, d\)"):
        getattr(ext.extension(), entry)(*args)
    course_call_works(ext, entry)


SCRATCH = [("myNaiveAttention", "QK_t"), ("myUnfusedAttentionBlocked", "QK_t"), ("myFusedAttention", "temp")] + [
    ("myFlashAttention", n) for n in ("Qi", "Kj", "Vj", "Sij", "Pij", "PV", "Oi", "L", "Li", "Lij", "Lnew")]


@pytest.mark.parametrize("entry,name", SCRATCH)
def test_course_scratch_of_the_wrong_size(ext, entry, name):
    with pytest.raises(ValueError, match=rf"^{name} must have shape"):
        getattr(ext.extension(), entry)(*entry_args(entry, bad=name))
    course_call_works(ext, entry)


@pytest.mark.parametrize("br,bc", [(0, 5), (3, 0), (-1, 5)])
def test_course_flash_tiles_must_be_positive(ext, br, bc):
    with pytest.raises(ValueError, match=r"^Br and Bc must be positive"):
        args = entry_args("myFlashAttention")
        args[14:16] = [bc, br]  # after Q, K, V and the 11 scratch tensors; Bc before Br
        ext.extension().myFlashAttention(*args)
    course_call_works(ext, "myFlashAttention")


# ---------------------------------------------------------------------------------------
# An N×N scratch that cannot fit: refused before allocating, pointing to flash


OOM_SCRIPT = """
import resource
import pytest, torch, nanogpt
from nanogpt.reference import compare_to_sdpa

# A safety net: had the kernel tried to allocate the 596 GiB score matrix, the allocator's own
# error (not the guard's, which names the variant and flash) would be raised at this limit.
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY))
N = 400_000
q, k, v = (torch.randn(1, 1, N, 1) for _ in range(3))
m = nanogpt.extension()
for variant in ("naive", "blocked"):
    with pytest.raises(torch.OutOfMemoryError, match=rf"^variant '{variant}' materialises the Nq×Nk score matrix"
                                                     r".*use variant='flash'"):
        nanogpt.attention(q, k, v, variant=variant, causal=True)
QK_t = torch.zeros(1).expand(N, N)  # the course's (N, N) scratch, as a zero-stride view
for entry, variant in (("myNaiveAttention", "naive"), ("myUnfusedAttentionBlocked", "blocked")):
    with pytest.raises(torch.OutOfMemoryError, match=rf"^variant '{variant}'.*use variant='flash'"):
        getattr(m, entry)(q, k, v, QK_t, 1, 1, N, 1)
q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
for variant in nanogpt.VARIANTS:
    assert compare_to_sdpa(nanogpt.attention(q, k, v, variant=variant), q, k, v)[0], variant
print("survived")
"""


def test_score_matrix_too_large_suggests_flash(ext):
    run = run_python(OOM_SCRIPT, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "survived", run.stderr[-3000:]
