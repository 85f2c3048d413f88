"""Model facts and the adapter registry: where a model's text layers, attention, MLPs and special tokens are.

The generic path infers everything from transformers' conventions; an adapter overrides only what it cannot."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from ..errors import UnsupportedModelError

_OUT_PROJ_NAMES = ("o_proj", "out_proj", "dense", "wo", "c_proj")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
_MID_NORM_NAMES = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm")
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm", "norm_f", "layer_norm",
                     "embedding_norm")
# what a layer uses to mix tokens; every kind but "attention" / "cross_attention" is served by knockouts through
# deletion (the destination rows are recomputed as if the severed positions were not in the sequence)
# ("none": the layer mixes no tokens, e.g. an MLP- or MoE-only block; "unknown": arbiter cannot tell how it does)
MIXER_KINDS = ("attention", "cross_attention", "linear_attention", "convolution", "state_space", "none", "unknown")
# class-name fragments -> mixer kind, for layers without softmax attention (first match wins); attribute names
# such as "mixer" say nothing (some families put an MLP or MoE there)
_MIXER_PATTERNS = (("deltanet", "linear_attention"), ("linearattention", "linear_attention"),
                   ("mamba", "state_space"), ("ssm", "state_space"), ("shortconv", "convolution"),
                   ("conv", "convolution"))
# class-name fragments of blocks that mix no tokens
_POINTWISE = ("mlp", "moe", "expert", "feedforward", "ffn", "norm", "dropout", "identity", "act", "gate")
_MODALITY_ID_KEYS = {
    "image": ("image_token_id", "image_token_index", "image_token"),
    "video": ("video_token_id", "video_token_index"),
    "audio": ("audio_token_id", "audio_token_index"),
}
# an encoder input that holds one modality only, by its keyword in transformers' forwards: every position of an
# encoder run on it is that modality (Whisper's input_features, Pix2Struct's flattened_patches)
ENCODER_FEATURE_INPUTS = {"input_features": "audio", "input_values": "audio", "audio_values": "audio",
                          "pixel_values": "image", "flattened_patches": "image"}


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
    mixer: nn.Module | None = None  # the layer's token mixer (the attention module, or a linear-attention /
                                    # convolution / state-space module); None: the layer mixes no tokens
    mixer_kind: str = "attention"   # one of MIXER_KINDS
    cross_attn: nn.Module | None = None  # a cross-attention feeding the layer besides its mixer (CROSS_SITES)
    attn_out: nn.Module | None = None  # the module whose output is attn.out, where it is not ``attn`` (GIT: the
                                       # output projection, before the residual add and post-LayerNorm)


class ResidualLayout:
    """How residual-stream values (``embed``, ``resid.*``, ``attn.out``, ``mlp.out`` and their recordings) are
    laid out, as the model's adapter says: ``[batch, seq, hidden]`` by default; a family with several stacked
    streams overrides the ``residual_*`` methods of its adapter. Core code asks this, never a tensor's rank."""

    def __init__(self, adapter: "Adapter"):
        self.adapter = adapter

    @property
    def stacked(self) -> bool:
        """True where residual sites carry several stacked streams (not one [batch, seq, hidden] tensor)."""
        return bool(self.adapter.resid_stacked)

    def batch_dim(self, x: torch.Tensor) -> int:
        return self.adapter.residual_batch_dim(x)

    def seq_dim(self, x: torch.Tensor) -> int:
        return self.adapter.residual_seq_dim(x)

    def main_stream(self, x: torch.Tensor) -> torch.Tensor:
        """The stream the model reads out, [batch, seq | rows, hidden] (``x`` itself for a single stream)."""
        return self.adapter.residual_main_stream(x)

    def repeat_batch(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` copies of the batch, stacked along the batch dim (as ``cat([x] * n)`` of the inputs)."""
        return torch.cat([x] * n, dim=self.batch_dim(x))


def residual_layout(family: str | None) -> ResidualLayout:
    """The residual layout of a family by adapter name (e.g. a trace's ``meta["model"]["family"]``); the
    generic one for an unknown or missing name."""
    for a in _REGISTRY:
        if a.name == family:
            return ResidualLayout(a)
    return ResidualLayout(Adapter())


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
    adapter: "Adapter | None" = field(default=None, repr=False)   # whose behaviour the methods below ask
    unserved: list[str] = field(default_factory=list)  # token mixers arbiter does not route (knockouts refuse)
    stack: str = "decoder"           # which stack the facts describe: "decoder" (makes the logits) or "encoder"
    # the encoder whose positions the layers' cross-attention reads (an encoder-decoder's decoder facts), else None
    encoder: nn.Module | None = None
    # an encoder-decoder whose decoder layers hold no cross-attention: they read the encoder inside their own
    # attention (keys of both sequences in one call), which arbiter cannot place in token groups
    merged_encoder: str | None = None
    residual: "ResidualLayout" = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.residual = ResidualLayout(self.adapter if self.adapter is not None else Adapter())

    def norm_scale(self, norm: nn.Module | None, hidden: int, dtype: torch.dtype = torch.float32,
                   device=None) -> torch.Tensor:
        """The elementwise scale [hidden] (float32) that ``norm`` multiplies the normalised residual by."""
        return self.residual.adapter.norm_scale(norm, hidden, dtype, device)

    # -- the decoder's sequence, as the adapter reads it off the model's inputs ------------------------------
    @property
    def placeholders(self) -> dict[str, str]:
        """Prompt strings for {image} / {audio} that the adapter gives (see ``Adapter.placeholders``)."""
        return dict(self.residual.adapter.placeholders)

    def input_modules(self) -> list[nn.Module]:
        """Modules whose forward receives the model's inputs (see ``Adapter.input_modules``)."""
        return self.residual.adapter.input_modules(self.model)

    def prefix_length(self, inputs: Mapping[str, Any]) -> int:
        """How many positions the decoder runs before ``input_ids`` for these inputs (0 for most families)."""
        return sum(self.residual.adapter.prefix_positions(self.model, inputs).values())

    def sequence_groups(self, groups, inputs: Mapping[str, Any]):
        """``groups`` read off ``input_ids`` (TokenGroups over the ids) as groups over the sequence the decoder
        runs: modality positions the model marks in another input, positions it runs before the ids (GIT's image
        embeddings). ``groups`` itself for a family that runs its ids as they are."""
        a = self.residual.adapter
        for name, mask in a.modality_masks(self.model, inputs).items():
            groups = groups.mark(name, mask)
        for name, n in reversed(list(a.prefix_positions(self.model, inputs).items())):
            groups = groups.prepend(n, name)
        images = a.image_grids(self.model, inputs)
        if images is not None:
            groups = groups.with_image_grids(images)
        return groups

    def padding_inputs(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Inputs that make a left-padded batch exact for this family (see ``Adapter.padding_inputs``)."""
        return self.residual.adapter.padding_inputs(self.model, inputs)

    def attention_stand_ins(self) -> dict[nn.Module, nn.Module]:
        """{attention module: stand-in that dispatches through AttentionInterface} (see the Adapter's method)."""
        return self.residual.adapter.attention_stand_ins(self)

    def cross_key_groups(self, layer: int | None = None, unit: str = "attn") -> frozenset[str]:
        """Token groups every key of cross-attention ``layer`` belongs to (its keys have no text positions);
        empty for a self-attention layer. ``layer=None``: the union over the model's cross-attention layers and
        the layers' cross-attention units. ``unit="xattn"``: the cross-attention feeding the layer."""
        a, modalities = self.residual.adapter, frozenset(self.modality_token_ids)
        if unit == "xattn":
            lf = self.layers[layer]
            return a.cross_unit_key_groups(lf, modalities) if lf.cross_attn is not None else frozenset()
        chosen = [lf for lf in self.layers if lf.cross] if layer is None else [self.layers[layer]]
        out = frozenset().union(*(a.cross_key_groups(lf, modalities) for lf in chosen if lf.cross))
        if layer is None:
            out = out.union(*(a.cross_unit_key_groups(lf, modalities) for lf in self.layers if lf.cross_attn))
        return out

    def cross_heads(self, layer: int) -> tuple[int, int, int]:
        """(query heads, KV heads, head_dim) of the cross-attention feeding a layer ((0, 0, 0) where none)."""
        lf = self.layers[layer]
        return (0, 0, 0) if lf.cross_attn is None else attention_shape(lf.cross_attn, self.text_config)

    @property
    def cross_layers(self) -> list[int]:
        """Layers fed by a cross-attention besides their own token mixer (where CROSS_SITES exist)."""
        return [lf.index for lf in self.layers if lf.cross_attn is not None]

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
            "stack": self.stack,
            "mixer_kinds": [lf.mixer_kind for lf in self.layers],
            "unserved_mixers": self.unserved,
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
    out = _child(attn, _OUT_PROJ_NAMES)
    # the output projection reads heads x head_dim: right also where q_proj emits more than the queries
    # (gated attention emits query and gate, 2 x heads x head_dim)
    declared = (getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
                or getattr(getattr(attn, "config", None) or text_config, "num_attention_heads", None))
    if isinstance(out, nn.Linear):
        width = out.in_features
        n_heads = width // head_dim
        if isinstance(declared, int) and declared > 0 and n_heads != declared and width % declared == 0:
            # value heads wider than the query/key heads (multi-head latent attention): the output projection
            # reads heads x v_head_dim, and the declared head count is the real one
            n_heads, head_dim = declared, width // declared
    elif isinstance(q, nn.Linear):
        n_heads = q.out_features // head_dim
    else:
        n_heads = getattr(attn, "num_heads", text_config.num_attention_heads)
    groups = getattr(attn, "num_key_value_groups", None)
    if isinstance(k, nn.Linear):
        n_kv = k.out_features // head_dim
    elif groups:
        n_kv = n_heads // groups
    else:
        n_kv = getattr(text_config, "num_key_value_heads", n_heads) or n_heads
    return int(n_heads), int(n_kv), int(head_dim)


def key_projection(attn: nn.Module | None) -> nn.Linear | None:
    """The attention module's key projection Linear (``k_proj``; ``key`` in BERT-style attention such as GIT's),
    whose output is the attn.k_pre site; None where it has none (a layer that reuses another layer's keys)."""
    for name in ("k_proj", "key"):
        k = getattr(attn, name, None) if attn is not None else None
        if isinstance(k, nn.Linear):
            return k
    return None


def _child(module: nn.Module, names) -> nn.Module | None:
    for n in names:
        m = getattr(module, n, None)
        if isinstance(m, nn.Module):
            return m
    return None


def _looks_like_attention(m: nn.Module) -> bool:
    return (_child(m, _OUT_PROJ_NAMES) is not None
            and all(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj")))


def _is_softmax_attention(m: nn.Module, cfg) -> bool:
    return (getattr(m, "config", None) is cfg and hasattr(m, "layer_idx")
            and _child(m, _OUT_PROJ_NAMES) is not None
            and any(isinstance(getattr(m, n, None), nn.Linear) for n in ("q_proj", "k_proj", "qkv_proj", "query_key_value")))


class Adapter:
    """Model facts for one architecture family. Subclass and `register_adapter` it for a new family.

    Override only what the generic inference gets wrong: `model_types` (config.model_type values served),
    `token_id_keys`, `decoder(model)`, `layer_kind(...)`, `notes`; and the behaviour the core asks through
    ModelFacts: the residual layout (`residual_*`), `norm_scale`, `cross_key_groups`. Everything else is inferred."""

    name: ClassVar[str] = "generic"
    model_types: ClassVar[tuple[str, ...]] = ()
    notes: ClassVar[tuple[str, ...]] = ()
    prefix_bidirectional: ClassVar[bool] = False
    resid_stacked: ClassVar[bool] = False
    prefix_replay: ClassVar[bool] = True
    # default user turn: where the image goes relative to the text ("before" or "after")
    image_position: ClassVar[str] = "before"
    # prompt strings for a template's {image} / {audio} where the processor's own cannot be read off it ("" where
    # the processor or the model places the modality itself: Kosmos-2, GIT)
    placeholders: ClassVar[dict[str, str]] = {}

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in self.model_types

    def decoder(self, model: nn.Module) -> nn.Module:
        """The stack that produces the logits: ``get_decoder()`` followed down (a multimodal model's language
        model, and an encoder-decoder language model's decoder)."""
        decoder = model
        for _ in range(4):
            nxt = decoder.get_decoder() if hasattr(decoder, "get_decoder") else None
            if not isinstance(nxt, nn.Module) or nxt is decoder:
                break
            decoder = nxt
        inner = getattr(decoder, "model", None)  # a *ForCausalLM language model: its inner model holds the layers
        if not isinstance(getattr(decoder, "layers", None), nn.ModuleList) and isinstance(
                getattr(inner, "layers", None), nn.ModuleList):
            decoder = inner
        return decoder

    def unserved_mixers(self, decoder: nn.Module, layers: list[LayerFacts], cfg) -> list[str]:
        """Token mixers of the text stack that arbiter does not route (a second attention inside a layer, such as
        an encoder-decoder's cross-attention; attention blocks outside the layer list). Knockouts refuse models
        that have any, since they would leave those paths open."""
        out = []
        inside: set[int] = set()
        served = {id(lf.cross_attn) for lf in layers if lf.cross_attn is not None}
        for lf in layers:
            deleted = ({id(m) for m in lf.mixer.modules()} if lf.mixer is not None
                       and lf.mixer_kind in ("linear_attention", "convolution", "state_space") else set())
            for name, m in lf.layer.named_modules():
                inside.add(id(m))
                if (m is not lf.attn and id(m) not in served and lf.attn is not None
                        and _is_softmax_attention(m, cfg)):
                    out.append(f"layer {lf.index}: {name} ({type(m).__name__}), a second attention in the layer")
                elif "indexer" in type(m).__name__.lower():
                    out.append(f"layer {lf.index}: {name} ({type(m).__name__}), a sparse-attention indexer that "
                               "chooses each query's keys from every position (the choice itself carries them)")
                elif isinstance(m, nn.Conv1d) and id(m) not in deleted:
                    out.append(f"layer {lf.index}: {name} ({type(m).__name__}), a convolution over positions "
                               "outside the layer's served mixer")
        for name, m in decoder.named_modules():
            if (id(m) not in inside and id(m) not in served and _looks_like_attention(m)
                    and getattr(m, "config", cfg) is cfg):
                out.append(f"{name} ({type(m).__name__}), an attention block outside the decoder's layer list")
        return out

    def cross_sources(self, model: nn.Module, decoder: nn.Module, layers: list[LayerFacts]) -> list[str]:
        """Unrouted stacks whose outputs the layers' cross-attention reads. Generic: where a layer holds a second
        attention (an encoder-decoder), its keys are an encoder's positions, grouped at run time from the
        encoder's inputs: served when the encoder is found; an adapter whose cross-attention reads one
        modality's states returns []."""
        if not any(lf.cross_attn is not None for lf in layers):
            return []
        if self.encoder_stack(model, decoder) is not None:
            return []  # its positions are grouped at run time from its own inputs (ModelFacts.encoder_groups)
        return ["the encoder whose states the decoder's cross-attention reads (arbiter found no encoder module "
                "beside the decoder, so it cannot place those keys in token groups)"]

    def encoder_stack(self, model: nn.Module, decoder: nn.Module) -> nn.Module | None:
        """The encoder whose output the decoder's cross-attention reads (encoder-decoder models), else None."""
        for m in model.modules():
            enc = getattr(m, "encoder", None)
            if m is not model and isinstance(enc, nn.Module) and enc is not decoder \
                    and any(c is decoder for c in m.children()):
                return enc
        return None

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

    def token_mixer(self, layer: nn.Module, mlp: nn.Module | None) -> tuple[nn.Module | None, str]:
        """The token mixer of a layer without softmax attention and its kind (one of MIXER_KINDS), inferred from
        the names of the layer's children; ``(None, "none")`` when no child looks like one. Override for a
        family whose mixer the names do not reveal."""
        unknown = None
        for name, child in layer.named_children():
            if child is mlp or "norm" in name.lower() or name in _MLP_NAMES:
                continue
            label = type(child).__name__.lower().replace("_", "")
            for fragment, kind in _MIXER_PATTERNS:
                if fragment in label:
                    return child, kind
            if not any(p in label for p in _POINTWISE) and any(True for _ in child.parameters()):
                unknown = child
        return (unknown, "unknown") if unknown is not None else (None, "none")

    # -- behaviour the core asks for (through ModelFacts); override in a family adapter ------------------------
    def residual_batch_dim(self, x: torch.Tensor) -> int:
        """Batch dim of a residual-like value (see ``ResidualLayout``): 0 for [batch, seq, hidden]."""
        return 0

    def residual_seq_dim(self, x: torch.Tensor) -> int:
        """Sequence dim of a residual-like value: 1 for [batch, seq, hidden]."""
        return 1

    def residual_main_stream(self, x: torch.Tensor) -> torch.Tensor:
        """The stream the model reads out of a residual-like value: the value itself for one stream."""
        return x

    def norm_scale(self, norm: nn.Module | None, hidden: int, dtype: torch.dtype = torch.float32,
                   device=None) -> torch.Tensor:
        """Elementwise scale [hidden] (float32) of a norm, read off the module itself: for an RMS-style norm
        y = x / rms(x) * s, s = norm(ones) * sqrt(1 + eps), whether the module stores s as ``weight`` or as
        ``1 + weight``; a LayerNorm's ``weight``; ones without a norm."""
        if norm is None:
            return torch.ones(hidden)
        if isinstance(norm, nn.LayerNorm):
            w = norm.weight
            return w.detach().float() if w is not None else torch.ones(hidden)
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)) or 0.0)
        with torch.no_grad():
            probe_in = torch.ones(1, hidden, dtype=dtype, device=device)
            return norm(probe_in)[0].float() * (1.0 + eps) ** 0.5

    def cross_attentions(self, decoder: nn.Module, layers: list[LayerFacts], cfg) -> dict[int, nn.Module]:
        """Cross-attentions feeding layers besides their own mixer: {layer index: module}. Generic: a second
        softmax attention inside a layer (an encoder-decoder's cross-attention). Override for blocks that sit
        outside the layer list."""
        out = {}
        for lf in layers:
            extra = [m for m in lf.layer.modules() if m is not lf.attn and _is_softmax_attention(m, cfg)]
            if lf.attn is not None and len(extra) == 1:
                out[lf.index] = extra[0]
        return out

    def cross_unit_key_groups(self, layer: LayerFacts, modalities: frozenset[str]) -> frozenset[str]:
        """Token groups every key of the cross-attention feeding ``layer`` belongs to. Generic: none (the keys
        are another stack's positions, e.g. an encoder's, which mix modalities); an adapter whose cross-attention
        reads one modality only names it."""
        return frozenset()

    def cross_key_groups(self, layer: LayerFacts, modalities: frozenset[str]) -> frozenset[str]:
        """Token groups that every key of a cross-attention layer belongs to (its keys are another modality's,
        with no text positions). Generic: the model's modalities (those it has placeholder token ids for); an
        adapter that knows better names them."""
        return modalities

    # -- where the generic inference cannot see a family's modules or sequence; override in a family adapter -----
    def layer_facts(self, index: int, layer: nn.Module, cfg) -> LayerFacts | None:
        """The facts of one text layer where the adapter knows its modules better than the generic inference
        (attention that does not hold the text config, an output projection outside the attention module);
        None: inferred generically."""
        return None

    def final_norm(self, decoder: nn.Module) -> nn.Module | None:
        """The norm applied to the last layer's output before the unembedding (None: there is none)."""
        return _child(decoder, _FINAL_NORM_NAMES)

    def input_modules(self, model: nn.Module) -> list[nn.Module]:
        """Modules whose forward receives the model's inputs (input_ids and the rest) at each call: the model, and
        any inner model its generate() calls instead of its own forward."""
        return [model]

    def prefix_positions(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, int]:
        """Positions the decoder runs before ``input_ids`` with no token for them, as {group: count} in sequence
        order, read from the model's inputs (the kwargs of its forward, or a processor's output). Generic: none,
        the decoder runs the ids as they are."""
        return {}

    def modality_masks(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Modality positions the model marks in an input of its own rather than by token ids, as {group:
        [batch, ids] bool}, read from the model's inputs. Generic: none."""
        return {}

    def image_grids(self, model: nn.Module, inputs: Mapping[str, Any]) -> list[dict] | None:
        """Where each image's placeholder tokens lie on the image, for the images of ``inputs`` (the model's
        forward kwargs or a processor's output) in batch order: per image ``{"tokens": n, "views": [...]}``, its
        ``n`` image tokens in sequence order holding views made by :func:`patch_view` (patch (r, c) of a view is
        the image's token ``offset + r * row_stride + c``; tokens outside every view, e.g. row-end markers, are no
        patch). Read from the model's config and inputs, never guessed. Generic: None (unknown; image overlays
        then refuse with an error that says so)."""
        return None

    def padding_inputs(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Inputs to add to a left-padded batch (encode pads on the left) so that each sample computes as it would
        alone, for a family whose forward does not follow the attention mask by itself (GIT counts its learned
        positions from the first column). Generic: none."""
        return {}

    def attention_stand_ins(self, facts: "ModelFacts") -> dict[nn.Module, nn.Module]:
        """For a family whose text attention computes attention inline instead of calling transformers'
        AttentionInterface: {attention module: stand-in}, stand-ins that compute exactly what the module does but
        call the attention function the text config names; the Lens swaps them in while attached. Generic: none
        (the modeling code dispatches through AttentionInterface itself)."""
        return {}

    def facts(self, model: nn.Module, stack: str = "decoder") -> ModelFacts:
        """The model's facts for one of its stacks: ``"decoder"`` (the stack that produces the logits) or
        ``"encoder"`` (an encoder-decoder's encoder, served on its own positions: no unembedding)."""
        decoder = self.decoder(model)
        if stack == "encoder":
            decoder = self.encoder_stack(model, decoder)
            if decoder is None:
                raise UnsupportedModelError(unsupported_message(
                    model, "stack='encoder' was asked for, but the model has no encoder stack beside its decoder "
                           "(a decoder-only model: attach without stack=)"))
        elif stack != "decoder":
            raise UnsupportedModelError(f"unknown stack {stack!r}: choose 'decoder' (the stack that produces the "
                                        "logits) or 'encoder' (an encoder-decoder's encoder).")
        cfg = decoder.config
        layers_list = _find_layers(decoder, cfg)
        if layers_list is None:
            raise UnsupportedModelError(unsupported_message(model, "found no list of decoder layers"))
        layers: list[LayerFacts] = []
        for i, layer in enumerate(layers_list):
            known = self.layer_facts(i, layer, cfg)
            if known is not None:
                layers.append(known)
                continue
            attns = [m for m in layer.modules() if _is_softmax_attention(m, cfg)]
            attn = attns[0] if attns else None
            mlp = _child(layer, _MLP_NAMES) or next(
                (c for c in layer.children() if any(p in type(c).__name__.lower() for p in ("mlp", "moe"))), None)
            cross = bool(attn is not None and self.is_cross(layer, attn))
            if attn is not None:
                mixer, kind, skip = attn, "cross_attention" if cross else "attention", None
            else:
                mixer, kind = self.token_mixer(layer, mlp)
                skip = (f"layer {i} ({type(layer).__name__}) mixes tokens with "
                        f"{type(mixer).__name__ if mixer is not None else 'no module arbiter recognises'} "
                        f"({kind}), not softmax attention; attention sites (attn.q/k/v/scores/probs, "
                        "attn.head_out) do not exist there")
            layers.append(LayerFacts(
                index=i, layer=layer, attn=attn,
                out_proj=_child(attn, _OUT_PROJ_NAMES) if attn is not None else None,
                mlp=mlp, mid_norm=_child(layer, _MID_NORM_NAMES),
                cross=cross, skip_reason=skip, mixer=mixer, mixer_kind=kind))
        if not any(lf.attn is not None for lf in layers):
            raise UnsupportedModelError(unsupported_message(
                model, "found no text attention module (a module whose .config is the text config, with "
                       "layer_idx, q/k projections and an output projection)"))
        for index, module in self.cross_attentions(decoder, layers, cfg).items():
            layers[index].cross_attn = module
        unserved = self.unserved_mixers(decoder, layers, cfg) + self.cross_sources(model, decoder, layers)
        encoder = merged = None
        if stack == "decoder" and any(lf.cross_attn is not None and not self.cross_unit_key_groups(
                lf, frozenset(self.token_ids(model))) for lf in layers):
            encoder = self.encoder_stack(model, decoder)
        elif stack == "decoder" and not any(lf.cross or lf.cross_attn is not None for lf in layers):
            enc = self.encoder_stack(model, decoder)
            if enc is not None:
                merged = (f"the decoder reads the encoder ({type(enc).__name__}) inside its self-attention (no "
                          "cross-attention module in its layers), so each attention call mixes the two sequences' "
                          "keys")
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if stack == "encoder":
            lm_head = None   # the encoder's positions are not unembedded
        elif lm_head is None:  # a composite model whose language model keeps the unembedding (an Omni thinker)
            vocab = getattr(cfg, "vocab_size", None)
            lm_head = next((m for n, m in model.named_modules() if n.split(".")[-1] == "lm_head"
                            and isinstance(m, nn.Linear) and m.out_features == vocab), None)
        # layers that reuse the keys of earlier layers read them from a side store: no prefix replay
        kv_shared = bool(getattr(cfg, "num_kv_shared_layers", 0) or 0)
        return ModelFacts(
            family=self.name, model=model, text_config=cfg, decoder=decoder, layers=layers,
            final_norm=self.final_norm(decoder), lm_head=lm_head,
            modality_token_ids=self.token_ids(model), notes=list(self.notes),
            prefix_bidirectional=self.prefix_bidirectional,
            resid_stacked=self.resid_stacked, prefix_replay=self.prefix_replay and not kv_shared, adapter=self,
            unserved=unserved, stack=stack, encoder=encoder, merged_encoder=merged)


def patch_view(name: str, offset: int, rows: int, cols: int, row_stride: int | None = None,
               whole_image: bool = False) -> dict:
    """One patch grid of an image (see ``Adapter.image_grids``): ``rows`` x ``cols`` patches, row-major, patch
    (r, c) at the image's token ``offset + r * row_stride + c`` (``row_stride`` defaults to ``cols``).
    ``whole_image``: the grid covers the whole original image (resized, maybe unevenly, never cropped or padded);
    False where that depends on the processor (a center crop, a pad to square)."""
    return {"name": name, "offset": int(offset), "rows": int(rows), "cols": int(cols),
            "row_stride": int(cols if row_stride is None else row_stride), "whole_image": bool(whole_image)}


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


def families_with(method: str) -> list[str]:
    """The registered adapters that override ``Adapter.<method>`` (e.g. "image_grids"), by family name."""
    base = getattr(Adapter, method)
    return sorted({a.name for a in _REGISTRY if getattr(type(a), method, base) is not base})


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


def model_facts(model: nn.Module, stack: str = "decoder") -> ModelFacts:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise UnsupportedModelError(
            f"arbiter.attach expects a transformers PreTrainedModel (with .config), got {type(model).__name__}. "
            f"Families with an adapter: {', '.join(supported_families())}; for another architecture subclass "
            "arbiter.adapters.Adapter and call arbiter.register_adapter(MyAdapter).")
    return find_adapter(model).facts(model, stack)


def module_eager_function(module: nn.Module) -> Callable:
    """The eager attention function of the module's own modeling file (softcapping etc. included)."""
    mod = sys.modules.get(type(module).__module__)
    fn = getattr(mod, "eager_attention_forward", None)
    if fn is None:
        from transformers.models.llama.modeling_llama import eager_attention_forward as fn  # noqa: N813
    return fn


def first_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())
