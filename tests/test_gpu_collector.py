"""The NVML collector against a stand-in for pynvml: normal values, unsupported queries, lost GPUs, no NVML."""

from __future__ import annotations

from types import SimpleNamespace

import pynvml
import pytest

from orchestrator.monitor.gpu import GpuCollector
from orchestrator.monitor.metrics import JobMetrics


class FakeNVML:
    """pynvml's functions and constants over a dict of fake GPUs; its real exception classes."""

    NVMLError = pynvml.NVMLError
    NVMLError_Timeout = pynvml.NVMLError_Timeout
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM, NVML_CLOCK_MEM = 1, 2
    NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 1
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 138, 139
    NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 0, 1
    NVML_VOLATILE_ECC = 0
    NVML_SUCCESS = 0
    nvmlEventTypeXidCriticalError = 8

    def __init__(self, gpus: dict[int, dict], init_error: Exception | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.xids: list[tuple[int, int]] = []

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.init_error

    def _gpu(self, handle: int) -> dict:
        if handle not in self.gpus:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return self.gpus[handle]

    def _value(self, handle: int, key: str):
        value = self._gpu(handle).get(key)
        if value is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return value

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._gpu(index)
        return index

    def nvmlDeviceGetUUID(self, h): return f"GPU-{h:04d}"
    def nvmlDeviceGetPciInfo(self, h): return SimpleNamespace(busId=f"00000000:0{h}:00.0".encode())
    def nvmlDeviceGetName(self, h): return self._gpu(h).get("name", "NVIDIA H100 80GB HBM3")
    def nvmlDeviceGetUtilizationRates(self, h): return SimpleNamespace(**self._value(h, "util"))
    nvmlMemory_v2 = 0x02000028

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        """v1 counts the driver's reserved memory as used; v2 reports it apart (where the driver has v2)."""
        memory = dict(self._value(h, "memory"))
        reserved = memory.pop("reserved", 0)
        if version is None:
            return SimpleNamespace(used=memory["used"] + reserved, free=memory["free"])
        if not self._gpu(h).get("memory_v2", True):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return SimpleNamespace(reserved=reserved, **memory)

    def nvmlDeviceGetTemperature(self, h, sensor): return self._value(h, "temp")
    def nvmlDeviceGetPowerUsage(self, h): return self._value(h, "power_mw")
    def nvmlDeviceGetClockInfo(self, h, clock): return self._value(h, "sm_clock" if clock == 1 else "mem_clock")
    def nvmlDeviceGetPcieThroughput(self, h, counter): return self._value(h, "pcie_kib")

    def nvmlDeviceGetFieldValues(self, h, fields):
        """NVLink totals as NVML keeps them: running KiB per field, stamped in microseconds."""
        totals = self._value(h, "nvlink")
        return [SimpleNamespace(nvmlReturn=self.NVML_SUCCESS, timestamp=totals["us"],
                                value=SimpleNamespace(ullVal=totals[field_id])) for field_id, _scope in fields]

    def nvmlDeviceGetTotalEccErrors(self, h, kind, counter): return self._value(h, "ecc")[kind]
    def nvmlDeviceGetRemappedRows(self, h): return self._value(h, "remapped")
    def nvmlEventSetCreate(self): return "events"
    def nvmlDeviceRegisterEvents(self, h, kinds, events): self._gpu(h)

    def nvmlEventSetWait_v2(self, events, timeout_ms):
        if not self.xids:
            raise pynvml.NVMLError_Timeout(pynvml.NVML_ERROR_TIMEOUT)
        handle, xid = self.xids.pop(0)
        return SimpleNamespace(device=handle, eventData=xid)


def _gpu(**overrides) -> dict:
    gpu = {"util": {"gpu": 87, "memory": 40}, "memory": {"used": 10 * 2**30, "free": 70 * 2**30, "reserved": 2**29},
           "temp": 61, "power_mw": 312_500, "sm_clock": 1980, "mem_clock": 2619, "pcie_kib": 2048,
           "ecc": {0: 3, 1: 0}, "remapped": (1, 0, False, False)}
    gpu.update(overrides)
    return gpu


def test_normal_values_under_dcgm_names_and_labels() -> None:
    nvml = FakeNVML({0: _gpu(), 1: _gpu(temp=70)})
    reading = GpuCollector(rank=3, indices=[1], nvml=nvml, hostname="node7").collect()
    assert reading.available and reading.rank == "3"
    [gpu] = reading.gpus
    assert gpu.labels == {"gpu": "1", "UUID": "GPU-0001", "pci_bus_id": "00000000:01:00.0", "device": "nvidia1",
                          "modelName": "NVIDIA H100 80GB HBM3", "Hostname": "node7", "rank": "3"}
    v = gpu.values
    assert (v["DCGM_FI_DEV_GPU_UTIL"], v["DCGM_FI_DEV_MEM_COPY_UTIL"]) == (87, 40)
    assert (v["DCGM_FI_DEV_FB_USED"], v["DCGM_FI_DEV_FB_FREE"]) == (10 * 1024, 70 * 1024)  # MiB, as DCGM
    assert v["DCGM_FI_DEV_GPU_TEMP"] == 70 and v["DCGM_FI_DEV_POWER_USAGE"] == 312.5  # W, from mW
    assert (v["DCGM_FI_DEV_SM_CLOCK"], v["DCGM_FI_DEV_MEM_CLOCK"]) == (1980, 2619)
    assert v["DCGM_FI_PROF_PCIE_TX_BYTES"] == 2048 * 1024 and v["DCGM_FI_DEV_XID_ERRORS"] == 0
    assert v["DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"] == 3 and v["DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS"] == 1
    assert "DCGM_FI_PROF_NVLINK_TX_BYTES" not in v  # no NVLink on this stand-in


def test_nvlink_throughput_is_the_rate_of_nvml_running_totals() -> None:
    nvml = FakeNVML({0: _gpu(nvlink={138: 1_000, 139: 500, "us": 10_000_000})})
    collector = GpuCollector(rank=0, indices=[0], nvml=nvml, hostname="n")
    assert "DCGM_FI_PROF_NVLINK_TX_BYTES" not in collector.collect().gpus[0].values  # one total is no rate
    nvml.gpus[0]["nvlink"] = {138: 5_000, 139: 500, "us": 12_000_000}
    v = collector.collect().gpus[0].values
    assert v["DCGM_FI_PROF_NVLINK_TX_BYTES"] == 4_000 * 1024 / 2.0 and v["DCGM_FI_PROF_NVLINK_RX_BYTES"] == 0
    nvml.gpus[0]["nvlink"] = {138: 10, 139: 10, "us": 13_000_000}  # counters reset (driver reload)
    assert "DCGM_FI_PROF_NVLINK_TX_BYTES" not in collector.collect().gpus[0].values


def test_memory_used_leaves_reserved_memory_out_where_the_driver_can() -> None:
    [new_driver] = GpuCollector(rank=0, indices=[0], nvml=FakeNVML({0: _gpu()}), hostname="n").collect().gpus
    assert new_driver.values["DCGM_FI_DEV_FB_USED"] == 10 * 1024  # as nvidia-smi's memory.used
    old = GpuCollector(rank=0, indices=[0], nvml=FakeNVML({0: _gpu(memory_v2=False)}), hostname="n")
    for _ in range(2):
        [old_driver] = old.collect().gpus
        assert old_driver.values["DCGM_FI_DEV_FB_USED"] == 10 * 1024 + 512  # v1: reserved counted as used


def test_xid_events_are_remembered_per_gpu() -> None:
    nvml = FakeNVML({0: _gpu(), 1: _gpu()})
    collector = GpuCollector(rank=0, indices=[0, 1], nvml=nvml, hostname="n")
    collector.collect()
    nvml.xids.append((1, 79))
    first, second = collector.collect().gpus
    assert first.values["DCGM_FI_DEV_XID_ERRORS"] == 0 and second.values["DCGM_FI_DEV_XID_ERRORS"] == 79
    assert collector.collect().gpus[1].values["DCGM_FI_DEV_XID_ERRORS"] == 79


def test_an_unsupported_query_skips_that_value_on_that_gpu_only() -> None:
    nvml = FakeNVML({0: _gpu(power_mw=None, ecc=None), 1: _gpu()})
    first, second = GpuCollector(rank=0, indices=[0, 1], nvml=nvml, hostname="n").collect().gpus
    assert "DCGM_FI_DEV_POWER_USAGE" not in first.values and "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL" not in first.values
    assert first.values["DCGM_FI_DEV_GPU_UTIL"] == 87
    assert second.values["DCGM_FI_DEV_POWER_USAGE"] == 312.5


def test_a_gpu_that_disappears_is_skipped_and_comes_back() -> None:
    nvml = FakeNVML({0: _gpu(), 1: _gpu()})
    collector = GpuCollector(rank=0, indices=[0, 1], nvml=nvml, hostname="n")
    assert len(collector.collect().gpus) == 2
    lost = nvml.gpus.pop(1)
    reading = collector.collect()
    assert reading.available and [g.labels["gpu"] for g in reading.gpus] == ["0"]
    nvml.gpus[1] = lost
    assert len(collector.collect().gpus) == 2


def test_no_nvml_is_one_metric_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNVML({}, init_error=pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    collector = GpuCollector(rank=0, indices=[], nvml=nvml, hostname="cpu-box")
    readings = [collector.collect(), collector.collect()]
    assert all(not r.available and "NVML" in r.reason and r.gpus == [] for r in readings)
    assert len([r for r in caplog.records if "GPU metrics off" in r.getMessage()]) == 1
    metrics = JobMetrics(world_size=1)
    metrics.update_gpus(readings[:1])
    text = _exposition(metrics)
    assert 'orchestrator_gpu_collector_available{Hostname="cpu-box"' in text and "DCGM_FI" not in text


def test_exposition_uses_dcgm_names_with_rank() -> None:
    metrics = JobMetrics(world_size=1)
    metrics.update_gpus([GpuCollector(rank=0, indices=[0], nvml=FakeNVML({0: _gpu()}), hostname="n").collect()])
    text = _exposition(metrics)
    assert 'DCGM_FI_DEV_GPU_UTIL{Hostname="n",UUID="GPU-0000",device="nvidia0",gpu="0",modelName="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:00:00.0",rank="0"} 87.0' in text


@pytest.mark.parametrize(("name", "peak"), [("NVIDIA H100 80GB HBM3", 67e12), ("NVIDIA H100 PCIe", 51e12)])
def test_mfu_against_the_summed_peak_of_the_jobs_gpus(name: str, peak: float) -> None:
    metrics = JobMetrics(world_size=2)
    nvml = FakeNVML({0: _gpu(name=name), 1: _gpu(name=name)})
    metrics.update_gpus([GpuCollector(rank=r, indices=[r], nvml=nvml, hostname="n").collect() for r in (0, 1)])
    metrics.on_event({"event": "step", "ts": 1.0, "step": 1, "loss": 2.0, "step_time_s": 0.5, "flops": 2 * peak * 0.5 * 0.4})
    assert "orchestrator_model_flops_utilization 0.4" in _exposition(metrics)


def test_no_mfu_when_one_gpu_model_has_no_known_peak() -> None:
    metrics = JobMetrics(world_size=2)
    nvml = FakeNVML({0: _gpu(), 1: _gpu(name="Tesla T4")})
    metrics.update_gpus([GpuCollector(rank=r, indices=[r], nvml=nvml, hostname="n").collect() for r in (0, 1)])
    metrics.on_event({"event": "step", "ts": 1.0, "step": 1, "loss": 2.0, "step_time_s": 0.5, "flops": 1e12})
    assert "orchestrator_model_flops_utilization" not in _exposition(metrics)


def _exposition(metrics: JobMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()
