"""Structural survey of every multimodal family in transformers' auto mappings: does arbiter attach, and right?

    python benchmarks/zoo_survey.py --json /tmp/zoo.json            # every family (~40 s on 2 shared cores)
    python benchmarks/zoo_survey.py --only llava,mllama,whisper    # a few families
    python benchmarks/zoo_survey.py --json OUT --md OUT.md          # also write the Markdown to a file

The families are the union of the model types in ``transformers.models.auto.modeling_auto``'s
``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES``, ``MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES``,
``MODEL_FOR_VISUAL_QUESTION_ANSWERING_MAPPING_NAMES`` and ``MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES``. For each:
the default config (``AutoConfig.for_model``), the mapped class (the first mapping that names the type, in that
order) instantiated on the meta device (no weights, no memory), then ``arbiter.adapters.model_facts(model)`` and
``summary()``, the ModelFacts methods that need no inputs, and ``arbiter.attach(model)`` entered and closed.
Extra rows (``--no-extra`` drops them): the other classes a type maps to (BLIP's VQA head), a representative build
of the composite encoder-decoder types (COMPOSITE_FALLBACKS), and CONFIG_FIXUPS (the smallest fix for default
configs transformers itself cannot build, and a variant the default config hides).

Outcome of a row: ``facts`` / ``unsupported`` (arbiter's UnsupportedModelError: a clear refusal; ``diagnosis``
says what the first layer's attention-like modules lack) / ``crash`` (any other exception out of model_facts or
ModelFacts.summary) / ``could not build`` (the config or the meta model, or the time limit while building).
For ``facts`` rows ``flags`` are checks that fired (things that look wrong; ``info``: worth knowing, not wrong):
heads of every attention layer against the text config and the attention module's own attributes (num_heads,
num_key_value_heads, head_dim; MLA layouts); the decoder against the lm_head (hidden size, get_output_embeddings);
the final norm against the norms the decoder's forward applies after its layer loop (read off its source); the
layer count against the config; layers of mixer kind "none" or whose mixer is an MLP / MoE; token mixers inside a
layer that arbiter neither routes nor lists as unserved (short convolutions, sparse-attention indexers, SSMs);
merged self + cross attention; an encoder read by cross-attention but missing from ``unserved``; KV sharing with
prefix replay on; whether the text attention dispatches through AttentionInterface (the attention module's
modeling file calls ``ALL_ATTENTION_FUNCTIONS.get_interface(`` or the adapter stands in for it); whether attach
succeeds. Static only: no forward runs (a meta-device forward stops at ``.item()`` in most families).

Each family runs in a forked worker with a time limit (``--timeout``); one family never stops the survey.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib
import inspect
import json
import multiprocessing as mp
import os
import platform
import re
import sys
import time
import traceback
import warnings
from typing import Any

MAPPINGS = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
            "MODEL_FOR_VISUAL_QUESTION_ANSWERING_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES")
OUTCOMES = ("facts", "unsupported", "crash", "could not build")
# composite types whose default config cannot build: a representative pair of sub-configs for a second row
COMPOSITE_FALLBACKS = {
    "vision-encoder-decoder": ("vit", "trocr", "ViT encoder + TrOCR decoder (TrOCR's layout)"),
    "speech-encoder-decoder": ("wav2vec2", "bart", "wav2vec2 encoder + BART decoder"),
}
# default configs that do not build in transformers itself (a field left None): the smallest patch that builds, for
# a second row (the primary row keeps "could not build")
def _fix_vocab_map(ids: dict):
    def fix(c):
        c.vocabulary_map = dict(ids)
    return fix


def _fix_text_head_dim(c):
    t = c.get_text_config()
    t.head_dim = t.hidden_size // t.num_attention_heads


def _fix_kv_heads(c):
    c.num_key_value_heads = c.num_attention_heads


def _kv_shared(n: int):
    def fix(c):
        c.get_text_config().num_kv_shared_layers = n
    return fix


CONFIG_FIXUPS = {
    "chameleon": (_fix_vocab_map({"<image>": 8711}), "config fixup: vocabulary_map={'<image>': 8711} (default None)"),
    "emu3": (_fix_vocab_map({"<image>": 151851, "<|extra_200|>": 151850}),
             "config fixup: vocabulary_map with <image>, <|extra_200|> (default None)"),
    "hunyuan_vl": (_fix_text_head_dim, "config fixup: text head_dim = hidden / heads (default None)"),
    "moonshine_streaming": (_fix_kv_heads, "config fixup: num_key_value_heads = num_attention_heads (default lacks it)"),
    # not a build failure: a variant the default hides (the field exists, 0 by default; Gemma 3n's checkpoints use it)
    "gemma4": (_kv_shared(10), "variant: text num_kv_shared_layers=10 (KV sharing, as Gemma 3n; default 0)"),
}
_ENCODERISH = ("vision", "audio", "encoder", "vit", "siglip", "clip", "speech")


def families() -> dict[str, list[tuple[str, str]]]:
    """{model_type: [(mapping name, class name), ...]} over MAPPINGS, in mapping order."""
    from transformers.models.auto import modeling_auto

    out: dict[str, list[tuple[str, str]]] = {}
    for name in MAPPINGS:
        for mt, cls in getattr(modeling_auto, name, {}).items():
            for c in (cls if isinstance(cls, (list, tuple)) else (cls,)):
                out.setdefault(mt, []).append((name, c))
    return dict(sorted(out.items()))


def _fallback_label(model_type: str, fallback: str | None) -> str | None:
    if fallback == "fixup":
        return CONFIG_FIXUPS[model_type][1]
    return COMPOSITE_FALLBACKS[model_type][2] if fallback else None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else "")[:300]


def _resolve_class(model_type: str, name: str):
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    cls = getattr(transformers, name, None)
    if cls is None:
        mod = importlib.import_module(f"transformers.models.{model_type_to_module_name(model_type)}")
        cls = getattr(mod, name)
    return cls


def _build(model_type: str, cls_name: str, fallback: str | None = None):
    import torch
    from transformers import AutoConfig

    if fallback == "fixup":
        config = AutoConfig.for_model(model_type)
        CONFIG_FIXUPS[model_type][0](config)
    elif fallback:
        enc, dec, _ = COMPOSITE_FALLBACKS[model_type]
        cfg_cls = type(AutoConfig.for_model(model_type, encoder=AutoConfig.for_model(enc).to_dict(),
                                            decoder=AutoConfig.for_model(dec).to_dict()))
        config = cfg_cls.from_encoder_decoder_configs(AutoConfig.for_model(enc), AutoConfig.for_model(dec))
    else:
        config = AutoConfig.for_model(model_type)
    cls = _resolve_class(model_type, cls_name)
    with torch.device("meta"):
        try:
            model = cls._from_config(config)
            how = "_from_config"
        except Exception as first:  # noqa: BLE001 - try the plain constructor before giving up
            try:
                model = cls(config)
                how = f"cls(config) (_from_config raised {type(first).__name__})"
            except Exception:  # noqa: BLE001
                raise first from None
    return model.eval(), how


def _path_of(root, target) -> str | None:
    for name, m in root.named_modules():
        if m is target:
            return name or "<root>"
    return None


def _source_calls_interface(cls) -> bool:
    try:
        src = inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return False
    return "ALL_ATTENTION_FUNCTIONS.get_interface(" in src


def _text_config(model):
    cfg = model.config
    try:
        return cfg.get_text_config(decoder=True)
    except Exception:  # noqa: BLE001
        return cfg


def _get(obj, name: str, default=None):
    """getattr that also survives configs raising on ambiguous per-layer attributes (heterogeneous configs)."""
    try:
        return getattr(obj, name, default)
    except Exception:  # noqa: BLE001 - e.g. AmbiguousGlobalPerLayerAttributeError (a RuntimeError)
        return default


def _expected_heads(cfg, decoder_name: str) -> tuple[int | None, int | None, int | None, str]:
    """(query heads, KV heads, head_dim, where read) the config says the decoder's attention has."""
    nh = _get(cfg, "num_attention_heads")
    src = "num_attention_heads"
    if _get(cfg, "decoder_attention_heads") is not None and _get(cfg, "is_encoder_decoder", False):
        nh, src = cfg.decoder_attention_heads, "decoder_attention_heads"
    nkv = _get(cfg, "num_key_value_heads")
    if nkv is None and src == "decoder_attention_heads":
        nkv = _get(cfg, "decoder_num_key_value_heads")
    if nkv is None:
        nkv = nh
    try:
        hd = getattr(cfg, "head_dim", None)
        ambiguous = False
    except Exception:  # noqa: BLE001 - per-layer head_dim of a heterogeneous config: the modules tell
        hd, ambiguous = None, True
    hidden = _get(cfg, "hidden_size") or _get(cfg, "d_model")
    if hd is None and not ambiguous and nh and hidden:
        hd = hidden // nh
    return nh, nkv, hd, src


