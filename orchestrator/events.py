"""The run's event log, ``RUN_DIR/events.jsonl``: one JSON object per line.

Each line is written and flushed as it happens, so an external reader (a
test, ``tail -f``, a log shipper) sees events in order and in real time.
``docs/events.md`` lists every event and its fields.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.run_dir import append_fd


class EventLog:
    """Appends events to a JSON-lines file; safe to call from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = open(append_fd(path), "a", encoding="utf-8")
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener`` with every event emitted from now on (the metrics follow the log)."""
        self._listeners.append(listener)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one event with ``ts`` and ``event`` first; returns the record."""
        record = {"ts": time.time(), "event": event, **fields}
        line = json.dumps(record, allow_nan=True, default=str) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
        for listener in self._listeners:
            listener(record)
        return record

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_events(path: Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file, skipping a torn line (a crash, or a write in progress)."""
    events = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events
