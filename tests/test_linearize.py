"""`vigorl linearize`: exact single-turn chains and multi-turn dialogs on hand-built trees (expected strings derived
by hand in the comments), the reference bugs fixed, value-based selection, and the command end to end."""

from __future__ import annotations

import json
import random

from PIL import Image, ImageChops
from typer.testing import CliRunner

from vigorl_cli.cli.main import app
from vigorl_cli.data.formats import SFTRecord
from vigorl_cli.linearize.api import summary_rows
from vigorl_cli.linearize.multiturn import (
    MultiturnSettings,
    chain_to_dialog,
    linearizer_frame,
    rescale_coordinates,
    tree_dialog_chains,
)
from vigorl_cli.linearize.single import select_chains, tree_chains
from vigorl_cli.models import prompts
from vigorl_cli.search.tree import Rollout, TreeNode, TreeRecord
from vigorl_cli.vision.frames import Frame
from vigorl_cli.vision.zoom import ZoomTool

Q = "<image>\nWhere is the star?\nA. left\nB. right"
A = "<think>\nThe star is at (10, 20).\n</think>"
BALL = "<think>\nThe ball is at (30, 40).\n</think>"
A1 = "<think>\nCheck (50, 60) again.\n</think>"
BACK = "Wait, this seems off. Let's try something else."


def ro(texts, reward):
    return Rollout(final_answer=None, reward=reward, ephemeral_texts=texts, ephemeral_depth=len(texts) - 1,
                   depth=len(texts) - 2)


def hand_tree(image="/nowhere.png", tid="t0") -> TreeRecord:
    """root ─┬─ A (value 0.5): rollouts  A→BALL→"B. right" (1),  A→"left" (0)
             │    └─ A1 (value 1): rollouts A→A1→"right" (1) twice
             └─ T terminal "right" (value 1): rollouts [Q, "right"] (1) twice"""
    root = TreeNode(Q, value=0.75, visit_count=8)
    a = root.add_child(TreeNode(A, value=0.5, visit_count=4, used_coords=["(10, 20)"]))
    a.rollouts = [ro([Q, A, BALL, "<answer> B. right </answer>"], 1.0), ro([Q, A, "<answer> left </answer>"], 0.0)]
    a1 = a.add_child(TreeNode(A1, value=1.0, visit_count=2, used_coords=["(10, 20)", "(50, 60)"]))
    a1.rollouts = [ro([Q, A, A1, "<answer> right </answer>"], 1.0)] * 2
    t = root.add_child(TreeNode("right", is_terminal=True, value=1.0, visit_count=2))
    t.rollouts = [ro([Q, "right"], 1.0)] * 2
    return TreeRecord(Q, image, "right", "S", 1.0, tid, root)


# ---------------------------------------------------------------------------------------------------------------
# Single-turn
# ---------------------------------------------------------------------------------------------------------------

def test_single_turn_chains_are_exact_on_a_hand_built_tree():
    chains = select_chains(tree_chains(hand_tree()))
    # Pre-order A, A1, T. At A: wrong "left" x correct "B. right" -> one corrected chain; its wrong part is A's
    # thought alone (the wrong answer is dropped), its correct part A + BALL, thoughts tag-stripped and joined with one
    # space; then the direct chain. The answer loses its option letter ("B. right" -> "right").
    # At A1: two identical correct rollouts -> one direct chain after dedupe. At T: the terminal answer alone, with an
    # empty reasoning (as the reference writes it).
    assert [c.text for c in chains] == [
        "<think>\nThe star is at (10, 20).\n" + BACK + "\nThe star is at (10, 20). The ball is at (30, 40).\n</think>\n"
        "<answer> right </answer>",
        "<think>\nThe star is at (10, 20). The ball is at (30, 40).\n</think>\n<answer> right </answer>",
        "<think>\nThe star is at (10, 20). Check (50, 60) again.\n</think>\n<answer> right </answer>",
        "<think>\n\n</think>\n<answer> right </answer>",
    ]
    assert [c.kind for c in chains] == ["corrected", "direct", "direct", "direct"]
    assert [c.node for c in chains] == ["0", "0", "0.0", "1"]


