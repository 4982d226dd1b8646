"""`vigorl mcts`: recipe → data → resumable, sharded tree search → ``trees.jsonl``.

Output folder (``--out``, default ``<output.dir>/mcts``):

* ``trees.jsonl`` (``trees.shard-I-of-N.jsonl`` with ``--shard I/N``): one tree per line in the reference schema
  (:mod:`vigorl_cli.search.tree`), appended and fsynced as each tree finishes. A rerun on the same folder skips every
  id already in any ``trees*.jsonl`` there (so shards can share a folder), and a torn last line from a kill is
  dropped: no tree is lost (a tree in flight is redone) or written twice.
* ``errors.jsonl`` (per shard likewise): ``{"id", "error": kind, "error_message", ...}`` per failed sample, kinds
  ``image_error``, ``timeout``, ``engine_error``, ``exception``. Failed samples are retried by a rerun.
* ``manifest.json`` (the recipe, model, shard) and, at the end, ``summary.json`` (per shard likewise).

Sharding: a sample belongs to shard ``I`` of ``N`` when ``derive_seed("shard", id) % N == I``: stable for a given
id whatever the file order, so machines can split a dataset without coordinating.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter as CountBy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import UnidentifiedImageError

from vigorl_cli.agent.images import load_for_model
from vigorl_cli.data.formats import read_samples
from vigorl_cli.data.io import LineError, ResultsFile, atomic_write_json
from vigorl_cli.data.schema import Sample
from vigorl_cli.engines.base import derive_seed
from vigorl_cli.errors import DataError, RecipeError
from vigorl_cli.recipe import Recipe, expand_env
from vigorl_cli.search.mcts import Counters, MCTSSettings, TreeSearch, drive, drive_sequential

# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------

def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"1/4"`` → ``(1, 4)`` (0-based index ``I`` of ``N``)."""
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise RecipeError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise RecipeError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def in_shard(sample_id: str, shard: tuple[int, int] | None) -> bool:
    return shard is None or derive_seed("shard", sample_id) % shard[1] == shard[0]


def load_samples(files: list[str | Path], root: Path, max_samples: int | None = None,
                 seed: int = 42) -> tuple[list[Sample], list[LineError]]:
    """Samples of every file (relative paths under ``root``); ``max_samples`` per file after a seeded shuffle."""
    out, errors = [], []
    for f in files:
        path = Path(f) if Path(f).is_absolute() else root / f
        sf = read_samples(path)
        errors.extend(sf.errors)
        samples = list(sf.samples)
        if max_samples is not None and len(samples) > max_samples:
            random.Random(seed).shuffle(samples)
            samples = samples[:max_samples]
        out.extend(samples)
    return out, errors


# ---------------------------------------------------------------------------------------------------------------
# The resumable run
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class RunStats:
    """Live numbers for the progress bar and the summary."""

    total: int = 0
    done: int = 0
    correct: int = 0
    errors: CountBy = field(default_factory=CountBy)
    counters: Counters = field(default_factory=Counters)
    t0: float = field(default_factory=time.monotonic)

    @property
    def trees(self) -> int:
        """Finished searches that produced a tree (``done`` counts failed samples too)."""
        return self.done - sum(self.errors.values())

    def line(self, now: float | None = None) -> str:
        """The progress bar's stats: generated steps and tokens per second since ``t0``, the share of finished trees
        with a correct rollout (as ``root_accuracy`` in the summary: failed samples are not trees), errors. Trees
        done/total, elapsed time and the ETA are the bar's own columns (``console.progress``)."""
        dt = max(1e-9, (time.monotonic() if now is None else now) - self.t0)
        acc = self.correct / self.trees if self.trees else 0.0
        err = sum(self.errors.values())
        return (f"{self.counters.steps / dt:.1f} nodes/s · {self.counters.tokens / dt:.0f} tok/s · "
                f"root acc {acc:.0%}" + (f" · {err} errors" if err else ""))


def output_names(shard: tuple[int, int] | None) -> tuple[str, str, str]:
    tag = "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"
    return f"trees{tag}.jsonl", f"errors{tag}.jsonl", f"summary{tag}.json"


def finished_ids(out_dir: Path) -> set[str]:
    """Ids of every tree in any ``trees*.jsonl`` of ``out_dir`` (torn last lines are ignored)."""
    ids: set[str] = set()
    for p in sorted(out_dir.glob("trees*.jsonl")):
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec and "error" not in rec:
                ids.add(str(rec["id"]))
    return ids


def pending(samples: list[Sample], out_dir: Path, shard: tuple[int, int] | None = None) -> list[Sample]:
    """The samples of ``shard`` without a finished tree in ``out_dir`` (one per id, in input order)."""
    done = finished_ids(out_dir) if out_dir.is_dir() else set()
    todo = [s for s in samples if in_shard(s.id, shard) and s.id not in done]
    return list({s.id: s for s in todo}.values())  # one tree per id, even if a file repeats an id


