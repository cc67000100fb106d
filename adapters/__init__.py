"""Modules that join image features to text: cross-attention adapter layers, masks, projector."""
