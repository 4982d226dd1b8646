"""Benchmark scripts that compare us with another trainer: the configs must match and both sides must run.

``benchmarks/grpo_vs_trl.py`` (issue 7, Performance): one GRPO step of ours beside TRL's ``GRPOTrainer``. On CPU with
the tiny model this is a smoke check (the GPU numbers come from the same script on the device).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    """A script of benchmarks/ as a module (registered in sys.modules: its dataclasses need that)."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _trl_or_skip():
    try:
        import trl  # noqa: F401
    except ImportError as e:
        pytest.skip(f"trl is not importable ({e}); install it with `pip install --no-deps trl==1.16.0`")


def test_grpo_vs_trl_reward_wrapper_scores_like_our_preset(tmp_path):
    """The TRL reward function is our preset: a right answer in the answer tags scores 0.5 (accuracy weight 0.5,
    no think/format part), a wrong one 0, and TRL's conversational completion shape is accepted."""
    bench = _load("grpo_vs_trl")
    cfg = bench.BenchConfig(tiny=True, steps=2, prompts=2, group=2, max_new_tokens=4, micro_batch=2,
                            work=str(tmp_path))
    st = bench.Setup(cfg, lambda *_: None)
    from vigorl_cli.agent.images import load_for_model
    from vigorl_cli.models.load import load_processor
    from vigorl_cli.models.tiny import tiny_path

    proc = load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl")
    i = st.order[0]
    s = st.samples[i]
    _, frame, shown = load_for_model(s.image_paths(st.recipe.data_root())[0], proc)
    fn = bench.trl_reward(st, {i: (frame, shown)})
    wrong = next(w for w in ("left", "right") if w != s.answer)
    got = fn(prompts=None, completions=[[{"role": "assistant", "content": f"<answer> {s.answer} </answer>"}],
                                        [{"role": "assistant", "content": f"<answer> {wrong} </answer>"}],
                                        f"<answer> {s.answer} </answer>"],
             sample_idx=[i, i, i])
    assert got == [0.5, 0.0, 0.5]
    # the prompts of both sides: our loop's order, step by step
    assert len(st.order) == cfg.steps * cfg.prompts


@pytest.mark.slow
def test_grpo_vs_trl_tiny_runs_both_sides_with_matched_config(tmp_path):
    _trl_or_skip()
    bench = _load("grpo_vs_trl")
    cfg = bench.BenchConfig(tiny=True, steps=2, warmup=1, prompts=2, group=2, max_new_tokens=4, micro_batch=2,
                            work=str(tmp_path))
    rep = bench.run(cfg, log=lambda *_: None)
    for side in ("ours", "trl"):
        r = rep[side]
        assert r["steps_done"] == 2
        assert r["responses_per_step"] == [4, 4]
        assert r["completion_tokens_per_step"] == [16, 16]  # eos kept out: every response has max_new_tokens
        assert r["mean_completion_len"] == 4.0
        assert r["samples_per_s"] > 0 and r["gen_tokens_per_s"] > 0
        assert r["samples_per_s"] == pytest.approx(4 / r["step_s"][1], rel=1e-2)
    assert rep["matched"] == {"responses_per_step": True, "optimizer_steps": True, "completion_lengths": True,
                              "prompt_tokens": True}
    assert rep["trl"]["generate_calls"] == 2  # one generation batch per optimizer step, as ours
    assert rep["trl"]["trainable_params"] > 0
    assert max(rep["ours"]["logprob_diff_engine_vs_trainer"]) < 1e-4  # fp32 on CPU
    md = rep["markdown"]
    assert "| vigorl grpo |" in md and "| TRL GRPOTrainer" in md and "speedup (samples/s)" in md


def test_attention_kernels_benchmark_arms_agree_with_the_per_sample_reference(tmp_path):
    """benchmarks/attention_kernels.py on CPU (small shapes, fp32): every arm computes per-sample causal attention."""
    import json
    import subprocess

    out = tmp_path / "attn.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention_kernels.py"), "--cpu", "--reps", "2",
                          "--warmup", "1", "--json", str(out)], capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert {"block-mask", "padded", "vigorl"} <= results.keys()
    assert all(r["rel_l2_vs_fp32"] < 1e-5 and r["fwd_bwd_ms"] > 0 for r in results.values())


def test_decode_attention_arms_agree_with_a_float64_reference():
    """benchmarks/decode_attention.py on CPU (fp32, small shapes): every kernel arm that runs here (HF's repeated
    keys, our grouped sdpa, sdpa's math backend, the written-out matrix products) gives the masked attention of a
    float64 per-head reference; backends that need a GPU are reported as skipped, not as failures."""
    bench = _load("decode_attention")
    import torch

    rows = bench.run(batch=3, widths=[40, 96], heads=4, kv_heads=2, dim=16, dtype=torch.float32,
                     device=torch.device("cpu"), layers=1, reps=1)
    for row in rows:
        ran = {k: a for k, a in row["arms"].items() if "us_per_call" in a}
        assert {"hf_repeat", "grouped", "grouped_math", "grouped_matmul"} <= ran.keys()
        assert all(a["rel_err"] < 1e-5 for a in ran.values()), row
        assert all("skipped" in a for k, a in row["arms"].items() if k not in ran)


def test_prefill_attention_arms_agree_with_a_float32_reference():
    """benchmarks/prefill_attention.py on CPU (fp32, small shapes): HF's repeated keys, sdpa's grouped-query mode and
    the folded grouped heads all give the masked attention of a per-head reference (causal within the new tokens,
    full over each row's cached prefix)."""
    bench = _load("prefill_attention")
    import torch

    rows = bench.run(batch=3, new=5, widths=[16, 40], heads=4, kv_heads=2, dim=16, dtype=torch.float32,
                     device=torch.device("cpu"), layers=1, reps=1)
    for row in rows:
        attention = {"hf_repeat", "gqa", "grouped_fold", "grouped_fold_additive"}
        assert row["arms"].keys() == attention | {f"{a}@engine" for a in attention} | {"fold_mask_build"}
        build = row["arms"].pop("fold_mask_build")
        assert build["rel_err"] is None and build["us_per_call"] > 0
        assert all(a["rel_err"] < 1e-5 and a["us_per_call"] > 0 for a in row["arms"].values()), row
    # the mask is what the docstring says: token t of a row with prefix p sees p + t + 1 positions
    q = torch.randn(1, 4, 3, 16)
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    mask = (torch.arange(8)[None, None] < (2 + torch.arange(1, 4))[None, :, None]).view(1, 1, 3, 8)
    out = bench.arms(q, k, v, mask, 0.25)["grouped_fold"]()
    by_hand = torch.softmax((q[0, 3, 1] @ k[0, 1, :4].T) * 0.25, -1) @ v[0, 1, :4]  # head 3 → kv head 1, token 1
    assert torch.allclose(out[0, 1, 3], by_hand, atol=1e-5)
