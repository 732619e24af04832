"""RayWorkerGroup's own decisions, against a stand-in for Ray (the real thing runs in test_launch,
test_recovery and test_multinode)."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.config import load_config
from orchestrator.controller.worker_group import RayWorkerGroup
from orchestrator.worker.messages import Error, PollAnswer, RankStatus
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
    exception its answer raises); polls report ``ranks`` at ``node_now()``."""

    def __init__(self, node_now=time.time) -> None:
        self.ranks: dict[int, RankStatus] = {}
        self.node_now = node_now
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
        return PollAnswer(ranks=dict(self.ranks), warm_spare=None, answer=int(ref.split(":")[1]) + 1, now=self.node_now())

    def nodes(self):
        return [{"NodeID": "node-a", "Alive": True}]


class FakeActor:
    def __init__(self) -> None:
        self.poll = SimpleNamespace(remote=lambda ack: f"poll:{ack}")


def _two_nodes(tmp_path: Path) -> RayWorkerGroup:
    """A group of two one-rank nodes (rank r on agent r) over the stand-in Ray."""
    config = load_config(LOCAL_CONFIG, ["cluster.ray_address=auto", "cluster.nodes=2", "cluster.workers_per_node=1"])
    group = RayWorkerGroup(config, tmp_path)
    group._ray = FakeRay()
    group._agents = [FakeActor(), FakeActor()]
    group._nodes = [{"node_id": "node-a", "ip": "10.0.0.1", "hostname": "a"},
                    {"node_id": "node-b", "ip": "10.0.0.2", "hostname": "b"}]
    group._ray.nodes = lambda: [{"NodeID": "node-a", "Alive": True}, {"NodeID": "node-b", "Alive": True}]
    return group


def test_a_hung_agent_call_fails_its_nodes_ranks_not_the_run(tmp_path: Path) -> None:
    group = _two_nodes(tmp_path)
    answers = group._gather({0: "poll:0", 1: "hung"}, "kill")
    assert list(answers) == [0], "no exception reaches the controller"
    updates = {u.rank: u for u in group.poll()}
    assert 0 not in updates, "nothing new of rank 0: no update"
    assert updates[1].lost is not None and "node agent 1 on 10.0.0.2 did not answer kill" in updates[1].lost
    assert group._dead == {1}, "the hung agent is replaced at the next start"


def test_a_failed_agent_call_fails_its_nodes_ranks_not_the_run(tmp_path: Path) -> None:
    group = _two_nodes(tmp_path)
    group._ray.failures = {"broken": RayActorError("The actor died unexpectedly before finishing this task.")}
    assert list(group._gather({0: "poll:0", 1: "broken"}, "interrupt")) == [0], "no exception reaches the controller"
    updates = {u.rank: u for u in group.poll()}
    assert "a call to node agent 1 on 10.0.0.2 (interrupt) failed: The actor died" in updates[1].lost
    assert 0 not in updates and group._dead == {1}


def test_a_node_clock_hours_off_does_not_make_its_ranks_look_frozen(tmp_path: Path) -> None:
    """Node times are moved onto the controller's clock: a rank alive a moment ago on a node whose clock
    runs an hour behind is alive a moment ago, and its error is ordered by when it happened."""
    behind = 3600.0
    group = RayWorkerGroup(load_config(LOCAL_CONFIG), tmp_path)
    group._ray = FakeRay(node_now=lambda: time.time() - behind)
    group._agents = [FakeActor()]
    group._nodes = [{"node_id": "node-a", "ip": "127.0.0.1", "hostname": "h"}]
    node_time = time.time() - behind - 0.5
    error = Error(exc_type="RuntimeError", message="x", traceback="", interrupted=False, step=3, at=node_time)
    group._ray.ranks = {1: RankStatus(pid=7, reports=[error], returncode=None, alive_at=node_time, where="",
                                      in_collective=False)}
    update = {u.rank: u for u in group.poll()}[1]
    assert abs(update.alive_at - (time.time() - 0.5)) < 0.2
    assert abs(update.reports[0].at - (time.time() - 0.5)) < 0.2


def test_the_lease_keeper_keeps_an_idle_agents_lease_well_inside_its_limit(tmp_path: Path) -> None:
    """An agent no poll reaches (the controller is busy elsewhere) lives on the keeper's renewals alone: its lease
    must never come near running out while the controller can reach it."""
    import threading

    from orchestrator.agent.node_agent import NodeAgent

    actor = NodeAgent(0, str(tmp_path), lease_s=3600.0)  # its own fence stays out of this test

    class Wrapped:
        renew = SimpleNamespace(remote=lambda ack: f"renew:{actor.renew(ack)}")

    ray = FakeRay()
    ray.get = lambda ref, timeout: int(ref.split(":")[1])
    group = RayWorkerGroup(load_config(LOCAL_CONFIG), tmp_path)
    group._ray, group._agents, group._lease_s = ray, [Wrapped()], 0.4
    keeper = threading.Thread(target=group._keep_leases, daemon=True)
    keeper.start()
    worst, deadline = 0.0, time.monotonic() + 1.5
    while time.monotonic() < deadline:
        if actor._lease_from is not None:
            worst = max(worst, time.monotonic() - actor._lease_from)
        time.sleep(0.005)
    group._closing.set()
    keeper.join(timeout=5)
    assert actor._lease_from is not None and worst < group._lease_s / 2, worst


