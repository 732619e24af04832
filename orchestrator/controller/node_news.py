"""What the controller tells of the job's nodes, each time it changes.

Which nodes hold which ranks and which are spare nodes (one terminal line, and the spare-node gauge),
each node's detected network (``network_configured``), a warm spare ready on a node
(``spare_ready``), a spare node lost while it waited (``spare_node_lost``: said at once, not found
out when a node fails), and the file through which Prometheus finds the nodes' GPU endpoints.
Nothing here decides anything: it reads the worker group and reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator import events as ev
from orchestrator.config.schema import Config
from orchestrator.controller.failures import rank_ranges
from orchestrator.controller.worker_group import NodeLayout, WorkerGroup
from orchestrator.events import EventLog
from orchestrator.monitor.gpu_endpoint import TargetsFile
from orchestrator.monitor.metrics import JobMetrics
from orchestrator.monitor.progress import ProgressDisplay

# How often the file that lists the nodes' GPU endpoints for Prometheus is brought up to date.
TARGETS_INTERVAL_S = 5.0


class NodeNews:
    """Reports ``group``'s nodes through ``events``, ``display`` and ``metrics`` (any may be None but
    the first two) as they change."""

    def __init__(self, config: Config, group: WorkerGroup, events: EventLog, display: ProgressDisplay,
                 metrics: JobMetrics | None, gpu_targets: TargetsFile | None, clock: Callable[[], float]) -> None:
        self._group = group
        self._events = events
        self._display = display
        self._metrics = metrics
        self._gpu_targets = gpu_targets
        self._clock = clock
        # Neither changes when the job shrinks.
        self._spares_configured = config.cluster.spare_nodes
        self._ft = config.fault_tolerance
        self._precision = config.train.precision
        self._warm_spares: dict[str, int] = {}
        self._layout_shown: NodeLayout | None = None
        self._networks_reported: dict[str, dict[str, Any]] = {}
        self._targets_written_at = float("-inf")

    def attempt_began(self) -> None:
        """The nodes' networks and layout as this attempt found them, and the GPUs its ranks use."""
        self._report_networks()
        self._show_layout()
        if self._metrics is not None:
            self._metrics.set_gpu_models(self._group.gpu_models(), self._precision)

    def look(self) -> None:
        """After each poll: warm spares ready, spare nodes lost, the GPU endpoints' file (now and then)."""
        warm = self._group.warm_spares()
        for node, pid in warm.items():
            if self._warm_spares.get(node) != pid:
                self._events.emit(ev.SpareReady(node=node, pid=pid))
        self._warm_spares = warm
        for address, why in self._group.lost_spares():
            self._spare_node_lost(address, why)
        now = self._clock()
        if self._gpu_targets is not None and now - self._targets_written_at >= TARGETS_INTERVAL_S:
            self._targets_written_at = now
            self._gpu_targets.update(self._group.gpu_endpoints())

    def _spare_node_lost(self, address: str, why: str) -> None:
        left, configured = len(self._group.layout().spares), self._spares_configured
        if self._metrics is not None:
            self._metrics.update_spare_nodes(left, configured)
        self._events.emit(ev.SpareNodeLost(node_ip=address, message=why, spare_nodes=left,
                                           spare_nodes_configured=configured))
        ft = self._ft
        if left:
            then = ""
        elif ft.allow_shrink:
            then = "; a lost node now shrinks the job (fault_tolerance.allow_shrink)"
        else:
            then = (f"; a lost node now waits up to fault_tolerance.node_wait_s={ft.node_wait_s:g}s for a new node, "
                    "then fails the run")
        self._display.note(f"spare node {address} lost ({why}); {left} of {configured} spare node(s) left{then}")

    def _show_layout(self) -> None:
        """One line naming the nodes that hold ranks and the spare nodes, whenever that changes."""
        layout = self._group.layout()
        if self._metrics is not None:  # spare nodes are taken (or found lost) only here and when lost
            self._metrics.update_spare_nodes(len(layout.spares), self._spares_configured)
        if layout == self._layout_shown or (len(layout.ranks) < 2 and not self._spares_configured):
            return
        self._layout_shown = layout
        nodes = ", ".join(f"{address} (ranks {rank_ranges(ranks)})" for address, ranks in layout.ranks.items())
        spares = ", ".join(layout.spares) or "none left" if self._spares_configured else ""
        self._display.note(f"nodes: {nodes}" + (f"; spare nodes: {spares}" if spares else ""))

    def _report_networks(self) -> None:
        """``network_configured`` once per node (again if what it detected changed), and one line each."""
        for node_id, found in self._group.node_networks().items():
            if self._networks_reported.get(node_id) == found:
                continue
            self._networks_reported[node_id] = found
            fields = {k: v for k, v in found.items() if k != "summary"}
            self._events.emit(ev.NetworkConfigured(node_id=node_id, **fields))
            self._display.note(f"network on node {found.get('address') or node_id[:8]}: {found['summary']}")
