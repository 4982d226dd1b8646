"""`data pull`: only requested subsets, from a local mirror or the Hub, safe unpacking, idempotent."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

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


# -- the multi-turn V* crops: two tar parts, one folder ------------------------------------------------------------

MCTS_DIR = "visual_search/MCTS_VSTAR_20250514_134727_images"
PART1, PART2 = "MCTS_VSTAR_20250514_134727_images_1", "MCTS_VSTAR_20250514_134727_images_2"


def _mcts_mirror(tmp_path):
    """The released shape: each part tar holds its files under a folder named like the tar."""
    m = tmp_path / "mcts-mirror"
    m.mkdir()
    _tar(m / f"{PART1}.tar", {f"{PART1}/0_crop_0.png": b"a", f"{PART1}/sub/1_crop_1.png": b"b"})
    _tar(m / f"{PART2}.tar", {f"{PART2}/2_crop_0.png": b"c", f"{PART2}/sub/3_crop_2.png": b"d"})
    return m


def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


WANT = {"0_crop_0.png": b"a", "sub/1_crop_1.png": b"b", "2_crop_0.png": b"c", "sub/3_crop_2.png": b"d"}


def test_mcts_image_parts_merge_into_the_released_folder(tmp_path):
    root = tmp_path / "root"
    assert pull(root, ["visual_search_mcts_images"], source=_mcts_mirror(tmp_path)) == \
        {"visual_search_mcts_images": "pulled"}
    assert _files(root / MCTS_DIR) == WANT
    assert sorted(p.name for p in root.iterdir()) == [".vigorl", "visual_search"]  # no ROOT/MCTS_..._{1,2}/
    assert sorted(p.name for p in (root / "visual_search").iterdir()) == ["MCTS_VSTAR_20250514_134727_images"]
    rows = {r["subset"]: r for r in describe(root)}
    assert rows["visual_search_mcts_images"]["pulled"]
    # idempotent: a second pull does nothing
    (root / MCTS_DIR / "0_crop_0.png").write_bytes(b"edited")
    assert pull(root, ["visual_search_mcts_images"], source=tmp_path / "mcts-mirror") == \
        {"visual_search_mcts_images": "present"}
    assert (root / MCTS_DIR / "0_crop_0.png").read_bytes() == b"edited"


def test_mcts_image_parts_from_unpacked_part_folders(tmp_path):
    m = tmp_path / "folders"
    for part, files in ((PART1, {"0_crop_0.png": b"a", "sub/1_crop_1.png": b"b"}),
                        (PART2, {"2_crop_0.png": b"c", "sub/3_crop_2.png": b"d"})):
        for rel, data in files.items():
            (m / part / rel).parent.mkdir(parents=True, exist_ok=True)
            (m / part / rel).write_bytes(data)
    pull(tmp_path / "root", ["visual_search_mcts_images"], source=m)
    assert _files(tmp_path / "root" / MCTS_DIR) == WANT


def _fake_hub(monkeypatch, mirror, calls, fail_on=None):
    """``hf_hub_download`` without the network: copies the tar from ``mirror`` into ``local_dir``."""
    import shutil

    import huggingface_hub

    def fake(repo_id, filename, *, repo_type=None, revision=None, local_dir=None, **kw):
        assert repo_id == "gsarch/vigorl_datasets" and repo_type == "dataset"
        calls.append(filename)
        if filename == fail_on:
            raise ConnectionError("connection reset")
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mirror / filename, dest)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)


def test_hub_pull_downloads_only_requested_tars_and_deletes_them(tmp_path, monkeypatch, mirror):
    calls: list[str] = []
    _fake_hub(monkeypatch, mirror, calls)
    root = tmp_path / "root"
    assert pull(root, ["web_action"]) == {"web_action": "pulled"}
    assert calls == ["web_action.tar"]
    assert (root / "web_action" / "vigorl_web_action_MCTS.jsonl").read_text() == '{"id": 1}\n'
    assert not (root / ".vigorl" / "downloads" / "web_action.tar").exists()
    assert pull(root, ["web_action"]) == {"web_action": "present"} and calls == ["web_action.tar"]


def test_hub_pull_of_mcts_parts_resumes_after_the_first_part(tmp_path, monkeypatch):
    m = _mcts_mirror(tmp_path)
    root = tmp_path / "root"
    calls: list[str] = []
    _fake_hub(monkeypatch, m, calls, fail_on=f"{PART2}.tar")  # the connection drops on the second part
    with pytest.raises(DataError, match=f"cannot download {PART2}.tar"):
        pull(root, ["visual_search_mcts_images"])
    assert not is_pulled(root, "visual_search_mcts_images")
    assert _files(root / MCTS_DIR) == {"0_crop_0.png": b"a", "sub/1_crop_1.png": b"b"}
    calls.clear()
    _fake_hub(monkeypatch, m, calls)
    assert pull(root, ["visual_search_mcts_images"]) == {"visual_search_mcts_images": "pulled"}
    assert calls == [f"{PART2}.tar"]  # part 1 is not fetched again
    assert _files(root / MCTS_DIR) == WANT
    assert not (root / PART1).exists() and not (root / PART2).exists()
