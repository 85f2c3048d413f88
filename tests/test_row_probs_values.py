"""Row reads hand the model's eager attention function an empty value head dimension (probabilities need no
values): the probabilities must be bit-identical to those it returns with the real values, for every eager function
transformers ships."""

from __future__ import annotations

import importlib
import pkgutil
import types

import pytest
import torch
import transformers.models

from arbiter.attention import row_probs


def _eager_functions(names=None):
    """(module name, eager_attention_forward) of transformers' modeling files (``names``: these models only)."""
    for info in pkgutil.iter_modules(transformers.models.__path__):
        if names is not None and info.name not in names:
            continue
        pkg = f"transformers.models.{info.name}"
        spec = importlib.util.find_spec(pkg)
        for sub in pkgutil.iter_modules(spec.submodule_search_locations or []):
            if not sub.name.startswith("modeling_"):
                continue
            try:
                mod = importlib.import_module(f"{pkg}.{sub.name}")
            except Exception:  # noqa: BLE001 - optional dependencies of some models
                continue
            fn = getattr(mod, "eager_attention_forward", None)
            if fn is not None:
                yield f"{pkg}.{sub.name}", fn


def _module(n_rep: int) -> torch.nn.Module:
    m = torch.nn.Module()
    m.num_key_value_groups, m.scaling, m.head_dim, m.is_causal, m.layer_idx = n_rep, 0.25, 8, True, 0
    m.config = types.SimpleNamespace(attn_logit_softcapping=None, query_pre_attn_scalar=8)
    return m.eval()


def _compare(fn) -> bool | None:
    """True: probabilities equal bit for bit with and without values; None: the function needs a real model."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 8)
    mask = torch.zeros(2, 1, 3, 7)
    mask[..., -1] = torch.finfo(torch.float32).min
    for n_rep in (2, 1):
        k, v = torch.randn(2, 4 // n_rep, 7, 8), torch.randn(2, 4 // n_rep, 7, 8)
        module = _module(n_rep)
        try:
            full = fn(module, q, k, v, mask, scaling=0.25, dropout=0.0)
        except Exception:  # noqa: BLE001 - this function needs attributes of its own model
            continue
        if not isinstance(full, tuple) or full[1] is None:
            return None
        empty = fn(module, q, k, v.narrow(-1, 0, 0), mask, scaling=0.25, dropout=0.0)
        return torch.equal(full[1], empty[1])
    return None


def test_the_tiny_zoos_eager_functions_give_the_same_probabilities_without_values():
    found = dict(_eager_functions({"llama", "qwen2", "qwen2_vl", "gemma3", "mistral", "idefics3", "mllama"}))
    assert len(found) >= 7
    results = {name: _compare(fn) for name, fn in found.items()}
    assert all(r is True for r in results.values()), results


@pytest.mark.slow
def test_every_eager_function_transformers_ships_gives_the_same_probabilities_without_values():
    results = {name: _compare(fn) for name, fn in _eager_functions()}
    compared = {name: r for name, r in results.items() if r is not None}
    assert len(compared) >= 300, len(compared)
    assert all(compared.values()), sorted(name for name, r in compared.items() if not r)


def test_row_probs_equal_the_eager_function_with_values():
    """row_probs (empty values inside) against the module's eager function run by hand with the real values."""
    from transformers.models.llama.modeling_llama import eager_attention_forward
    torch.manual_seed(1)
    module = _module(2)
    q, k, v = torch.randn(2, 4, 2, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    allowed = torch.rand(2, 1, 2, 9) > 0.3
    allowed[..., 0] = True
    probs = row_probs(module, q, k, v, allowed, None, {"scaling": 0.25})
    additive = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    _, ref = eager_attention_forward(module, q, k, v, additive, scaling=0.25, dropout=0.0)
    assert torch.equal(probs, ref)
