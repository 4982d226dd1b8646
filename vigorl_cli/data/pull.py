"""`vigorl data pull`: fetch the released ViGoRL data (HF dataset ``gsarch/vigorl_datasets``) into DATA_ROOT.

The release is one tar per subset (reference §3.1): ``spatial_reasoning.tar`` (11.2 GB), ``visual_search.tar``
(12.3 GB), ``web_action.tar`` (203 MB), ``web_grounding.tar`` (12.7 GB), plus two optional tars of multi-turn
visual-search crops (``MCTS_VSTAR_20250514_134727_images_{1,2}.tar``, 88 GB, only for multi-turn V* SFT).

Compared with the reference's ``download_data.py`` (which snapshots the whole repository, 125 GB):
* only the requested subsets are downloaded; huggingface_hub resumes interrupted downloads;
* tars are unpacked with tarfile's ``data`` filter (no absolute paths or ``..`` escapes) into a temporary folder
  and moved into place, and a marker ``.vigorl/pulled-<subset>.json`` is written last, so a second run does
  nothing and a killed run never leaves a subset that looks complete but is not;
* ``--source DIR`` takes a local mirror (the tars, or already unpacked subset folders) for offline machines.

The two crop tars are the parts of one folder. Each part's contents (whatever wrapper folder the tar puts them in:
``MCTS_VSTAR_20250514_134727_images_{1,2}/``, ``MCTS_VSTAR_20250514_134727_images/`` or
``visual_search/MCTS_VSTAR_20250514_134727_images/``) are merged into
``visual_search/MCTS_VSTAR_20250514_134727_images/``, the folder the ``_MULTITURN`` SFT json names (reference §3.1,
§3.2; the reference's ``download_data.py`` untars each part and moves its contents there). A part that is unpacked
gets its own marker, so a pull killed after the first 44 GB part does not fetch that part again.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vigorl_cli.data.io import atomic_write_json
from vigorl_cli.errors import DataError

REPO_ID = "gsarch/vigorl_datasets"
SUBSETS = ("spatial_reasoning", "visual_search", "web_action", "web_grounding")
MCTS_IMAGE_TARS = ("MCTS_VSTAR_20250514_134727_images_1.tar", "MCTS_VSTAR_20250514_134727_images_2.tar")
MCTS_IMAGES = "visual_search_mcts_images"  # pseudo-subset: the crops of the multi-turn V* SFT data
MCTS_IMAGES_DIR = "visual_search/MCTS_VSTAR_20250514_134727_images"


def _marker(root: Path, subset: str) -> Path:
    return root / ".vigorl" / f"pulled-{subset}.json"


def _part_marker(root: Path, tar_name: str) -> Path:
    return root / ".vigorl" / f"unpacked-{tar_name}.json"


def is_pulled(root: str | Path, subset: str) -> bool:
    return _marker(Path(root), subset).is_file()


def _tars_for(subset: str) -> tuple[str, ...]:
    return MCTS_IMAGE_TARS if subset == MCTS_IMAGES else (f"{subset}.tar",)


# wrapper folders a crop-image part may put its files in; their contents go into MCTS_IMAGES_DIR
_MCTS_WRAPPERS = ("visual_search", Path(MCTS_IMAGES_DIR).name, *(Path(t).stem for t in MCTS_IMAGE_TARS))


def _unwrap(folder: Path) -> Path:
    """The folder holding a crop-image part's files: descend through known wrapper folders that are alone."""
    while True:
        items = list(folder.iterdir())
        if len(items) == 1 and items[0].is_dir() and items[0].name in _MCTS_WRAPPERS:
            folder = items[0]
        else:
            return folder


