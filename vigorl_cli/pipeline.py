"""`vigorl run`: the whole pipeline from one recipe, each stage writing into one run folder, resumable.

    data → mcts → linearize → sft → grpo → merge → eval

Every stage writes ``RUN/<stage>/`` and, last, ``RUN/<stage>/stage.json`` (what it produced). A stage whose
``stage.json`` exists is skipped, so a killed pipeline resumes at the stage it was in (and the stages themselves
resume inside: mcts skips finished trees, sft and grpo continue from their last checkpoint). ``--from STAGE``
redoes that stage and everything after it; ``--to STAGE`` stops after it.

Data flow: mcts searches ``data.mcts``; linearize turns the trees into SFT chains; sft trains ``model.name`` on those
chains plus any ``data.sft_train`` files (with a random tiny model MCTS rarely finds a correct rollout, so the demo
recipe lists the bundled synthetic chains there); grpo starts from the SFT model; merge turns the final GRPO
checkpoint into a plain HF folder (a LoRA adapter is merged into its base; a full checkpoint is checked and
re-written); eval compares the base, SFT and GRPO models on ``eval.benches`` and ends with one table.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vigorl_cli.data.io import atomic_write_json
from vigorl_cli.errors import DataError, RecipeError
from vigorl_cli.recipe import Recipe

STAGES = ("data", "mcts", "linearize", "sft", "grpo", "merge", "eval")


def _done(run: Path, stage: str) -> dict | None:
    import json

    f = run / stage / "stage.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _mark(run: Path, stage: str, info: dict) -> dict:
    atomic_write_json(run / stage / "stage.json", info)
    return info


def stage_data(r: Recipe, run: Path, log: Callable[[str], None]) -> dict:
    """Make sure the recipe's data exists: the demo set is generated; released data must be pulled first."""
    root = r.data_root()
    wanted = [*r.data.mcts, *r.data.sft_train, *r.data.rl_train]
    missing = [f for f in wanted if not (root / f).exists()]
    if missing and ("demo" in root.name or (root / "demo_manifest.json").exists()):
        from vigorl_cli.data.demo import generate_demo

        log(f"generating the demo data set in {root}")
        generate_demo(root)
        missing = [f for f in wanted if not (root / f).exists()]
    if missing:
        raise DataError(f"data files not found under {root}: {', '.join(missing[:3])}"
                        + (" ..." if len(missing) > 3 else ""),
                        hint="run `vigorl data pull --root DATA_ROOT` (or `vigorl data demo`), or fix data.root")
    return {"root": str(root), "files": wanted}


