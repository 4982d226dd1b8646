"""Metric loggers: one small protocol (torchtune's ``MetricLoggerInterface``). JSONL is always on.

``make_loggers(output_cfg, run_dir, is_main)`` gives what the recipe's ``output.loggers`` asks for; ranks other than
0 get a logger that drops everything, so loops call ``logger.log(...)`` without ``if rank == 0``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from vigorl_cli.data.io import atomic_write_text
from vigorl_cli.errors import RecipeError


class MetricLogger(Protocol):
    def log(self, payload: dict[str, Any], step: int) -> None: ...

    def close(self) -> None: ...


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    return v


class JsonlLogger:
    """``metrics.jsonl``: one ``{"step": n, ...}`` line per call, flushed. On resume, lines past ``resume_step`` (logged
    after the checkpoint by the killed run) are dropped so the file holds one curve."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [line for line in read_jsonl_lines(self.path) if line.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, payload: dict[str, Any], step: int) -> None:
        self._f.write(json.dumps({"step": step, **{k: _clean(v) for k, v in payload.items()}}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl_lines(path: Path) -> list[dict]:
    """The complete lines of a metrics file (a torn last line from a kill is skipped)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class TensorBoardLogger:
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RecipeError("output.loggers has 'tensorboard' but the tensorboard package is not installed",
                              hint="pip install tensorboard, or drop it from output.loggers") from None
        self._w = SummaryWriter(log_dir=str(log_dir))

    def log(self, payload: dict[str, Any], step: int) -> None:
        for k, v in payload.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._w.add_scalar(k, v, global_step=step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class WandbLogger:
    def __init__(self, project: str | None, run_dir: Path, config: dict | None):
        try:
            import wandb
        except ImportError:
            raise RecipeError("output.loggers has 'wandb' but the wandb package is not installed",
                              hint="pip install wandb, or drop it from output.loggers") from None
        self._wandb = wandb
        self._run = wandb.init(project=project or "vigorl", dir=str(run_dir), config=config or {},
                               name=Path(run_dir).name, resume="allow",
                               id=os.environ.get("WANDB_RUN_ID"))

    def log(self, payload: dict[str, Any], step: int) -> None:
        self._run.log({k: v for k, v in payload.items() if isinstance(v, (int, float, str))}, step=step)

    def close(self) -> None:
        self._run.finish()


class NullLogger:
    def log(self, payload: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class Loggers:
    """Fan-out to several loggers."""

    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = loggers

    def log(self, payload: dict[str, Any], step: int) -> None:
        for lg in self.loggers:
            lg.log(payload, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def make_loggers(output_cfg, run_dir: Path, is_main: bool, resume_step: int | None = None,
                 config: dict | None = None, name: str = "metrics.jsonl") -> MetricLogger:
    """JSONL always; TensorBoard (``run_dir/tb``) and W&B when ``output.loggers`` lists them. Rank 0 only."""
    if not is_main:
        return NullLogger()
    loggers: list[MetricLogger] = [JsonlLogger(Path(run_dir) / name, resume_step)]
    if "tensorboard" in output_cfg.loggers:
        loggers.append(TensorBoardLogger(Path(run_dir) / "tb"))
    if "wandb" in output_cfg.loggers:
        loggers.append(WandbLogger(output_cfg.wandb_project, Path(run_dir), config))
    return Loggers(loggers)
