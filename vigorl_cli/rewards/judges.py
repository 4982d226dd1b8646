"""Judges: is this answer right? One scorer per kind, shared by MCTS, GRPO rewards and ``vigorl eval``.

Every judge has the same shape::

    judge(pred: str | None, gt: Sample | Target | str, *, compat: bool = False, **options) -> JudgeResult

``pred``
    The answer text, already extracted (``agent.parse.extract_answer``); ``None`` when the model gave no answer.
``gt``
    A :class:`Sample` (its ``target``/``answer``/``choices`` are used), a :class:`Target` (for a box or point that the
    caller has already converted to another frame), or the ground-truth string as released.
``compat``
    ``True`` reproduces the reference judge (``vigorl-reference.md`` §1.6 / §5.7) including its quirks; ``False``
    (default) applies the fixes listed in each judge's docstring.

**Coordinate frames.** Judges compare numbers in whatever frame they are given and never rescale. The caller converts
(``vision/frames.py``): either the prediction into the GT's frame, or the GT into the model-input frame passed as a
``Target``. A ``Sample.target`` is in the original image frame.

Scores are floats in [0, 1]. ``JudgeResult.failure`` is set only when the answer could not be read as intended
(a wrong but well-formed answer has ``failure=None`` and score 0), using the shared
:class:`~vigorl_cli.agent.parse.FailureKind` vocabulary so failures can be counted across the pipeline.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from vigorl_cli.agent.parse import FailureKind, find_points, literal_or_none
from vigorl_cli.data.schema import Sample, Target, parse_box, parse_choices, parse_point

GroundTruth = Union[Sample, Target, str]


@dataclass
class JudgeResult:
    """A judged answer. ``pred`` is what was compared after the judge's own normalisation or mapping (e.g. the option
    text a letter was mapped to), ``details`` holds judge-specific values for logs (parsed point, box, sub-scores)."""

    score: float
    pred: str | None = None
    failure: FailureKind | None = None
    details: dict[str, Any] = field(default_factory=dict)


Judge = Callable[..., JudgeResult]


# ---------------------------------------------------------------------------------------------------------------
# Ground-truth access
# ---------------------------------------------------------------------------------------------------------------

def _gt_text(gt: GroundTruth) -> str:
    if isinstance(gt, Sample):
        return gt.answer
    if isinstance(gt, Target):
        if gt.box is not None:
            return "(" + ", ".join(str(v) for v in gt.box) + ")"
        if gt.point is not None:
            return "(" + ", ".join(str(v) for v in gt.point) + ")"
        return gt.action or ""
    return str(gt)


def _literal_tuple(text: str) -> tuple | None:
    """``tuple(ast.literal_eval(text))`` as the reference does; ``None`` where it raises."""
    v = literal_or_none((text or "").strip())
    try:
        return tuple(v) if v is not None else None
    except TypeError:  # not iterable, e.g. "5"
        return None


def _raw_tuple(text: str) -> tuple | None:
    """``ast.literal_eval(text)`` when it is a tuple, else ``None`` (reference ``point_matching``)."""
    v = literal_or_none((text or "").strip())
    return v if isinstance(v, tuple) else None


def _safe(fn, text):
    try:
        return fn(text)
    except (ValueError, SyntaxError):  # schema parsers use literal_eval, which rejects e.g. leading zeros
        return None


def _gt_tuple(gt: GroundTruth, kind: str, compat: bool) -> tuple | None:
    """The GT box (``kind="box"``) or point as a tuple; from the Target when there is one, else parsed from the text."""
    target = gt if isinstance(gt, Target) else gt.target if isinstance(gt, Sample) else None
    if target is not None and getattr(target, kind) is not None:
        return tuple(getattr(target, kind))
    text = _gt_text(gt)
    if compat:
        return _literal_tuple(text)
    return _safe(parse_box if kind == "box" else parse_point, text) or _literal_tuple(text)


def _gt_choices(gt: GroundTruth, choices: list[str] | None) -> list[str] | None:
    if choices:
        return list(choices)
    if isinstance(gt, Sample):
        return list(gt.choices) if gt.choices else parse_choices(gt.question)
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------------------------
# string_match
# ---------------------------------------------------------------------------------------------------------------

_REF_PUNCT = ".?!,;:'\"()[]{}<>/\\|=+-_*&^%$#@`~"
_REF_TABLE = str.maketrans("", "", _REF_PUNCT + " ")


def normalize_reference(text: str) -> str:
    """Reference ``_remove_punctuation_spaces``: strip, delete ``. ? ! , ; : ' " ( ) [ ] { } < > / \\ | = + - _ * & ^
    % $ # @ ` ~`` and every space character ``" "`` (not tabs/newlines), lower-case."""
    return text.strip().translate(_REF_TABLE).strip().lower()


