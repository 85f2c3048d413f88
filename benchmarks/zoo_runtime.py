"""Runtime battery on every multimodal family in transformers' auto mappings: arbiter attached to a narrow random
model of each family, run, checked against the model itself.

    python benchmarks/zoo_runtime.py --json /tmp/zoo_runtime.json --md /tmp/zoo_runtime.md   # every family
    python benchmarks/zoo_runtime.py --only qwen3_5,lfm2_vl                               # a few

The families are zoo_survey.py's (the union of the image-text-to-text, multimodal-LM, visual-QA and
speech-to-text auto mappings). Each is built from its default config made narrow (``narrow``: widths 64, 4 heads
of 16, 4 experts; layer counts, layer types and every per-layer list kept as they are, so hybrid layouts are the
real ones), random weights (seed 0), float32, on the CPU, in a forked worker with a time limit.

The inputs bypass the towers: a left-padded batch of 2 text-only prompts of random ids in which a span of
positions is declared the modality group (``image``), given to the Lens with ``lens.use``. The modality inputs
are then the ids at those positions (a perturbation changes them). This serves the text stack that arbiter
routes, edits and reads in every family, without a processor (none ships offline for most); group inference from
each family's own processor inputs is tested on the tiny families of arbiter.testing (tests/test_tiny_zoo*.py).
Encoder-decoders get random encoder states (``encoder_outputs``) and decoder ids.

Checks (each a value compared with the model itself or weights edited by hand, never with arbiter):
``attach``: logits with the Lens attached and idle are bit-identical to the model's; ``record``: ``attn.probs`` and
``resid.post`` on the last rows exist on every layer where the site exists (every layer for the residual, every
softmax-attention layer for the probabilities), rows sum to 1 and pads get 0; ``eager``: those rows equal the
model's own eager ``output_attentions`` (where the model returns them); ``knockout``: ``image -> last`` in every
layer gives 0 on the image keys and changes the logits; ``independence``: ``image -> text`` (text includes last)
in every layer makes the last logits independent of the ids at the image positions (max |delta| <= 1e-6) while
without it they change; ``block``: blocking head 0 of the first attention layer equals zeroing that head's input
columns of the output projection by hand; ``amplify1``: amplifying by 1 is bit-identical; ``restore``: after an
exception inside a knockout and after the Lens closes, logits are bit-identical, the attention implementation is
the loaded one and no hook is left.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
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
    "time_step_rank": 8, "n_groups": 1, "mamba_n_groups": 1,
    "vision_intermediate_size": FFN, "hidden_size_per_layer_input": 8,
}


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


_SCALED: set[int] = set()


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


def _scale_mrope(c, old_hd: int | None, new_hd: int | None, changed: list) -> None:
    """Multimodal RoPE sections sum to the rotary half-width: scale them with the head width."""
    if not old_hd or not new_hd or old_hd == new_hd:
        return
    for attr in ("rope_scaling", "rope_parameters"):
        try:
            d = getattr(c, attr, None)
        except Exception:  # noqa: BLE001
            continue
        if id(d) in _SCALED:
            continue   # a dict shared by two configs: scaled once
        _SCALED.add(id(d))
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


def narrow(config) -> list[str]:
    """Shrink every width field of ``config`` and its sub-configs in place (see _NARROW); returns what changed."""
    changed = []
    for c in _sub_configs(config):
        kv_was = _int_attr(c, "num_key_value_heads")
        heads_was = _int_attr(c, "num_attention_heads")
        hd_was = _head_dim(c)
        for name, value in _NARROW.items():
            old = _int_attr(c, name)
            if old is not None and old > value:
                setattr(c, name, value)
                changed.append(f"{type(c).__name__}.{name} {old}->{value}")
        if isinstance(kv_was, int) and kv_was > 0:
            new = HEADS if kv_was == heads_was else min(KV_HEADS, kv_was)   # MHA stays MHA
            if new != kv_was:
                c.num_key_value_heads = new
                changed.append(f"{type(c).__name__}.num_key_value_heads {kv_was}->{new}")
        _scale_mrope(c, hd_was, _head_dim(c), changed)
    return changed


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


def build(model_type: str, cls_name: str, fixup: bool | str):
    import torch
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    if fixup == "variant":
        VARIANTS[model_type][0](config)
    elif fixup:
        zs.CONFIG_FIXUPS[model_type][0](config)
    changed = narrow(config)
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


def _special_ids(config) -> set[int]:
    out = set()
    for c in _sub_configs(config):
        for k, v in vars(c).items():
            if ("token" in k and ("id" in k or "index" in k)) and isinstance(v, int):
                out.add(v)
            elif ("token" in k and ("id" in k or "index" in k)) and isinstance(v, (list, tuple)):
                out.update(x for x in v if isinstance(x, int))
    return out


def make_inputs(model, seed: int = 0):
    """Two prompts of random ordinary ids (row 0 left-padded), the attention mask, and the groups: ``image`` a
    span of positions in each row, ``text`` every other real position (``last`` included), ``last``, ``pad``."""
    import torch
    from arbiter.groups import TokenGroups

    vocab = model.get_input_embeddings().num_embeddings
    special = _special_ids(model.config)
    pool = torch.tensor([i for i in range(3, min(vocab, 3000)) if i not in special])
    g = torch.Generator().manual_seed(seed)
    ids = pool[torch.randint(len(pool), (2, SEQ), generator=g)]
    am = torch.ones(2, SEQ, dtype=torch.long)
    am[0, :PAD] = 0
    pad_id = getattr(model.config.get_text_config(), "pad_token_id", None)
    ids[0, :PAD] = pad_id if isinstance(pad_id, int) and 0 <= pad_id < vocab else 0
    image = torch.zeros(2, SEQ, dtype=torch.bool)
    image[0, PAD + SPAN[0]:PAD + SPAN[1]] = True
    image[1, SPAN[0]:SPAN[1]] = True
    real = am.bool()
    last = torch.zeros(2, SEQ, dtype=torch.bool)
    last[:, -1] = True
    groups = TokenGroups({"image": image, "text": real & ~image, "last": last, "pad": ~real})
    return ids, am, groups, pool, g


def perturbed(ids, groups, pool, g):
    """The ids with every image position replaced by another ordinary id."""
    import torch

    out = ids.clone()
    m = groups["image"]
    new = pool[torch.randint(len(pool), (int(m.sum()),), generator=g)]
    same = new == out[m]
    new[same] = pool[(torch.searchsorted(pool, new[same]) + 1) % len(pool)]
    out[m] = new
    return out


def _encoder_output_class():
    import dataclasses

    import torch
    from transformers.modeling_outputs import BaseModelOutput

    @dataclasses.dataclass
    class EncoderOutput(BaseModelOutput):
        """Encoder states with their mask (some decoders read ``encoder_outputs.attention_mask``)."""
        attention_mask: torch.Tensor | None = None

    return EncoderOutput


class _Runner:
    """Calls the model on ids (decoder-only) or on decoder ids with fixed random encoder states (encoder-decoder)."""

    def __init__(self, model):
        import inspect

        import torch

        self.model = model
        self.kw: dict[str, Any] = {}
        params = inspect.signature(model.forward).parameters
        self.seq2seq = "decoder_input_ids" in params and "encoder_outputs" in params
        if self.seq2seq:
            _EncoderOutput = _encoder_output_class()
            cfg = model.config
            d = None
            for c in _sub_configs(cfg):
                if "encoder" in type(c).__name__.lower() or c is cfg:
                    d = getattr(c, "d_model", None) or getattr(c, "hidden_size", None) or d
            enc_dim = _encoder_width(model) or d
            gen = torch.Generator().manual_seed(1)
            self.kw["encoder_outputs"] = _EncoderOutput(last_hidden_state=torch.randn(2, 6, enc_dim, generator=gen),
                                                        attention_mask=torch.ones(2, 6, dtype=torch.long))

    def __call__(self, ids, am, **extra):
        import torch

        with torch.no_grad():
            if self.seq2seq:
                return self.model(decoder_input_ids=ids, decoder_attention_mask=am, **self.kw, **extra).logits
            return self.model(input_ids=ids, attention_mask=am, **extra).logits


def _encoder_width(model) -> int | None:
    """The width the decoder's cross-attention keys read (its k projection's in_features)."""
    import torch.nn as nn

    for name, m in model.named_modules():
        low = name.lower()
        if ("encoder_attn" in low or "cross" in low) and isinstance(m, nn.Linear) and low.endswith(("k_proj", "key")):
            return m.in_features
    return None


# -- the battery ----------------------------------------------------------------------------------------------
def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _impls(model) -> dict[str, Any]:
    return {f"{i}:{type(c).__name__}": getattr(c, "_attn_implementation", None)
            for i, c in enumerate(_sub_configs(model.config))}


def battery(model) -> dict[str, Any]:
    import torch

    import arbiter
    from arbiter.errors import ArbiterError

    checks: dict[str, Any] = {}
    run = _Runner(model)
    ids, am, groups, pool, gen = make_inputs(model)
    try:
        base = run(ids, am)
    except Exception as e:  # noqa: BLE001
        return {"outcome": "no text-only forward", "error": f"{type(e).__name__}: {zs._first_line(e)}"}
    if not torch.isfinite(base).all():
        return {"outcome": "no text-only forward", "error": "the model's own logits are not finite"}
    other = perturbed(ids, groups, pool, gen)
    base_other = run(other, am)
    checks["image reaches last"] = float((base_other[:, -1] - base[:, -1]).abs().max())

    hand_blocked = _hand_blocked(model, run, ids, am)
    hooks0, impls0 = _hook_count(model), _impls(model)
    try:
        lens_cm = arbiter.attach(model)
        lens = lens_cm.__enter__()
    except ArbiterError as e:
        return {"outcome": "refused", "error": f"{type(e).__name__}: {zs._first_line(e)}", "checks": checks}
    facts = lens.facts
    refusals: dict[str, str] = {}
    try:
        lens.use(groups)
        checks["attach"] = bool(torch.equal(run(ids, am), base))
        n = facts.n_layers
        attn_layers = [lf.index for lf in facts.layers if lf.attn is not None and not lf.cross]
        checks["layers"] = n
        checks["attention layers"] = len(attn_layers)
        checks["mixers"] = dict(sorted(_count(lf.mixer_kind for lf in facts.layers).items()))

        # record: every layer where the site exists
        sites = ["attn.probs", "resid.post"]
        with lens.record(*sites, rows="last") as rec:
            run(ids, am)
        t = rec.trace
        have_resid = set(t.layers("resid.post")) if "resid.post" in {k.split(".", 1)[1] for k in t.keys()
                                                                        if k.startswith("L")} else set()
        have_probs = set(t.layers("attn.probs")) if attn_layers else set()
        worst_sum, worst_pad = 0.0, 0.0
        for layer in have_probs:
            p = t[f"L{layer}.attn.probs"]          # [batch, heads, rows, keys]
            worst_sum = max(worst_sum, float((p.sum(-1) - 1).abs().max()))
            keys_pad = groups["pad"][:, :p.shape[-1]]
            worst_pad = max(worst_pad, float(p.masked_select(keys_pad[:, None, None, :].expand_as(p)).abs().max())
                            if keys_pad.any() else 0.0)
        not_run = t.meta.get("layers_not_run", {})
        skipped = set(not_run.get("resid.post", []))
        checks["record"] = (have_resid == set(range(n)) - skipped
                            and have_probs == set(attn_layers) - set(not_run.get("attn.probs", []))
                            and worst_sum <= 1e-5 and worst_pad == 0.0)
        checks["record detail"] = {"layers the model did not run": sorted(skipped), "resid layers": len(have_resid), "probs layers": len(have_probs),
                                   "max |row sum - 1|": worst_sum, "max prob on pads": worst_pad}

        # eager reference (the model's own output_attentions), where it returns them

        # knockout image -> last, every layer
        try:
            with lens.knockout(src="image", dst="last", layers="all"):
                with lens.record("attn.probs", rows="last") as rec_k:
                    ko = run(ids, am)
            img = groups["image"]
            leak = 0.0
            for layer in attn_layers:
                p = rec_k.trace[f"L{layer}.attn.probs"]
                keys = img[:, :p.shape[-1]][:, None, None, :].expand_as(p)
                leak = max(leak, float(p.masked_select(keys).abs().max()))
            checks["knockout"] = leak == 0.0 and float((ko[:, -1] - base[:, -1]).abs().max()) > 1e-6
            checks["knockout detail"] = {"max prob on image keys": leak,
                                         "max |delta last logit|": float((ko[:, -1] - base[:, -1]).abs().max())}
            with lens.knockout(src="image", dst="text", layers="all"):
                a, b = run(ids, am), run(other, am)
            delta = float((a[:, -1] - b[:, -1]).abs().max())
            checks["independence"] = delta <= 1e-6 and checks["image reaches last"] > 1e-4
            checks["independence detail"] = {"max |delta last logit| under knockout": delta,
                                             "without": checks["image reaches last"]}
        except ArbiterError as e:
            refusals["knockout"] = f"{type(e).__name__}: {zs._first_line(e)}"

        # block head 0 of the first attention layer == its o_proj input columns zeroed by hand
        lf = next((lf for lf in facts.layers if lf.attn is not None and lf.out_proj is not None and not lf.cross),
                  None)
        if lf is not None:
            try:
                with lens.block_heads([(lf.index, 0)]):
                    blocked = run(ids, am)
                with lens.amplify_heads([(lf.index, 0)], alpha=1.0):
                    amp1 = run(ids, am)
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
        try:
            with lens.knockout(src="image", dst="last", layers="all"):
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        except ArbiterError:
            pass
        checks["restore after exception"] = bool(torch.equal(run(ids, am), base))
    finally:
        lens_cm.__exit__(None, None, None)
    checks["restore"] = (bool(torch.equal(run(ids, am), base)) and _hook_count(model) == hooks0
                         and _impls(model) == impls0)
    checks["eager"], checks["eager max |diff|"] = _eager_check(model, run, ids, am, groups, attn_layers)
    verdicts = [k for k in ("attach", "record", "eager", "knockout", "independence", "block", "amplify1",
                            "restore after exception", "restore") if checks.get(k) is False]
    outcome = "pass" if not verdicts else "FAIL"
    if refusals and not verdicts:
        outcome = "pass, knockouts refused" if "knockout" in refusals else "pass, some refused"
    return {"outcome": outcome, "failed": verdicts, "refused": refusals, "checks": checks,
            "unserved": list(facts.unserved), "family_facts": facts.family}


def _hand_blocked(model, run, ids, am) -> dict:
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
        return {lf.index: (run(ids, am), hd)}
    finally:
        with torch.no_grad():
            w.copy_(saved)


def _count(it) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in it:
        out[x] = out.get(x, 0) + 1
    return out


def _eager_check(model, run, ids, am, groups, attn_layers):
    """The text stack switched to eager: the model's own ``output_attentions`` against the rows arbiter records
    on the same eager model (max |diff| <= 1e-5); (None, None) where the model returns no attentions, or not one
    per layer."""
    import torch

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
        with torch.no_grad():
            if run.seq2seq:
                atts = model(decoder_input_ids=ids, decoder_attention_mask=am, output_attentions=True,
                             **run.kw).decoder_attentions
            else:
                atts = model(input_ids=ids, attention_mask=am, output_attentions=True).attentions
        atts = [a for a in (atts or []) if a is not None]
        if not attn_layers or len(atts) not in (len(attn_layers), text.num_hidden_layers):
            return None, None
        with arbiter.attach(model) as lens:
            lens.use(groups)
            with lens.record("attn.probs", rows="last") as rec:
                run(ids, am)
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
def run_one(model_type: str, cls_name: str, mappings: list[str], fallback: str | None = None, phase=None) -> dict:
    label = VARIANTS[model_type][1] if fallback == "variant" else zs._fallback_label(model_type, fallback)
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
        rec.update(battery(model))
    except Exception as e:  # noqa: BLE001
        rec.update(outcome="crash", error=f"{type(e).__name__}: {zs._first_line(e)}",
                   trace=traceback.format_exc()[-1500:])
    rec["seconds"] = round(time.monotonic() - t0, 1)
    return rec


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
        if mt in zs.CONFIG_FIXUPS:
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
        figs = []
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
              f"{zs._cell(r.get('error', ''), 160)}", flush=True)

    zs._worker = _worker   # run_all forks zs._worker: point it at this battery
    label = zs._fallback_label
    zs._fallback_label = lambda mt, fb: VARIANTS[mt][1] if fb == "variant" else label(mt, fb)
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
