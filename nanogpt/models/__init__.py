"""The models that run on the kernels, one readable file each (gpt.py: the character-level GPT)."""
