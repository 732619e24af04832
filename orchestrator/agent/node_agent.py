"""The node agent: one Ray actor per node, hosting every rank process of that node.

It starts its node's ranks for an attempt in one call (promoting the node's
warm spare, forking from the node's zygote, or starting fresh processes),
relays their reports, interrupts, kills, stops and reaps them, keeps the
node's zygote and warm spare, and reads the node's GPUs. The controller's cost
therefore grows with nodes, not ranks: one poll, one start, one kill per node.

The agent is deliberately light (it never imports torch). The controller polls
it; the agent never calls back, so a slow controller cannot stall training.
"""

from __future__ import annotations

import dataclasses
import queue
import signal
import socket
import sys
import threading
import time
import os
from pathlib import Path
from typing import Any

from orchestrator.agent.hosted import HostedProcess, Zygote, ZygoteUnavailable
from orchestrator.monitor.gpu import GpuCollector, GpuReading
from orchestrator.monitor.simulated_nvml import SimulatedNVML, simulated_gpu
from orchestrator.run_dir import append_fd
from orchestrator.worker.env import local_cpu_count
from orchestrator.worker.messages import Interrupt, PollAnswer, Prepare, Rejoin, Start, StartedRank, Warm

SPARE = "spare"
GPU_READ_INTERVAL_S = 5.0  # dcgm-exporter's default is 30 s
_PREPARE_TIMEOUT_S = 300.0  # the zygote's imports (torch, DeepSpeed, a script's packages)
# An interrupted survivor gets this long to leave its training function; then it is killed (and the
# attempt it was to rejoin sees it fail, and replaces it).
UNWIND_TIMEOUT_S = 10.0


