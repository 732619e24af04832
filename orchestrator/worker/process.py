"""Entry point of a rank's training process: ``python -m orchestrator.worker.process``.

Started by its node agent with one end of a control socket (fd in
``ORCH_CONTROL_FD``). The process runs the training function for each
start or rejoin spec it is sent, so that a healthy rank survives a peer's
failure without exiting (a script, run as ``__main__``, cannot rejoin: its
process ends with it, ``script.py``):

    [spare: import and warm up, wait] -> start -> train(ctx) -> finished
                                            ^          | raises (own bug, peer died, interrupted)
                                            |          v
                                         rejoin <- report error, tear down, wait for the decision
                                                       | exit
                                                       v

An exception travels to the controller as data (type, message, traceback,
step), so the root cause reaches the user's terminal. A liveness thread
reports every second where the main thread is, which tells a rank stuck in
its own code from one waiting for a stuck peer in a collective, and a blocked rank from a busy
one (``liveness.py``).

The process never outlives its agent: it exits when the control socket closes, or when its parent
dies (``PR_SET_PDEATHSIG``, as SIGHUP); unless the same SIGTERM reached it first, as Slurm sends one
to every process of a job: then it saves a checkpoint with the other ranks before it exits
(``stop_signal.py``).
"""

from __future__ import annotations

import atexit
import ctypes
import faulthandler
import gc
import importlib
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from orchestrator.checkpoint.writer import BackgroundWriter
from orchestrator.config.schema import Config
from orchestrator.errors import ConfigError
from orchestrator.installation import use_prebuilt_cpu_op
from orchestrator.messages import (
    Alive,
    Cadence,
    Error,
    Finished,
    Interrupt,
    MalformedMessage,
    Message,
    Prepare,
    Ready,
    Start,
    Stop,
    Warm,
)
from orchestrator.run_dir import append_fd
from orchestrator.worker import rendezvous, reporter, script
from orchestrator.worker.abort import AttemptConnections
from orchestrator.worker.buddies import MemoryKeeper
from orchestrator.worker.channel import CONTROL_FD_ENV, Channel
from orchestrator.worker.context import StoppedAlone, Told, TrainContext
from orchestrator.worker.liveness import ThreadWatch, raised_in_collective
from orchestrator.worker.network import route_source
from orchestrator.worker.stop_signal import StopSignals
from orchestrator.worker.teardown import tear_down

PARENT_PID_ENV = "ORCH_PARENT_PID"
ORCH_ENV_PREFIX = "ORCH_"
BUILTIN_ENTRYPOINT = "orchestrator.training.workload:train"
LIVENESS_INTERVAL_S = 1.0
# The main thread's stack is sampled this often: a healthy loop sampled once a second can land on
# the same line every time (its sleep, say); sampled 20 times as often, it shows lines changing.
_STACK_SAMPLE_S = 0.05
_DECISION_TIMEOUT_S = 600.0
_PR_SET_PDEATHSIG = 1
# Saved a checkpoint alone and exited (stop_signal.py): not "finished", so never taken for the run's end.
EXIT_SAVED_ALONE = 3


class Interrupted(Exception):
    """Raised in the main thread when the controller stops this rank's training for a recovery."""


def main() -> int:
    die_with_parent(signal.SIGHUP)
    faulthandler.enable()
    # `kill -USR1 PID` prints every thread's stack to the rank's log: the first thing to look at in a hang.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    channel = Channel.from_fd(int(os.environ[CONTROL_FD_ENV]))
    # The orchestrator's own variables are read; the training code and what it starts never see them
    # (the reaper still finds this process, and its session, by its initial environment).
    for name in [n for n in os.environ if n.startswith(ORCH_ENV_PREFIX)]:
        del os.environ[name]
    runtime = Runtime(channel)
    return runtime.run()


