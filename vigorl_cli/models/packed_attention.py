"""Exact per-sample causal attention for padding-free packed rows, without a T×T mask.

A packed training row concatenates several samples (``Collator(packing=True)``). With flash-attention HF turns the
per-segment text positions into varlen boundaries; with sdpa (every machine without flash-attn) it builds a
block-diagonal ``[1, 1, T, T]`` mask, and sdpa with an arbitrary mask runs a much slower kernel: on an H200, for four
samples of 1.1k–2k tokens of the Qwen2.5-VL-3B shape, 5.4 ms forward + backward per layer against 0.9 ms for the same
samples right-padded with ``is_causal`` (``docs/performance.md``). Packing then lost to padding.

This module registers one attention function, ``vigorl_sdpa``, in transformers' attention interface. Given a packed
plan (:class:`~vigorl_cli.train.batching.LogProbModel` computes it and passes it as the keyword argument
``vigorl_packed_plan`` of the backbone's forward, which transformers hands down to every attention call; a keyword
argument, not global state, so that gradient checkpointing's recompute in backward sees it too) it scatters the
packed queries, keys and values into a right-padded ``[segments, heads, longest, dim]`` batch, runs **one** causal
sdpa call, and gathers the real rows back: the vision tower's one-call segment attention
(:func:`~vigorl_cli.models.vision_attention.batched_attention`) with ``causal=True``. Right padding needs no mask
under causal attention: a real query only sees keys at or before its own position, all real. Only attention sees
padding: the projections and MLPs, most of the FLOPs, run on real tokens. Outside a plan (unpacked batches, generation) the
function is HF's own sdpa, and its mask function is HF's ``sdpa_mask``; inside :func:`packed_segments` (around the
packed forward) the mask function returns None for the packed row, so the T×T mask is never built.

Models already on flash-attention keep HF's varlen path (:func:`install_packed_attention` leaves them alone).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch

from vigorl_cli.models.vision_attention import _plan, batched_attention

IMPL = "vigorl_sdpa"
PLAN_KWARG = "vigorl_packed_plan"  # how the plan reaches the attention calls: a forward keyword argument
_local = threading.local()
_registered = False


@dataclass
class PackedPlan:
    """The segments of a packed row: ``cu_seqlens`` boundaries (on the row's device) and the longest segment."""

    total: int
    segments: int
    longest: int
    cu_seqlens: Any  # [segments + 1] long

    @property
    def slot(self):
        """``[total]``: where each token goes in the right-padded ``[segments * longest]`` layout."""
        return _plan(self.cu_seqlens, self.total, self.longest).slot


def plan_from_positions(text_positions) -> PackedPlan:
    """The plan of a packed row from its per-segment text positions ``[T]`` or ``[1, T]`` (0 starts a segment)."""
    pos = text_positions.reshape(-1)
    total = pos.numel()
    starts = torch.nonzero(pos == 0).flatten()  # one host sync per forward, not per layer
    if starts.numel() == 0 or int(starts[0]) != 0:
        raise ValueError("packed text positions must start every segment at 0")
    cu = torch.cat([starts, starts.new_tensor([total])])
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedPlan(total, len(starts), longest, cu)


class packed_segments:
    """Within this block the mask function builds no mask for a ``[1, T]`` row of ``T = len(text_positions)``;
    ``.plan`` is the plan to pass to the forward as ``vigorl_packed_plan``."""

    def __init__(self, text_positions):
        self.plan = plan_from_positions(text_positions)
        self._prev = None

    def __enter__(self) -> PackedPlan:
        self._prev = getattr(_local, "plan", None)
        _local.plan = self.plan
        return self.plan

    def __exit__(self, *exc) -> None:
        _local.plan = self._prev


def active_plan() -> PackedPlan | None:
    return getattr(_local, "plan", None)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               **kwargs):
    """HF attention-interface signature: q ``[B, Hq, T, D]``, k/v ``[B, Hkv, T, D]`` → ``([B, T, Hq, D], None)``.

    Without a plan this is HF's sdpa and stays traceable: a compiled decode step (``engine.static_cache``) keeps one
    graph. Only the packed branch is run eagerly (its plan is Python state)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plan = kwargs.pop(PLAN_KWARG, None)
    if plan is None or query.shape[0] != 1 or query.shape[2] != plan.total or key.shape[2] != plan.total:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return _packed_attention(query, key, value, plan, dropout, scaling), None


@torch.compiler.disable  # a graph break only where a plan is given
def _packed_attention(query, key, value, plan: PackedPlan, dropout: float, scaling: float | None):
    """``[1, H, T, D]`` inputs → ``[1, T, H, D]``: the vision tower's one-call segment attention, made causal."""
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    out = batched_attention(q, k, v, plan.cu_seqlens, scaling, dropout, plan.longest, causal=True)
    return out[None]


def _mask(*args, **kwargs):
    """HF's sdpa mask, except under a packed plan, where attention needs none."""
    from transformers.masking_utils import sdpa_mask

    plan = active_plan()
    if (plan is not None and not args and kwargs.get("attention_mask") is None and kwargs.get("batch_size", 1) == 1
            and kwargs.get("kv_length", plan.total) == plan.total):
        return None  # the packed row itself: _attention needs no mask
    return sdpa_mask(*args, **kwargs)


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPL, _attention)
    AttentionMaskInterface.register(IMPL, _mask)
    _registered = True


def _text_config(model):
    """The language model's config (a peft wrapper is looked through): where ``_attn_implementation`` is read."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf.config, "text_config", None) or hf.config


def install_packed_attention(model) -> bool:
    """Switch a model whose language model runs sdpa to ``vigorl_sdpa`` (same results unpacked; exact, fast packed).

    Returns whether the model now uses it. Models on flash-attention (HF's varlen path) or eager are left alone.
    Not saved with the model: ``_attn_implementation`` is not part of the serialised config."""
    text = _text_config(model)
    impl = getattr(text, "_attn_implementation", None)
    if impl == IMPL:
        return True
    if impl != "sdpa":
        return False
    _register()
    text._attn_implementation = IMPL
    return True


def uninstall_packed_attention(model) -> None:
    """Back to HF's sdpa (e.g. a copy of the policy that only generates)."""
    text = _text_config(model)
    if getattr(text, "_attn_implementation", None) == IMPL:
        text._attn_implementation = "sdpa"


def uses_packed_attention(model) -> bool:
    return getattr(_text_config(model), "_attn_implementation", None) == IMPL


__all__ = ["IMPL", "PackedPlan", "active_plan", "install_packed_attention", "packed_segments", "plan_from_positions",
           "uninstall_packed_attention", "uses_packed_attention"]