def search_samples(samples: list[Sample], engine: Any, processor: Any, settings: MCTSSettings, out_dir: Path,
                   data_root: Path, shard: tuple[int, int] | None = None, in_flight: int = 16,
                   group_n: bool = True, sequential: bool = False,
                   on_progress: Callable[[RunStats], None] | None = None) -> dict:
    """Search every sample of ``samples`` (in ``shard``) not yet in ``out_dir``; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trees_name, errors_name, summary_name = output_names(shard)
    todo = pending(samples, out_dir, shard)
    stats = RunStats(total=len(todo))
    trees = ResultsFile(out_dir / trees_name)
    errors = ResultsFile(out_dir / errors_name)

    def report() -> None:
        if on_progress is not None:
            on_progress(stats)

    def record_error(rec: dict) -> None:
        errors.append(rec)
        stats.errors[rec["error"]] += 1
        stats.done += 1
        report()

    def searches() -> Iterator[TreeSearch]:
        for s in todo:
            try:
                if not s.images:
                    raise FileNotFoundError("the sample names no image")
                path = s.image_paths(data_root)[0]
                _, frame, shown = load_for_model(path, processor)
            except (OSError, UnidentifiedImageError) as e:
                record_error({"id": s.id, "error": "image_error", "error_message": f"{type(e).__name__}: {e}"})
                continue
            yield TreeSearch(s, shown, frame, processor, settings,
                             image_path=str(Path(path).resolve()), counters=stats.counters)

    def finish(t: TreeSearch) -> None:
        if t.error is not None:
            record_error(t.error_record())
            return
        rec = t.tree_record()
        trees.append(rec.to_dict())
        stats.done += 1
        stats.correct += int(rec.root_correct)
        report()

    try:
        if sequential:
            drive_sequential(engine, searches(), finish)
        else:
            drive(engine, searches(), finish, in_flight=in_flight, group_n=group_n, on_wave=report)
    finally:
        trees.close()
        errors.close()
    summary = summarize(trees.read(), stats, time.monotonic() - stats.t0)
    atomic_write_json(out_dir / summary_name, summary)
    return summary


def summarize(records: list[dict], stats: RunStats, seconds: float) -> dict:
    """Whole-file numbers (every tree in the file) plus this run's throughput."""
    n = len(records)
    correct = sum(1 for r in records if r.get("root_correct"))
    return {
        "trees": n,
        "root_accuracy": round(correct / n, 6) if n else 0.0,
        "mean_nodes": round(sum((r.get("stats") or {}).get("nodes", 0) for r in records) / n, 3) if n else 0.0,
        "new_trees": stats.done - sum(stats.errors.values()),
        "errors": dict(stats.errors),
        "seconds": round(seconds, 3),
        "steps": stats.counters.steps,
        "tokens": stats.counters.tokens,
        "nodes_per_second": round(stats.counters.steps / seconds, 3) if seconds > 0 else None,
        "tokens_per_second": round(stats.counters.tokens / seconds, 3) if seconds > 0 else None,
    }


# ---------------------------------------------------------------------------------------------------------------
# Recipe → run
# ---------------------------------------------------------------------------------------------------------------

def sample_limit(r: Recipe, limit: int | None = None) -> int | None:
    """Samples per input file: ``--limit`` > ``mcts.max_samples`` > ``data.max_samples`` (the first one set), as
    ``vigorl eval`` lets ``--limit`` override ``eval.max_samples``; ``None``: every sample."""
    return next((v for v in (limit, r.mcts.max_samples, r.data.max_samples) if v is not None), None)


def run_mcts(r: Recipe, out: Path | None = None, model: str | None = None, engine: str | None = None,
             base_urls: list[str] | None = None, files: list[str] | None = None, data_root: Path | None = None,
             shard: str | None = None, limit: int | None = None,
             progress_factory: Callable[[], Any] | None = None, bundle: Any = None) -> dict:
    """Run ``vigorl mcts`` for a recipe (CLI flags override the recipe's values)."""
    from vigorl_cli.engines.factory import make_engine

    root = Path(data_root) if data_root is not None else Path(expand_env(r.data.root))
    inputs = list(files or r.data.mcts)
    if not inputs:
        raise RecipeError("no MCTS input files", hint="data.mcts in the recipe, or --data FILE")
    samples, load_errors = load_samples(inputs, root, sample_limit(r, limit), seed=r.seed)
    if not samples:
        raise DataError(f"no usable samples in {', '.join(map(str, inputs))}",
                        hint="; ".join(str(e) for e in load_errors[:3]) or None)
    out_dir = Path(out) if out is not None else Path(r.output.dir) / "mcts"
    sh = parse_shard(shard)
    if base_urls:
        r.engine.base_urls = list(base_urls)
    backend = engine or ("openai" if base_urls else (r.mcts.engine or r.engine.backend))
    model_name = model or r.mcts.model or r.model.name
    settings = MCTSSettings.from_recipe(r)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"command": "mcts", "model": str(model_name), "engine": backend, "shard": shard,
                "data_root": str(root), "inputs": [str(f) for f in inputs], "recipe": r.to_dict(),
                "load_errors": [str(e) for e in load_errors]}
    atomic_write_json(out_dir / ("manifest.json" if sh is None else f"manifest.shard-{sh[0]}-of-{sh[1]}.json"),
                      manifest)
    if not pending(samples, out_dir, sh):  # nothing left: no need to load a model
        trees_name, _, summary_name = output_names(sh)
        summary = summarize(ResultsFile(out_dir / trees_name).read(), RunStats(), 0.0)
        atomic_write_json(out_dir / summary_name, summary)
        return {**summary, "out": str(out_dir), "load_errors": len(load_errors)}
    eng, processor = make_engine(backend, model_name, r.engine, r.model, seed=r.seed, bundle=bundle)
    try:
        kw = {"shard": sh, "in_flight": r.mcts.trees_in_flight, "group_n": r.mcts.group_n}
        if progress_factory is None:
            summary = search_samples(samples, eng, processor, settings, out_dir, root, **kw)
        else:
            with progress_factory() as prog:
                task = prog.add_task("mcts", total=None, stats="")

                def cb(st: RunStats) -> None:
                    prog.update(task, completed=st.done, total=st.total, stats=st.line())

                summary = search_samples(samples, eng, processor, settings, out_dir, root, on_progress=cb, **kw)
    finally:
        close = getattr(eng, "close", None)
        if close is not None:
            close()
    summary["out"] = str(out_dir)
    summary["load_errors"] = len(load_errors)
    return summary
