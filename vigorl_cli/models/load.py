"""Load a model and its processor: HF hub ids, local folders, and the built-in tiny models, one function.

Pitfalls handled here, once (environment.md §2):
* transformers 5.x cannot build a Qwen-VL processor without a working torchvision (the video processor is built
  eagerly). Without torchvision we assemble an image-only processor from the same files; with it (or with the
  CPU shim) plain ``AutoProcessor`` is used. Video inputs are not supported on the image-only path.
* flash-attn is used only when it is importable and a CUDA device is present; otherwise sdpa.
* HF's sdpa/eager vision attention loops in Python over every image and window (one call each, plus a host sync per
  layer); ``vision_attention="auto"`` replaces that with one call per layer (models/vision_attention.py).
* ``mm_token_type_ids`` must accompany every forward pass with image tokens (Qwen2.5-VL silently falls back to
  1-D RoPE without it): :func:`mm_token_type_ids` builds it from input ids.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vigorl_cli.errors import ModelError
from vigorl_cli.models.tiny import PROCESSOR_CLASS, VISION_SPECIAL_TOKENS, is_tiny, tiny_path

_KIND_BY_MODEL_TYPE = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl",
                       "qwen3_vl_moe": "qwen3_vl"}


@dataclass
class ModelBundle:
    """A loaded model with everything needed to talk to it."""

    model: Any
    processor: Any
    path: Path | str
    kind: str  # qwen2_vl | qwen2_5_vl | qwen3_vl | <other model_type>

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def config(self):
        return self.model.config


def resolve_model(name_or_path: str | Path) -> Path | str:
    """A tiny name → its cached folder (built on first use); a local folder → itself; anything else is a hub id."""
    name = str(name_or_path)
    if is_tiny(name):
        return tiny_path(name)
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a model folder (no config.json)",
                             hint="pass a folder written by save_pretrained, a hub id, or tiny-qwen2.5-vl")
        return p
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model folder not found: {name}")
    return name


def torchvision_works() -> bool:
    """True when torchvision imports (the PyPI CUDA wheel fails to import against CPU torch)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


