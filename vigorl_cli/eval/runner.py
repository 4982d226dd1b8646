"""`vigorl eval`: run episodes over a benchmark, judge them, write per-sample JSONL and a summary; resumable.

Output folder (per benchmark ``OUT/<bench>/``):

* ``samples.jsonl``: one record per (sample, draw), appended and fsynced as each episode finishes. A rerun on the
  same folder skips every (id, draw) already there: nothing finished is redone or duplicated, and a killed run loses
  at most the episodes in flight.
* ``summary.json``: written atomically at the end (see :func:`summarize` for the fields), with ``"complete": true``.
  On Ctrl-C the results file is closed, a partial summary (``"complete": false``) is written and
  :class:`EvalInterrupted` (a ``KeyboardInterrupt``) is raised; ``vigorl eval`` then prints a resume hint and exits
  130. Records carry the prompt as sent (``prompt``), the whole ``transcript`` (assistant turns, observation turns,
  forced text) and the parsed ``tool_calls`` of each turn; no image bytes.

Scoring happens in the **original image frame**: a point the model gave on the resized image is mapped back with
``vision.frames`` before the judge compares it with the ground truth (so predictions made at two pixel limits score
the same). ``compat=True`` instead reproduces the reference: ground truth rescaled into the resized frame with
``int()`` and the reference judges' quirks.

Benchmarks (``eval/benchmarks.py``) supply the samples (any format ``eval/loaders.py`` reads), the judge, the
sub-split labels of each sample (a record counts in each of its labels) and the extra aggregates their own scripts
report (``summary["official"]``).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import UnidentifiedImageError

from vigorl_cli.agent.episode import Episode, EpisodeConfig, run_episodes
from vigorl_cli.agent.images import load_for_model
from vigorl_cli.data.io import LineError, ResultsFile, atomic_write_json
from vigorl_cli.data.schema import Sample
from vigorl_cli.engines.base import SamplingParams
from vigorl_cli.eval.benchmarks import (
    BENCH_JUDGES,
    PRESET_BY_TASK,
    Benchmark,
    load_samples,
    reference_answer,
    reference_target,
)
from vigorl_cli.models import prompts
from vigorl_cli.recipe import resolve_observation_style
from vigorl_cli.rewards.judges import judge_in_frame
from vigorl_cli.vision.frames import Frame
from vigorl_cli.vision.zoom import ZoomTool


@dataclass
class EvalSettings:
    data_root: Path
    out_dir: Path
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.5, max_new_tokens=2048))
    mode: str = "auto"  # auto | single | multi
    samples: int = 1  # draws per question (Avg@k)
    limit: int | None = None
    compat: bool = False
    system_prompt: str | None = None  # overrides the benchmark preset
    prompt_variant: str | None = None  # e.g. answer_only for base models
    literal_newlines: bool = False
    seed: int = 0
    chunk: int = 64  # episodes created per batch of work (memory bound)
    # multi-turn limits and zoom settings; None: the benchmark's own. A setting in the benchmark name
    # (NAME@max_turns=3) wins over these, which win over the benchmark's default.
    max_turns: int | None = None
    max_images: int | None = None
    offset: int | None = None
    crop_size: int | None = None
    draw_dot: bool | None = None
    observation_style: str = "auto"  # auto: "eval" with compat (reference eval wrapper), else "rl" (RL training)
    max_response_tokens: int = 4096
    zoom_source: str = "shown"


class EvalInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`evaluate`: the results file is closed and a partial ``summary.json`` (``"complete":
    false``) is written before this is raised. ``summary`` is that partial summary, ``out`` its folder."""

    def __init__(self, summary: dict, out: Path):
        super().__init__(f"interrupted: {summary.get('draws', 0)} of {summary.get('total', '?')} samples saved in {out}")
        self.summary, self.out = summary, out


