"""Model facts and the adapter registry: where a model's text layers, attention, MLPs and special tokens are.

The generic path infers everything from transformers' conventions; an adapter overrides only what it cannot."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedModelError

_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "wo", "c_proj")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_MID_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm")
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")
_MODALITY_ID_KEYS = {
    "image": ("image_token_id", "image_token_index", "image_token"),
    "video": ("video_token_id", "video_token_index"),
    "audio": ("audio_token_id", "audio_token_index"),
}


@dataclass
class LayerFacts:
    """One text decoder layer: its modules, found once at attach time."""

    index: int
    layer: nn.Module
    attn: nn.Module | None          # softmax attention module (None: not softmax attention, skipped)
    out_proj: nn.Linear | None      # the attention output projection (o_proj input = per-head outputs)
    mlp: nn.Module | None
    mid_norm: nn.Module | None      # the norm whose input is resid.mid
    cross: bool = False             # cross-attention layer (keys come from another modality, e.g. Mllama)
    skip_reason: str | None = None


@dataclass
class ModelFacts:
    """Everything arbiter needs to know about a model, architecture-agnostic from here on."""

    family: str
    model: nn.Module
    text_config: object
    decoder: nn.Module
    layers: list[LayerFacts]
    final_norm: nn.Module | None
    lm_head: nn.Module | None
    modality_token_ids: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prefix_bidirectional: bool = False
    resid_stacked: bool = False      # residual sites are [n_streams, batch, seq, hidden] (Gemma 3n AltUp)
    prefix_replay: bool = True       # layers depend only on their input (sweeps may replay a clean prefix)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def heads(self, layer: int) -> tuple[int, int, int]:
        """(query heads, KV heads, head_dim) of a layer, read from its modules."""
        lf = self.layers[layer]
        if lf.attn is None:
            return (0, 0, 0)
        return attention_shape(lf.attn, self.text_config)

    @property
    def attention_layers(self) -> list[int]:
        return [lf.index for lf in self.layers if lf.attn is not None]

    def summary(self) -> dict:
        """JSON-ready description used in trace metadata and reports."""
        cfg = self.text_config
        nh, nkv, hd = self.heads(self.attention_layers[0]) if self.attention_layers else (0, 0, 0)
        return {
            "class": type(self.model).__name__,
            "family": self.family,
            "model_type": getattr(getattr(self.model, "config", None), "model_type", None),
            "n_layers": self.n_layers,
            "n_heads": nh,
            "n_kv_heads": nkv,
            "head_dim": hd,
            "hidden_size": getattr(cfg, "hidden_size", None),
            "vocab_size": getattr(cfg, "vocab_size", None),
            "cross_attention_layers": [lf.index for lf in self.layers if lf.cross],
            "skipped_layers": {str(lf.index): lf.skip_reason for lf in self.layers if lf.skip_reason},
            "modality_token_ids": self.modality_token_ids,
            "notes": self.notes,
        }


def attention_shape(attn: nn.Module, text_config) -> tuple[int, int, int]:
    """Query heads, KV heads and head_dim, read from the module's projections at run time (GQA-safe)."""
    head_dim = getattr(attn, "head_dim", None) or getattr(text_config, "head_dim", None)
    if head_dim is None:
        head_dim = text_config.hidden_size // text_config.num_attention_heads
    q = getattr(attn, "q_proj", None)
    k = getattr(attn, "k_proj", None)
    n_heads = q.out_features // head_dim if isinstance(q, nn.Linear) else getattr(
        attn, "num_heads", text_config.num_attention_heads)
    groups = getattr(attn, "num_key_value_groups", None)
    if isinstance(k, nn.Linear):
        n_kv = k.out_features // head_dim
    elif groups:
        n_kv = n_heads // groups
    else:
        n_kv = getattr(text_config, "num_key_value_heads", n_heads) or n_heads
    return int(n_heads), int(n_kv), int(head_dim)


def _child(module: nn.Module, names) -> nn.Module | None:
    for n in names:
        m = getattr(module, n, None)
        if isinstance(m, nn.Module):
            return m
    return None


def _is_softmax_attention(m: nn.Module, cfg) -> bool:
    return (getattr(m, "config", None) is cfg and hasattr(m, "layer_idx")
            and _child(m, _OUT_PROJ_NAMES) is not None
            and any(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "qkv_proj", "query_key_value")))


