"""Kernels and dtypes: attach keeps a kernel arbiter does not know on untouched layers, and knockouts, head blocks and
attention-row reads in bf16 / fp16 stay finite and within stated tolerances of independent fp32 computations.

Every check is a function of the device; the CPU tests call it with ``"cpu"``, the ``cuda``-marked ones (run by
benchmarks/gpu.sh, skipped without CUDA) with ``"cuda"``."""

from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import arbiter
from arbiter import attention as router
from arbiter.errors import SiteError, UnsupportedModelError
from arbiter.sweep import head_sweep
from arbiter.testing import tiny
from helpers import HalveFirstHead, _tiny, image_token_id, inputs_for, set_text_attention

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
on_cuda = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (benchmarks/gpu.sh)")]


def cuda_test(fn):
    for mark in on_cuda:
        fn = mark(fn)
    return fn


# ------------------------------------------------------------------------------------------------ a foreign kernel

KERNEL = "kernel_unknown_to_arbiter"
KERNEL_CALLS: list[torch.nn.Module] = []   # the attention module of every call, in order


def kernel_unknown_to_arbiter(module, query, key, value, attention_mask, **kwargs):
    """Stands in for a kernel arbiter has never heard of (a vendor's flash build): SDPA that logs who called it."""
    KERNEL_CALLS.append(module)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(KERNEL, kernel_unknown_to_arbiter)
AttentionMaskInterface.register(KERNEL, sdpa_mask)


def maskless_kernel(module, query, key, value, attention_mask, **kwargs):
    """A kernel registered without a mask function: transformers hands it the raw 2D padding mask (here: none)."""
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


MASKLESS = "maskless_kernel"
AttentionInterface.register(MASKLESS, maskless_kernel)


def own_mask(*args, **kwargs):
    """A mask function arbiter does not know (it builds SDPA's mask, but arbiter cannot tell that from outside)."""
    return sdpa_mask(*args, **kwargs)


OWN_MASK = "kernel_with_its_own_mask"
AttentionInterface.register(OWN_MASK, kernel_unknown_to_arbiter)
AttentionMaskInterface.register(OWN_MASK, own_mask)


# ------------------------------------------------------------------------------------------------ references

REFERENCE: dict = {"layers": frozenset(), "allowed": None, "seen": {}}


