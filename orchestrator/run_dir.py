"""The run directory: ``events.jsonl``, ``checkpoints/``, ``logs/`` and ``run.json``.

Re-using a directory resumes the run it holds: ``run.json`` keeps the run id
across restarts of the controller, and ``checkpoints/latest`` says where to
resume.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RunDir:
    """Paths of one run, and its id."""

    path: Path
    run_id: str

    @classmethod
    def open(cls, path: str | Path | None, root: Path = Path("runs")) -> RunDir:
        """Open ``path`` (created if missing), or a new timestamped directory under ``root``."""
        if path is None:
            path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        path = Path(path).absolute()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--run-dir {path}: exists and is not a directory")
        try:
            for sub in ("checkpoints", "logs"):
                (path / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--run-dir {path}: cannot create it: {exc.strerror}") from None
        meta = path / "run.json"
        if meta.exists():
            run_id = json.loads(meta.read_text())["run_id"]
        else:
            run_id = uuid.uuid4().hex[:12]
            meta.write_text(json.dumps({"run_id": run_id, "created": time.time()}) + "\n")
        return cls(path=path, run_id=run_id)

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.path / "logs"
