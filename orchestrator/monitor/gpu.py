"""GPU metrics from NVML, under NVIDIA DCGM exporter's names and labels.

One :class:`GpuCollector` per worker actor reads the GPUs of its rank (the
actor process, not the training process: collecting never touches the
training loop). Samples travel to the controller as plain data and are
exposed there, so a multi-node job is one scrape target.

Names and units follow dcgm-exporter's default counters, so NVIDIA's stock
Grafana dashboard works unchanged; every GPU also carries the ``rank`` that
uses it. A query a GPU does not support is skipped for that GPU only; a GPU
that disappeared is skipped for that scrape; without NVML the collector
says so once (``available`` False with the reason) and returns nothing.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

# DCGM name -> help text (with the unit DCGM uses) for every value the collector can report.
FIELDS: dict[str, str] = {
    "DCGM_FI_DEV_GPU_UTIL": "GPU utilization (in %).",
    "DCGM_FI_DEV_MEM_COPY_UTIL": "Memory utilization (in %).",
    "DCGM_FI_DEV_FB_USED": "Framebuffer memory used (in MiB).",
    "DCGM_FI_DEV_FB_FREE": "Framebuffer memory free (in MiB).",
    "DCGM_FI_DEV_GPU_TEMP": "GPU temperature (in C).",
    "DCGM_FI_DEV_POWER_USAGE": "Power draw (in W).",
    "DCGM_FI_DEV_SM_CLOCK": "SM clock frequency (in MHz).",
    "DCGM_FI_DEV_MEM_CLOCK": "Memory clock frequency (in MHz).",
    "DCGM_FI_DEV_XID_ERRORS": "Value of the last XID error encountered.",
    "DCGM_FI_PROF_PCIE_TX_BYTES": "PCIe transmit throughput (in bytes/s).",
    "DCGM_FI_PROF_PCIE_RX_BYTES": "PCIe receive throughput (in bytes/s).",
    "DCGM_FI_PROF_NVLINK_TX_BYTES": "NVLink transmit throughput over all links (in bytes/s).",
    "DCGM_FI_PROF_NVLINK_RX_BYTES": "NVLink receive throughput over all links (in bytes/s).",
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": "Total single-bit volatile ECC errors.",
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": "Total double-bit volatile ECC errors.",
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": "Rows remapped for correctable errors.",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": "Rows remapped for uncorrectable errors.",
}
LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "rank")
_MIB = 1024 * 1024


@dataclass
class GpuSample:
    """One GPU's labels and whatever values it answered."""

    labels: dict[str, str]
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class GpuReading:
    """One scrape of a rank's GPUs: ``available`` False (with ``reason``) where NVML is missing."""

    rank: str
    hostname: str
    available: bool
    reason: str = ""
    gpus: list[GpuSample] = field(default_factory=list)


def _load_nvml() -> ModuleType:
    import pynvml

    return pynvml


