"""Shared fixtures: tiny random models of every family (cached per session), deterministic seeds."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # tiny models: one thread is faster and steadier on a shared 2-core machine

from helpers import FAMILIES, MULTIMODAL, _tiny


@pytest.fixture(params=FAMILIES)
def tm(request):
    return _tiny(request.param)


@pytest.fixture(params=MULTIMODAL)
def mm(request):
    return _tiny(request.param)
