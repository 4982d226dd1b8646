"""`vigorl grpo`: GRPO of a Qwen-VL policy, single-turn or multi-turn with the zoom tool."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vigorl_cli.cli.common import JsonOpt, OutOpt, RecipeOpt, SetOpt
from vigorl_cli.console import console, err_console, print_json, progress, table


def grpo_command(
    recipe: RecipeOpt = None,
    set_: SetOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="policy to start from (default: model.name; "
                                                                       "usually the SFT output)")] = None,
    data: Annotated[Optional[list[Path]], typer.Option("--data", help="RL jsonl file(s) (default: data.rl_train)")] = None,
    out: OutOpt = None,
    no_resume: Annotated[bool, typer.Option("--no-resume", help="refuse to continue a run found in --out")] = False,
    as_json: JsonOpt = False,
) -> None:
    """GRPO: rollout → reward → group advantages → dual-clip PPO update, with HF checkpoints; resumable.

    Examples:

        vigorl grpo --recipe recipes/demo.yaml --model runs/demo/sft/model --out runs/demo/grpo
        vigorl grpo --recipe recipes/vstar.yaml --set tool.enabled=true --set grpo.group_size=8 --out runs/grpo-mt
        vigorl grpo --recipe recipes/spatial.yaml --set engine.backend=vllm --set grpo.kl_coef=0 --out runs/grpo
    """
    from vigorl_cli.recipe import load_recipe
    from vigorl_cli.train.grpo import train

    r = load_recipe(recipe, list(set_ or []))
    summary = train(r, model=model, data=[str(p) for p in data] if data else None,
                    out=out or Path(r.output.dir) / "grpo", resume=not no_resume,
                    log=lambda m: err_console.print(m, markup=False, highlight=False), progress_factory=progress)
    if not summary.get("model_dir"):  # ranks other than 0 print nothing
        return
    if as_json:
        print_json(summary)
        return
    rw = [x for x in summary["rewards"] if x is not None]  # None: a step skipped (every prompt too long)
    rows = [["steps", summary["steps"]], ["reward first → last", f"{rw[0]:.3f} → {rw[-1]:.3f}" if rw else "-"],
            ["model", summary["model_dir"]], ["time", f"{summary['train_s']:.1f} s"]]
    console.print(table("grpo", ["", ""], rows))
