"""Adapters: one small file per architecture family plus the generic inference in base.py.

Importing this package registers every built-in adapter."""

from . import gemma3, gemma3n, idefics3, internvl, llava, mllama, paligemma, qwen_omni, qwen_vl, text  # noqa: F401
from . import git, idefics, kosmos2  # noqa: F401
from .base import Adapter, LayerFacts, ModelFacts, find_adapter, model_facts, register_adapter, supported_families

__all__ = ["Adapter", "LayerFacts", "ModelFacts", "find_adapter", "model_facts", "register_adapter",
           "supported_families"]
