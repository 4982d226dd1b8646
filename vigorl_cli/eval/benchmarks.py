"""Benchmark registry: name → data files, judge, prompt preset, image limits, tool settings, sub-splits.

Files are relative to DATA_ROOT in the released layout (reference §3.2, ``vigorl data pull``). The ``demo-*``
benchmarks are the same definitions on the bundled synthetic data (``vigorl data demo``), which is written in the
released layout; their data root defaults to ``data/demo`` and is generated on first use.

``jsonl:PATH`` evaluates any file in our schema or the released LLaVA / RL formats (task and judge per sample).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from vigorl_cli.data.schema import Sample


def _vstar_split(s: Sample, path: str) -> str:
    img = s.images[0] if s.images else ""
    if "direct_attributes" in img:
        return "attribute"
    if "relative_position" in img:
        return "spatial"
    return "other"


def _blink_split(s: Sample, path: str) -> str:
    sid = s.id
    if sid.startswith("val_") or sid.startswith("test_"):
        return sid.split("_", 1)[1].rsplit("_", 1)[0]  # val_Relative_Depth_12 → Relative_Depth
    return "other"


def _screenspot_split(s: Sample, path: str) -> str:
    extra = s.meta.get("extra", {})
    parts = [Path(path).parent.name]
    for key in ("data_source", "platform", "ui_type", "data_type", "group"):
        if key in extra:
            parts.append(str(extra[key]))
    return "/".join(parts)


def _file_split(s: Sample, path: str) -> str:
    return Path(path).stem


@dataclass(frozen=True)
class Benchmark:
    name: str
    files: tuple[str, ...]
    preset: str  # prompt preset (models/prompts.py)
    mode: str = "single"  # default mode: single | multi
    judge: str | None = None  # None: from each sample's task
    max_side: int | None = None  # image limit before the processor (reference eval settings)
    max_pixels: int | None = None
    zoom: str = "vstar"  # ZoomTool preset for multi-turn
    max_turns: int = 5
    split: Callable[[Sample, str], str] | None = None
    demo: bool = False
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


_REAL = [
    Benchmark("vstar", ("visual_search/vstar/vstarbench_test.jsonl",), "vstar", mode="multi", judge="multiple_choice",
              max_pixels=12_960_000, zoom="vstar", split=_vstar_split,
              description="V*Bench, 191 questions (115 attribute + 76 spatial); multi-turn zoom, crop 672 / offset 182"),
    Benchmark("blink", ("spatial_reasoning/blink/blink_validation.jsonl",), "spatial", judge="multiple_choice",
              max_side=1260, split=_blink_split, description="BLINK val spatial subsets; max side 1260"),
    Benchmark("sat2", ("spatial_reasoning/sat2_test/sat2_test.jsonl",), "spatial", judge="multiple_choice",
              max_side=1260, description="SAT-2 test; max side 1260"),
    Benchmark("screenspot-v2", ("web_grounding/ScreenSpot-V2/screenspot_v2_test.jsonl",), "web_grounding",
              judge="point_in_box", max_pixels=12_960_000, zoom="web_grounding", split=_screenspot_split,
              description="ScreenSpot-V2; point in box; max 3600² pixels"),
    Benchmark("screenspot-pro", ("web_grounding/ScreenSpot-Pro/screenspot_pro_test.jsonl",), "web_grounding",
              judge="point_in_box", max_pixels=12_960_000, zoom="web_grounding", split=_screenspot_split,
              description="ScreenSpot-Pro; point in box; max 3600² pixels"),
    Benchmark("os-atlas", ("web_grounding/vigorl_osatlas_val_RL.jsonl",), "web_grounding", judge="point_in_box",
              max_pixels=12_960_000, zoom="web_grounding", description="OS-ATLAS held-out validation"),
]

_DEMO = [
    replace(next(b for b in _REAL if b.name == "vstar"), name="demo-vsearch", demo=True, max_pixels=None,
            description="bundled synthetic visual search (V*-like), multi-turn zoom"),
    replace(next(b for b in _REAL if b.name == "sat2"), name="demo-spatial", demo=True,
            description="bundled synthetic spatial relations (SAT-2-like)"),
    replace(next(b for b in _REAL if b.name == "screenspot-v2"), name="demo-grounding", demo=True, max_pixels=None,
            description="bundled synthetic GUI grounding (ScreenSpot-like)"),
    Benchmark("demo-action", ("web_action/vigorl_ical_val_RL.jsonl",), "web_action", judge="web_action", demo=True,
              split=_file_split, description="bundled synthetic web actions (VWA-like next action)"),
]

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in _REAL + _DEMO}


def get_benchmark(name: str) -> Benchmark:
    """A registered benchmark, or ``jsonl:PATH`` for any data file (judge and prompt per sample task)."""
    if name.startswith("jsonl:"):
        path = name.split(":", 1)[1]
        return Benchmark(name=name, files=(path,), preset="spatial", split=_file_split,
                         description=f"custom file {path}")
    if name not in BENCHMARKS:
        from vigorl_cli.errors import DataError

        raise DataError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}, or jsonl:PATH",
                        hint="`vigorl eval --list` describes them")
    return BENCHMARKS[name]


PRESET_BY_TASK = {"grounding": "web_grounding", "web_action": "web_action", "multiple_choice": "spatial",
                  "vqa": "spatial"}
