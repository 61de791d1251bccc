"""
Train the character-level GPT on data prepared by data/shakespeare_char/prepare.py (after nanoGPT's
train.py, on the CPU: one process, or data-parallel ranks under torchrun).

  python gpt.py train --context 256 --max-steps 2000 --out out/phase1.pt
  python gpt.py train --init-from out/phase1.pt --context 2048 --out out/phase2.pt
  python gpt.py train --eval-only --init-from checkpoints/shakes2048.pt --context 2048
  torchrun --standalone --nproc_per_node=2 gpt.py train --batch-size 8     2 ranks x 8 windows a step

Files: --out (default out/ckpt.pt) is the best-val-loss model (weights, config, vocab; no optimizer
state: this is what ships). Next to it, <out stem>.resume.pt holds the latest full training state
(model, optimizer, step, RNG states) written at every evaluation; --resume continues from it,
bit-for-bit the same run as without interruption (same options, --threads and number of ranks).
An existing file under the repository's checkpoints/ is never overwritten without --force.

Batches: every optimizer step draws one global batch of --batch-size x --grad-accum windows from a
generator seeded alike on every rank, so the global batch does not depend on the number of ranks:
rank r trains on its own consecutive 1/world of it (--grad-accum / world micro-batches of
--batch-size), DistributedDataParallel (gloo, CPU) averages the gradients. So 2 ranks with
--batch-size b take the same steps as 1 process with --batch-size 2b (up to float rounding).
Evaluation splits each evaluation batch over the ranks and averages with all_reduce: every rank
gets the number one process would. Only rank 0 prints and writes files.
"""

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.distributed as dist
from tqdm import tqdm

from nanogpt.data import get_batch, load_split, load_vocab
from nanogpt.formats.checkpoint import checkpoint_dict, load_checkpoint
from nanogpt.models.gpt import GPT, GPTConfig, check_attention

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_DIR = os.path.join(REPO, "checkpoints")  # tracked checkpoints: never overwritten without --force
PLAIN_ATTENTION = ("torch", "manual")  # torch ops with autograd; the kernels are nanogpt.VARIANTS


def resume_path(out):
    root, _ = os.path.splitext(out)
    return root + ".resume.pt"