def hand_masked_attention(module, query, key, value, attention_mask, **kwargs):
    """The reference: textbook softmax attention in fp32 with the hand-built mask ``REFERENCE["allowed"]`` on
    ``REFERENCE["layers"]`` (keeping each layer's last-row probabilities and scores in ``REFERENCE["seen"]``);
    every other layer runs SDPA with the model's own mask, as the kernel does."""
    if module.layer_idx not in REFERENCE["layers"]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    allowed = REFERENCE["allowed"].to(query.device)                        # [b, 1, q, k]
    k = repeat_kv(key, query.shape[1] // key.shape[1]).float()
    v = repeat_kv(value, query.shape[1] // value.shape[1]).float()
    scores = query.float() @ k.transpose(2, 3) * kwargs["scaling"]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    REFERENCE["seen"][module.layer_idx] = (probs[:, :, -1:], scores[:, :, -1:])
    out = (probs @ v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register("hand_masked_attention", hand_masked_attention)
AttentionMaskInterface.register("hand_masked_attention", sdpa_mask)


def token_groups(tm, inputs) -> dict[str, torch.Tensor]:
    """[batch, positions] masks of the groups a knockout names, from the ids alone (not arbiter's groups)."""
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
    image = (ids == image_token_id(tm)) & real
    last = torch.zeros_like(real)
    last[:, -1] = True
    return {"image": image, "text": real & ~image, "last": last, "all": real}


def allowed_keys(tm, inputs, src: str | None = None, dst: str | None = None) -> torch.Tensor:
    """[b, 1, q, k] keys each query may read: causal, no padding key and, with a knockout src -> dst, no (dst, src)
    edge; a row left with no key keeps its own position (the documented rule)."""
    groups = token_groups(tm, inputs)
    s = groups["all"].shape[1]
    allowed = torch.ones(s, s, dtype=torch.bool).tril()[None] & groups["all"][:, None, :]
    if src is not None:
        allowed = allowed & ~(groups[dst][:, :, None] & groups[src][:, None, :])
    allowed = allowed | (~allowed.any(-1, keepdim=True) & torch.eye(s, dtype=torch.bool))
    return allowed[:, None]


def text_layers(model) -> list[torch.nn.Module]:
    return list(model.model.language_model.layers)


def move(inputs: dict, device: str, dtype: torch.dtype) -> dict:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}


def forward(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw)


def reference_logits(tm, inputs, layers=(), allowed=None, blocked_heads=(), model=None) -> torch.Tensor:
    """fp32 CPU logits with the hand-masked attention on ``layers`` and ``blocked_heads`` [(layer, head)] zeroed at
    their output projection's input, computed on a copy of ``model`` (default: the tiny model's) without arbiter."""
    model = copy.deepcopy(tm.model if model is None else model).float().cpu()
    set_text_attention(model, "hand_masked_attention")
    REFERENCE.update(layers=frozenset(layers), allowed=allowed, seen={})
    cfg = model.config.get_text_config()
    d = cfg.hidden_size // cfg.num_attention_heads
    handles = []
    for layer, head in blocked_heads:
        def zero(module, args, head=head):
            x = args[0].clone()
            x[..., head * d:(head + 1) * d] = 0
            return (x,)
        handles.append(text_layers(model)[layer].self_attn.o_proj.register_forward_pre_hook(zero))
    try:
        return forward(model, inputs).logits
    finally:
        for h in handles:
            h.remove()
        REFERENCE.update(layers=frozenset(), allowed=None)


def reference_last_rows(tm, inputs, model) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 last-row attention probabilities and scores [layers, b, h, 1, k] of ``model``, by textbook attention."""
    n = len(text_layers(model))
    reference_logits(tm, inputs, layers=range(n), allowed=allowed_keys(tm, inputs), model=model)
    seen = REFERENCE["seen"]
    return torch.stack([seen[i][0] for i in range(n)]), torch.stack([seen[i][1] for i in range(n)])


# ------------------------------------------------------------------------------------------------ tolerances
#
# eps = torch.finfo(dtype).eps: 2^-7 (bf16), 2^-10 (fp16); fp32 on CUDA: 2^-10 too, since cuDNN convolutions (the
# vision tower's patch embedding) run in TF32 by default.
# Logits: the rounding accumulated through tower and layers, relative to the logits' scale (measured on the tiny
# LLaVA: 0.8-0.9 eps (bf16), 0.9-1.0 eps (fp16) of max |logit|); we allow 4 eps * max |fp32 logit|, and every
# intervention checked must move the logits by more than twice that (asserted), so an intervention lost in a dtype
# cannot pass. fp32 on CPU: 1e-6 (float32 eps 1.2e-7; SDPA and the textbook reference sum in different orders).
# Probabilities: softmax turns score errors ds into dp_j = p_j (ds_j - sum_i p_i ds_i), and the scores of a layer
# carry the relative error of its query and key, itself the rounding accumulated through the layers before it:
# |p - p32| <= eps * p32 * (1 + 4 max |s|) + eps / 64, with max |s| the largest |fp32 score| of the row (measured
# on flat and on peaked rows: at most 0.6 of the bound). Each probability rounded to the dtype moves the row sum by at
# most eps / 2 in all; we allow eps.
# Peaked rows: the tiny model's attention is near-uniform (max p 0.025 over ~40 keys), so the probability check also
# runs with its text query and key weights scaled by 8 (max p 0.64, scores up to 5.3).

def eps(dtype: torch.dtype, device: str = "cpu") -> float:
    if dtype == torch.float32:
        return 2.0 ** -10 if device == "cuda" else 1e-6
    return torch.finfo(dtype).eps


def logit_tol(ref: torch.Tensor, dtype: torch.dtype, device: str) -> float:
    return 4 * eps(dtype, device) * ref.abs().max().item()


def assert_logits_close(out: torch.Tensor, ref: torch.Tensor, dtype, device, effect_of: torch.Tensor | None = None):
    """out (any dtype / device) within the logit tolerance of the fp32 reference; with ``effect_of`` (the fp32
    logits without the intervention), the intervention's effect must exceed twice that tolerance. Returns the
    error as a share of the tolerance."""
    out = out.float().cpu()
    assert torch.isfinite(out).all(), f"{dtype} on {device}: non-finite logits"
    tol = logit_tol(ref, dtype, device)
    if effect_of is not None:
        effect = (ref - effect_of).abs().max().item()
        assert effect > 2 * tol, f"effect {effect:.3g} too small to tell from {dtype} rounding ({tol:.3g})"
    err = (out - ref).abs().max().item()
    assert err <= tol, f"{dtype} on {device}: max |logit - fp32 reference| = {err:.3g} > {tol:.3g}"
    return err / tol


# ------------------------------------------------------------------------------------------------ models

@functools.lru_cache(maxsize=None)
def fp32_model(family: str):
    return _tiny(family)   # the session's cached tiny model: only copied here, never changed


PEAKED = 8.0   # query and key weights scaled by this: sharp attention rows (scores x 64)


@functools.lru_cache(maxsize=2)
def fp32_copy(family: str, sharpen: float = 1.0):
    """The fp32 tiny model, or a copy with its text query and key projections scaled by ``sharpen``."""
    model = fp32_model(family).model
    if sharpen == 1.0:
        return model
    model = copy.deepcopy(model)
    with torch.no_grad():
        for layer in text_layers(model):
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    return model


@functools.lru_cache(maxsize=4)
def model_in(family: str, device: str, dtype: torch.dtype, sharpen: float = 1.0):
    """A copy of the fp32 tiny model (see ``fp32_copy``) cast to ``dtype`` on ``device`` (SDPA, as loaded)."""
    return copy.deepcopy(fp32_copy(family, sharpen)).to(device=device, dtype=dtype)


def kernel_model(family: str, device: str = "cpu"):
    """A fresh tiny model loaded with the foreign kernel everywhere (text stack and vision tower)."""
    torch.manual_seed(0)
    tm = tiny(family)
    tm.model.to(device)
    tm.model.set_attn_implementation(KERNEL)
    return tm


def kernel_layers(tm) -> list[int | str]:
    """Which text layer made each logged kernel call ("tower" for any other module)."""
    index = {id(layer.self_attn): i for i, layer in enumerate(text_layers(tm.model))}
    return [index.get(id(m), "tower") for m in KERNEL_CALLS]


# ================================================================================================ 1. kernels

def check_idle_attach_is_bit_exact(family: str, device: str) -> tuple[int, int]:
    tm = kernel_model(family, device)
    inputs = move(inputs_for(tm, n=2), device, torch.float32)
    n = len(text_layers(tm.model))
    KERNEL_CALLS.clear()
    plain = forward(tm.model, inputs).logits
    towers = kernel_layers(tm).count("tower")
    assert kernel_layers(tm) == ["tower"] * towers + list(range(n))
    with arbiter.attach(tm.model, tm.processor):
        KERNEL_CALLS.clear()
        attached = forward(tm.model, inputs).logits
        called = kernel_layers(tm)
    assert called == ["tower"] * towers + list(range(n))        # once per layer, the tower untouched too
    assert torch.equal(attached, plain)
    return called.count("tower"), len(called) - called.count("tower")


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_idle_attach_is_bit_exact_and_calls_the_kernel_once_per_layer(family):
    towers, layers = check_idle_attach_is_bit_exact(family, "cpu")
    assert layers == len(text_layers(fp32_model(family).model))


def check_knockout_under_kernel(family: str, device: str) -> float:
    """Knockout image -> last on layers {1, 3}: layers 0 and 2 (and the tower) still call the kernel, once; in 1 and
    3 arbiter computes the edited rows (the kernel may serve the others), and the logits equal the hand-masked fp32
    reference."""
    tm = kernel_model(family, device)
    cpu_inputs = inputs_for(tm, n=2)
    inputs = move(cpu_inputs, device, torch.float32)
    KERNEL_CALLS.clear()
    plain = forward(tm.model, inputs).logits.cpu()
    towers = kernel_layers(tm).count("tower")
    with arbiter.attach(tm.model, tm.processor) as lens, lens.knockout("image", "last", layers=[1, 3]):
        KERNEL_CALLS.clear()
        knocked = forward(tm.model, inputs).logits
        called = kernel_layers(tm)
    assert called.count("tower") == towers > 0
    assert called.count(0) == called.count(2) == 1           # untouched layers: the kernel, once
    assert called.count(1) == called.count(3) == 1           # touched: the kernel runs every row, the edited rows are recomputed
    tm.model.cpu()
    ref = reference_logits(tm, cpu_inputs, layers=[1, 3], allowed=allowed_keys(tm, cpu_inputs, "image", "last"))
    real = cpu_inputs["attention_mask"].bool()
    return assert_logits_close(knocked.cpu()[real], ref[real], torch.float32, device, effect_of=plain[real])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_knockout_on_some_layers_leaves_the_others_on_the_kernel_and_equals_a_hand_masked_reference(family):
    assert check_knockout_under_kernel(family, "cpu") <= 1   # the error as a share of the stated tolerance


def test_close_restores_the_kernel_everywhere():
    tm = kernel_model("llava")
    inputs = inputs_for(tm)
    with arbiter.attach(tm.model, tm.processor) as lens, lens.knockout("image", "last"):
        assert tm.model.config.text_config._attn_implementation == router.routed_name(KERNEL)
        assert tm.model.config.vision_config._attn_implementation == KERNEL
        forward(tm.model, inputs)
    assert tm.model.config.text_config._attn_implementation == KERNEL
    assert tm.model.config.vision_config._attn_implementation == KERNEL
    assert not any(a.config._attn_implementation.startswith(router.PREFIX)
                   for a in tm.model.modules() if hasattr(a, "config") and hasattr(a.config, "_attn_implementation"))
    assert not any(m in router.RUNTIME for m in tm.model.modules())
    KERNEL_CALLS.clear()
    forward(tm.model, inputs)
    assert [c for c in kernel_layers(tm) if c != "tower"] == list(range(len(text_layers(tm.model))))


def test_a_kernel_without_a_mask_function_is_refused_clearly_and_left_in_place():
    torch.manual_seed(0)
    tm = tiny("llava")
    set_text_attention(tm.model, MASKLESS)
    inputs = inputs_for(tm)
    before = forward(tm.model, inputs).logits
    with pytest.raises(UnsupportedModelError) as err:
        with arbiter.attach(tm.model, tm.processor):
            pass
    message = str(err.value)
    assert MASKLESS in message and "mask function" in message and "attn_implementation='sdpa'" in message
    assert tm.model.config.text_config._attn_implementation == MASKLESS
    assert torch.equal(forward(tm.model, inputs).logits, before)


def test_a_kernel_with_a_mask_arbiter_cannot_read_serves_idle_and_refuses_knockouts_clearly():
    torch.manual_seed(0)
    tm = tiny("llava")
    set_text_attention(tm.model, OWN_MASK)
    inputs = inputs_for(tm)
    before = forward(tm.model, inputs).logits
    with arbiter.attach(tm.model, tm.processor) as lens:
        assert torch.equal(forward(tm.model, inputs).logits, before)
        with pytest.raises(SiteError) as err:
            with lens.knockout("image", "last"):
                pass
    message = str(err.value)
    assert OWN_MASK in message and "mask" in message and "set_attn_implementation('sdpa')" in message
    assert tm.model.config.text_config._attn_implementation == OWN_MASK


# ================================================================================================ 2. dtypes

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def check_last_row_probs(dtype, device, sharpen=1.0) -> float:
    tm = fp32_model("llava")
    cpu_inputs = inputs_for(tm, n=2)                                    # left-padded: sample 0 has padding keys
    model = model_in("llava", device, dtype, sharpen)
    with arbiter.attach(model, tm.processor) as lens, lens.record("attn", rows="last") as rec:
        forward(model, move(cpu_inputs, device, dtype))
    probs = rec.trace.stack("attn.probs")                               # [layers, b, h, 1, k]
    assert probs.dtype == dtype and torch.isfinite(probs).all()
    ref, scores = reference_last_rows(tm, cpu_inputs, fp32_copy("llava", sharpen))
    real = cpu_inputs["attention_mask"].bool()[None, :, None, None, :]
    max_score = scores.masked_fill(~real, 0).abs().amax(-1, keepdim=True)
    e = eps(dtype, device)
    probs = probs.float()
    err = (probs - ref).abs()
    bound = e * ref * (1 + 4 * max_score) + e / 64
    share = (err / bound).max().item()
    assert share <= 1, f"max |p - p32| / bound = {share:.3g}"
    assert ((probs.sum(-1) - 1).abs() <= e).all()
    assert not probs.masked_fill(real, 0).any()                         # padding keys get no weight
    return share


@pytest.mark.parametrize("sharpen", [pytest.param(1.0, id="flat"), pytest.param(PEAKED, id="peaked")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_last_row_probs_are_finite_and_close_to_fp32(dtype, sharpen):
    assert check_last_row_probs(dtype, "cpu", sharpen) <= 1   # the error as a share of the stated tolerance


def check_knockout(dtype, device, src="image", dst="last", layers=None, check_effect=True, read=False) -> float:
    """A knockout src -> dst on ``layers`` (default all) against the hand-masked fp32 reference; with
    ``check_effect``, it must move the logits by more than twice the tolerance; with ``read``, the rows of ``dst``
    have a probability reader beside (their output then comes from the reader's eager call)."""
    tm = fp32_model("llava")
    cpu_inputs = inputs_for(tm, n=2)
    model = model_in("llava", device, dtype)
    n = len(text_layers(model))
    layers = list(range(n)) if layers is None else layers
    with arbiter.attach(model, tm.processor) as lens, lens.knockout(src, dst, layers=layers), \
            (lens.record("attn.probs", rows=dst) if read else contextlib.nullcontext()):
        out = forward(model, move(cpu_inputs, device, dtype)).logits
    real = cpu_inputs["attention_mask"].bool()
    ref = reference_logits(tm, cpu_inputs, layers=layers, allowed=allowed_keys(tm, cpu_inputs, src, dst))
    effect = reference_logits(tm, cpu_inputs)[real] if check_effect else None
    return assert_logits_close(out.cpu()[real], ref[real], dtype, device, effect_of=effect)


@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.float32, id="fp32")])
def test_knockout_image_to_last_in_every_layer_is_close_to_fp32(dtype):
    assert check_knockout(dtype, "cpu") <= 1   # the error as a share of the stated tolerance


