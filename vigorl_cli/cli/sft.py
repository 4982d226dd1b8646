"""`vigorl sft`: supervised fine-tuning on sharegpt conversations (single process, FSDP2 or DeepSpeed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from vigorl_cli.cli.common import JsonOpt, OutOpt, RecipeOpt, SetOpt
from vigorl_cli.console import console, err_console, print_json, progress, table


def sft_command(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    data: Annotated[list[Path] | None, typer.Option(
        "--data", "-d", help="SFT file(s) (sharegpt json/jsonl); default: the recipe's data.sft_train")] = None,
    out: OutOpt = None,
    resume: Annotated[bool, typer.Option(
        "--resume/--no-resume",
        help="continue from the last checkpoint in --out (--no-resume refuses a folder that has one)")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a model on SFT conversations; loss on assistant turns only. Re-running on the same --out resumes.

    Writes --out/metrics.jsonl, checkpoints/step-N (HF folder + resumable state), model/ (the final HF folder) and
    summary.json. A LoRA run's checkpoints hold adapters: `vigorl merge` makes a full model of one.

    Examples:

        vigorl sft --recipe recipes/demo.yaml --out runs/sft
        vigorl sft --recipe recipes/vstar.yaml --data runs/chains/train.json --out runs/sft --set sft.lr=2e-5
        torchrun --nproc-per-node 8 -m vigorl_cli sft -r recipes/vstar.yaml --set sft.parallel=fsdp2 --out runs/sft
    """
    from vigorl_cli.recipe import load_recipe
    from vigorl_cli.train.sft import train

    r = load_recipe(recipe, list(set_ or []))
    summary = train(r, data=list(data) if data else None, out=out, resume=resume, log=err_console.print,
                    progress_factory=progress)
    if not summary.get("model_dir"):  # ranks other than 0 print nothing
        return
    if as_json:
        print_json(summary)
        return
    rows = [["steps", summary["steps"]], ["final loss", summary["final_loss"]], ["val loss", summary["val_loss"]],
            ["samples", summary["n_examples"]], ["dropped", ", ".join(f"{k} {v}" for k, v in summary["dropped"].items())
                                                 or "none"],
            ["bad lines", summary["bad_lines"]], ["checkpoint", summary["checkpoint"]], ["model", summary["model_dir"]]]
    console.print(table("sft", ["field", "value"], rows))
    if summary.get("lora"):
        console.print(f"LoRA adapter: make a full model with `vigorl merge {summary['model_dir']} --out DIR`")
