"""The models that run on the kernels, one readable file each: gpt.py (the character-level GPT,
also GPT-2's shape) and llama.py (Llama, as llama2.c computes it); attend.py holds what they
share (the attention op by name, the KV cache, attention timing)."""
