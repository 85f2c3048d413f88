"""The tensor operations arbiter adds per layer are those of the least a hand-written attention function needs for
the same result: reading the last row, or recomputing it under a knockout (counted, not timed: what a GPU launches).

Each hand function is registered through transformers' AttentionInterface and uses no arbiter code; it builds what
a forward shares (the last row's mask) once per forward, as arbiter must."""

from __future__ import annotations

import contextlib
import copy
import sys

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

import arbiter
from arbiter.testing.ops import count_ops
from arbiter.testing.tiny import tiny

from helpers import image_token_id, inputs_for, logits, set_text_attention

HAND: dict = {}   # the hand functions' state: per-forward row masks, the rows they read, the knocked-out keys


def _per_mask(name, attention_mask, build):
    """``build()`` once per mask object (a forward's, a decode step's): kept with the mask, so a new mask never
    finds an older one's result."""
    hit = HAND["masks"].get((name, id(attention_mask)))
    if hit is None or hit[0] is not attention_mask:
        hit = HAND["masks"][(name, id(attention_mask))] = (attention_mask, build())
    return hit[1]


def _last_row_mask(attention_mask, query, key) -> torch.Tensor:
    """[b, 1, 1, k] bool: the keys the last row may attend, read off the model's 4D mask once per forward."""
    return _per_mask("row", attention_mask, lambda: (
        attention_mask[:, :, -1:, -key.shape[2]:] if attention_mask is not None
        else torch.ones(query.shape[0], 1, 1, key.shape[2], dtype=torch.bool)))


def _last_row_eager(module, query, key, value, attention_mask, allowed, kwargs, name):
    """(the last row's output, or None where ``value`` is left out, and its probabilities), computed by the module's
    own eager function (keys copied contiguous) with ``allowed`` [b, 1, 1, k] made additive once per mask object; a
    copy of the probabilities kept."""
    additive = _additive(name, attention_mask, allowed, query.dtype)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    k = key.contiguous() if key.shape[1] == query.shape[1] else key
    row, probs = eager(module, query[:, :, -1:], k, value, additive, **{**kwargs, "dropout": 0.0})
    HAND["rows"].append(probs.clone())
    return row


def hand_read_last_row(module, query, key, value, attention_mask, **kwargs):
    """The last row's probabilities read (the eager function without values: no output wanted); SDPA for every row."""
    _last_row_eager(module, query, key, value[..., :0], attention_mask, _last_row_mask(attention_mask, query, key),
                    kwargs, "additive")
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _additive(name, attention_mask, allowed, dtype) -> torch.Tensor:
    """``allowed`` [b, 1, 1, k] as an additive mask (0 / the dtype's lowest), once per mask object."""
    return _per_mask(name, attention_mask, lambda: torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype))


def hand_knockout_last_row(module, query, key, value, attention_mask, **kwargs):
    """SDPA on every row, then the last row alone again with the image keys cut from its mask (made additive once
    per mask object, so that SDPA need not convert it in every layer), written into the output in place; a decode
    step's one row: that row alone. Where the cut row is also read, one eager call gives its output and its
    probabilities; else SDPA computes it."""
    cut = _per_mask("cut", attention_mask, lambda: _last_row_mask(attention_mask, query, key)
                    & ~HAND["image"][:, None, None, :key.shape[2]])
    if HAND.get("read"):
        row = _last_row_eager(module, query, key, value, attention_mask, cut, kwargs, "cut additive")
    elif query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value,
                                      _additive("cut additive", attention_mask, cut, query.dtype), **kwargs)
    else:
        row, _ = sdpa_attention_forward(module, query[:, :, -1:], key, value,
                                        _additive("cut additive", attention_mask, cut, query.dtype), **kwargs)
    if query.shape[2] == 1:
        return row, None
    out = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out[0][:, -1:] = row
    return out


def hand_eager_keep_last_row(module, query, key, value, attention_mask, **kwargs):
    """The module's own eager function on every row (the model loaded with eager attention), a copy of the last row
    of the probabilities it returns kept."""
    out = sys.modules[type(module).__module__].eager_attention_forward(module, query, key, value, attention_mask,
                                                                       **kwargs)
    HAND["rows"].append(out[1][:, :, -1:].clone())
    return out


for _fn, _mask in ((hand_read_last_row, sdpa_mask), (hand_knockout_last_row, sdpa_mask),
                   (hand_eager_keep_last_row, eager_mask)):
    AttentionInterface.register(_fn.__name__, _fn)
    AttentionMaskInterface.register(_fn.__name__, _mask)


