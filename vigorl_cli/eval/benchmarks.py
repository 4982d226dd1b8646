"""Benchmark registry: what each benchmark reads, how it is scored, shown and reported.

Each :class:`Benchmark` declares its data (the ViGoRL-converted file in the released layout, relative to DATA_ROOT,
reference §3.2, plus the official release formats :mod:`vigorl_cli.eval.loaders` can read), its judge, prompt
preset, image limits (max side / max pixels, applied before the processor as the reference eval did), zoom-tool
settings for multi-turn mode, default mode, sub-splits and the extra aggregates the benchmark's own scripts report.
``docs/benchmarks.md`` documents every benchmark: source, format, scoring, splits, defaults, and the differences from
the reference and from lmms-eval / VLMEvalKit.

Names accepted by :func:`get_benchmark` (``vigorl eval --bench``):

* ``NAME`` — a registered benchmark on ``DATA_ROOT`` (the released file; when it is not there and DATA_ROOT itself is
  an official release folder of that benchmark, that is read instead);
* ``NAME:PATH`` — the same benchmark on a file or folder in any format it reads (e.g.
  ``screenspot-pro:/data/ScreenSpot-Pro`` for the official annotations, ``blink:/data/BLINK`` for the HF parquet);
* ``NAME@key=value[@key=value]`` — with settings changed (``max_pixels``, ``max_side``, ``mode``, ``max_turns``,
  ``max_images``, ``zoom``, ``preset``), e.g. ``screenspot-pro@max_pixels=6013280`` (the reference's later eval
  limit). A setting given in the name wins over the recipe and the CLI (``tool.max_turns`` etc.), which win over
  the benchmark's own default;
* ``jsonl:PATH`` — any data file in our schema or the released LLaVA / RL formats (judge and prompt per sample task).

The ``demo-*`` benchmarks are the same definitions on the bundled synthetic data (``vigorl data demo``), which is
written in the released layout; their data root defaults to ``data/demo`` and is generated on first use.

Scoring lives in the runner (``eval/runner.py:_judge``) and the judges (``rewards/judges.py``); this module adds
the benchmark-specific pieces: the RoboSpatial judge (yes/no + point in polygon), the reference-compatible answer
extraction (:func:`reference_answer`) and ground-truth rescaling (:func:`reference_target`), and the official
extraction rules of BLINK and RoboSpatial for comparison.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from vigorl_cli.agent.parse import _BLOCK_RE, FailureKind
from vigorl_cli.data.schema import Sample, Target
from vigorl_cli.errors import DataError

# ---------------------------------------------------------------------------------------------------------------
# sub-splits
# ---------------------------------------------------------------------------------------------------------------

Splitter = Callable[[Sample, str], "str | list[str]"]


def _extra(s: Sample, key: str) -> Any:
    v = s.meta.get(key)
    return v if v is not None else (s.meta.get("extra") or {}).get(key)


def _vstar_split(s: Sample, path: str) -> str:
    cat = s.meta.get("category")
    if cat in ("attribute", "spatial"):
        return cat
    img = s.images[0] if s.images else ""
    if "direct_attributes" in img:
        return "attribute"
    if "relative_position" in img:
        return "spatial"
    return "other"


def _blink_subtask(sid: str) -> str | None:
    if sid.startswith(("val_", "test_")):
        return sid.split("_", 1)[1].rsplit("_", 1)[0]  # val_Relative_Depth_12 → Relative_Depth
    return None


def _blink_split(s: Sample, path: str) -> str:
    return s.meta.get("subtask") or _blink_subtask(s.id) or "other"


def _sat_split(s: Sample, path: str) -> str:
    qt = _extra(s, "question_type")
    return str(qt) if qt else "all"


def _robospatial_split(s: Sample, path: str) -> str:
    return str(_extra(s, "category") or "other")


# ScreenSpot-Pro application → group (the dataset card's table; used only when a record has no "group" field,
# e.g. the ViGoRL-converted file, where the application is read from the image folder "<app>_<os>")
PRO_GROUPS = {
    "Dev": ("android_studio", "pycharm", "vscode", "quartus", "vmware"),
    "Creative": ("photoshop", "premiere", "illustrator", "blender", "fruitloops", "unreal_engine", "davinci"),
    "CAD": ("autocad", "solidworks", "inventor", "vivado"),
    "Scientific": ("matlab", "origin", "stata", "eviews"),
    "Office": ("word", "excel", "powerpoint"),
    "OS": ("linux_common", "macos_common", "windows_common"),
}
_APP_OS_RE = re.compile(r"^(.+)_(windows|macos|linux)$")


def pro_group(app: str | None) -> str | None:
    if not app:
        return None
    a = app.lower().replace(" ", "_")
    return next((g for g, apps in PRO_GROUPS.items() for k in apps if a.startswith(k)), None)


def _app_os_from_path(img: str) -> tuple[str | None, str | None]:
    for part in reversed(Path(img).parts[:-1]):
        m = _APP_OS_RE.match(part)
        if m:
            return m.group(1), m.group(2)
    return None, None


def _screenspot_pro_split(s: Sample, path: str) -> list[str]:
    app, os_ = _app_os_from_path(s.images[0] if s.images else "")
    group = _extra(s, "group") or pro_group(_extra(s, "application") or app)
    ui = _extra(s, "ui_type") or _extra(s, "data_type")
    platform = _extra(s, "platform") or os_
    out = [f"group:{group}" if group else None, f"ui:{ui}" if ui else None,
           f"platform:{platform}" if platform else None]
    return [x for x in out if x] or ["all"]


_SS_PREFIX = {"mobile": "mobile", "pc": "desktop", "desktop": "desktop", "web": "web"}


def _screenspot_split(s: Sample, path: str) -> list[str]:
    platform = _extra(s, "platform")
    if not platform and s.images:
        platform = _SS_PREFIX.get(Path(s.images[0]).name.split("_", 1)[0].lower())
    ui = _extra(s, "ui_type") or _extra(s, "data_type")
    out = []
    if platform:
        out.append(f"platform:{platform}")
    if ui:
        out.append(f"ui:{ui}")
    if platform and ui:
        out.append(f"{platform}/{ui}")
    return out or ["all"]


def _osatlas_split(s: Sample, path: str) -> str:
    d = _extra(s, "domain")
    if not d and s.images:
        from vigorl_cli.eval.loaders import _osatlas_domain

        d = _osatlas_domain(Path(s.images[0]))
    return f"domain:{d}" if d else "all"


def _vwa_split(s: Sample, path: str) -> list[str]:
    verb = (s.answer.strip().split(" ", 1)[0] or "?").lower()
    verb = verb.split("[", 1)[0] or "?"
    out = [f"action:{verb}"]
    site = _extra(s, "site")
    if not site:
        from vigorl_cli.eval.loaders import VWA_SITES

        text = f"{s.id} {s.images[0] if s.images else ''}".lower()
        site = next((x for x in VWA_SITES if x in text), None)
    if site:
        out.append(f"site:{site}")
    return out


def _file_split(s: Sample, path: str) -> str:
    return Path(path).stem


# ---------------------------------------------------------------------------------------------------------------
# per-sample preparation of released-layout records (official readers set these fields themselves)
# ---------------------------------------------------------------------------------------------------------------

def _prepare_blink(s: Sample) -> Sample:
    s.meta.setdefault("subtask", _blink_subtask(s.id))
    return s


def _prepare_robospatial(s: Sample) -> Sample:
    """A released-style LLaVA/RL record for RoboSpatial: category from the record or the id prefix, the polygon of
    a context answer into ``meta``, yes/no options when the question has none."""
    if s.meta.get("source_format") not in (None, "released"):
        return s
    from vigorl_cli.eval.loaders import YES_NO, parse_polygon

    cat = _extra(s, "category") or s.id.split("_", 1)[0]
    s.meta["category"] = cat
    poly = parse_polygon(s.answer)
    if poly is not None:
        s.meta["polygon"] = [list(p) for p in poly]
        s.task, s.target = "vqa", None
    elif s.answer.strip().lower() in YES_NO and not s.choices:
        s.choices, s.task = list(YES_NO), "multiple_choice"
    return s


BLINK_SPATIAL = ("Relative_Depth", "Spatial_Relation", "Multi-view_Reasoning")
ROBOSPATIAL_VQA = ("configuration", "compatibility")


def _blink_spatial_keep(s: Sample) -> bool:
    return _blink_split(s, "") in BLINK_SPATIAL


def _robospatial_vqa_keep(s: Sample) -> bool:
    return _robospatial_split(s, "") in ROBOSPATIAL_VQA


# ---------------------------------------------------------------------------------------------------------------
# reports: the aggregates each benchmark's own scripts print (added to summary["official"])
# ---------------------------------------------------------------------------------------------------------------

def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


def _split_acc(summary: dict, names) -> dict[str, float]:
    sp = summary.get("splits") or {}
    return {n: sp[n]["accuracy"] for n in names if n in sp}


def _weighted(summary: dict, names) -> tuple[float | None, int]:
    sp = summary.get("splits") or {}
    rows = [sp[n] for n in names if n in sp]
    n = sum(r["n"] for r in rows)
    return (round(sum(r["accuracy"] * r["n"] for r in rows) / n, 6) if n else None), n


def _report_vstar(summary: dict) -> dict:
    acc = _split_acc(summary, ("attribute", "spatial"))
    return {"overall_micro": summary.get("accuracy"), "category_macro": _mean(list(acc.values())), **acc}


def _report_blink(summary: dict) -> dict:
    sp = summary.get("splits") or {}
    spatial, n = _weighted(summary, BLINK_SPATIAL)
    return {"subtask_macro": _mean([v["accuracy"] for k, v in sp.items() if k != "other"]),
            "spatial3_micro": spatial, "spatial3_n": n}


def _report_robospatial(summary: dict) -> dict:
    acc = _split_acc(summary, ("configuration", "compatibility", "context"))
    vqa, n = _weighted(summary, ROBOSPATIAL_VQA)
    vqa_cats = [acc[c] for c in ROBOSPATIAL_VQA if c in acc]
    return {**acc, "vqa_micro": vqa, "vqa_n": n, "vqa_avg": _mean(vqa_cats),
            "total_avg": _mean(list(acc.values()))}


def _report_screenspot_pro(summary: dict) -> dict:
    sp = summary.get("splits") or {}
    groups = {k.split(":", 1)[1]: v["accuracy"] for k, v in sp.items() if k.startswith("group:")}
    return {"overall": summary.get("accuracy"), "text": sp.get("ui:text", {}).get("accuracy"),
            "icon": sp.get("ui:icon", {}).get("accuracy"), "group_macro": _mean(list(groups.values()))}


# ---------------------------------------------------------------------------------------------------------------
# reference-compatible scoring pieces (reference §1.6, §1.8, §6)
# ---------------------------------------------------------------------------------------------------------------

def reference_answer(turn_texts: list[str], *, multiturn: bool, no_thinking: bool = False,
                     max_depth: int = 10) -> tuple[str | None, str | None]:
    """The answer the reference's single-path evaluator judges (``single_path_rollouts.py``), or ``(None, kind)``.

    Single-turn (``--generate_upfront``): the text is cut into ``<think>…</think>`` / ``<answer>…</answer>`` blocks
    (DOTALL, non-greedy); blocks are taken in order as tree nodes, and when they run out the WHOLE text is reused as
    the next node. The first node containing ``<answer>`` ends the path with
    ``text.split("<answer>")[1].strip().split("</answer>")[0].strip()`` (an unclosed answer therefore runs to the end;
    no option-letter stripping). A text without ``<answer>`` never terminates: after ``max_depth`` (CLI default 10)
    nodes the rollout has no final node and scores 0 (``judge_score`` is ``None``). So do 11 or more think blocks
    before the answer. Every node between the root and the answer must contain ``<think>`` and ``</think>``
    (``format_check``) or the rollout scores 0 — with the upfront split this only bites when the whole text is reused.
    Multi-turn: each assistant turn is one node (the forced final turn carries ``<answer>``), same rules.
    ``no_thinking`` (``--rollout_no_thinking``, base-model prompts): the whole text is the answer.
    """
    if not turn_texts:
        return None, str(FailureKind.NO_ANSWER_TAG)
    if no_thinking and not multiturn:
        return turn_texts[0], None
    all_text = turn_texts[0]
    matches = list(turn_texts) if multiturn else _BLOCK_RE.findall(all_text)
    thoughts: list[str] = []
    depth = 0
    while True:
        if matches:
            node = matches.pop(0)
        elif multiturn:
            break
        else:
            node = all_text
        if "<answer>" in node:
            answer = node.split("<answer>")[1].strip().split("</answer>")[0].strip()
            for t in thoughts:
                if "<think>" not in t:
                    return None, str(FailureKind.NO_THINK)
                if "</think>" not in t:
                    return None, str(FailureKind.UNCLOSED_THINK)
            return answer, None
        thoughts.append(node)
        depth += 1
        if depth > max_depth and not multiturn:
            break
    return None, str(FailureKind.NO_ANSWER_TAG)


def bench_frame_size(W: int, H: int, bench: Benchmark) -> tuple[int, int]:
    """Size after the benchmark's own image limit (what the reference eval resized to before sending)."""
    from vigorl_cli.vision.frames import Frame

    if bench.max_side:
        return Frame.max_side(W, H, bench.max_side).size
    if bench.max_pixels:
        return Frame.max_pixels(W, H, bench.max_pixels).size
    return W, H


