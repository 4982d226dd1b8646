"""One attention call per vision layer (models/vision_attention.py) computes what HF's per-window loop computes.

Every comparison runs HF's own code (``vision_attention="hf"``) and ours on the same weights and inputs, in float32.
The grids mix sizes so that Qwen2.5-VL's window layers see windows of unequal length (padding and the key mask are
exercised) and full-attention layers see images of unequal length; one entry has two frames (two segments).
"""

from __future__ import annotations

import copy

import pytest
import torch

from vigorl_cli.errors import ModelError
from vigorl_cli.models.load import load_model, mm_token_type_ids, shared_image_features, vision_precompute
from vigorl_cli.models.vision_attention import (
    batched_attention,
    current_vision_attention,
    set_vision_attention,
    vision_attention_modules,
)

TINY = ["tiny-qwen2.5-vl", "tiny-qwen2-vl", "tiny-qwen3-vl"]
# (t, h, w) in patches. Qwen2.5-VL windows are 4×4 merged units (112 px / 14 px / merge 2), so per frame:
# 20×12 → 10×6 merged → 3×2 = 6 windows; 8×8 → 4×4 → 1; 36×36 (a 504² image) → 18×18 → 5×5 = 25;
# 12×16 → 6×8 → 2×2 = 4, two frames → 8. Total 40 windows; full-attention segments: 1 + 1 + 1 + 2 = 5.
GRIDS = [[1, 20, 12], [1, 8, 8], [1, 36, 36], [2, 12, 16]]


@pytest.fixture(scope="module")
def bundles():
    return {name: load_model(name, dtype="float32", device="cpu", attn_implementation="sdpa") for name in TINY}


def _pixels(model, grids, seed=0):
    vc = model.config.vision_config
    n = sum(t * h * w for t, h, w in grids)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3 * vc.temporal_patch_size * vc.patch_size ** 2, generator=g), torch.tensor(grids)


def _vision_outputs(model, mode, px, grid):
    set_vision_attention(model, mode)
    with torch.no_grad():
        out = model.model.visual(px, grid_thw=grid)
    tensors = [out.last_hidden_state, out.pooler_output]
    tensors += list(getattr(out, "deepstack_features", None) or [])
    return tensors


@pytest.mark.parametrize("name", TINY)
def test_vision_tower_equals_hf_for_images_of_different_sizes(bundles, name):
    model = bundles[name].model
    assert current_vision_attention(model) == "batched"  # load_model's default (auto)
    for seed in (0, 1):  # fresh random inputs each time
        px, grid = _pixels(model, GRIDS, seed)
        ref = _vision_outputs(model, "hf", px, grid)
        ours = _vision_outputs(model, "batched", px, grid)
        assert len(ours) == len(ref) >= 2
        for a, b in zip(ours, ref):
            assert a.shape == b.shape and torch.isfinite(a).all()
            assert (a - b).abs().max().item() < 1e-5
    if name == "tiny-qwen3-vl":
        assert len(ref) == 3  # deepstack features were compared too


