"""The one in-memory record every command works on: :class:`Sample`.

A ``Sample`` is one question about one or more images with its ground truth. Readers in
:mod:`vigorl_cli.data.formats` turn every released file format into Samples and back, losslessly.

Field conventions
-----------------
``id``
    String id, unique within a file.
``images``
    Image paths exactly as stored in the source file (usually relative to a data root); resolve them with
    :meth:`Sample.image_paths`. The first image is the one the question is about; later ones are extra views.
``question``
    The user text exactly as in the source, including ``<image>`` placeholders where the source has them
    (the released LLaVA files start with ``"<image>\\n"``). :meth:`Sample.prompt_text` strips them.
``choices``
    Option texts for multiple-choice questions (without letters), or ``None``.
``answer``
    The ground-truth string as released: option text (V*, SAT-2, BLINK), ``"(x1, y1, x2, y2)"`` for grounding,
    ``"click [12]"`` style for web actions, free text otherwise.
``target``
    Structured ground truth parsed from ``answer`` where it has structure: a box or point (integer pixels in
    the **original image frame**, ``frame="original"``) or a web action. ``None`` for plain text answers.
``task``
    One of :data:`TASKS`; selects the judge when a benchmark does not name one.
``meta``
    Everything else: benchmark sub-split (``meta["split"]``), source-format extras kept for lossless round trips.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

TASKS = ("multiple_choice", "vqa", "grounding", "web_action")
Task = Literal["multiple_choice", "vqa", "grounding", "web_action"]

IMAGE_TOKEN = "<image>"

_BOX_RE = re.compile(r"^\s*[\(\[]\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,"
                     r"\s*(-?\d+(?:\.\d+)?)\s*[\)\]]\s*$")
_POINT_RE = re.compile(r"^\s*[\(\[]\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*[\)\]]\s*$")
_ACTION_RE = re.compile(r"^\s*(click|type|hover|press|scroll|goto|go_back|go_forward|new_tab|tab_focus|close_tab|stop)"
                        r"\b(.*)$", re.IGNORECASE | re.DOTALL)
_CHOICE_LINE_RE = re.compile(r"^\s*\(?([A-Z])[\.\)]\s+(.+?)\s*$")


@dataclass
class Target:
    """Structured ground truth. Exactly one of ``box``, ``point``, ``action`` is set.

    Boxes are ``(x1, y1, x2, y2)`` and points ``(x, y)``, in pixels of the frame named by ``frame``
    (``"original"``: the image file as stored on disk).
    """

    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    action: str | None = None
    frame: str = "original"

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"frame": self.frame}
        if self.box is not None:
            d["box"] = list(self.box)
        if self.point is not None:
            d["point"] = list(self.point)
        if self.action is not None:
            d["action"] = self.action
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Target":
        return cls(box=tuple(d["box"]) if d.get("box") is not None else None,
                   point=tuple(d["point"]) if d.get("point") is not None else None,
                   action=d.get("action"), frame=d.get("frame", "original"))


@dataclass
class Sample:
    id: str
    images: list[str]
    question: str
    answer: str
    choices: list[str] | None = None
    target: Target | None = None
    task: str = ""  # "" → inferred from answer/choices/target (see __post_init__)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.task:  # fill what the caller left out from the ground-truth string
            if self.choices is None:
                self.choices = parse_choices(self.question)
            if self.target is None:
                self.target = infer_target(self.answer)
            self.task = infer_task(self.answer, self.choices, self.target)
        elif self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")

    # -- convenience -------------------------------------------------------------------------------------------
    def image_paths(self, root: str | Path | None = None) -> list[Path]:
        """Absolute image paths: each stored path joined with ``root`` unless it is absolute already."""
        out = []
        for p in self.images:
            q = Path(p)
            out.append(q if q.is_absolute() or root is None else Path(root) / q)
        return out

    def prompt_text(self) -> str:
        """The question without ``<image>`` placeholders (images are sent as separate content parts)."""
        return self.question.replace(IMAGE_TOKEN, "").strip()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target"] = self.target.to_dict() if self.target else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        unknown = set(d) - {"id", "images", "question", "answer", "choices", "target", "task", "meta"}
        if unknown:
            raise ValueError(f"unknown Sample fields {sorted(unknown)}")
        t = d.get("target")
        return cls(id=str(d["id"]), images=list(d.get("images") or []), question=d["question"],
                   answer=str(d.get("answer", "")), choices=d.get("choices"),
                   target=Target.from_dict(t) if t else None, task=d.get("task", ""), meta=dict(d.get("meta") or {}))


# -- parsing of ground-truth strings (shared by readers, judges and validate) ----------------------------------

def _number(text: str) -> int | float:
    """``"7"``/``"007"`` → 7, ``"1.5"`` → 1.5 (the regexes above only admit plain decimal numbers)."""
    return float(text) if "." in text else int(text)


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """``"(x1, y1, x2, y2)"`` or ``"[x1, y1, x2, y2]"`` → a 4-tuple, else ``None``. Never evaluates code."""
    m = _BOX_RE.match(text or "")
    if not m:
        return None
    return tuple(_number(g) for g in m.groups())  # type: ignore[return-value]


def parse_point(text: str) -> tuple[float, float] | None:
    """``"(x, y)"`` → a 2-tuple, else ``None``."""
    m = _POINT_RE.match(text or "")
    if not m:
        return None
    return tuple(_number(g) for g in m.groups())  # type: ignore[return-value]


def parse_action(text: str) -> str | None:
    """A web action string such as ``"click [12]"`` normalised to ``"click [12]"``; ``None`` if not an action."""
    m = _ACTION_RE.match(text or "")
    if not m:
        return None
    return (m.group(1).lower() + m.group(2)).strip()


def parse_choices(question: str) -> list[str] | None:
    """Option texts from a question's ``A. text`` / ``(A) text`` lines, in letter order; ``None`` if fewer than two.

    Only a run of consecutive letters starting at ``A`` counts, so stray capitals in the question are ignored.
    """
    found: list[str] = []
    for line in question.splitlines():
        m = _CHOICE_LINE_RE.match(line)
        if m and ord(m.group(1)) - ord("A") == len(found):
            found.append(m.group(2))
    return found if len(found) >= 2 else None


def infer_target(answer: str) -> Target | None:
    """Structured target from a ground-truth string (box, point or web action)."""
    box = parse_box(answer)
    if box is not None:
        return Target(box=box)
    pt = parse_point(answer)
    if pt is not None:
        return Target(point=pt)
    act = parse_action(answer)
    if act is not None:
        return Target(action=act)
    return None


def infer_task(answer: str, choices: list[str] | None, target: Target | None) -> str:
    if target is not None and (target.box is not None or target.point is not None):
        return "grounding"
    if target is not None and target.action is not None:
        return "web_action"
    if choices:
        return "multiple_choice"
    return "vqa"