class GpuCollector:
    """Reads the GPUs at ``indices`` (NVML's physical indices) for ``rank``."""

    def __init__(self, rank: int, indices: list[int], nvml: Any = None, hostname: str | None = None) -> None:
        self.rank = rank
        self.indices = indices
        self.hostname = hostname or socket.gethostname()
        self._nvml = nvml
        self._ready = False
        self._missing_reason = ""
        self._events: Any = None
        self._last_xid: dict[str, float] = {}
        self._counters: dict[tuple[str, int], tuple[int, int]] = {}  # (uuid, field) -> (KiB, timestamp us)
        self._memory_v2 = True
        self._lost: set[int] = set()

    def collect(self) -> GpuReading:
        """One reading of every GPU of this rank."""
        if not self._ready and not self._missing_reason:
            self._start()
        if self._missing_reason:
            return GpuReading(rank=str(self.rank), hostname=self.hostname, available=False, reason=self._missing_reason)
        gpus = []
        for index in self.indices:
            sample = self._read(index)
            if sample is not None:
                gpus.append(sample)
        return GpuReading(rank=str(self.rank), hostname=self.hostname, available=True, gpus=gpus)

    def _start(self) -> None:
        try:
            if self._nvml is None:
                self._nvml = _load_nvml()
            self._nvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - no library, no driver, no device: all mean "no NVML"
            self._missing_reason = f"NVML unavailable: {exc}"
            log.warning("GPU metrics off on %s: %s", self.hostname, self._missing_reason)
            return
        self._ready = True
        try:
            self._events = self._nvml.nvmlEventSetCreate()
        except self._nvml.NVMLError:
            self._events = None

    def _read(self, index: int) -> GpuSample | None:
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            labels = {
                "gpu": str(index),
                "UUID": uuid,
                "pci_bus_id": _text(nvml.nvmlDeviceGetPciInfo(handle).busId),
                "device": f"nvidia{index}",
                "modelName": _text(nvml.nvmlDeviceGetName(handle)),
                "Hostname": self.hostname,
                "rank": str(self.rank),
            }
        except nvml.NVMLError as exc:
            if index not in self._lost:
                log.warning("GPU %d on %s not readable, skipped: %s", index, self.hostname, exc)
                self._lost.add(index)
            return None
        self._lost.discard(index)
        sample = GpuSample(labels=labels)
        for name, query in self._queries(handle, uuid).items():
            try:
                value = query()
            except nvml.NVMLError:
                continue  # unsupported on this GPU (or transiently failing): this value only
            if value is not None:
                sample.values[name] = float(value)
        return sample

    def _queries(self, handle: Any, uuid: str) -> dict[str, Callable[[], float | None]]:
        nvml = self._nvml
        util = _cached(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        memory = _cached(lambda: self._memory(handle))
        remapped = _cached(lambda: nvml.nvmlDeviceGetRemappedRows(handle))
        return {
            "DCGM_FI_DEV_GPU_UTIL": lambda: util().gpu,
            "DCGM_FI_DEV_MEM_COPY_UTIL": lambda: util().memory,
            "DCGM_FI_DEV_FB_USED": lambda: memory().used / _MIB,
            "DCGM_FI_DEV_FB_FREE": lambda: memory().free / _MIB,
            "DCGM_FI_DEV_GPU_TEMP": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            "DCGM_FI_DEV_POWER_USAGE": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "DCGM_FI_DEV_SM_CLOCK": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "DCGM_FI_DEV_MEM_CLOCK": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "DCGM_FI_DEV_XID_ERRORS": lambda: self._xid(handle, uuid),
            "DCGM_FI_PROF_PCIE_TX_BYTES": lambda: nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_TX_BYTES) * 1024.0,
            "DCGM_FI_PROF_PCIE_RX_BYTES": lambda: nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_RX_BYTES) * 1024.0,
            "DCGM_FI_PROF_NVLINK_TX_BYTES": lambda: self._rate(handle, uuid, nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX),
            "DCGM_FI_PROF_NVLINK_RX_BYTES": lambda: self._rate(handle, uuid, nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX),
            "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC),
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC),
            "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": lambda: remapped()[0],
            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": lambda: remapped()[1],
        }

    def _memory(self, handle: Any) -> Any:
        """Framebuffer use as nvidia-smi and DCGM count it: v2 leaves the driver's reserved memory out of ``used``.

        A driver without the v2 call is asked with v1 (whose ``used`` includes it) from then on.
        """
        nvml = self._nvml
        if self._memory_v2:
            try:
                return nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
            except (nvml.NVMLError_FunctionNotFound, nvml.NVMLError_NotSupported):
                self._memory_v2 = False
        return nvml.nvmlDeviceGetMemoryInfo(handle)

    def _rate(self, handle: Any, uuid: str, field_id: int) -> float | None:
        """Bytes/s of an NVLink throughput field over all links (scope UINT_MAX).

        NVML reports these fields as running totals in KiB, stamped in
        microseconds; the rate is the difference between this reading and
        the previous one, so the first reading (and one after a counter
        reset) yields no value.
        """
        nvml = self._nvml
        [value] = nvml.nvmlDeviceGetFieldValues(handle, [(field_id, 0xFFFFFFFF)])
        if value.nvmlReturn != nvml.NVML_SUCCESS:
            return None
        total, stamp = int(value.value.ullVal), int(value.timestamp)
        previous = self._counters.get((uuid, field_id))
        self._counters[(uuid, field_id)] = (total, stamp)
        if previous is None or stamp <= previous[1] or total < previous[0]:
            return None
        return (total - previous[0]) * 1024.0 / ((stamp - previous[1]) / 1e6)

    def _xid(self, handle: Any, uuid: str) -> float:
        """The last XID error seen on this GPU (0 when none): NVML reports XIDs as events."""
        nvml = self._nvml
        if self._events is not None and uuid not in self._last_xid:
            nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, self._events)
            self._last_xid[uuid] = 0.0
        while self._events is not None:
            try:
                event = nvml.nvmlEventSetWait_v2(self._events, 0)
            except nvml.NVMLError_Timeout:
                break
            event_uuid = _text(nvml.nvmlDeviceGetUUID(event.device))
            self._last_xid[event_uuid] = float(event.eventData)
        return self._last_xid.get(uuid, 0.0)


def _cached(query: Callable[[], Any]) -> Callable[[], Any]:
    """One NVML call shared by the values it answers (utilization: GPU and memory)."""
    result: list[Any] = []

    def get() -> Any:
        if not result:
            result.append(query())
        return result[0]
    return get


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
