"""Entry point of a rank's training process: ``python -m orchestrator.worker.process``.

Started by the rank's actor with the rank's environment and one end of a
control socket (fd in ``ORCH_CONTROL_FD``). It waits for the start spec,
resolves the training function, runs it, and reports how it ended. An
exception travels to the controller as data (type, message, traceback), so
the root cause reaches the user's terminal, not only the rank's log.

The process never outlives its actor: the kernel kills it when the actor
dies (``PR_SET_PDEATHSIG``), and it exits when the control socket closes.
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib
import os
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Config
from orchestrator.errors import ConfigError
from orchestrator.worker.channel import CONTROL_FD_ENV, Channel
from orchestrator.worker.context import TrainContext

PARENT_PID_ENV = "ORCH_PARENT_PID"
BUILTIN_ENTRYPOINT = "orchestrator.training.workload:train"
_START_TIMEOUT_S = 120.0
_PR_SET_PDEATHSIG = 1


def main() -> int:
    _die_with_parent()
    faulthandler.enable()
    # `kill -USR1 PID` prints every thread's stack to the rank's log: the first thing to look at in a hang.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    channel = Channel.from_fd(int(os.environ[CONTROL_FD_ENV]))
    inbox: queue.Queue[dict[str, Any]] = queue.Queue()
    threading.Thread(target=_read_control, args=(channel, inbox), name="control", daemon=True).start()
    try:
        spec = inbox.get(timeout=_START_TIMEOUT_S)
    except queue.Empty:
        print("no start message from the actor; exiting", file=sys.stderr)
        return 1
    try:
        ctx = _context(spec, channel)
        train = resolve_entrypoint(ctx.config.train.entrypoint or BUILTIN_ENTRYPOINT)
        train(ctx)
        _leave_process_group()
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the controller
        text = traceback.format_exc()
        sys.stderr.write(text)
        sys.stderr.flush()
        channel.send(
            {"type": "error", "exc_type": type(exc).__name__, "message": str(exc), "traceback": text}
        )
        return 1
    channel.send({"type": "finished"})
    return 0


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


def _context(spec: dict[str, Any], channel: Channel) -> TrainContext:
    return TrainContext(
        rank=spec["rank"],
        local_rank=spec["local_rank"],
        world_size=spec["world_size"],
        node=spec["node"],
        attempt=spec["attempt"],
        config=Config.model_validate(spec["config"]),
        run_dir=Path(spec["run_dir"]),
        resume_tag=spec["resume_tag"],
        _channel=channel,
    )


def _read_control(channel: Channel, inbox: queue.Queue[dict[str, Any]]) -> None:
    for message in channel.messages():
        inbox.put(message)
    # The actor closed its end or died: nobody is left to report to.
    os._exit(1)


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
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
    sys.exit(main())
