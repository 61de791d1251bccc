"""The Llama model and llama2.c's files: logits against transformers' LlamaForCausalLM (random
init, saved by the test), our model.bin writer and reader in the v0, v1 and v2 layouts, the KV
cache with grouped-query attention, greedy generation, tokenizer.bin, and bad files.

`transformers` is a test-only dependency (the module is skipped without it); kernel variants
need the extension (the `ext` fixture). Nothing is downloaded: every model and tokenizer is made
here, small and random.
"""
import os
import struct

import pytest
import torch

from nanogpt.formats import llama2c
from nanogpt.formats.hf import permute, unpermute
from nanogpt.models.llama import Llama, LlamaConfig
from nanogpt.sample import generate
from nanogpt.tokenizers import Llama2cTokenizer
from test_model import ALL_ATTENTION, attention  # noqa: F401  (the fixture, by name)

transformers = pytest.importorskip("transformers")

V = 300  # > 259: BOS, EOS, <unk>, the 256 byte tokens and some pieces (see tiny_tokenizer)


def hf_llama(tmp_path, n_kv_heads=2, tied=False, seed=0, name="hf"):
    """A random LlamaForCausalLM with weights far from the 0.02 init, saved to tmp_path/name."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=48,
                                   rms_norm_eps=1e-5, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 if p.dim() == 2 else 1 + 0.1 * torch.randn_like(p))
    path = tmp_path / name
    model.save_pretrained(path)
    return model, path


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def ours_logits(model, idx):
    with torch.no_grad():
        return model(idx, idx)[0]  # with targets: every position's logits


def assert_close(got, want, what):
    err = (got - want).abs().max().item()
    print(f"{what}: max |logits - transformers'| = {err:.2e} (logits up to {want.abs().max().item():.1f})")
    assert err <= 1e-4 * max(1.0, want.abs().max().item()), what


IDX = torch.randint(V, (2, 37), generator=torch.Generator().manual_seed(1))  # 37: no tile multiple


# -----------------------------------------------------------------------------
# logits: transformers' Llama -> our Llama (directly, and through llama2.c's layouts)

def test_rope_permutation_inverts():
    w = torch.randn(4 * 8, 32)
    assert torch.equal(permute(unpermute(w, 4), 4), w) and not torch.equal(unpermute(w, 4), w)


@pytest.mark.parametrize("n_kv_heads,tied", [(2, False), (4, True), (1, False)])
def test_hf_llama_logits(tmp_path, n_kv_heads, tied):
    from nanogpt.formats import hf
    ref, path = hf_llama(tmp_path, n_kv_heads, tied)
    model = hf.load_model(path)
    assert model.config.n_kv_heads == n_kv_heads and model.config.tie_embeddings == tied
    assert (model.output.weight is model.tok_embeddings.weight) == tied
    assert_close(ours_logits(model, IDX), hf_logits(ref, IDX), f"hf kv={n_kv_heads} tied={tied}")


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tied", [False, True])
def test_llama2c_roundtrip_logits(tmp_path, version, tied):
    """transformers -> our Llama (q/k un-permuted) -> model.bin by our writer -> our reader:
    transformers' logits, and the exact weights back."""
    from nanogpt.formats import hf
    ref, path = hf_llama(tmp_path, 2, tied)
    model = hf.load_model(path)
    out = tmp_path / f"model.v{version}.bin"
    llama2c.write_model(model, out, version=version)
    config, state, got_version = llama2c.read_model(out)
    assert got_version == version and config == model.config
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with open(out, "rb") as f:  # the layout's own marks: v0's sign of vocab_size, v1's magic
        head = f.read(8)
    if version == 0:
        assert struct.unpack("<2i", head)[0] == 32 and os.path.getsize(out) % 4 == 0
    else:
        assert head == struct.pack("<Ii", 0x616B3432, 1) and os.path.getsize(out) % 4 == 0
    assert_close(ours_logits(llama2c.load_model(out), IDX), hf_logits(ref, IDX), f"llama2.c v{version}")


