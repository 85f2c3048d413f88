"""Edits of attn.scores / attn.probs against a hand computation: textbook fp32 attention with the same edit applied to
the same rows and heads (a registered attention function, no arbiter code). The rows an edit names are recomputed
alone; every other row, and every head an editor gives back unchanged, keeps the kernel's output bit for bit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama.modeling_llama import repeat_kv

import arbiter
from arbiter.testing import tiny
from helpers import image_token_id, inputs_for, logits, set_text_attention

HEADS = [0, 2]   # the heads the editors change; the others are given back as received

# what the reference applies, and where: {"layers", "site" (scores | probs), "rows" (last | all | indices), "edit",
# "image", "knock"}
REFERENCE: dict = {}


def flatten(p: torch.Tensor) -> torch.Tensor:
    """A probability edit no mask can express: each row's square root, renormalised (masked keys stay at 0)."""
    f = p.sqrt()
    return f / f.sum(-1, keepdim=True)


def image_bias(s: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """A score edit: +2 on the image keys. ``image`` [batch, keys] bool."""
    return s + 2.0 * image[:, None, None, :].to(s.dtype)


def on_heads(edited: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    chosen = torch.zeros(x.shape[1], dtype=torch.bool)
    chosen[HEADS] = True
    return torch.where(chosen[None, :, None, None].to(x.device), edited, x)


def hand_edited_attention(module, query, key, value, attention_mask, **kwargs):
    """Textbook attention in fp32 on the reference's layers: the model's mask (causal and padding; a row with no key
    keeps its own position), the edit applied to the chosen rows and heads of the scores or the probabilities; SDPA
    elsewhere."""
    if module.layer_idx not in REFERENCE["layers"]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    b, _, q, k = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    allowed = torch.ones(q, k, dtype=torch.bool).tril(k - q)[None, None].expand(b, 1, q, k)
    if attention_mask is not None:
        allowed = attention_mask[..., -k:].bool() if attention_mask.dtype == torch.bool else \
            attention_mask[..., -k:] == 0
        allowed = allowed.expand(b, 1, q, k)
    diag = torch.arange(k)[None, :] == torch.arange(k - q, k)[:, None]
    allowed = allowed | (~allowed.any(-1, keepdim=True) & diag)
    kk = repeat_kv(key, query.shape[1] // key.shape[1]).float()
    vv = repeat_kv(value, query.shape[1] // value.shape[1]).float()
    scores = (query.float() @ kk.transpose(2, 3) * kwargs["scaling"]).masked_fill(~allowed, float("-inf"))
    rows = REFERENCE["rows"]   # "last", "all", or the positions' indices (prefill)
    rows = slice(q - 1, q) if isinstance(rows, str) and rows == "last" else slice(0, q) if isinstance(rows, str) \
        else rows
    if REFERENCE.get("knock") is not None:   # a knockout of these keys from the same rows, every head
        scores[:, :, rows] = scores[:, :, rows].masked_fill(REFERENCE["knock"][:, None, None, -k:], float("-inf"))
    if REFERENCE["site"] == "scores":
        scores[:, :, rows] = on_heads(REFERENCE["edit"](scores[:, :, rows], REFERENCE["image"][:, -k:]),
                                      scores[:, :, rows])
    probs = scores.softmax(-1).clone()   # (softmax keeps its output for the backward: the edit goes into a copy)
    if REFERENCE["site"] == "probs":
        probs[:, :, rows] = on_heads(REFERENCE["edit"](probs[:, :, rows]), probs[:, :, rows])
    return (probs @ vv).to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register("hand_edited_attention", hand_edited_attention)
AttentionMaskInterface.register("hand_edited_attention", sdpa_mask)


class Edit(arbiter.Probe):
    """Applies ``flatten`` (attn.probs) or ``image_bias`` (attn.scores) to HEADS on its rows; ``in_place``: writes
    the result into the tensor it receives and returns that tensor; ``noop``: gives back what it receives (or a copy:
    ``noop="copy"``)."""

    def __init__(self, site: str = "probs", rows: str = "last", in_place: bool = False, noop: str | bool = False,
                 unit: str = "attn"):
        super().__init__()
        self._edits = {f"{unit}.{site}": rows}
        self.in_place, self.noop = in_place, noop

    def _edit(self, x, edited):
        if self.noop:
            return x.clone() if self.noop == "copy" else x
        out = on_heads(edited, x)
        return x.copy_(out) if self.in_place else out

    def attn_probs(self, ctx, p):
        return self._edit(p, flatten(p))

    def attn_scores(self, ctx, s):
        return self._edit(s, image_bias(s, ctx.group("image", over="keys").to(s.device)))

    xattn_probs = attn_probs   # a cross-attention's probabilities (unit="xattn")


def reference(tm, inputs, layers, site="probs", rows="last", knock=None) -> torch.Tensor:
    """The hand computation's logits (knock: [batch, keys] keys removed from the edited rows first)."""
    ids = inputs["input_ids"]
    REFERENCE.update(layers=frozenset(layers), site=site, rows=rows, edit=flatten if site == "probs" else image_bias,
                     image=(ids == image_token_id(tm)) & inputs["attention_mask"].bool(), knock=knock)
    before = set_text_attention(tm.model, "hand_edited_attention")
    try:
        return logits(tm.model, inputs)
    finally:
        set_text_attention(tm.model, before)


def head_outputs(tm, layer: int):
    """A forward pre-hook on the layer's o_proj (no arbiter code) keeping its input: [batch, seq, heads * dim]."""
    kept = []
    proj = tm.model.model.language_model.layers[layer].self_attn.o_proj
    return kept, proj.register_forward_pre_hook(lambda m, args: kept.append(args[0].detach().clone()))


def edited(tm, inputs, probe, layers, recorded=None):
    """Logits with ``probe`` on ``layers`` (and the o_proj input of layer ``recorded``)."""
    kept, handle = head_outputs(tm, recorded) if recorded is not None else ([], None)
    try:
        with arbiter.attach(tm.model, tm.processor) as lens, lens.probe(probe, layers=layers):
            out = logits(tm.model, inputs)
    finally:
        if handle is not None:
            handle.remove()
    return out, kept


@pytest.fixture(scope="module", params=["llava", "qwen2_vl", "gemma3"])
def model(request):
    torch.manual_seed(0)
    tm = tiny(request.param)
    return tm, inputs_for(tm, n=2)


@pytest.mark.parametrize("site", ["probs", "scores"])
def test_an_edit_of_the_last_row_equals_the_hand_computation(model, site):
    tm, inputs = model
    got, _ = edited(tm, inputs, Edit(site), layers=[1, 2])
    want = reference(tm, inputs, [1, 2], site)
    plain = logits(tm.model, inputs)
    assert (got[:, -1] - plain[:, -1]).abs().max() > 1e-4                    # the edit moves the answer ...
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=1e-6, rtol=0)    # ... as the hand computation does


LLAVA = {}


def llava_and_inputs():
    if not LLAVA:
        torch.manual_seed(0)
        tm = tiny("llava")
        LLAVA.update(tm=tm, inputs=inputs_for(tm, n=2))
    return LLAVA["tm"], LLAVA["inputs"]


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(picked=st.sets(st.integers(0, 44), min_size=1), layers=st.sets(st.integers(0, 3), min_size=1).map(sorted),
       site=st.sampled_from(["probs", "scores"]))
def test_an_edit_of_any_rows_equals_the_hand_computation(picked, layers, site):
    """Any set of rows (a group of the user's: consecutive or not, few enough to be recomputed alone or not), on any
    layers, scores or probabilities: the logits of every real position as the hand computation's."""
    tm, inputs = llava_and_inputs()
    n = inputs["input_ids"].shape[1]
    assert n == 45   # the strategy's positions
    rows = torch.zeros(n, dtype=torch.bool)
    rows[sorted(picked)] = True
    with arbiter.attach(tm.model, tm.processor) as lens:
        lens.use(arbiter.TokenGroups.from_input_ids(inputs["input_ids"], inputs["attention_mask"],
                                                    lens.facts.modality_token_ids).add("picked", rows))
        with lens.probe(Edit(site, rows="picked"), layers=layers):
            got = logits(tm.model, inputs)
    want = reference(tm, inputs, layers, site, rows=torch.tensor(sorted(picked)))
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-6, rtol=0)


def test_an_edit_of_every_row_equals_the_hand_computation(model):
    tm, inputs = model
    got, _ = edited(tm, inputs, Edit("probs", rows="all"), layers=[1])
    want = reference(tm, inputs, [1], "probs", rows="all")
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-6, rtol=0)


def test_rows_and_heads_an_edit_leaves_keep_the_kernels_output_bit_for_bit(model):
    """In the first edited layer, every row but the last and, in the last row, every head the editor gives back
    unchanged equal the plain forward's o_proj input exactly; the edited heads of the last row are the hand
    computation's (≤ 1e-6)."""
    tm, inputs = model
    kept, handle = head_outputs(tm, 1)
    try:
        plain = logits(tm.model, inputs)
    finally:
        handle.remove()
    got, heads = edited(tm, inputs, Edit("probs"), layers=[1], recorded=1)
    b, s, _ = heads[0].shape
    now, before = heads[0].view(b, s, 4, -1), kept[0].view(b, s, 4, -1)
    assert torch.equal(now[:, :-1], before[:, :-1]) and torch.equal(got[:, :-1], plain[:, :-1])
    others = [h for h in range(4) if h not in HEADS]
    assert torch.equal(now[:, -1, others], before[:, -1, others])
    assert (now[:, -1, HEADS] - before[:, -1, HEADS]).abs().max() > 1e-4
    kept_ref, handle = head_outputs(tm, 1)
    try:
        reference(tm, inputs, [1], "probs")
    finally:
        handle.remove()
    ref = kept_ref[0].view(b, s, 4, -1)
    torch.testing.assert_close(now[:, -1, HEADS], ref[:, -1, HEADS], atol=1e-6, rtol=0)


def test_only_the_named_rows_are_recomputed(model, monkeypatch):
    """The scores of the last row alone are formed in each edited layer (every row, once the share is 0), and both
    give the same logits."""
    tm, inputs = model
    rows_formed = count_rows_formed(monkeypatch)
    sliced, _ = edited(tm, inputs, Edit("probs"), layers=[1, 2])
    assert rows_formed == [1, 1]
    with arbiter.attach(tm.model, tm.processor) as lens:
        monkeypatch.setattr(type(lens._runtime), "ROW_SLICE_SHARE", 0.0)
        with lens.probe(Edit("probs"), layers=[1, 2]):
            whole = logits(tm.model, inputs)
    assert rows_formed[2:] == [inputs["input_ids"].shape[1]] * 2
    torch.testing.assert_close(sliced, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("noop", [True, "copy"])
@pytest.mark.parametrize("rows", ["last", "all"])
@pytest.mark.parametrize("inference", [False, True])
def test_an_editor_that_gives_back_what_it_received_leaves_the_logits_bit_identical(model, noop, rows, inference):
    tm, inputs = model
    plain = logits(tm.model, inputs)
    with torch.inference_mode(inference):
        got, _ = edited(tm, inputs, Edit("probs", rows=rows, noop=noop), layers=[0, 1, 2, 3])
    assert torch.equal(got, plain)


@pytest.mark.parametrize("inference", [False, True])
def test_an_edit_written_into_the_tensor_it_receives_counts(model, inference):
    tm, inputs = model
    with torch.inference_mode(inference):
        got, _ = edited(tm, inputs, Edit("probs", in_place=True), layers=[1, 2])
    want = reference(tm, inputs, [1, 2], "probs")
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=1e-6, rtol=0)


def count_rows_formed(monkeypatch) -> list[int]:
    """How many query rows each score computation of an edited layer forms (arbiter's row_scores, counted)."""
    from arbiter import attention as attn_fn

    formed, real = [], attn_fn.row_scores

    def counting(module, query_rows, *a, **k):
        formed.append(query_rows.shape[2])
        return real(module, query_rows, *a, **k)
    monkeypatch.setattr(attn_fn, "row_scores", counting)
    return formed


def test_a_knockout_beside_a_probability_edit_in_the_same_layer_equals_both_by_hand(monkeypatch):
    """image -> last knocked out and the last row flattened, in layer 1: the hand computation removes the image keys
    from the last row's scores (every head), then flattens HEADS. The last row alone is recomputed."""
    tm = tiny("llava")
    inputs = inputs_for(tm, n=2)
    plain = logits(tm.model, inputs)
    formed = count_rows_formed(monkeypatch)
    with arbiter.attach(tm.model, tm.processor) as lens, lens.knockout("image", "last", layers=[1]), \
            lens.probe(Edit("probs"), layers=[1]):
        got = logits(tm.model, inputs)
    assert formed == [1]
    image = (inputs["input_ids"] == image_token_id(tm)) & inputs["attention_mask"].bool()
    want = reference(tm, inputs, [1], "probs", knock=image)
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=1e-6, rtol=0)
    assert torch.equal(got[:, :-1], plain[:, :-1])


