"""Example 1: a custom READING probe.

A probe is a class with ``reads = {site: rows}`` and one callback per site, named after the site with dots as
underscores. Here ``InstructionGaze`` reads the attention probabilities of the last prompt token and emits, per
layer, the share of that token's attention that lands on the instruction tokens, for every head.

Run it with ``python examples/01_reading_probe.py`` (a tiny random LLaVA, CPU, a second or two).
"""

from __future__ import annotations

import torch

import arbiter
from arbiter.data import FORMAT_CONSTRAINT, IA_VISION_INSTRUCTION, ConflictSample
from arbiter.testing import tiny


class InstructionGaze(arbiter.Probe):
    """Share of the last token's attention that lands on the instruction, per layer and head."""

    # Which rows of which site we want: only the query row of the final prompt token ("last" is a token group).
    reads = {"attn.probs": "last"}

    def attn_probs(self, ctx, probs):  # probs: [batch, heads, rows, keys], here rows == 1 (the last token)
        # ctx.group(name, over="keys") is that group's mask over this call's keys: [batch, keys] (bool).
        on_instruction = ctx.group("instruction", over="keys").to(probs.dtype)[:, None, None, :]
        # Sum the probability mass on instruction keys -> [batch, heads, rows]; keep the single row -> [batch, heads].
        # emit() collects under a key (the layer); result() stacks them over sorted keys -> [layers, batch, heads].
        self.emit(ctx.layer, (probs * on_instruction).sum(-1)[..., 0])


def make_samples(tm) -> list[ConflictSample]:
    """Two conflict samples (different images and text contexts) for the tiny model ``tm``."""
    instruction = IA_VISION_INSTRUCTION + " " + FORMAT_CONSTRAINT  # the constraint becomes its own group
    return [
        ConflictSample(id="red-circle", context="The circle is red.", instruction=instruction,
                       question="What colour is the circle in the image?", target="vision",
                       answer_vision="blue", answer_text="red", image=tm.make_image(0)),
        ConflictSample(id="three-dogs", context="There are three dogs in the picture.", instruction=instruction,
                       question="How many dogs are there in the image?", target="vision",
                       answer_vision="two", answer_text="three", image=tm.make_image(1)),
    ]


def main() -> dict:
    torch.manual_seed(0)
    tm = tiny("llava")                       # random weights, real (offline) processor; deterministic in seed
    samples = make_samples(tm)
    with arbiter.attach(tm.model, tm.processor) as lens:
        batch = lens.encode(samples)         # model inputs + token groups (image, context, instruction, ...)
        with lens.probe(InstructionGaze(), layers="all") as gaze, torch.no_grad():
            tm.model(**batch.inputs)
    shares = gaze.result()                   # [layers, batch, heads]
    groups = batch.groups
    print("prompt 0:", batch.prompts[0].replace("\n", " | "))
    print("instruction tokens per sample:", groups["instruction"].sum(1).tolist(),
          "of", groups["all"].sum(1).tolist(), "real tokens")
    print("instruction gaze of the last token, [layers, batch, heads]:")
    print(shares)
    return {
        "shares": shares,                                            # [layers, batch, heads]
        "shape": tuple(shares.shape),
        "mean_per_layer": shares.mean(dim=(1, 2)).tolist(),          # averaged over samples and heads
        "instruction_tokens": groups["instruction"].sum(1).tolist(),
        "real_tokens": groups["all"].sum(1).tolist(),
        "sample_ids": [s.id for s in samples],
    }


if __name__ == "__main__":
    print(main())
