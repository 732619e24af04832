"""The control plane at scale: the real Controller and RayWorkerGroup driven by simulated node agents.

For each ``--ranks`` N (nodes of 8 ranks, plus spare nodes), the real controller (state machine,
root cause, policy, commits, events, metrics) runs over the real worker group (placement slots,
the real inbox on real sockets, leases, concurrent calls, lost nodes) whose Ray is a stand-in.
The simulated agents push their status over real TCP connections to the inbox, as the real
agents do (``agent/uplink.py``): on news (a rank exits or raises, rank 0 steps, a checkpoint is
saved), when asked, and once a heartbeat; they push or answer Ray calls after 5-50 ms, a
``--stragglers`` fraction of them after 0.5-3 s, and a lost node never. The simulated ranks train
synchronously (a step every ``--step-s``), beat once a second, save a checkpoint every
``--checkpoint-every`` steps (one staged file, committed for real), and fail on cue.

What one call to a real Ray actor costs its caller is measured once, from a real embedded Ray on
this machine (caller CPU per call, submission to result), and charged for every simulated call
(the actions: start, kill, spare requests); the pushes cost the controller what
they cost (the inbox's thread is the controller's CPU). The simulated agents run in a process of
their own (``SimProcess``), as real agents do, so that their work takes neither the controller's
CPU nor its interpreter lock; that one process serves every agent's pushes in the order they fall
due, so a burst (every node's errors after a failure) reaches the controller later than 2,048
real agents would send it.

Reported per N:
- ``controller_cpu_fraction``: of one core, steady state: the controller process's CPU (its inbox
  included), less the stand-in's own, plus the modelled Ray transport (calls x measured cost)
- ``memory_mb``: the process's resident memory grown by the job (controller and simulation)
- ``ray_calls_per_s``, ``events_mb_per_hour`` (steady), ``metrics_series_controller`` and
  ``metrics_bytes_controller`` (one scrape)
- ``failure_to_decision_s`` (p50, p95) from a failure to ``recovery_started``: a rank that exits
  (its peers' collective errors 0.05-0.3 s later), a rank that raises while its peers error for
  2 s, a hung rank (counted from when ``hang_timeout_s`` ran out), and ``events_kb_per_incident``
- a silent node loss (its agent stops answering; Ray still lists the node): ``node_loss_episodes``
  (recoveries it caused), ``node_loss_root_causes`` and ``node_loss_to_decision_s``
- the same figures at the smallest N as ratios.

    .venv/bin/python bench/scale.py [--ranks 8 64 512 4096 16384] [--json FILE] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import itertools
import json
import math
import os
import random
import selectors
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest

from orchestrator.checkpoint import store
from orchestrator.config import load_config
from orchestrator.controller.agent_slots import AgentSlot
from orchestrator.controller.controller import Controller
from orchestrator.controller.inbox import Inbox
from orchestrator.controller.worker_group import RayWorkerGroup
from orchestrator.events import EventLog
from orchestrator.messages import (
    CheckpointSaved,
    Error,
    NodeBeat,
    NodeSaved,
    NodeStatus,
    RankStatus,
    StartedRank,
    Step,
    Unpacker,
    encode_status,
    fold_consequences,
    pack,
)
from orchestrator.monitor.metrics import JobMetrics
from orchestrator.run_dir import RunDir

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "cluster_configs" / "local.yaml"
PER_NODE = 8
# fault_tolerance.node_timeout_s as shipped: it sets the heartbeat (a quarter of it), and so the
# steady-state cost. A lost node's peers wait in collectives: they must not look hung before the
# node is found lost.
NODE_TIMEOUT_S = 10.0
HANG_TIMEOUT_S = 14.0
_SCENARIO_TIMEOUT_S = 120.0
# The simulated agents' process reads the controller's requests at least this often (seconds).
_SLICE_S = 0.01
_SHA_OF_X = "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
# What a peer's collective error (or an interrupted survivor) carries: a real gloo error's traceback
# is this long. The agents shed all but what a root cause can need (messages.fold_consequences).
_PEER_TRACEBACK = "Traceback (most recent call last):\n" + "".join(
    f'  File "/usr/lib/python3/site-packages/torch/distributed/distributed_c10d.py", line {2400 + i}, in all_reduce\n'
    "    work = group.allreduce([tensor], opts)\n" for i in range(12)) + (
    "torch.distributed.DistBackendError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
    "[10.0.0.2]:36712: Connection reset by peer\n")


# --- the stand-in for Ray ---------------------------------------------------------------------


class _Accounting:
    """Calls made and CPU spent inside the stand-in (all threads), to take out of the controller's."""

    def __init__(self) -> None:
        self.calls = 0
        self.sim_cpu_s = 0.0
        self._lock = threading.Lock()

    def charge(self, cpu_s: float, calls: int = 0) -> None:
        with self._lock:
            self.sim_cpu_s += cpu_s
            self.calls += calls


