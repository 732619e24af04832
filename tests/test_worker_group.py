"""RayWorkerGroup's own decisions, against a stand-in for Ray (the real thing runs in test_launch,
test_recovery and test_multinode)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.config import load_config
from orchestrator.controller.agent_calls import gather
from orchestrator.controller.agent_slots import AgentSlot, Cause, Move, Standing
from orchestrator.controller.inbox import Received
from orchestrator.controller.worker_group import RayWorkerGroup
from orchestrator.messages import Error, NodeStatus, RankStatus, Step
from tests.helpers import LOCAL_CONFIG


class GetTimeoutError(Exception):
    pass


class RayActorError(Exception):
    pass


class RayTaskError(Exception):
    pass


class ActorDiedError(RayActorError):
    pass


class ActorUnavailableError(RayActorError):
    pass


class FakeRay:
    """Every call answers at once, except those made ``hung``, and those in ``failures`` (call -> the
    exception its answer raises)."""

    def __init__(self) -> None:
        self.failures: dict[str, Exception] = {}

    exceptions = SimpleNamespace(GetTimeoutError=GetTimeoutError, RayActorError=RayActorError,
                                 ActorDiedError=ActorDiedError, ActorUnavailableError=ActorUnavailableError,
                                 RayTaskError=RayTaskError, RayError=Exception)

    def wait(self, refs, num_returns, timeout):
        return [r for r in refs if r != "hung"], [r for r in refs if r == "hung"]

    def get(self, ref, timeout):
        if ref == "hung":
            raise GetTimeoutError(f"Get timed out: some object(s) not ready after {timeout}s")
        if ref in self.failures:
            raise self.failures[ref]
        return "ok"


class FakeInbox:
    """What the agents pushed, as the test says (the real inbox and uplink: test_uplink.py)."""

    def __init__(self) -> None:
        self.received = Received(statuses={}, arrived={}, closed=set())
        self.requests = 0
        self._numbers = 0

    def push(self, index: int, ranks: dict[int, RankStatus] | None = None, node_now: float | None = None) -> None:
        self._numbers += 1
        status = NodeStatus(ranks=ranks or {}, warm_spare=None, number=self._numbers,
                            now=time.time() if node_now is None else node_now, asked=self.requests)
        self.received.statuses.setdefault(index, []).append(status)
        self.received.arrived[index] = time.monotonic()

    def take(self) -> Received:
        received, self.received = self.received, Received(statuses={}, arrived={}, closed=set())
        return received

    def ask(self, indexes: list[int]) -> int:
        self.requests += 1
        return self.requests


class FakeActor:
    def __init__(self) -> None:
        self.node_info = SimpleNamespace(remote=lambda: "info")


def _standings(group: RayWorkerGroup) -> list[Standing]:
    return [agent.standing for agent in group._placement.slots]


def _group(tmp_path: Path, overrides: list[str], nodes: list[tuple[str, str]]) -> RayWorkerGroup:
    """A group over the stand-in Ray and inbox, one agent on each of ``nodes`` (node id, address)."""
    group = RayWorkerGroup(load_config(LOCAL_CONFIG, ["cluster.ray_address=auto", *overrides]), tmp_path)
    group._placement.ray, group._inbox = FakeRay(), FakeInbox()
    group._placement.alive_node_ids = lambda: {node for node, _ in nodes}
    group._placement.ray.kill = lambda actor, no_restart: None
    group._placement.slots = [AgentSlot(handle=FakeActor(), node={"node_id": node, "ip": ip, "hostname": node}) for node, ip in nodes]
    return group


def _two_nodes(tmp_path: Path) -> RayWorkerGroup:
    """A group of two one-rank nodes (rank r on agent r) over the stand-in Ray."""
    config = load_config(LOCAL_CONFIG, ["cluster.ray_address=auto", "cluster.nodes=2", "cluster.workers_per_node=1"])
    group = RayWorkerGroup(config, tmp_path)
    group._placement.ray, group._inbox = FakeRay(), FakeInbox()
    group._placement.slots = [AgentSlot(handle=FakeActor(), node={"node_id": "node-a", "ip": "10.0.0.1", "hostname": "a"}),
                    AgentSlot(handle=FakeActor(), node={"node_id": "node-b", "ip": "10.0.0.2", "hostname": "b"})]
    group._placement.alive_node_ids = lambda: {"node-a", "node-b"}
    return group


def test_a_hung_agent_call_fails_its_nodes_ranks_not_the_run(tmp_path: Path) -> None:
    group = _two_nodes(tmp_path)
    answers = gather(group._placement.ray, group._placement.slots, {0: "ok", 1: "hung"}, "kill")
    assert list(answers) == [0], "no exception reaches the controller"
    updates = {u.rank: u for u in group.poll()}
    assert 0 not in updates, "nothing new of rank 0: no update"
    assert updates[1].lost is not None and "node agent 1 on 10.0.0.2 did not answer kill" in updates[1].lost
    assert _standings(group) == [Standing.LIVE, Standing.LOST], "the hung agent is replaced at the next start"


def test_a_failed_agent_call_fails_its_nodes_ranks_not_the_run(tmp_path: Path) -> None:
    group = _two_nodes(tmp_path)
    group._placement.ray.failures = {"broken": RayActorError("The actor died unexpectedly before finishing this task.")}
    answers = gather(group._placement.ray, group._placement.slots, {0: "ok", 1: "broken"}, "interrupt")
    assert list(answers) == [0], "no exception reaches the controller"
    updates = {u.rank: u for u in group.poll()}
    assert "a call to node agent 1 on 10.0.0.2 (interrupt) failed: The actor died" in updates[1].lost
    assert 0 not in updates and _standings(group) == [Standing.LIVE, Standing.LOST]


def test_a_node_clock_hours_off_does_not_make_its_ranks_look_frozen(tmp_path: Path) -> None:
    """Node times are moved onto the controller's clock: a rank alive a moment ago on a node whose clock
    runs an hour behind is alive a moment ago, and its error is ordered by when it happened."""
    behind = 3600.0
    group = _group(tmp_path, [], [("node-a", "127.0.0.1")])
    group._pids = {1: 7}
    node_time = time.time() - behind - 0.5
    error = Error(exc_type="RuntimeError", message="x", traceback="", interrupted=False, step=3, at=node_time)
    group._inbox.push(0, {1: RankStatus(pid=7, reports=[error], returncode=None, alive_at=node_time, where="",
                                        in_collective=False)}, node_now=time.time() - behind)
    update = {u.rank: u for u in group.poll()}[1]
    assert abs(update.alive_at - (time.time() - 0.5)) < 0.2
    assert abs(update.reports[0].at - (time.time() - 0.5)) < 0.2


def test_statuses_that_arrived_together_lose_no_report_and_say_who_answered_a_request(tmp_path: Path) -> None:
    group = _two_nodes(tmp_path)

    def status(step: int) -> RankStatus:
        return RankStatus(pid=7, reports=[Step(step=step, loss=None, step_time_s=0.1)], returncode=None,
                          alive_at=time.time(), where="", in_collective=False)

    group._pids = {1: 7}
    mark = group.poll_mark()
    group._inbox.requests -= 1
    group._inbox.push(1, {1: status(1)})  # made before the request
    group._inbox.requests += 1
    assert group.unheard(mark, [0, 1]) == [0, 1]
    group._inbox.push(1, {1: status(2)})
    update = {u.rank: u for u in group.poll()}[1]
    assert [r.step for r in update.reports] == [1, 2]
    assert group.unheard(mark, [0, 1]) == [0], "agent 1's second status answered the request"


def test_a_status_of_a_process_the_rank_no_longer_runs_in_is_not_the_ranks(tmp_path: Path) -> None:
    """Found on a 2-node dev-cluster: the exit of rank 1's old process (stopped for a full restart), pushed
    before the new attempt began, was taken for the new process's death, and cost a restart."""
    group = _two_nodes(tmp_path)
    group._pids = {1: 8}  # the new attempt's process
    old_exit = RankStatus(pid=7, reports=[], returncode=-9, alive_at=time.time(), where="", in_collective=False,
                          exited_at=time.time())
    group._inbox.push(1, {1: old_exit})
    assert group.poll() == []


