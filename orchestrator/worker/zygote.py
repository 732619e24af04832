"""The node's zygote: pays the start-up imports once and forks warm spares from itself.

A fresh Python process needs ~6.7 CPU-seconds before it can train here (torch,
DeepSpeed, ``torch._dynamo``, and ``torch._inductor``, which DeepSpeed imports
through its Muon optimizer module). Spent beside training ranks after every
recovery, that slows them down. The zygote imports everything once, stays
single-threaded (so forking it is safe), and forks a spare in milliseconds;
the child only rehearses an engine set-up (~0.7 CPU-seconds).

On a GPU node the zygote must touch neither CUDA (a child forked after CUDA is
initialised cannot use the GPU) nor NVML (its library starts a thread, and its
reference count outlives ``nvmlShutdown`` when two callers initialised it).
DeepSpeed's accelerator is named in ``DS_ACCELERATOR`` (no probing), the one
``nvmlInit`` its CUDA accelerator makes on import is deferred to each child
(:func:`_nvml_deferred`), and before it says it can fork, the zygote checks
that CUDA is still uninitialised and that it runs no thread but its own.

Protocol on the control socket (JSON lines of ``messages.py``) with its node agent:

    -> Prepare(config)
    <- Prepared(error)             (error: why it cannot fork; it then exits)
    -> Fork(id, env, log_path)     + the child's control fd (SCM_RIGHTS)
    <- Forked(id, pid)
    <- Exited(pid, returncode)     (Popen convention: -signal)

Run as ``python -m orchestrator.worker.zygote``; fd in ``ORCH_CONTROL_FD``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.messages import Exited, Fork, Forked, Message, Prepare, Prepared, decode, encode
from orchestrator.worker.channel import CONTROL_FD_ENV

_REAP_INTERVAL_S = 0.2
_THREADS_EXIT_S = 2.0
_nvml_deferred_inits = 0  # nvmlInit calls the imports made, for each child to make (see _nvml_deferred)


def main() -> int:
    from orchestrator.worker import process

    process.die_with_parent()
    sock = socket.socket(fileno=int(os.environ[CONTROL_FD_ENV]))
    buffer = b""
    while True:
        ready, _, _ = select.select([sock], [], [], _REAP_INTERVAL_S)
        _reap(sock)
        if not ready:
            continue
        data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 1)
        if not data:
            return 0  # the agent is gone; our children die with us (PDEATHSIG)
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            message = decode(json.loads(line))
            if isinstance(message, Prepare):
                error = _prepare(message.config)
                _send(sock, Prepared(error=error))
                if error:
                    return 1
            elif isinstance(message, Fork):
                child_fd = fds.pop(0)
                pid = os.fork()
                if pid == 0:
                    sock.close()
                    if _nvml_deferred_inits:
                        _init_nvml()
                    process.run_forked_spare(child_fd, message.env, message.log_path)
                os.close(child_fd)
                _send(sock, Forked(id=message.id, pid=pid))


def _prepare(config_dict: dict[str, Any]) -> str:
    """Import everything; returns why this process cannot fork safely ("" when it can)."""
    try:
        with _nvml_deferred():
            _import_everything(config_dict)
    except Exception as exc:  # noqa: BLE001 - any failure means no warm spares, never a failed job
        return f"the imports failed: {type(exc).__name__}: {exc}"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "the imports initialised CUDA, which a forked child could not use"
    # Forking is only safe from a single-threaded process: a thread some import started (a
    # compiler's worker pool, say) would be missing in the child with whatever locks it held.
    deadline = time.monotonic() + _THREADS_EXIT_S
    while (others := _other_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)  # a thread that is being shut down takes a moment to end
    if others:
        names = sorted(_thread_name(tid) for tid in others)
        return f"the imports left {len(names)} thread(s) running ({', '.join(names)}), so forking is unsafe"
    return ""


def _import_everything(config_dict: dict[str, Any]) -> None:
    """What every training process of this job would import: torch, DeepSpeed (unless the entry
    point's module says ``FRAMEWORKS = False``), and the entry point's module and ``preload``, or the
    installed packages a script imports."""
    from orchestrator.config.schema import Config
    from orchestrator.worker.process import import_training_code

    config = Config.model_validate(config_dict)
    train = import_training_code(config)
    if train is None:
        return
    preload = getattr(sys.modules[train.__module__], "preload", None)
    if callable(preload):
        preload(config)


@contextlib.contextmanager
def _nvml_deferred() -> Iterator[None]:
    """While the imports run, ``pynvml.nvmlInit`` only counts its calls: DeepSpeed's CUDA accelerator
    calls it on import (and then believes NVML ready), and NVML would start a thread that makes
    forking unsafe. Each child makes the calls for real (:func:`_init_nvml`) before anything of its
    own runs; the zygote itself never reads NVML (its agent does, for the metrics)."""
    try:
        import pynvml
    except ImportError:
        yield
        return
    real = pynvml.nvmlInit

    def deferred() -> None:
        global _nvml_deferred_inits
        _nvml_deferred_inits += 1

    pynvml.nvmlInit = deferred
    try:
        yield
    finally:
        pynvml.nvmlInit = real


def _init_nvml() -> None:
    """In a forked child: NVML initialised as the imports expect (once per deferred call)."""
    nvml = sys.modules["pynvml"]
    try:
        for _ in range(_nvml_deferred_inits):
            nvml.nvmlInit()
    except nvml.NVMLError as exc:
        print(f"NVML unavailable in this process: {exc}", file=sys.stderr, flush=True)


def _other_threads() -> list[str]:
    return [tid for tid in os.listdir("/proc/self/task") if int(tid) != threading.get_native_id()]


def _thread_name(tid: str) -> str:
    try:
        return Path(f"/proc/self/task/{tid}/comm").read_text().strip() or tid
    except OSError:
        return tid  # it has just ended


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        _send(sock, Exited(pid=pid, returncode=code))


def _send(sock: socket.socket, message: Message) -> None:
    try:
        sock.sendall((json.dumps(encode(message)) + "\n").encode())
    except OSError:
        os._exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(main())
