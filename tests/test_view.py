"""`vigorl view`: the HTML page of an eval folder, built from records the real eval runner wrote, checked as text and
rendered in headless Chromium (screenshot colours inside the drawn image, cards and filters in the live DOM)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from vigorl_cli.data.formats import write_samples
from vigorl_cli.data.schema import Sample
from vigorl_cli.engines.base import Completion, SamplingParams
from vigorl_cli.errors import DataError
from vigorl_cli.eval import view
from vigorl_cli.eval.view import card_id, render_view, write_view, write_view_stats

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,2000"]

# id -> (original size, GT box). g3's image is never written (an image_error record without frame or image).
BOXES = {"g0": ((640, 480), (300, 200, 340, 240)), "g1": ((300, 500), (20, 440, 60, 480)),
         "g2": ((900, 300), (850, 10, 890, 40)), "g3": ((400, 400), (10, 10, 50, 50))}
BENCH_DIR = "grounding"


class ScriptedEngine:
    """g0: points at the GT centre, crops there, then answers it (correct); g1: answers a wrong point; g2: thinks
    and never answers (no_answer_tag). Points are written in the frame of the image the engine is shown."""

    name = "scripted"

    def __init__(self, tok):
        self.tok = tok

    def generate(self, requests):
        from vigorl_cli.models import prompts

        out = []
        for r in requests:
            sid = r.request_id.split("/")[0]
            (W, H), (x1, y1, x2, y2) = BOXES[sid]
            w, h = r.images[0].size
            cx, cy = int((x1 + x2) / 2 * w / W), int((y1 + y2) / 2 * h / H)
            if sid == "g0" and len(r.images) == 1:
                text = f"<think> the widget is near ({cx}, {cy}) </think>\n{prompts.tool_call_text(cx, cy)}"
            elif sid == "g0":
                text = f"<think> yes, it is at ({cx}, {cy}) </think>\n<answer> ({cx}, {cy}) </answer>"
            elif sid == "g1":
                text = f"<think> maybe ({w // 2}, {h // 4}) </think>\n<answer> ({w // 2}, {h // 4}) </answer>"
            else:
                text = "<think> not sure <script>alert(1)</script> (5, 5)? </think>"
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            out.append([Completion(ids, text, None, "stop", "eos")])
        return out


def _image(W, H):
    """A grey-teal gradient: thousands of colours, none near the overlay's red, green, blue or magenta."""
    im = Image.new("RGB", (W, H))
    im.putdata([(40 + x * 100 // W, 70 + y * 90 // H, 110 + (x + y) * 60 // (W + H))
                for y in range(H) for x in range(W)])
    return im


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """(data root, eval output folder): records written by `evaluate` (multi-turn, one crop) over 4 samples."""
    from vigorl_cli.eval.benchmarks import get_benchmark
    from vigorl_cli.eval.runner import EvalSettings, evaluate
    from vigorl_cli.models.load import load_processor
    from vigorl_cli.models.tiny import tiny_path

    root = tmp_path_factory.mktemp("view-data")
    samples = []
    for sid, ((W, H), box) in BOXES.items():
        if sid != "g3":
            _image(W, H).save(root / f"{sid}.png")
        samples.append(Sample(id=sid, images=[f"{sid}.png"], question=f"<image>\nClick the widget {sid} <b>&amp;",
                              answer="({}, {}, {}, {})".format(*box)))
    write_samples(root / "g.jsonl", samples, "llava")
    proc = load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl", max_pixels=28 * 28 * 64)
    bench = dataclasses.replace(get_benchmark("jsonl:g.jsonl"), name=BENCH_DIR, zoom="web_grounding_rl")
    out = root / "eval"
    s = evaluate(bench, ScriptedEngine(proc.tokenizer), proc,
                 EvalSettings(data_root=root, out_dir=out, sampling=SamplingParams(max_new_tokens=64), mode="multi"))
    assert s["n"] == 4 and s["accuracy"] == 0.25 and s["failure_counts"] == {"image_error": 1, "no_answer_tag": 1}
    return root, out


def _records(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / BENCH_DIR / "samples.jsonl").read_text().splitlines())}


def _cards(page: str) -> dict[str, str]:
    """card id -> its opening <article ...> tag."""
    return {m.group(1): m.group(0) for m in re.finditer(r'<article class="card[^"]*" id="([^"]+)"[^>]*>', page)}


