"""The node agent's own work, on real processes (no Ray needed): a survivor interrupted for a
recovery rejoins once it has left its training function, or is killed if it does not leave in time."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from orchestrator import node_memory
from orchestrator.agent.hosted import HostedProcess
from orchestrator.agent.node_agent import NodeAgent
from orchestrator.messages import Rejoin


def _rejoin(rank: int, attempt: int = 1) -> Rejoin:
    return Rejoin(rank=rank, local_rank=rank, world_size=2, node="n", attempt=attempt, config={}, run_dir="",
                  resume_tag=None, faults=[], env={})


@pytest.mark.parametrize("mode", ["leave", "stay", "left"])
def test_an_interrupted_survivor_rejoins_or_is_killed_once_the_unwind_time_is_up(tmp_path: Path, mode: str) -> None:
    agent = NodeAgent(0, str(tmp_path), lease_s=3600.0)  # its fence stays out of this test
    agent.unwind_timeout_s = 1.0
    log = tmp_path / "rank0.log"
    proc = agent._procs[0] = HostedProcess({"UNWIND": mode}, log, "rank 0", module="tests.unwinding_rank")
    try:
        if mode == "left":  # it left before the interrupt (its report not yet seen by the controller)
            deadline = time.monotonic() + 10
            while not proc.has_left(None) and time.monotonic() < deadline:
                time.sleep(0.02)
        started = time.monotonic()
        assert agent.start_attempt([], [_rejoin(0)], interrupt=[0]) == [], "no new process for a survivor"
        assert time.monotonic() - started < 0.5, "the call does not wait for the survivor to leave"
        deadline = time.monotonic() + 10
        while "got rejoin" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        if mode == "left":
            assert "got interrupt" not in log.read_text(), "one that already left is not interrupted"
        else:
            assert "got interrupt\ngot rejoin" in log.read_text(), "the interrupt first, then the rejoin"
        if mode in ("leave", "left"):
            time.sleep(agent.unwind_timeout_s + 0.5)  # past the time it would have been killed
            assert proc.poll_exit() is None, "a survivor that left in time keeps its process"
        if mode == "leave":
            # The next recovery interrupts it again: it left attempt 0, and now trains in attempt 1
            # (its rejoin went out before it had left attempt 0, so "when" cannot tell).
            agent.start_attempt([], [_rejoin(0, attempt=2)], interrupt=[0])
            deadline = time.monotonic() + 10
            while log.read_text().count("got rejoin") < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert log.read_text().endswith("got interrupt\ngot rejoin\n"), "interrupted again, then rejoined"
            time.sleep(agent.unwind_timeout_s + 0.5)
            assert proc.poll_exit() is None, "it left attempt 1 in time too"
        if mode == "stay":
            deadline = time.monotonic() + 10
            while proc.poll_exit() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proc.poll_exit() == -signal.SIGKILL
            assert "did not leave its training function within 1s of being interrupted" in log.read_text()
    finally:
        agent.stop(1.0)


def test_an_agent_names_a_sigkill_an_oom_kill_only_when_its_node_s_count_rose(tmp_path: Path, monkeypatch) -> None:
    kills = [4]
    monkeypatch.setattr(node_memory, "oom_kills", lambda: kills[0])
    proc = HostedProcess({}, tmp_path / "r.log", "test", module="this_module_does_not_exist")
    try:
        assert proc.popen is not None and proc.popen.wait(timeout=30) == 1
        assert proc._oom(-signal.SIGKILL) == "", "no OOM kill on the node since it started"
        kills[0] = 5
        assert proc._oom(1) == "", "not killed"
        said = proc._oom(-signal.SIGKILL)
        assert said.startswith("its node has ") and said.endswith("GiB available)"), said
    finally:
        proc.stop(1.0)