def string_match(pred: str | None, gt: GroundTruth, *, compat: bool = False) -> JudgeResult:
    """Reference eval/MCTS judge (§1.6): normalised **containment**, ``norm(gt.lower()) in norm(pred)``.

    Containment is the reference's definition and is kept in both modes, quirks included: GT ``left`` accepts
    ``not left, right`` (``"left" in "notleftright"``), and an option letter in front of the text does not hurt.
    Use :func:`multiple_choice` when the sample has options.

    Non-compat difference: a GT that normalises to the empty string scores 0 with ``bad_ground_truth`` (the
    reference scores every prediction 1.0 because ``"" in p`` is always true).
    """
    if pred is None:
        return JudgeResult(0.0, None, FailureKind.NO_ANSWER_TAG)
    g = normalize_reference(_gt_text(gt).lower())
    p = normalize_reference(pred)
    details = {"gt_norm": g, "pred_norm": p}
    if not g and not compat:
        return JudgeResult(0.0, pred, FailureKind.BAD_GROUND_TRUTH, details)
    if not p:
        return JudgeResult(1.0 if g == p else 0.0, pred, FailureKind.EMPTY_ANSWER, details)
    return JudgeResult(1.0 if (g == p or g in p) else 0.0, pred, None, details)


# ---------------------------------------------------------------------------------------------------------------
# multiple choice: letters mapped through the options
# ---------------------------------------------------------------------------------------------------------------

_PAREN_LETTER_RE = re.compile(r"^\s*\(([A-Z])\)\s*[\.:]?\s*(.*)$", re.DOTALL)
_LETTER_RE = re.compile(r"^\s*([A-Z])\s*(?:[\.\):]\s*(.*))?$", re.DOTALL)
_WORD_RE = re.compile(r"[^0-9a-z]+")


def _words(text: str) -> str:
    """Lower-case, every run of non-alphanumerics → one space: ``"(B) A is closer."`` → ``"b a is closer"``."""
    return _WORD_RE.sub(" ", text.lower()).strip()


def parse_letter(text: str) -> tuple[str, str] | None:
    """``(letter, rest)`` for letter answers ``B``, ``B.``, ``B)``, ``B:``, ``(B)``, ``B. text``, ``(B) text``;
    a lone lower-case letter counts too. ``None`` for anything else, e.g. ``"A is closer"`` (an option text)."""
    t = (text or "").strip()
    if len(t) == 1 and t.isalpha():
        return t.upper(), ""
    m = _PAREN_LETTER_RE.match(t) or _LETTER_RE.match(t)
    if not m:
        return None
    return m.group(1), (m.group(2) or "").strip()


