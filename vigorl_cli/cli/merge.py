"""`vigorl merge`: LoRA adapters, FSDP2 (distributed) and DeepSpeed checkpoints → a plain HF folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vigorl_cli.cli.common import JsonOpt
from vigorl_cli.console import console, print_json, table


def merge_command(
    src: Annotated[Path, typer.Argument(help="adapter folder, HF folder / state-dict file, distributed (DCP) or "
                                             "DeepSpeed checkpoint")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write the merged HF model into")],
    kind: Annotated[str, typer.Option("--kind", help="auto | lora | hf | dcp | deepspeed")] = "auto",
    base: Annotated[str | None, typer.Option("--base", help="the model trained from (default: the adapter's "
                                                               "base / the config.json above SRC)")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (the config's) | float32 | bfloat16 | float16")] = "auto",
    tol: Annotated[float | None, typer.Option(
        "--tol", help="max allowed logits diff vs the source (default 1e-3 for float32; 16-bit: report only)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a plain HF folder (from_pretrained / vLLM) and check its logits against the source.

    Refuses (writes nothing) when a model weight would have no tensor, or a tensor no weight, listing the keys.

    Examples:

        vigorl merge runs/sft-lora/model --out runs/sft-lora-merged
        vigorl merge runs/sft/checkpoints/step-000100/state/dcp --out runs/sft-100
        vigorl merge runs/sft-ds/checkpoints/step-000100/state/deepspeed --out runs/sft-100 --dtype bfloat16
    """
    from vigorl_cli.merge import merge, report_rows

    report = merge(src, out, kind=kind, base=base, dtype=dtype, tol=tol)
    if as_json:
        print_json(report.__dict__)
        return
    console.print(table("merge", ["field", "value"], report_rows(report)))
