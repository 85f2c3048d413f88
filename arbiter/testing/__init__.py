"""Test helpers: a zoo of tiny random multimodal models with real, offline processors."""

from . import tiny_extra, tiny_more  # noqa: F401  (each registers its families into tiny's)
from .tiny import FAMILIES, TinyModel, tiny

__all__ = ["FAMILIES", "TinyModel", "tiny"]