def world_from_env():
    """(rank, world size) as torchrun sets them in the environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def training_attention(choice, dropout, say=print):
    """The attention that --attention `choice` trains on: itself, or for "auto" flash (faster
    than SDPA forward and backward: `gpt.py bench --backward`) unless the model has attention
    dropout (flash has none) or the extension cannot be built here (then torch, saying why)."""
    if choice != "auto":
        return choice
    if dropout:
        return "torch"
    import nanogpt

    try:
        nanogpt.extension()  # builds on first use
    except Exception as e:  # no compiler, a failed build, ...: SDPA still trains
        say(f"--attention auto: the kernels are not available ({type(e).__name__}: {e}); training on torch (SDPA)")
        return "torch"
    return "flash"


def attention_has_backward(attention):
    """True if training through this attention can compute gradients (one tiny backward tells)."""
    if attention in PLAIN_ATTENTION:
        return True
    import nanogpt

    q = torch.randn(1, 1, 3, 2, requires_grad=True)  # (B, H, N, d)
    try:
        nanogpt.attention(q, q, q, variant=attention, causal=True).sum().backward()
    except NotImplementedError:
        return False
    return True


# -----------------------------------------------------------------------------
# data parallelism: a no-op with one process

class Ranks:
    """This process's place among the training processes: rank, world, and the collectives.

    Under torchrun (WORLD_SIZE > 1) it joins a gloo process group; everything is on the CPU.
    """

    def __init__(self):
        self.rank, self.world = world_from_env()
        self.ddp = self.world > 1
        if self.ddp and not dist.is_initialized():
            dist.init_process_group("gloo")
        self.main = self.rank == 0

    def part(self, n):
        """[lo, hi) of this rank's share of n items (consecutive, sizes differ by at most one)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def sum(self, values):
        """Elementwise sum over ranks of a list of floats (float64 on the wire)."""
        t = torch.tensor(values, dtype=torch.float64)
        if self.ddp:
            dist.all_reduce(t)
        return t.tolist()

    def from_main(self, make):
        """make() on rank 0, its result (or the exception it raised) on every rank."""
        result = None
        if self.main:
            try:
                result = make()
            except Exception as e:  # sent to the other ranks so that none waits forever
                result = e
        if self.ddp:
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        if isinstance(result, Exception):
            raise result
        return result

    def gather(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on rank 0 (None elsewhere); [obj] alone."""
        if not self.ddp:
            return [obj]
        box = [None] * self.world if self.main else None
        dist.gather_object(obj, box, dst=0)
        return box

    def barrier(self):
        """Waits for every rank, with the GIL released. At the end of a run: gloo's worker thread
        frees a finished collective's tensors after the caller has woken, and that takes the GIL;
        a rank that went straight on to exit left it waiting while Python finalized, and the
        thread's forced exit aborted the process (SIGABRT, "terminate called without an active
        exception", seen after gather_object about once in 40 runs). This made it rare; gpt.py
        closes the rest of that window by ending a torchrun rank with os._exit."""
        if self.ddp:
            dist.barrier()

    def close(self):
        if self.ddp and dist.is_initialized():
            dist.destroy_process_group()


def load_model(path, ranks):
    """load_checkpoint on rank 0 (the only one that must see the file); every rank gets the same
    model, vocab and checkpoint dict (optimizer and RNG states too, for a resume file)."""
    def read():
        model, vocab, ck = load_checkpoint(path)
        ck = dict(ck, model=model.state_dict())  # checked and with the tied weight restored
        return asdict(model.config), vocab, ck

    config, vocab, ck = ranks.from_main(read)
    model = GPT(GPTConfig(**config))  # attention "torch", dropout 0: load_checkpoint's choice
    model.load_state_dict(ck["model"])
    return model, vocab, ck


# -----------------------------------------------------------------------------

@torch.no_grad()
def estimate_loss(model, splits, batch_size, context, eval_iters, seed, ranks):
    """Mean loss over eval_iters random batches of batch_size windows per split; the batches come
    from a generator seeded the same way at every call (and on every rank), so successive
    evaluations are comparable. Each rank computes its part of every batch; one all_reduce."""
    was_training = model.training
    model.eval()
    lo, hi = ranks.part(batch_size)
    totals = []
    for data in splits.values():
        g = torch.Generator().manual_seed(seed)
        total = 0.0  # sum over this rank's windows of the window's mean loss
        for _ in range(eval_iters):
            x, y = get_batch(data, batch_size, context, g)  # (batch_size, context): the global batch
            if hi > lo:
                total += model(x[lo:hi], y[lo:hi])[1].item() * (hi - lo)
        totals.append(total)
    model.train(was_training)
    sums = ranks.sum(totals)
    return {name: s / (batch_size * eval_iters) for name, s in zip(splits, sums)}


def get_lr(step, args):
    """Linear warmup to args.lr, then cosine decay to args.min_lr at args.max_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / (args.warmup_steps + 1)
    if step >= args.max_steps:
        return args.min_lr
    ratio = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return args.min_lr + coeff * (args.lr - args.min_lr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Training's options, on p (gpt.py's `train` subcommand, or this module's own parser)."""
    g = p.add_argument_group("data and files")
    g.add_argument("--data-dir", default=os.path.join(REPO, "data", "shakespeare_char"),
                   help="prepared data: train.bin, val.bin, vocab.json (python data/shakespeare_char/prepare.py)")
    g.add_argument("--out", default=os.path.join(REPO, "out", "ckpt.pt"),
                   help="best-val checkpoint (model only; default out/ckpt.pt); the resume state goes to "
                        "<stem>.resume.pt")
    g.add_argument("--force", action="store_true", help="allow --out to overwrite a file under checkpoints/")
    g.add_argument("--resume", action="store_true", help="continue from <out stem>.resume.pt")
    g.add_argument("--init-from", help="start from this checkpoint's weights and config, fresh optimizer and schedule")
    g.add_argument("--eval-only", action="store_true", help="evaluate (needs --init-from or --resume) and exit")
    g.add_argument("--log-file", default=None,
                   help="append one JSON object per evaluation (step, train_loss, val_loss, tokens_per_s, attention, ...)")
    g = p.add_argument_group("model (ignored with --init-from / --resume)")
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--n-head", type=int, default=4)
    g.add_argument("--n-embd", type=int, default=128)
    g.add_argument("--block-size", type=int, default=2048)
    g.add_argument("--dropout", type=float, default=0.0,
                   help="dropout of the embeddings, residual branches and, unless --attn-dropout says "
                        "otherwise, the attention weights (which needs --attention torch)")
    g.add_argument("--attn-dropout", type=float, default=None,
                   help="dropout of the attention weights (default: --dropout); 0 lets the kernels train "
                        "a model with --dropout")
    g.add_argument("--no-bias", dest="bias", action="store_false")
    g.add_argument("--attention", default="auto",
                   help="attention op for training and evaluation: auto (default: flash, our kernels forward "
                        "and backward, where the extension builds and there is no attention dropout; else "
                        "torch), torch (SDPA), manual (plain torch ops) or a kernel variant of "
                        "nanogpt.VARIANTS (e.g. flash). Checkpoints record 'torch': the op is chosen again at "
                        "inference")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=16, help="windows per micro-batch, on each rank")
    g.add_argument("--grad-accum", type=int, default=None,
                   help="micro-batches per optimizer step over all ranks, a multiple of the number of ranks "
                        "(default: one per rank); each rank runs grad-accum / ranks of them")
    g.add_argument("--context", type=int, default=None, help="training sequence length (default: block_size)")
    g.add_argument("--max-steps", type=int, default=2000, help="length of the run and of the LR schedule")
    g.add_argument("--stop-at", type=int, default=None,
                   help="stop early at this step (the schedule still spans --max-steps); continue with --resume")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--min-lr", type=float, default=None, help="default: lr / 10")
    g.add_argument("--warmup-steps", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--wpe-lr-scale", type=float, default=1.0,
                   help="LR multiplier for the position embeddings: when fine-tuning at a longer context, the "
                        "untrained positions (each row gets a gradient only at its own position) must move far")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.99)
    g.add_argument("--grad-clip", type=float, default=1.0, help="0 disables")
    g = p.add_argument_group("evaluation and run")
    g.add_argument("--eval-interval", type=int, default=250)
    g.add_argument("--eval-iters", type=int, default=20)
    g.add_argument("--eval-batch-size", type=int, default=None,
                   help="windows per evaluation batch, split over the ranks (default: --batch-size x ranks)")
    g.add_argument("--eval-context", type=int, default=None, help="default: --context")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; 1 per rank under torchrun)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def protected(path):
    """True if writing path would overwrite a checkpoint shipped in the repository's checkpoints/."""
    real = os.path.realpath(path)
    return os.path.exists(real) and os.path.commonpath([real, os.path.realpath(SHIPPED_DIR)]) == os.path.realpath(SHIPPED_DIR)


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Checks and completes parsed options (p.error exits with the parser's usage)."""
    if args.eval_only and not (args.init_from or args.resume):
        p.error("--eval-only evaluates a trained model: give --init-from CHECKPOINT or --resume")
    for name in ("batch_size", "max_steps", "eval_interval", "eval_iters", "n_layer", "n_head", "n_embd", "block_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("grad_accum", "context", "eval_context", "eval_batch_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    _, world = world_from_env()
    if args.grad_accum is None:
        args.grad_accum = world
    elif args.grad_accum % world:
        p.error(f"--grad-accum {args.grad_accum} must be a multiple of the number of ranks ({world}): "
                f"each rank runs --grad-accum / {world} micro-batches")
    if args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size * world
    if args.min_lr is None:
        args.min_lr = args.lr / 10
    try:
        if args.attention != "auto":  # resolved once the model's dropout is known (training_attention)
            check_attention(args.attention)  # a kernel name builds or loads the extension
    except ValueError as e:
        p.error(f"--attention: {e}")
    if not args.eval_only and protected(args.out) and not args.force:
        p.error(f"--out {args.out} is a checkpoint shipped in checkpoints/: training would overwrite it. "
                f"Write elsewhere (default out/ckpt.pt) or add --force")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def main(argv=None) -> int:
    """Command line: runs training and returns the exit status (0; 1 with a message for an input
    error: missing data or checkpoint, an attention that cannot train, ...)."""
    args = parse_args(argv)
    try:
        run(args, argv)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run(args, argv=None):
    """Trains (or evaluates) as args say (from parse_args, or add_arguments + check_args);
    returns a dict of the final numbers (the same on every rank)."""
    ranks = Ranks()
    try:
        result = _run(args, argv, ranks)
        ranks.barrier()
        return result
    finally:
        ranks.close()


def _run(args, argv, ranks):
    if args.threads or ranks.ddp:
        torch.set_num_threads(args.threads or 1)  # ranks share the machine's cores
    say = print if ranks.main else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # the same initial weights on every rank

    vocab = load_vocab(args.data_dir)  # FileNotFoundError naming the prepare command
    train_data = load_split(args.data_dir, "train")
    val_data = load_split(args.data_dir, "val")

    # ---- model and optimizer: fresh, from a checkpoint's weights, or the full resume state
    state = None
    if args.resume:
        model, ck_vocab, state = load_model(resume_path(args.out), ranks)
    elif args.init_from:
        model, ck_vocab, _ = load_model(args.init_from, ranks)
    else:
        config = GPTConfig(block_size=args.block_size, vocab_size=len(vocab), n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=args.bias)
        model, ck_vocab = GPT(config), vocab
    if ck_vocab != vocab:
        raise ValueError(f"the checkpoint's vocabulary differs from {args.data_dir}/vocab.json")
    model.train()
    if args.dropout and (args.resume or args.init_from):
        # checkpoints store dropout 0 (inference); allow fine-tuning with dropout anyway
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = args.dropout
    attn_dropout = args.dropout if args.attn_dropout is None else args.attn_dropout
    for block in model.transformer.h:
        block.attn.attn_dropout_p = attn_dropout
    args.attention = training_attention(args.attention, model._attn_dropout(), say)
    model.set_attention(args.attention)  # ValueError: attention dropout on an attention without it
    if not args.eval_only and not attention_has_backward(args.attention):
        raise ValueError(f"attention {args.attention!r} has no backward pass in this build, so it cannot train: "
                         f"use --attention torch (or manual)")
    config = model.config
    context = args.context or config.block_size
    eval_context = args.eval_context or context
    if max(context, eval_context) > config.block_size:
        raise ValueError(f"context {max(context, eval_context)} exceeds block_size {config.block_size}")
    micro = args.grad_accum // ranks.world  # micro-batches per rank and step
    step_windows = args.batch_size * args.grad_accum  # the global batch of one optimizer step

    say(f"model: {config}")
    say(f"parameters: {model.get_num_params() / 1e6:.3f}M non-embedding "
        f"({model.get_num_params(False) / 1e6:.3f}M total); train {len(train_data):,} tokens, "
        f"val {len(val_data):,} tokens; context {context}; {step_windows} windows a step: {args.grad_accum} "
        f"micro-batches of {args.batch_size} over {ranks.world} rank(s), "
        f"{torch.get_num_threads()} thread(s) each, attention {args.attention}")
    splits = {"train": train_data, "val": val_data}

    def evaluate():
        return estimate_loss(model, splits, args.eval_batch_size, eval_context, args.eval_iters, args.seed + 1, ranks)

    if args.eval_only:
        t0 = time.time()
        losses = evaluate()
        say(f"eval (context {eval_context}, {args.eval_iters} x {args.eval_batch_size} windows): "
            f"train loss {losses['train']:.4f}, val loss {losses['val']:.4f} ({time.time() - t0:.0f}s)")
        return {"train_loss": losses["train"], "val_loss": losses["val"], "context": eval_context}

    optimizer = model.configure_optimizers(args.weight_decay, args.lr, (args.beta1, args.beta2), args.wpe_lr_scale)
    data_gen = torch.Generator().manual_seed(args.seed)  # the global batches: alike on every rank
    torch.manual_seed(args.seed + ranks.rank)  # dropout masks differ between ranks
    step, best_val, wall_before = 0, float("inf"), 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_rng"])
        rng = state["torch_rng"]  # one state per rank (a single tensor in older files)
        rng = [rng] if isinstance(rng, torch.Tensor) else rng
        if len(rng) == ranks.world:
            torch.set_rng_state(rng[ranks.rank])
        else:
            say(f"note: the resume state has {len(rng)} rank(s), this run {ranks.world}: dropout masks reseeded")
        step, best_val, wall_before = state["iter_num"], state["best_val_loss"], state["wall_seconds"]
        say(f"resumed from {resume_path(args.out)} at step {step} (best val {best_val:.4f})")
    if ranks.main:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=None) if ranks.ddp else model

    timer = {"seconds": 0.0, "steps": 0}  # training time and steps since the last evaluation

    def evaluate_and_save(step):
        nonlocal best_val
        losses = evaluate()
        tokens_per_s = timer["steps"] * step_windows * context / max(timer["seconds"], 1e-9)
        timer.update(seconds=0.0, steps=0)
        torch_rngs = ranks.gather(torch.get_rng_state())  # a collective: every rank calls it
        wall = wall_before + time.time() - t_start
        if losses["val"] < best_val:
            best_val = losses["val"]
            saved = True
        else:
            saved = False
        if not ranks.main:
            return losses, tokens_per_s
        info = dict(iter_num=step, train_loss=losses["train"], val_loss=losses["val"], context=context,
                    eval_context=eval_context, wall_seconds=wall, argv=" ".join(sys.argv[1:] if argv is None else argv))
        if saved:
            torch.save(checkpoint_dict(model, vocab, **info), args.out)
        full = checkpoint_dict(model, vocab, **info)
        full.update(best_val_loss=best_val, optimizer=optimizer.state_dict(),
                    data_rng=data_gen.get_state(), torch_rng=torch_rngs)
        torch.save(full, resume_path(args.out))
        if args.log_file:
            record = dict(step=step, train_loss=losses["train"], val_loss=losses["val"], tokens_per_s=tokens_per_s,
                          attention=args.attention, lr=get_lr(step, args), ranks=ranks.world,
                          batch_windows=step_windows, context=context, wall_seconds=wall)
            with open(args.log_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        tqdm.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                   f"lr {get_lr(step, args):.2e}, {tokens_per_s:,.0f} tokens/s, wall {wall:.0f}s"
                   + (f" -> saved {args.out}" if saved else ""))
        sys.stdout.flush()
        return losses, tokens_per_s

    # ---- training loop
    model.train()
    t_start = time.time()
    t_all, steps_all = 0.0, 0  # training time and steps of this process's run, for the last line
    end = min(args.stop_at, args.max_steps) if args.stop_at else args.max_steps
    bar = tqdm(range(step, end), initial=step, total=args.max_steps, disable=args.no_progress or not ranks.main,
               dynamic_ncols=True, mininterval=5)
    loss = None
    lo = ranks.part(step_windows)[0]  # this rank's windows: lo .. lo + micro * batch_size
    for step in bar:
        if step % args.eval_interval == 0 and step > 0 and (state is None or step != state["iter_num"]):
            evaluate_and_save(step)
        t0 = time.time()
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        x, y = get_batch(train_data, step_windows, context, data_gen)  # (step_windows, context), every rank
        optimizer.zero_grad(set_to_none=True)
        for m in range(micro):
            a = lo + m * args.batch_size
            last = m == micro - 1
            # DDP averages gradients over ranks at the last micro-batch's backward only
            with ddp_model.no_sync() if ranks.ddp and not last else nullcontext():
                _, loss = ddp_model(x[a:a + args.batch_size], y[a:a + args.batch_size])
                (loss / micro).backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        dt = time.time() - t0
        timer["seconds"] += dt
        timer["steps"] += 1
        t_all += dt
        steps_all += 1
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}", refresh=False)
    bar.close()

    losses, _ = evaluate_and_save(end)
    wall = wall_before + time.time() - t_start
    tokens_per_s = steps_all * step_windows * context / max(t_all, 1e-9)
    say(f"done: {end} steps in {wall:.0f}s ({tokens_per_s:,.0f} tokens/s); final train loss {losses['train']:.4f}, "
        f"val loss {losses['val']:.4f}; best val {best_val:.4f} in {args.out}")
    return {"train_loss": losses["train"], "val_loss": losses["val"], "best_val_loss": best_val,
            "steps": end, "wall_seconds": wall, "tokens_per_s": tokens_per_s, "attention": args.attention,
            "last_loss": loss.item() if loss is not None else None}


if __name__ == "__main__":
    sys.exit(main())