def _image_only_processor_class(base_cls):
    """``base_cls`` without its video processor: constructible, savable and loadable without torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base_cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                          chat_template=chat_template, **kwargs)

    return type("ImageOnly" + base_cls.__name__, (base_cls,), {"__init__": __init__})


def _processor_class_name(path: Path | str, kind: str) -> str:
    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = Path(path) / fname
        if f.is_file():
            cls = json.loads(f.read_text()).get("processor_class")
            if cls:
                return cls
    if kind in PROCESSOR_CLASS:
        return PROCESSOR_CLASS[kind]
    raise ModelError(f"cannot tell the processor class of {path}")


def load_processor(path: Path | str, kind: str | None = None, min_pixels: int | None = None,
                   max_pixels: int | None = None, revision: str | None = None, trust_remote_code: bool = False):
    """AutoProcessor when torchvision works, else an image-only processor from the same files.

    ``min_pixels`` / ``max_pixels`` override the image processor's pixel budget (``size`` in transformers 5).
    """
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kw["revision"] = revision
    if torchvision_works() or kind not in PROCESSOR_CLASS:
        proc = AutoProcessor.from_pretrained(path, **kw)
    else:
        local = Path(path) if Path(path).exists() else Path(_snapshot(path, revision))
        base = getattr(transformers, _processor_class_name(local, kind))
        tok = AutoTokenizer.from_pretrained(local)
        ip = AutoImageProcessor.from_pretrained(local)
        tmpl_file = local / "chat_template.jinja"
        tmpl = tmpl_file.read_text() if tmpl_file.is_file() else getattr(tok, "chat_template", None)
        if tmpl is None and (local / "chat_template.json").is_file():
            tmpl = json.loads((local / "chat_template.json").read_text()).get("chat_template")
        proc = _image_only_processor_class(base)(image_processor=ip, tokenizer=tok, chat_template=tmpl)
    ip = proc.image_processor
    if min_pixels is not None or max_pixels is not None:
        size = dict(ip.size) if isinstance(ip.size, dict) else {"shortest_edge": ip.size.shortest_edge,
                                                                 "longest_edge": ip.size.longest_edge}
        if min_pixels is not None:
            size["shortest_edge"] = int(min_pixels)
        if max_pixels is not None:
            size["longest_edge"] = int(max_pixels)
        ip.size = size
        for attr, val in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if val is not None and hasattr(ip, attr):
                setattr(ip, attr, int(val))
    return proc


def _snapshot(repo_id: str | Path, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(str(repo_id), revision=revision,
                                 allow_patterns=["*.json", "*.jinja", "*.txt", "tokenizer*", "*.model"])
    except Exception as e:  # offline, private, or missing
        raise ModelError(f"cannot fetch processor files of {repo_id}: {type(e).__name__}: {str(e).splitlines()[0]}",
                         hint="download the model once with network access, or pass a local folder") from None


def pick_attn_implementation(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ModelError("attn_implementation flash_attention_2 needs flash-attn",
                             hint="pip install 'vigorl[flash]' on a CUDA machine, or use sdpa")
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def pick_dtype(requested: str = "auto"):
    import torch

    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


def model_kind(config) -> str:
    mt = getattr(config, "model_type", "")
    return _KIND_BY_MODEL_TYPE.get(mt, mt)


def load_model(name_or_path: str | Path, dtype: str = "auto", attn_implementation: str = "auto",
               device: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
               revision: str | None = None, trust_remote_code: bool = False,
               vision_attention: str = "auto") -> ModelBundle:
    """Load model + processor for ``name_or_path`` (hub id, local folder, or tiny-*).

    ``vision_attention``: auto | hf | batched | varlen (see :mod:`vigorl_cli.models.vision_attention`).
    """
    from vigorl_cli.models.vision_attention import MODES, set_vision_attention

    if vision_attention not in MODES:
        raise ModelError(f"unknown vision_attention {vision_attention!r}", hint="choose one of " + ", ".join(MODES))
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = resolve_model(name_or_path)
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kw["revision"] = revision
    try:
        config = AutoConfig.from_pretrained(path, **kw)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelError(f"cannot load model {name_or_path}: {str(e).splitlines()[0]}",
                         hint=("HF_HUB_OFFLINE=1 is set; " if offline else "") +
                         "check the name, or use a built-in tiny model such as tiny-qwen2.5-vl") from None
    kind = model_kind(config)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=pick_dtype(dtype), attn_implementation=pick_attn_implementation(attn_implementation), **kw)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    model.eval()
    set_vision_attention(model, vision_attention)
    processor = load_processor(path, kind, min_pixels=min_pixels, max_pixels=max_pixels, revision=revision,
                               trust_remote_code=trust_remote_code)
    return ModelBundle(model=model, processor=processor, path=path, kind=kind)


def vision_special_ids(tokenizer) -> list[int]:
    """Ids a policy must never sample: they would desynchronise image features and image placeholders."""
    ids = []
    for t in VISION_SPECIAL_TOKENS:
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != getattr(tokenizer, "unk_token_id", None):
            ids.append(i)
    return ids


def mm_token_type_ids(input_ids, config):
    """0 for text, 1 for image, 2 for video tokens: what the processor returns, rebuilt from ids."""
    import torch

    t = torch.zeros_like(input_ids).masked_fill_(input_ids == config.image_token_id, 1)  # (no host sync on a GPU)
    video = getattr(config, "video_token_id", None)
    if video is not None:
        t.masked_fill_(input_ids == video, 2)
    return t


SHARED_IMAGE_KINDS = ("qwen2_vl", "qwen2_5_vl")  # model kinds shared_image_features supports

# vision towers whose forward takes its index tables precomputed (transformers' vision_utils helpers pop them from
# its kwargs): class name -> whether it has window attention (Qwen2.5-VL) besides full attention
_PRECOMPUTABLE_TOWERS = {"Qwen2VisionTransformerPretrainedModel": False,
                         "Qwen2_5_VisionTransformerPretrainedModel": True}


def to_device(x: Any, device: Any) -> Any:
    """A host tensor on ``device`` without the host waiting for the device: on a GPU through pinned memory and a
    non-blocking copy. (A copy from pageable memory makes the host wait until the stream's queued work is done: before
    a prefill that is the decode chunk in flight, whose device time the prefill's host work could otherwise
    overlap.) The pinned buffer comes from PyTorch's caching host allocator, which keeps it until the copy is done."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not isinstance(x, torch.Tensor) or x.device.type != "cpu":
        return x.to(dev) if isinstance(x, torch.Tensor) else x
    return x.pin_memory().to(dev, non_blocking=True)


