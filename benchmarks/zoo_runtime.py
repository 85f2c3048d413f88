"""Runtime battery on every multimodal family in transformers' auto mappings: arbiter attached to a narrow random
model of each family, run, checked against the model itself.

    python benchmarks/zoo_runtime.py --json /tmp/zoo_runtime.json --md /tmp/zoo_runtime.md   # every family
    python benchmarks/zoo_runtime.py --only qwen3_5,lfm2_vl                               # a few

The families are zoo_survey.py's (the union of the image-text-to-text, multimodal-LM, visual-QA and
speech-to-text auto mappings). Each is built from its default config made narrow (``narrow``: widths 128, 4 heads
of 32, 4 experts; layer counts, layer types and every per-layer list kept as they are, so hybrid layouts are the
real ones; the relations the modeling code relies on kept: MLA's rotary width, M-RoPE sections, depthwise groups;
an initializer_range below 1e-4 raised to 0.02), random weights (seed 0), float32, on the CPU, in a forked worker
with a time limit. Second rows: VARIANTS (layouts the default configs hide) and FIXUPS (the smallest patch for a
default config that does not build or run in transformers itself; the primary row keeps the model's own error).
A family arbiter refuses (``model_facts`` raises) is recorded as refused before any input is built.

Inputs, text-only (most families): a left-padded batch of 2 prompts of random ids in which a span of positions is
declared the modality group (``image``), given to the Lens with ``lens.use``; the modality inputs are the ids at
those positions (the perturbation changes them). This serves the text stack that arbiter routes, edits and reads,
without a processor (none ships offline for most). Encoder-decoders get random encoder states (``encoder_outputs``,
a fresh copy per call) and decoder ids; Dia's decoder ids carry the same code in each of its codebooks; a composite
without a forward of its own (Qwen2.5-Omni) runs its thinker.

Inputs with the modality (MODALITY_INPUTS: families whose forward needs it: BLIP-2, InstructBLIP(-Video),
IDEFICS, Kosmos-2, Voxtral realtime): random pixels / log-mel features sized from the narrowed config, ids laid out
as the family's processor does (image token x query tokens, Kosmos-2's ``image_embeds_position_mask``, IDEFICS's
``image_attention_mask``), left-padded; no ``lens.use``: arbiter reads the groups off the inputs, and the ``groups``
check compares them with the positions the battery put there. The perturbation draws new pixels / features.

Checks (each a value compared with the model itself or weights edited by hand, never with arbiter):
``attach``: logits with the Lens attached and idle are bit-identical to the model's; ``groups`` (modality
inputs): arbiter's groups equal the battery's; ``record``: ``attn.probs`` and ``resid.post`` on the last rows exist
on every layer where the site exists (every layer for the residual, every softmax-attention layer for the
probabilities), one row each, rows sum to 1 and pads get 0; ``eager``: those rows equal the model's own eager
``output_attentions`` (where the model returns them); ``knockout``: ``modality -> last`` in every layer gives 0 on
the modality's keys in the text stack's self-attention and changes the logits; ``independence``: ``modality ->
text`` (text includes last) in every layer makes the last logits independent of the modality input (max |delta| <=
1e-6) while without it they change (> 1e-4); ``block``: blocking head 0 of the first attention layer equals zeroing
that head's input columns of the output projection by hand; ``amplify1``: amplifying by 1 is bit-identical;
``restore``: after an exception inside a knockout and after the Lens closes, logits are bit-identical, the attention
implementation is the loaded one and no hook is left.

Outcomes: ``pass``; ``pass, knockouts refused`` / ``pass, some refused`` (every check that ran passed; arbiter
refused the rest with a clear error); ``FAIL``; ``refused`` (arbiter's clear error at attach or during a run, with
the stage); ``forward fails`` (the model's own forward raises on the battery's inputs); ``crash`` (any other
exception; ``crash_in`` says whether it left arbiter's code last: a finding); ``could not build``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo_survey as zs  # noqa: E402  (families, class resolution, config fixups, worker helpers)

WIDTH, HEADS, KV_HEADS, HEAD_DIM, FFN, EXPERTS = 128, 4, 2, 32, 256, 4
# field -> narrow value (only ever decreased); per-layer fields and layer counts are left alone
_NARROW = {
    "hidden_size": WIDTH, "d_model": WIDTH, "embed_dim": WIDTH, "n_embd": WIDTH, "out_hidden_size": WIDTH,
    "projection_dim": WIDTH, "text_hidden_size": WIDTH, "vision_hidden_size": WIDTH,
    "intermediate_size": FFN, "ffn_dim": FFN, "encoder_ffn_dim": FFN, "decoder_ffn_dim": FFN, "n_inner": FFN,
    "num_attention_heads": HEADS, "num_heads": HEADS, "n_head": HEADS, "encoder_attention_heads": HEADS,
    "decoder_attention_heads": HEADS,
    "head_dim": HEAD_DIM, "attention_head_dim": HEAD_DIM,
    "num_experts": EXPERTS, "num_local_experts": EXPERTS, "n_routed_experts": EXPERTS, "moe_num_experts": EXPERTS,
    "num_experts_per_tok": 2, "moe_topk": 2, "n_shared_experts": 1, "num_shared_experts": 1,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 64,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 32, "qk_head_dim": 32,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "mamba_n_heads": 4, "mamba_d_head": 16, "ssm_state_size": 16, "mamba_d_state": 16, "state_size": 16,
    "time_step_rank": 8, "n_groups": 1, "mamba_n_groups": 1, "n_group": 1, "topk_group": 1,   # expert groups
    "vision_intermediate_size": FFN, "hidden_size_per_layer_input": 8,
    "encoder_hidden_size": WIDTH,   # a cross-attention's key width (BLIP's text decoder, the Q-Formers): the towers'
    "decoder_hidden_size": WIDTH,   # an encoder's output width for the decoder (PP-FormulaNet's projector)
}
# fields that must keep equalling another field of the same config when they did before narrowing:
# (follower, leader): a depthwise convolution's groups (Mimi), OPT's embedding width (BLIP-2's language model: the
# Q-Former's projection writes hidden_size-wide image embeddings into the word embeddings)
_FOLLOW = (("upsample_groups", "hidden_size"), ("word_embed_proj_dim", "hidden_size"))


def _int_attr(c, name):
    try:
        v = getattr(c, name, None)
    except Exception:  # noqa: BLE001 - a per-layer attribute without one global value: left alone
        return None
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _head_dim(c) -> int | None:
    hd = _int_attr(c, "head_dim")
    if hd:
        return hd
    h, n = _int_attr(c, "hidden_size"), _int_attr(c, "num_attention_heads")
    return h // n if h and n else None


def _modeling_mrope_default(c) -> list[int] | None:
    """The ``mrope_section`` default in the modeling code of ``c``'s model type (read off its source)."""
    import ast
    import importlib
    import inspect
    import re

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    mt = getattr(c, "model_type", "") or ""
    for name in {mt, mt.rsplit("_text", 1)[0]}:
        try:
            mod = importlib.import_module(f"transformers.models.{model_type_to_module_name(name)}.modeling_"
                                          f"{model_type_to_module_name(name)}")
            src = inspect.getsource(mod)
        except Exception:  # noqa: BLE001
            continue
        m = re.search(r'get\(\s*"mrope_section"\s*,\s*(\[[\d,\s]+\])', src)
        if m:
            return list(ast.literal_eval(m.group(1)))
    return None


