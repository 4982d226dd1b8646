"""Tolerant parsing of model output: ``<think>``, ``<answer>``, ``(x, y)`` points and ``<tool_call>`` JSON.

Every other module (MCTS, the episode loop, rewards, eval) reads model text through this file, so "what did the
model say" has one answer. Problems are not exceptions: each is a :class:`FailureKind` (a ``str`` enum, so it is
JSON-serialisable and can be counted with ``collections.Counter``) on the returned object. The same vocabulary is
used by :mod:`vigorl_cli.rewards.judges` for answer-content problems.

Two kinds of functions live here:

* **tolerant parsers** (:func:`parse_response`, :func:`parse_tool_call`, :func:`find_points`) that recover what a
  real model meant and say which tolerances they used, for the episode loop and for failure statistics;
* **strict format checks** (:func:`is_think_answer_format`, :func:`is_grounded`, :func:`multiturn_format_failure`)
  that reproduce the reference reward code exactly (``vigorl-reference.md`` §5.7), because rewards must teach the
  canonical format, not the tolerated one.

Reference behaviours reproduced (``vigorl-reference.md``):

* §1.5 answer extraction: text between the first ``<answer>`` and the next ``</answer>`` (or the end of the text
  when unclosed, as ``split`` does), stripped, then ``^[A-Z]\\. `` removed (:func:`extract_answer`, the letter
  stripping is the ``strip_letter`` parameter; single-path evaluation §1.8 does not strip, MCTS does).
* §1.8 ``format_check`` and the ``(<think>.*?</think>|<answer>.*?</answer>)`` block split
  (:func:`format_check`, :func:`split_blocks`).
* §5.7 single-turn ``FMT`` full match and the ``COORD`` grounding check (first think block,
  ``\\((\\d+)\\s*,\\s*(\\d+)\\)``, no space allowed after ``(``), and the multi-turn tag automaton.

Deliberate differences (tolerant side only; the strict checks are exact):

* :func:`parse_tool_call` accepts variants the reference rollout drops (it does
  ``json.loads(...)["arguments"]["coordinate"]`` and silently skips anything else): see its docstring for the list.
  Each accepted variant is named in ``ToolCall.tolerated`` so callers can count or reject them.
* :func:`check_point_in_image` uses the multi-turn linearizer's inclusive bounds ``0 <= x <= W, 0 <= y <= H``; the
  RL rollout and eval do not check at all (a crop outside the image silently yields a 1-pixel window).
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from dataclasses import dataclass, field
from enum import Enum

from vigorl_cli.data.schema import parse_point


class FailureKind(str, Enum):
    """Named, countable reasons a model output (or a judged answer) is not usable as intended."""

    # answer
    NO_ANSWER_TAG = "no_answer_tag"            # no <answer> at all (and no tool call in the same text)
    UNCLOSED_ANSWER = "unclosed_answer"        # <answer> without </answer>; the rest of the text is taken
    EMPTY_ANSWER = "empty_answer"              # <answer></answer> with only whitespace inside
    MULTIPLE_ANSWERS = "multiple_answers"      # more than one <answer>; the first one counts (reference)
    # think
    NO_THINK = "no_think"                      # no <think> at all
    UNCLOSED_THINK = "unclosed_think"          # <think> without </think>
    NO_POINT = "no_point"                      # no (x, y) anywhere it was expected (think text, tool call, answer)
    # tool calls
    BAD_TOOL_JSON = "bad_tool_json"            # <tool_call> body is neither JSON nor a Python literal dict
    TOOL_MISSING_COORDINATE = "tool_missing_coordinate"
    BAD_COORDINATE = "bad_coordinate"          # coordinate present but not two numbers
    NON_INTEGER_COORDINATE = "non_integer_coordinate"
    UNKNOWN_TOOL = "unknown_tool"              # a name that is neither search_coordinate nor a known alias
    MULTIPLE_TOOL_CALLS = "multiple_tool_calls"
    TOOL_CALL_WITH_ANSWER = "tool_call_with_answer"  # one turn holds both; the reference rollout takes the answer
    POINT_OUTSIDE_IMAGE = "point_outside_image"
    # multi-turn transcript (tag automaton, reference §5.7)
    MISSING_FINAL_ANSWER = "missing_final_answer"    # transcript does not end with </answer>
    BAD_TAG_ORDER = "bad_tag_order"                  # think → tool_call → observation → … → think → answer violated
    # judged answer content (used by rewards.judges)
    MULTIPLE_POINTS = "multiple_points"        # answer holds several different points; which one is meant is unclear
    AMBIGUOUS_CHOICE = "ambiguous_choice"      # answer names several options, or a letter contradicting its text
    NO_MATCHING_CHOICE = "no_matching_choice"  # answer matches no option (by letter or text)
    UNKNOWN_ACTION = "unknown_action"          # web action verb not recognised
    BAD_ACTION = "bad_action"                  # web action verb recognised but its arguments cannot be read
    BAD_GROUND_TRUTH = "bad_ground_truth"      # the ground truth itself cannot be used by this judge

    def __str__(self) -> str:  # "no_answer_tag", not "FailureKind.NO_ANSWER_TAG", in logs and f-strings
        return self.value


TOOL_NAME = "search_coordinate"
"""The crop tool's name in the reference prompts and SFT data (the paper calls it ``crop``)."""

