"""Test helpers: a zoo of tiny random multimodal models with real, offline processors."""

from .tiny import FAMILIES, TinyModel, tiny

__all__ = ["FAMILIES", "TinyModel", "tiny"]
