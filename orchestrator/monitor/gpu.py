"""GPU metrics from NVML, under NVIDIA DCGM exporter's names and labels.

One :class:`GpuCollector` per node agent reads the GPUs of its node (the
agent process, not the training processes: collecting never touches the
training loop); the agent serves them on its own endpoint (``gpu_endpoint.py``),
one scrape target per node as dcgm-exporter is.

Names and units follow dcgm-exporter's default counters, so NVIDIA's stock
Grafana dashboard works unchanged; every GPU also carries the ``rank`` that
uses it and its node (``node``, and ``instance``: one per node). A query a
GPU does not support is skipped for that GPU only; a GPU that disappeared is
skipped for that scrape; without NVML the collector says so once
(``available`` False with the reason) and returns nothing.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

# DCGM name -> help text (with the unit DCGM uses) for every value the collector can report: the
# fields of dcgm-exporter's default counter list, and ECC totals. docs/monitoring.md has each one's
# type (dcgm-exporter's), unit and NVML source.
FIELDS: dict[str, str] = {
    "DCGM_FI_DEV_GPU_UTIL": "GPU utilization (in %).",
    "DCGM_FI_DEV_MEM_COPY_UTIL": "Memory utilization (in %).",
    "DCGM_FI_DEV_ENC_UTIL": "Encoder utilization (in %).",
    "DCGM_FI_DEV_DEC_UTIL": "Decoder utilization (in %).",
    "DCGM_FI_DEV_FB_USED": "Framebuffer memory used (in MiB).",
    "DCGM_FI_DEV_FB_FREE": "Framebuffer memory free (in MiB).",
    "DCGM_FI_DEV_FB_RESERVED": "Framebuffer memory reserved (in MiB).",
    "DCGM_FI_DEV_GPU_TEMP": "GPU temperature (in C).",
    "DCGM_FI_DEV_MEMORY_TEMP": "Memory temperature (in C).",
    "DCGM_FI_DEV_POWER_USAGE": "Power draw (in W).",
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": "Total energy consumption since boot (in mJ).",
    "DCGM_FI_DEV_SM_CLOCK": "SM clock frequency (in MHz).",
    "DCGM_FI_DEV_MEM_CLOCK": "Memory clock frequency (in MHz).",
    "DCGM_FI_DEV_XID_ERRORS": "Value of the last XID error encountered.",
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": "Total number of PCIe retries.",
    "DCGM_FI_PROF_PCIE_TX_BYTES": "PCIe transmit throughput (in bytes/s).",
    "DCGM_FI_PROF_PCIE_RX_BYTES": "PCIe receive throughput (in bytes/s).",
    "DCGM_FI_PROF_NVLINK_TX_BYTES": "NVLink transmit throughput over all links (in bytes/s).",
    "DCGM_FI_PROF_NVLINK_RX_BYTES": "NVLink receive throughput over all links (in bytes/s).",
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": "NVLink data throughput over all links, both directions (in MB/s).",
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "Ratio of time the graphics engine is active.",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "Ratio of cycles the tensor (HMMA) pipe is active.",
    "DCGM_FI_PROF_DRAM_ACTIVE": "Ratio of cycles the device memory interface is active sending or receiving data.",
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": "Total single-bit volatile ECC errors.",
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": "Total double-bit volatile ECC errors.",
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": "Rows remapped for correctable errors.",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": "Rows remapped for uncorrectable errors.",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": "Whether remapping of rows has failed.",
}
# A GPU's own labels (dcgm-exporter's, DCGM_FI_DRIVER_VERSION included), then where it is: the
# node's host name, the rank using it, and the node's address as ``node`` (``instance`` is the
# node's endpoint, set by Prometheus as for one dcgm-exporter per node).
DEVICE_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "DCGM_FI_DRIVER_VERSION")
LABELS = (*DEVICE_LABELS, "Hostname", "rank", "node")
# DCGM's profiling ratios on GPUs with GPM (Hopper and later), as DCGM reads them: NVML's GPM
# percentage between two samples, divided by 100.
_GPM_METRICS = {
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "NVML_GPM_METRIC_GRAPHICS_UTIL",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "NVML_GPM_METRIC_ANY_TENSOR_UTIL",
    "DCGM_FI_PROF_DRAM_ACTIVE": "NVML_GPM_METRIC_DRAM_BW_UTIL",
}
_MIB = 1024 * 1024


@dataclass
class GpuSample:
    """One GPU's own labels (``DEVICE_LABELS``) and whatever values it answered."""

    labels: dict[str, str]
    values: dict[str, float] = field(default_factory=dict)


