"""Checkpoint files on real disks: manifest and checksums, the writer, retention, the pointer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint import resume, store
from orchestrator.checkpoint.manifest import FileEntry, Manifest, file_sha256, verify
from orchestrator.checkpoint.snapshot import SnapshotEngine
from orchestrator.checkpoint.writer import (
    BackgroundWriter,
    SaveJob,
    SaveResult,
    write_files,
)
from orchestrator.errors import ConfigError


def _commit(checkpoints: Path, step: int) -> Path:
    directory = checkpoints / store.tag_for(step)
    directory.mkdir(parents=True)
    payload = f"shard of step {step}".encode()
    (directory / "shard.pt").write_bytes(payload)
    Manifest(tag=directory.name, step=step, world_size=1, data_parallel_size=1, tensor_parallel=1, zero_stage=2,
             global_batch=8, files={"shard.pt": FileEntry(size=len(payload), sha256=hashlib.sha256(payload).hexdigest())}
             ).write(directory)
    return directory


def test_tags_round_trip() -> None:
    assert store.tag_for(50) == "global_step50"
    assert store.step_of("global_step50") == 50
    assert not store.is_tag("global_step50.tmp")


def test_latest_is_replaced_atomically(tmp_path: Path) -> None:
    assert store.latest_tag(tmp_path) is None
    store.set_latest(tmp_path, "global_step10")
    store.set_latest(tmp_path, "global_step20")
    assert store.latest_tag(tmp_path) == "global_step20"
    assert not list(tmp_path.glob(".latest*")), "no temporary file left behind"


def test_only_directories_with_a_manifest_are_committed(tmp_path: Path) -> None:
    _commit(tmp_path, 20)
    _commit(tmp_path, 10)
    (tmp_path / "global_step30").mkdir()  # a save that never got its manifest
    assert store.committed_tags(tmp_path) == ["global_step10", "global_step20"]


def test_prune_keeps_the_newest_and_the_protected(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40, 50):
        _commit(tmp_path, step)
    (store.universal_dir(tmp_path) / "global_step10").mkdir(parents=True)
    doomed = store.prune(tmp_path, keep_last=2, protect={"global_step20"})
    assert doomed == ["global_step10", "global_step30"]
    assert store.committed_tags(tmp_path) == ["global_step20", "global_step40", "global_step50"]
    assert not (store.universal_dir(tmp_path) / "global_step10").exists(), "its conversion goes with it"


def test_verify_names_the_damaged_file(tmp_path: Path) -> None:
    directory = _commit(tmp_path, 10)
    assert verify(directory) == []
    shard = directory / "shard.pt"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0x01
    shard.write_bytes(bytes(data))
    [problem] = verify(directory)
    assert str(shard) in problem and "SHA-256" in problem
    shard.write_bytes(bytes(data[:-2]))
    [problem] = verify(directory)
    assert str(shard) in problem and "truncated" in problem
    shard.unlink()
    assert verify(directory) == [f"{shard}: missing"]
    (directory / "manifest.json").write_text("{")
    assert "malformed" in verify(directory)[0]


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("tag", "global_step99", "is not its directory's name"),
    ("tag", "../../elsewhere", "is not its directory's name"),
    ("files", {"../../../etc/passwd": {"size": 1, "sha256": "0"}}, "points outside the checkpoint"),
    ("files", {"/etc/passwd": {"size": 1, "sha256": "0"}}, "points outside the checkpoint"),
])
def test_a_crafted_manifest_is_refused(tmp_path: Path, field: str, value: object, problem: str) -> None:
    """A manifest's tag and file names become paths on resume: they must stay inside the checkpoint."""
    directory = _commit(tmp_path, 10)
    raw = json.loads((directory / "manifest.json").read_text())
    raw[field] = value
    (directory / "manifest.json").write_text(json.dumps(raw))
    [found] = verify(directory)
    assert problem in found
    with pytest.raises(ConfigError, match="every checkpoint is damaged"):
        resume.select(tmp_path)
    assert directory.is_dir(), "a refused resume changes nothing"
    _commit(tmp_path, 5)
    manifest, [rejected] = resume.select(tmp_path)
    assert manifest.step == 5 and rejected.tag == directory.name
    assert rejected.moved_to == tmp_path / store.DAMAGED / directory.name and rejected.moved_to.is_dir()
    assert not directory.exists(), "set aside, not deleted"


class _RunsCode:
    def __reduce__(self):
        return (print, ("a crafted checkpoint ran code",))


def test_rank_state_loads_only_plain_data(tmp_path: Path) -> None:
    """The orchestrator's per-rank file holds a step and RNG states; anything that would run code is refused."""
    good = tmp_path / "rank_state_0.pt"
    torch.save({"step": 7, "rng": store.rng_state()}, good)
    assert store.load_rank_state(good)["step"] == 7
    crafted = tmp_path / "rank_state_1.pt"
    torch.save({"step": 7, "rng": _RunsCode()}, crafted)
    with pytest.raises(ValueError, match="refused"):
        store.load_rank_state(crafted)


def test_writer_checksums_what_it_wrote_and_survives_a_reload(tmp_path: Path) -> None:
    state = {"w": torch.arange(1000, dtype=torch.float32), "nested": [torch.ones(3), {"k": 7}]}
    result = write_files(SaveJob(directory=tmp_path, files=[(tmp_path / "a.pt", state)], done=lambda r: None))
    assert result.error is None
    assert result.files["a.pt"] == FileEntry(size=(tmp_path / "a.pt").stat().st_size, sha256=file_sha256(tmp_path / "a.pt"))
    loaded = torch.load(tmp_path / "a.pt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["nested"][1] == {"k": 7}


def test_writer_reports_an_os_error_with_the_file(tmp_path: Path) -> None:
    results: list[SaveResult] = []
    writer = BackgroundWriter()
    missing = tmp_path / "no-such-dir" / "a.pt"
    writer.submit(SaveJob(directory=tmp_path, files=[(missing, {"x": 1})], done=results.append))
    assert writer.wait(30)
    [result] = results
    assert isinstance(result.error, FileNotFoundError) and result.failed_path == missing


def test_writer_reports_any_failure_and_keeps_working(tmp_path: Path) -> None:
    """An object pickle cannot write (a lambda in user_state) is a failed save, not a dead writer."""
    results: list[SaveResult] = []
    writer = BackgroundWriter()
    writer.submit(SaveJob(directory=tmp_path, files=[(tmp_path / "a.pt", {"user": lambda: 1})], done=results.append))
    assert writer.wait(30)
    [result] = results
    assert result.error is not None and result.failed_path == tmp_path / "a.pt"
    assert "pickle" in str(result.error).lower() or "lambda" in str(result.error)
    writer.submit(SaveJob(directory=tmp_path, files=[(tmp_path / "b.pt", {"x": 1})], done=results.append))
    assert writer.wait(30), "the writer thread still runs"
    assert results[-1].error is None


def test_snapshot_is_a_copy_and_reuses_its_buffers() -> None:
    engine = SnapshotEngine()
    live = torch.zeros(4)
    copies = []
    for value in range(2):
        live.fill_(value)
        engine.save({"p": live, "meta": [live, 3]}, "/nowhere/x.pt")
        [(_, state)] = engine.take()
        copies.append(state)
        live.fill_(99)  # training goes on
        assert torch.equal(state["p"], torch.full((4,), float(value))), "the snapshot does not follow the live tensor"
    assert copies[0]["p"].data_ptr() == copies[1]["p"].data_ptr(), "the host buffer is reused"
