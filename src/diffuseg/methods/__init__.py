"""Segmentation methods built on diffusion models (one module per method)."""