_FINAL_NORM_LIKE = ("norm", "final_layernorm", "ln_f", "final_norm", "layer_norm", "norm_f", "final_layer_norm",
                    "layernorm", "final_ln")
# names / classes of modules inside a layer that mix tokens outside the softmax (a path knockouts do not cut)
_MIXER_LIKE = ("conv", "mamba", "ssm", "deltanet", "linear_attn", "linearattention", "indexer", "retention",
               "rwkv", "hyena")
_MLA_LIKE = ("kv_a_proj", "kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj", "q_b_proj", "wkv_a", "wkv_b")


def _final_norm_candidates(dec) -> list[str]:
    """Norm modules a decoder (or its inner ``.model``) holds directly, by final-norm-like name."""
    from torch import nn

    out = []
    for prefix, root in (("", dec), ("model.", getattr(dec, "model", None))):
        if not isinstance(root, nn.Module):
            continue
        for name, child in root.named_children():
            if name.lower() in _FINAL_NORM_LIKE and "embed" not in name.lower():
                out.append(prefix + name)
    return out


def _norms_after_layers(dec, layers_path: str | None) -> list[tuple[str, Any]]:
    """Norm modules the decoder's forward applies after its layer loop (read off the forward's source): the final
    norm(s), whatever their name (LFM2's ``embedding_norm``, Nemotron-H's ``norm_f``, OPT's ``final_layer_norm``)."""
    root, attr = dec, (layers_path or "layers").split(".")
    for part in attr[:-1]:
        root = getattr(root, part, root)
    try:
        src = inspect.getsource(type(root).forward)
    except (OSError, TypeError):
        return []
    at = src.rfind(f"self.{attr[-1]}")
    if at < 0:
        return []
    out = []
    for name in re.findall(r"self\.(\w+)\(", src[at:]):
        m = getattr(root, name, None)
        if m is not None and "norm" in type(m).__name__.lower() and all(m is not x for _, x in out):
            out.append(((".".join(attr[:-1]) + "." if attr[:-1] else "") + name, m))
    return out


