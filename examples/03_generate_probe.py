"""Example 3: a probe inside ``model.generate()``.

``generate`` runs one forward call for the prompt (the prefill, ``ctx.step == 0``) and then one per new token
(decode steps 1, 2, ...), each with a single query row whose absolute position (its index in the KV cache) is
``ctx.positions``. ``NewTokenImageGaze`` (``steps = "decode"``) logs, per decode step and layer, how much of each
new token's attention lands on the image.

A knockout limited to the decode steps (``steps="decode"``) stops generated tokens from attending to the image in
the last two layers: there their image share is exactly 0, while the prefill (and so the first generated token)
is untouched.

Run it with ``python examples/03_generate_probe.py``.
"""

from __future__ import annotations

import torch

import arbiter
from arbiter.data import FORMAT_CONSTRAINT, IA_VISION_INSTRUCTION, ConflictSample
from arbiter.testing import tiny

MAX_NEW_TOKENS = 5                  # -> 1 prefill + 4 decode forward calls
KNOCKOUT_LAYERS = [2, 3]


class NewTokenImageGaze(arbiter.Probe):
    """Per decode step: the absolute position of the new token and its attention share on the image."""

    reads = {"attn.probs": "all"}   # at a decode step "all" rows is just the new token
    steps = "decode"                # skip the prefill forward call

    def __init__(self):
        super().__init__()
        self.positions: dict[int, list[int]] = {}
        self.seen_layers: list[int] = []   # (not `self.layers`: that attribute picks the layers the probe runs on)

    def attn_probs(self, ctx, probs):                                   # [batch, heads, 1, keys]
        image = ctx.group("image", over="keys").to(probs.dtype)        # [batch, keys]
        self.positions[ctx.step] = ctx.positions.tolist()               # [prompt_len + step - 1]
        if ctx.layer not in self.seen_layers:
            self.seen_layers.append(ctx.layer)
        # several emits under one key (one per layer, in layer order) -> result() gets {step: [tensors]}
        self.emit(ctx.step, (probs * image[:, None, None, :]).sum(-1)[..., 0])   # [batch, heads]

    def result(self) -> dict:
        per_step = super().result() or {}
        steps = sorted(per_step)
        return {
            "steps": steps,
            "positions": [self.positions[s] for s in steps],
            "layers": list(self.seen_layers),
            # [steps, layers, batch, heads]
            "image_share": torch.stack([torch.stack(per_step[s]) for s in steps]) if steps else None,
        }


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


def generate(tm, lens, batch, knockout: bool):
    gaze = NewTokenImageGaze()
    with lens.probe(gaze), torch.no_grad():
        if knockout:
            # generated tokens may not attend to image tokens, in KNOCKOUT_LAYERS, during decode only
            with lens.knockout("image", "generated", layers=KNOCKOUT_LAYERS, steps="decode"):
                out = tm.model.generate(**batch.inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                        output_logits=True, return_dict_in_generate=True)
        else:
            out = tm.model.generate(**batch.inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True)
    return gaze.result(), out


def main() -> dict:
    torch.manual_seed(0)
    tm = tiny("llava")
    samples = make_samples(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        batch = lens.encode(samples)
        prompt_len = batch.inputs["input_ids"].shape[1]
        plain, out_plain = generate(tm, lens, batch, knockout=False)
        knocked, out_ko = generate(tm, lens, batch, knockout=True)
    share_plain = plain["image_share"]                     # [steps, layers, batch, heads]
    share_ko = knocked["image_share"]
    by_layer_plain = share_plain.mean(dim=(2, 3))          # [steps, layers]
    by_layer_ko = share_ko.mean(dim=(2, 3))
    new_plain = out_plain.sequences[:, prompt_len:]
    new_ko = out_ko.sequences[:, prompt_len:]
    print(f"prompt length {prompt_len}; decode steps {knocked['steps']} at positions {knocked['positions']}")
    print("image share of each new token (mean over batch and heads), rows = steps, columns = layers")
    print("  without knockout:\n", by_layer_plain)
    print(f"  with image -> generated knockout in layers {KNOCKOUT_LAYERS} during decode:\n", by_layer_ko)
    print("new tokens without / with the knockout:", new_plain.tolist(), new_ko.tolist())
    return {
        "prompt_len": prompt_len,
        "max_new_tokens": MAX_NEW_TOKENS,
        "knockout_layers": KNOCKOUT_LAYERS,
        "steps": knocked["steps"],
        "positions": knocked["positions"],
        "layers": knocked["layers"],
        "image_share": share_ko,                          # [steps, layers, batch, heads], with the knockout
        "image_share_plain": share_plain,                 # the same without it
        "image_share_by_layer": by_layer_ko.tolist(),
        "image_share_by_layer_plain": by_layer_plain.tolist(),
        "new_tokens": new_ko.tolist(),
        "new_tokens_plain": new_plain.tolist(),
        # the prefill logits (which pick the first new token) are untouched by a decode-only knockout
        "prefill_logit_change": (out_ko.logits[0] - out_plain.logits[0]).abs().max().item(),
        "last_step_logit_change": (out_ko.logits[-1] - out_plain.logits[-1]).abs().max().item(),
    }


if __name__ == "__main__":
    print(main())
