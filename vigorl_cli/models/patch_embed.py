"""The Qwen-VL vision towers' patch embedding as one matrix product instead of a 3-D convolution.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL embed each flattened patch (3 channels × 2 frames × 14 × 14 pixels) with an
``nn.Conv3d`` whose stride equals its kernel over an input exactly one kernel large: the convolution has one output
position, so it *is* a matrix product of the ``[patches, C·T·P·P]`` pixels with the ``[embed_dim, C·T·P·P]``
weight (plus bias). cuDNN does not treat it as one: depending on the cuDNN build, GPU and dtype the convolution
falls back to slow algorithms (transformers#45750, vLLM#27418 — from ~10× up to orders of magnitude slower than the
GEMM; 0.745 against 0.074 ms for four 504² images on an H200, docs/performance.md).

:func:`set_patch_embed` swaps the class of each such ``Conv3d`` (the module itself, not its parent) for a
``Conv3d`` subclass whose forward is ``F.linear`` on a reshaped view of its own weight. Being the module that is
called, its hooks still run — DeepSpeed ZeRO-3 gathers the weight there — and a peft LoRA layer wrapping it calls it
as its base layer, adapter added. The parameter, its state-dict key and shape, checkpoints and gradients are the
convolution's; only the kernel changes (equal in float32, bf16 rounding otherwise). An input that is not one
kernel per sample runs the real convolution.

Installed by :func:`~vigorl_cli.models.vision_attention.set_vision_attention` for every mode but ``hf`` (which
leaves HF's vision code untouched, the plain-HF baseline of the benchmarks); reversible.
"""

from __future__ import annotations

from torch import nn

_SUPPORTED = {
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "PatchEmbed"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionPatchEmbed"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionPatchEmbed"),
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeVisionPatchEmbed"),
}


class MatmulConv3d(nn.Conv3d):
    """A Conv3d applied to inputs exactly one kernel large, computed as ``F.linear`` on its own weight."""

    def forward(self, x):
        import torch.nn.functional as F

        if tuple(x.shape[2:]) != tuple(self.kernel_size):  # not one kernel per sample: a real convolution
            return super().forward(x)
        w = self.weight
        y = F.linear(x.reshape(x.shape[0], -1), w.reshape(w.shape[0], -1), self.bias)
        return y.reshape(x.shape[0], w.shape[0], 1, 1, 1)


def _degenerate(conv) -> bool:
    """A Conv3d that is a matrix product per patch: stride = kernel, no padding, dilation or groups."""
    return (isinstance(conv, nn.Conv3d) and tuple(conv.stride) == tuple(conv.kernel_size)
            and all(p == 0 for p in conv.padding) and all(d == 1 for d in conv.dilation) and conv.groups == 1
            and conv.padding_mode == "zeros")


def _conv(mod):
    """The patch embedding's Conv3d (a peft-wrapped one by its base layer)."""
    proj = getattr(mod, "proj", None)
    return getattr(proj, "base_layer", proj)


def patch_embed_modules(model) -> list:
    """The supported patch-embedding modules of ``model`` whose Conv3d is one matmul (empty for others)."""
    return [mod for mod in model.modules()
            if (type(mod).__module__, type(mod).__name__) in _SUPPORTED and _degenerate(_conv(mod))]


def set_patch_embed(model, linear: bool = True) -> int:
    """Compute ``model``'s patch embeddings with ``F.linear`` (``linear``) or HF's ``Conv3d``, in place; returns
    how many modules it switched."""
    mods = patch_embed_modules(model)
    for mod in mods:
        _conv(mod).__class__ = MatmulConv3d if linear else nn.Conv3d
    return len(mods)


def linear_patch_embed(model) -> bool:
    """Whether ``model``'s patch embeddings run as ``F.linear``."""
    return any(type(_conv(m)) is MatmulConv3d for m in patch_embed_modules(model))