@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.float32, id="fp32")])
def test_knockout_image_to_last_with_the_last_row_read_beside_is_close_to_fp32(dtype):
    """The knocked-out row's output then comes from the eager call that reads its probabilities, in ``dtype``."""
    assert check_knockout(dtype, "cpu", read=True) <= 1   # the error as a share of the stated tolerance


def test_a_knockout_read_beside_recomputes_and_reads_the_last_row_alone_as_the_hand_masked_reference(monkeypatch):
    """image -> last in every layer with the last row's probabilities and scores recorded: each layer recomputes and
    reads the last row alone, its output and probabilities in one eager call (as the knockout recomputes it alone
    without readers), the recorded rows equal the hand-masked fp32 reference's (≤ 1e-6), the logits too, and every
    earlier row is the plain forward's, bit for bit."""
    from arbiter import attention as attn_fn

    tm = fp32_model("llava")
    inputs = inputs_for(tm, n=2)
    plain = forward(tm.model, inputs).logits
    rows_fused, rows_read, rows_recomputed = [], [], []

    def counting(fn, seen, at):
        def run(*a, **k):
            seen.append(a[at].shape[2])   # the query rows handed over
            return fn(*a, **k)
        return run
    monkeypatch.setattr(attn_fn, "row_attention", counting(attn_fn.row_attention, rows_fused, 1))
    monkeypatch.setattr(attn_fn, "row_probs", counting(attn_fn.row_probs, rows_read, 1))
    monkeypatch.setattr(attn_fn, "masked_attention", counting(attn_fn.masked_attention, rows_recomputed, 3))
    with arbiter.attach(tm.model, tm.processor) as lens, lens.knockout("image", "last"), \
            lens.record("attn.probs", "attn.scores", rows="last") as rec:
        out = forward(tm.model, inputs).logits
    n = len(text_layers(tm.model))
    assert rows_fused == [1] * n and rows_read == [] and rows_recomputed == []
    allowed = allowed_keys(tm, inputs, "image", "last")
    ref = reference_logits(tm, inputs, layers=range(n), allowed=allowed)
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-6, rtol=0)
    assert torch.equal(out[:, :-1], plain[:, :-1])
    last_allowed = allowed[:, :, -1:, :]                                     # [b, 1, 1, k]
    for layer in range(n):
        probs, scores = REFERENCE["seen"][layer]
        torch.testing.assert_close(rec.trace[f"L{layer}.attn.probs"], probs, atol=1e-6, rtol=0)
        got = rec.trace[f"L{layer}.attn.scores"]
        torch.testing.assert_close(got[last_allowed.expand_as(got)], scores[last_allowed.expand_as(scores)],
                                   atol=1e-6, rtol=0)
        assert (got[~last_allowed.expand_as(got)] == torch.finfo(got.dtype).min).all()