def analyse(model, facts) -> dict[str, Any]:
    """What arbiter found, and the checks against the model (``flags``: things that look wrong; ``info``: worth
    knowing, not wrong)."""
    from torch import nn

    r: dict[str, Any] = {}
    flags: list[str] = []
    info: list[str] = []
    dec = facts.decoder
    cfg = facts.text_config
    tcfg = _text_config(model)
    generic = facts.family == "generic"
    r["decoder"] = type(dec).__name__
    r["decoder_path"] = _path_of(model, dec)
    r["family_adapter"] = facts.family
    r["n_layers"] = facts.n_layers
    layers_list = None
    if facts.layers:
        first = facts.layers[0].layer
        for name, m in dec.named_modules():
            if isinstance(m, nn.ModuleList) and any(x is first for x in m):
                layers_list = name
                break
    r["layers_path"] = layers_list
    kinds = collections.Counter(lf.mixer_kind for lf in facts.layers)
    r["mixer_kinds"] = dict(kinds)
    r["attention_layers"] = len(facts.attention_layers)
    r["cross_attention_layers"] = [lf.index for lf in facts.layers if lf.cross]
    r["cross_layers"] = facts.cross_layers
    r["unserved"] = list(facts.unserved)
    r["skipped"] = {str(lf.index): lf.skip_reason for lf in facts.layers if lf.skip_reason}
    r["modality_token_ids"] = facts.modality_token_ids
    r["text_config_class"] = type(tcfg).__name__
    r["facts_config_class"] = type(cfg).__name__

    # -- the decoder: is it the text stack that produces the logits? ------------------------------------------
    if cfg is not tcfg:
        same = (_get(cfg, "model_type") == _get(tcfg, "model_type")
                and _get(cfg, "hidden_size") == _get(tcfg, "hidden_size"))
        (info if same else flags).append(
            f"decoder config {type(cfg).__name__} is not the model's text config {type(tcfg).__name__}")
    low = type(dec).__name__.lower()
    if any(k in low for k in _ENCODERISH) and "decoder" not in low and "text" not in low:
        (flags if generic else info).append(f"decoder {type(dec).__name__} has an encoder / vision / audio name"
                                            + ("" if generic else f" (the {facts.family} adapter chose it)"))
    if dec is model:
        info.append("decoder is the model itself (no get_decoder)")
    lm = facts.lm_head
    hidden = _get(cfg, "hidden_size") or _get(cfg, "d_model")
    r["lm_head"] = type(lm).__name__ if lm is not None else None
    if lm is None:
        elsewhere = [n for n, m in model.named_modules() if n.split(".")[-1] in ("lm_head", "logits_dense")
                     and isinstance(m, nn.Module)]
        flags.append("no lm_head (model.get_output_embeddings() is None)"
                     + (f"; the model has {', '.join(elsewhere[:3])}" if elsewhere else ""))
    elif isinstance(lm, nn.Linear):
        r["lm_head_shape"] = [lm.out_features, lm.in_features]
        if hidden is not None and lm.in_features != hidden:
            flags.append(f"lm_head reads {lm.in_features} features, the decoder's hidden size is {hidden}")
        emb = None
        try:
            emb = dec.get_input_embeddings()
        except Exception:  # noqa: BLE001
            pass
        if isinstance(emb, nn.Embedding) and emb.num_embeddings != lm.out_features:
            info.append(f"lm_head has {lm.out_features} outputs, the decoder's embedding {emb.num_embeddings} rows")
    try:
        emb = model.get_input_embeddings()
    except Exception:  # noqa: BLE001
        emb = None
    if isinstance(emb, nn.Module) and not any(m is emb for m in dec.modules()):
        info.append(f"the model's input embeddings ({_path_of(model, emb)}) are outside the decoder")
    r["final_norm"] = type(facts.final_norm).__name__ if facts.final_norm is not None else None
    after = _norms_after_layers(dec, layers_list)
    r["norms_after_layers"] = [n for n, _ in after]
    if facts.final_norm is None:
        cands = [n for n, _ in after] or _final_norm_candidates(dec)
        if cands:
            flags.append(f"final norm not found (final_norm=None) though the decoder "
                         + ("applies " if after else "has ") + ", ".join("decoder." + c for c in cands)
                         + (" after its layers" if after else ""))
        else:
            info.append("no final norm (none found)")
    elif after and all(m is not facts.final_norm for _, m in after):
        flags.append(f"final_norm is decoder.{_path_of(dec, facts.final_norm)}, but the forward applies "
                     f"{', '.join('decoder.' + n for n, _ in after)} after the layers")
    n_cfg = _get(cfg, "num_hidden_layers")
    if _get(cfg, "is_encoder_decoder", False) and _get(cfg, "decoder_layers") is not None:
        n_cfg = cfg.decoder_layers
    r["config_layers"] = n_cfg
    if n_cfg is not None and n_cfg != facts.n_layers:
        flags.append(f"{facts.n_layers} layers found (decoder.{layers_list}), the config says {n_cfg}")
    if layers_list not in (None, "layers"):
        info.append(f"layer list found by fallback search: decoder.{layers_list}")
    none_layers = [lf.index for lf in facts.layers if lf.mixer_kind == "none"]
    if none_layers:
        flags.append(f"{len(none_layers)} layer(s) with mixer kind 'none' (first {none_layers[:5]}): "
                     f"{type(facts.layers[none_layers[0]].layer).__name__}")
    def _mlp_like(m) -> bool:
        n = type(m).__name__.lower()
        return (any(k in n for k in ("mlp", "moe", "expert", "feedforward", "ffn"))
                and not any(k in n for k in ("deltanet", "mamba", "ssm", "conv", "linearattention", "attn",
                                             "attention", "retention", "rwkv")))

    mlp_mixers = [lf.index for lf in facts.layers if lf.mixer is not None and lf.mixer_kind != "none"
                  and lf.attn is None and _mlp_like(lf.mixer)]
    if mlp_mixers:
        lf0 = facts.layers[mlp_mixers[0]]
        flags.append(f"{len(mlp_mixers)} MLP / MoE layer(s) taken as token mixers (first {mlp_mixers[:4]}: "
                     f"{type(lf0.mixer).__name__} as {lf0.mixer_kind!r}); they mix no tokens (kind 'none', mlp.* "
                     "sites) and knockouts 'by deletion' there are meaningless")
    shared = _get(cfg, "num_kv_shared_layers")
    if isinstance(shared, int) and shared > 0 and facts.prefix_replay:
        flags.append(f"num_kv_shared_layers={shared} (late layers read earlier layers' KV from a side store), yet "
                     f"prefix_replay=True (the {facts.family} adapter; gemma3n's sets it False) and no note")
    elif isinstance(shared, int) and shared == 0 and facts.family == "generic":
        info.append("config has num_kv_shared_layers (0 here); a checkpoint with KV sharing would need what the "
                    "gemma3n adapter sets (prefix_replay=False)")
    no_mlp = [lf.index for lf in facts.layers if lf.mlp is None]
    if no_mlp:
        info.append(f"{len(no_mlp)} layer(s) without an MLP found (first {no_mlp[:3]})")

    # -- token mixing arbiter does not see: modules inside the layers that mix positions outside the softmax -----
    hidden_mixers: list[str] = []
    unserved_text = " ".join(facts.unserved)
    for lf in facts.layers:
        skip = set()
        for own in (lf.mixer if lf.attn is None else None, lf.cross_attn, lf.mlp):
            if own is not None:
                skip |= {id(m) for m in own.modules()}
        for name, m in lf.layer.named_modules():
            if id(m) in skip or not name or m is lf.attn:
                continue
            if "attention" in type(m).__name__.lower() and "linear" not in type(m).__name__.lower():
                continue  # a second softmax attention: arbiter's own unserved / cross checks cover it
            words = [w.lower() for w in re.split(r"[_\s.]+|(?<=[a-z0-9])(?=[A-Z])",
                                                 f"{name.split('.')[-1]} {type(m).__name__}") if w]
            joined = "".join(words)
            conv = isinstance(m, nn.Conv1d) and m.kernel_size[0] > 1
            hit = conv or any((any(w.startswith(k) for w in words) if k == "ssm" else k.replace("_", "") in joined)
                              for k in _MIXER_LIKE)
            if hit and name not in unserved_text and not any(name.startswith(h.split(" ")[0] + ".")
                                                             for h in hidden_mixers):
                hidden_mixers.append(f"{name} ({type(m).__name__})")
        if hidden_mixers:
            flags.append(f"layer {lf.index} holds token mixers besides its {lf.mixer_kind} that arbiter neither "
                         f"routes nor lists as unserved: {', '.join(hidden_mixers[:4])}"
                         + (f" (and {len(hidden_mixers) - 4} more)" if len(hidden_mixers) > 4 else ""))
            break
    # an attention that also reads another stack's states in the same softmax (merged self + cross attention)
    for lf in facts.layers:
        if lf.attn is None or lf.cross or lf.cross_attn is not None:
            continue
        doc = (type(lf.attn).__doc__ or "").lower()
        if "merged" in type(lf.attn).__name__.lower() or ("merged" in doc and "cross" in doc):
            flags.append(f"layer {lf.index}'s attention {type(lf.attn).__name__} is merged self + cross attention "
                         "(encoder keys concatenated after the decoder's in one softmax), yet arbiter marks it plain "
                         "self-attention, with no cross unit and the encoder not unserved")
            break
    # an encoder read through cross-attention that arbiter does not list as unserved (Whisper's it does)
    has_cross = any(lf.cross_attn is not None or lf.cross for lf in facts.layers)
    if has_cross and facts.cross_layers and "encoder" not in unserved_text:
        encs = [n for n, c in model.named_modules() if n and n.count(".") <= 2 and "encoder" in n.split(".")[-1]
                and not any(c is x for x in dec.modules())]
        if encs:
            flags.append(f"cross-attention reads an encoder ({encs[0]}) that arbiter does not list as unserved "
                         "(whisper's is listed), so knockouts do not refuse")

    # other attention stacks outside the decoder (a talker, a second LM, an action expert, encoders)
    others = []
    inside = {id(m) for m in dec.modules()}
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and id(m) not in inside and not any(
                name.startswith(o[0] + ".") for o in others):
            if any("attention" in type(sub).__name__.lower() or "attn" in sub_name.lower()
                   for block in m for sub_name, sub in block.named_modules()):
                others.append((name, len(m)))
    r["other_stacks"] = [f"{n} [{k}]" for n, k in others]
    for n, k in others:
        if not any(e in n.lower() for e in _ENCODERISH + ("visual", "image", "audio", "tower", "qformer",
                                                           "projector", "resampler", "perceiver", "connector")):
            info.append(f"another attention stack outside the decoder: {n} [{k}]")

    # -- heads ----------------------------------------------------------------------------------------------
    enh, enkv, ehd, src = _expected_heads(cfg, type(dec).__name__)
    r["config_heads"] = [enh, enkv, ehd]
    r["config_heads_from"] = src
    shapes: collections.Counter = collections.Counter()
    attn_classes: collections.Counter = collections.Counter()
    module_mismatch = []
    mla = []
    for i in facts.attention_layers:
        lf = facts.layers[i]
        try:
            shape = facts.heads(i)
        except Exception as e:  # noqa: BLE001
            flags.append(f"facts.heads({i}) raised {type(e).__name__}: {_first_line(e)}")
            break
        shapes[shape] += 1
        attn_classes[type(lf.attn).__name__] += 1
        a = lf.attn
        own_h = _get(a, "num_heads") or _get(a, "num_attention_heads")
        own_kv = _get(a, "num_key_value_heads") or _get(a, "num_kv_heads")
        own_hd = _get(a, "head_dim")
        groups = _get(a, "num_key_value_groups")
        if isinstance(own_h, int) and own_h != shape[0]:
            module_mismatch.append(f"layer {i}: module num_heads={own_h} vs {shape[0]}")
        if isinstance(own_kv, int) and own_kv != shape[1]:
            module_mismatch.append(f"layer {i}: module num_key_value_heads={own_kv} vs {shape[1]}")
        elif (own_kv is None and isinstance(groups, int) and groups and isinstance(own_h, int)
              and own_h // groups != shape[1]):
            module_mismatch.append(f"layer {i}: module num_heads / num_key_value_groups = {own_h // groups} "
                                   f"KV heads vs {shape[1]}")
        if isinstance(own_hd, int) and own_hd != shape[2]:
            module_mismatch.append(f"layer {i}: module head_dim={own_hd} vs {shape[2]}")
        if any(isinstance(_get(a, n), nn.Module) for n in _MLA_LIKE) and not mla:
            mla.append(f"layer {i} {type(a).__name__}: latent (MLA-style) attention "
                       f"({', '.join(n for n in _MLA_LIKE if isinstance(_get(a, n), nn.Module))}; "
                       f"v_head_dim={_get(a, 'v_head_dim')}, qk_head_dim={_get(a, 'qk_head_dim')}), no k_proj")
    r["heads_first"] = list(facts.heads(facts.attention_layers[0])) if facts.attention_layers else None
    r["heads_distinct"] = {f"{a}/{b}/{c}": n for (a, b, c), n in shapes.items()}
    r["attention_classes"] = dict(attn_classes)
    heads_ok = True
    if r["heads_first"] is not None:
        nh, nkv, hd = r["heads_first"]
        bad = []
        if enh is not None and nh != enh:
            bad.append(f"query heads {nh} vs config {src}={enh}")
        if enkv is not None and nkv != enkv:
            bad.append(f"KV heads {nkv} vs config num_key_value_heads={enkv}")
        if ehd is not None and hd != ehd:
            bad.append(f"head_dim {hd} vs config head_dim {ehd}")
        if nkv and nh % nkv:
            bad.append(f"query heads {nh} not a multiple of KV heads {nkv}")
        first_i = facts.attention_layers[0]
        a0 = facts.layers[first_i].attn
        module_agrees = (not any(m.startswith(f"layer {first_i}:") for m in module_mismatch)
                         and (isinstance(_get(a0, "num_key_value_heads"), int) or isinstance(_get(a0, "head_dim"), int)))
        if bad and module_agrees and not mla:
            info.append(f"layer {first_i} heads differ from the global config ({'; '.join(bad)}) but match the "
                        "module's own attributes (per-layer-type heads)")
        elif bad:
            heads_ok = False
            flags.append(f"heads mismatch (first attention layer {first_i}): " + "; ".join(bad))
    if module_mismatch:
        heads_ok = False
        flags.append("heads disagree with the attention module's own attributes: " + "; ".join(module_mismatch[:3])
                     + (f" (+{len(module_mismatch) - 3} more)" if len(module_mismatch) > 3 else ""))
    if mla:
        flags.append(mla[0] + ": heads() reads o_proj / head_dim, which MLA does not lay out that way"
                     if not heads_ok else mla[0])
    if len(shapes) > 1:
        info.append("attention layers differ in heads: " + ", ".join(f"{k} x{v}" for k, v in
                                                                   r["heads_distinct"].items()))
    r["heads_ok"] = heads_ok

    # -- does the text attention dispatch through AttentionInterface (routable by arbiter's router)? ------------
    r["attn_implementation"] = _get(cfg, "_attn_implementation")
    r["supports_attention_backend"] = bool(getattr(type(model), "_supports_attention_backend", False))
    r["decoder_supports_attention_backend"] = bool(getattr(type(dec), "_supports_attention_backend", False))
    calls = {type(facts.layers[i].attn).__name__: _source_calls_interface(type(facts.layers[i].attn))
             for i in facts.attention_layers}
    r["attention_file_calls_get_interface"] = calls
    try:
        stand_ins = len(facts.attention_stand_ins())
    except Exception as e:  # noqa: BLE001
        stand_ins = 0
        flags.append(f"attention_stand_ins() raised {type(e).__name__}: {_first_line(e)}")
    r["stand_ins"] = stand_ins
    r["routable"] = (bool(calls) and all(calls.values())) or stand_ins > 0
    if not r["routable"]:
        flags.append("attention not routable: " + ", ".join(n for n, ok in calls.items() if not ok)
                     + " does not call ALL_ATTENTION_FUNCTIONS.get_interface (and no stand-in)")
    if not r["supports_attention_backend"]:
        info.append(f"{type(model).__name__}._supports_attention_backend is not set")
    r["flags"] = flags
    r["info"] = info
    return r


def diagnose(model) -> dict[str, Any]:
    """For a refusal: the stack arbiter's adapter would take as decoder and the attention-like modules of its first
    layer, with why each is not taken as softmax attention (config, layer_idx, projections)."""
    from torch import nn

    import arbiter.adapters as adapters
    from arbiter.adapters import base

    out: dict[str, Any] = {}
    try:
        ad = adapters.find_adapter(model)
        dec = ad.decoder(model)
        cfg = dec.config
        out["decoder"] = type(dec).__name__
        layers = base._find_layers(dec, cfg)
        out["layers"] = len(layers) if layers is not None else None
        if layers is None:
            return out
        seen = []
        for name, m in layers[0].named_modules():
            leaf = name.split(".")[-1].lower()
            if not name or not ("attn" in leaf or "attention" in leaf or "attention" in type(m).__name__.lower()
                                or "mixer" in leaf):
                continue
            if any(name.startswith(s + ".") for s, _ in seen):
                continue
            why = []
            if _get(m, "config") is not cfg:
                why.append("config is not the decoder's" if _get(m, "config") is not None else "no .config")
            if not hasattr(m, "layer_idx"):
                why.append("no layer_idx")
            if base._child(m, base._OUT_PROJ_NAMES) is None:
                why.append("no o_proj/out_proj/dense/wo/c_proj")
            projs = [n for n, c in m.named_children() if isinstance(c, nn.Linear)]
            if not any(isinstance(_get(m, n), nn.Linear) for n in ("q_proj", "k_proj", "qkv_proj", "query_key_value")):
                why.append(f"no q/k/qkv projection (Linear children: {', '.join(projs[:6]) or 'none'})")
            seen.append((name, f"{name} ({type(m).__name__}): " + ("; ".join(why) if why else "looks routable")))
        out["first_layer"] = type(layers[0]).__name__
        out["attention_like"] = [s for _, s in seen[:4]]
    except Exception as e:  # noqa: BLE001
        out["diagnose_error"] = f"{type(e).__name__}: {_first_line(e)}"
    return out


def survey_one(model_type: str, cls_name: str, mappings: list[str], fallback: str | None = None,
               phase=lambda p: None) -> dict[str, Any]:
    """One row: build the model on meta, run model_facts, analyse. Never raises."""
    import arbiter.adapters as adapters
    from arbiter.errors import UnsupportedModelError

    rec: dict[str, Any] = {"family": model_type, "class": cls_name, "mappings": mappings, "outcome": None,
                           "fallback": _fallback_label(model_type, fallback)}
    t0 = time.perf_counter()
    phase("build")
    try:
        model, how = _build(model_type, cls_name, fallback)
    except BaseException as e:  # noqa: BLE001
        rec.update(outcome="could not build", error_type=type(e).__name__, error=_first_line(e),
                   seconds=round(time.perf_counter() - t0, 2))
        return rec
    rec["built_with"] = how
    rec["model_config"] = type(model.config).__name__
    phase("facts")
    try:
        facts = adapters.model_facts(model)
        facts.summary()
    except UnsupportedModelError as e:
        rec.update(outcome="unsupported", error_type=type(e).__name__, error=_first_line(e), diagnosis=diagnose(model))
    except BaseException as e:  # noqa: BLE001
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(tb)
                      if "arbiter" in f.filename), None)
        rec.update(outcome="crash", error_type=type(e).__name__, error=_first_line(e), where=where)
    else:
        rec["outcome"] = "facts"
        phase("methods")
        bad = []
        for what, call in (("cross_key_groups()", facts.cross_key_groups),
                           ("cross_heads()", lambda: [facts.cross_heads(i) for i in facts.cross_layers]),
                           ("placeholders", lambda: facts.placeholders),
                           ("input_modules()", facts.input_modules)):
            try:
                call()
            except BaseException as e:  # noqa: BLE001
                bad.append(f"ModelFacts.{what} raised {type(e).__name__}: {_first_line(e)}")
        phase("attach")
        try:
            import arbiter

            lens = arbiter.attach(model)
            lens.__enter__()
            lens.close()
            rec["attach"] = "ok"
        except UnsupportedModelError as e:
            rec["attach"] = f"refused: {_first_line(e)}"
        except BaseException as e:  # noqa: BLE001
            rec["attach"] = f"crash: {type(e).__name__}: {_first_line(e)}"
        phase("analyse")
        try:
            rec.update(analyse(model, facts))
        except BaseException as e:  # noqa: BLE001 - a bug of the survey, not of arbiter
            rec.setdefault("flags", []).append(f"survey analysis raised {type(e).__name__}: {_first_line(e)}")
        flags = rec.setdefault("flags", [])
        flags += bad
        if rec["attach"] != "ok":
            flags.append(f"arbiter.attach(model) on meta {rec['attach']}")
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001
        pass
    import logging
    logging.disable(logging.WARNING)


