"""The `vigorl` command: registers one sub-app per module and renders errors once.

Commands only parse flags, build a Recipe and call the library; no logic lives here.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from vigorl_cli import __version__
from vigorl_cli.cli import data as data_cmd
from vigorl_cli.cli import eval as eval_cmd
from vigorl_cli.cli import grpo as grpo_cmd
from vigorl_cli.cli import linearize as linearize_cmd
from vigorl_cli.cli import mcts as mcts_cmd
from vigorl_cli.cli import merge as merge_cmd
from vigorl_cli.cli import model as model_cmd
from vigorl_cli.cli import recipe as recipe_cmd
from vigorl_cli.cli import run as run_cmd
from vigorl_cli.cli import sft as sft_cmd
from vigorl_cli.cli import view as view_cmd
from vigorl_cli.console import err_console
from vigorl_cli.errors import VigorlError

app = typer.Typer(
    name="vigorl",
    help="Visually grounded RL for vision-language models: data → mcts → linearize → sft → grpo → merge → eval.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_cmd.app, name="data")
app.add_typer(model_cmd.app, name="model")
app.add_typer(recipe_cmd.app, name="recipe")
app.command("eval")(eval_cmd.eval_command)
app.command("mcts")(mcts_cmd.mcts_command)
app.command("linearize")(linearize_cmd.linearize_command)
app.command("sft")(sft_cmd.sft_command)
app.command("merge")(merge_cmd.merge_command)
app.command("grpo")(grpo_cmd.grpo_command)
app.command("view")(view_cmd.view_command)
app.command("run")(run_cmd.run_command)


def _version(value: bool) -> None:
    if value:
        import torch
        import transformers

        typer.echo(f"vigorl {__version__} (torch {torch.__version__}, transformers {transformers.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                          help="print versions and exit")] = False,
) -> None:
    """vigorl: one CLI for the ViGoRL pipeline.

    Examples:

        vigorl data demo --out data/demo
        vigorl recipe check recipes/demo.yaml
        vigorl model tiny tiny-qwen2.5-vl --out models/tiny
    """


def main() -> None:
    """Console-script entry: run the app, render known errors as one red line (VIGORL_DEBUG=1: traceback)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except VigorlError as e:
        if os.environ.get("VIGORL_DEBUG") == "1":
            raise
        for line in str(e).splitlines() or [type(e).__name__]:
            err_console.print(f"[red]error:[/red] {line}", markup=True, highlight=False, soft_wrap=True)
        if e.hint:
            err_console.print(f"[dim]hint: {e.hint}[/dim]", soft_wrap=True)
        err_console.print("[dim]set VIGORL_DEBUG=1 for the full traceback[/dim]")
        sys.exit(2)
