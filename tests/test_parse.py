"""agent.parse: every failure kind from a crafted string, tolerant tool-call variants, strict reference checks."""

from __future__ import annotations

from collections import Counter

import pytest

from vigorl_cli.agent.parse import (
    FailureKind as FK,
    check_point_in_image,
    extract_answer,
    find_points,
    format_check,
    is_grounded,
    is_multiturn_format,
    is_think_answer_format,
    multiturn_format_failure,
    parse_response,
    parse_tool_call,
    split_blocks,
)

CANON = '<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": [412, 88]}}\n</tool_call>'


# -- extract_answer (reference §1.5) ----------------------------------------------------------------------------

def test_extract_answer_strips_option_letter_prefix_by_default():
    assert extract_answer("<think>x</think><answer> B. left </answer>") == "left"


def test_extract_answer_keeps_letter_when_asked():
    assert extract_answer("<answer>B. left</answer>", strip_letter=False) == "B. left"


def test_extract_answer_letter_prefix_needs_dot_and_space():
    # ^[A-Z]\. with a following space: "B.left" and "b. left" are not option prefixes
    assert extract_answer("<answer>B.left</answer>") == "B.left"
    assert extract_answer("<answer>b. left</answer>") == "b. left"


def test_extract_answer_without_tag_is_none_and_unclosed_runs_to_end():
    assert extract_answer("<think>no answer</think>") is None
    # reference: text.split("<answer>")[1].split("</answer>")[0] → everything after the tag
    assert extract_answer("<answer> (3, 4) and more") == "(3, 4) and more"


def test_extract_answer_takes_first_of_several():
    assert extract_answer("<answer>a</answer><answer>b</answer>") == "a"


# -- find_points ------------------------------------------------------------------------------------------------

def test_find_points_detects_ints_floats_and_spans():
    text = "look at (12, 34) then ( 5.5 ,6) not (1, 2, 3, 4)"
    pts = find_points(text)
    assert [(p.x, p.y, p.is_int) for p in pts] == [(12, 34, True), (5.5, 6, False)]
    assert text[slice(*pts[0].span)] == "(12, 34)"
    assert isinstance(pts[0].x, int) and isinstance(pts[1].x, float)


def test_find_points_brackets_only_when_asked_and_leading_zeros_ok():
    assert find_points("[3, 4]") == []
    assert [p.xy for p in find_points("[3, 4] (007, -2)", brackets=True)] == [(3, 4), (7, -2)]


# -- parse_response: one crafted string per failure kind --------------------------------------------------------

GOOD = "<think>The cup is at (120, 45).</think>\n<answer> (120, 45) </answer>"


def test_well_formed_response_has_no_failures():
    p = parse_response(GOOD)
    assert p.failures == []
    assert p.answer == "(120, 45)"
    assert p.thinks == ["The cup is at (120, 45)."]
    assert [pt.xy for pt in p.points] == [(120, 45)]
    assert GOOD[slice(*p.points[0].span)] == "(120, 45)"


@pytest.mark.parametrize("text, kind", [
    ("<think>at (1, 2)</think> the answer is left", FK.NO_ANSWER_TAG),
    ("<think>at (1, 2)</think><answer>left", FK.UNCLOSED_ANSWER),
    ("<think>at (1, 2)</think><answer>  </answer>", FK.EMPTY_ANSWER),
    ("<think>at (1, 2)</think><answer>a</answer><answer>b</answer>", FK.MULTIPLE_ANSWERS),
    ("at (1, 2) <answer>left</answer>", FK.NO_THINK),
    ("<think>at (1, 2) and I keep going <answer>left</answer>", FK.UNCLOSED_THINK),
    ("<think>nothing grounded here</think><answer>left</answer>", FK.NO_POINT),
    ("<think>x</think><tool_call>{not json at all</tool_call>", FK.BAD_TOOL_JSON),
    ('<think>x</think><tool_call>{"name": "search_coordinate", "arguments": {}}</tool_call>',
     FK.TOOL_MISSING_COORDINATE),
    ('<think>x</think><tool_call>{"name": "search_coordinate", "arguments": {"coordinate": [1]}}</tool_call>',
     FK.BAD_COORDINATE),
    ('<think>x</think><tool_call>{"name": "search_coordinate", "arguments": {"coordinate": [1.5, 2]}}</tool_call>',
     FK.NON_INTEGER_COORDINATE),
    ('<think>x</think><tool_call>{"name": "click", "arguments": {"coordinate": [1, 2]}}</tool_call>',
     FK.UNKNOWN_TOOL),
    ("<think>x</think>" + CANON + CANON, FK.MULTIPLE_TOOL_CALLS),
    ("<think>x</think>" + CANON + "<answer>left</answer>", FK.TOOL_CALL_WITH_ANSWER),
])
def test_parse_response_reports_failure_kind(text, kind):
    assert kind in parse_response(text).failures


