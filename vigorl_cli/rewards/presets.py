"""GRPO reward functions that reproduce the reference numerically (``vigorl-reference.md`` §5.7, §10 items 17–19).

Every reward takes a :class:`RewardInput` (the whole trajectory and its sample, not only the text) plus its weights
as keyword arguments, and returns named parts that are all logged::

    {"overall", "accuracy", "format", "grounding", "diversity"}

``overall`` is the only number that reaches the advantage; the others explain it:

* single-turn grounded thinking: ``overall = aw·accuracy + fw·format·grounding`` (aw = fw = 0.5). The reference logs
  ``format·grounding`` under the name ``format``; we log the two factors separately.
* vanilla thinking: ``overall = aw·accuracy + fw·format``; ``grounding`` is computed but informational.
* multi-turn: ``overall = aw·accuracy + fw·(format + diversity)`` (aw = 0.6, fw = 0.4), ``diversity = bonus·(k−1)``
  for ``k`` crop coordinates that are pairwise ≥ ``min_dist`` px apart (greedy, in order), ``k`` capped at
  ``max_crops``, and 0 when ``format`` is 0. The reference returns ``format + diversity`` as its ``format``
  (range [0, 1.6]). ``grounding`` = at least one valid crop coordinate (informational).

Which answer check and accuracy judge apply depends on the task (``task=`` or ``sample.task``):

============== ======================================== =================================================
task           answer shape (part of ``format``)          accuracy
============== ======================================== =================================================
grounding      ``(int, int)`` via ``ast.literal_eval``    :func:`judges.point_in_box`
multiple_choice non-empty                                 :func:`judges.exact_match` (single-turn strips an
/ vqa                                                     ``A.``/``A)`` prefix; multi-turn lower-cases both)
web_action     none (single-turn reference)               :func:`judges.web_action` RL scorer (0.5 + 0.5)
============== ======================================== =================================================

``compat=True`` reproduces the reference bit for bit, including the answer extraction used for accuracy
(``re.search(r"<answer>(.*?)</answer>", s)`` *without* DOTALL, falling back to the whole response). Differences when
``compat=False`` (the default), each a fix for a case that well-formed outputs never hit:

1. the accuracy answer is read with DOTALL (the reference scores ``<answer>\\nleft\\n</answer>`` as wrong because the
   pattern cannot cross the newline and it then compares the whole response);
2. a response with no ``<answer>`` gets accuracy 0 (the reference judges the whole response, so an untagged bare
   answer earns accuracy);
3. string accuracy lower-cases the GT and maps a bare letter answer through the sample's options
   (:func:`judges.exact_match`); point accuracy accepts float points (:func:`judges.point_in_box`); format still
   requires integers;
4. multi-turn format: every ``<tool_call>`` must be the canonical ``search_coordinate`` JSON (the reference only checks
   bodies that match ``{...}`` and ignores the tool name, so ``<tool_call>junk</tool_call>`` passes), and, when
   ``image_size`` is known, inside the image.

The diversity cap ``max_crops`` (default 4) applies in both modes; the reference code is uncapped but its rollout
allows at most 4 crops, so on reference transcripts the numbers agree. ``max_crops=None`` removes the cap.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vigorl_cli.agent.parse import (check_point_in_image, is_grounded, is_think_answer_format, literal_or_none,
                                    multiturn_format_failure, parse_response)
from vigorl_cli.data.schema import Sample, Target
from vigorl_cli.errors import RecipeError
from vigorl_cli.rewards.judges import JudgeResult, exact_match, point_in_box, web_action

PARTS = ("overall", "accuracy", "format", "grounding", "diversity")

OBSERVATION_JOIN = "\n<observation>\n</observation>\n"
"""Placed after each assistant turn that ends in a tool call when :attr:`RewardInput.response` is a list of turns,
so the tag automaton sees ``…</tool_call> <observation></observation> <think>…`` as in the decoded reference
transcript (whose observation text and role words carry no tags)."""


@dataclass
class RewardInput:
    """One trajectory to score.

    ``response``
        The decoded response (single-turn), or the decoded multi-turn transcript, or a list of assistant turns
        (each the full assistant text of that turn, including any forced prefix such as the final-answer think).
    ``sample``
        The sample; its ``answer``/``target``/``choices``/``task`` are used.
    ``gt``
        Overrides the sample's ground truth, e.g. a :class:`Target` already converted to the model-input frame
        (judges never rescale; see :mod:`vigorl_cli.rewards.judges`).
    ``tool_points``
        Crop coordinates the episode actually executed (for plug-in rewards; presets read the transcript, as the
        reference does).
    ``image_size``
        ``(width, height)`` of the image the model saw, for the non-compat in-image check of crop coordinates.
    ``task``
        Overrides ``sample.task``.
    """

    response: str | list[str]
    sample: Sample | None = None
    gt: str | Target | None = None
    tool_points: list[tuple[float, float]] | None = None
    image_size: tuple[int, int] | None = None
    task: str | None = None

    def text(self) -> str:
        if isinstance(self.response, str):
            return self.response
        out = []
        for i, turn in enumerate(self.response):
            out.append(turn)
            if i < len(self.response) - 1:
                out.append(OBSERVATION_JOIN if turn.rstrip().endswith("</tool_call>") else "\n")
        return "".join(out)

    def ground_truth(self) -> Sample | Target | str:
        if self.gt is not None:
            return self.gt
        if self.sample is None:
            raise ValueError("RewardInput needs a sample or a gt")
        return self.sample

    def resolved_task(self, task: str | None = None) -> str:
        t = task or self.task or (self.sample.task if self.sample is not None else None)
        if t is None:
            raise ValueError("RewardInput has no task: pass task= or a sample")
        return t


# ---------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------

_ANSWER_NODOTALL_RE = re.compile(r"<answer>(.*?)</answer>")
_ANSWER_DOTALL_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_MULTITURN_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_POINT_MULTITURN_RE = re.compile(r"<answer>\s*\(([^)]*)\)\s*</answer>")
_TOOL_JSON_RE = re.compile(r"<tool_call>\s*({.*?})\s*</tool_call>", re.DOTALL)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)




def _int_pair(v) -> bool:
    return isinstance(v, tuple) and len(v) == 2 and all(_is_int(x) for x in v)


def _accuracy_answer(s: str, compat: bool, multiturn_text: bool = False) -> str | None:
    """The answer text the accuracy judge sees (see module docstring, differences 1–2)."""
    if multiturn_text:  # string_match_multiturn.py: DOTALL | IGNORECASE, inner whitespace trimmed
        m = _ANSWER_MULTITURN_RE.search(s)
        return m.group(1).strip() if m else (s.strip() if compat else None)
    m = (_ANSWER_NODOTALL_RE if compat else _ANSWER_DOTALL_RE).search(s)
    if m:
        return m.group(1).strip()
    return s.strip() if compat else None


def _accuracy(inp: RewardInput, task: str, pred: str | None, compat: bool, multiturn: bool) -> JudgeResult:
    gt = inp.ground_truth()
    choices = inp.sample.choices if inp.sample is not None else None
    if task == "grounding":
        return point_in_box(pred, gt, compat=compat)
    if task == "web_action":
        return web_action(pred, gt, scorer="rl")  # the reference RL scorer in both modes
    if multiturn:
        return exact_match(pred, gt, compat=compat, strip_option_prefix=False, lowercase_gt=True, choices=choices)
    return exact_match(pred, gt, compat=compat, strip_option_prefix=True, choices=choices)


def _single_turn_answer_ok(s: str, task: str) -> bool:
    """Answer-shape half of the single-turn format reward (first ``<answer>``, DOTALL, as the reference)."""
    m = _ANSWER_DOTALL_RE.search(s)
    if not m:
        return False
    content = m.group(1).strip()
    if task == "grounding":
        return content.startswith("(") and content.endswith(")") and _int_pair(literal_or_none(content))
    if task == "web_action":
        return True
    return bool(content)


def _tool_coords(s: str, compat: bool, image_size: tuple[int, int] | None) -> list[list[int]] | None:
    """Crop coordinates of every tool call, or ``None`` if one of them is invalid (format 0)."""
    coords: list[list[int]] = []
    if compat:  # point_in_bbox_multicrop.py: only bodies matching {...}; name not checked
        for m in _TOOL_JSON_RE.finditer(s):
            try:
                args = json.loads(m.group(1)).get("arguments", {})
                coord = args.get("coordinate", None)
            except (ValueError, AttributeError, RecursionError):
                return None
            if not isinstance(coord, list) or len(coord) != 2 or not all(_is_int(v) for v in coord):
                return None
            coords.append(coord)
        return coords
    for tc in parse_response(s).tool_calls:
        if not tc.strict:
            return None
        if image_size is not None and check_point_in_image(tc.coordinate, *image_size) is not None:
            return None
        coords.append(list(tc.coordinate))
    return coords


def count_distinct(coords: list, min_dist: float = 10.0) -> int:
    """Greedy count of coordinates at least ``min_dist`` px (Euclidean) from every one already kept, in order."""
    kept: list = []
    for c in coords:
        if all(math.dist(c, k) >= min_dist for k in kept):
            kept.append(c)
    return len(kept)


def diversity_bonus_value(coords: list, bonus: float = 0.2, max_crops: int | None = 4,
                          min_dist: float = 10.0) -> float:
    """``bonus·(k−1)`` for ``k = min(count_distinct(coords), max_crops)`` distinct crops; 0 for k ≤ 1."""
    k = count_distinct(coords, min_dist)
    if max_crops is not None:
        k = min(k, max_crops)
    return bonus * (k - 1) if k > 1 else 0.0


def _parts(overall, accuracy, fmt, grounding, diversity) -> dict[str, float]:
    return {"overall": float(overall), "accuracy": float(accuracy), "format": float(fmt),
            "grounding": float(grounding), "diversity": float(diversity)}


# ---------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------

def _single_turn(inp: RewardInput, task: str | None, accuracy_weight: float, format_weight: float, compat: bool,
                 gated: bool) -> dict[str, float]:
    s = inp.text()
    t = inp.resolved_task(task)
    fmt = float(is_think_answer_format(s) and _single_turn_answer_ok(s, t))
    grounding = float(is_grounded(s))
    acc = _accuracy(inp, t, _accuracy_answer(s, compat), compat, multiturn=False).score
    overall = accuracy_weight * acc + format_weight * fmt * (grounding if gated else 1.0)
    return _parts(overall, acc, fmt, grounding, 0.0)


def grounded_thinking(inp: RewardInput, *, task: str | None = None, accuracy_weight: float = 0.5,
                      format_weight: float = 0.5, compat: bool = False, **_: Any) -> dict[str, float]:
    """ViGoRL single-turn reward: ``aw·acc + fw·fmt·grounded`` (``*_grounded_thinking.py``).

    ``fmt``: the whole response full-matches ``<think>…</think>\\s*<answer>…</answer>`` and the answer has the task's
    shape; ``grounded``: the first think block holds an ``(int, int)``.
    """
    return _single_turn(inp, task, accuracy_weight, format_weight, compat, gated=True)


def vanilla_thinking(inp: RewardInput, *, task: str | None = None, accuracy_weight: float = 0.5,
                     format_weight: float = 0.5, compat: bool = False, **_: Any) -> dict[str, float]:
    """Vanilla-GRPO baseline reward: ``aw·acc + fw·fmt``.

    Reference files ``point_in_bbox.py``, ``string_match.py``, ``web_action.py``; ``grounding`` is logged but not used.
    """
    return _single_turn(inp, task, accuracy_weight, format_weight, compat, gated=False)


def multiturn(inp: RewardInput, *, task: str | None = None, accuracy_weight: float = 0.6, format_weight: float = 0.4,
              diversity_bonus: float = 0.2, diversity_max_crops: int | None = 4, diversity_min_dist: float = 10.0,
              compat: bool = False, **_: Any) -> dict[str, float]:
    """Multi-turn crop reward: ``aw·acc + fw·(format + diversity)`` (``point_in_bbox_multicrop.py``,
    ``string_match_multiturn.py``).

    ``format`` = 1 when the transcript passes the tag automaton (:func:`agent.parse.multiturn_format_failure`), every
    tool call carries an integer ``[x, y]`` and the answer has the task's shape (grounding: ``(int, int)``; otherwise
    non-empty). ``diversity`` = ``diversity_bonus·(k−1)``, see :func:`diversity_bonus_value`.
    """
    s = inp.text()
    t = inp.resolved_task(task)
    stripped = s.strip()
    coords = _tool_coords(stripped, compat, inp.image_size)
    fmt = 0.0
    if multiturn_format_failure(stripped) is None and coords is not None:
        if t == "grounding":
            m = _ANSWER_POINT_MULTITURN_RE.search(stripped)
            ok = bool(m) and _int_pair(literal_or_none("(" + m.group(1).strip() + ")"))
        else:
            m = _ANSWER_MULTITURN_RE.search(stripped)
            ok = bool(m and m.group(1).strip())
        fmt = float(ok)
    div = diversity_bonus_value(coords, diversity_bonus, diversity_max_crops, diversity_min_dist) if fmt else 0.0
    pred = _accuracy_answer(s, compat, multiturn_text=t not in ("grounding", "web_action"))
    acc = _accuracy(inp, t, pred, compat, multiturn=True).score
    grounding = float(bool(coords))
    return _parts(accuracy_weight * acc + format_weight * (fmt + div), acc, fmt, grounding, div)


def _fixed_task(fn: Callable, task: str) -> Callable[..., dict[str, float]]:
    def reward(inp: RewardInput, **kw: Any) -> dict[str, float]:
        kw.setdefault("task", task)
        return fn(inp, **kw)
    reward.__name__ = f"{fn.__name__}_{task}"
    reward.__doc__ = f"{fn.__name__} with task={task!r} regardless of the sample's task."
    return reward


PRESETS: dict[str, Callable[..., dict[str, float]]] = {
    "grounded_thinking": grounded_thinking,
    "vanilla_thinking": vanilla_thinking,
    "multiturn": multiturn,
    # reference files *_grounded_thinking.py with a fixed accuracy kind
    "string_match": _fixed_task(grounded_thinking, "vqa"),
    "point_in_box": _fixed_task(grounded_thinking, "grounding"),
    "web_action": _fixed_task(grounded_thinking, "web_action"),
}


# ---------------------------------------------------------------------------------------------------------------
# Plug-ins and construction from a RewardConfig
# ---------------------------------------------------------------------------------------------------------------

def _normalize_result(result: Any, name: str) -> dict[str, float]:
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        return {"overall": float(result)}
    if isinstance(result, dict) and "overall" in result:
        return {k: float(v) for k, v in result.items()}
    raise TypeError(f"reward {name} returned {type(result).__name__}; expected a number or a dict with 'overall'")


def load_reward(spec: str) -> Callable[[RewardInput], dict[str, float]]:
    """A user reward from ``"package.module:function"`` or ``"path/to/file.py:function"``.

    The function is called as ``fn(inp: RewardInput)`` and returns a number or a dict holding at least ``"overall"``
    (other parts are logged as given). The returned wrapper always yields a dict of floats. Raises
    :class:`~vigorl_cli.errors.RecipeError` when the spec cannot be loaded.
    """
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise RecipeError(f"reward {spec!r} is not 'module:function'",
                          hint="e.g. reward.preset=my_rewards:score or reward.preset=./rewards.py:score")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name).expanduser().resolve()
            mspec = importlib.util.spec_from_file_location(path.stem, path)
            if mspec is None or mspec.loader is None or not path.is_file():
                raise ImportError(f"no file {path}")
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise RecipeError(f"cannot import reward module {mod_name!r}: {e}",
                          hint="check the module is on PYTHONPATH or give a path ending in .py") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RecipeError(f"reward module {mod_name!r} has no function {fn_name!r}")

    def reward(inp: RewardInput, **_: Any) -> dict[str, float]:
        return _normalize_result(fn(inp), spec)

    reward.__name__ = fn_name
    reward.__doc__ = fn.__doc__
    return reward


def get_reward(name: str) -> Callable[..., dict[str, float]]:
    """A preset by name (:data:`PRESETS`) or a plug-in ``module:function`` (:func:`load_reward`)."""
    if ":" in name:
        return load_reward(name)
    if name not in PRESETS:
        raise RecipeError(f"unknown reward preset {name!r}",
                          hint=f"use one of {', '.join(sorted(PRESETS))}, 'auto', or module:function")
    return PRESETS[name]


def build_reward(config: Any, *, multiturn: bool = False,
                 compat: bool = False) -> Callable[[RewardInput], dict[str, float]]:
    """The reward a run uses, from a ``RewardConfig``-like object (``preset``, ``accuracy_weight``, ``format_weight``,
    ``diversity_bonus``, ``diversity_max_crops``, ``diversity_min_dist``).

    ``preset="auto"`` → :func:`multiturn` when the run uses the crop tool (``multiturn=True``), else
    :func:`grounded_thinking`; the task comes from each sample. Weights are passed as configured (the multi-turn
    reference uses 0.6 / 0.4; set them in the recipe).
    """
    name = getattr(config, "preset", "auto") or "auto"
    if name == "auto":
        name = "multiturn" if multiturn else "grounded_thinking"
    fn = get_reward(name)
    if ":" in name:
        return fn
    kw = {"accuracy_weight": config.accuracy_weight, "format_weight": config.format_weight, "compat": compat}
    if name == "multiturn":
        kw.update(diversity_bonus=config.diversity_bonus, diversity_max_crops=config.diversity_max_crops,
                  diversity_min_dist=config.diversity_min_dist)

    def reward(inp: RewardInput) -> dict[str, float]:
        return fn(inp, **kw)

    reward.__name__ = name
    return reward


__all__ = ["PARTS", "PRESETS", "RewardInput", "build_reward", "count_distinct", "diversity_bonus_value",
           "get_reward", "grounded_thinking", "load_reward", "multiturn", "vanilla_thinking"]
