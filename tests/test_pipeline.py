"""`vigorl run`: every stage on the tiny model and the demo data, resumable per stage, one comparison table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def _run_with_trees(tmp_path, name, *sets):
    """A run folder whose data and mcts stages are done (two hand-built trees), and its recipe."""
    from test_linearize import _image, hand_tree

    from vigorl_cli.recipe import load_recipe

    tmp_path.mkdir(parents=True, exist_ok=True)
    _image().save(tmp_path / "img.png")
    trees = tmp_path / "trees.jsonl"
    trees.write_text("".join(json.dumps(hand_tree(str(tmp_path / "img.png"), f"t{k}").to_dict()) + "\n"
                             for k in range(2)))
    run = tmp_path / name
    for stage, info in (("data", {}), ("mcts", {"trees": [str(trees)]})):
        (run / stage).mkdir(parents=True)
        (run / stage / "stage.json").write_text(json.dumps(info))
    r = load_recipe(ROOT / "recipes" / "demo.yaml", [
        f"data.root={tmp_path}", "data.sft_train=[]", "linearize.multiturn=true", "linearize.val_fraction=0.5",
        "linearize.shuffle_prob=0", "linearize.min_pixels=39200", "linearize.max_pixels=39200", "tool.offset=20",
        "tool.crop_size=56", "sft.max_steps=1", "sft.micro_batch_size=1", "sft.save_every=1", *sets])
    return run, r


def test_multiturn_pipeline_trains_sft_on_the_zoom_dialogs(tmp_path):
    """tool.enabled: the sft stage trains on linearize's _MULTITURN dialogs (crops included), not the chains."""
    from vigorl_cli.data.formats import read_sft
    from vigorl_cli.pipeline import run_pipeline

    run, r = _run_with_trees(tmp_path, "multi", "tool.enabled=true")
    info = run_pipeline(r, out=run, start="linearize", stop="sft", log=lambda *_: None)
    dialogs = run / "linearize" / "reasoning_chains_train_MULTITURN.json"
    assert info["linearize"]["train"] == [str(dialogs)]
    assert info["sft"]["data"] == [str(dialogs)]
    records = read_sft(dialogs)[0]
    assert all(rec.n_image_slots == len(rec.images) for rec in records)
    assert any(len(rec.images) >= 2 for rec in records)  # zoom dialogs: the question image plus crops
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert list(manifest["data"]) == [str(dialogs)] and manifest["n_examples"] == len(records)
    # the same run without the tool trains the single-turn chains
    run1, r1 = _run_with_trees(tmp_path / "single", "single")
    info1 = run_pipeline(r1, out=run1, start="linearize", stop="linearize", log=lambda *_: None)
    assert info1["linearize"]["train"] == [str(run1 / "linearize" / "reasoning_chains_train.json")]


def test_data_stage_generates_a_missing_demo_root_and_refuses_a_missing_real_one(tmp_path):
    """The README's first command starts from nothing: the data stage writes the demo set (every file the recipe
    reads); a real recipe's missing files are a one-line error naming `vigorl data pull`, nothing downloaded."""
    from vigorl_cli.errors import DataError
    from vigorl_cli.pipeline import stage_data
    from vigorl_cli.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / "demo.yaml", [f"data.root={tmp_path / 'data' / 'demo'}"])
    got = stage_data(r, tmp_path / "run", log=lambda *_: None)
    files = [*r.data.mcts, *r.data.sft_train, *r.data.rl_train]
    assert got["files"] == files and files
    for f in files:
        assert (tmp_path / "data" / "demo" / f).stat().st_size > 0
    assert stage_data(r, tmp_path / "run", log=lambda *_: None) == got  # second call: nothing to do

    real = load_recipe(ROOT / "recipes" / "spatial.yaml", [f"data.root={tmp_path / 'vigorl'}"])
    with pytest.raises(DataError, match="data files not found") as e:
        stage_data(real, tmp_path / "run2", log=lambda *_: None)
    assert "vigorl data pull" in (e.value.hint or "")
    assert not (tmp_path / "vigorl").exists()
