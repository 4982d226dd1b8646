"""The episode loop: reference multi-turn semantics, token-exact segments, loss mask, budgets, failures."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vigorl_cli.agent.episode import Episode, EpisodeConfig, run_episodes
from vigorl_cli.data.schema import Sample
from vigorl_cli.engines.base import Completion, SamplingParams
from vigorl_cli.engines.hf import HFEngine
from vigorl_cli.models import prompts
from vigorl_cli.models.load import mm_token_type_ids
from vigorl_cli.vision.frames import Frame
from vigorl_cli.vision.zoom import ZoomTool


class ScriptedEngine:
    """Returns scripted turn texts (tokenized), so the loop's decisions can be checked exactly."""

    name = "scripted"

    def __init__(self, tok, turns: list[str], finish="stop"):
        self.tok, self.turns, self.finish, self.seen = tok, list(turns), finish, []

    def generate(self, requests):
        out = []
        for r in requests:
            self.seen.append(r)
            text = self.turns.pop(0)
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            out.append([Completion(ids, text, [-0.5] * len(ids), self.finish, "stop")])
        return out

    def close(self):
        pass


def _sample():
    return Sample(id="s1", images=["x.png"], question="<image>\nWhat colour is the star?\nA. red\nB. blue",
                  answer="red", choices=["red", "blue"], task="multiple_choice")


def _episode(bundle, **kw):
    img = Image.new("RGB", (224, 168), (240, 240, 240))
    cfg = EpisodeConfig(sampling=SamplingParams(max_new_tokens=64), multiturn=True,
                        zoom=ZoomTool(offset=40, crop_size=56, draw_dot=False), **kw)
    return Episode(_sample(), img, Frame.identity(224, 168), prompts.system_prompt("vstar", "multiturn"),
                   bundle.processor, cfg, seed=1)


def _call(x, y):
    return f"<think> look at ({x}, {y}) </think>\n{prompts.tool_call_text(x, y)}"


def test_multiturn_tool_calls_then_answer(tiny_bundle):
    ep = _episode(tiny_bundle)
    eng = ScriptedEngine(tiny_bundle.tokenizer, [_call(10, 20), _call(100, 90), "<think> red </think>\n<answer> red </answer>"])
    run_episodes(eng, [ep])
    assert ep.done and ep.finish == "answered" and ep.answer == "red" and ep.turns == 3
    assert [c["point"] for c in ep.crops] == [[10, 20], [100, 90]]
    assert len(ep.images) == 3 and [r.images.__len__() for r in eng.seen] == [1, 2, 3]
    kinds = [s.kind for s in ep.segments]
    assert kinds == ["prompt", "sampled", "forced", "observation", "sampled", "forced", "observation", "sampled",
                     "forced"]
    # each request's prompt ids are the previous ids plus what was appended: built incrementally, never re-encoded
    assert eng.seen[1].prompt_ids == [t for s in ep.segments[:4] for t in s.ids]
    # loss mask is 1 exactly on sampled tokens
    mask = ep.loss_mask()
    ids = ep.prompt_ids
    sampled = sum(len(s.ids) for s in ep.segments if s.kind == "sampled")
    assert sum(mask) == sampled and len(mask) == len(ids)
    assert ep.ends_with_eos
    # the observation turn has the reference text and exactly one image placeholder
    obs = ep.segments[3].text
    assert obs.startswith("\n<|im_start|>user\n<observation>\nHere is the crop of the image centered on the coordinate:")
    assert obs.count("<|image_pad|>") == 1 and obs.endswith("<|im_start|>assistant\n")


def test_forced_answer_prefix_with_the_crop_that_reaches_max_images(tiny_bundle):
    ep = _episode(tiny_bundle, max_images=3)
    eng = ScriptedEngine(tiny_bundle.tokenizer, [_call(10, 20), _call(30, 40), " blue </answer>"])
    run_episodes(eng, [ep])
    assert ep.finish == "answered" and ep.answer == "blue"
    forced = [s for s in ep.segments if s.kind == "forced" and "<answer>" in s.text]
    assert forced and forced[0].text == prompts.FORCED_ANSWER_PREFIX
    # the forced text is not trained on
    start = sum(len(s.ids) for s in ep.segments[:ep.segments.index(forced[0])])
    assert set(ep.loss_mask()[start:start + len(forced[0].ids)]) == {0}
    assert ep.turn_texts[-1].startswith(prompts.FORCED_ANSWER_PREFIX)