@pytest.mark.parametrize("name,keys", [("tiny-qwen2.5-vl", 6), ("tiny-qwen2-vl", 3), ("tiny-qwen3-vl", 0)])
def test_precomputed_tower_tables_give_the_towers_own_outputs_without_host_reads(bundles, monkeypatch, name, keys):
    """vision_precompute: the index tables computed on the host from a CPU grid, passed to the tower, give exactly
    the tower's outputs (HF's attention and ours); the longest segments are right by hand; with them our tower reads
    nothing back to the host (on a GPU each read would wait for the work queued before it). Towers transformers
    has no helpers for get none."""
    model = bundles[name].model
    visual = model.model.visual
    px, grid = _pixels(model, GRIDS)
    pre = vision_precompute(visual, grid)
    assert len(pre) == keys
    if not keys:
        return
    assert pre["max_seqlen"] == 36 * 36  # the 504² image is the longest full-attention segment
    if "max_window_seqlen" in pre:
        assert pre["max_window_seqlen"] == 8 * 8  # a whole window: 4×4 merged units of 2×2 patches
    for mode in ("hf", "batched"):
        set_vision_attention(model, mode)
        with torch.no_grad():
            ref = visual(px, grid_thw=grid)
            got = visual(px, grid_thw=grid, **pre)
        assert torch.equal(got.pooler_output, ref.pooler_output)
        assert torch.equal(got.last_hidden_state, ref.last_hidden_state)

    def forbidden(*a, **k):
        raise AssertionError("host read inside the vision tower")

    for attr in ("tolist", "item", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    with torch.no_grad():
        visual(px, grid_thw=grid, **pre)  # batched attention (left set above)
    monkeypatch.undo()
    from vigorl_cli.models import load

    sent = []
    monkeypatch.setattr(load, "vision_precompute", lambda v, g: sent.append(g.device.type) or vision_precompute(v, g))
    with torch.no_grad(), shared_image_features(model, grid, list(range(len(GRIDS)))):  # the context sends them
        shared = torch.cat(model.model.get_image_features(px, grid).pooler_output)
    assert sent == ["cpu"] and torch.equal(shared, ref.pooler_output)


def _count_sdpa(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@pytest.mark.parametrize("name,hf_calls", [("tiny-qwen2.5-vl", 40 + 5), ("tiny-qwen2-vl", 5 + 5),
                                           ("tiny-qwen3-vl", 5 + 5)])
def test_one_attention_call_per_layer_instead_of_one_per_window(bundles, monkeypatch, name, hf_calls):
    model = bundles[name].model
    px, grid = _pixels(model, GRIDS)
    calls = _count_sdpa(monkeypatch)
    _vision_outputs(model, "hf", px, grid)
    assert len(calls) == hf_calls  # HF: one call per window (window layer) / per frame (full layer), 2 layers
    calls.clear()
    _vision_outputs(model, "batched", px, grid)
    assert len(calls) == 2  # ours: one per layer
    if name == "tiny-qwen2.5-vl":
        # window layer: 40 windows padded to the longest (4×4 merged units × 4 patches = 64 tokens); full layer:
        # 5 segments padded to the 504² image's 1296 patches
        assert [tuple(c) for c in calls] == [(40, 2, 64, 32), (5, 2, 1296, 32)]


def test_the_packing_plan_is_computed_once_per_forward_and_shared_by_layers(monkeypatch):
    """A 6-layer Qwen2.5-VL tower (full attention in layers 2 and 5): 6 attention calls, 2 plans (window, full)."""
    import transformers

    from vigorl_cli.models import vision_attention as va
    from vigorl_cli.models.tiny import build_tokenizer, make_config

    cfg = make_config("qwen2_5_vl", build_tokenizer(), vision_depth=6)
    cfg.vision_config.fullatt_block_indexes = [2, 5]
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    px, grid = _pixels(model, GRIDS)
    ref = _vision_outputs(model, "hf", px, grid)
    plans = []
    real_plan = va._Plan

    def counting_plan(*a):
        plans.append(a[:2])
        return real_plan(*a)

    monkeypatch.setattr(va, "_Plan", counting_plan)
    calls = _count_sdpa(monkeypatch)
    ours = _vision_outputs(model, "batched", px, grid)
    assert len(calls) == 6
    assert sorted(plans) == [(5, 1296), (40, 64)]  # (segments, longest) for the full and the window layers
    for a, b in zip(ours, ref):
        assert (a - b).abs().max().item() < 1e-5


def test_equal_length_segments_need_no_padding_or_mask(monkeypatch):
    """Same-size images in a full-attention layer: the packed tensor is reshaped, no mask is passed."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3 * 7, 2, 8, generator=g) for _ in range(3))
    cu = torch.tensor([0, 7, 14, 21], dtype=torch.int32)
    masks = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: masks.append(kw.get("attn_mask")) or real(*a, **kw))
    out = batched_attention(q, k, v, cu, scale=8 ** -0.5)
    assert masks == [None]
    for i in range(3):  # hand-rolled reference: softmax(q kᵀ/√d) v within each segment
        s = slice(7 * i, 7 * i + 7)
        w = torch.softmax(torch.einsum("qhd,khd->hqk", q[s], k[s]) * 8 ** -0.5, dim=-1)
        assert torch.allclose(out[s], torch.einsum("hqk,khd->qhd", w, v[s]), atol=1e-6)


def test_unequal_segments_are_attended_separately():
    """Lengths 1, 4, 2: each token attends only within its segment; a length-1 segment returns its own value."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(7, 3, 4, generator=g) for _ in range(3))
    cu = torch.tensor([0, 1, 5, 7], dtype=torch.int32)
    out = batched_attention(q, k, v, cu, scale=0.5)
    assert torch.allclose(out[0], v[0], atol=1e-6)
    for a, b in ((1, 5), (5, 7)):
        w = torch.softmax(torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * 0.5, dim=-1)
        assert torch.allclose(out[a:b], torch.einsum("hqk,khd->qhd", w, v[a:b]), atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_segments_equal_hand_rolled_attention_with_and_without_repeated_kv(causal):
    """Grouped-query (6 query heads over 2 kv heads), segments 3, 5, 1: sdpa's enable_gqa (CPU default) and repeated
    kv heads (the CUDA default) give the hand-rolled per-segment attention, causal or not; gradients equal too."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(9, 6, 4, generator=g, requires_grad=True)
    k, v = (torch.randn(9, 2, 4, generator=g, requires_grad=True) for _ in range(2))
    cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32)
    outs, grads = [], []
    for repeat in (False, True):
        out = batched_attention(q, k, v, cu, scale=0.5, causal=causal, repeat_kv=repeat)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in ((0, 3), (3, 8), (8, 9)):
        kk, vv = (x[a:b].repeat_interleave(3, dim=1) for x in (k, v))  # query head h reads kv head h // 3
        s = torch.einsum("qhd,khd->hqk", q[a:b], kk) * 0.5
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        want = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vv)
        for out in outs:
            assert torch.allclose(out[a:b], want, atol=1e-6)
    for x, y in zip(*grads):
        assert torch.allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("name", TINY)
def test_full_model_logits_equal_hf(bundles, name):
    from PIL import Image

    b = bundles[name]
    model, proc = b.model, b.processor
    imgs = [Image.effect_noise((112, 84), 60).convert("RGB"), Image.effect_noise((56, 140), 40).convert("RGB")]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Where?"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    batch = dict(proc(text=[text], images=imgs, return_tensors="pt"))
    batch.setdefault("mm_token_type_ids", mm_token_type_ids(batch["input_ids"], model.config))
    logits = {}
    for mode in ("hf", "batched"):
        set_vision_attention(model, mode)
        with torch.no_grad():
            logits[mode] = model(**batch).logits
    set_vision_attention(model, "auto")
    assert torch.isfinite(logits["hf"]).all()
    assert (logits["hf"] - logits["batched"]).abs().max().item() < 1e-5


def _train_grads(model, batch, mode, freeze_vision):
    set_vision_attention(model, mode)
    model.train()
    model.zero_grad(set_to_none=True)
    for p in model.model.visual.parameters():
        p.requires_grad_(not freeze_vision)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    return out.loss.item(), grads


@pytest.mark.parametrize("freeze_vision", [True, False])
def test_training_backward_matches_hf(freeze_vision):
    from PIL import Image

    b = load_model("tiny-qwen2.5-vl", dtype="float32", device="cpu")
    model, proc = b.model, b.processor
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    imgs = [Image.effect_noise((112, 112), 50).convert("RGB"), Image.effect_noise((56, 84), 30).convert("RGB")]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which?"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    batch = dict(proc(text=[text], images=imgs, return_tensors="pt"))
    batch.setdefault("mm_token_type_ids", mm_token_type_ids(batch["input_ids"], model.config))
    loss_hf, g_hf = _train_grads(model, batch, "hf", freeze_vision)
    loss_ours, g_ours = _train_grads(model, batch, "batched", freeze_vision)
    assert abs(loss_hf - loss_ours) < 1e-6
    assert g_hf.keys() == g_ours.keys()
    has_vision = any(n.startswith("model.visual.") for n in g_ours)
    assert has_vision is (not freeze_vision)
    assert any(n.startswith("model.language_model.") for n in g_ours)
    for n in g_hf:
        assert (g_hf[n] - g_ours[n]).abs().max().item() < 1e-5, n


def test_modes_switch_back_and_survive_deepcopy(bundles):
    model = bundles["tiny-qwen2.5-vl"].model
    mods = vision_attention_modules(model)
    hf_cls = type(mods[0]) if current_vision_attention(model) == "hf" else type(mods[0]).__bases__[1]
    assert hf_cls.__name__ == "Qwen2_5_VLVisionAttention" and len(mods) == 2
    assert set_vision_attention(model, "hf") == "hf" and type(mods[0]) is hf_cls
    assert set_vision_attention(model, "batched") == "batched" and isinstance(mods[0], hf_cls)
    twin = copy.deepcopy(model)
    assert current_vision_attention(twin) == "batched"
    assert model.state_dict().keys() == twin.state_dict().keys()  # no new weights or buffers
    with pytest.raises(ModelError, match="unknown vision_attention"):
        set_vision_attention(model, "fast")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA"):
            set_vision_attention(model, "varlen")
    set_vision_attention(model, "auto")


def test_auto_leaves_unsupported_models_and_flash_towers_alone(bundles):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    lm = transformers.LlamaForCausalLM(cfg)
    assert set_vision_attention(lm, "auto") == "hf"
    with pytest.raises(ModelError, match="not available"):
        set_vision_attention(lm, "batched")
    model = bundles["tiny-qwen2-vl"].model
    vcfg = vision_attention_modules(model)[0].config
    saved = vcfg._attn_implementation
    try:
        vcfg._attn_implementation = "flash_attention_2"  # HF's own one-call varlen branch: nothing to replace
        assert set_vision_attention(model, "auto") == "hf"
    finally:
        vcfg._attn_implementation = saved
        set_vision_attention(model, "auto")


def test_load_model_and_recipe_take_the_option():
    from vigorl_cli.recipe import load_recipe

    assert load_recipe(None, ["model.vision_attention=hf"]).model.vision_attention == "hf"
    b = load_model("tiny-qwen2.5-vl", dtype="float32", device="cpu", vision_attention="hf")
    assert current_vision_attention(b.model) == "hf"
    with pytest.raises(ModelError, match="unknown vision_attention"):
        load_model("tiny-qwen2.5-vl", device="cpu", vision_attention="loop")


@pytest.mark.slow
def test_vision_encoder_benchmark_smoke(tmp_path):
    """benchmarks/vision_encoder.py --tiny: both modes run on the same tower and agree; HF makes 2 × 25 window calls
    plus 2 full-image calls for two 504² images, ours one per layer."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "ve.json"
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "vision_encoder.py"), "--tiny", "--reps", "1",
                          "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=root, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())["results"]
    assert r["hf"]["sdpa_calls_per_forward"] == 52 and r["batched"]["sdpa_calls_per_forward"] == 2
    assert r["batched"]["max_abs_diff_vs_hf"] < 1e-5 and r["batched"]["finite"]
    assert "mode" in res.stdout and "batched" in res.stdout


@pytest.mark.parametrize("module", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_pair_is_bitwise_hfs_rotary(module, dtype):
    """Queries and keys rotated in one pass give exactly what each family's apply_rotary_pos_emb_vision gives."""
    import importlib

    from vigorl_cli.models.vision_attention import rope_pair

    hf_rope = importlib.import_module(f"transformers.models.{module}.modeling_{module}").apply_rotary_pos_emb_vision
    g = torch.Generator().manual_seed(3)
    n, heads, d = 37, 4, 16
    qkv = torch.randn(n, 3, heads, d, generator=g).to(dtype)  # as the qkv projection's output is laid out
    emb = torch.randn(n, d, generator=g)  # HF passes float32 cos / sin of [tokens, head_dim]
    cos, sin = emb.cos(), emb.sin()
    q_ref, k_ref = hf_rope(qkv[:, 0], qkv[:, 1], cos, sin)
    q, k = rope_pair(qkv[:, :2], cos, sin)
    assert q.dtype == k.dtype == dtype and q.shape == k.shape == (n, heads, d)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
    assert q.is_contiguous() and k.is_contiguous()  # (the varlen kernel then takes them without a copy)