def test_llama2c_v2_q80(tmp_path):
    model = Llama(LlamaConfig(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=32))
    llama2c.write_model(model, tmp_path / "q.bin", version=2, group_size=64)  # halved to 32: divides dim
    _, state, version = llama2c.read_model(tmp_path / "q.bin")
    assert version == 2
    for name, w in model.state_dict().items():
        if w.dim() == 1:  # the norms stay fp32
            assert torch.equal(state[name], w)
        else:  # Q8_0: within half a step (max|group| / 127 / 2) of every weight
            g = w.reshape(-1, 32)
            bound = g.abs().amax(1, keepdim=True) / 127 / 2 * (1 + 1e-5)
            assert ((state[name].reshape(-1, 32) - g).abs() <= bound).all(), name


@ALL_ATTENTION
def test_cached_forward_gqa(attention):
    """Prefill, a chunk (Nq < Nk) and single tokens through the KV cache with 4 query heads on
    2 kv heads: every position's logits equal the full forward's with torch attention."""
    torch.manual_seed(0)
    cfg = dict(dim=32, hidden_dim=40, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=40)
    ref = Llama(LlamaConfig(**cfg)).eval()
    model = Llama(LlamaConfig(**cfg, attention=attention)).eval()
    model.load_state_dict(ref.state_dict())
    idx = IDX[:, :30]
    want = ours_logits(ref, idx)
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        for lo, hi in [(0, 17), (17, 25)] + [(t, t + 1) for t in range(25, 30)]:
            logits, _ = model(idx[:, lo:hi], kv_cache=cache)
            assert cache.length == hi
            assert torch.allclose(logits[:, -1], want[:, hi - 1], atol=1e-4, rtol=1e-4), (attention, hi)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(idx[:, :11], kv_cache=cache)  # 30 + 11 > 40


def test_greedy_generation_matches_transformers(tmp_path):
    from nanogpt.formats import hf
    ref, path = hf_llama(tmp_path, 2, False)
    model = hf.load_model(path)
    prompt = IDX[:1, :5]
    ref.generation_config.eos_token_id = None  # 20 tokens, whatever they are
    want = ref.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    got, crops = generate(model, prompt, 20, temperature=0)
    assert crops == 0 and torch.equal(got, want)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="n_kv_heads"):
        Llama(LlamaConfig(dim=32, n_heads=4, n_kv_heads=3))
    with pytest.raises(ValueError, match="even"):
        Llama(LlamaConfig(dim=36, n_heads=4, n_kv_heads=4))


# -----------------------------------------------------------------------------
# tokenizer.bin

