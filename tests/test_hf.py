"""Hugging Face directories: GPT-2 (into nanogpt's GPT) and Llama (into nanogpt's Llama) saved by
transformers from random models, their logits and greedy generations against transformers', a
tokenizer.json trained here, and directories that cannot be read.

`transformers` is a test-only dependency (the module is skipped without it). Nothing is
downloaded: every model and tokenizer is made here, small and random.
"""
import json
import os

import pytest
import torch

from nanogpt.formats import hf
from nanogpt.models.gpt import GPT, GPTConfig
from nanogpt.sample import generate
from test_model import ALL_ATTENTION, attention  # noqa: F401  (the fixture, by name)

transformers = pytest.importorskip("transformers")

V = 90


def sharpen(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 if p.dim() == 2 else 0.1 * torch.randn_like(p) + (1 if p.dim() == 1 else 0))
    return model.eval()


def hf_gpt2(path, n_positions=40, vocab_size=V, seed=0):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=n_positions,
                                  bos_token_id=0, eos_token_id=0)
    model = sharpen(transformers.GPT2LMHeadModel(cfg), seed)
    model.save_pretrained(path)
    return model


def hf_llama(path, vocab_size=V, seed=0, **kw):
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=40, bos_token_id=1, eos_token_id=2)
    model = sharpen(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**cfg, **kw})), seed)
    model.save_pretrained(path)
    return model


def ours(model, idx):
    with torch.no_grad():
        return model(idx, idx)[0]  # with targets: every position's logits


def theirs(model, idx):
    with torch.no_grad():
        return model(idx).logits


def assert_close(got, want, what):
    err = (got - want).abs().max().item()
    print(f"{what}: max |logits - transformers'| = {err:.2e} (logits up to {want.abs().max().item():.1f})")
    assert err <= 1e-4 * max(1.0, want.abs().max().item()), what


IDX = torch.randint(V, (2, 37), generator=torch.Generator().manual_seed(1))


# -----------------------------------------------------------------------------
# GPT-2

def test_gelu_default_unchanged():
    assert GPTConfig().gelu == "none" and GPT(GPTConfig(n_layer=1)).transformer.h[0].mlp.gelu.approximate == "none"


@ALL_ATTENTION
def test_gpt2_logits(tmp_path, attention):
    ref = hf_gpt2(tmp_path / "gpt2")
    model = hf.load_model(tmp_path / "gpt2", attention=attention)
    assert isinstance(model, GPT) and model.config.gelu == "tanh" and model.config.block_size == 40
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_close(ours(model, IDX), theirs(ref, IDX), f"gpt2 {attention}")


def test_gpt2_pytorch_model_bin_and_greedy(tmp_path):
    """pytorch_model.bin (read with weights_only) gives the same model; greedy generation with
    the KV cache equals transformers' generate, also past the context (crop and re-prefill)."""
    ref = hf_gpt2(tmp_path / "a", n_positions=24)
    os.makedirs(tmp_path / "b")
    ref.config.save_pretrained(tmp_path / "b")
    torch.save(ref.state_dict(), tmp_path / "b" / "pytorch_model.bin")
    a, b = hf.load_model(tmp_path / "a"), hf.load_model(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    prompt = IDX[:1, :5]
    ref.generation_config.eos_token_id = None
    want = ref.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0)
    got, crops = generate(a, prompt, 15, temperature=0)
    assert crops == 0 and torch.equal(got, want)
    # past n_positions: the shared loop crops to the last 24 tokens, with and without the cache
    long = [generate(a, prompt, 30, temperature=0, kv_cache=kv) for kv in (True, False)]
    assert long[0][1] == long[1][1] == 5 + 30 - 1 - 24 and torch.equal(long[0][0], long[1][0])


# -----------------------------------------------------------------------------
# Llama (the permutation and GQA are tested in test_llama.py); tokenizer.json; the command