def _extract(tar_path: Path, dest: Path, mcts_part: bool = False) -> None:
    """Unpack ``tar_path`` into ``dest`` safely, via a temporary folder on the same filesystem.

    ``mcts_part``: ``tar_path`` is one part of the multi-turn V* crops; its files are merged into
    ``dest/visual_search/MCTS_VSTAR_20250514_134727_images/`` whatever wrapper folder the tar uses."""
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest))
    try:
        try:
            with tarfile.open(tar_path) as tf:
                tf.extractall(tmp, filter="data")
        except tarfile.TarError as e:  # corrupt, truncated, or a member escaping the destination
            raise DataError(f"cannot unpack {tar_path}: {type(e).__name__}: {e}",
                            hint="delete the file and pull again") from None
        if mcts_part:
            target = dest / MCTS_IMAGES_DIR
            target.mkdir(parents=True, exist_ok=True)
            _merge_dirs(_unwrap(tmp), target)
            return
        for item in tmp.iterdir():
            target = dest / item.name
            if target.exists() and target.is_dir() and item.is_dir():
                _merge_dirs(item, target)
            else:
                if target.exists():
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
                os.replace(item, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_dirs(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        target = dst / item.name
        if item.is_dir() and target.is_dir():
            _merge_dirs(item, target)
        else:
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(item, target)


def _from_source(source: Path, root: Path, subset: str) -> None:
    mcts = subset == MCTS_IMAGES
    tars = [source / t for t in _tars_for(subset)]
    if all(t.is_file() for t in tars):
        for t in tars:
            if mcts and _part_marker(root, t.name).is_file():
                continue
            _extract(t, root, mcts_part=mcts)
            if mcts:
                atomic_write_json(_part_marker(root, t.name), {"tar": t.name, "source": str(source)})
        return
    folder = source / (MCTS_IMAGES_DIR if mcts else subset)
    if folder.is_dir():
        dest = root / (MCTS_IMAGES_DIR if mcts else subset)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, dest, dirs_exist_ok=True)
        return
    parts = [source / Path(t).stem for t in MCTS_IMAGE_TARS]
    if mcts and all(p.is_dir() for p in parts):  # the two parts, already unpacked
        dest = root / MCTS_IMAGES_DIR
        dest.mkdir(parents=True, exist_ok=True)
        for p in parts:
            shutil.copytree(_unwrap(p), dest, dirs_exist_ok=True)
        return
    raise DataError(f"local mirror {source} has neither {', '.join(_tars_for(subset))} nor a {folder.name}/ folder",
                    hint="point --source at a folder holding the released tars (or unpacked subset folders)")


def _from_hub(root: Path, subset: str, revision: str | None) -> None:
    from huggingface_hub import hf_hub_download

    mcts = subset == MCTS_IMAGES
    for name in _tars_for(subset):
        if mcts and _part_marker(root, name).is_file():
            continue  # this part was unpacked by an earlier, interrupted pull
        try:
            path = hf_hub_download(REPO_ID, name, repo_type="dataset", revision=revision,
                                   local_dir=root / ".vigorl" / "downloads")
        except Exception as e:  # noqa: BLE001  # offline, no network, gated: one line, never a traceback
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            reason = "HF_HUB_OFFLINE=1 is set" if offline else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            raise DataError(f"cannot download {name} from the Hugging Face Hub ({reason})",
                            hint="on an offline machine pass --source DIR with a local mirror of "
                                 f"{REPO_ID} (its tars or unpacked folders)") from None
        _extract(Path(path), root, mcts_part=mcts)
        if mcts:
            atomic_write_json(_part_marker(root, name), {"tar": name, "source": REPO_ID, "revision": revision})
        Path(path).unlink(missing_ok=True)  # the reference deletes the tar after unpacking too


def pull(root: str | Path, subsets: list[str] | None = None, source: str | Path | None = None,
         revision: str | None = None, on_event: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """Fetch ``subsets`` (default: the four main ones) into ``root``. Returns ``{subset: "pulled"|"present"}``."""
    root = Path(root)
    chosen = list(subsets or SUBSETS)
    bad = [s for s in chosen if s not in (*SUBSETS, MCTS_IMAGES)]
    if bad:
        raise DataError(f"unknown subset(s) {', '.join(bad)}; choose from {', '.join((*SUBSETS, MCTS_IMAGES))}")
    if source is not None and not Path(source).is_dir():
        raise DataError(f"--source {source} is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    for subset in chosen:
        if is_pulled(root, subset):
            status[subset] = "present"
            if on_event:
                on_event(subset, "present")
            continue
        if on_event:
            on_event(subset, "start")
        t0 = time.time()
        if source is not None:
            _from_source(Path(source), root, subset)
        else:
            _from_hub(root, subset, revision)
        atomic_write_json(_marker(root, subset), {"subset": subset, "source": str(source) if source else REPO_ID,
                                                  "revision": revision, "seconds": round(time.time() - t0, 2)})
        status[subset] = "pulled"
        if on_event:
            on_event(subset, "pulled")
    return status


def describe(root: str | Path) -> list[dict]:
    """What is under ``root``: per subset, whether it was pulled and how many data files it holds."""
    root = Path(root)
    rows = []
    for subset in (*SUBSETS, MCTS_IMAGES):
        folder = root / (MCTS_IMAGES_DIR if subset == MCTS_IMAGES else subset)
        n = sum(1 for p in folder.rglob("*") if p.suffix in (".json", ".jsonl")) if folder.is_dir() else 0
        marker = _marker(root, subset)
        rows.append({"subset": subset, "pulled": marker.is_file(), "files": n,
                     "info": json.loads(marker.read_text()) if marker.is_file() else None})
    return rows
