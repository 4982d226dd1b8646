"""`vigorl run`: the whole pipeline from one recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vigorl_cli.cli.common import JsonOpt, OutOpt, SetOpt
from vigorl_cli.console import console, err_console, print_json, progress, table


def run_command(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML (e.g. recipes/demo.yaml)")],
    set_: SetOpt = None,
    out: OutOpt = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="redo this stage and all after it")] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="stop after this stage")] = None,
    as_json: JsonOpt = False,
) -> None:
    """data → mcts → linearize → sft → grpo → merge → eval, into one run folder; re-running resumes.

    Ends with one table: base vs SFT vs GRPO on the recipe's benchmarks.

    Examples:

        vigorl run recipes/demo.yaml                          # tiny model + bundled data, a few minutes on a CPU
        vigorl run recipes/demo.yaml --from sft --to eval     # redo training and evaluation only
        vigorl run recipes/spatial.yaml --out runs/spatial --set mcts.simulations=20
    """
    from vigorl_cli.pipeline import comparison_rows, run_pipeline
    from vigorl_cli.recipe import load_recipe

    r = load_recipe(recipe, list(set_ or []))
    info = run_pipeline(r, out=out, start=from_, stop=to,
                        log=lambda m: err_console.print(m, markup=False, highlight=False), progress_factory=progress)
    if as_json:
        print_json(info)
        return
    rows = comparison_rows(info)
    if rows:
        console.print(table(f"{Path(out or r.output.dir)}: accuracy % (± 95% CI)", ["bench", "base", "sft", "grpo"],
                            rows))
    console.print(f"run folder: {out or r.output.dir}")