@dataclass
class GpuReading:
    """One scrape of a node's GPUs: ``available`` False (with ``reason``) where NVML is missing."""

    hostname: str
    available: bool
    reason: str = ""
    gpus: list[GpuSample] = field(default_factory=list)


def _load_nvml() -> ModuleType:
    import pynvml

    return pynvml


class GpuCollector:
    """Reads the GPUs at ``indices`` (NVML's physical indices); ``nvml``: pynvml or a stand-in."""

    def __init__(self, indices: list[int], nvml: Any = None, hostname: str | None = None) -> None:
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
        self._driver = ""
        self._gpm_samples: dict[str, Any] = {}  # uuid -> its previous GPM sample
        self._no_gpm: set[str] = set()  # GPUs (uuid) without GPM

    def collect(self) -> GpuReading:
        """One reading of every GPU at ``indices``."""
        if not self._ready and not self._missing_reason:
            self._start()
        if self._missing_reason:
            return GpuReading(hostname=self.hostname, available=False, reason=self._missing_reason)
        gpus = []
        for index in self.indices:
            sample = self._read(index)
            if sample is not None:
                gpus.append(sample)
        return GpuReading(hostname=self.hostname, available=True, gpus=gpus)

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
        try:
            self._driver = _text(self._nvml.nvmlSystemGetDriverVersion())
        except self._nvml.NVMLError:
            self._driver = ""

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
                "DCGM_FI_DRIVER_VERSION": self._driver,
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
        nvlink = _cached(lambda: self._nvlink_rates(handle, uuid))
        gpm = _cached(lambda: self._gpm(handle, uuid))
        queries: dict[str, Callable[[], float | None]] = {
            "DCGM_FI_DEV_GPU_UTIL": lambda: util().gpu,
            "DCGM_FI_DEV_MEM_COPY_UTIL": lambda: util().memory,
            "DCGM_FI_DEV_ENC_UTIL": lambda: nvml.nvmlDeviceGetEncoderUtilization(handle)[0],
            "DCGM_FI_DEV_DEC_UTIL": lambda: nvml.nvmlDeviceGetDecoderUtilization(handle)[0],
            "DCGM_FI_DEV_FB_USED": lambda: memory().used / _MIB,
            "DCGM_FI_DEV_FB_FREE": lambda: memory().free / _MIB,
            "DCGM_FI_DEV_FB_RESERVED": lambda: _mib(getattr(memory(), "reserved", None)),  # v2 only
            "DCGM_FI_DEV_GPU_TEMP": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
            "DCGM_FI_DEV_MEMORY_TEMP": lambda: self._field(handle, nvml.NVML_FI_DEV_MEMORY_TEMP),
            "DCGM_FI_DEV_POWER_USAGE": lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle),
            "DCGM_FI_DEV_SM_CLOCK": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "DCGM_FI_DEV_MEM_CLOCK": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "DCGM_FI_DEV_XID_ERRORS": lambda: self._xid(handle, uuid),
            "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": lambda: nvml.nvmlDeviceGetPcieReplayCounter(handle),
            "DCGM_FI_PROF_PCIE_TX_BYTES": lambda: nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_TX_BYTES) * 1024.0,
            "DCGM_FI_PROF_PCIE_RX_BYTES": lambda: nvml.nvmlDeviceGetPcieThroughput(handle, nvml.NVML_PCIE_UTIL_RX_BYTES) * 1024.0,
            "DCGM_FI_PROF_NVLINK_TX_BYTES": lambda: nvlink().get("tx"),
            "DCGM_FI_PROF_NVLINK_RX_BYTES": lambda: nvlink().get("rx"),
            # DCGM's derivation: both directions' KiB/s, divided by 1000 (its unit is "MB/s").
            "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": lambda: (
                (nvlink()["tx"] + nvlink()["rx"]) / 1024.0 / 1000.0 if len(nvlink()) == 2 else None),
            "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, nvml.NVML_VOLATILE_ECC),
            "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC),
            "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": lambda: remapped()[0],
            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": lambda: remapped()[1],
            "DCGM_FI_DEV_ROW_REMAP_FAILURE": lambda: int(bool(remapped()[3])),
        }
        for name in _GPM_METRICS:
            queries[name] = lambda name=name: gpm().get(name)
        return queries

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

    def _field(self, handle: Any, field_id: int) -> float | None:
        """One NVML field value (an unsigned integer), None where the GPU does not have it."""
        nvml = self._nvml
        [value] = nvml.nvmlDeviceGetFieldValues(handle, [(field_id, 0)])
        return float(value.value.uiVal) if value.nvmlReturn == nvml.NVML_SUCCESS else None

    def _nvlink_rates(self, handle: Any, uuid: str) -> dict[str, float]:
        """Bytes/s of NVLink data over all links (scope UINT_MAX), by direction ("tx", "rx").

        NVML reports these fields as running totals in KiB, stamped in
        microseconds; the rate is the difference between this reading and
        the previous one, so the first reading (and one after a counter
        reset) yields none.
        """
        nvml = self._nvml
        fields = {"tx": nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, "rx": nvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX}
        values = nvml.nvmlDeviceGetFieldValues(handle, [(field_id, 0xFFFFFFFF) for field_id in fields.values()])
        rates = {}
        for (direction, field_id), value in zip(fields.items(), values):
            if value.nvmlReturn != nvml.NVML_SUCCESS:
                continue
            total, stamp = int(value.value.ullVal), int(value.timestamp)
            previous = self._counters.get((uuid, field_id))
            self._counters[(uuid, field_id)] = (total, stamp)
            if previous is None or stamp <= previous[1] or total < previous[0]:
                continue
            rates[direction] = (total - previous[0]) * 1024.0 / ((stamp - previous[1]) / 1e6)
        return rates

    def _gpm(self, handle: Any, uuid: str) -> dict[str, float]:
        """DCGM's profiling ratios from NVML's GPM samples: this reading's against the previous one.
        Empty on the first reading, and on GPUs (or drivers) without GPM."""
        nvml = self._nvml
        if uuid in self._no_gpm:
            return {}
        try:
            if uuid not in self._gpm_samples and not nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
                self._no_gpm.add(uuid)
                return {}
            sample = nvml.nvmlGpmSampleGet(handle, nvml.nvmlGpmSampleAlloc())
        except nvml.NVMLError:
            self._no_gpm.add(uuid)
            return {}
        previous, self._gpm_samples[uuid] = self._gpm_samples.get(uuid), sample
        if previous is None:
            return {}
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(_GPM_METRICS)
        request.sample1, request.sample2 = previous, sample
        for slot, metric in zip(request.metrics, _GPM_METRICS.values()):
            slot.metricId = getattr(nvml, metric)
        try:
            nvml.nvmlGpmMetricsGet(request)
        finally:
            nvml.nvmlGpmSampleFree(previous)
        return {name: slot.value / 100.0 for name, slot in zip(_GPM_METRICS, request.metrics)
                if slot.nvmlReturn == nvml.NVML_SUCCESS}

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


def _mib(size: int | None) -> float | None:
    return None if size is None else size / _MIB


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
