"""The whole decoding step in C++ (csrc/decode_model.cpp) against the Python models it mirrors:
logits at every step, for GPT (biases or none, erf or tanh GELU) and Llama (grouped-query or not),
batches of rows, every variant; and its errors."""
import copy

import pytest
import torch

from nanogpt.models.gpt import GPT, GPTConfig
from nanogpt.models.llama import Llama, LlamaConfig


def gpt(attention, **kw):
    cfg = dict(block_size=40, vocab_size=30, n_layer=2, n_head=4, n_embd=36, bias=True, attention=attention)
    return GPT(GPTConfig(**{**cfg, **kw}))


def llama(attention, **kw):
    cfg = dict(dim=48, hidden_dim=40, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=30, max_seq_len=40,
               attention=attention)
    return Llama(LlamaConfig(**{**cfg, **kw}))


MODELS = {
    "gpt": lambda a: gpt(a),
    "gpt-tanh-no-bias": lambda a: gpt(a, gelu="tanh", bias=False, n_head=3, n_embd=21),
    "gpt-hidden-108": lambda a: gpt(a, n_head=3, n_embd=27),  # the erf GELU's last vector partial
    "llama-gqa": lambda a: llama(a),
    "llama-mha-untied": lambda a: llama(a, n_kv_heads=6, tie_embeddings=False, hidden_dim=37),
}


