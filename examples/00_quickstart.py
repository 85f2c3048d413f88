"""Quickstart: attach to a (tiny, random) LLaVA, encode a conflict sample, record, knock out, save a trace.

Run: python examples/00_quickstart.py  (no download: the model and its processor are built offline)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import arbiter
from arbiter.data import IA_VISION_INSTRUCTION, ConflictSample
from arbiter.testing import tiny


def main() -> dict:
    torch.manual_seed(0)
    tm = tiny("llava")
    sample = ConflictSample(id="demo-0", context="The circle is red.", instruction=IA_VISION_INSTRUCTION,
                            question="What colour is the circle?", target="vision", answer_vision="blue",
                            answer_text="red", image=tm.make_image(0))
    with arbiter.attach(tm.model, tm.processor) as lens:
        batch = lens.encode([sample])
        print(batch.groups)
        with torch.no_grad(), lens.record("attn", "resid", rows="last") as rec:
            clean = tm.model(**batch.inputs).logits[:, -1]
        # share of the last token's attention on the image, per layer (mean over heads)
        image_keys = batch.groups["image"][0]
        share = [float(rec.trace[f"L{layer}.attn.probs"][0, :, 0, image_keys].sum(-1).mean())
                 for layer in lens.all_layers]
        with torch.no_grad(), lens.knockout("image", "text", layers="all"):
            severed = tm.model(**batch.inputs).logits[:, -1]
        out = Path(tempfile.mkdtemp()) / "run.safetensors"
        rec.trace.save(out)
        back = arbiter.Trace.load(out)
    return {"image_share_per_layer": [round(s, 4) for s in share],
            "knockout_logit_change": float((severed - clean).abs().max()),
            "trace_tensors": len(back), "trace_file": str(out)}


if __name__ == "__main__":
    print(main())
