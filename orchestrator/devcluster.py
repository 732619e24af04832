"""A multi-node Ray cluster on one machine: one Linux network namespace per node.

    orchestrator dev-cluster up --nodes N [--cpus-per-node C] [--json]
    orchestrator dev-cluster down NAME
    orchestrator dev-cluster kill-node NAME INDEX
    orchestrator dev-cluster partition NAME INDEX

Layout of cluster ``NAME`` (everything it makes carries the name)::

    root namespace: bridge ob-NAME, 10.213.X.1/24 -- Ray head (0 CPUs: no ranks land there;
                    the controller's local raylet, as on a real cluster's head node)
      veth ov-NAME-I  <->  namespace orch-NAME-I: eth0 10.213.X.(10+I) -- Ray worker node I

Nodes reach each other and the head only over the bridge, so ranks on different
nodes have distinct addresses and talk over a real (virtual) link: MASTER_ADDR
across hosts, gloo over a non-loopback interface. ``X`` is picked so that the
subnet overlaps no route or address the machine already has; nothing binds
outside the bridge and loopback. Where namespaces cannot be made (no root, no
``ip``), the nodes are Ray nodes on 127.0.0.1, with a warning.

Every process of node I (its Ray services, their workers, the training processes
they start) inherits ``ORCH_DEV_NODE=NAME:I``, which is how ``kill-node`` and
``down`` find them all. ``partition`` takes the node's link down: its processes
live on, cut off. State lives in ``$ORCH_DEV_CLUSTER_DIR`` (default ``/tmp/orch-dc``,
short, because Ray's socket paths must fit in 107 bytes): ``NAME/cluster.json``,
the cluster's Ray token, and Ray's temporary files.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.children import start_logged
from orchestrator.controller.ray_session import NODE_ENV
from orchestrator.controller.reaper import sweep
from orchestrator.dev_clusters import state_root
from orchestrator.errors import ClusterError, ConfigError

NODE_MARK_ENV = "ORCH_DEV_NODE"
_START_TIMEOUT_S = 90.0
# Ray's defaults notice a dead node after ~30 s and let a cut-off raylet live for a minute;
# a dev cluster is for rehearsing failures, so both are a few seconds here.
_RAY_FAILURE_SETTINGS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_gcs_rpc_server_reconnect_timeout_s": "10",
}


@dataclass(kw_only=True)
class DevNode:
    """One simulated node."""

    index: int
    address: str
    netns: str | None = None
    veth: str | None = None
    pid: int | None = None


@dataclass(kw_only=True)
class DevCluster:
    """What ``up`` made, saved in ``cluster.json`` so the other subcommands can undo it."""

    name: str
    address: str
    namespaces: bool
    bridge: str | None = None
    nodes: list[DevNode] = field(default_factory=list)
    head_pid: int | None = None

    @property
    def dir(self) -> Path:
        return state_root() / self.name

    @property
    def token_path(self) -> Path:
        return self.dir / "token"

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "cluster.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, self.dir / "cluster.json")

    @classmethod
    def load(cls, name: str) -> DevCluster:
        path = state_root() / name / "cluster.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            known = ", ".join(sorted(p.name for p in state_root().glob("*") if (p / "cluster.json").exists()))
            raise ConfigError(f"no dev cluster named {name!r} (known: {known or 'none'})") from None
        data["nodes"] = [DevNode(**n) for n in data["nodes"]]
        return cls(**data)

    def node(self, index: int) -> DevNode:
        if not 0 <= index < len(self.nodes):
            raise ConfigError(f"dev cluster {self.name} has nodes 0..{len(self.nodes) - 1}; there is no node {index}")
        return self.nodes[index]

    def summary(self) -> dict[str, Any]:
        """What ``up --json`` prints."""
        return {"name": self.name, "address": self.address, "namespaces": self.namespaces,
                "nodes": [{"index": n.index, "address": n.address} for n in self.nodes]}


def up(nodes: int, cpus_per_node: int) -> DevCluster:
    """Start a head and ``nodes`` worker nodes; on any failure, remove what was made and raise."""
    name = "dc" + secrets.token_hex(3)
    use_netns = namespaces_available()
    if use_netns:
        subnet = free_subnet()
        hosts = list(subnet.hosts())
        # A port of its own: Ray's GCS listens on it on every address, so two dev clusters cannot share one.
        cluster = DevCluster(name=name, address=f"{hosts[0]}:{free_port()}", namespaces=True, bridge=f"ob-{name}")
        cluster.nodes = [DevNode(index=i, address=str(hosts[9 + i]), netns=f"orch-{name}-{i}", veth=f"ov-{name}-{i}")
                         for i in range(nodes)]
    else:
        print("dev-cluster: network namespaces are not available here (needs root and iproute2); "
              "starting the nodes on 127.0.0.1, without distinct addresses and without `partition`",
              file=sys.stderr)
        cluster = DevCluster(name=name, address=f"127.0.0.1:{free_port()}", namespaces=False)
        cluster.nodes = [DevNode(index=i, address="127.0.0.1") for i in range(nodes)]
    cluster.dir.mkdir(parents=True)
    cluster.token_path.write_text(secrets.token_hex(32) + "\n")
    cluster.token_path.chmod(0o600)
    cluster.save()
    try:
        if use_netns:
            make_network(cluster, subnet)
        head_ip, port = cluster.address.rsplit(":", 1)
        cluster.head_pid = _start_ray(cluster, "head", ["--head", f"--port={port}", f"--node-ip-address={head_ip}",
                                                        "--num-cpus=0", f"--temp-dir={cluster.dir / 'ray'}",
                                                        "--include-dashboard=false"])
        cluster.save()
        for node in cluster.nodes:  # one at a time: raylets registering at once time out on 2 cores
            node.pid = _start_ray(cluster, str(node.index), [f"--address={cluster.address}",
                                                             f"--node-ip-address={node.address}",
                                                             f"--num-cpus={cpus_per_node}"], netns=node.netns)
            cluster.save()
    except BaseException:
        down(cluster.name)
        raise
    return cluster


def down(name: str) -> list[int]:
    """Kill every process of the cluster, remove its namespaces, bridge and state; returns the pids killed."""
    cluster = DevCluster.load(name)
    killed = _kill_marked([f"{name}:{n.index}" for n in cluster.nodes] + [f"{name}:head"])
    remove_network(cluster)
    shutil.rmtree(cluster.dir, ignore_errors=True)
    return killed


def kill_node(name: str, index: int) -> list[int]:
    """SIGKILL every process of node ``index`` (a lost node); returns their pids."""
    cluster = DevCluster.load(name)
    cluster.node(index)
    return _kill_marked([f"{name}:{index}"])


def partition(name: str, index: int) -> None:
    """Cut node ``index`` off the bridge: its processes keep running, unreachable."""
    cluster = DevCluster.load(name)
    node = cluster.node(index)
    if not cluster.namespaces:
        raise ConfigError(f"dev cluster {name} runs on 127.0.0.1 (no network namespaces): a node cannot be partitioned")
    _ip("link", "set", node.veth, "down")


def namespaces_available() -> bool:
    """Whether this process can make network namespaces (root with iproute2)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"orch-probe-{os.getpid()}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return False
    _ip("netns", "del", probe, check=False)
    return True