@contextlib.contextmanager
def _timed(accounting: _Accounting) -> Iterator[None]:
    """Counts the CPU of a block (on the calling thread's clock) as the stand-in's."""
    start = time.thread_time()
    try:
        yield
    finally:
        accounting.charge(time.thread_time() - start)


class RayError(Exception):
    pass


class RayActorError(RayError):
    pass


class ActorDiedError(RayActorError):
    pass


class RayTaskError(RayError):
    pass


class GetTimeoutError(RayError):
    pass


@dataclass(eq=False)
class Call:
    """A simulated object ref: ready at ``ready_at`` (never, for a lost node), its value made then."""

    ready_at: float
    produce: Any
    value: Any = None
    made: bool = False

    def result(self) -> Any:
        if not self.made:
            self.value, self.made = self.produce(), True
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class SimRay:
    """The part of the ``ray`` module RayWorkerGroup uses, over simulated agents."""

    exceptions = SimpleNamespace(RayError=RayError, RayActorError=RayActorError, ActorDiedError=ActorDiedError,
                                 RayTaskError=RayTaskError, GetTimeoutError=GetTimeoutError)

    def __init__(self, accounting: _Accounting, dead_nodes: set[str], node_ids: list[str]) -> None:
        self._accounting = accounting
        self._dead_nodes = dead_nodes
        self._node_ids = node_ids

    def wait(self, refs: list[Call], num_returns: int, timeout: float) -> tuple[list[Call], list[Call]]:
        deadline = time.monotonic() + timeout
        while True:
            with _timed(self._accounting):
                now = time.monotonic()
                ready = [r for r in refs if r.ready_at <= now]
                if len(ready) >= num_returns or now >= deadline:
                    ready_ids = {id(r) for r in ready}
                    return ready, [r for r in refs if id(r) not in ready_ids]
                pending = sorted(r.ready_at for r in refs if r.ready_at > now)
                wake = min(deadline, pending[num_returns - len(ready) - 1])
            time.sleep(max(0.0, wake - time.monotonic()))

    def get(self, ref: Call | list[Call], timeout: float) -> Any:
        if isinstance(ref, list):
            return [self.get(r, timeout) for r in ref]
        wait_s = ref.ready_at - time.monotonic()
        if wait_s > 0:
            if wait_s > timeout:
                time.sleep(timeout)
                raise GetTimeoutError(f"Get timed out: some object(s) not ready after {timeout}s")
            time.sleep(wait_s)
        with _timed(self._accounting):
            return ref.result()

    def nodes(self) -> list[dict[str, Any]]:
        return [{"NodeID": n, "Alive": n not in self._dead_nodes} for n in self._node_ids]

    def kill(self, agent: SimAgent, no_restart: bool = True) -> None:
        agent.killed = True
        agent.job.agent_silent(agent.index, time.monotonic())


class _Method:
    """``agent.method.remote(...)``. A method that acts (starts, kills) acts when the call arrives; one
    that answers (a poll) answers with the state of the moment its answer is read."""

    def __init__(self, agent: SimAgent, fn: Any, acts: bool) -> None:
        self._agent, self._fn, self._acts = agent, fn, acts

    def remote(self, *args: Any) -> Call:
        return self._agent.call(self._fn, args, self._acts)