def test_latency_on_one_machine_is_not_taken_for_skew(tmp_path: Path) -> None:
    """Ranks of one machine are ordered on one clock: a slow answer must not shift one agent's times."""
    group = RayWorkerGroup(load_config(LOCAL_CONFIG), tmp_path)
    group._nodes = [{"node_id": "node-a", "ip": "127.0.0.1", "hostname": "h"}] * 2
    assert group._skew(0, 0.002) == 0.0
    assert group._skew(1, 0.4) == 0.0, "a 400 ms answer on the same node: latency, not skew"
    group._nodes = [{"node_id": "node-b", "ip": "10.0.0.2", "hostname": "b"}]
    assert group._skew(0, 3600.5) == 3600.5 and group._skew(0, 3600.1) == 3600.1 and group._skew(0, 3601.0) == 3600.1


def test_a_spare_node_whose_agent_died_is_not_offered_again_and_costs_no_lease_wait(tmp_path: Path) -> None:
    config = load_config(LOCAL_CONFIG, ["cluster.ray_address=auto", "cluster.spare_nodes=1"])
    group = RayWorkerGroup(config, tmp_path)
    group._ray = FakeRay()
    group._ray.kill = lambda actor, no_restart: None
    group._agents = [FakeActor() for _ in range(2)]
    group._nodes = [{"node_id": "node-a", "ip": "10.0.0.1", "hostname": "a"},
                    {"node_id": "node-s", "ip": "10.0.0.9", "hostname": "s"}]
    group._ray.nodes = lambda: [{"NodeID": "node-a", "Alive": True}, {"NodeID": "node-s", "Alive": True}]
    lost = group._lose({1: "died"}, silent=set(), died={1})
    assert sorted(lost) == [1]
    assert group._spare_bundles == [] and group._lost_bundles == {1}
    assert group._fenced_at == 0.0, "its processes are gone: no lease to wait for"


def test_an_answer_of_a_replaced_agent_is_never_credited_to_its_successor(tmp_path: Path) -> None:
    """Found by the chaos soak: the lease keeper credited a dead agent's last renewal to the agent
    made in its place, which then never saw its own answers acknowledged and fenced itself."""
    import threading

    group = RayWorkerGroup(load_config(LOCAL_CONFIG), tmp_path)
    old, new = SimpleNamespace(renew=SimpleNamespace(remote=lambda ack: "renew:41")), SimpleNamespace()
    info = {"node_id": "node-a", "ip": "127.0.0.1", "hostname": "h", "gpu_ids": [], "cpus": 2}
    ray = FakeRay()
    ray.get = lambda ref, timeout: [info] if isinstance(ref, list) else int(ref.split(":")[1])
    ray.kill = lambda actor, no_restart: None
    group._ray, group._agents, group._lease_s, group._nodes = ray, [old], 0.2, [info]
    keeper = threading.Thread(target=group._keep_leases, daemon=True)

    def new_agent(index: int) -> SimpleNamespace:
        group._acked[index] = 0
        deadline = time.monotonic() + 1.0  # the keeper gets every chance to credit the old answer now
        while group._acked[index] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        new.renew = SimpleNamespace(remote=lambda ack: "renew:1")
        new.node_info = SimpleNamespace(remote=lambda: "info")
        return new

    group._new_agent = new_agent
    keeper.start()
    deadline = time.monotonic() + 5  # the old agent is renewed (and the next renewal is in flight) when it dies
    while group._acked.get(0) != 41 and time.monotonic() < deadline:
        time.sleep(0.01)
    group._dead = {0}
    try:
        assert group._recreate(0, wait_s=5)
    finally:
        group._closing.set()
        keeper.join(timeout=5)
    assert group._agents[0] is new
    assert group._acked[0] <= 1, "the old agent's answer 41 was credited to the new agent"


