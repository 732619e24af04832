"""The messages between process, actor, zygote and controller: one definition each, and a message
that is not one of them is an error, never silently dropped."""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import pytest

from orchestrator import messages
from orchestrator.agent.hosted import HostedProcess
from orchestrator.messages import MalformedMessage, Step, decode, encode

EXAMPLES = [
    messages.Prepare(config={"train": {"steps": 3}}),
    messages.Start(rank=1, local_rank=1, world_size=2, node="h", attempt=0, config={}, run_dir="/r", resume_tag=None,
                   faults=[{"kind": "kill", "rank": 1, "step": 3}], env={"RANK": "1"}, workdir="/home/u"),
    messages.Rejoin(rank=1, local_rank=1, world_size=2, node="h", attempt=1, config={}, run_dir="/r",
                    resume_tag="global_step5", faults=[], env={}, log_path="/r/logs/rank1.log"),
    messages.Interrupt(),
    messages.Stop(),
    messages.Cadence(interval_steps=12),
    messages.Fork(id=3, env={"A": "b"}, log_path="/l"),
    messages.Prepared(),
    messages.Prepared(error="threads left running after the imports: ['triton-compile']"),
    messages.Forked(id=3, pid=42),
    messages.Exited(pid=42, returncode=-9),
    messages.Alive(where="train.py:3 in step", in_collective=True, still_s=2.0),
    messages.Warm(),
    messages.Step(step=5, loss=2.5, step_time_s=0.1, tokens=512.0, extra={"accuracy": 0.5}),
    messages.Step(step=6, loss=None, step_time_s=0.1, total=100),
    messages.Resumed(step=5, tag="global_step5"),
    messages.Saving(),
    messages.ScriptCheckpoint(step=10, path="/out/checkpoint-10"),
    messages.CheckpointSaved(step=5, tag="global_step5", attempt=0, blocked_s=0.1, write_s=0.2,
                             files={"a.pt": {"size": 1, "sha256": "00"}}),
    messages.CheckpointSkipped(step=5, attempt=0),
    messages.CheckpointFailed(step=5, tag="global_step5", attempt=0, path="/x", error="No space left", errno=28),
    messages.FaultInjected(kind="kill", rank=1, step=3),
    messages.Error(exc_type="ValueError", message="bad", traceback="Traceback...", interrupted=False, step=4, at=9.5),
    messages.Ready(),
    messages.Finished(),
]


def test_every_kind_round_trips_through_json() -> None:
    kinds = {type(m) for m in EXAMPLES}
    defined = {k for k in vars(messages).values()
               if isinstance(k, type) and issubclass(k, messages.Message) and k not in (messages.Message, messages.Report)}
    assert kinds == defined, "an example of every kind"
    for message in EXAMPLES:
        assert decode(json.loads(json.dumps(encode(message)))) == message


def test_at_travels_only_once_stamped() -> None:
    assert "at" not in encode(Step(step=1, loss=1.0, step_time_s=0.1))
    assert encode(Step(step=1, loss=1.0, step_time_s=0.1, at=3.0))["at"] == 3.0


def test_a_channel_stamps_each_report_with_the_attempt_it_is_in_unless_the_report_names_its_own() -> None:
    import socket

    from orchestrator.worker.channel import Channel

    mine, theirs = socket.socketpair()
    sender, receiver = Channel(mine), Channel(theirs)
    sender.send(messages.Ready())  # a spare's warm-up: in no attempt yet
    sender.attempt = 2
    sender.send(messages.Ready())
    sender.send(messages.CheckpointSkipped(step=4, attempt=1))  # a save of the attempt before
    sender.send(messages.Interrupt())  # not a report: nothing to stamp
    sender.close()
    got = list(receiver.messages())
    assert [getattr(m, "attempt", None) for m in got] == [-1, 2, 1, None]
    receiver.close()


