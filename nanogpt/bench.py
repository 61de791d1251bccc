"""Measuring the variants: verify first, then time each one interleaved with SDPA.

The machine is shared and noisy, so every number is a ratio measured in the same loop: each
repetition runs every contender once, in turn, and the median of the repetitions is kept; and
every timed span says whether other processes competed for the CPUs meanwhile (nanogpt.host),
next to the figure. Headers name the host: its CPU and its measured FMA peak.
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
from nanogpt.host import LoadWatch, format_host, host_info, measure_peak, peak_drift
from nanogpt.reference import attention_reference, causal_mask, compare_to_sdpa, sdpa

BENCH_SHAPES = [(1, 4, n, 32) for n in (1024, 2048, 4096, 8192)] + [(1, 12, 1024, 64)]  # (B, H, N, d)
PART0 = "manual"  # part0's path: plain torch ops, the model's name for it (GPTConfig.attention)


def parts() -> tuple:
    """What gpt.py's partN runs: part0 is PART0, partN the Nth row of the dispatch table."""
    return (PART0,) + tuple(nanogpt.VARIANTS)


def interleaved_medians(fns: dict, repeat: int = 7, warmup: int = 1, number: int = 1) -> dict:
    """{name: median seconds per call}; each repetition calls every fn `number` times, in turn."""
    times = {name: [] for name in fns}
    for rep in range(warmup + repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number):
                fn()
            if rep >= warmup:
                times[name].append((time.perf_counter() - start) / number)
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


def run(variant: str, q, k, v, causal=False, br=None, bc=None):
    """One call: PART0 ("manual") is plain PyTorch ops, any other name a row of the table."""
    if variant == PART0:
        return attention_reference(q, k, v, causal)
    return nanogpt.attention(q, k, v, variant=variant, causal=causal, br=br, bc=bc)


def format_info() -> str:
    info = nanogpt.build_info()
    return "build: " + ", ".join(f"{k}={v}" for k, v in info.items())


def header() -> str:
    """The lines every timing command starts with: the host (with its FMA peak) and the build."""
    return format_host(host_info()) + "\n" + format_info()


# ---------------------------------------------------------------------------------------
# gpt.py part0..part4


def part(variant: str, B=1, H=4, N=1024, d=32, causal=False, br=None, bc=None, repeat=9) -> bool:
    """Checks one variant (or PART0) against SDPA, times it next to SDPA and measures its memory."""
    q, k, v = random_qkv(B, H, N, d)
    print(header())
    name = "manual (plain PyTorch softmax(QKᵀ·scale)V)" if variant == PART0 else variant
    print(f"{name}: B={B} H={H} N={N} d={d} causal={causal}"
          + (f" Br={br or 'default'} Bc={bc or 'default'}" if br or bc or variant == "flash" else ""))
    out = run(variant, q, k, v, causal, br, bc)
    ok, err, bound = compare_to_sdpa(out, q, k, v, causal)
    print(f"  matches SDPA: {'yes' if ok else 'NO'} (max abs error {err:.2e}, allowed {bound:.2e})")
    with LoadWatch() as load:
        t = interleaved_medians({"ours": lambda: run(variant, q, k, v, causal, br, bc),
                                 "sdpa": lambda: sdpa(q, k, v, causal)}, repeat)
    print(f"  time: {t['ours'] * 1e3:.2f} ms, SDPA {t['sdpa'] * 1e3:.2f} ms in the same run "
          f"(median of {repeat}, interleaved): {t['sdpa'] / t['ours']:.2f}x SDPA's speed; "
          f"{gflops(B, H, N, d, causal, t['ours']) / host_info()['fma_peak_gflops']:.0%} of the FMA peak")
    print(f"  {load.verdict()}")
    mem = allocated_memory(lambda: run(variant, q, k, v, causal, br, bc))
    mem_sdpa = allocated_memory(lambda: sdpa(q, k, v, causal))
    output = out.numel() * out.element_size()
    print(f"  memory (torch.profiler, allocated by the call): {(mem - output) / 2**20:.2f} MiB scratch "
          f"+ {output / 2**20:.2f} MiB output; SDPA {(mem_sdpa - output) / 2**20:.2f} MiB scratch + the same output")
    return ok


# ---------------------------------------------------------------------------------------
# gpt.py bench