def _scale_mrope(c, old_hd: int | None, new_hd: int | None, changed: list, scaled: set[int]) -> None:
    """Multimodal RoPE sections sum to the rotary half-width: scale them with the head width."""
    if not old_hd or not new_hd or old_hd == new_hd:
        return
    for attr in ("rope_scaling", "rope_parameters"):
        try:
            d = getattr(c, attr, None)
        except Exception:  # noqa: BLE001
            continue
        if id(d) in scaled:
            continue   # a dict shared by two configs: scaled once
        scaled.add(id(d))
        if isinstance(d, dict) and "mrope_section" not in d and _modeling_mrope_default(c):
            d["mrope_section"] = _modeling_mrope_default(c)   # the default the modeling code falls back on
        if isinstance(d, dict) and isinstance(d.get("mrope_section"), (list, tuple)):
            old = list(d["mrope_section"])
            target = int(new_hd * float(d.get("partial_rotary_factor", 1.0))) // 2   # the rotary half-width
            sec = [max(1, x * target // sum(old)) for x in old]
            sec[-1] += target - sum(sec)
            d["mrope_section"] = sec
            changed.append(f"{type(c).__name__}.{attr}.mrope_section {old}->{d['mrope_section']}")


def _sub_configs(config) -> list:
    """The config and every nested PretrainedConfig (depth first)."""
    from transformers import PretrainedConfig

    out, seen, stack = [], set(), [config]
    while stack:
        c = stack.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        out.append(c)
        for v in vars(c).values():
            if isinstance(v, PretrainedConfig):
                stack.append(v)
    return out


def _rotary_factor(c) -> float | None:
    """The partial rotary factor of ``c``: its own field, or the one value its (per-layer-type) rope dicts give."""
    f = getattr(c, "partial_rotary_factor", None)
    if isinstance(f, (int, float)) and not isinstance(f, bool):
        return float(f)
    try:
        d = getattr(c, "rope_parameters", None)
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(d, dict):
        return 1.0
    dicts = [v for v in d.values() if isinstance(v, dict)] or [d]
    found = {float(x.get("partial_rotary_factor", 1.0)) for x in dicts}
    return found.pop() if len(found) == 1 else None


def _set(c, name: str, value: int, old, changed: list) -> None:
    try:
        setattr(c, name, value)
    except AttributeError:   # a derived read-only property (Nemotron 3.5's audio hidden_size): left alone
        return
    changed.append(f"{type(c).__name__}.{name} {old}->{value}")


def _mla_consistent(c, hd_was, rope_was, prf, qk_sum_was, changed: list) -> None:
    """Multi-head latent attention: where the rotary width was read through ``head_dim`` (head_dim x partial
    rotary factor == qk_rope_head_dim: DeepSeek V3, Mistral Large 4, HY-V4-VL, dots3_note), keep it equal to the
    narrowed qk_rope_head_dim; keep qk_head_dim = qk_nope_head_dim + qk_rope_head_dim where it was."""
    rope = _int_attr(c, "qk_rope_head_dim")
    if rope and hd_was and rope_was and prf and int(hd_was * prf) == rope_was:
        want = int(round(rope / prf))
        if _int_attr(c, "head_dim") != want:
            _set(c, "head_dim", want, _int_attr(c, "head_dim"), changed)
    nope = _int_attr(c, "qk_nope_head_dim")
    if qk_sum_was and rope and nope and _int_attr(c, "qk_head_dim") not in (None, rope + nope):
        _set(c, "qk_head_dim", rope + nope, _int_attr(c, "qk_head_dim"), changed)


def narrow(config) -> list[str]:
    """Shrink every width field of ``config`` and its sub-configs in place (see _NARROW), keeping the relations
    the modeling code relies on (_FOLLOW, MLA's rotary width, M-RoPE sections); returns what changed."""
    changed: list[str] = []
    scaled: set[int] = set()   # rope dicts already scaled (one dict shared by two configs is scaled once)
    for c in _sub_configs(config):
        kv_was = _int_attr(c, "num_key_value_heads")
        heads_was = _int_attr(c, "num_attention_heads")
        hd_was = _head_dim(c)
        rope_was, prf = _int_attr(c, "qk_rope_head_dim"), _rotary_factor(c)
        qk_sum_was = (_int_attr(c, "qk_head_dim") is not None and rope_was is not None
                      and _int_attr(c, "qk_head_dim") == rope_was + (_int_attr(c, "qk_nope_head_dim") or 0))
        follow_was = {f: _int_attr(c, f) == _int_attr(c, lead) is not None for f, lead in _FOLLOW}
        for name, value in _NARROW.items():
            old = _int_attr(c, name)
            if old is not None and old > value:
                _set(c, name, value, old, changed)
        for f, lead in _FOLLOW:
            if follow_was[f] and _int_attr(c, f) != _int_attr(c, lead):
                _set(c, f, _int_attr(c, lead), _int_attr(c, f), changed)
        _mla_consistent(c, _int_attr(c, "head_dim") and hd_was, rope_was, prf, qk_sum_was, changed)
        init = getattr(c, "initializer_range", None)
        if isinstance(init, float) and 0 < init < 1e-4:   # BLIP-2's vision default 1e-10: a tower blind to pixels
            _set(c, "initializer_range", 0.02, init, changed)
        if isinstance(kv_was, int) and kv_was > 0:
            new = HEADS if kv_was == heads_was else min(KV_HEADS, kv_was)   # MHA stays MHA
            if new != kv_was:
                c.num_key_value_heads = new
                changed.append(f"{type(c).__name__}.num_key_value_heads {kv_was}->{new}")
        _scale_mrope(c, hd_was, _head_dim(c), changed, scaled)
    return changed


def _small_patches(c):
    c.vision_config.patch_size = 2


# family-specific narrowing, applied to every row of the family before ``narrow``
NARROW_MORE = {
    # the hierarchical-MLP vision tower's widths grow with the patch (614,400 channels at the default 40; a build
    # past any time limit); at 2 they stay small. The tower is not run by text-only inputs.
    "inkling_mm_model": (_small_patches, "vision patch_size 40->2"),
}


def _lfm2_conv(c):
    t = c.get_text_config()
    t.layer_types = ["conv" if i % 3 else "full_attention" for i in range(t.num_hidden_layers)]


def _sliding(window: int):
    def fix(c):
        t = c.get_text_config()
        t.sliding_window = window
        if hasattr(t, "use_sliding_window"):
            t.use_sliding_window = True
            t.max_window_layers = 0
        if getattr(t, "layer_types", None):
            t.layer_types = ["sliding_attention" if i % 2 else "full_attention" for i in range(t.num_hidden_layers)]
    return fix


# variants the default configs hide (the real checkpoints use them): a second row each
VARIANTS = {
    "lfm2_vl": (_lfm2_conv, "variant: short-convolution layers (layer_types conv, conv, full_attention, ...), as "
                            "LFM2-VL's checkpoints"),
    "qwen2_vl": (_sliding(5), "variant: sliding-window attention (window 5) on every other layer"),
    "gemma3": (_sliding(5), "variant: sliding window 5 (the default's 4096 exceeds the battery's 14 positions)"),
}


def _chain(*fixes):
    def fix(c):
        for f in fixes:
            f(c)
    return fix


def _thinker_vision_start(c):
    for sub in _sub_configs(c):
        if type(sub).__name__.endswith("ThinkerConfig") and "vision_start_token_id" not in vars(sub):
            sub.vision_start_token_id = 151652


def _no_talker(c):
    c.enable_audio_output = False


def _rope_per_layer_type(c):
    t = c.get_text_config()
    t.rope_parameters = {kind: {"rope_type": "default", "rope_theta": 10000.0} for kind in set(t.layer_types)}


def _first_dense_then_sparse(c):
    t = c.get_text_config()
    t.mlp_layer_types = ["dense"] + ["sparse"] * (t.num_hidden_layers - 1)
    t.num_experts_per_tok = t.num_experts_per_tok or 6


def _experts(c):
    t = c.get_text_config()
    t.num_experts, t.top_k_experts, t.moe_intermediate_size = 128, 2, 704


def _deepstack_last(c):
    c.deepstack_layer_map = [(-1, 0)]
    c.downsample_rate = c.downsample_rate or "2/4"


def _indexer(c):
    t = c.get_text_config()
    t.indexer_n_heads, t.indexer_kv_heads, t.indexer_head_dim = 4, 1, 32
    t.indexer_budget, t.indexer_compress_ratio = 2048, 4


def _timm_vit(c):
    c.vision_config.architecture = "vit_tiny_patch16_224"
    c.vision_config.model_args = {"embed_dim": WIDTH, "depth": 2, "num_heads": HEADS}


def _full_window(c):
    t = c.get_text_config()
    t.sliding_window = t.max_position_embeddings


def _four_rope_axes(c):
    t = c.get_text_config()
    head_dim = t.head_dim or t.hidden_size // t.num_attention_heads
    t.rope_parameters = {**(t.rope_parameters or {}), "mrope_section": [head_dim // 8] * 4}


_VISION_START = ("config fixup: thinker vision_start_token_id = 151652 (the checkpoints' value; the default thinker "
                 "config lacks it, yet the rope index reads it on every forward)")
# default configs that do not build, or whose forward fails, in transformers itself: the smallest patch that runs,
# for a second row (the primary row keeps the model's own error); zoo_survey.CONFIG_FIXUPS and more
FIXUPS = {
    **zs.CONFIG_FIXUPS,
    "hunyuan_vl": (_chain(zs.CONFIG_FIXUPS["hunyuan_vl"][0], _four_rope_axes),
                   zs.CONFIG_FIXUPS["hunyuan_vl"][1] + "; text rope mrope_section = 4 axes of head_dim / 8 (default "
                   "none, yet the text rotary reads its length)"),
    "qwen2_5_omni_thinker": (_thinker_vision_start, _VISION_START),
    "qwen3_omni_moe_thinker": (_thinker_vision_start, _VISION_START),
    "qwen2_5_omni": (_thinker_vision_start, _VISION_START),
    "qwen3_omni_moe": (_chain(_thinker_vision_start, _no_talker),
                       "config fixup: enable_audio_output=False (the default talker config lacks fields its modules "
                       "read: shared_expert_intermediate_size, spatial_merge_size; the thinker makes the text "
                       "logits), thinker vision_start_token_id = 151652"),
    "cohere_compass": (_rope_per_layer_type, "config fixup: text rope_parameters per layer type (default {}; "
                                             "the rotary reads rope_parameters[layer_type])"),
    "deepseek_ocr2": (_first_dense_then_sparse, "config fixup: text mlp_layer_types = dense, then sparse; "
                                                "num_experts_per_tok 6 (defaults None)"),
    "diffusion_gemma": (_experts, "config fixup: text num_experts 128, top_k_experts 2, moe_intermediate_size 704 "
                                  "(defaults None, yet the router is built)"),
    "granite4_vision": (_deepstack_last, "config fixup: deepstack_layer_map = [(-1, 0)], downsample_rate '2/4' "
                                         "(defaults None, yet the model builds one downsampler per entry)"),
    "perception_lm": (_timm_vit, "config fixup: vision tower timm vit_tiny_patch16_224 with model_args embed_dim "
                                 "128, depth 2, 4 heads (default resnet50 without model_args, yet the projector "
                                 "reads model_args['embed_dim'])"),
    "qwen4_exp": (_indexer, "config fixup: text indexer heads 4 / KV heads 1 / head dim 32, budget 2048, compress "
                            "ratio 4 (defaults None, yet every layer builds the sparse-attention indexer)"),
    "step3p7": (_full_window, "config fixup: text sliding_window = max_position_embeddings (default None, yet the "
                              "model builds a sliding-window mask on every forward; every layer is full attention)"),
    "llama4": (lambda c: None, "call fixup: runs model.language_model, the text-only path of the model's forward "
                               "(which reads image_outputs off its text model's output, which has none)"),
}
# fixup rows that call a sub-model rather than the model (the rest of the forward is the same for their inputs)
CALL_TARGETS = {"llama4": "language_model"}


def build(model_type: str, cls_name: str, fixup: bool | str):
    import torch
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    if fixup == "variant":
        VARIANTS[model_type][0](config)
    elif fixup:
        FIXUPS[model_type][0](config)
    changed = []
    if model_type in NARROW_MORE:
        NARROW_MORE[model_type][0](config)
        changed.append(NARROW_MORE[model_type][1])
    changed += narrow(config)
    cls = zs._resolve_class(model_type, cls_name)
    torch.manual_seed(0)
    try:
        model = cls._from_config(config, attn_implementation="sdpa")
    except ValueError as e:  # a model (or a tower) without SDPA: eager
        if "scaled_dot_product_attention" not in str(e):
            raise
        torch.manual_seed(0)
        model = cls._from_config(config, attn_implementation="eager")
    return model.eval().float(), changed


# -- inputs ---------------------------------------------------------------------------------------------------
SEQ, PAD, SPAN = 14, 3, (4, 8)   # positions; row 0 left-padded by PAD; the image span, relative to the first real
TEXT = 10                        # text positions after a modality block (modality inputs; row 0 has TEXT - PAD)
CODEBOOKS = {"dia": "num_channels"}   # decoders whose ids are [batch, positions, codebooks]: the config field


@dataclasses.dataclass
class Batch:
    """One battery batch: the forward's inputs, the groups the battery itself put there, and the same inputs with
    the modality changed (for the independence check)."""

    inputs: dict[str, Any]
    groups: Any                 # TokenGroups over the decoder's sequence: the modality group, text, last, pad
    modality: str               # the modality group's name ("image", "video", "audio")
    perturbed: dict[str, Any]
    changes: str                # what the perturbation changes
    declared: bool              # True: groups given with lens.use; False: arbiter reads them off the inputs
    notes: list[str] = dataclasses.field(default_factory=list)   # settings the inputs needed
    encoder_text: bool = False  # an encoder-decoder whose encoder mixes the modality into text positions


def _special_ids(config) -> set[int]:
    out = set()
    for c in _sub_configs(config):
        for k, v in vars(c).items():
            if ("token" in k and ("id" in k or "index" in k)) and isinstance(v, int):
                out.add(v)
            elif ("token" in k and ("id" in k or "index" in k)) and isinstance(v, (list, tuple)):
                out.update(x for x in v if isinstance(x, int))
    return out


def _vocab_size(model, target) -> int:
    """The vocabulary the ids index: the input embeddings' rows, else the (decoder's) text config's vocab_size
    (models whose get_input_embeddings is not implemented: Dia, PP-FormulaNet, the Qwen2.5-Omni composite)."""
    for m in (target, model):
        try:
            n = getattr(m.get_input_embeddings(), "num_embeddings", None)
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(n, int):
            return n
    return int(model.config.get_text_config(decoder=True).vocab_size)


def _ordinary_ids(model, target):
    """(ids 3..2999 that are no special token of any sub-config, the vocabulary size)."""
    import torch

    vocab = _vocab_size(model, target)
    special = _special_ids(model.config)
    return torch.tensor([i for i in range(3, min(vocab, 3000)) if i not in special]), vocab


def _groups(modal, am, name: str):
    """The battery's groups: ``name`` the modality positions, ``text`` every other real one (``last`` included),
    ``last`` the final column (every row ends with a real token), ``pad``."""
    import torch
    from arbiter.groups import TokenGroups

    real = am.bool()
    last = torch.zeros_like(real)
    last[:, -1] = True
    return TokenGroups({name: modal & real, "text": real & ~modal, "last": last, "pad": ~real})


def text_batch(model, run, seed: int = 0) -> Batch:
    """Two prompts of random ordinary ids (row 0 left-padded), a span of positions declared the ``image`` group;
    the perturbation replaces the ids there by other ordinary ids."""
    import torch

    pool, vocab = _ordinary_ids(model, run.target)
    g = torch.Generator().manual_seed(seed)
    ids = pool[torch.randint(len(pool), (2, SEQ), generator=g)]
    am = torch.ones(2, SEQ, dtype=torch.long)
    am[0, :PAD] = 0
    pad_id = getattr(model.config.get_text_config(), "pad_token_id", None)
    ids[0, :PAD] = pad_id if isinstance(pad_id, int) and 0 <= pad_id < vocab else 0
    image = torch.zeros(2, SEQ, dtype=torch.bool)
    image[0, PAD + SPAN[0]:PAD + SPAN[1]] = True
    image[1, SPAN[0]:SPAN[1]] = True
    other = ids.clone()
    new = pool[torch.randint(len(pool), (int(image.sum()),), generator=g)]
    same = new == other[image]
    new[same] = pool[(torch.searchsorted(pool, new[same]) + 1) % len(pool)]
    other[image] = new
    return Batch(run.text_inputs(ids, am), _groups(image, am, "image"), "image", run.text_inputs(other, am),
                 "the ids at the image positions", declared=True)


# -- modality inputs: families whose forward needs them (groups read off the inputs by arbiter) ------------------
def _layout(block: list[int], modal: list[bool], text, pad_id: int):
    """Two rows ``block + text``; row 0 left-padded by PAD (its text PAD shorter). Returns ids, mask, modality."""
    import torch

    n = len(block) + text.shape[1]
    ids = torch.full((2, n), pad_id, dtype=torch.long)
    am = torch.zeros(2, n, dtype=torch.long)
    mod = torch.zeros(2, n, dtype=torch.bool)
    for r, pad in ((0, PAD), (1, 0)):
        ids[r, pad:] = torch.tensor(block + text[r, :text.shape[1] - pad].tolist())
        am[r, pad:] = 1
        mod[r, pad:pad + len(block)] = torch.tensor(modal)
    return ids, am, mod


def _text(model, run, seed: int = 0):
    """[2, TEXT] random ordinary ids, the pad id, the bos id, a generator for the modality tensors."""
    import torch

    pool, vocab = _ordinary_ids(model, run.target)
    g = torch.Generator().manual_seed(seed)
    t = model.config.get_text_config()
    pad = getattr(t, "pad_token_id", None)
    bos = getattr(t, "bos_token_id", None)
    return (pool[torch.randint(len(pool), (2, TEXT), generator=g)], pad if isinstance(pad, int) else 0,
            bos if isinstance(bos, int) else int(pool[0]), vocab, g)


def _pixels(vc, g, frames: int | None = None):
    import torch

    side = vc.image_size if isinstance(vc.image_size, int) else vc.image_size[0]
    shape = (2,) + ((frames,) if frames else ()) + (getattr(vc, "num_channels", 3), side, side)
    return torch.randn(*shape, generator=g)


def _q_former(model, run) -> Batch:
    """BLIP-2 / InstructBLIP(-Video): the processor's layout, ``num_query_tokens`` image (video: x 4 frames) token
    ids, BOS, the text; the Q-Former's own prompt (InstructBLIP) random ids; random pixels."""
    import inspect

    import torch

    cfg = model.config
    video = hasattr(cfg, "video_token_index")
    key, frames = ("video_token_index", 4) if video else ("image_token_index", None)
    text, pad, bos, vocab, g = _text(model, run)
    notes = []
    if getattr(cfg, key, None) is None:
        setattr(cfg, key, vocab - 1)
        notes.append(f"{key} = {vocab - 1} (vocab - 1: the default config has none; the checkpoints add the token)")
    n = cfg.num_query_tokens * (frames or 1)
    ids, am, mod = _layout([getattr(cfg, key)] * n + [bos], [True] * n + [False], text, pad)
    inputs = {"input_ids": ids, "attention_mask": am, "pixel_values": _pixels(cfg.vision_config, g, frames)}
    if "qformer_input_ids" in inspect.signature(model.forward).parameters:
        q = cfg.qformer_config
        inputs["qformer_input_ids"] = torch.randint(3, min(q.vocab_size, 3000), (2, 6), generator=g)
        inputs["qformer_attention_mask"] = torch.ones(2, 6, dtype=torch.long)
    other = {**inputs, "pixel_values": _pixels(cfg.vision_config, g, frames)}
    name = "video" if video else "image"
    return Batch(inputs, _groups(mod, am, name), name, other, "pixel_values", declared=False, notes=notes)


def _idefics(model, run) -> Batch:
    """IDEFICS: one image per sample, seen by every real text position (``image_attention_mask``) through the gated
    cross-attention blocks; no image position in the text (the image group is the cross-attention keys). The
    blocks' tanh gates start at 0 (a fresh model ignores the image): drawn from U(0.5, 1), as trained ones are."""
    import torch

    g0 = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(("alpha_cross_attn", "alpha_dense")):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g0))
    text, pad, bos, vocab, g = _text(model, run)
    ids, am, mod = _layout([bos], [False], text, pad)
    vc = model.config.vision_config
    inputs = {"input_ids": ids, "attention_mask": am, "pixel_values": _pixels(vc, g, 1),
              "image_attention_mask": am[:, :, None].clone()}
    other = {**inputs, "pixel_values": _pixels(vc, g, 1)}
    return Batch(inputs, _groups(mod, am, "image"), "image", other, "pixel_values", declared=False,
                 notes=["gates alpha_cross_attn / alpha_dense drawn from U(0.5, 1) (initialised to 0)"])


def _kosmos2(model, run) -> Batch:
    """Kosmos-2: BOS, ``latent_query_num`` image positions holding ordinary ids 4, 5, ... (as the processor writes
    them) marked by ``image_embeds_position_mask``, the text; random pixels."""
    text, pad, bos, vocab, g = _text(model, run)
    n = model.config.latent_query_num
    ids, am, mod = _layout([bos] + list(range(4, 4 + n)), [False] + [True] * n, text, pad)
    vc = model.config.vision_config
    inputs = {"input_ids": ids, "attention_mask": am, "pixel_values": _pixels(vc, g),
              "image_embeds_position_mask": mod.long()}
    other = {**inputs, "pixel_values": _pixels(vc, g)}
    return Batch(inputs, _groups(mod, am, "image"), "image", other, "pixel_values", declared=False)


def _streaming_audio(model, run) -> Batch:
    """Voxtral realtime: random ids and a log-mel spectrogram of ``audio_length_per_tok`` frames per position; the
    model adds one audio embedding to every text position's embedding, so no position holds only audio (the audio
    group is empty: a knockout has nothing to sever)."""
    import torch

    text, pad, bos, vocab, g = _text(model, run)
    ids, am, mod = _layout([bos], [False], text, pad)
    cfg = model.config
    mels = cfg.audio_config.num_mel_bins

    def features():
        return torch.randn(2, mels, ids.shape[1] * cfg.audio_length_per_tok, generator=g)

    inputs = {"input_ids": ids, "attention_mask": am, "input_features": features()}
    other = {**inputs, "input_features": features()}
    return Batch(inputs, _groups(mod, am, "audio"), "audio", other, "input_features", declared=False)


def _decoder_ids(model, run):
    """Decoder ids: the decoder start token, then random text (row 0 left-padded)."""
    text, pad, bos, vocab, g = _text(model, run)
    start = getattr(model.config, "decoder_start_token_id", None)
    ids, am, mod = _layout([start if isinstance(start, int) else bos], [False], text, pad)
    return ids, am, mod, g


# encoder-decoders whose encoder reads one modality's features: model_type -> (input, shape after the batch dim)
# from the encoder's config
ENCODER_FEATURES = {
    "whisper": lambda ec: ("input_features", (ec.num_mel_bins, 2 * ec.max_source_positions)),
    "speech_to_text": lambda ec: ("input_features", (64, ec.input_feat_per_channel * ec.input_channels)),
    "canary": lambda ec: ("input_features", (64, ec.num_mel_bins)),
    "cohere_asr": lambda ec: ("input_features", (64, ec.num_mel_bins)),
    "moonshine": lambda ec: ("input_values", (8000,)),
    "moonshine_streaming": lambda ec: ("input_values", (8000,)),
    "pp_formulanet": lambda ec: ("pixel_values", (ec.num_channels, ec.image_size, ec.image_size)),
}


def _encoder_features(model, run) -> Batch:
    """An encoder-decoder on its own inputs: random features for the encoder (log-mel frames, raw samples,
    pixels), the decoder start token and random decoder ids; the modality's group is the encoder's positions (the
    keys of the decoder's cross-attention), none of the decoder's."""
    import torch

    name, shape = ENCODER_FEATURES[model.config.model_type](model.get_encoder().config)
    ids, am, mod, g = _decoder_ids(model, run)
    inputs = {name: torch.randn(2, *shape, generator=g), "decoder_input_ids": ids, "decoder_attention_mask": am}
    other = {**inputs, name: torch.randn(2, *shape, generator=g)}
    modality = "image" if name == "pixel_values" else "audio"
    return Batch(inputs, _groups(mod, am, modality), modality, other, name, declared=False)


def _florence2(model, run) -> Batch:
    """Florence-2: the encoder reads the image tokens (as many as the vision tower gives for 128 x 128 pixels) then
    the prompt; the decoder its start token and random ids. The encoder mixes the image into the prompt positions,
    so the independence check knocks the image out of the text in the encoder too."""
    import torch

    cfg = model.config
    vocab = _vocab_size(model, run.target)
    notes = []
    if cfg.image_token_id >= vocab:
        notes.append(f"image_token_id {cfg.image_token_id} -> {vocab - 1} (the default is outside the text "
                     f"vocabulary of {vocab})")
        cfg.image_token_id = vocab - 1
    g = torch.Generator().manual_seed(5)
    pix = [torch.randn(2, 3, 128, 128, generator=g) for _ in range(2)]
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pix[0])
    n = (feats if isinstance(feats, torch.Tensor) else feats.pooler_output).shape[1]
    prompt, pad, bos, _, _ = _text(model, run, seed=4)
    enc_ids = torch.cat([torch.full((2, n), cfg.image_token_id), prompt[:, :6]], dim=1)
    ids, am, mod, _ = _decoder_ids(model, run)
    inputs = {"input_ids": enc_ids, "attention_mask": torch.ones_like(enc_ids), "pixel_values": pix[0],
              "decoder_input_ids": ids, "decoder_attention_mask": am}
    other = {**inputs, "pixel_values": pix[1]}
    return Batch(inputs, _groups(mod, am, "image"), "image", other, "pixel_values", declared=False, notes=notes,
                 encoder_text=True)


# families whose forward needs its modality inputs, or whose knockouts need the encoder run on its own inputs:
# model_type -> Batch builder
MODALITY_INPUTS = {
    "blip-2": _q_former, "instructblip": _q_former, "instructblipvideo": _q_former,
    "idefics": _idefics, "kosmos-2": _kosmos2, "voxtral_realtime": _streaming_audio,
    **{mt: _encoder_features for mt in ENCODER_FEATURES}, "florence2": _florence2,
}


def _encoder_output_class():
    import torch
    from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

    @dataclasses.dataclass
    class EncoderOutput(BaseModelOutputWithPooling, BaseModelOutput):
        """Encoder states with their mask (some decoders read ``encoder_outputs.attention_mask``); an instance of
        both output classes the models test for (PP-FormulaNet's decoder reads the states as ``pooler_output``)."""
        attention_mask: torch.Tensor | None = None

    return EncoderOutput


class _Runner:
    """Calls the model (or, for a composite without a forward of its own, its ``thinker``) on a batch's inputs and
    returns the logits; for an encoder-decoder, the text inputs are decoder ids with fixed random encoder states."""

    def __init__(self, model, target: str | None = None):
        import inspect

        import torch
        from torch import nn

        self.model = model
        if target is None and type(model).forward is nn.Module.forward and hasattr(model, "thinker"):
            target = "thinker"   # Qwen2.5-Omni: the composite only generates; its thinker makes the logits
        self.target_name = target
        self.target = getattr(model, target) if target else model
        self.kw: dict[str, Any] = {}
        params = inspect.signature(self.target.forward).parameters
        self.seq2seq = "decoder_input_ids" in params and "encoder_outputs" in params
        field = CODEBOOKS.get(getattr(model.config, "model_type", ""))
        self.codebooks = getattr(model.config.get_text_config(decoder=True), field) if field else None
        if self.seq2seq:
            states = torch.randn(2, 6, _encoder_width(model), generator=torch.Generator().manual_seed(1))
            self.kw["encoder_outputs"] = _encoder_output_class()(
                last_hidden_state=states, pooler_output=states, attention_mask=torch.ones(2, 6, dtype=torch.long))

    def text_inputs(self, ids, am) -> dict[str, Any]:
        if self.codebooks:
            ids = ids[..., None].expand(*ids.shape, self.codebooks).contiguous()   # one code in every codebook
        if self.seq2seq:
            return {"decoder_input_ids": ids, "decoder_attention_mask": am, **self.kw}
        return {"input_ids": ids, "attention_mask": am}

    def output(self, inputs: dict, **extra):
        import torch

        enc = inputs.get("encoder_outputs")
        if enc is not None:   # a fresh copy per call: Moonshine streaming adds its positions to the states in place
            inputs = {**inputs, "encoder_outputs": type(enc)(**{k: v.clone() for k, v in enc.items()})}
        with torch.no_grad():
            return self.target(**inputs, **extra)

    def __call__(self, inputs: dict, **extra):
        out = self.output(inputs, **extra)
        return out[0] if isinstance(out, tuple) else out.logits


def _encoder_width(model) -> int:
    """The width of the states the decoder's cross-attention reads: its key projection's in_features, else the
    encoder's own config (hidden_size / d_model)."""
    import torch.nn as nn

    for name, m in model.named_modules():
        low = name.lower()
        if (("encoder_attn" in low or "cross" in low or "encoder_decoder_att" in low) and isinstance(m, nn.Linear)
                and low.endswith(("k_proj", "key", ".k"))):
            return m.in_features
    enc = model.get_encoder()
    for c in [enc.config] + _sub_configs(enc.config):
        for field in ("hidden_size", "d_model"):
            v = _int_attr(c, field)
            if v:
                return v
    raise ValueError(f"no encoder width found for {type(model).__name__}")


def _attentions(out, seq2seq: bool):
    """The model's own ``output_attentions`` for the text stack (decoder's for an encoder-decoder; the language
    model's inside BLIP-2-style outputs); None where it returns none."""
    if isinstance(out, tuple):
        return None
    for name in (("decoder_attentions",) if seq2seq else ("attentions",)):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    inner = getattr(out, "language_model_outputs", None)
    return getattr(inner, "attentions", None)


# -- the battery ----------------------------------------------------------------------------------------------
def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _impls(model) -> dict[str, Any]:
    return {f"{i}:{type(c).__name__}": getattr(c, "_attn_implementation", None)
            for i, c in enumerate(_sub_configs(model.config))}


def _same_groups(meta_groups: dict | None, expected, names: list[str]) -> tuple[bool, dict]:
    """Arbiter's groups (a trace's ``meta["groups"]``) against the battery's, over the battery's positions."""
    import torch
    from arbiter.groups import TokenGroups

    if meta_groups is None:
        return False, {"arbiter": "no groups in the trace"}
    got = TokenGroups.from_dict(meta_groups)
    detail, ok = {}, True
    for name in names:
        want = expected[name]
        have = got[name][:, :want.shape[1]] if name in got else torch.zeros_like(want)
        if have.shape != want.shape:
            have = torch.nn.functional.pad(have, (0, want.shape[1] - have.shape[1]))
        same = bool(torch.equal(have, want))
        ok &= same
        detail[name] = f"{int(have.sum())} positions" + ("" if same else f" (battery: {int(want.sum())}, differ)")
    return ok, detail


def battery(model, model_type: str = "", target: str | None = None) -> dict[str, Any]:
    import torch

    import arbiter
    from arbiter.adapters import model_facts
    from arbiter.errors import ArbiterError

    checks: dict[str, Any] = {}
    try:
        model_facts(model)   # a family arbiter refuses is refused before any input is built
    except ArbiterError as e:
        return {"outcome": "refused", "error": f"{type(e).__name__}: {zs._first_line(e)}"}
    run = _Runner(model, target)
    builder = MODALITY_INPUTS.get(model_type)
    mode = "modality inputs" if builder else "text-only inputs"
    try:
        batch = builder(model, run) if builder else text_batch(model, run)
        base = run(batch.inputs)
    except Exception as e:  # noqa: BLE001
        return {"outcome": "forward fails", "error": f"{mode}: {type(e).__name__}: {zs._first_line(e)}"}
    if not torch.isfinite(base).all():
        return {"outcome": "forward fails", "error": f"{mode}: the model's own logits are not finite"}
    info = {"inputs": (f"{mode}; perturbed: {batch.changes}; groups "
                       + ("declared (lens.use)" if batch.declared else "read off the inputs by arbiter")),
            "notes": batch.notes + ([f"runs model.{run.target_name}"] if run.target_name else [])}
    groups, modal = batch.groups, batch.modality
    base_other = run(batch.perturbed)
    checks["modality reaches last"] = float((base_other[:, -1] - base[:, -1]).abs().max())

    hand_blocked = _hand_blocked(model, run, batch.inputs)
    hooks0, impls0 = _hook_count(model), _impls(model)
    try:
        lens_cm = arbiter.attach(model)
        lens = lens_cm.__enter__()
    except ArbiterError as e:
        return {"outcome": "refused", "error": f"{type(e).__name__}: {zs._first_line(e)}", "checks": checks, **info}
    facts = lens.facts
    refusals: dict[str, str] = {}
    stage, aborted = "attach", None
    try:
        if batch.declared:
            lens.use(groups)
        checks["attach"] = bool(torch.equal(run(batch.inputs), base))
        n = facts.n_layers
        attn_layers = [lf.index for lf in facts.layers if lf.attn is not None and not lf.cross]
        checks["layers"] = n
        checks["attention layers"] = len(attn_layers)
        checks["mixers"] = dict(sorted(_count(lf.mixer_kind for lf in facts.layers).items()))

        # record: every layer where the site exists
        stage = "record"
        sites = ["attn.probs", "resid.post"]
        with lens.record(*sites, rows="last") as rec:
            run(batch.inputs)
        t = rec.trace
        if not batch.declared:   # the groups arbiter read off the model's inputs, against the battery's own
            checks["groups"], checks["groups detail"] = _same_groups(t.meta.get("groups"), groups,
                                                                     [modal, "pad", "last"])
        have_resid = set(t.layers("resid.post")) if "resid.post" in {k.split(".", 1)[1] for k in t.keys()
                                                                        if k.startswith("L")} else set()
        have_probs = set(t.layers("attn.probs")) if attn_layers else set()
        worst_sum, worst_pad, row_counts = 0.0, 0.0, set()
        for layer in have_probs:
            p = t[f"L{layer}.attn.probs"]          # [batch, heads, rows, keys]
            row_counts.add(p.shape[2])
            worst_sum = max(worst_sum, float((p.sum(-1) - 1).abs().max()))
            keys_pad = groups["pad"][:, :p.shape[-1]]
            worst_pad = max(worst_pad, float(p.masked_select(keys_pad[:, None, None, :].expand_as(p)).abs().max())
                            if keys_pad.any() else 0.0)
        not_run = t.meta.get("layers_not_run", {})
        skipped = set(not_run.get("resid.post", []))
        checks["record"] = (have_resid == set(range(n)) - skipped
                            and have_probs == set(attn_layers) - set(not_run.get("attn.probs", []))
                            and worst_sum <= 1e-5 and worst_pad == 0.0 and row_counts <= {1})
        checks["record detail"] = {"layers the model did not run": sorted(skipped), "resid layers": len(have_resid),
                                   "probs layers": len(have_probs), "rows recorded (1 asked)": sorted(row_counts),
                                   "max |row sum - 1|": worst_sum, "max prob on pads": worst_pad}

        # knockout modality -> last, every layer; then modality -> text and the modality input perturbed
        stage = "knockout"
        try:
            with lens.knockout(src=modal, dst="last", layers="all"):
                with lens.record("attn.probs", rows="last") as rec_k:
                    ko = run(batch.inputs)
            img = groups[modal]
            leak = 0.0
            for layer in attn_layers:
                p = rec_k.trace[f"L{layer}.attn.probs"]
                keys = img[:, :p.shape[-1]][:, None, None, :].expand_as(p)
                leak = max(leak, float(p.masked_select(keys).abs().max()) if keys.any() else 0.0)
            checks["knockout"] = leak == 0.0 and float((ko[:, -1] - base[:, -1]).abs().max()) > 1e-6
            checks["knockout detail"] = {f"max prob on {modal} keys": leak,
                                         "max |delta last logit|": float((ko[:, -1] - base[:, -1]).abs().max())}
            with contextlib.ExitStack() as knocked:
                if batch.encoder_text:   # the modality reaches the encoder's text positions: sever it there too
                    enc = knocked.enter_context(arbiter.attach(model, stack="encoder"))
                    knocked.enter_context(enc.knockout(src=modal, dst="text", layers="all"))
                knocked.enter_context(lens.knockout(src=modal, dst="text", layers="all"))
                a, b = run(batch.inputs), run(batch.perturbed)
            delta = float((a[:, -1] - b[:, -1]).abs().max())
            checks["independence"] = delta <= 1e-6 and checks["modality reaches last"] > 1e-4
            checks["independence detail"] = {"max |delta last logit| under knockout": delta,
                                             "without": checks["modality reaches last"]}
        except ArbiterError as e:
            refusals["knockout"] = f"{type(e).__name__}: {zs._first_line(e)}"

        # block head 0 of the first attention layer == its o_proj input columns zeroed by hand
        stage = "block / amplify"
        lf = next((lf for lf in facts.layers if lf.attn is not None and lf.out_proj is not None and not lf.cross),
                  None)
        if lf is not None:
            try:
                with lens.block_heads([(lf.index, 0)]):
                    blocked = run(batch.inputs)
                with lens.amplify_heads([(lf.index, 0)], alpha=1.0):
                    amp1 = run(batch.inputs)
                checks["amplify1"] = bool(torch.equal(amp1, base))
                by_hand, hd = hand_blocked[lf.index]
                d_hand = float((blocked - by_hand).abs().max())
                changed = float((blocked - base).abs().max())
                checks["block"] = d_hand <= 1e-5 and changed > 1e-6
                checks["block detail"] = {"layer": lf.index, "head dim": hd, "max |block - by hand|": d_hand,
                                          "max |block - clean|": changed}
            except ArbiterError as e:
                refusals["heads"] = f"{type(e).__name__}: {zs._first_line(e)}"

        # restoration after an exception inside a probe
        stage = "restoration"
        try:
            with lens.knockout(src=modal, dst="last", layers="all"):
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        except ArbiterError:
            pass
        checks["restore after exception"] = bool(torch.equal(run(batch.inputs), base))
    except ArbiterError as e:   # a clear error out of a run: the row is refused, with where and why
        aborted = f"{type(e).__name__} during {stage}: {zs._first_line(e)}"
    finally:
        lens_cm.__exit__(None, None, None)
    checks["restore"] = (bool(torch.equal(run(batch.inputs), base)) and _hook_count(model) == hooks0
                         and _impls(model) == impls0)
    if aborted:
        return {"outcome": "refused", "error": aborted, "checks": checks, "unserved": list(facts.unserved),
                "family_facts": facts.family, **info}
    checks["eager"], checks["eager max |diff|"] = _eager_check(model, run, batch, attn_layers)
    verdicts = [k for k in ("attach", "groups", "record", "eager", "knockout", "independence", "block", "amplify1",
                            "restore after exception", "restore") if checks.get(k) is False]
    outcome = "pass" if not verdicts else "FAIL"
    if refusals and not verdicts:
        outcome = "pass, knockouts refused" if "knockout" in refusals else "pass, some refused"
    return {"outcome": outcome, "failed": verdicts, "refused": refusals, "checks": checks,
            "unserved": list(facts.unserved), "family_facts": facts.family, **info}


def _hand_blocked(model, run, inputs) -> dict:
    """{layer: (logits with head 0's input columns of the output projection zeroed by hand, head dim)} for the
    first attention layer, computed without arbiter attached."""
    import torch

    from arbiter.adapters import model_facts

    try:
        facts = model_facts(model)
    except Exception:  # noqa: BLE001 - attach reports it
        return {}
    lf = next((lf for lf in facts.layers if lf.attn is not None and lf.out_proj is not None and not lf.cross), None)
    if lf is None:
        return {}
    _, _, hd = facts.heads(lf.index)
    w = lf.out_proj.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[:, :hd] = 0
        return {lf.index: (run(inputs), hd)}
    finally:
        with torch.no_grad():
            w.copy_(saved)


def _count(it) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in it:
        out[x] = out.get(x, 0) + 1
    return out


def _eager_check(model, run, batch: Batch, attn_layers):
    """The text stack switched to eager: the model's own ``output_attentions`` against the rows arbiter records
    on the same eager model (max |diff| <= 1e-5); (None, None) where the model returns no attentions, or not one
    per layer."""
    import arbiter
    from arbiter.attention import config_path

    text = model.config.get_text_config()
    before = text._attn_implementation

    def request(impl):
        req: object = {"": impl}
        for key in reversed(config_path(model, text) or []):
            req = {key: req}
        return req

    try:
        model.set_attn_implementation(request("eager"))
        atts = _attentions(run.output(batch.inputs, output_attentions=True), run.seq2seq)
        atts = [a for a in (atts or []) if a is not None]
        if not attn_layers or len(atts) not in (len(attn_layers), text.num_hidden_layers):
            return None, None
        with arbiter.attach(model) as lens:
            if batch.declared:
                lens.use(batch.groups)
            with lens.record("attn.probs", rows="last") as rec:
                run(batch.inputs)
    except Exception as e:  # noqa: BLE001 - the model cannot run eager or return attentions: no reference
        if isinstance(e, arbiter.errors.ArbiterError):
            raise
        return None, None
    finally:
        model.set_attn_implementation(request(before))
    worst = 0.0
    for i, layer in enumerate(attn_layers):
        ref = atts[layer] if len(atts) != len(attn_layers) else atts[i]
        got = rec.trace[f"L{layer}.attn.probs"]
        ref_last = ref[:, :, -got.shape[2]:, :got.shape[-1]]
        if ref_last.shape != got.shape:
            return None, None
        worst = max(worst, float((got - ref_last).abs().max()))
    return worst <= 1e-5, worst


# -- driver ---------------------------------------------------------------------------------------------------
_SURVEY_LABEL = zs._fallback_label


def _label(model_type: str, fallback: str | None) -> str | None:
    if fallback == "variant":
        return VARIANTS[model_type][1]
    if fallback == "fixup":
        return FIXUPS[model_type][1]
    return _SURVEY_LABEL(model_type, fallback)


def run_one(model_type: str, cls_name: str, mappings: list[str], fallback: str | None = None, phase=None) -> dict:
    label = _label(model_type, fallback)
    rec: dict[str, Any] = {"family": model_type, "class": cls_name, "fallback": label}
    t0 = time.monotonic()
    try:
        if phase:
            phase("build")
        if fallback not in (None, "fixup", "variant"):
            rec.update(outcome="skipped", error="composite fallback rows are structural only (zoo_survey.py)")
            return rec
        model, changed = build(model_type, cls_name, fallback if fallback in ("fixup", "variant") else False)
        rec["params"] = sum(p.numel() for p in model.parameters())
        rec["narrowed"] = len(changed)
    except Exception as e:  # noqa: BLE001
        rec.update(outcome="could not build", error=f"{type(e).__name__}: {zs._first_line(e)}")
        return rec
    finally:
        rec["seconds"] = round(time.monotonic() - t0, 1)
    if phase:
        phase("run")
    try:
        rec.update(battery(model, model_type, CALL_TARGETS.get(model_type) if fallback == "fixup" else None))
    except Exception as e:  # noqa: BLE001
        rec.update(outcome="crash", crash_in=_crash_site(e), error=f"{type(e).__name__}: {zs._first_line(e)}",
                   trace=traceback.format_exc()[-3000:])
    rec["seconds"] = round(time.monotonic() - t0, 1)
    return rec


def _crash_site(e: BaseException) -> str:
    """Whose code the exception left last: ``arbiter`` (a raw crash inside arbiter: a finding) or ``battery``
    (this script, or the model called directly by it)."""
    import arbiter

    root = os.path.dirname(os.path.abspath(arbiter.__file__)) + os.sep
    site = "battery"
    for frame in traceback.extract_tb(e.__traceback__):
        f = os.path.abspath(frame.filename)
        if f.startswith(root):
            site = "arbiter"
        elif f == os.path.abspath(__file__):
            site = "battery"
    return site


def _worker(conn, tasks) -> None:
    zs._quiet()
    import torch
    torch.set_num_threads(1)
    for task in tasks:
        conn.send(("done", run_one(*task, phase=lambda p: conn.send(("phase", p)))))
    conn.close()


def tasks(only: set[str] | None) -> list[tuple]:
    out = []
    for mt, entries in zs.families().items():
        if only and mt not in only:
            continue
        out.append((mt, entries[0][1], [m for m, _ in entries], None))
        if mt in FIXUPS:
            out.append((mt, entries[0][1], [m for m, _ in entries], "fixup"))
        if mt in VARIANTS:
            out.append((mt, entries[0][1], [m for m, _ in entries], "variant"))
    return out


def markdown(results: list[dict], header: dict) -> str:
    lines = [f"Run of {header['date']} on transformers {header['transformers']} (torch {header['torch']}, "
             f"{header['machine']}).", "", summary_line(results), "",
             "| family | outcome | layers | mixers | failed / refused / error | key figures |", "|---|---|---|---|---|---|"]
    for r in results:
        fam = r["family"] + (f" ({r['fallback']})" if r.get("fallback") else "")
        c = r.get("checks", {})
        mixers = ", ".join(f"{k} {v}" for k, v in c.get("mixers", {}).items())
        why = "; ".join([*(f"failed: {x}" for x in r.get("failed", [])),
                         *(f"{k} refused: {v}" for k, v in r.get("refused", {}).items())]) or r.get("error", "")
        if r.get("crash_in"):
            why = f"(in {r['crash_in']}) {why}"
        figs = []
        if r.get("inputs", "").startswith("modality"):
            figs.append(f"{r['inputs'].split('perturbed: ')[1].split(';')[0]} perturbed, groups "
                        f"{'read by arbiter =' if c.get('groups') else 'read by arbiter ≠'}")
        figs += r.get("notes", [])
        if "independence detail" in c:
            figs.append(f"Δ under knockout {c['independence detail']['max |delta last logit| under knockout']:.1e}"
                        f" (without {c['independence detail']['without']:.1e})")
        if "block detail" in c:
            figs.append(f"block vs by hand {c['block detail']['max |block - by hand|']:.1e}")
        if c.get("eager") is not None:
            figs.append(f"eager {'=' if c['eager'] else '≠'}")
        lines.append(f"| {fam} | {r['outcome']} | {c.get('layers', '')} | {mixers} | {zs._cell(why, 300)} | "
                     f"{'; '.join(figs)} |")
    return "\n".join(lines) + "\n"


def summary_line(results: list[dict]) -> str:
    counts = _count(r["outcome"] for r in results)
    return "**Summary** (" + f"{len(results)} rows): " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    import torch
    import transformers

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--md", help="write the Markdown table here")
    ap.add_argument("--only", help="comma-separated model types")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per family (build + battery)")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    todo = tasks(only)
    header = {"date": datetime.date.today().isoformat(), "transformers": transformers.__version__,
              "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load "
                                                    f"{os.getloadavg()[0]:.1f}"}

    def progress(r):
        print(f"{r['family']:<28} {r['outcome']:<26} {r.get('seconds', '')}s {','.join(r.get('failed', []))} "
              f"{'(in ' + r['crash_in'] + ') ' if r.get('crash_in') else ''}{zs._cell(r.get('error', ''), 160)}",
              flush=True)

    zs._worker = _worker   # run_all forks zs._worker: point it at this battery
    zs._fallback_label = _label   # run_all labels the rows it times out
    t0 = time.monotonic()
    results = zs.run_all(todo, args.timeout, progress)
    header["seconds"] = round(time.monotonic() - t0)
    print(summary_line(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=1, default=str)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(results, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
