"""The agent's lease: only statuses the controller received renew it (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

from orchestrator.agent.node_agent import NodeAgent


def test_only_a_received_status_moves_the_lease(tmp_path: Path) -> None:
    agent = NodeAgent(0, str(tmp_path), lease_s=3600.0)  # the fence never fires here
    first = agent.status().number
    assert agent._lease_from is None, "not armed before the first acknowledgement"
    second = agent.status().number
    second_made_at = agent._pushed_at[second]
    third = agent.status().number
    agent._acknowledged(second)  # it received our second status: the lease runs from when that was made
    assert agent._lease_from == second_made_at
    agent._acknowledged(first)  # an acknowledgement delivered late, of an older status, renews nothing
    assert agent._lease_from == second_made_at
    assert (first, second, third) == (1, 2, 3)
    third_made_at = agent._pushed_at[third]
    agent._acknowledged(third)
    assert agent._lease_from == third_made_at
    agent._acknowledged(third)  # the same acknowledgement twice moves nothing either
    assert agent._lease_from == third_made_at and agent._pushed_at == {}
