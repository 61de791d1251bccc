"""Hugging Face model directories: config.json + model.safetensors (or a sharded
model.safetensors.index.json, or pytorch_model.bin read with torch.load(weights_only=True)),
and tokenizer.json through the `tokenizers` package.

  GPT-2  (GPT2LMHeadModel, model_type "gpt2")  -> nanogpt/models/gpt.py's GPT: its Conv1D
         weights are stored (in, out) and are transposed; gelu with the tanh approximation;
         the head is tied to the token embedding.
  Llama  (LlamaForCausalLM, model_type "llama") -> nanogpt/models/llama.py's Llama: transformers
         rotates halves of each head where Meta and llama2.c rotate adjacent pairs, so its
         q_proj/k_proj rows are un-permuted (the inverse of the permutation Meta's converter
         applies); q, k, v and gate, up are concatenated into the model's fused projections.

Readers raise HFError (a ValueError) naming the directory or file and what is wrong, and refuse
configurations the models do not compute (biases, rope scaling, other activations).
"""
from __future__ import annotations

import json
import os

import torch

from nanogpt.models.gpt import GPT, GPTConfig
from nanogpt.models.llama import Llama, LlamaConfig
from nanogpt.tokenizers import HFTokenizer


class HFError(ValueError):
    """A Hugging Face directory that cannot be read: the message names it and the problem."""


def read_config(path) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise HFError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise HFError(f"{file}: not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise HFError(f"{file}: expected a JSON object")
    return config


def read_weights(path) -> dict:
    """{name: tensor} from the directory's safetensors file(s) or pytorch_model.bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    legacy = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    elif os.path.isfile(legacy):
        try:
            state = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated zip, pickled objects refused by weights_only
            raise HFError(f"cannot read {legacy}: {type(e).__name__}: {e}") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise HFError(f"{legacy}: not a state dict of tensors")
        return state
    else:
        raise HFError(f"{path}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")
    state = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise HFError(f"cannot read {file}: {e}") from e
    return state


def _require(where, config, key, ok, what):
    value = config.get(key)
    if not ok(value):
        raise HFError(f"{where}: {key}={value!r} is not supported ({what})")
    return value


def _take(where, state, name, shape):
    t = state.pop(name, None)
    if t is None:
        raise HFError(f"{where}: missing tensor {name}")
    if tuple(t.shape) != tuple(shape):
        raise HFError(f"{where}: tensor {name} has shape {tuple(t.shape)}, config.json implies {tuple(shape)}")
    return t.float()


# -----------------------------------------------------------------------------
# GPT-2

def gpt2_state(where, config: dict, hf: dict):
    """(GPTConfig, GPT state dict) from GPT2LMHeadModel's config and tensors."""
    c = GPTConfig(block_size=config["n_positions"], vocab_size=config["vocab_size"], n_layer=config["n_layer"],
                  n_head=config["n_head"], n_embd=config["n_embd"], bias=True, gelu="tanh")
    _require(where, config, "activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
    _require(where, config, "layer_norm_epsilon", lambda v: v == 1e-5, "1e-5")
    _require(where, config, "n_inner", lambda v: v in (None, 4 * c.n_embd), "4·n_embd")
    _require(where, config, "scale_attn_by_inverse_layer_idx", lambda v: not v, "false")
    _require(where, config, "scale_attn_weights", lambda v: v in (None, True), "true")
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers of old versions
    d, V = c.n_embd, c.vocab_size
    wte = _take(where, hf, "wte.weight", (V, d))
    head = hf.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head.float(), wte):
        raise HFError(f"{where}: lm_head.weight differs from wte.weight; nanogpt's GPT ties them")
    state = {"transformer.wte.weight": wte, "lm_head.weight": wte,
             "transformer.wpe.weight": _take(where, hf, "wpe.weight", (c.block_size, d))}
    conv1d = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d)}
    for i in range(c.n_layer):
        for name in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                state[f"transformer.h.{i}.{name}.{kind}"] = _take(where, hf, f"h.{i}.{name}.{kind}", (d,))
        for name, (n_in, n_out) in conv1d.items():  # Conv1D stores (in, out): transpose to Linear's (out, in)
            state[f"transformer.h.{i}.{name}.weight"] = _take(where, hf, f"h.{i}.{name}.weight", (n_in, n_out)).t()
            state[f"transformer.h.{i}.{name}.bias"] = _take(where, hf, f"h.{i}.{name}.bias", (n_out,))
    for kind in ("weight", "bias"):
        state[f"transformer.ln_f.{kind}"] = _take(where, hf, f"ln_f.{kind}", (d,))
    if hf:
        raise HFError(f"{where}: unexpected tensors {sorted(hf)[:5]}{' ...' if len(hf) > 5 else ''}")
    return c, state


# -----------------------------------------------------------------------------
# Llama