def bench(shapes=BENCH_SHAPES, causals=(False, True), variants=None, repeat=7, json_path=None,
          dtype=torch.float32) -> bool:
    """Verifies every variant, then times each variant × shape × mask interleaved with SDPA.
    variants defaults to the whole dispatch table (nanogpt.VARIANTS); PART0 may be named too.
    dtype: of q, k, v and so of SDPA too (bfloat16: %peak of the AMX or bf16 dot peak where flash
    runs on it)."""
    variants = list(variants or nanogpt.VARIANTS)
    print(header())
    if dtype != torch.float32:
        print(f"dtype: {dtype} (q, k, v and SDPA's)")
    print("verifying every variant against SDPA first ...")
    all_ok = True
    for variant in variants:
        for (B, H, N, d), causal in [((2, 3, 77, 16), False), ((1, 2, 300, 32), True), ((1, 1, 129, 64), True)]:
            q, k, v = (t.to(dtype) for t in random_qkv(B, H, N, d, seed=N))
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
    peak_name, peak_key = "FMA peak", "fma_peak_gflops"
    if dtype == torch.bfloat16 and nanogpt.build_info()["bf16_amx"]:  # flash's bfloat16 path: AMX,
        peak_name, peak_key = "AMX bf16 peak (TDPBF16PS)", "amx_peak_gflops"
    elif dtype == torch.bfloat16 and nanogpt.build_info()["bf16_dot"]:  # vdpbf16ps, or float32 copies
        peak_name, peak_key = "bf16 dot peak (vdpbf16ps)", "bf16_peak_gflops"
    peak = host_info()[peak_key]
    title = (f"{'shape':<22}{'causal':<8}{'variant':<9}{'ms':>10}{'GFLOP/s':>10}{'%peak':>7}{'xSDPA':>8}"
             f"{'xnaive':>8}  load")
    print(title)
    print("-" * len(title))
    rows, busy = [], []
    for (B, H, N, d) in shapes:
        q, k, v = (t.to(dtype) for t in random_qkv(B, H, N, d))
        for causal in causals:
            fns = {"sdpa": lambda: sdpa(q, k, v, causal)}
            fns.update({name: (lambda name=name: run(name, q, k, v, causal)) for name in variants})
            with LoadWatch() as load:
                t = interleaved_medians(fns, repeat)
            if load.busy:
                busy.append(f"B{B} H{H} N{N} d{d} causal={causal}: {load.verdict()}")
            for name, sec in t.items():
                row = dict(B=B, H=H, N=N, d=d, causal=causal, variant=name, ms=sec * 1e3,
                           gflops=gflops(B, H, N, d, causal, sec), x_sdpa=t["sdpa"] / sec,
                           x_naive=t["naive"] / sec if "naive" in t else None, busy=load.busy)
                row["peak_share"] = row["gflops"] / peak
                rows.append(row)
                xn = f"{row['x_naive']:8.2f}" if row["x_naive"] else f"{'':8}"
                print(f"{f'B{B} H{H} N{N} d{d}':<22}{str(causal):<8}{name:<9}{row['ms']:10.2f}"
                      f"{row['gflops']:10.1f}{row['peak_share']:7.0%}{row['x_sdpa']:8.2f}{xn}"
                      f"  {'BUSY' if load.busy else 'quiet'}")
    print(f"\n%peak: the row's useful GFLOP/s as a share of this host's measured {peak_name} "
          f"({peak:.0f} GFLOP/s on {host_info()['threads']} threads)")
    peak_after = measure_peak(peak_key, host_info()["threads"])
    drift = peak_drift(peak_name, peak, peak_after)
    if drift:
        print(drift)
    if busy:
        print("rows marked BUSY were timed while other processes competed for the CPUs; do not trust them:")
        for line in busy:
            print("  " + line)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"host": host_info(), f"{peak_key}_after": peak_after, "build": nanogpt.build_info(),
                       "repeat": repeat, "dtype": str(dtype), "sgemm_gflops": 2 * 2048**3 / sgemm / 1e9,
                       "rows": rows}, f, indent=1)
        print(f"\nsaved {json_path}")
    return True


# ---------------------------------------------------------------------------------------
# gpt.py bench --decode: a KV-cache step, few queries against a long cache

DECODE_SHAPES = [  # (B, H, Nq, Nk, d)
    (1, 4, 1, 256, 32), (1, 4, 1, 1500, 32), (1, 4, 1, 8192, 32), (1, 12, 1, 1024, 64), (1, 32, 1, 4096, 128),
    (4, 16, 2, 2048, 64), (1, 4, 4, 8192, 32), (8, 8, 1, 2048, 64),
]


