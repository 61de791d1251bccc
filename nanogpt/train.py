"""
Train the character-level GPT on data prepared by data/shakespeare_char/prepare.py (after nanoGPT's
train.py, single process, CPU). Attention is "torch" (SDPA) by default; the kernels have backward passes too.

  python -m nanogpt.train --context 256 --max-steps 2000 --out checkpoints/phase1.pt
  python -m nanogpt.train --init-from checkpoints/phase1.pt --context 2048 --out checkpoints/shakes2048.pt
  python -m nanogpt.train --eval-only --init-from checkpoints/shakes2048.pt --context 2048

Files: --out is the best-val-loss model (weights, config, vocab; no optimizer state: this is what
ships). Next to it, <out stem>.resume.pt holds the latest full training state (model, optimizer,
step, RNG states) written at every evaluation; --resume continues from it, bit-for-bit the same
run as without interruption (same --seed, same --threads).
"""

import argparse
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from nanogpt.data import get_batch, load_split, load_vocab
from nanogpt.formats.checkpoint import checkpoint_dict, load_checkpoint
from nanogpt.models.gpt import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resume_path(out):
    root, _ = os.path.splitext(out)
    return root + ".resume.pt"


@torch.no_grad()
def estimate_loss(model, splits, batch_size, context, eval_iters, seed):
    """Mean loss over eval_iters random batches per split; the batches come from a generator
    seeded the same way at every call, so successive evaluations are comparable."""
    was_training = model.training
    model.eval()
    out = {}
    for name, data in splits.items():
        g = torch.Generator().manual_seed(seed)
        losses = [model(*get_batch(data, batch_size, context, g))[1].item() for _ in range(eval_iters)]
        out[name] = sum(losses) / len(losses)
    model.train(was_training)
    return out


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
    g.add_argument("--data-dir", default=os.path.join(REPO, "data", "shakespeare_char"))
    g.add_argument("--out", default=os.path.join(REPO, "checkpoints", "shakes2048.pt"),
                   help="best-val checkpoint (model only); the resume state goes to <stem>.resume.pt")
    g.add_argument("--resume", action="store_true", help="continue from <out stem>.resume.pt")
    g.add_argument("--init-from", help="start from this checkpoint's weights and config, fresh optimizer and schedule")
    g.add_argument("--eval-only", action="store_true", help="evaluate (needs --init-from or --resume) and exit")
    g = p.add_argument_group("model (ignored with --init-from / --resume)")
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--n-head", type=int, default=4)
    g.add_argument("--n-embd", type=int, default=128)
    g.add_argument("--block-size", type=int, default=2048)
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--no-bias", dest="bias", action="store_false")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=16)
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
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")
    g.add_argument("--eval-context", type=int, default=None, help="default: --context")
    g.add_argument("--seed", type=int, default=1337)
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Checks and completes parsed options (p.error exits with the parser's usage)."""
    if args.eval_only and not (args.init_from or args.resume):
        p.error("--eval-only evaluates a trained model: give --init-from CHECKPOINT or --resume")
    if args.min_lr is None:
        args.min_lr = args.lr / 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def main(argv=None):
    return run(parse_args(argv), argv)


def run(args, argv=None):
    """Trains (or evaluates) as args say; returns a dict of the final numbers."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    vocab = load_vocab(args.data_dir)
    train_data = load_split(args.data_dir, "train")
    val_data = load_split(args.data_dir, "val")

    # ---- model and optimizer: fresh, from a checkpoint's weights, or the full resume state
    state = None
    if args.resume:
        rpath = resume_path(args.out)
        state = torch.load(rpath, map_location="cpu", weights_only=True)
        model, ck_vocab, _ = load_checkpoint(rpath)
        model.train()
    elif args.init_from:
        model, ck_vocab, _ = load_checkpoint(args.init_from)
        model.train()
    else:
        config = GPTConfig(block_size=args.block_size, vocab_size=len(vocab), n_layer=args.n_layer,
                           n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, bias=args.bias)
        model, ck_vocab = GPT(config), vocab
    if ck_vocab != vocab:
        raise ValueError(f"the checkpoint's vocabulary differs from {args.data_dir}/vocab.json")
    config = model.config
    if args.dropout and (args.resume or args.init_from):
        # checkpoints store dropout 0 (inference); allow fine-tuning with dropout anyway
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = args.dropout
        for block in model.transformer.h:
            block.attn.attn_dropout_p = args.dropout
    context = args.context or config.block_size
    eval_context = args.eval_context or context
    eval_batch = args.eval_batch_size or args.batch_size
    if max(context, eval_context) > config.block_size:
        raise ValueError(f"context {max(context, eval_context)} exceeds block_size {config.block_size}")

    print(f"model: {config}")
    print(f"parameters: {model.get_num_params() / 1e6:.3f}M non-embedding "
          f"({model.get_num_params(False) / 1e6:.3f}M total); train {len(train_data):,} tokens, "
          f"val {len(val_data):,} tokens; context {context}, batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}")
    splits = {"train": train_data, "val": val_data}

    if args.eval_only:
        t0 = time.time()
        losses = estimate_loss(model, splits, eval_batch, eval_context, args.eval_iters, args.seed + 1)
        print(f"eval (context {eval_context}, {args.eval_iters} x {eval_batch} windows): "
              f"train loss {losses['train']:.4f}, val loss {losses['val']:.4f} ({time.time() - t0:.0f}s)")
        return {"train_loss": losses["train"], "val_loss": losses["val"], "context": eval_context}

    optimizer = model.configure_optimizers(args.weight_decay, args.lr, (args.beta1, args.beta2), args.wpe_lr_scale)
    data_gen = torch.Generator().manual_seed(args.seed)
    step, best_val, wall_before = 0, float("inf"), 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, best_val, wall_before = state["iter_num"], state["best_val_loss"], state["wall_seconds"]
        print(f"resumed from {resume_path(args.out)} at step {step} (best val {best_val:.4f})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def evaluate_and_save(step, losses):
        nonlocal best_val
        wall = wall_before + time.time() - t_start
        info = dict(iter_num=step, train_loss=losses["train"], val_loss=losses["val"], context=context,
                    eval_context=eval_context, wall_seconds=wall, argv=" ".join(sys.argv[1:] if argv is None else argv))
        tag = ""
        if losses["val"] < best_val:
            best_val = losses["val"]
            torch.save(checkpoint_dict(model, vocab, **info), args.out)
            tag = f" -> saved {args.out}"
        full = checkpoint_dict(model, vocab, **info)
        full.update(best_val_loss=best_val, optimizer=optimizer.state_dict(),
                    data_rng=data_gen.get_state(), torch_rng=torch.get_rng_state())
        torch.save(full, resume_path(args.out))
        tqdm.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                   f"lr {get_lr(step, args):.2e}, wall {wall:.0f}s{tag}")
        sys.stdout.flush()

    # ---- training loop
    model.train()
    t_start = time.time()
    end = min(args.stop_at, args.max_steps) if args.stop_at else args.max_steps
    bar = tqdm(range(step, end), initial=step, total=args.max_steps, disable=args.no_progress,
               dynamic_ncols=True, mininterval=5)
    loss = None
    for step in bar:
        if step % args.eval_interval == 0 and step > 0 and (state is None or step != state["iter_num"]):
            evaluate_and_save(step, estimate_loss(model, splits, eval_batch, eval_context, args.eval_iters, args.seed + 1))
        lr = get_lr(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        x, y = get_batch(train_data, args.batch_size, context, data_gen)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}", refresh=False)
    bar.close()

    losses = estimate_loss(model, splits, eval_batch, eval_context, args.eval_iters, args.seed + 1)
    evaluate_and_save(end, losses)
    wall = wall_before + time.time() - t_start
    print(f"done: {end} steps in {wall:.0f}s; final train loss {losses['train']:.4f}, "
          f"val loss {losses['val']:.4f}; best val {best_val:.4f} in {args.out}")
    return {"train_loss": losses["train"], "val_loss": losses["val"], "best_val_loss": best_val,
            "steps": end, "wall_seconds": wall, "last_loss": loss.item() if loss is not None else None}


if __name__ == "__main__":
    main()