def test_an_edit_in_generate_equals_the_hand_computation_at_every_step(model):
    """The last prompt row at the prefill and the generated row of every decode step (``last|generated``), edited;
    greedy tokens and step scores as the hand computation's, which edits the last row of every call."""
    tm, inputs = model
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with arbiter.attach(tm.model, tm.processor) as lens, lens.probe(Edit("probs", rows="last|generated"), layers=[1, 2]), \
            torch.no_grad():
        got = tm.model.generate(**inputs, **kw)
    REFERENCE.update(layers=frozenset([1, 2]), site="probs", rows="last", edit=flatten, knock=None)
    before = set_text_attention(tm.model, "hand_edited_attention")
    try:
        with torch.no_grad():
            want = tm.model.generate(**inputs, **kw)
    finally:
        set_text_attention(tm.model, before)
    assert torch.equal(got.sequences, want.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(got.scores, want.scores)) <= 1e-6


def test_a_cross_attention_edit_recomputes_its_last_row_alone(monkeypatch):
    """idefics' gated cross-attention blocks: flattening the last row's cross-attention probabilities forms that row
    alone, gives the logits that recomputing every row gives, leaves every earlier row bit-identical, and an editor
    that gives back what it receives leaves the logits bit-identical."""
    tm = tiny("idefics")
    inputs = tm.inputs(tm.prompt("What colour is the shape in the image?"), image_seeds=[0])
    plain = logits(tm.model, inputs)
    formed = count_rows_formed(monkeypatch)
    with arbiter.attach(tm.model, tm.processor) as lens:
        layers = lens.facts.cross_layers
        with lens.probe(Edit("probs", unit="xattn"), layers=layers):
            sliced = logits(tm.model, inputs)
        assert formed == [1] * len(layers)
        with lens.probe(Edit("probs", unit="xattn", noop=True), layers=layers):
            noop = logits(tm.model, inputs)
        monkeypatch.setattr(type(lens._runtime), "ROW_SLICE_SHARE", 0.0)
        with lens.probe(Edit("probs", unit="xattn"), layers=layers):
            whole = logits(tm.model, inputs)
    assert (sliced[:, -1] - plain[:, -1]).abs().max() > 1e-4
    torch.testing.assert_close(sliced, whole, atol=1e-6, rtol=0)
    assert torch.equal(sliced[:, :-1], plain[:, :-1]) and torch.equal(noop, plain)


