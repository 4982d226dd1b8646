"""`data pull`: only requested subsets, from a local mirror or the Hub, safe unpacking, idempotent."""

from __future__ import annotations

import io
import tarfile

import pytest

from vigorl_cli.data.pull import describe, is_pulled, pull
from vigorl_cli.errors import DataError


def _tar(path, files: dict[str, bytes]):
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def mirror(tmp_path):
    m = tmp_path / "mirror"
    m.mkdir()
    _tar(m / "web_action.tar", {"web_action/vigorl_web_action_MCTS.jsonl": b'{"id": 1}\n',
                                "web_action/images/a.png": b"png"})
    _tar(m / "spatial_reasoning.tar", {"spatial_reasoning/sat2_test/sat2_test.jsonl": b"{}\n"})
    (m / "web_grounding").mkdir()  # an already unpacked subset folder works too
    (m / "web_grounding" / "vigorl_osatlas_MCTS.jsonl").write_text("{}\n")
    return m


def test_pull_from_mirror_unpacks_only_requested_subsets(tmp_path, mirror):
    root = tmp_path / "root"
    status = pull(root, ["web_action", "web_grounding"], source=mirror)
    assert status == {"web_action": "pulled", "web_grounding": "pulled"}
    assert (root / "web_action" / "vigorl_web_action_MCTS.jsonl").read_text() == '{"id": 1}\n'
    assert (root / "web_grounding" / "vigorl_osatlas_MCTS.jsonl").is_file()
    assert not (root / "spatial_reasoning").exists()
    assert is_pulled(root, "web_action") and not is_pulled(root, "spatial_reasoning")
    rows = {r["subset"]: r for r in describe(root)}
    assert rows["web_action"]["pulled"] and rows["web_action"]["files"] == 1


def test_second_pull_does_nothing(tmp_path, mirror):
    root = tmp_path / "root"
    pull(root, ["web_action"], source=mirror)
    marker_time = (root / ".vigorl" / "pulled-web_action.json").stat().st_mtime_ns
    (root / "web_action" / "vigorl_web_action_MCTS.jsonl").write_text("edited\n")
    assert pull(root, ["web_action"], source=mirror) == {"web_action": "present"}
    assert (root / "web_action" / "vigorl_web_action_MCTS.jsonl").read_text() == "edited\n"
    assert (root / ".vigorl" / "pulled-web_action.json").stat().st_mtime_ns == marker_time


def test_tar_with_path_escape_is_refused(tmp_path):
    m = tmp_path / "evil"
    m.mkdir()
    _tar(m / "web_action.tar", {"../outside.txt": b"x"})
    with pytest.raises(DataError, match="cannot unpack"):
        pull(tmp_path / "root", ["web_action"], source=m)
    assert not (tmp_path / "outside.txt").exists()
    assert not is_pulled(tmp_path / "root", "web_action")


def test_offline_without_source_is_one_line_naming_source(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        pull(tmp_path / "root", ["web_action"])
    assert "cannot download web_action.tar" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert "--source" in e.value.hint


def test_unknown_subset_and_incomplete_mirror(tmp_path, mirror):
    with pytest.raises(DataError, match="unknown subset"):
        pull(tmp_path / "r", ["visual_serch"], source=mirror)
    with pytest.raises(DataError, match="neither visual_search.tar"):
        pull(tmp_path / "r", ["visual_search"], source=mirror)
