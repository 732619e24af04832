"""The run's Prometheus endpoints: prometheus-client's HTTP server on ``metrics.host:metrics.port`` (the
controller's), or on a node's GPU port (its agent's, ``gpu_endpoint.py``)."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from orchestrator.errors import ConfigError

# The controller's endpoint, and the nodes' GPU endpoints found through the file the controller keeps.
SCRAPE_CONFIG = """\
scrape_configs:
  - job_name: orchestrator
    scrape_interval: 15s
    static_configs:
      - targets: ["{target}"]
        labels:
          run_id: "{run_id}"
  - job_name: orchestrator-gpus
    scrape_interval: 15s
    file_sd_configs:
      - files: [{gpu_targets}]
"""


class MetricsServer:
    """Serves ``registry`` at ``http://HOST:PORT/metrics`` on a daemon thread until :meth:`close`."""

    def __init__(self, registry: Any, host: str, port: int, key: str = "metrics.port") -> None:
        """``key``: the config key that set ``port``, named when it is taken."""
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"{key}: {host}:{port} is already in use; set {key} to a free port "
                    "(0 picks one) or metrics.enabled=false"
                ) from None
            raise ConfigError(f"metrics.host: cannot listen on {host}:{port}: {exc.strerror}") from None
        self.host = host
        self.port = self._server.server_address[1]

    @property
    def target(self) -> str:
        return host_port(self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.target}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL or a scrape target writes it (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def scrape_config(target: str, run_id: str, gpu_targets: Path) -> str:
    """Prometheus ``scrape_configs`` entries for one run: its controller's endpoint at ``target``, and
    its nodes' GPU endpoints listed in ``gpu_targets`` (file-based service discovery)."""
    return SCRAPE_CONFIG.format(target=target, run_id=run_id, gpu_targets=json.dumps(str(gpu_targets.absolute())))