@ALL_ATTENTION
def test_llama_logits(tmp_path, attention):
    ref = hf_llama(tmp_path / "llama", rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    model = hf.load_model(tmp_path / "llama", attention=attention)
    assert model.config.rope_theta == 500.0 and model.config.norm_eps == ref.config.rms_norm_eps
    assert_close(ours(model, IDX), theirs(ref, IDX), f"llama {attention}")


def train_tokenizer(path, vocab_size):
    """A byte-level BPE tokenizer.json trained on a few sentences (ids 0..2: <unk>, <s>, </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60])
    tok.train_from_iterator(["the cat sat on the mat", "a dog and a cat", "hello world"] * 10, trainer)
    tok.save(str(path))
    return tok


def test_llama_directory_inference(tmp_path, capsys):
    import gpt
    os.makedirs(tmp_path / "llama")
    tok = train_tokenizer(tmp_path / "llama" / "tokenizer.json", V)
    hf_llama(tmp_path / "llama", vocab_size=tok.get_vocab_size())
    argv = ["part0", "--inference", "-m", str(tmp_path / "llama"), "--prompt", "the cat", "--max-new-tokens", "10",
            "--samples", "2", "--seed", "3"]
    assert gpt.main(argv) == 0
    out = capsys.readouterr().out
    texts = out.split("-" * 40 + "\n")[:2]
    assert all(t.startswith("the cat") for t in texts), out
    assert "tokens/s" in out and "ms/token" in out
    # stop token: a sample ends where the model emits config.json's eos_token_id
    loaded = hf.load_tokenizer(str(tmp_path / "llama"))
    assert loaded.stop_ids == (2,) and loaded.decode(loaded.encode("hello world")) == "hello world"


# -----------------------------------------------------------------------------
# directories that cannot be read: the error names the directory or file and the problem

def test_bad_directories(tmp_path):
    from nanogpt import formats
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="empty: not a Hugging Face model directory"):
        hf.load_model(tmp_path / "empty")

    ref = hf_gpt2(tmp_path / "g")
    with pytest.raises(ValueError, match=r"g: no tokenizer: .*tokenizer.json does not exist"):
        formats.load(tmp_path / "g")

    def variant(name, config=None, state=None):
        d = tmp_path / name
        os.makedirs(d)
        cfg = json.loads((tmp_path / "g" / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
        from safetensors.torch import save_file
        sd = {k: v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
        save_file(state(sd) if state else sd, str(d / "model.safetensors"))
        return d

    cases = [
        (variant("bert", {"model_type": "bert"}), "model_type 'bert' is not supported"),
        (variant("relu", {"activation_function": "relu"}), "activation_function='relu' is not supported"),
        (variant("missing", state=lambda sd: {k: v for k, v in sd.items() if "h.1.mlp.c_fc.bias" not in k}),
         "missing tensor h.1.mlp.c_fc.bias"),
        (variant("shape", {"n_positions": 41}), r"tensor wpe.weight has shape \(40, 32\), config.json implies \(41, 32\)"),
    ]
    for d, message in cases:
        with pytest.raises(ValueError, match=f"{d.name}.*{message}"):
            hf.load_model(d)
    (tmp_path / "missing" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        hf.load_model(tmp_path / "missing")
    (tmp_path / "shape" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="cannot read .*shape/model.safetensors"):
        hf.load_model(tmp_path / "shape")

    hf_llama(tmp_path / "l3", rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 32})
    with pytest.raises(ValueError, match="l3: rope scaling .* is not supported"):
        hf.load_model(tmp_path / "l3")


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_refused(tmp_path):
    ref = hf_gpt2(tmp_path / "g")
    os.makedirs(tmp_path / "p")
    ref.config.save_pretrained(tmp_path / "p")
    torch.save({"transformer.wte.weight": Boom()}, tmp_path / "p" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="cannot read .*pytorch_model.bin"):
        hf.load_model(tmp_path / "p")