def _cid(sid: str) -> str:
    return card_id(BENCH_DIR, f"{sid}-0")


def _card_html(page: str, sid: str) -> str:
    start = page.index(f'id="{_cid(sid)}"')
    return page[start:page.index("</article>", start)]


# --------------------------------------------------------------------------------------------------------------------
# The page as text
# --------------------------------------------------------------------------------------------------------------------

def test_page_is_self_contained_and_shows_every_record(eval_run):
    _, out = eval_run
    page_path, stats = write_view_stats(out)
    assert page_path == out / "view.html"
    page = page_path.read_text()
    assert set(_cards(page)) == {_cid(s) for s in BOXES} and stats.shown == stats.records == 4
    # no external assets: every image is a data URI, no links, no script sources, no remote URLs at all
    assert not re.search(r'(src|href)\s*=|<link|url\((?!data:)|https?://', page)
    assert page.count("data:image/jpeg;base64,") == 3  # one per readable image (g3 has none)
    # model text is escaped (the scripted engine wrote a <script> tag and the question holds markup)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>&amp;" not in page and "&lt;b&gt;&amp;amp;" in page
    # header: accuracy and failure counts
    assert "25.0%" in page and "image_error 1" in page and "no_answer_tag 1" in page
    # g3 (image_error) is a placeholder with its error, and nothing crashed
    g3 = _card_html(page, "g3")
    assert 'thumb missing' in g3 and "FileNotFoundError" in g3 and "<svg" not in g3
    assert stats.no_image == 0 and stats.missing_images == 1  # g3's file is recorded but does not exist


def test_overlay_draws_points_crops_and_gt_in_the_original_frame(eval_run):
    _, out = eval_run
    page, _ = render_view(out)
    recs = _records(out)
    g0 = _card_html(page, "g0")
    (W, H), (x1, y1, x2, y2) = BOXES["g0"]
    assert f'viewBox="0 0 {W} {H}"' in g0
    # GT box (inclusive pixel corners: x1 .. x2 + 1)
    assert f'<rect class="gt" x="{x1}" y="{y1}" width="{x2 + 1 - x1}" height="{y2 + 1 - y1}"' in g0
    # the crop window the model asked for, from window_original
    left, top, right, bottom = recs["g0"]["crops"][0]["window_original"]
    m = re.search(r'<g class="crop">.*?<rect x="([\d.]+)" y="([\d.]+)" width="([\d.]+)" height="([\d.]+)"', g0)
    assert m and [float(v) for v in m.groups()] == pytest.approx([left, top, right - left, bottom - top], abs=0.01)
    # three points in the text (think, think, answer): each drawn, the answer one as a ring inside the GT box
    points = re.findall(r'<g class="point( ans)?"><title>[^<]*</title><circle cx="([\d.]+)" cy="([\d.]+)"', g0)
    assert len(points) == 3 and sum(1 for a, _, _ in points if a) == 1
    ax, ay = next((float(x), float(y)) for a, x, y in points if a)
    X, Y = recs["g0"]["pred_original"]  # what the judge scored, in original pixels; drawn at the pixel centre
    assert (ax, ay) == pytest.approx((X + 0.5, Y + 0.5), abs=0.01) and x1 <= ax <= x2 + 1 and y1 <= ay <= y2 + 1
    # g1's wrong answer is drawn outside its GT box
    g1 = _card_html(page, "g1")
    (_, (bx1, by1, bx2, by2)) = BOXES["g1"]
    ax, ay = map(float, re.search(r'<g class="point ans"><title>[^<]*</title><circle cx="([\d.]+)" cy="([\d.]+)"',
                                  g1).groups())
    assert not (bx1 <= ax <= bx2 + 1 and by1 <= ay <= by2 + 1)


