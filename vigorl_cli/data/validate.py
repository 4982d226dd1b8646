"""``vigorl data validate``: check data files before a long run reads them.

Every problem is a :class:`~vigorl_cli.data.io.LineError` with the file and the 1-based line (JSONL) or item index
(JSON array) it is on; line 0 means the whole file. Kinds:

=========================  ==========================================================================================
``missing_file``           the path does not exist
``empty``                  the file holds no records
``bad_json``               a line (or a ``.json`` document) is not valid JSON
``not_an_object``          a record is not a JSON object
``schema``                 a record does not have the shape of its file's format (llava / rl / sharegpt / vigorl)
``duplicate_id``           an id already used earlier in the same file (reported on the later line)
``no_image``               a record names no image (every ViGoRL task is about an image)
``missing_image``          an image file is not there
``corrupt_image``          an image file cannot be decoded
``image_count``            the number of ``<image>`` placeholders differs from the number of images (sharegpt and rl:
                           LLaMA-Factory and EasyR1 pair them one to one)
``bad_box``                a ground-truth box with ``x2 < x1`` or ``y2 < y1``
``out_of_bounds``          a ground-truth box or point outside its image
``answer_not_in_choices``  a multiple-choice answer that is none of the options (a letter is reported as such)
``answer_case``            an rl multiple-choice answer with capitals: the RL scorer lower-cases only the prediction
=========================  ==========================================================================================

Image paths are resolved against ``root``; with ``root=None`` a relative path is looked up next to the data file, then
in each folder above it (a file inside ``$DATA_ROOT`` finds ``$DATA_ROOT``), then in the working folder. Each image is
opened and decoded once per run, however many records name it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vigorl_cli.data.formats import SFTRecord, read_samples
from vigorl_cli.data.io import LineError, iter_files, read_json_or_jsonl
from vigorl_cli.data.schema import IMAGE_TOKEN, Sample
from vigorl_cli.errors import DataError

SKIP_NAMES = {"demo_manifest.json"}
_LETTER_RE = re.compile(r"^\(?([A-Z])[\.\)]?$")


@dataclass
class FileReport:
    """One row of the report: what was read from one file and what is wrong with it."""

    path: str
    format: str | None
    n_records: int = 0
    errors: list[LineError] = field(default_factory=list)
    _record_lines: set[int] = field(default_factory=set, repr=False)

    @property
    def n_errors(self) -> int:
        return len(self.errors)

    @property
    def n_ok(self) -> int:
        """Records with no problem at all."""
        bad = {e.line for e in self.errors if e.line in self._record_lines}
        return self.n_records - len(bad)

    @property
    def ok(self) -> bool:
        return not self.errors


@dataclass
class ValidationReport:
    files: list[FileReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when at least one file was checked and no file has an error."""
        return bool(self.files) and all(f.ok for f in self.files)

    @property
    def errors(self) -> list[LineError]:
        return [e for f in self.files for e in f.errors]

    @property
    def n_records(self) -> int:
        return sum(f.n_records for f in self.files)

    @property
    def n_errors(self) -> int:
        return sum(f.n_errors for f in self.files)