def _worker(conn, tasks) -> None:
    _quiet()
    import torch
    torch.set_num_threads(1)
    for task in tasks:
        rec = survey_one(*task, phase=lambda p: conn.send(("phase", p)))
        conn.send(("done", rec))
    conn.close()


def run_all(tasks: list[tuple], timeout: float, progress=None) -> list[dict[str, Any]]:
    """Survey the tasks in a forked worker; a family that overruns ``timeout`` or kills the worker is recorded
    and the worker restarted on the rest."""
    ctx = mp.get_context("fork")
    results: list[dict[str, Any]] = []
    pending = list(tasks)
    while pending:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(child, pending), daemon=True)
        proc.start()
        child.close()
        phase, t_start = "start", time.monotonic()
        while pending:
            left = timeout - (time.monotonic() - t_start)
            if left > 0 and parent.poll(min(left, 5.0)):
                try:
                    kind, payload = parent.recv()
                except EOFError:
                    kind, payload = "died", None
                if kind == "phase":
                    phase = payload
                    if payload == "build":
                        t_start = time.monotonic()
                    continue
                if kind == "done":
                    results.append(payload)
                    pending.pop(0)
                    if progress:
                        progress(payload)
                    continue
            elif left > 0 and proc.is_alive():
                continue
            # timed out, or the worker died
            mt, cls, mappings, fb = (pending[0] + (None,))[:4]
            why = (f"timed out after {timeout:g} s" if proc.is_alive()
                   else f"worker died (exit code {proc.exitcode})")
            rec = {"family": mt, "class": cls, "mappings": mappings,
                   "fallback": _fallback_label(mt, fb),
                   "outcome": "could not build" if phase in ("start", "build") else "crash",
                   "error_type": "Timeout" if proc.is_alive() else "WorkerDied",
                   "error": f"{why} during {phase}", "seconds": round(time.monotonic() - t_start, 1)}
            results.append(rec)
            pending.pop(0)
            if progress:
                progress(rec)
            break
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        parent.close()
    return results