class Runtime:
    """The process's main loop; the control thread feeds it messages."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.in_training = threading.Event()
        self.ctx: TrainContext | None = None
        self.writer = BackgroundWriter()  # one per process: a save outlives the attempt that made it
        self._store: Any = None  # rank 0 of a script: the job's store, served by this process
        self._connections: AttemptConnections | None = None  # the current attempt's, to abort on leaving it
        self._interrupted = False  # the controller stopped the current attempt
        self.told = Told()  # the controller's latest word on when to save and snapshot
        self._memory: MemoryKeeper | None = None  # memory snapshots: outlive the attempt that took them
        signal.signal(signal.SIGUSR2, self._on_interrupt)
        self.channel.drop_when_closed = True  # the agent gone: the rank may still save alone, reporting nothing
        self.stop_signals = StopSignals(self._save_alone, lambda: self.told.save_at_step is not None,
                                        self._save_alone_timeout_s)
        self.stop_signals.install()
        threading.Thread(target=self._read_control, name="control", daemon=True).start()
        threading.Thread(target=self._liveness, name="liveness", daemon=True).start()

    def run(self) -> int:
        """Warm up if asked, then train for each start or rejoin; the process's exit code."""
        message = self._next_message(timeout=None)
        if isinstance(message, Prepare):
            # A start that arrives meanwhile waits in the inbox: never two DeepSpeed set-ups at once.
            try:
                _warm_up(message.config)
            except Exception:  # noqa: BLE001 - a cold spare is still a spare
                traceback.print_exc()
                print("warm-up failed; this spare will start cold", file=sys.stderr, flush=True)
            self.channel.send(Warm())
            message = self._next_message(timeout=None)
        while isinstance(message, Start):  # or Rejoin
            self.channel.attempt = message.attempt
            config = self._enter(message)
            if config.train.is_script:
                return self._run_script(message, config)
            outcome = self._train(message, config)
            if outcome == 0:
                return 0
            message = self._next_message(timeout=_DECISION_TIMEOUT_S)
        return 1

    def _enter(self, spec: Start) -> Config:
        """Take on ``spec``'s rank: its log, environment and working directory."""
        if spec.log_path is not None:
            _redirect_output(spec.log_path)  # a promoted spare writes to its new rank's log
        os.environ.update(spec.env)
        if spec.workdir:
            try:
                os.chdir(spec.workdir)
            except OSError as exc:
                print(f"orchestrator: staying in {os.getcwd()}: cannot enter the launch directory {spec.workdir} on "
                      f"this node ({exc.strerror})", file=sys.stderr, flush=True)
        if "torch" in sys.modules and "OMP_NUM_THREADS" in os.environ:
            # A spare imported torch before it knew its share of the node's cores.
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        return Config.model_validate(spec.config)

    def _run_script(self, spec: Start, config: Config) -> int:
        """Run the job's script as ``__main__``; the process's exit code (as ``python script.py``'s)."""
        reporter.activate(reporter.Reporter(self.channel, spec.rank, list(spec.faults)))
        self.stop_signals.restore_default()
        try:
            if config.cluster.device == "cpu":
                use_prebuilt_cpu_op()  # DeepSpeed must not compile (or take its build lock) in the script
            if spec.rank == 0:
                # Kept by this process until it exits: the script's env:// rendezvous connects to it.
                self._store = _serve_store(spec.world_size)
            self.in_training.set()
            code = script.run(config.train)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the controller
            self._report_error(exc, reporter.active().last_step)
            return 1
        finally:
            self.in_training.clear()
        if code != 0:
            return code  # the script's own exit status; its log says why
        self.channel.send(Finished())
        if spec.rank == 0:
            # The others may still be leaving the process group, through this process's store: serve
            # it until the controller, seeing every rank finished, stops this process.
            self._next_message(timeout=_DECISION_TIMEOUT_S)
        return 0

    def _report_error(self, exc: BaseException, step: int | None) -> None:
        text = traceback.format_exc()
        sys.stderr.write(text)
        sys.stderr.flush()
        # Interrupted, the attempt may end in the collective error its abort caused, not in Interrupted.
        interrupted = isinstance(exc, Interrupted) or self._interrupted
        self.channel.send(Error(exc_type=type(exc).__name__, message=str(exc), traceback=text,
                                interrupted=interrupted, step=step, collective=raised_in_collective(exc)))

    def _train(self, spec: Start, config: Config) -> int:
        """One attempt of a training function: 0 when it finished, 1 when it raised (already reported)."""
        self._connections, self._interrupted = AttemptConnections(), False
        try:
            self.ctx = _context(spec, config, self.channel, self.writer, self.told,
                                lambda: self._memory_keeper(spec, config))
            reporter.activate(self.ctx._reporter)  # orchestrator.report() works in a training function too
            train = import_training_code(self.ctx.config)
            assert train is not None, "a script runs in _run_script"
            # What exists now lives as long as the process: frozen, the collection that frees a failed
            # attempt's engine skips it (0.85 s a rank with 8 ranks on 2 cores when it did not).
            gc.freeze()
            self.in_training.set()
            try:
                train(self.ctx)
            finally:
                self.in_training.clear()
            self.ctx.wait_for_saves()  # the last checkpoint is durable before "finished"
            _leave_process_group()
        except StoppedAlone as stopped:
            print(f"orchestrator: {stopped}; exiting", file=sys.stderr, flush=True)
            exit_process(EXIT_SAVED_ALONE)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the controller
            # Reported first, so that a peer's error (which the abort causes) never looks earlier than it.
            self._report_error(exc, self.ctx._reporter.last_step if self.ctx else None)
            self._connections.abort()  # peers blocked on this rank fail now, not at the group's timeout
            _tear_down(self.ctx)
            self.channel.send(Ready())
            return 1
        self.channel.send(Finished())
        return 0

    def _memory_keeper(self, spec: Start, config: Config) -> MemoryKeeper | None:
        """This process's memory snapshots (made at its first attempt), or None when they are off."""
        if self._memory is None and spec.mirror_key and config.checkpoint.memory_interval_steps != 0:
            # The address this node reaches rank 0's with: its own on the cluster's network.
            host = route_source(os.environ.get("MASTER_ADDR", "127.0.0.1")) or "127.0.0.1"
            self._memory = MemoryKeeper(key=bytes.fromhex(spec.mirror_key), host=host,
                                        pinned=config.cluster.device == "gpu")
        return self._memory

    def _save_alone(self) -> bool:
        """The agent is gone with the scheduler's SIGTERM: a training function that has trained a step
        saves at the next step every rank agrees on, then exits; False where there is nothing to save."""
        ctx = self.ctx
        if (not self.in_training.is_set() or ctx is None or not ctx.last_step
                or ctx.config.checkpoint.interval_steps == 0):
            return False
        self.told.alone = True
        return True

    def _save_alone_timeout_s(self) -> float:
        return self.ctx.config.fault_tolerance.preempt_timeout_s if self.ctx is not None else 0.0

    def _next_message(self, timeout: float | None) -> Message | None:
        """The next instruction; None (exit) when none comes within ``timeout``."""
        try:
            return self.inbox.get(timeout=timeout)
        except queue.Empty:
            print(f"no instruction from the controller within {timeout:.0f}s; exiting", file=sys.stderr)
            return None

    def _read_control(self) -> None:
        try:
            for message in self.channel.messages():
                if isinstance(message, Interrupt):
                    if self.in_training.is_set():
                        self._interrupted = True
                        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)
                        # The signal's handler runs only between Python bytecodes: a main thread
                        # blocked inside a collective is released by failing the collective.
                        if self._connections is not None:
                            self._connections.abort()
                elif isinstance(message, Cadence):
                    self.told.hear(message)
                elif isinstance(message, Stop):
                    self.stop_signals.agent_stops()
                else:
                    if isinstance(message, Start):  # in channel order, before any later Cadence
                        self.told.hear(Cadence(interval_steps=message.checkpoint_interval,
                                               memory_interval_steps=message.memory_interval))
                    self.inbox.put(message)
        except MalformedMessage as exc:
            print(f"orchestrator: protocol error from the node agent: {exc}", file=sys.stderr, flush=True)
            os._exit(1)
        # The agent closed its end or died: nobody is left to report to (a scheduler's stop aside).
        self.stop_signals.agent_gone()

    def _on_interrupt(self, _signum: int, _frame: object) -> None:
        if self.in_training.is_set():
            raise Interrupted("stopped by the controller for a recovery")

    def _liveness(self) -> None:
        """Once a second: where the main thread is, and for how long it has been still (sampled every
        50 ms: its stack unchanged and no CPU used): a rank's progress when it reports no steps."""
        watch = ThreadWatch(threading.main_thread().ident)
        next_beat = time.monotonic()
        while True:
            time.sleep(_STACK_SAMPLE_S)
            sample = watch.sample()
            if time.monotonic() < next_beat:
                continue
            next_beat = time.monotonic() + LIVENESS_INTERVAL_S
            try:
                self.channel.send(Alive(where=sample.where, in_collective=sample.in_collective, still_s=sample.still_s))
            except OSError:
                return


