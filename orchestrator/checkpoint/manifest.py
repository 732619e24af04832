"""The manifest: what a committed checkpoint holds, written last, and how to check it.

``manifest.json`` in a checkpoint directory lists every file with its size
and SHA-256, the step, the parallel layout it was saved with and the job's
config. A directory is a committed checkpoint only once it has a manifest
(the controller writes it after every rank's files are durable), so a
reader never mistakes a partial save for a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class FileEntry:
    """One file of a checkpoint, relative to its directory."""

    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything needed to validate a checkpoint and to load it into another layout."""

    tag: str
    step: int
    world_size: int
    data_parallel_size: int
    tensor_parallel: int
    zero_stage: int
    global_batch: int
    files: dict[str, FileEntry]
    config: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    format: int = FORMAT_VERSION

    @property
    def layout(self) -> tuple[int, int]:
        """(data-parallel size, tensor-parallel size): what a loader must match or convert from."""
        return self.data_parallel_size, self.tensor_parallel

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def write(self, directory: Path) -> None:
        """Write ``manifest.json`` into ``directory`` durably (temp file, fsync, rename)."""
        # Not dataclasses.asdict: it deep-copies every entry, 0.08 s for the 16,384 files of 16,384 ranks.
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        record["files"] = {name: {"size": entry.size, "sha256": entry.sha256} for name, entry in self.files.items()}
        write_durably(directory / MANIFEST, json.dumps(record, indent=1, sort_keys=True).encode())

    @classmethod
    def read(cls, directory: Path) -> Manifest:
        """Read ``directory/manifest.json``; raises ``ValueError`` when it is missing or malformed."""
        path = directory / MANIFEST
        try:
            raw = json.loads(path.read_text())
            files = {name: FileEntry(**entry) for name, entry in raw.pop("files").items()}
            manifest = cls(files=files, **raw)
        except FileNotFoundError:
            raise ValueError(f"{path}: missing (the save never completed)") from None
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"{path}: malformed ({exc})") from None
        # The tag and file names become paths on resume: they must name this directory and files in it.
        if manifest.tag != directory.name:
            raise ValueError(f"{path}: its tag {manifest.tag!r} is not its directory's name {directory.name!r}")
        for name in manifest.files:
            parts = PurePosixPath(name).parts
            if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
                raise ValueError(f"{path}: file name {name!r} points outside the checkpoint")
        return manifest


def verify(directory: Path, checksums: bool = True) -> list[str]:
    """Problems with the checkpoint in ``directory``, one line each naming the file; empty when valid."""
    try:
        manifest = Manifest.read(directory)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    for name, entry in sorted(manifest.files.items()):
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if size != entry.size:
            problems.append(f"{path}: {size} bytes, the manifest says {entry.size} (truncated or overwritten)")
        elif checksums and file_sha256(path) != entry.sha256:
            problems.append(f"{path}: SHA-256 differs from the manifest (corrupted)")
    return problems


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashingWriter:
    """A write-only file that hashes what passes through it, so a checksum costs no second read."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self._digest.update(data)  # releases the GIL for large buffers
        self.size += len(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def entry(self) -> FileEntry:
        return FileEntry(size=self.size, sha256=self._digest.hexdigest())


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: a crash leaves the old file or the new one, whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a crash's leftover; then created exclusively (never through a symlink)
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644), "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (new names, renames) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