# -- Markdown ---------------------------------------------------------------------------------------------------
def _cell(s: Any, n: int = 400) -> str:
    s = "" if s is None else str(s)
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= n else s[: n - 1] + "…"


def _row_note(r: dict[str, Any]) -> str:
    if r["outcome"] != "facts":
        err = r.get("error") or ""
        if r.get("error_type") == "UnsupportedModelError" and ": " in err:
            err = err.split("): ", 1)[-1].split(". Families with an adapter")[0]  # the reason, not the boilerplate
        s = f"{r.get('error_type')}: {err}"
        if r.get("where"):
            s += f" (at {r['where']})"
        d = r.get("diagnosis") or {}
        if d:
            s += f" — decoder {d.get('decoder')} ({d.get('layers')} layers)"
            if d.get("attention_like"):
                s += "; first layer: " + " / ".join(d["attention_like"][:2])
            if d.get("diagnose_error"):
                s += "; " + d["diagnose_error"]
        return s
    parts = [f"**{f}**" for f in r.get("flags", [])]
    if r.get("heads_first"):
        parts.append("heads {}/{}/{} (cfg {}/{}/{})".format(*r["heads_first"], *r.get("config_heads", [None] * 3)))
    parts.append(f"attn={r.get('attn_implementation')}" + ("" if r.get("routable") else " NOT routable"))
    parts += r.get("info", [])
    return "; ".join(parts)