def test_point_outside_image_reported_only_with_image_size():
    text = '<think>x</think>' + CANON.replace("412, 88", "900, 10")
    assert FK.POINT_OUTSIDE_IMAGE not in parse_response(text).failures
    assert FK.POINT_OUTSIDE_IMAGE in parse_response(text, image_size=(640, 480)).failures


def test_tool_call_turn_is_not_missing_an_answer():
    p = parse_response("<think>zoom</think>\n" + CANON)
    assert p.failures == []
    assert p.tool_call.coordinate == (412, 88) and p.tool_call.strict


def test_failures_are_countable_strings():
    texts = ["no tags", "<think>x</think><answer></answer>", GOOD]
    counts = Counter(f for t in texts for f in parse_response(t).failures)
    assert counts["no_point"] == 2 and counts["empty_answer"] == 1
    assert str(FK.NO_POINT) == "no_point" and FK.NO_POINT == "no_point"


def test_unclosed_think_still_contributes_its_points():
    p = parse_response("<think>check (10, 20) first <answer>left</answer>")
    assert [pt.xy for pt in p.points] == [(10, 20)] and p.answer == "left"


# -- multi-turn automaton and judge-only kinds exist too --------------------------------------------------------

def test_every_failure_kind_has_a_snake_case_name():
    for k in FK:
        assert k.value == k.name.lower()


# -- parse_tool_call: canonical and tolerated variants ----------------------------------------------------------

def test_parse_tool_call_canonical_is_strict():
    tc = parse_tool_call("<think>a</think>\n" + CANON)
    assert tc.name == "search_coordinate" and tc.coordinate == (412, 88)
    assert tc.ok and tc.strict and tc.tolerated == ()
    assert tc.span[1] == len("<think>a</think>\n" + CANON)


def test_parse_tool_call_returns_first_and_none_without_tag():
    assert parse_tool_call("<think>a</think>") is None
    second = CANON.replace("412, 88", "5, 6")
    assert parse_tool_call(CANON + second).coordinate == (412, 88)


@pytest.mark.parametrize("body, tolerance, coord", [
    ('```json\n{"name": "search_coordinate", "arguments": {"coordinate": [1, 2]}}\n```', "code_fence", (1, 2)),
    ('{"name": "search_coordinate", "arguments": {"coordinate": [1, 2]}} done', "trailing_text", (1, 2)),
    ("{'name': 'search_coordinate', 'arguments': {'coordinate': [1, 2]}}", "python_literal", (1, 2)),
    ('[{"name": "search_coordinate", "arguments": {"coordinate": [1, 2]}}]', "list_wrapped", (1, 2)),
    ('{"name": "search_coordinate", "parameters": {"coordinate": [1, 2]}}', "parameters_key", (1, 2)),
    ('{"name": "search_coordinate", "arguments": "{\\"coordinate\\": [1, 2]}"}', "arguments_string", (1, 2)),
    ('{"coordinate": [1, 2]}', "top_level_coordinate", (1, 2)),
    ('{"name": "search_coordinate", "arguments": {"point": [1, 2]}}', "coordinate_key_alias", (1, 2)),
    ('{"name": "search_coordinate", "arguments": {"coordinate": "(1, 2)"}}', "coordinate_string", (1, 2)),
    ('{"name": "search_coordinate", "arguments": {"coordinate": {"x": 1, "y": 2}}}', "xy_dict", (1, 2)),
    ('{"arguments": {"coordinate": [1, 2]}}', "no_name", (1, 2)),
    ('{"name": "crop", "arguments": {"coordinate": [1, 2]}}', "name_alias", (1, 2)),
])
def test_parse_tool_call_tolerates_real_model_variants(body, tolerance, coord):
    tc = parse_tool_call(f"<tool_call>{body}</tool_call>")
    assert tc.coordinate == coord and tc.ok
    assert tolerance in tc.tolerated
    assert not tc.strict  # rewards still demand the canonical form


def test_parse_tool_call_unclosed_at_end_of_text():
    tc = parse_tool_call("<think>a</think>" + CANON.replace("412, 88", "7, 8").replace("\n</tool_call>", ""))
    assert tc.coordinate == (7, 8) and "unclosed" in tc.tolerated


def test_parse_tool_call_keeps_float_coordinate_but_flags_it():
    tc = parse_tool_call('<tool_call>{"name": "search_coordinate", "arguments": {"coordinate": [1.0, 2]}}</tool_call>')
    assert tc.coordinate == (1.0, 2) and tc.failure == FK.NON_INTEGER_COORDINATE and not tc.ok


