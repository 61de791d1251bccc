"""llama2.c's files: model.bin (v0 legacy, v1 fp32, v2 Q8_0) and tokenizer.bin, read and written.

model.bin, little-endian, weights row-major (out_features, in_features) as nn.Linear stores them:
  v0  7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len); a
      NEGATIVE vocab_size means the classifier is not shared with the embedding. Then fp32:
      embedding (V, dim); per kind, all layers: rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3;
      rms_final; the RoPE tables cos and sin (max_seq_len, hs/2 each, unused); [classifier].
  v1  256-byte header: uint32 magic 0x616b3432 ("ak42"), int32 version 1, the 7 int32 above
      (vocab_size positive), uint8 shared_classifier, zeros. Then fp32: rms_att (all layers),
      rms_ffn, rms_final, embedding, wq, wk, wv, wo, w1, w2, w3 (all layers each), [classifier].
  v2  as v1 with version 2 and an int32 group_size after the flag; the norms in fp32, then each
      matrix (embedding, then per layer wq.., w3, [classifier]) as int8 values followed by one
      fp32 scale per group_size values (Q8_0): value = int8 · scale. Read dequantized to fp32.
  wq/wk rows are in Meta's order (RoPE on adjacent pairs), which is what nanogpt's Llama uses.

tokenizer.bin: int32 max_token_length, then per token: fp32 score, int32 length, the bytes.
The vocabulary size is not stored: it is the model's.

Readers raise Llama2cError (a ValueError) naming the file and what is wrong; they fill a
Llama's state dict and never build layers themselves.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import torch

from nanogpt.models.llama import Llama, LlamaConfig
from nanogpt.tokenizers import Llama2cTokenizer

MAGIC = 0x616B3432  # "ak42" read as a little-endian uint32
MAGIC_BYTES = struct.pack("<I", MAGIC)
HEADER_V1 = 256
FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")


class Llama2cError(ValueError):
    """A llama2.c file that cannot be read: the message names the file and the problem."""


# -----------------------------------------------------------------------------
# model.bin: reading

def sniff(head: bytes) -> int | None:
    """The llama2.c version a file's first 36 bytes announce: 1 or 2 (magic), 0 for a plausible
    legacy header, None if they are not a llama2.c model."""
    if head[:4] == MAGIC_BYTES:
        return struct.unpack("<i", head[4:8])[0] if len(head) >= 8 else None
    if len(head) >= 28 and _legacy_problem(struct.unpack("<7i", head[:28])) is None:
        return 0
    return None


def _legacy_problem(ints):
    dim, hidden, layers, heads, kv_heads, vocab, seq = ints
    if min(dim, hidden, layers, heads, kv_heads, seq) < 1 or vocab == 0:
        return "a size is zero or negative"
    if dim % heads or heads % kv_heads or (dim // heads) % 2:
        return f"dim {dim}, n_heads {heads}, n_kv_heads {kv_heads} do not divide"
    if max(dim, hidden, abs(vocab)) > 1 << 20 or layers > 4096 or seq > 1 << 24:
        return "a size is implausibly large"
    return None


def _layout(c: LlamaConfig, version: int):
    """[(name, shape)] of the tensors in file order; name None for skipped RoPE tables;
    the 3-d shapes are (n_layers, rows, cols) blocks of one kind."""
    L, d, hs = c.n_layers, c.dim, c.head_size
    kv, hid = c.n_kv_heads * hs, c.hidden_dim
    mats = [("wq", (L, d, d)), ("wk", (L, kv, d)), ("wv", (L, kv, d)), ("wo", (L, d, d)),
            ("w1", (L, hid, d)), ("w2", (L, d, hid)), ("w3", (L, hid, d))]
    cls = [] if c.tie_embeddings else [("output", (c.vocab_size, d))]
    if version == 0:
        return ([("emb", (c.vocab_size, d)), ("rms_att", (L, d))] + mats[:4] + [("rms_ffn", (L, d))] + mats[4:]
                + [("rms_final", (d,)), (None, (c.max_seq_len, hs // 2)), (None, (c.max_seq_len, hs // 2))] + cls)
    return [("rms_att", (L, d)), ("rms_ffn", (L, d)), ("rms_final", (d,)), ("emb", (c.vocab_size, d))] + mats + cls


def _numel(shape):
    return int(np.prod(shape, dtype=np.int64))


def read_model(path):
    """(LlamaConfig, state dict of nanogpt's Llama, version) from a llama2.c model.bin."""
    path = str(path)
    size = os.path.getsize(path)  # FileNotFoundError names the file
    with open(path, "rb") as f:
        head = f.read(HEADER_V1)
    if head[:4] == MAGIC_BYTES:
        if len(head) < HEADER_V1:
            raise Llama2cError(f"{path}: truncated: {size} bytes, shorter than the {HEADER_V1}-byte v1 header")
        version = struct.unpack("<i", head[4:8])[0]
        if version not in (1, 2):
            raise Llama2cError(f"{path}: llama2.c version {version} is not supported (1 = fp32, 2 = Q8_0)")
        ints = struct.unpack("<7i", head[8:36])
        shared = bool(head[36])
        if ints[5] < 1:
            raise Llama2cError(f"{path}: vocab_size {ints[5]} in a v{version} header")
        group = struct.unpack("<i", head[37:41])[0] if version == 2 else None
        offset = HEADER_V1
    else:
        if len(head) < 28:
            raise Llama2cError(f"{path}: not a llama2.c model: {size} bytes, too short for a header")
        ints = struct.unpack("<7i", head[:28])
        problem = _legacy_problem(ints)
        if problem:
            raise Llama2cError(f"{path}: not a llama2.c model: no 'ak42' magic, and as a legacy (v0) header "
                               f"{dict(zip(FIELDS, ints))} is invalid ({problem})")
        version, shared, group, offset = 0, ints[5] > 0, None, 28
    problem = _legacy_problem(ints)
    if problem:
        raise Llama2cError(f"{path}: invalid config {dict(zip(FIELDS, ints))}: {problem}")
    values = dict(zip(FIELDS, ints))
    values["vocab_size"] = abs(values["vocab_size"])
    config = LlamaConfig(**values, tie_embeddings=shared)
    layout = _layout(config, version)

    if version == 2:
        if group < 1 or any(_numel(s[1:] if len(s) == 3 else s) % group for _, s in layout[3:]):
            raise Llama2cError(f"{path}: Q8_0 group size {group} does not divide the weight sizes")
        floats = sum(_numel(s) for n, s in layout[:3])
        quant = sum(_numel(s) for n, s in layout[3:])
        expected = offset + 4 * floats + quant + 4 * (quant // group)
    else:
        expected = offset + 4 * sum(_numel(s) for _, s in layout)
    if size < expected:
        raise Llama2cError(f"{path}: truncated: the v{version} config {values} needs {expected} bytes, the file has {size}")
    if size > expected:
        raise Llama2cError(f"{path}: the v{version} config {values} needs {expected} bytes but the file has {size}: "
                           "the config disagrees with the file size")

    raw = np.fromfile(path, dtype=np.uint8, offset=offset)
    tensors, pos = {}, 0
    for i, (name, shape) in enumerate(layout):
        n = _numel(shape)
        if version == 2 and i >= 3:  # int8 values then fp32 scales, per tensor of one layer
            blocks = []
            for _ in range(shape[0] if len(shape) == 3 else 1):
                m = n // shape[0] if len(shape) == 3 else n
                q = torch.from_numpy(raw[pos:pos + m].view(np.int8).astype(np.float32))
                s = torch.from_numpy(raw[pos + m:pos + m + 4 * (m // group)].view(np.float32))
                blocks.append((q.view(-1, group) * s[:, None]).view(-1))
                pos += m + 4 * (m // group)
            t = torch.cat(blocks)
        else:
            t = torch.from_numpy(raw[pos:pos + 4 * n].view(np.float32))
            pos += 4 * n
        if name is not None:
            tensors[name] = t.view(shape)
    return config, _to_state(config, tensors), version


def _to_state(c: LlamaConfig, t):
    state = {"tok_embeddings.weight": t["emb"], "norm.weight": t["rms_final"]}
    for i in range(c.n_layers):
        p = f"layers.{i}."
        state[p + "attention_norm.weight"] = t["rms_att"][i]
        state[p + "attention.wqkv.weight"] = torch.cat([t["wq"][i], t["wk"][i], t["wv"][i]])
        state[p + "attention.wo.weight"] = t["wo"][i]
        state[p + "ffn_norm.weight"] = t["rms_ffn"][i]
        state[p + "feed_forward.w13.weight"] = torch.cat([t["w1"][i], t["w3"][i]])
        state[p + "feed_forward.w2.weight"] = t["w2"][i]
    state["output.weight"] = t["emb"] if c.tie_embeddings else t["output"]
    return state


def load_model(path, attention="torch"):
    """A llama2.c model.bin (v0, v1 or v2) as nanogpt's Llama in eval mode."""
    config, state, _ = read_model(path)
    model = Llama(config)
    model.load_state_dict(state)
    model.set_attention(attention)
    return model.eval()


# -----------------------------------------------------------------------------
# model.bin: writing

def _tensors(model: Llama):
    """{file name: tensor} of a Llama, split back into llama2.c's wq, wk, wv, w1, w3."""
    c = model.config
    d, kv, hid = c.dim, c.n_kv_heads * c.head_size, c.hidden_dim
    layers = model.layers
    t = {"emb": model.tok_embeddings.weight, "rms_final": model.norm.weight,
         "rms_att": torch.stack([b.attention_norm.weight for b in layers]),
         "rms_ffn": torch.stack([b.ffn_norm.weight for b in layers]),
         "wq": torch.stack([b.attention.wqkv.weight[:d] for b in layers]),
         "wk": torch.stack([b.attention.wqkv.weight[d:d + kv] for b in layers]),
         "wv": torch.stack([b.attention.wqkv.weight[d + kv:] for b in layers]),
         "wo": torch.stack([b.attention.wo.weight for b in layers]),
         "w1": torch.stack([b.feed_forward.w13.weight[:hid] for b in layers]),
         "w2": torch.stack([b.feed_forward.w2.weight for b in layers]),
         "w3": torch.stack([b.feed_forward.w13.weight[hid:] for b in layers]),
         "output": model.output.weight}
    return {k: v.detach().float().contiguous() for k, v in t.items()}


def write_model(model: Llama, path, version=1, group_size=64):
    """Write a Llama as llama2.c's model.bin of the given version (0, 1 or 2), as llama2.c's
    export.py writes it (v2: group_size halved until it divides dim, as export.py does)."""
    c = model.config
    shared = c.tie_embeddings or torch.equal(model.output.weight, model.tok_embeddings.weight)
    c = LlamaConfig(**{**c.__dict__, "tie_embeddings": shared})
    t = _tensors(model)
    ints = [getattr(c, f) for f in FIELDS]
    with open(path, "wb") as f:
        if version == 0:
            ints[5] = ints[5] if shared else -ints[5]
            f.write(struct.pack("<7i", *ints))
        elif version in (1, 2):
            header = MAGIC_BYTES + struct.pack("<i7iB", version, *ints, int(shared))
            if version == 2:
                while c.dim % group_size:
                    group_size //= 2
                header += struct.pack("<i", group_size)
            f.write(header + b"\0" * (HEADER_V1 - len(header)))
        else:
            raise ValueError(f"version must be 0, 1 or 2, got {version!r}")
        tables = [model.freqs[:, 0].real, model.freqs[:, 0].imag]  # v0's unused RoPE tables: cos, then sin
        for i, (name, shape) in enumerate(_layout(c, version)):
            if name is None:
                f.write(tables.pop(0).float().contiguous().numpy().tobytes())
            elif version == 2 and i >= 3:
                for w in (t[name] if len(shape) == 3 else t[name][None]):
                    g = w.reshape(-1, group_size)
                    scale = g.abs().amax(dim=1) / 127.0
                    q = torch.round(g / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).to(torch.int8)
                    f.write(q.numpy().tobytes() + scale.numpy().tobytes())
            else:
                f.write(t[name].numpy().tobytes())


# -----------------------------------------------------------------------------
# tokenizer.bin

def read_tokenizer(path, vocab_size=None) -> Llama2cTokenizer:
    """llama2.c's tokenizer.bin; with vocab_size (the model's), the file must hold exactly that
    many tokens."""
    path = str(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise Llama2cError(f"{path}: not a llama2.c tokenizer: {len(data)} bytes, no max_token_length")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if max_len < 1:
        raise Llama2cError(f"{path}: not a llama2.c tokenizer: max_token_length is {max_len}")
    pieces, scores, pos = [], [], 4
    while pos < len(data):
        if pos + 8 > len(data):
            raise Llama2cError(f"{path}: truncated in token {len(pieces)}'s score and length (byte {pos})")
        score, n = struct.unpack_from("<fi", data, pos)
        if n < 0 or n > max_len or pos + 8 + n > len(data):
            what = "truncated" if 0 <= n <= max_len else f"length {n} outside 0..max_token_length {max_len}"
            raise Llama2cError(f"{path}: token {len(pieces)} at byte {pos}: {what}")
        pieces.append(data[pos + 8:pos + 8 + n])
        scores.append(score)
        pos += 8 + n
    if vocab_size is not None and len(pieces) != vocab_size:
        raise Llama2cError(f"{path}: holds {len(pieces)} tokens but the model's vocabulary has {vocab_size}")
    return Llama2cTokenizer(pieces, scores, max_len)


def write_tokenizer(tokenizer: Llama2cTokenizer, path):
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(tokenizer.max_token_length, max(map(len, tokenizer.pieces), default=1))))
        for piece, score in zip(tokenizer.pieces, tokenizer.scores):
            f.write(struct.pack("<fi", score, len(piece)) + piece)
