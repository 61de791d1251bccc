"""Threads and processes: concurrent Python threads, torch's thread count, OMP_NUM_THREADS, and
calls after fork (a plain os.fork and DataLoader workers).

Anything that could hang runs in a subprocess with a timeout, so a deadlock fails one test
instead of taking pytest down. Subprocesses run from the repo root with this environment, so
they load the same cached build.
"""
import concurrent.futures

import pytest
import torch

import nanogpt  # nanogpt.VARIANTS: the dispatch table, read at collection

from conftest import COURSE, course_call, qkv, run_python
from nanogpt.reference import compare_to_sdpa


def jobs(variants, n):
    """n calls with different shapes, variants, masks and tiles: (q, k, v, kwargs)."""
    out = []
    for i in range(n):
        q, k, v = qkv(1 + i % 2, 1 + i % 3, 30 + 5 * i, 30 + 5 * i if i % 3 else 23 + 4 * i, 8 + 3 * (i % 11), seed=i)
        out.append((q, k, v, dict(variant=variants[i % len(variants)], causal=bool(i % 2),
                                  br=[None, 16, 5][i % 3], bc=[None, 32, 7][i % 3])))
    return out


# ---------------------------------------------------------------------------------------
# Several Python threads at once


def test_concurrent_calls_match_serial_bitwise(ext):
    work = jobs(ext.VARIANTS, 40)  # 4 threads x 10 calls
    serial = [ext.attention(q, k, v, **kw) for q, k, v, kw in work]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for _ in range(2):
            concurrent_ = list(pool.map(lambda job: ext.attention(job[0], job[1], job[2], **job[3]), work))
            for i, (a, b) in enumerate(zip(serial, concurrent_)):
                assert torch.equal(a, b), f"call {i} ({work[i][3]}, q {tuple(work[i][0].shape)}) differs when concurrent"
    for (q, k, v, kw), out in zip(work, serial):
        ok, err, bound = compare_to_sdpa(out, q, k, v, kw["causal"])
        assert ok, f"{kw}: max error {err:.3g} > bound {bound:.3g}"


def test_concurrent_course_entry_points(ext):
    """The course's module from several threads (each entry point allocates its own scratch)."""
    m, N, d = ext.extension(), 48, 16
    q, k, v = qkv(1, 2, N, N, d, seed=3)
    calls = [lambda entry=entry: course_call(m, entry, q, k, v, 1, 2, N, d, br=8, bc=16) for entry in COURSE] * 5
    serial = [c() for c in calls]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: c(), calls))
    for i, (a, b) in enumerate(zip(serial, results)):
        assert torch.equal(a, b), f"course call {i % 4} differs when concurrent"


# ---------------------------------------------------------------------------------------
# torch's thread count


THREAD_PROBLEMS = [  # (B, H, Nq, Nk, d, causal, br, bc): big enough to use every thread
    (2, 3, 97, 105, 8, True, None, None), (2, 3, 97, 130, 33, True, None, None),
    (1, 2, 300, 7, 70, True, 5, 3),  # Nq > Nk: causal rows that see no key
    (3, 1, 9, 400, 20, False, 96, 48),  # a few queries against many keys
    (1, 4, 256, 256, 64, True, 17, 100),
    (2, 3, 200, 200, 32, True, None, None),  # flash's default tiles
]