def test_under_eager_attention_a_knocked_out_row_read_beside_returns_its_probabilities_as_the_kernels_weights():
    """The model's own eager kernel: the attention weights it returns for the knocked-out last row are the
    probabilities the reader recorded, bit for bit, and the hand-masked fp32 reference's (≤ 1e-6); its other rows are
    the plain forward's weights, bit for bit."""
    tm = fp32_model("llava")
    model = copy.deepcopy(tm.model)
    set_text_attention(model, "eager")
    inputs = inputs_for(tm, n=2)
    plain = forward(model, inputs, output_attentions=True).attentions
    with arbiter.attach(model, tm.processor) as lens, lens.knockout("image", "last"), \
            lens.record("attn.probs", rows="last") as rec:
        got = forward(model, inputs, output_attentions=True)
    n = len(text_layers(model))
    ref = reference_logits(tm, inputs, layers=range(n), allowed=allowed_keys(tm, inputs, "image", "last"))
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got.logits[real], ref[real], atol=1e-6, rtol=0)
    weights = got.attentions[-n:]   # the text layers' (the tower's come first)
    for layer in range(n):
        assert torch.equal(weights[layer][:, :, -1:], rec.trace[f"L{layer}.attn.probs"])
        torch.testing.assert_close(weights[layer][:, :, -1:], REFERENCE["seen"][layer][0], atol=1e-6, rtol=0)
        assert torch.equal(weights[layer][:, :, :-1], plain[-n:][layer][:, :, :-1])


