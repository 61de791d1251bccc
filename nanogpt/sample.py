"""
Generation and sampling shared by every model (the character GPT, GPT-2, Llama), and the
inference command (after nanoGPT's sample.py and the course's `gpt.py part0..3 -m shakesN`).

  python gpt.py part0 --inference -m shakes256            # attention "manual"
  python gpt.py part4 --inference -m shakes2048 --no-kv-cache
  python gpt.py part4 --inference -m model.bin --tokenizer tokenizer.bin --temperature 0 \\
      --prompt "Once upon a time" --max-new-tokens 50      # a llama2.c model, greedy

A shakesN name uses the one 2048-context character checkpoint and generates N characters; a
path is any format nanogpt.formats.load recognises. With the KV cache (default) the prompt is
run once, then every new token is one query attending to all cached keys (Nq=1, Nk=T).

A model for generate() is an nn.Module with forward(idx, kv_cache=None) -> (logits (B, 1, V)
of the last position, loss), a context_length, and new_kv_cache(batch_size) returning a cache
with .length and .reset().
"""

import os
import re
import time

import torch
from torch.nn import functional as F

from nanogpt.formats.checkpoint import shipped_checkpoint

MODELS = {"shakes128": 128, "shakes256": 256, "shakes1024": 1024, "shakes2048": 2048}  # name -> new characters
SEPARATOR = "-" * 40


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next tokens (B, 1). temperature 0 is greedy (argmax, the first maximum on
    ties); otherwise softmax(logits / temperature) restricted to the top_k most likely tokens
    and to the smallest set of them whose probability reaches top_p, then one draw from
    `generator`: the token torch.multinomial(probs, 1, generator=generator) gives (draw_one), so
    runs with the same seed draw the same tokens."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        v, _ = torch.topk(logits, top_k)
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        p, order = probs.sort(dim=-1, descending=True)
        p[(p.cumsum(dim=-1) - p) >= top_p] = 0.0  # the mass before a token already reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, p)
    return draw_one(probs, generator)


def draw_one(probs, generator=None):
    """probs (B, V), rows of a softmax -> (B, 1): the token torch.multinomial(probs, 1,
    generator=generator) draws, by the same steps (ATen's one-sample path: q ~ Exp(1) from the
    generator, then argmax(probs / q), the first maximum on ties; tests/test_model.py checks the
    two agree) without its checks of the whole row (three reductions, two of them read back: 7.6–8.5
    µs a draw of 65 tokens against multinomial's 15.3–16.0, alternated on a Zen 4). One check is
    kept: a row of NaN (NaN or infinite logits) raises, as multinomial does, instead of drawing
    token 0."""
    ratio = probs / torch.empty_like(probs).exponential_(1, generator=generator)
    best, idx = ratio.max(dim=-1, keepdim=True)
    if not (best.item() > 0 if best.numel() == 1 else bool((best > 0).all())):
        raise ValueError("the model's logits hold NaN or infinity: no token can be drawn")
    return idx


@torch.inference_mode()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
             kv_cache=True, stop_ids=()):
    """Sample up to max_new_tokens after idx (B, T); returns (tokens (B, T + n), n_crops).

    Stops early once every row has produced one of stop_ids (that token is kept; the caller
    cuts each row there). Context cropping (as nanoGPT): a sequence longer than the model's
    context_length is cut to its last context_length tokens. Positions restart at 0 after a crop
    (absolute embeddings, or RoPE's tables), so the cached keys/values are stale: with the cache
    we drop it and re-prefill the cropped window, and since the window then slides by one each
    step, every step past the context is a full re-prefill. n_crops counts the steps that cropped.
    """
    B, T0 = idx.shape
    block = model.context_length
    out = torch.empty(B, T0 + max_new_tokens, dtype=torch.long)  # written in place, no torch.cat
    out[:, :T0] = idx
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long) if stop_ids else None
    stopped = torch.zeros(B, dtype=torch.bool)
    stop_set = set(stop_ids)
    cache = model.new_kv_cache(B) if kv_cache else None
    decoder = model.decoder(cache) if cache is not None else None  # C++ steps (kernel attentions)
    n_crops, t = 0, T0  # t: tokens so far
    for _ in range(max_new_tokens):
        cropped = t > block
        n_crops += cropped
        # logits (B, vocab) of the last position; the window is sliced only where it is read
        if cache is None:
            logits = model(out[:, max(0, t - block):t])[0][:, -1]
        elif cropped or cache.length == 0:
            cache.reset()  # prefill (the prompt, or the cropped window at positions 0..)
            logits = model(out[:, max(0, t - block):t], kv_cache=cache)[0][:, -1]
        elif decoder is not None and t - cache.length == 1:  # one new token: the whole step in C++
            logits = decoder.step(out[:, cache.length], cache.length)
            cache.length += 1
        else:
            logits = model(out[:, cache.length:t], kv_cache=cache)[0][:, -1]  # the new token(s) only
        nxt = sample_next(logits.float(), temperature, top_k, top_p, generator)  # (B, 1)
        out[:, t:t + 1] = nxt
        t += 1
        if B == 1:  # the usual case: one Python int, no tensor ops
            if stop_set and nxt.item() in stop_set:
                break
        elif stop is not None:
            stopped |= torch.isin(nxt[:, 0], stop)
            if bool(stopped.all()):
                break
    return out[:, :t], n_crops


