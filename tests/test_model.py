"""Tests of the model, KV cache, data preparation and checkpoints (training and sampling from a
trained model: tests/test_train.py).

Fast: tiny random models and generated text. Only test_shipped_checkpoint reads the real text
(../shared/data/tinyshakespeare.txt next to the repo, skipped if absent), and it quotes none of it.
Kernel variants come from nanogpt.VARIANTS and need the extension (the `ext` fixture in conftest.py).
"""

import importlib.util
import json
import os
import random

import numpy as np
import pytest
import torch

from nanogpt.formats.checkpoint import checkpoint_dict, load_checkpoint
from nanogpt.models.gpt import GPT, GPTConfig, KVCache
from nanogpt.sample import generate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
SHIPPED = os.path.join(REPO, "checkpoints", "shakes2048.pt")


def _variants():
    # collection must work before the extension package exists (no variants: those tests are
    # skipped); if it exists but cannot be built, one placeholder makes the `ext` fixture fail loudly
    try:
        import nanogpt
        return tuple(nanogpt.VARIANTS)
    except (ImportError, AttributeError):
        return ()
    except Exception:
        return ("<extension failed to build>",)


VARIANTS = _variants()
PLAIN = ["torch", "manual"]


@pytest.fixture
def attention(request):
    """The attention choice of a test; requests the extension only for kernel variants."""
    name = request.param
    if name not in PLAIN:
        request.getfixturevalue("ext")
    return name


ALL_ATTENTION = pytest.mark.parametrize("attention", PLAIN + list(VARIANTS), indirect=True)


def tiny_model(attention="torch", block_size=48, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=block_size, vocab_size=11, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg, attention="torch"))
    # sharper than the 0.02-std init, so the attention patterns and logits are far from uniform
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.set_attention(attention)
    return model.eval()


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -----------------------------------------------------------------------------
# model: every attention choice gives the "torch" model's logits, with and without the cache

@ALL_ATTENTION
def test_logits_match_torch(attention):
    ref = tiny_model("torch")
    model = tiny_model(attention)
    idx = torch.randint(11, (2, 37), generator=torch.Generator().manual_seed(1))  # 37: not a tile multiple
    with torch.no_grad():
        want, want_loss = ref(idx, idx)
        got, got_loss = model(idx, idx)
    err = (got - want).abs().max().item()
    print(f"{attention}: max |logits - torch logits| = {err:.2e}")
    assert err < 1e-4
    assert abs(got_loss.item() - want_loss.item()) < 1e-5


