"""nanogpt-flash's command line: the course's parts, inference, benchmark, tile sweep, training.

    python gpt.py part4                       flash vs SDPA at B1 H4 N1024 d32: match, time, memory
    python gpt.py part2 -N 512 --causal       any part, any shape
    python gpt.py part4 --inference -m shakes256   generate Shakespeare with the flash kernel
    python gpt.py part4 --inference -m model.bin --tokenizer tokenizer.bin --temperature 0 --prompt "Once"
                                              a llama2.c model (or a Hugging Face GPT-2 / Llama directory)
    python gpt.py bench [--json bench.json]   every variant × default shapes, interleaved with SDPA
    python gpt.py sweep -N 2048               flash over a Br×Bc grid, with a heat map
    python gpt.py train --help                train a model (nanogpt/train.py)

part0 is plain PyTorch (softmax(QKᵀ·scale)V with torch ops); part1..part4 are the variants of
the extension's dispatch table in ladder order: naive, blocked, fused, flash.
"""
import argparse
import sys

import torch

from nanogpt.sample import MODELS

PARTS = ("part0", "part1", "part2", "part3", "part4")


def variant_of(part: str):
    """part0 → None (plain PyTorch); partN → the Nth variant of the dispatch table."""
    import nanogpt

    n = int(part[-1])
    return None if n == 0 else nanogpt.VARIANTS[n - 1]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=PARTS + ("bench", "sweep", "train"), help="what to run")
    shape = p.add_argument_group("shape (parts, sweep)")
    shape.add_argument("-N", type=int, default=1024, help="sequence length (default 1024)")
    shape.add_argument("-B", type=int, default=1, help="batch size (default 1)")
    shape.add_argument("-H", type=int, default=4, help="heads (default 4)")
    shape.add_argument("-d", type=int, default=32, help="head dimension (default 32)")
    shape.add_argument("-br", type=int, default=None, help="tile height Br, query rows per tile, for flash and blocked (default: per variant and shape)")
    shape.add_argument("-bc", type=int, default=None, help="tile width Bc, keys per tile, for flash and blocked (default: per variant and shape)")
    shape.add_argument("--causal", action="store_true", help="causal mask (bottom-right aligned)")
    shape.add_argument("--repeat", type=int, default=None, help="timed repetitions, median kept (default 9; bench 7; sweep 5)")
    shape.add_argument("--sweep", action="store_true", help="with part4: same as the sweep command")
    inf = p.add_argument_group("inference (with a part)")
    inf.add_argument("--inference", action="store_true", help="generate text with the model on this part's attention")
    inf.add_argument("-m", "--model", default="shakes128", metavar="MODEL",
                     help=f"one of {', '.join(sorted(MODELS, key=MODELS.get))} (the character checkpoint, N characters "
                          "per sample), or a path: a nanogpt checkpoint (.pt), a llama2.c model.bin (v0, v1, v2) or "
                          "a Hugging Face GPT-2 / Llama directory")
    inf.add_argument("--tokenizer", default=None, help="the model's tokenizer.bin / tokenizer.json if not beside it")
    inf.add_argument("--max-new-tokens", type=int, default=None, help="tokens per sample (default: N for shakesN, else 256)")
    inf.add_argument("--samples", type=int, default=10, help="samples to generate (default 10)")
    inf.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, 0 = greedy argmax (default 0.8)")
    inf.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens (default 200)")
    inf.add_argument("--top-p", type=float, default=None, help="sample from the most likely tokens holding probability p (nucleus; default off)")
    inf.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    inf.add_argument("--prompt", default="\n", help="text to start from (default: a newline)")
    inf.add_argument("--no-kv-cache", action="store_true", help="recompute the whole context for every new character")
    inf.add_argument("--corpus", default=None, help="a text file: also print the share of generated words that are words of it")
    out = p.add_argument_group("bench")
    out.add_argument("--json", default=None, help="bench: save the table to this JSON file")
    out.add_argument("--variants", default=None, help="bench: comma-separated variants (default: all)")
    out.add_argument("--png", default="sweep.png", help="sweep: heat-map file (default sweep.png)")
    args = p.parse_args(argv)
    for name in ("N", "B", "H", "d"):
        if getattr(args, name) < 1:
            p.error(f"-{name} must be at least 1")
    for name in ("br", "bc"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"-{name} must be at least 1")
    if args.sweep and args.command != "part4":
        p.error("--sweep sweeps flash's tiles: use it with part4 (or the sweep command)")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # training has its own options
        from nanogpt import train

        return train.main(argv[1:]) or 0
    args = parse_args(argv)
    from nanogpt import bench

    if args.command == "bench":
        variants = args.variants.split(",") if args.variants else None
        return 0 if bench.bench(variants=variants, repeat=args.repeat or 7, json_path=args.json) else 1
    if args.command == "sweep" or args.sweep:
        bench.sweep(args.B, args.H, args.N, args.d, args.causal, repeat=args.repeat or 5, png=args.png)
        return 0
    variant = variant_of(args.command)
    if args.inference:
        from nanogpt.sample import run_inference

        try:
            run_inference("manual" if variant is None else variant, model=args.model, samples=args.samples,
                          temperature=args.temperature, top_k=args.top_k, seed=args.seed, prompt=args.prompt,
                          kv_cache=not args.no_kv_cache, corpus=args.corpus, tokenizer=args.tokenizer,
                          max_new_tokens=args.max_new_tokens, top_p=args.top_p)
        except (ValueError, FileNotFoundError) as e:  # a bad model file, tokenizer or prompt: the message names it
            print(f"gpt.py: error: {e}", file=sys.stderr)
            return 2
        return 0
    ok = bench.part(variant, args.B, args.H, args.N, args.d, args.causal, args.br, args.bc, repeat=args.repeat or 9)
    return 0 if ok else 1


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
