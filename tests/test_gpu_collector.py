"""The NVML collector against the stand-in NVML (``orchestrator/monitor/simulated_nvml.py``):
normal values, GPM ratios, rates of running totals, unsupported queries, lost GPUs, no NVML."""

from __future__ import annotations

import json

import pynvml
import pytest

from orchestrator.events import Step, WorkerStarted
from orchestrator.monitor.gpu import FIELDS, GpuCollector, GpuReading
from orchestrator.monitor.gpu_endpoint import GpuFamilies, TargetsFile, listen_address, serve
from orchestrator.monitor.metrics import JobMetrics, RankSample
from orchestrator.monitor.simulated_nvml import (
    GPM_DRAM,
    GPM_GRAPHICS,
    GPM_TENSOR,
    NVLINK_RX,
    NVLINK_TX,
    SimulatedNVML,
    simulated_gpu,
)
from tests.helpers import REPO


def _gpu(**overrides) -> dict:
    """A GPU with every feature but NVLink and GPM (which tests add)."""
    gpu = {"util": {"gpu": 87, "memory": 40}, "memory": {"used": 10 * 2**30, "free": 70 * 2**30, "reserved": 2**29},
           "temp": 61, "memory_temp": 72, "power_mw": 312_500, "energy_mj": 1_000_000, "sm_clock": 1980,
           "mem_clock": 2619, "pcie_kib": 2048, "pcie_replay": 4, "enc_util": 3, "dec_util": 5,
           "ecc": {0: 3, 1: 0}, "remapped": (1, 0, False, False)}
    gpu.update(overrides)
    return gpu


