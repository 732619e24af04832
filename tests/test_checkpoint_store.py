"""The checkpoint pointer and retention, on real files."""

from __future__ import annotations

from pathlib import Path

from orchestrator.checkpoint import store


def _make(directory: Path, *steps: int) -> None:
    for step in steps:
        (directory / store.tag_for(step)).mkdir()
        (directory / store.tag_for(step) / "shard.pt").write_bytes(b"x")


def test_tags_round_trip() -> None:
    assert store.tag_for(50) == "global_step50"
    assert store.step_of("global_step50") == 50


def test_commit_replaces_latest_atomically(tmp_path: Path) -> None:
    assert store.committed_tag(tmp_path) is None
    _make(tmp_path, 10, 20)
    store.commit(tmp_path, "global_step10")
    store.commit(tmp_path, "global_step20")
    assert (tmp_path / "latest").read_text() == "global_step20"
    assert not list(tmp_path.glob(".latest*")), "no temporary file left behind"


def test_prune_keeps_newest_committed(tmp_path: Path) -> None:
    _make(tmp_path, 10, 20, 30, 40, 50)
    store.commit(tmp_path, "global_step40")
    doomed = store.prune(tmp_path, keep_last=2)
    assert doomed == ["global_step10", "global_step20"]
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    # 50 is newer than the committed 40 (a save in flight): never touched.
    assert left == ["global_step30", "global_step40", "global_step50"]


def test_prune_without_commit_deletes_nothing(tmp_path: Path) -> None:
    _make(tmp_path, 10, 20)
    assert store.prune(tmp_path, keep_last=1) == []
    assert len(list(tmp_path.iterdir())) == 2