def cut_at_stop(ids, start, stop_ids):
    """ids (list) up to (not including) the first stop token at or after index start."""
    for i in range(start, len(ids)):
        if ids[i] in stop_ids:
            return ids[:i]
    return ids


def load_model(model, attention, checkpoint=None, tokenizer=None):
    """(model, tokenizer, new tokens per sample or None) for a shakesN name or a path."""
    from nanogpt import formats

    if model in MODELS:
        net, tok = formats.load(checkpoint or shipped_checkpoint(), tokenizer=tokenizer, attention=attention)
        return net, tok, MODELS[model]
    if not os.path.exists(model):
        raise FileNotFoundError(f"model {model!r} is neither one of {sorted(MODELS)} nor an existing path")
    net, tok = formats.load(model, tokenizer=tokenizer, attention=attention)
    return net, tok, None


def run_inference(attention, model="shakes256", samples=10, temperature=0.8, top_k=200, seed=1337,
                  prompt="\n", kv_cache=True, checkpoint=None, threads=None, verbose=True, corpus=None,
                  tokenizer=None, max_new_tokens=None, top_p=None, dtype=torch.float32):
    """Generate `samples` texts after `prompt`; print each (the prompt followed by the generated
    text) and a timing line; return a dict of the numbers (and the texts).

    attention: "torch", "manual" (the course's part0) or a name in nanogpt.VARIANTS.
    model: a shakesN name (the character checkpoint, N new characters; `checkpoint` overrides its
    path) or a path to a model file or directory; tokenizer: its tokenizer file, if not beside it.
    max_new_tokens: tokens per sample (default: N for shakesN, else 256). A sample ends early at
    the tokenizer's stop token (llama2.c: BOS; Hugging Face: the config's eos_token_id).
    dtype: of the weights and the KV cache (torch.bfloat16: the model converted after loading).
    corpus: optional path of a text; then the share of generated words that are words of it
    is printed and returned (does the model write the play's words?).
    Sampling draws from one torch.Generator seeded once with `seed`, so the texts are the same with
    and without kv_cache, and for every attention choice up to float rounding.
    """
    if threads:
        torch.set_num_threads(threads)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    net, tok, default_new = load_model(model, attention, checkpoint, tokenizer)
    net.weights_to(dtype)
    max_new = max_new_tokens if max_new_tokens is not None else (default_new or 256)
    if max_new < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new}")
    ids = tok.encode(prompt)
    if not ids:
        raise ValueError("prompt must hold at least one token")

    generator = torch.Generator().manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long)  # (1, T0)
    texts, n_crops, total_s, tokens = [], 0, 0.0, 0
    net.set_attention_timing(True)
    for _ in range(samples):
        t0 = time.perf_counter()
        y, crops = generate(net, x, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator, kv_cache=kv_cache, stop_ids=tok.stop_ids)
        total_s += time.perf_counter() - t0
        tokens += y.size(1) - x.size(1)
        n_crops += crops
        text = tok.decode(cut_at_stop(y[0].tolist(), x.size(1), tok.stop_ids))
        texts.append(text)
        if verbose:
            print(text)
            print(SEPARATOR)
    attn_s = net.attention_seconds()
    net.set_attention_timing(False)

    block = net.context_length
    if n_crops:
        cropping = (f"context cropped on {n_crops} steps to the last {block} tokens"
                    + (" (KV cache dropped and the window re-prefilled on each)" if kv_cache else ""))
    else:
        cropping = f"no cropping (prompt + {max_new} new tokens fit the context {block})"
    name = model if model in MODELS else os.path.basename(os.path.normpath(model))
    result = {
        "attention": attention, "model": model, "kv_cache": kv_cache, "samples": samples, "dtype": str(dtype),
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
        print(f"[{attention}, {name}, {str(dtype).replace('torch.', '')}, kv_cache={'on' if kv_cache else 'off'}, "
              f"{torch.get_num_threads()} threads] "
              f"{tokens} tokens in {total_s:.2f}s: {result['tokens_per_s']:.1f} tokens/s, "
              f"{result['ms_per_token']:.2f} ms/token, attention {100 * result['attention_share']:.1f}% of the time; "
              f"{cropping}")
    return result