def _setting(bench: Benchmark, key: str, explicit: Any) -> Any:
    """Precedence: the benchmark name's ``@key=value`` > the recipe/CLI value > the benchmark's default."""
    if key in bench.overrides or explicit is None:
        return getattr(bench, key)
    return explicit


def episode_config(bench: Benchmark, st: EvalSettings, multi: bool) -> EpisodeConfig:
    """The episode settings for ``bench`` under ``st`` (see :func:`_setting` for the precedence)."""
    zoom = None
    if multi:
        explicit = {k: getattr(st, k) for k in ("offset", "crop_size", "draw_dot")}
        if "zoom" in bench.overrides:  # NAME@zoom=PRESET names the whole zoom setting
            explicit = {}
        zoom = ZoomTool.preset(bench.zoom, source=st.zoom_source,
                               **{k: v for k, v in explicit.items() if v is not None})
    style = resolve_observation_style(st.observation_style, compat_eval=st.compat)
    return EpisodeConfig(sampling=st.sampling, multiturn=multi, zoom=zoom,
                         max_turns=_setting(bench, "max_turns", st.max_turns),
                         max_images=_setting(bench, "max_images", st.max_images),
                         max_response_tokens=st.max_response_tokens, forced_greedy=st.compat,
                         observation_style=style)


@dataclass
class LoadedSample:
    sample: Sample
    file: str
    split: str
    splits: list[str] = field(default_factory=list)  # every sub-split label (split is the first)


def load_benchmark(bench: Benchmark, root: Path, limit: int | None = None) -> tuple[list[LoadedSample], list[LineError]]:
    """The benchmark's samples (released file, official release, or NAME:PATH; see ``eval/benchmarks.py``)."""
    loaded, errors = load_samples(bench, root)
    items = []
    for s, path in loaded:
        labels = bench.splits_of(s, path)
        items.append(LoadedSample(s, path, labels[0], labels))
    if limit is not None:
        items = items[:limit]
    return items, errors


def _system_prompt(bench: Benchmark, s: Sample, multi: bool, st: EvalSettings) -> str:
    if st.system_prompt is not None:
        return st.system_prompt
    preset = bench.preset if not bench.name.startswith("jsonl:") else PRESET_BY_TASK.get(s.task, "spatial")
    variant = st.prompt_variant or ("multiturn" if multi else "single")
    return prompts.system_prompt(preset, variant, literal_newlines=st.literal_newlines)


def _judge(pred: str | None, s: Sample, frame: Frame, bench: Benchmark, compat: bool) -> tuple[float, Any]:
    """Score ``pred`` (model frame) against the sample (original frame)."""
    judge = bench.judge if bench.judge else None
    if judge in BENCH_JUDGES:
        return BENCH_JUDGES[judge](pred, s, frame, bench, compat)
    if compat and s.task == "grounding" and s.target is not None and pred is not None:
        # reference: GT rescaled into the eval-resized frame with int(), prediction compared there
        t, kind = reference_target(s.target, frame, bench)
        res, _ = judge_in_frame(pred, s, frame, judge=judge, compat=True, compat_target=t)
        res.details["gt_frame"] = kind
        return res, None
    return judge_in_frame(pred, s, frame, judge=judge, compat=compat)


def _crop_hit(ep: Episode, s: Sample) -> bool | None:
    """Did the crops see every ground-truth box (its centre inside some crop window, original frame)?
    ``None`` without crops or boxes. Boxes: ``meta["boxes"]`` (V* objects) or the target box."""
    boxes = s.meta.get("boxes") or ([s.target.box] if s.target is not None and s.target.box is not None else None)
    if not ep.crops or not boxes:
        return None
    wins = [c["window_original"] for c in ep.crops]
    return all(any(w[0] <= (b[0] + b[2]) / 2 <= w[2] and w[1] <= (b[1] + b[3]) / 2 <= w[3] for w in wins)
               for b in boxes)