class _Images:
    """Image lookups for one run: path resolution and ``(width, height)`` or an error message, each cached."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root) if root is not None else None
        self._info: dict[Path, tuple[int, int] | str] = {}

    def bases(self, data_file: Path) -> list[Path]:
        if self.root is not None:
            return [self.root]
        here = data_file.resolve().parent
        return [here, *here.parents, Path.cwd()]

    def resolve(self, rel: str, bases: list[Path]) -> Path | None:
        p = Path(rel)
        if p.is_absolute():
            return p if p.is_file() else None
        for i, b in enumerate(bases):
            q = b / p
            if q.is_file():
                if i:  # try the folder that worked first next time
                    bases.insert(0, bases.pop(i))
                return q
        return None

    def info(self, path: Path) -> tuple[int, int] | str:
        if path not in self._info:
            try:
                with Image.open(path) as im:
                    im.verify()  # structure and checksums; the image is unusable afterwards
                with Image.open(path) as im:
                    im.load()  # full decode: catches truncated pixel data that verify() lets through
                    self._info[path] = im.size
            except Exception as e:  # noqa: BLE001 - any decoder failure means the file is unusable
                self._info[path] = f"{type(e).__name__}: {e}"
        return self._info[path]


def _is_json_document(path: Path) -> bool:
    """Mirrors io.read_json_or_jsonl: a .json file, or anything but .jsonl that starts with '['."""
    if path.suffix == ".json":
        return True
    if path.suffix == ".jsonl":
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(4096).lstrip().startswith("[")


def _sft_records(path: Path) -> dict[int, SFTRecord]:
    """The sharegpt records of ``path`` by line (``read_sft`` drops the line numbers)."""
    out = {}
    for line, rec in read_json_or_jsonl(path).records:
        try:
            out[line] = SFTRecord.from_dict(rec)
        except (ValueError, TypeError, KeyError):
            continue  # already reported as a schema error by read_samples
    return out


def _check_geometry(s: Sample, size: tuple[int, int], err) -> None:
    t = s.target
    if t is None or t.frame != "original":
        return
    w, h = size
    if t.box is not None:
        x1, y1, x2, y2 = t.box
        if x2 < x1 or y2 < y1:
            err("bad_box", f"box {s.answer.strip()} has x2 < x1 or y2 < y1")
        elif x1 < 0 or y1 < 0 or x2 > w or y2 > h:
            err("out_of_bounds", f"box {s.answer.strip()} is outside the {w}x{h} image")
    elif t.point is not None:
        x, y = t.point
        if not (0 <= x <= w and 0 <= y <= h):
            err("out_of_bounds", f"point {s.answer.strip()} is outside the {w}x{h} image")


def _check_choices(s: Sample, fmt: str, err) -> None:
    if s.task != "multiple_choice" or not s.choices:
        return
    ans = s.answer.strip()
    if ans.casefold() not in {c.strip().casefold() for c in s.choices}:
        m = _LETTER_RE.match(ans)
        if m and ord(m.group(1)) - 65 < len(s.choices):
            err("answer_not_in_choices", f"answer {ans!r} is a letter; the judges compare option text "
                                         f"({s.choices[ord(m.group(1)) - 65]!r})")
        else:
            err("answer_not_in_choices", f"answer {ans!r} is not one of the choices {s.choices}")
    elif fmt == "rl" and ans != ans.lower():
        err("answer_case", f"answer {ans!r} has capitals; the RL scorer lower-cases only the prediction, so it can "
                           "never match (write the answer in lower case)")


def validate_file(path: str | Path, images: _Images | None = None) -> FileReport:
    """Check one data file (see the module docstring for every check)."""
    path = Path(path)
    images = images or _Images(None)
    if not path.is_file():
        return FileReport(str(path), None, errors=[LineError(str(path), 0, "missing_file", "file not found")])
    try:
        sf = read_samples(path)
    except DataError as e:  # pragma: no cover - read_samples raises only for a missing file, handled above
        return FileReport(str(path), None, errors=[LineError(str(path), 0, "missing_file", str(e))])
    rep = FileReport(str(path), sf.format, errors=list(sf.errors))
    whole_file_broken = not sf.samples and _is_json_document(path) and any(e.kind == "bad_json" for e in sf.errors)
    if not whole_file_broken:
        rep._record_lines = set(sf.lines) | {e.line for e in sf.errors if e.line > 0}
    rep.n_records = len(rep._record_lines)
    if rep.n_records == 0 and not rep.errors:
        rep.errors.append(LineError(str(path), 0, "empty", "no records"))

    sft = _sft_records(path) if sf.format == "sharegpt" else {}
    bases = images.bases(path)
    seen: dict[str, int] = {}
    for s, line in zip(sf.samples, sf.lines):
        def err(kind: str, msg: str, _line: int = line) -> None:
            rep.errors.append(LineError(str(path), _line, kind, msg))

        has_id = not s.meta.get("id_generated") and not (sf.format == "sharegpt" and s.meta.get("sft_id") is None)
        if has_id:
            if s.id in seen:
                err("duplicate_id", f"id {s.id!r} is already used on line {seen[s.id]}")
            else:
                seen[s.id] = line

        rec = sft.get(line)
        all_images = rec.images if rec is not None else s.images
        if rec is not None and rec.n_image_slots != len(rec.images):
            err("image_count", f"{rec.n_image_slots} <image> placeholder(s) in the messages but "
                               f"{len(rec.images)} image(s)")
        elif sf.format == "rl" and s.question.count(IMAGE_TOKEN) != len(s.images):
            err("image_count", f"{s.question.count(IMAGE_TOKEN)} <image> placeholder(s) in 'problem' but "
                               f"{len(s.images)} image(s)")
        if not all_images:
            err("no_image", "the record names no image")
        sizes = []
        for rel in all_images:
            p = images.resolve(rel, bases)
            if p is None:
                err("missing_image", f"image not found: {bases[0] / rel if not Path(rel).is_absolute() else rel}")
                sizes.append(None)
                continue
            info = images.info(p)
            if isinstance(info, str):
                err("corrupt_image", f"cannot decode {p}: {info}")
                sizes.append(None)
            else:
                sizes.append(info)
        if sizes and sizes[0] is not None:
            _check_geometry(s, sizes[0], err)
        _check_choices(s, sf.format or "", err)
    rep.errors.sort(key=lambda e: e.line)
    return rep


def validate_paths(paths: list[str | Path], root: str | Path | None = None) -> ValidationReport:
    """Validate data files; folders expand to the ``.json`` / ``.jsonl`` files under them (minus the demo manifest)."""
    images = _Images(root)
    report = ValidationReport()
    for f in iter_files(paths):
        if f.name in SKIP_NAMES:
            continue
        report.files.append(validate_file(f, images))
    return report


def render_report(report: ValidationReport, console, max_errors: int = 20) -> None:
    """Print a table of counts per file, then the first ``max_errors`` errors by line."""
    from rich.markup import escape
    from rich.table import Table

    files = Table(title="Data files", show_lines=False)
    for col, kw in (("file", {}), ("format", {}), ("records", {"justify": "right"}), ("ok", {"justify": "right"}),
                    ("errors", {"justify": "right"})):
        files.add_column(col, **kw)
    for f in report.files:
        n_err = f"[red]{f.n_errors}[/red]" if f.n_errors else "0"
        files.add_row(escape(f.path), f.format or "-", str(f.n_records), str(f.n_ok), n_err)
    console.print(files)
    errors = report.errors
    if errors:
        shown = errors[:max_errors]
        t = Table(title=f"First {len(shown)} of {len(errors)} errors" if len(errors) > len(shown) else "Errors")
        t.add_column("where", overflow="fold")
        t.add_column("kind", style="red")
        t.add_column("message", overflow="fold")
        for e in shown:
            t.add_row(escape(f"{e.path}:{e.line}" if e.line else e.path), e.kind, escape(e.message))
        console.print(t)
    if not report.files:
        console.print("[red]no data files found[/red]")
    elif report.ok:
        console.print(f"[green]ok[/green]: {report.n_records} records in {len(report.files)} file(s), no problems")
    else:
        console.print(f"[red]{report.n_errors} problem(s)[/red] in {sum(not f.ok for f in report.files)} of "
                      f"{len(report.files)} file(s)")