def unpermute(w, n_heads):
    """transformers' q/k rows (per head: the first halves of the pairs, then the second halves)
    -> Meta's order (per head: pairs adjacent), the order llama2.c and nanogpt's Llama rotate."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute(w, n_heads):
    """Meta's q/k rows -> transformers' (what Meta's and llama2.c's converters apply)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def llama_state(where, config: dict, hf: dict):
    """(LlamaConfig, Llama state dict) from LlamaForCausalLM's config and tensors."""
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default" or scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise HFError(f"{where}: rope scaling {rope or scaling} is not supported (default RoPE only)")
    heads = config["num_attention_heads"]
    c = LlamaConfig(dim=config["hidden_size"], hidden_dim=config["intermediate_size"],
                    n_layers=config["num_hidden_layers"], n_heads=heads,
                    n_kv_heads=config.get("num_key_value_heads") or heads, vocab_size=config["vocab_size"],
                    max_seq_len=config["max_position_embeddings"], norm_eps=config.get("rms_norm_eps", 1e-6),
                    rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
                    tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    try:
        c.check()
    except ValueError as e:
        raise HFError(f"{where}: {e}") from e
    _require(where, config, "hidden_act", lambda v: v in (None, "silu"), "silu")
    _require(where, config, "attention_bias", lambda v: not v, "false")
    _require(where, config, "mlp_bias", lambda v: not v, "false")
    _require(where, config, "head_dim", lambda v: v in (None, c.head_size), "hidden_size / num_attention_heads")
    d, hs, kv = c.dim, c.head_size, c.n_kv_heads * c.head_size
    emb = _take(where, hf, "model.embed_tokens.weight", (c.vocab_size, d))
    head = hf.pop("lm_head.weight", None)
    if c.tie_embeddings:
        if head is not None and not torch.equal(head.float(), emb):
            raise HFError(f"{where}: tie_word_embeddings is true but lm_head.weight differs from embed_tokens")
        head = emb
    elif head is None:
        raise HFError(f"{where}: missing tensor lm_head.weight (tie_word_embeddings is false)")
    elif tuple(head.shape) != (c.vocab_size, d):
        raise HFError(f"{where}: tensor lm_head.weight has shape {tuple(head.shape)}, config.json implies {(c.vocab_size, d)}")
    state = {"tok_embeddings.weight": emb, "output.weight": head.float(),
             "norm.weight": _take(where, hf, "model.norm.weight", (d,))}
    for i in range(c.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        q = unpermute(_take(where, hf, p + "self_attn.q_proj.weight", (c.n_heads * hs, d)), c.n_heads)
        k = unpermute(_take(where, hf, p + "self_attn.k_proj.weight", (kv, d)), c.n_kv_heads)
        v = _take(where, hf, p + "self_attn.v_proj.weight", (kv, d))
        state[o + "attention.wqkv.weight"] = torch.cat([q, k, v])
        state[o + "attention.wo.weight"] = _take(where, hf, p + "self_attn.o_proj.weight", (d, c.n_heads * hs))
        gate = _take(where, hf, p + "mlp.gate_proj.weight", (c.hidden_dim, d))
        up = _take(where, hf, p + "mlp.up_proj.weight", (c.hidden_dim, d))
        state[o + "feed_forward.w13.weight"] = torch.cat([gate, up])
        state[o + "feed_forward.w2.weight"] = _take(where, hf, p + "mlp.down_proj.weight", (d, c.hidden_dim))
        state[o + "attention_norm.weight"] = _take(where, hf, p + "input_layernorm.weight", (d,))
        state[o + "ffn_norm.weight"] = _take(where, hf, p + "post_attention_layernorm.weight", (d,))
    hf = {k: v for k, v in hf.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer of old versions
    if hf:
        raise HFError(f"{where}: unexpected tensors {sorted(hf)[:5]}{' ...' if len(hf) > 5 else ''}")
    return c, state


# -----------------------------------------------------------------------------

ARCHITECTURES = {"gpt2": (gpt2_state, GPT), "llama": (llama_state, Llama)}


def load_model(path, attention="torch"):
    """A Hugging Face directory as nanogpt's GPT (GPT-2) or Llama, in eval mode."""
    path = str(path)
    config = read_config(path)
    kind = config.get("model_type")
    if kind not in ARCHITECTURES:
        raise HFError(f"{path}: model_type {kind!r} is not supported (expected one of {sorted(ARCHITECTURES)})")
    to_state, cls = ARCHITECTURES[kind]
    try:
        cfg, state = to_state(path, config, read_weights(path))
    except KeyError as e:
        raise HFError(f"{os.path.join(path, 'config.json')}: missing field {e.args[0]!r}") from None
    model = cls(cfg)
    model.load_state_dict(state)
    model.set_attention(attention)
    return model.eval()


def load_tokenizer(path, tokenizer=None) -> HFTokenizer:
    """The directory's tokenizer.json (or the file `tokenizer`), stopping at config.json's
    eos_token_id."""
    from tokenizers import Tokenizer

    file = tokenizer or os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise HFError(f"{path}: no tokenizer: {file} does not exist (pass a tokenizer.json)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers package raises its own Exception type
        raise HFError(f"cannot read tokenizer {file}: {e}") from e
    eos = read_config(path).get("eos_token_id") if os.path.isdir(path) else None
    stop = [] if eos is None else eos if isinstance(eos, list) else [eos]
    return HFTokenizer(tok, stop_ids=stop)
