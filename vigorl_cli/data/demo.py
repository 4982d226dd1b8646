"""Bundled synthetic data: four small tasks drawn with Pillow, in the released formats and ``$DATA_ROOT`` layout.

``generate_demo(out_dir)`` makes ``out_dir`` look like a tiny ``$DATA_ROOT`` (reference §3.2), so every later command
(MCTS, linearize, SFT, GRPO, eval) runs on it exactly as on the real data, only with a tiny model:

=================  ===========================================================  ===================================
task               files (relative to ``out_dir``)                              ground truth
=================  ===========================================================  ===================================
visual search      ``visual_search/vigorl_search_MCTS.jsonl`` (llava),          option text (colour, shape,
(V*-like)          ``visual_search/vigorl_SA_RL.jsonl`` (rl),                   ``left`` / ``right``)
                   ``visual_search/vstar/vstarbench_test{,_RL}.jsonl``
spatial            ``spatial_reasoning/vigorl_sat2_MCTS.jsonl``,                lower-case option text
(SAT-2 / BLINK)    ``spatial_reasoning/vigorl_sat2_{train,val}_RL.jsonl``,
                   ``spatial_reasoning/sat2_test/sat2_test.jsonl``,
                   ``spatial_reasoning/blink/blink_validation.jsonl``
GUI grounding      ``web_grounding/vigorl_osatlas_MCTS.jsonl``,                 ``"(x1, y1, x2, y2)"`` integer
(OS-ATLAS /        ``web_grounding/vigorl_osatlas_{train,val}_RL.jsonl``,       pixels of the stored image
ScreenSpot)        ``web_grounding/ScreenSpot-{V2,Pro}/screenspot_*_test.jsonl``
web action (VWA)   ``web_action/vigorl_web_action_MCTS.jsonl``,                 ``click [12]``, ``type [3] [blue
                   ``web_action/vigorl_ical_{train,val}_RL.jsonl``              shoes]``, ``scroll [down]``
=================  ===========================================================  ===================================

plus single-turn SFT chains (sharegpt, reference §2.1) built from the MCTS-input samples of the first three tasks:
``{spatial_reasoning,web_grounding}/MCTS_72b_reasoning_chains_{train,val}.json`` and
``visual_search/MCTS_72b_reasoning_chains_train.json``. Every ``(x, y)`` in a chain is the centre of an object that is
really drawn in the image; some chains are "corrected" chains (a wrong grounded attempt, ``Wait, this seems off. Let's
try something else.``, then the right one), as the linearizer makes them.

``n_per_task`` images are drawn per task and shared out between that task's files (every file gets at least one); the
V* test set is written twice (llava and rl), the SFT chains reuse the MCTS images. One RNG per task, seeded from
``seed``, drives everything, so the same seed gives byte-identical files. ``demo_manifest.json`` is written last; a
second call with the same seed, size and version returns it without drawing anything.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import struct
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from vigorl_cli.data.formats import SFTRecord, write_samples, write_sft
from vigorl_cli.data.io import atomic_write_json
from vigorl_cli.data.schema import IMAGE_TOKEN, Sample, infer_target, infer_task, parse_choices

DEMO_VERSION = 1
MANIFEST_NAME = "demo_manifest.json"
MIN_PER_TASK = 6  # spatial and GUI grounding have five sample files each, every one gets at least one sample, and
# their MCTS file at least two (so the SFT chains split into a non-empty train and a non-empty val file)

# Placeholder until the prompts module lands; a later step swaps in the per-task SFT system prompts (reference §2.1).
DEMO_SFT_SYSTEM = ("A conversation between User and Assistant. The User asks a question about an image, and the "
                   "Assistant reasons step by step inside <think> </think>, grounding every step to an (x, y) point in "
                   "the image, then gives the final answer inside <answer> </answer>.")

CORRECTION = "\nWait, this seems off. Let's try something else.\n"  # the linearizer's corrected-chain joint (§2.1)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 200), "yellow": (240, 200, 20),
    "purple": (148, 83, 189), "orange": (255, 127, 14), "pink": (240, 110, 190), "brown": (140, 86, 55),
    "black": (25, 25, 25), "white": (248, 248, 248),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon")

Box = tuple[int, int, int, int]


# -- small drawing helpers ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@functools.lru_cache(maxsize=None)
def _text_w(text: str, size: int) -> int:
    return int(math.ceil(_font(size).getlength(text)))


@functools.lru_cache(maxsize=4096)
def _text_mask(text: str, size: int) -> Image.Image:
    """``text`` rendered once as an L mask: labels repeat a lot (SoM numbers, buttons) and rendering is slow."""
    _, _, r, b = _font(size).getbbox(text)
    mask = Image.new("L", (max(1, int(r)), max(1, int(b))))
    ImageDraw.Draw(mask).text((0, 0), text, font=_font(size), fill=255)
    return mask


def _text(d: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int, fill) -> None:
    d.bitmap(xy, _text_mask(text, size), fill=fill)


def _center(b: Box) -> tuple[int, int]:
    return (b[0] + b[2]) // 2, (b[1] + b[3]) // 2


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _pt(p: tuple[int, int]) -> str:
    return f"({p[0]}, {p[1]})"


def _box_str(b: Box) -> str:
    return f"({b[0]}, {b[1]}, {b[2]}, {b[3]})"


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, b: Box, fill, outline=(30, 30, 30)) -> None:
    x1, y1, x2, y2 = b
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rx, ry = (x2 - x1) / 2, (y2 - y1) / 2
    if shape == "circle":
        d.ellipse(b, fill=fill, outline=outline)
    elif shape == "square":
        d.rectangle(b, fill=fill, outline=outline)
    elif shape == "triangle":
        d.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill, outline=outline)
    elif shape == "diamond":
        d.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill, outline=outline)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * rx * math.cos(a), cy + r * ry * math.sin(a)))
        d.polygon(pts, fill=fill, outline=outline)
    elif shape == "cross":
        tx, ty = rx / 3, ry / 3
        d.polygon([(cx - tx, y1), (cx + tx, y1), (cx + tx, cy - ty), (x2, cy - ty), (x2, cy + ty), (cx + tx, cy + ty),
                   (cx + tx, y2), (cx - tx, y2), (cx - tx, cy + ty), (x1, cy + ty), (x1, cy - ty), (cx - tx, cy - ty)],
                  fill=fill, outline=outline)
    elif shape == "hexagon":
        d.polygon([(cx + rx * math.cos(k * math.pi / 3), cy + ry * math.sin(k * math.pi / 3)) for k in range(6)],
                  fill=fill, outline=outline)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _choices_block(options: list[str]) -> str:
    return "Answer Choices:\n" + "\n".join(f"{chr(65 + i)}. {o}" for i, o in enumerate(options))


def _sample(sid: str, image: str, question: str, answer: str, meta: dict | None = None) -> Sample:
    """A Sample whose derived fields are exactly what the readers will derive from the written record."""
    choices = parse_choices(question)
    target = infer_target(answer)
    return Sample(id=sid, images=[image], question=question, answer=answer, choices=choices, target=target,
                  task=infer_task(answer, choices, target), meta=dict(meta or {}))


def _chain(steps: list[str], answer: str, wrong: list[str] | None = None) -> str:
    """Assistant text as the single-turn linearizer writes it (sentences joined with one space)."""
    think = " ".join(steps)
    if wrong:
        think = " ".join(wrong) + CORRECTION + think
    return f"<think>\n{think}\n</think>\n<answer> {answer} </answer>"


@dataclass
class _Item:
    sample: Sample
    image: Image.Image
    chains: list[str] = field(default_factory=list)


def _grid_slots(rng: random.Random, w: int, h: int, cell: int, margin: int) -> list[tuple[int, int, int, int]]:
    """Shuffled non-overlapping cells ``(x1, y1, x2, y2)`` covering the canvas (objects go inside one cell each)."""
    cells = [(x, y, x + cell, y + cell) for y in range(margin, h - margin - cell + 1, cell)
             for x in range(margin, w - margin - cell + 1, cell)]
    rng.shuffle(cells)
    return cells


def _place_in(rng: random.Random, cell: Box, size: int) -> Box:
    x = rng.randint(cell[0] + 2, cell[2] - size - 2)
    y = rng.randint(cell[1] + 2, cell[3] - size - 2)
    return (x, y, x + size, y + size)


# -- visual search (V*-like) ---------------------------------------------------------------------------------------

def _vs_item(rng: random.Random, sid: str, image: str, category: str) -> _Item:
    w, h = rng.choice([(640, 480), (600, 480), (640, 448)])
    img = Image.new("RGB", (w, h), tuple(rng.randint(150, 205) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(6, 10)):  # large muted regions: the "scene"
        x, y = rng.randint(-80, w - 40), rng.randint(-80, h - 40)
        box = (x, y, x + rng.randint(120, 320), y + rng.randint(80, 240))
        col = tuple(rng.randint(120, 215) for _ in range(3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=col)
    cells = _grid_slots(rng, w, h, 32, 8)
    color_names = list(COLORS)

    if category == "relative_position":
        s1, s2 = rng.sample(SHAPES, 2)
        c1, c2 = rng.sample(color_names, 2)
        while True:  # two targets at least 80 px apart horizontally
            a, b = cells.pop(), cells.pop()
            if abs(a[0] - b[0]) >= 80:
                break
            cells.insert(0, a)
            cells.insert(0, b)
        ta, tb = _place_in(rng, a, rng.randint(12, 16)), _place_in(rng, b, rng.randint(12, 16))
        targets = [(s1, c1, ta), (s2, c2, tb)]
        banned_shapes, banned_colors = {s1, s2}, set()
        answer = "left" if _center(ta)[0] < _center(tb)[0] else "right"
        options = ["left", "right"]
        rng.shuffle(options)
        question = f"Is the {c1} {s1} on the left or right side of the {c2} {s2}?"
    else:
        s, c = rng.choice(SHAPES), rng.choice(color_names)
        t = _place_in(rng, cells.pop(), rng.randint(12, 16))
        targets = [(s, c, t)]
        if rng.random() < 0.7:  # colour question: the target is the only object of its shape
            banned_shapes, banned_colors = {s}, set()
            answer, pool = c, [x for x in color_names if x != c]
            question = f"What is the color of the {s}?"
        else:  # shape question: the target is the only object of its colour
            banned_shapes, banned_colors = set(), {c}
            answer, pool = s, [x for x in SHAPES if x != s]
            question = f"What is the shape of the {c} object?"
        options = [answer] + rng.sample(pool, 3)
        rng.shuffle(options)

    distractors = []
    for cell in cells[:rng.randint(45, 75)]:
        ds = rng.choice([x for x in SHAPES if x not in banned_shapes])
        dc = rng.choice([x for x in color_names if x not in banned_colors])
        box = _place_in(rng, cell, rng.randint(9, 20))
        _draw_shape(d, ds, box, COLORS[dc])
        distractors.append((ds, dc, box))
    for ts, tc, tbox in targets:
        _draw_shape(d, ts, tbox, COLORS[tc])

    text = f"{IMAGE_TOKEN}\n{question}\n{_choices_block(options)}"
    sample = _sample(sid, image, text, answer, {"split": category})

    ds, dc, dbox = distractors[0]
    scan = f"The image is cluttered with many small shapes, for example {_a(dc)} {ds} at {_pt(_center(dbox))}."
    if category == "relative_position":
        (s1, c1, ta), (s2, c2, tb) = targets
        pa, pb = _center(ta), _center(tb)
        steps = [scan, f"Searching for the {c1} {s1}, I find it at {_pt(pa)}.",
                 f"The {c2} {s2} is at {_pt(pb)}.",
                 f"Comparing x coordinates, the {c1} {s1} at {_pt(pa)} is on the {answer} side of the {c2} {s2}."]
        wrong = [scan, f"The {dc} {ds} at {_pt(_center(dbox))} might be the {c1} {s1}."]
    else:
        ts, tc, tbox = targets[0]
        p = _center(tbox)
        name = ts if answer == tc else f"{tc} object"
        steps = [scan, f"Looking closely for the {name}, I find a small {tc} {ts} at {_pt(p)}.",
                 f"The object at {_pt(p)} is {_a(tc)} {ts}, so the answer is {answer}."]
        wrong = [scan, f"The {dc} {ds} at {_pt(_center(dbox))} could be the {name}."]
    chains = [_chain(steps, answer)]
    if rng.random() < 0.35:
        chains.append(_chain(steps, answer, wrong))
    return _Item(sample, img, chains)


# -- spatial relations (SAT-2 / BLINK-like) -----------------------------------------------------------------------

_NOUNS = {"box": "square", "ball": "circle", "cone": "triangle", "star": "star", "gem": "diamond"}


def _spatial_scene(rng: random.Random, kind: str):
    w, h = rng.choice([(480, 360), (448, 336), (512, 384)])
    horizon = int(h * rng.uniform(0.36, 0.46))
    img = Image.new("RGB", (w, h), tuple(rng.randint(170, 225) for _ in range(3)))
    d = ImageDraw.Draw(img)
    d.rectangle((0, horizon, w, h), fill=tuple(rng.randint(110, 170) for _ in range(3)))
    for _ in range(rng.randint(1, 3)):  # neutral furniture: clutter that is not asked about
        x = rng.randint(0, w - 60)
        fw, fh = rng.randint(40, 90), rng.randint(30, 70)
        d.rectangle((x, horizon - fh + 10, x + fw, horizon + 10), fill=tuple(rng.randint(90, 140) for _ in range(3)))
    (n1, n2), (c1, c2) = rng.sample(list(_NOUNS), 2), rng.sample([c for c in COLORS if c != "white"], 2)

    def floor_box(x: int, base: int) -> Box:
        t = (base - horizon) / (h - horizon)
        size = int(18 + 46 * t)
        return (x - size // 2, base - size, x - size // 2 + size, base)

    for _ in range(200):
        if kind == "above_below":
            s1, s2 = rng.randint(22, 40), rng.randint(22, 40)
            x1, x2 = rng.randint(30, w - 70), rng.randint(30, w - 70)
            y1, y2 = rng.randint(10, h - s1 - 10), rng.randint(10, h - s2 - 10)
            b1, b2 = (x1, y1, x1 + s1, y1 + s1), (x2, y2, x2 + s2, y2 + s2)
            ok = abs(_center(b1)[1] - _center(b2)[1]) >= 60
        else:
            base1, base2 = rng.randint(horizon + 30, h - 8), rng.randint(horizon + 30, h - 8)
            b1, b2 = floor_box(rng.randint(45, w - 45), base1), floor_box(rng.randint(45, w - 45), base2)
            dx = abs(_center(b1)[0] - _center(b2)[0])
            ok = dx >= 70 if kind == "left_right" else (abs(base1 - base2) >= 45 and dx >= 40)
        disjoint = b1[2] < b2[0] or b2[2] < b1[0] or b1[3] < b2[1] or b2[3] < b1[1]
        if ok and disjoint and all(0 <= v for v in (*b1, *b2)) and max(b1[2], b2[2]) < w and max(b1[3], b2[3]) < h:
            break
    else:  # pragma: no cover - the constraints above are always satisfiable on these canvas sizes
        raise RuntimeError("could not place two objects")
    for nm, col, b in sorted([(n1, c1, b1), (n2, c2, b2)], key=lambda o: o[2][3]):  # far objects first
        if kind != "above_below":
            d.ellipse((b[0] - 2, b[3] - 4, b[2] + 2, b[3] + 4), fill=(70, 70, 70))
        _draw_shape(d, _NOUNS[nm], b, COLORS[col])
    return img, (f"{c1} {n1}", b1), (f"{c2} {n2}", b2)


def _spatial_item(rng: random.Random, sid: str, image: str, kind: str, style: str) -> _Item:
    """``kind``: left_right | above_below | depth; ``style``: sat (which-of questions) or blink (yes/no relations)."""
    img, (a, ba), (b, bb) = _spatial_scene(rng, kind)
    pa, pb = _center(ba), _center(bb)
    if kind == "left_right":
        rel = "left" if pa[0] < pb[0] else "right"
        cmp = "smaller" if rel == "left" else "larger"
        reason = f"the {a} at {_pt(pa)} has a {cmp} x coordinate than the {b} at {_pt(pb)}"
    elif kind == "above_below":
        rel = "above" if pa[1] < pb[1] else "below"
        cmp = "higher" if rel == "above" else "lower"
        reason = f"the {a} at {_pt(pa)} is {cmp} in the image than the {b} at {_pt(pb)}"
    else:
        rel = "closer" if ba[3] > bb[3] else "further"
        near = a if rel == "closer" else b
        reason = (f"the {near} at {_pt(pa if near == a else pb)} sits lower on the floor and looks larger, so it is "
                  "nearer the camera")
    if style == "blink":
        if kind == "depth":
            question = f"Which object is closer to the camera, the {a} or the {b}?"
            answer = a if rel == "closer" else b
            options = [a, b]
        else:
            asked = rng.choice(["left", "right"] if kind == "left_right" else ["above", "below"])
            words = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
            question = f"Is the {a} {words[asked]} the {b}?"
            answer, options = ("yes" if asked == rel else "no"), ["yes", "no"]
    else:
        if kind == "left_right":
            question, options = f"Is the {a} to the left or to the right of the {b}?", ["left", "right"]
        elif kind == "above_below":
            question, options = f"Is the {a} above or below the {b}?", ["above", "below"]
        else:
            question = f"Is the {a} closer to the camera or further from it than the {b}?"
            options = ["closer", "further"]
        answer = rel
    rng.shuffle(options)
    text = f"{IMAGE_TOKEN}\nQuestion: {question}\n{_choices_block(options)}"
    sample = _sample(sid, image, text, answer, {"split": kind})
    steps = [f"The {a} is located at {_pt(pa)}.", f"The {b} is located at {_pt(pb)}.",
             f"Comparing the two, {reason}.", f"Therefore, with the {a} at {_pt(pa)}, the answer is {answer}."]
    wrong = [f"The {b} at {_pt(pb)} seems to be the {a}."]
    chains = [_chain(steps, answer)]
    if rng.random() < 0.35:
        chains.append(_chain(steps, answer, wrong))
    return _Item(sample, img, chains)


# -- GUI grounding (OS-ATLAS / ScreenSpot-like) ------------------------------------------------------------------

_BUTTONS = ["Submit", "Cancel", "Save", "Delete", "Sign in", "Log out", "Next", "Back", "Download", "Upload", "Share",
            "Continue", "Apply", "Reset", "Subscribe", "Add to cart", "Checkout", "Send", "Edit profile", "Open"]
_FIELDS = ["Email", "Password", "Username", "First name", "Last name", "Address", "Phone number", "City", "Zip code",
           "Company", "Message", "Search"]
_MENUS = ["File", "Edit", "View", "Insert", "Format", "Tools", "Window", "Help", "Run", "Selection"]
_LINKS = ["Home", "Products", "About", "Contact", "Blog", "Pricing", "Careers", "Support"]
_ITEMS = ["main.py", "README.md", "Layers", "Assets", "Sheet1", "drawing.dwg", "Downloads", "Documents", "Pictures",
          "config.yaml", "results.csv", "Recent"]
_ICONS = ["settings", "search", "home", "menu", "bell", "heart", "star", "trash", "user", "plus", "download"]
_APPS = {"vscode": "Dev", "pycharm": "Dev", "photoshop": "Creative", "blender": "Creative", "excel": "Office",
         "word": "Office", "solidworks": "CAD", "autocad": "CAD", "matlab": "Scientific", "origin": "Scientific",
         "terminal": "OS"}


@dataclass
class _Widget:
    kind: str  # button | field | menu | link | item | icon
    label: str
    box: Box
    ink: tuple[int, int, int] | None = None  # icon colour when the default would not show (dark title bar)


def _draw_icon(d: ImageDraw.ImageDraw, name: str, b: Box, color) -> None:
    x1, y1, x2, y2 = b
    cx, cy = _center(b)
    r = (x2 - x1) // 2 - 3
    if name == "settings":
        for k in range(8):
            a = k * math.pi / 4
            d.line((cx, cy, cx + (r + 1) * math.cos(a), cy + (r + 1) * math.sin(a)), fill=color, width=3)
        d.ellipse((cx - r + 2, cy - r + 2, cx + r - 2, cy + r - 2), fill=color)
        d.ellipse((cx - 2, cy - 2, cx + 2, cy + 2), fill=(255, 255, 255))
    elif name == "search":
        d.ellipse((cx - r, cy - r, cx + r // 3, cy + r // 3), outline=color, width=2)
        d.line((cx + r // 3 - 1, cy + r // 3 - 1, cx + r, cy + r), fill=color, width=3)
    elif name == "home":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx - r, cy)], fill=color)
        d.rectangle((cx - r + 3, cy, cx + r - 3, cy + r), fill=color)
    elif name == "menu":
        for dy in (-r + 2, 0, r - 2):
            d.line((cx - r, cy + dy, cx + r, cy + dy), fill=color, width=2)
    elif name == "bell":
        d.polygon([(cx - r + 2, cy + r - 3), (cx - r + 4, cy - r + 4), (cx + r - 4, cy - r + 4),
                   (cx + r - 2, cy + r - 3)], fill=color)
        d.ellipse((cx - 2, cy + r - 4, cx + 2, cy + r), fill=color)
    elif name == "heart":
        d.ellipse((cx - r, cy - r + 2, cx, cy + 2), fill=color)
        d.ellipse((cx, cy - r + 2, cx + r, cy + 2), fill=color)
        d.polygon([(cx - r, cy - 2), (cx + r, cy - 2), (cx, cy + r)], fill=color)
    elif name == "star":
        _draw_shape(d, "star", (cx - r, cy - r, cx + r, cy + r), color, outline=color)
    elif name == "trash":
        d.rectangle((cx - r + 3, cy - r + 4, cx + r - 3, cy + r), outline=color, width=2)
        d.line((cx - r, cy - r + 2, cx + r, cy - r + 2), fill=color, width=2)
    elif name == "user":
        d.ellipse((cx - r // 2, cy - r, cx + r // 2, cy), fill=color)
        d.pieslice((cx - r, cy + 1, cx + r, cy + 2 * r), 180, 360, fill=color)
    elif name == "plus":
        d.line((cx - r, cy, cx + r, cy), fill=color, width=3)
        d.line((cx, cy - r, cx, cy + r), fill=color, width=3)
    elif name == "download":
        d.line((cx, cy - r, cx, cy + r - 4), fill=color, width=3)
        d.polygon([(cx - r + 2, cy), (cx + r - 2, cy), (cx, cy + r - 2)], fill=color)
    elif name == "close":
        d.line((cx - r, cy - r, cx + r, cy + r), fill=color, width=2)
        d.line((cx - r, cy + r, cx + r, cy - r), fill=color, width=2)


def _draw_widget(d: ImageDraw.ImageDraw, wd: _Widget, fs: int, accent) -> None:
    x1, y1, x2, y2 = wd.box
    ty = (y1 + y2) // 2 - fs // 2 - 1
    if wd.kind == "button":
        d.rounded_rectangle(wd.box, radius=4, fill=accent)
        _text(d, ((x1 + x2 - _text_w(wd.label, fs)) // 2, ty), wd.label, fs, fill=(255, 255, 255))
    elif wd.kind == "field":
        d.rectangle(wd.box, fill=(255, 255, 255), outline=(150, 150, 150))
        _text(d, (x1 + 6, ty), wd.label, fs, fill=(140, 140, 140))
    elif wd.kind in ("menu", "link", "item"):
        _text(d, (x1 + 4, ty), wd.label, fs, fill=accent if wd.kind == "link" else (20, 20, 20))
    elif wd.kind == "icon":
        _draw_icon(d, wd.label, wd.box, wd.ink or (60, 60, 60))


def _flow(rng: random.Random, region: Box, fs: int, buttons: list[str], fields: list[str],
          full_width: bool) -> list[_Widget]:
    """Form rows of text fields and buttons, left to right, wrapping, until the region is full."""
    x0, y0, x1, y1 = region
    out: list[_Widget] = []
    x, y, row_h = x0, y0, 0
    for _ in range(rng.randint(5, 9) if full_width else rng.randint(7, 14)):
        if (rng.random() < 0.5 and fields) or not buttons:
            if not fields:
                break
            label, kind, hgt = fields.pop(), "field", fs + 16
            wdt = (x1 - x0) if full_width else max(_text_w(label, fs) + 40, rng.randint(130, 210))
        else:
            label, kind, hgt = buttons.pop(), "button", fs + 14
            wdt = (x1 - x0) if full_width and rng.random() < 0.5 else _text_w(label, fs) + 26
        if x + wdt > x1:
            x, y, row_h = x0, y + row_h + 14, 0
        if y + hgt > y1 or x + wdt > x1:
            break
        out.append(_Widget(kind, label, (x, y, x + wdt, y + hgt)))
        x, row_h = x + wdt + 14, max(row_h, hgt)
    return out


def _gui_screen(rng: random.Random, platform: str, size: tuple[int, int]) -> tuple[Image.Image, list[_Widget]]:
    """A synthetic screenshot (``platform``: desktop | web | mobile) and its widgets."""
    w, h = size
    fs = 13 if w < 700 else 12
    accent = rng.choice([(31, 90, 200), (44, 140, 60), (170, 50, 50), (120, 70, 170), (20, 120, 140)])
    img = Image.new("RGB", size, rng.choice([(246, 246, 246), (238, 240, 244), (250, 248, 242)]))
    d = ImageDraw.Draw(img)
    buttons, fields = rng.sample(_BUTTONS, len(_BUTTONS)), rng.sample(_FIELDS, len(_FIELDS))
    icons = rng.sample(_ICONS, len(_ICONS))
    ws: list[_Widget] = []
    if platform == "desktop":
        d.rectangle((0, 0, w, 26), fill=(50, 54, 62))
        title = rng.choice(["Untitled - Editor", "Project", "Settings", "Document1"])
        _text(d, (10, 6), title, fs, fill=(230, 230, 230))
        ws.append(_Widget("icon", "close", (w - 26, 2, w - 4, 24), ink=(225, 225, 225)))
        d.rectangle((0, 26, w, 48), fill=(226, 226, 230))
        x = 6
        for m in sorted(rng.sample(_MENUS, rng.randint(4, 6)), key=_MENUS.index):
            tw = _text_w(m, fs) + 8
            ws.append(_Widget("menu", m, (x, 28, x + tw, 46)))
            x += tw + 10
        x = 8
        for _ in range(rng.randint(4, 7)):
            ws.append(_Widget("icon", icons.pop(), (x, 54, x + 26, 80)))
            x += 34
        d.rectangle((0, 86, 130, h), fill=(232, 234, 238))  # side panel with a list of items
        for k, it in enumerate(rng.sample(_ITEMS, rng.randint(4, 8))):
            ws.append(_Widget("item", it, (8, 94 + 24 * k, 14 + _text_w(it, fs), 112 + 24 * k)))
        ws += _flow(rng, (146, 96, w - 16, h - 12), fs, buttons, fields, full_width=False)
    elif platform == "web":
        d.rectangle((0, 0, w, 42), fill=accent)
        site = rng.choice(["Acme", "ShopNow", "DevHub", "TravelGo", "NewsDaily"])
        _text(d, (12, 13), site, fs + 3, fill=(255, 255, 255))
        x = 120
        for lk in rng.sample(_LINKS, rng.randint(3, 4)):
            tw = _text_w(lk, fs) + 8
            ws.append(_Widget("link", lk, (x, 12, x + tw, 30)))
            x += tw + 12
        fields.remove("Search")
        sx = max(x + 10, w - 220)
        ws.append(_Widget("field", "Search", (sx, 8, w - 44, 34)))
        icons.remove("search")
        ws.append(_Widget("icon", "search", (w - 38, 8, w - 12, 34)))
        heading = rng.choice(["Create your account", "Contact us", "Checkout", "Preferences"])
        _text(d, (20, 56), heading, fs + 5, fill=(30, 30, 30))
        ws += _flow(rng, (20, 92, w - 20, h - 12), fs, buttons, fields, full_width=False)
    else:  # mobile
        _text(d, (12, 3), "9:41", fs - 1, fill=(30, 30, 30))
        d.rectangle((0, 20, w, 64), fill=accent)
        icons.remove("menu")
        ws.append(_Widget("icon", "menu", (8, 29, 34, 55)))
        _text(d, (46, 34), rng.choice(["Inbox", "Profile", "Sign up", "Orders"]), fs + 3, fill=(255, 255, 255))
        ws.append(_Widget("icon", icons.pop(), (w - 40, 29, w - 14, 55)))
        d.rectangle((0, h - 56, w, h), fill=(232, 232, 236))
        step = w // 4
        for k in range(4):
            cx = k * step + step // 2
            ws.append(_Widget("icon", icons.pop(), (cx - 14, h - 42, cx + 14, h - 14)))
        ws += _flow(rng, (16, 84, w - 16, h - 70), fs, buttons, fields, full_width=True)
    for wd in ws:
        _draw_widget(d, wd, fs, accent if wd.kind != "link" or platform != "web" else (255, 255, 255))
    return img, ws


def _gui_instruction(rng: random.Random, wd: _Widget, mobile: bool) -> str:
    verb = "Tap" if mobile else "Click"
    templates = {
        "button": [f"{verb} on the '{wd.label}' button", f"{verb} the {wd.label} button", f"Press '{wd.label}'"],
        "field": [f"{verb} on the '{wd.label}' text field", f"Select the {wd.label} input box"],
        "menu": [f"Open the '{wd.label}' menu", f"{verb} the {wd.label} menu"],
        "link": [f"Go to the '{wd.label}' page", f"{verb} the {wd.label} link"],
        "item": [f"Select '{wd.label}' in the side panel", f"{verb} on {wd.label} in the list"],
        "icon": [f"{verb} the {wd.label} icon", f"{verb} on the {wd.label} icon"],
    }
    return rng.choice(templates[wd.kind])


def _describe(wd: _Widget) -> str:
    special = {"icon": f"the {wd.label} icon", "item": f"the list item '{wd.label}'"}
    return special.get(wd.kind, f"the '{wd.label}' {wd.kind}")


def _gui_item(rng: random.Random, sid: str, image: str, platform: str, size: tuple[int, int],
              extra: dict | None = None, split: str | None = None) -> _Item:
    img, ws = _gui_screen(rng, platform, size)
    target = rng.choice(ws)
    instruction = _gui_instruction(rng, target, platform == "mobile")
    data_type = "icon" if target.kind == "icon" else "text"
    meta: dict[str, Any] = {"split": split or f"{platform}/{data_type}"}
    if extra is not None:
        meta["extra"] = {"data_type": data_type, **extra}
    sample = _sample(sid, image, f"{IMAGE_TOKEN}\n{instruction}", _box_str(target.box), meta)
    other = rng.choice([x for x in ws if x is not target])
    p, po = _center(target.box), _center(other.box)
    steps = [f"The screen shows {_describe(other)} at {_pt(po)}, which is not what the instruction asks for.",
             f"Scanning the layout, {_describe(target)} is at {_pt(p)}.",
             f"Its center {_pt(p)} lies inside the element, so that is the point to click."]
    wrong = [f"At first {_describe(other)} at {_pt(po)} looks like the right element."]
    chains = [_chain(steps, _pt(p))]
    if rng.random() < 0.35:
        chains.append(_chain(steps, _pt(p), wrong))
    return _Item(sample, img, chains)


# -- web action (VWA-like) ---------------------------------------------------------------------------------------

_PRODUCTS = ["shoes", "kayak", "lamp", "backpack", "chair", "jacket", "mug", "bicycle", "guitar", "watch"]
_PRODUCT_SHAPE = dict(zip(_PRODUCTS, ["square", "diamond", "triangle", "square", "hexagon", "cross", "circle", "circle",
                                      "star", "circle"]))


def _web_action_item(rng: random.Random, sid: str, image: str) -> _Item:
    w, h, fs = 640, 480, 12
    accent = rng.choice([(35, 70, 140), (160, 60, 30), (30, 110, 90)])
    img = Image.new("RGB", (w, h), (247, 247, 247))
    d = ImageDraw.Draw(img)
    site = rng.choice(["OneStopShop", "Classifieds", "MarketHub"])
    d.rectangle((0, 0, w, 44), fill=accent)
    _text(d, (12, 14), site, fs + 4, fill=(255, 255, 255))
    elems: list[tuple[str, str, Box]] = []  # (kind, text, box) in reading order = SoM numbering order
    elems.append(("field", "Search", (150, 9, 390, 35)))
    elems.append(("button", "Search", (398, 9, 460, 35)))
    elems.append(("link", "Cart", (500, 13, 540, 31)))
    elems.append(("link", "Account", (552, 13, 620, 31)))
    x = 12
    for cat in rng.sample(["Electronics", "Home", "Sports", "Clothing", "Garden", "Toys"], 4):
        tw = _text_w(cat, fs) + 8
        elems.append(("link", cat, (x, 52, x + tw, 70)))
        x += tw + 16
    pairs = rng.sample([(c, p) for c in COLORS if c not in ("white", "black") for p in _PRODUCTS], 7)
    shown, hidden = pairs[:6], pairs[6]
    cards = []
    cw, ch = (w - 4 * 16) // 3, 188
    for k, (col, prod) in enumerate(shown):
        cx0, cy0 = 16 + (k % 3) * (cw + 16), 82 + (k // 3) * (ch + 12)
        d.rectangle((cx0, cy0, cx0 + cw, cy0 + ch), fill=(255, 255, 255), outline=(210, 210, 210))
        _draw_shape(d, _PRODUCT_SHAPE[prod], (cx0 + cw // 2 - 40, cy0 + 10, cx0 + cw // 2 + 40, cy0 + 90), COLORS[col])
        title = f"{col.capitalize()} {prod.capitalize()}"
        price = f"${rng.randint(5, 400)}.{rng.choice(['00', '49', '99'])}"
        _text(d, (cx0 + 10, cy0 + 126), price, fs, fill=(40, 40, 40))
        t_box = (cx0 + 8, cy0 + 100, cx0 + 12 + _text_w(title, fs), cy0 + 120)
        b_box = (cx0 + 10, cy0 + 148, cx0 + 36 + _text_w("Add to Cart", fs), cy0 + 176)
        elems.append(("link", title, t_box))
        elems.append(("button", "Add to Cart", b_box))
        cards.append((col, prod, len(elems) - 2, len(elems) - 1))
    start = rng.randint(0, 20)
    ids = [start + k for k in range(len(elems))]
    for (kind, text, box), som in zip(elems, ids):
        if kind == "field":
            d.rectangle(box, fill=(255, 255, 255), outline=(150, 150, 150))
            _text(d, (box[0] + 6, box[1] + 6), text, fs, fill=(140, 140, 140))
        elif kind == "button":
            d.rounded_rectangle(box, radius=4, fill=(240, 170, 40) if text == "Add to Cart" else (230, 230, 230))
            _text(d, (box[0] + 13, box[1] + 7), text, fs, fill=(20, 20, 20))
        else:
            on_bar = box[1] < 44
            _text(d, (box[0] + 4, box[1] + 3), text, fs, fill=(255, 255, 255) if on_bar else accent)
    for (kind, text, box), som in zip(elems, ids):  # set-of-marks: outline + numbered tag at the top-left corner
        d.rectangle(box, outline=(230, 30, 30))
        tag = str(som)
        tw = _text_w(tag, 10) + 4
        d.rectangle((box[0], box[1] - 11, box[0] + tw, box[1]), fill=(230, 30, 30))
        _text(d, (box[0] + 2, box[1] - 11), tag, 10, fill=(255, 255, 255))

    sid_search, sid_btn = ids[0], ids[1]
    kind = rng.choice(["type", "open", "cart", "cart", "scroll"])
    col, prod, t_idx, b_idx = rng.choice(cards)
    history: list[str] = []
    if kind == "type":
        query = f"{col} {prod}"
        objective = rng.choice([f"Search for {query}.", f"Find {query} on this site."])
        answer = f"type [{sid_search}] [{query}]"
    elif kind == "open":
        objective = f"Show me the listing for the {col} {prod}."
        history = [f"type [{sid_search}] [{prod}]", f"click [{sid_btn}]"][: rng.randint(0, 2)]
        answer = f"click [{ids[t_idx]}]"
    elif kind == "cart":
        objective = f"Add the {col} {prod} to my cart."
        history = [f"click [{ids[rng.randint(4, 7)]}]"][: rng.randint(0, 1)]
        answer = f"click [{ids[b_idx]}]"
    else:
        col, prod = hidden
        objective = f"Find the {col} {prod} and add it to my cart."
        history = [f"click [{ids[rng.randint(4, 7)]}]"]
        answer = "scroll [down]"
    hist = "\n".join(f"{i}. {a}" for i, a in enumerate(history, 1)) or "None"
    question = f"{IMAGE_TOKEN}\nOBJECTIVE: {objective}\n\nPREVIOUS ACTIONS: \n{hist}"
    sample = _sample(sid, image, question, answer, {"split": answer.split(" ")[0]})
    return _Item(sample, img)


# -- assembly ----------------------------------------------------------------------------------------------------

def _split_counts(n: int, fractions: list[float], mins: list[int] | None = None) -> list[int]:
    """Largest-remainder split of ``n`` into ``len(fractions)`` parts, part ``i`` at least ``mins[i]`` (default 1)."""
    mins = mins or [1] * len(fractions)
    if n < sum(mins):
        raise ValueError(f"n_per_task must be at least {sum(mins)} (got {n})")
    raw = [n * f / sum(fractions) for f in fractions]
    counts = [max(m, int(r)) for m, r in zip(mins, raw)]
    order = sorted(range(len(raw)), key=lambda i: (raw[i] - int(raw[i]), raw[i]), reverse=True)
    k = 0
    while sum(counts) < n:
        counts[order[k % len(order)]] += 1
        k += 1
    while sum(counts) > n:
        i = max((j for j in range(len(counts)) if counts[j] > mins[j]), key=lambda j: counts[j] - mins[j])
        counts[i] -= 1
    return counts


def _task_rng(seed: int, task: str) -> random.Random:
    return random.Random(f"vigorl-demo:{seed}:{task}")  # str seeds hash with sha512: stable across processes


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _write_png(path: Path, img: Image.Image) -> None:
    """Write an RGB image as PNG with filter type 0 and zlib level 1.

    Pillow's PNG writer tries every row filter and took about two thirds of the whole run; flat synthetic drawings
    compress about as well without filtering, at a third of the cost. Any PNG reader opens the result.
    """
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got {img.mode}")
    w, h = img.size
    raw, stride = img.tobytes(), 3 * w
    rows = b"".join(b"\x00" + raw[y * stride:(y + 1) * stride] for y in range(h))
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(rows, 1)) + _png_chunk(b"IEND", b""))
    path.write_bytes(data)


class _Out:
    """Collects what one run writes: images and the per-file record counts for the manifest.

    PNG encoding is most of the run time and Pillow releases the GIL while encoding, so images are saved by a small
    thread pool while the next ones are drawn; :meth:`close` waits for every save and re-raises the first failure.
    """

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, int] = {}
        self.n_images = 0
        self._workers = max(1, min(4, os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=self._workers)
        self._pending: deque[Future] = deque()

    def image(self, item: _Item) -> None:
        path = self.root / item.sample.images[0]
        path.parent.mkdir(parents=True, exist_ok=True)
        while len(self._pending) >= 2 * self._workers:  # bounded: drawing is faster than encoding
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(_write_png, path, item.image))
        item.image = None  # type: ignore[assignment]  # the pool holds the only reference until it is saved
        self.n_images += 1

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def samples(self, rel: str, items: list[_Item], fmt: str) -> None:
        self.files[rel] = write_samples(self.root / rel, [it.sample for it in items], fmt)

    def sft(self, rel: str, items: list[_Item], first_index: int = 0) -> None:
        records = []
        for i, it in enumerate(items, first_index):
            for j, content in enumerate(it.chains):
                records.append(SFTRecord(
                    id=f"{i}_{j}", metadata={}, images=list(it.sample.images), gt_answer=it.sample.answer,
                    messages=[{"role": "system", "content": DEMO_SFT_SYSTEM},
                              {"role": "user", "content": it.sample.question},
                              {"role": "assistant", "content": content}]))
        self.files[rel] = write_sft(self.root / rel, records)


def _make(out: _Out, n: int, make: Callable[[int], _Item]) -> list[_Item]:
    items = []
    for k in range(n):
        it = make(k)
        out.image(it)
        items.append(it)
    return items


def _sft_split(items: list[_Item]) -> tuple[list[_Item], list[_Item]]:
    n_val = max(1, round(len(items) * 0.1)) if len(items) >= 2 else 0
    return items[:len(items) - n_val], items[len(items) - n_val:]


def _gen_visual_search(out: _Out, rng: random.Random, n: int) -> None:
    n_mcts, n_rl, n_test = _split_counts(n, [0.3, 0.45, 0.25])
    cat = lambda: "direct_attributes" if rng.random() < 0.6 else "relative_position"  # noqa: E731 (V*: 115 / 76)

    def sa(prefix: str, k0: int):
        def make(k: int) -> _Item:
            c = cat()
            return _vs_item(rng, f"{prefix}_{k}", f"visual_search/SA_images/{c}/sa_{k0 + k:05d}.png", c)
        return make

    mcts = _make(out, n_mcts, sa("vs_mcts", 0))
    train = _make(out, n_rl, sa("vs_rl", n_mcts))

    def vstar(k: int) -> _Item:
        c = cat()
        return _vs_item(rng, str(k), f"visual_search/vstar/{c}/sa_{90000 + k}.png", c)

    test = _make(out, n_test, vstar)
    out.samples("visual_search/vigorl_search_MCTS.jsonl", mcts, "llava")
    out.samples("visual_search/vigorl_SA_RL.jsonl", train, "rl")
    out.samples("visual_search/vstar/vstarbench_test.jsonl", test, "llava")
    out.samples("visual_search/vstar/vstarbench_test_RL.jsonl", test, "rl")
    out.sft("visual_search/MCTS_72b_reasoning_chains_train.json", mcts)


def _gen_spatial(out: _Out, rng: random.Random, n: int) -> None:
    n_mcts, n_train, n_val, n_test, n_blink = _split_counts(n, [0.25, 0.35, 0.1, 0.15, 0.15], [2, 1, 1, 1, 1])
    kinds = ["left_right", "above_below", "depth"]

    def sat(prefix: str, folder: str):
        def make(k: int) -> _Item:
            return _spatial_item(rng, f"{prefix}_{k}", f"spatial_reasoning/{folder}/{prefix}_{k:05d}.png",
                                 rng.choice(kinds), "sat")
        return make

    mcts = _make(out, n_mcts, sat("sat2_mcts", "images"))
    train = _make(out, n_train, sat("sat2_train", "images"))
    val = _make(out, n_val, sat("sat2_val", "images"))
    test = _make(out, n_test, sat("sat2_test", "sat2_test/images"))
    per_subtask: dict[str, int] = {}

    def blink(k: int) -> _Item:
        sub = rng.choice(["Spatial_Relation", "Relative_Depth"])
        per_subtask[sub] = per_subtask.get(sub, 0) + 1
        sid = f"val_{sub}_{per_subtask[sub]}"
        kind = "depth" if sub == "Relative_Depth" else rng.choice(["left_right", "above_below"])
        it = _spatial_item(rng, sid, f"spatial_reasoning/blink/images/{sid}.png", kind, "blink")
        it.sample.meta["split"] = sub
        return it

    blinks = _make(out, n_blink, blink)
    out.samples("spatial_reasoning/vigorl_sat2_MCTS.jsonl", mcts, "llava")
    out.samples("spatial_reasoning/vigorl_sat2_train_RL.jsonl", train, "rl")
    out.samples("spatial_reasoning/vigorl_sat2_val_RL.jsonl", val, "rl")
    out.samples("spatial_reasoning/sat2_test/sat2_test.jsonl", test, "llava")
    out.samples("spatial_reasoning/blink/blink_validation.jsonl", blinks, "llava")
    sft_train, sft_val = _sft_split(mcts)
    out.sft("spatial_reasoning/MCTS_72b_reasoning_chains_train.json", sft_train)
    out.sft("spatial_reasoning/MCTS_72b_reasoning_chains_val.json", sft_val, first_index=len(sft_train))


_SIZES = {"desktop": [(640, 400), (600, 400)], "web": [(640, 400), (640, 420)], "mobile": [(360, 640), (360, 600)]}


def _gen_grounding(out: _Out, rng: random.Random, n: int) -> None:
    n_mcts, n_train, n_val, n_v2, n_pro = _split_counts(n, [0.25, 0.35, 0.1, 0.15, 0.15], [2, 1, 1, 1, 1])

    def atlas(prefix: str):
        def make(k: int) -> _Item:
            plat = rng.choice(["desktop", "web", "mobile"])
            return _gui_item(rng, f"{prefix}_{k}", f"web_grounding/images/{prefix}_{k:05d}.png", plat,
                             rng.choice(_SIZES[plat]))
        return make

    mcts = _make(out, n_mcts, atlas("osatlas_mcts"))
    train = _make(out, n_train, atlas("osatlas_train"))
    val = _make(out, n_val, atlas("osatlas_val"))

    def v2(k: int) -> _Item:
        source = rng.choice(["ios", "android", "macos", "windows", "shop", "forum", "travel"])
        plat = {"ios": "mobile", "android": "mobile", "macos": "desktop", "windows": "desktop"}.get(source, "web")
        return _gui_item(rng, f"ssv2_{k}", f"web_grounding/ScreenSpot-V2/images/{plat}_{k:05d}.png", plat,
                         rng.choice(_SIZES[plat]), extra={"data_source": source, "platform": plat})

    def pro(k: int) -> _Item:
        app, os_ = rng.choice(sorted(_APPS)), rng.choice(["windows", "macos", "linux"])
        it = _gui_item(rng, f"sspro_{k}", f"web_grounding/ScreenSpot-Pro/images/{app}_{os_}/screenshot_{k:05d}.png",
                       "desktop", (800, 500), extra={"data_source": os_, "platform": os_, "application": app,
                                                     "group": _APPS[app]})
        it.sample.meta["split"] = f"{_APPS[app]}/{it.sample.meta['extra']['data_type']}"
        return it

    ssv2, sspro = _make(out, n_v2, v2), _make(out, n_pro, pro)
    out.samples("web_grounding/vigorl_osatlas_MCTS.jsonl", mcts, "llava")
    out.samples("web_grounding/vigorl_osatlas_train_RL.jsonl", train, "rl")
    out.samples("web_grounding/vigorl_osatlas_val_RL.jsonl", val, "rl")
    out.samples("web_grounding/ScreenSpot-V2/screenspot_v2_test.jsonl", ssv2, "llava")
    out.samples("web_grounding/ScreenSpot-Pro/screenspot_pro_test.jsonl", sspro, "llava")
    sft_train, sft_val = _sft_split(mcts)
    out.sft("web_grounding/MCTS_72b_reasoning_chains_train.json", sft_train)
    out.sft("web_grounding/MCTS_72b_reasoning_chains_val.json", sft_val, first_index=len(sft_train))


def _gen_web_action(out: _Out, rng: random.Random, n: int) -> None:
    n_mcts, n_train, n_val = _split_counts(n, [0.4, 0.45, 0.15])

    def pool(prefix: str):
        return lambda k: _web_action_item(rng, f"{prefix}_{k}", f"web_action/images/{prefix}_{k:05d}.png")

    out.samples("web_action/vigorl_web_action_MCTS.jsonl", _make(out, n_mcts, pool("wa_mcts")), "llava")
    out.samples("web_action/vigorl_ical_train_RL.jsonl", _make(out, n_train, pool("ical_train")), "rl")
    out.samples("web_action/vigorl_ical_val_RL.jsonl", _make(out, n_val, pool("ical_val")), "rl")


_TASKS = {"visual_search": _gen_visual_search, "spatial_reasoning": _gen_spatial, "web_grounding": _gen_grounding,
          "web_action": _gen_web_action}


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def generate_demo(out_dir: str | Path, n_per_task: int = 200, seed: int = 0) -> dict:
    """Write the synthetic demo data set under ``out_dir`` (a ``$DATA_ROOT``) and return its manifest.

    Deterministic in ``seed``; idempotent (returns the existing manifest when seed, size and version match and every
    listed file is present). ``n_per_task`` images are drawn per task (at least :data:`MIN_PER_TASK`).
    """
    if n_per_task < MIN_PER_TASK:
        raise ValueError(f"n_per_task must be at least {MIN_PER_TASK} (got {n_per_task})")
    root = Path(out_dir)
    manifest_path = root / MANIFEST_NAME
    old = _read_manifest(manifest_path) if manifest_path.is_file() else None
    if (old and old.get("version") == DEMO_VERSION and old.get("seed") == seed and old.get("n_per_task") == n_per_task
            and all((root / f).is_file() for f in old.get("files", {}))):
        return old
    manifest_path.unlink(missing_ok=True)  # a run killed half-way must never look finished
    out = _Out(root)
    try:
        for task, gen in _TASKS.items():
            gen(out, _task_rng(seed, task), n_per_task)
    finally:
        out.close()
    manifest = {"version": DEMO_VERSION, "seed": seed, "n_per_task": n_per_task, "n_images": out.n_images,
                "tasks": sorted(_TASKS), "files": dict(sorted(out.files.items()))}
    atomic_write_json(manifest_path, manifest)
    return manifest