def test_a_node_status_round_trips_through_the_uplink_wire() -> None:
    saved = next(m for m in EXAMPLES if isinstance(m, messages.CheckpointSaved))
    status = messages.NodeStatus(ranks={3: messages.RankStatus(pid=5, reports=[EXAMPLES[-3]], returncode=None,
                                                                alive_at=1.0, where="x.py:3", in_collective=True)},
                                 warm_spare=9, number=4, now=2.0, asked=1,
                                 saved=messages.NodeSaved.fold([(3, saved), (4, saved)]))
    assert [s.ranks for s in status.saved] == [[3, 4]]
    assert messages.decode_status(_over_the_wire(messages.encode_status(status))) == status
    with pytest.raises(MalformedMessage, match="not a report"):
        messages.decode_status({**messages.encode_status(status), "ranks": {"3": {
            **messages.encode_status(status)["ranks"]["3"], "reports": [encode(messages.Interrupt())]}}})


def test_a_beat_travels_as_one_value_per_column_where_it_can_and_times_err_early_by_at_most_a_second() -> None:
    def beat(**columns: list) -> messages.NodeBeat:
        plain = {"ranks": [8, 9, 10], "pid": [1, 2, 3], "alive_at": [100.0, 100.4, 100.9], "moved_at": [50.0, 99.0, 100.0],
                 "where": ["a.py:1"] * 3, "in_collective": [False] * 3, "step": [7, 7, 7], "step_at": [90.0, 90.1, 90.2],
                 "step_time_s": [1.0, 1.5, 1.0], "step_attempt": [0] * 3}
        return messages.NodeBeat(**{**plain, **columns})

    def round_trip(b: messages.NodeBeat) -> tuple[dict, messages.NodeBeat | None]:
        status = messages.NodeStatus(ranks={}, warm_spare=None, number=1, now=0.0, beat=b)
        wire = _over_the_wire(messages.encode_status(status))
        return wire["beat"], messages.decode_status(wire).beat

    wire, back = round_trip(beat())
    assert wire["where"] == "a.py:1" and wire["step"] == 7 and wire["in_collective"] is False
    assert wire["pid"] == [1, 2, 3] and wire["step_time_s"] == [1.0, 1.5, 1.0], "distinct values travel as they are"
    assert wire["moved_at"] == [50.0, 99.0, 100.0], "times further apart than a second travel as they are"
    assert back == beat(alive_at=[100.0] * 3, step_at=[90.0] * 3), "times within a second travel as the earliest"
    assert round_trip(beat(ranks=[4], pid=[1], alive_at=[1.0], moved_at=[1.0], where=["b"], in_collective=[True],
                           step=[None], step_at=[0.0], step_time_s=[0.0], step_attempt=[-1]))[1].step == [None]
    with pytest.raises(MalformedMessage, match="columns differ in length"):
        messages.decode_status({**messages.encode_status(messages.NodeStatus(ranks={}, warm_spare=None, number=1, now=0.0,
                                                                             beat=beat())), "beat": {**wire, "pid": [1]}})


@pytest.mark.parametrize(("data", "problem"), [
    ({"type": "stepp", "step": 1}, "unknown message type"),
    ({"step": 1}, "unknown message type"),
    ([1, 2], "unknown message type"),
    ({"type": "step", "step": 1, "loss": 2.0}, "missing 1 required keyword-only argument: 'step_time_s'"),
    ({"type": "step", "step": 1, "loss": 2.0, "step_time_s": 0.1, "los": 3}, "unexpected keyword argument 'los'"),
])
def test_a_message_that_is_not_ours_is_an_error(data: object, problem: str) -> None:
    with pytest.raises(MalformedMessage, match=problem):
        decode(data)


def test_messages_are_immutable() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        EXAMPLES[0].config = {}


def test_a_process_that_breaks_the_protocol_is_stopped_and_its_log_says_why(tmp_path: Path) -> None:
    log = tmp_path / "rank0.log"
    proc = HostedProcess({}, log, "rank 0", module="tests.sends_nonsense")
    try:
        deadline = time.monotonic() + 30
        while proc.poll_exit() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll_exit() == -signal.SIGKILL, "stopped, not left running with its reports unread"
        assert proc.where == "here", "the valid beat before it was read"
        assert "protocol error" in log.read_text() and "stepp" in log.read_text()
    finally:
        proc.stop(1.0)


