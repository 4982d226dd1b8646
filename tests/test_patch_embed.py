"""The patch embedding as one matmul (models/patch_embed.py) computes what HF's Conv3d computes, on the same weight."""

from __future__ import annotations

import copy

import pytest
import torch

from vigorl_cli.models.load import load_model
from vigorl_cli.models.patch_embed import linear_patch_embed, patch_embed_modules, set_patch_embed
from vigorl_cli.models.vision_attention import set_vision_attention

TINY = ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-qwen3-vl"]


@pytest.fixture(scope="module")
def bundles():
    return {name: load_model(name, dtype="float32", device="cpu", attn_implementation="sdpa") for name in TINY}


def _count_conv3d(monkeypatch) -> list:
    calls: list = []
    real = torch.nn.functional.conv3d

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "conv3d", counting)
    return calls


@pytest.mark.parametrize("name", TINY)
def test_linear_equals_conv3d_outputs_and_gradients(bundles, name, monkeypatch):
    model = bundles[name].model
    mods = patch_embed_modules(model)
    assert len(mods) == 1 and linear_patch_embed(model)  # load_model's default vision_attention (auto) installs it
    pe = mods[0]
    w = pe.proj.weight
    n_in = w[0].numel()
    x = torch.randn(37, n_in, generator=torch.Generator().manual_seed(0))
    calls = _count_conv3d(monkeypatch)
    out = {}
    grads = {}
    for linear in (False, True):
        assert set_patch_embed(model, linear) == 1
        w.grad = None
        y = pe(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        out[linear], grads[linear] = y.detach(), w.grad.clone()
        if pe.proj.bias is not None:
            grads[linear, "b"] = pe.proj.bias.grad.clone()
            pe.proj.bias.grad = None
    w.grad = None
    assert len(calls) == 1  # the Conv3d ran once (linear=False), the linear forward never called it
    assert out[True].shape == (37, pe.proj.out_channels)
    assert (out[True] - out[False]).abs().max().item() < 1e-5
    assert (grads[True] - grads[False]).abs().max().item() < 1e-5
    if pe.proj.bias is not None:  # Qwen3-VL's has a bias
        assert name == "tiny-qwen3-vl"
        assert (grads[True, "b"] - grads[False, "b"]).abs().max().item() < 1e-5
    # by hand: row 0 is the flattened patch dotted with each output channel's flattened kernel
    by_hand = w.detach().reshape(w.shape[0], -1) @ x[0]
    if pe.proj.bias is not None:
        by_hand = by_hand + pe.proj.bias.detach()
    assert torch.allclose(out[True][0], by_hand, atol=1e-5)


def test_hf_mode_restores_conv3d_and_weights_are_unchanged(bundles, monkeypatch):
    model = bundles["tiny-qwen2.5-vl"].model
    keys = {k: v.shape for k, v in model.state_dict().items()}
    pe = patch_embed_modules(model)[0]
    set_vision_attention(model, "hf")
    assert not linear_patch_embed(model) and type(pe).__name__ == "Qwen2_5_VisionPatchEmbed"
    calls = _count_conv3d(monkeypatch)
    set_vision_attention(model, "batched")
    twin = copy.deepcopy(model)
    assert linear_patch_embed(model) and linear_patch_embed(twin)
    assert {k: v.shape for k, v in twin.state_dict().items()} == keys  # same keys, same (5-D) weight shape
    grid = torch.tensor([[1, 8, 8]])
    px = torch.randn(64, pe.proj.weight[0].numel())
    with torch.no_grad():
        ours = model.model.visual(px, grid_thw=grid).pooler_output
        set_vision_attention(model, "hf")
        ref = model.model.visual(px, grid_thw=grid).pooler_output
    assert len(calls) == 1  # only HF's forward ran the convolution
    assert (ours - ref).abs().max().item() < 1e-5
    set_vision_attention(model, "auto")


def test_only_degenerate_convolutions_are_replaced(bundles):
    model = copy.deepcopy(bundles["tiny-qwen2-vl"].model)
    pe = patch_embed_modules(model)[0]
    set_patch_embed(model, False)
    pe.proj.stride = (1, 1, 1)  # a sliding convolution is not one matmul per patch
    assert patch_embed_modules(model) == [] and set_patch_embed(model, True) == 0
    assert not linear_patch_embed(model)
