"""nanogpt-flash: attention on the CPU as a ladder of variants, and a NanoGPT that runs on them.

    nanogpt.attention(q, k, v, *, variant="flash", causal=False, scale=None, br=None, bc=None)
    nanogpt.VARIANTS      # variant names, read from the extension's one dispatch table
    nanogpt.extension()   # the compiled module (course entry points: myNaiveAttention, ...)
    nanogpt.build_info()  # what was built: ispc version and targets or C++ only, threads, flags

Semantics are torch.nn.functional.scaled_dot_product_attention's, except that with causal=True
and Nq != Nk the mask is aligned bottom-right (query i sees keys j <= i + Nk - Nq), which is
what KV-cache decoding needs; SDPA's is_causal aligns top-left.
"""
from __future__ import annotations

import numbers
import os

import torch

from nanogpt.reference import attention_reference, causal_mask

# GNU OpenMP cannot run a parallel region in a child forked after the parent started its
# threads (it waits for them forever); a forked child runs on one thread, as torch's
# DataLoader workers do.
os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))

__all__ = ["attention", "attention_reference", "causal_mask", "extension", "build_info", "tune", "VARIANTS"]

_ext = None
_source = None


def extension():
    """The compiled module: the installed build (pip install) if present, else the JIT build."""
    global _ext, _source
    if _ext is None:
        try:
            from nanogpt import _C as ext  # built by setup.py

            _source = "installed"
        except ImportError:
            from nanogpt import _build

            ext = _build.load()
            _source = "jit"
        torch.library.register_fake("nanogpt::attention")(_attention_fake)
        torch.library.register_fake("nanogpt::attention_lse")(_attention_lse_fake)
        torch.library.register_fake("nanogpt::attention_backward")(_attention_backward_fake)
        torch.library.register_fake("nanogpt::linear")(_linear_fake)
        torch.library.register_autograd("nanogpt::attention_lse", _lse_backward, setup_context=_lse_context)
        torch.library.register_autograd("nanogpt::attention", _recomputing_backward, setup_context=_plain_context)
        torch.library.register_autograd("nanogpt::attention_backward", _no_double_backward,
                                        setup_context=_no_context)
        _ext = ext
        _apply_tuning(ext)
    return _ext


def _apply_tuning(ext):
    """This CPU's measured tiles, if nanogpt.tune() ran here; a bad tuning file is reported and
    the cache model used instead (it never stops the kernels from loading)."""
    import warnings

    from nanogpt import tuning

    try:
        tuning.apply(ext, tuning.load())
    except (ValueError, RuntimeError) as err:
        warnings.warn(f"nanogpt: tuned tiles not applied, using the cache model: {err}", stacklevel=3)


# ---------------------------------------------------------------------------------------
# Autograd. attention_lse is the forward for training: (out, lse), lse as the variant's backward
# reads it. Its backward is the registered op attention_backward: flash's own, naive's own, and
# naive's for blocked and fused (extension().training() lists which). The plain op, differentiated
# directly (nanogpt.attention never does so), recomputes the forward with the LSE first.


def _lse_context(ctx, inputs, output):
    q, k, v, *args = inputs  # args: variant, causal, scale, br, bc, enable_gqa
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = args
    ctx.mark_non_differentiable(lse)


