"""The actor's lease: only answers the controller received renew it (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.agent.node_agent import NodeAgent


def test_only_a_received_answer_moves_the_lease(tmp_path: Path) -> None:
    actor = NodeAgent(0, str(tmp_path), lease_s=3600.0)  # the fence never fires here
    assert actor._lease_from is None, "not armed before the first call"
    first = actor.renew(0)
    armed_at = actor._lease_from
    assert armed_at is not None
    second = actor.renew(0)  # the controller has received nothing yet: a call alone renews nothing
    assert actor._lease_from == armed_at
    second_made_at = actor._answered_at[second]
    third = actor.renew(second)  # it received our second answer: the lease runs from when that was made
    assert actor._lease_from == second_made_at
    late = actor.renew(first)  # a call delivered late, acknowledging an older answer, renews nothing
    assert actor._lease_from == second_made_at
    assert (first, second, third, late) == (1, 2, 3, 4)
    late_made_at = actor._answered_at[late]
    actor.renew(late)
    assert actor._lease_from == late_made_at
