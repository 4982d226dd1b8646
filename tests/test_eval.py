"""`vigorl eval`: scoring in the original frame, resume without loss or duplicates, bad images, repeatability."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vigorl_cli.data.formats import write_samples
from vigorl_cli.data.schema import Sample
from vigorl_cli.engines.base import Completion, SamplingParams
from vigorl_cli.engines.hf import HFEngine
from vigorl_cli.eval.benchmarks import get_benchmark
from vigorl_cli.eval.runner import EvalSettings, evaluate
from vigorl_cli.models import prompts
from vigorl_cli.models.load import load_processor
from vigorl_cli.models.tiny import tiny_path

BOXES = {"g0": ((640, 480), (300, 200, 340, 240)), "g1": ((300, 500), (20, 440, 60, 480)),
         "g2": ((900, 300), (850, 10, 890, 40))}


@pytest.fixture
def grounding_file(tmp_path):
    samples = []
    for sid, ((W, H), box) in BOXES.items():
        Image.new("RGB", (W, H), (200, 200, 200)).save(tmp_path / f"{sid}.png")
        samples.append(Sample(id=sid, images=[f"{sid}.png"], question=f"<image>\nClick the widget {sid}",
                              answer="(%d, %d, %d, %d)" % box))
    path = tmp_path / "g.jsonl"
    write_samples(path, samples, "llava")
    return path


class OracleEngine:
    """Answers the GT box centre, converted into the frame of the image it is shown (as a perfect model would)."""

    name = "oracle"

    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def generate(self, requests):
        out = []
        for r in requests:
            self.calls += 1
            sid = r.request_id.split("/")[0]
            (W, H), (x1, y1, x2, y2) = BOXES[sid]
            w, h = r.images[0].size
            cx, cy = int((x1 + x2) / 2 * w / W), int((y1 + y2) / 2 * h / H)
            text = f"<think> the widget is here ({cx}, {cy}) </think>\n<answer> ({cx}, {cy}) </answer><|im_end|>"
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            out.append([Completion(ids, text, None, "stop", "eos")])
        return out


def _settings(tmp_path, **kw):
    return EvalSettings(data_root=tmp_path, out_dir=tmp_path / "out", sampling=SamplingParams(max_new_tokens=32), **kw)


@pytest.mark.parametrize("max_pixels", [28 * 28 * 16, 28 * 28 * 400])
def test_points_on_resized_images_score_in_the_original_frame(tmp_path, grounding_file, max_pixels):
    proc = load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl", max_pixels=max_pixels)
    eng = OracleEngine(proc.tokenizer)
    s = evaluate(get_benchmark(f"jsonl:{grounding_file}"), eng, proc, _settings(tmp_path))
    assert s["n"] == 3 and s["accuracy"] == 1.0 and s["parse_failure_rate"] == 0.0
    recs = [json.loads(line) for line in (tmp_path / "out" / f"jsonl_{str(grounding_file).replace('/', '_')}"
                                          / "samples.jsonl").read_text().splitlines()]
    for r in recs:  # the mapped prediction lies in the original GT box
        x1, y1, x2, y2 = BOXES[r["id"]][1]
        X, Y = r["pred_original"]
        assert x1 <= X <= x2 and y1 <= Y <= y2
        assert r["frame"]["original_size"] == list(BOXES[r["id"]][0])


def test_compat_scoring_rescales_ground_truth_like_the_reference(tmp_path, grounding_file):
    proc = load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl")
    s = evaluate(get_benchmark(f"jsonl:{grounding_file}"), OracleEngine(proc.tokenizer), proc,
                 _settings(tmp_path, compat=True))
    assert s["accuracy"] == 1.0


def test_resume_skips_finished_samples_and_never_duplicates(tmp_path, grounding_file):
    proc = load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl")
    bench = get_benchmark(f"jsonl:{grounding_file}")
    eng = OracleEngine(proc.tokenizer)
    evaluate(bench, eng, proc, _settings(tmp_path, limit=2))
    assert eng.calls == 2
    out = next((tmp_path / "out").iterdir()) / "samples.jsonl"
    with open(out, "a") as f:  # a kill mid-write leaves a torn line
        f.write('{"key": "g2#0", "id": "g2", "sc')
    s = evaluate(bench, eng, proc, _settings(tmp_path))
    assert eng.calls == 3  # only g2 was run again
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    assert sorted(keys) == ["g0#0", "g1#0", "g2#0"] and s["n"] == 3
    evaluate(bench, eng, proc, _settings(tmp_path))
    assert eng.calls == 3  # a finished run does nothing


def test_missing_and_corrupt_images_are_recorded_failures(tmp_path, grounding_file):
    (tmp_path / "g1.png").unlink()
    (tmp_path / "g2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    proc = load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl")
    s = evaluate(get_benchmark(f"jsonl:{grounding_file}"), OracleEngine(proc.tokenizer), proc, _settings(tmp_path))
    assert s["n"] == 3 and s["failure_counts"]["image_error"] == 2 and s["accuracy"] == pytest.approx(1 / 3, abs=1e-6)


def test_avg_at_k_and_per_draw_records(tmp_path, grounding_file):
    proc = load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl")
    s = evaluate(get_benchmark(f"jsonl:{grounding_file}"), OracleEngine(proc.tokenizer), proc,
                 _settings(tmp_path, samples=3))
    assert s["draws"] == 9 and s["avg_at_k"] == 1.0 and s["k"] == 3


def test_greedy_eval_with_the_tiny_model_is_repeatable(tmp_path, tiny_bundle, demo_root):
    eng = HFEngine(tiny_bundle, batch_size=8)
    st = dict(sampling=SamplingParams(temperature=0.0, max_new_tokens=16), limit=6)
    a = evaluate(get_benchmark("demo-spatial"), eng, tiny_bundle.processor,
                 EvalSettings(data_root=demo_root, out_dir=tmp_path / "a", **st))
    b = evaluate(get_benchmark("demo-spatial"), eng, tiny_bundle.processor,
                 EvalSettings(data_root=demo_root, out_dir=tmp_path / "b", **st))
    ra = [json.loads(x)["turn_texts"] for x in (tmp_path / "a/demo-spatial/samples.jsonl").read_text().splitlines()]
    rb = [json.loads(x)["turn_texts"] for x in (tmp_path / "b/demo-spatial/samples.jsonl").read_text().splitlines()]
    assert a["n"] == b["n"] >= 4 and sorted(ra) == sorted(rb)


def test_multiturn_demo_bench_runs_episodes_with_the_tiny_model(tmp_path, tiny_bundle, demo_root):
    eng = HFEngine(tiny_bundle, batch_size=8)
    s = evaluate(get_benchmark("demo-vsearch"), eng, tiny_bundle.processor,
                 EvalSettings(data_root=demo_root, out_dir=tmp_path, limit=4,
                              sampling=SamplingParams(max_new_tokens=12)))
    assert s["n"] == 4 and s["mean_turns"] >= 1 and set(s["splits"]) <= {"attribute", "spatial", "other"}


def test_eval_through_an_openai_compatible_server_matches_the_local_engine(tmp_path, tiny_bundle, demo_root):
    """The async path: episodes run as independent tasks against a real HTTP server wrapping the HF engine; with
    greedy sampling the transcripts equal the local engine's."""
    from vigorl_cli.engines.openai import OpenAIEngine
    from vigorl_cli.engines.server import serve

    local = HFEngine(tiny_bundle, batch_size=8)
    server, _ = serve(HFEngine(tiny_bundle, batch_size=8), tiny_bundle.processor, "127.0.0.1", 0, "tiny")
    try:
        remote = OpenAIEngine([server.url], "tiny", concurrency=4, timeout_s=60, max_retries=1)
        st = dict(sampling=SamplingParams(temperature=0.0, max_new_tokens=12), limit=4)
        a = evaluate(get_benchmark("demo-vsearch"), local, tiny_bundle.processor,
                     EvalSettings(data_root=demo_root, out_dir=tmp_path / "a", **st))
        b = evaluate(get_benchmark("demo-vsearch"), remote, tiny_bundle.processor,
                     EvalSettings(data_root=demo_root, out_dir=tmp_path / "b", **st))
        remote.close()
    finally:
        server.close()
    ra = {json.loads(x)["id"]: json.loads(x)["turn_texts"] for x in
          (tmp_path / "a/demo-vsearch/samples.jsonl").read_text().splitlines()}
    rb = {json.loads(x)["id"]: json.loads(x)["turn_texts"] for x in
          (tmp_path / "b/demo-vsearch/samples.jsonl").read_text().splitlines()}
    assert a["n"] == b["n"] == 4 and b["engine_error_rate"] == 0.0
    strip = lambda ts: [t.replace("<|im_end|>", "") for t in ts]  # noqa: E731  (servers drop special tokens)
    assert {k: strip(v) for k, v in ra.items()} == {k: strip(v) for k, v in rb.items()}