def test_a_beat_is_every_ranks_liveness_and_latest_step_of_the_process_it_runs_in(tmp_path: Path) -> None:
    from orchestrator.messages import NodeBeat

    group = _group(tmp_path, ["cluster.workers_per_node=2"], [("node-a", "127.0.0.1")])
    group._pids = {0: 10, 1: 11}
    now = time.time()
    beat = NodeBeat(ranks=[0, 1], pid=[10, 99], alive_at=[now, now], moved_at=[now, now], where=["a.py:1", "b.py:2"],
                    in_collective=[True, False], step=[7, 7], step_at=[now - 1, now - 1], step_time_s=[0.5, 0.5],
                    step_attempt=[3, 3])
    group._inbox.received.statuses[0] = [NodeStatus(ranks={}, warm_spare=None, number=1, now=now, beat=beat)]
    group._inbox.received.arrived[0] = time.monotonic()
    [taken] = group.poll()
    assert taken.ranks == [0], "rank 1's process is not pid 99"
    assert (taken.step, taken.step_attempt, taken.step_time_s, taken.where, taken.in_collective) == (
        [7], [3], [0.5], ["a.py:1"], [True])


def test_a_nodes_folded_errors_are_of_the_process_each_rank_runs_in_and_on_the_controllers_clock(tmp_path: Path) -> None:
    from orchestrator.messages import NodeLeft

    behind = 3600.0
    group = _group(tmp_path, ["cluster.workers_per_node=2"], [("node-b", "10.0.0.2")])
    group._pids = {0: 10, 1: 11}
    node_time = time.time() - behind - 0.5
    left = NodeLeft(ranks=[0, 1], pid=[10, 99], at=[node_time, node_time], step=[3, 3], exc_type="DistBackendError",
                    message="Connection reset by peer", traceback="", interrupted=False, collective=True, attempt=0)
    group._inbox.received.statuses[0] = [NodeStatus(ranks={}, warm_spare=None, number=1, now=time.time() - behind,
                                                    left=[left])]
    group._inbox.received.arrived[0] = time.monotonic()
    [taken] = group.poll()
    assert (taken.ranks, taken.pid, taken.step) == ([0], [10], [3]), "rank 1's process is not pid 99"
    assert abs(taken.at[0] - (time.time() - 0.5)) < 0.2