def evaluate(bench: Benchmark, engine: Any, processor: Any, st: EvalSettings,
             on_progress: Callable[[int, int, dict], None] | None = None) -> dict:
    """Evaluate one benchmark; returns the summary (also written to ``OUT/<bench>/summary.json``)."""
    out = st.out_dir / bench.name.replace(":", "_").replace("/", "_")
    items, load_errors = load_benchmark(bench, st.data_root, st.limit)
    rf = ResultsFile(out / "samples.jsonl", id_key="key")
    done = rf.done_ids()
    todo = [(it, d) for it in items for d in range(st.samples) if f"{it.sample.id}#{d}" not in done]
    multi = (st.mode == "multi") or (st.mode == "auto" and bench.mode == "multi")
    cfg = episode_config(bench, st, multi)
    t0 = time.time()
    n_total, n_done = len(items) * st.samples, len(items) * st.samples - len(todo)
    meta: dict[str, dict] = {}

    def record(ep: Episode) -> None:
        nonlocal n_done
        s: Sample = ep.sample
        it = meta[f"{s.id}#{ep.draw}"]
        failures = list(ep.failures)
        pred = ep.answer
        if st.compat:  # the reference's own answer extraction and format check (benchmarks.reference_answer)
            pred, kind = reference_answer(ep.turn_texts, multiturn=multi,
                                          no_thinking=st.prompt_variant == "answer_only")
            if kind and kind not in failures:
                failures.append(kind)
        res, mapped = _judge(pred, s, ep.images[0].frame, bench, st.compat)
        if res.failure and str(res.failure) not in failures:
            failures.append(str(res.failure))
        rf.append({"key": f"{s.id}#{ep.draw}", "id": s.id, "draw": ep.draw, "bench": bench.name,
                   "split": it["split"], "splits": it["splits"], "question": s.question, "gt": s.answer,
                   "prompt": ep.segments[0].text,  # system + user turn as sent (chat template, 1 image placeholder)
                   "pred": pred, "pred_original": list(mapped) if mapped else None, "score": float(res.score),
                   "failure": failures[0] if failures else None,
                   "judge": {"pred": res.pred, "details": _jsonable(res.details)},
                   "crop_hit": _crop_hit(ep, s), **ep.to_record(), "frame": ep.images[0].frame.to_dict(),
                   "image": s.images[0] if s.images else None,
                   "failures": failures})  # after to_record(): episode + judge failures, each counted once
        n_done += 1
        if on_progress:
            on_progress(n_done, n_total, {})

    def run_all() -> None:
        nonlocal n_done
        for i in range(0, len(todo), st.chunk):
            episodes = []
            cache: dict[str, tuple] = {}
            for it, draw in todo[i:i + st.chunk]:
                s = it.sample
                meta[f"{s.id}#{draw}"] = {"split": it.split, "splits": it.splits}
                try:
                    if s.id not in cache:
                        if not s.images:
                            raise FileNotFoundError("sample has no image")
                        cache[s.id] = load_for_model(s.image_paths(st.data_root)[0], processor,
                                                     max_side=bench.max_side, max_pixels=bench.max_pixels)
                    original, frame, shown = cache[s.id]
                except (OSError, UnidentifiedImageError, ValueError) as e:
                    rf.append({"key": f"{s.id}#{draw}", "id": s.id, "draw": draw, "bench": bench.name,
                               "split": it.split, "splits": it.splits, "question": s.question, "gt": s.answer,
                               "pred": None, "score": 0.0,
                               "failure": "image_error", "failures": ["image_error"],
                               "error": f"{type(e).__name__}: {e}", "turns": 0, "crops": [], "tokens": 0,
                               "image": s.images[0] if s.images else None})
                    n_done += 1
                    if on_progress:
                        on_progress(n_done, n_total, {})
                    continue
                episodes.append(Episode(s, shown, frame, _system_prompt(bench, s, multi, st), processor, cfg,
                                        seed=st.seed, draw=draw, original=original))
            run_episodes(engine, episodes, on_done=record)

    interrupted = False
    try:
        run_all()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        rf.close()
    summary = summarize(rf.read(), bench.name, st.samples, elapsed=time.time() - t0, n_new=len(todo))
    summary["total"] = n_total
    summary["complete"] = not interrupted and summary["draws"] >= n_total
    summary["load_errors"] = [str(e) for e in load_errors]
    summary["data_root"] = str(Path(st.data_root).resolve())  # lets `vigorl view` find the images
    summary["source_formats"] = sorted({it.sample.meta.get("source_format", "released") for it in items})
    if bench.report is not None:
        summary["official"] = bench.report(summary)
    atomic_write_json(out / "summary.json", summary)
    if interrupted:
        raise EvalInterrupted(summary, out)
    return summary


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (str, int, float, bool)) or x is None else str(x) for x in v]
        else:
            out[k] = str(v)
    return out