@pytest.fixture
def model(request):
    """(tiny model of the requested family, 4 layers; its layers; a forward of two left-padded prompts that clears
    the hand functions' per-forward state and returns the logits)."""
    tm = tiny(request.param)
    inputs = inputs_for(tm, 2)
    with arbiter.attach(tm.model, tm.processor) as lens:
        layers = [lf.layer for lf in lens.facts.layers]
    image = inputs["input_ids"] == image_token_id(tm)   # over the prompt and 16 positions generated after it
    HAND.update(image=torch.cat([image, torch.zeros(image.shape[0], 16, dtype=torch.bool)], dim=1), inputs=inputs)

    def forward():
        HAND.update(masks={}, rows=[])
        return logits(tm.model, inputs)
    return tm, layers, forward


def _per_layer(counted, plain, layers) -> int:
    """The operations ``counted`` adds to ``plain`` in each middle layer (the same in all of them)."""
    added = [counted.counts.get(i, 0) - plain.counts.get(i, 0) for i in range(len(layers))]
    assert len(set(added[1:-1])) == 1, added
    return added[1]


def _by_hand(tm, layers, forward, impl):
    """(the hand function's operations counted over a forward, its logits, the rows it kept)."""
    before = set_text_attention(tm.model, impl)
    try:
        counted = count_ops(forward, layers)
        out = forward()
        return counted, out, list(HAND["rows"])
    finally:
        set_text_attention(tm.model, before)


def _arbiter_and_hand(model, impl, enter):
    """(operations per layer arbiter adds with the probe ``enter(lens)`` activates, those the hand function ``impl``
    adds, (the probe, the logits) of arbiter's forward, the hand function's logits, the rows it kept)."""
    tm, layers, forward = model
    plain = count_ops(forward, layers)
    hand, hand_logits, hand_rows = _by_hand(tm, layers, forward, impl)
    with arbiter.attach(tm.model, tm.processor) as lens:
        def run():
            with enter(lens) as probe:
                return probe, forward()
        counted = count_ops(run, layers)
        result = run()
    return _per_layer(counted, plain, layers), _per_layer(hand, plain, layers), result, hand_logits, hand_rows


FAMILIES = ["llava", "qwen2_vl"]   # one with as many key heads as query heads (keys copied), one with grouped keys


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
def test_recording_the_last_rows_attention_adds_per_layer_the_operations_of_reading_that_row_by_hand(model):
    ours, hand, (rec, _), _, hand_rows = _arbiter_and_hand(
        model, "hand_read_last_row", lambda lens: lens.record("attn.probs", rows="last"))
    assert ours == hand > 0
    for layer, row in enumerate(hand_rows):   # the same probabilities, bit for bit
        torch.testing.assert_close(rec.trace.site("attn.probs", layer)[:, :, -1:], row, atol=0, rtol=0)


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
def test_under_eager_attention_recording_the_last_row_copies_it_from_the_kernels_own_probabilities(model):
    """The model loaded with eager attention computes every row's probabilities itself: recording the last row adds
    per layer only its copy, as keeping that row of the kernel's weights by hand does, and records it bit for bit."""
    tm, layers, forward = model
    before = set_text_attention(tm.model, "eager")
    try:
        ours, hand, (rec, _), _, hand_rows = _arbiter_and_hand(
            model, "hand_eager_keep_last_row", lambda lens: lens.record("attn.probs", rows="last"))
    finally:
        set_text_attention(tm.model, before)
    assert ours == hand == 1
    for layer, row in enumerate(hand_rows):
        assert torch.equal(rec.trace.site("attn.probs", layer)[:, :, -1:], row)


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
def test_a_knockout_into_the_last_row_adds_per_layer_the_operations_of_recomputing_that_row_by_hand(model):
    ours, hand, (_, out), hand_logits, _ = _arbiter_and_hand(
        model, "hand_knockout_last_row", lambda lens: lens.knockout("image", "last", layers="all"))
    assert ours == hand > 0
    torch.testing.assert_close(out, hand_logits, atol=1e-6, rtol=0)
    assert (out - model[2]()).abs().max() > 1e-3   # the knockout moves the logits



@pytest.mark.parametrize("model", ["llava"], indirect=True)
def test_recording_rows_reads_no_tensor_value_back_to_the_host(model):
    """Where the rows read lie (their span, the forward's first and last position) is known without reading a
    tensor's elements one by one: no scalar read is dispatched in a recording forward (each is an indexing operation
    and, on an accelerator, a wait)."""
    tm, layers, forward = model
    with arbiter.attach(tm.model, tm.processor) as lens:
        def run():
            with lens.record("attn.probs", rows="last"), lens.record("attn.probs", rows="image"):
                return forward()
        counted = count_ops(run, layers)
    plain = count_ops(forward, layers)   # (the model reads a few values itself: its mask's and its inputs')

    def scalar_reads(c):
        return {place: names["_local_scalar_dense"] for place, names in c.names.items()
                if "_local_scalar_dense" in names}
    assert scalar_reads(counted) == scalar_reads(plain)

