"""The organism trainer's stage-A noise augmentation: it is the generator's noisy transform, and off is a no-op."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from arbiter import data
from arbiter.organisms import train
from arbiter.testing.tiny import tiny


@pytest.fixture(scope="module", params=sorted(train.SPECS))
def organism(request):
    spec = train.SPECS[request.param]
    return tiny(spec["family"], seed=0, **spec["sizes"]).processor, spec["image_size"]


def _items(size: int, noisy: bool):
    """A clean (or noisy) drawing of every shape, with its colour."""
    rng = np.random.default_rng(3)
    out = []
    for k, shape in enumerate(data.SHAPES):
        colour = data.COLOURS[k % len(data.COLOURS)]
        sample = data.ConflictSample(id=str(k), image=None, context="", instruction="", question="",
                                     target="vision", answer_vision=colour, answer_text="x")
        out.append(train.Item(sample, data._render(rng, shape, colour, size, noisy), colour, shape, noisy))
    return out


def _low_contrast(item: train.Item, size: int) -> Image.Image:
    """What ``data._render(noisy=True)`` draws before the noise: the shape in the blended fill, same geometry."""
    arr = np.asarray(item.image).astype(np.int64)
    bg = np.array(data.BACKGROUND)
    fill = np.array([int(round(b + data.NOISY_CONTRAST * (c - b))) for c, b in
                     zip(data.COLOUR_RGB[item.colour], data.BACKGROUND)])
    out = np.where((arr != bg).any(-1, keepdims=True), fill, bg)
    return Image.fromarray(out.astype(np.uint8))


def test_noise_free_augmentation_is_the_generators_low_contrast_image(organism, monkeypatch):
    processor, size = organism
    items = _items(size, noisy=False)
    cache = train.PixelCache(processor, [it.image for it in items])
    monkeypatch.setattr(train, "NOISY_SIGMA", 0.0)
    aug = train.NoisyAug(1.0, items, processor, seed=0)
    want = train.PixelCache(processor, [_low_contrast(it, size) for it in items])
    for i in range(len(items)):
        got = aug.noisy(cache.values[i])
        assert got.shape == cache.values[i].shape
        assert (got - want.values[i].float()).abs().max().item() <= 1e-2  # fp16 cache (Qwen2-VL) rounding


def _grey(v: torch.Tensor, processor) -> torch.Tensor:
    """Processor output -> grey levels, channels first: [3, pixels] (a Qwen2-VL patch row is [3, T, P, P])."""
    ip = processor.image_processor
    x = v.float().reshape(v.shape[0], 3, -1).transpose(0, 1).reshape(3, -1) if v.dim() == 2 else v.float().reshape(3, -1)
    return x * torch.tensor(ip.image_std).view(3, 1) * 255.0 + torch.tensor(ip.image_mean).view(3, 1) * 255.0


def test_augmentation_adds_fresh_noise_of_the_generators_size(organism, monkeypatch):
    processor, size = organism
    items = _items(size, noisy=False)
    cache = train.PixelCache(processor, [it.image for it in items])
    aug = train.NoisyAug(1.0, items, processor, seed=0)
    a, b = aug.noisy(cache.values[0]), aug.noisy(cache.values[0])
    assert not torch.equal(a, b)  # new noise at every draw
    if a.dim() == 2:  # Qwen2-VL patches: both temporal copies of a pixel get the same noise
        t = a.view(a.shape[0], 3, aug.temporal, -1)
        assert torch.equal(t[:, :, 0], t[:, :, 1])
    # the noise is the generator's: clip(round(v + N(0, NOISY_SIGMA))) around the noise-free value v, so the
    # spread of (noisy - v) matches a direct simulation of that formula on the same v, channel by channel
    draws = torch.stack([_grey(aug.noisy(cache.values[0]), processor) for _ in range(8)])
    monkeypatch.setattr(train, "NOISY_SIGMA", 0.0)
    v = _grey(aug.noisy(cache.values[0]), processor).round()
    rng = np.random.default_rng(0)
    sim = np.clip(np.rint(v.numpy()[None] + rng.normal(0.0, data.NOISY_SIGMA, size=tuple(draws.shape))), 0, 255)
    got = (draws - v).std(dim=(0, 2))
    want = torch.from_numpy(sim - v.numpy()[None]).float().std(dim=(0, 2))
    assert torch.allclose(got, want, rtol=0.03), (got, want)
    assert float(want.min()) > 0.6 * data.NOISY_SIGMA  # clipping near white trims it, but it is the noise


def test_augmentation_off_or_on_noisy_items_leaves_the_batch_unchanged(organism):
    processor, size = organism
    clean, noisy = _items(size, noisy=False), _items(size, noisy=True)
    for items, p in ((clean, 0.0), (noisy, 1.0)):
        cache = train.PixelCache(processor, [it.image for it in items])
        idx = list(range(len(items)))
        plain = cache.batch(idx)
        augmented = cache.batch(idx, train.NoisyAug(p, items, processor, seed=0))
        assert torch.equal(plain["pixel_values"], augmented["pixel_values"])