def test_latency_on_one_machine_is_not_taken_for_skew(tmp_path: Path) -> None:
    """Ranks of one machine are ordered on one clock: a slow answer must not shift one agent's times."""
    group = RayWorkerGroup(load_config(LOCAL_CONFIG), tmp_path)
    assert group._skew("node-a", 0.002) == 0.0
    assert group._skew("node-a", 0.4) == 0.0, "a 400 ms answer on the same node: latency, not skew"
    assert (group._skew("node-b", 3600.5), group._skew("node-b", 3600.1), group._skew("node-b", 3601.0)) == (
        3600.5, 3600.1, 3600.1)


def test_a_spare_node_whose_agent_died_is_not_offered_again_and_costs_no_lease_wait(tmp_path: Path) -> None:
    group = _group(tmp_path, ["cluster.spare_nodes=1"], [("node-a", "10.0.0.1"), ("node-s", "10.0.0.9")])
    group._placement.slots[1].failed("died", Cause.DIED)
    lost = group._lose({1: "died"})
    assert sorted(lost) == [1]
    assert group._placement.spare_bundles == [] and _standings(group) == [Standing.LIVE, Standing.RETIRED]
    assert group._fenced_at == 0.0, "its processes are gone: no lease to wait for"


def test_a_node_that_is_dying_moves_to_the_spare_once_ray_reports_it_dead(tmp_path: Path) -> None:
    """A killed node: its agent is found dead while Ray still lists the node alive. The agent made
    again in the node's bundle cannot be placed; once Ray reports the node dead, the slot moves to
    the spare node instead of waiting minutes for a placement that cannot come."""
    config = load_config(LOCAL_CONFIG, ["cluster.ray_address=auto", "cluster.nodes=2", "cluster.workers_per_node=2",
                                        "cluster.spare_nodes=1"])
    group = RayWorkerGroup(config, tmp_path)
    ray = group._placement.ray = FakeRay()
    reports = iter([["node-a", "node-b", "node-s"]] * 2)  # node-b looks alive twice, then is reported dead
    group._placement.alive_node_ids = lambda: set(next(reports, ["node-a", "node-s"]))
    ray.kill = lambda actor, no_restart: None
    group._placement.slots = [AgentSlot(handle=SimpleNamespace(node_info=SimpleNamespace(remote=lambda: "info")),
                              node={"node_id": node, "ip": ip, "hostname": node})
                    for node, ip in (("node-a", "10.0.0.1"), ("node-b", "10.0.0.2"), ("node-s", "10.0.0.9"))]
    unplaceable = SimpleNamespace(node_info=SimpleNamespace(remote=lambda: "hung"))
    group._placement._new_agent = lambda index: unplaceable
    group._placement.slots[1].advance(Move.GIVEN_UP)

    started = time.monotonic()
    assert group.replace_lost(allow_missing=False) == []
    assert time.monotonic() - started < 5
    assert group._placement.slot_bundle == [0, 2] and _standings(group) == [Standing.LIVE, Standing.RETIRED, Standing.LIVE]
    assert (group._placement.home(2), group._placement.home(3)) == (2, 2), "ranks 2 and 3 now live on the spare node's agent"


