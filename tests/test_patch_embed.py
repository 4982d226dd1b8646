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
    assert not linear_patch_embed(model) and type(pe.proj) is torch.nn.Conv3d
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


def _tower(intermediate: int):
    """A two-block Qwen2.5-VL vision tower whose MLP is ``intermediate`` wide (3,420 in every real Qwen2.5-VL)."""
    import transformers
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vc = transformers.Qwen2_5_VLVisionConfig(depth=2, hidden_size=64, intermediate_size=intermediate, num_heads=4,
                                             out_hidden_size=32, fullatt_block_indexes=[1], window_size=112)
    torch.manual_seed(0)
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(vc, dtype=torch.float32, attn_implementation="sdpa")


def test_unaligned_vision_mlp_is_padded_with_the_same_result_and_gradients():
    from vigorl_cli.models.aligned_mlp import ALIGN, aligned_mlp_modules, mlp_aligned, set_aligned_mlp

    tower = _tower(100)  # 100 % 16 = 4: padded to 112 per forward
    mods = aligned_mlp_modules(tower)
    assert len(mods) == 2 and not mlp_aligned(tower)
    for m in mods:  # real biases everywhere, so a non-zero pad would show
        torch.nn.init.normal_(m.gate_proj.bias)
        torch.nn.init.normal_(m.up_proj.bias)
    keys = {k: v.shape for k, v in tower.state_dict().items()}
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    widths: list = []
    real_linear = torch.nn.functional.linear

    def spying(inp, w, b=None):
        widths.append(w.shape)
        return real_linear(inp, w, b)

    res = {}
    for aligned in (False, True):
        set_aligned_mlp(tower, aligned)
        x.grad = None
        tower.zero_grad()
        widths.clear()
        torch.nn.functional.linear = spying
        try:
            y = mods[0](x)
        finally:
            torch.nn.functional.linear = real_linear
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        res[aligned] = (y.detach(), x.grad.clone(),
                        {n: p.grad.clone() for n, p in mods[0].named_parameters()})
        if aligned:
            assert widths == [(112, 64), (112, 64), (64, 112)] and 112 % ALIGN == 0
    assert mlp_aligned(tower) and type(mods[0]).__name__ == "AlignedQwen2_5_VLMLP"
    (y0, gx0, gp0), (y1, gx1, gp1) = res[False], res[True]
    assert (y1 - y0).abs().max().item() < 1e-5
    assert (gx1 - gx0).abs().max().item() < 1e-5
    assert gp0.keys() == gp1.keys() and all(gp0[n].shape == gp1[n].shape for n in gp0)  # the real parameters'
    assert all((gp1[n] - gp0[n]).abs().max().item() < 1e-5 for n in gp0)
    assert {k: v.shape for k, v in tower.state_dict().items()} == keys
    # the whole tower through set_vision_attention: batched pads, hf restores HF's MLP
    px = torch.randn(64, 3 * 2 * 14 * 14)
    grid = torch.tensor([[1, 8, 8]])
    with torch.no_grad():
        set_vision_attention(tower, "batched")
        ours = tower(px, grid_thw=grid).pooler_output
        assert mlp_aligned(tower)
        set_vision_attention(tower, "hf")
        ref = tower(px, grid_thw=grid).pooler_output
    assert not mlp_aligned(tower)
    assert (ours - ref).abs().max().item() < 1e-5


def test_aligned_mlps_are_left_alone(bundles):
    from vigorl_cli.models.aligned_mlp import aligned_mlp_modules, set_aligned_mlp

    assert aligned_mlp_modules(_tower(128)) == []  # 128 is aligned, as are the tiny models' MLPs
    for name in TINY:
        assert set_aligned_mlp(bundles[name].model) == 0


