"""Write a snapshot to disk in the background: serialise, checksum, fsync.

One :class:`BackgroundWriter` per training process, one save in flight at
a time. The training thread hands it a :class:`SaveJob` (files already
copied to host memory) and goes on; the writer thread writes each file
through a hashing wrapper, fsyncs it and its directory, then calls the
job's ``done`` callback with the per-file sizes and checksums, or with the
error that stopped it (an ``OSError`` such as disk full, or anything else, as an ``OSError``
naming its type).
"""

from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.checkpoint.manifest import FileEntry, HashingWriter, fsync_dir


@dataclass(frozen=True, kw_only=True)
class SaveResult:
    """What a finished job reports: files relative to its directory, or the error that stopped it."""

    files: dict[str, FileEntry]
    write_s: float
    error: OSError | None = None
    failed_path: Path | None = None

    @property
    def bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())


@dataclass(frozen=True, kw_only=True)
class SaveJob:
    """Files to write under ``directory``: ``(path, object for torch.save)``."""

    directory: Path
    files: list[tuple[Path, Any]]
    done: Callable[[SaveResult], None]


class BackgroundWriter:
    """Writes one :class:`SaveJob` at a time on its own thread."""

    def __init__(self) -> None:
        self._idle = threading.Event()
        self._idle.set()
        self._jobs: queue.SimpleQueue[SaveJob] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return not self._idle.is_set()

    def submit(self, job: SaveJob) -> None:
        """Queue ``job``; the caller must have waited for the previous one (one in flight)."""
        assert not self.busy, "one save in flight at a time"
        self._idle.clear()
        self._jobs.put(job)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job in flight is written (and reported); False on timeout."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job.done(write_files(job))
            except Exception:  # noqa: BLE001 - the writer must outlive a failing report
                traceback.print_exc()
            finally:
                self._idle.set()


def write_files(job: SaveJob) -> SaveResult:
    """Write, checksum and fsync every file of ``job``; stops at the first error (reported, never raised)."""
    import torch

    started = time.perf_counter()
    files: dict[str, FileEntry] = {}
    for path, obj in job.files:
        try:
            with open(path, "wb") as fh:
                sink = HashingWriter(fh)
                torch.save(obj, sink)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            return SaveResult(files=files, write_s=time.perf_counter() - started, error=exc, failed_path=path)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the controller as checkpoint_failed
            # torch's zip writer wraps a failing write() in a RuntimeError; keep the OS's reason. Anything
            # else (an object pickle cannot write, say) is reported with its type.
            cause = exc.__cause__ or exc.__context__
            error = cause if isinstance(cause, OSError) else OSError(f"{type(exc).__name__}: {exc}")
            return SaveResult(files=files, write_s=time.perf_counter() - started, error=error, failed_path=path)
        files[str(path.relative_to(job.directory))] = sink.entry()
    try:
        fsync_dir(job.directory)
    except OSError as exc:
        return SaveResult(files=files, write_s=time.perf_counter() - started, error=exc, failed_path=job.directory)
    return SaveResult(files=files, write_s=time.perf_counter() - started)