def test_turn_without_tool_call_or_answer_ends_the_episode(tiny_bundle):
    ep = _episode(tiny_bundle)
    run_episodes(ScriptedEngine(tiny_bundle.tokenizer, ["<think> hmm </think>"]), [ep])
    assert ep.finish == "no_action" and ep.answer is None and "no_answer_tag" in ep.failures


def test_tool_call_outside_image_is_a_recorded_failure(tiny_bundle):
    ep = _episode(tiny_bundle)
    run_episodes(ScriptedEngine(tiny_bundle.tokenizer, [_call(999, 20)]), [ep])
    assert ep.finish == "tool_error" and "point_outside_image" in ep.failures
    ep2 = _episode(tiny_bundle)
    run_episodes(ScriptedEngine(tiny_bundle.tokenizer, ["<think>x</think><tool_call>{oops</tool_call>"]), [ep2])
    assert ep2.finish == "tool_error" and "bad_tool_json" in ep2.failures


def test_response_budget_stops_before_overflowing(tiny_bundle):
    ep = _episode(tiny_bundle, max_response_tokens=60)
    run_episodes(ScriptedEngine(tiny_bundle.tokenizer, [_call(10, 20)] * 5), [ep])
    assert ep.finish == "budget" and "truncated" in ep.failures
    assert ep.response_tokens() < 60


def test_hf_engine_multiturn_transcript_feeds_back_through_the_model(tiny_bundle):
    """Real engine: a random model rarely calls the tool, so script the first turn and let the model continue;
    the final ids + all images must run through a forward pass (placeholders and images stay in sync), and the
    engine's log-probs of the sampled tokens must equal the forward pass's."""
    eng = HFEngine(tiny_bundle, batch_size=4)
    eps = [_episode(tiny_bundle) for _ in range(3)]
    for ep in eps:  # first turn scripted: a tool call
        ep.feed(ScriptedEngine(tiny_bundle.tokenizer, [_call(50, 60)]).generate([ep.request()])[0][0])
    run_episodes(eng, eps)
    for ep in eps:
        assert ep.done and len(ep.images) == 2
        pv, grid = eng.encode_images([si.image for si in ep.images])
        ids = torch.tensor([eng.expand(ep.prompt_ids, grid)])
        with torch.no_grad():
            out = tiny_bundle.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv,
                                    image_grid_thw=grid, mm_token_type_ids=mm_token_type_ids(ids, tiny_bundle.config))
        seg = ep.segments[-2] if ep.segments[-1].kind == "forced" else ep.segments[-1]
        assert seg.kind == "sampled"
        end = ids.shape[1] - (1 if ep.segments[-1].kind == "forced" else 0)
        start = end - len(seg.ids)
        lp = torch.log_softmax(out.logits[0, start - 1:end - 1].float(), -1)
        lp = lp.gather(-1, torch.tensor(seg.ids)[:, None]).squeeze(-1)
        assert torch.allclose(lp, torch.tensor(seg.logprobs), atol=1e-4)


def test_seeded_episodes_are_repeatable(tiny_bundle):
    eng = HFEngine(tiny_bundle, batch_size=4)
    a, b = _episode(tiny_bundle), _episode(tiny_bundle)
    run_episodes(eng, [a])
    run_episodes(eng, [b, _episode(tiny_bundle)])  # in a different batch
    assert a.prompt_ids == b.prompt_ids


# -- observation text: exactly the reference's, per style ---------------------------------------------------------
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
# reference §5.5 (GRPO rollout, what the released RL checkpoints were trained with), literal from the rollout code
REF_RL = ("\n<|im_start|>user\n<observation>\nHere is the crop of the image centered on the coordinate{dot}:\n"
          "<|vision_start|><|image_pad|><|vision_end|></observation><|im_end|>\n<|im_start|>assistant\n")
# reference §2.2 (multi-turn SFT data: "...:\n<image>\n</observation>", qwen2_vl template puts the vision tokens there)
REF_SFT = ("\n<|im_start|>user\n<observation>\nHere is the crop of the image centered on the coordinate{dot}:\n"
           "<|vision_start|><|image_pad|><|vision_end|>\n</observation><|im_end|>\n<|im_start|>assistant\n")