def test_each_crop_is_shown_as_the_window_the_model_saw(eval_run):
    """Below the image, one view per crop: the crop window of the embedded thumbnail, scaled so that the window's
    longer side is CROP_VIEW px (background size and offset hand-computed from window_original)."""
    from vigorl_cli.eval.view import CROP_VIEW

    _, out = eval_run
    page, _ = render_view(out)
    recs = _records(out)
    g0 = _card_html(page, "g0")
    (W, H), _ = BOXES["g0"]
    crops = recs["g0"]["crops"]
    views = re.findall(r'<figure class="cropv"><div class="(im\d+)" style="width:([\d.]+)px;height:([\d.]+)px;'
                       r'background-size:([\d.]+)px ([\d.]+)px;background-position:(-?[\d.]+)px (-?[\d.]+)px"', g0)
    assert len(views) == len(crops) >= 1
    thumb_cls = re.search(r'<div class="thumb (im\d+)"', g0).group(1)
    for (cls, w, h, bw, bh, bx, by), c in zip(views, crops):
        left, top, right, bottom = c["window_original"]
        s = CROP_VIEW / max(right - left, bottom - top)
        assert cls == thumb_cls  # the same embedded image, not a second copy
        got = [float(v) for v in (w, h, bw, bh, bx, by)]
        assert got == pytest.approx([(right - left) * s, (bottom - top) * s, W * s, H * s, -left * s, -top * s],
                                    abs=0.01)
        assert max(got[0], got[1]) == pytest.approx(CROP_VIEW, abs=0.01)
    assert "cropv" not in _card_html(page, "g1") or recs["g1"].get("crops")  # no crops, no views


def test_only_limit_and_the_accepted_layouts(eval_run, tmp_path):
    root, out = eval_run
    for only, ids in (("correct", {"g0"}), ("wrong", {"g1", "g2", "g3"}), ("failed", {"g2", "g3"})):
        page, st = render_view(out, only=only)
        assert set(_cards(page)) == {_cid(s) for s in ids} and st.shown == len(ids) and st.records == 4
    page, st = render_view(out, only="wrong", limit=1)
    assert st.shown == 1 and len(_cards(page)) == 1
    with pytest.raises(DataError):
        render_view(out, only="right")
    # one <bench> folder, or its samples.jsonl, gives the same cards
    for src in (out / BENCH_DIR, out / BENCH_DIR / "samples.jsonl"):
        assert set(_cards(render_view(src)[0])) == {_cid(s) for s in BOXES}
    # a rollout folder: step files with the same record shape, one group each
    roll = tmp_path / "rollouts"
    roll.mkdir()
    for step in ("step_000001", "step_000002"):
        shutil.copy(out / BENCH_DIR / "samples.jsonl", roll / f"{step}.jsonl")
    page, st = render_view(roll, data_root=root)
    assert st.groups == 2 and st.shown == 8 and len(set(_cards(page))) == 8 and st.missing_images == 2
    with pytest.raises(DataError):
        render_view(tmp_path / "nope")


def test_missing_images_become_placeholders_until_data_root_is_given(eval_run, tmp_path):
    root, out = eval_run
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)  # image paths are relative to the data root, which is no longer next to the folder
    for f in moved.rglob("summary.json"):  # an old folder whose summary does not record the data root
        d = json.loads(f.read_text())
        d.pop("data_root", None)
        f.write_text(json.dumps(d))
    page, st = render_view(moved)
    assert st.missing_images == 4 and page.count("thumb missing") == 4 and page.count("image not found") == 4
    assert page.count("<svg") == 3  # overlays still drawn on the placeholders (the records hold the frames)
    page, st = render_view(moved, data_root=root)
    assert st.missing_images == 1 and page.count("thumb missing") == 1
    page, st = render_view(out)  # the summary records the data root: found without --data-root
    assert st.missing_images == 1 and page.count("thumb missing") == 1