def _generation(tm):
    """A generation of 4 tokens from the fixture's inputs that clears the hand functions' per-forward state and
    returns (tokens, the steps' scores)."""
    def generate():
        HAND.update(masks={}, rows=[])
        with torch.no_grad():
            out = tm.model.generate(**HAND["inputs"], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                    output_scores=True, return_dict_in_generate=True)
        return out.sequences, torch.stack(out.scores)
    return generate


@pytest.mark.parametrize("read", [False, True], ids=["alone", "with_a_reader"])
@pytest.mark.parametrize("model", FAMILIES, indirect=True)
def test_a_knockout_in_generate_adds_per_decode_step_the_operations_of_cutting_the_new_row_by_hand(model, read):
    """Every decode step's row is edited (``last|generated``): arbiter edits its mask once per step, as the hand
    function does, not in every layer; a reader of that row beside it reads the cut row, its mask cut once per
    step too."""
    tm, layers, _ = model
    HAND["read"] = read
    generate = _generation(tm)

    @contextlib.contextmanager
    def knockout(lens):
        with lens.knockout("image", "last|generated", layers="all"), \
                (lens.record("attn.probs", rows="last|generated", steps="all") if read else
                 contextlib.nullcontext()) as rec:
            yield rec
    try:
        ours, hand, (rec, (tokens, scores)), (hand_tokens, hand_scores), hand_rows = _arbiter_and_hand(
            (tm, layers, generate), "hand_knockout_last_row", knockout)
    finally:
        HAND["read"] = False
    # (alone, fewer than the plain generation's: the step's edited mask, made additive once per step, spares SDPA
    # turning the model's bool mask into an additive one in every layer)
    assert ours == hand
    assert torch.equal(tokens, hand_tokens)
    torch.testing.assert_close(scores, hand_scores, atol=1e-5, rtol=0)
    if read:   # prefill and 3 decode steps (the 4th token comes from the 3rd step's logits), every layer
        assert len(hand_rows) == 4 * len(layers)
        for i, row in enumerate(hand_rows):
            call, layer = divmod(i, len(layers))
            torch.testing.assert_close(rec.trace.site("attn.probs", layer, call=call)[:, :, -1:], row,
                                       atol=1e-6, rtol=0)


@pytest.mark.parametrize("model", FAMILIES, indirect=True)
def test_a_knockout_in_generate_read_beside_generates_as_the_masked_kernel_by_hand(model):
    """With a reader beside, the edited rows' output comes from the reader's eager call; it generates as the hand
    function that runs SDPA with the cut mask and reads nothing: the same tokens, step scores ≤ 1e-5."""
    tm, layers, _ = model
    generate = _generation(tm)
    _, (hand_tokens, hand_scores), _ = _by_hand(tm, layers, generate, "hand_knockout_last_row")
    with arbiter.attach(tm.model, tm.processor) as lens, lens.knockout("image", "last|generated", layers="all"), \
            lens.record("attn.probs", rows="last|generated", steps="all"):
        tokens, scores = generate()
    assert torch.equal(tokens, hand_tokens)
    torch.testing.assert_close(scores, hand_scores, atol=1e-5, rtol=0)
    _, plain_scores = generate()
    finite = torch.isfinite(scores)   # (min_new_tokens puts -inf on the end token)
    assert (plain_scores - scores)[finite].abs().max() > 1e-3   # the knockout moves the scores


class _Stack(torch.nn.Module):
    """Four linear layers in a row, a head after them."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_ops_added_counts_what_hooks_add_per_layer_and_per_forward_views_left_out():
    from arbiter.testing.ops import ops_added

    torch.manual_seed(0)
    net, x = _Stack(), torch.randn(3, 4)
    twin = copy.deepcopy(net)   # no hooks: the plain forward
    plain, plain_layers = (lambda: twin(x)), list(twin.layers)
    handles = [layer.register_forward_hook(lambda m, a, out: (out * 2).view(-1).view(3, 4)) for layer in net.layers]
    handles.append(net.register_forward_pre_hook(lambda m, a: [a[0] + 1, a[0].sum()] and None))   # 2 per forward
    try:
        assert ops_added(lambda: net(x), plain, list(net.layers), plain_layers) == (1, 2)   # the product; the views are not counted
    finally:
        for h in handles:
            h.remove()
    handles = [net.layers[1].register_forward_hook(lambda m, a, out: out * 2)]   # one middle layer only
    try:
        with pytest.raises(ValueError, match="not the same in the middle layers"):
            ops_added(lambda: net(x), plain, list(net.layers), plain_layers)
    finally:
        handles[0].remove()