DOT = ", with a red dot at the coordinate location"


def _observed(bundle, style, draw_dot):
    img = Image.new("RGB", (224, 168), (240, 240, 240))
    cfg = EpisodeConfig(sampling=SamplingParams(max_new_tokens=64), multiturn=True, observation_style=style,
                        zoom=ZoomTool(offset=40, crop_size=56, draw_dot=draw_dot))
    ep = Episode(_sample(), img, Frame.identity(224, 168), prompts.system_prompt("vstar", "multiturn"),
                 bundle.processor, cfg, seed=1)
    run_episodes(ScriptedEngine(bundle.tokenizer, [_call(10, 20), "<think> red </think>\n<answer> red </answer>"]),
                 [ep])
    (obs,) = [s for s in ep.segments if s.kind == "observation"]
    return ep, obs


def test_observation_text_is_the_reference_string_for_each_style(tiny_bundle):
    tok = tiny_bundle.tokenizer
    assert EpisodeConfig().observation_style == "rl"  # the released RL checkpoints' text by default
    for draw_dot in (False, True):
        dot = DOT if draw_dot else ""
        for style, ref in (("rl", REF_RL.format(dot=dot)), ("sft", REF_SFT.format(dot=dot))):
            _, obs = _observed(tiny_bundle, style, draw_dot)
            assert obs.text == ref, (style, draw_dot)
            assert obs.ids == tok(ref, add_special_tokens=False)["input_ids"]  # tokenized once, as the text
    # reference §6.4 (eval wrapper): the observation is a chat message [text, image, text] that never mentions the
    # dot; the whole conversation must be what the chat template renders for the reference's messages
    for draw_dot in (False, True):
        ep, obs = _observed(tiny_bundle, "eval", draw_dot)
        ref_msgs = [{"role": "system", "content": prompts.system_prompt("vstar", "multiturn")},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _sample().prompt_text()}]},
                    {"role": "assistant", "content": _call(10, 20)},
                    {"role": "user", "content": [
                        {"type": "text", "text": "<observation>\nHere is the crop of the image centered on the coordinate:"},
                        {"type": "image"}, {"type": "text", "text": "\n</observation>"}]}]
        rendered = tiny_bundle.processor.apply_chat_template(ref_msgs, tokenize=False, add_generation_prompt=True)
        upto = "".join(s.text for s in ep.segments[:ep.segments.index(obs) + 1])
        assert upto == rendered
        assert obs.text == ("\n<|im_start|>user\n<observation>\nHere is the crop of the image centered on the "
                            f"coordinate:{VISION}\n</observation><|im_end|>\n<|im_start|>assistant\n")
    bad = EpisodeConfig(multiturn=True, observation_style="chat",
                        zoom=ZoomTool(offset=40, crop_size=56, draw_dot=False))
    ep = Episode(_sample(), Image.new("RGB", (224, 168)), Frame.identity(224, 168), None, tiny_bundle.processor, bad)
    with pytest.raises(ValueError, match="observation_style"):
        run_episodes(ScriptedEngine(tiny_bundle.tokenizer, [_call(10, 20)]), [ep])


def test_recipe_observation_style_reaches_eval_grpo_and_mcts():
    from vigorl_cli.eval.benchmarks import get_benchmark
    from vigorl_cli.eval.runner import EvalSettings, episode_config
    from vigorl_cli.recipe import load_recipe
    from vigorl_cli.search.mcts import MCTSSettings
    from vigorl_cli.train.grpo import rollout_episode_config

    b = get_benchmark("demo-vsearch")
    for style, eval_style, compat_style in (("auto", "rl", "eval"), ("sft", "sft", "sft"), ("eval", "eval", "eval")):
        r = load_recipe(None, [f"tool.observation_style={style}"])
        assert rollout_episode_config(r, True).observation_style == eval_style
        assert MCTSSettings.from_recipe(r).observation_style == eval_style
        for compat, want in ((False, eval_style), (True, compat_style)):
            st = EvalSettings(data_root=".", out_dir=".", compat=compat, observation_style=r.tool.observation_style)
            assert episode_config(b, st, True).observation_style == want
