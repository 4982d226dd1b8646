"""`vigorl mcts`: tree search over grounded thought steps → trees.jsonl (reference schema)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vigorl_cli.cli.common import JsonOpt, OutOpt, RecipeOpt, SetOpt
from vigorl_cli.console import console, err_console, print_json, progress, table


def mcts_command(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    out: OutOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="teacher: hub id, folder, or tiny-* "
                                                                       "(default: recipe model.name)")] = None,
    engine: Annotated[Optional[str], typer.Option("--engine", help="hf | vllm | openai (default: recipe)")] = None,
    base_url: Annotated[Optional[list[str]], typer.Option("--base-url", help="OpenAI-compatible server "
                                                                              "(repeatable; implies --engine openai)")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", "-d", help="input file (LLaVA jsonl), repeatable "
                                                                           "(default: recipe data.mcts)")] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="DATA_ROOT (default: recipe data.root)")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="I/N: search only shard I of N (0-based)")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", help="samples per input file, seeded shuffle "
                                                                      "(default: mcts.max_samples, else "
                                                                      "data.max_samples)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Search trees of grounded thought steps with a teacher model; one tree per sample in the reference schema.

    Re-running on the same --out resumes (finished samples are skipped; failed ones are retried).

    Examples:

        vigorl mcts --recipe recipes/demo.yaml --out runs/mcts-demo
        vigorl mcts --recipe recipes/vstar.yaml --out runs/mcts-vstar --set mcts.simulations=20
        vigorl mcts -r recipes/vstar.yaml --base-url http://gpu1:9001/v1 --base-url http://gpu2:9001/v1 --shard 0/4
    """
    from vigorl_cli.recipe import load_recipe
    from vigorl_cli.search.api import run_mcts

    r = load_recipe(recipe, list(set_ or []))
    summary = run_mcts(r, out=out, model=model, engine=engine, base_urls=base_url, files=data, data_root=data_root,
                       shard=shard, limit=limit, progress_factory=progress)
    if as_json:
        print_json(summary)
        return
    rows = [["trees in file", summary["trees"]], ["new trees", summary["new_trees"]],
            ["root accuracy (any correct rollout)", f"{summary['root_accuracy']:.1%}"],
            ["mean nodes per tree", summary["mean_nodes"]],
            ["nodes/s (generated steps)", summary["nodes_per_second"]], ["tokens/s", summary["tokens_per_second"]],
            ["errors", ", ".join(f"{k}: {v}" for k, v in summary["errors"].items()) or "none"],
            ["output", summary["out"]]]
    console.print(table("mcts", ["", "value"], rows))
    if summary["errors"]:
        err_console.print(f"[yellow]{sum(summary['errors'].values())} samples failed; see errors*.jsonl in "
                          f"{summary['out']} (a rerun retries them)[/yellow]")
