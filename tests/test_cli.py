"""The commands users run: help texts, versions, one-line errors, and small end-to-end invocations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vigorl_cli.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def _sub(args, **kw):
    env = dict(os.environ, VIGORL_QUIET="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "vigorl_cli", *args], capture_output=True, text=True, env=env,
                          cwd=kw.get("cwd", ROOT), timeout=300)


def test_help_lists_every_command_and_each_has_examples():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("data", "model", "recipe", "eval", "mcts", "linearize", "sft", "grpo", "merge", "view", "run"):
        assert cmd in res.output
    for args in (["data", "pull"], ["data", "demo"], ["data", "validate"], ["model", "tiny"], ["model", "info"],
                 ["recipe", "check"], ["recipe", "ls"], ["recipe", "cp"], ["eval"], ["mcts"], ["linearize"],
                 ["sft"], ["grpo"], ["merge"], ["view"], ["run"]):
        res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0, args
        assert "Example" in res.output, args


def test_version_prints_package_and_library_versions():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("vigorl 0.1.0") and "transformers" in res.output


def test_recipe_typo_is_one_red_line_and_exit_code_2(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("model:\n  nmae: tiny-qwen2.5-vl\n")
    res = _sub(["recipe", "check", str(bad)])
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "'model.nmae'" in lines[0] and "valid keys in 'model': name," in lines[0]
    assert "Traceback" not in res.stderr


def test_recipe_check_prints_the_resolved_recipe_and_cp_copies(tmp_path):
    res = runner.invoke(app, ["recipe", "check", str(ROOT / "recipes" / "demo.yaml"), "--set", "sft.lr=3e-5",
                              "--json"])
    assert res.exit_code == 0
    assert json.loads(res.stdout)["sft"]["lr"] == 3e-5
    res = runner.invoke(app, ["recipe", "cp", "demo", str(tmp_path / "mine.yaml")])
    assert res.exit_code == 0 and (tmp_path / "mine.yaml").read_text() == (ROOT / "recipes" / "demo.yaml").read_text()
    res = runner.invoke(app, ["recipe", "cp", "nope", str(tmp_path / "x.yaml")])
    assert res.exit_code != 0


def test_data_demo_then_validate_ok_and_corruption_fails(tmp_path):
    root = tmp_path / "demo"
    res = runner.invoke(app, ["data", "demo", "--out", str(root), "--n", "8"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["data", "validate", str(root / "web_grounding"), "--root", str(root)])
    assert res.exit_code == 0, res.output
    img = next((root / "web_grounding").rglob("*.png"))
    img.write_bytes(b"not a png")
    res = runner.invoke(app, ["data", "validate", str(root / "web_grounding"), "--root", str(root)])
    assert res.exit_code == 1


def test_validate_without_root_finds_the_data_root_above_the_file(tmp_path, monkeypatch):
    """No --root and no env: images are found by searching the folders above the data file, not in ./data."""
    root = tmp_path / "demo"
    assert runner.invoke(app, ["data", "demo", "--out", str(root), "--n", "6"]).exit_code == 0
    monkeypatch.delenv("VIGORL_DATA_ROOT", raising=False)
    monkeypatch.delenv("DATA_ROOT", raising=False)
    elsewhere = tmp_path / "cwd"
    (elsewhere / "data").mkdir(parents=True)  # an unrelated ./data must not be taken for the root
    monkeypatch.chdir(elsewhere)
    res = runner.invoke(app, ["data", "validate", str(root / "web_grounding")], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "missing_image" not in res.output
    # the whole smallest demo (every SFT val file included) validates clean too
    res = runner.invoke(app, ["data", "validate", str(root)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    # an explicit wrong root still reports the missing images
    res = runner.invoke(app, ["data", "validate", str(root / "web_grounding"), "--root", "data"],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "missing_image" in res.output


def test_data_demo_below_the_minimum_is_a_usage_error(tmp_path):
    res = _sub(["data", "demo", "--out", str(tmp_path / "d"), "--n", "5"])
    assert res.returncode == 2 and "at least 6" in res.stderr and "Traceback" not in res.stderr


def test_data_pull_offline_without_source_is_a_one_line_error(tmp_path):
    res = _sub(["data", "pull", "--subset", "web_action", "--root", str(tmp_path)])
    assert res.returncode == 2 and "--source" in res.stderr and "Traceback" not in res.stderr


def test_model_tiny_writes_a_loadable_folder(tmp_path):
    res = runner.invoke(app, ["model", "tiny", "tiny-qwen2-vl", "--out", str(tmp_path / "m")])
    assert res.exit_code == 0
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "m").model_type == "qwen2_vl"


def test_eval_list_and_a_small_eval_run(tmp_path):
    res = runner.invoke(app, ["eval", "--list"], env={"COLUMNS": "250"})
    assert res.exit_code == 0 and "demo-grounding" in res.output and "screenspot-pro" in res.output
    res = runner.invoke(app, ["eval", "--model", "tiny-qwen2.5-vl", "--bench", "demo-grounding", "--limit", "3",
                              "--out", str(tmp_path / "ev"), "--set", "eval.sampling.max_new_tokens=8",
                              "--data-root", str(tmp_path / "d"), "--json"])
    # --data-root points at an empty folder: every sample fails to load → exit 1 after recording the failures
    assert res.exit_code != 0
    res = runner.invoke(app, ["data", "demo", "--out", str(tmp_path / "d"), "--n", "8"])
    res = runner.invoke(app, ["eval", "--model", "tiny-qwen2.5-vl", "--bench", "demo-grounding", "--limit", "3",
                              "--out", str(tmp_path / "ev2"), "--set", "eval.sampling.max_new_tokens=8",
                              "--data-root", str(tmp_path / "d"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)[0]
    n_file = len((tmp_path / "d/web_grounding/ScreenSpot-V2/screenspot_v2_test.jsonl").read_text().splitlines())
    assert summary["bench"] == "demo-grounding" and summary["n"] == min(3, n_file)
    assert (tmp_path / "ev2" / "demo-grounding" / "samples.jsonl").is_file()


@pytest.mark.parametrize("cmd", [["eval", "--bench", "nope"]])
def test_unknown_benchmark_is_a_one_line_error(cmd):
    res = _sub([*cmd, "--model", "tiny-qwen2.5-vl"])
    assert res.returncode == 2 and "unknown benchmark 'nope'" in res.stderr


def test_optional_extras_are_bounded_to_the_tested_releases():
    """vllm and flash-attn extras admit only the releases known to work with the transformers pin (environment.md)."""
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}
    transformers = next(Requirement(r) for r in project["dependencies"] if r.startswith("transformers"))
    assert transformers.specifier.contains("5.19.0")
    (vllm,) = extras["vllm"]
    assert vllm.name == "vllm" and vllm.specifier.contains("0.33.0") and vllm.specifier.contains("0.33.2")
    assert not vllm.specifier.contains("0.34.0") and not vllm.specifier.contains("0.11.0")
    (flash,) = extras["flash"]
    assert flash.name == "flash-attn" and flash.specifier.contains("2.8.3")
    assert not flash.specifier.contains("3.0.0")
