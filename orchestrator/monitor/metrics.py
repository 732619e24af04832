"""The run's Prometheus metrics: job metrics (``orchestrator_*``) and the nodes' GPU metrics (``DCGM_FI_*``).

:class:`JobMetrics` owns one ``CollectorRegistry``. The controller feeds it
every event it emits (:meth:`on_event`), the per-rank view on each poll
(:meth:`update_ranks`) and the GPU readings of its node agents
(:meth:`update_gpus`); the exporter's HTTP thread renders it on each scrape.
``docs/monitoring.md`` lists every metric with its type, unit and labels.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.controller.failures import Reason
from orchestrator.monitor.goodput import CAUSES, GoodputTracker
from orchestrator.monitor.gpu import FIELDS, LABELS, GpuReading

# Dense fp32 peak FLOP/s by a part of NVML's model name, most specific first (training runs in
# fp32); for model FLOPs utilisation. Other devices get no MFU.
PEAK_FLOPS = (("H100 PCIe", 51e12), ("H100 NVL", 60e12), ("H100", 67e12), ("H200", 67e12), ("A100", 19.5e12))
_CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)
# Step-event fields that not every training code (or every step) reports: each series appears with
# its first report, so that a dashboard shows no data rather than a 0 nobody measured.
_REPORTED = {
    "tokens_per_s": ("orchestrator_tokens_per_second", "Global training throughput of the last step."),
    "lr": ("orchestrator_learning_rate", "Learning rate of the last step."),
    "grad_norm": ("orchestrator_grad_norm", "Global gradient norm of the last step."),
    "heldout_loss": ("orchestrator_heldout_loss",
                     "Loss on the held-out bytes at the last evaluation (evaluation.heldout_bytes)."),
}


class JobMetrics:
    """Everything the endpoint serves for one run."""

    def __init__(self, world_size: int, clock: Any = time.time, prediction: dict[str, Any] | None = None) -> None:
        """``prediction``: a scaling prediction for this run (``orchestrator scaling fit``), watched
        against its held-out losses."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lock = threading.Lock()
        r = self.registry
        self.info = Gauge("orchestrator_run_info", "The run: always 1, its identity in labels.",
                          ["run_id", "world_size", "zero_stage", "tensor_parallel"], registry=r)
        self.loss = Gauge("orchestrator_training_loss", "Training loss of the last step (rank 0's report).", registry=r)
        self.step = Gauge("orchestrator_training_step", "Last completed training step.", registry=r)
        self.step_time = Gauge("orchestrator_step_time_seconds", "Wall time of the last step (rank 0).", registry=r)
        self._reported: dict[str, Gauge] = {}  # by _REPORTED's key, registered on first report
        self.mfu: Gauge | None = None  # registered once a GPU with a known peak reports
        self.rank_up = Gauge("orchestrator_rank_up", "1 while the rank's training process runs.", ["rank"], registry=r)
        self.rank_heartbeat_age = Gauge("orchestrator_rank_heartbeat_age_seconds",
                                        "Seconds since the rank last reported progress (a step or checkpoint work).",
                                        ["rank"], registry=r)
        self.rank_step_time = Gauge("orchestrator_rank_step_time_seconds", "Wall time of the rank's last step.",
                                    ["rank"], registry=r)
        self.rank_step = Gauge("orchestrator_rank_step", "Last step the rank reported.", ["rank"], registry=r)
        self.rank_info = Gauge("orchestrator_rank_info",
                               "1 for the node each rank runs on (its address): joins the rank's series with its "
                               "node's GPUs (DCGM_* series carry rank and node).", ["rank", "node"], registry=r)
        self._rank_nodes: dict[str, str] = {}
        self.spare_nodes = Gauge("orchestrator_spare_nodes", "Spare nodes available to take a lost node's place.",
                                 registry=r)
        self.spare_nodes_configured = Gauge("orchestrator_spare_nodes_configured",
                                            "Spare nodes the job asked for (cluster.spare_nodes).", registry=r)
        self.restarts = Counter("orchestrator_restarts", "Recoveries, by the root cause's reason.", ["reason"], registry=r)
        self.failures = Counter("orchestrator_failures", "Failures, by the root cause's reason (one per incident).",
                                ["reason"], registry=r)
        self.ckpt_duration = Histogram("orchestrator_checkpoint_duration_seconds",
                                       "Save time of committed checkpoints (slowest rank: blocked + write).",
                                       buckets=_CHECKPOINT_BUCKETS, registry=r)
        self.ckpt_blocked = Histogram("orchestrator_checkpoint_blocked_seconds",
                                      "Training time blocked per committed checkpoint (slowest rank).",
                                      buckets=_CHECKPOINT_BUCKETS, registry=r)
        self.ckpt_bytes = Gauge("orchestrator_checkpoint_bytes", "Size of the last committed checkpoint.", registry=r)
        self.ckpt_step = Gauge("orchestrator_checkpoint_last_step", "Step of the last committed checkpoint.", registry=r)
        self.ckpt_failures = Counter("orchestrator_checkpoint_failures", "Checkpoint saves that failed.", registry=r)
        self.goodput = Gauge("orchestrator_goodput_ratio", "Productive training time / wall time of this launch.",
                             registry=r)
        self.productive = Gauge("orchestrator_productive_seconds", "Step time of steps trained for the first time.",
                                registry=r)
        self.wall = Gauge("orchestrator_wall_seconds", "Wall time since this launch started.", registry=r)
        self.badput = Gauge("orchestrator_badput_seconds", "Wall time not spent on productive steps, by cause.",
                            ["cause"], registry=r)
        for cause in CAUSES:
            self.badput.labels(cause=cause)
        # Every known reason has a series from the start, so increase() sees the first restart.
        for reason in get_args(Reason):
            self.restarts.labels(reason=reason)
            self.failures.labels(reason=reason)
        for rank in range(world_size):
            self.rank_up.labels(rank=str(rank)).set(0)
        self.gpus = _GpuFamilies()
        self._prediction = prediction
        if prediction is not None:
            self.predicted_final = Gauge("orchestrator_predicted_final_loss",
                                         "The scaling prediction of this run's final held-out loss: its point and "
                                         "interval bounds.", ["bound"], registry=r)
            self.predicted_heldout = Gauge("orchestrator_predicted_heldout_loss",
                                           "The held-out loss predicted at the step of the last evaluation (point and "
                                           "interval bounds), beside orchestrator_heldout_loss.", ["bound"], registry=r)
            low, high = prediction["prediction"]["interval"]
            for bound, value in (("point", prediction["prediction"]["final_loss"]), ("low", low), ("high", high)):
                self.predicted_final.labels(bound=bound).set(value)
        r.register(self.gpus)
        self._goodput = GoodputTracker()
        self._flops_per_step: float | None = None
        self._info: dict[str, str] = {}

    def on_event(self, event: dict[str, Any]) -> None:
        """Update from one event of the run's event log (the controller calls this for each)."""
        kind = event["event"]
        with self._lock:
            self._goodput.on_event(event)
        if kind == "run_started":
            cfg = event["config"]
            self._info = {"run_id": event["run_id"], "world_size": str(event["world_size"]),
                          "zero_stage": str(cfg["parallel"]["zero_stage"]),
                          "tensor_parallel": str(cfg["parallel"]["tensor_parallel"])}
            self.info.labels(**self._info).set(1)
        elif kind == "world_shrunk":
            self.info.clear()
            self._info["world_size"] = str(event["world_size"])
            self.info.labels(**self._info).set(1)
            for rank in range(event["world_size"], event["world_size_before"]):
                for family in (self.rank_up, self.rank_heartbeat_age, self.rank_step, self.rank_step_time):
                    family.remove(str(rank))  # a no-op for a series never set
                if str(rank) in self._rank_nodes:
                    self.rank_info.remove(str(rank), self._rank_nodes.pop(str(rank)))
        elif kind == "worker_started" and event.get("node_ip"):
            rank, node = str(event["rank"]), event["node_ip"]
            moved_from = self._rank_nodes.get(rank)
            if moved_from not in (None, node):
                self.rank_info.remove(rank, moved_from)
            self._rank_nodes[rank] = node
            self.rank_info.labels(rank=rank, node=node).set(1)
        elif kind == "step":
            self.step.set(event["step"])
            if event["loss"] is not None:
                self.loss.set(event["loss"])
            self.step_time.set(event["step_time_s"])
            for key, (name, documentation) in _REPORTED.items():
                if event.get(key) is not None:
                    if key not in self._reported:
                        self._reported[key] = Gauge(name, documentation, registry=self.registry)
                    self._reported[key].set(event[key])
            self._update_mfu(event)
            if self._prediction is not None and "heldout_loss" in event:
                self._update_prediction(event["step"])
        elif kind == "checkpoint_committed":
            self.ckpt_duration.observe(event["seconds"])
            self.ckpt_blocked.observe(event.get("blocked_s", 0.0))
            self.ckpt_bytes.set(event.get("bytes", 0))
            self.ckpt_step.set(event["step"])
        elif kind == "checkpoint_failed":
            self.ckpt_failures.inc()
        elif kind == "failure_detected" and event["root_cause"]:
            self.failures.labels(reason=event["reason"]).inc()
        elif kind == "recovery_started":
            self.restarts.labels(reason=event["reason"]).inc()

    def _update_prediction(self, step: int) -> None:
        from orchestrator.scaling.predict import predicted_at

        predicted = predicted_at(self._prediction, step)
        if predicted is not None:
            for bound, value in zip(("point", "low", "high"), predicted):
                self.predicted_heldout.labels(bound=bound).set(value)

    def update_ranks(self, ranks: Iterable[tuple[int, bool, float, int, float | None]]) -> None:
        """Per rank: (rank, running, seconds since progress, last step, last step time)."""
        for rank, running, age, step, step_time in ranks:
            label = str(rank)
            self.rank_up.labels(rank=label).set(1 if running else 0)
            self.rank_heartbeat_age.labels(rank=label).set(age)
            self.rank_step.labels(rank=label).set(step)
            if step_time is not None:
                self.rank_step_time.labels(rank=label).set(step_time)
        self._update_goodput()

    def update_spare_nodes(self, available: int, configured: int) -> None:
        """Spare nodes left (lost ones and ones that took a lost node's place are gone) and asked for."""
        self.spare_nodes.set(available)
        self.spare_nodes_configured.set(configured)

    def update_gpus(self, collections: list[GpuReading]) -> None:
        self.gpus.update(collections)

    def _update_goodput(self) -> None:
        with self._lock:
            report = self._goodput.report(self._clock())
        self.goodput.set(report.ratio)
        self.productive.set(report.productive_s)
        self.wall.set(report.wall_s)
        for cause, seconds in report.badput_s.items():
            self.badput.labels(cause=cause).set(seconds)

    def _update_mfu(self, event: dict[str, Any]) -> None:
        flops = event.get("flops")
        peak = self.gpus.peak_flops()
        if flops and peak and event["step_time_s"] > 0:
            if self.mfu is None:
                self.mfu = Gauge("orchestrator_model_flops_utilization",
                                 "Model FLOPs of the last step / (step time x summed fp32 peak FLOP/s of "
                                 "the job's GPUs); only where every GPU's peak is known.", registry=self.registry)
            self.mfu.set(flops / event["step_time_s"] / peak)


