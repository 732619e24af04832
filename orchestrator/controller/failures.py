"""Failures as data: what went wrong on which rank, and which failure was the root cause.

When one rank dies, its peers fail moments later with collective errors
("Connection reset by peer"). The root cause is the earliest failure that
is not such an error, by the time its agent saw it (the earliest collective
error only where every failure is one); the others are consequences.
"""

from __future__ import annotations

import re
import signal as signals
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.controller.worker_group import RankUpdate
from orchestrator.messages import Error
from orchestrator.types import Reason

# Lines of the rank's traceback or log that travel with its failure_detected event.
_TAIL_LINES = 20


@dataclass(frozen=True, kw_only=True, slots=True)
class Failure:
    """One rank's failure."""

    rank: int
    reason: Reason
    at: float
    message: str
    step: int | None = None
    exit_code: int | None = None
    signal: int | None = None
    exc_type: str | None = None
    traceback: str = ""
    log_tail: str = ""
    collective: bool = False  # an exception raised inside a collective: most likely a peer's failure

    def event_fields(self) -> dict[str, Any]:
        """The ``failure_detected`` event's fields."""
        fields: dict[str, Any] = {"rank": self.rank, "reason": self.reason, "message": self.message}
        if self.step is not None:
            fields["step"] = self.step
        if self.details():
            fields["log_tail"] = "\n".join(self.details().rstrip().splitlines()[-_TAIL_LINES:])
        if self.exit_code is not None:
            fields["exit_code"] = self.exit_code
        if self.signal is not None:
            fields["signal"] = self.signal
            fields["signal_name"] = _signal_name(self.signal)
        if self.exc_type is not None:
            fields["exc_type"] = self.exc_type
        return fields

    def details(self) -> str:
        """What the user needs to see: the traceback, else the end of the rank's log without the
        known noise of a healthy start (the log file keeps every line)."""
        return self.traceback or without_noise(self.log_tail)


# Lines every healthy rank prints: DeepSpeed loading the op prebuilt at set-up (it says "built"; a launch
# builds nothing), and library deprecation warnings (the warning's line, then the source line it quotes).
_NOISE = re.compile(r"DeepSpeed deepspeed\.ops\.\S+ built successfully|\S+\.py:\d+: (FutureWarning|DeprecationWarning): ")


def without_noise(log: str) -> str:
    """``log`` without the lines :data:`_NOISE` knows (and the quoted source line after a warning)."""
    kept: list[str] = []
    skip_quote = False
    for line in log.splitlines():
        if skip_quote and line.startswith((" ", "\t")):
            skip_quote = False
            continue
        skip_quote = False
        if _NOISE.search(line):
            skip_quote = "Warning: " in line
            continue
        kept.append(line)
    return "\n".join(kept) + ("\n" if log.endswith("\n") and kept else "")


def failure_from(
    update: RankUpdate, error: Error | None, last_step: int | None, last_seen: float | None = None
) -> Failure | None:
    """The failure ``update`` shows, given the rank's error report (if it sent one), its last step
    and when it was last seen alive.

    A failure's ``step`` is the last step the rank reported (None when it reported none). A lost
    rank died after it was last seen, so that time (not when we noticed) orders it against the
    collective errors its death caused in its peers.
    """
    step = error.step if error else last_step
    if update.lost is not None:
        at = last_seen if last_seen is not None else time.time()
        return Failure(rank=update.rank, reason="node_lost", at=at, message=update.lost, step=step)
    code = update.returncode
    if error is not None:
        return Failure(
            rank=update.rank,
            reason="exception",
            at=error.at,
            message=f"{error.exc_type}: {error.message}",
            step=step,
            exit_code=code,
            exc_type=error.exc_type,
            traceback=error.traceback,
            log_tail=update.log_tail,
            collective=error.collective,
        )
    if code is None or code == 0:
        return None
    at = update.exited_at if update.exited_at is not None else time.time()
    if code < 0 and update.oom:
        return Failure(
            rank=update.rank, reason="oom", at=at, signal=-code, step=step, log_tail=update.log_tail,
            message=f"training process killed by the kernel's OOM killer ({update.oom})",
        )
    if code < 0:
        return Failure(
            rank=update.rank, reason="signal", at=at, signal=-code, step=step,
            message=f"training process killed by {_signal_name(-code)}", log_tail=update.log_tail,
        )
    return Failure(
        rank=update.rank, reason="exit", at=at, exit_code=code, step=step,
        message=f"training process exited with code {code}", log_tail=update.log_tail,
    )


def one_per_rank(failures: list[Failure]) -> list[Failure]:
    """One failure per rank: the first seen, unless its node was lost (then that is the failure)."""
    chosen: dict[int, Failure] = {}
    for failure in failures:
        if failure.rank not in chosen or (failure.reason == "node_lost" and chosen[failure.rank].reason != "node_lost"):
            chosen[failure.rank] = failure
    return list(chosen.values())


def root_cause(failures: list[Failure]) -> Failure:
    """The earliest failure that is not a collective error; on a tie, the lowest rank.

    A collective error is a peer's consequence, and its time can precede the cause's by
    milliseconds: a survivor stamps its error when it raises, while a killed rank's exit is stamped
    when its agent sees the rank's channel close. Only where every failure is a collective error
    (the cause went unseen) is the earliest of them chosen.
    """
    assert failures, "root_cause needs at least one failure"
    return min(failures, key=lambda f: (f.collective, f.at, f.rank))


def _signal_name(number: int) -> str:
    try:
        return signals.Signals(number).name
    except ValueError:
        return f"signal {number}"


def rank_ranges(ranks: list[int] | range) -> str:
    """Ranks in compact form: ``0-3,8,10-11``."""
    parts: list[str] = []
    ordered = sorted(set(ranks))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)