def reference_target(target: Target, frame: Any, bench: Benchmark, factor: int = 28) -> tuple[Target, str]:
    """The GT box/point as the reference judged it: rescaled with ``int()`` into the image the eval resized to.

    ``max_side``: ``int(v * s)``, ``s = max_side / max(W, H)`` on both axes; ``max_pixels``: per axis
    ``int(x * w'/W)``, ``int(y * h'/H)`` after the Qwen smart resize; no limit hit: unchanged (truncated to int).
    The model server then smart-resizes once more (sides to multiples of 28) without touching the GT, so the
    reference compares the model's point, in the server's frame, with the GT in the eval frame; we do the same.
    When our processor resizes much further (by a factor's worth of pixels or more, e.g. a small ``max_pixels``),
    the reference has no equivalent and the GT is rescaled into the frame the model actually saw instead
    (returned kind ``"model"``).
    """
    W, H = frame.original_size
    w, h = bench_frame_size(W, H, bench)
    fw, fh = frame.size
    if abs(fw - w) >= factor or abs(fh - h) >= factor:
        sx, sy, kind = fw / W, fh / H, "model"
    elif bench.max_side and max(W, H) > bench.max_side:
        sx = sy = bench.max_side / max(W, H)
        kind = "max_side"
    elif (w, h) != (W, H):
        sx, sy, kind = w / W, h / H, "max_pixels"
    else:
        sx = sy = 1.0
        kind = "identity"
    if target.box is not None:
        x1, y1, x2, y2 = target.box
        return Target(box=(int(x1 * sx), int(y1 * sy), int(x2 * sx), int(y2 * sy)), frame="shown"), kind
    x, y = target.point
    return Target(point=(int(x * sx), int(y * sy)), frame="shown"), kind


