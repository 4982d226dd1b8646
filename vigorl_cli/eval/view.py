"""`vigorl view`: one self-contained HTML page for an eval output folder (or a rollout folder of the same records).

What it reads (:func:`find_groups`):

* an eval folder ``DIR/<bench>/samples.jsonl`` (+ ``summary.json``), one group per benchmark;
* a folder of eval folders, as ``vigorl run`` writes them: ``RUN/eval/<label>/<bench>/samples.jsonl`` (label: base,
  sft, grpo), one group per ``<label>/<bench>``;
* a single ``<bench>`` folder, or a ``samples.jsonl`` (any ``.jsonl`` of records) given directly;
* a rollout folder: ``DIR/*.jsonl`` (or ``DIR/<sub>/*.jsonl``, e.g. a GRPO run folder whose records are in
  ``rollouts/step_000010.jsonl``), one group per file, records of the same shape.

Training metric logs (``metrics.jsonl``) and other JSONL files whose first record is not a sample record (MCTS trees,
error logs) are never taken for records when a folder is searched.

What it draws, per record (the fields :func:`vigorl_cli.eval.runner.evaluate` writes):

* the image as a JPEG thumbnail (max side :data:`THUMB_MAX`), inlined once per image as a ``data:`` URI in the page's
  stylesheet (draws of one question share it), under an SVG overlay in **original-image pixels**:
  every ``(x, y)`` the model wrote in its turn texts (red, numbered; points inside ``<answer>`` as a magenta ring),
  mapped from the model-input frame (``record["frame"]``) with ``Frame.to_original(..., exact=True, check=False)``;
  each crop window the model asked for (blue, dashed, ``crops[i].window_original``) with its requested point;
  the ground truth when it is a box or a point (green); below the image, each crop window as its own view (cut
  from the same embedded thumbnail by CSS size and offset, so no second copy of the image is stored);
* the question, the model's text per turn (escaped; points highlighted with the overlay's numbers), the answer,
  score, failure kinds, crop hit, finish reason and tokens.

A missing or unreadable image becomes a grey placeholder of the recorded frame's shape (the overlay is still drawn);
nothing about one record can stop the page. The page has no external assets and no JS libraries: a few lines of
inline JS filter cards by correct / wrong, failure kind and benchmark, and read an initial filter from the URL hash
(``view.html#status=wrong&failure=no_point&bench=sat2``).

Pixel conventions (``vision/frames.py``): an integer point names a pixel, drawn at its centre ``(X + 0.5, Y + 0.5)``;
a box ``(x1, y1, x2, y2)`` has inclusive pixel corners, drawn from ``x1`` to ``x2 + 1``; crop windows are continuous
edges, drawn as they are. So a point the judge counts inside the GT box is drawn inside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigorl_cli.agent.parse import find_points
from vigorl_cli.data.io import atomic_write_text, read_json_or_jsonl
from vigorl_cli.data.schema import parse_box, parse_point
from vigorl_cli.errors import DataError
from vigorl_cli.vision.frames import Frame

THUMB_MAX = 640
"""Longest side of the inlined thumbnails, in pixels."""

JPEG_QUALITY = 82
ONLY = ("correct", "wrong", "failed")
"""``only=`` values: ``correct`` (score >= 1), ``wrong`` (score < 1, partial credit included), ``failed`` (a failure
kind was recorded)."""

# Overlay colours (the test looks for the first two in a screenshot; keep them out of the page chrome).
C_POINT = "#ff1744"
C_GT = "#00c853"
C_CROP = "#2962ff"
C_ANSWER = "#d500f9"

_ANSWER_RE = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------

@dataclass
class Group:
    """One benchmark (or one rollout file): its records file and, for eval folders, its summary."""

    name: str
    samples: Path
    summary: dict | None = None


@dataclass
class ViewStats:
    """What :func:`render_view` did: counts for the caller to report."""

    groups: int = 0
    records: int = 0  # readable records in all groups
    shown: int = 0  # cards written (after ``only`` and ``limit``)
    missing_images: int = 0  # cards whose recorded image could not be found or read (placeholder drawn)
    no_image: int = 0  # cards whose record names no image (e.g. ``image_error`` records)
    unreadable_lines: int = 0
    bytes: int = 0  # size of the page
    roots: list[str] = field(default_factory=list)  # data roots that were searched for images
    missing_examples: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


NOT_RECORDS = frozenset({"metrics.jsonl"})
"""File names that are never records (``vigorl sft`` / ``vigorl grpo`` metric logs)."""

_RECORD_KEYS = ("turn_texts", "score", "pred", "reward", "failure")


def _looks_like_records(path: Path) -> bool:
    """Whether the first complete line of ``path`` is a sample record (eval or rollout), judged by its keys."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    obj = json.loads(line)
                    return isinstance(obj, dict) and any(k in obj for k in _RECORD_KEYS)
    except (OSError, ValueError):
        return False
    return False