def test_normal_values_under_dcgm_names_and_labels() -> None:
    nvml = SimulatedNVML({0: _gpu(), 1: _gpu(temp=70)}, clock=lambda: 100.0)
    reading = GpuCollector(indices=[1], nvml=nvml, hostname="node7").collect()
    assert reading.available and reading.hostname == "node7"
    [gpu] = reading.gpus
    assert gpu.labels == {"gpu": "1", "UUID": "GPU-0001", "pci_bus_id": "00000000:19:00.0", "device": "nvidia1",
                          "modelName": "NVIDIA H100 80GB HBM3", "DCGM_FI_DRIVER_VERSION": "550.90.07"}
    v = gpu.values
    assert (v["DCGM_FI_DEV_GPU_UTIL"], v["DCGM_FI_DEV_MEM_COPY_UTIL"]) == (87, 40)
    assert (v["DCGM_FI_DEV_ENC_UTIL"], v["DCGM_FI_DEV_DEC_UTIL"]) == (3, 5)
    assert (v["DCGM_FI_DEV_FB_USED"], v["DCGM_FI_DEV_FB_FREE"]) == (10 * 1024, 70 * 1024)  # MiB, as DCGM
    assert v["DCGM_FI_DEV_FB_RESERVED"] == 512
    assert (v["DCGM_FI_DEV_GPU_TEMP"], v["DCGM_FI_DEV_MEMORY_TEMP"]) == (70, 72)
    assert v["DCGM_FI_DEV_POWER_USAGE"] == 312.5  # W, from mW
    assert v["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == 1_000_000  # mJ, NVML's own unit
    assert (v["DCGM_FI_DEV_SM_CLOCK"], v["DCGM_FI_DEV_MEM_CLOCK"]) == (1980, 2619)
    assert v["DCGM_FI_PROF_PCIE_TX_BYTES"] == 2048 * 1024 and v["DCGM_FI_DEV_XID_ERRORS"] == 0
    assert v["DCGM_FI_DEV_PCIE_REPLAY_COUNTER"] == 4
    assert v["DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"] == 3 and v["DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS"] == 1
    assert v["DCGM_FI_DEV_ROW_REMAP_FAILURE"] == 0
    # Absent, not zero: no NVLink and no GPM on this GPU.
    assert not {"DCGM_FI_PROF_NVLINK_TX_BYTES", "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
                "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"} & set(v)


def test_a_simulated_gpu_answers_every_field_from_its_second_reading() -> None:
    now = [1000.0]
    collector = GpuCollector(indices=[0], nvml=SimulatedNVML({0: simulated_gpu(0)}, clock=lambda: now[0]))
    first = collector.collect().gpus[0].values
    now[0] += 5
    second = collector.collect().gpus[0].values
    assert set(second) == set(FIELDS), set(FIELDS) - set(second)
    rates = ("DCGM_FI_PROF_NVLINK_TX_BYTES", "DCGM_FI_PROF_NVLINK_RX_BYTES", "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL",
             "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE")
    assert set(FIELDS) - set(first) == set(rates), "rates and GPM ratios need two readings"
    assert second["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] - first["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"] == 512_000 * 5


def test_gpm_ratios_are_nvmls_percentages_between_two_samples_over_100() -> None:
    nvml = SimulatedNVML({0: _gpu(gpm={GPM_GRAPHICS: 91.0, GPM_TENSOR: 42.5, GPM_DRAM: 35.0}), 1: _gpu()})
    collector = GpuCollector(indices=[0, 1], nvml=nvml, hostname="n")
    assert "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE" not in collector.collect().gpus[0].values  # one sample is no ratio
    hopper, older = collector.collect().gpus
    assert hopper.values["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"] == 0.425
    assert (hopper.values["DCGM_FI_PROF_GR_ENGINE_ACTIVE"], hopper.values["DCGM_FI_PROF_DRAM_ACTIVE"]) == (0.91, 0.35)
    assert not any(name.startswith("DCGM_FI_PROF_") and "PCIE" not in name for name in older.values), \
        "a GPU without GPM has no profiling ratios (absent, not zero)"


def test_nvlink_throughput_is_the_rate_of_nvml_running_totals() -> None:
    nvml = SimulatedNVML({0: _gpu(nvlink={NVLINK_TX: 1_000, NVLINK_RX: 500, "us": 10_000_000})})
    collector = GpuCollector(indices=[0], nvml=nvml, hostname="n")
    assert "DCGM_FI_PROF_NVLINK_TX_BYTES" not in collector.collect().gpus[0].values  # one total is no rate
    nvml.gpus[0]["nvlink"] = {NVLINK_TX: 5_000, NVLINK_RX: 1_500, "us": 12_000_000}
    v = collector.collect().gpus[0].values
    assert v["DCGM_FI_PROF_NVLINK_TX_BYTES"] == 4_000 * 1024 / 2.0 and v["DCGM_FI_PROF_NVLINK_RX_BYTES"] == 500 * 1024
    # DCGM's NVLINK_BANDWIDTH_TOTAL: both directions in KiB/s, / 1000.
    assert v["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"] == (2_000 + 500) / 1000
    nvml.gpus[0]["nvlink"] = {NVLINK_TX: 10, NVLINK_RX: 10, "us": 13_000_000}  # counters reset (driver reload)
    assert "DCGM_FI_PROF_NVLINK_TX_BYTES" not in collector.collect().gpus[0].values


def test_memory_used_leaves_reserved_memory_out_where_the_driver_can() -> None:
    [new_driver] = GpuCollector(indices=[0], nvml=SimulatedNVML({0: _gpu()}), hostname="n").collect().gpus
    assert new_driver.values["DCGM_FI_DEV_FB_USED"] == 10 * 1024  # as nvidia-smi's memory.used
    old = GpuCollector(indices=[0], nvml=SimulatedNVML({0: _gpu(memory_v2=False)}), hostname="n")
    for _ in range(2):
        [old_driver] = old.collect().gpus
        assert old_driver.values["DCGM_FI_DEV_FB_USED"] == 10 * 1024 + 512  # v1: reserved counted as used


def test_xid_events_are_remembered_per_gpu() -> None:
    nvml = SimulatedNVML({0: _gpu(), 1: _gpu()})
    collector = GpuCollector(indices=[0, 1], nvml=nvml, hostname="n")
    collector.collect()
    nvml.xids.append((1, 79))
    first, second = collector.collect().gpus
    assert first.values["DCGM_FI_DEV_XID_ERRORS"] == 0 and second.values["DCGM_FI_DEV_XID_ERRORS"] == 79
    assert collector.collect().gpus[1].values["DCGM_FI_DEV_XID_ERRORS"] == 79


def test_an_unsupported_query_skips_that_value_on_that_gpu_only() -> None:
    nvml = SimulatedNVML({0: _gpu(power_mw=None, ecc=None), 1: _gpu()})
    first, second = GpuCollector(indices=[0, 1], nvml=nvml, hostname="n").collect().gpus
    assert "DCGM_FI_DEV_POWER_USAGE" not in first.values and "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL" not in first.values
    assert first.values["DCGM_FI_DEV_GPU_UTIL"] == 87
    assert second.values["DCGM_FI_DEV_POWER_USAGE"] == 312.5


def test_a_gpu_that_disappears_is_skipped_and_comes_back() -> None:
    nvml = SimulatedNVML({0: _gpu(), 1: _gpu()})
    collector = GpuCollector(indices=[0, 1], nvml=nvml, hostname="n")
    assert len(collector.collect().gpus) == 2
    lost = nvml.gpus.pop(1)
    reading = collector.collect()
    assert reading.available and [g.labels["gpu"] for g in reading.gpus] == ["0"]
    nvml.gpus[1] = lost
    assert len(collector.collect().gpus) == 2


def test_no_nvml_is_one_metric_and_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    nvml = SimulatedNVML({}, init_error=pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    collector = GpuCollector(indices=[], nvml=nvml, hostname="cpu-box")
    readings = [collector.collect(), collector.collect()]
    assert all(not r.available and "NVML" in r.reason and r.gpus == [] for r in readings)
    assert len([r for r in caplog.records if "GPU metrics off" in r.getMessage()]) == 1
    text = _gpu_exposition(readings[0], {}, "10.0.0.9")
    assert ('orchestrator_gpu_collector_available{Hostname="cpu-box",node="10.0.0.9",rank="",reason='
            in text) and "DCGM_FI" not in text


def test_a_nodes_endpoint_uses_dcgm_names_with_the_rank_and_node_of_each_gpu() -> None:
    reading = GpuCollector(indices=[0, 1], nvml=SimulatedNVML({0: _gpu(), 1: _gpu()}), hostname="n").collect()
    text = _gpu_exposition(reading, {"1": "5"}, "10.0.0.2")  # rank 5 uses GPU 1; GPU 0 is nobody's
    assert ('DCGM_FI_DEV_GPU_UTIL{DCGM_FI_DRIVER_VERSION="550.90.07",Hostname="n",UUID="GPU-0001",device="nvidia1",'
            'gpu="1",modelName="NVIDIA H100 80GB HBM3",node="10.0.0.2",pci_bus_id="00000000:19:00.0",rank="5"} 87.0'
            ) in text
    assert 'gpu="0",modelName="NVIDIA H100 80GB HBM3",node="10.0.0.2",pci_bus_id="00000000:18:00.0",rank=""' in text
    assert "instance=" not in text, "Prometheus sets instance: the node's endpoint, as dcgm-exporter's"
    assert 'orchestrator_gpu_collector_available{Hostname="n",node="10.0.0.2",rank="5",reason=""} 1.0' in text


def test_the_job_endpoint_has_no_gpu_series_and_joins_ranks_to_nodes() -> None:
    metrics = JobMetrics()
    metrics.watch_ranks(lambda: [RankSample(0, True, 0.1, 1, 0.1)])
    metrics.on_event(_worker(1.0, "10.0.0.2"))
    text = _exposition(metrics)
    assert "DCGM_FI" not in text and "orchestrator_gpu_collector_available" not in text
    assert 'orchestrator_rank_info{node="10.0.0.2",rank="0"} 1.0' in text
    metrics.on_event(_worker(2.0, "10.0.0.3"))
    text = _exposition(metrics)
    assert 'orchestrator_rank_info{node="10.0.0.3",rank="0"} 1.0' in text
    assert 'orchestrator_rank_info{node="10.0.0.2"' not in text, "a rank that moved is on its new node only"


def test_the_docs_list_every_exported_field() -> None:
    docs = (REPO / "docs" / "monitoring.md").read_text()
    assert [name for name in FIELDS if f"`{name}`" not in docs] == []


@pytest.mark.parametrize(("name", "precision", "peak"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12), ("NVIDIA H100 80GB HBM3", "fp32", 67e12),
    ("NVIDIA H100 PCIe", "fp16", 756e12), ("NVIDIA H200", "bf16", 989e12),
])
def test_mfu_against_the_summed_peak_of_the_jobs_gpus_in_the_dtype_trained_in(name: str, precision: str,
                                                                                peak: float) -> None:
    metrics = JobMetrics()
    metrics.set_gpu_models([name, name], precision)  # one node's two GPUs, each used by its local rank
    metrics.on_event(Step(ts=1.0, step=1, loss=2.0, step_time_s=0.5, tokens_per_s=None, flops=2 * peak * 0.5 * 0.4))
    assert "orchestrator_model_flops_utilization 0.4" in _exposition(metrics)


def test_no_mfu_when_one_gpu_model_has_no_known_peak() -> None:
    metrics = JobMetrics()
    metrics.set_gpu_models(["NVIDIA H100 80GB HBM3", "Tesla T4"])
    metrics.on_event(Step(ts=1.0, step=1, loss=2.0, step_time_s=0.5, tokens_per_s=None, flops=1e12))
    assert "orchestrator_model_flops_utilization" not in _exposition(metrics)


def test_a_gpu_endpoint_listens_where_metrics_host_says_and_is_reached_at_the_node() -> None:
    assert listen_address("127.0.0.1", "10.0.0.2") == ("127.0.0.1", "127.0.0.1"), "loopback stays loopback"
    assert listen_address("0.0.0.0", "10.0.0.2") == ("0.0.0.0", "10.0.0.2")
    assert listen_address("10.0.0.1", "10.0.0.2") == ("10.0.0.2", "10.0.0.2"), "the controller's address: the node's"
    assert listen_address("head.example", "10.0.0.2") == ("10.0.0.2", "10.0.0.2")
    assert listen_address("::1", "10.0.0.2") == ("::1", "::1") and listen_address("::", "10.0.0.2") == ("::", "10.0.0.2")


def test_a_gpu_endpoint_serves_the_latest_reading_over_http() -> None:
    import urllib.request

    readings = [GpuReading(hostname="n", available=False, reason="no NVML")]
    server = serve(GpuFamilies(lambda: readings[-1], dict, node="127.0.0.1"), "127.0.0.1", 0)
    try:
        def scrape() -> str:
            with urllib.request.urlopen(server.url, timeout=10) as response:
                return response.read().decode()
        assert 'orchestrator_gpu_collector_available{Hostname="n",node="127.0.0.1",rank="",reason="no NVML"} 0.0' \
            in scrape()
        readings.append(GpuCollector(indices=[0], nvml=SimulatedNVML({0: _gpu()}), hostname="n").collect())
        assert 'DCGM_FI_DEV_GPU_TEMP{' in scrape()
    finally:
        server.close()


def test_the_targets_file_lists_the_endpoints_and_changes_only_with_them(tmp_path) -> None:
    path = tmp_path / "prometheus" / "gpu-targets.json"
    targets = TargetsFile(path, "run1")
    assert json.loads(path.read_text()) == [{"targets": [], "labels": {"run_id": "run1"}}], "there before any node"
    targets.update(["10.0.0.3:9400", "10.0.0.2:9400"])
    assert json.loads(path.read_text())[0]["targets"] == ["10.0.0.2:9400", "10.0.0.3:9400"]
    written = path.stat().st_mtime_ns
    targets.update(["10.0.0.2:9400", "10.0.0.3:9400"])
    assert path.stat().st_mtime_ns == written, "the same endpoints: not written again"
    assert [p.name for p in path.parent.iterdir()] == ["gpu-targets.json"], "written whole, through a rename"


def _worker(ts: float, node_ip: str) -> WorkerStarted:
    return WorkerStarted(ts=ts, rank=0, pid=1, node="n", node_ip=node_ip, node_id="id", attempt=0, spare=False,
                         forked=False)


def _exposition(metrics: JobMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


def _gpu_exposition(reading: GpuReading, ranks: dict[str, str], node: str) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuFamilies(lambda: reading, lambda: ranks, node=node))
    return generate_latest(registry).decode()
