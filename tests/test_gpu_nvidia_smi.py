"""On a machine with an NVIDIA GPU, the collector agrees with nvidia-smi about the same GPU at the same time."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from orchestrator.monitor.gpu import GpuCollector


def _nvml_gpu_count() -> tuple[int, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount(), ""
    except Exception as exc:  # noqa: BLE001 - any failure means: no GPU to compare with
        return 0, f"NVML finds no GPU here: {exc}"


COUNT, WHY = _nvml_gpu_count()


@pytest.mark.skipif(COUNT == 0 or shutil.which("nvidia-smi") is None, reason=WHY or "nvidia-smi not found")
def test_collector_agrees_with_nvidia_smi() -> None:
    fields = "uuid,memory.used,memory.free,temperature.gpu,clocks.sm,clocks.mem,power.draw"
    smi = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=60, check=True).stdout.strip().split(", ")
    [gpu] = GpuCollector(indices=[0]).collect().gpus
    v = gpu.values
    assert gpu.labels["UUID"] == smi[0]
    assert abs(v["DCGM_FI_DEV_FB_USED"] - float(smi[1])) <= 64
    assert abs(v["DCGM_FI_DEV_FB_FREE"] - float(smi[2])) <= 64
    assert abs(v["DCGM_FI_DEV_GPU_TEMP"] - float(smi[3])) <= 2
    assert abs(v["DCGM_FI_DEV_SM_CLOCK"] - float(smi[4])) <= 0.1 * float(smi[4]) + 30
    assert abs(v["DCGM_FI_DEV_MEM_CLOCK"] - float(smi[5])) <= 0.1 * float(smi[5]) + 30
    if smi[6] not in ("[N/A]", "[Not Supported]"):
        assert abs(v["DCGM_FI_DEV_POWER_USAGE"] - float(smi[6])) <= 0.15 * float(smi[6]) + 20
