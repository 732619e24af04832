"""The run's event log, ``RUN_DIR/events.jsonl``: one JSON object per line, one record type per event.

Each event is a frozen dataclass defined once here, its fields those ``docs/events.md`` lists (a
test checks both ways); the controller writes them and the metrics, goodput, scaling and the CLI
read them back through the same types (:func:`parse`). Each line is written and flushed as it
happens, so an external reader (a test, ``tail -f``, a log shipper) sees events in order and in
real time. A field made with :func:`optional` is left out of the line while it is None ("where
known" in the docs); ``extra`` carries what a record has beyond its documented fields (a
training code's own step metrics) and is written flat.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from orchestrator.run_dir import append_fd


def optional(default: Any = None) -> Any:
    """A field the line leaves out while it is None."""
    return field(default=default, metadata={"optional": True})


@dataclass(frozen=True, kw_only=True)
class Event:
    """Every event has ``ts`` (Unix seconds, set when written) and its name, ``event``."""

    event: ClassVar[str]
    ts: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The line's JSON object: ``ts`` and ``event`` first, then the fields, then ``extra``."""
        out: dict[str, Any] = {"ts": self.ts, "event": self.event}
        for f in dataclasses.fields(self):
            if f.name in ("ts", "extra"):
                continue
            value = getattr(self, f.name)
            if value is None and f.metadata.get("optional"):
                continue
            out[f.name] = value
        out.update(self.extra)
        return out


EVENTS: dict[str, type[Event]] = {}


def _event(cls: type[Event]) -> type[Event]:
    EVENTS[cls.event] = cls
    return cls


@_event
@dataclass(frozen=True, kw_only=True)
class RunStarted(Event):
    event = "run_started"
    run_id: str
    world_size: int
    resumed_from_step: int
    config: dict[str, Any]


@_event
@dataclass(frozen=True, kw_only=True)
class MetricsStarted(Event):
    event = "metrics_started"
    url: str
    target: str


@_event
@dataclass(frozen=True, kw_only=True)
class WorkerStarted(Event):
    event = "worker_started"
    rank: int
    pid: int
    node: str
    node_ip: str
    node_id: str
    attempt: int
    spare: bool
    forked: bool


@_event
@dataclass(frozen=True, kw_only=True)
class NetworkConfigured(Event):
    event = "network_configured"
    node_id: str
    interface: str | None
    address: str | None
    ib_ports: list[dict[str, Any]]
    env: dict[str, str]


@_event
@dataclass(frozen=True, kw_only=True)
class Step(Event):
    event = "step"
    step: int
    loss: float | None
    step_time_s: float
    tokens_per_s: float | None
    lr: float | None = optional()
    grad_norm: float | None = optional()
    flops: float | None = optional()
    heldout_loss: float | None = optional()


@_event
@dataclass(frozen=True, kw_only=True)
class CheckpointSaved(Event):
    event = "checkpoint_saved"
    step: int
    path: str
    by: str


@_event
@dataclass(frozen=True, kw_only=True)
class CheckpointInterval(Event):
    event = "checkpoint_interval"
    interval_steps: int
    save_cost_s: float
    mtbf_s: float
    step_time_s: float
    failures: int


@_event
@dataclass(frozen=True, kw_only=True)
class MemoryInterval(Event):
    event = "memory_interval"
    interval_steps: int
    snapshot_cost_s: float
    mtbf_s: float
    step_time_s: float
    failures: int


@_event
@dataclass(frozen=True, kw_only=True)
class CheckpointCommitted(Event):
    event = "checkpoint_committed"
    step: int
    path: str
    seconds: float
    blocked_s: float
    bytes: int


@_event
@dataclass(frozen=True, kw_only=True)
class CheckpointFailed(Event):
    event = "checkpoint_failed"
    step: int
    rank: int | None
    path: str
    error: str
    message: str


@_event
@dataclass(frozen=True, kw_only=True)
class CheckpointSkipped(Event):
    event = "checkpoint_skipped"
    step: int
    reason: str


@_event
@dataclass(frozen=True, kw_only=True)
class CheckpointInvalid(Event):
    event = "checkpoint_invalid"
    step: int
    path: str
    moved_to: str
    problems: list[str]
    message: str