def sharpened(model, seed):
    """Weights further from the 0.02-std init, so attention and logits are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch", [1, 3])
def test_steps_match_the_python_model(ext, name, batch):
    for variant in ext.VARIANTS:
        torch.manual_seed(0)
        model = sharpened(MODELS[name](variant), seed=len(name) + batch)
        idx = torch.randint(0, 30, (batch, 14))
        with torch.no_grad():
            ref_cache, cache = model.new_kv_cache(batch), model.new_kv_cache(batch)
            model(idx[:, :5], kv_cache=ref_cache)
            model(idx[:, :5], kv_cache=cache)
            step = model.decoder(cache)
            for t in range(5, 14):
                ref, _ = model(idx[:, t:t + 1], kv_cache=ref_cache)  # the Python model's step
                got = step.step(idx[:, t], cache.length)
                cache.length += 1
                torch.testing.assert_close(got, ref[:, 0], atol=2e-5, rtol=1e-4, msg=f"{variant}, position {t}")
            for layer in range(len(cache.k)):  # and it left the same keys and values in the cache
                torch.testing.assert_close(cache.k[layer], ref_cache.k[layer], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(cache.v[layer], ref_cache.v[layer], atol=1e-5, rtol=1e-5)
        assert step.attention_seconds > 0


def test_plain_pytorch_attention_has_no_decoder(ext):
    model = gpt("torch").eval()
    assert model.decoder(model.new_kv_cache(1)) is None


def test_step_errors_name_the_argument(ext):
    model = gpt("flash").eval()
    cache = model.new_kv_cache(2)
    step = model.decoder(cache)
    with pytest.raises(ValueError, match="pos must be in"):
        step.step(torch.tensor([1, 2]), 40)  # the cache holds 40 positions
    with pytest.raises(ValueError, match="batch"):
        step.step(torch.tensor([1, 2, 3]), 0)
    with pytest.raises(ValueError, match="token 30 is outside the vocabulary"):
        step.step(torch.tensor([1, 30]), 0)
    with pytest.raises(ValueError, match="tokens must be a 1-D int64 tensor"):
        step.step(torch.tensor([[1, 2]]), 0)
    with pytest.raises(ValueError, match="variant must be one of"):
        ext.extension().DecodeModel("gpt", "nope", 4, 4, 1e-5, False, torch.zeros(30, 36), torch.empty(0),
                                    torch.empty(0), [], torch.ones(36), torch.zeros(36), torch.zeros(30, 36), [], [])


def test_attention_time_adds_up_over_samples(ext):
    """Each generate() builds a new decoder; the model's attention_seconds() keeps the earlier ones'."""
    model = gpt("flash").eval()
    model.set_attention_timing(True)
    with torch.no_grad():
        for sample in range(2):
            step = model.decoder(model.new_kv_cache(1))
            for pos in range(30):
                step.step(torch.tensor([pos % 30]), pos)
            if sample == 0:
                first = model.attention_seconds()
    assert first > 0 and model.attention_seconds() > first
    model.set_attention_timing(False)
    assert model.attention_seconds() == 0.0


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("variant", ["flash", "naive"])  # naive: a variant that runs bfloat16 on float32 copies
def test_bf16_steps(ext, name, variant):
    """A bfloat16 model (weights and cache) steps in float32 arithmetic: over the steps, its logits
    are within twice the distance of PyTorch's own bfloat16 steps (the model on SDPA) from the
    float32 model with the same (rounded) weights."""
    torch.manual_seed(0)
    model = sharpened(MODELS[name](variant), seed=len(name)).weights_to(torch.bfloat16)
    exact = copy.deepcopy(model).weights_to(torch.float32)  # the same weights, float32 arithmetic and cache
    sdpa_bf16 = copy.deepcopy(model)  # the yardstick: PyTorch alone (SDPA), in bfloat16
    sdpa_bf16.set_attention("torch")
    idx = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        caches = [m.new_kv_cache(2) for m in (exact, sdpa_bf16, model)]
        assert caches[2].k[0].dtype == torch.bfloat16
        for m, c in zip((exact, sdpa_bf16, model), caches):
            m(idx[:, :4], kv_cache=c)
        step = model.decoder(caches[2])
        err = yardstick = 0.0
        for t in range(4, 12):
            ref = exact(idx[:, t:t + 1], kv_cache=caches[0])[0][:, 0]
            torch_bf16 = sdpa_bf16(idx[:, t:t + 1], kv_cache=caches[1])[0][:, 0].float()
            got = step.step(idx[:, t], caches[2].length)
            caches[2].length += 1
            assert got.dtype == torch.float32
            err = max(err, (got - ref).abs().max().item())
            yardstick = max(yardstick, (torch_bf16 - ref).abs().max().item())
    assert 0 < err <= 2 * yardstick, f"{variant}: {err:.3g} from float32, PyTorch's bfloat16 steps {yardstick:.3g}"


def test_bf16_weights_and_cache_must_match(ext):
    model = gpt("flash").eval().weights_to(torch.bfloat16)
    cache = model.new_kv_cache(1)
    cache.k[0] = cache.k[0].float()
    with pytest.raises(ValueError, match="k_cache and v_cache must be .* of the weights' dtype"):
        model.decoder(cache)
    model.transformer.h[0].attn.c_attn.weight.data = model.transformer.h[0].attn.c_attn.weight.data.float()
    with pytest.raises(ValueError, match="every layer weight must be a contiguous CPU tensor of tok_emb's dtype"):
        model.decoder(model.new_kv_cache(1))


def test_gelu_erf_against_float64(ext):
    """The step's GELU takes erf on vectors (two polynomials, not std::erf). Against float64's
    x·(1 + erf(x/√2))/2 at a dense grid over [-9, 9] (past ±5.5 erf rounds to ±1): an error under
    2e-7·|x| (about 3 float32 ulps where x > 0; measured 1.0e-7), and no larger than torch's own
    GELU's on the same grid (3.4e-7 with torch 2.13). Lengths that leave a partial last vector
    give the same values. NaN gives NaN, -inf NaN (-inf · 0, as torch's), +inf +inf (the limit,
    as std::erf's GELU gave; torch's gives NaN)."""
    x = torch.linspace(-9, 9, 200_003, dtype=torch.float32)
    got = ext.extension().gelu_erf(x)
    exact = 0.5 * x.double() * (1 + torch.special.erf(x.double() * 0.5 ** 0.5))

    def error(y):  # per element, relative to |x| (the GELU's size where x > 0, its slope's scale elsewhere)
        return float(((y.double() - exact).abs() / x.double().abs().clamp_min(1e-30)).max())

    assert error(got) <= 2e-7, error(got)
    assert error(got) <= error(torch.nn.functional.gelu(x)), (error(got), error(torch.nn.functional.gelu(x)))
    for n in (1, 7, 17, 31):  # partial vectors: the same values as inside a long row
        assert torch.equal(ext.extension().gelu_erf(x[1000:1000 + n]), got[1000:1000 + n])
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    want = torch.tensor([float("nan"), float("inf"), float("nan"), 0.0, -0.0])
    torch.testing.assert_close(ext.extension().gelu_erf(special), want, equal_nan=True)
