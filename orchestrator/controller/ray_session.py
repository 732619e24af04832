"""Connecting the controller to Ray: an embedded single-node Ray, or an existing cluster.

The embedded Ray listens on 127.0.0.1 only, runs no dashboard and sends no
usage statistics. Its services die with the controller (Ray ties them to
the driver that started them), so even a SIGKILLed controller leaves
nothing running.
"""

from __future__ import annotations

import logging
import os

from orchestrator.config.schema import Config
from orchestrator.worker.env import local_cpu_count

# Read by Ray when it is imported; with it, a single-node Ray binds loopback instead of
# the machine's external address (ray._private.services.get_node_ip_address).
_LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def connect(config: Config) -> bool:
    """Connect to Ray per ``cluster.ray_address``; returns True when this call started Ray."""
    embedded = config.cluster.ray_address is None
    if embedded:
        os.environ.update(_LOOPBACK_ONLY)
    import ray

    if ray.is_initialized():
        return False
    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if embedded:
        # Oversubscribe when the job has more ranks than cores (the CPU test mode on a laptop).
        ray.init(num_cpus=max(local_cpu_count(), config.cluster.world_size), **common)
    else:
        ray.init(address=config.cluster.ray_address, **common)
    return True


def disconnect() -> None:
    """Leave Ray; for an embedded Ray this also stops its services."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
