"""nanogpt-flash's command line: the course's parts, inference, benchmark, tile sweep, training.

    python gpt.py part4                       flash vs SDPA at B1 H4 N1024 d32: match, time, memory
    python gpt.py part2 -N 512 --causal       any part, any shape
    python gpt.py part4 --inference -m shakes256   generate Shakespeare with the flash kernel
    python gpt.py part4 --inference -m model.bin --tokenizer tokenizer.bin --temperature 0 --prompt "Once"
                                              a llama2.c model (or a Hugging Face GPT-2 / Llama directory)
    python gpt.py bench [--json bench.json]   every variant × default shapes, interleaved with SDPA
    python gpt.py sweep -N 2048               flash over a Br×Bc grid, with a heat map
    python gpt.py train --help                train a model (nanogpt/train.py)

part0 is plain PyTorch (softmax(QKᵀ·scale)V with torch ops; the model calls this path
"manual"); part1, part2, ... are the rows of the extension's dispatch table in ladder order,
one subcommand per row (listing them loads the extension: on first use it compiles, about a
minute). `python gpt.py COMMAND --help` lists each command's own options.
"""
import argparse
import os
import sys

import torch

from nanogpt.sample import MODELS

FIXED = ("bench", "sweep", "tune", "train")  # the commands that are not parts
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}  # --dtype
SHAPE = {"N": 1024, "B": 1, "H": 4, "d": 32}  # the parts' default shape (the course's)
INFERENCE = {"model": "shakes128", "samples": 10, "temperature": 0.8, "top_k": 200, "seed": 1337,
             "prompt": "\n", "no_kv_cache": False, "corpus": None, "tokenizer": None, "max_new_tokens": None,
             "top_p": None, "dtype": None}  # defaults of the inference options


def part_names():
    """(name, variant, help) per part: part0 is bench.PART0, partN the Nth row of the table."""
    import nanogpt
    from nanogpt import bench

    adds = dict(nanogpt.extension().variants())
    return [(f"part{n}", variant, f"{variant}: {adds[variant]}" if variant in adds
             else f"{variant}: plain PyTorch softmax(QKᵀ·scale)V with torch ops, the reference")
            for n, variant in enumerate(bench.parts())]


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_shape(p, tiles: bool):
    """-N -B -H -d (defaults None: the caller tells given from default) and --causal."""
    g = p.add_argument_group("shape")
    for name, what in (("N", "sequence length"), ("B", "batch size"), ("H", "heads"), ("d", "head dimension")):
        g.add_argument(f"-{name}", type=positive, default=None, help=f"{what} (default {SHAPE[name]})")
    if tiles:
        g.add_argument("-br", type=positive, default=None,
                       help="tile height Br, query rows per tile (flash, blocked; default: per variant and shape)")
        g.add_argument("-bc", type=positive, default=None,
                       help="tile width Bc, keys per tile (flash, blocked; default: per variant and shape)")
    return g