@_event
@dataclass(frozen=True, kw_only=True)
class CheckpointConverted(Event):
    event = "checkpoint_converted"
    step: int
    path: str
    seconds: float
    saved_layout: list[int]
    layout: list[int]


@_event
@dataclass(frozen=True, kw_only=True)
class RunWarning(Event):
    event = "warning"
    message: str


@_event
@dataclass(frozen=True, kw_only=True)
class SpareReady(Event):
    event = "spare_ready"
    node: str
    pid: int


@_event
@dataclass(frozen=True, kw_only=True)
class SpareNodeLost(Event):
    event = "spare_node_lost"
    node_ip: str
    message: str
    spare_nodes: int
    spare_nodes_configured: int


@_event
@dataclass(frozen=True, kw_only=True)
class FaultInjected(Event):
    event = "fault_injected"
    kind: str
    rank: int
    step: int


@_event
@dataclass(frozen=True, kw_only=True)
class FailureDetected(Event):
    event = "failure_detected"
    rank: int
    reason: str
    message: str
    attempt: int
    detection_s: float
    root_cause: bool = True
    step: int | None = optional()
    exit_code: int | None = optional()
    signal: int | None = optional()
    signal_name: str | None = optional()
    exc_type: str | None = optional()
    log_tail: str | None = optional()


@_event
@dataclass(frozen=True, kw_only=True)
class FailureConsequences(Event):
    event = "failure_consequences"
    attempt: int
    root_rank: int
    count: int
    ranks: str
    by_reason: dict[str, str]
    messages: dict[str, str]
    detection_s: float


@_event
@dataclass(frozen=True, kw_only=True)
class RecoveryStarted(Event):
    event = "recovery_started"
    attempt: int
    reason: str
    mode: str
    replaced: list[int]
    rejoined: list[int]
    resume_from: str | None
    restarts_left: int


@_event
@dataclass(frozen=True, kw_only=True)
class WorldShrunk(Event):
    event = "world_shrunk"
    lost_node_slots: list[int]
    nodes: int
    nodes_before: int
    world_size: int
    world_size_before: int
    global_batch: int
    accumulation_steps: int


@_event
@dataclass(frozen=True, kw_only=True)
class RecoveryFinished(Event):
    event = "recovery_finished"
    attempt: int
    resumed_from_step: int | None
    mode: str
    seconds: float
    replaced: list[int]
    signal: str  # step, resumed, alive or finished
    source: str | None = None  # memory or disk: what the ranks restored from (None: a script's own affair)
    steps_lost: int | None = None  # steps reported before the failure that are trained again


@_event
@dataclass(frozen=True, kw_only=True)
class RunFinished(Event):
    event = "run_finished"
    status: str
    step: int | None
    final_loss: float | None
    restarts: int
    restarts_by_reason: dict[str, int]
    failures_by_reason: dict[str, int]
    heldout_loss: float | None = optional()
    reason: str | None = optional()
    message: str | None = optional()
    root_cause: dict[str, Any] | None = optional()
    checkpoint: str | None = optional()  # preempted: the committed checkpoint the next launch resumes from


def parse(record: dict[str, Any]) -> Event | None:
    """The typed event of one line's object; None for an event this version does not know, or a
    record without a field its type requires (a foreign line). Unknown fields go to ``extra``."""
    cls = EVENTS.get(record.get("event", ""))
    if cls is None:
        return None
    known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    try:
        return cls(**{k: v for k, v in record.items() if k in known},
                   extra={k: v for k, v in record.items() if k not in known and k != "event"})
    except TypeError:
        return None


class EventLog:
    """Appends events to a JSON-lines file; safe to call from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = open(append_fd(path), "a", encoding="utf-8")
        self._listeners: list[Callable[[Event], None]] = []

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` with every event emitted from now on (the metrics follow the log)."""
        self._listeners.append(listener)

    def emit(self, event: Event) -> Event:
        """Write ``event``, stamped with the time now; returns it as written."""
        event = dataclasses.replace(event, ts=time.time())
        line = json.dumps(event.record(), allow_nan=True, default=str) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()
        for listener in self._listeners:
            listener(event)
        return event

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


def read_typed(path: Path) -> list[Event]:
    """The typed events of a log, in order; lines of events this version does not know are left out."""
    return [event for record in read_events(path) if (event := parse(record)) is not None]
