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


DIST_SETS = ["data.rl_train=[spatial_reasoning/vigorl_sat2_train_RL.jsonl]", "grpo.steps=2", "grpo.prompts_per_step=4",
             "grpo.group_size=4", "grpo.responses_per_update=16", "grpo.micro_batch_size=2",
             "grpo.sampling.max_new_tokens=16", "grpo.save_every=1", "grpo.gradient_checkpointing=false",
             "grpo.kl_coef=0.01", "grpo.lr=1e-3", "grpo.truncated=mask"]


@pytest.fixture(scope="module")
def one_process_run(demo_root, tmp_path_factory):
    """The reference for the 2-rank runs: the same recipe in one process."""
    from vigorl_cli.train.grpo import train

    out = tmp_path_factory.mktemp("grpo-one") / "run"
    train(load_recipe(None, [f"data.root={demo_root}", *DIST_SETS]), out=out, reward_fn=vowel_reward,
          log=lambda *_: None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp2", "deepspeed"])
def test_two_ranks_match_one_process(parallel, tmp_path, demo_root, one_process_run):
    """`torchrun --nproc-per-node 2` with grpo.parallel=fsdp2 / deepspeed (ZeRO-3; gloo): each rank rolls out whole
    prompts on the sharded policy (synced HF generate), and the run equals a one-process run: same rewards, losses
    and grad norms (the loss is normalised by the global token count; ranks short of data run zero-weight dummy
    micro-batches, which truncated=mask makes happen here), and the checkpoint loads with from_pretrained."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForImageTextToText

    from vigorl_cli.train.metrics import read_jsonl_lines

    if parallel == "deepspeed":
        pytest.importorskip("deepspeed")
    tests = Path(__file__).resolve().parent
    out = tmp_path / parallel
    args = ["grpo", "--out", str(out), "--json"]
    for o in [f"data.root={demo_root}", *DIST_SETS, f"grpo.parallel={parallel}",
              "reward.preset=test_grpo:vowel_reward"]:
        args += ["--set", o]
    env = dict(os.environ, VIGORL_QUIET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "vigorl_cli", *args]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    one = json.loads((one_process_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rewards"] == pytest.approx(one["rewards"], abs=1e-6)
    m2, m1 = read_jsonl_lines(out / "metrics.jsonl"), read_jsonl_lines(one_process_run / "metrics.jsonl")
    assert len(m2) == len(m1) == 2
    for a, b in zip(m2, m1):
        assert a["world_size"] == 2 and a["trained_frac"] == b["trained_frac"] > 0
        for k in ("reward", "loss", "grad_norm", "kl"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
        assert a["logprob_diff_engine_vs_trainer"] < 1e-5  # generation on the sharded policy, token-exact
    state = {"fsdp2": "dcp/.metadata", "deepspeed": "deepspeed/state"}[parallel]
    assert (out / "checkpoints" / "step-000002" / "state" / state).exists()
    m = AutoModelForImageTextToText.from_pretrained(summary["model_dir"])
    assert m.config.model_type == "qwen2_5_vl"


def test_validation_pass_scores_every_rl_val_sample(tmp_path, demo_root):
    """grpo.val_every: one episode per data.rl_val sample, at steps 2 and 3 (the last), logged as val/*."""
    from vigorl_cli.data.formats import read_samples
    from vigorl_cli.train.grpo import train

    val_file = "spatial_reasoning/vigorl_sat2_val_RL.jsonl"
    val = read_samples(demo_root / val_file).samples
    assert len(val) >= 3
    picked = {val[0].id, val[2].id}  # a reward that depends only on which sample it scores: the expected means
    seen: list[str] = []  # are exact whatever the random tiny policy writes

    def by_id(inp) -> dict:
        acc = 1.0 if inp.sample.id in picked else 0.0
        seen.append(inp.sample.id)
        return {"overall": 0.5 + acc, "accuracy": acc}

    r = _recipe(demo_root, "grpo.steps=3", "grpo.val_every=2", f"data.rl_val=[{val_file}]",
                "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.responses_per_update=4")
    s = train(r, out=tmp_path / "g", reward_fn=by_id, log=lambda *_: None)
    metrics = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "val/accuracy" in m] == [2, 3]
    want = len(picked) / len(val)
    for m in metrics:
        if "val/accuracy" in m:
            assert m["val/n"] == len(val) and m["val/image_failures"] == 0
            assert m["val/accuracy"] == pytest.approx(want) and m["val/reward"] == pytest.approx(0.5 + want)
    assert s["val"] == [{"step": 2, "accuracy": round(want, 6), "reward": round(0.5 + want, 6)},
                        {"step": 3, "accuracy": round(want, 6), "reward": round(0.5 + want, 6)}]
    val_ids = {v.id for v in val}
    assert sum(1 for sid in seen if sid in val_ids) >= 2 * len(val)  # both passes scored every val sample


def test_validation_needs_rl_val(demo_root):
    from vigorl_cli.errors import RecipeError

    with pytest.raises(RecipeError, match="'grpo.val_every' is set but 'data.rl_val' is empty"):
        _recipe(demo_root, "grpo.val_every=5")


# -- helpers for the tests below --------------------------------------------------------------------------------------

def _hf_logprobs(model, processor, ids: list[int], images: list):
    """``[L-1]``: log p(ids[t+1] | ids[:t+1]) from a plain HF forward of the policy (its own M-RoPE positions), with
    ``ids`` holding expanded image placeholders. Independent of the trainer's collator and LogProbModel."""
    import torch

    from vigorl_cli.models.load import mm_token_type_ids

    x = torch.tensor([ids])
    kw = {}
    if images:
        feats = processor.image_processor(images=images, return_tensors="pt")
        kw = {"pixel_values": feats["pixel_values"].to(model.dtype), "image_grid_thw": feats["image_grid_thw"]}
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x), mm_token_type_ids=mm_token_type_ids(x, model.config),
                       **kw).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1).gather(1, x[0, 1:, None]).squeeze(1)


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _rollouts(out, step):
    return [json.loads(x) for x in (out / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]


# -- kl_in: reward ----------------------------------------------------------------------------------------------------

def test_kl_in_reward_subtracts_the_sequence_kl_before_the_group_advantages(tmp_path, demo_root, monkeypatch):
    """verl/EasyR1 in-reward KL: each response's reward loses kl_coef·Σ_t kl_t (kl between the policy that sampled it
    and the frozen reference) before the group advantages. Step 1: policy == reference, no penalty; step 2: the
    penalty equals an independent computation from the step-1 checkpoint and the initial model (k1: Σ_t logp−ref)."""
    import torch
    from transformers import AutoModelForImageTextToText

    import vigorl_cli.train.grpo as G
    import vigorl_cli.train.losses as L
    from vigorl_cli.models.load import load_model
    from vigorl_cli.train.batching import IGNORE
    from vigorl_cli.train.grpo import train

    examples, adv_inputs = {}, []
    orig_ex, orig_ga = G._expanded_example, L.group_advantages

    def capture_example(ep, processor, image_token_id, sid):
        ex = orig_ex(ep, processor, image_token_id, sid)
        examples.setdefault(len(adv_inputs), {})[sid] = ex
        return ex

    def capture_adv(rewards, gids, norm="std"):
        adv_inputs.append(rewards.clone())
        return orig_ga(rewards, gids, norm)

    monkeypatch.setattr(G, "_expanded_example", capture_example)
    monkeypatch.setattr(L, "group_advantages", capture_adv)
    coef = 0.5
    r = _recipe(demo_root, "grpo.steps=2", "grpo.lr=2e-2", "grpo.kl_in=reward", f"grpo.kl_coef={coef}",
                "grpo.kl_estimator=k1", "grpo.truncated=keep", "grpo.prompts_per_step=2", "grpo.group_size=4",
                "grpo.keep_last=3")
    out = tmp_path / "g"
    train(r, out=out, reward_fn=vowel_reward, log=lambda *_: None)
    m = _metrics(out)
    assert len(adv_inputs) == 2 and m[0]["kl_reward_penalty"] == pytest.approx(0.0, abs=1e-6)

    # step 2: independent per-sequence KL, policy = the step-1 checkpoint, reference = the initial model
    policy = AutoModelForImageTextToText.from_pretrained(out / "checkpoints" / "step-000001").float().eval()
    ref = load_model("tiny-qwen2.5-vl", dtype="float32")
    proc = ref.processor
    recs = _rollouts(out, 2)
    task = torch.tensor([rec["reward"]["overall"] for rec in recs])
    expected = []
    for rec in recs:
        ex = examples[1][rec["key"]]
        scored = torch.tensor([t != IGNORE for t in ex.labels[1:]])
        lp = _hf_logprobs(policy, proc, ex.input_ids, ex.images)[scored]
        lr = _hf_logprobs(ref.model, proc, ex.input_ids, ex.images)[scored]
        expected.append(coef * float((lp - lr).sum()))
    expected = torch.tensor(expected)
    assert expected.abs().max() > 1e-3  # the policy moved: a visible penalty
    assert adv_inputs[1] == pytest.approx(task - expected, abs=1e-4)  # without the KL: adv_inputs[1] == task
    assert m[1]["kl_reward_penalty"] == pytest.approx(float(expected.mean()), abs=1e-5)
    assert m[1]["reward"] == pytest.approx(float(task.mean()), abs=1e-6)  # `reward` stays the task reward


# -- grpo.max_prompt_len ----------------------------------------------------------------------------------------------

def test_prompts_longer_than_max_prompt_len_are_dropped_and_counted(tmp_path, demo_root):
    """Prompt length = the processor's own token count (image expanded); prompts above the limit are dropped from
    the step (counted), the rest train; a step whose prompts are all too long is skipped, not a crash."""
    from vigorl_cli.agent.episode import Episode, EpisodeConfig
    from vigorl_cli.agent.images import load_for_model
    from vigorl_cli.models import prompts
    from vigorl_cli.models.load import load_model
    from vigorl_cli.train.grpo import load_rl_samples, prompt_indices, train

    extra = ["grpo.steps=1", "grpo.prompts_per_step=6", "grpo.group_size=2", "grpo.truncated=keep", "grpo.kl_coef=0.0"]
    r = _recipe(demo_root, *extra)
    proc = load_model("tiny-qwen2.5-vl").processor
    samples = load_rl_samples([demo_root / f for f in r.data.rl_train], None, r.seed, lambda *_: None)
    system = prompts.system_prompt(r.prompt.preset, "single", literal_newlines=r.prompt.literal_newlines)
    lens = {}
    for i in prompt_indices(len(samples), 0, 6, r.seed):
        s = samples[i]
        _, frame, shown = load_for_model(s.image_paths(demo_root)[0], proc)
        text = Episode(s, shown, frame, system, proc, EpisodeConfig()).segments[0].text
        lens[s.id] = len(proc(text=[text], images=[shown], return_tensors="pt")["input_ids"][0])
    limit = sorted(lens.values())[len(lens) // 2]
    kept = {k for k, v in lens.items() if v <= limit}
    assert 0 < len(kept) < len(lens)
    out = tmp_path / "g"
    train(_recipe(demo_root, *extra, f"grpo.max_prompt_len={limit}"), out=out, log=lambda *_: None)
    m = _metrics(out)[0]
    assert m["prompts_dropped_too_long"] == len(lens) - len(kept)
    assert {rec["id"] for rec in _rollouts(out, 1)} == kept

    # every prompt too long (through the CLI): the step is skipped and logged, the run finishes
    from typer.testing import CliRunner

    from vigorl_cli.cli.main import app

    sets = [f"data.root={demo_root}", "data.rl_train=[spatial_reasoning/vigorl_sat2_train_RL.jsonl]",
            "grpo.sampling.max_new_tokens=12", "grpo.gradient_checkpointing=false", *extra,
            f"grpo.max_prompt_len={min(lens.values()) - 1}"]
    res = CliRunner().invoke(app, ["grpo", "--out", str(tmp_path / "h"), *(a for kv in sets for a in ("--set", kv))])
    assert res.exit_code == 0, res.output
    m = _metrics(tmp_path / "h")[0]
    assert m["skipped"] == 1 and m["prompts_dropped_too_long"] == 6
    assert json.loads((tmp_path / "h" / "summary.json").read_text())["rewards"] == [None]


# -- grpo.sampling.stop -----------------------------------------------------------------------------------------------

def test_rollout_stop_strings_add_to_the_multiturn_ones():
    from vigorl_cli.train.grpo import rollout_stops

    assert rollout_stops([], False) == ()
    assert rollout_stops(["</think>"], False) == ("</think>",)
    assert rollout_stops(["</think>", "</answer>"], True) == ("</tool_call>", "</answer>", "<|im_end|>", "</think>")


def test_user_stop_string_ends_hf_engine_generation_in_grpo_rollouts(tmp_path, demo_root):
    """Same seeds, same policy: with a stop string taken from the middle of an unstopped response, that response is
    cut right after the stop string's first occurrence (a prefix of the unstopped one), closed with <|im_end|>."""
    from vigorl_cli.train.grpo import train

    base = ["grpo.steps=1", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.truncated=keep", "grpo.kl_coef=0.0",
            "grpo.sampling.max_new_tokens=16"]
    train(_recipe(demo_root, *base), out=tmp_path / "a", log=lambda *_: None)
    free = _rollouts(tmp_path / "a", 1)
    text = free[0]["turn_texts"][0]
    stop = next(text[k:k + 2] for k in range(4, len(text) - 6) if text[k:k + 2].strip() and text[k:k + 2].isprintable()
                and text.find(text[k:k + 2]) == k)
    train(_recipe(demo_root, *base, f"grpo.sampling.stop=[{json.dumps(stop)}]"), out=tmp_path / "b",
          log=lambda *_: None)
    cut = _rollouts(tmp_path / "b", 1)
    got = cut[0]["turn_texts"][0]
    assert stop in got and text.startswith(got) and len(got) < len(text)
    assert got.find(stop) == text.find(stop)  # cut after the first occurrence, within the token completing it
    assert cut[0]["ends_with_eos"] and cut[0]["segments"][-1]["kind"] == "forced"  # <|im_end|> appended


# -- truncated trajectories -------------------------------------------------------------------------------------------

def test_truncation_policies_on_hand_computed_rewards_and_loss_membership():
    import torch

    from vigorl_cli.train.grpo import apply_truncation_policy
    from vigorl_cli.train.losses import group_advantages

    rewards = torch.tensor([1.0, 0.5, 0.75, 0.25])
    trunc = torch.tensor([False, True, False, True])
    gids = torch.tensor([0, 0, 1, 1])
    r, keep = apply_truncation_policy(rewards, trunc, "penalize")
    assert r.tolist() == [1.0, 0.0, 0.75, 0.0] and keep.tolist() == [True] * 4
    # group 0: [1, 0]: mean 0.5, std (N-1) 0.7071 → ±0.7071; group 1: [0.75, 0]: ±0.375/0.5303 = ±0.7071
    assert group_advantages(r, gids).tolist() == pytest.approx([0.70711, -0.70711, 0.70711, -0.70711], abs=1e-4)
    r, keep = apply_truncation_policy(rewards, trunc, "mask")
    assert r.tolist() == [1.0, 0.5, 0.75, 0.25] and keep.tolist() == [True, False, True, False]
    # mask: the truncated response still counts in its group: group 0 [1, 0.5] → ±0.7071, trained only on the first
    assert group_advantages(r, gids)[keep].tolist() == pytest.approx([0.70711, 0.70711], abs=1e-4)
    r, keep = apply_truncation_policy(rewards, trunc, "keep")
    assert r.tolist() == [1.0, 0.5, 0.75, 0.25] and keep.tolist() == [True] * 4
    with pytest.raises(ValueError, match="truncated"):
        apply_truncation_policy(rewards, trunc, "drop")


def test_a_turn_cut_by_the_token_limit_is_a_truncated_trajectory(tiny_bundle):
    from PIL import Image

    from vigorl_cli.agent.episode import Episode, EpisodeConfig, run_episodes
    from vigorl_cli.data.schema import Sample
    from vigorl_cli.engines.base import Completion, SamplingParams
    from vigorl_cli.train.grpo import is_truncated
    from vigorl_cli.vision.frames import Frame

    class Scripted:
        def __init__(self, text, finish):
            self.text, self.finish = text, finish

        def generate(self, requests):
            ids = tiny_bundle.tokenizer(self.text, add_special_tokens=False)["input_ids"]
            return [[Completion(ids, self.text, [-0.5] * len(ids), self.finish, None)] for _ in requests]

    def episode(text, finish):
        s = Sample(id="s", images=["x.png"], question="<image>\nWhich?", answer="A", task="multiple_choice")
        ep = Episode(s, Image.new("RGB", (56, 56)), Frame.identity(56, 56), None, tiny_bundle.processor,
                     EpisodeConfig(sampling=SamplingParams(max_new_tokens=8)))
        run_episodes(Scripted(text, finish), [ep])
        return ep

    cut = episode("<think> the cat is", "length")  # ran out of tokens mid-thought: no <|im_end|>
    done = episode("<think> a </think><answer> A </answer><|im_end|>", "stop")
    assert is_truncated(cut) and not cut.ends_with_eos and "truncated" in cut.failures
    assert not is_truncated(done)


# -- multi-turn with a real zoom --------------------------------------------------------------------------------------

class FirstTurnZooms:
    """Wraps the HF engine of a GRPO run: every episode's first turn is a tool call at the image centre, returned
    with the live policy's own log-probs of those tokens (teacher-forced: one plain HF forward of the policy);
    later turns (with the crop in context: two images) are sampled by the wrapped HF engine."""

    def __init__(self, inner):
        self.inner, self.scripted, self.sampled_with_crops = inner, 0, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, requests):
        out = [None] * len(requests)
        rest = [k for k, r in enumerate(requests) if not r.request_id.endswith("/0")]
        for k, r in enumerate(requests):
            if r.request_id.endswith("/0"):
                out[k] = [self._tool_call(r)]
        self.sampled_with_crops += sum(len(requests[k].images) >= 2 for k in rest)
        for k, comps in zip(rest, self.inner.generate([requests[k] for k in rest]) if rest else []):
            out[k] = comps
        return out

    def _tool_call(self, r):
        from vigorl_cli.engines.base import Completion
        from vigorl_cli.models import prompts

        w, h = r.images[0].size
        text = f"<think> look at ({w // 2}, {h // 2}) </think>\n{prompts.tool_call_text(w // 2, h // 2)}"
        ids = self.inner.tok(text, add_special_tokens=False)["input_ids"]
        _, grid = self.inner.encode_images(r.images)
        full = self.inner.expand(list(r.prompt_ids) + ids, grid)
        lp = _hf_logprobs(self.inner.model, self.inner.processor, full, r.images)[-len(ids):]
        self.scripted += 1
        return Completion(ids, text, lp.tolist(), "stop", "</tool_call>")


def test_multiturn_grpo_step_with_a_zoom_crop(tmp_path, demo_root, monkeypatch):
    """A multi-turn step whose rollouts really crop: turn 1 is a tool call (scripted, scored with the policy's own
    log-probs), the crop is observed, turn 2 is sampled by the HF engine over both images. Checked: crops in the
    metrics; the trainer example has both images and a loss mask that is 1 exactly on the two assistant turns (the
    observation turn with the crop's tokens is 0); the trainer's forward sees two images per sequence; and the
    engine's log-probs (turn 1: teacher-forced HF forward; turn 2: HF generate with the crop in context) agree with
    the trainer's log-probs over the two-image sequence (M-RoPE over both images) to < 1e-4."""
    import vigorl_cli.engines.hf as hf_mod
    import vigorl_cli.train.batching as B
    import vigorl_cli.train.grpo as G
    from vigorl_cli.train.batching import IGNORE, image_token_count
    from vigorl_cli.train.grpo import train

    engines, examples, grids = [], [], []
    real_engine, orig_ex, orig_fwd = hf_mod.HFEngine, G._expanded_example, B.LogProbModel.forward

    def make_engine(*a, **kw):
        engines.append(FirstTurnZooms(real_engine(*a, **kw)))
        return engines[-1]

    def capture_example(ep, processor, image_token_id, sid):
        ex = orig_ex(ep, processor, image_token_id, sid)
        examples.append((ep, ex))
        return ex

    def capture_forward(self, *a, **kw):
        if kw.get("image_grid_thw") is not None and kw.get("input_ids") is not None:
            pos = kw.get("position_ids")
            packed = pos is not None and pos.shape[0] == 4  # one row; row 0 restarts at 0 for every sequence
            rows = int((pos[0, 0] == 0).sum()) if packed else kw["input_ids"].shape[0]
            grids.append((rows, kw["image_grid_thw"].shape[0]))
        return orig_fwd(self, *a, **kw)

    monkeypatch.setattr(hf_mod, "HFEngine", make_engine)
    monkeypatch.setattr(G, "_expanded_example", capture_example)
    monkeypatch.setattr(B.LogProbModel, "forward", capture_forward)
    r = _recipe(demo_root, "grpo.steps=1", "tool.enabled=true", "tool.offset=40", "tool.crop_size=56",
                "data.rl_train=[visual_search/vigorl_SA_RL.jsonl]", "prompt.preset=vstar", "grpo.truncated=keep",
                "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.responses_per_update=4",
                "grpo.micro_batch_size=2", "reward.accuracy_weight=0.6", "reward.format_weight=0.4")
    out = tmp_path / "g"
    train(r, out=out, log=lambda *_: None)
    m = _metrics(out)[0]
    eng = engines[0]
    assert eng.inner.bundle.kind == "qwen2_5_vl"  # the family, so the engine shares a group's image encodings
    assert eng.scripted == 4 and eng.sampled_with_crops == 4  # every episode: tool call, then a turn over 2 images
    assert m["crops"] == 1.0 and m["turns"] == 2.0 and m["trained_frac"] == 1.0
    assert all(rec["crops"] and rec["segments"][3]["kind"] == "observation" for rec in _rollouts(out, 1))

    proc = eng.inner.processor
    assert len(examples) == 4
    for ep, ex in examples:
        assert len(ex.images) == 2 and [s.kind for s in ep.segments][:4] == ["prompt", "sampled", "forced",
                                                                            "observation"]
        # expected mask, built from the segments: 1 on sampled tokens, 0 on everything else (crop tokens included)
        counts = iter(image_token_count(proc, im.size) for im in ex.images)
        pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        want = []
        for sgm in ep.segments:
            for t in sgm.ids:
                want.extend([int(sgm.kind == "sampled")] * (next(counts) if t == pad else 1))
        got = [int(lab != IGNORE) for lab in ex.labels]
        assert got == want and len(got) == len(ex.input_ids)
        obs = ep.segments[3]
        start = sum(len(s.ids) for s in ep.segments[:3]) + image_token_count(proc, ex.images[0].size) - 1
        span = len(obs.ids) + image_token_count(proc, ex.images[1].size) - 1
        assert all(lab == IGNORE for lab in ex.labels[start:start + span])  # the observation turn: masked
        assert sum(got) == sum(len(s.ids) for s in ep.segments if s.kind == "sampled")
    assert grids and all(n_img == 2 * rows for rows, n_img in grids)  # two images per trained sequence
    assert m["logprob_diff_engine_vs_trainer"] < 1e-4


# -- resume after kill -9 ---------------------------------------------------------------------------------------------

KILL_SETS = ["grpo.steps=3", "grpo.lr=1e-3", "grpo.prompts_per_step=2", "grpo.group_size=4",
             "grpo.responses_per_update=4", "grpo.micro_batch_size=4", "grpo.keep_last=3"]


@pytest.mark.slow
def test_grpo_killed_after_its_first_checkpoint_resumes_to_the_uninterrupted_run(tmp_path, demo_root):
    """`vigorl grpo` as a subprocess, SIGKILLed as soon as its first checkpoint is in place, then resumed on the same
    --out: every step's rewards, loss, grad norm and KL equal those of an uninterrupted run (same prompt order, RNG,
    optimizer state)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from vigorl_cli.train.grpo import train

    tests = Path(__file__).resolve().parent
    out = tmp_path / "killed"
    args = ["grpo", "--out", str(out)]
    for o in [f"data.root={demo_root}", "data.rl_train=[spatial_reasoning/vigorl_sat2_train_RL.jsonl]",
              "grpo.sampling.max_new_tokens=12", "grpo.save_every=1", "grpo.gradient_checkpointing=false",
              "grpo.kl_coef=0.01", *KILL_SETS, "reward.preset=test_grpo:vowel_reward"]:
        args += ["--set", o]
    env = dict(os.environ, VIGORL_QUIET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]))
    log = (tmp_path / "stderr.txt").open("w")
    p = subprocess.Popen([sys.executable, "-m", "vigorl_cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=log)
    first = out / "checkpoints" / "step-000001"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not first.exists():
        time.sleep(0.01)
    running = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.wait()
    log.close()
    assert running, (tmp_path / "stderr.txt").read_text()[-3000:]  # the kill landed mid-run
    assert first.exists() and not (out / "summary.json").exists()

    # resume in-process (the same recipe; the plug-in reward given directly)
    resumed = train(_recipe(demo_root, *KILL_SETS), out=out, reward_fn=vowel_reward, log=lambda *_: None)
    assert resumed["resumed_from"] >= 1
    full = train(_recipe(demo_root, *KILL_SETS), out=tmp_path / "full", reward_fn=vowel_reward, log=lambda *_: None)
    assert resumed["rewards"] == pytest.approx(full["rewards"], abs=1e-6)
    got, want = _metrics(out), _metrics(tmp_path / "full")
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3]
    for a, b in zip(got, want):
        for k in ("reward", "loss", "grad_norm", "kl", "pg_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)


@pytest.mark.parametrize("variant", [("grpo.loss_agg=seq_mean_token_mean", "grpo.objective=gspo"),
                                     ("grpo.kl_in=reward", "grpo.loss_agg=token_mean")])
def test_packed_and_padded_micro_batches_give_the_same_step(tmp_path, demo_root, variant):
    """grpo.packing only changes how trajectories reach the model: sequence aggregation, GSPO's sequence ratios and
    the in-reward KL still see one row per trajectory (train/grpo.py _rows), so one step is the same either way."""
    from vigorl_cli.train.grpo import train

    got = {}
    for packing in ("true", "false"):
        r = _recipe(demo_root, "grpo.steps=1", "grpo.lr=1e-2", "grpo.save_every=100", f"grpo.packing={packing}",
                    *variant)
        out = tmp_path / packing
        train(r, out=out, reward_fn=vowel_reward, log=lambda *_: None)
        got[packing] = _metrics(out)[0]
    a, b = got["true"], got["false"]
    for key in ("reward", "loss", "kl", "grad_norm", "entropy", "clip_frac", "logprob_diff_engine_vs_trainer"):
        if a.get(key) is None and b.get(key) is None:
            continue
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert a["loss"] != 0.0 and a["grad_norm"] > 0.0


def test_rollout_copy_is_a_bf16_snapshot_refreshed_in_place(tiny_bundle):
    """engine.static_cache on a GPU rolls out on a bf16 copy of the fp32 policy: same structure, refreshed in place
    after each update, and a static KV cache works on it (it does not under autocast over fp32 weights)."""
    import copy

    import torch

    from vigorl_cli.engines.base import GenerationRequest, SamplingParams
    from vigorl_cli.engines.hf import HFEngine
    from vigorl_cli.models.load import ModelBundle
    from vigorl_cli.train.grpo import rollout_copy, sync_rollout_copy

    from vigorl_cli.models.packed_attention import install_packed_attention, uses_packed_attention

    policy = copy.deepcopy(tiny_bundle.model)
    assert install_packed_attention(policy)  # what the trainer's LogProbModel does to the policy
    shadow = rollout_copy(policy, torch.bfloat16)
    assert uses_packed_attention(policy) and not uses_packed_attention(shadow)  # the copy generates on plain sdpa
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in shadow.parameters())
    ptrs = [p.data_ptr() for p in shadow.parameters()]
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5)
    sync_rollout_copy(shadow, policy)
    assert [p.data_ptr() for p in shadow.parameters()] == ptrs  # in place
    for (n, p), (_, q) in zip(policy.named_parameters(), shadow.named_parameters()):
        assert torch.equal(q, p.to(torch.bfloat16)), n
    msgs = [{"role": "user", "content": "hi"}]
    ids = tiny_bundle.tokenizer(tiny_bundle.processor.apply_chat_template(msgs, tokenize=False,
                                                                         add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"]
    req = GenerationRequest(ids, [], SamplingParams(max_new_tokens=4, seed=1))
    eng = HFEngine(ModelBundle(shadow, tiny_bundle.processor, "x", "qwen2_5_vl"), static_cache=True)
    plain = eng.generate([req])[0][0]
    assert len(plain.token_ids) == 4
    # model.compile: the copy gets a regional compile of its own; the static decode loop samples the same tokens
    from vigorl_cli.models.compile import is_compiled

    compiled = rollout_copy(policy, torch.bfloat16, compile_options={"backend": "aot_eager"})
    assert is_compiled(compiled) and not is_compiled(policy)
    got = HFEngine(ModelBundle(compiled, tiny_bundle.processor, "x", "qwen2_5_vl"), static_cache=True).generate([req])
    assert got[0][0].token_ids == plain.token_ids


def test_continuous_batching_engine_gives_the_same_grpo_steps(tmp_path, demo_root, monkeypatch):
    """engine.continuous_batching (HFStreamingEngine, the no-barrier episode loop) samples what the batched HF
    engine samples: two GRPO steps give the same rollouts and the same metrics — also with the images encoded
    ahead of their prefill and processed in background threads (engine.vision_ahead, engine.prepare_threads; the
    update between the steps makes the first step's features stale)."""
    from vigorl_cli.engines.hf_stream import HFStreamingEngine
    from vigorl_cli.train.grpo import train

    submitted, engines = [], []
    orig = HFStreamingEngine.submit

    def submit(self, r, tag):
        submitted.append(tag)
        if self not in engines:
            engines.append(self)
        return orig(self, r, tag)

    monkeypatch.setattr(HFStreamingEngine, "submit", submit)

    got = {}
    ahead = ["engine.vision_ahead=true", "engine.prepare_threads=2"]
    for name, sets in (("batched", ["engine.continuous_batching=false"]),
                       ("streaming", ["engine.continuous_batching=true"]),
                       ("ahead", ["engine.continuous_batching=true", *ahead])):
        r = _recipe(demo_root, "grpo.steps=2", "grpo.lr=1e-2", "grpo.save_every=100", "engine.batch_size=6", *sets)
        out = tmp_path / name
        train(r, out=out, reward_fn=vowel_reward, log=lambda *_: None)
        got[name] = (_metrics(out), [[(rec["key"], rec["transcript"], rec["segments"])
                                      for rec in _rollouts(out, s)] for s in (1, 2)])
    ma, ra = got["batched"]
    assert len(ra[0]) == 16 and len(submitted) == 2 * 2 * 16  # each episode's turn is its own request
    streaming, ahead_engine = engines
    assert (streaming.ahead_images, streaming.prefill_images) == (0, 8)  # 4 prompts' images per step
    assert (ahead_engine.ahead_images, ahead_engine.prefill_images) == (8, 0)
    for name in ("streaming", "ahead"):
        mb, rb = got[name]
        assert ra == rb, name
        for a, b in zip(ma, mb):
            for key in ("reward", "loss", "kl", "grad_norm", "logprob_diff_engine_vs_trainer"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (name, key)