def test_a_node_that_is_dying_moves_to_the_spare_once_ray_reports_it_dead(tmp_path: Path) -> None:
    """A killed node: its agent is found dead while Ray still lists the node alive. The agent made
    again in the node's bundle cannot be placed; once Ray reports the node dead, the slot moves to
    the spare node instead of waiting minutes for a placement that cannot come."""
    config = load_config(LOCAL_CONFIG, ["cluster.ray_address=auto", "cluster.nodes=2", "cluster.workers_per_node=2",
                                        "cluster.spare_nodes=1"])
    group = RayWorkerGroup(config, tmp_path)
    ray = group._ray = FakeRay()
    reports = iter([["node-a", "node-b", "node-s"]] * 2)  # node-b looks alive twice, then is reported dead
    ray.nodes = lambda: [{"NodeID": n, "Alive": True} for n in next(reports, ["node-a", "node-s"])]
    ray.kill = lambda actor, no_restart: None
    group._agents = [SimpleNamespace(node_info=SimpleNamespace(remote=lambda: "info")) for _ in range(3)]
    group._nodes = [{"node_id": node, "ip": ip, "hostname": node} for node, ip in
                    (("node-a", "10.0.0.1"), ("node-b", "10.0.0.2"), ("node-s", "10.0.0.9"))]
    unplaceable = SimpleNamespace(node_info=SimpleNamespace(remote=lambda: "hung"))
    group._new_agent = lambda index: unplaceable
    group._dead = {1}

    started = time.monotonic()
    assert group.replace_lost(allow_missing=False) == []
    assert time.monotonic() - started < 5
    assert group._slot_bundle == [0, 2] and group._lost_bundles == {1}
    assert (group._home(2), group._home(3)) == (2, 2), "ranks 2 and 3 now live on the spare node's agent"


def test_a_silent_node_moves_to_the_spare_at_once_though_ray_still_lists_it(tmp_path: Path) -> None:
    """A partition: the node's agent answers no poll for node_timeout_s, while Ray, which notices much
    later, still lists the node alive. Its slot goes to the spare node without waiting for Ray."""
    config = load_config(LOCAL_CONFIG, ["cluster.ray_address=auto", "cluster.nodes=2", "cluster.workers_per_node=1",
                                        "cluster.spare_nodes=1", "fault_tolerance.node_timeout_s=0.2"])
    group = RayWorkerGroup(config, tmp_path)
    ray = group._ray = FakeRay()
    ray.nodes = lambda: [{"NodeID": n, "Alive": True} for n in ("node-a", "node-b", "node-s")]
    ray.kill = lambda actor, no_restart: None
    group._agents = [FakeActor(), SimpleNamespace(poll=SimpleNamespace(remote=lambda ack: "hung")), FakeActor()]
    group._nodes = [{"node_id": node, "ip": ip, "hostname": node} for node, ip in
                    (("node-a", "10.0.0.1"), ("node-b", "10.0.0.2"), ("node-s", "10.0.0.9"))]
    group._new_agent = lambda index: pytest.fail("a silent node's agent is not made again in its bundle")
    group.poll()
    time.sleep(0.3)
    updates = {u.rank: u for u in group.poll()}
    assert updates[1].lost is not None and updates[1].lost.startswith("node 10.0.0.2 lost: its node agent answered nothing")
    group._fenced_at = 0.0  # its lease is not what this test waits for
    assert group.replace_lost(allow_missing=False) == []
    assert group._slot_bundle == [0, 2] and group._lost_bundles == {1}


def test_a_kill_nobody_waits_for_still_costs_its_node_when_it_fails_but_never_a_successor(tmp_path: Path) -> None:
    group = _two_nodes(tmp_path)
    died = RayActorError("The actor died unexpectedly before finishing this task.")
    group._ray.failures = {"broken": died, "old": died}
    group._agents[0].kill = SimpleNamespace(remote=lambda ranks: "old")
    group._agents[1].kill = SimpleNamespace(remote=lambda ranks: "broken")
    started = time.monotonic()
    group.kill([0, 1])
    assert time.monotonic() - started < 0.1, "nobody waits for a kill"
    group._agents[0] = FakeActor()  # agent 0 was made again meanwhile: its predecessor's failure is not its own
    updates = {u.rank: u for u in group.poll()}
    assert 0 not in updates, "nothing new of rank 0: no update"
    assert "a call to node agent 1 on 10.0.0.2 (kill) failed: The actor died" in updates[1].lost


def test_an_agent_ray_cannot_reach_is_its_node_lost_in_a_few_words(tmp_path: Path) -> None:
    """Ray's words for it (an RpcError, rpc_code 14, a paragraph) stay in Ray's logs."""
    group = _two_nodes(tmp_path)
    group._ray.failures = {
        "gone": ActorUnavailableError("The actor 072d is unavailable: RpcError: ... rpc_code: 14. The task may ...")}
    group._agents[1].poll = SimpleNamespace(remote=lambda ack: "gone")
    updates = {u.rank: u for u in group.poll()}
    assert updates[1].lost == "node 10.0.0.2 lost: node agent 1 on 10.0.0.2 unreachable"
    assert group._unreachable == {1}, "its slot moves to a spare without waiting for Ray to call it dead"

