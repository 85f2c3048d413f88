"""A large held-out evaluation of a conflict organism: MFR on fresh generator samples with Wilson intervals.

``python -m arbiter.organisms.heldout llava_tiny --n 2000 --out FILE.json`` draws fresh splits of
:func:`arbiter.data.generate_synthetic` (training paraphrases, held-out paraphrases; the organism's image size,
15% agreement and 10% noisy images as in training), runs :func:`arbiter.organisms.evaluate` with and without the
image knocked out, and adds 95% Wilson intervals to the conflict MFRs (a 400-sample split has about 170
vision-instructed conflicts: ±3 points, too wide to tell 0.94 from 0.95). For the chat organism (its shipped data's
header has ``chat``) it runs :func:`arbiter.organisms.train_chat.heldout_chat_eval` instead (word and sentence
answers in the chat format, generated answers, neutral instructions).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from arbiter.data import generate_synthetic
from arbiter.organisms import evaluate, load, load_dir


def wilson(k: float, n: int, confidence: float = 0.95) -> list[float] | None:
    """Wilson score interval of a proportion k / n (scipy's ``binomtest(...).proportion_ci``), rounded to 4
    decimals; None for n = 0. ``k`` may come as a rate times n: it is rounded to the nearest count."""
    if n <= 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(int(round(k)), n).proportion_ci(confidence_level=confidence, method="wilson")
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def with_intervals(r: dict[str, Any]) -> dict[str, Any]:
    """Add 95% Wilson intervals (``*_conflict_ci95``) to an :func:`arbiter.organisms.evaluate` result, in place."""
    for t in ("vision", "text"):
        n = r.get(f"n_{t}_conflict") or 0
        if r.get(f"{t}_conflict") is not None:
            r[f"{t}_conflict_ci95"] = wilson(r[f"{t}_conflict"] * n, n)
    for sub in ("by_paraphrase", "by_image", "by_position"):
        for v in r.get(sub, {}).values():
            with_intervals(v)
    return r



def heldout_eval(model, processor, image_size: int, n: int = 2000, seed: int = 9000,
                 p_agreement: float = 0.15, p_noisy: float = 0.1) -> dict[str, Any]:
    """MFR of a conflict organism on fresh splits (``seed`` and ``seed + 1``), with and without the image."""
    tmp = Path(tempfile.mkdtemp(prefix="arbiter_heldout_"))
    out: dict[str, Any] = {"n": n, "seed": seed, "p_agreement": p_agreement, "p_noisy": p_noisy}
    try:
        for k, split in enumerate(("train", "heldout")):
            ds = generate_synthetic(tmp / split, n, seed=seed + k, image_size=image_size, paraphrases=split,
                                    p_agreement=p_agreement, p_noisy=p_noisy)
            for ko in (False, True):
                r = evaluate(model, processor, ds, knockout=ko)
                out[f"{split}_paraphrases" + ("_knockout" if ko else "")] = with_intervals(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m arbiter.organisms.heldout", description=__doc__.split("\n")[0])
    ap.add_argument("name", help="a shipped organism, or a directory written by the training script")
    ap.add_argument("--n", type=int, default=2000, help="samples per split")
    ap.add_argument("--seed", type=int, default=9000)
    ap.add_argument("--out", help="write the result here as JSON")
    args = ap.parse_args(argv)
    model, processor, shipped = load_dir(args.name) if Path(args.name).is_dir() else load(args.name)
    if "chat" in shipped.meta:  # the chat organism: its own splits (word / sentence answers, chat template)
        from arbiter.organisms.train_chat import heldout_chat_eval, print_chat_eval

        res = heldout_chat_eval(model, processor, args.n, args.seed)
        print_chat_eval(res)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        return res
    image_size = shipped[0].load_image().size[0]
    res = heldout_eval(model, processor, image_size, args.n, args.seed)
    for split in ("train_paraphrases", "heldout_paraphrases"):
        r, ko = res[split], res[split + "_knockout"]
        print(f"{split:20s} vision {r['vision_conflict']:.3f} {r['vision_conflict_ci95']} "
              f"(n={r['n_vision_conflict']}; competitor {r['vision_competitor_conflict']:.3f})  "
              f"text {r['text_conflict']:.3f} {r['text_conflict_ci95']}  "
              f"image knocked out: vision {ko['vision_conflict']:.3f}")
        for lab, v in r.get("by_image", {}).items():
            print(f"  {lab:6s} images: vision {v['vision_conflict']} (n={v['n_vision_conflict']})")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