def bench_decode(shapes=DECODE_SHAPES, repeat=15, dtype=torch.float32) -> bool:
    """flash's decode path against SDPA on KV-cache steps (causal, bottom-right: every query
    sees the whole cache but the last Nq-1 keys' tail), verified first, then timed interleaved.
    Decode is bound by reading K and V, so it is reported as bandwidth: bytes of K and V per
    second, next to torch's own read bandwidth over the same bytes (k.sum() + v.sum()), and
    the ratio to SDPA that reading them at torch's speed would give: where SDPA itself runs near
    that speed, a kernel that reads no faster than torch's sum cannot be much faster than SDPA.
    dtype: of q and the cache (bfloat16: half the bytes), and so of SDPA too."""
    print(header())
    if dtype != torch.float32:
        print(f"dtype: {dtype} (q, the cache and SDPA's)")
    rows, ok_all = [], True
    title = f"{'shape (B H Nq Nk d)':<24}{'flash us':>10}{'sdpa us':>10}{'xSDPA':>8}{'GB/s':>8}{'read GB/s':>11}{'x@read':>8}  load"
    print(title)
    print("-" * len(title))
    for (B, H, Nq, Nk, d) in shapes:
        g = torch.Generator().manual_seed(Nk)
        q = torch.randn(B, H, Nq, d, generator=g).to(dtype)
        cache = torch.randn(2, B, H, Nk + 64, d, generator=g).to(dtype)  # a preallocated cache, read through views
        k, v = cache[0, :, :, :Nk], cache[1, :, :, :Nk]
        ok, err, bound = compare_to_sdpa(nanogpt.attention(q, k, v, causal=True), q, k, v, True)
        ok_all &= ok
        if not ok:
            print(f"  MISMATCH at {(B, H, Nq, Nk, d)}: {err:.2e} > {bound:.2e}")
            continue
        # the same bytes as float32 (torch's bfloat16 sum reads at a tenth of the memory's speed)
        kr, vr = (k, v) if dtype == torch.float32 else (k.view(torch.float32), v.view(torch.float32))
        with torch.inference_mode(), LoadWatch() as load:
            mask = causal_mask(Nq, Nk) if Nq > 1 else None  # built once: SDPA is timed, not the mask
            fns = {"flash": lambda: nanogpt.attention(q, k, v, causal=True),
                   "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                   "read": lambda: (kr.sum(), vr.sum())}
            # calls of a few µs are timed in runs of ~1 ms, so the clock's and the scheduler's
            # jitter do not decide the ratio
            start = time.perf_counter()
            fns["sdpa"]()
            number = max(1, int(1e-3 / (time.perf_counter() - start)))
            t = interleaved_medians(fns, repeat, warmup=2, number=number)
        nbytes = 2 * B * H * Nk * d * cache.element_size()
        row = dict(B=B, H=H, Nq=Nq, Nk=Nk, d=d, flash_us=t["flash"] * 1e6, sdpa_us=t["sdpa"] * 1e6,
                   x_sdpa=t["sdpa"] / t["flash"], gbs=nbytes / t["flash"] / 1e9, read_gbs=nbytes / t["read"] / 1e9,
                   x_at_read=t["sdpa"] / t["read"], busy=load.busy)
        rows.append(row)
        print(f"{f'B{B} H{H} Nq{Nq} Nk{Nk} d{d}':<24}{row['flash_us']:10.1f}{row['sdpa_us']:10.1f}{row['x_sdpa']:8.2f}"
              f"{row['gbs']:8.1f}{row['read_gbs']:11.1f}{row['x_at_read']:8.2f}  {'BUSY' if load.busy else 'quiet'}")
    path = nanogpt.extension().flash_path(1, 0, 0)
    print(f"\nflash served Nq <= 8 by its '{path}' path; GB/s: K and V bytes over flash's time; "
          "read GB/s: the same bytes over torch's k.sum() + v.sum(); x@read: xSDPA if flash read them that fast")
    return ok_all


# ---------------------------------------------------------------------------------------
# gpt.py sweep


def sweep(B=1, H=4, N=1024, d=32, causal=False, brs=(16, 32, 64, 128, 192, 256), bcs=(32, 64, 128, 256, 512, 1024),
          repeat=5, png="sweep.png") -> dict:
    """Times flash over a Br×Bc grid (interleaved, median), prints the table, marks the best."""
    q, k, v = random_qkv(B, H, N, d)
    print(header())
    print(f"flash Br×Bc sweep: B={B} H={H} N={N} d={d} causal={causal}, ms (median of {repeat})")
    fns = {(br, bc): (lambda br=br, bc=bc: run("flash", q, k, v, causal, br, bc)) for br in brs for bc in bcs}
    fns["sdpa"] = lambda: sdpa(q, k, v, causal)
    with LoadWatch() as load:
        t = interleaved_medians(fns, repeat)
    best = min((key for key in t if key != "sdpa"), key=t.get)
    print("Br \\ Bc" + "".join(f"{bc:>9}" for bc in bcs))
    for br in brs:
        print(f"{br:<7}" + "".join(f"{t[(br, bc)] * 1e3:8.2f}" + ("*" if (br, bc) == best else " ") for bc in bcs))
    print(f"best: Br={best[0]} Bc={best[1]} {t[best] * 1e3:.2f} ms; default "
          f"{nanogpt.extension().default_tiles(N, N, d)}; SDPA {t['sdpa'] * 1e3:.2f} ms ({t['sdpa'] / t[best]:.2f}x)")
    print(load.verdict())
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
    return {"best": best, "best_ms": t[best] * 1e3, "times": {str(k): v for k, v in t.items()}}


# -----------------------------------------------------------------------------
# decoding real model shapes (random weights): ms/token of greedy generation with the KV cache

def decode(variant="flash", threads=None, llama_tokens=255, gpt2_tokens=1023, hf=True, repeat=3) -> dict:
    """Greedy decoding, one prompt token then N new ones with the KV cache, through
    nanogpt.sample.generate (the path `gpt.py partN --inference` takes), median of `repeat` runs:

      stories15M shape: Llama dim 288, 6 layers, 6 heads, vocab 32000, context 256 (as run.c -n 256)
      GPT-2 124M shape: 768 wide, 12 layers, 12 heads, vocab 50257, context 1024 (1023 new tokens)

    and, if transformers is installed, its generate() on the same GPT-2 weights (ratio printed).
    Returns {name: ms per token}.
    """
    from nanogpt.formats import hf as hf_format
    from nanogpt.models.gpt import GPT
    from nanogpt.models.llama import Llama, LlamaConfig
    from nanogpt.sample import generate

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    prompt = torch.zeros(1, 1, dtype=torch.long)
    llama = Llama(LlamaConfig(attention=variant)).eval()
    ref = gpt2 = None
    try:
        import transformers

        ref = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
        ref.generation_config.eos_token_id = None  # always the full number of tokens
        config, state = hf_format.gpt2_state("random GPT-2", ref.config.to_dict(), ref.state_dict())
    except ImportError:
        from nanogpt.models.gpt import GPTConfig

        config, state = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768, gelu="tanh"), None
    gpt2 = GPT(config)
    if state is not None:
        gpt2.load_state_dict(state)
    gpt2.set_attention(variant)
    gpt2.eval()

    runs = {f"stories15M-shape Llama, {llama_tokens} tokens": lambda: generate(llama, prompt, llama_tokens, temperature=0),
            f"GPT-2-124M-shape, {gpt2_tokens} tokens": lambda: generate(gpt2, prompt, gpt2_tokens, temperature=0)}
    if hf and ref is not None:
        def transformers_generate():
            with torch.inference_mode():
                ref.generate(prompt, max_new_tokens=gpt2_tokens, do_sample=False, pad_token_id=0)
        runs[f"transformers GPT-2 generate, {gpt2_tokens} tokens"] = transformers_generate
    tokens = {name: llama_tokens if "Llama" in name else gpt2_tokens for name in runs}
    print(header())
    print(f"greedy decoding with the KV cache, attention {variant!r}, {torch.get_num_threads()} threads, "
          f"median of {repeat}")
    ms = {}
    for name, fn in runs.items():
        fn()  # warm-up: allocation, first-call dispatch
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        ms[name] = 1e3 * statistics.median(times) / tokens[name]
        print(f"  {name:<48} {ms[name]:7.2f} ms/token  {1e3 / ms[name]:8.1f} tokens/s")
    names = list(ms)
    if len(names) == 3:
        print(f"  nanogpt GPT-2 vs transformers: {ms[names[2]] / ms[names[1]]:.2f}x faster")
    bandwidth = read_bandwidth()
    for name, model in (names[0], llama), (names[1], gpt2):
        gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9  # tied weights once
        print(f"  {name}: {gb * 1e3:.0f} MB of weights per token = {gb / ms[name] * 1e3:.1f} GB/s "
              f"(measured read bandwidth {bandwidth:.1f} GB/s)")
    return ms


def read_bandwidth(megabytes=256, repeat=5) -> float:
    """GB/s of torch's sum over a buffer far larger than the caches, on torch's threads: the
    memory read speed a decoding step that streams every weight once can hope for."""
    buf = torch.ones(megabytes * 2 ** 20 // 4)
    buf.sum()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / statistics.median(times) / 1e9


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

    print(header())
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
    title = (f"{'shape':<20}{'sdpa ms':>9}{variant + ' ms':>10}{'xSDPA':>7}{'bwd ms':>9}{'bwd GFLOP/s':>13}"
              f"{'sdpa bwd ms':>13}{'GFLOP/s':>9}")
    print(title)
    print("-" * len(title))
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
