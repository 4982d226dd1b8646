"""Prompt texts and message layouts (vigorl_cli.models.prompts) against the reference digest.

The exact lengths below were measured on the digest's own text blocks (vigorl-reference.md §1.3, §2.1, §2.2). The
literal-backslash-n lengths also equal the sizes of the reference's .jinja files (1232, 1477, 1004, 1274 chars).
"""

from __future__ import annotations

import pytest

from vigorl_cli.models import prompts as P


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------

def test_every_available_pair_returns_nonempty_text():
    rows = P.available()
    assert len(rows) == len(P.SOURCES) == 25
    for preset, variant, note in rows:
        text = P.system_prompt(preset, variant)
        assert text.strip() == text and len(text) > 100, (preset, variant)
        assert note.startswith(P.SOURCES[preset, variant] + ": ")


def test_sources_mark_exactly_the_digest_full_texts_as_verbatim():
    verbatim = {k for k, kind in P.SOURCES.items() if kind == "verbatim"}
    assert set(P.SOURCES.values()) == {"verbatim", "reconstructed"}
    assert verbatim == {
        ("web_grounding", "mcts"), ("web_grounding", "single"), ("web_grounding", "multiturn"),
        ("spatial", "mcts"), ("spatial", "single"), ("spatial", "multiturn"), ("spatial", "answer_only"),
        ("vstar", "mcts"), ("vstar", "multiturn"), ("web_action", "multiturn"),
    }


def test_unknown_preset_raises_naming_valid_presets():
    with pytest.raises(ValueError, match="web_grounding, spatial, vstar, web_action"):
        P.system_prompt("gui", "single")


def test_unknown_variant_raises_naming_valid_variants():
    with pytest.raises(ValueError, match="mcts, single, multiturn, vanilla, answer_only"):
        P.system_prompt("spatial", "cot")


def test_missing_combination_raises_naming_the_presets_variants():
    with pytest.raises(ValueError, match=r"valid variants for 'vstar': mcts, single, multiturn, no_grounding"):
        P.system_prompt("vstar", "vanilla")


def test_unknown_reference_stage_raises():
    with pytest.raises(ValueError, match="mcts, sft, rl, eval"):
        P.reference_system_prompt("spatial", "single", "dpo")


# ---------------------------------------------------------------------------------------------------------------
# newline modes
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,variant", [(p, v) for p, v, _ in P.available()])
def test_literal_newlines_round_trip(preset, variant):
    text = P.system_prompt(preset, variant)
    assert "\\" not in text  # stored texts hold real newlines and plain quotes only
    literal = P.system_prompt(preset, variant, literal_newlines=True)
    assert "\n" not in literal
    assert literal.count("\\n") == text.count("\n")
    assert literal.replace("\\n", "\n") == text


@pytest.mark.parametrize("preset,variant,real_len,newlines", [
    ("web_grounding", "mcts", 1493, 17),
    ("spatial", "mcts", 1557, 18),
    ("vstar", "mcts", 1537, 18),
    ("web_grounding", "single", 1217, 15),
    ("spatial", "single", 1463, 14),
])
def test_verbatim_lengths_and_literal_form(preset, variant, real_len, newlines):
    text = P.system_prompt(preset, variant)
    assert (len(text), text.count("\n")) == (real_len, newlines)
    # bash/jinja form: one extra character per newline; identical for mcts, rl and eval stages
    literal = P.system_prompt(preset, variant, literal_newlines=True)
    assert len(literal) == real_len + newlines
    for stage in ("mcts", "rl", "eval"):
        assert P.reference_system_prompt(preset, variant, stage) == literal
    assert P.reference_system_prompt(preset, variant, "sft") == text


def test_multiturn_rl_stage_also_escapes_quotes_like_the_jinja_files():
    for preset, jinja_len in (("web_grounding", 1004), ("vstar", 1274)):
        text = P.system_prompt(preset, "multiturn")
        rl = P.reference_system_prompt(preset, "multiturn", "rl")
        assert len(rl) == jinja_len
        assert '{\\"name\\": \\"search_coordinate\\", \\"arguments\\": {\\"coordinate\\": [x, y]}}' in rl
        # eval (bash) turned \" into ": only the newlines are literal there
        assert P.reference_system_prompt(preset, "multiturn", "eval") == P.system_prompt(preset, "multiturn", True)
        assert P.reference_system_prompt(preset, "multiturn", "sft") == text


def test_web_action_mcts_reference_form_is_mixed_and_loses_backtick_spans():
    canonical = P.system_prompt("web_action", "mcts")
    ref = P.reference_system_prompt("web_action", "mcts", "mcts")
    assert "```click [id]```" in canonical
    preamble, block = ref.split("\n\n", 1)
    assert "\n" not in preamble and "\\n<think>\\n" in preamble  # literal \n in the bash preamble
    assert block.startswith("**Inputs**\n") and block.endswith("before issuing the final action.\n")
    assert "`" not in ref and "\n1. : click the element" in block  # command substitutions printed nothing