# ---------------------------------------------------------------------------------------------------------------
# benchmark-specific judges
# ---------------------------------------------------------------------------------------------------------------

def robospatial_official_answer(pred: str) -> str | None:
    """RoboSpatial-Eval's yes/no reading: ``pred.strip().lower()`` starting with ``yes`` / ``no`` (so ``"not sure"``
    reads as ``no``); ``None`` otherwise."""
    p = pred.strip().lower()
    return "yes" if p.startswith("yes") else "no" if p.startswith("no") else None


def point_in_polygon(x: float, y: float, polygon: list) -> bool:
    """Even-odd ray casting (the rule RoboSpatial-Eval uses), polygon as ``[(x, y), ...]``."""
    inside = False
    n = len(polygon)
    for i in range(n):
        x1, y1 = polygon[i]
        x2, y2 = polygon[(i + 1) % n]
        if (y1 > y) != (y2 > y):
            xc = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
            if x < xc:
                inside = not inside
    return inside


from vigorl_cli.rewards.judges import read_point  # noqa: E402  (re-exported: one tolerant point reader)


def _robospatial_judge(pred: str | None, s: Sample, frame: Any, bench: Benchmark, compat: bool):
    from vigorl_cli.rewards.judges import JudgeResult, resolve_choice

    if pred is None:
        return JudgeResult(0.0, None, FailureKind.NO_ANSWER_TAG), None
    poly = s.meta.get("polygon")
    if poly is None:  # yes / no
        gt = s.answer.strip().lower()
        if compat:
            got = robospatial_official_answer(pred)
            return JudgeResult(float(got == gt), got, None if got else FailureKind.NO_MATCHING_CHOICE,
                               {"rule": "startswith"}), None
        words = re.sub(r"[^0-9a-z]+", " ", pred.lower()).split()
        got = words[0] if words and words[0] in ("yes", "no") else None
        if got is None:
            idx, failure = resolve_choice(pred, s.choices or ["yes", "no"])
            if idx is None:
                return JudgeResult(0.0, pred, failure), None
            got = (s.choices or ["yes", "no"])[idx].lower()
        return JudgeResult(float(got == gt), got, None, {"rule": "first_word_or_choice"}), None
    # context: a point inside the normalised polygon
    if compat:  # first (x, y) / [x, y]; values > 1 are pixels of the image the model saw
        m = re.search(r"[\(\[]\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*[\)\]]", pred)
        if not m:
            return JudgeResult(0.0, pred, FailureKind.NO_POINT), None
        x, y = float(m.group(1)), float(m.group(2))
        if x > 1 or y > 1:
            x, y = x / frame.size[0], y / frame.size[1]
        return JudgeResult(float(point_in_polygon(x, y, poly)), pred, None, {"point_norm": [x, y]}), None
    pt = read_point(pred)
    if pt is None:
        return JudgeResult(0.0, pred, FailureKind.NO_POINT), None
    x, y = pt
    if re.search(r"\d\.\d", pred) and 0 <= x <= 1 and 0 <= y <= 1:  # written as fractions: already normalised
        xn, yn, mapped = x, y, None
    else:  # pixels of the shown image → original pixels (pixel centres) → [0, 1]
        X, Y = frame.to_original((x, y), exact=True, check=False)
        W, H = frame.original_size
        xn, yn, mapped = (X + 0.5) / W, (Y + 0.5) / H, (X, Y)
    return JudgeResult(float(point_in_polygon(xn, yn, poly)), pred, None, {"point_norm": [xn, yn]}), mapped


