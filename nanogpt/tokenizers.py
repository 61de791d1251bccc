"""Tokenizers shared by all models: text <-> token ids, one class per kind of vocabulary.

  CharTokenizer       our character models: id = index in the sorted character string
  Llama2cTokenizer    llama2.c's tokenizer.bin (sentencepiece pieces with merge scores),
                      encoding and decoding exactly as llama2.c's run.c does
  HFTokenizer         a Hugging Face tokenizer.json, through the `tokenizers` package

Every tokenizer has encode(text) -> list[int] (with the BOS token where the model expects one),
decode(ids) -> str (the whole sequence, prompt included, as printed after generation) and
stop_ids: the tokens that end a sample. The files are parsed in nanogpt/formats, not here.
"""
from __future__ import annotations

import re


class CharTokenizer:
    """The character-level vocabulary of our checkpoints: vocab[i] is token i's character."""

    stop_ids = ()

    def __init__(self, vocab: str):
        self.vocab = vocab
        self.stoi = {ch: i for i, ch in enumerate(vocab)}

    def __len__(self):
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.stoi))
        if unknown:
            raise ValueError(f"prompt has characters not in the model's vocabulary: {unknown!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)


# -----------------------------------------------------------------------------
# llama2.c

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_PRINTABLE = frozenset(range(0x20, 0x7F)) | frozenset(b" \t\n\v\f\r")  # C's isprint || isspace


class Llama2cTokenizer:
    """llama2.c's vocabulary: pieces[i] (bytes, "▁" already turned into a space) and scores[i].

    Token 1 is BOS (run.c's convention: it starts every prompt and, when sampled, ends the
    sample); byte-fallback tokens are the pieces "<0x00>".."<0xFF>".
    """

    BOS = 1
    stop_ids = (BOS,)

    def __init__(self, pieces: list[bytes], scores: list[float], max_token_length: int | None = None):
        if len(pieces) != len(scores):
            raise ValueError(f"{len(pieces)} pieces but {len(scores)} scores")
        self.pieces = list(pieces)
        self.scores = [float(s) for s in scores]
        self.max_token_length = max_token_length if max_token_length is not None else max(map(len, pieces), default=0)
        # run.c looks a string up in the vocabulary sorted by strcmp; with duplicate pieces its
        # bsearch may return either, we keep the first
        self.lookup = {}
        for i, p in enumerate(self.pieces):
            self.lookup.setdefault(p, i)
        self.byte_ids = [self.lookup.get(b"<0x%02X>" % b) for b in range(256)]

    def __len__(self):
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """run.c's encode: BOS, the dummy-prefix " " (for non-empty text), one token per UTF-8
        character (or its bytes' <0xXX> tokens when the character is not a piece), then merge
        the adjacent pair whose merged piece scores highest (leftmost on ties) until none does."""
        data = text.encode("utf-8")
        ids = [self.BOS] if bos else []
        if data and b" " in self.lookup:
            ids.append(self.lookup[b" "])
        i = 0
        while i < len(data):
            # a character: a leading byte and at most 3 continuation bytes (run.c's cap)
            j = i + 1
            while j < len(data) and (data[j] & 0xC0) == 0x80 and j - i < 4:
                j += 1
            char = data[i:j]
            if char in self.lookup:
                ids.append(self.lookup[char])
            else:
                for b in char:
                    if self.byte_ids[b] is None:
                        raise ValueError(f"cannot encode byte 0x{b:02X} of {text!r}: the vocabulary has no <0x{b:02X}> token")
                    ids.append(self.byte_ids[b])
            i = j
        return self._merge(ids)

    def _merge(self, ids: list[int]) -> list[int]:
        # pair[i]: (score, id) of merging ids[i] and ids[i+1], or None; only the neighbours of a
        # merge change, so each merge costs one scan for the best pair
        def pair(i):
            merged = self.lookup.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
            return None if merged is None else (self.scores[merged], merged)

        pairs = [pair(i) for i in range(len(ids) - 1)]
        while True:
            best, best_i = -1e10, -1  # run.c's threshold: a merge must score above -1e10
            for i, p in enumerate(pairs):
                if p is not None and p[0] > best:
                    best, best_i = p[0], i
            if best_i < 0:
                return ids
            ids[best_i:best_i + 2] = [pairs[best_i][1]]
            del pairs[best_i]
            if best_i < len(pairs):
                pairs[best_i] = pair(best_i)
            if best_i > 0:
                pairs[best_i - 1] = pair(best_i - 1)

    def piece_bytes(self, prev: int, token: int) -> bytes:
        """The bytes run.c prints for `token` after `prev`: a piece after BOS loses its leading
        space; <0xXX> is the byte itself; a single byte that is neither printable ASCII nor
        whitespace prints as nothing (run.c's safe_printf, in the C locale: so a character
        spelled in byte tokens, e.g. an emoji, disappears, as it does from run.c's output)."""
        piece = self.pieces[token]
        if prev == self.BOS and piece[:1] == b" ":
            piece = piece[1:]
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            piece = bytes([int(m.group(1), 16)])
        if len(piece) == 1 and piece[0] not in _PRINTABLE:
            return b""
        return piece

    def decode(self, ids) -> str:
        """The text run.c prints for a token sequence: a leading BOS is not printed (run.c starts
        from it), and sets up the leading-space strip of the next piece."""
        ids = list(ids)
        prev = [-1] + ids[:-1]
        start = 1 if ids[:1] == [self.BOS] else 0
        out = b"".join(self.piece_bytes(prev[i], ids[i]) for i in range(start, len(ids)))
        return out.decode("utf-8", errors="replace")  # pieces are UTF-8; replace only what is not


# -----------------------------------------------------------------------------
# Hugging Face

class HFTokenizer:
    """A tokenizer.json through the `tokenizers` package. encode adds the special tokens the
    file's post-processor adds (Llama's BOS; none for GPT-2); decode skips special tokens."""

    def __init__(self, tokenizer, stop_ids=()):
        self.tokenizer = tokenizer  # a tokenizers.Tokenizer
        self.stop_ids = tuple(stop_ids)

    def __len__(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
