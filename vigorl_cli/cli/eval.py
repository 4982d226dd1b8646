"""`vigorl eval`: evaluate a model on one or more benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vigorl_cli.cli.common import JsonOpt, OutOpt, RecipeOpt, SetOpt
from vigorl_cli.console import console, err_console, print_json, progress, table


def eval_command(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="hub id, folder, or tiny-* (default: recipe)")] = None,
    bench: Annotated[Optional[str], typer.Option("--bench", "-b", help="benchmark(s), comma-separated; jsonl:PATH "
                                                                       "for any file")] = None,
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    engine: Annotated[Optional[str], typer.Option("--engine", help="hf | vllm | openai")] = None,
    base_url: Annotated[Optional[list[str]], typer.Option("--base-url", help="OpenAI-compatible server (repeatable)")] = None,
    multiturn: Annotated[Optional[bool], typer.Option("--multiturn/--single", help="force multi-turn zoom or "
                                                                                   "single-turn")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", "-k", help="draws per question (Avg@k)")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", help="questions per benchmark")] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="DATA_ROOT (default: recipe data.root; "
                                                                          "demo-* benches: data/demo)")] = None,
    compat: Annotated[bool, typer.Option("--compat", help="reference-compatible prompts and scoring")] = False,
    out: OutOpt = None,
    list_: Annotated[bool, typer.Option("--list", help="list the benchmarks and exit")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a model: episodes (single-turn or multi-turn zoom) → judges → samples.jsonl + summary.json.

    Re-running on the same --out resumes where it stopped.

    Examples:

        vigorl eval --model tiny-qwen2.5-vl --bench demo-spatial,demo-grounding --limit 20
        vigorl eval --model gsarch/ViGoRL-7b-Spatial --bench sat2,blink --data-root /data/vigorl
        vigorl eval --model Qwen/Qwen2.5-VL-7B-Instruct --bench vstar --engine openai --base-url http://localhost:9001/v1
    """
    from vigorl_cli.eval.api import list_benchmarks, run_eval
    from vigorl_cli.recipe import load_recipe

    if list_:
        console.print(table("benchmarks", ["name", "mode", "judge", "files", "description"], list_benchmarks()))
        return
    overrides = list(set_ or [])
    r = load_recipe(recipe, overrides)
    from vigorl_cli.eval.runner import EvalInterrupted

    try:
        summaries = run_eval(r, model=model, benches=bench, engine=engine, base_urls=base_url, multiturn=multiturn,
                             samples=samples, limit=limit, data_root=data_root, compat=compat, out=out,
                             progress_factory=progress, log=err_console.print)
    except EvalInterrupted as e:  # results flushed, partial summary.json written ("complete": false)
        s = e.summary
        err_console.print(f"[yellow]interrupted[/yellow]: {s.get('bench')}: {s.get('draws', 0)}/{s.get('total', '?')} "
                          f"samples saved in {e.out}; run the same command again to resume", soft_wrap=True)
        raise typer.Exit(130) from None
    if as_json:
        print_json(summaries)
        return
    from vigorl_cli.eval.report import summary_table

    console.print(summary_table(summaries))
    if summaries and all(s.get("image_error_rate", 0) + s.get("engine_error_rate", 0) >= 1.0 for s in summaries):
        err_console.print("[red]every sample failed to load or to get an answer from the engine[/red]")
        raise typer.Exit(1)