def resolve_choice(answer: str, choices: list[str]) -> tuple[int | None, FailureKind | None]:
    """Index of the option ``answer`` names, or ``(None, failure)``.

    Order: (1) the whole answer equals one option's text (word-normalised); (2) a letter answer (see
    :func:`parse_letter`) within range; text after the letter must not equal a *different* option
    (``ambiguous_choice``), other text is commentary; (3) exactly one option occurs in the answer as whole words,
    after dropping options contained in a longer matching one (``"not left"`` beats ``"left"``); several →
    ``ambiguous_choice``, none → ``no_matching_choice``.
    """
    norm = [_words(c) for c in choices]
    a = _words(answer)
    if not a:
        return None, FailureKind.EMPTY_ANSWER
    exact = [i for i, c in enumerate(norm) if c == a]
    if len(exact) == 1:
        return exact[0], None
    letter = parse_letter(answer)
    if letter is not None:
        idx = ord(letter[0]) - ord("A")
        if 0 <= idx < len(choices):
            rest = _words(letter[1])
            if rest and rest != norm[idx] and rest in norm:
                return None, FailureKind.AMBIGUOUS_CHOICE
            return idx, None
    hits = [i for i, c in enumerate(norm) if c and f" {c} " in f" {a} "]
    hits = [i for i in hits
            if not any(j != i and norm[i] != norm[j] and f" {norm[i]} " in f" {norm[j]} " for j in hits)]
    if len(hits) == 1:
        return hits[0], None
    return None, FailureKind.AMBIGUOUS_CHOICE if hits else FailureKind.NO_MATCHING_CHOICE


def multiple_choice(pred: str | None, gt: GroundTruth, *, compat: bool = False,
                    choices: list[str] | None = None) -> JudgeResult:
    """Multiple-choice judge: map the answer to one option (letter or text), then compare with the GT option.

    Why: ViGoRL's GTs are option *texts* (V*, SAT-2, BLINK) judged by containment, so a model answering ``B`` scores
    0 and ``not left, right`` scores 1 (``benchmark-formats.md`` §1 pitfalls). Here ``B``, ``(B)``, ``B.`` and
    ``B. right`` are mapped through the options (``choices`` argument, else ``Sample.choices``, else options parsed from
    the question's ``A. text`` lines), answers naming two options are ``ambiguous_choice``, and the GT may itself be an
    option text or a letter (``"(B)"`` BLINK style). Without options the letter cannot be mapped: the answer is
    compared with the GT by word-normalised equality (``details["fallback"] = "no_choices"``).

    ``compat=True`` is the reference: :func:`string_match` (letters score as wrong, containment quirk kept).
    """
    if compat:
        r = string_match(pred, gt, compat=True)
        r.details["mode"] = "string_match"
        return r
    if pred is None:
        return JudgeResult(0.0, None, FailureKind.NO_ANSWER_TAG)
    gt_text = _gt_text(gt)
    opts = _gt_choices(gt, choices)
    if not opts:
        ok = bool(_words(pred)) and _words(pred) == _words(gt_text)
        return JudgeResult(float(ok), pred, None if _words(pred) else FailureKind.EMPTY_ANSWER,
                           {"fallback": "no_choices"})
    idx, failure = resolve_choice(pred, opts)
    gt_idx, _ = resolve_choice(gt_text, opts)
    details: dict[str, Any] = {"choice": idx, "gt_choice": gt_idx, "choices": opts}
    if idx is None:
        return JudgeResult(0.0, pred, failure, details)
    if gt_idx is None:  # GT is not one of the options: compare texts
        details["gt_not_in_choices"] = True
        return JudgeResult(float(_words(opts[idx]) == _words(gt_text)), opts[idx], None, details)
    return JudgeResult(float(idx == gt_idx), opts[idx], None, details)


# ---------------------------------------------------------------------------------------------------------------
# exact_match (RL string rewards)
# ---------------------------------------------------------------------------------------------------------------

_OPTION_PREFIX_RE = re.compile(r"^[A-Za-z][\.\)]\s*(.*)")