def _ci95(per_question: list[float]) -> float:
    n = len(per_question)
    if n < 2:
        return 0.0
    m = sum(per_question) / n
    var = sum((x - m) ** 2 for x in per_question) / (n - 1)
    return 1.96 * math.sqrt(var / n)


def _stats(recs: list[dict], k: int) -> dict:
    by_q: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        by_q[r["id"]].append(float(r["score"]))
    per_q = [sum(v) / len(v) for v in by_q.values()]
    n = len(recs)
    parse_fail = sum(1 for r in recs if r.get("pred") is None or r.get("failure")) / n if n else 0.0
    hits = [r["crop_hit"] for r in recs if r.get("crop_hit") is not None]
    return {
        "n": len(by_q), "draws": n,
        "accuracy": round(sum(per_q) / len(per_q), 6) if per_q else 0.0,
        "ci95": round(_ci95(per_q), 6),
        "avg_at_k": round(sum(float(r["score"]) for r in recs) / n, 6) if n else 0.0,
        "pass_at_k": round(sum(1 for v in by_q.values() if max(v) > 0) / len(by_q), 6) if by_q else 0.0,
        "parse_failure_rate": round(parse_fail, 6),
        "image_error_rate": round(sum(1 for r in recs if r.get("failure") == "image_error") / n, 6) if n else 0.0,
        "engine_error_rate": round(sum(1 for r in recs if "engine_error" in (r.get("failures") or [])) / n, 6)
        if n else 0.0,
        "mean_turns": round(sum(r.get("turns", 0) for r in recs) / n, 4) if n else 0.0,
        "mean_crops": round(sum(len(r.get("crops") or []) for r in recs) / n, 4) if n else 0.0,
        "crop_hit_rate": round(sum(hits) / len(hits), 6) if hits else None,
        "tokens_per_sample": round(sum(r.get("tokens", 0) for r in recs) / n, 2) if n else 0.0,
        "k": k,
    }


def summarize(recs: list[dict], bench: str, k: int, elapsed: float = 0.0, n_new: int = 0) -> dict:
    """Whole-benchmark and per-split statistics over the result records."""
    out = {"bench": bench, **_stats(recs, k)}
    failures: dict[str, int] = defaultdict(int)
    for r in recs:
        for f in r.get("failures") or []:
            failures[f] += 1
    out["failure_counts"] = dict(sorted(failures.items(), key=lambda kv: -kv[1]))
    splits: dict[str, list[dict]] = defaultdict(list)
    for r in recs:  # a record counts in each of its labels (e.g. "group:CAD" and "ui:icon")
        for label in r.get("splits") or [r.get("split") or "all"]:
            splits[label].append(r)
    out["splits"] = {name: _stats(rs, k) for name, rs in sorted(splits.items())}
    out["seconds"] = round(elapsed, 3)
    out["samples_per_second"] = round(n_new / elapsed, 4) if elapsed > 0 and n_new else None
    return out
