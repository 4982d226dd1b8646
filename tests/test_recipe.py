"""Recipes: defaults ← YAML ← --set, typed, with one-line errors that name file, key and what is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from vigorl_cli.errors import RecipeError
from vigorl_cli.recipe import Recipe, expand_env, explain, load_recipe, parse_override

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_bundled_recipe_validates(path):
    r = load_recipe(path)
    assert isinstance(r, Recipe)
    # each recipe opens with a comment saying what it does
    assert path.read_text().startswith("#")


def test_defaults_follow_the_reference():
    r = load_recipe(None)
    assert (r.mcts.c_puct, r.mcts.children_per_expand, r.mcts.rollouts_per_node, r.mcts.max_depth) == (2.0, 3, 2, 10)
    assert (r.sft.lr, r.sft.weight_decay, r.sft.warmup_ratio, r.sft.max_seq_len) == (1e-6, 0.01, 0.03, 8192)
    assert (r.grpo.clip_low, r.grpo.clip_high, r.grpo.clip_dual, r.grpo.kl_coef) == (0.2, 0.28, 3.0, 0.01)
    assert r.grpo.sampling.top_p == 0.99 and r.eval.sampling.temperature == 0.5


def test_yaml_then_set_overrides_are_typed(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("sft:\n  lr: 1e-5\n  lora:\n    enabled: true\nmodel:\n  name: tiny-qwen3-vl\n")
    r = load_recipe(f, ["sft.lr=2e-4", "grpo.group_size=8", "eval.benches=vstar,blink", "model.max_pixels=12544",
                        "mcts.sampling.temperature=0.7", "model.revision=1234"])
    assert r.sft.lr == 2e-4 and isinstance(r.sft.lr, float)
    assert r.sft.lora.enabled is True  # nested section from the file survives the overrides
    assert r.grpo.group_size == 8 and r.eval.benches == ["vstar", "blink"]
    assert r.model.max_pixels == 12544 and r.mcts.sampling.temperature == 0.7
    assert r.model.revision == "1234"  # a string field keeps the raw text even when it looks like a number
    assert r.model.name == "tiny-qwen3-vl"


def test_yaml_float_written_without_dot_is_accepted(tmp_path):
    # YAML 1.1 reads `1e-6` as a string; a float field must still accept it
    f = tmp_path / "r.yaml"
    f.write_text("sft:\n  lr: 1e-6\n")
    assert load_recipe(f).sft.lr == 1e-6


def test_typo_in_recipe_names_file_key_and_valid_keys(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("sft:\n  lerning_rate: 1.0e-5\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    msg = str(e.value)
    assert str(f) in msg and "'sft.lerning_rate'" in msg and "valid keys in 'sft': lr," in msg
    assert len(msg.splitlines()) == 1


def test_unknown_section_and_wrong_types_are_all_reported(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("sfft: {}\ngrpo:\n  group_size: many\n  kl_estimator: k9\ntool:\n  draw_dot: 3\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    lines = str(e.value).splitlines()
    assert len(lines) == 4
    assert any("unknown key 'sfft'" in s and "did you mean 'sft'" in s for s in lines)
    assert any("'grpo.group_size' expects int, got 'many'" in s for s in lines)
    assert any("'grpo.kl_estimator' expects one of 'k1', 'k2', 'k3'" in s for s in lines)
    assert any("'tool.draw_dot' expects bool" in s for s in lines)


def test_bad_override_syntax_and_semantic_checks():
    with pytest.raises(RecipeError, match="expected section.key=value"):
        load_recipe(None, ["sft.lr"])
    with pytest.raises(RecipeError, match="min_thoughts"):
        load_recipe(None, ["mcts.min_thoughts=9"])
    with pytest.raises(RecipeError, match="base_urls"):
        load_recipe(None, ["engine.backend=openai"])


def test_non_mapping_and_invalid_yaml_are_one_line_errors(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping of sections"):
        load_recipe(f)
    g = tmp_path / "broken.yaml"
    g.write_text("sft: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(g)
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_parse_override_null_and_lists():
    assert parse_override("model.max_pixels=null") == (["model", "max_pixels"], None)
    assert parse_override("eval.benches=[vstar, blink]") == (["eval", "benches"], ["vstar", "blink"])


def test_env_expansion_in_data_root(monkeypatch):
    monkeypatch.delenv("VIGORL_DATA_ROOT", raising=False)
    assert expand_env("${VIGORL_DATA_ROOT:-data/demo}") == "data/demo"
    monkeypatch.setenv("VIGORL_DATA_ROOT", "/x/y")
    assert expand_env("${VIGORL_DATA_ROOT:-data/demo}/a") == "/x/y/a"


def test_explain_lists_every_leaf_with_help():
    rows = explain()
    keys = {r[0] for r in rows}
    assert {"sft.lr", "grpo.sampling.top_p", "sft.lora.r", "seed"} <= keys
    assert all(r[3] for r in rows), "every key has a help text"


def test_recipe_round_trips_through_yaml(tmp_path):
    r = load_recipe(None, ["sft.lr=3e-5", "eval.benches=vstar"])
    f = tmp_path / "resolved.yaml"
    f.write_text(r.to_yaml())
    assert load_recipe(f) == r


def test_recipe_reference_doc_is_current():
    from vigorl_cli.recipe import reference_markdown

    doc = Path(__file__).parent.parent / "docs" / "recipes.md"
    assert doc.read_text() == reference_markdown(), "regenerate: python -c 'from vigorl_cli.recipe import " \
                                                    "reference_markdown as r; open(\"docs/recipes.md\",\"w\").write(r())'"
