"""Leaving a DeepSpeed process group without leaving the process.

Used by a rank that survives a peer's failure (before it joins the new
group) and by a warm spare after its rehearsal. Known on this stack: the
engine must be destroyed and DeepSpeed's own ``destroy_process_group`` used
(torch's leaves DeepSpeed holding stale groups), and ZeRO-3 numbers
parameters with process-wide counters that a fresh peer would start at 0.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterable
from typing import Any


def tear_down(engines: Iterable[Any]) -> None:
    """Destroy ``engines``, leave the process group, reset DeepSpeed's process-wide counters."""
    for engine in engines:
        try:
            engine.destroy()
        except Exception as exc:  # noqa: BLE001 - a broken engine must not block the rejoin
            print(f"engine.destroy() failed: {exc!r}", file=sys.stderr)
    if "deepspeed" in sys.modules:
        import deepspeed.comm
        from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
        from deepspeed.runtime.zero.partition_parameters import Init

        try:
            if deepspeed.comm.is_initialized():
                deepspeed.comm.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - the group is broken; that is why we leave it
            print(f"destroy_process_group failed: {exc!r}", file=sys.stderr)
        Init.param_id = 0
        DeepSpeedZeRoOffload._register_deepspeed_module.__defaults__[0][0] = 0
    # Engines hold reference cycles; free their tensors before the next engine allocates.
    gc.collect()
