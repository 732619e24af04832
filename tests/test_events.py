"""The typed event records: written as the docs show them, read back as the same types."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator import events as ev
from orchestrator.events import EventLog, parse, read_typed


def test_a_record_is_written_flat_and_read_back_as_the_same_type(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    seen: list[ev.Event] = []
    log.subscribe(seen.append)
    written = log.emit(ev.Step(step=3, loss=2.5, step_time_s=0.1, tokens_per_s=None, lr=0.001,
                               extra={"accuracy": 0.75}))
    log.emit(ev.FailureDetected(rank=1, reason="signal", message="killed", attempt=0, detection_s=0.2, signal=9,
                                signal_name="SIGKILL"))
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert list(lines[0])[:2] == ["ts", "event"] and lines[0]["event"] == "step"
    assert lines[0]["accuracy"] == 0.75 and lines[0]["tokens_per_s"] is None, "extra flat; a null field stays"
    assert "grad_norm" not in lines[0] and "exit_code" not in lines[1], "an optional field is absent while unknown"
    assert written.ts > 0 and seen[0] is written
    assert read_typed(tmp_path / "events.jsonl") == seen


def test_unknown_events_and_foreign_lines_are_left_out() -> None:
    assert parse({"event": "from_a_newer_version", "ts": 1.0}) is None
    assert parse({"event": "step", "ts": 1.0}) is None, "a step without its required fields is not a step"
    older = parse({"event": "failure_detected", "ts": 1.0, "rank": 0, "reason": "exception", "message": "m",
                   "attempt": 0, "detection_s": 0.1, "root_cause": False, "newer_field": 1})
    assert isinstance(older, ev.FailureDetected) and not older.root_cause and older.extra == {"newer_field": 1}