def test_a_silent_node_moves_to_the_spare_at_once_though_ray_still_lists_it(tmp_path: Path) -> None:
    """A partition: the node's agent sends nothing for node_timeout_s, while Ray, which notices much
    later, still lists the node alive. Its slot goes to the spare node without waiting for Ray."""
    group = _group(tmp_path, ["cluster.nodes=2", "cluster.workers_per_node=1", "cluster.spare_nodes=1",
                              "fault_tolerance.node_timeout_s=0.2"],
                   [("node-a", "10.0.0.1"), ("node-b", "10.0.0.2"), ("node-s", "10.0.0.9")])
    group._placement._new_agent = lambda index: pytest.fail("a silent node's agent is not made again in its bundle")
    group.poll()
    time.sleep(0.3)
    group._inbox.push(0)
    group._inbox.push(2)
    updates = {u.rank: u for u in group.poll()}
    assert updates[1].lost is not None and updates[1].lost.startswith("node 10.0.0.2 lost: its node agent sent nothing")
    assert 0 not in updates, "agent 0 pushed in time"
    group._fenced_at = 0.0  # its lease is not what this test waits for
    assert group.replace_lost(allow_missing=False) == []
    assert group._placement.slot_bundle == [0, 2] and _standings(group) == [Standing.LIVE, Standing.RETIRED, Standing.LIVE]


def test_a_kill_nobody_waits_for_still_costs_its_node_when_it_fails_but_never_a_successor(tmp_path: Path) -> None:
    group = _two_nodes(tmp_path)
    died = RayActorError("The actor died unexpectedly before finishing this task.")
    group._placement.ray.failures = {"broken": died, "old": died}
    group._placement.slots[0].handle.kill = SimpleNamespace(remote=lambda ranks: "old")
    group._placement.slots[1].handle.kill = SimpleNamespace(remote=lambda ranks: "broken")
    started = time.monotonic()
    group.kill([0, 1])
    assert time.monotonic() - started < 0.1, "nobody waits for a kill"
    group._placement.slots[0].remade(FakeActor())  # agent 0 was made again meanwhile: its predecessor's failure is not its own
    updates = {u.rank: u for u in group.poll()}
    assert 0 not in updates, "nothing new of rank 0: no update"
    assert "a call to node agent 1 on 10.0.0.2 (kill) failed: The actor died" in updates[1].lost


