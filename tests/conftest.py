"""Shared by the tests: the `ext` fixture (the extension built or loaded once per session) and
the helpers several test files use. Test files import them: `from conftest import qkv`."""
import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent  # the repo root: subprocesses run from here, loading the cached build


@pytest.fixture(scope="session")
def ext():
    """The nanogpt package with its extension built or loaded once per test session."""
    import nanogpt

    nanogpt.extension()
    return nanogpt


def qkv(B=1, H=2, Nq=5, Nk=5, d=4, seed=0):
    """Random q (B, H, Nq, d), k and v (B, H, Nk, d), from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g) for n in (Nq, Nk, Nk)]


@contextlib.contextmanager
def nan_filled_empty():
    """torch.empty (and the kernels' at::empty) fills with NaN: an output element the kernel
    forgot to write shows up as NaN, not as whatever the allocator's last user left there."""
    before = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.utils.deterministic.fill_uninitialized_memory = before[1]


def run_python(code, env=None, timeout=60):
    """Runs code in a fresh interpreter from the repo root with this environment (so it loads
    the same cached build); returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


# The classic course's entry points (csrc/course.cpp), parts 1 to 4.
COURSE = ("myNaiveAttention", "myUnfusedAttentionBlocked", "myFusedAttention", "myFlashAttention")


def course_reference(Q, K, V):
    """The course's math, in plain torch: softmax(QKᵀ)V, unscaled, not causal."""
    return torch.softmax(Q @ K.transpose(-2, -1), dim=-1) @ V


def course_args(entry, Q, K, V, B, H, N, d, br=256, bc=256, bad=None):
    """The arguments of one course entry point, as the course passes them: Q, K, V, zero scratch
    tensors of the shapes it expects, then for flash Bc before Br, then B, H, N, d (20 arguments
    for flash). `bad` names a scratch tensor to make one element too long."""
    if entry == "myFlashAttention":
        scratch = dict(Qi=(br, d), Kj=(bc, d), Vj=(bc, d), Sij=(br, bc), Pij=(br, bc), PV=(br, d),
                       Oi=(br, d), L=(N,), Li=(br,), Lij=(br,), Lnew=(br,))
    elif entry == "myFusedAttention":
        scratch = dict(temp=(8, N))
    else:
        scratch = dict(QK_t=(N, N))
    if bad is not None:
        scratch[bad] = scratch[bad][:-1] + (scratch[bad][-1] + 1,)
    tiles = [bc, br] if entry == "myFlashAttention" else []
    return [Q, K, V, *(torch.zeros(s) for s in scratch.values()), *tiles, B, H, N, d]


def course_call(module, entry, Q, K, V, B, H, N, d, **scratch):
    """module.entry(...) with course_args's arguments (entry: a name in COURSE)."""
    return getattr(module, entry)(*course_args(entry, Q, K, V, B, H, N, d, **scratch))


# The awkward shapes every variant's forward and backward are checked on: (B, H, Nq, Nk, d)
SHAPES = [
    (1, 1, 1, 1, 1), (1, 1, 2, 2, 2), (2, 3, 7, 7, 5), (1, 2, 63, 63, 32), (1, 2, 64, 64, 64),
    (2, 1, 65, 65, 33), (1, 1, 127, 127, 128), (1, 2, 1000, 1000, 16), (1, 1, 1024, 1024, 32),
    (1, 2, 7, 65, 24),  # Nq < Nk: a KV-cache prefix
    (1, 1, 1, 127, 32),  # one new query against cached keys
    (1, 2, 65, 7, 8),  # Nq > Nk: with causal, the first rows see no key
    (3, 2, 17, 17, 127),
]