TOOL_NAME_ALIASES = frozenset({"crop", "zoom", "zoom_in"})
"""Names accepted by :func:`parse_tool_call` as the crop tool (recorded as tolerated ``name_alias``)."""

_COORD_KEYS = ("coordinate", "coordinates", "point", "coord")

# Reference regexes (§5.7), kept verbatim.
_FMT_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
_FIRST_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_GROUNDED_COORD_RE = re.compile(r"\((\d+)\s*,\s*(\d+)\)")
_TAG_RE = re.compile(r"<(/?)(tool_call|observation|think|answer)>", re.IGNORECASE)
_ENDS_WITH_ANSWER_RE = re.compile(r"</answer>\s*(<\|im_end\|>)?\s*$", re.DOTALL)
_BLOCK_RE = re.compile(r"(<think>.*?</think>|<answer>.*?</answer>)", re.DOTALL)
_LETTER_PREFIX_RE = re.compile(r"^[A-Z]\. ")

# Tolerant regexes.
_NUM = r"([+-]?\d+(?:\.\d+)?)"
_POINT_PAREN_RE = re.compile(r"\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)")
_POINT_ANY_RE = re.compile(r"[\(\[]\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*[\)\]]")
_THINK_CLOSED_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_TOOL_OPEN = "<tool_call>"
_TOOL_CLOSE = "</tool_call>"
_FENCE_RE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)


# ---------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PointMatch:
    """One ``(x, y)`` found in text. ``span`` indexes the text that was searched (``parse_response``: the whole
    response). ``is_int`` is True when both numbers were written without a decimal point."""

    x: int | float
    y: int | float
    is_int: bool
    span: tuple[int, int]
    text: str

    @property
    def xy(self) -> tuple[int | float, int | float]:
        return (self.x, self.y)


