"""`vigorl merge`: LoRA adapter + base → HF folder with matching logits; state dicts in either key layout; refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from vigorl_cli.cli.main import app
from vigorl_cli.errors import CheckpointError
from vigorl_cli.merge import detect_kind, map_keys, merge
from vigorl_cli.models.tiny import tiny_path

runner = CliRunner()
LM_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@pytest.fixture(scope="module")
def base_dir():
    return tiny_path("tiny-qwen2.5-vl")


@pytest.fixture(scope="module")
def base_state(base_dir):
    from transformers import AutoModelForImageTextToText

    return {k: v.clone() for k, v in AutoModelForImageTextToText.from_pretrained(base_dir).state_dict().items()}


@pytest.fixture(scope="module")
def adapter_dir(base_dir, tmp_path_factory):
    """A LoRA adapter with non-zero B matrices (a fresh adapter would merge to the base unchanged)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vigorl_cli.models.load import load_processor
    from vigorl_cli.train.checkpoint import save_processor

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=LM_TARGETS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    save_processor(load_processor(base_dir, "qwen2_5_vl"), out)
    return out


def test_lora_merge_reproduces_the_adapter_model_logits(adapter_dir, tmp_path, base_state):
    from transformers import AutoModelForImageTextToText

    res = runner.invoke(app, ["merge", str(adapter_dir), "--out", str(tmp_path / "merged"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["kind"] == "lora" and report["max_abs_diff"] < 1e-5  # fp32 merge: ~1e-6
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    sd = merged.state_dict()
    assert not any("lora" in k for k in sd)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sd[q], base_state[q])  # the adapter was folded in
    assert (tmp_path / "merged" / "chat_template.jinja").is_file()


def test_merge_refuses_a_state_dict_with_missing_vision_weights_and_writes_nothing(base_dir, base_state, tmp_path):
    sd = {k: v for k, v in base_state.items() if not k.startswith("model.visual.blocks.1.")}
    save_file(sd, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError) as e:
        merge(tmp_path / "partial.safetensors", tmp_path / "out", base=str(base_dir))
    assert "would stay random" in str(e.value) and "model.visual.blocks.1.attn.qkv.weight" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_merge_refuses_tensors_that_match_no_weight(base_dir, base_state, tmp_path):
    sd = dict(base_state)
    sd["model.visual.extra_head.weight"] = torch.zeros(2, 2)
    save_file(sd, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="match no model weight: model.visual.extra_head.weight"):
        merge(tmp_path / "extra.safetensors", tmp_path / "out", base=str(base_dir))


def test_merge_reads_the_old_visual_and_model_layers_layout(base_dir, base_state, tmp_path):
    # transformers < 4.52 wrote Qwen2.5-VL as visual.* / model.layers.* / model.embed_tokens; DDP adds module.
    old = {}
    for k, v in base_state.items():
        if k.startswith("model.visual."):
            k = k[len("model."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        old["module." + k] = v
    assert any(k.startswith("module.visual.") for k in old)
    save_file(old, tmp_path / "old.safetensors")
    report = merge(tmp_path / "old.safetensors", tmp_path / "out", base=str(base_dir))
    assert report.kind == "hf" and report.max_abs_diff == 0.0
    from transformers import AutoModelForImageTextToText

    written = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(written[k], base_state[k]) for k in base_state)


def test_key_mapping_prefers_exact_names_and_strips_wrapper_prefixes():
    target = {"model.visual.a": torch.zeros(1), "model.language_model.b": torch.zeros(1), "lm_head.weight":
              torch.zeros(1)}
    src = {"hf.visual.a": torch.ones(1), "_orig_mod.model.b": torch.ones(1), "lm_head.weight": torch.ones(1)}
    assert set(map_keys(src, target)) == set(target)


def test_detect_kind_recognises_each_source(adapter_dir, base_dir, tmp_path):
    assert detect_kind(adapter_dir) == "lora"
    assert detect_kind(base_dir) == "hf"
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "latest").write_text("state")
    assert detect_kind(tmp_path / "ds") == "deepspeed"
    with pytest.raises(CheckpointError, match="cannot tell"):
        detect_kind(tmp_path)
