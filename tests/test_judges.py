"""rewards.judges: each judge against hand-computed values, compat vs default behaviour."""

from __future__ import annotations

import pytest

from vigorl_cli.agent.parse import FailureKind as FK
from vigorl_cli.data.schema import Sample, Target
from vigorl_cli.rewards.judges import (
    exact_match,
    get_judge,
    judge_for_task,
    judge_sample,
    multiple_choice,
    normalize_reference,
    parse_letter,
    point_in_box,
    point_match,
    string_match,
    web_action,
)


def mc_sample(answer="right", choices=("left", "right"), **kw):
    return Sample(id="1", images=["a.jpg"], question="Where is the cup?", answer=answer,
                  choices=list(choices), task="multiple_choice", **kw)


# -- string_match (reference §1.6) -------------------------------------------------------------------------------

def test_string_match_normalises_punctuation_spaces_and_case():
    # norm("Red Car.") = "redcar" (spaces and "." deleted, lower-cased)
    assert normalize_reference(" Red Car. ") == "redcar"
    assert string_match("the RED car!", "red car").score == 1.0


@pytest.mark.parametrize("compat", [True, False])
def test_string_match_containment_quirk_accepts_contradicting_answer(compat):
    # g = norm("left") = "left"; p = norm("not left, right") = "notleftright"; "left" in p → 1.0 (reference quirk)
    assert string_match("not left, right", "left", compat=compat).score == 1.0


def test_string_match_scores_a_letter_as_wrong():
    # g = "right", p = "b" → neither equal nor contained → 0.0
    assert string_match("B", "right").score == 0.0


def test_string_match_empty_gt_matches_everything_only_in_compat():
    # reference: g = "" and "" in p is always True → 1.0; default mode refuses the unusable GT
    assert string_match("anything", "...", compat=True).score == 1.0
    r = string_match("anything", "...")
    assert r.score == 0.0 and r.failure == FK.BAD_GROUND_TRUTH


def test_string_match_no_answer_is_a_failure():
    r = string_match(None, "left")
    assert r.score == 0.0 and r.failure == FK.NO_ANSWER_TAG


# -- multiple_choice ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred", ["B", "(B)", "B.", "B)", "B. right", "(B) right", "b", "right", "Right."])
def test_multiple_choice_maps_letters_through_choices(pred):
    # choices [left, right]: letter B → index 1 → "right" == GT option text → 1.0
    r = multiple_choice(pred, mc_sample())
    assert r.score == 1.0 and r.pred == "right"


def test_multiple_choice_compat_scores_letters_as_wrong_like_the_reference():
    # compat = string_match: norm("right") = "right" not in norm("B") = "b" → 0.0
    assert multiple_choice("B", mc_sample(), compat=True).score == 0.0
    assert multiple_choice("B. right", mc_sample(), compat=True).score == 1.0  # "right" in "bright"


def test_multiple_choice_rejects_answer_naming_two_options():
    # compat containment would give 1.0 for GT "left"; here both "left" and "right" occur → ambiguous → 0
    r = multiple_choice("not left, right", mc_sample(answer="left"))
    assert r.score == 0.0 and r.failure == FK.AMBIGUOUS_CHOICE
    assert multiple_choice("not left, right", mc_sample(answer="left"), compat=True).score == 1.0


def test_multiple_choice_letter_contradicting_its_text_is_ambiguous():
    r = multiple_choice("A. right", mc_sample())
    assert r.score == 0.0 and r.failure == FK.AMBIGUOUS_CHOICE


def test_multiple_choice_option_text_starting_with_a_letter_is_not_a_letter():
    # BLINK Relative_Depth options "A is closer" / "B is closer": the text, not the letter "A", decides
    s = mc_sample(answer="B is closer", choices=("A is closer", "B is closer"))
    assert multiple_choice("B is closer", s).score == 1.0
    assert multiple_choice("A is closer", s).score == 0.0
    assert parse_letter("A is closer") is None


def test_multiple_choice_longest_option_wins_containment():
    # options "left" and "not left": answer "it is not left" contains both; "left" ⊂ "not left" is dropped → index 1
    s = mc_sample(answer="not left", choices=("left", "not left"))
    assert multiple_choice("it is not left", s).score == 1.0


def test_multiple_choice_gt_given_as_letter_blink_style():
    s = mc_sample(answer="(B)")
    assert multiple_choice("right", s).score == 1.0 and multiple_choice("left", s).score == 0.0


def test_multiple_choice_choices_parsed_from_question_when_sample_has_none():
    s = Sample(id="1", images=[], question="Which?\nA. red\nB. blue", answer="blue", task="multiple_choice")
    assert multiple_choice("B", s).score == 1.0


def test_multiple_choice_without_choices_falls_back_to_equality():
    r = multiple_choice("Blue.", "blue")
    assert r.score == 1.0 and r.details["fallback"] == "no_choices"
    assert multiple_choice("not blue", "blue").score == 0.0  # no containment quirk