def _lse_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.nanogpt.attention_backward(grad_out, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


def _plain_context(ctx, inputs, output):
    q, k, v, *args = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = args


def _recomputing_backward(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    out, lse = torch.ops.nanogpt.attention_lse(q, k, v, *ctx.args)  # args: ..., enable_gqa
    dq, dk, dv = torch.ops.nanogpt.attention_backward(grad_out, q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


def _no_context(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("nanogpt.attention has no double backward (the gradient of its gradient); "
                              "use torch.nn.functional.scaled_dot_product_attention for that")


def _linear_fake(x, weight, bias=None):
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"x's last dimension must be weight's in_features {weight.shape[1]}")
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _lse_rows(variant, nq):
    """attention_lse's LSE has Nq rows for variants whose backward reads it, else 0."""
    global _keeps_lse
    if _keeps_lse is None:
        _keeps_lse = {name: keeps for name, _, keeps in extension().training()}
    return nq if _keeps_lse.get(variant, False) else 0


_keeps_lse = None


def _attention_lse_fake(q, k, v, variant="flash", causal=False, scale=None, br=0, bc=0, enable_gqa=False):
    out = _attention_fake(q, k, v, variant, causal, scale, br, bc, enable_gqa)
    return out, q.new_empty(q.shape[0], q.shape[1], _lse_rows(variant, q.shape[2]), dtype=torch.float32)


def _attention_backward_fake(grad_out, q, k, v, out, lse, variant="flash", causal=False, scale=None, br=0, bc=0,
                             enable_gqa=False):
    _attention_fake(q, k, v, enable_gqa=enable_gqa)
    torch._check(grad_out.shape == q.shape and out.shape == q.shape,
                 lambda: f"grad_out and out must have q's shape {tuple(q.shape)}")
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _attention_fake(q, k, v, variant="flash", causal=False, scale=None, br=0, bc=0, enable_gqa=False):
    """Shape function for meta tensors and torch.compile: the same checks as the CPU kernel's."""
    torch._check(q.device == k.device == v.device, lambda: "q, k and v must be on the same device")
    torch._check(q.dim() == 4 and k.dim() == 4, lambda: "q and k must have 4 dimensions (B, H, N, d)")
    torch._check(q.dtype in (torch.float32, torch.bfloat16) and k.dtype == v.dtype == q.dtype,
                 lambda: f"q, k and v must be all float32 or all bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    H, Hk = q.shape[1], k.shape[1]
    heads_ok = Hk == H or (enable_gqa and Hk > 0 and H % Hk == 0)
    torch._check(k.shape[0] == q.shape[0] and heads_ok and k.shape[3] == q.shape[3] and v.shape == k.shape,
                 lambda: f"k and v must have shape (B, H, Nk, d) to match q {tuple(q.shape)}"
                         + (" (or Hk heads dividing H, with enable_gqa)" if enable_gqa else ""))
    return q.new_empty(q.shape)


def tune(**kwargs):
    """Measures flash's tiles on this CPU and keeps them as its defaults (nanogpt/tuning.py)."""
    from nanogpt import tuning as _tune

    return _tune.tune(**kwargs)


def __getattr__(name):
    if name == "VARIANTS":
        return tuple(n for n, _ in extension().variants())
    raise AttributeError(f"module 'nanogpt' has no attribute {name!r}")


def _check_tile(name, value):
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value}")
    return min(int(value), 1 << 62)  # tiles are clamped to N anyway; keeps int64 arithmetic safe


def attention(q, k, v, *, variant: str = "flash", causal: bool = False, scale: float | None = None,
              br: int | None = None, bc: int | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """softmax(q kᵀ·scale + causal mask) v with one of nanogpt.VARIANTS.

    q (B, H, Nq, d), k and v (B, H, Nk, d): CPU tensors, all float32 or all bfloat16 (a
    bfloat16 output; softmax and sums in float32: flash reads bfloat16 itself, with AVX-512
    BF16 where the CPU has it, the other variants run on float32 copies). Inputs whose last
    dimension is contiguous are read in place, others are copied once. scale defaults to 1/√d.
    enable_gqa (as SDPA's): k and v may have Hk heads, Hk dividing H; query head h then reads
    kv head h // (H // Hk), without copying K or V.
    br, bc: flash's tile height and width (blocked's tile too); None picks the default.
    Returns a contiguous (B, H, Nq, d) tensor.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, N, d), got {type(t).__name__}")
        if not t.is_cpu:  # checked here: a meta tensor would reach the fake kernel (is_cpu: 0.1 µs, device.type: 1 µs)
            raise ValueError(f"{name} must be on the CPU, got device {t.device}")
        if t.layout != torch.strided:  # a sparse tensor would never reach the CPU kernel's checks
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if not isinstance(variant, str):
        raise TypeError(f"variant must be a str naming one of nanogpt.VARIANTS, got {variant!r}")
    for name, flag in (("causal", causal), ("enable_gqa", enable_gqa)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a number or None, got {scale!r}")
        scale = float(scale)
    br, bc = _check_tile("br", br), _check_tile("bc", bc)
    extension()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # training: the forward that keeps the LSE, whose backward is the variant's own (grouped kv
        # heads read in place by both: the backward sums each group's dK and dV)
        return torch.ops.nanogpt.attention_lse(q, k, v, variant, causal, scale, br, bc, enable_gqa)[0]
    # inference: no LSE. Plain tensors in eager mode call the kernel directly (the op's Python
    # dispatch costs more than a short decoding step); under torch.compile, a dispatch mode or a
    # tensor subclass, the op (with its fake kernel) is what must be seen.
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or not type(q) is type(k) is type(v) is torch.Tensor):
        return torch.ops.nanogpt.attention.default(q, k, v, variant, causal, scale, br, bc, enable_gqa)
    return _ext.attention(q, k, v, variant, causal, scale, br, bc, enable_gqa)


def build_info() -> dict:
    """What was built and how it runs: tile kernel (ispc or C++), compiler, flags, threads.

    From the binary itself (compiled_info) and the build spec written next to it by the build
    that made it (nanogpt/_build.py: the JIT build or setup.py)."""
    from nanogpt import _build

    info = dict(extension().compiled_info())
    spec = _build.read_spec(extension())
    info["build"] = spec.get("build", _source)
    info["cxx_flags"] = " ".join(spec.get("cxx_flags", ["unknown (no build spec)"]))
    ispc = spec.get("ispc")
    if info["tile_kernel"] == "c++":
        info["ispc"] = "not used: C++ twin kernels"
    elif ispc:
        info["ispc"] = f"{ispc['version']} ({ispc['path']}), targets " + ", ".join(ispc["targets"])
    if spec.get("sanitize"):
        info["sanitize"] = True
    info["threads"] = torch.get_num_threads()
    return info
