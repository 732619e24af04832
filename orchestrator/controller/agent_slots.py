"""What the worker group knows of each node agent: one :class:`AgentSlot` per placement-group
bundle, its :class:`Standing` an enum moved only by :meth:`AgentSlot.advance`.

    LIVE --a call failed or went unanswered--> FAILING --the next poll--> LOST --made again--> LIVE
      \\___________silent for node_timeout_s, or lost with its node___________/
    any --its bundle given up (its node is gone, a spare lost, the job shrank)--> RETIRED

A failing agent costs its node at the next poll (its ranks are reported lost), never the run; a
lost one is made again in its bundle, or its node slot moves to a spare node and its bundle retires.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class Standing(enum.Enum):
    LIVE = "live"  # answering, as far as is known
    FAILING = "failing"  # a call to it failed or went unanswered: its node is lost at the next poll
    LOST = "lost"  # given up: its ranks were reported lost; it waits to be made again, or retired
    RETIRED = "retired"  # its bundle is never used again


class Move(enum.Enum):
    FAILED = "failed"  # a call to it failed, or was not answered in time
    GIVEN_UP = "given_up"  # its node was found lost (silent, failing, or gone in Ray's view)
    REMADE = "remade"  # a new agent answered in its bundle
    RETIRED = "retired"


class Cause(enum.Enum):
    """How an agent failed, where it matters: whether its node is taken as lost, and whether its ranks
    may still run (and must be fenced) or died with it."""

    UNREACHABLE = "unreachable"  # it cannot be reached: its node is taken as lost, its ranks fenced
    DIED = "died"  # Ray says its process died: its ranks died with it (PDEATHSIG), its node may be fine


_NEXT: dict[tuple[Standing, Move], Standing] = {
    (Standing.LIVE, Move.FAILED): Standing.FAILING,
    (Standing.FAILING, Move.FAILED): Standing.FAILING,
    (Standing.LIVE, Move.GIVEN_UP): Standing.LOST,
    (Standing.FAILING, Move.GIVEN_UP): Standing.LOST,
    (Standing.LOST, Move.REMADE): Standing.LIVE,
    **{(standing, Move.RETIRED): Standing.RETIRED for standing in Standing},
}

# A module constant: an enum member looked up on its class costs 0.15 us, and ``gone`` is asked of
# 2,048 agents several times a second at 16,384 ranks.
_GONE = (Standing.LOST, Standing.RETIRED)


@dataclass(kw_only=True, slots=True)
class AgentSlot:
    """One bundle's node agent: its Ray handle, where it landed (``NodeAgent.node_info``), its
    standing, and what its pushes told (when the latest arrived, the latest request it answered,
    the ranks and pids its beat lists in this attempt)."""

    handle: Any
    node: dict[str, Any]
    standing: Standing = Standing.LIVE
    why: str = ""  # why it is failing, for the ranks' lost reports
    cause: Cause | None = None
    answered_at: float | None = None
    heard: int = 0
    beat_columns: tuple[list[int], list[int | None]] | None = None
    zygote_asked: bool = False

    @property
    def gone(self) -> bool:
        """Given up (lost or retired): no call goes to it, its answers are not waited for."""
        return self.standing in _GONE

    def advance(self, move: Move) -> None:
        """The one way the standing changes; a move that does not apply leaves it as it is (a late
        failure of a call to an agent already given up)."""
        self.standing = _NEXT.get((self.standing, move), self.standing)

    def failed(self, why: str, cause: Cause | None = None) -> None:
        """A call to it failed (``why``); an unreachable agent stays unreachable whatever else is said."""
        if not self.gone:
            self.why = why
        if cause is not None and self.cause is not Cause.UNREACHABLE:
            self.cause = cause
        self.advance(Move.FAILED)

    def remade(self, handle: Any) -> None:
        """A new agent in this bundle (not yet placed: it is LIVE once it answered)."""
        self.handle, self.cause, self.why, self.zygote_asked = handle, None, "", False