def test_under_eager_attention_each_decode_steps_knocked_out_row_read_beside_is_the_kernels_weights():
    """generate() with every generated row knocked out and read: at each decode step the eager kernel's weights (the
    whole step is the edited row, computed once) are the recorded probabilities, bit for bit, and the image keys get
    none of them."""
    tm = fp32_model("llava")
    model = copy.deepcopy(tm.model)
    set_text_attention(model, "eager")
    inputs = inputs_for(tm, n=2)
    image = (inputs["input_ids"] == image_token_id(tm))
    with arbiter.attach(model, tm.processor) as lens, lens.knockout("image", "last|generated"), \
            lens.record("attn.probs", rows="last|generated", steps="all") as rec, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_attentions=True,
                             return_dict_in_generate=True)
    n = len(text_layers(model))
    for step in (1, 2):   # the decode steps (step 0 is the prefill)
        weights = out.attentions[step][-n:]
        for layer in range(n):
            w = weights[layer]
            assert w.shape[2] == 1
            assert torch.equal(w, rec.trace.site("attn.probs", layer, call=step))
            assert (w[..., :image.shape[1]][image[:, None, None, :].expand_as(w[..., :image.shape[1]])] == 0).all()


def test_with_attention_dropout_a_knocked_out_row_read_beside_is_recomputed_apart(monkeypatch):
    """In training mode with attention dropout the reader reads the probabilities before dropout, while the row's
    output has it: its output is then recomputed by the masked kernel, not taken from the reader's eager call."""
    from arbiter import attention as attn_fn

    tm = fp32_model("llava")
    model = copy.deepcopy(tm.model).train()
    for layer in text_layers(model):
        layer.self_attn.attention_dropout = 0.5
    fused, recomputed = [], []

    def counting(fn, seen):
        def run(*a, **k):
            seen.append(1)
            return fn(*a, **k)
        return run
    monkeypatch.setattr(attn_fn, "row_attention", counting(attn_fn.row_attention, fused))
    monkeypatch.setattr(attn_fn, "masked_attention", counting(attn_fn.masked_attention, recomputed))
    torch.manual_seed(0)
    with arbiter.attach(model, tm.processor) as lens, lens.knockout("image", "last"), \
            lens.record("attn.probs", rows="last") as rec:
        forward(model, inputs_for(tm, n=2))
    n = len(text_layers(model))
    assert fused == [] and recomputed == [1] * n
    probs = rec.trace.stack("attn.probs")   # before dropout: each row sums to one
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)