def exact_match(pred: str | None, gt: GroundTruth, *, compat: bool = False, strip_option_prefix: bool = True,
                lowercase_gt: bool | None = None, choices: list[str] | None = None) -> JudgeResult:
    """RL string accuracy (§5.7): ``pred.lower() == gt.strip()`` after removing an ``A.``/``A)`` option prefix.

    ``strip_option_prefix``: single-turn reference rewards strip ``^[A-Za-z][\\.\\)]\\s*`` (note ``(.*)`` without
    DOTALL keeps only the first line); the multi-turn reward does not (pass ``False``).
    ``lowercase_gt``: the single-turn reference does NOT lower-case the GT (so a GT with capitals can never match);
    the multi-turn reference does. Default: ``not compat``.

    Non-compat differences: the GT is lower-cased (unless ``lowercase_gt=False``), and a bare letter answer
    (``B``, ``(B)``, ``B.``) is mapped to its option text when options are known (``choices`` / the Sample) before
    comparing; the reference would compare the letter itself and score 0.
    """
    if pred is None:
        return JudgeResult(0.0, None, FailureKind.NO_ANSWER_TAG)
    if lowercase_gt is None:
        lowercase_gt = not compat
    p = pred.strip()
    details: dict[str, Any] = {}
    if not compat:
        opts = _gt_choices(gt, choices)
        letter = parse_letter(p)
        if opts and letter is not None and not letter[1] and 0 <= ord(letter[0]) - ord("A") < len(opts):
            details["letter"] = letter[0]
            p = opts[ord(letter[0]) - ord("A")].strip()
    if strip_option_prefix and "letter" not in details:
        m = _OPTION_PREFIX_RE.match(p)
        if m:
            p = m.group(1).strip()
    g = _gt_text(gt).strip()
    if lowercase_gt:
        g = g.lower()
    failure = FailureKind.EMPTY_ANSWER if not p else None
    return JudgeResult(1.0 if p.lower() == g else 0.0, p.lower(), failure, details)


# ---------------------------------------------------------------------------------------------------------------
# points
# ---------------------------------------------------------------------------------------------------------------

def _pred_point(pred: str, compat: bool) -> tuple[tuple | None, FailureKind | None, str | None]:
    """(point, failure, how). Compat: ``tuple(literal_eval(pred))`` of two ints, as the reference.
    Non-compat: ``(x, y)``, ``[x, y]`` or ``x, y`` (ints or floats, trailing period allowed), else exactly one
    distinct point inside the text."""
    if compat:
        t = _literal_tuple(pred)
        if t is None or len(t) != 2 or not all(_is_number(v) for v in t):
            return None, FailureKind.NO_POINT, None
        if not all(_is_int(v) for v in t):
            return t, FailureKind.NON_INTEGER_COORDINATE, None
        return t, None, "literal"
    s = pred.strip().rstrip(".").strip()
    pt = _safe(parse_point, s)
    if pt is None:
        t = _literal_tuple(s)
        if t is not None and len(t) == 2 and all(_is_number(v) for v in t):
            pt = t
    if pt is not None:
        return tuple(pt), None, "whole"
    found = {m.xy for m in find_points(pred, brackets=True)}
    if len(found) == 1:
        return found.pop(), None, "embedded"
    return None, (FailureKind.MULTIPLE_POINTS if found else FailureKind.NO_POINT), None


def point_in_box(pred: str | None, gt: GroundTruth, *, compat: bool = False) -> JudgeResult:
    """1.0 iff the predicted point lies in the GT box, inclusive: ``x1 <= x <= x2 and y1 <= y <= y2`` (§1.6, §5.7).

    Compat (reference): prediction and GT are read with ``ast.literal_eval`` (so ``[x, y]`` and ``x, y`` also parse) and
    must be 2 / 4 ints; a float such as ``(12.5, 30.0)`` scores 0 (``non_integer_coordinate``).
    Non-compat: floats are accepted (a model working in a rescaled frame has no reason to be wrong by rounding), a
    trailing period is ignored, and a single point embedded in prose (``"at (12, 34)."``) is read; several different
    points are ``multiple_points``. The GT box comes from the Sample/Target when it has one.
    """
    if pred is None:
        return JudgeResult(0.0, None, FailureKind.NO_ANSWER_TAG)
    box = _gt_tuple(gt, "box", compat)
    if box is None or len(box) != 4 or not all((_is_int if compat else _is_number)(v) for v in box):
        return JudgeResult(0.0, pred, FailureKind.BAD_GROUND_TRUTH, {"box": box})
    pt, failure, how = _pred_point(pred, compat)
    details = {"point": pt, "box": box, "parsed_as": how}
    if failure is not None:
        return JudgeResult(0.0, pred, failure, details)
    x, y = pt
    x1, y1, x2, y2 = box
    return JudgeResult(1.0 if (x1 <= x <= x2 and y1 <= y <= y2) else 0.0, pred, None, details)