def _record_files(folder: Path) -> list[Path]:
    return [f for f in sorted(folder.glob("*.jsonl")) if f.is_file() and f.name not in NOT_RECORDS
            and f.name != "samples.jsonl" and _looks_like_records(f)]


def _eval_group(folder: Path, name: str) -> Group:
    return Group(name, folder / "samples.jsonl", _read_json(folder / "summary.json"))


def find_groups(path: str | Path) -> list[Group]:
    """The record files under ``path`` (see the module docstring for the accepted layouts).

    Eval groups are found up to two levels down (``<bench>/`` and ``<label>/<bench>/``) and named by their path under
    ``path``; rollout files are searched one level down only when ``path`` holds neither eval groups nor records."""
    p = Path(path)
    if p.is_file():
        if p.name in NOT_RECORDS:
            raise DataError(f"{p} is a training metrics log, not sample records",
                            hint="give the run's rollouts/ folder (or the run folder) instead")
        if p.name == "samples.jsonl":
            return [Group(p.parent.name or "samples", p, _read_json(p.parent / "summary.json"))]
        return [Group(p.stem, p, None)]
    if not p.is_dir():
        raise DataError(f"not found: {p}", hint="give an eval output folder (OUT/<bench>/samples.jsonl), one "
                                                "<bench> folder, or a samples.jsonl")
    if (p / "samples.jsonl").is_file():
        return [_eval_group(p, p.name)]
    subs = [d for d in sorted(p.iterdir()) if d.is_dir()]
    groups: list[Group] = []
    for sub in subs:
        if (sub / "samples.jsonl").is_file():
            groups.append(_eval_group(sub, sub.name))
        else:  # RUN/eval/<label>/<bench>/samples.jsonl
            groups += [_eval_group(b, f"{sub.name}/{b.name}") for b in sorted(sub.iterdir())
                       if b.is_dir() and (b / "samples.jsonl").is_file()]
    groups += [Group(f.stem, f, None) for f in _record_files(p)]
    if not groups:  # rollout layouts one level deeper, e.g. GRPO_OUT/rollouts/step_000010.jsonl
        groups = [Group(f"{sub.name}/{f.stem}", f, None) for sub in subs for f in _record_files(sub)]
    if not groups:
        raise DataError(f"no records under {p}: expected <bench>/samples.jsonl, <label>/<bench>/samples.jsonl or "
                        "*.jsonl records (metrics.jsonl is not one)",
                        hint="point `vigorl view` at the folder given to `vigorl eval --out`, a `vigorl run` folder's "
                             "eval/, or a GRPO run folder (its rollouts/)")
    return groups


def _score(r: dict) -> float:
    v = r.get("score", r.get("reward"))
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def _failures(r: dict) -> list[str]:
    out = [str(f) for f in (r.get("failures") or []) if f]
    if r.get("failure") and str(r["failure"]) not in out:
        out.insert(0, str(r["failure"]))
    return list(dict.fromkeys(out))


def _is_correct(r: dict) -> bool:
    return _score(r) >= 1.0 - 1e-9


def _keep(r: dict, only: str | None) -> bool:
    if only is None:
        return True
    if only == "correct":
        return _is_correct(r)
    if only == "wrong":
        return not _is_correct(r)
    return bool(r.get("failure"))


def group_stats(recs: list[dict]) -> dict:
    """Per-benchmark header numbers, computed like :func:`vigorl_cli.eval.runner.summarize` (accuracy = mean over
    questions of the mean score over draws) but tolerant of records that lack fields."""
    by_q: dict[str, list[float]] = defaultdict(list)
    for i, r in enumerate(recs):
        by_q[str(r.get("id", f"#{i}"))].append(_score(r))
    per_q = [sum(v) / len(v) for v in by_q.values()]
    failures: Counter = Counter()
    for r in recs:
        failures.update(_failures(r))
    return {"n": len(by_q), "draws": len(recs), "accuracy": sum(per_q) / len(per_q) if per_q else 0.0,
            "correct": sum(1 for r in recs if _is_correct(r)), "failed": sum(1 for r in recs if r.get("failure")),
            "failure_counts": dict(failures.most_common())}


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------

