"""Readers/writers of the released formats: lossless round trips and per-line errors."""

from __future__ import annotations

import json

import pytest

from vigorl_cli.data.formats import (SFTRecord, llava_to_sample, read_samples, read_sft, rl_to_sample,
                                     sample_to_llava, sample_to_rl, write_samples, write_sft)
from vigorl_cli.data.io import ResultsFile
from vigorl_cli.data.schema import Sample, Target, parse_box, parse_choices
from vigorl_cli.errors import DataError

LLAVA = [
    {"id": "val_Spatial_Relation_1", "image": "spatial_reasoning/blink/a.jpg",
     "conversations": [{"from": "human", "value": "<image>\nIs the cup left of the laptop?\nAnswer Choices:\n"
                                                   "A. left\nB. right"}, {"from": "gpt", "value": "left"}]},
    {"id": 17, "image": "web_grounding/s.png", "model": "None", "data_type": "icon",
     "conversations": [{"from": "human", "value": "<image>\nClick on the search icon"},
                       {"from": "gpt", "value": "(10, 20, 110, 60)"}]},
    {"id": "m", "image": ["a.png", "b.png"],
     "conversations": [{"from": "human", "value": "<image><image>\nSame object?"}, {"from": "gpt", "value": "yes"},
                       {"from": "human", "value": "again?"}, {"from": "gpt", "value": "no"}]},
]
RL = [
    {"problem": "<image>Which side is the red circle on?", "answer": "left", "images": ["x.png"]},
    {"id": "k", "problem": "<image>Click Submit", "answer": "(1, 2, 3, 4)", "images": "y.png", "split": "web"},
]
SFT = [
    {"id": "0_1", "metadata": {}, "messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "<image>\nQ?"},
        {"role": "assistant", "content": "<think>\nA (1, 2).\n</think>\n<answer> left </answer>"}],
     "images": ["/abs/a.png"], "gt_answer": "left"},
    {"messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "<image>\nQ?"},
        {"role": "assistant", "content": "<think> look </think>\n<tool_call>\n{}\n</tool_call>"},
        {"role": "user", "content": "<observation>\n<image>\n</observation>"},
        {"role": "assistant", "content": "<think> done </think>\n<answer> (5, 6) </answer>"}],
     "images": ["full.png", "crop1.png"]},
]


@pytest.mark.parametrize("rec", LLAVA, ids=lambda r: str(r["id"]))
def test_llava_record_round_trips_exactly(rec):
    s = llava_to_sample(rec)
    assert sample_to_llava(s) == rec


def test_llava_fields_are_interpreted():
    a, b, c = (llava_to_sample(r) for r in LLAVA)
    assert a.choices == ["left", "right"] and a.task == "multiple_choice" and a.answer == "left"
    assert a.prompt_text().startswith("Is the cup")
    assert b.id == "17" and b.target == Target(box=(10, 20, 110, 60)) and b.task == "grounding"
    assert b.meta["extra"] == {"model": "None", "data_type": "icon"}
    assert c.images == ["a.png", "b.png"] and c.question == "<image><image>\nSame object?"


@pytest.mark.parametrize("rec", RL, ids=lambda r: r.get("id", "noid"))
def test_rl_record_round_trips_exactly(rec):
    assert sample_to_rl(rl_to_sample(rec, fallback_id="f-1")) == rec


@pytest.mark.parametrize("rec", SFT, ids=lambda r: r.get("id", "noid"))
def test_sharegpt_record_round_trips_exactly(rec):
    r = SFTRecord.from_dict(rec)
    assert r.to_dict() == rec
    assert r.n_image_slots == len(rec["images"])


def test_sharegpt_multiturn_to_sample_takes_question_image_and_final_answer():
    r = SFTRecord.from_dict(SFT[1])
    assert r.is_multiturn
    s = r.to_sample()
    assert s.images == ["full.png"] and s.answer == "(5, 6)" and s.target == Target(point=(5, 6))


