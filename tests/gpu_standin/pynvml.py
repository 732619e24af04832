"""A stand-in for NVIDIA's ``pynvml`` on a machine without a GPU (tests/test_zygote.py).

Like the real library it runs a thread of its own while initialised (reference-counted), so a
process that initialised it cannot be forked safely; and it writes every ``nvmlInit`` to the file
named by ``GPU_STANDIN_RECORD``, with the process that made it.
"""

from __future__ import annotations

import os
import threading

NVML_ERROR_UNINITIALIZED = 1


class NVMLError(Exception):
    """As pynvml's: raised by a call the library cannot answer."""


_lock = threading.Lock()
_references = 0
_stop = threading.Event()
_thread: threading.Thread | None = None


def record(what: str) -> None:
    with open(os.environ["GPU_STANDIN_RECORD"], "a") as fh:
        fh.write(f"{os.getpid()} {what}\n")


def nvmlInit() -> None:
    global _references, _thread
    record("nvmlInit")
    with _lock:
        if _references == 0:
            _stop.clear()
            _thread = threading.Thread(target=_stop.wait, name="nvml-standin", daemon=True)
            _thread.start()
        _references += 1


def nvmlShutdown() -> None:
    global _references
    with _lock:
        if _references == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        _references -= 1
        if _references == 0:
            _stop.set()
            _thread.join()


def nvmlDeviceGetCount() -> int:
    if _references == 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return 1
