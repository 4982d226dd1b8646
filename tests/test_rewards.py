"""rewards.presets: reference reward numbers by hand, compat vs default, diversity bonus, plug-in loading."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from vigorl_cli.data.schema import Sample, Target
from vigorl_cli.errors import RecipeError
from vigorl_cli.rewards.presets import (
    PARTS,
    RewardInput,
    build_reward,
    count_distinct,
    diversity_bonus_value,
    get_reward,
    grounded_thinking,
    load_reward,
    multiturn,
    vanilla_thinking,
)

BOX = "(10, 20, 110, 220)"


def grounding(response, **kw):
    s = Sample(id="g", images=["s.png"], question="Click the icon", answer=BOX, target=Target(box=(10, 20, 110, 220)),
               task="grounding")
    return RewardInput(response=response, sample=s, **kw)


def sat(response, answer="rotated left", choices=("rotated left", "rotated right")):
    s = Sample(id="s", images=["s.png"], question="How did the camera move?", answer=answer, choices=list(choices),
               task="multiple_choice")
    return RewardInput(response=response, sample=s)


def vqa(response, answer="red", **kw):
    s = Sample(id="v", images=["v.png"], question="What colour is the sign?", answer=answer, task="vqa")
    return RewardInput(response=response, sample=s, **kw)


def approx(parts, **expected):
    return all(parts[k] == pytest.approx(v) for k, v in expected.items())


# -- single-turn grounded thinking (reference *_grounded_thinking.py) ----------------------------------------------

def test_rewards_return_all_named_parts():
    assert set(grounded_thinking(grounding("x"))) == set(PARTS)
    assert set(multiturn(vqa("x"))) == set(PARTS)


def test_grounded_thinking_perfect_grounding_response():
    # acc 1 (50,60 in box), fmt 1, grounded 1 → 0.5·1 + 0.5·1·1 = 1.0
    r = grounded_thinking(grounding("<think>The icon is near (50, 60).</think>\n<answer>(50, 60)</answer>"))
    assert approx(r, overall=1.0, accuracy=1.0, format=1.0, grounding=1.0, diversity=0.0)


def test_grounded_thinking_gates_format_on_a_point_in_the_first_think():
    # acc 1, fmt 1, grounded 0 → 0.5·1 + 0.5·1·0 = 0.5 ; vanilla has no gate → 0.5 + 0.5 = 1.0
    resp = "<think>The icon is in the corner.</think><answer>(50, 60)</answer>"
    assert approx(grounded_thinking(grounding(resp)), overall=0.5, format=1.0, grounding=0.0)
    assert approx(vanilla_thinking(grounding(resp)), overall=1.0, format=1.0, grounding=0.0)


def test_grounded_thinking_wrong_point_gets_format_half():
    # acc 0 (500 > 110), fmt 1, grounded 1 → 0.5
    r = grounded_thinking(grounding("<think>At (500, 60).</think><answer>(500, 60)</answer>"))
    assert approx(r, overall=0.5, accuracy=0.0)


def test_grounded_thinking_float_answer_compat_vs_default():
    # format needs (int, int) in both modes → fmt 0. compat: acc 0 (floats) → 0.0; default: acc 1 → 0.5·1 = 0.5
    resp = "<think>At (50, 60).</think><answer>(50.5, 60)</answer>"
    assert approx(grounded_thinking(grounding(resp), compat=True), overall=0.0, accuracy=0.0, format=0.0)
    assert approx(grounded_thinking(grounding(resp)), overall=0.5, accuracy=1.0, format=0.0)


def test_grounded_thinking_multiline_answer_is_a_reference_bug_fixed_by_default():
    # FMT is DOTALL → fmt 1 and the shape check strips the content → 1; grounded 1.
    # compat accuracy regex has no DOTALL → no match → whole response literal_eval fails → acc 0 → 0.5
    resp = "<think>At (50, 60).</think><answer>\n(50, 60)\n</answer>"
    assert approx(grounded_thinking(grounding(resp), compat=True), overall=0.5, accuracy=0.0, format=1.0)
    assert approx(grounded_thinking(grounding(resp)), overall=1.0, accuracy=1.0)


def test_grounded_thinking_untagged_answer_earns_accuracy_only_in_compat():
    # compat: no <answer> → the whole response "(50, 60)" is judged → acc 1; fmt 0 → 0.5. default: acc 0 → 0.0
    assert approx(grounded_thinking(grounding("(50, 60)"), compat=True), overall=0.5, accuracy=1.0)
    assert approx(grounded_thinking(grounding("(50, 60)")), overall=0.0, accuracy=0.0)


def test_grounded_thinking_leading_text_breaks_the_full_match():
    # fmt 0 (text before <think>), acc 1 → 0.5
    r = grounded_thinking(grounding("Sure! <think>At (50, 60).</think><answer>(50, 60)</answer>"))
    assert approx(r, overall=0.5, format=0.0)


def test_grounded_thinking_weights_come_from_arguments():
    # acc 1, fmt 1, grounded 0 with weights 0.7 / 0.3 → 0.7·1 + 0.3·1·0 = 0.7
    resp = "<think>The icon is in the corner.</think><answer>(50, 60)</answer>"
    assert grounded_thinking(grounding(resp), accuracy_weight=0.7, format_weight=0.3)["overall"] == pytest.approx(0.7)


def test_string_reward_strips_option_prefix():
    # "A. rotated left" → "rotated left" == GT → acc 1; fmt 1 (non-empty); grounded 1 → 1.0
    r = grounded_thinking(sat("<think>The door at (5, 5) moved.</think><answer>A. rotated left</answer>"))
    assert approx(r, overall=1.0, accuracy=1.0)


def test_string_reward_letter_answer_compat_vs_default():
    # compat: "A" != "rotated left" → acc 0 → 0.5·0 + 0.5·1·1 = 0.5 ; default maps A → "rotated left" → 1.0
    resp = "<think>The door at (5, 5) moved.</think><answer>A</answer>"
    assert grounded_thinking(sat(resp), compat=True)["overall"] == pytest.approx(0.5)
    assert grounded_thinking(sat(resp))["overall"] == pytest.approx(1.0)


def test_string_reward_capitalised_gt_never_matches_in_compat():
    # reference compares pred.lower() with gt.strip() (GT not lower-cased): "yes" != "Yes" → acc 0
    resp = "<think>At (5, 5).</think><answer>Yes</answer>"
    assert sat(resp, answer="Yes", choices=()).sample.answer == "Yes"
    assert grounded_thinking(sat(resp, answer="Yes", choices=()), compat=True)["accuracy"] == 0.0
    assert grounded_thinking(sat(resp, answer="Yes", choices=()))["accuracy"] == 1.0


def test_string_reward_empty_answer_fails_format():
    # fmt needs a non-empty answer → 0; acc 0 → 0.0
    assert grounded_thinking(sat("<think>At (5, 5).</think><answer> </answer>"))["overall"] == 0.0


def test_web_action_reward_gives_half_credit_for_the_verb():
    # acc = 0.5 ("click" in gt) + 0 (13 != 12); fmt 1 (no answer-shape check), grounded 1 → 0.5·0.5 + 0.5 = 0.75
    s = Sample(id="w", images=[], question="OBJECTIVE: buy", answer="click [12]", task="web_action")
    r = grounded_thinking(RewardInput("<think>The cart (5, 5) is [12].</think><answer>click [13]</answer>", s))
    assert approx(r, overall=0.75, accuracy=0.5, format=1.0)


def test_named_presets_fix_the_task():
    # "point_in_box" preset ignores sample.task and scores a box GT; "string_match" uses exact string accuracy
    s = Sample(id="x", images=[], question="q", answer=BOX, task="vqa")
    resp = "<think>At (50, 60).</think><answer>(50, 60)</answer>"
    assert get_reward("point_in_box")(RewardInput(resp, s))["accuracy"] == 1.0
    assert get_reward("string_match")(RewardInput(resp, s))["accuracy"] == 0.0


def test_gt_override_takes_a_target_in_the_model_frame():
    # the image was shown at half size: GT box (5, 10, 55, 110); the model's (50, 60) is judged in that frame
    resp = "<think>At (50, 60).</think><answer>(50, 60)</answer>"
    inp = grounding(resp, gt=Target(box=(5, 10, 55, 110), frame="model"))
    assert grounded_thinking(inp)["accuracy"] == 1.0
    inp = grounding(resp.replace("50, 60", "60, 60"), gt=Target(box=(5, 10, 55, 110), frame="model"))
    assert grounded_thinking(inp)["accuracy"] == 0.0


# -- multi-turn (reference *_multicrop.py / string_match_multiturn.py) ---------------------------------------------

def call(x, y):
    return '<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": [%s, %s]}}\n</tool_call>' % (x, y)


OBS = "\nuser\n<observation>\nHere is the crop of the image centered on the coordinate:\n</observation>\nassistant\n"
FINAL = "<think> Based on all the information I've gathered, I'll now provide my final answer. </think>\n<answer>"


def transcript(points, answer="red"):
    turns = "".join(f"<think> Look at region {i}. </think>\n{call(x, y)}{OBS}" for i, (x, y) in enumerate(points))
    return turns + FINAL + f" {answer} </answer>"


def test_multiturn_two_distinct_crops_get_one_bonus():
    # acc 1, format 1, k = 2 → diversity 0.2·(2−1) = 0.2 → 0.6·1 + 0.4·(1 + 0.2) = 1.08
    r = multiturn(vqa(transcript([(100, 80), (600, 300)])))
    assert approx(r, overall=1.08, accuracy=1.0, format=1.0, diversity=0.2, grounding=1.0)


@pytest.mark.parametrize("n, bonus", [(0, 0.0), (1, 0.0), (2, 0.2), (3, 0.4), (4, 0.6), (5, 0.6)])
def test_multiturn_diversity_bonus_for_n_distinct_crops(n, bonus):
    # k = min(n, 4) distinct crops 100 px apart → 0.2·(k−1); 5 crops are capped at 4 → 0.6
    r = multiturn(vqa(transcript([(100 * (i + 1), 100) for i in range(n)])))
    assert r["diversity"] == pytest.approx(bonus)
    assert r["overall"] == pytest.approx(0.6 + 0.4 * (1 + bonus))


def test_multiturn_diversity_uncapped_matches_reference_code_for_five_crops():
    # reference code has no cap (its rollout stops at 4 crops): 5 distinct → 0.2·4 = 0.8
    r = multiturn(vqa(transcript([(100 * (i + 1), 100) for i in range(5)])), diversity_max_crops=None)
    assert r["diversity"] == pytest.approx(0.8)


def test_near_duplicate_crops_do_not_count():
    # (100,100)→(105,105): 7.07 px < 10 → one crop → no bonus; (100,100)→(110,100): exactly 10 px → counts
    assert multiturn(vqa(transcript([(100, 100), (105, 105)])))["diversity"] == 0.0
    assert multiturn(vqa(transcript([(100, 100), (110, 100)])))["diversity"] == pytest.approx(0.2)


def test_distinct_count_is_greedy_in_order():
    # (8,0) is dropped (8 px from (0,0)); (16,0) is 16 px from the kept (0,0) → k = 2 though it is 8 px from (8,0)
    assert count_distinct([(0, 0), (8, 0), (16, 0)]) == 2
    assert diversity_bonus_value([(0, 0), (8, 0), (16, 0)]) == pytest.approx(0.2)
    assert diversity_bonus_value([(0, 0), (50, 0)], bonus=0.5, min_dist=60) == 0.0


def test_multiturn_without_crops_is_a_valid_single_answer():
    # think → answer: format 1, k = 0 → no bonus → 0.6 + 0.4 = 1.0; grounding (informational) 0
    r = multiturn(vqa("<think> It is red. </think>\n<answer> red </answer>"))
    assert approx(r, overall=1.0, diversity=0.0, grounding=0.0)


def test_multiturn_broken_transcript_gets_no_format_and_no_bonus():
    # no final </answer> → format 0, diversity 0; compat accuracy judges the whole text → wrong → 0
    t = transcript([(100, 80), (600, 300)]).replace(" red </answer>", " red")
    assert approx(multiturn(vqa(t)), overall=0.0, format=0.0, diversity=0.0)
    # observation missing after a tool call → bad tag order → format 0, accuracy still counts: 0.6·1
    t = transcript([(100, 80), (600, 300)]).replace(OBS, "\n", 1)
    assert approx(multiturn(vqa(t)), overall=0.6, format=0.0)


def test_multiturn_float_tool_coordinate_fails_format():
    # reference: every tool-call coordinate must be a list of 2 ints → format 0 → 0.6·1
    assert multiturn(vqa(transcript([(100.5, 80), (600, 300)])))["format"] == 0.0


def test_multiturn_unreadable_tool_body_passes_only_in_compat():
    # reference checks only bodies matching {...}; "<tool_call>junk</tool_call>" is skipped → format 1, k = 0
    t = "<think> a </think>\n<tool_call>junk</tool_call>" + OBS + FINAL + " red </answer>"
    assert approx(multiturn(vqa(t), compat=True), overall=1.0, format=1.0)
    assert approx(multiturn(vqa(t)), overall=0.6, format=0.0)


def test_multiturn_wrong_tool_name_passes_only_in_compat():
    t = transcript([(100, 80)]).replace("search_coordinate", "click")
    assert multiturn(vqa(t), compat=True)["format"] == 1.0
    assert multiturn(vqa(t))["format"] == 0.0


def test_multiturn_crop_outside_image_fails_format_by_default_when_size_known():
    t = transcript([(100, 80), (900, 300)])
    assert multiturn(vqa(t, image_size=(640, 480)))["format"] == 0.0
    assert multiturn(vqa(t, image_size=(640, 480)), compat=True)["format"] == 1.0
    assert multiturn(vqa(t))["format"] == 1.0  # no size given: not checked


def test_multiturn_string_accuracy_lowercases_both_and_keeps_prefixes():
    # string_match_multiturn: pred.lower() == gt.strip().lower(), no option-prefix stripping
    assert multiturn(vqa(transcript([]), answer=" Red "))["accuracy"] == 1.0
    assert multiturn(vqa(transcript([], answer="B. red")), compat=True)["accuracy"] == 0.0


def test_multiturn_point_answer_shape_and_accuracy():
    # grounding: answer must literal_eval to (int, int); (50, 60) inside → 0.6 + 0.4·(1 + 0.2) = 1.08
    r = multiturn(grounding(transcript([(100, 80), (600, 300)], answer="(50, 60)")))
    assert approx(r, overall=1.08, accuracy=1.0, format=1.0)
    r = multiturn(grounding(transcript([(100, 80)], answer="(50.5, 60)")), compat=True)
    assert approx(r, overall=0.0, format=0.0, accuracy=0.0)


def test_multiturn_accepts_a_list_of_assistant_turns():
    turns = [f"<think> Look at region 0. </think>\n{call(100, 80)}",
             f"<think> Look at region 1. </think>\n{call(600, 300)}",
             FINAL + " red </answer>"]
    r = multiturn(vqa(turns))
    assert approx(r, overall=1.08, format=1.0, diversity=0.2)


def test_multiturn_weights_and_bonus_come_from_arguments():
    # acc 1, format 1, k = 3 → 0.5·1 + 0.5·(1 + 0.1·2) = 1.1
    r = multiturn(vqa(transcript([(0, 0), (100, 0), (200, 0)])), accuracy_weight=0.5, format_weight=0.5,
                  diversity_bonus=0.1)
    assert r["overall"] == pytest.approx(1.1)


# -- construction from a RewardConfig and plug-ins ------------------------------------------------------------------

def cfg(**kw):
    base = dict(preset="auto", accuracy_weight=0.5, format_weight=0.5, diversity_bonus=0.2, diversity_max_crops=4,
                diversity_min_dist=10.0)
    base.update(kw)
    return SimpleNamespace(**base)


def test_build_reward_auto_picks_single_or_multi_turn():
    resp = "<think>The icon is in the corner.</think><answer>(50, 60)</answer>"
    assert build_reward(cfg())(grounding(resp))["overall"] == pytest.approx(0.5)   # grounded_thinking
    # multiturn with 0.6/0.4: think → answer passes the automaton → 0.6·1 + 0.4·1 = 1.0
    r = build_reward(cfg(accuracy_weight=0.6, format_weight=0.4), multiturn=True)(grounding(resp))
    assert r["overall"] == pytest.approx(1.0)


def test_build_reward_reads_the_real_reward_config():
    from vigorl_cli.recipe import RewardConfig

    resp = "<think>At (50, 60).</think><answer>(50, 60)</answer>"
    assert build_reward(RewardConfig())(grounding(resp))["overall"] == pytest.approx(1.0)


def test_unknown_preset_is_a_recipe_error():
    with pytest.raises(RecipeError):
        get_reward("nope")


def test_load_reward_from_file_and_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(inp):\n"
        "    return float(len(inp.text()))\n"
        "def parts(inp):\n"
        "    return {'overall': 1, 'bonus': inp.sample.answer == 'red'}\n")
    fn = load_reward(f"{tmp_path / 'my_rewards.py'}:length")
    assert fn(vqa("abc")) == {"overall": 3.0}
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    assert get_reward("my_rewards:parts")(vqa("x")) == {"overall": 1.0, "bonus": 1.0}
    assert build_reward(cfg(preset="my_rewards:parts"))(vqa("x"))["overall"] == 1.0


def test_load_reward_errors_are_recipe_errors(tmp_path):
    with pytest.raises(RecipeError):
        load_reward("no_colon_here")
    with pytest.raises(RecipeError):
        load_reward("surely_not_a_module_xyz:fn")
    (tmp_path / "r.py").write_text("x = 1\n")
    with pytest.raises(RecipeError):
        load_reward(f"{tmp_path / 'r.py'}:missing")