def add_part(sub, name, variant, help_text):
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(command=name, variant=variant)
    import nanogpt

    g = add_shape(p, tiles=variant in nanogpt.extension().tiled())  # -br/-bc only where the kernel reads them
    g.add_argument("--causal", action="store_true", help="causal mask (bottom-right aligned)")
    g.add_argument("--repeat", type=positive, default=None, help="timed repetitions, median kept (default 9)")
    inf = p.add_argument_group("inference (with --inference only)")
    inf.add_argument("--inference", action="store_true", help="generate text with the model on this part's attention")
    inf.add_argument("-m", "--model", default=None, metavar="MODEL",
                     help=f"one of {', '.join(sorted(MODELS, key=MODELS.get))} (the character checkpoint, N characters "
                          "per sample; default shakes128), or a path: a nanogpt checkpoint (.pt), a llama2.c model.bin "
                          "(v0, v1, v2) or a Hugging Face GPT-2 / Llama directory")
    inf.add_argument("--tokenizer", default=None, help="the model's tokenizer.bin / tokenizer.json if not beside it")
    inf.add_argument("--max-new-tokens", type=positive, default=None,
                     help="tokens per sample (default: N for shakesN, else 256)")
    inf.add_argument("--samples", type=positive, default=None, help="samples to generate (default 10)")
    inf.add_argument("--temperature", type=float, default=None, help="sampling temperature, 0 = greedy argmax (default 0.8)")
    inf.add_argument("--top-k", type=positive, default=None, help="sample from the k most likely tokens (default 200)")
    inf.add_argument("--top-p", type=float, default=None,
                     help="sample from the most likely tokens holding probability p (nucleus; default off)")
    inf.add_argument("--seed", type=int, default=None, help="random seed (default 1337)")
    inf.add_argument("--prompt", default=None, help="text to start from (default: a newline)")
    inf.add_argument("--no-kv-cache", action="store_true", default=None,
                     help="recompute the whole context for every new character")
    inf.add_argument("--corpus", default=None, help="a text file: also print the share of generated words that are words of it")
    inf.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                     help="weights and KV cache in this dtype (default float32; bf16: bfloat16, half the bytes a "
                          "token reads, attention and projections in float32 arithmetic)")


