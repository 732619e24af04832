"""A node's GPU endpoint: its agent serves the node's GPUs under DCGM exporter's names.

One scrape target per node, as with one dcgm-exporter per node: Prometheus sets
``instance`` to the target, so NVIDIA's stock dashboard picks a node by it, and
the controller's endpoint carries the job's series only, however many nodes the
job has. Prometheus finds the targets through a file the controller keeps
current (:class:`TargetsFile`, file-based service discovery).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.monitor.exporter import MetricsServer
from orchestrator.monitor.gpu import FIELDS, LABELS, GpuReading

# Where the controller keeps the nodes' GPU endpoints for Prometheus, in the run directory.
GPU_TARGETS = Path("prometheus") / "gpu-targets.json"


class GpuFamilies(Collector):
    """The node's latest GPU reading, rendered as DCGM-named gauge families on each scrape.

    ``reading`` gives the latest reading (None before the first), ``ranks`` which rank uses each GPU
    now (its ``gpu`` label -> the rank; empty on a spare node); ``node`` is the node's address."""

    def __init__(self, reading: Callable[[], GpuReading | None], ranks: Callable[[], dict[str, str]],
                 node: str) -> None:
        self._reading = reading
        self._ranks = ranks
        self._node = node

    def collect(self) -> Iterator[Metric]:
        reading, ranks = self._reading(), self._ranks()
        if reading is None:
            return
        available = GaugeMetricFamily("orchestrator_gpu_collector_available",
                                      "1 where NVML answered on the rank's node, 0 where it is missing "
                                      "(see the reason label).", labels=["rank", "node", "Hostname", "reason"])
        for rank in sorted(set(ranks.values()), key=int) or [""]:
            available.add_metric([rank, self._node, reading.hostname, reading.reason], 1 if reading.available else 0)
        yield available
        # Typed gauge, counters included: prometheus-client would add "_total" to a counter's name,
        # and these keep DCGM's names (docs/monitoring.md).
        families = {name: GaugeMetricFamily(name, text, labels=list(LABELS)) for name, text in FIELDS.items()}
        where = {"Hostname": reading.hostname, "node": self._node}
        for gpu in reading.gpus:
            merged = {**gpu.labels, **where, "rank": ranks.get(gpu.labels["gpu"], "")}
            labels = [merged[k] for k in LABELS]
            for name, value in gpu.values.items():
                if not math.isnan(value):
                    families[name].add_metric(labels, value)
        yield from (family for family in families.values() if family.samples)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, bracketed or not, or a name) is this machine's loopback."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def listen_address(metrics_host: str, node_ip: str) -> tuple[str, str]:
    """Where a node's GPU endpoint listens, and the address Prometheus reaches it at, from
    ``metrics.host``: a loopback address stays loopback (only a Prometheus on the same machine
    reaches it), a wildcard listens everywhere and is reached at the node's address, and any other
    address or name (the controller node's) becomes the node's own."""
    if is_loopback(metrics_host):
        return metrics_host, metrics_host
    try:
        unspecified = ipaddress.ip_address(metrics_host).is_unspecified
    except ValueError:  # a host name: the controller node's, like any other specific address
        unspecified = False
    return (metrics_host, node_ip) if unspecified else (node_ip, node_ip)


def serve(families: GpuFamilies, host: str, port: int) -> MetricsServer:
    """Serve ``families`` at ``http://HOST:PORT/metrics`` (port 0: a free one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(families)
    return MetricsServer(registry, host, port, key="metrics.gpu_port")


class TargetsFile:
    """The nodes' GPU endpoints as a Prometheus file-based service-discovery file (``file_sd_configs``),
    rewritten (atomically: Prometheus never reads half of it) only when the set changes."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.path = path
        self._run_id = run_id
        self._written: list[str] | None = None
        self.update([])  # there from the start: a Prometheus started now watches it

    def update(self, targets: list[str]) -> None:
        targets = sorted(targets)
        if targets == self._written:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": targets, "labels": {"run_id": self._run_id}}], indent=1) + "\n")
        os.replace(tmp, self.path)
        self._written = targets