def point_match(pred: str | None, gt: GroundTruth, *, compat: bool = False, threshold: float = 50.0) -> JudgeResult:
    """1.0 iff the Euclidean distance between predicted and GT points is ``< threshold`` pixels (default 50, §1.6).

    Compat: both ``literal_eval`` tuples of ints of equal length (the reference allows any length). Non-compat: 2-D,
    floats allowed, same tolerant reading as :func:`point_in_box`. The reference never rescales point GTs at eval
    (``point_matching`` typo); here the caller passes the GT in the prediction's frame.
    """
    if pred is None:
        return JudgeResult(0.0, None, FailureKind.NO_ANSWER_TAG)
    if compat:  # reference: raw literal_eval, both must be tuples (a list "[x, y]" scores 0)
        g = tuple(gt.point) if isinstance(gt, Target) and gt.point is not None else _raw_tuple(_gt_text(gt))
        p = _raw_tuple(pred)
        if g is None or not g or not all(_is_int(v) for v in g):
            return JudgeResult(0.0, pred, FailureKind.BAD_GROUND_TRUTH, {"gt_point": g})
        if p is None or not all(_is_number(v) for v in p) or len(p) != len(g):
            return JudgeResult(0.0, pred, FailureKind.NO_POINT, {"gt_point": g})
        if not all(_is_int(v) for v in p):
            return JudgeResult(0.0, pred, FailureKind.NON_INTEGER_COORDINATE, {"gt_point": g, "point": p})
    else:
        g = _gt_tuple(gt, "point", compat)
        if g is None or len(g) != 2 or not all(_is_number(v) for v in g):
            return JudgeResult(0.0, pred, FailureKind.BAD_GROUND_TRUTH, {"gt_point": g})
        p, failure, _ = _pred_point(pred, compat=False)
        if failure is not None:
            return JudgeResult(0.0, pred, failure, {"gt_point": g, "point": p})
    d = math.dist(p, g)
    return JudgeResult(1.0 if d < threshold else 0.0, pred, None, {"point": p, "gt_point": g, "distance": d})


# ---------------------------------------------------------------------------------------------------------------
# web actions
# ---------------------------------------------------------------------------------------------------------------

_FIRST_INT_BRACKET_RE = re.compile(r"\[(\d+)\]")
_FIRST_BRACKET_RE = re.compile(r"\[(.*?)\]")


def _web_action_rl(pred: str, gt: str) -> JudgeResult:
    """Reference RL scorer ``web_action*.py::accuracy_reward`` (§5.7), exact, no lower-casing."""
    p, g = pred.strip(), gt.strip()
    if "go_back" in p:
        return JudgeResult(float("go_back" in g), p, None, {"verb": "go_back"})
    if "stop" in p:
        return JudgeResult(float("stop" in g), p, None, {"verb": "stop"})
    if "scroll" in p:
        same = ("[down]" in p and "[down]" in g) or ("[up]" in p and "[up]" in g)
        return JudgeResult(float(same), p, None, {"verb": "scroll"})
    for verb, rx in (("click", _FIRST_INT_BRACKET_RE), ("type", _FIRST_BRACKET_RE)):
        if verb in p:
            pm, gm = rx.search(p), rx.search(g)
            if not pm or not gm:
                return JudgeResult(0.0, p, FailureKind.BAD_ACTION if not pm else None, {"verb": verb})
            type_score = 0.5 * (verb in g)
            arg_score = 0.5 * (pm.group(1).strip() == gm.group(1).strip())
            return JudgeResult(type_score + arg_score, p, None,
                               {"verb": verb, "type_score": type_score, "arg_score": arg_score})
    return JudgeResult(0.0, p, FailureKind.UNKNOWN_ACTION)