class _Images:
    """Finds images under the data roots and turns each into one CSS class holding its thumbnail."""

    def __init__(self, roots: list[Path], strict: bool):
        self.roots, self.strict = roots, strict
        self.classes: dict[Path, tuple[str, tuple[int, int], tuple[int, int]] | None] = {}
        self.css: list[str] = []

    def resolve(self, rel: str | None, extra: list[Path]) -> Path | None:
        if not rel:
            return None
        q = Path(rel)
        if q.is_absolute():
            return q if q.is_file() else None
        for root in self.roots + ([] if self.strict else extra):
            if (root / q).is_file():
                return root / q
        return None

    def thumb(self, path: Path) -> tuple[str, tuple[int, int], tuple[int, int]] | None:
        """``(css class, thumbnail size, image size)`` or None when the file cannot be read as an image."""
        key = path.resolve()
        if key in self.classes:
            return self.classes[key]
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(key) as im:
                size = im.size
                im.draft("RGB", (THUMB_MAX, THUMB_MAX))  # JPEG: decode at a reduced scale (still >= the thumbnail)
                rgb = im.convert("RGB")
            rgb.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            rgb.save(buf, "JPEG", quality=JPEG_QUALITY)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
            self.classes[key] = None
            return None
        cls = f"im{len(self.css)}"
        uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        self.css.append(f".{cls}{{background-image:url({uri})}}")
        self.classes[key] = (cls, rgb.size, size)
        return self.classes[key]


def _default_roots(path: Path, groups: list[Group]) -> list[Path]:
    """Where images are looked for without ``--data-root``: a ``data_root`` recorded in a summary, the demo root for
    ``demo-*`` benchmarks, then the folder itself, its parent and the working directory."""
    roots: list[Path] = []
    base = path if path.is_dir() else path.parent
    summaries = [g.summary for g in groups] + [_read_json(base / "summary.json"),
                                               _read_json(base.parent / "summary.json")]
    for s in summaries:
        if s and isinstance(s.get("data_root"), str):
            roots.append(Path(s["data_root"]))
    if any(g.name.rsplit("/", 1)[-1].startswith("demo-") or str((g.summary or {}).get("bench", "")).startswith("demo-")
           for g in groups):
        roots.append(Path(os.environ.get("VIGORL_DEMO_ROOT", "data/demo")))
    roots += [base, base.parent, Path.cwd()]
    return list(dict.fromkeys(roots))


# --------------------------------------------------------------------------------------------------------------------
# One card
# --------------------------------------------------------------------------------------------------------------------

# C0 controls (but tab and newline) and DEL as their Unicode "control pictures": visible, and valid in HTML.
_CONTROLS = {c: 0x2400 + c for c in range(32) if c not in (9, 10)} | {127: 0x2421}


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True).translate(_CONTROLS)