@pytest.mark.parametrize("fmt", ["llava", "rl", "vigorl"])
def test_sample_round_trips_through_every_format(tmp_path, fmt):
    samples = [
        Sample(id="a", images=["i.png"], question="<image>\nColour?\nA. red\nB. blue", answer="red",
               choices=["red", "blue"], task="multiple_choice", meta={"split": "attr"}),
        # fields a foreign format cannot express: explicit choices/target/task that differ from what is derived
        Sample(id="b", images=["i.png", "j.png"], question="<image>Where?", answer="somewhere",
               choices=["x", "y"], target=Target(point=(3.5, 4)), task="grounding", meta={"k": [1, 2]}),
        Sample(id="c", images=[], question="text only", answer="(1, 2, 3, 4)", target=Target(box=(1, 2, 3, 4)),
               task="grounding"),
    ]
    path = tmp_path / f"s.{fmt}.jsonl"
    write_samples(path, samples, fmt)
    back = read_samples(path)
    assert back.errors == [] and back.format == fmt
    assert back.samples == samples


def test_malformed_jsonl_line_is_reported_and_other_lines_read(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = [json.dumps(r) for r in LLAVA[:2]]
    p.write_text(good[0] + "\n{not json\n" + good[1] + "\n[1, 2]\n" + json.dumps({"foo": 1}) + "\n")
    res = read_samples(p)
    assert [s.id for s in res.samples] == ["val_Spatial_Relation_1", "17"]
    assert res.lines == [1, 3]
    assert [(e.line, e.kind) for e in res.errors] == [(2, "bad_json"), (4, "not_an_object"), (5, "schema")]
    assert str(res.errors[0]).startswith(f"{p}:2: bad_json")


def test_schema_errors_name_the_line(tmp_path):
    p = tmp_path / "schema.jsonl"
    p.write_text(json.dumps({"id": 1, "conversations": "nope"}) + "\n" + json.dumps(LLAVA[0]) + "\n")
    res = read_samples(p)
    assert len(res.samples) == 1 and res.errors[0].line == 1 and res.errors[0].kind == "schema"


def test_missing_file_and_unknown_format_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_samples(tmp_path / "nope.jsonl")
    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="unknown data format"):
        read_samples(tmp_path / "a.jsonl", fmt="csv")


def test_sft_json_array_round_trips_through_files(tmp_path):
    recs = [SFTRecord.from_dict(r) for r in SFT]
    write_sft(tmp_path / "chains.json", recs)
    back, errors = read_sft(tmp_path / "chains.json")
    assert errors == [] and [r.to_dict() for r in back] == SFT
    (tmp_path / "broken.json").write_text("[{\"messages\": [}")
    back, errors = read_sft(tmp_path / "broken.json")
    assert back == [] and errors[0].kind == "bad_json"


def test_gt_parsers_never_evaluate_code():
    assert parse_box("(1, 2, 3, 4)") == (1, 2, 3, 4)
    assert parse_box("[1.5, 2, 3, 4]") == (1.5, 2, 3, 4)
    assert parse_box("__import__('os').system('true')") is None
    assert parse_box("(1, 2, 3)") is None
    assert parse_choices("Q?\n(A) cat\n(B) dog\n(D) fish") == ["cat", "dog"]
    assert parse_choices("Q? A. only one") is None


def test_results_file_resumes_after_a_torn_line(tmp_path):
    p = tmp_path / "results.jsonl"
    with ResultsFile(p) as rf:
        rf.append({"id": "a", "score": 1})
        rf.append({"id": "b", "score": 0})
    with open(p, "a") as f:
        f.write('{"id": "c", "sco')  # killed mid-write
    rf = ResultsFile(p)
    assert rf.done_ids() == {"a", "b"}
    rf.append({"id": "c", "score": 1})
    rf.close()
    assert [r["id"] for r in ResultsFile(p).read()] == ["a", "b", "c"]
