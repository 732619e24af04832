"""The run's Prometheus endpoint: prometheus-client's HTTP server on ``metrics.host:metrics.port``."""

from __future__ import annotations

import errno
from typing import Any

from prometheus_client import start_http_server

from orchestrator.errors import ConfigError

# honor_labels: the GPU series carry their node's address as ``instance`` (one per node, as
# dcgm-exporter's one-per-node targets), which the scrape must keep.
SCRAPE_CONFIG = """\
scrape_configs:
  - job_name: orchestrator
    scrape_interval: 15s
    honor_labels: true
    static_configs:
      - targets: ["{target}"]
        labels:
          run_id: "{run_id}"
"""


class MetricsServer:
    """Serves ``registry`` at ``http://HOST:PORT/metrics`` on a daemon thread until :meth:`close`."""

    def __init__(self, registry: Any, host: str, port: int) -> None:
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"metrics.port: {host}:{port} is already in use; set metrics.port to a free port "
                    "(0 picks one) or metrics.enabled=false"
                ) from None
            raise ConfigError(f"metrics.host: cannot listen on {host}:{port}: {exc.strerror}") from None
        self.host = host
        self.port = self._server.server_address[1]

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.target}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def scrape_config(target: str, run_id: str) -> str:
    """A Prometheus ``scrape_configs`` entry for one run's endpoint."""
    return SCRAPE_CONFIG.format(target=target, run_id=run_id)
