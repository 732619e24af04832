"""The agents' line to the controller on real sockets: a real NodeAgent pushing to a real Inbox
(no Ray needed). Leases, incarnations, tokens, requests and resending after a reconnection."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.agent.node_agent import NodeAgent, UplinkSettings
from orchestrator.agent.uplink import Uplink
from orchestrator.controller.inbox import Inbox, Received
from orchestrator.messages import Error, NodeStatus, RankStatus, Step, pack

TOKEN = "t0ken"


@pytest.fixture
def inbox():
    box = Inbox("127.0.0.1", TOKEN)
    yield box
    box.close()


def _until(what: Callable[[], object], timeout: float = 5.0) -> object:
    deadline = time.monotonic() + timeout
    while not (value := what()) and time.monotonic() < deadline:
        time.sleep(0.005)
    return value


def _collect(inbox: Inbox, into: Received) -> Received:
    got = inbox.take()
    for index, statuses in got.statuses.items():
        into.statuses.setdefault(index, []).extend(statuses)
    into.closed.update(got.closed)
    return into


def _status(number: int, asked: int = 0) -> NodeStatus:
    return NodeStatus(ranks={}, warm_spare=None, number=number, now=time.time(), asked=asked)


def test_an_agent_nobody_looks_at_keeps_its_lease_well_inside_its_limit(tmp_path: Path, inbox: Inbox) -> None:
    """The controller is busy elsewhere (nobody takes from the inbox): the inbox acknowledges every push
    at once, so the agent's lease never comes near running out while the controller's process lives."""
    heartbeat_s = 0.2  # a quarter of node_timeout_s; the lease is three quarters of it: three heartbeats
    inbox.expect(0, 1)
    agent = NodeAgent(0, str(tmp_path), lease_s=3600.0,  # its own fence stays out of this test
                      uplink=UplinkSettings(host="127.0.0.1", port=inbox.address[1], token=TOKEN, incarnation=1,
                                            heartbeat_s=heartbeat_s))
    try:
        assert _until(lambda: agent._lease_from is not None), "the first push is acknowledged at once"
        worst, deadline = 0.0, time.monotonic() + 1.5
        while time.monotonic() < deadline:
            worst = max(worst, time.monotonic() - agent._lease_from)
            time.sleep(0.005)
        assert worst < 1.5 * heartbeat_s, f"the lease ran {worst:.2f}s unrenewed (it ends at {3 * heartbeat_s:g}s)"
        got = inbox.take()
        assert 5 <= len(got.statuses[0]) <= 12, "a status every heartbeat, and no more"
    finally:
        agent.stop(1.0)


def test_a_replaced_agents_pushes_and_a_wrong_token_are_dropped(inbox: Inbox) -> None:
    """Found by the chaos soak (with Ray renewals): a dead agent's last answer was credited to the agent
    made in its place, which then never saw its own answers acknowledged and fenced itself."""
    acks: dict[str, list[int]] = {"old": [], "new": [], "stranger": []}

    def uplink(name: str, incarnation: int, token: str = TOKEN) -> Uplink:
        hello = {"token": token, "index": 0, "incarnation": incarnation}
        return Uplink(inbox.address, hello, on_ack=acks[name].append, on_ask=lambda k: None)

    old = uplink("old", 1)
    inbox.expect(0, 1)
    old.push(_status(40))
    assert _until(lambda: acks["old"] == [40])
    inbox.expect(0, 2)  # agent 0 was made again
    new, stranger = uplink("new", 2), uplink("stranger", 2, token="guess")
    old.push(_status(41))
    stranger.push(_status(99))
    new.push(_status(1))
    assert _until(lambda: acks["new"] == [1])
    time.sleep(0.2)  # anything the old agent or the stranger would get would have come by now
    assert acks["old"] == [40] and acks["stranger"] == []
    assert [s.number for s in inbox.take().statuses[0]] == [1], "only the new agent's push counts"
    for line in (old, new, stranger):
        line.close()


def test_a_request_is_answered_at_once_and_a_push_lost_with_its_connection_comes_again_once(
        tmp_path: Path, inbox: Inbox) -> None:
    inbox.expect(3, 7)
    agent = NodeAgent(3, str(tmp_path), lease_s=3600.0,
                      uplink=UplinkSettings(host="127.0.0.1", port=inbox.address[1], token=TOKEN, incarnation=7,
                                            heartbeat_s=60.0))
    try:
        received = Received(statuses={}, arrived={}, closed=set())
        assert _until(lambda: _collect(inbox, received).statuses.get(3)), "the first status goes out at once"
        started = time.monotonic()
        request = inbox.ask([3])
        assert _until(lambda: any(s.asked >= request for s in _collect(inbox, received).statuses[3]))
        assert time.monotonic() - started < 0.5, "a request is answered at once, not at the next heartbeat"

        # The connection breaks between a push and its acknowledgement: the push comes again, once.
        with inbox._lock:
            conn = inbox._current[3]
        conn.sock.shutdown(socket.SHUT_RDWR)
        assert _until(lambda: _collect(inbox, received).closed == {3})
        numbers = [s.number for s in received.statuses[3]]
        request = inbox.ask([3])  # nobody connected to ask: the agent pushes at its next chance
        agent._news.set()
        assert _until(lambda: [s.number for s in _collect(inbox, received).statuses[3]] != numbers)
        later = [s.number for s in received.statuses[3]]
        assert later == sorted(set(later)), "every push taken once, in order"
    finally:
        agent.stop(1.0)


def test_a_connection_that_never_says_who_it_is_or_sends_garbage_is_closed(inbox: Inbox) -> None:
    garbage = socket.create_connection(inbox.address)
    garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
    garbage.settimeout(5)
    assert garbage.recv(100) == b"", "closed at once"
    garbage.close()
    inbox.expect(0, 1)
    liar = socket.create_connection(inbox.address)
    liar.sendall(pack({"token": TOKEN, "index": 0, "incarnation": 1}) + pack({"ranks": 5}))
    liar.settimeout(5)
    assert liar.recv(100) == b"", "a malformed status closes the connection"
    liar.close()
    assert inbox.take().statuses == {}


def test_a_status_carries_every_step_of_rank_0_and_the_beat_the_latest_of_every_rank(tmp_path: Path) -> None:
    """Rank 0's steps become events; of the others' the controller needs the latest (progress, step
    time), which the heartbeat's columns carry: no status per rank for a step alone."""
    from types import SimpleNamespace

    from orchestrator.messages import CheckpointSaved, RankStatus, Step

    def proc(pid: int, reports: list) -> SimpleNamespace:
        status = RankStatus(pid=pid, reports=reports, returncode=None, alive_at=5.0, where="x.py:1",
                            in_collective=False)
        return SimpleNamespace(inbox=list(reports), exit_unreported=False, status=lambda: status, pid=pid,
                               alive_at=5.0, moved_at=4.0, where="x.py:1", in_collective=False, latest_step=None)

    def step(n: int) -> Step:
        return Step(step=n, loss=None, step_time_s=0.1 * n, at=float(n), attempt=2)

    saved = CheckpointSaved(step=2, tag="step_2", attempt=2, blocked_s=0.0, write_s=0.0, files={})
    agent = NodeAgent(0, str(tmp_path), lease_s=3600.0)
    agent._procs = {0: proc(10, [step(1), step(2), step(3)]), 1: proc(11, [step(1), step(2), saved, step(3)]),
                    2: proc(12, [step(1), step(2)])}
    status = agent.status()
    assert [r.step for r in status.ranks[0].reports] == [1, 2, 3]
    assert 1 not in status.ranks and 2 not in status.ranks, "steps and saves alone are no rank's news"
    assert [(s.ranks, s.tag, s.attempt) for s in status.saved] == [([1], "step_2", 2)], "the node's saves, folded"
    beat = status.beat
    assert (beat.ranks, beat.pid, beat.step, beat.step_attempt) == ([0, 1, 2], [10, 11, 12], [3, 3, 2], [2, 2, 2])
    assert beat.step_time_s == [pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.2)]