def tiny_tokenizer():
    """llama2.c's layout: <unk>, BOS, EOS, the 256 byte tokens, then pieces with merge scores."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)]
    words = [b" ", b"e", b"h", b"l", b"o", b"w", b"r", b"d", b"t", b"a", b",", b"\xc3\xa9",  # é
             b"he", b"ll", b" w", b"or", b"hell", b"hello", b" wor", b" world", b"lo", b" t", b"the", b" the", b"ld"]
    pieces += words + [b"<pad%d>" % i for i in range(V - len(pieces) - len(words))]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)]
    scores[259 + words.index(b"lo")] = -50.0  # "ll"+"o" must not become "l"+"lo"
    return Llama2cTokenizer(pieces, scores)


def test_tokenizer_file_roundtrip_and_encoding(tmp_path):
    tok = tiny_tokenizer()
    llama2c.write_tokenizer(tok, tmp_path / "tokenizer.bin")
    back = llama2c.read_tokenizer(tmp_path / "tokenizer.bin", V)
    assert back.pieces == tok.pieces and back.scores == tok.scores and back.max_token_length == 7
    ids = back.encode("hello world")
    # BOS, the dummy prefix " " (" hello" is no piece), then merges by score, best first:
    # he, ll, " w", or, hell, hello, " wor", then ld (the worst score) and " world"
    assert [back.pieces[i] for i in ids] == [b"\n<s>\n", b" ", b"hello", b" world"]
    assert back.decode(ids) == "hello world"  # the space after BOS is stripped, as run.c prints
    # byte fallback: "z" and "ü" are no pieces; "é" is
    ids = back.encode("z\u00e9\u00fc")
    assert [back.pieces[i] for i in ids[2:]] == [b"<0x7A>", b"\xc3\xa9", b"<0xC3>", b"<0xBC>"]
    # run.c's printing: raw bytes >= 0x80 and control bytes print as nothing; printable ones do
    assert back.decode(ids) == "z\u00e9"
    assert back.decode([back.BOS, back.lookup[b"<0x0A>"], back.lookup[b"<0x07>"]]) == "\n"
    assert back.encode("") == [1] and back.decode([1]) == ""


def test_tokenizer_file_errors(tmp_path):
    llama2c.write_tokenizer(tiny_tokenizer(), tmp_path / "tokenizer.bin")
    data = (tmp_path / "tokenizer.bin").read_bytes()
    with pytest.raises(ValueError, match=r"tokenizer.bin: holds 300 tokens but the model's vocabulary has 512"):
        llama2c.read_tokenizer(tmp_path / "tokenizer.bin", 512)
    (tmp_path / "cut.bin").write_bytes(data[:-3])
    with pytest.raises(ValueError, match=r"cut.bin: token 299 .*truncated"):
        llama2c.read_tokenizer(tmp_path / "cut.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.bin: not a llama2.c tokenizer"):
        llama2c.read_tokenizer(tmp_path / "empty.bin")


# -----------------------------------------------------------------------------
# the inference command on llama2.c files, and bad files

def small_llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(dim=32, hidden_dim=40, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, max_seq_len=48)
    model = Llama(LlamaConfig(**{**cfg, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(15.0) if p.dim() == 2 else None
    return model.eval()


def test_inference_command_greedy(tmp_path, capsys):
    import gpt
    model = small_llama()
    llama2c.write_model(model, tmp_path / "model.bin", version=1)
    llama2c.write_tokenizer(tiny_tokenizer(), tmp_path / "tokenizer.bin")  # found beside the model
    argv = ["part0", "--inference", "-m", str(tmp_path / "model.bin"), "--temperature", "0", "--prompt", "hello",
            "--max-new-tokens", "12", "--samples", "2"]
    assert gpt.main(argv) == 0
    out = capsys.readouterr().out
    tok = tiny_tokenizer()
    want, _ = generate(model, torch.tensor([tok.encode("hello")]), 12, temperature=0, stop_ids=tok.stop_ids)
    text = tok.decode(want[0].tolist())
    assert text.startswith("hello") and out.count(text + "\n" + "-" * 40) == 2  # greedy: both samples alike
    assert "tokens/s" in out and "ms/token" in out and "attention" in out


def test_bad_model_files(tmp_path):
    from nanogpt import formats
    model = small_llama()
    for v in (0, 1):
        llama2c.write_model(model, tmp_path / f"v{v}.bin", version=v)
    good = (tmp_path / "v1.bin").read_bytes()
    cases = {
        "truncated.bin": (good[:-100], "truncated: the v1 config"),
        "short.bin": (good[:100], "truncated: 100 bytes"),
        "longer.bin": (good + b"\0" * 8, "config disagrees with the file size"),
        "magic.bin": (b"ak43" + good[4:], "not a llama2.c model: no 'ak42' magic"),
        "version.bin": (good[:4] + struct.pack("<i", 7) + good[8:], "version 7 is not supported"),
        "v0long.bin": ((tmp_path / "v0.bin").read_bytes() + b"\0" * 4, "config disagrees with the file size"),
        "v0cut.bin": ((tmp_path / "v0.bin").read_bytes()[:-4], "truncated: the v0 config"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"{name}: .*{message}" if "magic" not in name else message) as e:
            llama2c.read_model(tmp_path / name)
        assert name in str(e.value)
    # the dispatcher: a file of no known format, and a model without its tokenizer
    (tmp_path / "text.txt").write_text("hello, this is not a model at all" * 3)
    with pytest.raises(ValueError, match="text.txt: unrecognised model format"):
        formats.load(tmp_path / "text.txt")
    with pytest.raises(FileNotFoundError, match=r"v1.bin: a llama2.c model needs its tokenizer.bin"):
        formats.load(tmp_path / "v1.bin")
    llama2c.write_tokenizer(tiny_tokenizer(), tmp_path / "tokenizer.bin")
    net, tok = formats.load(tmp_path / "v1.bin")
    assert isinstance(net, Llama) and len(tok) == V
    llama2c.write_model(small_llama(vocab_size=V + 1), tmp_path / "v301.bin")
    with pytest.raises(ValueError, match="tokenizer.bin: holds 300 tokens but the model's vocabulary has 301"):
        formats.load(tmp_path / "v301.bin")