def cat_to_device(parts: list, device: Any) -> Any:
    """``torch.cat(parts)`` (host tensors) on ``device`` as :func:`to_device` would move it, with the parts copied
    once, straight into one pinned buffer on a GPU (rather than concatenated, then copied again to pin them: a
    prefill's pixels are tens of MB)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not parts or any(p.device.type != "cpu" for p in parts):
        return to_device(torch.cat(parts), dev)
    shape = (sum(int(p.shape[0]) for p in parts), *parts[0].shape[1:])
    buf = torch.empty(shape, dtype=parts[0].dtype, pin_memory=True)
    torch.cat(parts, out=buf)
    return buf.to(dev, non_blocking=True)


def vision_precompute(visual: Any, grid_host) -> dict[str, Any]:
    """The index tables a Qwen2-VL / Qwen2.5-VL vision tower derives from ``grid_thw`` (patch positions, segment
    boundaries and their longest segment, Qwen2.5-VL's window order and window boundaries), computed on the host by
    transformers' own helpers from a CPU grid, as the keyword arguments the tower's forward accepts precomputed.

    Computed inside the tower from a device grid, each needs the grid on the host (``.tolist()``) and the window
    order stays a CPU tensor, so indexing with it after the blocks (the merger's output order) copies it to the
    device synchronously: the host waits for the whole tower. With these tables sent ahead no step of the tower
    waits on the host; the attention kernels get the longest segment as an int (vision_attention's plan needs no
    sync either). ``{}`` for other towers or transformers versions without the helpers (the tower computes them
    itself, as before)."""
    windowed = _PRECOMPUTABLE_TOWERS.get(type(visual).__name__)
    if windowed is None:
        return {}
    try:
        from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index
    except ImportError:
        return {}

    def longest(cu) -> int:
        return int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0

    merge = visual.spatial_merge_size
    cu = get_vision_cu_seqlens(grid_host)
    out = {"position_ids": get_vision_position_ids(grid_host, merge), "cu_seqlens": cu, "max_seqlen": longest(cu)}
    if windowed:
        index, cu_win = get_vision_window_index(grid_host, spatial_merge_size=merge, window_size=visual.window_size,
                                                patch_size=visual.patch_size)
        out.update(window_index=index, cu_window_seqlens=cu_win, max_window_seqlen=longest(cu_win))
    return out


def distinct_images(keys: list[Any]) -> tuple[list[int], list[int]]:
    """Images named by ``keys`` (one per occurrence) → ``(first, occurrence)``: the position of each distinct key's
    first occurrence, in order of appearance, and for every occurrence the index of its distinct image."""
    slot: dict[Any, int] = {}
    first: list[int] = []
    occurrence: list[int] = []
    for i, k in enumerate(keys):
        if k not in slot:
            slot[k] = len(first)
            first.append(i)
        occurrence.append(slot[k])
    return first, occurrence


@contextlib.contextmanager
def override(obj: Any, name: str, value: Any):
    """Within this block ``obj.<name>`` is ``value`` (an instance attribute, e.g. a module's ``forward``); afterwards
    whatever instance override was there before (a timer, a compiled forward) comes back, or the class's again."""
    had, saved = name in obj.__dict__, obj.__dict__.get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        obj.__dict__.pop(name, None)
        if had:
            obj.__dict__[name] = saved


@contextlib.contextmanager
def shared_image_features(model: Any, grid_unique, occurrence: list[int], known: dict[int, Any] | None = None,
                          on_encoded: Callable[[int, Any], None] | None = None, check: bool = True,
                          tower_graphs: Any = None):
    """During one ``generate`` or forward: the model receives the pixels of the distinct images only (and the full
    per-occurrence ``image_grid_thw`` its M-RoPE positions need); its ``get_image_features`` encodes the distinct
    images and hands back one feature block per occurrence. Qwen2-VL / Qwen2.5-VL only (their features are a tuple
    per image): see :data:`SHARED_IMAGE_KINDS`. Used by the HF engine (a GRPO group's rows) and the trainer's log-prob
    passes.

    ``known``: features of some distinct images, by index, computed earlier (the HF engine's feature cache): the
    pixels handed to the model are then those of the other distinct images only, in order (an empty tensor when all
    are known), and only those are encoded; ``on_encoded(index, features)`` sees each freshly encoded one.

    No host sync waits for the vision tower: HF's ``get_image_features`` splits the tower's output by sizes read from
    the grid (``.tolist()``), which on a GPU would wait for the whole tower; it gets the grid on the host here, and the
    tower gets the grid on its device together with the index tables it would otherwise derive with host reads
    (:func:`vision_precompute`). ``check=False`` also skips the placeholder-count check that follows (another such
    wait), for callers that built the placeholders from these grids (the streaming engine, whose prefills may run
    beside the decode on another stream and must not block the host). ``tower_graphs``: a
    :class:`~vigorl_cli.models.vision_graphs.TowerGraphs` that runs the tower per group of same-grid images (CUDA
    graphs on a GPU)."""
    core = model.model
    original = core.get_image_features
    index = list(occurrence)
    known = known or {}
    grid_host = grid_unique.detach().cpu()  # a sync here costs nothing: the forward has not started
    todo = [u for u in range(int(grid_host.shape[0])) if u not in known]

    def shared(pixel_values, image_grid_thw=None, **kw):
        out, fresh = None, []
        if todo:
            out = original(pixel_values, grid_host[todo], **kw)
            fresh = list(out.pooler_output if hasattr(out, "pooler_output") else out)
            if on_encoded is not None:
                for u, f in zip(todo, fresh):
                    on_encoded(u, f)
        by_unique = dict(zip(todo, fresh))
        per_occ = tuple(known[u] if u in known else by_unique[u] for u in index)
        if out is None:  # every image known: what the model reads is the pooler output
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            return BaseModelOutputWithPooling(pooler_output=per_occ)
        if hasattr(out, "pooler_output"):
            out.pooler_output = per_occ
            return out
        return per_occ

    visual = core.visual
    tower = visual.forward

    def on_device(hidden_states, *args, **kw):  # the tower computes with the grid: on the pixels' device
        grid = args[0] if args else kw.pop("grid_thw", None)
        dev = hidden_states.device
        if tower_graphs is not None and grid is not None and not args[1:]:
            return tower_graphs(tower, hidden_states, grid.cpu(), **kw)
        if grid is not None:  # its index tables from the host grid, sent ahead of the tower's work
            pre = vision_precompute(visual, grid.cpu())
            kw = {**{k: to_device(v, dev) for k, v in pre.items()}, **kw}
        grid = to_device(grid, dev) if grid is not None else None
        return tower(hidden_states, grid, *args[1:], **kw)

    def unchecked(input_ids, inputs_embeds=None, image_features=None, video_features=None, **kw):
        return type(core).get_placeholder_mask(core, input_ids, inputs_embeds=inputs_embeds, **kw)

    with contextlib.ExitStack() as stack:  # instance overrides already there (timers) come back afterwards
        stack.enter_context(override(core, "get_image_features", shared))
        stack.enter_context(override(visual, "forward", on_device))
        if not check and hasattr(type(core), "get_placeholder_mask"):
            stack.enter_context(override(core, "get_placeholder_mask", unchecked))
        yield
