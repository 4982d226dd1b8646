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
