"""Readers and writers for the formats the released ViGoRL data uses (reference §1.2, §3.3), all through Sample.

==============  =======================================================================  =================
format          one record                                                               used for
==============  =======================================================================  =================
``llava``       ``{"id", "image", "conversations": [{"from": "human", ...}, {"from":     MCTS and eval input
                "gpt", ...}]}``
``rl``          ``{"problem": "<image>...", "answer": "...", "images": ["..."]}``         GRPO train / val
``sharegpt``    ``{"id", "messages": [{"role", "content"}...], "images": [...],          SFT (single- and
                "gt_answer", "metadata"}``                                               multi-turn)
``vigorl``      :meth:`Sample.to_dict` (our own, every field explicit)                   anything
==============  =======================================================================  =================

Round trips are lossless: ``record → Sample → record`` gives back the same dict (unknown keys are kept in
``Sample.meta["extra"]``), and ``Sample → record → Sample`` gives back the same Sample (fields a format cannot
express are kept under a ``"vigorl"`` key, which the reference's loaders ignore).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigorl_cli.data.io import LineError, ReadResult, atomic_write_json, read_json_or_jsonl, write_jsonl
from vigorl_cli.data.schema import Sample, Target, infer_target, infer_task, parse_choices
from vigorl_cli.errors import DataError

FORMATS = ("llava", "rl", "sharegpt", "vigorl")
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def detect_format(record: dict) -> str | None:
    if "conversations" in record:
        return "llava"
    if "messages" in record:
        return "sharegpt"
    if "problem" in record:
        return "rl"
    if "question" in record and "id" in record and "images" in record:
        return "vigorl"
    return None


# -- the "vigorl" key: what a foreign format cannot express -----------------------------------------------------

def _derived(s: Sample) -> tuple[list[str] | None, Target | None, str]:
    choices = parse_choices(s.question)
    target = infer_target(s.answer)
    return choices, target, infer_task(s.answer, choices, target)


def _vigorl_extras(s: Sample, meta_consumed: set[str]) -> dict:
    choices, target, task = _derived(s)
    out: dict[str, Any] = {}
    if s.choices != choices:
        out["choices"] = s.choices
    if (s.target.to_dict() if s.target else None) != (target.to_dict() if target else None):
        out["target"] = s.target.to_dict() if s.target else None
    if s.task != task:
        out["task"] = s.task
    meta = {k: v for k, v in s.meta.items() if k not in meta_consumed}
    if meta:
        out["meta"] = meta
    return out


def _apply_vigorl_extras(s: Sample, extras: dict | None) -> Sample:
    if not extras:
        return s
    if "choices" in extras:
        s.choices = extras["choices"]
    if "target" in extras:
        s.target = Target.from_dict(extras["target"]) if extras["target"] else None
    if "task" in extras:
        s.task = extras["task"]
    s.meta.update(extras.get("meta") or {})
    return s


def _finish(s: Sample) -> Sample:
    s.choices, s.target, s.task = _derived(s)
    return s


def _id_of(record: dict, fallback: str, meta: dict) -> str:
    if "id" not in record:
        meta["id_generated"] = True
        return fallback
    if isinstance(record["id"], int) and not isinstance(record["id"], bool):
        meta["id_type"] = "int"
    return str(record["id"])


def _id_back(s: Sample) -> dict:
    if s.meta.get("id_generated"):
        return {}
    return {"id": int(s.id) if s.meta.get("id_type") == "int" else s.id}


_BOOKKEEPING = {"id_generated", "id_type", "extra", "image_field", "conversations"}

# -- LLaVA conversations ----------------------------------------------------------------------------------------

_LLAVA_KEYS = {"id", "image", "conversations", "vigorl"}


def llava_to_sample(record: dict, fallback_id: str = "0") -> Sample:
    meta: dict[str, Any] = {}
    sid = _id_of(record, fallback_id, meta)
    conv = record.get("conversations")
    if not isinstance(conv, list) or len(conv) < 1 or not all(isinstance(c, dict) and "value" in c for c in conv):
        raise ValueError("'conversations' must be a list of {'from', 'value'} turns")
    standard = (len(conv) == 2 and [c.get("from") for c in conv] == ["human", "gpt"]
                and all(set(c) == {"from", "value"} for c in conv))
    if not standard:
        meta["conversations"] = conv  # kept verbatim; question/answer are the first human / gpt turns
    question = next((c["value"] for c in conv if c.get("from") == "human"), conv[0]["value"])
    answer = next((c["value"] for c in conv if c.get("from") == "gpt"), "")
    img = record.get("image")
    if isinstance(img, list):
        images = [str(p) for p in img]
        if len(images) == 1:
            meta["image_field"] = "list"  # a one-element list, written back as a list
    elif img is None:
        images = []
        if "image" in record:
            meta["image_field"] = "null"
    else:
        images = [str(img)]
    extra = {k: v for k, v in record.items() if k not in _LLAVA_KEYS}
    if extra:
        meta["extra"] = extra
    s = _finish(Sample(id=sid, images=images, question=str(question), answer=str(answer), meta=meta))
    return _apply_vigorl_extras(s, record.get("vigorl"))


def sample_to_llava(s: Sample) -> dict:
    rec: dict[str, Any] = _id_back(s)
    field_kind = s.meta.get("image_field")
    if len(s.images) > 1 or (field_kind == "list" and s.images):
        rec["image"] = list(s.images)
    elif s.images:
        rec["image"] = s.images[0]
    elif field_kind == "null":
        rec["image"] = None
    rec["conversations"] = s.meta.get("conversations") or [{"from": "human", "value": s.question},
                                                            {"from": "gpt", "value": s.answer}]
    rec.update(s.meta.get("extra", {}))
    extras = _vigorl_extras(s, _BOOKKEEPING)
    if extras:
        rec["vigorl"] = extras
    return rec


# -- EasyR1 RL jsonl ----------------------------------------------------------------------------------------------

_RL_KEYS = {"id", "problem", "answer", "images", "vigorl"}


def rl_to_sample(record: dict, fallback_id: str = "0") -> Sample:
    meta: dict[str, Any] = {}
    sid = _id_of(record, fallback_id, meta)
    if not isinstance(record.get("problem"), str):
        raise ValueError("'problem' must be a string")
    images = record.get("images", [])
    if isinstance(images, str):
        meta["image_field"] = "str"
        images = [images]
    extra = {k: v for k, v in record.items() if k not in _RL_KEYS}
    if extra:
        meta["extra"] = extra
    s = _finish(Sample(id=sid, images=[str(p) for p in images], question=record["problem"],
                       answer=str(record.get("answer", "")), meta=meta))
    return _apply_vigorl_extras(s, record.get("vigorl"))


def sample_to_rl(s: Sample) -> dict:
    rec: dict[str, Any] = _id_back(s)
    rec["problem"] = s.question
    rec["answer"] = s.answer
    rec["images"] = s.images[0] if s.meta.get("image_field") == "str" and len(s.images) == 1 else list(s.images)
    rec.update(s.meta.get("extra", {}))
    extras = _vigorl_extras(s, _BOOKKEEPING)
    if extras:
        rec["vigorl"] = extras
    return rec


# -- sharegpt SFT --------------------------------------------------------------------------------------------------

@dataclass
class SFTRecord:
    """One SFT conversation as LLaMA-Factory's sharegpt format holds it.

    ``messages`` are ``{"role": "system"|"user"|"assistant", "content": str}``; every ``<image>`` in a content
    string consumes the next entry of ``images`` (the question image first, then one per observation crop).
    """

    id: str | None
    messages: list[dict]
    images: list[str] = field(default_factory=list)
    gt_answer: str | None = None
    metadata: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_image_slots(self) -> int:
        return sum(str(m.get("content", "")).count("<image>") for m in self.messages)

    @property
    def is_multiturn(self) -> bool:
        return sum(1 for m in self.messages if m.get("role") == "assistant") > 1

    @classmethod
    def from_dict(cls, d: dict) -> "SFTRecord":
        msgs = d.get("messages")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise ValueError("'messages' must be a list of {'role', 'content'} dicts")
        bad = [m["role"] for m in msgs if m["role"] not in ("system", "user", "assistant", "tool", "observation")]
        if bad:
            raise ValueError(f"unknown message roles {bad}")
        images = d.get("images", [])
        if isinstance(images, str):
            images = [images]
        known = {"id", "messages", "images", "gt_answer", "metadata"}
        return cls(id=None if d.get("id") is None else d["id"], messages=msgs, images=list(images),
                   gt_answer=d.get("gt_answer"), metadata=d.get("metadata"),
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.id is not None:
            d["id"] = self.id
        if self.metadata is not None:
            d["metadata"] = self.metadata
        d["messages"] = self.messages
        d["images"] = self.images
        if self.gt_answer is not None:
            d["gt_answer"] = self.gt_answer
        d.update(self.extra)
        return d

    def to_sample(self, fallback_id: str = "0") -> Sample:
        """The question (first user turn) and its ground truth (``gt_answer`` or the final ``<answer>``)."""
        user = next((m["content"] for m in self.messages if m["role"] == "user"), "")
        answer = self.gt_answer
        if answer is None:
            last = next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")
            m = _ANSWER_RE.search(last)
            answer = m.group(1).strip() if m else ""
        n_q = str(user).count("<image>") or (1 if self.images else 0)
        return _finish(Sample(id=str(self.id) if self.id is not None else fallback_id, images=self.images[:n_q],
                              question=str(user), answer=str(answer), meta={"sft_id": self.id}))


# -- file level -----------------------------------------------------------------------------------------------------

@dataclass
class SampleFile:
    """Samples read from one file, the format detected, and per-record errors (with line numbers)."""

    path: str
    format: str | None
    samples: list[Sample]
    errors: list[LineError]
    lines: list[int] = field(default_factory=list)  # source line (or item index) of each sample


_READERS = {"llava": llava_to_sample, "rl": rl_to_sample,
            "vigorl": lambda r, fallback_id="0": Sample.from_dict(r),
            "sharegpt": lambda r, fallback_id="0": SFTRecord.from_dict(r).to_sample(fallback_id)}
_WRITERS = {"llava": sample_to_llava, "rl": sample_to_rl, "vigorl": Sample.to_dict}


def read_samples(path: str | Path, fmt: str = "auto") -> SampleFile:
    """Read every record of ``path`` as a Sample. Bad records become errors; good ones are all returned."""
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"unknown data format {fmt!r}; expected one of auto, {', '.join(FORMATS)}")
    raw: ReadResult = read_json_or_jsonl(path)
    out = SampleFile(str(path), None if fmt == "auto" else fmt, [], list(raw.errors))
    stem = Path(path).stem
    for line, rec in raw.records:
        f = out.format or detect_format(rec)
        if f is None:
            out.errors.append(LineError(str(path), line, "schema",
                                        f"unknown record shape with keys {sorted(rec)[:6]}; expected one of "
                                        "'conversations' (llava), 'problem' (rl), 'messages' (sharegpt)"))
            continue
        out.format = out.format or f
        try:
            out.samples.append(_READERS[f](rec, fallback_id=f"{stem}-{line}"))
            out.lines.append(line)
        except (ValueError, KeyError, TypeError) as e:
            out.errors.append(LineError(str(path), line, "schema", str(e) if not isinstance(e, KeyError)
                                        else f"missing field {e}"))
    return out


def write_samples(path: str | Path, samples: Iterable[Sample], fmt: str = "vigorl") -> int:
    """Write Samples in ``fmt`` (JSONL; atomically). Returns the count."""
    if fmt not in _WRITERS:
        raise DataError(f"cannot write Samples as {fmt!r}; use one of {', '.join(_WRITERS)} "
                        "(SFT conversations are written with write_sft)")
    return write_jsonl(path, (_WRITERS[fmt](s) for s in samples))


def read_sft(path: str | Path) -> tuple[list[SFTRecord], list[LineError]]:
    raw = read_json_or_jsonl(path)
    recs, errors = [], list(raw.errors)
    for line, rec in raw.records:
        try:
            recs.append(SFTRecord.from_dict(rec))
        except (ValueError, TypeError, KeyError) as e:
            errors.append(LineError(str(path), line, "schema", str(e)))
    return recs, errors


def write_sft(path: str | Path, records: Iterable[SFTRecord]) -> int:
    """Write SFT records as a JSON array (the LLaMA-Factory sharegpt layout), atomically."""
    items = [r.to_dict() for r in records]
    if str(path).endswith(".jsonl"):
        return write_jsonl(path, items)
    atomic_write_json(path, items)
    return len(items)