class NodeAgent:
    """Hosts a node's rank processes, its zygote and warm spare. Wrapped with ``ray.remote`` by the worker group."""

    def __init__(self, index: int, log_dir: str, lease_s: float = 5.0) -> None:
        self.index = index
        self._log_dir = Path(log_dir)
        # Fencing: every answer (to poll or renew) is numbered, and each call says the last number the
        # controller received. The lease runs from when that answer was made: a call that arrives
        # while our answers do not (a one-way partition, a call delivered late) extends nothing. When
        # it runs out, everything here is stopped and the agent exits. The controller, which knows when
        # it received that answer, replaces this node's ranks only after the lease has run out, so two
        # copies of a rank never train at once.
        self._lease_s = lease_s
        self._lease_from: float | None = None  # None until the first call: not armed
        self._answers = 0
        self._answered_at: dict[int, float] = {}
        threading.Thread(target=self._fence, name="fence", daemon=True).start()
        self._procs: dict[int | str, HostedProcess] = {}
        self._spares_started = 0
        self._zygote: Zygote | None = None
        self._gpu_thread: threading.Thread | None = None
        self._gpu_reading: GpuReading | None = None
        # Spares are made on one long-lived thread: making one can wait seconds for the zygote's
        # imports, which must not block polls; and the kernel's parent-death signal fires when
        # the *thread* that forked a child exits, so that thread must live as long as the agent.
        self._spare_requests: queue.Queue[tuple[dict[str, Any], dict[str, str]]] = queue.Queue()
        threading.Thread(target=self._make_spares, name="spares", daemon=True).start()
        self.unwind_timeout_s = UNWIND_TIMEOUT_S

    def node_info(self) -> dict[str, Any]:
        """Where this agent landed: host name, IP, Ray node id, the node's GPUs Ray gave it, usable CPUs."""
        import ray

        return {
            "hostname": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "cpus": local_cpu_count(),
        }

    def network(self, config: dict[str, Any], head_addr: str) -> dict[str, Any]:
        """Detect this node's network for ranks meeting at ``head_addr`` (``worker/network.py``)."""
        from orchestrator.config.schema import Config
        from orchestrator.worker.network import configure

        found = configure(Config.model_validate(config), head_addr)
        return {**found.as_event(), "summary": found.summary()}

    def gpu_metrics(self, simulated: int = 0) -> GpuReading | None:
        """The latest reading of the node's GPUs Ray gave this agent, or of ``simulated`` stand-in GPUs
        (``metrics.simulated_gpus``: one per rank, indexes 0..simulated-1); None before the first.
        Read by a thread of its own every ``GPU_READ_INTERVAL_S``: a hung NVML call must not stall
        this agent's polls."""
        if self._gpu_thread is None:
            import ray

            if not simulated:
                collector = GpuCollector([int(g) for g in ray.get_gpu_ids()])
            else:
                nvml = SimulatedNVML({i: simulated_gpu(i) for i in range(simulated)})
                collector = GpuCollector(list(range(simulated)), nvml=nvml)
            self._gpu_thread = threading.Thread(target=self._read_gpus, args=(collector,), name="gpus", daemon=True)
            self._gpu_thread.start()
        return self._gpu_reading

    def _read_gpus(self, collector: GpuCollector) -> None:
        while True:
            try:
                self._gpu_reading = collector.collect()
            except Exception as exc:  # noqa: BLE001 - a failing read is a missing reading, not a dead agent
                print(f"reading the GPUs failed: {exc!r}", file=sys.stderr, flush=True)
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
        for rank in [r for r in self._procs if r != SPARE and r not in keep]:
            self._forget(rank)
        # One that already left (its report not yet seen by the controller) is not waited for: it
        # ignores the interrupt and reads its rejoin at once.
        unwinding = {rank: proc for rank in interrupt if (proc := self._procs.get(rank)) is not None
                     and not proc.has_left() and proc.send(Interrupt())}
        if unwinding:
            since = {rank: proc.training_from for rank, proc in unwinding.items()}  # before the rejoins go out
            threading.Thread(target=self._unwind_or_kill, args=(unwinding, since), name="unwind", daemon=True).start()
        for spec in rejoins:
            self.send(spec.rank, spec)  # one already gone fails the attempt through its exit status
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

    def _unwind_or_kill(self, unwinding: dict[int, HostedProcess], since: dict[int, float]) -> None:
        """Kill those of ``unwinding`` that have not left their training function (the one they were
        told to start at ``since``) in time."""
        deadline = time.monotonic() + self.unwind_timeout_s
        while unwinding and time.monotonic() < deadline:
            time.sleep(0.05)
            unwinding = {r: p for r, p in unwinding.items() if not p.has_left(since[r])}
        for rank, proc in unwinding.items():
            if proc.poll_exit() is None:
                with open(append_fd(proc.log_path), "a") as log:
                    log.write(f"orchestrator: rank {rank} did not leave its training function within "
                              f"{self.unwind_timeout_s:g}s of being interrupted for a recovery; killing it\n")
                proc.signal(signal.SIGKILL)

    def _start_fresh(self, spec: Start) -> int:
        self._forget(spec.rank)
        proc = HostedProcess(spec.env, self._rank_log(spec.rank), f"rank {spec.rank} attempt {spec.attempt}: fresh process")
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
            proc = HostedProcess(spec.env, self._rank_log(spec.rank), header, zygote=zygote)
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

    def start_spare(self, config: dict[str, Any], env: dict[str, str]) -> None:
        """Make sure this node has a warm spare (made in the background, forked from the zygote)."""
        self._spare_requests.put((config, env))

    def renew(self, ack: int) -> int:
        """Keep the lease: ``ack`` is the number of the last answer the controller received. Returns this answer's."""
        return self._answer(ack)

    def _answer(self, ack: int) -> int:
        now = time.monotonic()
        if self._lease_from is None:
            self._lease_from = now
        elif ack in self._answered_at:
            self._lease_from = max(self._lease_from, self._answered_at[ack])
        self._answered_at = {n: t for n, t in self._answered_at.items() if n > ack}
        self._answers += 1
        self._answered_at[self._answers] = now
        return self._answers

    def _fence(self) -> None:
        while True:
            time.sleep(min(0.5, self._lease_s / 4))
            since = self._lease_from
            if since is None or time.monotonic() - since <= self._lease_s:
                continue
            running = [k for k, p in list(self._procs.items()) if k != SPARE and p.poll_exit() is None]
            print(f"the controller has received no answer of ours for {time.monotonic() - since:.1f}s (lease "
                  f"{self._lease_s:g}s): stopping ranks {running} and this node's spare, and exiting",
                  file=sys.stderr, flush=True)
            for proc in list(self._procs.values()):
                proc.signal(signal.SIGKILL)
            if self._zygote is not None:
                self._zygote.proc.signal(signal.SIGKILL)
            os._exit(1)  # nothing may be left on a node the controller has given up on

    def _make_spares(self) -> None:
        while True:
            config, env = self._spare_requests.get()
            spare = self._procs.get(SPARE)
            if spare is not None and spare.poll_exit() is None:
                continue
            try:
                zygote = self._fit_zygote(config, env)
                self._spares_started += 1
                log = self._log_dir / f"spare-{self.index}-{self._spares_started}.log"
                spare = HostedProcess(env, log, "warm spare", zygote=zygote)
            except (OSError, queue.Empty, ZygoteUnavailable) as exc:
                print(f"could not make a warm spare: {exc!r}", file=sys.stderr, flush=True)
                continue
            if zygote is not None:
                zygote.adopt(spare)
            spare.send(Prepare(config=config))
            self._procs[SPARE] = spare

    def _fit_zygote(self, config: dict[str, Any], env: dict[str, str]) -> Zygote | None:
        """This node's zygote, started on first use and ready to fork; None where it cannot fork
        (said once), and spares then start as fresh processes: slower to warm, as warm once ready."""
        if self._zygote is not None and self._zygote.error:
            return None
        if self._zygote is None or not self._zygote.alive():
            self._zygote = Zygote(config, env, self._log_dir / f"zygote-{self.index}.log")
        if self._zygote.wait_ready(_PREPARE_TIMEOUT_S):
            return self._zygote
        print(f"warm spares on this node start as fresh processes: the zygote cannot fork: {self._zygote.error}",
              file=sys.stderr, flush=True)
        return None

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

    def poll(self, ack: int) -> PollAnswer:
        """Status of every hosted rank process, the pid of the spare once it is warm, and this answer's
        number (``ack``: as for :meth:`renew`)."""
        answer = self._answer(ack)
        # The spare thread adds the spare concurrently: work on a snapshot, remove only what we saw.
        procs = dict(self._procs)
        ranks = {rank: p.status() for rank, p in procs.items() if rank != SPARE}
        spare = procs.get(SPARE)
        if spare is not None and spare.poll_exit() is not None:
            spare.stop(0)
            if self._procs.get(SPARE) is spare:
                del self._procs[SPARE]
            spare = None
        if spare is not None and not spare.warm:
            spare.warm = any(isinstance(m, Warm) for m in spare.status().reports)
        return PollAnswer(ranks=ranks, warm_spare=spare.pid if spare is not None and spare.warm else None,
                          answer=answer, now=time.time())

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop and reap every hosted process (ranks, the spare, the zygote): all are asked to stop at
        once, so the node's stop takes one ``timeout_s`` at most, not one per rank."""
        procs = [self._procs.pop(key) for key in list(self._procs)]
        for proc in procs:
            proc.signal(signal.SIGTERM)
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