@dataclass(frozen=True)
class ToolCall:
    """One ``<tool_call>`` block.

    ``coordinate`` is what the model asked for, even when ``failure`` is set for a reason that still leaves a
    usable point (``non_integer_coordinate``, ``unknown_tool``); callers decide whether to crop. ``tolerated`` lists
    the non-canonical variants that were accepted (see :func:`parse_tool_call`). ``span`` covers the whole block
    including its tags.
    """

    name: str | None
    coordinate: tuple[int | float, int | float] | None
    raw: str
    span: tuple[int, int]
    failure: FailureKind | None = None
    tolerated: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Usable: a coordinate of two integers was found and nothing is wrong with it."""
        return self.failure is None and self.coordinate is not None

    @property
    def strict(self) -> bool:
        """Exactly the canonical ``{"name": "search_coordinate", "arguments": {"coordinate": [int, int]}}``."""
        return self.ok and not self.tolerated and self.name == TOOL_NAME


@dataclass
class Parsed:
    """Everything :func:`parse_response` read from one model output. Spans index ``text``."""

    text: str
    thinks: list[str] = field(default_factory=list)             # inner text of each think block, in order
    think_spans: list[tuple[int, int]] = field(default_factory=list)  # spans of the inner text
    answer: str | None = None                                    # see extract_answer
    answer_span: tuple[int, int] | None = None                   # span of the inner text (before stripping)
    tool_calls: list[ToolCall] = field(default_factory=list)
    points: list[PointMatch] = field(default_factory=list)       # (x, y) written inside think blocks
    failures: list[FailureKind] = field(default_factory=list)    # unique, in the order found

    @property
    def tool_call(self) -> ToolCall | None:
        """The first tool call: the one the reference rollout executes."""
        return self.tool_calls[0] if self.tool_calls else None

    def _fail(self, kind: FailureKind) -> None:
        if kind not in self.failures:
            self.failures.append(kind)


# ---------------------------------------------------------------------------------------------------------------
# Answers, points, tool calls
# ---------------------------------------------------------------------------------------------------------------

def _answer_bounds(text: str) -> tuple[int, int, bool] | None:
    """(start, end, closed) of the inner text of the first ``<answer>``; unclosed runs to the end (reference split)."""
    i = text.find("<answer>")
    if i < 0:
        return None
    start = i + len("<answer>")
    j = text.find("</answer>", start)
    return (start, j, True) if j >= 0 else (start, len(text), False)


def extract_answer(text: str, strip_letter: bool = True) -> str | None:
    """The answer the reference MCTS would judge (§1.5), or ``None`` when there is no ``<answer>``.

    ``text.split("<answer>")[1].split("</answer>")[0].strip()``, then with ``strip_letter`` the option prefix
    ``^[A-Z]\\. `` ("B. left" → "left") is removed. An unclosed answer runs to the end of the text, as in the reference.
    Single-path evaluation (§1.8) does not strip the letter: pass ``strip_letter=False`` there.
    """
    b = _answer_bounds(text or "")
    if b is None:
        return None
    ans = text[b[0]:b[1]].strip()
    if strip_letter:
        ans = _LETTER_PREFIX_RE.sub("", ans)
    return ans


def literal_or_none(text: str) -> object | None:
    """``ast.literal_eval(text)``, or ``None`` where it raises (never evaluates code; a literal ``None`` also gives
    ``None``, which no caller accepts anyway). Python's ``SyntaxWarning`` for inputs such as ``"1a"`` is silenced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _num(s: str) -> int | float:
    return float(s) if "." in s else int(s)  # int("007") == 7, where literal_eval would raise


def find_points(text: str, brackets: bool = False) -> list[PointMatch]:
    """All ``(x, y)`` in ``text`` (also ``[x, y]`` with ``brackets``), ints or decimals, optional sign and spaces.

    Broader than the reference ``COORD`` regex (which needs non-negative integers and no space after ``(``): use
    :func:`is_grounded` for the reward gate and this for analysis, MCTS repeated-coordinate checks and answers.
    Four-number boxes ``(x1, y1, x2, y2)`` do not match.
    """
    rx = _POINT_ANY_RE if brackets else _POINT_PAREN_RE
    out = []
    for m in rx.finditer(text or ""):
        gx, gy = m.group(1), m.group(2)
        is_int = "." not in gx and "." not in gy
        out.append(PointMatch(_num(gx), _num(gy), is_int, m.span(), m.group(0)))
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _decode_body(body: str) -> tuple[object | None, list[str]]:
    """JSON first; then JSON followed by junk; then a Python literal (single quotes). Never evaluates code."""
    tolerated: list[str] = []
    s = body.strip()
    m = _FENCE_RE.match(s)
    if m:
        s = m.group(1).strip()
        tolerated.append("code_fence")
    try:
        return json.loads(s), tolerated
    except (ValueError, RecursionError):
        pass
    try:
        obj, end = json.JSONDecoder().raw_decode(s)
        if s[end:].strip():
            return obj, tolerated + ["trailing_text"]
    except (ValueError, RecursionError):
        pass
    if s[:1] in "{[":
        obj = literal_or_none(s)
        if obj is not None:
            return obj, tolerated + ["python_literal"]
    return None, tolerated