class SimAgent:
    """A node's agent: answers as the real NodeAgent does, after its latency (never once lost)."""

    def __init__(self, index: int, node: dict[str, Any], job: SimJob, accounting: _Accounting, straggler: bool,
                 rng: random.Random) -> None:
        self.index, self.node, self.job = index, node, job
        self._accounting, self._rng, self.straggler = accounting, rng, straggler
        self.silent_from = math.inf
        self.killed = False
        self._answers = 0
        self.asked = 0
        for name in ("start_attempt", "kill", "prepare", "start_spare", "network", "free_port",
                     "node_info", "stop"):
            setattr(self, name, _Method(self, getattr(self, f"_{name}"), acts=name in ("start_attempt", "kill")))

    def latency(self) -> float:
        return self._rng.uniform(0.5, 3.0) if self.straggler else self._rng.uniform(0.005, 0.05)

    def silent(self, now: float) -> bool:
        return now >= self.silent_from or self.killed

    def call(self, fn: Any, args: tuple[Any, ...], acts: bool) -> Call:
        start = time.thread_time()
        now = time.monotonic()
        latency = self.latency()
        lost = self.silent(now + latency)
        ready_at = math.inf if lost else now + latency
        if acts and not lost:
            value = fn(*args)
            call = Call(ready_at=ready_at, produce=lambda: value)
        else:
            call = Call(ready_at=ready_at, produce=lambda: fn(*args))
        self._accounting.charge(time.thread_time() - start, calls=1)
        return call

    def status(self) -> NodeStatus:
        """What the real agent pushes: its ranks with news (consequences' errors folded), every rank's
        beat, its ranks' saves (folded)."""
        self._answers += 1
        ranks, columns, saves = self.job.node_status(self.index) if self.index in self.job.slot_of else ({}, None, [])
        ranks, left = fold_consequences(ranks)
        return NodeStatus(ranks=ranks, left=left, warm_spare=None, number=self._answers, now=time.time(),
                          asked=self.asked, beat=columns, saved=NodeSaved.fold(saves))

    def _start_attempt(self, starts: list[Any], rejoins: list[Any], interrupt: list[int]) -> list[StartedRank]:
        first = starts[0] if starts else rejoins[0]
        now = time.time()
        with self.job.lock:
            self.job.begin(first.attempt, first.resume_tag, first.rank, self.index, now)
            self.job.interrupt(list(interrupt), now)
            self.job.set_pids({s.rank: 10_000_000 * (s.attempt + 1) + s.rank for s in starts})
        return [StartedRank(rank=s.rank, pid=self.job.ranks[s.rank].pid, forked=True) for s in starts]

    def _kill(self, ranks: list[int]) -> None:
        self.job.kill(list(ranks), time.time())

    def _prepare(self, config: dict[str, Any], env: dict[str, str]) -> None:
        return None

    def _start_spare(self, config: dict[str, Any], env: dict[str, str]) -> None:
        return None

    def _network(self, config: dict[str, Any], head: str) -> dict[str, Any]:
        return {"interface": "eth0", "address": self.node["ip"], "ib_ports": [], "env": {},
                "summary": f"interface eth0 ({self.node['ip']}), InfiniBand none"}

    def _free_port(self, host: str) -> int:
        return 29500

    def _node_info(self) -> dict[str, Any]:
        return self.node

    def _stop(self, timeout_s: float) -> None:
        return None


# --- the simulated job ------------------------------------------------------------------------


@dataclass
class RankState:
    pid: int  # a replaced rank's new process has a new pid; a survivor keeps its own
    reported: int = 0  # last step reported
    exited_at: float | None = None
    error_at: float | None = None
    error: Error | None = None
    told_error: bool = False


class SimUplinks:
    """Every simulated agent's uplink: one real TCP connection each to the real inbox, served by the
    agents' process (``SimProcess``), which applies the controller process's changes of the job
    (``commands``) as they come. An agent pushes ``latency()`` after news, after a request, and
    every heartbeat (staggered); a silent or killed one never."""

    def __init__(self, agents: list[SimAgent], job: SimJob, address: tuple[str, int], token: str,
                 heartbeat_s: float, commands: Any) -> None:
        self.agents, self._job, self._heartbeat_s, self._commands = agents, job, heartbeat_s, commands
        self._due: list[tuple[float, int]] = []  # (monotonic, agent)
        self._answers_due: list[tuple[float, int]] = []  # the same, for answers to the controller's requests
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._socks = []
        for agent in agents:
            sock = socket.create_connection(address)
            sock.sendall(pack({"token": token, "index": agent.index, "incarnation": 1}))
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ, agent)
            self._socks.append(sock)
        now = time.monotonic()
        self._beats = [(now + heartbeat_s * i / len(agents), i) for i in range(len(agents))]
        heapq.heapify(self._beats)
        self._answers = [Unpacker(1 << 16) for _ in agents]  # the controller's messages to each
        self._pushed: dict[int, float] = {}  # agent -> when its last push was made (monotonic)

    def news(self, agent: int, at: float, answer: bool = False) -> None:
        """Agent ``agent`` has news at wall-clock time ``at`` (``answer``: a request): it pushes a latency later."""
        self._due_at(time.monotonic() + max(0.0, at - time.time()) + self.agents[agent].latency(), agent, answer)

    def run(self) -> None:
        """Push, answer and apply the job's changes until told to stop.

        Real agents encode their pushes in parallel; this one process encodes them one after another,
        so it works in slices of ``_SLICE_S``: between two, it reads the controller's requests and the
        job's changes. An answer to a request goes before the other pushes due: a burst of every node's
        errors after a failure, which 2,048 machines would make at once, must not hold back one node's
        answer behind the others' pushes."""
        while True:
            if not self._apply_commands():
                return
            for key, _ in self._selector.select(timeout=0):  # the controller's requests, before the pushes
                self._read(key.data)
            now = time.monotonic()
            while self._beats and self._beats[0][0] <= now:
                when, index = heapq.heappop(self._beats)
                heapq.heappush(self._beats, (now + self._heartbeat_s, index))
                self._due_at(when, index)
            self._job.step_news()
            if not self._push_due(now, until=time.monotonic() + _SLICE_S):
                time.sleep(0.005)

    def _push_due(self, now: float, until: float) -> bool:
        """Make the pushes due by ``now``, in due order, until ``until``; True if some are left."""
        while time.monotonic() < until:
            with self._lock:
                due = next((queue for queue in (self._answers_due, self._due) if queue and queue[0][0] <= now), None)
                if due is None:
                    return False
                when, index = heapq.heappop(due)
            agent = self.agents[index]
            if when < self._pushed.get(index, -math.inf) or agent.silent(now):
                continue  # a push made since it fell due carried it
            self._pushed[index] = time.monotonic()
            with contextlib.suppress(BlockingIOError):
                self._socks[index].sendall(pack(encode_status(agent.status())))
        return True

    def _due_at(self, when: float, agent: int, answer: bool = False) -> None:
        with self._lock:
            heapq.heappush(self._answers_due if answer else self._due, (when, agent))

    def _apply_commands(self) -> bool:
        """Make the controller process's changes of the job; False once told to stop."""
        while self._commands.poll():
            name, args = self._commands.recv()
            if name == "stop":
                for sock in self._socks:
                    sock.close()
                self._selector.close()
                return False
            getattr(self._job, name)(*args)
        return True

    def _read(self, agent: SimAgent) -> None:
        try:
            data = self._socks[agent.index].recv(1 << 16)
        except (BlockingIOError, OSError):
            return
        messages = self._answers[agent.index]
        messages.feed(data)
        for message in messages:
            if "ask" in message:
                agent.asked = max(agent.asked, message["ask"])
                self.news(agent.index, time.time(), answer=True)


