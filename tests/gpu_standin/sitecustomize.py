"""Loaded at start-up by the processes of tests/test_zygote.py (this folder leads their PYTHONPATH):
every call that asks torch for CUDA (probes it, initialises it, or uses a device) is written to the
file named by ``GPU_STANDIN_RECORD``, with the process that made it, as ``cuda:NAME``."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

_CUDA_CALLS = ("is_available", "device_count", "init", "_lazy_init", "current_device", "set_device",
               "get_device_properties", "get_device_name", "synchronize", "mem_get_info")


class _RecordTorchCuda(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001 - importlib's signature
        if name != "torch.cuda":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_module = spec.loader.exec_module

        def exec_module(module) -> None:  # noqa: ANN001
            run_module(module)
            for call in _CUDA_CALLS:
                setattr(module, call, _recorded(call, getattr(module, call)))

        spec.loader.exec_module = exec_module
        return spec


def _recorded(name, function):  # noqa: ANN001, ANN202
    @functools.wraps(function)
    def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        from pynvml import record  # the stand-in's, beside this file

        record(f"cuda:{name}")
        return function(*args, **kwargs)

    return call


sys.meta_path.insert(0, _RecordTorchCuda())
