"""`vigorl run`: every stage on the tiny model and the demo data, resumable per stage, one comparison table."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from vigorl_cli.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--set", "mcts.max_samples=2", "--set", "sft.max_steps=3", "--set", "sft.save_every=3",
        "--set", "grpo.steps=1", "--set", "grpo.sampling.max_new_tokens=16", "--set", "eval.max_samples=3",
        "--set", "eval.sampling.max_new_tokens=8"]


def test_run_demo_pipeline_then_resume_and_redo(tmp_path, demo_root):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["run", str(ROOT / "recipes" / "demo.yaml"), "--out", str(out), "--set", f"data.root={demo_root}", *FAST]
    res = runner.invoke(app, [*args, "--to", "sft"])
    assert res.exit_code == 0, res.output
    assert (out / "sft" / "stage.json").is_file() and not (out / "grpo").exists()
    trees = [json.loads(x) for x in (out / "mcts" / "trees.jsonl").read_text().splitlines()]
    assert len(trees) == 2 and "tree" in trees[0]
    # resume: finished stages are skipped, the rest runs, one table at the end
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "[sft] already complete: skipped" in res.output
    info = json.loads((out / "pipeline.json").read_text())["stages"]
    assert set(info) == {"data", "mcts", "linearize", "sft", "grpo", "merge", "eval"}
    assert set(info["eval"]["summaries"]) == {"base", "sft", "grpo"}
    assert "base" in res.stdout and "grpo" in res.stdout and "sat2" in res.stdout
    assert (out / "merge" / "model" / "config.json").is_file()
    # --from redoes that stage and what follows
    before = (out / "eval" / "stage.json").stat().st_mtime_ns
    res = runner.invoke(app, [*args, "--from", "eval"])
    assert res.exit_code == 0 and (out / "eval" / "stage.json").stat().st_mtime_ns != before


def test_unknown_stage_is_a_one_line_error(tmp_path):
    res = CliRunner().invoke(app, ["run", str(ROOT / "recipes" / "demo.yaml"), "--out", str(tmp_path), "--to", "ssft"])
    assert res.exit_code != 0 and "not a stage" in str(res.exception)