def test_under_eager_attention_with_dropout_the_rows_read_are_the_probabilities_before_dropout():
    """A model loaded with eager attention, in training mode with attention dropout: its weights have dropout in
    them, so the reader does not take them; it reads the probabilities before dropout (each row sums to one; in the
    first layer, whose inputs dropout has not touched yet, equal to the eager model's own in eval mode)."""
    tm = fp32_model("llava")
    model = copy.deepcopy(tm.model)
    set_text_attention(model, "eager")
    inputs = inputs_for(tm, n=2)
    plain = forward(model.eval(), inputs, output_attentions=True).attentions
    model.train()
    for layer in text_layers(model):
        layer.self_attn.attention_dropout = 0.5
    torch.manual_seed(0)
    with arbiter.attach(model, tm.processor) as lens, lens.record("attn.probs", rows="last") as rec:
        forward(model, inputs)
    n = len(text_layers(model))
    for layer in range(n):
        got = rec.trace[f"L{layer}.attn.probs"]
        torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.trace["L0.attn.probs"], plain[-n][:, :, -1:], atol=1e-6, rtol=0)


def check_block_head(dtype, device) -> float:
    tm = fp32_model("llava")
    cpu_inputs = inputs_for(tm, n=2)
    model = model_in("llava", device, dtype)
    with arbiter.attach(model, tm.processor) as lens, lens.block_heads([(2, 1)]):
        out = forward(model, move(cpu_inputs, device, dtype)).logits
    real = cpu_inputs["attention_mask"].bool()
    ref = reference_logits(tm, cpu_inputs, blocked_heads=[(2, 1)])
    return assert_logits_close(out.cpu()[real], ref[real], dtype, device, effect_of=reference_logits(tm, cpu_inputs)[real])


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_head_is_close_to_fp32(dtype):
    assert check_block_head(dtype, "cpu") <= 1   # the error as a share of the stated tolerance


