"""The bottom layer: types every layer shares, so that imports point down (docs/architecture.md).

A lower layer that needs a type a higher one works with (the monitor counting failures by reason,
say) takes it from here, never from the higher layer.
"""

from __future__ import annotations

from typing import Literal

# Why a rank failed, as ``failure_detected`` and the metrics name it (docs/events.md).
Reason = Literal["exit", "signal", "oom", "hang", "node_lost", "exception", "checkpoint"]
