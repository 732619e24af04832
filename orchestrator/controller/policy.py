"""The failure policy: given a failure and what happened before, retry or give up, and how.

Pure: no processes, no clocks. The controller carries the decision out.

- A user error (``ConfigError``) is not retried: it fails the same way every time.
- A failed checkpoint save reaches the policy only with ``checkpoint.on_failure: stop``: not retried.
- An exception that repeats at the same step with the same message on the
  next attempt is a bug in the training code, not a fault: not retried.
- Out of memory again right after a recovery from running out of memory: the
  job does not fit its nodes, and every restart would meet the same wall.
- Otherwise retry while ``fault_tolerance.max_restarts`` allows, in place
  (survivors keep their processes; ranks on a lost node get new ones) unless
  the config asks for full restarts or the previous in-place recovery failed
  before making progress.
- No delay for a failure after progress; failures without progress in
  between back off exponentially.
- A lost node that nothing replaces (no spare node, none joined within
  ``fault_tolerance.node_wait_s``) ends the run, unless
  ``fault_tolerance.allow_shrink`` lets it go on with the nodes left and the
  same global batch (:func:`shrunk_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from orchestrator.config.schema import Config
from orchestrator.controller.failures import Failure
from orchestrator.errors import ClusterError

Mode = Literal["in_place", "full_restart"]

_BACKOFF_BASE_S = 1.0
_BACKOFF_MAX_S = 30.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Attempt:
    """What one earlier recovery was for, and whether it got back to training."""

    cause: Failure
    mode: Mode
    progressed: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class Decision:
    """Retry (in ``mode``, after ``delay_s``) or not (``reason`` says why)."""

    retry: bool
    reason: str
    mode: Mode = "in_place"
    delay_s: float = 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class FailurePolicy:
    """Decides what a failure costs the run."""

    max_restarts: int
    prefer: Mode = "in_place"

    def decide(self, cause: Failure, history: list[Attempt]) -> Decision:
        """``cause`` is the root cause of the failure at hand; ``history`` the recoveries so far."""
        if cause.exc_type == "ConfigError":
            return Decision(retry=False, reason=f"not retryable: a config error ({cause.message})")
        if cause.reason == "checkpoint":
            return Decision(retry=False, reason="checkpoint.on_failure is stop: a failed save ends the run")
        previous = history[-1].cause if history else None
        if (
            previous is not None
            and cause.reason == "exception"
            and previous.reason == "exception"
            and (cause.exc_type, cause.message, cause.step) == (previous.exc_type, previous.message, previous.step)
        ):
            where = f"after step {cause.step}" if cause.step is not None else "before any step"
            return Decision(retry=False, reason=f"not retryable: the same {cause.exc_type} {where} on two attempts")
        if cause.reason == "oom" and previous is not None and previous.reason == "oom":
            return Decision(retry=False, reason="not retryable: out of memory again after a recovery from it; lower "
                            "cluster.workers_per_node or what each rank holds")
        if len(history) >= self.max_restarts:
            return Decision(
                retry=False, reason=f"restart budget spent ({len(history)} of fault_tolerance.max_restarts={self.max_restarts})"
            )
        stalled = 0
        for attempt in reversed(history):
            if attempt.progressed:
                break
            stalled += 1
        mode: Mode = self.prefer
        if history and not history[-1].progressed and history[-1].mode == "in_place":
            mode = "full_restart"
        delay = 0.0 if stalled == 0 else min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (stalled - 1))
        left = self.max_restarts - len(history) - 1
        return Decision(retry=True, reason=f"retrying ({left} restarts left)", mode=mode, delay_s=delay)


def shrunk_config(config: Config, lost_nodes: int) -> Config:
    """The job on ``lost_nodes`` fewer nodes (``fault_tolerance.allow_shrink``), keeping the global
    batch by gradient accumulation. Raises :class:`ClusterError` when that is not possible."""
    cluster = config.cluster
    nodes = cluster.nodes - lost_nodes
    if nodes < 1:
        raise ClusterError("every node of the job was lost; nothing is left to shrink to")
    data = config.model_dump(mode="json")
    data["cluster"]["nodes"] = nodes
    data["train"]["global_batch_size"] = config.global_batch
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problem = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise ClusterError(
            f"cannot go on with {nodes} node(s) instead of {cluster.nodes} (fault_tolerance.allow_shrink): "
            f"{problem}"
        ) from None