BENCH_JUDGES: dict[str, Callable] = {"robospatial": _robospatial_judge}


def blink_official_extract(answer: str, n_choices: int) -> str | None:
    """BLINK ``eval/test_benchmark.py::analyze_answer`` without its GPT-3.5 fallback: a bare letter ``B`` →
    ``"(B)"``; ``"(B)"`` as is; else the one ``(X)`` whitespace token in the text (or in its last paragraph when
    that holds exactly one). ``None`` where the official script would call GPT (no or several ``(X)`` tokens)."""
    letters = ["(A)", "(B)", "(C)", "(D)", "(E)"][:n_choices]
    if answer in ("A", "B", "C", "D", "E"):
        return f"({answer})"
    if answer in ("(A)", "(B)", "(C)", "(D)", "(E)"):
        return answer
    inter = set(letters) & set(answer.split())
    inter_last = set(letters) & set(answer.split("\n\n")[-1].split())
    if (len(inter) != 1 and len(inter_last) != 1) or len(inter) < 1:
        return None
    return next(iter(inter_last if len(inter_last) == 1 else inter))


# ---------------------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Benchmark:
    name: str
    files: tuple[str, ...]
    preset: str  # prompt preset (models/prompts.py)
    mode: str = "single"  # default mode: single | multi
    judge: str | None = None  # judges.py name or a BENCH_JUDGES name; None: from each sample's task
    max_side: int | None = None  # image limit before the processor (reference eval settings)
    max_pixels: int | None = None
    zoom: str = "vstar"  # ZoomTool preset for multi-turn
    max_turns: int = 5
    max_images: int = 5  # multi-turn: the question image + crops
    split: Splitter | None = None  # sub-split label(s) of a sample
    demo: bool = False
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    formats: tuple[str, ...] = ()  # official formats (eval/loaders.py) read from NAME:PATH or DATA_ROOT
    prepare: Callable[[Sample], Sample] | None = None  # fix-up of each loaded sample (released records)
    keep: Callable[[Sample], bool] | None = None  # subset filter
    report: Callable[[dict], dict] | None = None  # official aggregates from the summary → summary["official"]
    source: str | None = None  # NAME:PATH
    official: str = ""  # how the benchmark's own code scores (for --list and docs)
    overrides: tuple[str, ...] = ()  # keys set in the name (NAME@key=value); they win over recipe and CLI values

    def splits_of(self, s: Sample, path: str) -> list[str]:
        if self.split is None:
            return ["all"]
        v = self.split(s, path)
        return [v] if isinstance(v, str) else (list(v) or ["all"])