def _coordinate_from(value, tolerated: list[str]) -> tuple[tuple | None, FailureKind | None]:
    if isinstance(value, str):
        try:
            pt = parse_point(value)
        except (ValueError, SyntaxError):  # e.g. "(007, 5)": literal_eval rejects leading zeros
            pt = None
        if pt is None:
            return None, FailureKind.BAD_COORDINATE
        tolerated.append("coordinate_string")
        value = list(pt)
    elif isinstance(value, dict):
        if "x" in value and "y" in value:
            tolerated.append("xy_dict")
            value = [value["x"], value["y"]]
        else:
            return None, FailureKind.BAD_COORDINATE
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
        return None, FailureKind.BAD_COORDINATE
    coord = (value[0], value[1])
    if not all(_is_int(v) for v in coord):
        return coord, FailureKind.NON_INTEGER_COORDINATE
    return coord, None


def _parse_tool_body(body: str, span: tuple[int, int], unclosed: bool) -> ToolCall:
    obj, tol = _decode_body(body)
    if unclosed:
        tol.insert(0, "unclosed")

    def done(name=None, coord=None, failure=None):
        return ToolCall(name=name, coordinate=coord, raw=body, span=span, failure=failure, tolerated=tuple(tol))

    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        tol.append("list_wrapped")
        obj = obj[0]
    if not isinstance(obj, dict):
        return done(failure=FailureKind.BAD_TOOL_JSON)

    name = obj.get("name")
    name = name if isinstance(name, str) else None
    args = obj.get("arguments")
    if args is None and "parameters" in obj:
        tol.append("parameters_key")
        args = obj["parameters"]
    if isinstance(args, str):
        try:
            args = json.loads(args)
            tol.append("arguments_string")
        except ValueError:
            return done(name, failure=FailureKind.BAD_TOOL_JSON)
    if args is None and any(k in obj for k in _COORD_KEYS):
        tol.append("top_level_coordinate")
        args = obj
    if not isinstance(args, dict):
        return done(name, failure=FailureKind.TOOL_MISSING_COORDINATE)

    key = next((k for k in _COORD_KEYS if k in args), None)
    if key is None:
        return done(name, failure=FailureKind.TOOL_MISSING_COORDINATE)
    if key != "coordinate":
        tol.append("coordinate_key_alias")
    coord, failure = _coordinate_from(args[key], tol)

    if name is None:
        tol.append("no_name")
    elif name in TOOL_NAME_ALIASES:
        tol.append("name_alias")
    elif name != TOOL_NAME and failure is None:
        failure = FailureKind.UNKNOWN_TOOL
    return done(name, coord, failure)


def _iter_tool_calls(text: str) -> list[ToolCall]:
    calls = []
    pos = 0
    while True:
        i = text.find(_TOOL_OPEN, pos)
        if i < 0:
            return calls
        start = i + len(_TOOL_OPEN)
        j = text.find(_TOOL_CLOSE, start)
        if j < 0:  # unclosed: the stop string was not kept, or the model ran out of tokens
            calls.append(_parse_tool_body(text[start:], (i, len(text)), unclosed=True))
            return calls
        calls.append(_parse_tool_body(text[start:j], (i, j + len(_TOOL_CLOSE)), unclosed=False))
        pos = j + len(_TOOL_CLOSE)


