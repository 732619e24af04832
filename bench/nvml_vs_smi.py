"""The GPU collector's readings beside ``nvidia-smi --query-gpu`` for the same GPUs, read back to back.

Prints one row per DCGM field: the collector's value, nvidia-smi's, and whether they agree
(exactly for counts and sizes; within a tolerance for values that move between two reads:
utilization, power, temperature, clocks). Loads a GPU first (a matrix product on every GPU in a
background thread) so utilization, power and clocks are not all idle values.

    .venv/bin/python bench/nvml_vs_smi.py [--load-s 20]

Needs NVML and nvidia-smi; exits 2 with the reason elsewhere.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.monitor.gpu import GpuCollector  # noqa: E402

# DCGM field -> (nvidia-smi query field, absolute tolerance); None: must match exactly.
SMI_FIELDS: dict[str, tuple[str, float | None]] = {
    "DCGM_FI_DEV_GPU_UTIL": ("utilization.gpu", 15.0),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("utilization.memory", 15.0),
    "DCGM_FI_DEV_FB_USED": ("memory.used", 64.0),
    "DCGM_FI_DEV_FB_FREE": ("memory.free", 64.0),
    "DCGM_FI_DEV_ENC_UTIL": ("utilization.encoder", 15.0),
    "DCGM_FI_DEV_DEC_UTIL": ("utilization.decoder", 15.0),
    "DCGM_FI_DEV_FB_RESERVED": ("memory.reserved", 64.0),
    "DCGM_FI_DEV_GPU_TEMP": ("temperature.gpu", 2.0),
    "DCGM_FI_DEV_MEMORY_TEMP": ("temperature.memory", 2.0),
    "DCGM_FI_DEV_POWER_USAGE": ("power.draw", 60.0),
    "DCGM_FI_DEV_SM_CLOCK": ("clocks.sm", 100.0),
    "DCGM_FI_DEV_MEM_CLOCK": ("clocks.mem", 1.0),
    "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL": ("ecc.errors.corrected.volatile.total", None),
    "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL": ("ecc.errors.uncorrected.volatile.total", None),
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": ("remapped_rows.correctable", None),
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": ("remapped_rows.uncorrectable", None),
}


def smi(indices: list[int]) -> dict[int, dict[str, str]]:
    """nvidia-smi's values per GPU index, as text (``[N/A]`` and the like kept as they are)."""
    queries = ["index", *(query for query, _ in SMI_FIELDS.values())]
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={','.join(queries)}", "--format=csv,noheader,nounits"],
        check=True, capture_output=True, text=True, timeout=60).stdout
    rows = {}
    for line in out.strip().splitlines():
        cells = [cell.strip() for cell in line.split(",")]
        rows[int(cells[0])] = dict(zip(queries[1:], cells[1:]))
    return {index: rows[index] for index in indices}


def load(stop: threading.Event) -> None:
    """Keep every GPU busy with bf16 matrix products until ``stop``."""
    import torch

    mats = [torch.randn(8192, 8192, device=f"cuda:{i}", dtype=torch.bfloat16) for i in range(torch.cuda.device_count())]
    while not stop.is_set():
        for m in mats:
            m @ m
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load-s", type=float, default=20.0, help="seconds of load before reading")
    args = parser.parse_args()
    if shutil.which("nvidia-smi") is None:
        print("bench/nvml_vs_smi.py needs nvidia-smi on PATH", file=sys.stderr)
        return 2
    import pynvml

    pynvml.nvmlInit()
    indices = list(range(pynvml.nvmlDeviceGetCount()))
    collector = GpuCollector(indices=indices)
    stop = threading.Event()
    worker = threading.Thread(target=load, args=(stop,), daemon=True)
    worker.start()
    try:
        time.sleep(args.load_s)  # a real wait: utilization is averaged by the driver over its own window
        collector.collect()  # the first reading primes the rate fields
        time.sleep(1.0)
        reading = collector.collect()
        smi_rows = smi(indices)
    finally:
        stop.set()
        worker.join(timeout=60)
    print(f"driver {pynvml.nvmlSystemGetDriverVersion()}, NVML {pynvml.nvmlSystemGetNVMLVersion()}")
    disagree = 0
    for sample in reading.gpus:
        index = int(sample.labels["gpu"])
        print(f"\nGPU {index}: {sample.labels['modelName']} {sample.labels['UUID']} bus {sample.labels['pci_bus_id']}")
        print(f"{'DCGM field':42}{'collector':>14}{'nvidia-smi':>14}  agree")
        for name in sorted(set(sample.values) | set(SMI_FIELDS)):
            mine = sample.values.get(name)
            query, tolerance = SMI_FIELDS.get(name, ("", None))
            theirs = smi_rows[index].get(query, "") if query else ""
            try:
                theirs_value: float | None = float(theirs)
            except ValueError:
                theirs_value = None
            if mine is None or theirs_value is None:
                verdict = "absent" if mine is None and theirs_value is None else ("-" if not query else "one side only")
            else:
                verdict = "yes" if abs(mine - theirs_value) <= (tolerance or 0.0) else "NO"
            disagree += verdict in ("NO", "one side only")
            shown = "absent" if mine is None else f"{mine:.6g}"
            print(f"{name:42}{shown:>14}{theirs or '-':>14}  {verdict}")
    print(f"\n{disagree} field(s) disagree")
    return 1 if disagree else 0


if __name__ == "__main__":
    raise SystemExit(main())