class Adapter:
    """Model facts for one architecture family. Subclass and `register_adapter` it for a new family.

    Override only what the generic inference gets wrong: `model_types` (config.model_type values served),
    `token_id_keys`, `decoder(model)`, `layer_kind(...)`, `notes`. Everything else is inferred."""

    name: ClassVar[str] = "generic"
    model_types: ClassVar[tuple[str, ...]] = ()
    notes: ClassVar[tuple[str, ...]] = ()
    prefix_bidirectional: ClassVar[bool] = False
    resid_stacked: ClassVar[bool] = False
    prefix_replay: ClassVar[bool] = True
    # default user turn: where the image goes relative to the text ("before" or "after")
    image_position: ClassVar[str] = "before"

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.get_decoder() if hasattr(model, "get_decoder") else model

    def token_ids(self, model: nn.Module) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        cfgs = [model.config]
        for sub in ("text_config", "thinker_config"):
            if hasattr(model.config, sub):
                cfgs.append(getattr(model.config, sub))
        for modality, keys in _MODALITY_ID_KEYS.items():
            for cfg in cfgs:
                for key in keys:
                    v = getattr(cfg, key, None)
                    if isinstance(v, int) and v >= 0:
                        out.setdefault(modality, [])
                        if v not in out[modality]:
                            out[modality].append(v)
        return out

    def is_cross(self, layer: nn.Module, attn: nn.Module) -> bool:
        return "cross" in type(layer).__name__.lower() or "cross" in type(attn).__name__.lower()

    def facts(self, model: nn.Module) -> ModelFacts:
        decoder = self.decoder(model)
        cfg = decoder.config
        layers_list = _find_layers(decoder, cfg)
        if layers_list is None:
            raise UnsupportedModelError(unsupported_message(model, "found no list of decoder layers"))
        layers: list[LayerFacts] = []
        for i, layer in enumerate(layers_list):
            attns = [m for m in layer.modules() if _is_softmax_attention(m, cfg)]
            attn = attns[0] if attns else None
            skip = None if attn is not None else (
                f"layer {i} ({type(layer).__name__}) has no softmax attention module; attention sites are skipped")
            layers.append(LayerFacts(
                index=i, layer=layer, attn=attn,
                out_proj=_child(attn, _OUT_PROJ_NAMES) if attn is not None else None,
                mlp=_child(layer, _MLP_NAMES), mid_norm=_child(layer, _MID_NORM_NAMES),
                cross=bool(attn is not None and self.is_cross(layer, attn)), skip_reason=skip))
        if not any(lf.attn is not None for lf in layers):
            raise UnsupportedModelError(unsupported_message(
                model, "found no text attention module (a module whose .config is the text config, with "
                       "layer_idx, q/k projections and an output projection)"))
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return ModelFacts(
            family=self.name, model=model, text_config=cfg, decoder=decoder, layers=layers,
            final_norm=_child(decoder, _FINAL_NORM_NAMES), lm_head=lm_head,
            modality_token_ids=self.token_ids(model), notes=list(self.notes),
            prefix_bidirectional=self.prefix_bidirectional,
            resid_stacked=self.resid_stacked, prefix_replay=self.prefix_replay)


def _find_layers(decoder: nn.Module, cfg) -> nn.ModuleList | None:
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    n = getattr(cfg, "num_hidden_layers", None)
    best = None
    for m in decoder.modules():
        if isinstance(m, nn.ModuleList) and (n is None or len(m) == n):
            if best is None or len(m) > len(best):
                best = m
    return best


_REGISTRY: list[Adapter] = []


def register_adapter(adapter: Adapter | type[Adapter]) -> Adapter:
    """Register an adapter (class or instance); later registrations take precedence. Usable as a decorator."""
    inst = adapter() if isinstance(adapter, type) else adapter
    _REGISTRY.insert(0, inst)
    return adapter  # type: ignore[return-value]


def supported_families() -> list[str]:
    return sorted({a.name for a in _REGISTRY})


def unsupported_message(model: nn.Module, why: str) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    return (f"arbiter cannot attach to {type(model).__name__} (model_type={mt!r}): {why}. "
            f"Families with an adapter: {', '.join(supported_families())}. Models that follow transformers' "
            "conventions attach through the generic path; for others subclass arbiter.adapters.Adapter "
            "(set model_types and override decoder()/token_ids()) and call arbiter.register_adapter(MyAdapter).")


def find_adapter(model: nn.Module) -> Adapter:
    """The registered adapter for this model, else the generic one (which may still fail in facts())."""
    for a in _REGISTRY:
        if a.matches(model):
            return a
    return Adapter()


def model_facts(model: nn.Module) -> ModelFacts:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise UnsupportedModelError(
            f"arbiter.attach expects a transformers PreTrainedModel (with .config), got {type(model).__name__}. "
            f"Families with an adapter: {', '.join(supported_families())}; for another architecture subclass "
            "arbiter.adapters.Adapter and call arbiter.register_adapter(MyAdapter).")
    return find_adapter(model).facts(model)


def module_eager_function(module: nn.Module) -> Callable:
    """The eager attention function of the module's own modeling file (softcapping etc. included)."""
    mod = sys.modules.get(type(module).__module__)
    fn = getattr(mod, "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn  # noqa: N813
    return fn


def first_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())