# -- recipe limits, records, Ctrl-C, dead endpoints -----------------------------------------------------------------
def _zoom_call(x, y):
    return (f"<think> look at ({x}, {y}) </think>\n<tool_call>\n"
            + json.dumps({"name": "search_coordinate", "arguments": {"coordinate": [x, y]}}) + "\n</tool_call>")


class ZoomingEngine:
    """Calls the zoom tool at a new point every turn (a forced answer prefix gets `` red </answer>``); optionally
    raises KeyboardInterrupt on its ``interrupt_at``-th call (as Ctrl-C would arrive)."""

    name = "zooming"

    def __init__(self, tok, interrupt_at=None):
        self.tok, self.calls, self.interrupt_at = tok, 0, interrupt_at

    def generate(self, requests):
        self.calls += 1
        if self.interrupt_at is not None and self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        out = []
        for r in requests:
            turn = int(r.request_id.rsplit("/", 1)[1])
            forced = r.messages[-1].get("prefix")
            text = " red </answer><|im_end|>" if forced else _zoom_call(20 + 30 * turn, 40)
            out.append([Completion(self.tok(text, add_special_tokens=False)["input_ids"], text, None, "stop",
                                   "eos" if forced else "</tool_call>")])
        return out


def _run_eval_with(monkeypatch, engine, processor, sets, bench, out, data_root, **kw):
    from vigorl_cli.engines import factory
    from vigorl_cli.eval.api import run_eval
    from vigorl_cli.recipe import load_recipe

    monkeypatch.setattr(factory, "make_engine", lambda *a, **k: (engine, processor))
    r = load_recipe(None, ["eval.sampling.max_new_tokens=64", *sets])
    return run_eval(r, benches=bench, limit=kw.pop("limit", 2), data_root=data_root, out=out, **kw)


