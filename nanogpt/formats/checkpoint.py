"""Our own checkpoint format: a plain dict loadable with torch.load(path, weights_only=True).

    {"model": state_dict tensors, "config": dict of GPTConfig values, "vocab": str of the sorted
     characters, plus plain numbers (iter_num, val_loss, ...)}; no pickled code or objects.
"""
import os
import sys
from dataclasses import asdict, fields

import torch

from nanogpt.models.gpt import GPT, GPTConfig


SHIPPED = "shakes2048.pt"  # the one shipped checkpoint: 2048-character context, serves every shakesN


def shipped_checkpoint_paths() -> list[str]:
    """Where the shipped checkpoint may be, in order: checkpoints/ of the clone this package
    runs from, then where `pip install .` puts it (setup.py's data_files: <prefix>/share/...)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [os.path.join(repo, "checkpoints", SHIPPED),
            os.path.join(sys.prefix, "share", "nanogpt-flash", "checkpoints", SHIPPED)]


def shipped_checkpoint() -> str:
    """The path of the shipped checkpoint; FileNotFoundError naming every place looked in."""
    paths = shipped_checkpoint_paths()
    for path in paths:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"the shipped checkpoint {SHIPPED} is in none of: {', '.join(paths)}; "
                            f"run from a clone of the repository (its checkpoints/ folder holds it) "
                            f"or reinstall with `pip install --no-build-isolation .` from that clone")


def checkpoint_dict(model, vocab, **extra):
    config = asdict(model.config)
    config["attention"] = "torch"  # the attention op is an inference-time choice, not part of the weights
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to transformer.wte.weight: store it once
    return {"model": state, "config": config, "vocab": "".join(vocab), **extra}


def load_checkpoint(path, attention="torch", map_location="cpu"):
    """Load a checkpoint written by nanogpt.train; returns (model in eval mode, vocab str, ckpt dict).

    Raises FileNotFoundError if it is missing, and ValueError naming the file if it is truncated,
    corrupt, holds pickled objects or does not match the
    model it describes.
    """
    path = str(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, garbage bytes, pickled objects refused by weights_only
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or not {"model", "config", "vocab"} <= set(ckpt):
        raise ValueError(f"checkpoint {path} is not a nanogpt checkpoint (needs keys 'model', 'config', 'vocab')")
    known = {f.name for f in fields(GPTConfig)}
    unknown = set(ckpt["config"]) - known
    if unknown:
        raise ValueError(f"checkpoint {path}: unknown config keys {sorted(unknown)}")
    config = GPTConfig(**{**ckpt["config"], "attention": "torch", "dropout": 0.0})
    vocab = ckpt["vocab"]
    if len(vocab) != config.vocab_size:
        raise ValueError(f"checkpoint {path}: vocab has {len(vocab)} characters but config.vocab_size is {config.vocab_size}")
    model = GPT(config)
    state = dict(ckpt["model"])
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))  # tied weights, stored once
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, t in expected.items():
        if not isinstance(state[name], torch.Tensor) or state[name].shape != t.shape:
            got = tuple(state[name].shape) if isinstance(state[name], torch.Tensor) else type(state[name]).__name__
            raise ValueError(f"checkpoint {path}: tensor {name} has shape {got}, the config expects {tuple(t.shape)}")
    model.load_state_dict(state)
    model.set_attention(attention)
    model.eval()
    return model, vocab, ckpt
