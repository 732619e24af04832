"""The per-rank Ray actor: hosts training processes on its node.

Normally an actor hosts its own rank's process. One actor per node also
hosts the node's warm spare: a training process that has already imported
torch and DeepSpeed and waits. When a rank on that node fails, the spare is
promoted to it, so after a recovery an actor may host two ranks.

The actor is deliberately light (it never imports torch): it starts
processes with the environment the controller built, relays their reports,
signals, stops and reaps them. The controller polls it; the actor never
calls back, so a slow controller cannot stall training.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.monitor.gpu import GpuCollector, GpuReading
from orchestrator.monitor.simulated_nvml import SimulatedNVML, simulated_gpu
from orchestrator.run_dir import append_fd
from orchestrator.worker.channel import CONTROL_FD_ENV, Channel
from orchestrator.worker.env import local_cpu_count, with_interpreter_tools
from orchestrator.worker.messages import (
    Alive,
    Exited,
    Fork,
    Forked,
    MalformedMessage,
    Message,
    PollAnswer,
    Prepare,
    Prepared,
    RankStatus,
    Report,
    Start,
    Warm,
)
from orchestrator.worker.process import PARENT_PID_ENV

SPARE = "spare"
GPU_READ_INTERVAL_S = 5.0  # dcgm-exporter's default is 30 s
_LOG_TAIL_BYTES = 8192
# How long after a process exits we wait for its last reports to be read.
_DRAIN_TIMEOUT_S = 2.0
_PREPARE_TIMEOUT_S = 300.0  # the zygote's imports (torch, DeepSpeed, a script's packages)
# A prepared zygote forks in milliseconds. A rank forked inside an actor call waits at most this:
# well inside the lease, since the call keeps the actor from answering renewals meanwhile.
_FORK_TIMEOUT_S = 2.0


class HostedProcess:
    """One process this actor owns (a training process, or the node's zygote), its control
    channel and what it reported.

    Started with ``subprocess`` (``module`` run with ``env``), or forked by ``zygote``;
    a forked process's exit status comes from the zygote (:meth:`exited`).
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        header: str,
        *,
        module: str = "orchestrator.worker.process",
        zygote: Zygote | None = None,
        on_message: Callable[[Message], None] | None = None,
    ) -> None:
        parent_end, child_end = socket.socketpair()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None
        self._zygote = zygote
        self.reported_returncode: int | None = None
        self.warm = False  # a spare that finished its warm-up
        with open(append_fd(log_path), "ab") as log:
            log.write(f"=== {header} ===\n".encode())
            log.flush()
            self.log_offset = log.tell()
            if zygote is not None:
                self.pid = zygote.fork(env, log_path, child_end.fileno())
            else:
                full_env = with_interpreter_tools(
                    {**os.environ, **env, CONTROL_FD_ENV: str(child_end.fileno()), PARENT_PID_ENV: str(os.getpid())}
                )
                self.popen = subprocess.Popen(
                    [sys.executable, "-m", module],
                    env=full_env,
                    pass_fds=(child_end.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Its own session: a Ctrl-C in the user's terminal reaches the controller,
                    # which stops ranks in order, instead of interrupting them mid-collective.
                    start_new_session=True,
                )
                self.pid = self.popen.pid
        child_end.close()
        self._on_message = on_message
        self.channel = Channel(parent_end)
        self.inbox: collections.deque[Report] = collections.deque()
        self.alive_at = time.time()
        self.where = ""
        self.in_collective = False
        self.moved_at = self.alive_at
        self.eof_at: float | None = None
        self.exited_at: float | None = None
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def exited(self, returncode: int) -> None:
        """The zygote reaped this (forked) process."""
        self.reported_returncode = returncode

    def poll_exit(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        if self.reported_returncode is None and self.eof_at is not None and not self._zygote.alive():
            # Its zygote (which would report the exit) is gone, and it died with it (PDEATHSIG).
            self.reported_returncode = -signal.SIGKILL
        return self.reported_returncode

    def send(self, message: Message) -> bool:
        try:
            self.channel.send(message)
            return True
        except OSError:
            return False  # it died; its exit will be polled

    def status(self) -> RankStatus:
        """New reports, liveness, and the exit status once the process has ended."""
        reports = [self.inbox.popleft() for _ in range(len(self.inbox))]
        code = self._returncode()
        return RankStatus(
            pid=self.pid, reports=reports, returncode=code, alive_at=self.alive_at, where=self.where,
            in_collective=self.in_collective, moved_at=self.moved_at,
            # The socket closes the moment the process dies: the best clock for "when".
            exited_at=(self.eof_at or time.time()) if code is not None else None,
            log_tail=self._log_tail() if code else "",
        )

    def signal(self, sig: int) -> None:
        if self.poll_exit() is None:
            _signal_group(self.pid, sig)

    def stop(self, timeout_s: float) -> int | None:
        """SIGTERM the process (and anything it started), SIGKILL after ``timeout_s``; reap it."""
        if self.poll_exit() is None:
            _signal_group(self.pid, signal.SIGTERM)
            if not self._wait(timeout_s):
                _signal_group(self.pid, signal.SIGKILL)
                self._wait(timeout_s)
        # Children the process left behind in its session die with it.
        _signal_group(self.pid, signal.SIGKILL)
        self.channel.close()
        return self.poll_exit()

    def _wait(self, timeout_s: float) -> bool:
        if self.popen is not None:
            try:
                self.popen.wait(timeout=timeout_s)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout_s
        while self.reported_returncode is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the zygote reaps its children every 0.2 s
        return self.reported_returncode is not None

    def _returncode(self) -> int | None:
        code = self.poll_exit()
        if code is None:
            return None
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        # Report the exit only after its last messages were read, so "finished" precedes it.
        if self.reader.is_alive() and time.monotonic() - self.exited_at < _DRAIN_TIMEOUT_S:
            return None
        return code

    def _read(self) -> None:
        try:
            for message in self.channel.messages():
                if self._on_message is not None:
                    self._on_message(message)
                    continue
                now = time.time()
                self.alive_at = now
                if isinstance(message, Alive):
                    self.where, self.in_collective = message.where, message.in_collective
                    self.moved_at = now - message.still_s
                elif isinstance(message, Report):
                    self.inbox.append(dataclasses.replace(message, at=now))
                else:
                    raise MalformedMessage(f"{message.type!r} is not a report")
        except MalformedMessage as exc:
            # A bug in the orchestrator itself: the rank fails, and its log (shown with the failure) says why.
            with open(append_fd(self.log_path), "a") as log:
                log.write(f"orchestrator: protocol error from pid {self.pid}: {exc}; stopping it\n")
            self.signal(signal.SIGKILL)
        except (OSError, ValueError):
            pass  # channel closed under us by stop()
        self.eof_at = time.time()

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                start = max(self.log_offset, fh.tell() - _LOG_TAIL_BYTES)
                fh.seek(start)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""


class ZygoteUnavailable(Exception):
    """The zygote cannot fork now: its imports are not done, they failed, or it exited."""


class Zygote:
    """The node's zygote process (``orchestrator.worker.zygote``): forks warm spares."""

    def __init__(self, config: dict[str, Any], env: dict[str, str], log_path: Path) -> None:
        self._forked: dict[int, HostedProcess] = {}
        self._replies: queue.Queue[Forked] = queue.Queue()
        self._lock = threading.Lock()
        self._forks = 0
        self._exits_lock = threading.Lock()
        self._exited_early: dict[int, int] = {}
        self._prepared = threading.Event()
        self.error = ""  # why it cannot fork, once it has said so
        # torch.cuda.is_available() (which DeepSpeed's import calls) asks NVML instead of initialising
        # CUDA, which no child forked afterwards could use. NVML starts a thread of its own, though
        # (driver 580 on an H100), so on such GPU nodes the zygote says it cannot fork.
        env = {**env, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
        self.proc = HostedProcess(env, log_path, "zygote", module="orchestrator.worker.zygote",
                                  on_message=self._on_message)
        self.proc.send(Prepare(config=config))

    def alive(self) -> bool:
        return self.proc.poll_exit() is None

    def ready(self) -> bool:
        """Prepared, fit to fork, and running."""
        return self._prepared.is_set() and not self.error and self.alive()

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for the imports; False if it cannot fork (``error`` says why)."""
        deadline = time.monotonic() + timeout_s
        while not self._prepared.wait(0.2):
            if not self.alive():
                self.error = self.error or f"it exited ({self.proc.poll_exit()}) before its imports were done"
                return False
            if time.monotonic() > deadline:
                self.error = f"its imports took over {timeout_s:g}s"
                return False
        return self.ready()

    def fork(self, env: dict[str, str], log_path: Path, control_fd: int) -> int:
        """Fork a spare with ``env`` whose control socket is ``control_fd``; returns its pid.
        Never waits for the imports (:class:`ZygoteUnavailable` instead).

        Replies carry the request's id: a late reply to an earlier fork that timed out is skipped,
        never taken for this one's."""
        if not self.ready():
            raise ZygoteUnavailable(self.error or "its imports are not done yet")
        with self._lock:
            self._forks += 1
            request = self._forks
            self.proc.channel.send_fd(Fork(id=request, env=env, log_path=str(log_path)), control_fd)
            deadline = time.monotonic() + _FORK_TIMEOUT_S
            while True:
                reply = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
                if reply.id == request:
                    return reply.pid

    def adopt(self, proc: HostedProcess) -> None:
        """Report ``proc``'s exit to it from now on (or at once, if it has already exited)."""
        with self._exits_lock:
            code = self._exited_early.pop(proc.pid, None)
            if code is None:
                self._forked[proc.pid] = proc
        if code is not None:
            proc.exited(code)

    def stop(self) -> None:
        self.proc.stop(1.0)
        # Its children die with it (PDEATHSIG); nobody is left to report their exits.
        for proc in self._forked.values():
            if proc.reported_returncode is None:
                proc.exited(-signal.SIGKILL)

    def _on_message(self, message: Message) -> None:
        if isinstance(message, Prepared):
            self.error = message.error
            self._prepared.set()
        elif isinstance(message, Forked):
            self._replies.put(message)
        elif isinstance(message, Exited):
            with self._exits_lock:
                proc = self._forked.pop(message.pid, None)
                if proc is None:  # it died before it was adopted: adopt() reports it
                    self._exited_early[message.pid] = message.returncode
            if proc is not None:
                proc.exited(message.returncode)


class RankActor:
    """Hosts rank processes (and maybe the node's spare). Wrapped with ``ray.remote`` by the worker group."""

    def __init__(self, index: int, log_dir: str, lease_s: float = 5.0) -> None:
        self.index = index
        self._log_dir = Path(log_dir)
        # Fencing: every answer (to poll or renew) is numbered, and each call says the last number the
        # controller received. The lease runs from when that answer was made: a call that arrives
        # while our answers do not (a one-way partition, a call delivered late) extends nothing. When
        # it runs out, everything here is stopped and the actor exits. The controller, which knows when
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
        # the *thread* that forked a child exits, so that thread must live as long as the actor.
        self._spare_requests: queue.Queue[tuple[dict[str, Any], dict[str, str]]] = queue.Queue()
        threading.Thread(target=self._make_spares, name="spares", daemon=True).start()

    def node_info(self) -> dict[str, Any]:
        """Where this actor landed: host name, IP, Ray node id, GPUs Ray gave it, usable CPUs."""
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

    def gpu_metrics(self, simulated: int | None = None) -> GpuReading | None:
        """The latest reading of the GPUs Ray gave this actor (the ones its rank uses), or of one
        simulated GPU with index ``simulated`` (``metrics.simulated_gpus``); None before the first.
        Read by a thread of its own every ``GPU_READ_INTERVAL_S``: a hung NVML call must not stall
        this actor's polls."""
        if self._gpu_thread is None:
            import ray

            if simulated is None:
                collector = GpuCollector([int(g) for g in ray.get_gpu_ids()])
            else:
                nvml = SimulatedNVML({simulated: simulated_gpu(simulated)})
                collector = GpuCollector([simulated], nvml=nvml)
            self._gpu_thread = threading.Thread(target=self._read_gpus, args=(collector,), name="gpus", daemon=True)
            self._gpu_thread.start()
        return self._gpu_reading

    def _read_gpus(self, collector: GpuCollector) -> None:
        while True:
            try:
                self._gpu_reading = collector.collect()
            except Exception as exc:  # noqa: BLE001 - a failing read is a missing reading, not a dead actor
                print(f"reading the GPUs failed: {exc!r}", file=sys.stderr, flush=True)
            time.sleep(GPU_READ_INTERVAL_S)

    def free_port(self, host: str) -> int:
        """A port free on this node right now, for the rank-0 rendezvous of a new attempt."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return sock.getsockname()[1]

    def start(self, spec: Start) -> int:
        """Start a fresh process for ``spec.rank``; returns its pid."""
        self._forget(spec.rank)
        proc = HostedProcess(spec.env, self._rank_log(spec.rank), f"rank {spec.rank} attempt {spec.attempt}: fresh process")
        self._procs[spec.rank] = proc
        proc.send(spec)
        return proc.pid

    def fork(self, spec: Start) -> int | None:
        """Start ``spec.rank`` forked from this node's zygote (warm: its imports are done); returns its
        pid, or None when this actor has no live zygote."""
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

    def promote_spare(self, spec: Start) -> int | None:
        """Make the spare rank ``spec.rank``; returns its pid, or None when there is no live spare."""
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

    def send(self, rank: int, message: Message) -> bool:
        """Send a control message to ``rank``'s process; False if it is gone."""
        proc = self._procs.get(rank)
        return proc is not None and proc.send(message)

    def kill(self, rank: int) -> None:
        """SIGKILL ``rank``'s process (a hung or failed rank about to be replaced)."""
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
        """Stop and reap every hosted process: ranks, the spare, the zygote."""
        for key in list(self._procs):
            proc = self._procs.pop(key, None)
            if proc is not None:
                proc.stop(timeout_s)
        if self._zygote is not None:
            self._zygote.stop()
            self._zygote = None

    def forget(self, rank: int) -> None:
        """Stop hosting ``rank`` (its process moved to another actor)."""
        self._forget(rank)

    def _forget(self, rank: int) -> None:
        old = self._procs.pop(rank, None)
        if old is not None:
            old.stop(0.5)

    def _rank_log(self, rank: int) -> Path:
        return self._log_dir / f"rank{rank}.log"


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
