"""The node agent: one Ray actor per node, hosting every rank process of that node.

It starts its node's ranks for an attempt in one call (promoting the node's
warm spare, forking from the node's zygote, or starting fresh processes),
relays their reports, interrupts, kills, stops and reaps them, keeps the
node's zygote and warm spare, and reads and serves the node's GPU metrics (one
Prometheus target per node). The controller's cost therefore grows with nodes,
not ranks: one status, one start, one kill per node, and no GPU reading at all.

The agent is deliberately light (it never imports torch). It pushes its node's
status to the controller (``uplink.py``) when something happened that the
controller must decide on, when asked, and otherwise once a heartbeat; the
controller acts on it through Ray calls. A slow controller cannot stall training.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator.agent.hosted import HostedProcess, Zygote, ZygoteUnavailable
from orchestrator.agent.uplink import Uplink
from orchestrator.errors import ConfigError
from orchestrator.messages import (
    Cadence,
    CheckpointSaved,
    Interrupt,
    NodeBeat,
    NodeSaved,
    NodeStatus,
    Prepare,
    RankStatus,
    Ready,
    Rejoin,
    Report,
    Saving,
    Start,
    StartedRank,
    Step,
    Warm,
    fold_consequences,
)
from orchestrator.monitor.exporter import host_port
from orchestrator.monitor.gpu import GpuCollector, GpuReading
from orchestrator.monitor.gpu_endpoint import GpuFamilies, listen_address, serve
from orchestrator.monitor.simulated_nvml import SimulatedNVML, simulated_gpu
from orchestrator.run_dir import append_fd
from orchestrator.worker.env import local_cpu_count

SPARE = "spare"
GPU_READ_INTERVAL_S = 5.0  # dcgm-exporter's default is 30 s
# node_info waits this long at most for the first reading of the GPUs (their models give the MFU).
_FIRST_READING_S = 10.0
_SLOW_PUSH_S = 1.0  # a push that takes longer is said in the agent's log: the lease may be at risk
# What the spare thread is asked: (config, node env, a spare too (else the zygote alone), a zygote started ahead).
_SpareRequest = tuple[dict[str, Any], dict[str, str], bool, tuple[str, int] | None]
_PREPARE_TIMEOUT_S = 300.0  # the zygote's imports (torch, DeepSpeed, a script's packages)
# An attempt's start waits this long at most for a zygote still doing its imports (then its ranks
# start as fresh processes): under the controller's timeout for the call (agent_calls.CALL_TIMEOUT_S).
_ZYGOTE_WAIT_S = 20.0
# An interrupted survivor gets this long to leave its training function; then it is killed (and the
# attempt it was to rejoin sees it fail, and replaces it).
UNWIND_TIMEOUT_S = 10.0
# While a process has closed its channel but its exit status is not known yet, the status is looked
# at again this often (an exit is news the controller decides on).
_EXIT_CHECK_S = 0.05


@dataclasses.dataclass(frozen=True, kw_only=True)
class UplinkSettings:
    """Where and how an agent pushes its status (``uplink.py``): the controller's address, the run's
    token, this agent's incarnation (a replaced agent's pushes are dropped) and the heartbeat."""

    host: str
    port: int
    token: str
    incarnation: int
    heartbeat_s: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuServing:
    """How an agent serves its node's GPUs (``monitor/gpu_endpoint.py``): ``metrics.host`` (the endpoint
    listens where ``listen_address`` says), ``metrics.gpu_port`` (0: a free one), and ``simulated``
    stand-in GPUs, indexes 0..simulated-1 (``metrics.simulated_gpus``: one per rank), else Ray's."""

    host: str
    port: int
    simulated: int