def test_multiple_choice_unmatched_and_out_of_range_letters():
    assert multiple_choice("purple", mc_sample()).failure == FK.NO_MATCHING_CHOICE
    assert multiple_choice("D", mc_sample()).failure == FK.NO_MATCHING_CHOICE


# -- exact_match (RL string reward, §5.7) -------------------------------------------------------------------------

def test_exact_match_strips_option_prefix_and_lowercases_pred():
    # "B) Left" → prefix "B) " stripped → "Left".lower() == "left"
    assert exact_match("B) Left", "left", compat=True).score == 1.0


def test_exact_match_compat_does_not_lowercase_gt():
    # reference: pred.lower() == gt.strip(); "rotated left" != "Rotated left" → 0.0
    assert exact_match("rotated left", "Rotated left", compat=True).score == 0.0
    assert exact_match("rotated left", "Rotated left").score == 1.0


def test_exact_match_prefix_regex_keeps_only_the_first_line():
    # ^[A-Za-z][\.\)]\s*(.*) without DOTALL: "A. left\nbecause" → "left"
    assert exact_match("A. left\nbecause", "left", compat=True).score == 1.0


def test_exact_match_maps_bare_letter_only_outside_compat():
    assert exact_match("B", mc_sample()).score == 1.0
    assert exact_match("B", mc_sample(), compat=True).score == 0.0


def test_exact_match_multiturn_flavour_keeps_prefix_and_lowercases_gt():
    assert exact_match("B. red", "red", compat=True, strip_option_prefix=False, lowercase_gt=True).score == 0.0
    assert exact_match(" RED ", "Red", compat=True, strip_option_prefix=False, lowercase_gt=True).score == 1.0


# -- point_in_box ------------------------------------------------------------------------------------------------

BOX = "(10, 20, 110, 220)"


@pytest.mark.parametrize("pred, expected", [
    ("(10, 20)", 1.0),     # corner: inclusive
    ("(110, 220)", 1.0),   # opposite corner: inclusive
    ("(111, 50)", 0.0),    # x just outside
    ("[50, 50]", 1.0),     # reference: tuple(literal_eval("[50, 50]")) works
    ("50, 50", 1.0),       # literal_eval("50, 50") is a tuple
])
def test_point_in_box_inclusive_reference_parsing(pred, expected):
    assert point_in_box(pred, BOX, compat=True).score == expected
    assert point_in_box(pred, BOX).score == expected


def test_point_in_box_float_rejected_in_compat_accepted_by_default():
    r = point_in_box("(50.5, 60.0)", BOX, compat=True)
    assert r.score == 0.0 and r.failure == FK.NON_INTEGER_COORDINATE
    assert point_in_box("(50.5, 60.0)", BOX).score == 1.0


def test_point_in_box_reads_a_single_embedded_point_by_default():
    assert point_in_box("The button is at (50, 60).", BOX).score == 1.0
    assert point_in_box("The button is at (50, 60).", BOX, compat=True).failure == FK.NO_POINT
    r = point_in_box("(50, 60) or (500, 600)", BOX)
    assert r.score == 0.0 and r.failure == FK.MULTIPLE_POINTS


def test_point_in_box_uses_sample_target_or_a_converted_target():
    s = Sample(id="1", images=[], question="q", answer=BOX, target=Target(box=(10, 20, 110, 220)), task="grounding")
    assert point_in_box("(50, 60)", s).score == 1.0
    # caller converted the box to a half-size model frame: (5, 10, 55, 110); the judge does not rescale
    half = Target(box=(5, 10, 55, 110), frame="model")
    assert point_in_box("(50, 60)", half).score == 1.0 and point_in_box("(60, 60)", half).score == 0.0


def test_point_in_box_bad_ground_truth():
    assert point_in_box("(1, 2)", "left").failure == FK.BAD_GROUND_TRUTH
    assert point_in_box("(1, 2)", "(0.5, 0, 3, 3)", compat=True).failure == FK.BAD_GROUND_TRUTH


# -- point_match -------------------------------------------------------------------------------------------------

def test_point_match_threshold_is_strict_less_than():
    # distance (0,0)→(30,40) = 50 → not < 50 → 0.0; (29, 40) → 49.4 → 1.0
    assert point_match("(30, 40)", "(0, 0)", compat=True).score == 0.0
    assert point_match("(29, 40)", "(0, 0)", compat=True).score == 1.0
    assert point_match("(30, 40)", "(0, 0)", threshold=51).details["distance"] == 50.0


def test_point_match_float_only_outside_compat():
    assert point_match("(1.5, 2)", "(0, 0)", compat=True).failure == FK.NON_INTEGER_COORDINATE
    assert point_match("(1.5, 2)", "(0, 0)").score == 1.0


