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

Started ahead (``ORCH_ZYGOTE_LISTEN`` and ``ORCH_ZYGOTE_CONFIG`` instead): the controller of a job
on an embedded Ray starts the zygote before Ray itself, so that the imports run while Ray comes
up (``controller/zygote_ahead.py``). It imports for the config it was given at once, then waits for
its node agent on an abstract Unix socket (this user's only, at most ``ADOPT_TIMEOUT_S``), and
from there on speaks the protocol above on that connection; it answers the agent's ``Prepare``
with how its imports went.
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
from orchestrator.worker.channel import CONTROL_FD_ENV, peer_credentials

LISTEN_ENV = "ORCH_ZYGOTE_LISTEN"  # started ahead: the abstract socket name its agent connects to
CONFIG_ENV = "ORCH_ZYGOTE_CONFIG"  # started ahead: the job's config (JSON) to import for
ADOPT_TIMEOUT_S = 300.0  # started ahead and never adopted (the job failed before its agents started)
_FIRST_WORD_S = 10.0  # started ahead: an agent that connected sends Prepare at once
_REAP_INTERVAL_S = 0.2
_THREADS_EXIT_S = 2.0
_nvml_deferred_inits = 0  # nvmlInit calls the imports made, for each child to make (see _nvml_deferred)


def main() -> int:
    from orchestrator.worker import process

    process.die_with_parent()
    prepared: str | None = None  # started ahead: how its imports went, told to the agent's Prepare
    if LISTEN_ENV in os.environ:
        prepared, sock = _wait_for_agent(os.environ[LISTEN_ENV], json.loads(os.environ[CONFIG_ENV]))
        if sock is None:
            return 0
    else:
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
                error = _prepare(message.config) if prepared is None else prepared
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


def zygote_env(node_env: dict[str, str]) -> dict[str, str]:
    """What a zygote's process gets over its parent's environment: the node's settings, and what keeps
    its imports from starting threads or initialising CUDA."""
    # Should an import call torch.cuda.is_available() (none does with DS_ACCELERATOR set), it asks
    # NVML instead of initialising CUDA, which no child forked afterwards could use: NVML's thread
    # is seen by the check in _prepare and it says it cannot fork, where CUDA would go unnoticed.
    # One OpenMP thread: with more, an import starts OpenMP's pool, and a process with threads
    # cannot fork safely. Each child takes its share of the node's cores when it becomes a rank
    # (torch.set_num_threads, process.py).
    return {**node_env, "PYTORCH_NVML_BASED_CUDA_CHECK": "1", "OMP_NUM_THREADS": "1"}


def _wait_for_agent(name: str, config_dict: dict[str, Any]) -> tuple[str, socket.socket | None]:
    """Started ahead: listen on abstract socket ``name`` first (an agent may connect while the imports
    run), import, then take the first connection of this user's; returns how the imports went and
    the connection (None: nobody came in time)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind("\0" + name)
        listener.listen(4)
        prepared = _prepare(config_dict)
        listener.settimeout(ADOPT_TIMEOUT_S)
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                return prepared, None
            # An agent speaks first (Prepare); one that left without a word (it found another
            # process than it expected here) is not ours to serve.
            conn.settimeout(_FIRST_WORD_S)
            try:
                spoke = peer_credentials(conn)[1] == os.getuid() and conn.recv(1, socket.MSG_PEEK)
            except OSError:
                spoke = False
            if spoke:
                conn.settimeout(None)
                return prepared, conn
            conn.close()


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