class SimProcess:
    """The simulated agents in a process of their own, as real agents are: their pushes (encoding
    thousands of statuses in a burst after a failure) neither take the controller's interpreter
    lock nor count as its CPU, and a slow one never delays another's answer behind the controller's
    work. The controller's process keeps a copy of the job (``SimJob``) whose every change is sent
    here and made the same (``_mirrored``)."""

    def __init__(self, job: SimJob, infos: list[dict[str, Any]], stragglers: set[int], address: tuple[str, int],
                 token: str, heartbeat_s: float) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # not a fork of a process with threads
        ours, theirs = context.Pipe()
        spec = {"world": job.world, "step_s": job.step_s, "startup_s": job.startup_s,
                "checkpoint_every": job.checkpoint_every, "checkpoints": job.checkpoints}
        self._process = context.Process(target=_agents_main, name="sim-agents", daemon=True,
                                        args=(spec, infos, sorted(stragglers), address, token, heartbeat_s, theirs))
        self._process.start()
        theirs.close()
        job.mirror = self._commands = ours

    def stop(self) -> None:
        self._commands.send(("stop", ()))
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(timeout=10)
        self._commands.close()


def _agents_main(spec: dict[str, Any], infos: list[dict[str, Any]], stragglers: list[int], address: tuple[str, int],
                 token: str, heartbeat_s: float, commands: Any) -> None:
    job = SimJob(**spec)
    agents = [SimAgent(i, infos[i], job, _Accounting(), i in stragglers, random.Random(i)) for i in range(len(infos))]
    job.uplinks = SimUplinks(agents, job, address, token, heartbeat_s, commands)
    job.uplinks.run()


def _locked(method: Any) -> Any:
    def locked(self: SimJob, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)
    return locked


def _mirrored(method: Any) -> Any:
    """A change of the job, made the same in the agents' process (``SimProcess``), which pushes what
    follows from it: its arguments carry every time and random draw, so both copies agree."""
    def mirrored(self: SimJob, *args: Any) -> Any:
        with self.lock:
            if self.mirror is not None:
                self.mirror.send((method.__name__, args))
            return method(self, *args)
    return mirrored


