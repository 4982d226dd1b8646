"""`vigorl view`: a self-contained HTML page of an eval (or rollout) folder: images, grounded points, crops, texts."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from vigorl_cli.cli.common import JsonOpt
from vigorl_cli.console import console, err_console, print_json


class Only(str, Enum):
    correct = "correct"
    wrong = "wrong"
    failed = "failed"


def view_command(
    src: Annotated[Path, typer.Argument(metavar="DIR", help="eval output folder (OUT/BENCH/samples.jsonl or, from "
                                             "`vigorl run`, RUN/eval with LABEL/BENCH/samples.jsonl), one BENCH "
                                             "folder, a samples.jsonl, a GRPO run folder (its rollouts/) or a "
                                             "rollout folder of *.jsonl records")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="HTML file to write (default: "
                                                                 "DIR/view.html)")] = None,
    data_root: Annotated[Path | None, typer.Option("--data-root", help="DATA_ROOT the records' image paths are "
                                                                       "relative to (default: recorded root, DIR, "
                                                                       "DIR/.., the working directory)")] = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=0, help="records per benchmark")] = None,
    only: Annotated[Only | None, typer.Option("--only", help="keep only correct | wrong (score < 1) | failed "
                                                               "(a failure kind recorded)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one HTML page (no external assets) showing each sample: thumbnail with the model's grounded points,
    crop windows and the GT box drawn on it, the text of every turn, answer, score and failure kind; a header with
    per-benchmark accuracy and failure counts, and filters by correct / wrong / failure kind.

    Images missing under the data root are drawn as placeholders (pass --data-root to find them).

    Examples:

        vigorl view runs/demo/eval                   # base/sat2, sft/sat2, grpo/sat2, ... from `vigorl run`
        vigorl view runs/demo/eval/sft/sat2 --only wrong --limit 50 --out wrong.html
        vigorl view runs/demo/grpo                   # the GRPO rollouts (rollouts/step_*.jsonl)
        vigorl view runs/7b/eval --data-root /data/vigorl --out 7b.html
    """
    from vigorl_cli.eval.view import write_view_stats

    path, stats = write_view_stats(src, out, data_root=data_root, limit=limit, only=only.value if only else None)
    if as_json:
        print_json({"out": str(path), **stats.__dict__})
        return
    console.print(f"wrote {path} ({stats.shown} of {stats.records} record(s), {stats.groups} group(s), "
                  f"{stats.bytes / 1e6:.1f} MB)")
    if stats.unreadable_lines:
        err_console.print(f"[yellow]warning:[/yellow] {stats.unreadable_lines} unreadable line(s) skipped")
    if stats.missing_images:
        err_console.print(f"[yellow]warning:[/yellow] {stats.missing_images} image(s) not found or unreadable "
                          f"(e.g. {', '.join(stats.missing_examples[:3])}); drawn as placeholders")
        if data_root is None:
            err_console.print(f"[dim]hint: pass --data-root DATA_ROOT (searched: {', '.join(stats.roots)})[/dim]")
