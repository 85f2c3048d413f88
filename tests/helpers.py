"""Test helpers: cached tiny models and processor inputs (imported by tests and conftest)."""

from __future__ import annotations

import functools

import torch

import arbiter

from arbiter.testing.tiny import FAMILIES as ALL_FAMILIES
from arbiter.testing.tiny import tiny

# families arbiter serves in part: left out of the end-to-end parametrizations, tested for what they serve and
# for their clear refusals in their own test files
PARTIAL = {
    "florence2": "encoder-decoder: the decoder is served (record, heads, cross-attention reads); knockouts are "
                 "refused while the encoder stack is not routed (tests/test_cross_attention.py)",
}
FAMILIES = [f for f in ALL_FAMILIES if f not in PARTIAL]
MULTIMODAL = [f for f in FAMILIES if f not in ("llama", "qwen2", "gemma")]


@functools.lru_cache(maxsize=None)
def _tiny(family: str):
    torch.manual_seed(0)
    return tiny(family)



def inputs_for(tm, n: int = 1, seed: int = 0, text: str = "What colour is the circle in the image?"):
    """Processor inputs for n prompts (left-padded when the prompts differ in length)."""
    prompts = [tm.prompt(text + " ok" * i) for i in range(n)]
    kw = {"return_tensors": "pt"}
    tok = getattr(tm.processor, "tokenizer", tm.processor)
    side = tok.padding_side
    if n > 1:
        tok.padding_side = "left"
        kw["padding"] = True
    if "image" in tm.modalities:
        kw["images"] = [[tm.make_image(seed + i)] for i in range(n)]
    if "audio" in tm.modalities:
        kw["audio"] = [tm.make_audio(seed + i) for i in range(n)]
    try:
        if tm.processor is tok:
            return dict(tok(prompts, **kw))
        return dict(tm.processor(text=prompts, **kw))
    finally:
        tok.padding_side = side  # the cached model is shared: leave its tokenizer as it was


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def set_text_attention(model, impl: str) -> str:
    """Switch the text stack alone to ``impl`` (the towers keep theirs, so both runs feed the text the same
    inputs); returns the implementation it had."""
    from arbiter.attention import config_path

    text = model.config.get_text_config()
    before = text._attn_implementation
    req: object = {"": impl}
    for key in reversed(config_path(model, text) or []):
        req = {key: req}
    model.set_attn_implementation(req)
    return before


def forward_logits(tm, inputs):
    """The logits of a tiny model (``TinyModel``) on processor inputs."""
    return logits(tm.model, inputs)


def image_token_id(tm) -> int:
    """The image placeholder id the model's config names."""
    cfg = tm.model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    raise AssertionError(f"{tm.family}: config has no image token id")


def check_deterministic_in_seed(family: str, prompt: str) -> int:
    """Same seed, same weights, inputs and logits; another seed changes every randomly drawn parameter (not the
    constant norms and biases) and nothing else. Returns how many drawn parameters were compared."""
    import numpy as np

    a, b, c = tiny(family, seed=3), tiny(family, seed=3), tiny(family, seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    pa, pc = dict(a.model.named_parameters()), dict(c.model.named_parameters())
    drawn = [k for k, p in pa.items() if p.numel() > 1 and p.float().std() > 0]
    assert len(drawn) > len(pa) // 3
    assert all(not torch.equal(pa[k], pc[k]) for k in drawn)
    assert a.tokenizer.get_vocab() == c.tokenizer.get_vocab()
    assert a.model.config.to_dict() == c.model.config.to_dict()
    if "image" in a.modalities:
        assert np.array_equal(np.asarray(a.make_image(5)), np.asarray(c.make_image(5)))
    if "audio" in a.modalities:
        assert np.array_equal(a.make_audio(5), c.make_audio(5))
    ia, ib = a.inputs(a.prompt(prompt)), b.inputs(b.prompt(prompt))
    assert ia.keys() == ib.keys() and all(torch.equal(torch.as_tensor(ia[k]), torch.as_tensor(ib[k])) for k in ia)
    torch.testing.assert_close(forward_logits(a, ia), forward_logits(b, ib), atol=0, rtol=0)
    return len(drawn)


class HalveFirstHead(arbiter.Probe):
    """Edits attn.probs on its rows (default the last): head 0's probabilities halved, nothing decided on the host."""

    def __init__(self, rows: str = "last"):
        super().__init__()
        self._edits = {"attn.probs": rows}

    def attn_probs(self, ctx, p):
        return torch.cat([p[:, :1] * 0.5, p[:, 1:]], dim=1)