def test_mcts_system_prompt_appends_thought_line_with_real_newline():
    plain = P.mcts_system_prompt("spatial", 5)
    assert plain == P.system_prompt("spatial", "mcts") + P.thought_count_line(5)
    literal = P.mcts_system_prompt("spatial", 5, literal_newlines=True)
    assert literal.count("\n") == 1
    assert literal.endswith("- Format points as (x, y)\n- There should be at least 5 thoughts before providing "
                            "the final answer.")
    assert P.mcts_system_prompt("vstar") == P.system_prompt("vstar", "mcts")
    assert P.mcts_system_prompt("vstar", 3, variant="no_grounding_mcts").startswith("A conversation")


# ---------------------------------------------------------------------------------------------------------------
# verbatim spot checks (digest §1.3, §2.1, §2.2)
# ---------------------------------------------------------------------------------------------------------------

def test_web_grounding_single_is_verbatim():
    text = P.system_prompt("web_grounding", "single")
    assert text.startswith(
        "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. The "
        "Assistant systematically reasons through the problem step by step, verifying each step and grounding every "
        "step to a specific point in the image.\n\nAll reasoning processes must be enclosed within a single set of "
        "'<think>' tags, with each reasoning step explicitly referencing a coordinate:\n\n<think>\n[Reasoning text "
        "with grounded points inline] (x1, y1). [Further reasoning] (x2, y2), [Final refinement] (x3, y3).\n</think>"
        "\n\nThe final answer should be enclosed in '<answer>' tags in the format:\n<answer> (xf, yf) </answer>\n\n")
    assert text.endswith(
        "- The final output should be the single most precise coordinate for the requested element.\n"
        "- The Assistant should verify each step and check multiple possible solutions before selecting the final "
        "answer.")


def test_web_grounding_multiturn_is_verbatim():
    text = P.system_prompt("web_grounding", "multiturn")
    assert (len(text), text.count("\n")) == (986, 10)
    assert text.startswith(
        "You are an assistant tasked with identifying precise (x,y) coordinates of a described element in an image.\n"
        "Your task involves multiple turns of reasoning, each with EXACTLY one <think> step and one action:\n")
    assert ("  a) Output a search action formatted precisely as:\n     <tool_call>\n"
            '     {"name": "search_coordinate", "arguments": {"coordinate": [x, y]}}\n     </tool_call>\n'
            "  b) If confident you've found the correct location, output your final answer enclosed in "
            "<answer> (x, y) </answer> tags.\n") in text
    assert text.endswith("including values that are the same or nearly identical (e.g., differing by only a few "
                         "pixels).")


def test_vstar_multiturn_is_verbatim_and_shared_with_spatial_and_web_action():
    text = P.system_prompt("vstar", "multiturn")
    assert (len(text), text.count("\n")) == (1255, 11)
    assert "  a) Zoom-in on a specific region to see it better by outputting a search action" in text
    assert text.endswith("- If unclear, infer based on likely context or purpose.\n- Verify each step by examining "
                         "multiple possible solutions before selecting a final answer.")
    assert P.system_prompt("spatial", "multiturn") == P.system_prompt("web_action", "multiturn") == text


def test_mcts_prompts_are_verbatim():
    wg = P.system_prompt("web_grounding", "mcts")
    assert wg.startswith("You are a helpful assistant tasked with grounding an element on a web page.")
    assert "\n<think>\n{Single reasoning step with a grounded point} (x, y).\n</think>\n" in wg
    assert wg.endswith("- Format points as (x, y)")
    assert "- Your final answer should be the text of the choice you think is most correct.\n" in P.system_prompt(
        "spatial", "mcts")
    assert "- Your final answer should be the choice you think is most correct.\n" in P.system_prompt("vstar", "mcts")


def test_spatial_single_and_answer_only_are_verbatim():
    text = P.system_prompt("spatial", "single")
    assert "For example, <think>\n{Reasoning text}. {Further reasoning text} {more reasoning} \n</think>" in text
    assert "(not <answer>A. right</answer>).\n-If the correct answer is unclear" in text
    assert P.system_prompt("spatial", "answer_only") == (
        "You are a helpful assistant. With the image as context, pick the correct answer choice to answer the "
        "provided question. Only return the text of the correct answer choice.")


