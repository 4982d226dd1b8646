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


def _save_dcp(state: dict, path) -> None:
    """A torch distributed checkpoint as our FSDP2 runs write it: {"model": ..., "optim": ...}, no process group."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)


def _old_layout(key: str) -> str:
    if key.startswith("model.visual."):
        return key[len("model."):]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    return key


def test_dcp_checkpoint_in_the_old_visual_layout_merges_exactly(base_dir, base_state, tmp_path):
    # FSDP2 state of a LogProbModel (keys under "hf."), written by a transformers < 4.52 run (visual.* layout)
    model = {"hf." + _old_layout(k): v for k, v in base_state.items()}
    assert any(k.startswith("hf.visual.") for k in model)
    _save_dcp({"model": model, "optim": {"step": torch.tensor(3.0)}}, tmp_path / "step" / "state" / "dcp")
    report = merge(tmp_path / "step" / "state" / "dcp", tmp_path / "out", base=str(base_dir))
    assert report.kind == "dcp" and report.max_abs_diff == 0.0 and report.n_tensors == len(base_state)
    from transformers import AutoModelForImageTextToText

    written = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(written[k], base_state[k]) for k in base_state)


def test_dcp_checkpoint_with_missing_or_unexpected_tensors_is_refused_with_the_keys(base_dir, base_state, tmp_path):
    model = {"hf." + k: v for k, v in base_state.items() if not k.startswith("model.visual.merger.")}
    model["hf.model.language_model.extra.weight"] = torch.zeros(3)
    _save_dcp({"model": model, "optim": {"step": torch.tensor(1.0)}}, tmp_path / "dcp")
    with pytest.raises(CheckpointError) as e:
        merge(tmp_path / "dcp", tmp_path / "out", base=str(base_dir))
    msg = str(e.value)
    assert "would stay random" in msg and "model.visual.merger.mlp.0.weight" in msg
    assert "match no model weight: hf.model.language_model.extra.weight" in msg
    assert not (tmp_path / "out").exists()


def _rewrite_adapter(src, dst, rename=lambda k: k, drop=lambda k: False):
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    sd = load_file(src / "adapter_model.safetensors")
    save_file({rename(k): v for k, v in sd.items() if not drop(k)}, dst / "adapter_model.safetensors")


def test_lora_adapter_saved_in_the_old_layout_merges_to_the_same_model(adapter_dir, tmp_path):
    from safetensors.torch import load_file

    def old(k: str) -> str:
        inner = k.removeprefix("base_model.model.")
        return "base_model.model." + _old_layout(inner)

    _rewrite_adapter(adapter_dir, tmp_path / "old", rename=old)
    assert any(".model.layers." in k for k in load_file(tmp_path / "old" / "adapter_model.safetensors"))
    new = merge(adapter_dir, tmp_path / "m-new")
    got = merge(tmp_path / "old", tmp_path / "m-old")
    assert got.max_abs_diff < 1e-5
    a, b = load_file(tmp_path / "m-new" / "model.safetensors"), load_file(tmp_path / "m-old" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert new.n_tensors == got.n_tensors


def test_lora_adapter_with_missing_weights_is_refused_with_the_keys(adapter_dir, tmp_path):
    _rewrite_adapter(adapter_dir, tmp_path / "partial", drop=lambda k: "layers.0.self_attn.q_proj.lora_B" in k)
    with pytest.raises(CheckpointError, match=r"1 LoRA weights missing .*layers\.0\.self_attn\.q_proj\.lora_B"):
        merge(tmp_path / "partial", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_logits_above_tol_fail_the_merge_and_write_nothing(base_dir, base_state, tmp_path):
    save_file(base_state, tmp_path / "full.safetensors")
    with pytest.raises(CheckpointError, match=r"merged logits differ from the source by .* \(> tol 1e-09\)"):
        merge(tmp_path / "full.safetensors", tmp_path / "out", base=str(base_dir), dtype="bfloat16", tol=1e-9)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out-*"))


def test_merge_command_prints_the_logits_max_abs_diff(base_dir, base_state, tmp_path):
    save_file(base_state, tmp_path / "full.safetensors")
    res = runner.invoke(app, ["merge", str(tmp_path / "full.safetensors"), "--out", str(tmp_path / "out"),
                              "--base", str(base_dir), "--dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "logits max abs diff" in x)
    diff = float(line.split("diff")[1].strip(" │|"))
    assert 0 < diff < 0.5  # bf16 rounding of the weights: reported, not judged (no --tol given)
