"""The bundled synthetic data: released formats and layout, deterministic, idempotent, and internally consistent."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from PIL import Image

from vigorl_cli.data import demo
from vigorl_cli.data.demo import DEMO_SFT_SYSTEM, MANIFEST_NAME, generate_demo
from vigorl_cli.data.formats import read_samples, read_sft
from vigorl_cli.data.schema import parse_action, parse_box, parse_point
from vigorl_cli.data.validate import validate_paths

N = 12

# file → format it must be read back as (reference §3.2 layout)
EXPECTED = {
    "visual_search/vigorl_search_MCTS.jsonl": "llava",
    "visual_search/vigorl_SA_RL.jsonl": "rl",
    "visual_search/vstar/vstarbench_test.jsonl": "llava",
    "visual_search/vstar/vstarbench_test_RL.jsonl": "rl",
    "visual_search/MCTS_72b_reasoning_chains_train.json": "sharegpt",
    "spatial_reasoning/vigorl_sat2_MCTS.jsonl": "llava",
    "spatial_reasoning/vigorl_sat2_train_RL.jsonl": "rl",
    "spatial_reasoning/vigorl_sat2_val_RL.jsonl": "rl",
    "spatial_reasoning/sat2_test/sat2_test.jsonl": "llava",
    "spatial_reasoning/blink/blink_validation.jsonl": "llava",
    "spatial_reasoning/MCTS_72b_reasoning_chains_train.json": "sharegpt",
    "spatial_reasoning/MCTS_72b_reasoning_chains_val.json": "sharegpt",
    "web_grounding/vigorl_osatlas_MCTS.jsonl": "llava",
    "web_grounding/vigorl_osatlas_train_RL.jsonl": "rl",
    "web_grounding/vigorl_osatlas_val_RL.jsonl": "rl",
    "web_grounding/ScreenSpot-V2/screenspot_v2_test.jsonl": "llava",
    "web_grounding/ScreenSpot-Pro/screenspot_pro_test.jsonl": "llava",
    "web_grounding/MCTS_72b_reasoning_chains_train.json": "sharegpt",
    "web_grounding/MCTS_72b_reasoning_chains_val.json": "sharegpt",
    "web_action/vigorl_web_action_MCTS.jsonl": "llava",
    "web_action/vigorl_ical_train_RL.jsonl": "rl",
    "web_action/vigorl_ical_val_RL.jsonl": "rl",
}
SAMPLE_FILES = [f for f, fmt in EXPECTED.items() if fmt != "sharegpt"]
SFT_FILES = [f for f, fmt in EXPECTED.items() if fmt == "sharegpt"]
POINT_RE = re.compile(r"\((\d+), (\d+)\)")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    r = tmp_path_factory.mktemp("demo")
    generate_demo(r, n_per_task=N, seed=0)
    return r


@pytest.fixture(scope="module")
def manifest(root) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def _all_files(r: Path) -> dict[str, bytes]:
    return {str(p.relative_to(r)): p.read_bytes() for p in sorted(r.rglob("*")) if p.is_file()}


def _size(root: Path, rel: str) -> tuple[int, int]:
    with Image.open(root / rel) as im:
        return im.size


def test_same_seed_gives_byte_identical_files(root, tmp_path):
    generate_demo(tmp_path, n_per_task=N, seed=0)
    a, b = _all_files(root), _all_files(tmp_path)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []


def test_other_seed_gives_other_data(root, tmp_path):
    generate_demo(tmp_path, n_per_task=N, seed=1)
    a, b = _all_files(root), _all_files(tmp_path)
    changed = [k for k in a if k in b and a[k] != b[k]]
    assert any(k.endswith(".png") for k in changed)
    assert any(k.endswith(".jsonl") for k in changed)


def test_second_call_returns_manifest_without_rewriting(root, manifest):
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = generate_demo(root, n_per_task=N, seed=0)
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamps


def test_regenerates_when_a_listed_file_is_gone(tmp_path):
    m = generate_demo(tmp_path, n_per_task=6, seed=3)
    victim = tmp_path / "web_action/vigorl_ical_val_RL.jsonl"
    data = victim.read_bytes()
    victim.unlink()
    assert generate_demo(tmp_path, n_per_task=6, seed=3) == m
    assert victim.read_bytes() == data


def test_interrupted_run_leaves_no_manifest(tmp_path, monkeypatch):
    generate_demo(tmp_path, n_per_task=6, seed=0)

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setitem(demo._TASKS, "web_action", boom)
    with pytest.raises(RuntimeError):
        generate_demo(tmp_path, n_per_task=7, seed=0)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_too_small_n_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 6"):
        generate_demo(tmp_path, n_per_task=5)


def test_smallest_demo_has_non_empty_sft_val_and_validates(tmp_path):
    """At the minimum size every file holds records: the SFT chains split into a train and a val file."""
    m = generate_demo(tmp_path, n_per_task=demo.MIN_PER_TASK, seed=0)
    assert min(m["files"].values()) >= 1, m["files"]
    for task in ("spatial_reasoning", "web_grounding"):
        assert m["files"][f"{task}/MCTS_72b_reasoning_chains_val.json"] >= 1
        assert m["files"][f"{task}/vigorl_{'sat2' if task.startswith('s') else 'osatlas'}_MCTS.jsonl"] == 2
    report = validate_paths([tmp_path], tmp_path)
    assert [str(e) for e in report.errors] == [] and report.ok


def test_split_counts_honours_minimums():
    assert demo._split_counts(6, [0.25, 0.35, 0.1, 0.15, 0.15], [2, 1, 1, 1, 1]) == [2, 1, 1, 1, 1]
    assert demo._split_counts(40, [0.25, 0.35, 0.1, 0.15, 0.15], [2, 1, 1, 1, 1]) == [10, 14, 4, 6, 6]
    assert sum(demo._split_counts(7, [0.4, 0.45, 0.15])) == 7


def test_manifest_lists_every_file_with_its_count(root, manifest):
    assert manifest["seed"] == 0 and manifest["n_per_task"] == N and manifest["version"] == demo.DEMO_VERSION
    assert set(manifest["files"]) == set(EXPECTED)
    assert manifest["n_images"] == 4 * N
    for rel, count in manifest["files"].items():
        if EXPECTED[rel] == "sharegpt":
            assert len(json.loads((root / rel).read_text())) == count
        else:
            assert len((root / rel).read_text().splitlines()) == count


def test_each_task_draws_n_images_shared_out_between_its_files(root):
    for task in ("visual_search", "spatial_reasoning", "web_grounding", "web_action"):
        files = [f for f in SAMPLE_FILES if f.startswith(task + "/")]
        images = set()
        for f in files:
            sf = read_samples(root / f)
            assert len(sf.samples) >= 1, f
            images |= {p for s in sf.samples for p in s.images}
        assert len(images) == N, task
    # V* test is the same data in both formats
    a = read_samples(root / "visual_search/vstar/vstarbench_test.jsonl").samples
    b = read_samples(root / "visual_search/vstar/vstarbench_test_RL.jsonl").samples
    assert [(s.images, s.question, s.answer) for s in a] == [(s.images, s.question, s.answer) for s in b]


@pytest.mark.parametrize("rel", list(EXPECTED))
def test_every_file_reads_back_cleanly_in_its_format(root, rel):
    sf = read_samples(root / rel)
    assert sf.errors == []
    assert sf.format == EXPECTED[rel]
    assert sf.samples
    ids = [s.id for s in sf.samples]
    assert len(ids) == len(set(ids))
    for s in sf.samples:
        assert len(s.images) == 1
        assert s.question.startswith("<image>\n")
        assert not Path(s.images[0]).is_absolute() and s.images[0].startswith(rel.split("/")[0] + "/")


def test_images_are_valid_pngs(root):
    images = {p for f in SAMPLE_FILES for s in read_samples(root / f).samples for p in s.images}
    for rel in images:
        with Image.open(root / rel) as im:
            assert im.format == "PNG"
            im.load()
            assert 320 <= max(im.size) <= 800


def test_ground_truth_matches_each_task(root):
    for rel in SAMPLE_FILES:
        for s in read_samples(root / rel).samples:
            w, h = _size(root, s.images[0])
            if rel.startswith("web_grounding/"):
                assert re.fullmatch(r"\(\d+, \d+, \d+, \d+\)", s.answer), s.answer
                x1, y1, x2, y2 = parse_box(s.answer)
                assert s.task == "grounding" and s.target.box == (x1, y1, x2, y2)
                assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
            elif rel.startswith("web_action/"):
                assert s.task == "web_action" and parse_action(s.answer) == s.answer
                assert re.fullmatch(r"click \[\d+\]|type \[\d+\] \[[a-z ]+\]|scroll \[down\]", s.answer)
                assert "OBJECTIVE: " in s.question and "PREVIOUS ACTIONS: " in s.question
            else:
                assert s.task == "multiple_choice"
                assert s.answer in s.choices and s.answer == s.answer.lower()
                assert "Answer Choices:\nA. " in s.question


def test_benchmark_sub_splits_are_recoverable(root):
    for s in read_samples(root / "visual_search/vstar/vstarbench_test.jsonl").samples:
        cat = "relative_position" if "/relative_position/" in s.images[0] else "direct_attributes"
        assert f"/{cat}/" in s.images[0]
        assert len(s.choices) == (2 if cat == "relative_position" else 4)
    for s in read_samples(root / "spatial_reasoning/blink/blink_validation.jsonl").samples:
        assert re.fullmatch(r"val_(Spatial_Relation|Relative_Depth)_\d+", s.id)

    def raw(rel):
        return [json.loads(x) for x in (root / rel).read_text().splitlines()]

    assert all(r["data_type"] in ("text", "icon") and r["data_source"]
               for r in raw("web_grounding/ScreenSpot-V2/screenspot_v2_test.jsonl"))
    assert all(r["data_type"] in ("text", "icon") and r["platform"] in ("windows", "macos", "linux")
               for r in raw("web_grounding/ScreenSpot-Pro/screenspot_pro_test.jsonl"))
    # extra keys survive the reader (they are what eval groups by)
    s = read_samples(root / "web_grounding/ScreenSpot-Pro/screenspot_pro_test.jsonl").samples[0]
    assert s.meta["extra"]["data_type"] in ("text", "icon")


@pytest.mark.parametrize("rel", SFT_FILES)
def test_sft_chains_are_grounded_in_their_images(root, rel):
    recs, errors = read_sft(root / rel)
    assert errors == [] and recs
    mcts_rel = {"visual_search": "visual_search/vigorl_search_MCTS.jsonl",
                "spatial_reasoning": "spatial_reasoning/vigorl_sat2_MCTS.jsonl",
                "web_grounding": "web_grounding/vigorl_osatlas_MCTS.jsonl"}[rel.split("/")[0]]
    by_image = {s.images[0]: s for s in read_samples(root / mcts_rel).samples}
    assert len({r.id for r in recs}) == len(recs)
    for r in recs:
        assert r.n_image_slots == len(r.images) == 1
        assert [m["role"] for m in r.messages] == ["system", "user", "assistant"]
        assert r.messages[0]["content"] == DEMO_SFT_SYSTEM and r.metadata == {}
        src = by_image[r.images[0]]  # chains come from MCTS-input samples
        assert r.messages[1]["content"] == src.question and r.gt_answer == src.answer
        m = re.fullmatch(r"<think>\n(.+)\n</think>\n<answer> (.+) </answer>", r.messages[2]["content"], re.DOTALL)
        assert m, r.messages[2]["content"]
        w, h = _size(root, r.images[0])
        points = [(int(x), int(y)) for x, y in POINT_RE.findall(m.group(1))]
        assert len(points) >= 2
        assert all(0 <= x < w and 0 <= y < h for x, y in points)
        if rel.startswith("web_grounding/"):
            x, y = parse_point(m.group(2))
            x1, y1, x2, y2 = parse_box(r.gt_answer)
            assert x1 <= x <= x2 and y1 <= y <= y2
        else:
            assert m.group(2) == r.gt_answer


def test_sft_train_and_val_cover_the_mcts_samples(root):
    for task in ("spatial_reasoning", "web_grounding"):
        mcts = next(f for f in SAMPLE_FILES if f.startswith(task + "/") and f.endswith("_MCTS.jsonl"))
        want = {s.images[0] for s in read_samples(root / mcts).samples}
        tr = {r.images[0] for r in read_sft(root / f"{task}/MCTS_72b_reasoning_chains_train.json")[0]}
        va = {r.images[0] for r in read_sft(root / f"{task}/MCTS_72b_reasoning_chains_val.json")[0]}
        assert tr and va and not (tr & va) and tr | va == want


def test_whole_demo_passes_validation(root, manifest):
    report = validate_paths([root], root)
    assert [str(e) for e in report.errors] == []
    assert report.ok
    assert len(report.files) == len(manifest["files"])  # the manifest itself is skipped
    assert report.n_records == sum(manifest["files"].values())


def test_default_size_is_fast(tmp_path):
    t0 = time.perf_counter()
    m = generate_demo(tmp_path)
    elapsed = time.perf_counter() - t0
    assert m["n_images"] == 4 * 200
    assert elapsed < 15, f"default demo took {elapsed:.1f} s"
