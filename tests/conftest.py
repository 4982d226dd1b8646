"""Shared fixtures: an isolated cache for tiny models (built once per session) and offline hub settings."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VIGORL_QUIET", "1")


@pytest.fixture(scope="session", autouse=True)
def vigorl_cache(tmp_path_factory):
    """Tiny models go into a per-session cache unless the caller pinned VIGORL_CACHE (CI reuses one)."""
    if "VIGORL_CACHE" not in os.environ:
        os.environ["VIGORL_CACHE"] = str(tmp_path_factory.mktemp("vigorl-cache"))
    return os.environ["VIGORL_CACHE"]


@pytest.fixture(scope="session")
def tiny_bundle():
    """The tiny Qwen2.5-VL, loaded once per session (read-only: tests must not train it in place)."""
    from vigorl_cli.models.load import load_model

    return load_model("tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small demo DATA_ROOT shared by tests that only read it."""
    from vigorl_cli.data.demo import generate_demo

    root = tmp_path_factory.mktemp("demo-data")
    generate_demo(root, n_per_task=40, seed=0)
    return root