def _web_action_eval(pred: str, gt: str) -> JudgeResult:
    """Reference eval judge ``judge.py::_web_action`` (§1.6), exact: lower-cased, substring tests, binary."""
    p, g = pred.strip().lower(), gt.strip().lower()
    if "go_back" in p:
        return JudgeResult(float("go_back" in g), p, None, {"verb": "go_back"})
    if "stop" in p:
        return JudgeResult(float("stop" in g), p, None, {"verb": "stop"})
    if "scroll" in p:  # direction ignored
        return JudgeResult(float("scroll" in g), p, None, {"verb": "scroll"})
    if "click" in p:
        parts = p.split(" ")
        if len(parts) != 2:  # reference: tuple unpacking raises → 0
            return JudgeResult(0.0, p, FailureKind.BAD_ACTION, {"verb": "click"})
        return JudgeResult(float("click" in g and parts[1].strip() in g), p, None, {"verb": "click"})
    if "type" in p:
        parts = p.split(" ")
        if len(parts) != 3:  # content with spaces breaks the reference's unpacking
            return JudgeResult(0.0, p, FailureKind.BAD_ACTION, {"verb": "type"})
        return JudgeResult(float("type" in g and parts[1].strip() in g), p, None, {"verb": "type"})
    return JudgeResult(0.0, p, FailureKind.UNKNOWN_ACTION)


# VisualWebArena's action space (id-based): verb → the arguments that must match for the argument credit
WEB_ACTIONS: dict[str, tuple[str, ...]] = {
    "click": ("id",), "hover": ("id",), "type": ("id", "text"), "press": ("key",), "scroll": ("direction",),
    "new_tab": (), "tab_focus": ("index",), "close_tab": (), "goto": ("url",), "go_back": (), "go_forward": (),
    "stop": ("answer",),
}
_ACTION_RE = re.compile(r"(?<![A-Za-z_])(" + "|".join(sorted(WEB_ACTIONS, key=len, reverse=True))
                        + r")(?![A-Za-z_])((?:\s*\[[^\]]*\])*)", re.IGNORECASE)


def parse_web_action(text: str) -> tuple[str, dict[str, str]] | None:
    """``(verb, args)`` of the first VWA action in ``text`` (``click [12]``, ``type [5] [red shoes] [1]``,
    ``scroll [direction=down]``, ``stop [42]``, ``go_back``), or ``None`` when there is none.

    ``args`` holds the normalised arguments the verb takes (see :data:`WEB_ACTIONS`): element ids and tab indices as
    digit strings, the direction without ``direction=``, text, keys, URLs and answers with whitespace collapsed and
    case folded. A verb whose required argument is missing or malformed (``click here``) gives ``args["error"]``.
    ``type``'s optional third argument (``press_enter_after``) is not compared."""
    m = _ACTION_RE.search(text or "")
    if m is None:
        return None
    verb = m.group(1).lower()
    raw = re.findall(r"\[([^\]]*)\]", m.group(2) or "")
    args: dict[str, str] = {}
    for name, value in zip(WEB_ACTIONS[verb], raw):
        v = " ".join(value.split()).casefold()
        if name == "direction":
            v = v.removeprefix("direction=").strip()
        args[name] = v
    need = WEB_ACTIONS[verb]
    if verb == "stop":  # `stop` alone (no answer) is a valid VWA action
        need = ()
    if len(raw) < len(need) or any(n in ("id", "index") and not args.get(n, "").isdigit() for n in need):
        args["error"] = f"{verb} needs " + " ".join(f"[{n}]" for n in WEB_ACTIONS[verb])
    return verb, args