M = 12_960_000  # 3600² — reference eval --max_pixels (paper: "maximum pixel size of 3600x3600")

_REAL = [
    Benchmark("vstar", ("visual_search/vstar/vstarbench_test.jsonl",), "vstar", mode="multi", judge="multiple_choice",
              max_pixels=M, zoom="vstar", split=_vstar_split, formats=("vstar_questions", "vstar_json"),
              report=_report_vstar, official="likelihood over options (first option correct); micro over 191",
              description="V*Bench, 191 questions (115 attribute + 76 spatial); multi-turn zoom, crop 672 / offset 182"),
    Benchmark("blink", ("spatial_reasoning/blink/blink_validation.jsonl",), "spatial", judge="multiple_choice",
              max_side=1260, split=_blink_split, formats=("blink_hf",), prepare=_prepare_blink,
              report=_report_blink, official="(X) extraction, exact letter match, macro over the 14 subtasks",
              description="BLINK val (every subtask in the file); max side 1260; per-subtask splits"),
    Benchmark("blink-spatial", ("spatial_reasoning/blink/blink_validation.jsonl",), "spatial",
              judge="multiple_choice", max_side=1260, split=_blink_split, formats=("blink_hf",),
              prepare=_prepare_blink, keep=_blink_spatial_keep, report=_report_blink,
              official="(X) extraction, exact letter match, per subtask",
              description="BLINK val, Relative_Depth + Spatial_Relation + Multi-view_Reasoning only"),
    Benchmark("sat2", ("spatial_reasoning/sat2_test/sat2_test.jsonl",), "spatial", judge="multiple_choice",
              max_side=1260, split=_sat_split, formats=("sat_hf",), official="option text (circular eval advised)",
              description="SAT-2 val (4,000 Qs; ViGoRL sat2_test.jsonl); max side 1260"),
    Benchmark("robospatial", ("spatial_reasoning/robospatial/annotations.json",), "spatial", judge="robospatial",
              max_side=1260, split=_robospatial_split, formats=("robospatial",), prepare=_prepare_robospatial,
              report=_report_robospatial,
              official="yes/no startswith; context: first point in polygon; mean of 3 categories",
              description="RoboSpatial-Home (configuration, compatibility yes/no; context pointing); max side 1260"),
    Benchmark("robospatial-vqa", ("spatial_reasoning/robospatial/annotations.json",), "spatial", judge="robospatial",
              max_side=1260, split=_robospatial_split, formats=("robospatial",), prepare=_prepare_robospatial,
              keep=_robospatial_vqa_keep, report=_report_robospatial, official="yes/no startswith",
              description="RoboSpatial-Home configuration + compatibility (228 Qs, the paper's split)"),
    Benchmark("screenspot-v2", ("web_grounding/ScreenSpot-V2/screenspot_v2_test.jsonl",), "web_grounding",
              judge="point_in_box", max_pixels=M, zoom="web_grounding", split=_screenspot_split,
              formats=("screenspot",), official="point in xywh box (normalised, inclusive); platform × text/icon",
              description="ScreenSpot-V2; point in box; max 3600² pixels; platform / text-icon splits"),
    Benchmark("screenspot-pro", ("web_grounding/ScreenSpot-Pro/screenspot_pro_test.jsonl",), "web_grounding",
              judge="point_in_box", max_pixels=M, zoom="web_grounding", split=_screenspot_pro_split,
              formats=("screenspot_pro",), report=_report_screenspot_pro,
              official="point in xyxy box / img_size (inclusive); overall, text, icon, per group",
              description="ScreenSpot-Pro; point in box; max 3600² pixels; group / text-icon / OS splits"),
    Benchmark("screenspot-pro-lr", ("web_grounding/ScreenSpot-Pro/screenspot_pro_test.jsonl",), "web_grounding",
              judge="point_in_box", max_pixels=1920 * 1920, zoom="web_grounding", split=_screenspot_pro_split,
              formats=("screenspot_pro",), report=_report_screenspot_pro,
              official="as screenspot-pro", description="ScreenSpot-Pro-LR (paper Table A6): images ≤ 1920² pixels"),
    Benchmark("os-atlas", ("web_grounding/vigorl_osatlas_val_RL.jsonl",), "web_grounding", judge="point_in_box",
              max_pixels=M, zoom="web_grounding", split=_osatlas_split, formats=("osatlas",),
              official="(training data, no official eval)", description="OS-ATLAS held-out validation (ViGoRL RL val)"),
    Benchmark("vwa", ("web_action/vigorl_ical_val_RL.jsonl",), "web_action", judge="web_action",
              max_pixels=4_194_304, split=_vwa_split, formats=("vwa_next_action",),
              official="live harness only (task success); offline: 0.5 action type + 0.5 argument",
              description="VisualWebArena offline next action (ICAL-derived val); action type + argument"),
]

