"""`vigorl linearize`: MCTS trees → single-turn chains and/or multi-turn zoom dialogs (sharegpt SFT data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vigorl_cli.cli.common import JsonOpt, OutOpt, RecipeOpt, SetOpt
from vigorl_cli.console import console, err_console, print_json, table


def linearize_command(
    trees: Annotated[list[Path], typer.Argument(help="trees.jsonl files or folders written by `vigorl mcts`")],
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="single | multiturn | both (default: recipe "
                                                                      "linearize.multiturn → both, else single; "
                                                                      "multiturn when every tree is multi-turn)")] = None,
    out: OutOpt = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    select: Annotated[Optional[str], typer.Option("--select", help="all (reference) | value (rank by node values, "
                                                                   "cap corrected chains)")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="system prompt preset (default: the tree's, "
                                                                   "else recipe prompt.preset)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Turn MCTS trees into SFT data: direct and corrected chains (single), zoom-tool dialogs with crops (multiturn).

    Examples:

        vigorl linearize runs/mcts-demo --out runs/sft-demo
        vigorl linearize runs/mcts-vstar/trees.jsonl --format multiturn --out data/vstar-mt --set tool.offset=182
        vigorl linearize runs/mcts-web --format both --select value --set tool.offset=100 --set tool.crop_size=512 \\
            --set tool.draw_dot=true --out data/web
    """
    from vigorl_cli.linearize.api import run_linearize, summary_rows
    from vigorl_cli.recipe import load_recipe

    r = load_recipe(recipe, list(set_ or []))
    out_dir = Path(out) if out is not None else Path(r.output.dir) / "linearize"
    res = run_linearize(r, list(trees), out_dir, fmt=fmt, select=select, preset=preset)
    if as_json:
        print_json({**res.stats, "files": res.files})
        return
    console.print(table("linearize", ["", "value"], summary_rows(res.stats)))
    if res.stats.get("multiturn_trees_unused"):
        err_console.print(f"[yellow]{res.stats['multiturn_trees_unused']} multi-turn trees (mcts.mode: multiturn) were "
                          "not used: --format single writes single-turn chains only; use --format both[/yellow]")
    for f in res.files:
        console.print(f"wrote {f}")
