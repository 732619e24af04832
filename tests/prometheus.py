"""A real Prometheus for tests: Debian's ``prometheus`` on a free loopback port, scraping a run's
endpoints (the controller's and its nodes' GPU endpoints) every second with the scrape config
``orchestrator metrics RUN_DIR`` prints, stopped after."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import cli

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL),
    reason="Debian's prometheus package is not installed (bash .ci/setup installs it where apt-get runs as root)",
)


def run_scrape_config(run_dir: Path) -> list[dict[str, Any]]:
    """The scrape configs ``orchestrator metrics RUN_DIR`` prints for a running run, every second."""
    shown = cli("metrics", str(run_dir))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    scrapes = yaml.safe_load(shown.stdout.split("\n", 1)[1])["scrape_configs"]
    for scrape in scrapes:
        scrape["scrape_interval"] = "1s"
    return scrapes


class Prometheus:
    """``with Prometheus(tmp, scrapes, rules) as prom``: serving at ``prom.api`` inside the block."""

    def __init__(self, tmp: Path, scrapes: list[dict[str, Any]], rule_files: list[Path] = ()) -> None:
        self._tmp = tmp
        self._log = tmp / "prometheus.log"
        config = {"global": {"evaluation_interval": "1s"}, "rule_files": [str(p) for p in rule_files],
                  "scrape_configs": scrapes}
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self._port = s.getsockname()[1]
        self.api = f"http://127.0.0.1:{self._port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        self._proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self._tmp / 'prometheus.yml'}", f"--storage.tsdb.path={self._tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self._port}"],
            stdout=subprocess.DEVNULL, stderr=self._log.open("w"),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc is not None
        self._proc.terminate()
        self._proc.wait(timeout=30)

    def get(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.api}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why in the body
            return json.loads(exc.read())

    def query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query", query=expr)

    def wait_until(self, what: str, ok: Callable[[], Any], timeout: float, job: subprocess.Popen | None = None) -> Any:
        """``ok()``'s first true answer, polled until ``timeout`` s; fails if the job or Prometheus ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert job is None or job.poll() is None, f"the job ended before: {what}"
            assert self._proc is not None and self._proc.poll() is None, self._log.read_text()[-3000:]
            try:
                answer = ok()
            except OSError:
                answer = None
            if answer:
                return answer
            time.sleep(0.5)
        raise AssertionError(f"not within {timeout:.0f} s: {what}")
