"""The GPU path for real: the built-in GPT with the nccl backend on one NVIDIA GPU.

Skips (with the reason) on machines without a CUDA GPU, which is every CI machine today; run it
where there is one: ``.venv/bin/python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import math
import re
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import events, launch_args, losses_by_step, of_kind, start_cli, wait_for_event

pytestmark = [pytest.mark.processes, pytest.mark.timeout(600)]

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs an NVIDIA GPU with CUDA (torch.cuda.is_available() is False here)", allow_module_level=True)

STEPS = 3000  # long enough to scrape the endpoint while it trains


def test_built_in_gpt_trains_with_nccl_on_one_gpu(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start_cli(*launch_args(run_dir, "cluster.device=gpu", "cluster.workers_per_node=1",
                                  f"train.steps={STEPS}", "checkpoint.interval_steps=1000"))
    started = wait_for_event(run_dir, lambda e: e["event"] == "metrics_started", 300, proc)
    # NVML through the collector, read from the job's own endpoint while it trains (readings reach
    # the endpoint within two GPU intervals, about 10 s).
    scrape, deadline = "", time.monotonic() + 120
    while "DCGM_FI_DEV_GPU_UTIL{" not in scrape and time.monotonic() < deadline and proc.poll() is None:
        scrape = urllib.request.urlopen(started["url"], timeout=10).read().decode()
        time.sleep(0.5)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out

    evs = events(run_dir)
    assert of_kind(evs, "run_finished")[-1]["status"] == "succeeded"
    configured = of_kind(evs, "network_configured")[0]
    assert configured["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"
    assert "NCCL_IB_DISABLE" in configured["env"] or "NCCL_IB_HCA" in configured["env"]
    losses = losses_by_step(evs)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    assert losses[STEPS] < losses[1]
    # NCCL prints its version (NCCL_DEBUG=WARN and up) when a communicator is made: only the nccl backend makes one.
    assert re.search(r"NCCL version \d", (run_dir / "logs" / "rank0.log").read_text()), "no NCCL communicator"
    for family in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE"):
        assert re.search(rf"^{family}{{[^}}]*gpu=\"0\"", scrape, re.M), f"{family} missing from the endpoint"
