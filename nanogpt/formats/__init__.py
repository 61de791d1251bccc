"""File formats, one reader (and writer) per format, each with its own errors naming the file.

checkpoint.py: our own training checkpoints (torch.load with weights_only=True).
"""