@dataclass
class SimJob:
    """Synchronous training on every rank: a step every ``step_s`` after ``startup_s``; failures on cue."""

    world: int
    step_s: float
    startup_s: float
    checkpoint_every: int
    checkpoints: Path
    attempt: int = -1
    started: float = 0.0
    first_step: int = 0
    frozen_at: float = math.inf
    hung: int | None = None
    ranks: list[RankState] = field(default_factory=list)
    slot_of: dict[int, int] = field(default_factory=dict)  # agent -> node slot
    agent_of_slot: dict[int, int] = field(default_factory=dict)
    uplinks: SimUplinks | None = None  # in the agents' process
    mirror: Any = None  # in the controller's process: where its changes go (a Connection to the agents' process)
    lock: threading.RLock = field(default_factory=threading.RLock)
    told_step: int = 0  # the last step the news of which went out (rank 0's step, checkpoint saves)

    @_mirrored
    def begin(self, attempt: int, resume_tag: str | None, rank: int, node: int, now: float) -> None:
        """The first start_attempt call of a new attempt resets the job."""
        if attempt != self.attempt:
            # Before the node takes its slot: the uplinks read the ranks of the nodes with one.
            first_step = store.step_of(resume_tag) if resume_tag else 0
            pids = [state.pid for state in self.ranks] or [0] * self.world
            self.ranks = [RankState(pid=pid, reported=first_step) for pid in pids]
            self.first_step, self.told_step = first_step, first_step
            self.started = now + self.startup_s
            self.frozen_at, self.hung = math.inf, None
            self.attempt = attempt
        self.slot_of[node] = rank // PER_NODE
        self.agent_of_slot[rank // PER_NODE] = node

    @_mirrored
    def set_pids(self, pids: dict[int, int]) -> None:
        for rank, pid in pids.items():
            self.ranks[rank].pid = pid

    def news(self, rank: int, at: float) -> None:
        if self.uplinks is not None:
            self.uplinks.news(self.agent_of_slot[rank // PER_NODE], at)

    @_locked
    def step_news(self) -> None:
        """Rank 0's new step is news for its node; the first step of an attempt (every rank started
        training) and a checkpoint step, for every node."""
        step = self.step_now(time.time())
        if self.attempt < 0 or step <= self.told_step:
            return
        at = time.time()
        if self.told_step == self.first_step or any(
                self.checkpoint_every and s % self.checkpoint_every == 0 for s in range(self.told_step + 1, step + 1)):
            for rank in range(0, self.world, PER_NODE):
                self.news(rank, at)
        else:
            self.news(0, at)
        self.told_step = step

    def last_step_at(self, now: float) -> float:
        """When the last step finished by ``now`` did (or training started, before the first)."""
        return self.started + (self.step_now(now) - self.first_step) * self.step_s

    def step_now(self, now: float) -> int:
        done = math.floor((min(now, self.frozen_at) - self.started) / self.step_s)
        return self.first_step + max(0, done)

    @_locked
    def node_status(self, agent: int) -> tuple[dict[int, RankStatus], NodeBeat, list[tuple[int, CheckpointSaved]]]:
        """What the real agent sends for its ranks: a status for each with news (every step of rank 0;
        errors, exits of every rank), every rank's beat, and their checkpoint saves (which it folds)."""
        now = time.time()
        slot = self.slot_of[agent]
        current = self.step_now(now)
        statuses, saves = {}, []
        columns: dict[str, list[Any]] = {name: [] for name in NodeBeat.__dataclass_fields__}
        for rank in range(slot * PER_NODE, (slot + 1) * PER_NODE):
            state = self.ranks[rank]
            reports: list[Any] = []
            if state.exited_at is not None and state.exited_at <= now:
                statuses[rank] = RankStatus(pid=state.pid, reports=[], returncode=-9, alive_at=state.exited_at,
                                            where="", in_collective=False, moved_at=state.exited_at,
                                            exited_at=state.exited_at)
                continue
            for step in range(state.reported + 1, current + 1):
                at = self.started + (step - self.first_step) * self.step_s
                if rank == 0:
                    reports.append(Step(step=step, loss=2.0 + 1.0 / step, step_time_s=self.step_s, tokens=8192,
                                        at=at, attempt=self.attempt))
                if self.checkpoint_every and step % self.checkpoint_every == 0:
                    saves.append((rank, self._saved(rank, step, at)))
            state.reported = max(state.reported, current)
            if state.error is not None and not state.told_error and state.error_at <= now:
                reports.append(state.error)
                state.told_error = True
            waiting = now >= self.frozen_at and rank != self.hung
            where = ".../torch/distributed/distributed_c10d.py:2501 in all_reduce" if waiting else "train.py:42 in step"
            moved_at = now if not waiting else self.frozen_at
            if reports:
                statuses[rank] = RankStatus(pid=state.pid, reports=reports, returncode=None, alive_at=now,
                                            where=where, in_collective=waiting, moved_at=moved_at)
            stepped = state.reported > self.first_step
            for name, value in (("ranks", rank), ("pid", state.pid), ("alive_at", now), ("moved_at", moved_at),
                                    ("where", where), ("in_collective", waiting),
                                    ("step", state.reported if stepped else None),
                                    ("step_at", self.started + (state.reported - self.first_step) * self.step_s),
                                ("step_time_s", self.step_s), ("step_attempt", self.attempt if stepped else -1)):
                columns[name].append(value)
        return statuses, NodeBeat(**columns), saves

    def _saved(self, rank: int, step: int, at: float) -> CheckpointSaved:
        """Rank ``rank``'s report: a file of its own, named as ZeRO names a rank's shard (so that the
        controller reads and lists 16,384 entries as it would); one staged file stands for them all."""
        staged = store.staging_dir(self.checkpoints, self.attempt) / store.tag_for(step)
        if not staged.exists():
            staged.mkdir(parents=True, exist_ok=True)
            (staged / "shard.pt").write_bytes(b"x")
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        return CheckpointSaved(step=step, tag=store.tag_for(step), attempt=self.attempt, blocked_s=0.01, write_s=0.1,
                               files={name: {"size": 1, "sha256": _SHA_OF_X}}, at=at)

    @_mirrored
    def fail(self, rank: int, at: float, error: Error | None, peers_at: list[float] | None) -> None:
        """Training stops at ``at``: ``rank`` exits (``error`` None) or raises; its peers report
        collective errors at ``peers_at`` (one time per rank, the failed one's unused), or wait (None)."""
        self.frozen_at = at
        if error is None:
            self.ranks[rank].exited_at = at
        else:
            self.ranks[rank].error, self.ranks[rank].error_at, self.ranks[rank].told_error = error, at, False
        self.news(rank, at)
        if peers_at is None:
            return
        for peer, state in enumerate(self.ranks):
            if peer != rank:
                when = peers_at[peer]
                state.error_at, state.told_error = when, False
                self.news(peer, when)
                state.error = Error(exc_type="DistBackendError", message="Connection reset by peer",
                                    traceback=_PEER_TRACEBACK, interrupted=False, step=self.step_now(at), at=when,
                                    collective=True, attempt=self.attempt)

    @_mirrored
    def hang(self, rank: int | None, at: float) -> None:
        """Training stops at ``at``: ``rank`` (if any) is stuck in its own code, the rest wait for it."""
        self.frozen_at, self.hung = at, rank

    @_mirrored
    def interrupt(self, ranks: list[int], now: float) -> None:
        """Interrupted survivors of the last attempt say, early in this one, how they left that one."""
        for rank in ranks:
            self.ranks[rank].error = Error(exc_type="Interrupted", message="stopped by the controller",
                                           traceback=_PEER_TRACEBACK, interrupted=True, step=self.first_step, at=now,
                                           attempt=self.attempt - 1)
            self.ranks[rank].error_at, self.ranks[rank].told_error = now, False
            self.news(rank, now)

    @_mirrored
    def agent_silent(self, agent: int, from_monotonic: float) -> None:
        """Agent ``agent`` answers nothing from then on (its node is lost, or its actor killed)."""
        if self.uplinks is not None:
            self.uplinks.agents[agent].silent_from = from_monotonic

    @_mirrored
    def kill(self, ranks: list[int], now: float) -> None:
        for rank in ranks:
            if self.ranks[rank].exited_at is None:
                self.ranks[rank].exited_at = now
                self.news(rank, now)


# --- one N ------------------------------------------------------------------------------------


class _NullDisplay:
    def step(self, *args: Any) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Scale:
    """One N's figures."""

    ranks: int
    controller_cpu_fraction: float
    memory_mb: float
    ray_calls_per_s: float
    events_mb_per_hour: float
    events_kb_per_incident: float
    metrics_series_controller: int
    metrics_bytes_controller: int
    failure_to_decision_s: dict[str, dict[str, float]]
    node_loss_episodes: int
    node_loss_root_causes: int
    node_loss_to_decision_s: float
    ratios: dict[str, float] = field(default_factory=dict)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(ranks: int, args: argparse.Namespace, call_cost_s: float, workdir: Path) -> Scale:
    nodes = ranks // PER_NODE
    spares = args.repeats
    rng = random.Random(ranks)
    config = load_config(CONFIG, [
        "cluster.ray_address=auto", f"cluster.nodes={nodes}", f"cluster.workers_per_node={PER_NODE}",
        f"cluster.spare_nodes={spares}", f"fault_tolerance.hang_timeout_s={HANG_TIMEOUT_S}",
        f"fault_tolerance.node_timeout_s={NODE_TIMEOUT_S}", "fault_tolerance.node_wait_s=0",
        f"fault_tolerance.max_restarts={10 * args.repeats}", "train.steps=1000000", "train.micro_batch_size=1",
        f"checkpoint.interval_steps={args.checkpoint_every}", "checkpoint.keep_last=2",
    ])
    gc.collect()
    rss_before = _rss_mb()
    run = RunDir.open(workdir / f"run-{ranks}")
    accounting = _Accounting()
    job = SimJob(world=ranks, step_s=args.step_s, startup_s=0.5, checkpoint_every=args.checkpoint_every,
                 checkpoints=run.checkpoints)
    node_ids = [f"node-{i:05d}" for i in range(nodes + spares)]
    infos = [{"hostname": f"n{i}", "ip": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "node_id": node_ids[i],
              "gpu_ids": [], "cpus": PER_NODE} for i in range(nodes + spares)]
    stragglers = set(rng.sample(range(nodes + spares), round(args.stragglers * (nodes + spares))))
    agents = [SimAgent(i, infos[i], job, accounting, i in stragglers, random.Random(i)) for i in range(nodes + spares)]
    group = RayWorkerGroup(config, run.path)
    group._placement.ray = SimRay(accounting, set(), node_ids)
    group._placement.slots = [AgentSlot(handle=agent, node=info) for agent, info in zip(agents, infos)]
    group._inbox = Inbox("127.0.0.1", group._token)
    for index in range(nodes + spares):
        group._inbox.expect(index, 1)
    sim = SimProcess(job, infos, stragglers, group._inbox.address, group._token, group.heartbeat_s)
    events = EventLog(run.events)
    metrics = JobMetrics(per_rank_limit=config.metrics.per_rank_limit)
    ctl = Controller(config, run, group, events, _NullDisplay(), metrics=metrics)
    seen: list[dict[str, Any]] = []
    events.subscribe(lambda e: seen.append(e.record()) if e.event in (
        "recovery_started", "recovery_finished", "failure_detected", "step") else None)

    def run_until(done: Any, timeout: float = _SCENARIO_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline or ctl.state.terminal:
                why = getattr(ctl.state, "reason", "")
                raise RuntimeError(f"{ranks} ranks: the controller did not get there within {timeout:.0f}s "
                                   f"(state {ctl.state.name} {why})")
            ctl.step()

    def stepping(after: int = 0) -> Any:
        return lambda: any(e["event"] == "step" for e in seen[after:])

    ctl.prepare()
    run_until(stepping())
    run_until(lambda: job.step_now(time.time()) >= job.first_step + 3)

    # Steady state.
    cpu0, sim0, calls0, wall0 = time.process_time(), accounting.sim_cpu_s, accounting.calls, time.monotonic()
    size0 = run.events.stat().st_size
    steady_s = args.steady_s if args.steady_s is not None else args.checkpoint_every * args.step_s
    steady_until = time.monotonic() + steady_s
    run_until(lambda: time.monotonic() >= steady_until, timeout=steady_s + 60)
    wall = time.monotonic() - wall0
    calls = accounting.calls - calls0
    cpu = (time.process_time() - cpu0) - (accounting.sim_cpu_s - sim0) + calls * call_cost_s
    events_mb_per_hour = (run.events.stat().st_size - size0) / 2**20 / wall * 3600
    exposition = generate_latest(metrics.registry)
    series = sum(1 for line in exposition.splitlines() if line and not line.startswith(b"#"))
    memory_mb = _rss_mb() - rss_before

    def incident(inject: Any, hang: bool = False) -> tuple[float, float]:
        """Inject a failure; returns (failure to decision, KB of events the incident wrote). A hang's
        failure is when ``hang_timeout_s`` ran out: that long after the hung rank's last step."""
        mark, size = len(seen), run.events.stat().st_size
        at = time.time()
        inject(at)
        failed_at = job.last_step_at(at) + HANG_TIMEOUT_S if hang else at
        run_until(lambda: any(e["event"] == "recovery_started" for e in seen[mark:]))
        decided = next(e for e in seen[mark:] if e["event"] == "recovery_started")["ts"]
        run_until(lambda: any(e["event"] == "recovery_finished" for e in seen[mark:]))
        run_until(lambda: job.step_now(time.time()) >= job.first_step + 2)
        return decided - failed_at, (run.events.stat().st_size - size) / 1024

    bugs = itertools.count(1)

    def user_bug(at: float) -> Error:
        # Each a bug of its own: the same exception at the same step twice is not retried (the policy).
        message = f"bug number {next(bugs)}"
        return Error(exc_type="RuntimeError", message=message, traceback=f"Traceback\nRuntimeError: {message}\n",
                     interrupted=False, step=job.step_now(at), at=at, attempt=job.attempt)

    def peers_at(at: float, low: float, high: float) -> list[float]:
        """When each peer's collective error comes, ``low`` to ``high`` seconds after ``at``."""
        return [at + rng.uniform(low, high) for _ in range(ranks)]

    scenarios = {
        "exit": lambda at: job.fail(rng.randrange(ranks), at, None, peers_at(at, 0.05, 0.3)),
        "raise": lambda at: job.fail(rng.randrange(ranks), at, user_bug(at), peers_at(at, 0.0, 2.0)),
        "hang": lambda at: job.hang(rng.randrange(ranks), at),
    }
    decisions: dict[str, dict[str, float]] = {}
    incident_kb = []
    for name, inject in scenarios.items():
        took = []
        for _ in range(args.repeats):
            seconds, kb = incident(inject, hang=name == "hang")
            took.append(seconds)
            incident_kb.append(kb)
        decisions[name] = {"p50": statistics.median(took), "p95": _p95(took)}

    mark = len(seen)
    lost_slot = rng.randrange(nodes)
    lost_agent = group._placement.slot_bundle[lost_slot]
    def lose_node(at: float) -> None:
        agents[lost_agent].silent_from = time.monotonic()
        job.agent_silent(lost_agent, agents[lost_agent].silent_from)
        job.hang(None, at)

    node_loss_s, _ = incident(lose_node)
    late = time.monotonic() + 1.0  # a second more for late consequences of the loss
    run_until(lambda: time.monotonic() >= late)
    episode = seen[mark:]
    sim.stop()
    group._inbox.close()
    events.close()
    return Scale(
        ranks=ranks,
        controller_cpu_fraction=cpu / wall,
        memory_mb=memory_mb,
        ray_calls_per_s=calls / wall,
        events_mb_per_hour=events_mb_per_hour,
        events_kb_per_incident=max(incident_kb),
        metrics_series_controller=series,
        metrics_bytes_controller=len(exposition),
        failure_to_decision_s=decisions,
        node_loss_episodes=sum(1 for e in episode if e["event"] == "recovery_started"),
        node_loss_root_causes=sum(1 for e in episode if e["event"] == "failure_detected" and e["root_cause"]),
        node_loss_to_decision_s=node_loss_s,
    )


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


# --- the cost of one Ray call -----------------------------------------------------------------


def ray_call_cost(calls: int = 3000, batch: int = 300) -> float:
    """Caller CPU seconds per actor call on a real embedded Ray (submit, wait, get), many in flight."""
    from orchestrator.controller import ray_session

    config = load_config(CONFIG)
    ray_session.connect(config)
    try:
        import ray

        @ray.remote(num_cpus=0)
        class Echo:
            def answer(self, value: int) -> int:
                return value

        echo = Echo.remote()
        ray.get([echo.answer.remote(i) for i in range(batch)], timeout=120)  # warm
        cpu0 = time.process_time()
        for start in range(0, calls, batch):
            refs = [echo.answer.remote(i) for i in range(start, start + batch)]
            ray.wait(refs, num_returns=len(refs), timeout=120)
            ray.get(refs, timeout=120)
        return (time.process_time() - cpu0) / calls
    finally:
        ray_session.disconnect()


# --- main -------------------------------------------------------------------------------------


RATIO_KEYS = ("controller_cpu_fraction", "memory_mb", "ray_calls_per_s", "events_mb_per_hour",
              "events_kb_per_incident", "metrics_series_controller", "metrics_bytes_controller")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 512, 4096, 16384])
    parser.add_argument("--stragglers", type=float, default=0.01, help="fraction of agents answering in 0.5-3 s")
    parser.add_argument("--steady-s", type=float, default=None,
                        help="steady-state window per N (seconds; default: one checkpoint interval, so that every "
                        "window holds one burst of saves from every node, and the figure does not depend on "
                        "whether it fell in)")
    parser.add_argument("--repeats", type=int, default=3, help="failures of each kind per N (and spare nodes)")
    parser.add_argument("--step-s", type=float, default=1.0, help="simulated step time")
    parser.add_argument("--checkpoint-every", type=int, default=20, help="simulated checkpoint interval (steps)")
    parser.add_argument("--ray-call-cost", type=float, default=None,
                        help="caller CPU seconds per Ray call (default: measured on a real embedded Ray)")
    parser.add_argument("--json", type=Path, default=None, help="write one object per N to this file")
    args = parser.parse_args()
    if any(n % PER_NODE for n in args.ranks):
        parser.error(f"--ranks: each N must be a multiple of {PER_NODE} (nodes of {PER_NODE} ranks)")

    cost = args.ray_call_cost if args.ray_call_cost is not None else ray_call_cost()
    print(f"one Ray actor call costs its caller {cost * 1e6:.0f} us of CPU (measured on this machine)"
          if args.ray_call_cost is None else f"Ray call cost given: {cost * 1e6:.0f} us", flush=True)
    results: list[Scale] = []
    with tempfile.TemporaryDirectory(prefix="orch-scale-") as tmp:
        for n in args.ranks:
            started = time.monotonic()
            result = measure(n, args, cost, Path(tmp))
            base = results[0] if results else result
            # A figure that is 0 at the first N (no Ray calls in steady state) has no ratio.
            result.ratios = {k: getattr(result, k) / getattr(base, k) for k in RATIO_KEYS if getattr(base, k)}
            results.append(result)
            _print(result, time.monotonic() - started)
    if args.json is not None:
        args.json.write_text(json.dumps([vars(r) for r in results], indent=2) + "\n")
    return 0


def _print(r: Scale, took_s: float) -> None:
    d = r.failure_to_decision_s
    print(f"{r.ranks:>6} ranks: controller {r.controller_cpu_fraction:6.1%} of a core, {r.memory_mb:7.1f} MB, "
          f"{r.ray_calls_per_s:8.0f} calls/s, events {r.events_mb_per_hour:7.2f} MB/h "
          f"{r.events_kb_per_incident:8.1f} KB/incident, metrics {r.metrics_series_controller} series "
          f"{r.metrics_bytes_controller / 1024:.0f} KB; decision p50/p95 exit {d['exit']['p50']:.2f}/"
          f"{d['exit']['p95']:.2f}s raise {d['raise']['p50']:.2f}/{d['raise']['p95']:.2f}s hang "
          f"{d['hang']['p50']:.2f}/{d['hang']['p95']:.2f}s; node loss {r.node_loss_episodes} episode(s), "
          f"{r.node_loss_root_causes} root cause(s), decided {r.node_loss_to_decision_s:.2f}s "
          f"(cpu x{r.ratios['controller_cpu_fraction']:.1f} vs the first N) "
          f"[{took_s:.0f}s]", flush=True)


if __name__ == "__main__":
    sys.exit(main())
