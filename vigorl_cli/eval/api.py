"""Glue between a Recipe (+ CLI flags) and :func:`vigorl_cli.eval.runner.evaluate`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vigorl_cli.data.io import atomic_write_json
from vigorl_cli.engines.base import SamplingParams
from vigorl_cli.eval.benchmarks import BENCHMARKS, get_benchmark
from vigorl_cli.eval.runner import EvalInterrupted, EvalSettings, evaluate
from vigorl_cli.recipe import Recipe, expand_env

DEMO_ROOT_DEFAULT = "data/demo"


def list_benchmarks() -> list[list[str]]:
    return [[b.name, b.mode, b.judge or "per task", ", ".join(b.files), b.description] for b in BENCHMARKS.values()]


def demo_root(root: Path | None) -> Path:
    """The demo DATA_ROOT, generated on first use (a few seconds)."""
    from vigorl_cli.data.demo import generate_demo

    path = Path(root) if root is not None else Path(os.environ.get("VIGORL_DEMO_ROOT", DEMO_ROOT_DEFAULT))
    generate_demo(path)
    return path


def run_eval(r: Recipe, model: str | None = None, benches: str | list[str] | None = None, engine: str | None = None,
             base_urls: list[str] | None = None, multiturn: bool | None = None, samples: int | None = None,
             limit: int | None = None, data_root: Path | None = None, compat: bool = False, out: Path | None = None,
             progress_factory: Callable[[], Any] | None = None, log: Callable[[str], None] = print,
             bundle: Any = None) -> list[dict]:
    from vigorl_cli.engines.factory import make_engine

    names = benches.split(",") if isinstance(benches, str) else list(benches or r.eval.benches)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        from vigorl_cli.errors import RecipeError

        raise RecipeError("no benchmark given", hint="--bench NAME (see `vigorl eval --list`) or eval.benches in "
                                                     "the recipe")
    bench_objs = [get_benchmark(n) for n in names]
    model_name = model or r.model.name
    if base_urls:
        r.engine.base_urls = list(base_urls)
    backend = engine or ("openai" if base_urls else r.engine.backend)
    out_dir = Path(out) if out is not None else Path(r.output.dir) / "eval"
    eng, processor = make_engine(backend, model_name, r.engine, r.model, seed=r.seed, bundle=bundle)
    sampling = SamplingParams.from_config(r.eval.sampling, n=1)
    summaries = []
    try:
        for b in bench_objs:
            if data_root is not None:
                root = Path(data_root)
            elif b.demo:
                root = demo_root(None)
            else:
                root = Path(expand_env(r.data.root))
            mode = "multi" if multiturn else "single" if multiturn is False else r.eval.mode
            st = EvalSettings(data_root=root, out_dir=out_dir, sampling=sampling, mode=mode,
                              samples=samples or r.eval.samples, limit=limit or r.eval.max_samples,
                              compat=compat or r.eval.compat, system_prompt=r.prompt.system,
                              prompt_variant=r.eval.prompt_variant, literal_newlines=r.prompt.literal_newlines,
                              seed=r.seed, max_turns=r.tool.max_turns, max_images=r.tool.max_images,
                              offset=r.tool.offset, crop_size=r.tool.crop_size, draw_dot=r.tool.draw_dot,
                              observation_style=r.tool.observation_style,
                              max_response_tokens=max(r.eval.max_response_tokens, sampling.max_new_tokens))
            try:
                if progress_factory is not None:
                    with progress_factory() as prog:
                        task = prog.add_task(b.name, total=None, stats="")

                        def cb(done: int, total: int, _info: dict, prog=prog, task=task) -> None:
                            prog.update(task, completed=done, total=total, stats="")

                        s = evaluate(b, eng, processor, st, on_progress=cb)
                else:
                    s = evaluate(b, eng, processor, st)
            except EvalInterrupted as e:  # Ctrl-C: the bench wrote its partial summary; record what is done
                e.summary["model"] = str(model_name)
                atomic_write_json(out_dir / "summary.json", {"model": str(model_name), "complete": False,
                                                             "benches": [*summaries, e.summary]})
                raise
            s["model"] = str(model_name)
            summaries.append(s)
        atomic_write_json(out_dir / "summary.json", {"model": str(model_name), "complete": True,
                                                     "benches": summaries})
    finally:
        close = getattr(eng, "close", None)
        if close is not None:
            close()
    return summaries