def test_compat_keeps_the_reference_quirks_and_the_default_fixes_them():
    root = TreeNode(Q)
    n = root.add_child(TreeNode(A, value=1.0))
    # the teacher wrote a think block AND the answer in one response, with the option letter
    n.rollouts = [ro([Q, A, "<think>\nI see it (7, 8).\n</think>\n<answer> B. right </answer>"], 1.0)]
    rec = TreeRecord(Q, "/x.png", "right", "S", 0.0, "t", root)
    # reference: answer = last text minus the answer tags -> the think block lands inside <answer>, letter kept
    assert [c.text for c in tree_chains(rec, compat=True)] == [
        "<think>\nThe star is at (10, 20).\n</think>\n<answer> <think>\nI see it (7, 8).\n</think>\n B. right </answer>"]
    # ours: the think text joins the reasoning, the answer is the option text
    assert [c.text for c in tree_chains(rec)] == [
        "<think>\nThe star is at (10, 20). I see it (7, 8).\n</think>\n<answer> right </answer>"]


def test_value_selection_ranks_by_path_values_caps_corrected_chains_and_dedupes_by_coordinates():
    rec = hand_tree()
    # an extra correct rollout at A1 with other words but the same coordinates as A1's chain
    rec.tree.children[0].children[0].rollouts.append(
        ro([Q, "<think>\nA star (10, 20).\n</think>", "<think>\nLooking at (50, 60).\n</think>",
            "<answer> right </answer>"], 1.0))
    chains = select_chains(tree_chains(rec), select="value", max_corrected=0)
    # scores (mean, min of the node values on the path): T (1, 1) > A1 (0.75, 0.5) > A (0.5, 0.5);
    # A's corrected chain is over the cap (0); A1's second chain repeats (10, 20) -> (50, 60) and goes
    assert [(c.node, c.kind) for c in chains] == [("1", "direct"), ("0.0", "direct"), ("0", "direct")]
    assert chains[1].text.endswith("Check (50, 60) again.\n</think>\n<answer> right </answer>")
    assert len(select_chains(tree_chains(rec), max_chains=2, rng=random.Random(0))) == 2


# ---------------------------------------------------------------------------------------------------------------
# Multi-turn
# ---------------------------------------------------------------------------------------------------------------

# 140x70 original; min_pixels = max_pixels = 280*140 makes the linearizer frame exactly 2x: a point x maps to the
# pixel holding the centre of x, floor((x + 0.5) * 2) = 2x + 1 (the reference's int(2x) = 2x is one pixel left).
ST = MultiturnSettings(zoom=ZoomTool(offset=20, crop_size=56, draw_dot=True), max_turns=5, min_pixels=39200,
                       max_pixels=39200, shuffle_prob=0.0)
CHAIN = ("<think>\nThe star is near (10, 20). The ball is at (30, 40) and again (10, 20). Compare (50, 10)! Done\n"
         "</think>\n<answer> (55, 15) </answer>")
OBS_DOT = "<observation>\nHere is the crop of the image centered on the coordinate, with a red dot at the coordinate " \
          "location:\n<image>\n</observation>"


def _call(x, y):
    return '<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": [%d, %d]}}\n</tool_call>' % (x, y)


def _image():
    img = Image.new("RGB", (140, 70), (255, 255, 255))
    for x in range(140):
        img.putpixel((x, x % 70), (x, 0, 255 - x))
    return img