def test_tolerates_odd_records(tmp_path):
    Image.new("RGB", (50, 40), (10, 20, 200)).save(tmp_path / "a.png")
    recs = [
        {"id": "bad-frame", "score": 1, "frame": {"size": "x"}, "turn_texts": ["(1, 2) <answer>(3, 4)"],
         "crops": ["nope", {"window_original": None}], "gt": None, "image": "a.png"},
        {"id": "rollout", "reward": 0.5, "turn_texts": ["(1000000000, 2)", "(-5.5, 2)"], "image": "a.png",
         "pred_original": ["x", None], "judge": "weird", "gt": "(1, 2)"},
        {"id": "mismatch", "score": "oops", "image": "a.png", "gt": "[1, 2, 3, 4]",
         "frame": {"kind": "full", "original_size": [100, 80], "size": [50, 40], "window": [0, 0, 100, 80]},
         "turn_texts": ["<answer> (10, 10) </answer>"]},
    ]
    (tmp_path / "run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"id": "torn", "sc')
    out, st = write_view_stats(tmp_path / "run.jsonl")
    page = out.read_text()
    assert st.shown == 3 and st.unreadable_lines == 1 and len(_cards(page)) == 3
    assert "overlay stretched" in page and "partial 0.5" in page


def test_cli_writes_the_page(eval_run, tmp_path):
    from vigorl_cli.cli.main import app

    root, out = eval_run
    res = CliRunner().invoke(app, ["view", str(out), "--out", str(tmp_path / "v.html"), "--only", "failed",
                                   "--limit", "5", "--data-root", str(root)])
    assert res.exit_code == 0, res.output
    assert "2 of 4" in res.output and len(_cards((tmp_path / "v.html").read_text())) == 2
    res = CliRunner().invoke(app, ["view", "--help"])
    assert res.exit_code == 0 and "Examples" in res.output and "--data-root" in res.output


# --------------------------------------------------------------------------------------------------------------------
# The page in a real browser
# --------------------------------------------------------------------------------------------------------------------

_RECTS_JS = ("<script>document.querySelectorAll('.thumb').forEach(function(t){var r=t.getBoundingClientRect();"
             "t.setAttribute('data-rect',[r.left,r.top,r.right,r.bottom].map(Math.round).join(','));});</script>")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"  # a fresh profile per run
    return subprocess.run([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          check=False, capture_output=True, text=True, timeout=60)


def _pixels(img: Image.Image) -> list[tuple[int, int, int]]:
    b = img.convert("RGB").tobytes()
    return [tuple(b[i:i + 3]) for i in range(0, len(b), 3)]


def _near(px, rgb, tol=40):
    return sum(abs(a - b) for a, b in zip(px[:3], rgb, strict=True)) <= tol


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium not installed (/usr/bin/chromium); "
                                                  "install with: apt-get install -y chromium")
def test_page_renders_in_headless_chromium(eval_run, tmp_path):
    _, out = eval_run
    page_path = write_view(out, tmp_path / "view.html")

    # 1. one launch: the screenshot and the live DOM after load, of a copy of the page that also records where each
    #    thumbnail was laid out (an appended script that only sets data-rect attributes: nothing visible changes)
    probe = tmp_path / "probe.html"
    probe.write_text(page_path.read_text().replace("</body>", _RECTS_JS + "</body>"))
    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", "--dump-dom", probe.as_uri())
    assert shot.exists(), r.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    dom = r.stdout
    cards = _cards(dom)
    assert set(cards) == {_cid(s) for s in BOXES}, r.stderr[-2000:]
    assert not any("hidden" in tag for tag in cards.values())  # no filter: all shown
    assert re.search(r'id="count">4<', dom)

    # 2. inside g0's thumbnail (as laid out at 1280 px): the image itself (many colours) and the drawn overlays
    g0 = _card_html(dom, "g0")
    left, top, right, bottom = map(int, re.search(r'data-rect="([\d,-]+)"', g0).group(1).split(","))
    assert right - left > 100 and bottom < img.size[1], "g0's thumbnail is not on the screenshot"
    region = img.crop((left, top, right, bottom))
    pixels = _pixels(region)
    assert len(set(pixels)) > 500  # the gradient image was drawn, not a blank box
    red = sum(1 for p in pixels if _near(p, (0xff, 0x17, 0x44)))  # grounded points
    green = sum(1 for p in pixels if _near(p, (0x00, 0xc8, 0x53)))  # GT box
    blue = sum(1 for p in pixels if _near(p, (0x29, 0x62, 0xff)))  # crop window
    magenta = sum(1 for p in pixels if _near(p, (0xd5, 0x00, 0xf9)))  # answer ring
    assert red > 20 and green > 50 and magenta > 20 and blue > 50, (red, green, blue, magenta)
    # and the overlay colours are only where the overlays are: not in the placeholder card g3
    g3 = _card_html(dom, "g3")
    box = tuple(map(int, re.search(r'data-rect="([\d,-]+)"', g3).group(1).split(",")))
    assert not any(_near(p, (0xff, 0x17, 0x44)) for p in _pixels(img.crop(box)))

    # 3. the filters run in the page: from the URL hash, wrong-only then one failure kind
    r = _chromium(tmp_path, "--dump-dom", page_path.as_uri() + "#status=wrong")
    cards = _cards(r.stdout)
    assert {k for k, tag in cards.items() if "hidden" not in tag} == {_cid(s) for s in ("g1", "g2", "g3")}
    assert re.search(r'id="count">3<', r.stdout)
    r = _chromium(tmp_path, "--dump-dom", page_path.as_uri() + "#failure=no_answer_tag")
    cards = _cards(r.stdout)
    assert {k for k, tag in cards.items() if "hidden" not in tag} == {_cid("g2")}
    assert re.search(r'id="count">1<', r.stdout)


def test_module_has_no_heavy_imports():
    """`vigorl view` must not import torch/transformers (it only reads JSONL and images)."""
    import sys

    code = "import sys, vigorl_cli.eval.view; print('torch' in sys.modules or 'transformers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr
    assert view.THUMB_MAX == 640


# --------------------------------------------------------------------------------------------------------------------
# The folders `vigorl run` and `vigorl grpo` write
# --------------------------------------------------------------------------------------------------------------------

def test_pipeline_eval_folder_label_and_bench_groups(tmp_path, demo_root):
    """`vigorl run` writes RUN/eval/<label>/<bench>/samples.jsonl; the page has one group per label/bench."""
    from vigorl_cli.pipeline import STAGES, run_pipeline
    from vigorl_cli.recipe import load_recipe

    run = tmp_path / "run"
    earlier = {"sft": {"model": "tiny-qwen2.5-vl"}}  # the stages before eval, as done (eval compares base and sft)
    for st in STAGES[:STAGES.index("eval")]:
        (run / st).mkdir(parents=True)
        (run / st / "stage.json").write_text(json.dumps(earlier.get(st, {})))
    r = load_recipe(ROOT / "recipes" / "demo.yaml", [f"data.root={demo_root}", "eval.benches=[sat2]",
                                                      "eval.max_samples=2", "eval.sampling.max_new_tokens=8"])
    run_pipeline(r, out=run, start="eval", log=lambda *_: None)
    assert sorted(p.parent.relative_to(run).as_posix() for p in run.rglob("samples.jsonl")) == \
        ["eval/base/sat2", "eval/sft/sat2"]
    for src in (run / "eval", run / "eval" / "base"):
        groups = view.find_groups(src)
        assert all(g.samples.name == "samples.jsonl" for g in groups)
    assert [g.name for g in view.find_groups(run / "eval")] == ["base/sat2", "sft/sat2"]
    assert [g.name for g in view.find_groups(run / "eval" / "base")] == ["sat2"]
    page, st = render_view(run / "eval")
    assert st.groups == 2 and st.records == 4 and st.shown == 4 and st.missing_images == 0
    assert len(_cards(page)) == 4  # the same question under base and sft: two distinct cards
    assert 'data-bench="base/sat2"' in page and 'data-bench="sft/sat2"' in page


def test_grpo_run_folder_shows_rollouts_never_metrics(tmp_path, demo_root):
    """A GRPO run folder holds metrics.jsonl (not records) and rollouts/step_*.jsonl (records)."""
    from vigorl_cli.recipe import load_recipe
    from vigorl_cli.train.grpo import train

    r = load_recipe(None, [f"data.root={demo_root}", "data.rl_train=[spatial_reasoning/vigorl_sat2_train_RL.jsonl]",
                           "grpo.steps=1", "grpo.prompts_per_step=2", "grpo.group_size=2",
                           "grpo.responses_per_update=4", "grpo.micro_batch_size=4", "grpo.sampling.max_new_tokens=8",
                           "grpo.gradient_checkpointing=false"])
    out = tmp_path / "g"
    train(r, out=out, log=lambda *_: None)
    assert (out / "metrics.jsonl").is_file() and (out / "rollouts" / "step_000001.jsonl").is_file()
    for src, name in ((out, "rollouts/step_000001"), (out / "rollouts", "step_000001")):
        groups = view.find_groups(src)
        assert [g.name for g in groups] == [name]
        page, st = render_view(src)
        assert st.records == 4 and st.shown == 4 and st.missing_images == 0 and len(_cards(page)) == 4
    with pytest.raises(DataError, match="metrics log"):
        view.find_groups(out / "metrics.jsonl")
    # a folder with nothing but training metrics (an SFT run) has no records
    sft_like = tmp_path / "sft"
    sft_like.mkdir()
    shutil.copy(out / "metrics.jsonl", sft_like / "metrics.jsonl")
    with pytest.raises(DataError, match="no records"):
        view.find_groups(sft_like)
