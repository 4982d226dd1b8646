"""Small file helpers every long command uses: atomic writes, tolerant JSONL reading, append-only result files.

Rules they implement (see docs/design.md):
- a file that a later step reads is written to a temporary name in the same folder and renamed into place,
  so a kill never leaves a half-written file behind;
- result files are JSONL, one record per line, appended and flushed (``fsync``) per record; a torn last line
  from a kill is detected on resume and dropped, never parsed into garbage;
- a malformed line is reported with its line number and the other lines are still read.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigorl_cli.errors import DataError


@dataclass
class LineError:
    """One unreadable record: where it is and why."""

    path: str
    line: int  # 1-based; 0 when the whole file is affected
    kind: str  # "bad_json" | "not_an_object" | "schema" | "missing_image" | ...
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class ReadResult:
    """Records read from a file, each with its 1-based line (or list index + 1 for JSON arrays), plus errors."""

    records: list[tuple[int, dict]] = field(default_factory=list)
    errors: list[LineError] = field(default_factory=list)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write all ``records`` atomically as JSONL; returns the count."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_json_or_jsonl(path: str | Path) -> ReadResult:
    """Read a ``.json`` array (or single object) or a JSONL file.

    JSONL lines that are not valid JSON objects become :class:`LineError` s with their line number; the rest
    are still read. A ``.json`` file that does not parse is one error for the whole file. A missing file raises
    :class:`DataError` (nothing can be read at all).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}", hint="check the path, or run `vigorl data pull` / `vigorl data demo`")
    res = ReadResult()
    text = path.read_text(encoding="utf-8", errors="replace")
    stripped = text.lstrip()
    if path.suffix == ".json" or (stripped.startswith("[") and path.suffix != ".jsonl"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            res.errors.append(LineError(str(path), e.lineno, "bad_json", e.msg))
            return res
        items = obj if isinstance(obj, list) else [obj]
        for i, rec in enumerate(items, 1):
            if isinstance(rec, dict):
                res.records.append((i, rec))
            else:
                res.errors.append(LineError(str(path), i, "not_an_object", f"item {i} is {type(rec).__name__}"))
        return res
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            res.errors.append(LineError(str(path), i, "bad_json", f"{e.msg} (column {e.colno})"))
            continue
        if not isinstance(rec, dict):
            res.errors.append(LineError(str(path), i, "not_an_object", f"line holds a {type(rec).__name__}"))
            continue
        res.records.append((i, rec))
    return res


class ResultsFile:
    """An append-only JSONL file of per-item results that survives kills.

    ``done_ids()`` reads what is already there (a torn final line from a kill is truncated away), so a rerun
    skips finished items: nothing is lost and nothing is written twice.
    """

    def __init__(self, path: str | Path, id_key: str = "id"):
        self.path = Path(path)
        self.id_key = id_key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()
        self._f = None

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1  # drop the torn tail (written when the process was killed mid-line)
            with open(self.path, "r+b") as f:
                f.truncate(cut)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def done_ids(self) -> set[str]:
        return {str(r[self.id_key]) for r in self.read() if self.id_key in r}

    def append(self, record: dict) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_files(paths: Iterable[str | Path], suffixes: tuple[str, ...] = (".json", ".jsonl")) -> Iterator[Path]:
    """Expand folders into the data files they hold (sorted), keep files as given."""
    for p in paths:
        p = Path(p)
        if p.is_dir():
            yield from sorted(q for q in p.rglob("*") if q.suffix in suffixes and q.is_file())
        else:
            yield p
