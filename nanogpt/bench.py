"""Measuring the variants: verify first, then time each one interleaved with SDPA.

The machine is shared and noisy, so every number is a ratio measured in the same loop: each
repetition runs every contender once, in turn, and the median of the repetitions is kept.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time

import torch

import nanogpt
from nanogpt.reference import attention_reference, compare_to_sdpa, sdpa

BENCH_SHAPES = [(1, 4, n, 32) for n in (1024, 2048, 4096, 8192)] + [(1, 12, 1024, 64)]  # (B, H, N, d)


def interleaved_medians(fns: dict, repeat: int = 7, warmup: int = 1) -> dict:
    """{name: median seconds}; each repetition calls every fn once, in turn."""
    times = {name: [] for name in fns}
    for rep in range(warmup + repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2: libtorch's profiler prints two log lines per session there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocated_memory(fn) -> int:
    """Bytes allocated during fn() (scratch and output), from torch.profiler's CPU memory
    column: allocations are the positive self memory of the ops that made them."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


def visible_pairs(nq: int, nk: int, causal: bool) -> int:
    """How many (query, key) pairs the mask lets through."""
    if not causal:
        return nq * nk
    return sum(min(nk, max(0, i + 1 + nk - nq)) for i in range(nq))


def gflops(B, H, N, d, causal, seconds) -> float:
    """Useful GFLOP/s: 2 matmuls × 2 flops per multiply-add over the visible pairs."""
    return 4 * B * H * d * visible_pairs(N, N, causal) / seconds / 1e9


def random_qkv(B, H, N, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, d, generator=g) for _ in range(3)]


def run(variant: str | None, q, k, v, causal=False, br=None, bc=None):
    """One call: variant None is part0, plain PyTorch ops."""
    if variant is None:
        return attention_reference(q, k, v, causal)
    return nanogpt.attention(q, k, v, variant=variant, causal=causal, br=br, bc=bc)


def format_info() -> str:
    info = nanogpt.build_info()
    return "build: " + ", ".join(f"{k}={v}" for k, v in info.items())


# ---------------------------------------------------------------------------------------
# gpt.py part0..part4


def part(variant: str | None, B=1, H=4, N=1024, d=32, causal=False, br=None, bc=None, repeat=9) -> bool:
    """Checks one variant against SDPA, times it next to SDPA and measures its memory."""
    q, k, v = random_qkv(B, H, N, d)
    name = variant or "plain PyTorch softmax(QKᵀ·scale)V"
    print(f"{name}: B={B} H={H} N={N} d={d} causal={causal}"
          + (f" Br={br or 'default'} Bc={bc or 'default'}" if variant == "flash" else ""))
    out = run(variant, q, k, v, causal, br, bc)
    ok, err, bound = compare_to_sdpa(out, q, k, v, causal)
    print(f"  matches SDPA: {'yes' if ok else 'NO'} (max abs error {err:.2e}, allowed {bound:.2e})")
    t = interleaved_medians({"ours": lambda: run(variant, q, k, v, causal, br, bc),
                             "sdpa": lambda: sdpa(q, k, v, causal)}, repeat)
    print(f"  time: {t['ours'] * 1e3:.2f} ms, SDPA {t['sdpa'] * 1e3:.2f} ms in the same run "
          f"(median of {repeat}, interleaved): {t['sdpa'] / t['ours']:.2f}x SDPA's speed")
    mem = allocated_memory(lambda: run(variant, q, k, v, causal, br, bc))
    mem_sdpa = allocated_memory(lambda: sdpa(q, k, v, causal))
    output = out.numel() * out.element_size()
    print(f"  memory (torch.profiler, allocated by the call): {(mem - output) / 2**20:.2f} MiB scratch "
          f"+ {output / 2**20:.2f} MiB output; SDPA {(mem_sdpa - output) / 2**20:.2f} MiB scratch + the same output")
    return ok


# ---------------------------------------------------------------------------------------
# gpt.py bench