def markdown(results: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [f"Survey of {header['n_families']} model types ({header['n_rows']} rows) — transformers "
             f"{header['transformers']}, torch {header['torch']}, Python {header['python']}, {header['date']}, "
             f"{header['seconds']:.0f} s", ""]
    cols = ["family", "class", "outcome", "decoder", "layers", "mixers", "heads ok?", "cross layers", "unserved",
            "note"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for r in results:
        fam = r["family"] + (f" ({r['fallback']})" if r.get("fallback") else "")
        if r["outcome"] == "facts":
            mixers = ", ".join(f"{k} {v}" for k, v in r.get("mixer_kinds", {}).items())
            heads = "yes" if r.get("heads_ok") else "**NO**"
            cross = ",".join(map(str, r.get("cross_layers") or r.get("cross_attention_layers") or [])) or "–"
            if r.get("cross_attention_layers") and r.get("cross_layers"):
                cross = f"xattn {r['cross_layers']}; cross-layers {r['cross_attention_layers']}"
            elif r.get("cross_attention_layers"):
                cross = f"cross-layers {_cell(r['cross_attention_layers'], 60)}"
            unserved = str(len(r.get("unserved", []))) if r.get("unserved") else "–"
            if r.get("unserved"):
                unserved += ": " + _cell(r["unserved"][0], 120)
            row = [fam, r["class"], "facts" + (" ⚠" if r.get("flags") else ""), r.get("decoder"),
                   r.get("n_layers"), mixers, heads, cross, unserved, _row_note(r)]
        else:
            row = [fam, r["class"], r["outcome"], "", "", "", "", "", "", _row_note(r)]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    lines.append("")
    lines.append(summary_line(results))
    return "\n".join(lines)


def summary_line(results: list[dict[str, Any]]) -> str:
    main = [r for r in results if r.get("primary", True) and not r.get("fallback")]
    c = collections.Counter(r["outcome"] for r in main)
    flagged = sum(1 for r in main if r["outcome"] == "facts" and r.get("flags"))
    extra = [r for r in results if not (r.get("primary", True) and not r.get("fallback"))]
    s = (f"**Summary** ({len(main)} model types, primary class each): "
         + ", ".join(f"{o}: {c.get(o, 0)}" for o in OUTCOMES)
         + f"; of the facts rows, {flagged} carry flags (⚠) and {c.get('facts', 0) - flagged} look right.")
    if extra:
        ce = collections.Counter(r["outcome"] for r in extra)
        s += (f" Extra rows ({len(extra)}: other mapped classes, composite fallbacks, config fixups): "
              + ", ".join(f"{o}: {ce.get(o, 0)}" for o in OUTCOMES if ce.get(o)) + ".")
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write one object per row to this file")
    p.add_argument("--md", help="also write the Markdown table to this file")
    p.add_argument("--only", help="comma list of model types")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds per family (default 90)")
    p.add_argument("--no-extra", action="store_true", help="skip other mapped classes and composite fallbacks")
    p.add_argument("--quiet", action="store_true", help="no per-family progress on stderr")
    a = p.parse_args(argv)
    _quiet()
    t0 = time.perf_counter()
    import torch
    import transformers

    import arbiter.adapters  # noqa: F401 - import once before forking

    fams = families()
    if a.only:
        want = [s.strip() for s in a.only.split(",") if s.strip()]
        unknown = [w for w in want if w not in fams]
        if unknown:
            p.error(f"not in the mappings: {', '.join(unknown)}")
        fams = {k: fams[k] for k in want}
    tasks, primary = [], set()
    for mt, entries in fams.items():
        seen: list[str] = []
        for _, cls in entries:
            if cls not in seen:
                seen.append(cls)
        for j, cls in enumerate(seen):
            if j and a.no_extra:
                continue
            maps = [m.replace("MODEL_FOR_", "").replace("_MAPPING_NAMES", "") for m, c in entries if c == cls]
            tasks.append((mt, cls, maps, None))
            if j == 0:
                primary.add((mt, cls))
        if mt in COMPOSITE_FALLBACKS and not a.no_extra:
            tasks.append((mt, seen[0], ["fallback"], "fallback"))
        if mt in CONFIG_FIXUPS and not a.no_extra:
            tasks.append((mt, seen[0], ["fixup"], "fixup"))

    def progress(r):
        if not a.quiet:
            print(f"  {r['family']:<28} {r['class']:<45} {r['outcome']:<16} {r.get('seconds', '')}",
                  file=sys.stderr, flush=True)

    results = run_all(tasks, a.timeout, progress)
    for r in results:
        r["primary"] = (r["family"], r["class"]) in primary and not r.get("fallback")
    results.sort(key=lambda r: (r["family"], not r["primary"], r.get("fallback") or ""))
    header = {"date": datetime.date.today().isoformat(), "transformers": transformers.__version__,
              "torch": torch.__version__, "python": platform.python_version(), "n_families": len(fams),
              "n_rows": len(results), "seconds": time.perf_counter() - t0}
    md = markdown(results, header)
    print(md)
    if a.md:
        with open(a.md, "w") as f:
            f.write(md + "\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{**r, "transformers": header["transformers"]} for r in results], f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