class _GpuFamilies(Collector):
    """The latest GPU collections, rendered as DCGM-named gauge families on each scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._collections: list[GpuReading] = []

    def update(self, collections: list[GpuReading]) -> None:
        with self._lock:
            self._collections = list(collections)

    def peak_flops(self) -> float:
        """Summed peak FLOP/s of the job's GPUs (those a rank uses), 0 when any model is unknown or there are none."""
        with self._lock:
            models = [g.labels["modelName"] for c in self._collections for g in c.gpus if g.labels["gpu"] in c.ranks]
        peaks = [next((p for name, p in PEAK_FLOPS if name in m), 0.0) for m in models]
        return sum(peaks) if peaks and all(peaks) else 0.0

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            collections = list(self._collections)
        available = GaugeMetricFamily("orchestrator_gpu_collector_available",
                                      "1 where NVML answered on the rank's node, 0 where it is missing "
                                      "(see the reason label).", labels=["rank", "node", "Hostname", "reason"])
        # Typed gauge, counters included: prometheus-client would add "_total" to a counter's name,
        # and these keep DCGM's names (docs/monitoring.md).
        families = {name: GaugeMetricFamily(name, text, labels=list(LABELS)) for name, text in FIELDS.items()}
        for collection in collections:
            for rank in sorted(set(collection.ranks.values()), key=int) or [""]:
                available.add_metric([rank, collection.node, collection.hostname, collection.reason],
                                     1 if collection.available else 0)
            where = {"Hostname": collection.hostname, "node": collection.node, "instance": collection.node}
            for gpu in collection.gpus:
                merged = {**gpu.labels, **where, "rank": collection.ranks.get(gpu.labels["gpu"], "")}
                labels = [merged[k] for k in LABELS]
                for name, value in gpu.values.items():
                    if not math.isnan(value):
                        families[name].add_metric(labels, value)
        yield available
        for family in families.values():
            if family.samples:
                yield family
