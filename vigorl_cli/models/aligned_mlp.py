"""The Qwen2.5-VL vision MLP at an aligned width: 3,420 → 3,424 intermediate features, zero-padded per forward.

Every Qwen2.5-VL size shares one vision tower whose MLP is 1,280 → 3,420 → 1,280 (SwiGLU). 3,420 is not a multiple
of 8, so in bf16 the rows of the ``[tokens, 3420]`` activations and of the ``[1280, 3420]`` down-projection weight
are not 16-byte aligned and cuBLAS cannot use Hopper's kernels (TMA / wgmma need aligned rows): it falls back to an
Ampere ``cutlass_80 ... align2`` GEMM. On an H200 (docs/performance.md, tenth session) the up/gate products of 5,184
tokens (four 504² images) took 213 µs at 3,420 against 69 µs at 3,424, the down product 246 against 74 µs — the
three products are 55% of the compiled tower's GPU time. A strided view of an aligned buffer does not help (the
reduction length itself must be aligned: 248 µs).

:func:`set_aligned_mlp` swaps each such MLP's class for a subclass whose forward pads the gate and up weights (and
biases) with zero rows and the down weight with zero columns to the next multiple of :data:`ALIGN`, with ``F.pad``
on the parameters themselves: the padded features are exactly 0 (zero weights, zero bias: ``act(0) · 0``) and meet
zero down-weight columns, so the result is the unpadded MLP's up to the kernels' rounding, and gradients flow to
the real parameters only. The pads are copies of ~26 MB per block per forward (~10 µs on an H200), no state: the
parameters, their state-dict keys and shapes, checkpoints, weight updates, FSDP sharding and LoRA targets are
untouched (FSDP2 unshards a whole block before its forward). A projection wrapped after installation (a peft LoRA
layer) or partitioned by DeepSpeed ZeRO-3 (which gathers a weight only in its own module's forward) makes the MLP
run HF's forward, unpadded; so do forward hooks on the projections (they would not run). Installed with the patch
embedding's matmul by :func:`~vigorl_cli.models.vision_attention.set_vision_attention` for every mode but ``hf``;
reversible. MLPs already aligned (Qwen2-VL's 5,120, Qwen3-VL's 4,304, the tiny models') are left alone.
"""

from __future__ import annotations

ALIGN = 16  # elements: 32 bytes in bf16, 64 in fp32

_SUPPORTED = {
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLMLP"),
}
_SUBCLASSES: dict[type, type] = {}


class _AlignedMLP:
    """Mixin: HF's gated MLP with the intermediate width zero-padded to a multiple of :data:`ALIGN`."""

    def forward(self, hidden_state):
        import torch.nn.functional as F
        from torch import nn

        lins = (self.gate_proj, self.up_proj, self.down_proj)
        # HF's forward where a projection was wrapped since (a LoRA adapter), keeps its weight partitioned until its
        # own forward gathers it (DeepSpeed ZeRO-3 marks such parameters with ds_id), or has hooks to run
        if not all(isinstance(m, nn.Linear) and not hasattr(m.weight, "ds_id") and not m._forward_hooks
                   and not m._forward_pre_hooks for m in lins):
            return super().forward(hidden_state)
        pad = (-self.gate_proj.out_features) % ALIGN

        def widened(lin):
            w = F.pad(lin.weight, (0, 0, 0, pad))
            return F.linear(hidden_state, w, None if lin.bias is None else F.pad(lin.bias, (0, pad)))

        h = self.act_fn(widened(self.gate_proj)) * widened(self.up_proj)
        return F.linear(h, F.pad(self.down_proj.weight, (0, pad)), self.down_proj.bias)


def _hf_class(mod) -> type:
    from vigorl_cli.models.vision_attention import hf_class

    return hf_class(mod, _AlignedMLP)


def aligned_mlp_modules(model) -> list:
    """The vision-tower MLPs of ``model`` whose intermediate width is not a multiple of :data:`ALIGN`."""
    from torch import nn

    found = []
    for mod in model.modules():
        cls = _hf_class(mod)
        # (a peft-wrapped projection counts by its base layer)
        lins = [getattr(getattr(mod, n, None), "base_layer", getattr(mod, n, None))
                for n in ("gate_proj", "up_proj", "down_proj")]
        if (cls.__module__, cls.__name__) in _SUPPORTED and all(isinstance(x, nn.Linear) for x in lins) \
                and lins[0].out_features % ALIGN and lins[0].out_features == lins[1].out_features \
                == lins[2].in_features:
            found.append(mod)
    return found


def _subclass(cls: type) -> type:
    from vigorl_cli.models.vision_attention import mixin_subclass

    return mixin_subclass(cls, _AlignedMLP, "Aligned", _SUBCLASSES)


def set_aligned_mlp(model, aligned: bool = True) -> int:
    """Run ``model``'s unaligned vision MLPs padded (``aligned``) or as HF's, in place; returns how many."""
    mods = aligned_mlp_modules(model)
    for mod in mods:
        base = _hf_class(mod)
        mod.__class__ = _subclass(base) if aligned else base
    return len(mods)


def mlp_aligned(model) -> bool:
    """Whether ``model``'s unaligned vision MLPs run padded."""
    return any(isinstance(m, _AlignedMLP) for m in aligned_mlp_modules(model))