@pytest.mark.parametrize("variant", nanogpt.VARIANTS)
def test_one_thread_matches_default(ext, variant):
    """torch.set_num_threads(1) against the default, bitwise: a row's arithmetic does not depend
    on which thread computes it. tests/test_properties.py runs on one thread, so this is where
    the multi-threaded paths meet awkward shapes and tiles."""
    before = torch.get_num_threads()
    results = {}
    try:
        for n in (1, before):
            torch.set_num_threads(n)
            results[n] = [ext.attention(*qkv(B, H, Nq, Nk, d, seed=i), variant=variant, causal=causal, br=br, bc=bc)
                          for i, (B, H, Nq, Nk, d, causal, br, bc) in enumerate(THREAD_PROBLEMS)]
    finally:
        torch.set_num_threads(before)
    for problem, one, default in zip(THREAD_PROBLEMS, results[1], results[before]):
        assert torch.equal(one, default), f"{variant} {problem}: one thread differs from {before}"
        q, k, v = qkv(*problem[:5], seed=THREAD_PROBLEMS.index(problem))
        ok, err, bound = compare_to_sdpa(default, q, k, v, problem[5])
        assert ok, f"{variant} {problem} on {before} threads: max error {err:.3g} > bound {bound:.3g}"


def test_omp_num_threads_1_in_a_fresh_process(ext):
    run = run_python("""
        import torch, nanogpt
        from nanogpt.reference import compare_to_sdpa
        assert nanogpt.build_info()["threads"] == 1, nanogpt.build_info()
        assert torch.get_num_threads() == 1
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 2, 70, 24, generator=g) for _ in range(3))
        for variant in nanogpt.VARIANTS:
            assert compare_to_sdpa(nanogpt.attention(q, k, v, variant=variant, causal=True), q, k, v, True)[0], variant
        print("ok")
    """, env={"OMP_NUM_THREADS": "1"})
    assert run.returncode == 0 and run.stdout.split() == ["ok"], run.stderr[-3000:]


# ---------------------------------------------------------------------------------------
# After fork. The parent calls every variant first, so OpenMP's thread pool exists.

PARENT = """
    import os, signal, sys, time
    import torch, nanogpt
    from nanogpt.reference import compare_to_sdpa

    def problem(i):
        g = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(2, 2, n, 24, generator=g) for n in (150 + i, 160 + i, 160 + i))  # above kSerialBelow
        return q, k, v

    q, k, v = problem(0)
    assert torch.get_num_threads() > 1, "needs OpenMP threads in the parent"
    parent = {var: nanogpt.attention(q, k, v, variant=var, causal=True) for var in nanogpt.VARIANTS}
"""

FORK = PARENT + """
    pid = os.fork()
    if pid == 0:  # the child: every variant, checked; the exit code says how it went
        try:
            for var in nanogpt.VARIANTS:
                out = nanogpt.attention(q, k, v, variant=var, causal=True)
                assert compare_to_sdpa(out, q, k, v, True)[0] and torch.equal(out, parent[var]), var
        except BaseException as e:
            print("child:", repr(e), file=sys.stderr, flush=True)
            os._exit(3)
        os._exit(0)
    deadline = time.monotonic() + 10  # ~100x the work; a hang is a hang
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            sys.exit(0 if os.waitstatus_to_exitcode(status) == 0 else "child failed")
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    sys.exit("the child hung in its first attention call after fork")
"""


def test_call_after_fork(ext):
    run = run_python(FORK)
    assert run.returncode == 0, run.stderr[-3000:]


DATALOADER = PARENT + """
    class Problems(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            q, k, v = problem(i)
            variant = nanogpt.VARIANTS[i % len(nanogpt.VARIANTS)]
            return i, variant, nanogpt.attention(q, k, v, variant=variant, causal=bool(i % 2))

    loader = torch.utils.data.DataLoader(Problems(), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=30)
    seen = set()
    for i, variant, out in loader:
        q, k, v = problem(i)
        causal = bool(i % 2)
        ok, err, bound = compare_to_sdpa(out, q, k, v, causal)
        assert ok, (i, variant, err, bound)
        torch.testing.assert_close(out, nanogpt.attention(q, k, v, variant=variant, causal=causal), rtol=1e-6, atol=1e-7)
        seen.add(i)
    assert seen == set(range(12)), seen
    print("ok")
"""


def test_dataloader_fork_workers(ext):
    run = run_python(DATALOADER)
    assert run.returncode == 0 and run.stdout.split() == ["ok"], run.stderr[-3000:]
