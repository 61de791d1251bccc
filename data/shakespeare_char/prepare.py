"""
Prepare the tiny Shakespeare dataset for character-level language modeling, after nanoGPT's
data/shakespeare_char/prepare.py. Characters map to ints (their index in the sorted character
list); writes into --out-dir:
  train.bin, val.bin   uint16 token ids: the first 90% of the text, and the last 10%
  vocab.json           the sorted character list (index = token id)

Usage:
  python data/shakespeare_char/prepare.py                       # download the text
  python data/shakespeare_char/prepare.py --input FILE          # use a local copy (offline)

The text and the .bin files are never committed (see .gitignore here).
"""

import argparse
import os
import sys
import urllib.request

# run as a script from a clone: the repository root holds the nanogpt package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nanogpt.data import encode, write  # noqa: E402

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))


def download(url, path):
    print(f"downloading {url} -> {path}")
    with urllib.request.urlopen(url, timeout=30) as r:
        data = r.read()
    with open(path, "wb") as f:
        f.write(data)


def prepare(text, out_dir, train_frac=0.9):
    """Tokenize text, write train.bin / val.bin / vocab.json into out_dir; returns a summary dict."""
    chars, train_ids, val_ids = encode(text, train_frac)
    write(out_dir, chars, train_ids, val_ids)
    return {"chars": len(text), "vocab_size": len(chars), "train_tokens": len(train_ids), "val_tokens": len(val_ids)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="local text file to use instead of downloading")
    p.add_argument("--out-dir", default=HERE, help="where to write train.bin, val.bin, vocab.json (default: %(default)s)")
    p.add_argument("--url", default=DATA_URL, help="download URL when no --input is given")
    args = p.parse_args(argv)

    if args.input:
        path = args.input
        if not os.path.isfile(path):
            p.error(f"--input {path}: no such file")
    else:
        path = os.path.join(args.out_dir, "input.txt")
        if not os.path.exists(path):
            os.makedirs(args.out_dir, exist_ok=True)
            try:
                download(args.url, path)
            except OSError as e:  # URLError, timeouts, refused connections: no network
                sys.exit(f"prepare.py: cannot download {args.url} ({getattr(e, 'reason', e)}); without network, "
                         f"give the text as a file: python data/shakespeare_char/prepare.py --input FILE")
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    info = prepare(text, args.out_dir)
    print(f"length of dataset in characters: {info['chars']:,}")
    print(f"vocab size: {info['vocab_size']}")
    print(f"train has {info['train_tokens']:,} tokens")
    print(f"val has {info['val_tokens']:,} tokens")
    print(f"wrote train.bin, val.bin, vocab.json to {args.out_dir}")
    return info


if __name__ == "__main__":
    main()
