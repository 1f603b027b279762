"""The DINO model: backbone, encoder, decoder, query selection, denoising and heads, plus the
matcher, criterion and post-processing that define its training and outputs."""
from .build import build_model

__all__ = ["build_model"]
