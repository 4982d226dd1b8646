"""`vigorl data`: pull the released data, generate the demo set, validate files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from vigorl_cli.console import console, err_console, table

app = typer.Typer(help="Fetch, generate and validate data.", no_args_is_help=True)

RootOpt = Annotated[Optional[Path], typer.Option("--root", help="DATA_ROOT (default: $VIGORL_DATA_ROOT, $DATA_ROOT, "
                                                                  "or ./data)")]
ValidateRootOpt = Annotated[Optional[Path], typer.Option(
    "--root", help="DATA_ROOT (default: $VIGORL_DATA_ROOT, $DATA_ROOT, or searched: the data file's folder and "
                   "every folder above it, then the working folder)")]


def env_root(root: Path | None) -> Path | None:
    """``--root``, else ``$VIGORL_DATA_ROOT``, else ``$DATA_ROOT``, else None."""
    if root is not None:
        return root
    env = os.environ.get("VIGORL_DATA_ROOT") or os.environ.get("DATA_ROOT")
    return Path(env) if env else None


def default_root(root: Path | None) -> Path:
    return env_root(root) or Path("data")


@app.command("pull")
def pull(
    subset: Annotated[Optional[list[str]], typer.Option(
        "--subset", help="spatial_reasoning, visual_search, web_grounding, web_action, visual_search_mcts_images "
                         "(repeatable; default: the first four)")] = None,
    root: RootOpt = None,
    source: Annotated[Optional[Path], typer.Option("--source", help="local mirror (tars or unpacked folders) "
                                                                    "instead of the Hub")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="dataset revision on the Hub")] = None,
) -> None:
    """Fetch gsarch/vigorl_datasets into DATA_ROOT (only the requested subsets; idempotent).

    Examples:

        vigorl data pull --subset web_grounding --root /data/vigorl
        vigorl data pull --source /mnt/mirror/vigorl_datasets --root data
    """
    from vigorl_cli.data.pull import describe
    from vigorl_cli.data.pull import pull as do_pull

    r = default_root(root)

    def event(s: str, what: str) -> None:
        if what == "start":
            err_console.print(f"fetching {s} ...")

    status = do_pull(r, subset, source=source, revision=revision, on_event=event)
    rows = [[d["subset"], status.get(d["subset"], "-"), d["files"]] for d in describe(r)]
    console.print(table(f"DATA_ROOT {r}", ["subset", "this run", "data files"], rows))


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write the demo DATA_ROOT into")] = Path("data/demo"),
    n: Annotated[int, typer.Option("--n", help="samples per task (at least 6)")] = 200,
    seed: Annotated[int, typer.Option("--seed", help="generation seed")] = 0,
) -> None:
    """Generate the bundled synthetic tasks (visual search, spatial, GUI grounding, web action) in the released
    formats and layout, so every command runs on a tiny model exactly as on real data.

    Example:  vigorl data demo --out data/demo --n 200
    """
    from vigorl_cli.data.demo import generate_demo

    try:
        manifest = generate_demo(out, n_per_task=n, seed=seed)
    except ValueError as e:  # n below the minimum: a usage error, not a traceback
        raise typer.BadParameter(str(e), param_hint="--n") from None
    rows = [[f, c] for f, c in sorted(manifest.get("files", {}).items())]
    console.print(table(f"demo data in {out}", ["file", "records"], rows))


@app.command("validate")
def validate(
    paths: Annotated[list[Path], typer.Argument(help="data files or folders")],
    root: ValidateRootOpt = None,
    max_errors: Annotated[int, typer.Option("--max-errors", help="errors to list")] = 50,
) -> None:
    """Check data files: schema, missing or corrupt images, duplicate ids, boxes outside the image.

    Image paths are relative to DATA_ROOT. Without --root (and without $VIGORL_DATA_ROOT / $DATA_ROOT) each image
    is looked up next to its data file, then in every folder above it, so a file inside a DATA_ROOT finds it.
    Exit status 1 when anything is wrong.

    Examples:

        vigorl data validate data/demo/web_grounding
        vigorl data validate /data/vigorl/spatial_reasoning/vigorl_sat2_train_RL.jsonl --root /data/vigorl
    """
    from vigorl_cli.data.validate import render_report, validate_paths

    report = validate_paths(paths, env_root(root))
    render_report(report, console, max_errors=max_errors)
    if not report.ok:
        raise typer.Exit(1)
