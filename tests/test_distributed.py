"""FSDP2 and DeepSpeed ZeRO-3 on 2 CPU ranks (torchrun, gloo): same losses as one process, checkpoints that reload
with from_pretrained and generate, exact resume from a distributed checkpoint, and `vigorl merge` of each kind.

The data mixes image and text-only samples so that some step gives one rank a micro-batch without an image: under
FSDP2 / ZeRO-3 that rank still has to run the vision tower (fake-image segment, environment.md §4).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vigorl_cli.recipe import load_recipe
from vigorl_cli.train.metrics import read_jsonl_lines
from vigorl_cli.train.sft import step_indices, train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DEMO_SFT = "spatial_reasoning/MCTS_72b_reasoning_chains_train.json"
SEED = 42


@pytest.fixture(scope="module")
def mixed_data(demo_root, tmp_path_factory):
    """4 image samples and 4 text-only ones, arranged so that step 0 pairs an image sample with a text-only one."""
    records = json.loads((demo_root / DEMO_SFT).read_text())[:4]
    for r in records:
        r["images"] = [str(demo_root / p) for p in r["images"]]
    text_only = [{"id": f"t{i}", "messages": [{"role": "user", "content": f"Count to {i + 2}."},
                                              {"role": "assistant", "content": " ".join(map(str, range(1, i + 3)))}],
                  "images": []} for i in range(4)]
    first = step_indices(8, 0, 2, SEED)  # the two samples of step 0: rank 0 gets first[0], rank 1 first[1]
    order: list = [None] * 8
    order[first[0]], order[first[1]] = records[0], text_only[0]
    rest = iter(records[1:] + text_only[1:])
    order = [o if o is not None else next(rest) for o in order]
    path = tmp_path_factory.mktemp("mixed") / "mixed.json"
    path.write_text(json.dumps(order))
    return path


def _overrides(demo_root, **sft) -> list[str]:
    base = {"max_steps": 4, "save_every": 2, "keep_last": 3, "gradient_checkpointing": False, "grad_accum": 1}
    base.update(sft)
    return [f"data.root={demo_root}", "data.max_samples=null", f"seed={SEED}",
            *(f"sft.{k}={v}" for k, v in base.items())]


@pytest.fixture(scope="module")
def single_process(demo_root, mixed_data, tmp_path_factory):
    """The reference: one process, both samples of a step in one micro-batch."""
    r = load_recipe(ROOT / "recipes" / "demo.yaml", _overrides(demo_root, micro_batch_size=2))
    return train(r, data=[mixed_data], out=tmp_path_factory.mktemp("single") / "run", log=lambda *_: None)


def _torchrun(demo_root, data, out, **sft) -> subprocess.CompletedProcess:
    args = ["sft", "--recipe", str(ROOT / "recipes" / "demo.yaml"), "--data", str(data), "--out", str(out), "--json"]
    for o in _overrides(demo_root, micro_batch_size=1, **sft):
        args += ["--set", o]
    env = dict(os.environ, VIGORL_QUIET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vigorl_cli", *args]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=420)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl_lines(run / "metrics.jsonl") if "loss" in r]


def _reloads_and_generates(model_dir: Path, demo_root: Path) -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from vigorl_cli.models.load import load_processor, mm_token_type_ids

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    proc = load_processor(model_dir, "qwen2_5_vl")
    rec = json.loads((demo_root / DEMO_SFT).read_text())[0]
    img = Image.open(demo_root / rec["images"][0]).convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which is closer?"}]}]
    inputs = proc(text=[proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)], images=[img],
                  return_tensors="pt")
    inputs["mm_token_type_ids"] = mm_token_type_ids(inputs["input_ids"], model.config)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def _same_weights(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def test_fsdp2_two_ranks_match_one_process_reload_resume_and_merge(demo_root, mixed_data, single_process, tmp_path):
    from vigorl_cli.merge import merge

    out = tmp_path / "fsdp2"
    _torchrun(demo_root, mixed_data, out, parallel="fsdp2", packing=True)
    # rank 1's first micro-batch is text-only: it ran a fake-image segment, which adds nothing to the loss
    assert _losses(out) == pytest.approx(single_process["losses"], rel=1e-5)
    _reloads_and_generates(out / "model", demo_root)

    # the distributed (DCP) training state converts to the same HF weights
    report = merge(out / "checkpoints" / "step-000004" / "state" / "dcp", tmp_path / "merged")
    assert report.kind == "dcp" and report.max_abs_diff < 1e-5
    assert _same_weights(tmp_path / "merged", out / "model") == 0.0

    # resume from the step-2 distributed checkpoint reproduces steps 3 and 4
    shutil.rmtree(out / "checkpoints" / "step-000004")
    (out / "summary.json").unlink()
    _torchrun(demo_root, mixed_data, out, parallel="fsdp2", packing=True)
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 2
    assert _losses(out) == pytest.approx(single_process["losses"], rel=1e-5)


def test_deepspeed_zero3_two_ranks_match_one_process_reload_and_merge(demo_root, mixed_data, single_process,
                                                                      tmp_path):
    pytest.importorskip("deepspeed")
    from vigorl_cli.merge import merge

    out = tmp_path / "zero3"
    _torchrun(demo_root, mixed_data, out, parallel="deepspeed", deepspeed_config="zero3", packing=False, save_every=4)
    assert _losses(out) == pytest.approx(single_process["losses"], rel=1e-5)
    _reloads_and_generates(out / "model", demo_root)
    report = merge(out / "checkpoints" / "step-000004" / "state" / "deepspeed", tmp_path / "merged")
    assert report.kind == "deepspeed" and report.max_abs_diff < 1e-5
    assert _same_weights(tmp_path / "merged", out / "model") < 1e-6


def test_deepspeed_zero2_from_a_json_config_matches_one_process_resumes_and_merges(demo_root, mixed_data,
                                                                                   single_process, tmp_path):
    """ZeRO-2 named by an HF-style JSON file ("auto" values): same losses as one process, a run resumed from its
    step-2 DeepSpeed checkpoint reproduces steps 3-4, and `vigorl merge` converts the ZeRO-2 state to the HF weights."""
    pytest.importorskip("deepspeed")
    from vigorl_cli.merge import merge

    cfg = tmp_path / "ds_z2.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                               "bf16": {"enabled": "auto"}, "zero_optimization": {
                                   "stage": 2, "overlap_comm": False, "reduce_bucket_size": "auto"}}))
    out = tmp_path / "zero2"
    _torchrun(demo_root, mixed_data, out, parallel="deepspeed", deepspeed_config=str(cfg), packing=True)
    assert _losses(out) == pytest.approx(single_process["losses"], rel=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["sft"]["deepspeed_config"] == str(cfg)
    _reloads_and_generates(out / "model", demo_root)
    report = merge(out / "checkpoints" / "step-000004" / "state" / "deepspeed", tmp_path / "merged")
    assert report.kind == "deepspeed" and report.max_abs_diff < 1e-5
    assert _same_weights(tmp_path / "merged", out / "model") < 1e-6

    shutil.rmtree(out / "checkpoints" / "step-000004")
    (out / "summary.json").unlink()
    _torchrun(demo_root, mixed_data, out, parallel="deepspeed", deepspeed_config=str(cfg), packing=True)
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 2
    assert _losses(out) == pytest.approx(single_process["losses"], rel=1e-5)