def parse_tool_call(text: str) -> ToolCall | None:
    """The first ``<tool_call>…</tool_call>`` in ``text`` (the one the reference rollout executes), or ``None``.

    Canonical form (reference §10.10): ``{"name": "search_coordinate", "arguments": {"coordinate": [x, y]}}``.
    Tolerated variants, each recorded in ``ToolCall.tolerated`` under the name in brackets:

    * a missing ``</tool_call>`` at the end of the text [``unclosed``] (stop string not kept in the output);
    * a Markdown code fence around the JSON [``code_fence``]; text after the JSON object [``trailing_text``];
    * single-quoted Python dict syntax, read with ``ast.literal_eval`` [``python_literal``];
    * the object wrapped in a list ``[{...}]`` [``list_wrapped``];
    * ``"parameters"`` instead of ``"arguments"`` [``parameters_key``] (Llama style);
    * ``"arguments"`` as a JSON-encoded string [``arguments_string``] (OpenAI function-call style);
    * the coordinate at the top level, ``{"coordinate": [x, y]}`` [``top_level_coordinate``];
    * key ``coordinates`` / ``point`` / ``coord`` [``coordinate_key_alias``];
    * the coordinate as a string ``"(x, y)"`` / ``"[x, y]"`` [``coordinate_string``] or ``{"x": .., "y": ..}``
      [``xy_dict``];
    * no ``name`` [``no_name``], or the name ``crop`` / ``zoom`` / ``zoom_in`` [``name_alias``].

    Failures: ``bad_tool_json`` (unreadable body, or ``arguments`` a string that is not JSON),
    ``tool_missing_coordinate``, ``bad_coordinate`` (not two numbers), ``non_integer_coordinate`` (coordinate kept),
    ``unknown_tool`` (another name; coordinate kept). Rewards use :attr:`ToolCall.strict`, not this tolerance.
    """
    calls = _iter_tool_calls(text or "")
    return calls[0] if calls else None


def check_point_in_image(point, width: int, height: int) -> FailureKind | None:
    """``point_outside_image`` unless ``0 <= x <= width and 0 <= y <= height``.

    Inclusive bounds, as the reference multi-turn linearizer (``x > W or y > H or x < 0 or y < 0`` raises there).
    """
    x, y = point
    if 0 <= x <= width and 0 <= y <= height:
        return None
    return FailureKind.POINT_OUTSIDE_IMAGE


# ---------------------------------------------------------------------------------------------------------------
# Whole responses
# ---------------------------------------------------------------------------------------------------------------

def _think_blocks(text: str) -> tuple[list[tuple[int, int]], bool]:
    """Inner spans of closed think blocks, plus a trailing unclosed one (to the next answer/tool tag or the end)."""
    spans = [m.span(1) for m in _THINK_CLOSED_RE.finditer(text)]
    last_close = text.rfind("</think>")
    tail_open = text.find("<think>", last_close + len("</think>") if last_close >= 0 else 0)
    unclosed = tail_open >= 0
    if unclosed:
        start = tail_open + len("<think>")
        stops = [k for k in (text.find("<answer>", start), text.find(_TOOL_OPEN, start)) if k >= 0]
        spans.append((start, min(stops) if stops else len(text)))
    return spans, unclosed


def parse_response(text: str, *, image_size: tuple[int, int] | None = None, strip_letter: bool = True) -> Parsed:
    """Read one model output (a single-turn response or one assistant turn of a multi-turn episode).

    Records, as failure kinds: ``no_think``, ``unclosed_think``, ``no_answer_tag`` (only when there is no tool call
    either: a tool-call turn is not expected to answer), ``unclosed_answer``, ``empty_answer``, ``multiple_answers``,
    ``tool_call_with_answer``, ``multiple_tool_calls``, each tool call's own failure, ``point_outside_image`` (tool-call
    coordinates, when ``image_size=(width, height)`` is given) and ``no_point`` (no point in any think block and no
    tool-call coordinate). An unclosed think block still contributes its text and points.
    """
    text = text or ""
    p = Parsed(text=text)

    spans, unclosed = _think_blocks(text)
    p.think_spans = spans
    p.thinks = [text[a:b] for a, b in spans]
    if "<think>" not in text:
        p._fail(FailureKind.NO_THINK)
    if unclosed:
        p._fail(FailureKind.UNCLOSED_THINK)
    for a, b in spans:
        for m in find_points(text[a:b]):
            p.points.append(PointMatch(m.x, m.y, m.is_int, (a + m.span[0], a + m.span[1]), m.text))

    p.tool_calls = _iter_tool_calls(text)
    for tc in p.tool_calls:
        if tc.failure is not None:
            p._fail(tc.failure)
        if image_size is not None and tc.coordinate is not None:
            f = check_point_in_image(tc.coordinate, *image_size)
            if f is not None:
                p._fail(f)
    if len(p.tool_calls) > 1:
        p._fail(FailureKind.MULTIPLE_TOOL_CALLS)

    b = _answer_bounds(text)
    if b is None:
        if not p.tool_calls:
            p._fail(FailureKind.NO_ANSWER_TAG)
    else:
        p.answer = extract_answer(text, strip_letter=strip_letter)
        p.answer_span = (b[0], b[1])
        if not b[2]:
            p._fail(FailureKind.UNCLOSED_ANSWER)
        if not p.answer:
            p._fail(FailureKind.EMPTY_ANSWER)
        if text.count("<answer>") > 1:
            p._fail(FailureKind.MULTIPLE_ANSWERS)
        if p.tool_calls:
            p._fail(FailureKind.TOOL_CALL_WITH_ANSWER)

    if not p.points and not any(tc.coordinate is not None for tc in p.tool_calls):
        p._fail(FailureKind.NO_POINT)
    return p


