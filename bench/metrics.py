"""Does serving metrics slow training? The local job with metrics off, and on with a scrape every second.

Runs ``cluster_configs/local.yaml`` alternately with ``metrics.enabled=false``
and with the endpoint on and scraped once a second (as a Prometheus with
``scrape_interval: 1s`` would), ``--repeats`` times each, in one invocation.
Throughput is steps per second between step ``--skip`` and the last step,
from the step events' timestamps (start-up left out). Target (issue 5):
scraped throughput >= 99% of the metrics-off throughput.

    .venv/bin/python bench/metrics.py [--steps 400] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

from orchestrator.events import read_events
from orchestrator.installation import with_interpreter_tools

REPO = Path(__file__).resolve().parent.parent


def run(steps: int, skip: int, metrics: bool, work: Path) -> tuple[float, int]:
    run_dir = Path(tempfile.mkdtemp(dir=work))
    cmd = [sys.executable, "-m", "orchestrator", "launch", str(REPO / "cluster_configs" / "local.yaml"),
           "--run-dir", str(run_dir), "--set", f"train.steps={steps}", "--set", "metrics.port=0",
           "--set", f"metrics.enabled={'true' if metrics else 'false'}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=with_interpreter_tools(dict(os.environ)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    scrapes = 0
    stop = threading.Event()

    def scrape() -> None:
        nonlocal scrapes
        url = None
        while not stop.is_set() and url is None:
            if (run_dir / "events.jsonl").exists():
                url = next((e["url"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "metrics_started"), None)
            stop.wait(0.2)
        while url and not stop.wait(1.0):
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    response.read()
                scrapes += 1
            except OSError:
                pass

    scraper = threading.Thread(target=scrape, daemon=True)
    if metrics:
        scraper.start()
    try:
        proc.wait(timeout=1200)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"run failed ({proc.returncode}): {run_dir}"
    steps_seen = {e["step"]: e["ts"] for e in read_events(run_dir / "events.jsonl") if e["event"] == "step"}
    return (steps - skip) / (steps_seen[steps] - steps_seen[skip]), scrapes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--skip", type=int, default=50, help="steps left out at the start (warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rates: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as work:
        for _ in range(args.repeats):
            for metrics in (False, True):
                rate, scrapes = run(args.steps, args.skip, metrics, Path(work))
                rates[metrics].append(rate)
                label = f"on, {scrapes} scrapes" if metrics else "off"
                print(f"metrics {label}: {rate:.2f} steps/s", flush=True)
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"median steps/s: off {off:.2f}, on and scraped every second {on:.2f}")
    print(f"ratio on/off: {on / off:.3f} (target >= 0.99)")
    return 0 if on / off >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
