"""A stand-in for pynvml that serves simulated GPUs.

It answers the calls :mod:`orchestrator.monitor.gpu` makes, with pynvml's own
constants and exception classes, over a dict of GPUs (``simulated_gpu`` gives a
busy H100). ``metrics.simulated_gpus`` serves one per rank from a run on a
machine without GPUs, so that dashboards, alerts and Prometheus set-ups can be
tried (and tested) end to end; the collector's unit tests give it GPUs that
lack a feature, disappear or report errors.

A key missing from a GPU's dict (or set to None) makes its query raise
NVML_ERROR_NOT_SUPPORTED, as a real GPU without that feature does. Running
totals (energy, NVLink data) grow with the clock from their starting values.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pynvml

# GPM metric ids (NVML percentages, 0-100) the collector asks for.
GPM_GRAPHICS, GPM_TENSOR, GPM_DRAM = (pynvml.NVML_GPM_METRIC_GRAPHICS_UTIL, pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
                                      pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL)
NVLINK_TX, NVLINK_RX = pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX
DRIVER_VERSION = "550.90.07"


def simulated_gpu(index: int) -> dict[str, Any]:
    """A busy H100 (SXM) in the middle of a training step; ``index`` makes its temperature its own."""
    return {
        "name": "NVIDIA H100 80GB HBM3",
        "util": {"gpu": 87, "memory": 41},
        "memory": {"used": 61 * 2**30, "free": 18 * 2**30, "reserved": 2**29},
        "temp": 61 + index, "memory_temp": 70 + index,
        "power_mw": 512_000, "energy_mj": 4_200_000_000,
        "sm_clock": 1980, "mem_clock": 2619, "pcie_kib": 2048, "pcie_replay": 0,
        "enc_util": 0, "dec_util": 0,
        "ecc": {pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED: 0, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED: 0},
        "remapped": (0, 0, False, False),
        "gpm": {GPM_GRAPHICS: 91.0, GPM_TENSOR: 42.0, GPM_DRAM: 35.0},
        "nvlink_kib_per_s": {NVLINK_TX: 40_000_000, NVLINK_RX: 40_000_000},
    }


class _GpmMetricsGet:
    """pynvml's ``c_nvmlGpmMetricsGet_t`` for the stand-in's own (Python) samples."""

    def __init__(self) -> None:
        self.version = self.numMetrics = 0
        self.sample1: Any = None
        self.sample2: Any = None
        self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=pynvml.NVML_SUCCESS, value=0.0) for _ in range(16)]


class SimulatedNVML:
    """pynvml's functions over ``gpus`` (NVML index -> the GPU's values; see ``simulated_gpu``)."""

    NVMLError = pynvml.NVMLError
    NVMLError_Timeout = pynvml.NVMLError_Timeout
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVML_SUCCESS = pynvml.NVML_SUCCESS
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM, NVML_CLOCK_MEM = pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM
    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = pynvml.NVML_PCIE_UTIL_TX_BYTES, pynvml.NVML_PCIE_UTIL_RX_BYTES
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = NVLINK_TX, NVLINK_RX
    NVML_FI_DEV_MEMORY_TEMP = pynvml.NVML_FI_DEV_MEMORY_TEMP
    NVML_MEMORY_ERROR_TYPE_CORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    NVML_GPM_METRIC_GRAPHICS_UTIL, NVML_GPM_METRIC_ANY_TENSOR_UTIL, NVML_GPM_METRIC_DRAM_BW_UTIL = (
        GPM_GRAPHICS, GPM_TENSOR, GPM_DRAM)
    NVML_GPM_METRICS_GET_VERSION = pynvml.NVML_GPM_METRICS_GET_VERSION
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError
    nvmlMemory_v2 = pynvml.nvmlMemory_v2
    c_nvmlGpmMetricsGet_t = _GpmMetricsGet

    def __init__(self, gpus: dict[int, dict[str, Any]], init_error: Exception | None = None,
                 driver: str | None = DRIVER_VERSION, clock: Callable[[], float] = time.time) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.driver = driver
        self.xids: list[tuple[int, int]] = []  # (handle, XID) events not yet read
        self._clock = clock
        self._started = clock()

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.init_error

    def nvmlSystemGetDriverVersion(self) -> str:
        if self.driver is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return self.driver

    def _gpu(self, handle: int) -> dict[str, Any]:
        if handle not in self.gpus:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return self.gpus[handle]

    def _value(self, handle: int, key: str) -> Any:
        value = self._gpu(handle).get(key)
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def _elapsed_s(self) -> float:
        return self._clock() - self._started

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._gpu(index)
        return index

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-{h:04d}"

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return SimpleNamespace(busId=f"00000000:{h + 0x18:02X}:00.0".encode())

    def nvmlDeviceGetName(self, h: int) -> str:
        return self._gpu(h).get("name", "NVIDIA H100 80GB HBM3")

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(**self._value(h, "util"))

    def nvmlDeviceGetEncoderUtilization(self, h: int) -> list[int]:
        return [self._value(h, "enc_util"), 167000]  # (percent, sampling period in us)

    def nvmlDeviceGetDecoderUtilization(self, h: int) -> list[int]:
        return [self._value(h, "dec_util"), 167000]

    def nvmlDeviceGetMemoryInfo(self, h: int, version: int | None = None) -> Any:
        """v1 counts the driver's reserved memory as used; v2 reports it apart (where the driver has v2)."""
        memory = dict(self._value(h, "memory"))
        reserved = memory.pop("reserved", 0)
        if version is None:
            return SimpleNamespace(used=memory["used"] + reserved, free=memory["free"])
        if not self._gpu(h).get("memory_v2", True):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return SimpleNamespace(reserved=reserved, **memory)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return self._value(h, "temp")

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._value(h, "power_mw")

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        """mJ since the driver loaded: the starting value plus the power draw since then."""
        return int(self._value(h, "energy_mj") + self._value(h, "power_mw") * self._elapsed_s())

    def nvmlDeviceGetClockInfo(self, h: int, clock: int) -> int:
        return self._value(h, "sm_clock" if clock == self.NVML_CLOCK_SM else "mem_clock")

    def nvmlDeviceGetPcieThroughput(self, h: int, counter: int) -> int:
        return self._value(h, "pcie_kib")

    def nvmlDeviceGetPcieReplayCounter(self, h: int) -> int:
        return self._value(h, "pcie_replay")

    def nvmlDeviceGetFieldValues(self, h: int, fields: list[tuple[int, int]]) -> list[Any]:
        """Memory temperature, and the NVLink data totals as NVML keeps them: running KiB per
        direction, stamped in microseconds (``nvlink``: fixed totals; ``nvlink_kib_per_s``: growing)."""
        gpu = self._gpu(h)
        now_us = int(self._clock() * 1e6)
        answers = []
        for field_id, _scope in fields:
            if field_id == self.NVML_FI_DEV_MEMORY_TEMP:
                value, stamp = gpu.get("memory_temp"), now_us
            elif gpu.get("nvlink") is not None:
                value, stamp = gpu["nvlink"].get(field_id), gpu["nvlink"]["us"]
            elif gpu.get("nvlink_kib_per_s") is not None:
                value, stamp = int(gpu["nvlink_kib_per_s"][field_id] * self._elapsed_s()), now_us
            else:
                value, stamp = None, now_us
            status = pynvml.NVML_ERROR_NOT_SUPPORTED if value is None else self.NVML_SUCCESS
            answers.append(SimpleNamespace(nvmlReturn=status, timestamp=stamp,
                                           value=SimpleNamespace(ullVal=value or 0, uiVal=value or 0)))
        return answers

    def nvmlDeviceGetTotalEccErrors(self, h: int, kind: int, counter: int) -> int:
        return self._value(h, "ecc")[kind]

    def nvmlDeviceGetRemappedRows(self, h: int) -> tuple[int, int, bool, bool]:
        return self._value(h, "remapped")

    def nvmlGpmQueryDeviceSupport(self, h: int) -> Any:
        return SimpleNamespace(isSupportedDevice=int(self._gpu(h).get("gpm") is not None))

    def nvmlGpmSampleAlloc(self) -> Any:
        return SimpleNamespace(handle=None)

    def nvmlGpmSampleGet(self, h: int, sample: Any) -> Any:
        self._gpu(h)
        sample.handle = h
        return sample

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        sample.handle = None

    def nvmlGpmMetricsGet(self, request: _GpmMetricsGet) -> _GpmMetricsGet:
        percentages = self._value(request.sample2.handle, "gpm")
        for metric in request.metrics[:request.numMetrics]:
            known = metric.metricId in percentages
            metric.value = percentages.get(metric.metricId, 0.0)
            metric.nvmlReturn = self.NVML_SUCCESS if known else pynvml.NVML_ERROR_NOT_SUPPORTED
        return request

    def nvmlEventSetCreate(self) -> str:
        return "events"

    def nvmlDeviceRegisterEvents(self, h: int, kinds: int, events: str) -> None:
        self._gpu(h)

    def nvmlEventSetWait_v2(self, events: str, timeout_ms: int) -> Any:
        if not self.xids:
            raise pynvml.NVMLError_Timeout(pynvml.NVML_ERROR_TIMEOUT)
        handle, xid = self.xids.pop(0)
        return SimpleNamespace(device=handle, eventData=xid)
