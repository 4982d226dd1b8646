"""`vigorl grpo` on the tiny model: a learning signal, single- and multi-turn runs, resume, engine/trainer agreement."""

from __future__ import annotations

import json

import pytest

from vigorl_cli.recipe import load_recipe


def vowel_reward(inp) -> dict:
    """A reward the tiny model can learn in a few steps: the share of vowels in its text."""
    text = inp.text() if hasattr(inp, "text") else str(inp)
    letters = [c for c in text.lower() if c.isalpha()]
    return {"overall": sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0}


def _recipe(demo_root, *extra):
    sets = [f"data.root={demo_root}", "data.rl_train=[spatial_reasoning/vigorl_sat2_train_RL.jsonl]",
            "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.responses_per_update=8", "grpo.micro_batch_size=4",
            "grpo.sampling.max_new_tokens=12", "grpo.save_every=1", "grpo.gradient_checkpointing=false",
            "grpo.kl_coef=0.01", *extra]
    return load_recipe(None, sets)


def test_mean_reward_rises_with_a_learnable_reward(tmp_path, demo_root):
    from vigorl_cli.train.grpo import train

    r = _recipe(demo_root, "grpo.steps=10", "grpo.lr=2e-2", "grpo.kl_coef=0.0", "grpo.save_every=100",
                "grpo.group_size=8", "grpo.responses_per_update=32", "grpo.micro_batch_size=8")
    s = train(r, out=tmp_path / "g", reward_fn=vowel_reward, log=lambda *_: None)
    rw = s["rewards"]
    first, last = sum(rw[:3]) / 3, sum(rw[-3:]) / 3
    assert last > first + 0.1, rw


def test_single_turn_run_on_demo_data_writes_checkpoints_and_rollouts(tmp_path, demo_root):
    from transformers import AutoModelForImageTextToText

    from vigorl_cli.train.grpo import train

    s = train(_recipe(demo_root, "grpo.steps=2", "grpo.truncated=keep"), out=tmp_path / "g", log=lambda *_: None)
    assert len(s["rewards"]) == 2
    m = AutoModelForImageTextToText.from_pretrained(s["model_dir"])
    assert m.config.model_type == "qwen2_5_vl"
    metrics = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    for key in ("reward", "reward/accuracy", "reward/format", "kl", "clip_frac", "entropy", "grad_norm",
                "rollout_s", "update_s", "response_tokens"):
        assert key in last, key
    # engine (HF, sampling from the live policy) and trainer log-probs agree: token-exact, same numerics
    assert last["logprob_diff_engine_vs_trainer"] < 1e-4
    recs = [json.loads(x) for x in (tmp_path / "g" / "rollouts" / "step_000002.jsonl").read_text().splitlines()]
    assert len(recs) == 16 and {"turn_texts", "reward", "frame"} <= set(recs[0])


def test_multiturn_run_with_the_zoom_tool(tmp_path, demo_root):
    from vigorl_cli.train.grpo import train

    r = _recipe(demo_root, "grpo.steps=1", "tool.enabled=true", "tool.offset=40", "tool.crop_size=56",
                "data.rl_train=[visual_search/vigorl_SA_RL.jsonl]", "prompt.preset=vstar",
                "reward.accuracy_weight=0.6", "reward.format_weight=0.4")
    s = train(r, out=tmp_path / "g", log=lambda *_: None)
    assert len(s["rewards"]) == 1 and 0.0 <= s["rewards"][0] <= 1.6


def test_resumed_run_continues_exactly(tmp_path, demo_root):
    from vigorl_cli.train.grpo import train

    full = train(_recipe(demo_root, "grpo.steps=3", "grpo.lr=1e-3"), out=tmp_path / "a", reward_fn=vowel_reward,
                 log=lambda *_: None)
    train(_recipe(demo_root, "grpo.steps=1", "grpo.lr=1e-3"), out=tmp_path / "b", reward_fn=vowel_reward,
          log=lambda *_: None)
    resumed = train(_recipe(demo_root, "grpo.steps=3", "grpo.lr=1e-3"), out=tmp_path / "b", reward_fn=vowel_reward,
                    log=lambda *_: None)
    assert resumed["resumed_from"] == 1
    assert resumed["rewards"] == pytest.approx(full["rewards"], abs=1e-6)


def test_unsupported_engine_and_missing_data_are_one_line_errors(tmp_path, demo_root):
    from vigorl_cli.errors import DataError, RecipeError
    from vigorl_cli.train.grpo import train

    with pytest.raises(RecipeError, match="hf or vllm"):
        train(_recipe(demo_root, "grpo.steps=1", "engine.backend=openai", "engine.base_urls=[http://x/v1]"),
              out=tmp_path / "e", log=lambda *_: None)
    with pytest.raises((RecipeError, DataError)):
        train(_recipe(demo_root, "grpo.steps=1", "data.rl_train=[]"), out=tmp_path / "f", log=lambda *_: None)