@ALL_ATTENTION
def test_cached_forward_matches_full(attention):
    """Prefill 20 tokens, then a chunk of 5 (Nq=5 < Nk=25: bottom-right mask), then single
    tokens (Nq=1): each position's logits equal the full causal forward's."""
    model = tiny_model(attention)
    idx = torch.randint(11, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, _ = tiny_model("torch")(idx, idx)  # (B, T, vocab)
        cache = KVCache(model.config, batch_size=2)
        got = []
        for lo, hi in [(0, 20), (20, 25)] + [(t, t + 1) for t in range(25, 30)]:
            logits, _ = model(idx[:, lo:hi], kv_cache=cache)
            got.append((hi - 1, logits[:, -1]))
            assert cache.length == hi
    for t, logits in got:
        assert torch.allclose(logits, want[:, t], atol=1e-4, rtol=1e-4), f"position {t}"


def test_forward_past_block_size_raises():
    model = tiny_model(block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = KVCache(model.config, 1)
    model(torch.zeros(1, 16, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


def test_unknown_attention_raises():
    with pytest.raises(ValueError, match="unknown attention"):
        tiny_model("no-such-kernel")


def test_param_count_course_size():
    model = GPT(GPTConfig(block_size=2048, vocab_size=65, n_layer=4, n_head=4, n_embd=128))
    assert abs(model.get_num_params() / 1e6 - 0.80) < 0.01
    assert model.lm_head.weight is model.transformer.wte.weight  # weight tying


# -----------------------------------------------------------------------------
# generation: the KV cache changes nothing in the sampled tokens, across the block_size crop too

@ALL_ATTENTION
def test_cached_generation_identical(attention):
    model = tiny_model(attention, block_size=24)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = {}
    for kv in (False, True):
        g = torch.Generator().manual_seed(1337)
        out[kv] = generate(model, prompt, 30, temperature=1.0, top_k=8, generator=g, kv_cache=kv)
    (no_cache, crops0), (cache, crops1) = out[False], out[True]
    assert no_cache.shape == (2, 33)
    assert crops0 == crops1 == (3 + 30 - 1) - 24  # steps whose input (3..32 tokens) exceeded block_size
    assert torch.equal(no_cache, cache)
    if attention != "torch":  # and the same tokens as the reference attention
        g = torch.Generator().manual_seed(1337)
        ref, _ = generate(tiny_model("torch", block_size=24), prompt, 30, temperature=1.0, top_k=8, generator=g)
        assert torch.equal(ref, cache)


@pytest.mark.parametrize("top_k,top_p", [(None, None), (5, None), (None, 0.6)])
def test_draw_one_is_torch_multinomial(top_k, top_p):
    """sample_next's draw takes torch.multinomial's steps without its checks: the same tokens
    from the same generator, over temperatures, masked (zero) probabilities, ties and batches,
    and a NaN row raises as multinomial does."""
    from nanogpt.sample import draw_one, sample_next

    for seed in range(40):
        logits = torch.randn(3, 65, generator=torch.Generator().manual_seed(seed)) * (1 + seed % 4)
        if seed % 5 == 0:
            logits[:, 10:20] = logits[:, :1]  # ties
        for temperature in (0.5, 1.0, 2.0):
            g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            for _ in range(5):
                ours = sample_next(logits.clone(), temperature, top_k, top_p, g1)
                scaled = logits / temperature
                if top_k is not None:
                    scaled[scaled < torch.topk(scaled, top_k).values[:, [-1]]] = -float("inf")
                probs = torch.softmax(scaled, dim=-1)
                if top_p is not None:
                    p, order = probs.sort(dim=-1, descending=True)
                    p[(p.cumsum(dim=-1) - p) >= top_p] = 0.0
                    probs = torch.zeros_like(probs).scatter_(-1, order, p)
                assert torch.equal(ours, torch.multinomial(probs, 1, generator=g2)), (seed, temperature)
    for rows in (1, 3):
        bad = torch.softmax(torch.randn(rows, 65), dim=-1)
        bad[-1, 7] = float("nan")
        with pytest.raises(ValueError, match="NaN or infinity"):
            draw_one(torch.softmax(bad.log(), dim=-1))


# -----------------------------------------------------------------------------
# data and checkpoints on generated text

def synthetic_text(n=6000, seed=0):
    """A repeated pattern with some noise: learnable well below the uniform loss."""
    rng = random.Random(seed)
    words = ["abc ", "xyz\n", "hello ", "qq ", "mnop "]
    return "".join(rng.choice(words) for _ in range(n // 4))[:n]


def prepare_module():
    return load_module(os.path.join(REPO, "data", "shakespeare_char", "prepare.py"), "prepare_shakespeare_char")


def test_prepare_offline(tmp_path):
    text = synthetic_text(1000)
    src = tmp_path / "input.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    info = prepare_module().main(["--input", str(src), "--out-dir", str(out)])
    chars = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert chars == sorted(set(text)) and info["vocab_size"] == len(chars)
    train = np.fromfile(out / "train.bin", dtype=np.uint16)
    val = np.fromfile(out / "val.bin", dtype=np.uint16)
    assert len(train) == int(0.9 * len(text)) and len(train) + len(val) == len(text)
    assert "".join(chars[i] for i in np.concatenate([train, val])) == text


def test_load_checkpoint_errors(tmp_path):
    model = tiny_model()
    good = tmp_path / "good.pt"
    torch.save(checkpoint_dict(model, "abcdefghijk"), good)
    loaded, vocab, _ = load_checkpoint(good)
    assert vocab == "abcdefghijk"
    idx = torch.randint(11, (1, 9))
    assert torch.equal(loaded(idx, idx)[0], model(idx, idx)[0])

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_checkpoint(truncated)

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checkpoint(garbage)

    ck = checkpoint_dict(model, "abcdefghijk")
    ck["model"]["transformer.wpe.weight"] = torch.zeros(7, 32)
    wrong = tmp_path / "wrong_shape.pt"
    torch.save(ck, wrong)
    with pytest.raises(ValueError, match=r"wrong_shape.pt.*transformer.wpe.weight"):
        load_checkpoint(wrong)


class _Payload:
    """Pickles as a call to os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_load_checkpoint_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    ck = checkpoint_dict(tiny_model(), "abcdefghijk")
    ck["extra"] = _Payload(marker)
    evil = tmp_path / "evil.pt"
    torch.save(ck, evil)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(evil)
    assert not marker.exists()


# -----------------------------------------------------------------------------
# the shipped checkpoint

@pytest.mark.skipif(not os.path.exists(SHAKESPEARE), reason="needs ../shared/data/tinyshakespeare.txt")
@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="checkpoints/shakes2048.pt not present")
def test_shipped_checkpoint(tmp_path):
    ck = torch.load(SHIPPED, weights_only=True)
    assert "optimizer" not in ck and os.path.getsize(SHIPPED) < 8e6
    model, vocab, _ = load_checkpoint(SHIPPED)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (4, 4, 128, 2048)

    prepare_module().main(["--input", SHAKESPEARE, "--out-dir", str(tmp_path)])
    assert "".join(json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))) == vocab
    val = torch.from_numpy(np.fromfile(tmp_path / "val.bin", dtype=np.uint16).astype(np.int64))
    # 4 windows of the full block size, spread evenly over the held-out split
    starts = torch.linspace(0, len(val) - 2049, 4).long().tolist()
    x = torch.stack([val[s:s + 2048] for s in starts])
    y = torch.stack([val[s + 1:s + 2049] for s in starts])
    with torch.no_grad():
        loss = model(x, y)[1].item()
    print(f"val loss on 4 x 2048 tokens: {loss:.4f}, recorded {ck['val_loss']:.4f}")
    assert abs(loss - ck["val_loss"]) < 0.08