def test_news_is_a_ranks_first_step_in_an_attempt_every_step_of_rank_0_and_the_last_save_of_a_node(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from orchestrator.messages import CheckpointSaved, Saving, Step

    agent = NodeAgent(0, str(tmp_path), lease_s=3600.0)
    rank0, rank1 = SimpleNamespace(stepping_in=None), SimpleNamespace(stepping_in=None)
    agent._procs = {0: rank0, 1: rank1}

    def news(proc: SimpleNamespace, report: object) -> bool:
        agent._news.clear()
        agent._heard_from(proc, report)
        return agent._news.is_set()

    step = Step(step=1, loss=None, step_time_s=0.1, attempt=0)
    assert news(rank1, step), "it started training: a step late is a hang from now on"
    assert not news(rank1, dataclasses.replace(step, step=2)), "the heartbeat carries the rest"
    assert news(rank1, dataclasses.replace(step, step=3, attempt=1)), "its first step in the next attempt"
    assert news(rank0, step) and news(rank0, dataclasses.replace(step, step=2)), "every step of rank 0"
    assert not news(rank1, Saving()) and news(rank1, None), "still saving is no news; a closed channel is"
    saved = CheckpointSaved(step=2, tag="step_2", attempt=1, blocked_s=0.0, write_s=0.0, files={})
    rank0.pid, rank1.pid = 10, 11
    assert not news(rank0, saved), "rank 1 has not saved its part yet: the node's saves go in one push"
    assert news(rank1, saved), "the node's last rank saved its part"
    assert not news(rank1, dataclasses.replace(saved, tag="step_4")), "a new checkpoint, counted afresh"


def test_the_controller_is_woken_by_a_failure_or_an_answer_not_by_progress(inbox: Inbox) -> None:
    """Its look comes at once (``soonest_s`` after the last) when a rank exits or raises, or an agent
    answers a request; steps and heartbeats wait for the next regular look (``timeout_s``)."""
    acks: list[int] = []
    line = Uplink(inbox.address, {"token": TOKEN, "index": 0, "incarnation": 1}, on_ack=acks.append,
                  on_ask=lambda k: None)
    inbox.expect(0, 1)

    def woken_after(status: NodeStatus) -> float:
        inbox.take()
        line.push(status)
        assert _until(lambda: status.number in acks)
        started = time.monotonic()
        inbox.wait(timeout_s=1.0, soonest_s=0.0)
        return time.monotonic() - started

    def rank(reports: list, returncode: int | None = None) -> dict[int, RankStatus]:
        return {1: RankStatus(pid=7, reports=reports, returncode=returncode, alive_at=time.time(), where="",
                              in_collective=False)}

    step = Step(step=3, loss=1.0, step_time_s=0.1, at=time.time(), attempt=0)
    error = Error(exc_type="RuntimeError", message="bug", traceback="", interrupted=False, step=3, at=time.time())
    try:
        assert woken_after(_status(1)) > 0.9, "a heartbeat"
        assert woken_after(dataclasses.replace(_status(2), ranks=rank([step]))) > 0.9, "a step"
        assert woken_after(dataclasses.replace(_status(3), ranks=rank([error]))) < 0.5, "an error"
        assert woken_after(dataclasses.replace(_status(4), ranks=rank([], returncode=-9))) < 0.5, "an exit"
        assert woken_after(_status(5, asked=1)) < 0.5, "an answer to a request"
        assert woken_after(_status(6, asked=1)) > 0.9, "the same request's answer is not news again"
    finally:
        line.close()