def run_pipeline(r: Recipe, out: Path | None = None, start: str | None = None, stop: str | None = None,
                 log: Callable[[str], None] = print, progress_factory: Callable[[], Any] | None = None) -> dict:
    """Run stages ``start..stop`` of the pipeline into ``out`` (default ``output.dir``). Returns per-stage info."""
    from vigorl_cli.eval.api import run_eval
    from vigorl_cli.linearize.api import run_linearize
    from vigorl_cli.merge import merge
    from vigorl_cli.search.api import run_mcts
    from vigorl_cli.train import grpo as grpo_mod
    from vigorl_cli.train import sft as sft_mod

    for name, val in (("--from", start), ("--to", stop)):
        if val is not None and val not in STAGES:
            raise RecipeError(f"{name} {val!r} is not a stage; stages: {', '.join(STAGES)}")
    run = Path(out if out is not None else r.output.dir)
    run.mkdir(parents=True, exist_ok=True)
    i0 = STAGES.index(start) if start else 0
    i1 = STAGES.index(stop) if stop else len(STAGES) - 1
    if start:  # --from redoes that stage and everything after it, from scratch
        for s in STAGES[i0:]:
            if (run / s).exists():
                shutil.rmtree(run / s)
    atomic_write_json(run / "recipe.json", r.to_dict())
    info: dict[str, Any] = {}
    timings: dict[str, float] = {}
    for stage in STAGES[:i1 + 1]:
        done = _done(run, stage)
        if done is not None:
            log(f"[{stage}] already complete: skipped")
            info[stage] = done
            continue
        if STAGES.index(stage) < i0:
            raise RecipeError(f"stage {stage} has not run in {run}, so --from {start} cannot start there",
                              hint=f"run without --from, or --from {stage}")
        log(f"[{stage}] ...")
        t0 = time.perf_counter()
        d = run / stage
        if stage == "data":
            res = stage_data(r, run, log)
        elif stage == "mcts":
            if not r.data.mcts:
                res = {"skipped": "data.mcts is empty"}
            else:
                summ = run_mcts(r, out=d, progress_factory=progress_factory)  # mcts.max_samples: run_mcts
                res = {"trees": [str(p) for p in sorted(d.glob("trees*.jsonl"))], "summary": summ}
        elif stage == "linearize":
            trees = info.get("mcts", {}).get("trees") or []
            if not trees:
                res = {"skipped": "no trees", "train": [], "val": []}
            else:
                lin = run_linearize(r, trees, d)
                files = [str(f) for f in lin.files]
                # a multi-turn policy (tool.enabled) trains on the zoom dialogs, a single-turn one on the chains
                suffix = "_MULTITURN.json" if r.tool.enabled and any(f.endswith("_MULTITURN.json") for f in files) \
                    else ".json"
                res = {"train": [f for f in files if f.endswith("_train" + suffix)],
                       "val": [f for f in files if f.endswith("_val" + suffix)], "stats": lin.stats}
        elif stage == "sft":
            chains = [f for f in info.get("linearize", {}).get("train", []) if _n_records(f) > 0]
            extra = [str(r.data_root() / f) for f in r.data.sft_train]
            files = chains + extra
            if not files:
                raise DataError("no SFT data: linearize produced no chains and data.sft_train is empty")
            summ = sft_mod.train(r, data=files, out=d, log=log, progress_factory=progress_factory)
            res = {"model": summ["model_dir"], "data": files, "summary": summ}
        elif stage == "grpo":
            start_model = info.get("sft", {}).get("model") or r.model.name
            summ = grpo_mod.train(r, model=start_model, out=d, log=log, progress_factory=progress_factory)
            res = {"model": summ["model_dir"], "summary": summ}
        elif stage == "merge":
            src = Path(info.get("grpo", {}).get("model") or info.get("sft", {}).get("model") or "")
            if not src.exists():
                raise DataError("nothing to merge: no GRPO or SFT model in this run")
            if d.exists():
                shutil.rmtree(d)
            report = merge(src, d / "model")
            res = {"model": str(d / "model"), "report": getattr(report, "__dict__", str(report))}
        elif stage == "eval":
            models = {"base": r.model.name, "sft": info.get("sft", {}).get("model"),
                      "grpo": info.get("merge", {}).get("model") or info.get("grpo", {}).get("model")}
            res = {"models": {}, "summaries": {}}
            for label, m in models.items():
                if not m:
                    continue
                summaries = run_eval(r, model=str(m), out=d / label, progress_factory=progress_factory, log=log)
                res["models"][label] = str(m)
                res["summaries"][label] = summaries
        else:  # pragma: no cover
            raise AssertionError(stage)
        timings[stage] = round(time.perf_counter() - t0, 2)
        res["seconds"] = timings[stage]
        info[stage] = _mark(run, stage, _jsonable(res))
        log(f"[{stage}] done in {timings[stage]:.1f}s")
    atomic_write_json(run / "pipeline.json", {"stages": info})
    return info


def _n_records(path: str) -> int:
    from vigorl_cli.data.formats import read_sft

    try:
        return len(read_sft(path)[0])
    except Exception:  # a missing or unreadable file just contributes nothing
        return 0


def _jsonable(x: Any) -> Any:
    import json

    return json.loads(json.dumps(x, default=str))


def comparison_rows(info: dict) -> list[list[str]]:
    """Rows of the final table: per benchmark, accuracy of base / SFT / GRPO."""
    ev = info.get("eval", {}).get("summaries", {})
    benches: dict[str, dict[str, str]] = {}
    for label, summaries in ev.items():
        for s in summaries:
            benches.setdefault(s["bench"], {})[label] = f"{100 * s['accuracy']:.1f} ± {100 * s['ci95']:.1f}"
    return [[b, v.get("base", "-"), v.get("sft", "-"), v.get("grpo", "-")] for b, v in benches.items()]
