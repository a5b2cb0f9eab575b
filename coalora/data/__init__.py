"""Data: the embedded offline world and the real Hugging Face loaders, both writing one layout (layout.py)."""