_DEMO = [
    replace(next(b for b in _REAL if b.name == "vstar"), name="demo-vsearch", demo=True, max_pixels=None,
            formats=(), report=None, description="bundled synthetic visual search (V*-like), multi-turn zoom"),
    replace(next(b for b in _REAL if b.name == "sat2"), name="demo-spatial", demo=True, formats=(),
            description="bundled synthetic spatial relations (SAT-2-like)"),
    replace(next(b for b in _REAL if b.name == "screenspot-v2"), name="demo-grounding", demo=True, max_pixels=None,
            formats=(), description="bundled synthetic GUI grounding (ScreenSpot-like)"),
    Benchmark("demo-action", ("web_action/vigorl_ical_val_RL.jsonl",), "web_action", judge="web_action", demo=True,
              split=_file_split, description="bundled synthetic web actions (VWA-like next action)"),
]

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in _REAL + _DEMO}

_OVERRIDES = {"max_side", "max_pixels", "mode", "max_turns", "max_images", "zoom", "preset"}


def _override_value(key: str, value: str, name: str) -> Any:
    from vigorl_cli.errors import DataError

    def bad(expected: str) -> DataError:
        return DataError(f"benchmark {name!r}: {key}={value!r} is not {expected}",
                         hint="e.g. screenspot-pro@max_pixels=6013280 or vstar@mode=single")

    if key in ("max_side", "max_pixels"):
        if value.lower() in ("none", "off", "0"):
            return None
        if not value.replace("_", "").isdigit():
            raise bad("a positive integer or none")
        return int(value.replace("_", ""))
    if key in ("max_turns", "max_images"):
        if not value.isdigit() or int(value) < 1:
            raise bad("a positive integer")
        return int(value)
    if key == "mode":
        if value not in ("single", "multi"):
            raise bad("single or multi")
        return value
    if key == "zoom":
        from vigorl_cli.vision.zoom import PRESETS as ZOOM

        if value not in ZOOM:
            raise bad("one of " + ", ".join(ZOOM))
        return value
    from vigorl_cli.models.prompts import PRESETS as PROMPTS

    if value not in PROMPTS:
        raise bad("one of " + ", ".join(PROMPTS))
    return value


