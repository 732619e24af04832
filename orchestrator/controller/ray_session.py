"""Connecting the controller to Ray: an embedded single-node Ray, or an existing cluster.

The embedded Ray listens on 127.0.0.1 only, runs no dashboard, sends no
usage statistics and keeps its temporary files in a short directory of its
own under /tmp (removed when it stops), whatever ``TMPDIR`` says. Its services die with the controller (Ray ties them to
the driver that started them), so even a SIGKILLed controller leaves
nothing running.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.config.schema import Config
from orchestrator.controller.reaper import RUN_TOKEN_ENV, pids_running_from, ray_temp_dir
from orchestrator.dev_clusters import token_for
from orchestrator.errors import ClusterError
from orchestrator.worker.env import local_cpu_count

# Read by Ray when it is imported or started. The first makes a single-node Ray bind loopback
# instead of the machine's external address (ray._private.services.get_node_ip_address); token
# auth is Ray's default for new local clusters, made explicit.
# What every Ray node of ours runs with: the embedded one, the dev cluster's, a Slurm job's.
NODE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    # Ray renices its workers to 15, and the training processes our agents start inherit it
    # (a child cannot undo it without privilege): every Ray service would preempt training.
    "RAY_worker_niceness": "0",
    # Ray's memory monitor kills Ray workers when the node runs short, and the worker it picks is the node
    # agent (the ranks are the agent's children, not Ray workers): the ranks' overload would read as a lost
    # node. Without it the kernel's OOM killer takes the biggest process, a rank, and is named (reason oom).
    "RAY_memory_monitor_refresh_ms": "0",
}
_EMBEDDED_ENV = {**NODE_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


_temp_dir: str | None = None  # the embedded Ray's, while it runs
_STALE_AFTER_S = 60.0

_HOST_PORT = re.compile(r"^([\w.\-]+):(\d+)$")
_PROBE_TIMEOUT_S = 10.0


def connect(config: Config, messages_log: Path | None = None) -> bool:
    """Connect to Ray per ``cluster.ray_address``; returns True when this call started Ray. The
    cluster's messages Ray would print on the driver's terminal go to ``messages_log`` instead."""
    embedded = config.cluster.ray_address is None
    if embedded:
        # Assigned, not defaulted: an inherited environment must not turn these off unnoticed.
        os.environ.update(_EMBEDDED_ENV)
    else:
        _use_dev_cluster_token(config.cluster.ray_address)  # Ray reads it when imported
    import ray

    if messages_log is not None:
        _keep_ray_messages_in(messages_log)

    if ray.is_initialized():
        return False
    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if embedded:
        # Oversubscribe when the job has more ranks than cores (the CPU test mode on a laptop).
        # address="local": always a new Ray of our own, never one that happens to run here.
        # Its own short temporary directory, whatever TMPDIR is: Ray's socket paths live under it and
        # must stay below the 107-byte AF_UNIX limit (a per-job TMPDIR on clusters is long); removed
        # by disconnect().
        global _temp_dir
        _remove_stale_temp_dirs()
        token = os.environ.get(RUN_TOKEN_ENV)
        if token:  # the run's reaper removes it (and whatever runs from it) however the run ends
            _temp_dir = str(ray_temp_dir(token))
            os.makedirs(_temp_dir, mode=0o700, exist_ok=True)
        else:
            _temp_dir = tempfile.mkdtemp(prefix="orch-ray-", dir="/tmp")
        try:
            with _signal_handlers_kept():
                ray.init(address="local", num_cpus=max(local_cpu_count(), config.cluster.world_size),
                         _temp_dir=_temp_dir, **common)
        except Exception as exc:  # noqa: BLE001 - whatever Ray raises, the user gets one line
            _remove_temp_dir()
            raise ClusterError(f"could not start the embedded Ray: {type(exc).__name__}: {exc}") from None
        return True
    _probe(config.cluster.ray_address)
    try:
        with _signal_handlers_kept():
            ray.init(address=config.cluster.ray_address, **common)
    except ConnectionError as exc:
        raise ClusterError(
            f"cannot connect to the Ray cluster at cluster.ray_address={config.cluster.ray_address!r}: {exc}. "
            "Check that it is running (`ray status`); a cluster with token authentication also needs "
            "RAY_AUTH_MODE=token and its token (~/.ray/auth_token or RAY_AUTH_TOKEN) here."
        ) from None
    return True


def _keep_ray_messages_in(path: Path) -> None:
    """Ray's driver prints the cluster's error messages ("(raylet) The node ... has been marked dead
    ...", with raw colour codes) on the terminal, even with ``log_to_driver`` off; the controller says
    what happened in one line of its own. Ray has no setting for it: its printer, which its listener
    thread looks up at each message, writes to the run's log instead."""
    from ray._private import worker

    def to_log(data: dict[str, Any], ignore_prefix: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as log:
            log.writelines(f"({data.get('pid', 'ray')}) {line}\n" for line in data.get("lines", []))

    if hasattr(worker, "print_to_stdstream"):
        worker.print_to_stdstream = to_log


@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Keep the caller's SIGINT and SIGTERM handlers across ``ray.init``, which replaces SIGTERM's with
    ``sys.exit(15)``: a scheduler's SIGTERM would then end the launcher without stopping its ranks or
    writing ``run_finished``, after a stack dump from Ray's C++ core."""
    main = threading.current_thread() is threading.main_thread()
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)


def _use_dev_cluster_token(address: str) -> None:
    """A dev cluster of this machine (``orchestrator dev-cluster``) keeps its token in its state directory."""
    token = token_for(address)
    if token is not None and "RAY_AUTH_TOKEN" not in os.environ:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(token))