def test_multiturn_dialog_is_exact_on_a_hand_built_chain():
    frame, resized = linearizer_frame(_image(), ST)
    assert frame.size == (280, 140) and resized.size == (280, 140)
    text = rescale_coordinates(CHAIN, Frame.identity(140, 70), frame)
    # every (x, y) -> (2x + 1, 2y + 1), the answer point included
    assert text == ("<think>\nThe star is near (21, 41). The ball is at (61, 81) and again (21, 41). Compare (101, 21)! "
                    "Done\n</think>\n<answer> (111, 31) </answer>")
    d = chain_to_dialog(text, Q, resized, frame, "SYS", ST, random.Random(0))
    # Walk: (21, 41) closes the first sentence -> call 1. (61, 81): its sentence runs to the full stop after the
    # second (21, 41) -> call 2 with the whole sentence. The repeated (21, 41) adds no text and no call (the
    # reference repeated its "(21, 41)" in the next think). "Compare (101, 21)!" -> call 3. " Done" after the last
    # point is dropped. The answer point (111, 31) is NOT a tool call (reference bug fixed).
    assert d.messages == [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": Q},
        {"role": "assistant", "content": "<think> The star is near (21, 41). </think>\n" + _call(21, 41)},
        {"role": "user", "content": OBS_DOT},
        {"role": "assistant", "content": "<think> The ball is at (61, 81) and again (21, 41). </think>\n" + _call(61, 81)},
        {"role": "user", "content": OBS_DOT},
        {"role": "assistant", "content": "<think> Compare (101, 21)! </think>\n" + _call(101, 21)},
        {"role": "user", "content": OBS_DOT},
        {"role": "assistant", "content": "<think> Based on all the information I've gathered, I'll now provide my final "
                                         "answer. </think>\n<answer> (111, 31) </answer>"},
    ]
    assert d.n_calls == 3 and len(d.images) == 4 and d.images[0] is resized
    for img, pt in zip(d.images[1:], [(21, 41), (61, 81), (101, 21)]):
        assert img.size == (56, 56)  # crop_size 56 (a multiple of 28)
        assert ImageChops.difference(img, ST.zoom.crop(resized, pt, frame).image).getbbox() is None
    assert SFTRecord(None, d.messages, ["x"] * 4).n_image_slots == 4


def test_multiturn_caps_tool_calls_and_shuffles_the_first_call_with_its_crop():
    frame, resized = linearizer_frame(_image(), ST)
    text = rescale_coordinates(CHAIN, Frame.identity(140, 70), frame)
    capped = chain_to_dialog(text, Q, resized, frame, "SYS", MultiturnSettings(**{**ST.__dict__, "max_turns": 2}),
                             random.Random(0))
    # at most 2 calls: the text of later points is dropped with the trailing text
    assert capped.n_calls == 2 and len(capped.messages) == 2 + 4 + 1
    plain = chain_to_dialog(text, Q, resized, frame, "SYS", ST, random.Random(5))
    moved = chain_to_dialog(text, Q, resized, frame, "SYS", MultiturnSettings(**{**ST.__dict__, "shuffle_prob": 1.0}),
                            random.Random(5))
    # Random(5): random() = 0.62 < 1 -> shuffle; choice(range(4, 7, 2)) = 6: after removing the first pair the list
    # is [sys, user, call2, obs, call3, obs, final]; inserting at 6 puts call 1 just before the final answer
    m = plain.messages
    assert moved.shuffled and moved.messages == m[:2] + m[4:8] + m[2:4] + m[8:]
    assert moved.images == [plain.images[0], plain.images[2], plain.images[3], plain.images[1]]


def test_points_outside_the_image_drop_the_dialog_with_a_failure_kind():
    frame, resized = linearizer_frame(_image(), ST)
    bad = "<think>\nFar away (200, 10).\n</think>\n<answer> left </answer>"
    text = rescale_coordinates(bad, Frame.identity(140, 70), frame)
    assert chain_to_dialog(text, Q, resized, frame, "SYS", ST, random.Random(0)) == "point_outside_image"
    assert chain_to_dialog("<think>\nno answer (1, 1)\n</think>", Q, resized, frame, "SYS", ST,
                           random.Random(0)) == "no_answer"


# ---------------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------------

def _json_out(text):
    lines = text.splitlines()
    return json.loads("\n".join(lines[next(i for i, ln in enumerate(lines) if ln.startswith("{")):]))


