"""model.compile: regional torch.compile of decoder layers and vision blocks (models/compile.py).

The tests compile with the ``aot_eager`` backend (Dynamo capture, graph breaks around attention, AOT autograd with
activation checkpointing) so that they stay fast on CPU; inductor's kernels are what the GPU benchmark measures."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from PIL import Image

from vigorl_cli.errors import RecipeError
from vigorl_cli.models import compile as C
from vigorl_cli.models.load import load_model
from vigorl_cli.recipe import load_recipe
from vigorl_cli.train.batching import Collator, LogProbModel, encode_conversation, rope_index_of
from vigorl_cli.train.metrics import read_jsonl_lines

ROOT = Path(__file__).resolve().parent.parent


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    logp = model(**batch.model_inputs())
    (-logp.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logp.detach(), grads


def test_compiled_blocks_give_the_eager_log_probs_and_gradients_at_new_lengths():
    b = load_model("tiny-qwen2.5-vl")
    b.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    b.model.disable_input_require_grads()
    img = Image.new("RGB", (120, 60), (200, 40, 40))

    def ex(n):
        return encode_conversation(b.processor, [{"role": "user", "content": "<image> colour?" + " x" * n},
                                                 {"role": "assistant", "content": "blue" * (n + 1)}], [img], 4096)

    model = LogProbModel(b.model)
    col = Collator(b.processor, b.model.config, rope_index_of(b.model), packing=True)
    batches = [col([ex(3), ex(7)]), col([ex(5), ex(11), ex(2)])]  # two lengths: the second recompiles dynamically
    eager_out = [_step(model, x) for x in batches]
    n = C.compile_blocks(model, backend="aot_eager")
    cfg = b.model.config
    # 2 norms + MLP per decoder layer and per vision block, and the final norm
    assert n == 3 * (cfg.text_config.num_hidden_layers + cfg.vision_config.depth) + 1 and C.is_compiled(model)
    for x, (lp_ref, g_ref) in zip(batches, eager_out):
        lp, g = _step(model, x)
        assert torch.allclose(lp, lp_ref, atol=1e-5)
        assert g.keys() == g_ref.keys()
        for k in g_ref:
            assert torch.allclose(g[k], g_ref[k], atol=1e-5, rtol=1e-4), k
    with C.eager(model):  # generation: the compiled call is set aside, then restored
        assert not C.is_compiled(model)
    assert C.is_compiled(model)


def test_sft_with_model_compile_trains_like_eager(demo_root, tmp_path, monkeypatch):
    from vigorl_cli.train.sft import train

    monkeypatch.setattr(C, "compile_blocks", functools.partial(C.compile_blocks, backend="aot_eager"))
    sets = [f"data.root={demo_root}", "sft.save_every=100", "sft.max_steps=2", "sft.micro_batch_size=2",
            "sft.packing=true"]
    eager = train(load_recipe(ROOT / "recipes" / "demo.yaml", sets), out=tmp_path / "e", log=lambda *_: None)
    said: list[str] = []
    compiled = train(load_recipe(ROOT / "recipes" / "demo.yaml", [*sets, "model.compile=true"]), out=tmp_path / "c",
                     log=said.append)
    assert any("blocks compiled" in s for s in said)
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)
    g = [[r["grad_norm"] for r in read_jsonl_lines(tmp_path / d / "metrics.jsonl") if "grad_norm" in r]
         for d in ("e", "c")]
    assert g[1] == pytest.approx(g[0], rel=1e-4)


def test_model_compile_is_refused_with_deepspeed():
    from vigorl_cli.train.sft import compile_for_training

    with pytest.raises(RecipeError, match="DeepSpeed"):
        compile_for_training(torch.nn.Linear(2, 2), "deepspeed")