def test_a_push_folds_the_errors_that_are_consequences_and_keeps_only_the_tracebacks_a_root_cause_needs() -> None:
    def error(tb: str, at: float, step: int, collective: bool = False, interrupted: bool = False) -> messages.Error:
        return messages.Error(exc_type="E", message=f"message {tb}", traceback=tb, interrupted=interrupted, step=step,
                              collective=collective, at=at, attempt=2)

    def status(pid: int, *reports: messages.Report, returncode: int | None = None) -> messages.RankStatus:
        return messages.RankStatus(pid=pid, reports=list(reports), returncode=returncode, alive_at=0.0, where="",
                                   in_collective=False)

    ranks = {8: status(108, error("own bug", 3.0, 5)), 9: status(109, error("later peer", 2.0, 5, collective=True)),
             10: status(110, error("earliest peer", 1.0, 4, collective=True)),
             11: status(111, error("", 0.5, 5, interrupted=True)),
             12: status(112, error("", 0.6, 5, interrupted=True)),
             13: status(113, error("peer, then exited", 1.5, 5, collective=True), returncode=1),
             14: status(114, Step(step=5, loss=1.0, step_time_s=0.1, at=0.9, attempt=2),
                        error("peer after a step", 2.5, 5, collective=True))}
    kept, left = messages.fold_consequences(ranks)
    assert sorted(kept) == [8, 13, 14], "a cause, an exit and a status with other news stay as they are"
    tracebacks = {rank: [r.traceback for r in s.reports if isinstance(r, messages.Error)] for rank, s in kept.items()}
    assert tracebacks == {8: ["own bug"], 13: [""], 14: [""]}, "only what a root cause can need keeps its traceback"
    assert kept[13].reports[0].message == "message peer, then exited", "the message stays"
    collective, interrupted = sorted(left, key=lambda fold: fold.interrupted)
    assert (collective.ranks, collective.pid, collective.at, collective.step) == ([10, 9], [110, 109], [1.0, 2.0], [4, 5])
    assert (collective.message, collective.traceback, collective.attempt) == ("message earliest peer", "earliest peer", 2)
    assert (interrupted.ranks, interrupted.interrupted, interrupted.collective) == ([11, 12], True, False)
    assert [(rank, e.at, e.step, e.collective) for rank, e in collective.errors()] == [(10, 1.0, 4, True), (9, 2.0, 5, True)]
    status_ = messages.NodeStatus(ranks=kept, warm_spare=None, number=1, now=0.0, left=left)
    assert messages.decode_status(_over_the_wire(messages.encode_status(status_))) == status_


def _over_the_wire(message: dict) -> dict:
    """``message`` packed for the uplink and read back."""
    reader = messages.Unpacker(1 << 20)
    reader.feed(messages.pack(message))
    [received] = list(reader)
    return received


def test_the_uplink_wire_gives_whole_messages_and_refuses_garbage_and_oversize() -> None:
    status = messages.encode_status(messages.NodeStatus(ranks={}, warm_spare=None, number=7, now=1.5))
    stream = messages.pack({"token": "t", "index": 0, "incarnation": 1}) + messages.pack(status)
    reader = messages.Unpacker(1 << 16)
    reader.feed(stream[:-3])  # the status is not complete yet: only the hello comes out
    assert list(reader) == [{"token": "t", "index": 0, "incarnation": 1}]
    reader.feed(stream[-3:])
    [received] = list(reader)
    assert messages.decode_status(received) == messages.decode_status(status)
    garbage = messages.Unpacker(1 << 16)
    garbage.feed(b"\x00\x00\x00\x01\xc1")  # a byte MessagePack reserves: no message starts with it
    with pytest.raises(MalformedMessage, match="no message"):
        list(garbage)
    small = messages.Unpacker(64)
    small.feed(messages.pack({"where": "x" * 100})[:4])  # said from the length alone
    with pytest.raises(MalformedMessage, match="of 109 bytes, over 64"):
        list(small)