# -- web_action ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred, gt, expected", [
    ("click [12]", "click [12]", 1.0),            # 0.5 verb + 0.5 id
    ("click [12]", "click [13]", 0.5),            # verb only
    ("click [12]", "type [12] [hi]", 0.5),        # id only ("click" not in gt)
    ("type [5] [hello]", "type [5] [world]", 1.0),  # first bracket = element id; content not compared
    ("type [5] [hello]", "type [6] [hello]", 0.5),
    ("scroll [down]", "scroll [down]", 1.0),
    ("scroll [down]", "scroll [up]", 0.0),        # direction must match
    ("go_back", "go_back", 1.0),
    ("stop [42]", "stop [7]", 1.0),               # only the word "stop" is compared
    ("type [5] [stop sign]", "type [5] [hello]", 0.0),  # dispatch by substring: "stop" branch first
    ("CLICK [12]", "click [12]", 0.0),            # case-sensitive
])
def test_web_action_rl_scorer_is_the_reference_one(pred, gt, expected):
    assert web_action(pred, gt, scorer="rl").score == expected


@pytest.mark.parametrize("pred, gt, expected", [
    ("click [12]", "click [12]", 1.0),             # 0.5 verb + 0.5 id
    ("click [12]", "click [13]", 0.5),             # verb only
    ("click [1]", "type [1] [click me]", 0.0),     # verbs differ (RL: 0.5, "click" is in the typed text; eval: 1)
    ("click [12]", "type [12] [hi]", 0.0),         # the id only counts with the same verb (RL: 0.5)
    ("type [5] [hello]", "type [5] [world]", 0.5),  # type: id and text both compared (RL: 1.0)
    ("type [5] [Hello  World]", "type [5] [hello world] [1]", 1.0),  # case/space folded; press_enter not compared
    ("type [5] [stop sign]", "type [5] [stop sign]", 1.0),  # the verb is parsed, not found by substring (RL: 0)
    ("scroll [up]", "scroll [down]", 0.5),         # same verb, other direction (RL: 0, eval: 1)
    ("scroll [direction=down]", "scroll [down]", 1.0),
    ("hover [3]", "click [3]", 0.0),
    ("stop [42]", "stop [7]", 0.5),                # the answer is the argument (RL: 1.0)
    ("go_back", "go_back", 1.0),
    ("CLICK [12]", "click [12]", 1.0),             # verbs are case-insensitive (RL: 0)
    ("Action: ```click [12]```", "click [12]", 1.0),
])
def test_web_action_default_compares_parsed_verbs_and_arguments(pred, gt, expected):
    assert web_action(pred, gt).score == expected


@pytest.mark.parametrize("pred, gt, expected", [
    ("click [12]", "click [12]", 1.0),
    ("click [1]", "type [1] [click me]", 1.0),    # "click" in gt and "[1]" in gt (substrings) → 1
    ("click 1", "click [12]", 1.0),               # "1" is a substring of "click [12]"
    ("click [12]", "click [13]", 0.0),            # binary: no half credit
    ("CLICK [12]", "click [12]", 1.0),            # lower-cased
    ("type [5] [hello world]", "type [5] [hello world]", 0.0),  # split(" ") gives 4 parts → reference fails → 0
    ("scroll [down]", "scroll [up]", 1.0),        # direction ignored
])
def test_web_action_compat_is_the_substring_eval_judge(pred, gt, expected):
    assert web_action(pred, gt, compat=True).score == expected


def test_web_action_failures():
    assert web_action("hover [3]", "click [3]", scorer="rl").failure == FK.UNKNOWN_ACTION
    assert web_action("click here", "click [3]", scorer="rl").failure == FK.BAD_ACTION
    assert web_action("wait a bit", "click [3]").failure == FK.UNKNOWN_ACTION
    assert web_action("click here", "click [3]").failure == FK.BAD_ACTION
    assert web_action("click [3]", "press the button").failure == FK.BAD_GROUND_TRUTH
    assert web_action("click  [3]", "click [3]", compat=True).failure == FK.BAD_ACTION


# -- registry ------------------------------------------------------------------------------------------------------

def test_registry_names_and_task_defaults():
    assert get_judge("point_in_bbox") is point_in_box and get_judge("point_matching") is point_match
    assert judge_for_task("multiple_choice") is multiple_choice
    assert judge_for_task("vqa") is string_match
    assert judge_for_task("grounding") is point_in_box
    assert judge_for_task("web_action") is web_action
    with pytest.raises(ValueError):
        get_judge("gpt4o")


def test_judge_sample_picks_point_match_for_point_targets():
    s = Sample(id="1", images=[], question="q", answer="(0, 0)", target=Target(point=(0, 0)), task="grounding")
    assert judge_sample("(3, 4)", s).details["distance"] == 5.0
    assert judge_sample("B", mc_sample()).score == 1.0
