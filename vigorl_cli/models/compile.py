"""Regional ``torch.compile`` of the element-wise parts of every block: norms and MLPs, compiled once, reused by all.

Eager PyTorch runs a VLM block as dozens of small kernels around the matrix products: RMSNorm alone is a cast, a
square, a mean, an rsqrt, two multiplies and a cast back; SwiGLU adds an activation and a multiply; each again in
backward. On an H200, for the Qwen2.5-VL-3B shape at B = 4 × ~1.6k tokens, element-wise kernels took about a third
of a training step's GPU time (``docs/performance.md``). Compiling fuses each norm into one kernel and the MLP's
activation into its neighbours (the matrix products stay cuBLAS calls). Compiling small modules rather than the
whole model ("regional compilation") keeps the first step's cost to one compile per module class, since the 36
identical decoder layers share the compiled code, and leaves eager what Dynamo handles badly: HF's mask and M-RoPE
index code, the attention plans of models/packed_attention.py and models/vision_attention.py (Python state keyed by
tensor identity), the chunked log-prob head.

Why not whole decoder layers: a compiled layer graph-breaks at attention, and its resumed graphs recompile on
properties of their inputs (whether a tensor is a view, whether it requires grad) that differ between the trained
language model, the frozen vision tower and gradient checkpointing's recompute. Norms and MLPs take plain tensors.

The recipe key is ``model.compile`` (SFT and GRPO trainers). Sequence lengths change between batches, so modules
are compiled with dynamic shapes from the start: one graph serves every length. Generation runs uncompiled
(:func:`eager`): a decode step's shapes differ from training's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_TEXT_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp")
_VISION_PARTS = ("norm1", "norm2", "mlp")


def _part(mod, *args, **kwargs):
    return type(mod).forward(mod, *args, **kwargs)


def _fresh_code(name: str):
    """``_part`` under a code object of its own: Dynamo keeps one cache per code object."""
    import types

    code = _part.__code__
    code = code.replace(co_name=name, co_qualname=name) if hasattr(code, "co_qualname") else code.replace(co_name=name)
    return types.FunctionType(code, _part.__globals__, name)


def _targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    hf = getattr(model, "hf", model)  # a LogProbModel
    hf = hf.get_base_model() if hasattr(hf, "get_base_model") else hf
    core = getattr(hf, "model", hf)
    out: list[tuple[nn.Module, str]] = []
    lm = getattr(core, "language_model", None)
    if lm is not None and hasattr(lm, "layers"):
        for layer in lm.layers:
            out.extend((getattr(layer, n), "text") for n in _TEXT_PARTS
                       if isinstance(getattr(layer, n, None), nn.Module))
        if isinstance(getattr(lm, "norm", None), nn.Module):
            out.append((lm.norm, "text"))
    visual = getattr(core, "visual", None)
    if visual is None and hasattr(core, "blocks"):  # a bare vision tower
        visual = core
    if visual is not None and hasattr(visual, "blocks"):
        for block in visual.blocks:
            out.extend((getattr(block, n), "vision") for n in _VISION_PARTS
                       if isinstance(getattr(block, n, None), nn.Module))
    return out


def compile_targets(model: nn.Module) -> list[nn.Module]:
    """The norms and MLPs of every language-model decoder layer and vision block, and the final norm (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL layouts; a LogProbModel or peft wrapper is looked through). Empty for other layouts."""
    return [m for m, _ in _targets(model)]


def compile_blocks(model: nn.Module, **options) -> int:
    """Compile the modules of :func:`compile_targets` in place; returns how many.

    Each module's ``forward`` becomes a compiled function of its own (role, class): separate code objects keep
    their graphs apart, since Dynamo caches graphs per code object. The same norm class serves both towers
    (Qwen2.5-VL), and a frozen tower's inputs never require grad while the trained one's do. Within a (role, class)
    the modules share one graph (their parameters are graph inputs), compiled with dynamic shapes."""
    import functools

    import torch

    options.setdefault("dynamic", True)
    fns: dict[tuple[str, type], object] = {}
    targets = _targets(model)
    for mod, role in targets:
        key = (role, type(mod))
        if key not in fns:
            fns[key] = torch.compile(_fresh_code(f"_{role}_{type(mod).__name__}"), **options)
        mod.forward = functools.partial(fns[key], mod)
    return len(targets)


def is_compiled(model: nn.Module) -> bool:
    return any("forward" in m.__dict__ for m in compile_targets(model))


@contextlib.contextmanager
def eager(model: nn.Module) -> Iterator[None]:
    """Within this block the compiled modules of ``model`` run their eager code (e.g. for generation)."""
    saved = [(m, m.__dict__.pop("forward")) for m in compile_targets(model) if "forward" in m.__dict__]
    try:
        yield
    finally:
        for m, fn in saved:
            m.forward = fn


def uncompile(model: nn.Module) -> None:
    """Undo :func:`compile_blocks`."""
    for m in compile_targets(model):
        m.__dict__.pop("forward", None)


__all__ = ["compile_blocks", "compile_targets", "eager", "is_compiled", "uncompile"]
