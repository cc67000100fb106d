"""Llama 3.2 Vision in plain PyTorch."""