def _web_action_strict(pred: str, gt: str) -> JudgeResult:
    """Ours: 0.5 for the same verb + 0.5 for the same arguments (only with the same verb), both parsed."""
    g = parse_web_action(gt)
    if g is None or "error" in g[1]:
        return JudgeResult(0.0, pred, FailureKind.BAD_GROUND_TRUTH, {"gt": gt})
    p = parse_web_action(pred)
    if p is None:
        return JudgeResult(0.0, pred, FailureKind.UNKNOWN_ACTION)
    (pv, pa), (gv, ga) = p, g
    if "error" in pa:
        return JudgeResult(0.0, pred, FailureKind.BAD_ACTION, {"verb": pv, "error": pa["error"]})
    type_score = 0.5 * (pv == gv)
    arg_score = 0.5 * (pv == gv and all(pa.get(k) == ga.get(k) for k in WEB_ACTIONS[gv]))
    return JudgeResult(type_score + arg_score, pred, None, {"verb": pv, "gt_verb": gv, "args": pa, "gt_args": ga,
                                                            "type_score": type_score, "arg_score": arg_score})


def web_action(pred: str | None, gt: GroundTruth, *, compat: bool = False, scorer: str | None = None) -> JudgeResult:
    """Next web action (``click [12]``, ``type [12] [text]``, ``scroll [down]``, ``go_back``, ``stop [answer]``).

    Default (``scorer="strict"``, ours): both actions are parsed (:func:`parse_web_action`); 0.5 when the verbs are
    equal, plus 0.5 when, with the same verb, the arguments are equal too: the element id for click/hover, the id
    **and** the typed text for type, the direction for scroll, the key for press, the URL for goto, the answer for
    stop (case and whitespace insensitive; verbs without arguments get the argument credit with the verb). A GT
    ``type [1] [click me]`` gives ``click [12]`` nothing: the reference scorers' bare ``"click" in gt`` test would
    give it 0.5 (RL) or compare substrings (eval).

    ``scorer="rl"``: the reference **RL** scorer (§5.7), exact, used by the GRPO reward presets because rewards must
    match the reference: verbs found by substring in the order go_back, stop, scroll, click, type; go_back/stop → 1
    iff the same word is in the GT; scroll → 1 iff both say ``[down]`` or both ``[up]``; click → 0.5·(``click`` in
    GT) + 0.5·(first ``[digits]`` equal); type → 0.5·(``type`` in GT) + 0.5·(first ``[...]`` equal: the element id;
    the typed text is not compared). Case-sensitive.

    ``compat=True`` (or ``scorer="eval"``): the reference **eval** judge (§1.6), binary and substring-based: click
    scores 1 when ``click`` is in the GT and the predicted ``[id]`` is a substring of the GT (``click [1]`` vs GT
    ``type [1] [click me]`` → 1), ``type`` content with spaces scores 0, scroll ignores the direction.
    """
    if pred is None:
        return JudgeResult(0.0, None, FailureKind.NO_ANSWER_TAG)
    g = _gt_text(gt)
    if not pred.strip():
        return JudgeResult(0.0, pred, FailureKind.EMPTY_ANSWER)
    scorer = scorer or ("eval" if compat else "strict")
    if scorer == "eval":
        r = _web_action_eval(pred, g)
    elif scorer == "rl":
        r = _web_action_rl(pred, g)
    elif scorer == "strict":
        r = _web_action_strict(pred, g)
    else:
        raise ValueError(f"web_action scorer {scorer!r}: expected strict, rl or eval")
    r.details["scorer"] = scorer
    return r


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------

JUDGES: dict[str, Judge] = {
    "string_match": string_match,
    "exact_match": exact_match,
    "multiple_choice": multiple_choice,
    "point_in_box": point_in_box,
    "point_match": point_match,
    "web_action": web_action,
}
_ALIASES = {"point_in_bbox": "point_in_box", "point_matching": "point_match"}  # reference --judge names

