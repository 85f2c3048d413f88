"""Adapter for GIT (GitForCausalLM / GitModel): what the generic inference cannot see in this family.

GIT prepends its image embeddings (per image, or per frame of ``[batch, frames, 3, H, W]`` pixel values: one CLS and
``(H / patch) * (W / patch)`` patch positions) to the text embeddings. Those positions exist only in the decoder's
sequence, not in ``input_ids``, so the ``image`` group is the prefix the model builds from ``pixel_values``, and the
logits cover it too. Image positions attend to each other bidirectionally (GIT's block mask), text causally.

The text stack is BERT-style and post-LN: ``GitSelfAttention`` (query / key / value, no config of its own) computes
eager attention inline, without transformers' AttentionInterface; its output projection is the sibling
``attention.output.dense``, then come the residual add and a LayerNorm (so there is no pre-MLP norm: resid.mid does
not exist, and no final norm). While a Lens is attached each ``GitSelfAttention`` is stood in for by a twin (same
parameters, buffers and hooks) whose forward does the same arithmetic but calls the attention function the config
names, with GIT's own eager function (scores divided by sqrt(head_dim), softmax in the input dtype) as the eager base:
untouched layers compute bit-identically and arbiter's router serves the rest."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .base import Adapter, LayerFacts, ModelFacts, register_adapter


def eager_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, **kwargs):
    """GitSelfAttention's arithmetic as an attention function: ``[batch, seq, heads, head_dim]`` outputs and the
    ``[batch, heads, seq, keys]`` probabilities (arbiter's eager base for GIT, found by module_eager_function)."""
    scores = torch.matmul(query, key.transpose(-1, -2))
    scores = scores / math.sqrt(query.shape[-1])
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _routed_forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
    """GitSelfAttention.forward with the attention itself dispatched through AttentionInterface."""
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.attention_head_size)
    query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
    key = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
    value = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, probs = attention(self, query, key, value, attention_mask,
                           dropout=self.dropout.p if self.training else 0.0, **kwargs)
    return out.reshape(*input_shape, self.all_head_size), probs


def _training(self) -> bool:
    return self.__dict__["_arbiter_original"].training


def _set_training(self, mode: bool) -> None:
    self.__dict__["_arbiter_original"].training = mode


_ROUTED: dict[type, type] = {}


def routed_twin(module: nn.Module, config) -> nn.Module:
    """A stand-in for a GitSelfAttention: an instance of a subclass of its class (isinstance holds, so transformers'
    output recording still finds it) sharing its parameters, buffers, submodules and hook dicts, whose forward
    dispatches through AttentionInterface with ``config._attn_implementation``; ``training`` is the original's."""
    cls = type(module)
    if cls not in _ROUTED:
        _ROUTED[cls] = type(f"Routed{cls.__name__}", (cls,), {
            "forward": _routed_forward, "training": property(_training, _set_training), "__module__": __name__,
            "__doc__": f"{cls.__name__} dispatching through AttentionInterface (arbiter, while attached)."})
    twin = object.__new__(_ROUTED[cls])
    twin.__dict__.update(module.__dict__)
    twin.__dict__.pop("training", None)
    twin.__dict__["_arbiter_original"] = module
    twin.__dict__["config"] = config
    return twin


def _is_git_self_attention(m) -> bool:
    return (hasattr(m, "layer_idx") and hasattr(m, "attention_head_size") and hasattr(m, "all_head_size")
            and isinstance(getattr(m, "dropout", None), nn.Dropout)
            and all(isinstance(getattr(m, n, None), nn.Linear) for n in ("query", "key", "value")))


@register_adapter
class GitAdapter(Adapter):
    name = "git"
    model_types = ("git",)
    notes = ("the image positions are the (H/patch)*(W/patch)+1 positions per image (or frame) that GIT prepends "
             "to the text: they are not in input_ids, groups and logits include them",
             "post-LN (BERT-style) layers: attn.out / mlp.out are the output projections (attention.output.dense, "
             "output.dense) before the residual add and LayerNorm; resid.mid does not exist",
             "GIT's learned text positions ignore the attention mask: encode() passes position_ids counted over "
             "the mask (as GIT's generate() does), so a left-padded sample computes as it would alone; raw "
             "left-padded processor inputs without them shift a padded sample's positions (in the model itself)",)
    placeholders = {"image": ""}  # the model prepends the image; the prompt is the text

    def decoder(self, model: nn.Module) -> nn.Module:
        # the layer stack itself: GitModel's forward prepends the image embeddings before calling it, so its
        # input is the whole sequence the layers run
        base = getattr(model, "git", model)
        return base.encoder

    def layer_facts(self, index: int, layer: nn.Module, cfg) -> LayerFacts | None:
        block = getattr(layer, "attention", None)
        attn = getattr(block, "self", None)
        out = getattr(getattr(block, "output", None), "dense", None)
        mlp_out = getattr(getattr(layer, "output", None), "dense", None)
        if not (_is_git_self_attention(attn) and isinstance(out, nn.Linear)):
            return None
        return LayerFacts(index=index, layer=layer, attn=attn, out_proj=out,
                          mlp=mlp_out if isinstance(mlp_out, nn.Linear) else None, mid_norm=None, mixer=attn,
                          attn_out=out)

    def final_norm(self, decoder: nn.Module) -> nn.Module | None:
        return None  # post-LN: the last layer's output is normalised already

    def prefix_positions(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, int]:
        pixels = inputs.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() not in (4, 5):
            return {}
        patch = int(model.config.vision_config.patch_size)
        frames = pixels.shape[1] if pixels.dim() == 5 else 1
        h, w = pixels.shape[-2:]
        return {"image": frames * ((h // patch) * (w // patch) + 1)}

    def padding_inputs(self, model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        # GIT's forward counts its learned text positions from the first column, pads included; its generate()
        # counts them over the attention mask: pass those, so a left-padded sample computes as it would alone
        mask = inputs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or "position_ids" in inputs or bool(mask.all()):
            return {}
        return {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}

    def attention_stand_ins(self, facts: ModelFacts) -> dict[nn.Module, nn.Module]:
        return {lf.attn: routed_twin(lf.attn, facts.text_config) for lf in facts.layers if lf.attn is not None}
