"""Pure-PyTorch implementations: the `torch` backend and the reference every other backend is tested against."""