@pytest.mark.parametrize("rows", ["last", "all"])
def test_gradients_through_an_edit_equal_the_hand_computations(rows):
    """With autograd on (attribution under an intervention): the gradient of the last logits' squared norm with
    respect to an edited layer's query weights, through a score edit of the last row or of every row, as through the
    hand computation (and different from the unedited model's)."""
    tm = tiny("llava")
    inputs = inputs_for(tm, n=2)
    weight = tm.model.model.language_model.layers[1].self_attn.q_proj.weight

    def gradient(run):
        tm.model.zero_grad()
        run()[:, -1].pow(2).sum().backward()
        g = weight.grad.clone()
        tm.model.zero_grad()
        return g

    def edited_run():
        with arbiter.attach(tm.model, tm.processor) as lens, lens.probe(Edit("scores", rows=rows), layers=[1, 2]):
            return tm.model(**inputs).logits

    def reference_run():
        REFERENCE.update(layers=frozenset([1, 2]), site="scores", rows=rows, edit=image_bias, knock=None,
                         image=(inputs["input_ids"] == image_token_id(tm)) & inputs["attention_mask"].bool())
        before = set_text_attention(tm.model, "hand_edited_attention")
        try:
            return tm.model(**inputs).logits
        finally:
            set_text_attention(tm.model, before)
    got, want, plain = gradient(edited_run), gradient(reference_run), gradient(lambda: tm.model(**inputs).logits)
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


