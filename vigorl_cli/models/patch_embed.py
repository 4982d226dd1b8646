"""The Qwen-VL vision towers' patch embedding as one matrix product instead of a 3-D convolution.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL embed each flattened patch (3 channels × 2 frames × 14 × 14 pixels) with an
``nn.Conv3d`` whose stride equals its kernel over an input exactly one kernel large: the convolution has one output
position, so it *is* a matrix product of the ``[patches, C·T·P·P]`` pixels with the ``[embed_dim, C·T·P·P]``
weight (plus bias). cuDNN does not treat it as one: depending on the cuDNN build, GPU and dtype the convolution
falls back to slow algorithms (transformers#45750, vLLM#27418 — from ~10× up to orders of magnitude slower than the
GEMM on some GPUs in bf16). :func:`set_patch_embed` swaps each such module's class for a subclass whose forward is
``F.linear`` on a reshaped *view* of the same weight: the parameter, its state-dict key and shape, checkpoints,
hooks and gradients are the convolution's; only the kernel changes (equal in float32, bf16 rounding otherwise). A
``proj`` wrapped after installation (a peft LoRA layer) runs its own forward.

Installed by :func:`~vigorl_cli.models.vision_attention.set_vision_attention` for every mode but ``hf`` (which
leaves HF's vision code untouched, the plain-HF baseline of the benchmarks); reversible.
"""

from __future__ import annotations

_SUPPORTED = {
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "PatchEmbed"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VisionPatchEmbed"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionPatchEmbed"),
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeVisionPatchEmbed"),
}
_SUBCLASSES: dict[type, type] = {}


class _LinearPatchEmbed:
    """Mixin: the patch embedding's convolution computed as ``F.linear`` on the same (viewed) weight."""

    def forward(self, hidden_states):
        import torch.nn.functional as F
        from torch import nn

        if not isinstance(self.proj, nn.Conv3d):
            return super().forward(hidden_states)  # wrapped since (a LoRA adapter): its own forward
        w = self.proj.weight  # [embed_dim, C, T, P, P]
        x = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
        return F.linear(x, w.reshape(w.shape[0], -1), self.proj.bias)


def _hf_class(mod) -> type:
    cls = type(mod)
    return cls.__bases__[1] if issubclass(cls, _LinearPatchEmbed) else cls


def _degenerate(conv) -> bool:
    """A Conv3d that is a matrix product per patch: stride = kernel, no padding, dilation or groups."""
    from torch import nn

    return (isinstance(conv, nn.Conv3d) and tuple(conv.stride) == tuple(conv.kernel_size)
            and all(p == 0 for p in conv.padding) and all(d == 1 for d in conv.dilation) and conv.groups == 1
            and conv.padding_mode == "zeros")


def patch_embed_modules(model) -> list:
    """The supported patch-embedding modules of ``model`` (empty for other architectures)."""
    found = []
    for mod in model.modules():
        cls = _hf_class(mod)
        proj = getattr(mod, "proj", None)
        if (cls.__module__, cls.__name__) in _SUPPORTED and _degenerate(getattr(proj, "base_layer", proj)):
            found.append(mod)
    return found


def _subclass(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = _SUBCLASSES[cls] = type("Linear" + cls.__name__, (_LinearPatchEmbed, cls), {})
    return sub


def set_patch_embed(model, linear: bool = True) -> int:
    """Compute ``model``'s patch embeddings with ``F.linear`` (``linear``) or HF's ``Conv3d``, in place; returns
    how many modules it switched."""
    mods = patch_embed_modules(model)
    for mod in mods:
        base = _hf_class(mod)
        mod.__class__ = _subclass(base) if linear else base
    return len(mods)


def linear_patch_embed(model) -> bool:
    """Whether ``model``'s patch embeddings run as ``F.linear``."""
    return any(isinstance(m, _LinearPatchEmbed) for m in patch_embed_modules(model))