def test_parse_tool_call_arguments_string_that_is_not_json():
    tc = parse_tool_call('<tool_call>{"name": "search_coordinate", "arguments": "oops"}</tool_call>')
    assert tc.failure == FK.BAD_TOOL_JSON


def test_parse_tool_call_never_evaluates_code():
    tc = parse_tool_call("<tool_call>{'a': __import__('os').system('echo hi')}</tool_call>")
    assert tc.failure == FK.BAD_TOOL_JSON


# -- check_point_in_image ----------------------------------------------------------------------------------------

def test_check_point_in_image_is_inclusive_like_the_linearizer():
    # linearizer: outside iff x > W or y > H or x < 0 or y < 0 → the border (W, H) is inside
    assert check_point_in_image((640, 480), 640, 480) is None
    assert check_point_in_image((0, 0), 640, 480) is None
    assert check_point_in_image((641, 10), 640, 480) == FK.POINT_OUTSIDE_IMAGE
    assert check_point_in_image((-1, 10), 640, 480) == FK.POINT_OUTSIDE_IMAGE


# -- strict reference checks -------------------------------------------------------------------------------------

def test_think_answer_format_requires_full_match():
    assert is_think_answer_format("<think>a</think>\n\n<answer>b</answer>")
    assert not is_think_answer_format("Sure! <think>a</think><answer>b</answer>")   # leading text
    assert not is_think_answer_format("<think>a</think><answer>b</answer>\n")       # trailing newline
    assert not is_think_answer_format("<answer>b</answer>")
    # reference quirk kept: .*? may span tags, so two think blocks still match
    assert is_think_answer_format("<think>a</think><think>b</think><answer>c</answer>")


def test_grounded_check_reads_first_think_block_only():
    assert is_grounded("<think>at (12, 34)</think><answer>x</answer>")
    assert is_grounded("<think>at (12,34)</think>")
    assert not is_grounded("<think>nothing</think><think>(12, 34)</think>")  # second block ignored
    assert not is_grounded("<think>at ( 12, 34)</think>")                     # no space allowed after "("
    assert not is_grounded("<think>at (12.5, 34)</think>")                    # integers only
    assert not is_grounded("(12, 34) <answer>x</answer>")                     # no think block


def test_format_check_and_block_split_like_single_path_eval():
    text = "<think>a (1, 2)</think>\n<think>b</think>\n<answer>c</answer>"
    assert split_blocks(text) == ["<think>a (1, 2)</think>", "<think>b</think>", "<answer>c</answer>"]
    assert format_check("<think>a</think>") and not format_check("<think>a")


# -- multi-turn tag automaton (reference §5.7) -------------------------------------------------------------------

def _call(x, y):
    return '<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": [%d, %d]}}\n</tool_call>' % (x, y)


OBS = "\nuser\n<observation>\nHere is the crop of the image centered on the coordinate:\n</observation>\nassistant\n"
VALID_2_CALLS = (
    "<think> The sign may be top left (100, 80). </think>\n" + _call(100, 80) + OBS
    + "<think> Not there; try the right side. </think>\n" + _call(600, 300) + OBS
    + "<think> Based on all the information I've gathered, I'll now provide my final answer. </think>\n"
    + "<answer> red </answer>"
)


def test_multiturn_automaton_accepts_two_tool_call_transcript():
    assert multiturn_format_failure(VALID_2_CALLS) is None
    assert is_multiturn_format(VALID_2_CALLS + "<|im_end|>\n")   # one EOS after </answer> allowed
    # the automaton's tags are case-insensitive, but the reference end check `</answer>\s*(<|im_end|>)?\s*$` is not
    assert is_multiturn_format("<THINK>a</THINK><answer>b</answer>")
    assert multiturn_format_failure("<think>a</think><ANSWER>b</ANSWER>") == FK.MISSING_FINAL_ANSWER


@pytest.mark.parametrize("broken, kind", [
    (VALID_2_CALLS.replace("<answer> red </answer>", "<answer> red"), FK.MISSING_FINAL_ANSWER),
    (VALID_2_CALLS + " trailing words", FK.MISSING_FINAL_ANSWER),
    (VALID_2_CALLS.replace(OBS, "\n", 1), FK.BAD_TAG_ORDER),                        # tool call without observation
    (VALID_2_CALLS.replace("<think> Not there", "Not there", 1), FK.BAD_TAG_ORDER),  # no think after observation
    ("<answer>red</answer>", FK.BAD_TAG_ORDER),                                     # must start with think
    ("<think>a</think><answer>b</answer><answer>c</answer>", FK.BAD_TAG_ORDER),     # tag after the end
    ("<think>a</think><think>b</think><answer>c</answer>", FK.BAD_TAG_ORDER),        # two thinks in a row
])
def test_multiturn_automaton_rejects_broken_transcripts(broken, kind):
    assert multiturn_format_failure(broken) == kind
