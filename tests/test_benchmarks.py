"""The benchmark suite: loaders for every released / official format, hand-computed scores in our default and the
reference-compatible mode, frame invariance, per-split reports, several benchmarks in one table, eval recipes.

Fixtures: ``tests/fixtures/benchmarks/`` (``make_fixtures.py`` writes them from the format descriptions,
``cases.json`` holds the scripted outputs and the expected scores derived by hand; ``*/real/`` are byte-exact public
records, see the README there).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vigorl_cli.engines.base import Completion, SamplingParams
from vigorl_cli.errors import DataError
from vigorl_cli.eval import loaders
from vigorl_cli.eval.benchmarks import (
    BENCHMARKS,
    blink_official_extract,
    get_benchmark,
    load_samples,
    reference_answer,
    reference_target,
)
from vigorl_cli.eval.runner import EvalSettings, evaluate
from vigorl_cli.models import prompts
from vigorl_cli.vision.frames import Frame

FIX = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
ROOT = Path(__file__).resolve().parent.parent
CASES = json.loads((FIX / "cases.json").read_text())


@pytest.fixture(autouse=True)
def _bench_image_cache(tmp_path, monkeypatch):
    """Images materialised from parquet bytes go to a per-test cache."""
    monkeypatch.setenv("VIGORL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def processor():
    """The tiny Qwen2.5-VL processor with a pixel budget above every fixture, so images reach the model unchanged
    (sides are multiples of 28) unless a benchmark limit applies."""
    from vigorl_cli.models.load import load_processor
    from vigorl_cli.models.tiny import tiny_path

    return load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl", max_pixels=28 * 28 * 20000)


class ScriptedEngine:
    """Returns prepared texts: ``script[sample_id]`` is a list (one text per assistant turn) or a callable
    ``(request) -> text``. Tool-call turns end on ``</tool_call>``; answers end with ``<|im_end|>``."""

    name = "scripted"

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, script, 0

    def generate(self, requests):
        out = []
        for r in requests:
            self.calls += 1
            sid, _draw, turn = r.request_id.rsplit("/", 2)
            entry = self.script[sid]
            text = entry(r) if callable(entry) else entry[int(turn)]
            if text.rstrip().endswith("</tool_call>"):
                reason = "</tool_call>"
            else:
                text, reason = text + "<|im_end|>", "eos"
            out.append([Completion(self.tok(text, add_special_tokens=False)["input_ids"], text, None, "stop", reason)])
        return out


def _settings(tmp_path, root, **kw):
    return EvalSettings(data_root=root, out_dir=tmp_path / "out", sampling=SamplingParams(max_new_tokens=64), **kw)


def _records(tmp_path, bench_name):
    d = tmp_path / "out" / bench_name.replace(":", "_").replace("/", "_")
    return {r["id"]: r for r in map(json.loads, (d / "samples.jsonl").read_text().splitlines())}


# ---------------------------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------------------------

def test_every_benchmark_declares_loader_judge_prompt_limits_tools_and_splits():
    for name in ("vstar", "blink", "blink-spatial", "sat2", "robospatial", "robospatial-vqa", "screenspot-v2",
                 "screenspot-pro", "screenspot-pro-lr", "os-atlas", "vwa"):
        b = BENCHMARKS[name]
        assert b.files and b.judge and b.split is not None and b.formats, name
        assert set(b.formats) <= set(loaders.FORMATS), name
        prompts.system_prompt(b.preset, "multiturn" if b.mode == "multi" else "single")
        from vigorl_cli.vision.zoom import ZoomTool

        ZoomTool.preset(b.zoom)
        assert (b.max_side or b.max_pixels), name
    assert BENCHMARKS["vstar"].mode == "multi" and BENCHMARKS["blink"].max_side == 1260
    assert BENCHMARKS["screenspot-pro"].max_pixels == 12_960_000 and BENCHMARKS["screenspot-pro-lr"].max_pixels == 1920 ** 2
    for demo in ("demo-vsearch", "demo-spatial", "demo-grounding", "demo-action"):
        assert BENCHMARKS[demo].demo


def test_benchmark_names_take_a_path_and_overrides():
    b = get_benchmark("screenspot-pro@max_pixels=6013280@mode=multi:/data/ScreenSpot-Pro")
    assert (b.name, b.max_pixels, b.mode, b.source) == ("screenspot-pro@max_pixels=6013280@mode=multi", 6013280,
                                                        "multi", "/data/ScreenSpot-Pro")
    assert get_benchmark("vstar:/x").name == "vstar" and get_benchmark("blink@max_side=none").max_side is None
    for bad in ("vstar@max_pixels=lots", "vstar@crop=3", "vstar@zoom=huge", "nope"):
        with pytest.raises(DataError):
            get_benchmark(bad)


def test_missing_data_names_the_file_and_the_official_alternative(tmp_path):
    with pytest.raises(DataError) as e:
        load_samples(get_benchmark("screenspot-pro"), tmp_path)
    assert "screenspot_pro_test.jsonl" in str(e.value) and "screenspot-pro:PATH" in e.value.hint


# ---------------------------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------------------------

def test_vstar_official_questions_and_per_image_json():
    r = loaders.load(FIX / "vstar" / "official")
    assert r.format == "vstar_questions" and not r.errors
    s0, s1 = r.samples
    assert (s0.answer, s0.choices, s0.meta["answer_letter"], s0.meta["category"]) == (
        "blue", ["red", "blue", "green", "yellow"], "B", "attribute")
    assert "Answer with the option" not in s0.question and s0.question.endswith("D. yellow")
    assert s0.target.box == (100, 60, 140, 90)  # xywh [100, 60, 40, 30] from the per-image JSON
    assert s1.meta["boxes"] == [[50, 200, 80, 230], [300, 180, 420, 260]] and s1.meta["category"] == "spatial"
    # the per-image JSON alone: the first option is correct there, so options are shuffled, reproducibly
    a = loaders.load(FIX / "vstar" / "official" / "relative_position" / "sa_201.json").samples[0]
    b = loaders.read_vstar_json(FIX / "vstar" / "official").samples
    assert a.answer == "right" and a.choices[ord(a.meta["answer_letter"]) - 65] == "right"
    assert [s.id for s in b] == ["direct_attributes/sa_101", "relative_position/sa_201"]
    assert b[1].choices == a.choices and b[0].answer == "blue"


def test_blink_hf_parquet_concatenates_multi_image_items_like_blink_does():
    r = loaders.load(FIX / "blink" / "hf")
    assert r.format == "blink_hf"
    assert [str(e).split(": ", 2)[-1][:25] for e in r.errors] == ["answer 'hidden' is not a "]  # test-split row
    by = {s.id: s for s in r.samples}
    rd = by["val_Relative_Depth_1"]
    assert (rd.answer, rd.meta["answer_letter"], rd.meta["subtask"]) == ("B is closer", "B", "Relative_Depth")
    mv = by["val_Multi-view_Reasoning_1"]
    with Image.open(mv.images[0]) as im:  # 112x84 + 10 px black + 84x56 centred: (206, 84)
        assert im.size == (206, 84)
        assert im.getpixel((5, 40)) == (255, 0, 0) and im.getpixel((116, 40)) == (0, 0, 0)
        assert im.getpixel((150, 40)) == (0, 0, 255) and im.getpixel((150, 5)) == (0, 0, 0)


def test_blink_official_extraction_on_the_released_gpt4o_outputs():
    """Real BLINK records (zeyofu/BLINK_Benchmark, Apache-2.0): the rule part of analyze_answer reproduces the
    released extraction wherever it applies; the two answers without a '(X)' token went to GPT-3.5 there."""
    recs = json.loads((FIX / "blink" / "real" / "saved_outputs_GPT4o_val.sample.json").read_text())
    needs_gpt = set()
    for r in recs:
        got = blink_official_extract(r["full_prediction"], 4)
        if got is None:
            needs_gpt.add(r["idx"])
        else:
            assert got == r["prediction"], r["idx"]
    assert needs_gpt == {"val_Multi-view_Reasoning_61", "val_Multi-view_Reasoning_76"}


def test_blink_answer_key_ids_give_the_subtask_splits():
    key = json.loads((FIX / "blink" / "real" / "val_answers.sample.json").read_text())
    from vigorl_cli.data.schema import Sample

    subtasks = {BENCHMARKS["blink"].splits_of(Sample(id=k, images=[], question="q", answer="a"), "")[0] for k in key}
    assert len(subtasks) == 14 and {"Multi-view_Reasoning", "Relative_Depth", "Spatial_Relation"} <= subtasks
    assert all(v in ("(A)", "(B)", "(C)", "(D)") for v in key.values())


def test_sat_hf_options_are_shuffled_reproducibly_and_two_frames_concatenated():
    a, b = loaders.load(FIX / "sat2" / "hf").samples, loaders.load(FIX / "sat2" / "hf").samples
    assert [s.choices for s in a] == [s.choices for s in b]
    for s in a:
        assert s.choices[ord(s.meta["answer_letter"]) - 65] == s.answer
        assert s.question.startswith("<image>\nQuestion: ")
    assert a[1].meta["question_type"] == "ego_movement" and a[1].meta["n_images"] == 2
    with Image.open(a[1].images[0]) as im:
        assert im.size == (112 * 2 + 10, 84)


def test_robospatial_yes_no_get_options_and_context_keeps_the_polygon():
    r = loaders.load(FIX / "robospatial" / "official")
    by = {s.id: s for s in r.samples}
    assert by["configuration_1"].choices == ["yes", "no"] and by["configuration_1"].answer == "no"
    assert by["context_0"].meta["polygon"][0] == [0.1, 0.5] and by["context_0"].task == "vqa"
    assert Path(by["context_0"].images[0]).is_file()
    hf = loaders.load(FIX / "robospatial" / "hf").samples  # HF parquet: image bytes written to the cache
    assert [(s.id, s.answer) for s in hf] == [("compatibility_0", "yes")] and Path(hf[0].images[0]).is_file()


def test_screenspot_v2_official_xywh_equals_the_released_xyxy():
    off = {(Path(s.images[0]).name, s.question): s.target.box for s in loaders.load(FIX / "screenspot-v2" / "official").samples}
    items, _ = load_samples(get_benchmark("screenspot-v2"), FIX / "screenspot-v2" / "released")
    rel = {(Path(s.images[0]).name, s.question): s.target.box for s, _ in items}
    assert off == rel  # e.g. [1000, 20, 100, 40] xywh == "(1000, 20, 1100, 60)"
    s = next(s for s in loaders.load(FIX / "screenspot-v2" / "official").samples if "pc_" in s.images[0])
    assert BENCHMARKS["screenspot-v2"].splits_of(s, "") == ["platform:desktop", "ui:icon", "desktop/icon"]


def test_screenspot_pro_official_and_released_splits():
    r = loaders.load(FIX / "screenspot-pro" / "official" / "annotations" / "word_macos.json")
    assert [s.id for s in r.samples] == ["word_macos_0", "word_macos_1"] and Path(r.samples[0].images[0]).is_file()
    items, _ = load_samples(get_benchmark("screenspot-pro"), FIX / "screenspot-pro" / "released")
    # the converted file has no group field: application from the image folder "<app>_<os>", group from the card
    assert [get_benchmark("screenspot-pro").splits_of(s, p) for s, p in items] == [
        ["group:CAD", "platform:windows"], ["group:Office", "platform:macos"]]


def test_os_atlas_normalised_boxes_are_denormalised_with_the_image_size():
    r = loaders.load(FIX / "os-atlas" / "official" / "desktop_domain" / "windows_splited.json")
    s = r.samples[0]  # 560x420, [0.1, 0.2, 0.2, 0.3]
    assert s.target.box == pytest.approx((56, 84, 112, 126)) and s.answer == "(56, 84, 112, 126)"
    assert s.meta["domain"] == "desktop" and len(r.samples) == 2


def test_vwa_next_action_records_render_the_vigorl_query():
    s = loaders.load(FIX / "vwa" / "official" / "next_action.json").samples[0]
    assert s.question == ("<image>\nOBJECTIVE: Buy the cheapest red shoes.\n\nPREVIOUS ACTIONS: \n1. click [12]\n"
                          "2. type [5] [red shoes]\n\nIMAGE:\n")
    assert s.task == "web_action" and s.answer == "click [1234]" and s.meta["site"] == "shopping"


def test_action_mode_and_live_task_records_are_refused_with_a_reason(tmp_path):
    """Real records: OS-Atlas action-mode eval data (Apache-2.0) and VisualWebArena task configs (MIT)."""
    with pytest.raises(DataError, match="action-mode"):
        load_samples(get_benchmark(f"os-atlas:{FIX / 'os-atlas' / 'real' / 'gui_act_web_test.sample.jsonl'}"), tmp_path)
    with pytest.raises(DataError, match="task configs"):
        load_samples(get_benchmark(f"vwa:{FIX / 'vwa' / 'real' / 'test_reddit.raw.sample.json'}"), tmp_path)
    with pytest.raises(DataError, match="does not read"):  # a BLINK release handed to the V* benchmark
        load_samples(get_benchmark(f"vstar:{FIX / 'blink' / 'hf'}"), tmp_path)


def test_a_released_file_or_data_root_can_be_named_directly(tmp_path):
    for name in (f"vstar:{FIX / 'vstar' / 'released'}",
                 f"blink:{FIX / 'blink' / 'released' / 'spatial_reasoning' / 'blink' / 'blink_validation.jsonl'}"):
        items, errors = load_samples(get_benchmark(name), tmp_path)  # tmp_path: an unrelated --data-root
        assert items and not errors
        assert all(Path(s.images[0]).is_absolute() and Path(s.images[0]).is_file() for s, _ in items), name


def test_data_root_that_is_an_official_release_is_read_directly():
    items, _ = load_samples(get_benchmark("screenspot-pro"), FIX / "screenspot-pro" / "official")
    assert len(items) == 4 and items[0][0].meta["source_format"] == "screenspot_pro"
    items, _ = load_samples(get_benchmark("blink-spatial"), FIX / "blink" / "released")
    assert sorted(s.id for s, _ in items) == ["val_Multi-view_Reasoning_4", "val_Relative_Depth_1",
                                              "val_Spatial_Relation_2"]  # Counting filtered out


# ---------------------------------------------------------------------------------------------------------------
# reference-compatible pieces, by hand
# ---------------------------------------------------------------------------------------------------------------

def test_reference_answer_follows_single_path_rollouts():
    ra = reference_answer
    assert ra(["<think> a (1, 2) </think>\n<answer> B. left </answer>"], multiturn=False) == ("B. left", None)
    assert ra(["<think> a </think><answer> left"], multiturn=False) == ("left", None)  # unclosed: to the end
    assert ra(["<answer>x</answer>"], multiturn=False) == ("x", None)  # no think needed
    assert ra(["<think> (3, 4) </think> so (3, 4)"], multiturn=False) == (None, "no_answer_tag")
    eleven = "".join(f"<think> step {i} </think>" for i in range(11)) + "<answer> x </answer>"
    assert ra([eleven], multiturn=False) == (None, "no_answer_tag")  # depth > 10 before the answer node
    assert ra(["".join(f"<think> {i} </think>" for i in range(10)) + "<answer> x </answer>"], multiturn=False) == ("x", None)
    assert ra(["<think> a", "<answer> y </answer>"], multiturn=True) == (None, "unclosed_think")
    assert ra(["plain text"], multiturn=False, no_thinking=True) == ("plain text", None)


def test_reference_target_rescales_like_the_reference_eval():
    from vigorl_cli.data.schema import Target

    box = (1000, 600, 1200, 700)
    # max side 1260 on 2520x1400: s = 0.5 on both axes, int() -> (500, 300, 600, 350)
    fr = Frame.resized(2520, 1400, 1260, 700)
    assert reference_target(Target(box=box), fr, get_benchmark("blink"))[0].box == (500, 300, 600, 350)
    # max pixels: per-axis factors of the smart resize, truncated
    b = get_benchmark("screenspot-pro@max_pixels=1000000")
    W, H = 2240, 1400
    fr = Frame.max_pixels(W, H, 1_000_000)
    w, h = fr.size
    t, kind = reference_target(Target(box=box), fr, b)
    assert kind == "max_pixels" and t.box == (int(1000 * w / W), int(600 * h / H), int(1200 * w / W), int(700 * h / H))
    # no limit hit: unchanged
    assert reference_target(Target(box=box), Frame.identity(W, H), get_benchmark("screenspot-pro"))[0].box == box


# ---------------------------------------------------------------------------------------------------------------
# hand-computed scores through the whole runner
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [k for k in CASES if not k.startswith("_")])
@pytest.mark.parametrize("compat", [False, True], ids=["default", "compat"])
def test_scores_match_the_hand_computed_expectations(tmp_path, processor, case, compat):
    c = CASES[case]
    bench = get_benchmark(c["bench"])
    eng = ScriptedEngine(processor.tokenizer, {sid: v["turns"] for sid, v in c["cases"].items()})
    s = evaluate(bench, eng, processor, _settings(tmp_path, FIX / c["root"], compat=compat))
    recs = _records(tmp_path, bench.name)
    mode = "compat" if compat else "default"
    got = {sid: recs[sid]["score"] for sid in c["cases"]}
    assert got == {sid: float(v[mode]) for sid, v in c["cases"].items()}
    assert s["n"] == len(c["cases"]) and s["accuracy"] == pytest.approx(c["accuracy"][mode], abs=1e-6)
    for sid, v in c["cases"].items():
        r = recs[sid]
        if "turns_expected" in v:
            assert (r["turns"], len(r["crops"])) == (v["turns_expected"], v["crops_expected"])
        if "crop_hit" in v:
            assert r["crop_hit"] is v["crop_hit"]
    if "crop_hit_rate" in c:
        assert s["crop_hit_rate"] == pytest.approx(c["crop_hit_rate"])
    if not compat:
        for name, acc in c.get("splits_default", {}).items():
            assert s["splits"][name]["accuracy"] == pytest.approx(acc, abs=1e-6), name
        for key, val in c.get("official_default", {}).items():
            assert s["official"][key] == pytest.approx(val, abs=1e-6), key


def test_failures_are_named_and_counted_never_guessed(tmp_path, processor):
    c = CASES["blink-released"]
    eng = ScriptedEngine(processor.tokenizer, {sid: v["turns"] for sid, v in c["cases"].items()})
    s = evaluate(get_benchmark("blink"), eng, processor, _settings(tmp_path, FIX / c["root"]))
    recs = _records(tmp_path, "blink")
    assert recs["val_Counting_3"]["failure"] == "no_matching_choice"
    assert recs["val_Multi-view_Reasoning_4"]["failure"] == "no_answer_tag"
    assert s["parse_failure_rate"] == 0.5 and s["failure_counts"] == {"no_matching_choice": 1, "no_answer_tag": 1}


# ---------------------------------------------------------------------------------------------------------------
# frames: the same predictions at several pixel limits score the same
# ---------------------------------------------------------------------------------------------------------------

PRO_POINTS = {"solidworks_windows_0": (160.5, 77.5), "solidworks_windows_1": (1000, 700),  # inside, corner
              "word_macos_0": (499, 320), "word_macos_1": (25, 25)}  # 1 px outside, inside


def _pointing_engine(tok, points, as_int):
    """Writes the same ORIGINAL-frame point into whatever image the model is shown (as a perfect pointer would)."""
    def answer(r):
        sid = r.request_id.rsplit("/", 2)[0]
        X, Y = points[sid]
        w, h = r.images[0].size
        (W, H) = IMAGE_SIZES[sid]
        x, y = Frame.resized(W, H, w, h).from_original((X, Y), exact=True, check=False)
        pt = f"({round(x)}, {round(y)})" if as_int else f"({x:.6f}, {y:.6f})"
        return f"<think> it is here {pt} </think>\n<answer> {pt} </answer>"
    return ScriptedEngine(tok, {sid: answer for sid in points})


IMAGE_SIZES = {"solidworks_windows_0": (2240, 1400), "solidworks_windows_1": (2240, 1400),
               "word_macos_0": (1680, 1120), "word_macos_1": (1680, 1120)}


@pytest.mark.parametrize("as_int", [False, True], ids=["float", "int"])
def test_same_predictions_at_different_pixel_limits_score_the_same(tmp_path, processor, as_int):
    points = dict(PRO_POINTS)
    if as_int:  # integer points in a 4x-downscaled image are only good to ~2 original px: keep clear of edges
        points.update(solidworks_windows_1=(1100, 650), word_macos_0=(450, 320))
    expected = {"solidworks_windows_0": 1.0, "solidworks_windows_1": 1.0, "word_macos_0": 0.0, "word_macos_1": 1.0}
    sizes = set()
    for limit in (None, 1_000_000, 250_000):
        name = "screenspot-pro" if limit is None else f"screenspot-pro@max_pixels={limit}"
        bench = get_benchmark(name)
        s = evaluate(bench, _pointing_engine(processor.tokenizer, points, as_int), processor,
                     _settings(tmp_path, FIX / "screenspot-pro" / "official"))
        recs = _records(tmp_path, bench.name)
        assert {k: r["score"] for k, r in recs.items()} == expected, name
        assert s["accuracy"] == 0.75 and s["splits"]["ui:text"]["accuracy"] == 0.5
        sizes.add(tuple(recs["solidworks_windows_0"]["frame"]["size"]))
    assert len(sizes) == 3  # three different images were shown


# ---------------------------------------------------------------------------------------------------------------
# several benchmarks, one table; --list
# ---------------------------------------------------------------------------------------------------------------

def test_vigorl_eval_runs_several_benchmarks_into_one_table(tmp_path, processor, monkeypatch):
    from typer.testing import CliRunner

    from vigorl_cli.cli.main import app
    from vigorl_cli.engines import factory

    script = {sid: v["turns"] for k in ("screenspot-pro-official", "robospatial-official")
              for sid, v in CASES[k]["cases"].items()}
    monkeypatch.setattr(factory, "make_engine",
                        lambda *a, **k: (ScriptedEngine(processor.tokenizer, script), processor))
    benches = f"screenspot-pro:{FIX / 'screenspot-pro' / 'official'},robospatial:{FIX / 'robospatial' / 'official'}"
    res = CliRunner().invoke(app, ["eval", "--model", "tiny-qwen2.5-vl", "--bench", benches, "--out", str(tmp_path)],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    out = res.output
    assert out.count("eval:") == 1  # one table
    for token in ("screenspot-pro", "robospatial", "group:CAD", "ui:icon", "configuration", "context", "75.0", "80.0"):
        assert token in out, token
    both = json.loads((tmp_path / "summary.json").read_text())
    assert [b["bench"] for b in both["benches"]] == ["screenspot-pro", "robospatial"]
    res = CliRunner().invoke(app, ["eval", "--list"], env={"COLUMNS": "250"})
    for name in ("vstar", "blink-spatial", "robospatial-vqa", "screenspot-pro-lr", "os-atlas", "vwa"):
        assert name in res.output


# ---------------------------------------------------------------------------------------------------------------
# recipes for the published checkpoints
# ---------------------------------------------------------------------------------------------------------------

EVAL_RECIPES = sorted((ROOT / "recipes" / "eval").glob("*.yaml"))


def test_there_is_an_eval_recipe_for_each_published_rl_checkpoint():
    models = set()
    from vigorl_cli.recipe import load_recipe

    for p in EVAL_RECIPES:
        models.add(load_recipe(p).model.name)
    assert {"gsarch/ViGoRL-7b-Spatial", "gsarch/ViGoRL-3b-Spatial", "gsarch/ViGoRL-7b-Web-Grounding",
            "gsarch/ViGoRL-3b-Web-Grounding", "gsarch/ViGoRL-Multiturn-3b-Web-Grounding",
            "gsarch/ViGoRL-Multiturn-7b-Visual-Search", "gsarch/ViGoRL-Multiturn-3b-Visual-Search",
            "gsarch/ViGoRL-7b-Web-Action", "gsarch/ViGoRL-3b-Web-Action"} <= models


def test_there_is_an_eval_recipe_for_each_published_sft_checkpoint():
    """Reference §4: the released MCTS-SFT checkpoints, each evaluated as its SFT stage trained it."""
    from vigorl_cli.recipe import load_recipe

    by_model = {load_recipe(p).model.name: load_recipe(p) for p in EVAL_RECIPES}
    sft = {"gsarch/ViGoRL-MCTS-SFT-3b-Spatial", "gsarch/ViGoRL-MCTS-SFT-7b-Spatial",
           "gsarch/ViGoRL-MCTS-SFT-3b-Web-Grounding", "gsarch/ViGoRL-MCTS-SFT-7b-Web-Grounding",
           "gsarch/ViGoRL-Multiturn-MCTS-SFT-3b-Visual-Search", "gsarch/ViGoRL-Multiturn-MCTS-SFT-7b-Visual-Search",
           "gsarch/ViGoRL-Multiturn-MCTS-SFT-3b-Web-Grounding"}
    assert sft <= set(by_model)
    for name in sft:
        r = by_model[name]
        assert r.prompt.literal_newlines is False  # SFT data: real newlines (reference §2.1, §2.2)
        assert (r.model.min_pixels, r.model.max_pixels) == (3136, 4_194_304)  # LLaMA-Factory image limits (§4)
        if "Multiturn" in name:  # multi-turn SFT data (§2.2): SFT observation text, full image <= 2.85 MP
            assert r.eval.mode == "multi" and r.tool.observation_style == "sft"
            assert all(get_benchmark(b).max_pixels == 2_850_000 for b in r.eval.benches)
            web = "Web-Grounding" in name
            assert (r.tool.offset, r.tool.crop_size, r.tool.draw_dot) == ((100, 512, True) if web else (182, 672, False))
        else:
            assert r.eval.mode == "auto" and all(get_benchmark(b).mode == "single" for b in r.eval.benches)


@pytest.mark.parametrize("path", EVAL_RECIPES, ids=lambda p: p.stem)
def test_eval_recipes_load_and_name_what_they_reproduce(path):
    from vigorl_cli.recipe import load_recipe

    r = load_recipe(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith(("# Reproduces", "# Evaluates")), first
    text = path.read_text()
    assert f"vigorl eval --recipe recipes/eval/{path.name}" in text and "--set" in text
    assert r.model.name.startswith("gsarch/ViGoRL-") and r.eval.benches
    for name in r.eval.benches:
        b = get_benchmark(name)
        assert b.preset == r.prompt.preset or name.startswith("robospatial"), name
    # as each checkpoint was trained: RL with literal backslash-n (reference §5.3), SFT with real newlines
    assert r.prompt.literal_newlines is ("SFT" not in r.model.name)
    assert r.eval.sampling.temperature == 0.5 and r.eval.sampling.max_new_tokens == 2048
    if r.eval.mode == "multi" or any(get_benchmark(n).mode == "multi" for n in r.eval.benches):
        assert r.tool.max_turns == 5 and r.tool.max_images == 5 and r.eval.sampling.top_p == 0.99