def remove_network(cluster: DevCluster) -> None:
    """Remove the namespaces (their veth pairs go with them) and the bridge :func:`make_network` made."""
    if cluster.namespaces:
        for node in cluster.nodes:
            _ip("netns", "del", node.netns, check=False)
        _ip("link", "del", cluster.bridge, check=False)


def make_network(cluster: DevCluster, subnet: ipaddress.IPv4Network) -> None:
    """The bridge (with the head's address) and one namespace per node, linked to it by a veth pair."""
    head_ip = cluster.address.rsplit(":", 1)[0]
    _ip("link", "add", cluster.bridge, "type", "bridge")
    _ip("addr", "add", f"{head_ip}/{subnet.prefixlen}", "dev", cluster.bridge)
    _ip("link", "set", cluster.bridge, "up")
    for node in cluster.nodes:
        _ip("netns", "add", node.netns)
        _ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
        _ip("link", "set", node.veth, "master", cluster.bridge, "up")
        _ip("-n", node.netns, "addr", "add", f"{node.address}/{subnet.prefixlen}", "dev", "eth0")
        _ip("-n", node.netns, "link", "set", "eth0", "up")
        _ip("-n", node.netns, "link", "set", "lo", "up")


def _start_ray(cluster: DevCluster, node: str, args: list[str], netns: str | None = None) -> int:
    """Start ``ray start --block ARGS`` for ``node`` (in ``netns``) and wait until it has joined."""
    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    env = {**os.environ, **NODE_ENV, **_RAY_FAILURE_SETTINGS, NODE_MARK_ENV: f"{cluster.name}:{node}",
           "RAY_AUTH_TOKEN_PATH": str(cluster.token_path)}
    if not cluster.namespaces:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.pop("RAY_ADDRESS", None)
    command = [ray_cli, "start", "--block", "--disable-usage-stats", *args]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    proc = start_logged(command, cluster.dir / f"node-{node}.log", lambda out: b"Ray runtime started" in out,
                        f"Ray node {node} of dev cluster {cluster.name}", _START_TIMEOUT_S, env=env, new_session=True)
    return proc.pid


def _kill_marked(marks: list[str]) -> list[int]:
    """SIGKILL every process carrying one of ``marks`` until none is left (bounded)."""
    killed, alive = sweep(marks, {os.getpid()}, env=NODE_MARK_ENV)
    if alive:
        raise ClusterError(f"processes {alive[:10]} of {', '.join(marks)} are still alive after SIGKILL")
    return sorted(killed)


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that overlaps nothing this machine routes or holds."""
    used = []
    for args in (["-4", "-o", "route", "show", "table", "all"], ["-4", "-o", "addr", "show"]):
        for line in _ip(*args).stdout.splitlines():
            for word in line.split():
                try:
                    used.append(ipaddress.ip_network(word, strict=False))
                except ValueError:
                    continue
    for third in range(1, 255):
        candidate = ipaddress.ip_network(f"10.213.{third}.0/24")
        if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
            return candidate
    raise ClusterError("no free /24 left in 10.213.0.0/16 for a dev cluster; remove old ones with `dev-cluster down`")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise ClusterError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result