def check_row_with_no_key_left(dtype, device) -> float:
    """Knockout all -> last: the last row would read no key; it keeps its own position (one-hot probabilities,
    never NaN), and the logits follow the hand-masked fp32 reference."""
    tm = fp32_model("llava")
    cpu_inputs = inputs_for(tm, n=2)
    model = model_in("llava", device, dtype)
    inputs = move(cpu_inputs, device, dtype)
    with arbiter.attach(model, tm.processor) as lens, lens.knockout("all", "last"):
        with lens.record("attn", rows="last") as rec:
            out = forward(model, inputs).logits
    probs = rec.trace.stack("attn.probs").float()                      # [layers, b, h, 1, k]
    one_hot = torch.zeros_like(probs)
    one_hot[..., -1] = 1
    assert torch.equal(probs, one_hot)
    real = cpu_inputs["attention_mask"].bool()
    ref = reference_logits(tm, cpu_inputs, layers=range(len(text_layers(model))),
                           allowed=allowed_keys(tm, cpu_inputs, "all", "last"))
    return assert_logits_close(out.cpu()[real], ref[real], dtype, device, effect_of=reference_logits(tm, cpu_inputs)[real])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_left_with_no_key_keeps_itself_without_nan(dtype):
    assert check_row_with_no_key_left(dtype, "cpu") <= 1   # the error as a share of the stated tolerance


GROUPS = ("image", "text", "last", "all")


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(src=st.sampled_from(GROUPS), dst=st.sampled_from(GROUPS),
       layers=st.sets(st.integers(0, 3), min_size=1).map(sorted),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]))
def test_any_knockout_in_low_precision_is_finite_and_close_to_fp32(src, dst, layers, dtype):
    # some pairs sever nothing (last -> image): no effect size checked
    assert check_knockout(dtype, "cpu", src, dst, layers, check_effect=False) <= 1


# ================================================================================================ 3. CUDA

@cuda_test
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_low_precision_probs_knockouts_and_head_blocks(dtype):
    shares = [check_last_row_probs(dtype, "cuda"), check_last_row_probs(dtype, "cuda", PEAKED),
              check_knockout(dtype, "cuda"), check_knockout(dtype, "cuda", read=True), check_block_head(dtype, "cuda"),
              check_row_with_no_key_left(dtype, "cuda")]
    assert max(shares) <= 1   # each error as a share of its stated tolerance


@cuda_test
def test_cuda_idle_attach_is_bit_exact():
    towers, layers = check_idle_attach_is_bit_exact("llava", "cuda")
    assert layers == len(text_layers(fp32_model("llava").model))


@cuda_test
def test_cuda_knockout_under_the_kernel_equals_the_cpu_fp32_reference():
    assert check_knockout_under_kernel("llava", "cuda") <= 1


@cuda_test
def test_cuda_fp32_knockout_equals_the_cpu_fp32_reference():
    assert check_knockout(torch.float32, "cuda") <= 1


def check_head_sweep_equals_the_loop(device: str) -> tuple[float, int, int]:
    """A head sweep over every head of a 4-layer model on ``device``, one chunk per layer (the attention of each
    chunk's first layer replayed, the last layer cut to its last row where no setting is on it), against a loop of
    plain forwards with each head blocked: (largest difference, forwards that replayed an attention, forwards cut)."""
    tm = tiny("llava", layers=4)
    model = tm.model.to(device)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs_for(tm, 2).items()}
    with arbiter.attach(model, tm.processor) as lens, torch.no_grad():
        res = head_sweep(lens, inputs, chunk=tm.config.text_config.num_attention_heads)
        loop = []
        for s in res.settings:
            with lens.block_heads([(s.meta["layer"], s.meta["head"])]):
                loop.append(model(**inputs, use_cache=False).logits[:, -1])
    return float((res.values - torch.stack(loop)).abs().max()), res.attention_replayed, res.last_row


@cuda_test
def test_cuda_head_sweep_with_attention_replay_and_last_row_cut_equals_the_loop():
    diff, replayed, cut = check_head_sweep_equals_the_loop("cuda")
    assert diff <= 1e-5 and replayed == 4 and cut == 3


def test_head_sweep_with_attention_replay_and_last_row_cut_equals_the_loop_on_the_cpu():
    diff, replayed, cut = check_head_sweep_equals_the_loop("cpu")
    assert diff <= 1e-5 and replayed == 4 and cut == 3


