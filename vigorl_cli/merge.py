"""`vigorl merge SRC --out DIR`: a training output → a plain HF folder, checked against its source.

Sources (detected, or forced with ``kind``):

==============  ===================================================================================================
``lora``        a peft adapter folder (adapter_config.json): base + adapter, ``merge_and_unload``
``hf``          an HF folder or a ``.safetensors`` / ``.pt`` / ``.bin`` state dict, in any key layout
``dcp``         a torch distributed checkpoint (FSDP2 runs: ``checkpoints/step-N/state/dcp``)
``deepspeed``   a DeepSpeed ZeRO-2/3 checkpoint (``checkpoints/step-N/state/deepspeed``), consolidated to fp32
==============  ===================================================================================================

Key layouts: transformers ≥ 4.52 (and 5.x) nest the vision tower and the language model as ``model.visual.*`` and
``model.language_model.*``; older checkpoints use ``visual.*`` and ``model.layers.*``. Wrapper prefixes (``module.``,
``_orig_mod.``, ``_fsdp_wrapped_module.``, our ``hf.``) are stripped. Every tensor must land on a parameter of the
target model and every parameter must receive one: otherwise nothing is written and the error lists the keys (the
failure this prevents is a model whose vision tower silently stays at random init).

Check: logits of the merged folder, reloaded with ``from_pretrained``, against the source model on a fixed input
(a chat prompt with one synthetic image); the max abs diff is reported, and above ``tol`` the merge fails.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vigorl_cli.errors import CheckpointError

KINDS = ("auto", "lora", "hf", "dcp", "deepspeed")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "hf.")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


@dataclass
class MergeReport:
    kind: str
    src: str
    out: str
    n_tensors: int
    max_abs_diff: float
    dtype: str
    base: str | None = None


# -------------------------------------------------------------------------------------------------------------------
# Detecting and reading sources
# -------------------------------------------------------------------------------------------------------------------

def detect_kind(src: Path) -> str:
    src = Path(src)
    if src.is_file():
        return "hf"
    if (src / "adapter_config.json").is_file():
        return "lora"
    if any((src / f).is_file() for f in _WEIGHT_FILES):
        return "hf"
    if (src / ".metadata").is_file() or (src / "dcp" / ".metadata").is_file() or \
            (src / "state" / "dcp" / ".metadata").is_file():
        return "dcp"
    if (src / "latest").is_file() or (src / "deepspeed" / "latest").is_file() or \
            (src / "state" / "deepspeed" / "latest").is_file():
        return "deepspeed"
    raise CheckpointError(f"cannot tell what {src} holds (no adapter_config.json, model weights, distributed "
                          "checkpoint .metadata or DeepSpeed 'latest' file)",
                          hint="pass --kind lora|hf|dcp|deepspeed, or point at the folder that holds it")


def _find_config_dir(src: Path) -> Path | None:
    """The nearest folder at or above ``src`` with a config.json (our step folders hold one above state/)."""
    p = Path(src).resolve()
    for cand in [p, *p.parents][:4]:
        if (cand / "config.json").is_file():
            return cand
    return None


def _read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    src = Path(src)
    if src.is_file():
        if src.suffix == ".safetensors":
            return load_file(src)
        sd = torch.load(src, map_location="cpu", weights_only=True)
        return sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src / index_name
        if index.is_file():
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                out.update(_read_hf_weights(src / shard))
            return out
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return _read_hf_weights(src / name)
    raise CheckpointError(f"no model weights in {src}")


def _read_dcp(src: Path) -> dict[str, torch.Tensor]:
    """Model tensors of a torch.distributed.checkpoint folder, read without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for cand in (src, src / "dcp", src / "state" / "dcp"):
        if (cand / ".metadata").is_file():
            src = cand
            break
    meta = dcp.FileSystemReader(str(src)).read_metadata().state_dict_metadata
    tensors = {k: m for k, m in meta.items() if isinstance(m, TensorStorageMetadata)}
    ours = any(k.startswith("model.") for k in tensors) and any(k.startswith("optim.") for k in meta)
    keys = [k for k in tensors if k.startswith("model.")] if ours else list(tensors)
    template = {k: torch.empty(tuple(tensors[k].size), dtype=tensors[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(template, checkpoint_id=str(src), no_dist=True)
    return {(k[len("model."):] if ours else k): v for k, v in template.items()}


def _read_deepspeed(src: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for cand in (src, src / "deepspeed", src / "state" / "deepspeed"):
        if (cand / "latest").is_file():
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(cand)))
    raise CheckpointError(f"no DeepSpeed checkpoint ('latest' file) under {src}")


# -------------------------------------------------------------------------------------------------------------------
# Key mapping
# -------------------------------------------------------------------------------------------------------------------

def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key.replace("._fsdp_wrapped_module", "").replace("._checkpoint_wrapped_module", "")


def _candidates(key: str) -> list[str]:
    """``key`` and its spellings in the other Qwen-VL key layout."""
    out = [key]
    if key.startswith("visual."):
        out.append("model." + key)  # transformers < 4.52 → nested
    elif key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        out.append("model.language_model." + key[len("model."):])
    elif key.startswith("model.visual."):
        out.append(key[len("model."):])  # nested → flat (an older transformers as the target)
    elif key.startswith("model.language_model."):
        out.append("model." + key[len("model.language_model."):])
    if key.startswith("language_model."):
        out.append("model." + key)
    return out


def map_keys(sd: dict[str, torch.Tensor], target: dict[str, torch.Tensor], tied: bool = False
             ) -> dict[str, torch.Tensor]:
    """Rename ``sd``'s keys onto ``target``'s; raise CheckpointError listing missing / unexpected / misshapen keys."""
    mapped: dict[str, torch.Tensor] = {}
    unexpected, misshapen = [], []
    for k, v in sd.items():
        base = _strip_wrappers(k)
        hit = next((c for c in _candidates(base) if c in target), None)
        if hit is None:
            unexpected.append(k)
        elif tuple(target[hit].shape) != tuple(v.shape):
            misshapen.append(f"{k}: {tuple(v.shape)} vs {tuple(target[hit].shape)}")
        else:
            mapped[hit] = v
    missing = [k for k in target if k not in mapped]
    if tied:
        missing = [k for k in missing if k != "lm_head.weight"]  # tied to the input embedding
    if any("lora_" in k for k in unexpected):
        raise CheckpointError("the source holds LoRA (peft) weights inside a full state dict",
                              hint="merge the adapter folder instead (the checkpoint's HF folder, which holds "
                                   "adapter_config.json)")
    if missing or unexpected or misshapen:
        def head(xs: list[str]) -> str:
            return ", ".join(xs[:12]) + (f" ... (+{len(xs) - 12} more)" if len(xs) > 12 else "")

        lines = []
        if missing:
            lines.append(f"{len(missing)} model weights have no tensor in the source (they would stay random): "
                         f"{head(missing)}")
        if unexpected:
            lines.append(f"{len(unexpected)} source tensors match no model weight: {head(unexpected)}")
        if misshapen:
            lines.append(f"{len(misshapen)} tensors have the wrong shape: {head(misshapen)}")
        raise CheckpointError("refusing to write the merged model:\n" + "\n".join(lines),
                              hint="check --base (the model the checkpoint was trained from)")
    return mapped


# -------------------------------------------------------------------------------------------------------------------
# Building, checking, writing
# -------------------------------------------------------------------------------------------------------------------

def _dtype(name: str, config) -> torch.dtype:
    if name == "auto":
        d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(d, str):
            d = getattr(torch, d, None)
        return d if isinstance(d, torch.dtype) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def fixed_inputs(processor, config) -> dict[str, torch.Tensor]:
    """The check input: a chat prompt with one synthetic gradient image (no randomness), or text ids."""
    if processor is None:
        g = torch.Generator().manual_seed(0)
        vocab = config.get_text_config().vocab_size
        return {"input_ids": torch.randint(0, min(vocab, 1000), (1, 24), generator=g)}
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:84, 0:112]
    img = Image.fromarray(np.stack([x * 2, y * 3, (x + y)], -1).astype("uint8"))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
            {"role": "assistant", "content": "A gradient. (12, 34)"}]
    text = processor.apply_chat_template(msgs, tokenize=False)
    return dict(processor(text=[text], images=[img], return_tensors="pt"))


