"""Keras callbacks that drive quantization-aware training."""