def _recs(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("sets, bench, turns, crops", [
    ([], "demo-vsearch", 5, 4),                                  # benchmark default: 5 turns, 5 images
    ([], "demo-vsearch@max_turns=2", 2, 1),                      # the name's setting
    (["tool.max_turns=3"], "demo-vsearch", 3, 2),                # the recipe's
    (["tool.max_turns=3"], "demo-vsearch@max_turns=2", 2, 1),    # name > recipe
    (["tool.max_images=3"], "demo-vsearch", 3, 2),               # 2 crops, the 2nd brings the forced answer
    (["tool.max_images=3"], "demo-vsearch@max_images=4", 4, 3),  # name > recipe
])
def test_turn_and_image_limits_precedence(tmp_path, monkeypatch, tiny_bundle, demo_root, sets, bench, turns, crops):
    eng = ZoomingEngine(tiny_bundle.tokenizer)
    (s,) = _run_eval_with(monkeypatch, eng, tiny_bundle.processor, sets, bench, tmp_path, demo_root)
    recs = _recs(tmp_path / bench / "samples.jsonl")
    assert s["n"] == 2 and {r["turns"] for r in recs} == {turns} and {len(r["crops"]) for r in recs} == {crops}


def test_recipe_zoom_settings_win_over_the_benchmark_preset_unless_the_name_sets_zoom(tmp_path):
    from vigorl_cli.eval.runner import episode_config

    st = EvalSettings(data_root=tmp_path, out_dir=tmp_path, offset=20, crop_size=56, draw_dot=True)
    z = episode_config(get_benchmark("demo-vsearch"), st, True).zoom
    assert (z.offset, z.crop_size, z.draw_dot) == (20, 56, True)
    z = episode_config(get_benchmark("demo-vsearch"), EvalSettings(data_root=tmp_path, out_dir=tmp_path), True).zoom
    assert (z.offset, z.crop_size, z.draw_dot) == (182, 672, False)  # the benchmark's preset (vstar)
    z = episode_config(get_benchmark("demo-vsearch@zoom=web_grounding"), st, True).zoom
    assert (z.offset, z.crop_size, z.draw_dot) == (100, 512, True)  # the name's preset, whole


def test_records_carry_prompt_transcript_and_tool_calls(tmp_path, monkeypatch, tiny_bundle, demo_root):
    eng = ZoomingEngine(tiny_bundle.tokenizer)
    _run_eval_with(monkeypatch, eng, tiny_bundle.processor, ["tool.max_turns=3", "tool.offset=30"], "demo-vsearch",
                   tmp_path, demo_root, limit=1)
    (r,) = _recs(tmp_path / "demo-vsearch" / "samples.jsonl")
    system = prompts.system_prompt("vstar", "multiturn")
    assert r["prompt"].startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
    assert r["question"].replace("<image>", "").strip() in r["prompt"]
    assert r["prompt"].count("<|image_pad|>") == 1 and "base64" not in json.dumps(r)
    call0 = {"name": "search_coordinate", "arguments": {"coordinate": [20, 40]}}
    assert r["tool_calls"][0]["json"] == call0 and r["tool_calls"][0]["coordinate"] == [20, 40]
    assert [t["coordinate"] for t in r["tool_calls"]] == [[20, 40], [50, 40], [80, 40]]
    # the transcript: every assistant turn and the observation turns between them, in order
    obs = ("<observation>\nHere is the crop of the image centered on the coordinate:\n"
           "<|vision_start|><|image_pad|><|vision_end|></observation>")
    assert r["transcript"].count(obs) == 2
    assert r["transcript"].startswith(_zoom_call(20, 40) + "<|im_end|>\n<|im_start|>user\n" + obs)
    assert r["crops"][0]["window"] == [0, 10, 50, 70]  # tool.offset=30 around (20, 40), clipped at the left edge


def test_ctrl_c_writes_a_partial_summary_and_resume_loses_nothing(tmp_path, grounding_file):
    from vigorl_cli.eval.runner import EvalInterrupted

    proc = load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl")
    bench = get_benchmark(f"jsonl:{grounding_file}")
    out = tmp_path / "out" / f"jsonl_{str(grounding_file).replace('/', '_')}"

    class Interrupting(OracleEngine):
        def generate(self, requests):
            if self.calls == 2:  # the 3rd call: Ctrl-C
                self.calls += 1
                raise KeyboardInterrupt
            return super().generate(requests)

    eng = Interrupting(proc.tokenizer)
    with pytest.raises(EvalInterrupted) as e:
        evaluate(bench, eng, proc, _settings(tmp_path, chunk=1))  # one episode per engine call
    partial = json.loads((out / "summary.json").read_text())
    assert partial["complete"] is False and partial["draws"] == 2 and partial["total"] == 3
    assert e.value.summary["draws"] == 2 and isinstance(e.value, KeyboardInterrupt)
    assert [x["key"] for x in _recs(out / "samples.jsonl")] == ["g0#0", "g1#0"]
    s = evaluate(bench, OracleEngine(proc.tokenizer), proc, _settings(tmp_path, chunk=1))
    keys = [x["key"] for x in _recs(out / "samples.jsonl")]
    assert sorted(keys) == ["g0#0", "g1#0", "g2#0"] and s["complete"] is True and s["accuracy"] == 1.0
    assert json.loads((out / "summary.json").read_text())["complete"] is True


def test_cli_ctrl_c_exits_130_with_a_resume_hint(tmp_path, monkeypatch, grounding_file):
    from typer.testing import CliRunner

    from vigorl_cli.cli.main import app
    from vigorl_cli.engines import factory

    proc = load_processor(tiny_path("tiny-qwen2.5-vl"), "qwen2_5_vl")

    class Interrupting(OracleEngine):
        def generate(self, requests):
            raise KeyboardInterrupt

    monkeypatch.setattr(factory, "make_engine", lambda *a, **k: (Interrupting(proc.tokenizer), proc))
    res = CliRunner().invoke(app, ["eval", "--bench", f"jsonl:{grounding_file}", "--data-root", str(tmp_path),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 130, res.output
    assert "run the same command again to resume" in res.output
    top = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert top["complete"] is False and top["benches"][0]["complete"] is False


def test_dead_endpoint_failures_are_counted_shown_and_exit_non_zero(tmp_path, grounding_file):
    """The OpenAI engine against a localhost port nobody listens on: every sample fails with ``engine_error``,
    the table shows the error rate and `vigorl eval` exits 1."""
    import socket

    from typer.testing import CliRunner

    from vigorl_cli.cli.main import app

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    res = CliRunner().invoke(app, ["eval", "--model", "tiny-qwen2.5-vl", "--bench", f"jsonl:{grounding_file}",
                                   "--engine", "openai", "--base-url", f"http://127.0.0.1:{port}/v1",
                                   "--set", "engine.max_retries=1", "--set", "engine.timeout_s=2",
                                   "--data-root", str(tmp_path), "--out", str(tmp_path / "o")],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 1, res.output
    assert "err%" in res.output and "100.0" in res.output and "every sample failed" in res.output
    (summary,) = json.loads((tmp_path / "o" / "summary.json").read_text())["benches"]
    assert summary["engine_error_rate"] == 1.0 and summary["failure_counts"]["engine_error"] == 3


def test_table_shows_engine_errors_only_when_there_are_some():
    from rich.console import Console

    from vigorl_cli.eval.report import summary_table

    base = {"bench": "b", "n": 4, "accuracy": 0.5, "ci95": 0.1, "avg_at_k": 0.5, "parse_failure_rate": 0.25,
            "mean_turns": 1.0, "mean_crops": 0.0, "crop_hit_rate": None, "tokens_per_sample": 10.0,
            "samples_per_second": 2.0, "engine_error_rate": 0.0}

    def render(s):
        c = Console(width=200, record=True)
        c.print(summary_table([s]))
        return c.export_text()

    assert "err%" not in render(base)
    out = render({**base, "engine_error_rate": 0.125})
    assert "err%" in out and "12.5" in out