def test_reconstructed_texts_keep_the_digest_quotes():
    assert "- Do NOT refer to image region coordinates or any explicit spatial grounding.\n" in P.system_prompt(
        "spatial", "no_grounding_mcts")
    assert "<think>\n{Single reasoning step.}\n</think>" in P.system_prompt("spatial", "no_grounding_mcts")
    assert "Coordinates must be absolute image points formatted as integers: (x, y)." in P.system_prompt(
        "vstar", "single")
    assert P.system_prompt("web_action", "mcts").endswith(
        "You should output atleast 3 reasoning steps before issuing the final action.")
    wg = P.system_prompt("web_grounding", "answer_only")
    assert wg.startswith("Identify the precise coordinates (x, y) of a specific area/element/object on the screen "
                         "based on a description.")
    assert wg.endswith("Your answer should be a single string (x, y) corresponding to the point of interest.")


# ---------------------------------------------------------------------------------------------------------------
# message layouts
# ---------------------------------------------------------------------------------------------------------------

def test_tool_call_text_exact():
    assert P.tool_call_text(412, 88) == (
        '<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": [412, 88]}}\n</tool_call>')
    with pytest.raises(TypeError):
        P.tool_call_text(412.5, 88)


def test_tool_call_matches_the_example_in_the_multiturn_prompts():
    json_line = P.tool_call_text(1, 2).split("\n")[1].replace("[1, 2]", "[x, y]")
    for preset in ("web_grounding", "vstar"):
        assert f"     <tool_call>\n     {json_line}\n     </tool_call>\n" in P.system_prompt(preset, "multiturn")


def test_mcts_user_text_with_two_previous_thoughts():
    # <image> removed, question stripped, then "\n\nPrevious thought k: " + thought without think tags, stripped
    thoughts = ["<think>\nThe top bar holds a logo (40, 30).\n</think>",
                "<think> A text field is to its right (640, 45). </think>"]
    text = P.mcts_user_text("<image>\nWhere is the search bar? ", thoughts)
    assert text == ("Where is the search bar?\n\nPrevious thought 1: The top bar holds a logo (40, 30)."
                    "\n\nPrevious thought 2: A text field is to its right (640, 45).")
    assert P.mcts_user_text("<image>\nQ?", []) == "Q?"


def test_thought_count_line_and_force_final_text():
    assert P.thought_count_line(3) == "\n- There should be at least 3 thoughts before providing the final answer."
    assert P.THOUGHT_COUNT_RANGE == (3, 7)
    assert P.FORCE_FINAL_TEXT == ("\nYour turn! Max thoughts reached. You should now provide the final answer in the "
                                  "format <answer> ... </answer>")


def test_observation_text_with_and_without_dot():
    assert P.observation_text(True) == (
        "<observation>\nHere is the crop of the image centered on the coordinate, with a red dot at the coordinate "
        "location:\n", "\n</observation>")
    assert P.observation_text(False) == (
        "<observation>\nHere is the crop of the image centered on the coordinate:\n", "\n</observation>")
    # multi-turn SFT user content (digest §2.2)
    assert P.observation_content(False) == (
        "<observation>\nHere is the crop of the image centered on the coordinate:\n<image>\n</observation>")


def test_observation_text_reference_rl_and_eval_forms():
    before, after = P.observation_text(True, compat_rl=True)  # §5.5: image directly followed by </observation>
    assert before == P.observation_text(True)[0] and after == "</observation>"
    eval_form = ("<observation>\nHere is the crop of the image centered on the coordinate:", "\n</observation>")
    assert P.observation_text(True, compat_eval=True) == P.observation_text(False, compat_eval=True) == eval_form
    with pytest.raises(ValueError):
        P.observation_text(True, compat_eval=True, compat_rl=True)


def test_final_think_forced_answer_and_backtrack_texts():
    assert P.FINAL_THINK_TEXT == (
        "<think> Based on all the information I've gathered, I'll now provide my final answer. </think>\n")
    assert P.FORCED_ANSWER_PREFIX == P.FINAL_THINK_TEXT + "<answer>"
    assert P.PAPER_FORCED_TERMINATION_TEXT == "<think> Please provide your response now </think>"
    assert P.BACKTRACK_TEXT == "Wait, this seems off. Let's try something else."


def test_chain_and_turn_builders():
    assert P.chain_text("A (1, 2). B (3, 4).", "(3, 4)") == (
        "<think>\nA (1, 2). B (3, 4).\n</think>\n<answer> (3, 4) </answer>")
    assert P.corrected_reasoning("A (1, 2).", "B (3, 4).") == (
        "A (1, 2).\nWait, this seems off. Let's try something else.\nB (3, 4).")
    assert P.think_text("Look left (10, 20).") == "<think> Look left (10, 20). </think>\n"
    assert P.answer_text((415, 90)) == "<answer> (415, 90) </answer>"
    assert P.answer_text("right") == "<answer> right </answer>"
