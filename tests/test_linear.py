"""nanogpt::linear, the decoding step's projections: against a float64 reference on awkward
shapes (rows 1 to 4 take the kernel, more fall back to torch's sgemm), strided inputs, bias or
none, its argument errors, and the models that use it while generating."""
import pytest
import torch
import torch.nn.functional as F


def linear_op(ext):
    """The registered op (ext: the extension is loaded)."""
    return torch.ops.nanogpt.linear.default


def check_close(y, x, w, b):
    """y against the float64 product, within float32's rounding of each dot product."""
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
    bound = 2 * x.shape[-1] * torch.finfo(torch.float32).eps * scale + 1e-30
    err = (y.double() - ref).abs()
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert (err <= bound).all(), f"max error {err.max():.3g} where the bound is {bound.flatten()[err.argmax()]:.3g}"


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("K", [1, 7, 8, 33, 288, 769])
@pytest.mark.parametrize("N", [1, 5, 64, 67, 2000])
def test_linear_matches_float64(ext, rows, K, N):
    g = torch.Generator().manual_seed(rows * 100000 + K * 100 + N)
    x, w, b = torch.randn(rows, K, generator=g), torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    check_close(linear_op(ext)(x, w, b), x, w, b)
    check_close(linear_op(ext)(x, w), x, w, None)


def test_linear_any_leading_dims_and_strides(ext):
    g = torch.Generator().manual_seed(1)
    big = torch.randn(3, 5, 2 * 96, generator=g)
    x = big[:1, 2:4, ::2]  # (1, 2, 96), strided in every dimension
    w = torch.randn(96, 300, generator=g).t()  # (300, 96), not contiguous
    b = torch.randn(2 * 300, generator=g)[::2]
    y = linear_op(ext)(x, w, b)
    assert y.shape == (1, 2, 300) and y.is_contiguous()
    check_close(y, x, w, b)
    v = torch.randn(96, generator=g)  # a 1-D input, as F.linear takes
    check_close(linear_op(ext)(v, w, b), v, w, b)


def test_linear_other_dtypes_fall_back(ext):
    x, w = torch.randn(1, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    assert torch.equal(linear_op(ext)(x, w), F.linear(x, w))
    xb, wb = x.bfloat16(), w.bfloat16()
    assert linear_op(ext)(xb, wb).dtype == torch.bfloat16


@pytest.mark.parametrize("x_shape,w_shape,b_shape,match", [
    ((1, 8), (4, 9), None, "x's last dimension must be weight's in_features 9"),
    ((1, 8), (8,), None, "weight must have shape"),
    ((1, 8), (4, 8), (5,), r"bias must have shape \(4,\)"),
    ((), (4, 8), None, "x must have at least one dimension"),
])
def test_linear_errors_name_the_argument(ext, x_shape, w_shape, b_shape, match):
    args = torch.randn(x_shape), torch.randn(w_shape), None if b_shape is None else torch.randn(b_shape)
    with pytest.raises(ValueError, match=match):
        linear_op(ext)(*args)


def test_models_project_with_the_kernel_only_when_decoding(ext, monkeypatch):
    """With a kernel attention and no gradient, a model's Linear layers call nanogpt::linear; the
    plain-PyTorch choices and training never do. The logits agree either way."""
    from nanogpt.models.llama import Llama, LlamaConfig

    calls = []
    op = torch.ops.nanogpt.linear.default
    monkeypatch.setattr("nanogpt.models.attend._linear_op", lambda *a: calls.append(1) or op(*a))
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50,
                              max_seq_len=16, attention="flash")).eval()
    idx = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        ours = model(idx)[0]
        assert len(calls) == 2 * 4 + 1  # four projections per layer and the classifier
        calls.clear()
        model.set_attention("torch")
        torch_logits = model(idx)[0]
        assert not calls
    torch.testing.assert_close(ours, torch_logits, atol=1e-5, rtol=1e-4)
    model.set_attention("flash")
    model(idx, targets=idx)[1].backward()  # training: F.linear, gradients flow
    assert not calls and model.output.weight.grad is not None
