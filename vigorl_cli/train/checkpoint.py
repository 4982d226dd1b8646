"""Checkpoints: an HF folder anyone can load, plus the state to resume training exactly. Written atomically.

Layout of ``<run>/checkpoints/step-000100/``::

    config.json, model*.safetensors, generation_config.json     save_pretrained (LoRA: adapter_config.json +
    tokenizer*, chat_template.jinja, preprocessor_config.json,   adapter_model.safetensors; `vigorl merge` makes
    processor_config.json                                        a full model of it)
    state/                                                       resumable: optimizer (+ sharded weights under
        state.pt | dcp/ | deepspeed/                             FSDP2 / DeepSpeed), one RNG file per rank
        rng-rank{r}.pt
    trainer_state.json                                           step, data position, loss history; written
                                                                 last, so its presence means "complete"

Everything is written into ``checkpoints/.tmp-step-000100`` and renamed into place; a kill at any moment leaves
either the previous checkpoints or the new one, never a half-written folder that resume would pick. The last
``keep_last`` checkpoints are kept. The learning-rate schedule is a pure function of the step, so the step *is* the
scheduler state.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from vigorl_cli.data.io import atomic_write_json
from vigorl_cli.errors import CheckpointError

STEP_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (a run's ``checkpoints/`` folder), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


# -------------------------------------------------------------------------------------------------------------------
# HF folders
# -------------------------------------------------------------------------------------------------------------------

def processor_class_name(processor) -> str:
    """The transformers class a loader should build (not our image-only stand-in, see models/load.py)."""
    for cls in type(processor).__mro__:
        if not cls.__name__.startswith("ImageOnly"):
            return cls.__name__
    return type(processor).__name__


def save_processor(processor, out: Path) -> None:
    """Tokenizer, chat template and image processor files, as a hub Qwen-VL checkpoint has them.

    transformers cannot save a Qwen-VL processor without torchvision (the video processor is built eagerly), so the
    image-only stand-in writes the same files by hand with the real ``processor_class``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cls = processor_class_name(processor)
    if cls == type(processor).__name__:
        processor.save_pretrained(out)
        return
    tok, ip = processor.tokenizer, processor.image_processor
    tok.save_pretrained(out)
    ip_dict = ip.to_dict()
    ip_dict.pop("processor_class", None)
    (out / "preprocessor_config.json").write_text(json.dumps({**ip_dict, "processor_class": cls}, indent=2,
                                                             default=str))
    (out / "processor_config.json").write_text(json.dumps({"image_processor": ip_dict, "processor_class": cls},
                                                          indent=2, default=str))
    template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
    if template:
        (out / "chat_template.jinja").write_text(template)
    cfg_path = out / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        cfg["processor_class"] = cls
        cfg_path.write_text(json.dumps(cfg, indent=2))


@contextlib.contextmanager
def _quiet_progress():
    """No "Writing model shards" bar from inside a training loop's progress display."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_hf(model, out: Path, processor=None, state_dict: dict[str, torch.Tensor] | None = None,
            dtype: torch.dtype | None = None) -> None:
    """``save_pretrained`` (safetensors) + processor files. ``model`` may be a peft model (→ adapter folder).

    ``state_dict`` overrides the model's own tensors (a gathered FSDP2 / ZeRO-3 state dict); ``dtype`` casts
    floating-point tensors on the way out and is recorded in config.json.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = state_dict
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in (sd or model.state_dict()).items()}
        cfg = getattr(model, "config", None)
        if cfg is not None:
            cfg.dtype = dtype
    if sd is not None:
        sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    with _quiet_progress():
        model.save_pretrained(out, state_dict=sd, safe_serialization=True)
    if processor is not None:
        save_processor(processor, out)


# -------------------------------------------------------------------------------------------------------------------
# RNG
# -------------------------------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, ints and tuples only, so that it loads with ``torch.load(weights_only=True)``
    (checkpoints never unpickle arbitrary objects)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -------------------------------------------------------------------------------------------------------------------
# Save / load
# -------------------------------------------------------------------------------------------------------------------

def save_checkpoint(root: Path, step: int, run, processor, trainer_state: dict, keep_last: int = 2,
                    hf_dtype: torch.dtype | None = None) -> Path:
    """Write checkpoint ``step`` under ``root`` on every rank (collective), atomically; keep the last ``keep_last``.

    ``run`` is a :class:`~vigorl_cli.train.parallel.Wrapped`. Returns the final folder.
    """
    dist = run.dist
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
        (tmp / "state").mkdir(parents=True)
    dist.barrier()
    sd = run.full_state_dict()  # collective under FSDP2 / ZeRO-3
    if dist.is_main:
        save_hf(run.hf, tmp, processor, state_dict=sd, dtype=hf_dtype)
    del sd
    run.save_state(tmp / "state")  # collective
    torch.save(rng_state(), tmp / "state" / f"rng-rank{dist.rank}.pt")
    dist.barrier()
    if dist.is_main:
        atomic_write_json(tmp / STATE_FILE, {**trainer_state, "step": step, "world_size": dist.world_size,
                                             "backend": dist.backend})
        if final.exists():  # the same step written again (a resumed run that re-did it)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(root)[:-max(1, keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_trainer_state(path: Path) -> dict:
    f = Path(path) / STATE_FILE
    if not f.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return json.loads(f.read_text())


def load_checkpoint(path: Path, run) -> dict:
    """Restore weights, optimizer and this rank's RNG from ``path`` into ``run``; returns the trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    dist = run.dist
    if state.get("world_size") != dist.world_size or state.get("backend") != dist.backend:
        raise CheckpointError(f"{path} was written by {state.get('backend')} on {state.get('world_size')} rank(s); "
                              f"this run is {dist.backend} on {dist.world_size}",
                              hint="resume with the same parallel setup, or start a new --out from the HF folder")
    run.load_state(path / "state")
    rng_file = path / "state" / f"rng-rank{dist.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return state


def link_or_copy_tree(src: Path, dst: Path, skip: tuple[str, ...] = ("state", STATE_FILE)) -> None:
    """Publish ``src``'s files at ``dst`` (hard links where possible), atomically replacing ``dst``."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in skip or not f.is_file():
            continue
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