def test_linearize_command_writes_single_and_multiturn_data_split_by_tree(tmp_path):
    _image().save(tmp_path / "img.png")
    trees = tmp_path / "trees.jsonl"
    with open(trees, "w") as f:
        for k in range(2):
            f.write(json.dumps(hand_tree(str(tmp_path / "img.png"), f"t{k}").to_dict()) + "\n")
        f.write(json.dumps({"id": "t9", "error": "timeout", "error_message": "x"}) + "\n")
    out = tmp_path / "sft"
    res = CliRunner().invoke(app, ["linearize", str(trees), "--format", "both", "--out", str(out), "--json",
                                   "--set", "linearize.val_fraction=0.5", "--set", "linearize.shuffle_prob=0",
                                   "--set", "tool.offset=20", "--set", "tool.crop_size=56",
                                   "--set", "linearize.min_pixels=39200", "--set", "linearize.max_pixels=39200"])
    assert res.exit_code == 0, res.output
    stats = _json_out(res.stdout)
    assert stats["trees"] == 2 and stats["trees_skipped"] == {"error_record": 1}
    assert stats["chains"] == 8 and stats["corrected_share"] == 0.25
    train = json.loads((out / "reasoning_chains_train.json").read_text())
    val = json.loads((out / "reasoning_chains_val.json").read_text())
    # split by tree: int(2 * 0.5) = 1 tree on each side, never one tree on both
    assert len(train) == len(val) == 4
    assert {r["metadata"]["tree_id"] for r in train}.isdisjoint({r["metadata"]["tree_id"] for r in val})
    r0 = train[0]
    assert r0["messages"][0]["content"] == prompts.system_prompt("spatial", "single")
    assert r0["messages"][1]["content"] == Q and r0["images"] == [str(tmp_path / "img.png")]
    assert r0["gt_answer"] == "right"
    assert (out / "reasoning_chains.txt").read_text().count("----------------------\n\n----------------------") == 7
    mt = json.loads((out / "reasoning_chains_train_MULTITURN.json").read_text())
    mt += json.loads((out / "reasoning_chains_val_MULTITURN.json").read_text())
    assert len(mt) == stats["dialogs"] == 8
    names = [p for r in mt for p in r["images"][1:]]
    assert len(names) == len(set(names))  # unique crop file names (reference collision fixed)
    for r in mt:
        assert SFTRecord.from_dict(r).n_image_slots == len(r["images"])
        assert all((out / p).is_file() for p in r["images"])
        assert r["messages"][0]["content"] == prompts.system_prompt("spatial", "multiturn")
    # the corrected chain: its backtrack sentence ends up inside a think block, before the repeated prefix
    corrected = next(r for r in mt if r["metadata"]["kind"] == "corrected")
    # (10, 20) -> (21, 41); the repeat of (21, 41) after the backtrack keeps its sentence for the next call (61, 81),
    # chunks joined by a blank line
    assert corrected["messages"][4]["content"] == (
        "<think> " + BACK + "\nThe star is at (21, 41).\n\nThe ball is at (61, 81). </think>\n" + _call(61, 81))