def _logits(model, inputs: dict) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def _load_processor_from(*dirs: Path | str | None):
    from vigorl_cli.models.load import load_processor, model_kind, resolve_model

    for d in dirs:
        if d is None:
            continue
        try:
            path = resolve_model(d)
        except Exception:  # noqa: BLE001 - not a model folder: try the next
            continue
        p = Path(path)
        if p.is_dir() and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            continue
        try:
            from transformers import AutoConfig

            kind = model_kind(AutoConfig.from_pretrained(path))
        except Exception:  # noqa: BLE001 - an adapter folder has no config: the tiny kinds share one processor API
            kind = "qwen2_5_vl"
        try:
            return load_processor(path, kind)
        except Exception:  # noqa: BLE001
            continue
    return None


def _write_and_check(model, out: Path, processor, dtype: torch.dtype, source_logits: torch.Tensor,
                     inputs: dict, tol: float | None) -> float:
    """Save ``model`` to ``out`` atomically, reload it with from_pretrained, compare logits."""
    from transformers import AutoModelForImageTextToText

    from vigorl_cli.train.checkpoint import save_hf

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_hf(model, tmp, processor, dtype=dtype)
        reloaded, info = AutoModelForImageTextToText.from_pretrained(tmp, dtype=torch.float32,
                                                                     output_loading_info=True)
        missing = [k for k in info.get("missing_keys", []) if "lm_head" not in k or not _tied(reloaded.config)]
        if missing or info.get("unexpected_keys"):
            raise CheckpointError(f"the written folder does not reload cleanly: missing {missing[:10]}, "
                                  f"unexpected {list(info.get('unexpected_keys', []))[:10]}")
        diff = float((_logits(reloaded, inputs) - source_logits).abs().max())
        if tol is not None and not diff <= tol:
            raise CheckpointError(f"merged logits differ from the source by {diff:.3g} (> tol {tol:g})",
                                  hint="a wrong --base, or a checkpoint from a different model")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        return diff
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False) or
                getattr(config.get_text_config(), "tie_word_embeddings", False))