def count_host_syncs(fn) -> int:
    """How many times ``fn`` makes the host wait on the CUDA device (torch's sync debug mode, one warning each)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def check_host_syncs_do_not_grow_with_layers(device: str) -> dict[str, tuple[int, int]]:
    """Per path (record last-row probabilities, knockouts (one with a reader beside), head blocks, amplification of
    one row, mean ablation, patching from a source on the device, probability edits of the last row and of every
    row, a head sweep of two heads; a knockout of every decode step in ``generate()``, alone and with a reader): the
    host syncs arbiter adds to a forward (or a generation) of a 2-layer and of a 4-layer model. Equal: none of them
    happens per layer."""
    out = {}
    for layers in (2, 4):
        tm = tiny("llava", layers=layers)
        model = tm.model.to(device)
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs_for(tm, 2).items()}

        def under(call, *make):   # ``call()`` with the probes ``make(lens)`` activate
            def run():
                with arbiter.attach(model, tm.processor) as lens, contextlib.ExitStack() as stack:
                    for m in make:
                        stack.enter_context(m(lens))
                    with torch.no_grad():
                        call()
            return run
        forward = functools.partial(under, lambda: model(**inputs))
        generate = functools.partial(under, lambda: model.generate(**inputs, max_new_tokens=3, min_new_tokens=3,
                                                                   do_sample=False))

        forward()()   # warm: kernels chosen, caches filled
        idle = count_host_syncs(forward())
        generate()()
        idle_generate = count_host_syncs(generate())
        every = [(i, 0) for i in range(layers)]
        nh, hd = tm.config.text_config.num_attention_heads, tm.config.text_config.head_dim
        seq = inputs["input_ids"].shape[1]
        source = {i: torch.zeros(2, seq, nh, hd, device=device) for i in range(layers)}   # already on the device
        paths = {"record": forward(lambda lens: lens.record("attn.probs", rows="last")),
                 "knockout": forward(lambda lens: lens.knockout("image", "last")),
                 "knockout_one_head": forward(lambda lens: lens.knockout("image", "last", heads=[0])),
                 "block": forward(lambda lens: lens.block_heads(every)),
                 "block_one_batch_row": forward(lambda lens: lens.block_heads(every, batch_rows=[1])),
                 "amplify_last_row": forward(lambda lens: lens.amplify_heads(every, alpha=2.0, rows="last")),
                 "mean_ablation": forward(lambda lens: lens.block_heads(
                     every, mode="mean", reference={i: torch.ones(1, nh, hd) for i in range(layers)})),
                 "patch_from_the_device": forward(lambda lens: lens.patch_heads(every, source)),
                 "knockout_and_reader": forward(lambda lens: lens.knockout("image", "last"),
                                                lambda lens: lens.record("attn.probs", rows="last")),
                 "probs_edit_last_row": forward(lambda lens: lens.probe(HalveFirstHead(), layers="all")),
                 "probs_edit_every_row": forward(lambda lens: lens.probe(HalveFirstHead("all"), layers="all"))}
        every_step = lambda lens: lens.knockout("image", "last|generated")   # noqa: E731
        generations = {"knockout_in_generate": generate(every_step),
                       "knockout_and_reader_in_generate": generate(
                           every_step, lambda lens: lens.record("attn.probs", rows="last|generated", steps="all"))}
        for name, fn in {**paths, **generations}.items():
            fn()
            out.setdefault(name, []).append(count_host_syncs(fn) - (idle_generate if name in generations else idle))
        with arbiter.attach(model, tm.processor) as lens:   # a sweep of the same two heads on either depth
            sweep = functools.partial(head_sweep, lens, inputs, heads=[(0, 0), (1, 0)], chunk=2)
            sweep()
            out.setdefault("head_sweep", []).append(count_host_syncs(sweep))
    return {k: tuple(v) for k, v in out.items()}


@cuda_test
def test_cuda_interventions_add_no_host_sync_per_layer():
    added = check_host_syncs_do_not_grow_with_layers("cuda")
    assert all(two == four for two, four in added.values()), added


def check_torchrun_matches_single(tmp_path: Path, device: str, tol: float) -> int:
    """``torchrun --nproc_per_node 2 -m arbiter diagnose --device DEVICE`` (nccl on CUDA, one GPU per rank) gives the
    single-process report's numbers within ``tol``; returns how many report fields were compared."""
    from test_distributed import _COMPARED, _close, single_and_torchrun_reports

    single, dist = single_and_torchrun_reports(tmp_path, device)
    for key in _COMPARED:
        _close(single[key], dist[key], key, tol)
    return len(_COMPARED)


@cuda_test
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_torchrun_nccl_two_gpus_give_the_single_process_report(tmp_path):
    # 1e-4, not 0: attribution's backward may use non-deterministic CUDA kernels (atomic adds)
    assert check_torchrun_matches_single(tmp_path, "cuda", tol=1e-4) > 0
