"""One attention call per vision layer instead of HF's Python loop over windows and images.

HF's Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision attention packs every image (and, in Qwen2.5-VL's window layers, every
112 px window) of a batch into one sequence described by ``cu_seqlens``. With flash-attention it makes one varlen
call; with sdpa or eager it does ``lengths.tolist()`` (a host sync) and then one attention call per segment: for
8 images at 504² that is 200 calls in each of the 28 window layers of Qwen2.5-VL (gpu-baseline.md measured 256 ms
against a floor of about 18 ms). This module replaces that loop, per model, with one call per layer:

``batched`` (default, any device and dtype)
    The segments are scattered into a zero-padded ``[segments, heads, max_len, head_dim]`` batch and attended with a
    key-padding mask in **one** ``scaled_dot_product_attention`` call, then gathered back. When every segment has the
    same length (a batch of same-size images in a full-attention layer, or any Qwen2-VL batch of one image size) the
    packed tensor is a plain view and no mask is passed, which lets sdpa pick its flash kernel on a GPU. The
    scatter/gather indices and the mask are computed once per ``cu_seqlens`` tensor per vision forward (HF passes the
    same two tensors, full and windowed, to every layer), so a forward does at most two host syncs instead of one per
    layer. Why padding rather than a block-diagonal mask: a block-diagonal mask over the whole packed sequence costs
    O(total²) (for 200 windows of 64 tokens that is 200× the real work); padding wastes at most the gap to the
    longest segment (25% for a 504² image's edge windows), on an attention term that is a few percent of the
    tower's FLOPs (the qkv/proj/MLP matmuls dominate).
``varlen`` (CUDA, fp16/bf16 only; NOT tested on this project's CPU machines)
    One variable-length flash call with no padding: ``flash_attn.flash_attn_varlen_func`` when flash-attn is
    installed, else ``torch.nn.attention.varlen.varlen_attn`` (torch ≥ 2.10). Where a call cannot take it (CPU, fp32
    activations) the same layer falls back to ``batched``.
``hf``
    HF's own code, untouched (the patch embedding's Conv3d and the MLP's unaligned width too; other modes run them
    as one matmul and padded: :mod:`vigorl_cli.models.patch_embed`, :mod:`vigorl_cli.models.aligned_mlp`).

``auto`` = ``batched`` for the supported attention classes, ``hf`` when the vision tower already runs HF's flash
varlen path (``attn_implementation="flash_attention_2"``) or the model has no supported vision attention.

The math is HF's: the same qkv projection, the same rotary formula (:func:`rope_pair`, queries and keys in one pass,
bitwise HF's), the same softmax scale; only how the segments reach the attention kernel changes. Installation swaps
each attention module's class for a subclass (``deepcopy``-safe, reversible with :func:`set_vision_attention`
``(model, "hf")``); no weights or state-dict keys change.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import weakref
from dataclasses import dataclass
from typing import Any

from vigorl_cli.errors import ModelError

MODES = ("auto", "hf", "batched", "varlen")

# (modelling module, class name) of the vision attention classes whose forward this module reproduces
_SUPPORTED = {
    ("transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionAttention"),
    ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionAttention"),
    ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionAttention"),
    ("transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe", "Qwen3VLMoeVisionAttention"),
}
_SUBCLASSES: dict[type, type] = {}


@dataclass
class _Plan:
    """How one ``cu_seqlens`` maps the packed sequence onto a padded batch (all on the tokens' device)."""

    segments: int
    max_len: int
    slot: Any  # [total] long: position of each token in the flattened [segments * max_len] batch; None when dense
    key_mask: Any  # [segments, 1, 1, max_len] bool, True = real key; None when dense


_PLANS: dict[int, tuple[Any, _Plan]] = {}  # id(cu_seqlens) -> (weakref to it, plan); entries die with the tensor


def _plan(cu_seqlens, total: int, max_seqlen: int | None) -> _Plan:
    import torch

    key = id(cu_seqlens)
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is cu_seqlens:
        return hit[1]
    cu = cu_seqlens.to(torch.long)
    lengths = cu[1:] - cu[:-1]
    segments = lengths.numel()
    max_len = int(max_seqlen) if max_seqlen is not None else int(lengths.max())  # the one host sync
    if segments * max_len == total:  # all segments equally long: the packed tensor already is the batch
        plan = _Plan(segments, max_len, None, None)
    else:
        dev = cu_seqlens.device
        seg = torch.repeat_interleave(torch.arange(segments, device=dev), lengths, output_size=total)
        slot = seg * max_len + (torch.arange(total, device=dev) - cu[:-1][seg])
        key_mask = (torch.arange(max_len, device=dev)[None, :] < lengths[:, None])[:, None, None, :]
        plan = _Plan(segments, max_len, slot, key_mask)
    try:
        ref = weakref.ref(cu_seqlens, lambda _r, k=key: _PLANS.pop(k, None))
    except TypeError:  # not weak-referenceable (should not happen for tensors): just do not cache
        return plan
    _PLANS[key] = (ref, plan)
    return plan


def batched_attention(q, k, v, cu_seqlens, scale: float, dropout_p: float = 0.0, max_seqlen: int | None = None,
                      causal: bool = False, repeat_kv: bool | None = None):
    """Attention within each ``cu_seqlens`` segment of packed ``q`` ``[total, heads, dim]`` and ``k, v``
    ``[total, kv_heads, dim]`` (fewer kv heads: grouped-query attention), in one sdpa call.

    Returns ``[total, heads, dim]``. Equal to running sdpa separately on every segment (HF's loop). ``causal``: each
    segment attends causally; the padding then needs no mask (it sits after every real key of its segment). The
    language model's packed rows use this too (models/packed_attention.py). ``repeat_kv``: grouped-query keys and
    values are repeated to every query head instead of sdpa's ``enable_gqa`` (default: on CUDA, where the call is
    restricted to flash / mem-efficient attention).
    """
    import torch

    total, heads, dim = q.shape
    p = _plan(cu_seqlens, total, max_seqlen)
    s, m = p.segments, p.max_len

    def pack(x):
        h = x.shape[1]
        if p.slot is None:
            return x.reshape(s, m, h, dim).transpose(1, 2)
        buf = x.new_zeros(s * m, h, dim).index_copy(0, p.slot, x)
        return buf.view(s, m, h, dim).transpose(1, 2)

    kp, vp = pack(k), pack(v)
    gqa: dict = {}
    backends = contextlib.nullcontext()
    if q.is_cuda:  # flash (causal) or mem-efficient (masked), never cuDNN: see _fused_backends
        backends = _fused_backends()
    if kp.shape[1] != heads:
        if q.is_cuda if repeat_kv is None else repeat_kv:  # flash's own GQA support varies by torch version
            kp, vp = (x.repeat_interleave(heads // x.shape[1], dim=1) for x in (kp, vp))
        else:
            gqa = {"enable_gqa": True}
    with backends:
        out = torch.nn.functional.scaled_dot_product_attention(pack(q), kp, vp, attn_mask=None if causal else p.key_mask,
                                                               dropout_p=dropout_p, scale=scale, is_causal=causal,
                                                               **gqa)
    out = out.transpose(1, 2).reshape(s * m, heads, dim)
    return out if p.slot is None else out.index_select(0, p.slot)


def fused_attention(device: Any):
    """On CUDA, a context in which sdpa never picks cuDNN attention (see :func:`_fused_backends`); else nothing.
    For forwards whose attention shapes change call by call (prefills of a continuous batch)."""
    if getattr(device, "type", device) != "cuda":
        return contextlib.nullcontext()
    return _fused_backends()


def _fused_backends():
    """sdpa restricted to the flash and memory-efficient kernels (math as the last resort).

    The packed shapes change every batch (segments × longest segment). On an H200 with torch 2.11, sdpa picked cuDNN
    attention for them, and cuDNN builds an execution plan per new shape on the host: a profile of the 3B-shaped
    packed SFT step showed 1.2 ms of CPU per attention forward and 2.2 ms per backward (36 layers: ~125 ms per step,
    with the GPU idle ~45% of the step), while its kernels took 0.15 ms. Flash and mem-efficient attention have no
    per-shape planning."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@functools.cache
def _varlen_kernel():
    """``(name, fn)`` of the varlen flash kernel this process can use, or None. flash-attn first, then torch's.
    Looked up once per process (every vision layer of every forward asks)."""
    if importlib.util.find_spec("flash_attn") is not None:
        try:
            from flash_attn import flash_attn_varlen_func
        except (ImportError, OSError, RuntimeError):  # a wheel built for another torch / CUDA
            flash_attn_varlen_func = None
        if flash_attn_varlen_func is not None:
            return "flash_attn", flash_attn_varlen_func
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return "torch", varlen_attn


@functools.cache
def _takes_scale(fn) -> bool:
    """Whether torch's ``varlen_attn`` takes ``scale`` (older releases use the default scale only)."""
    return "scale" in inspect.signature(fn).parameters


def varlen_attention(q, k, v, cu_seqlens, scale: float, dropout_p: float = 0.0, max_seqlen: int | None = None):
    """One varlen flash call (CUDA, fp16/bf16). UNTESTED on the CPU machines this was written on."""
    import torch

    kernel = _varlen_kernel()
    if kernel is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return batched_attention(q, k, v, cu_seqlens, scale, dropout_p, max_seqlen)
    total = q.shape[0]
    max_len = _plan(cu_seqlens, total, max_seqlen).max_len  # cached: no extra host sync per layer
    cu = cu_seqlens.to(torch.int32)
    name, fn = kernel
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if name == "flash_attn":
        return fn(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p, softmax_scale=scale, causal=False)
    if dropout_p:
        return batched_attention(q, k, v, cu_seqlens, scale, dropout_p, max_seqlen)
    if _takes_scale(fn):
        return fn(q, k, v, cu, cu, max_len, max_len, scale=scale)
    if abs(scale - q.shape[-1] ** -0.5) > 1e-12:  # older torch: default scale only
        return batched_attention(q, k, v, cu_seqlens, scale, dropout_p, max_seqlen)
    return fn(q, k, v, cu, cu, max_len, max_len)


@functools.cache
def _eager_attend(kernel: str):
    """The attention function of ``kernel``, run eagerly under ``torch.compile`` (its plan cache is Python state
    keyed by tensor identity; a compiled block breaks its graph here: models/compile.py)."""
    import torch

    return torch.compiler.disable(varlen_attention if kernel == "varlen" else batched_attention)


def rope_pair(qk, cos, sin):
    """HF's ``apply_rotary_pos_emb_vision`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: one formula) on ``qk`` = ``[tokens, 2,
    heads, head_dim]``, queries and keys in one pass: the same element-wise operations in the same order and dtype
    (float32, then back), so bitwise the same result, in 7 kernels instead of 14 (a quarter of the tower's non-matmul
    GPU time in the H200 profile, docs/performance.md). Returns ``(q, k)``, views of one tensor."""
    import torch

    x = qk.transpose(0, 1)  # [2, tokens, heads, dim], copied to float32 in that (contiguous) order
    x = torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)
    cos, sin = cos[:, None].float(), sin[:, None].float()  # [tokens, 1, dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    out = ((x * cos) + (rotated * sin)).to(qk.dtype)
    return out[0], out[1]  # each contiguous: the varlen kernel takes them without a copy


class _OneCallVisionAttention:
    """Mixin: HF's vision-attention forward with the per-segment loop replaced by one call."""

    _vigorl_kernel = "batched"

    def forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
        n = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1)
        cos, sin = position_embeddings
        q, k = rope_pair(qkv[:, :2], cos, sin)
        v = qkv[:, 2]
        dropout = self.attention_dropout if self.training else 0.0
        out = self._vigorl_attend(q, k, v, cu_seqlens, self.scaling, dropout, max_seqlen)
        return self.proj(out.reshape(n, -1).contiguous())


def hf_class(mod, mixin: type | None = None) -> type:
    """``mod``'s HF class: its class, or the HF base of the ``(mixin, HF class)`` subclass it was switched to."""
    mixin = mixin or _OneCallVisionAttention
    cls = type(mod)
    return cls.__bases__[1] if issubclass(cls, mixin) else cls


def mixin_subclass(cls: type, mixin: type, prefix: str, cache: dict) -> type:
    """The subclass ``(mixin, cls)`` named ``prefix + cls.__name__``, made once per class (kept in ``cache``)."""
    sub = cache.get(cls)
    if sub is None:
        sub = cache[cls] = type(prefix + cls.__name__, (mixin, cls), {})
    return sub


def vision_attention_modules(model) -> list:
    """The supported vision attention modules of ``model`` (empty for other architectures)."""
    found = []
    for mod in model.modules():
        cls = hf_class(mod)
        if (cls.__module__, cls.__name__) in _SUPPORTED and all(
                hasattr(mod, a) for a in ("qkv", "proj", "num_heads", "scaling", "attention_dropout")):
            found.append(mod)
    return found


def _subclass(cls: type) -> type:
    return mixin_subclass(cls, _OneCallVisionAttention, "OneCall", _SUBCLASSES)


def _vision_uses_flash(mods) -> bool:
    """True when HF's own forward would already take its one-call flash varlen branch (what HF itself checks)."""
    impl = getattr(getattr(mods[0], "config", None), "_attn_implementation", None)
    return bool(impl) and "flash" in str(impl)


def resolve_vision_attention(model, mode: str = "auto") -> str:
    """The mode ``mode`` means for ``model``: ``hf``, ``batched`` or ``varlen`` (raises on impossible requests)."""
    if mode not in MODES:
        raise ModelError(f"unknown vision_attention {mode!r}", hint="choose one of " + ", ".join(MODES))
    if mode == "hf":
        return "hf"
    mods = vision_attention_modules(model)
    if not mods:
        if mode == "auto":
            return "hf"
        raise ModelError(f"vision_attention {mode} is not available for {type(model).__name__}",
                         hint="it supports the Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision towers; use auto or hf")
    if mode == "auto":
        return "hf" if _vision_uses_flash(mods) else "batched"
    if mode == "varlen":
        import torch

        if _varlen_kernel() is None or not torch.cuda.is_available():
            raise ModelError("vision_attention varlen needs a CUDA GPU and flash-attn or torch >= 2.10",
                             hint="use vision_attention: batched (any device)")
    return mode


def set_vision_attention(model, mode: str = "auto") -> str:
    """Switch ``model``'s vision attention to ``mode`` in place; returns the mode in effect. Reversible.

    Every requested mode but ``hf`` also runs the tower's other matrix products at shapes cuBLAS runs fast — the
    patch embedding as one matmul (:mod:`vigorl_cli.models.patch_embed`), Qwen2.5-VL's MLP at an aligned width
    (:mod:`vigorl_cli.models.aligned_mlp`) — ``auto`` included where it keeps HF's flash attention; ``hf`` is HF's
    vision code untouched (the benchmarks' plain-HF baseline)."""
    from vigorl_cli.models.aligned_mlp import set_aligned_mlp
    from vigorl_cli.models.patch_embed import set_patch_embed

    effective = resolve_vision_attention(model, mode)
    set_patch_embed(model, linear=mode != "hf")
    set_aligned_mlp(model, aligned=mode != "hf")
    for mod in vision_attention_modules(model):
        base = hf_class(mod)
        if effective == "hf":
            mod.__class__ = base
            mod.__dict__.pop("_vigorl_kernel", None)
            mod.__dict__.pop("_vigorl_attend", None)
        else:
            mod.__class__ = _subclass(base)
            mod._vigorl_kernel = effective
            mod._vigorl_attend = _eager_attend(effective)
    return effective


def current_vision_attention(model) -> str:
    mods = vision_attention_modules(model)
    if not mods or not isinstance(mods[0], _OneCallVisionAttention):
        return "hf"
    return mods[0]._vigorl_kernel