@pytest.mark.parametrize("why", ["unreachable", "died"])
def test_an_agent_whose_connection_closed_is_asked_through_ray_and_lost_in_a_few_words(tmp_path: Path, why: str) -> None:
    """Ray's words for it (an RpcError, rpc_code 14, a paragraph) stay in Ray's logs. One Ray cannot
    reach is its node lost at once; one whose process died on a live node costs no lease wait."""
    group = _two_nodes(tmp_path)
    group._placement.alive_node_ids = lambda: {"node-a", "node-b"}
    group._placement.ray.kill = lambda actor, no_restart: None
    error = (ActorUnavailableError("The actor 072d is unavailable: RpcError: ... rpc_code: 14. The task may ...")
             if why == "unreachable" else ActorDiedError("The actor died unexpectedly before finishing this task."))
    group._placement.ray.failures = {"probe": error}
    group._placement.slots[1].handle.node_info = SimpleNamespace(remote=lambda: "probe")
    group._inbox.received.closed.add(1)
    group._inbox.push(0)
    updates = {u.rank: u for u in group.poll()}
    if why == "unreachable":
        assert updates[1].lost == ("node 10.0.0.2 lost: node agent 1 on 10.0.0.2 unreachable "
                                   "(a call after its connection closed)")
        assert group._placement.slots[1].cause is Cause.UNREACHABLE, "its slot moves to a spare without waiting for Ray to call it dead"
    else:
        assert updates[1].lost == "node agent 1 on 10.0.0.2 died (a call after its connection closed)"
        assert group._fenced_at == 0.0, "its ranks died with it: no lease to wait for"
    assert 0 not in updates


def test_the_gpu_targets_leave_out_other_machines_loopback_endpoints(tmp_path: Path) -> None:
    """With metrics.host 127.0.0.1 each agent listens on its own machine's loopback: only the
    controller's machine's endpoint can be scraped from here; another's address would name a port
    of this machine."""
    group = _group(tmp_path, ["cluster.nodes=2", "cluster.workers_per_node=1"],
                   [("node-a", "10.0.0.1"), ("node-b", "10.0.0.2")])
    group._inbox.address = ("10.0.0.1", 4000)  # the controller runs on node-a
    group._placement.slots[0].node["gpu_endpoint"], group._placement.slots[1].node["gpu_endpoint"] = "127.0.0.1:9400", "127.0.0.1:9401"
    assert group.gpu_endpoints() == ["127.0.0.1:9400"]
    group._placement.slots[0].node["gpu_endpoint"], group._placement.slots[1].node["gpu_endpoint"] = "10.0.0.1:9400", "10.0.0.2:9400"
    assert group.gpu_endpoints() == ["10.0.0.1:9400", "10.0.0.2:9400"], "metrics.host 0.0.0.0: every node's"


def test_an_agents_standing_moves_only_as_its_transition_function_says() -> None:
    agent = AgentSlot(handle="first", node={"node_id": "node-a", "ip": "10.0.0.1"})
    agent.failed("a call failed", Cause.UNREACHABLE)
    agent.failed("its process died", Cause.DIED)
    assert (agent.standing, agent.why, agent.cause) == (Standing.FAILING, "its process died", Cause.UNREACHABLE), (
        "the latest words; unreachable stays unreachable")
    agent.advance(Move.GIVEN_UP)
    agent.failed("a late call failed")
    assert (agent.standing, agent.why, agent.gone) == (Standing.LOST, "its process died", True), "a late failure changes nothing"
    agent.remade("second")
    assert (agent.standing, agent.handle, agent.cause, agent.why) == (Standing.LOST, "second", None, ""), (
        "a new agent is not live until it answered from its node")
    agent.advance(Move.REMADE)
    assert agent.standing is Standing.LIVE
    agent.advance(Move.RETIRED)
    for move in Move:
        agent.advance(move)
    assert agent.standing is Standing.RETIRED, "a retired bundle is never used again"
