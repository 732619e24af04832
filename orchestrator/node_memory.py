"""This node's memory, as the kernel tells it: totals, what is available, and how many processes its
OOM killer has killed (for a capacity check before a launch, and to name an OOM kill as such)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GIB = 1 << 30
_MEMINFO = Path("/proc/meminfo")
_VMSTAT = Path("/proc/vmstat")


@dataclass(frozen=True)
class Memory:
    """Bytes of memory: in all, and available to new work now (``MemAvailable``)."""

    total: int
    available: int

    def describe(self) -> str:
        return f"{self.total / GIB:.1f} GiB of memory ({self.available / GIB:.1f} GiB available)"


def memory(meminfo: Path = _MEMINFO) -> Memory:
    """This node's memory, from ``/proc/meminfo``."""
    fields = {}
    for line in meminfo.read_text().splitlines():
        name, _, value = line.partition(":")
        if value.split():
            fields[name] = int(value.split()[0]) * 1024
    return Memory(total=fields["MemTotal"], available=fields.get("MemAvailable", fields["MemFree"]))


def oom_kills(vmstat: Path = _VMSTAT) -> int | None:
    """Processes the kernel's OOM killer has killed since boot (None where the kernel does not say)."""
    try:
        for line in vmstat.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None