def _num(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") if math.isfinite(v) else "0"


def _fmt_xy(p) -> str:
    try:
        return "(" + ", ".join(_num(float(v)) for v in p) + ")"
    except (TypeError, ValueError):
        return str(p)


def _frame(d: Any) -> Frame | None:
    if not isinstance(d, dict):
        return None
    try:
        return Frame.from_dict(d)
    except (ValueError, TypeError):
        return None


def _answer_spans(text: str) -> list[tuple[int, int]]:
    return [m.span(1) for m in _ANSWER_RE.finditer(text)]


@dataclass
class _Point:
    n: int
    turn: int
    text: str
    xy: tuple[float, float] | None  # original frame, None when it cannot be mapped
    in_answer: bool


def _turn_points(r: dict, frame: Frame | None) -> tuple[list[list[tuple[Any, _Point]]], list[_Point]]:
    per_turn, all_pts, n = [], [], 0
    for t, text in enumerate(r.get("turn_texts") or []):
        text = str(text)
        spans = _answer_spans(text)
        row = []
        for m in find_points(text):
            n += 1
            xy = None
            if frame is not None:
                try:
                    xy = tuple(float(v) for v in frame.to_original(m.xy, exact=True, check=False))
                except (ValueError, TypeError):
                    xy = None
            p = _Point(n, t, m.text, xy, any(a <= m.span[0] < b for a, b in spans))
            row.append((m, p))
            all_pts.append(p)
        per_turn.append(row)
    return per_turn, all_pts


def _turn_html(text: str, row: list[tuple[Any, _Point]]) -> str:
    out, pos = [], 0
    for m, p in row:
        a, b = m.span
        out.append(_e(text[pos:a]))
        cls = "pt ans" if p.in_answer else "pt"
        where = f" → original {_fmt_xy(p.xy)}" if p.xy else ""
        out.append(f'<span class="{cls}" title="point {p.n}{_e(where)}"><sup>{p.n}</sup>{_e(text[a:b])}</span>')
        pos = b
    out.append(_e(text[pos:]))
    return "".join(out)


def _crop_window(c: Any) -> tuple[float, float, float, float] | None:
    """A crop record's ``window_original`` as ``(left, top, right, bottom)`` floats, or None when it has none."""
    win = c.get("window_original") if isinstance(c, dict) else None
    try:
        left, top, right, bottom = (float(v) for v in win)
    except (TypeError, ValueError):
        return None
    return left, top, right, bottom


CROP_VIEW = 128  # screen pixels on the longer side of a crop view


def _crop_views(cls: str, size: tuple[int, int], crops: list[dict]) -> str:
    """What each crop showed the model: its window of the sample's image, cut from the embedded thumbnail (no second
    copy of the image) by CSS background size and offset, ``CROP_VIEW`` px on its longer side."""
    W, H = size
    views = []
    for i, c in enumerate(crops, 1):
        win = _crop_window(c)
        if win is None:
            continue
        left, top, right, bottom = win
        w, h = right - left, bottom - top
        if w <= 0 or h <= 0:
            continue
        s = CROP_VIEW / max(w, h)  # screen pixels per original pixel
        views.append(f'<figure class="cropv"><div class="{cls}" style="width:{_num(w * s)}px;height:{_num(h * s)}px;'
                     f'background-size:{_num(W * s)}px {_num(H * s)}px;'
                     f'background-position:{_num(-left * s)}px {_num(-top * s)}px" role="img" '
                     f'aria-label="crop {i}"></div><figcaption>crop {i}</figcaption></figure>')
    return f'<div class="crops">{"".join(views)}</div>' if views else ""


def _svg(W: int, H: int, tw: int, th: int, pts: list[_Point], crops: list[dict], gt: str | None) -> str:
    """Overlay in original pixels (viewBox = the original image), scaled to the thumbnail's size."""
    k = max(W / tw, H / th)  # original pixels per screen pixel
    sw = f'stroke-width="{_num(2 * k)}"'
    parts = [f'<svg class="ov" viewBox="0 0 {W} {H}" width="{tw}" height="{th}" preserveAspectRatio="none">']
    box = parse_box(gt) if isinstance(gt, str) else None
    gpt = parse_point(gt) if isinstance(gt, str) and box is None else None
    if box is not None:
        x1, y1, x2, y2 = box
        parts.append(f'<rect class="gt" x="{_num(x1)}" y="{_num(y1)}" width="{_num(max(x2 + 1 - x1, 0))}" '
                     f'height="{_num(max(y2 + 1 - y1, 0))}" fill="none" stroke="{C_GT}" {sw}><title>GT box '
                     f'{_e(gt)}</title></rect>')
    elif gpt is not None:
        cx, cy = gpt[0] + 0.5, gpt[1] + 0.5
        r = 7 * k
        parts.append(f'<g class="gt" stroke="{C_GT}" {sw}><title>GT point {_e(gt)}</title>'
                     f'<line x1="{_num(cx - r)}" y1="{_num(cy)}" x2="{_num(cx + r)}" y2="{_num(cy)}"/>'
                     f'<line x1="{_num(cx)}" y1="{_num(cy - r)}" x2="{_num(cx)}" y2="{_num(cy + r)}"/></g>')
    for i, c in enumerate(crops, 1):
        win = _crop_window(c)
        if win is None:
            continue
        left, top, right, bottom = win
        parts.append(f'<g class="crop"><title>crop {i}: window {_fmt_xy(c["window_original"])}</title>'
                     f'<rect x="{_num(left)}" y="{_num(top)}" width="{_num(right - left)}" '
                     f'height="{_num(bottom - top)}" fill="none" stroke="{C_CROP}" {sw} '
                     f'stroke-dasharray="{_num(6 * k)} {_num(4 * k)}"/>'
                     f'<text x="{_num(left + 3 * k)}" y="{_num(top + 13 * k)}" font-size="{_num(12 * k)}" '
                     f'fill="{C_CROP}">crop {i}</text>')
        f = _frame(c.get("frame"))
        if f is not None and c.get("point") is not None:
            try:
                X, Y = f.to_original(c["point"], exact=True, check=False)
                parts.append(f'<circle cx="{_num(X + 0.5)}" cy="{_num(Y + 0.5)}" r="{_num(3 * k)}" fill="{C_CROP}"/>')
            except (ValueError, TypeError):
                pass
        parts.append("</g>")
    labels: dict[tuple[int, int], list[str]] = defaultdict(list)  # points drawn on one screen pixel share a label
    for p in pts:
        if p.xy is not None:
            labels[(round((p.xy[0] + 0.5) / k), round((p.xy[1] + 0.5) / k))].append(str(p.n))
    for p in sorted((p for p in pts if p.xy is not None), key=lambda p: p.in_answer):  # answer rings on top
        X, Y = p.xy[0] + 0.5, p.xy[1] + 0.5
        tip = f"point {p.n} (turn {p.turn + 1}{', answer' if p.in_answer else ''}): {p.text} → original {_fmt_xy(p.xy)}"
        if p.in_answer:
            mark = (f'<circle cx="{_num(X)}" cy="{_num(Y)}" r="{_num(8 * k)}" fill="none" stroke="{C_ANSWER}" '
                    f'stroke-width="{_num(3 * k)}"/><circle cx="{_num(X)}" cy="{_num(Y)}" r="{_num(2 * k)}" '
                    f'fill="{C_ANSWER}"/>')
        else:
            mark = (f'<circle cx="{_num(X)}" cy="{_num(Y)}" r="{_num(5 * k)}" fill="{C_POINT}" stroke="#ffffff" '
                    f'stroke-width="{_num(1.5 * k)}"/>')
        same = labels.pop((round(X / k), round(Y / k)), None)
        lx, ly, anchor = X + 9 * k, (Y - 6 * k if Y > 16 * k else Y + 18 * k), "start"  # keep labels on the image
        if same is not None and X + (9 + 8 * len(",".join(same))) * k > W:
            lx, anchor = X - 9 * k, "end"
        label = "" if same is None else (
            f'<text x="{_num(lx)}" y="{_num(ly)}" text-anchor="{anchor}" font-size="{_num(13 * k)}" font-weight="bold" '
            f'fill="{C_ANSWER if p.in_answer else C_POINT}" stroke="#ffffff" stroke-width="{_num(3 * k)}" '
            f'paint-order="stroke">{",".join(same)}</text>')
        parts.append(f'<g class="point{" ans" if p.in_answer else ""}"><title>{_e(tip)}</title>{mark}{label}</g>')
    parts.append("</svg>")
    return "".join(parts)


_SLUG_RE = re.compile(r"[^A-Za-z0-9_.-]+")


def card_id(bench: str, key: str) -> str:
    """The HTML id of a record's card: ``s-<bench>-<id>-<draw>`` with anything but ``[A-Za-z0-9_.-]`` as ``_``."""
    return "s-" + _SLUG_RE.sub("_", f"{bench}-{key}").strip("_")


def _card(r: dict, group: str, images: _Images, extra_roots: list[Path], used: set[str],
          stats: ViewStats) -> str:
    rid = r.get("id", "?")
    key = str(r.get("key") or f"{rid}#{r.get('draw', 0)}")
    cid = base = card_id(group, key.replace("#", "-"))
    i = 1
    while cid in used:
        i += 1
        cid = f"{base}_{i}"
    used.add(cid)
    score, correct, fails = _score(r), _is_correct(r), _failures(r)
    frame = _frame(r.get("frame"))

    # image + overlay
    path = images.resolve(r.get("image"), extra_roots)
    th = images.thumb(path) if path is not None else None
    note = ""
    if th is not None:
        cls, (tw, tht), (iw, ih) = th
        if frame is None:
            frame = Frame.identity(iw, ih)
        elif frame.original_size != (iw, ih):
            note = (f'<div class="warn">image is {iw}x{ih} but the record\'s frame says '
                    f'{frame.original_size[0]}x{frame.original_size[1]}: overlay stretched</div>')
        W, H = frame.original_size
        bg = f'<div class="thumb {cls}" style="width:{tw}px;height:{tht}px" role="img" aria-label="{_e(path.name)}">'
    else:
        if r.get("image"):
            stats.missing_images += 1
            if len(stats.missing_examples) < 5:
                stats.missing_examples.append(str(r["image"]))
        else:
            stats.no_image += 1
        W, H = frame.original_size if frame is not None else (4, 3)
        s = min(THUMB_MAX / W, 360 / H, 1.0) if frame is not None else 1.0
        tw, tht = (max(int(W * s), 120), max(int(H * s), 90)) if frame is not None else (320, 240)
        why = "no image recorded" if not r.get("image") else (
            f"image not found: {r.get('image')}" if path is None else f"unreadable image: {path}")
        bg = (f'<div class="thumb missing" style="width:{tw}px;height:{tht}px" role="img" aria-label="missing image">'
              f'<span>{_e(why)}</span>')
    per_turn, pts = _turn_points(r, frame)
    crops = [c for c in (r.get("crops") or []) if isinstance(c, dict)]
    overlay = _svg(W, H, tw, tht, pts, crops, r.get("gt")) if (th is not None or frame is not None) else ""
    img_html = f'{bg}{overlay}</div>{note}' + (_crop_views(th[0], (W, H), crops) if th is not None else "")

    # text
    status = "correct" if correct else "wrong"
    badge = (f'<span class="badge {status}">{"correct" if correct else ("partial" if score > 0 else "wrong")} '
             f'{_num(score)}</span>')
    fail_html = "".join(f'<span class="badge fail">{_e(f)}</span>' for f in fails)
    question = str(r.get("question") or "").replace("<image>", "").strip()
    pred = r.get("pred", r.get("answer"))
    rows = [("question", f'<pre class="q">{_e(question)}</pre>'),
            ("ground truth", f"<code>{_e(r.get('gt'))}</code>"),
            ("answer", (f"<code>{_e(pred)}</code>" if pred is not None else '<span class="none">(none)</span>')
                       + (f' → original <code>{_e(_fmt_xy(r["pred_original"]))}</code>'
                          if isinstance(r.get("pred_original"), list) and len(r["pred_original"]) == 2 else "")),
            ]
    judged = (r.get("judge") or {}).get("pred") if isinstance(r.get("judge"), dict) else None
    if judged is not None and judged != r.get("pred"):
        rows.append(("judged as", f"<code>{_e(judged)}</code>"))
    meta = []
    for k in ("split", "turns", "finish", "tokens"):
        if r.get(k) is not None:
            meta.append(f"{k} <b>{_e(r[k])}</b>")
    meta.append(f"crops <b>{len(crops)}</b>")
    if r.get("crop_hit") is not None:
        meta.append(f"crop hit <b>{'yes' if r['crop_hit'] else 'no'}</b>")
    if frame is not None:
        meta.append(f"shown {frame.size[0]}x{frame.size[1]} of {frame.original_size[0]}x{frame.original_size[1]}")
    rows.append(("", '<span class="meta">' + " · ".join(meta) + "</span>"))
    if r.get("error"):
        rows.append(("error", f'<code class="err">{_e(r["error"])}</code>'))
    table = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    turns = "".join(f'<div class="turn"><div class="tn">turn {t + 1}</div>'
                    f'<pre>{_turn_html(str(text), per_turn[t])}</pre></div>'
                    for t, text in enumerate(r.get("turn_texts") or []))
    if not turns:
        turns = '<div class="turn"><pre class="none">(no model text recorded)</pre></div>'
    unmapped = sum(1 for p in pts if p.xy is None)
    if unmapped:
        turns += f'<div class="warn">{unmapped} point(s) not drawn: no frame recorded for this sample</div>'
    return (f'<article class="card {status}" id="{_e(cid)}" data-key="{_e(key)}" data-bench="{_e(group)}" '
            f'data-status="{status}" data-failure="{_e(r.get("failure") or "")}" '
            f'data-failures="{_e(" ".join(fails))}" data-score="{_e(_num(score))}" data-points="{len(pts)}">'
            f'<header><span class="sid">{_e(rid)}</span><span class="draw">draw {_e(r.get("draw", 0))}</span>'
            f'<span class="bn">{_e(group)}</span>{badge}{fail_html}</header>'
            f'<div class="body"><div class="imgcol">{img_html}</div>'
            f'<div class="txt"><table>{table}</table><details open><summary>model text '
            f'({len(r.get("turn_texts") or [])} turn(s), {len(pts)} point(s))</summary>{turns}</details></div>'
            f'</div></article>')


# --------------------------------------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------------------------------------

_CSS = """
*{box-sizing:border-box}body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:0;background:#f4f5f7;
color:#1d1f23}h1{font-size:20px;margin:0 0 4px}.top{background:#fff;padding:14px 20px;border-bottom:1px solid #ddd;
position:sticky;top:0;z-index:5}.sums{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}.sum{background:#f8f9fb;
border:1px solid #e1e3e8;border-radius:6px;padding:6px 10px;min-width:220px}.sum h2{font-size:15px;margin:0 0 2px}
.sum .acc{font-size:18px;font-weight:600}.chips{margin-top:3px}.chip{display:inline-block;background:#eef0f4;
border-radius:10px;padding:0 7px;margin:2px 3px 0 0;font-size:12px}.filters{display:flex;gap:16px;flex-wrap:wrap;
align-items:center}.filters label{white-space:nowrap}.legend span{margin-right:12px;font-size:12px}
.legend i{display:inline-block;width:14px;height:10px;margin-right:4px;vertical-align:middle;border:2px solid}
main{padding:14px 20px}.card{background:#fff;border:1px solid #dcdfe4;border-left:6px solid #aaa;border-radius:6px;
margin:0 0 14px;padding:10px 12px}.card.correct{border-left-color:#2e7d32}.card.wrong{border-left-color:#c62828}
.card header{display:flex;gap:10px;align-items:center;flex-wrap:wrap;margin-bottom:8px}.sid{font-weight:600;
font-family:ui-monospace,monospace}.draw,.bn{color:#667;font-size:12px}.badge{border-radius:4px;padding:1px 7px;
font-size:12px;font-weight:600}.badge.correct{background:#e3f1e4;color:#1b5e20}.badge.wrong{background:#fbe4e4;
color:#8e1c1c}.badge.fail{background:#fff1d6;color:#7a4a00}.body{display:flex;gap:14px;flex-wrap:wrap}
.imgcol{flex:none}.crops{display:flex;flex-wrap:wrap;gap:6px;margin-top:6px}.cropv{margin:0}.cropv div{background-repeat:no-repeat;border:1px dashed #2962ff}.cropv figcaption{font-size:11px;color:#555}.thumb{position:relative;background-size:100% 100%;background-repeat:no-repeat;
border:1px solid #ccc}.thumb .ov{position:absolute;left:0;top:0;overflow:hidden}.thumb.missing{background:
repeating-linear-gradient(45deg,#e4e4e4,#e4e4e4 10px,#d6d6d6 10px,#d6d6d6 20px)}.thumb.missing span{position:absolute;
left:6px;bottom:6px;right:6px;font-size:12px;color:#444;background:#ffffffd0;padding:2px 4px;word-break:break-all}
.txt{flex:1;min-width:320px}table{border-collapse:collapse;width:100%}th{text-align:left;vertical-align:top;
color:#667;font-weight:500;padding:2px 8px 2px 0;white-space:nowrap;width:1%}td{padding:2px 0}pre{white-space:
pre-wrap;word-break:break-word;margin:0;font:12.5px/1.45 ui-monospace,SFMono-Regular,Menlo,monospace}pre.q{
font-family:inherit;font-size:13px}.turn{border-top:1px dashed #e0e0e0;padding:5px 0}.tn{font-size:11px;color:#889}
.pt{background:#ffe3e8;border-radius:3px;padding:0 2px}.pt.ans{background:#f6dcff}.pt sup{color:#b0002a;
font-weight:700;margin-right:1px}.meta{color:#556;font-size:12px}.warn{color:#8a5a00;font-size:12px}
.err{color:#a00}summary{cursor:pointer;color:#445;font-size:12px;margin-top:6px}.none{color:#999}
[hidden]{display:none!important}
"""

_JS = """
(function(){
  var cards=[].slice.call(document.querySelectorAll('article.card'));
  var f=document.getElementById('filters'), count=document.getElementById('count');
  function val(n){return f.elements[n]}
  function apply(){
    var showC=val('correct').checked, showW=val('wrong').checked, fk=val('failure').value, b=val('bench').value, n=0;
    cards.forEach(function(c){
      var fs=' '+c.getAttribute('data-failures')+' ';
      var ok=(c.getAttribute('data-status')==='correct'?showC:showW)
        &&(fk==='*'||(fk==='-'?fs.trim()==='':fk==='+'?fs.trim()!=='':fs.indexOf(' '+fk+' ')>=0))
        &&(b==='*'||c.getAttribute('data-bench')===b);
      c.hidden=!ok; if(ok)n++;
    });
    count.textContent=n;
  }
  function fromHash(){
    var h=decodeURIComponent(location.hash.replace(/^#/,''));
    h.split('&').forEach(function(kv){
      var i=kv.indexOf('='); if(i<0)return; var k=kv.slice(0,i), v=kv.slice(i+1);
      if(k==='status'){val('correct').checked=(v==='correct'||v==='all');val('wrong').checked=(v==='wrong'||v==='all');}
      if(k==='failure'||k==='bench'){
        var s=val(k); for(var j=0;j<s.options.length;j++){if(s.options[j].value===v)s.value=v;}
      }
    });
  }
  f.addEventListener('change',apply);
  window.addEventListener('hashchange',function(){fromHash();apply();});
  fromHash(); apply();
})();
"""


def _header(groups_html: str, kinds: list[str], benches: list[str], title: str, total: int) -> str:
    fopts = "".join(f'<option value="{_e(k)}">{_e(k)}</option>' for k in kinds)
    bopts = "".join(f'<option value="{_e(b)}">{_e(b)}</option>' for b in benches)
    return (f'<div class="top"><h1>{_e(title)}</h1><div class="sums">{groups_html}</div>'
            f'<form id="filters" class="filters" onsubmit="return false">'
            f'<label><input type="checkbox" name="correct" checked> correct</label>'
            f'<label><input type="checkbox" name="wrong" checked> wrong</label>'
            f'<label>failure <select name="failure"><option value="*">any</option><option value="-">none</option>'
            f'<option value="+">some failure</option>{fopts}</select></label>'
            f'<label>benchmark <select name="bench"><option value="*">all</option>{bopts}</select></label>'
            f'<span>showing <b id="count">{total}</b> of {total}</span>'
            f'<span class="legend"><span><i style="border-color:{C_GT}"></i>GT</span>'
            f'<span><i style="border-color:{C_CROP};border-style:dashed"></i>crop window</span>'
            f'<span><i style="border-color:{C_POINT};background:{C_POINT};border-radius:50%;width:10px"></i>'
            f'point in text</span><span><i style="border-color:{C_ANSWER};border-radius:50%;width:12px"></i>'
            f'answer point</span></span></form></div>')


def render_view(path: str | Path, data_root: str | Path | None = None, limit: int | None = None,
                only: str | None = None) -> tuple[str, ViewStats]:
    """The page for ``path`` as a string, with counts. See :func:`write_view`."""
    if only is not None and only not in ONLY:
        raise DataError(f"--only must be one of {', '.join(ONLY)}, got {only!r}")
    if limit is not None and limit < 0:
        raise DataError(f"--limit must be >= 0, got {limit}")
    path = Path(path)
    groups = find_groups(path)
    strict = data_root is not None
    roots = [Path(data_root)] if strict else _default_roots(path, groups)
    images = _Images(roots, strict)
    stats = ViewStats(groups=len(groups), roots=[str(r) for r in roots])
    used: set[str] = set()
    sums, cards, kinds, models = [], [], Counter(), set()
    for g in groups:
        res = read_json_or_jsonl(g.samples)
        recs = [r for _, r in res.records]
        stats.records += len(recs)
        stats.unreadable_lines += len(res.errors)
        st = group_stats(recs)
        kinds.update(st["failure_counts"])
        if g.summary and g.summary.get("model"):
            models.add(str(g.summary["model"]))
        keep = [r for r in recs if _keep(r, only)]
        if limit is not None:
            keep = keep[:limit]
        extra = [g.samples.parent]
        gcards = [_card(r, g.name, images, extra, used, stats) for r in keep]
        stats.shown += len(gcards)
        cards.extend(gcards)
        chips = "".join(f'<span class="chip">{_e(k)} {v}</span>' for k, v in st["failure_counts"].items()) or \
            '<span class="chip">no failures</span>'
        extra_notes = []
        if res.errors:
            extra_notes.append(f"{len(res.errors)} unreadable line(s)")
        if g.summary and g.summary.get("load_errors"):
            extra_notes.append(f"{len(g.summary['load_errors'])} data load error(s)")
        sums.append(f'<div class="sum" data-bench="{_e(g.name)}"><h2>{_e(g.name)}</h2>'
                    f'<div><span class="acc">{100 * st["accuracy"]:.1f}%</span> accuracy · n {st["n"]} · '
                    f'{st["draws"]} record(s) · {st["correct"]} correct · {st["failed"]} failed</div>'
                    f'<div class="meta">showing {len(gcards)}{" (" + only + ")" if only else ""}'
                    f'{" · " + " · ".join(extra_notes) if extra_notes else ""}</div>'
                    f'<div class="chips">{chips}</div></div>')
    title = f"vigorl view: {path.name or path}" + (f" ({', '.join(sorted(models))})" if models else "")
    body = "".join(cards) or '<p class="none">no records to show</p>'
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><title>{_e(title)}</title>'
            f'<style>{_CSS}{"".join(images.css)}</style></head><body>'
            f'{_header("".join(sums), list(kinds), [g.name for g in groups], title, stats.shown)}'
            f'<main id="cards">{body}</main><script>{_JS}</script></body></html>\n')
    return page, stats


