"""Option aliases shared by every command (declared once, like hf's ``_cli_utils``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

RecipeOpt = Annotated[Optional[Path], typer.Option("--recipe", "-r", help="YAML recipe file (see `vigorl recipe ls`)")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="override a recipe value, typed: --set sft.lr=2e-5 (repeatable)")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: the recipe's output.dir)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON instead of tables")]
