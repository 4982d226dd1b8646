"""`vigorl sft` on the tiny model: learning, checkpoints that load, exact resume after kill -9, LoRA, bad data."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vigorl_cli.cli.main import app
from vigorl_cli.errors import CheckpointError
from vigorl_cli.recipe import load_recipe
from vigorl_cli.train.checkpoint import latest_checkpoint, list_checkpoints
from vigorl_cli.train.metrics import read_jsonl_lines
from vigorl_cli.train.sft import lr_at, step_indices, train

ROOT = Path(__file__).resolve().parent.parent
DEMO_SFT = "spatial_reasoning/MCTS_72b_reasoning_chains_train.json"
runner = CliRunner()


def _overrides(demo_root, **sft) -> list[str]:
    base = {"sft.save_every": 100, "sft.gradient_checkpointing": False}
    base.update({f"sft.{k}": v for k, v in sft.items()})
    return [f"data.root={demo_root}", *(f"{k}={v}" for k, v in base.items())]


def _recipe(demo_root, **sft):
    return load_recipe(ROOT / "recipes" / "demo.yaml", _overrides(demo_root, **sft))


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl_lines(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def memorized(demo_root, tmp_path_factory):
    """4 samples seen 10 times each, packed."""
    out = tmp_path_factory.mktemp("sft") / "run"
    r = _recipe(demo_root, max_steps=20, lr=2e-3, warmup_ratio=0.1, micro_batch_size=2, grad_accum=1, packing=True)
    r.data.max_samples = 4
    return out, train(r, out=out, log=lambda *_: None)


def test_loss_goes_down_on_a_small_memorizable_set(memorized):
    _, summary = memorized
    losses = summary["losses"]
    assert len(losses) == 20 and summary["n_examples"] == 4
    assert losses[-1] < 0.6 * losses[0]  # ln(576) ≈ 6.36 at random init
    assert sum(losses[-3:]) < sum(losses[:3])


def test_final_checkpoint_reloads_with_from_pretrained_and_generates(memorized, demo_root):
    from transformers import AutoModelForImageTextToText

    from vigorl_cli.models.load import load_processor, mm_token_type_ids
    from vigorl_cli.models.tiny import tiny_path

    _, summary = memorized
    model_dir = Path(summary["model_dir"])
    assert Path(summary["checkpoint"]).name == "step-000020"
    for f in ("config.json", "model.safetensors", "generation_config.json", "chat_template.jinja",
              "preprocessor_config.json", "tokenizer.json"):
        assert (model_dir / f).is_file(), f
    assert json.loads((model_dir / "preprocessor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    base = AutoModelForImageTextToText.from_pretrained(tiny_path("tiny-qwen2.5-vl"))
    trained, frozen = "model.language_model.layers.0.mlp.up_proj.weight", "model.visual.blocks.0.mlp.up_proj.weight"
    assert not torch.equal(model.state_dict()[trained], base.state_dict()[trained])
    assert torch.equal(model.state_dict()[frozen], base.state_dict()[frozen])  # vision tower frozen by default
    proc = load_processor(model_dir, "qwen2_5_vl")
    rec = json.loads((demo_root / DEMO_SFT).read_text())[0]
    from PIL import Image

    img = Image.open(demo_root / rec["images"][0]).convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which is closer?"}]}]
    inputs = proc(text=[proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)], images=[img],
                  return_tensors="pt")
    inputs["mm_token_type_ids"] = mm_token_type_ids(inputs["input_ids"], model.config)
    gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]


def test_kill_9_mid_run_then_resume_reproduces_the_uninterrupted_loss_curve(demo_root, tmp_path):
    overrides = _overrides(demo_root, max_steps=8, save_every=2, keep_last=2)
    reference = train(load_recipe(ROOT / "recipes" / "demo.yaml", overrides), out=tmp_path / "ref",
                      log=lambda *_: None)
    args = ["sft", "--recipe", str(ROOT / "recipes" / "demo.yaml"), "--out", str(tmp_path / "run")]
    for o in overrides:
        args += ["--set", o]
    env = dict(os.environ, VIGORL_QUIET="1")
    proc = subprocess.Popen([sys.executable, "-m", "vigorl_cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_jsonl_lines(metrics)) >= 3:  # step 3 logged: checkpoint 2 is complete
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "summary.json").exists()
    killed_at = list_checkpoints(tmp_path / "run" / "checkpoints")[-1][0]
    assert 2 <= killed_at < 8

    res = runner.invoke(app, [*args, "--json"])  # the same command again: resumes
    assert res.exit_code == 0, res.output
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert resumed["resumed_from"] == killed_at
    steps = [r["step"] for r in read_jsonl_lines(metrics) if "loss" in r]
    assert steps == list(range(1, 9))  # lines logged after the checkpoint by the killed run were dropped
    assert _losses(tmp_path / "run") == pytest.approx(reference["losses"], rel=1e-6, abs=1e-6)
    assert [n for n, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [6, 8]  # keep_last


def test_gradient_accumulation_and_packing_do_not_change_the_updates(demo_root, tmp_path):
    a = train(_recipe(demo_root, max_steps=3, micro_batch_size=2, grad_accum=1, packing=False), out=tmp_path / "a",
              log=lambda *_: None)
    b = train(_recipe(demo_root, max_steps=3, micro_batch_size=1, grad_accum=2, packing=True), out=tmp_path / "b",
              log=lambda *_: None)
    # loss = summed token NLL / tokens of the whole step: 1 micro-batch of 2 == 2 micro-batches of 1
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    ga = [r["grad_norm"] for r in read_jsonl_lines(tmp_path / "a" / "metrics.jsonl") if "grad_norm" in r]
    gb = [r["grad_norm"] for r in read_jsonl_lines(tmp_path / "b" / "metrics.jsonl") if "grad_norm" in r]
    assert len(ga) == 3
    assert ga == pytest.approx(gb, rel=1e-4)


def test_lora_trains_language_adapters_only_and_merges_to_matching_logits(demo_root, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    r = _recipe(demo_root, max_steps=2, lr=1e-2, gradient_checkpointing=True)
    r.sft.lora.enabled = True
    summary = train(r, out=tmp_path / "lora", log=lambda *_: None)
    adapter = Path(summary["model_dir"])
    weights = load_file(adapter / "adapter_model.safetensors")
    keys = list(weights)
    assert keys and all("lora_" in k for k in keys)
    assert all(weights[k].abs().max() > 0 for k in keys if "lora_B" in k)  # B starts at 0: the adapters trained
    assert not any("visual" in k for k in keys)  # LoRA stays off the vision tower (vLLM cannot serve it there)
    res = runner.invoke(app, ["merge", str(adapter), "--out", str(tmp_path / "merged"), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["kind"] == "lora" and report["max_abs_diff"] < 1e-5
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert not any("lora" in k for k in merged.state_dict())


def test_gradient_checkpointing_never_recomputes_the_frozen_vision_tower(demo_root):
    from vigorl_cli.data.formats import read_sft
    from vigorl_cli.train.batching import Collator, LogProbModel, prepare_sft, rope_index_of
    from vigorl_cli.train.sft import build_model

    hf, processor = build_model(_recipe(demo_root, gradient_checkpointing=True), log=lambda *_: None)
    records, _ = read_sft(demo_root / DEMO_SFT)
    examples = prepare_sft(records[:2], processor, [demo_root], 4096).examples
    batch = Collator(processor, hf.config, rope_index_of(hf), packing=True)(examples)
    calls = {"vision": 0, "decoder": 0}

    def counting(module, key):
        forward = module.forward

        def wrapper(*args, **kwargs):
            calls[key] += 1
            return forward(*args, **kwargs)

        module.forward = wrapper

    counting(hf.model.visual.blocks[0].mlp, "vision")
    counting(hf.model.language_model.layers[0].mlp, "decoder")
    hf.train()
    (-LogProbModel(hf)(**batch.model_inputs()).sum()).backward()
    # decoder layers: forward + recompute in backward; the frozen vision tower: forward only, no autograd graph
    assert calls == {"vision": 1, "decoder": 2}
    assert all(p.grad is None for p in hf.model.visual.parameters())


def test_bad_data_lines_are_reported_and_skipped(demo_root, tmp_path):
    records = json.loads((demo_root / DEMO_SFT).read_text())[:4]
    for rec in records:
        rec["images"] = [str(demo_root / p) for p in rec["images"]]
    missing = dict(records[0], images=[str(tmp_path / "missing.png")])
    lines = [json.dumps(r) for r in records[:2]] + ["{not json"] + [json.dumps(r) for r in records[2:]]
    lines += [json.dumps({"messages": [{"role": "narrator", "content": "x"}]}), json.dumps(missing)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    logged: list[str] = []
    summary = train(_recipe(demo_root, max_steps=1), data=[data], out=tmp_path / "run", log=logged.append)
    assert summary["bad_lines"] == 2 and summary["n_examples"] == 4
    assert summary["dropped"] == {"missing_image": 1}
    text = "\n".join(logged)
    assert f"{data}:3: bad_json" in text and f"{data}:6: schema" in text and "missing.png" in text


def test_resume_refuses_a_changed_recipe_and_no_resume_refuses_an_existing_run(memorized, demo_root):
    out, _ = memorized
    changed = _recipe(demo_root, max_steps=20, lr=5e-3, warmup_ratio=0.1, micro_batch_size=2, grad_accum=1,
                      packing=True)
    changed.data.max_samples = 4
    with pytest.raises(CheckpointError, match="different sft"):
        train(changed, out=out, log=lambda *_: None)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(changed, out=out, resume=False, log=lambda *_: None)


def test_lr_warms_up_linearly_then_decays_by_cosine():
    # 10 steps, warmup round(0.2 * 10) = 2: peak * 1/3, peak * 2/3, then cosine from the peak
    lrs = [lr_at(s, 10, 1.0, 0.2) for s in range(10)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lrs[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert all(a > b for a, b in itertools.pairwise(lrs[2:])) and lrs[-1] > 0


def test_each_epoch_visits_every_sample_once_in_a_seeded_order():
    seen = [i for s in range(5) for i in step_indices(10, s, 2, seed=3)]
    assert sorted(seen) == list(range(10))
    assert step_indices(10, 5, 2, seed=3) != step_indices(10, 0, 2, seed=3)  # next epoch: a new order
    assert step_indices(10, 1, 2, seed=3) == step_indices(10, 1, 2, seed=3)


def test_a_half_written_checkpoint_is_never_resumed_from(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-000002").mkdir(parents=True)
    (root / "step-000002" / "trainer_state.json").write_text("{}")
    (root / "step-000004").mkdir()  # killed before its trainer_state.json (written last)
    (root / ".tmp-step-000006").mkdir()  # killed before the rename
    assert latest_checkpoint(root) == root / "step-000002"


@pytest.mark.slow
def test_throughput_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--tiny", "--variants",
                          "hf-padded-ckpt,ours-packed-ckpt,hf-logprob-nockpt,ours-logprob-nockpt", "--share-images",
                          "2", "--json", str(out)], capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in results.values())
    packed = results["ours-packed-ckpt"]
    assert packed["padded_tokens_per_step"] == packed["real_tokens_per_step"]  # no padding when packed


def test_resume_restores_the_rng_so_dropout_continues_as_uninterrupted(demo_root, tmp_path):
    """LoRA dropout draws from the torch RNG every step: resuming without the saved RNG state gives other masks."""
    r = _recipe(demo_root, max_steps=4, save_every=2, keep_last=3, lr=1e-2)
    r.sft.lora.enabled, r.sft.lora.dropout = True, 0.5
    out = tmp_path / "run"
    first = train(r, out=out, log=lambda *_: None)["losses"]
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-000004")  # as if killed between the checkpoints of steps 2 and 4
    (out / "summary.json").unlink()
    again = train(r, out=out, log=lambda *_: None)
    assert again["resumed_from"] == 2
    assert _losses(out) == pytest.approx(first, rel=1e-6, abs=1e-6)
    assert len(set(first)) == 4


def test_lora_target_modules_regex_is_what_gets_adapted(demo_root):
    from vigorl_cli.train.sft import build_model

    r = _recipe(demo_root)
    r.sft.lora.enabled = True
    r.sft.lora.target_modules = r".*language_model.*\.q_proj"
    hf, _ = build_model(r, log=lambda *_: None)
    trainable = [n for n, p in hf.named_parameters() if p.requires_grad]
    n_layers = hf.config.get_text_config().num_hidden_layers
    assert len(trainable) == 2 * n_layers  # lora_A and lora_B of each layer's q_proj, nothing else
    assert all(".q_proj.lora_" in n and "language_model" in n for n in trainable)


@pytest.mark.parametrize("freeze_vision, target, message", [
    (False, None, "freeze_vision=false"),  # LoRA on the language model only: the vision tower would stay frozen
    (True, r".*visual.*\.qkv", "freeze_vision is true"),  # LoRA on a vision module of a tower meant to stay frozen
])
def test_lora_refuses_a_vision_setting_it_would_silently_ignore(demo_root, freeze_vision, target, message):
    from vigorl_cli.errors import RecipeError
    from vigorl_cli.train.sft import build_model

    r = _recipe(demo_root)
    r.sft.lora.enabled, r.sft.freeze_vision = True, freeze_vision
    if target:
        r.sft.lora.target_modules = target
    with pytest.raises(RecipeError, match=message):
        build_model(r, log=lambda *_: None)


def test_lora_with_vision_targets_trains_the_vision_adapters_when_the_tower_is_not_frozen(demo_root):
    from vigorl_cli.train.sft import build_model

    r = _recipe(demo_root)
    r.sft.lora.enabled, r.sft.freeze_vision = True, False
    r.sft.lora.target_modules = r".*(visual.*\.qkv|language_model.*\.q_proj)"
    hf, _ = build_model(r, log=lambda *_: None)
    trainable = [n for n, p in hf.named_parameters() if p.requires_grad]
    assert any("visual" in n for n in trainable) and any("language_model" in n for n in trainable)


def test_recipe_loggers_reach_tensorboard_and_wandb(demo_root, tmp_path, monkeypatch):
    """output.loggers: [tensorboard, wandb] → scalars of every step reach both (fakes stand in for the packages)."""
    import types

    calls: dict[str, list] = {"tb": [], "wandb": [], "init": [], "closed": []}

    class Writer:
        def __init__(self, log_dir):
            calls["init"].append(("tb", log_dir))

        def add_scalar(self, k, v, global_step):
            calls["tb"].append((global_step, k, v))

        def flush(self):
            pass

        def close(self):
            calls["closed"].append("tb")

    class Run:
        def log(self, payload, step):
            calls["wandb"].append((step, payload))

        def finish(self):
            calls["closed"].append("wandb")

    def init(**kw):
        calls["init"].append(("wandb", kw["project"]))
        return Run()

    def fake_module(name, **attrs):
        import importlib.machinery

        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        return m

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake_module("torch.utils.tensorboard",
                                                                            SummaryWriter=Writer))
    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", init=init))
    r = _recipe(demo_root, max_steps=2)
    r.output.loggers, r.output.wandb_project = ["jsonl", "tensorboard", "wandb"], "proj"
    summary = train(r, out=tmp_path / "run", log=lambda *_: None)
    assert calls["init"] == [("tb", str(tmp_path / "run" / "tb")), ("wandb", "proj")]
    assert sorted(calls["closed"]) == ["tb", "wandb"]
    tb_loss = [(s, v) for s, k, v in calls["tb"] if k == "loss"]
    assert tb_loss == [(1, pytest.approx(summary["losses"][0], abs=1e-6)),
                       (2, pytest.approx(summary["losses"][1], abs=1e-6))]
    steps = [(s, p) for s, p in calls["wandb"] if "loss" in p]
    assert [s for s, _ in steps] == [1, 2] and all("lr" in p and "grad_norm" in p for _, p in steps)
    assert [p["val_loss"] for s, p in calls["wandb"] if "val_loss" in p] == [pytest.approx(summary["val_loss"])]


def test_a_logger_whose_package_is_missing_is_a_clear_recipe_error(tmp_path, monkeypatch):
    from vigorl_cli.errors import RecipeError
    from vigorl_cli.recipe import OutputConfig
    from vigorl_cli.train.metrics import make_loggers

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    with pytest.raises(RecipeError, match="'wandb' but the wandb package is not installed"):
        make_loggers(OutputConfig(loggers=["jsonl", "wandb"]), tmp_path, is_main=True)


def test_gradient_clipping_scales_the_update_to_max_grad_norm():
    from vigorl_cli.train.parallel import _clip_and_step

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.0)
    p.grad = torch.tensor([3.0, 4.0])  # norm 5
    norm = _clip_and_step([p], opt, max_norm=1.0, lr=1.0)  # the step's lr is set on the optimizer
    assert norm == pytest.approx(5.0)  # reported before clipping
    assert p.detach().tolist() == pytest.approx([-0.6, -0.8], abs=1e-6)  # the gradient was scaled to norm 1
    assert p.grad is None


def test_deepspeed_json_config_keeps_its_zero_stage_and_takes_our_batch_clipping_and_precision(tmp_path):
    from vigorl_cli.errors import RecipeError
    from vigorl_cli.train.parallel import OptimConfig, deepspeed_config

    f = tmp_path / "ds_z2.json"
    f.write_text(json.dumps({  # an HF/LLaMA-Factory style file
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": 1}}, "scheduler": {"type": "WarmupLR"},
        "zero_optimization": {"stage": 2, "allgather_bucket_size": 5e8, "reduce_bucket_size": "auto",
                              "overlap_comm": True}}))
    ds = deepspeed_config(OptimConfig(max_grad_norm=0.5, bf16=True, grad_accum=4, micro_batch_size=2,
                                      deepspeed_config=str(f)))
    assert ds["zero_optimization"] == {"stage": 2, "allgather_bucket_size": 5e8, "overlap_comm": True}
    assert "optimizer" not in ds and "scheduler" not in ds and "train_batch_size" not in ds
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == \
        (2, 4, 0.5)
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    z3 = deepspeed_config(OptimConfig(deepspeed_config="zero3"))["zero_optimization"]
    assert z3["stage"] == 3 and z3["stage3_gather_16bit_weights_on_model_save"] is True
    assert deepspeed_config(OptimConfig(deepspeed_config="zero2"))["zero_optimization"]["stage"] == 2
    with pytest.raises(RecipeError, match="DeepSpeed config not found"):
        deepspeed_config(OptimConfig(deepspeed_config=str(tmp_path / "nope.json")))
    (tmp_path / "bad.json").write_text("{stage: 2")
    with pytest.raises(RecipeError, match="not valid JSON"):
        deepspeed_config(OptimConfig(deepspeed_config=str(tmp_path / "bad.json")))
