"""File formats, one reader (and writer) per format, each with its own errors naming the file.

checkpoint.py: our own training checkpoints (torch.load with weights_only=True).
llama2c.py:    llama2.c's model.bin (v0, v1, v2) and tokenizer.bin.
hf.py:         Hugging Face directories (GPT-2, Llama) and their tokenizer.json.

load(path) recognises the format from the file itself and returns (model, tokenizer).
"""
import os

from nanogpt.formats import llama2c


def load(path, tokenizer=None, attention="torch"):
    """(model in eval mode, tokenizer) from a nanogpt checkpoint (.pt), a llama2.c model.bin with
    its tokenizer.bin (`tokenizer`, or tokenizer.bin beside the model) or a Hugging Face
    directory with its tokenizer.json. Raises FileNotFoundError for a missing path and
    ValueError naming the file for anything it does not recognise."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        from nanogpt.formats import hf

        return hf.load_model(path, attention), hf.load_tokenizer(path, tokenizer)
    with open(path, "rb") as f:
        head = f.read(36)
    if head[:4] == b"PK\x03\x04":  # a zip: torch.save's format, so our own checkpoint
        from nanogpt.formats.checkpoint import load_checkpoint
        from nanogpt.tokenizers import CharTokenizer

        if tokenizer is not None:
            raise ValueError(f"{path}: a nanogpt checkpoint carries its own vocabulary; do not pass a tokenizer")
        model, vocab, _ = load_checkpoint(path, attention=attention)
        return model, CharTokenizer(vocab)
    if llama2c.sniff(head) is not None or head[:4] == llama2c.MAGIC_BYTES:
        tok_path = tokenizer or os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer.bin")
        if not os.path.isfile(tok_path):
            raise FileNotFoundError(f"{path}: a llama2.c model needs its tokenizer.bin: {tok_path} does not exist "
                                    "(pass --tokenizer PATH)")
        model = llama2c.load_model(path, attention)
        return model, llama2c.read_tokenizer(tok_path, model.config.vocab_size)
    raise ValueError(f"{path}: unrecognised model format: not a nanogpt checkpoint (.pt zip), a llama2.c "
                     "model.bin (legacy v0 header or 'ak42' magic) or a Hugging Face directory (config.json)")