def get_benchmark(name: str) -> Benchmark:
    """A registered benchmark (``NAME``, ``NAME:PATH``, ``NAME@key=value``, see the module docstring) or
    ``jsonl:PATH`` for any data file (judge and prompt per sample task)."""
    from vigorl_cli.errors import DataError

    if name.startswith("jsonl:"):
        path = name.split(":", 1)[1]
        return Benchmark(name=name, files=(path,), preset="spatial", split=_file_split,
                         description=f"custom file {path}")
    base, _, source = name.partition(":")
    bname, *opts = base.split("@")
    if bname not in BENCHMARKS:
        raise DataError(f"unknown benchmark {bname!r}; known: {', '.join(BENCHMARKS)}, or jsonl:PATH",
                        hint="`vigorl eval --list` describes them")
    b = BENCHMARKS[bname]
    over: dict[str, Any] = {}
    for o in opts:
        key, eq, value = o.partition("=")
        if not eq or key not in _OVERRIDES:
            raise DataError(f"benchmark {name!r}: cannot set {o!r}",
                            hint=f"NAME@key=value with key one of {', '.join(sorted(_OVERRIDES))}")
        over[key] = _override_value(key, value, name)
    if over:
        b = replace(b, name=base, overrides=tuple(sorted(over)), **over)
    if source:
        b = replace(b, source=source)
    return b


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------