def bench(shapes=BENCH_SHAPES, causals=(False, True), variants=None, repeat=7, json_path=None) -> bool:
    variants = list(variants or nanogpt.VARIANTS)
    print(format_info())
    print("verifying every variant against SDPA first ...")
    all_ok = True
    for variant in variants:
        for (B, H, N, d), causal in [((2, 3, 77, 16), False), ((1, 2, 300, 32), True), ((1, 1, 129, 64), True)]:
            q, k, v = random_qkv(B, H, N, d, seed=N)
            ok, err, bound = compare_to_sdpa(run(variant, q, k, v, causal), q, k, v, causal)
            all_ok &= ok
            if not ok:
                print(f"  {variant} MISMATCH at B{B} H{H} N{N} d{d} causal={causal}: {err:.2e} > {bound:.2e}")
    if not all_ok:
        return False
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    sgemm = interleaved_medians({"sgemm": lambda: a @ b}, repeat)["sgemm"]
    print(f"all match. this machine's square sgemm (torch a @ b, 2048³): {2 * 2048**3 / sgemm / 1e9:.0f} GFLOP/s")
    print(f"timing: median of {repeat}, every variant interleaved with SDPA in one loop\n")
    header = f"{'shape':<22}{'causal':<8}{'variant':<9}{'ms':>10}{'GFLOP/s':>10}{'xSDPA':>8}{'xnaive':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for (B, H, N, d) in shapes:
        q, k, v = random_qkv(B, H, N, d)
        for causal in causals:
            fns = {"sdpa": lambda: sdpa(q, k, v, causal)}
            fns.update({name: (lambda name=name: run(name, q, k, v, causal)) for name in variants})
            t = interleaved_medians(fns, repeat)
            for name, sec in t.items():
                row = dict(B=B, H=H, N=N, d=d, causal=causal, variant=name, ms=sec * 1e3,
                           gflops=gflops(B, H, N, d, causal, sec), x_sdpa=t["sdpa"] / sec,
                           x_naive=t["naive"] / sec if "naive" in t else None)
                rows.append(row)
                xn = f"{row['x_naive']:8.2f}" if row["x_naive"] else f"{'':8}"
                print(f"{f'B{B} H{H} N{N} d{d}':<22}{str(causal):<8}{name:<9}{row['ms']:10.2f}"
                      f"{row['gflops']:10.1f}{row['x_sdpa']:8.2f}{xn}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"build": nanogpt.build_info(), "repeat": repeat, "sgemm_gflops": 2 * 2048**3 / sgemm / 1e9,
                       "rows": rows}, f, indent=1)
        print(f"\nsaved {json_path}")
    return True


# ---------------------------------------------------------------------------------------
# gpt.py sweep


def sweep(B=1, H=4, N=1024, d=32, causal=False, brs=(16, 32, 64, 128, 192, 256), bcs=(32, 64, 128, 256, 512, 1024),
          repeat=5, png="sweep.png") -> dict:
    """Times flash over a Br×Bc grid (interleaved, median), prints the table, marks the best."""
    q, k, v = random_qkv(B, H, N, d)
    print(format_info())
    print(f"flash Br×Bc sweep: B={B} H={H} N={N} d={d} causal={causal}, ms (median of {repeat})")
    fns = {(br, bc): (lambda br=br, bc=bc: run("flash", q, k, v, causal, br, bc)) for br in brs for bc in bcs}
    fns["sdpa"] = lambda: sdpa(q, k, v, causal)
    t = interleaved_medians(fns, repeat)
    best = min((key for key in t if key != "sdpa"), key=t.get)
    print("Br \\ Bc" + "".join(f"{bc:>9}" for bc in bcs))
    for br in brs:
        print(f"{br:<7}" + "".join(f"{t[(br, bc)] * 1e3:8.2f}" + ("*" if (br, bc) == best else " ") for bc in bcs))
    print(f"best: Br={best[0]} Bc={best[1]} {t[best] * 1e3:.2f} ms; default "
          f"{nanogpt.extension().default_tiles(N, N, d)}; SDPA {t['sdpa'] * 1e3:.2f} ms ({t['sdpa'] / t[best]:.2f}x)")
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        grid = [[t[(br, bc)] * 1e3 for bc in bcs] for br in brs]
        fig, ax = plt.subplots(figsize=(1.1 * len(bcs) + 2, 0.7 * len(brs) + 1.5))
        im = ax.imshow(grid, cmap="viridis_r")
        ax.set_xticks(range(len(bcs)), [str(b) for b in bcs])
        ax.set_yticks(range(len(brs)), [str(b) for b in brs])
        ax.set_xlabel("Bc (keys per tile)")
        ax.set_ylabel("Br (queries per tile)")
        for i, br in enumerate(brs):
            for j, bc in enumerate(bcs):
                ax.text(j, i, f"{grid[i][j]:.2f}" + ("*" if (br, bc) == best else ""), ha="center", va="center",
                        color="w", fontsize=8)
        ax.set_title(f"flash ms, B{B} H{H} N{N} d{d} causal={causal} (SDPA {t['sdpa'] * 1e3:.2f} ms)")
        fig.colorbar(im, ax=ax, label="ms")
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        print(f"heat map: {png}")
    return {"best": best, "times": {str(k): v for k, v in t.items()}}