_TASK_JUDGE = {"multiple_choice": "multiple_choice", "vqa": "string_match", "grounding": "point_in_box",
               "web_action": "web_action"}


def get_judge(name: str) -> Judge:
    """The judge registered under ``name`` (reference names ``point_in_bbox`` / ``point_matching`` accepted)."""
    key = _ALIASES.get(name, name)
    if key not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; known: {', '.join(sorted(JUDGES))}")
    return JUDGES[key]


def judge_for_task(task: str) -> Judge:
    """Default judge per :data:`vigorl_cli.data.schema.TASKS` entry: multiple_choice → :func:`multiple_choice`,
    vqa → :func:`string_match`, grounding → :func:`point_in_box`, web_action → :func:`web_action`.
    (A grounding sample whose target is a point, not a box, needs :func:`point_match`: use :func:`judge_sample`.)"""
    if task not in _TASK_JUDGE:
        raise ValueError(f"no default judge for task {task!r}; known: {', '.join(sorted(_TASK_JUDGE))}")
    return JUDGES[_TASK_JUDGE[task]]


def judge_sample(pred: str | None, sample: Sample, *, judge: str | None = None, compat: bool = False,
                 **options) -> JudgeResult:
    """Judge ``pred`` against ``sample`` with ``judge`` (a registry name) or the sample's task default."""
    if judge is not None:
        fn = get_judge(judge)
    elif sample.task == "grounding" and sample.target is not None and sample.target.box is None \
            and sample.target.point is not None:
        fn = point_match
    else:
        fn = judge_for_task(sample.task)
    return fn(pred, sample, compat=compat, **options)


# ---------------------------------------------------------------------------------------------------------------
# Judging an answer given on a resized image (the one path eval and MCTS share)
# ---------------------------------------------------------------------------------------------------------------

def read_point(pred: str) -> tuple[float, float] | None:
    """One point from an answer, tolerant (``(x, y)``, ``[x, y]``, ``x, y``, floats, one point in prose)."""
    pt, failure, _ = _pred_point(pred, compat=False)
    return None if failure is not None or pt is None else (float(pt[0]), float(pt[1]))


def reference_scaled_target(target: Target, frame: Any) -> Target:
    """The reference's ground truth in the shown frame: each coordinate times the frame's scale, ``int()``-ed."""
    sx, sy = frame.scale

    def sc(v: float, s: float) -> int:
        return int(v * (1.0 / s))

    if target.box is not None:
        x1, y1, x2, y2 = target.box
        return Target(box=(sc(x1, sx), sc(y1, sy), sc(x2, sx), sc(y2, sy)), frame="shown")
    return Target(point=(sc(target.point[0], sx), sc(target.point[1], sy)), frame="shown")


def judge_in_frame(pred: str | None, sample: Sample, frame: Any, *, judge: str | None = None, compat: bool = False,
                   compat_target: Target | None = None) -> tuple[JudgeResult, tuple[float, float] | None]:
    """Judge ``pred``, given in ``frame``'s pixels (the image the model saw), against ``sample`` (original frame).

    Ours: a point answer is mapped to the original frame (``frame.to_original``, pixel-centre rule) and compared
    with the original ground truth, so answers made at two pixel limits score the same; returns the mapped point.
    ``compat``: the reference instead scales the ground truth into the shown frame with ``int()``
    (``compat_target`` overrides that target, e.g. eval's benchmark-resized frame) and uses its judge.
    """
    if sample.task == "grounding" and sample.target is not None and pred is not None:
        if compat:
            t = compat_target or reference_scaled_target(sample.target, frame)
            return get_judge(judge or ("point_in_box" if t.box is not None else "point_match"))(pred, t,
                                                                                               compat=True), None
        pt = read_point(pred)
        if pt is not None:
            X, Y = frame.to_original(pt, exact=True, check=False)
            return judge_sample(f"({X:.3f}, {Y:.3f})", sample, judge=judge, compat=False), (X, Y)
    return judge_sample(pred, sample, judge=judge, compat=compat), None
