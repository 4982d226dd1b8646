"""`vigorl recipe`: validate, list and copy recipes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from vigorl_cli.cli.common import JsonOpt, SetOpt
from vigorl_cli.console import console, print_json, table
from vigorl_cli.errors import RecipeError
from vigorl_cli.recipe import explain, load_recipe

app = typer.Typer(help="Validate, list and copy YAML recipes.", no_args_is_help=True)


def bundled_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes"


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#") and line.strip("# ").strip():
            return line.strip("# ").strip()
    return ""


@app.command("check")
def check(
    file: Annotated[Path, typer.Argument(help="recipe YAML")],
    set_: SetOpt = None,
    explain_: Annotated[bool, typer.Option("--explain", help="also list every key with type, default and help")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Validate a recipe and print the resolved values (defaults ← file ← --set).

    Examples:

        vigorl recipe check recipes/demo.yaml
        vigorl recipe check recipes/vstar.yaml --set grpo.group_size=8 --set tool.enabled=true
    """
    recipe = load_recipe(file, set_ or [])
    if as_json:
        print_json(recipe.to_dict())
        return
    console.print(f"[green]ok[/green] {file}")
    console.print(recipe.to_yaml(), markup=False)
    if explain_:
        console.print(table("recipe keys", ["key", "type", "default", "help"], [list(r) for r in explain()]))


@app.command("ls")
def ls() -> None:
    """List the bundled recipes.

    Example:  vigorl recipe ls
    """
    rows = [[p.stem, _first_comment(p)] for p in sorted(bundled_dir().glob("*.yaml"))]
    console.print(table("bundled recipes", ["name", "what it does"], rows))


@app.command("cp")
def cp(
    name: Annotated[str, typer.Argument(help="bundled recipe name (see `vigorl recipe ls`)")],
    dest: Annotated[Path, typer.Argument(help="where to write the copy")],
) -> None:
    """Copy a bundled recipe out for editing.

    Example:  vigorl recipe cp vstar my_vstar.yaml
    """
    src = bundled_dir() / f"{name.removesuffix('.yaml')}.yaml"
    if not src.is_file():
        names = ", ".join(p.stem for p in sorted(bundled_dir().glob("*.yaml")))
        raise RecipeError(f"no bundled recipe named {name!r}; available: {names}")
    if dest.exists() and dest.is_dir():
        dest = dest / src.name
    shutil.copyfile(src, dest)
    console.print(f"wrote {dest}")