class NodeAgent:
    """Hosts a node's rank processes, its zygote and warm spare. Wrapped with ``ray.remote`` by the worker group."""

    def __init__(self, index: int, log_dir: str, lease_s: float = 5.0, uplink: UplinkSettings | None = None,
                 gpus: GpuServing | None = None) -> None:
        """``uplink``: where to push this node's status (none: the status is only read by calling :meth:`status`);
        ``gpus``: how to serve the node's GPU metrics (none: not at all)."""
        self.index = index
        self._log_dir = Path(log_dir)
        # Fencing: every status pushed is numbered, and the controller acknowledges each number it
        # received. The lease runs from when the acknowledged status was made: an acknowledgement
        # that arrives while our pushes do not (a one-way partition) extends nothing. When it runs
        # out, everything here is stopped and the agent exits. The controller, which knows when it
        # received that status, replaces this node's ranks only after the lease has run out, so two
        # copies of a rank never train at once.
        self._lease_s = lease_s
        self._lease_from: float | None = None  # None until the first acknowledgement: not armed
        self._pushes = 0
        self._pushed_at: dict[int, float] = {}
        self._lease_lock = threading.Lock()
        threading.Thread(target=self._fence, name="fence", daemon=True).start()
        self._news = threading.Event()  # something the controller must hear of before the next heartbeat
        # Checkpoint (tag, attempt) -> the processes that reported saving their part: news once all did.
        self._saves: dict[tuple[str, int], set[int]] = {}
        self._asked = 0  # the controller's latest request for a status
        self._procs: dict[int | str, HostedProcess] = {}
        self._spares_started = 0
        self._zygote: Zygote | None = None
        self._zygote_settled: threading.Event | None = None  # set once a prepared zygote can fork, or cannot
        self._gpu_thread: threading.Thread | None = None
        self._gpu_reading: GpuReading | None = None
        self._gpu_read = threading.Event()  # the first reading is in
        self._gpu_ids: list[str] = []  # the node's GPUs by local rank (their gpu label)
        self._gpu_ranks: dict[str, str] = {}  # GPU (its gpu label) -> the rank that uses it now
        self._gpu_endpoint = ""  # where Prometheus scrapes the node's GPUs ("": nowhere)
        # Spares are made on one long-lived thread: making one can wait seconds for the zygote's
        # imports, which must not block polls; and the kernel's parent-death signal fires when
        # the *thread* that forked a child exits, so that thread must live as long as the agent.
        self._spare_requests: queue.Queue[_SpareRequest] = queue.Queue()
        threading.Thread(target=self._make_spares, name="spares", daemon=True).start()
        self.unwind_timeout_s = UNWIND_TIMEOUT_S
        if uplink is not None:
            hello = {"token": uplink.token, "index": index, "incarnation": uplink.incarnation}
            line = Uplink((uplink.host, uplink.port), hello, on_ack=self._acknowledged, on_ask=self._on_ask)
            threading.Thread(target=self._push, args=(line, uplink.heartbeat_s), name="push", daemon=True).start()
        if gpus is not None:
            self._serve_gpus(gpus)

    def node_info(self) -> dict[str, Any]:
        """Where this agent landed: host name, IP, Ray node id, the node's GPUs Ray gave it, usable CPUs;
        where its GPU metrics are served and the models of the GPUs read there."""
        import ray

        if self._gpu_thread is not None:
            self._gpu_read.wait(_FIRST_READING_S)
        reading = self._gpu_reading
        return {
            "hostname": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cpus": local_cpu_count(),
            "gpu_endpoint": self._gpu_endpoint,
            "gpu_models": [g.labels["modelName"] for g in reading.gpus] if reading is not None else [],
        }

    def network(self, config: dict[str, Any], head_addr: str) -> dict[str, Any]:
        """Detect this node's network for ranks meeting at ``head_addr`` (``worker/network.py``)."""
        from orchestrator.config.schema import Config
        from orchestrator.worker.network import configure

        found = configure(Config.model_validate(config), head_addr)
        return {**found.as_event(), "summary": found.summary()}

    def _serve_gpus(self, gpus: GpuServing) -> None:
        """Read the node's GPUs on a thread of their own every ``GPU_READ_INTERVAL_S`` (a hung NVML call
        must not stall this agent) and serve the latest reading; a taken ``metrics.gpu_port`` gives
        way to a free port (Prometheus finds it in the targets file either way)."""
        import ray

        ip = ray.util.get_node_ip_address()
        if gpus.simulated:
            self._gpu_ids = [str(i) for i in range(gpus.simulated)]
            nvml = SimulatedNVML({i: simulated_gpu(i) for i in range(gpus.simulated)})
        else:
            self._gpu_ids, nvml = [str(g) for g in ray.get_gpu_ids()], None
        collector = GpuCollector([int(g) for g in self._gpu_ids], nvml=nvml)
        self._gpu_thread = threading.Thread(target=self._read_gpus, args=(collector,), name="gpus", daemon=True)
        self._gpu_thread.start()
        families = GpuFamilies(lambda: self._gpu_reading, lambda: self._gpu_ranks, node=ip)
        host, advertised = listen_address(gpus.host, ip)
        for port in dict.fromkeys((gpus.port, 0)):
            try:
                server = serve(families, host, port)
            except ConfigError as exc:
                print(f"cannot serve the GPU metrics: {exc}", file=sys.stderr, flush=True)
                continue
            self._gpu_endpoint = host_port(advertised, server.port)
            return

    def _read_gpus(self, collector: GpuCollector) -> None:
        while True:
            try:
                self._gpu_reading = collector.collect()
            except Exception as exc:  # noqa: BLE001 - a failing read is a missing reading, not a dead agent
                print(f"reading the GPUs failed: {exc!r}", file=sys.stderr, flush=True)
            self._gpu_read.set()
            time.sleep(GPU_READ_INTERVAL_S)

    def free_port(self, host: str) -> int:
        """A port free on this node right now, for the rank-0 rendezvous of a new attempt."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]

    def start_attempt(self, starts: list[Start], rejoins: list[Rejoin], interrupt: list[int] = ()) -> list[StartedRank]:
        """Run this node's part of a new attempt: ranks in ``rejoins`` continue in their live processes,
        each of ``starts`` gets a process (the warm spare, else one forked from the zygote, else a fresh
        one); hosted ranks in neither (renumbered away by a shrink) are stopped. Returns the new ones.

        Ranks in ``interrupt`` (rejoining ones still in their training function) are interrupted
        first; each reads its rejoin once it has left, and one that has not left within
        ``unwind_timeout_s`` is killed here: the new attempt sees it fail. The controller never waits."""
        keep = {spec.rank for spec in starts} | {spec.rank for spec in rejoins}
        self._saves.clear()  # the last attempt's checkpoints that some rank never saved: never committed
        self._gpu_ranks = {self._gpu_ids[spec.local_rank]: str(spec.rank) for spec in [*starts, *rejoins]
                           if spec.local_rank < len(self._gpu_ids)}
        for rank in [r for r in self._procs if r != SPARE and r not in keep]:
            self._forget(rank)
        # One that already left (its report not yet seen by the controller) is not waited for: it
        # ignores the interrupt and reads its rejoin at once.
        unwinding = {rank: proc for rank in interrupt if (proc := self._procs.get(rank)) is not None
                     and not proc.has_left(proc.training_in) and proc.send(Interrupt())}
        if unwinding:
            leaving = {rank: proc.training_in for rank, proc in unwinding.items()}  # before the rejoins go out
            threading.Thread(target=self._unwind_or_kill, args=(unwinding, leaving), name="unwind", daemon=True).start()
        for spec in rejoins:
            self.send(spec.rank, spec)  # one already gone fails the attempt through its exit status
        settled = self._zygote_settled
        if starts and settled is not None and not settled.wait(_ZYGOTE_WAIT_S):
            print(f"the zygote's imports took over {_ZYGOTE_WAIT_S:g}s: starting ranks as fresh processes",
                  file=sys.stderr, flush=True)
        started = []
        for spec in starts:
            pid = self._promote_spare(spec)
            if pid is not None:
                started.append(StartedRank(rank=spec.rank, pid=pid, spare=True))
                continue
            pid = self._fork(spec)
            if pid is not None:
                started.append(StartedRank(rank=spec.rank, pid=pid, forked=True))
                continue
            started.append(StartedRank(rank=spec.rank, pid=self._start_fresh(spec)))
        return started

    def _unwind_or_kill(self, unwinding: dict[int, HostedProcess], leaving: dict[int, int | None]) -> None:
        """Kill those of ``unwinding`` that have not left their training function (of the attempt
        ``leaving`` names) in time."""
        deadline = time.monotonic() + self.unwind_timeout_s
        while unwinding and time.monotonic() < deadline:
            time.sleep(0.05)
            unwinding = {r: p for r, p in unwinding.items() if not p.has_left(leaving[r])}
        for rank, proc in unwinding.items():
            if proc.poll_exit() is None:
                with open(append_fd(proc.log_path), "a") as log:
                    log.write(f"orchestrator: rank {rank} did not leave its training function within "
                              f"{self.unwind_timeout_s:g}s of being interrupted for a recovery; killing it\n")
                proc.signal(signal.SIGKILL)

    def _start_fresh(self, spec: Start) -> int:
        self._forget(spec.rank)
        proc = HostedProcess(spec.env, self._rank_log(spec.rank), f"rank {spec.rank} attempt {spec.attempt}: fresh process",
                             on_report=self._heard_from)
        self._procs[spec.rank] = proc
        proc.send(spec)
        return proc.pid

    def _fork(self, spec: Start) -> int | None:
        """``spec.rank`` forked from this node's zygote (warm: its imports are done); None when there
        is no ready zygote."""
        zygote = self._zygote
        if zygote is None or not zygote.ready():
            return None
        self._forget(spec.rank)
        header = f"rank {spec.rank} attempt {spec.attempt}: forked from the zygote"
        try:
            proc = HostedProcess(spec.env, self._rank_log(spec.rank), header, zygote=zygote, on_report=self._heard_from)
        except (OSError, queue.Empty, ZygoteUnavailable) as exc:
            print(f"could not fork rank {spec.rank}: {exc!r}; starting it fresh", file=sys.stderr, flush=True)
            return None
        zygote.adopt(proc)
        self._procs[spec.rank] = proc
        proc.send(spec)
        return proc.pid

    def _promote_spare(self, spec: Start) -> int | None:
        """Make the warm spare rank ``spec.rank``; its pid, or None when there is no live spare."""
        spare = self._procs.pop(SPARE, None)
        if spare is None or spare.poll_exit() is not None:
            return None
        rank = spec.rank
        self._forget(rank)
        log = self._rank_log(rank)
        with open(append_fd(log), "ab") as fh:
            fh.write(f"=== rank {rank} attempt {spec.attempt}: warm spare pid {spare.pid} ===\n".encode())
            spare.log_path, spare.log_offset = log, fh.tell()
        if not spare.send(dataclasses.replace(spec, log_path=str(log))):
            return None
        self._procs[rank] = spare
        return spare.pid

    def prepare(self, config: dict[str, Any], env: dict[str, str], ahead: tuple[str, int] | None = None) -> None:
        """Start this node's zygote now, in the background: the next attempt's ranks are forked from
        it, so that the node pays the imports once, not once per rank on the same cores (a start
        waits for it, at most ``_ZYGOTE_WAIT_S``). ``ahead``: the socket name and pid of the zygote
        the controller started for this node before Ray (adopted instead, if it answers there)."""
        if self._zygote_settled is None:
            self._zygote_settled = threading.Event()
            self._spare_requests.put((config, env, False, ahead))

    def start_spare(self, config: dict[str, Any], env: dict[str, str]) -> None:
        """Make sure this node has a warm spare (made in the background, forked from the zygote)."""
        self._spare_requests.put((config, env, True, None))

    def _acknowledged(self, number: int) -> None:
        """The controller received our status ``number``: the lease runs from when it was made."""
        with self._lease_lock:
            made = self._pushed_at.get(number)
            if made is not None:
                self._lease_from = max(self._lease_from or made, made)
            self._pushed_at = {n: t for n, t in self._pushed_at.items() if n > number}

    def _on_ask(self, request: int) -> None:
        self._asked = max(self._asked, request)
        self._news.set()

    def _push(self, uplink: Uplink, heartbeat_s: float) -> None:
        """Push the node's status: at once on news, a short while after a process closed its channel
        (until its exit status is known), and otherwise ``heartbeat_s`` after the last."""
        beat_at = time.monotonic() - heartbeat_s  # the first status goes out at once
        exiting = False
        while True:
            wait_s = _EXIT_CHECK_S if exiting else max(0.0, beat_at + heartbeat_s - time.monotonic())
            self._news.wait(wait_s)
            self._news.clear()
            beat_at = time.monotonic()
            status = self.status()
            made_s = time.monotonic() - beat_at
            uplink.push(status)
            if (late := time.monotonic() - beat_at) > _SLOW_PUSH_S:  # a lease is a few of these
                print(f"a status took {late:.1f}s to make ({made_s:.1f}s) and send (the lease is {self._lease_s:g}s; "
                      f"load average {os.getloadavg()[0]:.0f})", file=sys.stderr, flush=True)
            exiting = any(p.exit_unreported for r, p in list(self._procs.items()) if r != SPARE)

    def _fence(self) -> None:
        """Stop everything here the moment the lease runs out: on time, not at the next look (the
        controller replaces this node's ranks a fixed margin after that moment)."""
        while True:
            since = self._lease_from
            left_s = self._lease_s if since is None else since + self._lease_s - time.monotonic()
            if left_s >= 0:
                time.sleep(min(left_s, 0.5) + 0.001)  # renewals meanwhile are seen at the next look
                continue
            running = [k for k, p in list(self._procs.items()) if k != SPARE and p.poll_exit() is None]
            for proc in list(self._procs.values()):
                proc.signal(signal.SIGKILL)
            if self._zygote is not None:
                self._zygote.proc.signal(signal.SIGKILL)
            print(f"the controller has received no answer of ours for {time.monotonic() - since:.1f}s (lease "
                  f"{self._lease_s:g}s): stopped ranks {running} and this node's spare; exiting",
                  file=sys.stderr, flush=True)
            os._exit(1)  # nothing may be left on a node the controller has given up on

    def _make_spares(self) -> None:
        while True:
            config, env, spare_wanted, ahead = self._spare_requests.get()
            if not spare_wanted:  # the zygote alone (prepare)
                self._fit_zygote(config, env, ahead)
                self._zygote_settled.set()
                continue
            spare = self._procs.get(SPARE)
            if spare is not None and spare.poll_exit() is None:
                continue
            try:
                zygote = self._fit_zygote(config, env)
                self._spares_started += 1
                log = self._log_dir / f"spare-{self.index}-{self._spares_started}.log"
                spare = HostedProcess(env, log, "warm spare", zygote=zygote, on_report=self._heard_from)
            except (OSError, queue.Empty, ZygoteUnavailable) as exc:
                print(f"could not make a warm spare: {exc!r}", file=sys.stderr, flush=True)
                continue
            if zygote is not None:
                zygote.adopt(spare)
            spare.send(Prepare(config=config))
            self._procs[SPARE] = spare

    def _fit_zygote(self, config: dict[str, Any], env: dict[str, str],
                    ahead: tuple[str, int] | None = None) -> Zygote | None:
        """This node's zygote, started on first use (or adopted from the controller, ``ahead``) and
        ready to fork; None where it cannot fork (said once), and spares then start as fresh
        processes: slower to warm, as warm once ready."""
        if self._zygote is not None and self._zygote.error:
            return None
        if self._zygote is None or not self._zygote.alive():
            self._zygote = Zygote(config, env, self._log_dir / f"zygote-{self.index}.log", ahead)
        if self._zygote.wait_ready(_PREPARE_TIMEOUT_S):
            return self._zygote
        print(f"warm spares on this node start as fresh processes: the zygote cannot fork: {self._zygote.error}",
              file=sys.stderr, flush=True)
        return None

    def tell_ranks(self, message: Cadence) -> None:
        """Send ``message`` to every rank this node hosts (not to its spare: a start carries it)."""
        for rank, proc in list(self._procs.items()):
            if rank != SPARE:
                proc.send(message)

    def send(self, rank: int, message: Start | Interrupt) -> bool:
        """Send a control message to ``rank``'s process; False if it is gone."""
        proc = self._procs.get(rank)
        return proc is not None and proc.send(message)

    def kill(self, ranks: list[int]) -> None:
        """SIGKILL these ranks' processes (hung or failed ranks about to be replaced)."""
        for rank in ranks:
            proc = self._procs.get(rank)
            if proc is not None:
                proc.signal(signal.SIGKILL)

    def status(self) -> NodeStatus:
        """The node's status, numbered for the lease: the hosted ranks' new reports and exits (steps
        but rank 0's folded into the beat, saves and consequences' errors folded per node), every
        rank's beat, and the pid of the spare once it is warm."""
        asked = self._asked
        with self._lease_lock:
            self._pushes += 1
            number = self._pushes
            self._pushed_at[number] = time.monotonic()
        # The spare thread adds the spare concurrently: work on a snapshot, remove only what we saw.
        procs = dict(self._procs)
        hosted = sorted((rank, proc) for rank, proc in procs.items() if rank != SPARE)
        ranks, saves = {}, []
        for rank, proc in hosted:
            if proc.inbox or proc.exit_unreported:
                status = _fold_steps(rank, proc, proc.status())
                # Its saves go in the node's NodeSaved; its Ready is ours (the Error before it told the controller).
                others = [r for r in status.reports if not isinstance(r, (CheckpointSaved, Ready))]
                if len(others) < len(status.reports):
                    saves += [(rank, r) for r in status.reports if isinstance(r, CheckpointSaved)]
                    status = dataclasses.replace(status, reports=others)
                if status.reports or status.returncode is not None:
                    ranks[rank] = status
        spare = procs.get(SPARE)
        if spare is not None and spare.poll_exit() is not None:
            spare.stop(0)
            if self._procs.get(SPARE) is spare:
                del self._procs[SPARE]
            spare = None
        if spare is not None and not spare.warm:
            spare.warm = any(isinstance(m, Warm) for m in spare.status().reports)
        warm = spare.pid if spare is not None and spare.warm else None
        ranks, left = fold_consequences(ranks)
        return NodeStatus(ranks=ranks, warm_spare=warm, number=number, now=time.time(), asked=asked,
                          beat=_beat(hosted), saved=NodeSaved.fold(saves), left=left)

    def _heard_from(self, proc: HostedProcess, report: Report | None) -> None:
        """A hosted process sent ``report`` (None: it closed its channel). Anything but a step, a
        "still saving", a "ready" or a checkpoint saved is pushed at once, and so is a rank's first step in an
        attempt (it started training: from now on a step late is a hang), every step of rank 0 (the
        job's progress) and the save of a checkpoint's part by the last of the node's ranks (the
        node's saves go in one push; the others' go with the next heartbeat when one never saves)."""
        if isinstance(report, Step):
            first, proc.stepping_in = proc.stepping_in != report.attempt, report.attempt
            if first or self._procs.get(0) is proc:
                self._news.set()
        elif isinstance(report, CheckpointSaved):
            saved = self._saves.setdefault((report.tag, report.attempt), set())
            saved.add(proc.pid)
            if len(saved) >= sum(1 for rank in list(self._procs) if rank != SPARE):
                self._saves.pop((report.tag, report.attempt), None)
                self._news.set()
        elif not isinstance(report, (Saving, Ready)):
            self._news.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop and reap every hosted process (ranks, the spare, the zygote): all are asked to stop at
        once, so the node's stop takes one ``timeout_s`` at most, not one per rank."""
        procs = [self._procs.pop(key) for key in list(self._procs)]
        self._gpu_ranks = {}
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            proc.stop(max(0.1, deadline - time.monotonic()))
        if self._zygote is not None:
            self._zygote.stop()
            self._zygote = None

    def _forget(self, rank: int) -> None:
        old = self._procs.pop(rank, None)
        if old is not None:
            old.stop(0.5)

    def _rank_log(self, rank: int) -> Path:
        return self._log_dir / f"rank{rank}.log"


def _fold_steps(rank: int, proc: HostedProcess, status: RankStatus) -> RankStatus:
    """Remember the process's latest step for the beat; of a rank other than 0 the controller needs
    no more than that (its progress, its step time), so its steps leave the reports. Rank 0's all
    become events."""
    steps = [r for r in status.reports if isinstance(r, Step)]
    if not steps:
        return status
    proc.latest_step = steps[-1]
    if rank == 0:
        return status
    return dataclasses.replace(status, reports=[r for r in status.reports if not isinstance(r, Step)])


def _beat(hosted: list[tuple[int, HostedProcess]]) -> NodeBeat:
    steps = [proc.latest_step for _, proc in hosted]
    return NodeBeat(
        ranks=[rank for rank, _ in hosted],
        pid=[proc.pid for _, proc in hosted],
        alive_at=[proc.alive_at for _, proc in hosted],
        moved_at=[proc.moved_at for _, proc in hosted],
        where=[proc.where for _, proc in hosted],
        in_collective=[proc.in_collective for _, proc in hosted],
        step=[None if s is None else s.step for s in steps],
        step_at=[0.0 if s is None else s.at for s in steps],
        step_time_s=[0.0 if s is None else s.step_time_s for s in steps],
        step_attempt=[-1 if s is None else s.attempt for s in steps],
    )