def _probe(address: str) -> None:
    """Fail fast when nothing listens at a ``HOST:PORT`` address: Ray itself retries for minutes."""
    match = _HOST_PORT.match(address)
    if match is None:
        return  # "auto" or "ray://...": Ray resolves these itself
    host, port = match.group(1), int(match.group(2))
    try:
        socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(
            f"cannot connect to the Ray cluster at cluster.ray_address={address!r}: {exc.strerror or exc}. "
            "Check that its head node is running (`ray status`) and the address and port are right."
        ) from None


def alive_node_ids(timeout_s: float) -> set[str] | None:
    """The ids of the nodes Ray's GCS lists alive; None where it does not answer within ``timeout_s``.
    Not ``ray.nodes()``: with the GCS gone (the cluster's head stopped) that waits for a minute, or
    aborts the whole process (a failed check in Ray's C++ state accessor)."""
    import ray
    from ray.core.generated import gcs_pb2

    try:
        infos = ray._private.worker.global_worker.gcs_client.get_all_node_info(timeout=timeout_s)
    except Exception:  # noqa: BLE001 - Ray raises its RPC errors as several types; any means "no answer"
        return None
    return {info.node_id.hex() for info in infos.values() if info.state == gcs_pb2.GcsNodeInfo.ALIVE}


def disconnect() -> None:
    """Leave Ray; for an embedded Ray this also stops its services and removes its temporary files."""
    import ray

    if ray.is_initialized():
        node = getattr(ray._private.worker, "_global_node", None)
        if _temp_dir is not None and node is not None:
            # The embedded Ray's autoscaler monitor ignores SIGTERM: Ray's graceful stop waits a second
            # for it, on every launch. It holds no state of ours.
            node.kill_monitor(check_alive=False)
        ray.shutdown()
    _remove_temp_dir()


def _remove_stale_temp_dirs() -> None:
    """Remove other runs' embedded-Ray directories that nothing runs from any more: a run whose
    reaper was killed with it (everything SIGKILLed at once) could not remove its own."""
    for path in ray_temp_dir("").parent.glob(ray_temp_dir("").name + "*"):
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_uid != os.getuid() or time.time() - st.st_mtime < _STALE_AFTER_S:
            continue  # another user's, or a run that is just starting
        if not pids_running_from(path, exclude=set()):
            shutil.rmtree(path, ignore_errors=True)


def _remove_temp_dir() -> None:
    global _temp_dir
    if _temp_dir is not None:
        shutil.rmtree(_temp_dir, ignore_errors=True)
        _temp_dir = None