# ---------------------------------------------------------------------------------------------------------------
# Strict format checks (reference-exact; used by rewards and eval)
# ---------------------------------------------------------------------------------------------------------------

def is_think_answer_format(text: str) -> bool:
    """Reference single-turn ``FMT`` (§5.7): the WHOLE text full-matches ``<think>.*?</think>\\s*<answer>.*?</answer>``.

    No leading or trailing text is allowed. Because ``.*?`` may span tags, several think blocks before the answer
    (or extra answer blocks) also match; that is the reference's behaviour and is kept.
    """
    return _FMT_RE.fullmatch(text or "") is not None


def is_grounded(text: str) -> bool:
    """Reference ``COORD`` gate (§5.7): the FIRST think block holds at least one ``(int, int)``.

    Regex ``\\((\\d+)\\s*,\\s*(\\d+)\\)``: non-negative integers, no space allowed after ``(`` (``( 12, 34)`` does not
    count). The reference docstring says two distinct points; its code (and this) needs one.
    """
    m = _FIRST_THINK_RE.search(text or "")
    return bool(m and _GROUNDED_COORD_RE.search(m.group(1)))


def format_check(node_text: str) -> bool:
    """Reference single-path ``format_check`` (§1.6): both ``<think>`` and ``</think>`` occur in the text."""
    return "<think>" in node_text and "</think>" in node_text


def split_blocks(text: str) -> list[str]:
    """Reference single-path upfront split (§1.8): each ``<think>…</think>`` / ``<answer>…</answer>`` block in order."""
    return _BLOCK_RE.findall(text or "")


_NEXT_STATE = {
    "think_open": {"<think>": "think_close"},
    "think_close": {"</think>": "post_think"},
    "post_think": {"<tool_call>": "tool_close", "<answer>": "answer_close"},
    "tool_close": {"</tool_call>": "obs_open"},
    "obs_open": {"<observation>": "obs_close"},
    "obs_close": {"</observation>": "think_open"},
    "answer_close": {"</answer>": "end"},
    "end": {},
}


def multiturn_format_failure(text: str) -> FailureKind | None:
    """The reference multi-turn tag automaton (§5.7), or ``None`` when the transcript passes.

    The stripped transcript must end with ``</answer>`` (optionally followed by ``<|im_end|>``) →
    else ``missing_final_answer``. Its tags (``think``, ``tool_call``, ``observation``, ``answer``; case-insensitive)
    must read ``think → (tool_call → observation → think)* → answer`` with nothing after ``</answer>`` → else
    ``bad_tag_order``. Other text between tags is free (the decoded reference transcript keeps role words such as
    ``user``/``assistant``). Tool-call JSON and the answer's shape are checked by the reward, not here.
    """
    s = (text or "").strip()
    if not _ENDS_WITH_ANSWER_RE.search(s):
        return FailureKind.MISSING_FINAL_ANSWER
    state = "think_open"
    for m in _TAG_RE.finditer(s):
        nxt = _NEXT_STATE[state].get(m.group(0).lower())
        if nxt is None:
            return FailureKind.BAD_TAG_ORDER
        state = nxt
    return None if state == "end" else FailureKind.BAD_TAG_ORDER


def is_multiturn_format(text: str) -> bool:
    """True when :func:`multiturn_format_failure` finds nothing wrong."""
    return multiturn_format_failure(text) is None
