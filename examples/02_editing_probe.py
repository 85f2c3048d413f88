"""Example 2: a custom EDITING probe.

``RedirectToImage`` declares ``edits = {"attn.probs": "last"}``: its callback receives the attention
probabilities of the last prompt token and returns new ones. In the chosen heads it takes a fraction of the mass
on the text-context keys and moves it onto the image keys, in proportion to the attention each image key already
had, so every row still sums to 1. (Editing ``attn.probs`` makes arbiter recompute the edited rows' attention
output from the edited probabilities; the layer's own kernel (SDPA here) runs every other row, and heads the
probe gives back unchanged keep the kernel's output exactly.)

We then show that (1) the last-token logits change, and (2) recorded with ``lens.record`` before and after, the
image share of the edited heads rises by exactly ``fraction * context share`` in the first edited layer.

Run it with ``python examples/02_editing_probe.py``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch

import arbiter
from arbiter.data import FORMAT_CONSTRAINT, IA_VISION_INSTRUCTION, ConflictSample
from arbiter.testing import tiny

FRACTION = 0.5                                  # share of the context mass that is moved onto the image
HEADS = [(1, 0), (1, 2), (2, 1)]                # (layer, head) pairs to edit


class RedirectToImage(arbiter.Probe):
    """Move ``fraction`` of each chosen head's attention on ``src`` keys onto ``dst`` keys (proportionally)."""

    edits = {"attn.probs": "last"}

    def __init__(self, heads: Iterable[tuple[int, int]], fraction: float = 0.5, src: str = "context",
                 dst: str = "image"):
        super().__init__()
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        self.heads: dict[int, list[int]] = defaultdict(list)
        for layer, head in heads:
            self.heads[int(layer)].append(int(head))
        self.fraction, self.src, self.dst = fraction, src, dst

    def on_attach(self, lens) -> None:
        # validate against the model when the probe is activated (an exception here leaves the model untouched)
        for layer, heads in self.heads.items():
            n_heads = lens.facts.heads(layer)[0]
            bad = [h for h in heads if not 0 <= h < n_heads]
            if bad:
                raise arbiter.SiteError(f"RedirectToImage: heads {bad} out of range at layer {layer} "
                                        f"({n_heads} heads).")

    @property
    def layer_list(self) -> list[int]:
        """The layers to activate the probe on: ``lens.probe(p, layers=p.layer_list)``."""
        return sorted(self.heads)

    def attn_probs(self, ctx, probs):                    # [batch, heads, rows, keys]
        src = ctx.group(self.src, over="keys").to(probs.dtype)[:, None, None, :]   # [batch, 1, 1, keys]
        dst = ctx.group(self.dst, over="keys").to(probs.dtype)[:, None, None, :]
        on_src = (probs * src).sum(-1, keepdim=True)     # mass on the context, per row:  [batch, heads, rows, 1]
        on_dst = (probs * dst).sum(-1, keepdim=True)     # mass on the image
        moved = self.fraction * on_src
        # take `moved` off the context keys (each loses the same fraction) and give it to the image keys in
        # proportion to what they already had; rows with no image mass are left alone (nowhere to put it)
        can = on_dst > 0
        share = torch.where(can, probs * dst / on_dst.clamp_min(torch.finfo(probs.dtype).tiny), 0.0)
        redirected = probs - self.fraction * probs * src + moved * share
        edited = torch.where(can, redirected, probs)
        chosen = torch.zeros(probs.shape[1], dtype=torch.bool, device=probs.device)
        chosen[self.heads[ctx.layer]] = True
        out = torch.where(chosen[None, :, None, None], edited, probs)
        # keep (image share, context share, row sum) before and after the edit; result() stacks the layers:
        # [edited layers, 2 (before, after), batch, heads, 3]
        self.emit(ctx.layer, torch.stack([self._shares(probs, src, dst), self._shares(out, src, dst)]))
        return out

    @staticmethod
    def _shares(p, src, dst):
        """[batch, heads, 3]: (image share, context share, row sum) of the single row."""
        return torch.stack([(p * dst).sum(-1), (p * src).sum(-1), p.sum(-1)], dim=-1)[:, :, 0]


