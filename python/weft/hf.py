"""weft as a Hugging Face transformers attention backend (transformers >= 4.48).

    import weft, weft.hf
    choices = weft.load_choices("choices.json")          # `weft search --json choices.json`
    weft.hf.apply(model, choices)                         # or one pattern text for every layer
    model.generate(...)

Prefill (more than one query, at least ``min_tokens`` keys, CUDA bf16/fp16, head dim 64 or
128, no padding mask) runs through :func:`weft.torch.attention` with each layer's plan: one
pattern per query head, as the search chose. Everything else, decode steps included, runs on
transformers' SDPA path, unchanged.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

import weft
import weft.torch as wt

NAME = "weft"

__all__ = ["apply", "NAME"]


def _layer_plans(spec, model) -> dict:
    """``{layer: weft.torch.Plan}`` from search choices, a ``{layer: plan-like}`` dict, or one
    pattern for every layer."""
    cfg = model.config
    heads = cfg.num_attention_heads
    layers = cfg.num_hidden_layers
    if isinstance(spec, dict):
        return {int(layer): wt.plan(p, heads) for layer, p in spec.items()}
    if isinstance(spec, (list, tuple)) and spec and isinstance(spec[0], weft.Choice):
        return {layer: wt.Plan(p) for layer, p in weft.plans_from_choices(spec).items()}
    one = wt.plan(spec, heads)
    return {layer: one for layer in range(layers)}


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = getattr(module, "_weft_plan", None)
    min_tokens = getattr(module, "_weft_min_tokens", 0)
    usable = (
        plan is not None
        and attention_mask is None
        and query.is_cuda
        and query.dtype in (torch.bfloat16, torch.float16)
        and query.shape[-1] in (64, 128)
        and query.shape[2] > 1
        and key.shape[2] >= min_tokens
        and dropout == 0.0
        and not (torch.is_grad_enabled() and query.requires_grad)
    )
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    # transformers hands [B, H, N, D] views of [B, N, H, D] projections; weft reads row-major.
    out = wt.attention(query.contiguous(), key.contiguous(), value.contiguous(), plan, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, _attention)
    try:  # transformers >= 4.53 builds masks per implementation: SDPA's, which is None without padding
        from transformers import AttentionMaskInterface
        from transformers.masking_utils import sdpa_mask

        AttentionMaskInterface.register(NAME, sdpa_mask)
    except ImportError:
        pass


def apply(model, plans, *, min_tokens: int = 4096, layers: Optional[list] = None):
    """Switches ``model``'s attention to weft: ``plans`` is a list of :class:`weft.Choice`
    (``weft.search`` / ``weft.load_choices``), a ``{layer: pattern or per-head list or plan}``
    dict, or one pattern for every layer. Layers without a plan stay dense (SDPA), and so does
    any call below ``min_tokens`` keys. Returns the model."""
    _register()
    by_layer = _layer_plans(plans, model)
    seen = 0
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is None or not hasattr(module, "scaling"):
            continue
        if layers is not None and idx not in layers:
            continue
        module._weft_plan = by_layer.get(idx)
        module._weft_min_tokens = min_tokens
        seen += 1
    if seen == 0:
        raise ValueError(
            f"{type(model).__name__} has no attention modules with `layer_idx` and `scaling` "
            "(Llama, Qwen2, Mistral and their kin have them)"
        )
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:
        model.config._attn_implementation = NAME
    missing = sorted(set(range(model.config.num_hidden_layers)) - set(by_layer))
    if missing:
        warnings.warn(f"weft: layers {missing} have no plan and stay dense", stacklevel=2)
    return model