def _default_tol(dtype: torch.dtype) -> float | None:
    return 1e-3 if dtype == torch.float32 else None  # 16-bit rounding: report, do not judge


def merge_lora(src: Path, out: Path, base: str | None, dtype: str, tol: float | None) -> MergeReport:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from vigorl_cli.models.load import resolve_model

    cfg = LoraConfig.from_pretrained(str(src))
    base_name = base or cfg.base_model_name_or_path
    if not base_name:
        raise CheckpointError(f"{src}/adapter_config.json names no base model", hint="pass --base MODEL")
    base_path = resolve_model(base_name)
    model = AutoModelForImageTextToText.from_pretrained(base_path, dtype=torch.float32)
    out_dtype = _dtype(dtype, model.config)
    peft_model = get_peft_model(model, cfg)
    f = Path(src) / "adapter_model.safetensors"
    adapter = load_file(f) if f.is_file() else torch.load(Path(src) / "adapter_model.bin", weights_only=True)
    expected = {k for k in peft_model.state_dict() if "lora_" in k}
    res = set_peft_model_state_dict(peft_model, adapter)
    if res.unexpected_keys:  # another key layout: rename inside the peft prefix and retry
        renamed = {}
        for k, v in adapter.items():
            inner = k.removeprefix("base_model.model.")
            hits = [c for c in _candidates(inner)
                    if any(e.startswith("base_model.model." + c.rsplit(".lora_", 1)[0]) for e in expected)]
            renamed["base_model.model." + (hits[0] if hits else inner)] = v
        res = set_peft_model_state_dict(peft_model, renamed)
    missing = sorted(k for k in res.missing_keys if "lora_" in k and k in expected)
    if res.unexpected_keys or missing:
        raise CheckpointError(f"refusing to merge {src}: {len(missing)} LoRA weights missing {missing[:8]}, "
                              f"{len(res.unexpected_keys)} unexpected {list(res.unexpected_keys)[:8]}",
                              hint="check --base (the model the adapter was trained on)")
    processor = _load_processor_from(src, base_path)
    inputs = fixed_inputs(processor, model.config)
    source = _logits(peft_model, inputs)
    merged = peft_model.merge_and_unload()
    diff = _write_and_check(merged, out, processor, out_dtype, source, inputs,
                            tol if tol is not None else _default_tol(out_dtype))
    return MergeReport("lora", str(src), str(out), len(adapter), diff, str(out_dtype).replace("torch.", ""),
                       base=str(base_name))


def merge_state_dict(src: Path, out: Path, kind: str, base: str | None, dtype: str, tol: float | None
                     ) -> MergeReport:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vigorl_cli.models.load import resolve_model

    cfg_dir = Path(resolve_model(base)) if base else _find_config_dir(src)
    if cfg_dir is None:
        raise CheckpointError(f"no config.json at or above {src}", hint="pass --base MODEL (the trained model)")
    config = AutoConfig.from_pretrained(cfg_dir)
    reader = {"hf": _read_hf_weights, "dcp": _read_dcp, "deepspeed": _read_deepspeed}[kind]
    sd = reader(Path(src))
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    target = model.state_dict()
    mapped = map_keys(sd, target, tied=_tied(config))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in mapped.items()},
                          strict=False, assign=True)
    if _tied(config):
        model.tie_weights()
    out_dtype = _dtype(dtype, config)
    processor = _load_processor_from(src if Path(src).is_dir() else None, cfg_dir, base)
    inputs = fixed_inputs(processor, config)
    source = _logits(model, inputs)
    diff = _write_and_check(model, out, processor, out_dtype, source, inputs,
                            tol if tol is not None else _default_tol(out_dtype))
    return MergeReport(kind, str(src), str(out), len(mapped), diff, str(out_dtype).replace("torch.", ""),
                       base=str(cfg_dir))


def merge(src: str | Path, out: str | Path, kind: str = "auto", base: str | None = None, dtype: str = "auto",
          tol: float | None = None) -> MergeReport:
    """Merge ``src`` into a plain HF folder at ``out`` (written atomically, only after every check passed)."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if kind not in KINDS:
        raise CheckpointError(f"unknown source kind {kind!r}; expected one of {', '.join(KINDS)}")
    if out.resolve() == src.resolve():
        raise CheckpointError("--out must differ from the source folder")
    kind = detect_kind(src) if kind == "auto" else kind
    if kind == "lora":
        return merge_lora(src, out, base, dtype, tol)
    return merge_state_dict(src, out, kind, base, dtype, tol)


def report_rows(r: MergeReport) -> list[list[Any]]:
    return [["source", f"{r.src} ({r.kind})"], ["base", r.base or ""], ["out", r.out], ["tensors", r.n_tensors],
            ["dtype", r.dtype], ["logits max abs diff", f"{r.max_abs_diff:.3g}"]]