def default_out(path: str | Path) -> Path:
    """``DIR/view.html`` for a folder, ``<folder of the file>/view.html`` for a records file."""
    p = Path(path)
    return (p if p.is_dir() else p.parent) / "view.html"


def write_view(dir: str | Path, out: str | Path | None = None, data_root: str | Path | None = None,
               limit: int | None = None, only: str | None = None) -> Path:
    """Write the HTML page for an eval (or rollout) folder and return its path.

    ``out``: the page (default :func:`default_out`). ``data_root``: where record ``image`` paths are relative to
    (default: a recorded ``data_root``, the demo root for demo benchmarks, ``dir``, its parent, the working
    directory); missing images become placeholders. ``limit``: records per benchmark (after ``only``). ``only``:
    ``correct`` | ``wrong`` | ``failed``.
    """
    return write_view_stats(dir, out, data_root, limit, only)[0]


def write_view_stats(dir: str | Path, out: str | Path | None = None, data_root: str | Path | None = None,
                     limit: int | None = None, only: str | None = None) -> tuple[Path, ViewStats]:
    """:func:`write_view`, also returning the :class:`ViewStats` (for the command's report)."""
    page, stats = render_view(dir, data_root=data_root, limit=limit, only=only)
    stats.bytes = len(page.encode("utf-8"))
    target = Path(out) if out is not None else default_out(dir)
    atomic_write_text(target, page)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(target, 0o666 & ~umask)  # a page to share, not a 0600 temporary file
    return target, stats