def test_lora_adapters_on_the_vision_mlp_and_patch_embedding_still_apply():
    """peft wraps a targeted projection after load: the padded / matmul forwards must not bypass its adapter."""
    from peft import LoraConfig, get_peft_model

    from vigorl_cli.models.aligned_mlp import set_aligned_mlp

    tower = _tower(100)
    set_vision_attention(tower, "batched")
    targets = r".*(mlp\.(gate_proj|up_proj|down_proj)|patch_embed\.proj)"
    peft_tower = get_peft_model(tower, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets))
    px = torch.randn(64, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(2))
    grid = torch.tensor([[1, 8, 8]])
    assert type(tower.patch_embed.proj.base_layer).__name__ == "MatmulConv3d"  # the adapter's base layer
    with torch.no_grad():
        with_lora = peft_tower(px, grid_thw=grid).pooler_output
        set_vision_attention(tower, "hf")
        assert type(tower.blocks[0].mlp).__name__ == "Qwen2_5_VLMLP"  # HF's classes back, adapters and all
        assert type(tower.patch_embed.proj.base_layer) is torch.nn.Conv3d
        hf_with_lora = peft_tower(px, grid_thw=grid).pooler_output
        with peft_tower.disable_adapter():
            plain = peft_tower(px, grid_thw=grid).pooler_output
    assert (with_lora - hf_with_lora).abs().max().item() < 1e-5
    assert (with_lora - plain).abs().max().item() > 1e-3  # the adapters (random B) do change the output
    assert set_aligned_mlp(tower) == 2  # (the modules themselves are still found)


def test_matmul_conv3d_keeps_the_modules_hooks_and_real_convolutions(bundles):
    """The Conv3d itself is what runs (so DeepSpeed ZeRO-3's hooks gather its weight there); an input larger than
    one kernel still gets a real convolution."""
    from vigorl_cli.models.patch_embed import MatmulConv3d

    pe = patch_embed_modules(bundles["tiny-qwen2-vl"].model)[0]
    assert type(pe.proj) is MatmulConv3d
    seen = []
    handle = pe.proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    try:
        x = torch.randn(5, pe.proj.weight[0].numel())
        with torch.no_grad():
            pe(x)
    finally:
        handle.remove()
    assert len(seen) == 1 and tuple(seen[0][2:]) == tuple(pe.proj.kernel_size)
    big = torch.randn(2, pe.proj.in_channels, *(2 * k for k in pe.proj.kernel_size))
    with torch.no_grad():
        ours = pe.proj(big)
        ref = torch.nn.functional.conv3d(big, pe.proj.weight, pe.proj.bias, pe.proj.stride)
    assert ours.shape == ref.shape == (2, pe.proj.out_channels, 2, 2, 2)
    assert (ours - ref).abs().max().item() < 1e-5


def test_aligned_mlp_runs_hfs_forward_on_zero3_weights_or_hooked_projections(monkeypatch):
    """DeepSpeed ZeRO-3 gathers a weight in its own module's forward hook (parameters marked with ds_id), and other
    hooks on a projection expect to run: the padded forward, which reads the weights without calling the
    projections, must not run then."""
    tower = _tower(100)
    set_vision_attention(tower, "batched")
    mlp = tower.blocks[0].mlp
    widths: list = []
    real_linear = torch.nn.functional.linear

    def spying(inp, w, b=None):
        widths.append(w.shape[0])
        return real_linear(inp, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spying)
    x = torch.randn(3, 64)
    with torch.no_grad():
        padded = mlp(x)
        assert widths == [112, 112, 64]  # padded
        widths.clear()
        mlp.gate_proj.weight.ds_id = 7  # (what deepspeed.zero.Init sets on every parameter)
        zero3 = mlp(x)
        assert widths == [100, 100, 64]  # HF's forward, each projection called
        del mlp.gate_proj.weight.ds_id
        called = []
        handle = mlp.down_proj.register_forward_pre_hook(lambda mod, args: called.append(args[0].shape[-1]))
        hooked = mlp(x)
        handle.remove()
    assert called == [100]
    assert (padded - zero3).abs().max().item() < 1e-5 and (padded - hooked).abs().max().item() < 1e-5