# ---------------------------------------------------------------------------------------
# gpt.py bench --backward

TRAIN_SHAPES = [(12, 4, 256, 32), (1, 4, 2048, 32), (4, 12, 1024, 64), (8, 8, 128, 64)]  # (B, H, N, d)


def bench_backward(shapes=TRAIN_SHAPES, causal=True, repeat=7, variant="flash", json_path=None) -> bool:
    """Training: forward + backward of a variant next to SDPA's, fp32. Verifies the gradients
    against the float64 reference first (nanogpt.reference.compare_gradients), then times both
    interleaved (each repetition runs each once, in turn; median of `repeat`) and prints the
    forward + backward ms, the ratio to SDPA, the backward's ms and its GFLOP/s: five matmuls
    (S, dP, dV, dK, dQ), 10·d flops per visible query–key pair."""
    from nanogpt.reference import compare_gradients

    print(format_info())
    print(f"verifying {variant}'s gradients against the float64 reference first ...")
    all_ok = True
    for (B, H, N, d), c in [((2, 3, 77, 16), False), ((1, 2, 300, 32), True), ((1, 1, 129, 64), True),
                            ((2, 2, 100, 24), True)]:
        q, k, v, dout = random_qkv(B, H, N, d, seed=N) + [torch.randn(B, H, N, d)]
        ins = [t.requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(nanogpt.attention(*ins, variant=variant, causal=c), ins, dout)
        for name, ok, err, bound in compare_gradients(grads, q, k, v, dout, c):
            all_ok &= ok
            if not ok:
                print(f"  {variant} {name} MISMATCH at B{B} H{H} N{N} d{d} causal={c}: {err:.2e} > {bound:.2e}")
    if not all_ok:
        return False
    print(f"all match. timing forward + backward, causal={causal}: median of {repeat}, {variant} and SDPA "
          "interleaved in one loop\n")
    header = (f"{'shape':<20}{'sdpa ms':>9}{variant + ' ms':>10}{'xSDPA':>7}{'bwd ms':>9}{'bwd GFLOP/s':>13}"
              f"{'sdpa bwd ms':>13}{'GFLOP/s':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for (B, H, N, d) in shapes:
        q, k, v = (t.requires_grad_() for t in random_qkv(B, H, N, d))
        dout = torch.randn(B, H, N, d)
        fns = {"sdpa": lambda: sdpa(q, k, v, causal), variant: lambda: nanogpt.attention(q, k, v, variant=variant,
                                                                                        causal=causal)}
        total, backward = {name: [] for name in fns}, {name: [] for name in fns}
        for rep in range(1 + repeat):  # one warm-up
            for name, fn in fns.items():
                q.grad = k.grad = v.grad = None
                start = time.perf_counter()
                out = fn()
                mid = time.perf_counter()
                out.backward(dout)
                end = time.perf_counter()
                if rep:
                    total[name].append(end - start)
                    backward[name].append(end - mid)
        t = {name: statistics.median(ts) for name, ts in total.items()}
        tb = {name: statistics.median(ts) for name, ts in backward.items()}
        flops = 10 * B * H * d * visible_pairs(N, N, causal)
        row = dict(B=B, H=H, N=N, d=d, causal=causal, sdpa_ms=t["sdpa"] * 1e3, ms=t[variant] * 1e3,
                   x_sdpa=t["sdpa"] / t[variant], bwd_ms=tb[variant] * 1e3, bwd_gflops=flops / tb[variant] / 1e9,
                   sdpa_bwd_ms=tb["sdpa"] * 1e3, sdpa_bwd_gflops=flops / tb["sdpa"] / 1e9)
        rows.append(row)
        print(f"{f'B{B} H{H} N{N} d{d}':<20}{row['sdpa_ms']:9.2f}{row['ms']:10.2f}{row['x_sdpa']:7.2f}"
              f"{row['bwd_ms']:9.2f}{row['bwd_gflops']:13.1f}{row['sdpa_bwd_ms']:13.2f}{row['sdpa_bwd_gflops']:9.1f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"build": nanogpt.build_info(), "repeat": repeat, "variant": variant, "rows": rows}, f, indent=1)
        print(f"\nsaved {json_path}")
    return True