def build_parser(with_parts: bool = True) -> argparse.ArgumentParser:
    """The whole command line. with_parts=False leaves out part0..partN (listing them needs the
    extension), for the commands that do not need it."""
    p = argparse.ArgumentParser(prog="gpt.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(title="commands", metavar="COMMAND", required=True)
    p.commands = sub.choices  # {name: the command's own parser}, for its usage in errors
    if with_parts:
        for name, variant, help_text in part_names():
            add_part(sub, name, variant, help_text)

    b = sub.add_parser("bench", help="every variant × shape, interleaved with SDPA",
                       description="Verifies every variant against SDPA, then times each variant × shape × mask "
                                   "interleaved with SDPA. Default: five shapes, causal and not; -N -B -H -d "
                                   "(any of them) time that one shape instead.")
    b.set_defaults(command="bench")
    add_shape(b, tiles=False)
    mask = b.add_mutually_exclusive_group()
    mask.add_argument("--causal", dest="mask", action="store_const", const="causal", help="causal masks only")
    mask.add_argument("--non-causal", dest="mask", action="store_const", const="none", help="no masks only")
    b.add_argument("--repeat", type=positive, default=None,
                   help="timed repetitions, median kept (default 7; --decode 15, --backward 7)")
    b.add_argument("--variants", default=None, help="comma-separated variants (default: the whole dispatch table)")
    b.add_argument("--json", default=None, help="save the table to this JSON file")
    b.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="q, k, v (and SDPA's) in this dtype (bf16: bfloat16; %%peak then of the bf16 dot peak "
                        "where the CPU has AVX-512 BF16)")
    kind = b.add_mutually_exclusive_group()
    kind.add_argument("--decode", action="store_true",
                      help="time flash's decode path (KV-cache steps: few queries, long caches) against SDPA instead")
    kind.add_argument("--backward", action="store_true",
                      help="time flash's forward+backward against SDPA's on training shapes (causal) instead")

    s = sub.add_parser("sweep", help="flash over a Br×Bc grid, with a heat map",
                       description="Times flash over a Br×Bc grid (interleaved with SDPA, median) and marks the best.")
    s.set_defaults(command="sweep")
    add_shape(s, tiles=False)
    s.add_argument("--causal", action="store_true", help="causal mask (bottom-right aligned)")
    s.add_argument("--repeat", type=positive, default=5, help="timed repetitions, median kept (default 5)")
    s.add_argument("--png", default="sweep.png", help="heat-map file (default sweep.png)")
    s.add_argument("--save", action="store_true",
                   help="keep the best cell as this CPU's default tiles for heads of size <= d (see `tune`)")

    u = sub.add_parser("tune", help="measure flash's tiles on this CPU and keep them as its defaults",
                       description="Sweeps flash's Br×Bc at N (default 2048) for each head size and saves the best "
                                   "cell of each in a file named after this CPU, read by every later run (nanogpt.tune).")
    u.set_defaults(command="tune")
    u.add_argument("-N", type=positive, default=2048, help="sequence length of the sweep (default 2048)")
    u.add_argument("--dims", default="32,64,128", help="head sizes to tune, comma-separated (default 32,64,128)")
    u.add_argument("--repeat", type=positive, default=5, help="timed repetitions, median kept (default 5)")

    from nanogpt import train

    t = sub.add_parser("train", help="train a model (nanogpt/train.py)", description=train.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.set_defaults(command="train")
    train.add_arguments(t)
    return p


def check(p: argparse.ArgumentParser, args) -> None:
    """Rejects options that the command would ignore, fills in defaults, checks files first."""
    sub = p.commands[args.command]
    if args.command == "train":
        from nanogpt import train

        train.check_args(sub, args)
        return
    if args.command == "tune":  # its own -N; no other shape
        return
    if args.command.startswith("part"):
        if args.inference:
            given = [f"-{n}" for n in ("N", "B", "H", "d", "br", "bc") if getattr(args, n, None) is not None]
            given += [f"--{n}" for n in ("causal",) if args.causal] + (["--repeat"] if args.repeat else [])
            if given:
                sub.error(f"{', '.join(given)}: options of the timed attention call, not of --inference "
                          f"(the model has its own shapes): drop {' '.join(given)}")
            for name, default in INFERENCE.items():
                if getattr(args, name) is None:
                    setattr(args, name, default)
            if args.corpus is not None and not os.path.isfile(args.corpus):
                sub.error(f"--corpus {args.corpus}: no such file")
        else:
            given = [f"--{n.replace('_', '-')}" for n in INFERENCE if getattr(args, n) is not None]
            if given:
                sub.error(f"{', '.join(given)}: options of text generation: add --inference")
            args.repeat = args.repeat or 9
    given_shape = [f"-{name}" for name in SHAPE if getattr(args, name) is not None]
    args.shape_given = bool(given_shape)
    for name, default in SHAPE.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.command == "bench" and (args.decode or args.backward):
        given = list(given_shape)
        given += [flag for flag, on in (("--variants", args.variants), ("--json", args.json and args.decode),
                                        ("--causal/--non-causal", args.mask),
                                        ("--dtype", args.backward and args.dtype != "float32")) if on]
        if given:
            what = "--decode" if args.decode else "--backward"
            sub.error(f"{what} times its own shapes with flash and SDPA: drop {', '.join(given)}")
    if args.command == "bench":
        from nanogpt import bench

        known = bench.parts()
        variants = args.variants.split(",") if args.variants else None
        unknown = [v for v in variants or () if v not in known]
        if unknown:
            sub.error(f"--variants: unknown {', '.join(unknown)}; expected names from {', '.join(known)}")
        args.variants = variants


def parse_args(argv):
    with_parts = not (argv[:1] and argv[0] in FIXED)
    try:
        p = build_parser(with_parts)
    except Exception as e:  # the extension's build failed: say so instead of a traceback
        print(f"gpt.py: cannot list the parts: the attention extension did not build or load: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        print("gpt.py: see README.md, 'Set-up' (g++ with OpenMP and the Python headers are needed); "
              "`python gpt.py train ...` works without the extension", file=sys.stderr)
        sys.exit(1)
    args, extra = p.parse_known_args(argv)
    if extra:  # reported by the command's own parser, which knows what the command takes
        p.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)} "
                                       f"(`gpt.py {args.command} --help` lists its options)")
    check(p, args)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.command == "train":
        from nanogpt import train

        try:
            train.run(args, argv[1:])
        except FileNotFoundError as e:  # no prepared data, a missing --init-from: one line, not a traceback
            print(f"gpt.py train: error: {e}", file=sys.stderr)
            return 2
        return 0
    from nanogpt import bench

    if args.command == "bench" and args.decode:
        return 0 if bench.bench_decode(repeat=args.repeat or 15, dtype=DTYPES[args.dtype]) else 1
    if args.command == "bench" and args.backward:
        return 0 if bench.bench_backward(repeat=args.repeat or 7, json_path=args.json) else 1
    if args.command == "bench":
        shapes = [(args.B, args.H, args.N, args.d)] if args.shape_given else bench.BENCH_SHAPES
        causals = {"causal": (True,), "none": (False,), None: (False, True)}[args.mask]
        return 0 if bench.bench(shapes, causals, variants=args.variants, repeat=args.repeat or 7, json_path=args.json,
                                dtype=DTYPES[args.dtype]) else 1
    if args.command == "sweep":
        result = bench.sweep(args.B, args.H, args.N, args.d, args.causal, repeat=args.repeat, png=args.png)
        if args.save:
            from nanogpt import tuning as tune

            print(f"saved Br={result['best'][0]} Bc={result['best'][1]} for d <= {args.d} in "
                  f"{tune.save(args.d, *result['best'])}")
        return 0
    if args.command == "tune":
        from nanogpt import tuning as tune

        try:
            dims = [int(x) for x in args.dims.split(",")]
        except ValueError:
            dims = []
        if not dims or min(dims) < 1:
            print(f"gpt.py tune: error: --dims must be positive head sizes separated by commas, got {args.dims!r}",
                  file=sys.stderr)
            return 2
        tune.tune(args.N, dims, repeat=args.repeat)
        return 0
    if args.inference:
        from nanogpt.sample import run_inference

        if args.no_kv_cache:
            announce_duration(args)
        try:
            run_inference(args.variant, model=args.model, samples=args.samples, temperature=args.temperature,
                          top_k=args.top_k, seed=args.seed, prompt=args.prompt, kv_cache=not args.no_kv_cache,
                          corpus=args.corpus, tokenizer=args.tokenizer, max_new_tokens=args.max_new_tokens,
                          top_p=args.top_p, dtype=DTYPES[args.dtype or "float32"])
        except (ValueError, FileNotFoundError) as e:  # a bad model file, tokenizer or prompt: the message names it
            print(f"gpt.py: error: {e}", file=sys.stderr)
            return 2
        return 0
    ok = bench.part(args.variant, args.B, args.H, args.N, args.d, args.causal, getattr(args, "br", None),
                    getattr(args, "bc", None), repeat=args.repeat)
    return 0 if ok else 1