def run_forked_spare(control_fd: int, env: dict[str, str], log_path: str) -> NoReturn:
    """Main of a spare forked by the node's zygote (``orchestrator.worker.zygote``); never returns
    (the zygote's own loop must not go on in the child)."""
    os.setsid()  # its own session, like a spare the agent starts itself
    os.environ.update(env)
    os.environ[CONTROL_FD_ENV] = str(control_fd)
    os.environ[PARENT_PID_ENV] = str(os.getppid())
    _redirect_output(log_path)
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - whatever happens, this child ends here
        traceback.print_exc()
        code = 1
    exit_process(code)


def exit_process(code: int) -> NoReturn:
    """End this process with ``code`` once Python's own clean-up is done (atexit handlers, the
    training code's included; buffered output), without the C++ static destructors of interpreter
    teardown: there a gloo or DeepSpeed thread still joinable aborts a process that finished its
    work (``terminate called without an active exception``, STACK-NOTES), which its log then shows."""
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def import_frameworks() -> None:
    """Import torch and DeepSpeed, with what DeepSpeed imports lazily on its first ``initialize``
    (``torch._dynamo``, about 1.3 s; ``torch._inductor`` through its Muon optimizer)."""
    import deepspeed  # noqa: F401
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    import torch._dynamo  # noqa: F401