def test_multiturn_trees_linearize_directly_into_dialogs(tmp_path):
    img = Image.new("RGB", (56, 56), (10, 200, 30))
    img.save(tmp_path / "m.png")
    turn = "<think> look at (10, 20) </think>\n" + _call(10, 20)
    final = "<think> seen </think>\n<answer> above </answer>"
    root = TreeNode(Q)
    child = root.add_child(TreeNode(turn, extra={"crop": {"point": [10, 20], "window": [0, 10, 20, 30]}}))
    child.rollouts = [Rollout("above", 1.0, [Q, turn, final], 2, 1, extra={"crops": [{"turn": 1, "point": [10, 20]}]}),
                      Rollout("below", 0.0, [Q, turn, "<answer> below </answer>"], 2, 1,
                              extra={"crops": [{"turn": 1, "point": [10, 20]}]})]
    rec = TreeRecord(Q, str(tmp_path / "m.png"), "above", "S", 1.0, "m0", root,
                     extra={"mode": "multiturn", "preset": "vstar", "frame": Frame.identity(56, 56).to_dict(),
                            "tool": {"offset": 10, "crop_size": 28, "draw_dot": False}})
    (tmp_path / "trees.jsonl").write_text(json.dumps(rec.to_dict()) + "\n")
    out = tmp_path / "sft"
    res = CliRunner().invoke(app, ["linearize", str(tmp_path), "--format", "multiturn", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    recs = json.loads((out / "reasoning_chains_train_MULTITURN.json").read_text())
    # one correct rollout -> one dialog: its turns as they were searched, the crop after the tool-call turn
    assert len(recs) == 1 and recs[0]["messages"] == [
        {"role": "system", "content": prompts.system_prompt("vstar", "multiturn")},
        {"role": "user", "content": Q},
        {"role": "assistant", "content": turn},
        {"role": "user", "content": prompts.observation_content(False)},
        {"role": "assistant", "content": final}]
    crop = Image.open(out / recs[0]["images"][1])
    want = ZoomTool(offset=10, crop_size=28, draw_dot=False).crop(img, (10, 20)).image
    assert ImageChops.difference(crop.convert("RGB"), want).getbbox() is None


F_ABOVE = prompts.FORCED_ANSWER_PREFIX + " above </answer>"


def _turn(x, y, word="look at"):
    return f"<think> {word} ({x}, {y}) </think>\n" + _call(x, y)


def mt_tree(image: str, tid: str = "m1") -> TreeRecord:
    """A multi-turn tree (56x56 image, crops 28 px around the point):

    root ─┬─ X = turn (10, 20), value 0.5: rollouts [X, answer] (1), [X, "below"] (0)
          │    └─ Y = turn (30, 40), value 1.0: rollouts [X, Y, answer] (1), [X, Y', answer] (1) where Y' names the
          │         same point (30, 40) in other words
          └─ Z = turn (40, 10), value 0.25: rollout [Z, answer] (1)"""
    def mro(texts, reward, crop_turns):
        return Rollout("above" if reward else "below", reward, [Q, *texts], len(texts), len(texts) - 1,
                       extra={"crops": [{"turn": k, "point": list(p)} for k, p in crop_turns]})

    x, y, y2, z = _turn(10, 20), _turn(30, 40), _turn(30, 40, "again"), _turn(40, 10)
    root = TreeNode(Q, value=0.6, visit_count=5)
    nx = root.add_child(TreeNode(x, value=0.5, visit_count=4))
    nx.rollouts = [mro([x, F_ABOVE], 1.0, [(1, (10, 20))]), mro([x, "<answer> below </answer>"], 0.0, [(1, (10, 20))])]
    ny = nx.add_child(TreeNode(y, value=1.0, visit_count=2))
    ny.rollouts = [mro([x, y, F_ABOVE], 1.0, [(1, (10, 20)), (2, (30, 40))]),
                   mro([x, y2, F_ABOVE], 1.0, [(1, (10, 20)), (2, (30, 40))])]
    nz = root.add_child(TreeNode(z, value=0.25, visit_count=1))
    nz.rollouts = [mro([z, F_ABOVE], 1.0, [(1, (40, 10))])]
    return TreeRecord(Q, image, "above", "S", 1.0, tid, root,
                      extra={"mode": "multiturn", "preset": "vstar", "frame": Frame.identity(56, 56).to_dict(),
                             "tool": {"offset": 10, "crop_size": 28, "draw_dot": False}})


def test_multiturn_tree_dialogs_go_through_value_selection_and_the_per_tree_cap(tmp_path):
    rec = mt_tree("/nowhere.png")
    cands = tree_dialog_chains(rec)
    # one candidate per correct rollout, pre-order: X, Y, Y', Z; all direct (no corrected dialogs)
    assert [c.node for c in cands] == ["0", "0.0", "0.0", "1"] and {c.kind for c in cands} == {"direct"}
    # scores (mean, min) of the node values on the path: X (0.5, 0.5), Y (0.75, 0.5), Z (0.25, 0.25);
    # coordinate sequences: think and tool call name one point, counted once
    assert [c.score for c in cands] == [(0.5, 0.5), (0.75, 0.5), (0.75, 0.5), (0.25, 0.25)]
    assert cands[1].coords == cands[2].coords == ((10, 20), (30, 40))
    # all: every distinct rollout; value: Y first, Y' dropped (same coordinates as Y), then X, then Z
    assert [c.node for c in select_chains(cands)] == ["0", "0.0", "0.0", "1"]
    assert [c.node for c in select_chains(cands, select="value")] == ["0.0", "0", "1"]
    capped = select_chains(cands, max_chains=2, rng=random.Random(0))
    assert len(capped) == 2 and all(c in cands for c in capped)
    # end to end: --select value and linearize.max_chains_per_tree reach multi-turn trees
    Image.new("RGB", (56, 56), (10, 200, 30)).save(tmp_path / "m.png")
    (tmp_path / "trees.jsonl").write_text(json.dumps(mt_tree(str(tmp_path / "m.png")).to_dict()) + "\n")

    def dialogs(*extra):
        out = tmp_path / f"o{len(list(tmp_path.glob('o*')))}"
        res = CliRunner().invoke(app, ["linearize", str(tmp_path / "trees.jsonl"), "--format", "multiturn",
                                       "--out", str(out), "--json", *extra])
        assert res.exit_code == 0, res.output
        return json.loads((out / "reasoning_chains_train_MULTITURN.json").read_text())

    assert [r["metadata"]["node"] for r in dialogs()] == ["0", "0.0", "0.0", "1"]
    best = dialogs("--select", "value")
    assert [r["metadata"]["node"] for r in best] == ["0.0", "0", "1"]
    # the best dialog: X's turn, its crop, Y's turn, its crop, the forced answer
    assert [m["content"] for m in best[0]["messages"][2:]] == [
        _turn(10, 20), prompts.observation_content(False), _turn(30, 40), prompts.observation_content(False), F_ABOVE]
    assert len(best[0]["images"]) == 3
    assert len(dialogs("--select", "value", "--set", "linearize.max_chains_per_tree=1")) == 1


def test_format_single_on_multiturn_trees_is_an_error_alone_and_a_counted_warning_when_mixed(tmp_path):
    Image.new("RGB", (56, 56), (10, 200, 30)).save(tmp_path / "m.png")
    mt = tmp_path / "mt.jsonl"
    mt.write_text(json.dumps(mt_tree(str(tmp_path / "m.png")).to_dict()) + "\n")
    # only multi-turn trees: --format single would write nothing -> one-line error
    res = CliRunner().invoke(app, ["linearize", str(mt), "--format", "single", "--out", str(tmp_path / "a")])
    assert res.exit_code != 0 and "--format single: all 1 trees were searched with mcts.mode: multiturn" in str(
        res.exception)
    # ... and without --format they become dialogs (the recipe's default format would drop them)
    res = CliRunner().invoke(app, ["linearize", str(mt), "--out", str(tmp_path / "b"), "--json"])
    assert res.exit_code == 0 and _json_out(res.stdout)["format"] == "multiturn"
    assert len(json.loads((tmp_path / "b" / "reasoning_chains_train_MULTITURN.json").read_text())) == 4
    # mixed with a single-turn tree: the single-turn chains are written, the multi-turn tree is counted as unused
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(mt.read_text() + json.dumps(hand_tree().to_dict()) + "\n")
    res = CliRunner().invoke(app, ["linearize", str(mixed), "--format", "single", "--out", str(tmp_path / "c"),
                                   "--json", "--set", "linearize.val_fraction=0"])
    assert res.exit_code == 0, res.output
    stats = _json_out(res.stdout)
    assert stats["multiturn_trees_unused"] == 1 and stats["chains"] == 4 and stats["single_train"] == 4
    assert ["multi-turn trees not used (--format single; use multiturn or both)", 1] in summary_rows(stats)


def test_no_trees_is_a_one_line_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    res = CliRunner().invoke(app, ["linearize", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "no trees found" in str(res.exception)