class InFloat32(arbiter.Probe):
    """Gives back what it receives, in fp32 (on ``site``, rows ``rows``), or on the meta device (``meta``)."""

    def __init__(self, site: str, rows: str = "all", meta: bool = False):
        super().__init__()
        self._edits = {site: rows}
        self.meta = meta

    def _back(self, ctx, x):
        return torch.empty_like(x, device="meta") if self.meta else x.float()
    attn_probs = attn_scores = resid_post = _back


@pytest.mark.parametrize("site,rows", [("attn.probs", "last"), ("attn.probs", "all"), ("attn.scores", "last"),
                                       ("resid.post", "all"), ("resid.post", "last")])
def test_an_edit_returned_in_another_precision_runs_on_in_the_models(site, rows):
    """A bf16 model, an editor that returns what it received in fp32 (an edit computed in fp32): the edit runs on in
    bf16, so this one changes nothing, bit for bit (it used to stop the forward with a matmul dtype error)."""
    tm = tiny("llava")
    model = tm.model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs_for(tm, n=2).items()}
    plain = logits(model, inputs)
    with arbiter.attach(model, tm.processor) as lens, lens.probe(InFloat32(site, rows), layers=[1, 2]):
        got = logits(model, inputs)
    assert got.dtype == torch.bfloat16 and torch.equal(got, plain)


def test_an_edit_returned_on_another_device_is_refused_by_name():
    tm = tiny("llava")
    inputs = inputs_for(tm, n=1)
    plain = logits(tm.model, inputs)
    with arbiter.attach(tm.model, tm.processor) as lens, lens.probe(InFloat32("attn.probs", meta=True), layers=[1]):
        with pytest.raises(arbiter.ProbeError, match="returned a tensor on meta for 'attn.probs' at layer 1"):
            logits(tm.model, inputs)
    assert torch.equal(logits(tm.model, inputs), plain)
