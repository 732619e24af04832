"""The run directory: ``events.jsonl``, ``checkpoints/``, ``logs/`` and ``run.json``.

Re-using a directory resumes the run it holds: ``run.json`` keeps the run id
across restarts of the controller, and ``checkpoints/latest`` says where to
resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ConfigError

_LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # run directory -> descriptor of its lock, held for this process's life


def append_fd(path: str | Path) -> int:
    """``path`` opened for appending (created if missing), never through a symlink: one planted in
    the run directory must not redirect the orchestrator's writes elsewhere."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


@dataclass(frozen=True, slots=True)
class RunDir:
    """Paths of one run, and its id; ``created``: this process made the directory."""

    path: Path
    run_id: str
    created: bool = False

    @classmethod
    def open(cls, path: str | Path | None, root: Path = Path("runs")) -> RunDir:
        """Open ``path`` (created if missing), or a new timestamped directory under ``root``."""
        if path is None:
            path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        path = Path(path).absolute()
        created = not path.exists()
        if not created and not path.is_dir():
            raise ConfigError(f"--run-dir {path}: exists and is not a directory")
        for sub in ("checkpoints", "logs"):
            if (path / sub).is_symlink() or (path / sub).exists() and not (path / sub).is_dir():
                raise ConfigError(f"--run-dir {path}: {sub} is not a directory there; move it aside or give "
                                  "another --run-dir")
        try:
            for sub in ("checkpoints", "logs"):
                (path / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--run-dir {path}: cannot create it: {exc.strerror}") from None
        meta = path / "run.json"
        if meta.exists() or meta.is_symlink():
            run_id = cls.read_id(path, option="--run-dir")
        else:
            run_id = uuid.uuid4().hex[:12]
            meta.write_text(json.dumps({"run_id": run_id, "created": time.time()}) + "\n")
        return cls(path=path, run_id=run_id, created=created)

    def discard(self) -> None:
        """Remove the directory if :meth:`open` made it: a launch refused before anything ran leaves
        nothing behind. A directory that existed before is kept as it is."""
        if self.created:
            shutil.rmtree(self.path, ignore_errors=True)

    @staticmethod
    def read_id(path: Path, option: str = "RUN_DIR") -> str:
        """The run id of the run directory ``path``, read without changing anything there."""
        meta = Path(path) / "run.json"
        try:
            run_id = json.loads(meta.read_text())["run_id"]
        except OSError as exc:
            problem = exc.strerror
        except ValueError as exc:
            problem = f"not JSON ({exc})"
        except (KeyError, TypeError):
            problem = "no run_id in it"
        else:
            if isinstance(run_id, str) and run_id.isalnum():
                return run_id
            problem = f"run_id {run_id!r} is not a run id"
        raise ConfigError(
            f"{option} {path}: cannot read the run id from {meta}: {problem}; restore run.json from a copy, "
            f"or give another {option}"
        )

    def lock(self) -> None:
        """Take the run directory for this controller; refuse if another one runs on it.

        Two controllers on one directory would interleave events and delete each other's staged
        checkpoints. The lock is an ``flock`` on ``.lock`` (released by the kernel when the process
        ends, however it ends); the file names the holder's pid for the message."""
        if self.path in _held:
            return
        self._check_private()
        fd = os.open(self.path / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"--run-dir {self.path}: another orchestrator (pid {holder}) is running on it; wait for it to "
                "end (or stop it), or give another --run-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _held[self.path] = fd

    def _check_private(self) -> None:
        """Checkpoints are unpickled on resume: a run directory someone else can write is someone
        else's code. Refuse one owned by another user, or writable by group or others."""
        for directory in (self.path, self.checkpoints):
            st = directory.stat()
            if st.st_uid != os.getuid():
                raise ConfigError(
                    f"--run-dir {directory}: owned by uid {st.st_uid}, not by you (uid {os.getuid()}); its "
                    "checkpoints are loaded with pickle and could run that user's code. Use a directory of your own"
                )
            if st.st_mode & 0o022:
                raise ConfigError(
                    f"--run-dir {directory}: writable by "
                    f"{' and '.join(w for w, bit in (('group', 0o020), ('others', 0o002)) if st.st_mode & bit)} "
                    f"(mode {stat.filemode(st.st_mode)}); anyone who can write it can plant a checkpoint that runs "
                    f"code on resume. Fix: chmod go-w {directory}"
                )

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.path / "logs"
