"""
Sample from the trained character-level GPT with a chosen attention implementation, and time it
(after nanoGPT's sample.py and the course's `gpt.py part0..3 -m shakesN`).

  python gpt.py part0 --inference -m shakes256            # attention "manual"
  python gpt.py part4 --inference -m shakes2048 --no-kv-cache

Every model name uses the one 2048-context checkpoint; the number is how many characters each
sample generates. With the KV cache (default) the prompt is run once, then every new character is
one query attending to all cached keys (Nq=1, Nk=T).
"""

import os
import re
import time

import torch

from nanogpt.formats.checkpoint import load_checkpoint, shipped_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CHECKPOINT = os.path.join(REPO, "checkpoints", "shakes2048.pt")
MODELS = {"shakes128": 128, "shakes256": 256, "shakes1024": 1024, "shakes2048": 2048}  # name -> new characters
SEPARATOR = "-" * 40


def run_inference(attention, model="shakes256", samples=10, temperature=0.8, top_k=200, seed=1337,
                  prompt="\n", kv_cache=True, checkpoint=None, threads=None, verbose=True, corpus=None):
    """Generate `samples` texts of MODELS[model] characters each after `prompt`; print them and a
    timing line; return a dict of the numbers (and the texts).

    attention: "torch", "manual" (the course's part0) or a name in nanogpt.VARIANTS.
    corpus: optional path of a text; then the share of generated words that are words of it
    is printed and returned (does the model write the play's words?).
    Sampling draws from one torch.Generator seeded once with `seed`, so the texts are the same with
    and without kv_cache, and for every attention choice up to float rounding.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: expected one of {sorted(MODELS)}")
    if threads:
        torch.set_num_threads(threads)
    path = checkpoint or shipped_checkpoint()
    gpt, vocab, _ = load_checkpoint(path, attention=attention)
    stoi = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted(set(prompt) - set(stoi))
    if unknown:
        raise ValueError(f"prompt has characters not in the vocabulary of {path}: {unknown!r}")
    if not prompt:
        raise ValueError("prompt must hold at least one character")
    max_new = MODELS[model]

    generator = torch.Generator().manual_seed(seed)
    x = torch.tensor([[stoi[c] for c in prompt]], dtype=torch.long)  # (1, T0)
    texts, n_crops, total_s = [], 0, 0.0
    gpt.set_attention_timing(True)
    for _ in range(samples):
        t0 = time.perf_counter()
        y, crops = gpt.generate(x, max_new, temperature=temperature, top_k=top_k, generator=generator,
                                kv_cache=kv_cache)
        total_s += time.perf_counter() - t0
        n_crops += crops
        text = "".join(vocab[i] for i in y[0].tolist())
        texts.append(text)
        if verbose:
            print(text)
            print(SEPARATOR)
    attn_s = gpt.attention_seconds()
    gpt.set_attention_timing(False)

    tokens = samples * max_new
    block = gpt.config.block_size
    if n_crops:
        cropping = (f"context cropped on {n_crops} steps to the last {block} tokens"
                    + (" (KV cache dropped and the window re-prefilled on each)" if kv_cache else ""))
    else:
        cropping = f"no cropping (prompt + {max_new} new tokens fit block_size {block})"
    result = {
        "attention": attention, "model": model, "kv_cache": kv_cache, "samples": samples,
        "tokens": tokens, "seconds": total_s,
        "tokens_per_s": tokens / total_s if total_s > 0 else float("inf"),
        "ms_per_token": 1000 * total_s / tokens if tokens else 0.0,
        "attention_seconds": attn_s, "attention_share": attn_s / total_s if total_s > 0 else 0.0,
        "crops": n_crops, "cropping": cropping, "texts": texts,
    }
    if corpus:
        known = set(re.findall(r"[a-z']+", open(corpus, encoding="utf-8").read().lower()))
        words = [w for t in texts for w in re.findall(r"[a-z']+", t.lower())]
        result["corpus_words"] = (sum(w in known for w in words), len(words))
        if verbose:
            hits, n = result["corpus_words"]
            print(f"{hits} of {n} generated words ({100 * hits / max(n, 1):.1f}%) are words of {corpus}")
    if verbose:
        print(f"[{attention}, {model}, kv_cache={'on' if kv_cache else 'off'}, {torch.get_num_threads()} threads] "
              f"{tokens} tokens in {total_s:.2f}s: {result['tokens_per_s']:.1f} tokens/s, "
              f"{result['ms_per_token']:.2f} ms/token, attention {100 * result['attention_share']:.1f}% of the time; "
              f"{cropping}")
    return result
