"""`vigorl model`: built-in tiny models and model inspection."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from vigorl_cli.console import console, table
from vigorl_cli.errors import ModelError

app = typer.Typer(help="Tiny offline models and model inspection.", no_args_is_help=True)


@app.command("tiny")
def tiny(
    name: Annotated[str, typer.Argument(help="tiny-qwen2-vl, tiny-qwen2.5-vl or tiny-qwen3-vl")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write the HF model into")],
) -> None:
    """Write a built-in tiny model (random weights, seeded) as a normal HF folder.

    Example:  vigorl model tiny tiny-qwen2.5-vl --out models/tiny-qwen2.5-vl
    """
    from vigorl_cli.models.tiny import TINY_MODELS, tiny_path

    if name not in TINY_MODELS:
        raise ModelError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_MODELS)}")
    src = tiny_path(name)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy2(f, out / f.name)
    console.print(f"wrote {name} to {out}")


@app.command("info")
def info(
    name: Annotated[str, typer.Argument(help="hub id, local folder or tiny-* name")],
) -> None:
    """Load a model and print its kind, size, special tokens and image-processor budget.

    Example:  vigorl model info tiny-qwen3-vl
    """
    from vigorl_cli.models.load import load_model, vision_special_ids

    b = load_model(name)
    ip = b.processor.image_processor
    size = ip.size if isinstance(ip.size, dict) else dict(ip.size)
    n = sum(p.numel() for p in b.model.parameters())
    rows = [["path", str(b.path)], ["kind", b.kind], ["class", type(b.model).__name__],
            ["processor", type(b.processor).__name__], ["parameters", f"{n:,}"],
            ["dtype", str(next(b.model.parameters()).dtype)], ["pixels", f"{size}"],
            ["vocab", str(len(b.tokenizer))], ["vision special ids", str(vision_special_ids(b.tokenizer))]]
    console.print(table(name, ["field", "value"], rows))