def make_samples(tm) -> list[ConflictSample]:
    instruction = IA_VISION_INSTRUCTION + " " + FORMAT_CONSTRAINT
    return [
        ConflictSample(id="red-circle", context="The circle is red.", instruction=instruction,
                       question="What colour is the circle in the image?", target="vision",
                       answer_vision="blue", answer_text="red", image=tm.make_image(0)),
        ConflictSample(id="three-dogs", context="There are three dogs in the picture.", instruction=instruction,
                       question="How many dogs are there in the image?", target="vision",
                       answer_vision="two", answer_text="three", image=tm.make_image(1)),
    ]


def image_context_share(trace, groups, layer: int) -> torch.Tensor:
    """[batch, heads, 2]: image and context share of the recorded last-token row at ``layer``."""
    probs = trace[f"L{layer}.attn.probs"][:, :, 0]                      # [batch, heads, keys]
    keys = probs.shape[-1]
    img = groups.mask("image", length=keys).to(probs.dtype)[:, None]   # [batch, 1, keys]
    ctxm = groups.mask("context", length=keys).to(probs.dtype)[:, None]
    return torch.stack([(probs * img).sum(-1), (probs * ctxm).sum(-1)], dim=-1)


def main() -> dict:
    torch.manual_seed(0)
    tm = tiny("llava")
    samples = make_samples(tm)
    editor = RedirectToImage(HEADS, fraction=FRACTION)
    with arbiter.attach(tm.model, tm.processor) as lens:
        batch = lens.encode(samples)
        with lens.record("attn.probs", rows="last") as before, torch.no_grad():
            logits_before = tm.model(**batch.inputs).logits[:, -1]
        # the editor is the outer `with`, so the recorder (inner) sees the probabilities as edited
        with lens.probe(editor, layers=editor.layer_list), lens.record("attn.probs", rows="last") as after, \
                torch.no_grad():
            logits_after = tm.model(**batch.inputs).logits[:, -1]
    groups = batch.groups
    first = editor.layer_list[0]
    heads = editor.heads[first]
    sb = image_context_share(before.trace, groups, first)[:, heads]    # [batch, chosen heads, 2]
    sa = image_context_share(after.trace, groups, first)[:, heads]
    row_sums = torch.stack([after.trace[f"L{layer}.attn.probs"].sum(-1) for layer in lens.all_layers])
    logit_change = (logits_after - logits_before).abs().max().item()
    print(f"moving {FRACTION:.0%} of the context mass onto the image in heads {HEADS}")
    print(f"layer {first}, heads {heads}: image share {sb[..., 0].mean():.4f} -> {sa[..., 0].mean():.4f}, "
          f"context share {sb[..., 1].mean():.4f} -> {sa[..., 1].mean():.4f}")
    print(f"largest change of a last-token logit: {logit_change:.4g}; "
          f"greedy next token {logits_before.argmax(-1).tolist()} -> {logits_after.argmax(-1).tolist()}")
    return {
        "fraction": FRACTION,
        "heads": HEADS,
        "first_layer": first,
        "image_share_before": sb[..., 0],             # [batch, chosen heads] at the first edited layer
        "image_share_after": sa[..., 0],
        "context_share_before": sb[..., 1],
        "context_share_after": sa[..., 1],
        "image_share_gain": (sa[..., 0] - sb[..., 0]).mean().item(),
        "expected_gain": (FRACTION * sb[..., 1]).mean().item(),
        "row_sum_max_error": (row_sums - 1).abs().max().item(),
        "logit_change": logit_change,
        "top_token_before": logits_before.argmax(-1).tolist(),
        "top_token_after": logits_after.argmax(-1).tolist(),
        "probe_shares": editor.result(),   # [edited layers, (before, after), batch, heads, (image, context, sum)]
    }


if __name__ == "__main__":
    print(main())