def _absolutize(samples: list[Sample], root: Path, file: Path) -> None:
    """Released-format records give images relative to DATA_ROOT; when a file is named directly (``NAME:FILE``),
    paths that are not under ``root`` but are next to the file are taken from there. All made absolute."""
    for s in samples:
        out = []
        for p in s.images:
            q = Path(p)
            if not q.is_absolute():
                q = root / q if (root / q).exists() or not (file.parent / q).exists() else file.parent / q
            out.append(str(q))
        s.images = out


def load_samples(bench: Benchmark, root: Path) -> tuple[list[tuple[Sample, str]], list]:
    """``[(sample, source path)]`` and per-record errors for ``bench`` on ``root`` (see the module docstring for
    where the data is looked for). Raises :class:`DataError` when nothing readable is found."""
    from vigorl_cli.data.formats import read_samples
    from vigorl_cli.eval import loaders

    root = Path(root)
    if bench.name.startswith("jsonl:"):  # any file, exactly as read_samples reads it
        rel = bench.files[0]
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        sf = read_samples(path)
        return [(s, str(path)) for s in sf.samples], list(sf.errors)

    sources: list[Path] = []
    absolute = False
    if bench.source:
        p = Path(bench.source).expanduser()
        if not p.is_absolute() and not p.exists() and (root / p).exists():
            p = root / p
        if not p.exists():
            raise DataError(f"{bench.name}: {p} does not exist", hint="NAME:PATH takes a data file or folder")
        if p.is_dir() and any((p / f).is_file() for f in bench.files):
            root, sources = p, [p / f for f in bench.files if (p / f).is_file()]
        else:
            sources = [p]
            for f in bench.files:  # the released file inside a DATA_ROOT: its images are relative to that root
                if p.is_file() and p.as_posix().endswith("/" + f):
                    root = Path(p.as_posix()[: -len(f) - 1])
        absolute = True
    else:
        sources = [root / f for f in bench.files if (root / f).is_file()]
        if not sources:
            fmt = loaders.detect(root) if bench.formats and root.is_dir() else None
            if fmt in bench.formats:
                sources, absolute = [root], True
            else:
                raise DataError(
                    f"{bench.name}: {root / bench.files[0]} not found",
                    hint="run `vigorl data pull`, set --data-root, or point at the benchmark's own release with "
                         f"--bench {bench.name}:PATH" + (f" (formats: {', '.join(bench.formats)})"
                                                         if bench.formats else ""))
    items: list[tuple[Sample, str]] = []
    errors: list = []
    for path in sources:
        res = loaders.load(path)
        if bench.formats and res.format not in ("released", *bench.formats):
            raise DataError(f"{bench.name}: {path} is in the {res.format} format, which this benchmark does not "
                            f"read", hint=f"readable: released ViGoRL files, {', '.join(bench.formats)}")
        if absolute and res.format == "released":
            _absolutize(res.samples, root, path if path.is_file() else path / "x")
        errors.extend(res.errors)
        for s in res.samples:
            if bench.prepare is not None:
                s = bench.prepare(s)
            if bench.keep is not None and not bench.keep(s):
                continue
            items.append((s, str(path)))
    return items, errors


def describe(b: Benchmark) -> dict:
    """One row of ``vigorl eval --list`` / docs."""
    return {f.name: getattr(b, f.name) for f in fields(b) if f.name in
            ("name", "mode", "judge", "preset", "max_side", "max_pixels", "zoom", "formats", "description")}


PRESET_BY_TASK = {"grounding": "web_grounding", "web_action": "web_action", "multiple_choice": "spatial",
                  "vqa": "spatial"}
