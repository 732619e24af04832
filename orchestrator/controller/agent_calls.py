"""Calls to the node agents (Ray actor calls), made to several agents at once, whose failures are data.

A call that raises, or that is not answered within :data:`CALL_TIMEOUT_S`, marks its agent's slot
failed (:meth:`AgentSlot.failed`: why, in a few words, and whether the agent died or cannot be
reached); the worker group's next poll loses that node and reports its ranks lost. Nothing here
raises: a failed call costs its node, never the run. Ray's own words stay in its logs.
"""

from __future__ import annotations

import time
from typing import Any

from orchestrator.controller.agent_slots import AgentSlot, Cause

CALL_TIMEOUT_S = 30.0


def gather(ray: Any, slots: list[AgentSlot], calls: dict[int, Any], what: str) -> dict[int, Any]:
    """The answers of calls made to several agents at once (agent index -> call), each waited for at
    most :data:`CALL_TIMEOUT_S` in all; a call that failed or was not answered is left out."""
    if not calls:
        return {}
    ready, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=CALL_TIMEOUT_S)
    ready_set = set(ready)
    answers = {}
    for index, ref in calls.items():
        if ref not in ready_set:
            _silent(slots, index, what)
            continue
        try:
            answers[index] = ray.get(ref, timeout=CALL_TIMEOUT_S)
        except ray.exceptions.RayError as exc:
            _failed(ray, slots, index, exc, what)
    return answers


class Unanswered:
    """Calls made to several agents at once whose answers nobody waits for (a kill, a spare's start):
    each :meth:`check` learns which of them failed, or went unanswered for :data:`CALL_TIMEOUT_S`."""

    def __init__(self) -> None:
        self._calls: list[tuple[int, Any, Any, str, float]] = []  # (index, agent, call, what, when)

    def add(self, slots: list[AgentSlot], calls: dict[int, Any], what: str) -> None:
        sent_at = time.monotonic()
        for index, ref in calls.items():
            self._calls.append((index, slots[index].handle, ref, what, sent_at))

    def check(self, ray: Any, slots: list[AgentSlot]) -> None:
        if not self._calls:
            return
        ready = {id(r) for r in ray.wait([call[2] for call in self._calls], num_returns=len(self._calls),
                                         timeout=0)[0]}
        now, waiting = time.monotonic(), []
        for index, agent, ref, what, sent_at in self._calls:
            if slots[index].handle is not agent or slots[index].gone:
                continue  # the call went to an agent already replaced or given up: nothing more to learn
            if id(ref) not in ready:
                if now - sent_at <= CALL_TIMEOUT_S:
                    waiting.append((index, agent, ref, what, sent_at))
                else:
                    _silent(slots, index, what)
                continue
            try:
                ray.get(ref, timeout=CALL_TIMEOUT_S)
            except ray.exceptions.RayError as exc:
                _failed(ray, slots, index, exc, what)
        self._calls = waiting


def _failed(ray: Any, slots: list[AgentSlot], index: int, exc: BaseException, what: str) -> None:
    """A call to agent ``index`` raised: an agent whose process is gone died; one Ray cannot reach is
    unreachable (its node is taken as lost)."""
    exceptions = ray.exceptions
    call = f" ({what})" if what else ""
    where = _name(slots, index)
    if isinstance(exc, exceptions.ActorDiedError):
        slots[index].failed(f"{where} died{call}", Cause.DIED)
    elif isinstance(exc, getattr(exceptions, "ActorUnavailableError", ())):
        slots[index].failed(f"{where} unreachable{call}", Cause.UNREACHABLE)
    else:
        slots[index].failed(f"a call to {where}{call} failed: {_first_line(exc)}")


def _silent(slots: list[AgentSlot], index: int, what: str) -> None:
    """A call to agent ``index`` was not answered in time: its node is unreachable."""
    slots[index].failed(f"{_name(slots, index)} did not answer {what} within {CALL_TIMEOUT_S:g}s", Cause.UNREACHABLE)


def _name(slots: list[AgentSlot], index: int) -> str:
    return f"node agent {index} on {slots[index].node['ip']}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