def announce_duration(args) -> None:
    """Without the KV cache every character re-runs its whole context (minutes at shakes2048 on
    part0): time trial passes of the model over 1 token, a quarter of the longest context and
    the longest, and say roughly how long the run will take if that is more than a few seconds."""
    import time

    from nanogpt.formats.checkpoint import load_checkpoint, shipped_checkpoint
    from nanogpt.host import format_duration, quadratic_total

    if args.model not in MODELS:  # a model file or directory: no estimate
        return
    model, vocab, _ = load_checkpoint(shipped_checkpoint(), attention=args.variant)
    block, t0 = model.config.block_size, len(args.prompt)
    lengths = [min(t0 + t, block) for t in range(MODELS[args.model])] * args.samples
    trials = []
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long))  # warm-up: first-call costs are not per pass
        for n in sorted({1, max(1, max(lengths) // 4), max(lengths)}):
            start = time.perf_counter()
            model(torch.zeros(1, n, dtype=torch.long))
            trials.append((n, time.perf_counter() - start))
    total = quadratic_total(lengths, trials)
    if total > 10:
        print(f"no KV cache: {len(lengths)} passes over up to {max(lengths)} tokens, about "
              f"{format_duration(total)} on this machine now (from trial passes over "
              f"{', '.join(str(n) for n, _ in trials)} tokens)", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    status = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun rank ends here without Python's finalization, in which a gloo worker
        # thread could still abort it after a run that succeeded (nanogpt/train.py's
        # Ranks.barrier says how; seen again in CI on 2026-12-05). Everything is written by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