def import_training_code(config: Config, cpu_ops: bool = False) -> Callable[[TrainContext], Any] | None:
    """Import what a training process of this job needs before it trains; returns its training
    function (None for a script, whose installed imports are done instead).

    torch and DeepSpeed first (and, with ``cpu_ops`` on a CPU job, DeepSpeed's prebuilt CPU ops), unless
    the entry point's module says ``FRAMEWORKS = False`` (``orchestrator/training/simulated.py``)."""
    train = None if config.train.is_script else resolve_entrypoint(config.train.entrypoint or BUILTIN_ENTRYPOINT)
    if train is None or getattr(sys.modules.get(train.__module__), "FRAMEWORKS", True):
        import_frameworks()
        if cpu_ops and config.cluster.device == "cpu":
            use_prebuilt_cpu_op()
    if train is None:
        script.preimport(config.train)
    return train


def resolve_entrypoint(spec: str) -> Callable[[TrainContext], Any]:
    """Import ``module:function``; a missing module or name is a user error."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"train.entrypoint: cannot import {module_name!r}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"train.entrypoint: {module_name!r} has no function {func_name!r}")
    return func


def _warm_up(config_dict: dict[str, Any]) -> None:
    """A spare pays the start-up costs before it is needed: imports (already done when forked from
    the zygote), and the entry point's ``warmup()`` or a script's installed imports."""
    config = Config.model_validate(config_dict)
    train = import_training_code(config, cpu_ops=True)
    if train is None:
        return
    warmup = getattr(sys.modules[train.__module__], "warmup", None)
    if callable(warmup):
        warmup(config)


def _context(spec: Start, config: Config, channel: Channel, writer: BackgroundWriter, told: Told,
             memory: Callable[[], MemoryKeeper | None]) -> TrainContext:
    return TrainContext(
        rank=spec.rank,
        local_rank=spec.local_rank,
        world_size=spec.world_size,
        node=spec.node,
        attempt=spec.attempt,
        config=config,
        run_dir=Path(spec.run_dir),
        resume_tag=spec.resume_tag,
        faults=list(spec.faults),
        _channel=channel,
        _writer=writer,
        _told=told,
        _memory_keeper=memory,
    )


def _serve_store(world_size: int) -> Any:
    from deepspeed.constants import default_pg_timeout

    return rendezvous.serve(world_size, default_pg_timeout)


def _tear_down(ctx: TrainContext | None) -> None:
    """Leave the broken process group so this process can join a new one."""
    tear_down(ctx.engines if ctx is not None else [])
    if ctx is not None:
        ctx.engines.clear()


def _redirect_output(path: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    fd = append_fd(path)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies (and exit now if it has)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig)
    # The parent may have died before prctl took effect.
    expected = os.environ.get(PARENT_PID_ENV)
    if expected is not None and os.getppid() != int(expected):
        os._exit(1)


def _leave_process_group() -> None:
    """End cleanly: a barrier, then DeepSpeed's destroy (torch's own leaves stale groups)."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.barrier()
        deepspeed.comm.destroy_process_group()


if __name__ == "__main__":
    exit_process(main())
