"""The character-level data: tokenising a text, the prepared token files, and random batches.

Written by data/shakespeare_char/prepare.py into one folder:
  train.bin, val.bin   uint16 token ids (the first 90% of the text, and the last 10%)
  vocab.json           the sorted character list (index = token id)
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

PREPARE = "python data/shakespeare_char/prepare.py --input FILE"


def encode(text: str, train_frac: float = 0.9):
    """(chars, train_ids, val_ids): the sorted characters and the two splits as uint16 arrays."""
    chars = sorted(set(text))
    if len(chars) > 65535:
        raise ValueError(f"{len(chars)} distinct characters do not fit uint16 token ids")
    stoi = {ch: i for i, ch in enumerate(chars)}
    split = int(len(text) * train_frac)
    train = np.array([stoi[c] for c in text[:split]], dtype=np.uint16)
    val = np.array([stoi[c] for c in text[split:]], dtype=np.uint16)
    return chars, train, val


def write(out_dir: str, chars, train, val) -> None:
    os.makedirs(out_dir, exist_ok=True)
    train.tofile(os.path.join(out_dir, "train.bin"))
    val.tofile(os.path.join(out_dir, "val.bin"))
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(chars, f, ensure_ascii=False)


def _require(data_dir: str, name: str) -> str:
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: prepare the data first ({PREPARE} --out-dir {data_dir})")
    return path


def load_split(data_dir: str, split: str) -> torch.Tensor:
    """The token ids of one split ("train" or "val") as an int64 tensor."""
    return torch.from_numpy(np.fromfile(_require(data_dir, f"{split}.bin"), dtype=np.uint16).astype(np.int64))


def load_vocab(data_dir: str) -> str:
    with open(_require(data_dir, "vocab.json"), encoding="utf-8") as f:
        return "".join(json.load(f))


def get_batch(data: torch.Tensor, batch_size: int, context: int, generator: torch.Generator):
    """Random windows of the token array: x (B, context) and y = x shifted by one (B, context)."""
    if len(data) <= context + 1:
        raise ValueError(f"split has {len(data)} tokens, too few for context {context}")
    ix = torch.randint(len(data) - context - 1, (batch_size,), generator=generator)
    x = torch.stack([data[i:i + context] for i in ix.tolist()])
    y = torch.stack([data[i + 1:i + 1 + context] for i in ix.tolist()])
    return x, y
