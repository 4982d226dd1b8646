"""`vigorl data validate`: each kind of problem is found, with the right kind and line, and nothing else is reported."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from vigorl_cli.data.validate import render_report, validate_paths

W, H = 64, 48


@pytest.fixture()
def root(tmp_path) -> Path:
    """A tiny DATA_ROOT with two good images and one truncated PNG."""
    img_dir = tmp_path / "task" / "images"
    img_dir.mkdir(parents=True)
    for name, color in (("a.png", (200, 30, 30)), ("b.png", (30, 30, 200))):
        Image.new("RGB", (W, H), color).save(img_dir / name)
    good = (img_dir / "a.png").read_bytes()
    (img_dir / "broken.png").write_bytes(good[: len(good) // 2])
    return tmp_path


def llava(i, image="task/images/a.png", q="<image>\nIs the red box left or right of the blue ball?\nAnswer Choices:\n"
          "A. left\nB. right", a="left") -> dict:
    return {"id": str(i), "image": image, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def write_jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def problems(report) -> list[tuple[str, int]]:
    return [(e.kind, e.line) for e in report.errors]


def test_clean_file_is_ok(root):
    f = write_jsonl(root / "task" / "clean.jsonl", [llava(i, image=f"task/images/{'ab'[i % 2]}.png") for i in range(4)])
    rep = validate_paths([f], root)
    assert problems(rep) == []
    assert rep.ok is True
    (row,) = rep.files
    assert (row.format, row.n_records, row.n_ok, row.n_errors) == ("llava", 4, 4, 0)


def test_corrupt_image(root):
    f = write_jsonl(root / "d.jsonl", [llava(1), llava(2, image="task/images/broken.png"), llava(3)])
    rep = validate_paths([f], root)
    assert problems(rep) == [("corrupt_image", 2)]
    assert rep.ok is False and rep.files[0].n_ok == 2


def test_missing_image(root):
    f = write_jsonl(root / "d.jsonl", [llava(1), llava(2), llava(3, image="task/images/nope.png")])
    rep = validate_paths([f], root)
    assert problems(rep) == [("missing_image", 3)]
    assert "nope.png" in rep.errors[0].message and rep.ok is False


def test_malformed_line_is_reported_and_the_others_still_read(root):
    f = write_jsonl(root / "d.jsonl", [llava(1), '{"id": "2", "image": ', llava(3), llava(4)])
    rep = validate_paths([f], root)
    assert problems(rep) == [("bad_json", 2)]
    (row,) = rep.files
    assert (row.n_records, row.n_ok) == (4, 3) and rep.ok is False


def test_duplicate_id_is_reported_on_the_later_line(root):
    f = write_jsonl(root / "d.jsonl", [llava(1), llava(2), llava(1), llava(4)])
    rep = validate_paths([f], root)
    assert problems(rep) == [("duplicate_id", 3)]
    assert "line 1" in rep.errors[0].message and rep.ok is False


def test_box_outside_the_image_and_inverted_box(root):
    q = "<image>\nClick on the 'Submit' button"
    f = write_jsonl(root / "d.jsonl", [llava(1, q=q, a=f"(0, 0, {W}, {H})"),  # touching the border is inside
                                       llava(2, q=q, a=f"(10, 10, {W + 5}, 20)"),
                                       llava(3, q=q, a="(30, 10, 20, 20)")])
    rep = validate_paths([f], root)
    assert problems(rep) == [("out_of_bounds", 2), ("bad_box", 3)]
    assert f"{W}x{H}" in rep.errors[0].message and rep.ok is False


def test_point_outside_the_image(root):
    f = write_jsonl(root / "d.jsonl", [llava(1, q="<image>\nWhere?", a=f"({W + 1}, 3)"), llava(2, q="<image>\nWhere?",
                                                                                                a="(3, 3)")])
    assert problems(validate_paths([f], root)) == [("out_of_bounds", 1)]


def test_answer_not_among_choices(root):
    f = write_jsonl(root / "d.jsonl", [llava(1), llava(2, a="above"), llava(3, a="B"), llava(4, a="Left")])
    rep = validate_paths([f], root)
    assert problems(rep) == [("answer_not_in_choices", 2), ("answer_not_in_choices", 3)]  # case does not matter here
    assert "letter" in rep.errors[1].message and "'right'" in rep.errors[1].message
    assert rep.ok is False


def test_rl_answer_with_capitals_cannot_be_scored(root):
    q = "<image>\nIs it left or right?\nAnswer Choices:\nA. Left\nB. Right"
    f = write_jsonl(root / "d_RL.jsonl", [{"problem": q, "answer": "left", "images": ["task/images/a.png"]},
                                          {"problem": q, "answer": "Left", "images": ["task/images/a.png"]}])
    rep = validate_paths([f], root)
    assert rep.files[0].format == "rl"
    assert problems(rep) == [("answer_case", 2)]


def test_rl_placeholders_must_match_images(root):
    f = write_jsonl(root / "d_RL.jsonl", [{"problem": "<image>Where is it?", "answer": "(1, 2)",
                                           "images": ["task/images/a.png", "task/images/b.png"]}])
    assert problems(validate_paths([f], root)) == [("image_count", 1)]


def test_sharegpt_image_placeholders_must_match_images(root):
    def rec(i, n_images):
        return {"id": f"0_{i}", "metadata": {}, "images": ["task/images/a.png"] * n_images, "gt_answer": "left",
                "messages": [{"role": "system", "content": "sys"},
                             {"role": "user", "content": "<image>\nIs it left?\nAnswer Choices:\nA. left\nB. right"},
                             {"role": "assistant",
                              "content": "<think>\nAt (3, 4).\n</think>\n<answer> left </answer>"}]}
    f = root / "chains.json"
    f.write_text(json.dumps([rec(0, 1), rec(1, 2), rec(2, 1)], indent=2))
    rep = validate_paths([f], root)
    assert rep.files[0].format == "sharegpt"
    assert problems(rep) == [("image_count", 2)]


def test_folder_expansion_skips_the_demo_manifest(root):
    write_jsonl(root / "task" / "clean.jsonl", [llava(1)])
    (root / "demo_manifest.json").write_text(json.dumps({"version": 1, "files": {}}))
    rep = validate_paths([root], root)
    assert [Path(f.path).name for f in rep.files] == ["clean.jsonl"] and rep.ok


def test_images_are_found_above_the_data_file_without_a_root(root):
    f = write_jsonl(root / "task" / "sub" / "d.jsonl", [llava(1)])
    f2 = write_jsonl(root / "task" / "sub" / "e.jsonl", [llava(1, image="task/images/gone.png")])
    rep = validate_paths([f, f2], None)
    assert problems(rep) == [("missing_image", 1)] and rep.files[0].ok and not rep.files[1].ok


def test_missing_data_file_and_broken_json_document(root):
    (root / "broken.json").write_text('[{"id": 1},\n  {oops}]')
    rep = validate_paths([root / "nope.jsonl", root / "broken.json"], root)
    assert problems(rep) == [("missing_file", 0), ("bad_json", 2)]
    assert [f.n_records for f in rep.files] == [0, 0] and rep.ok is False


def test_empty_report_is_not_ok(tmp_path):
    assert validate_paths([tmp_path], tmp_path).ok is False


def test_render_report_shows_counts_and_errors(root):
    f = write_jsonl(root / "d.jsonl", [llava(1), llava(2, q="<image>\nOBJECTIVE: x", a="scroll [down]"),
                                       llava(3, image="task/images/nope.png")])
    rep = validate_paths([f], root)
    buf = io.StringIO()
    render_report(rep, Console(file=buf, width=200, color_system=None), max_errors=5)
    out = buf.getvalue()
    assert f"{f}:3" in out and "missing_image" in out and "nope.png" in out
    assert "1 problem(s)" in out
    assert re.search(r"d\.jsonl\s*│\s*llava\s*│\s*3\s*│\s*2\s*│\s*1\s*│", out)  # records, ok, errors
