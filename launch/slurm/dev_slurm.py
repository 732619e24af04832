"""A real Slurm on one machine, for trying the Slurm path and for the tests: one Slurm node per
network namespace, as ``orchestrator dev-cluster`` makes them.

    launch/slurm/dev-slurm.sh up --nodes N [--json]     # prints `export SLURM_CONF=...`
    launch/slurm/dev-slurm.sh down [NAME]                # every cluster of ours when no NAME

Root namespace: ``munged`` (a key of its own, its socket in the cluster's directory), a MariaDB
server on 127.0.0.1 (a data directory of its own; only ``slurmdbd`` uses it, so ``sacct`` works),
``slurmdbd`` and ``slurmctld`` on the bridge's address. Node ``nI``: ``slurmd -N nI`` inside
namespace ``orch-NAME-I`` with address ``10.213.X.(10+I)``, so the nodes of a multi-node job
really are different hosts to Slurm, Ray and torch.distributed. Needs root, iproute2 and
Debian's ``slurm-wlm``, ``slurmdbd``, ``munge`` and ``mariadb-server`` packages; nothing here is
installed as a service or touches ``/etc``: every file lives in ``$ORCH_DEV_CLUSTER_DIR/NAME``
(default ``/tmp/orch-dc``), every daemon is this command's, and ``down`` stops them all, with
every process left in the nodes' namespaces (jobs included), and removes the namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from orchestrator.children import start_logged, tail  # noqa: E402
from orchestrator.controller.reaper import sweep  # noqa: E402
from orchestrator.dev_clusters import state_root  # noqa: E402
from orchestrator.devcluster import (  # noqa: E402
    NODE_MARK_ENV,
    DevCluster,
    DevNode,
    free_port,
    free_subnet,
    make_network,
    namespaces_available,
    remove_network,
)
from orchestrator.errors import ClusterError  # noqa: E402

DAEMONS = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sacctmgr", "sinfo")
STATE_FILE = "slurm.json"
_START_TIMEOUT_S = 60.0


@dataclass(kw_only=True)
class DevSlurm:
    """What ``up`` made (saved as ``slurm.json`` in its directory, for ``down``)."""

    name: str
    network: DevCluster
    ctl_port: int
    dbd_port: int
    db_port: int
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return state_root() / self.name

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def nodes(self) -> list[str]:
        return [f"n{node.index}" for node in self.network.nodes]

    def env(self) -> dict[str, str]:
        """The environment Slurm's commands (sbatch, srun, squeue, sacct, scancel) need for this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, name: str) -> DevSlurm:
        data = json.loads((state_root() / name / STATE_FILE).read_text())
        network = data.pop("network")
        network["nodes"] = [DevNode(**n) for n in network["nodes"]]
        return cls(network=DevCluster(**network), **data)

    def summary(self) -> dict[str, object]:
        """What ``up --json`` prints."""
        return {"name": self.name, "slurm_conf": str(self.conf), "controller": self.network.address,
                "nodes": [{"name": f"n{n.index}", "address": n.address} for n in self.network.nodes]}


def missing() -> str | None:
    """Why this machine cannot run a dev Slurm (None when it can)."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return (f"not installed: {', '.join(absent)} (apt-get install slurm-wlm slurmdbd munge mariadb-server)")
    if not namespaces_available():
        return "network namespaces are not available (needs root and iproute2)"
    return None


def up(nodes: int) -> DevSlurm:
    """Start the daemons and ``nodes`` Slurm nodes; wait until every node is idle. On any failure
    everything made so far is removed and :class:`ClusterError` says which daemon and shows its log."""
    why = missing()
    if why is not None:
        raise ClusterError(f"dev Slurm cannot start here: {why}")
    name = "sl" + secrets.token_hex(3)
    subnet = free_subnet()
    hosts = list(subnet.hosts())
    network = DevCluster(name=name, address=str(hosts[0]), namespaces=True, bridge=f"ob-{name}",
                         nodes=[DevNode(index=i, address=str(hosts[9 + i]), netns=f"orch-{name}-{i}",
                                        veth=f"ov-{name}-{i}") for i in range(nodes)])
    slurm = DevSlurm(name=name, network=network, ctl_port=free_port(), dbd_port=free_port(), db_port=free_port())
    slurm.dir.mkdir(parents=True)
    slurm.save()
    try:
        make_network(network, subnet)
        _write_config(slurm, subnet.prefixlen)
        _start_all(slurm)
    except BaseException:
        down(name)
        raise
    return slurm


def down(name: str) -> list[int]:
    """Stop every daemon and every process in the nodes' namespaces, remove the namespaces, the
    bridge and the directory; returns the pids killed."""
    slurm = DevSlurm.load(name)
    killed: list[int] = []
    for node in slurm.network.nodes:  # jobs' processes too: whatever lives in the node's namespace
        found = subprocess.run(["ip", "netns", "pids", node.netns], capture_output=True, text=True, timeout=30)
        pids = [int(p) for p in found.stdout.split()]
        for pid in pids:
            _kill(pid)
        killed += pids
    done, alive = sweep([f"{name}:ctl"] + [f"{name}:{n.index}" for n in slurm.network.nodes], {os.getpid()},
                        env=NODE_MARK_ENV, running_from=slurm.dir)
    killed += done
    if alive:
        raise ClusterError(f"processes {alive[:10]} of dev Slurm {name} are still alive after SIGKILL")
    remove_network(slurm.network)
    shutil.rmtree(slurm.dir, ignore_errors=True)
    return sorted(set(killed))


def clusters() -> list[str]:
    """The names of this machine's dev Slurm clusters."""
    return sorted(p.parent.name for p in state_root().glob(f"*/{STATE_FILE}"))


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass


def _write_config(slurm: DevSlurm, prefixlen: int) -> None:
    d = slurm.dir
    (d / "state").mkdir()
    (d / "spool").mkdir()
    key = d / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    auth = f"AuthInfo=socket={d / 'munge.sock'}"
    # A requeued job waits out its credentials' lifetime before it starts again (120 s by default).
    ctl_auth = f"{auth},cred_expire=20"
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    node_lines = "\n".join(f"NodeName=n{n.index} NodeAddr={n.address} NodeHostname=n{n.index} CPUs={cpus} "
                           "State=UNKNOWN" for n in slurm.network.nodes)
    (d / "slurm.conf").write_text(f"""# dev Slurm {slurm.name}, made by launch/slurm/dev-slurm.sh (removed by its `down`)
ClusterName={slurm.name}
SlurmctldHost={host}({slurm.network.address})
SlurmctldPort={slurm.ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
{ctl_auth}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}/%n
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd-%n.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd-%n.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={slurm.dbd_port}
AccountingStoragePass={d / "munge.sock"}
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
KillWait=30
JobRequeue=0
MinJobAge=300
{node_lines}
PartitionName=dev Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    dbd = d / "slurmdbd.conf"
    dbd.write_text(f"""{auth}
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={slurm.dbd_port}
SlurmUser=root
PidFile={d / 'slurmdbd.pid'}
LogFile={d / 'slurmdbd.log'}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={slurm.db_port}
StorageUser=root
StorageLoc=slurm_acct_db
""")
    dbd.chmod(0o600)


def _start_all(slurm: DevSlurm) -> None:
    d, env = slurm.dir, slurm.env()
    _start(slurm, "munged", ["munged", "-F", "--force", f"--socket={d / 'munge.sock'}", f"--key-file={d / 'munge.key'}",
                             f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                             f"--seed-file={d / 'munged.seed'}"], ready=lambda: (d / "munge.sock").exists())
    _run(["mariadb-install-db", "--no-defaults", f"--datadir={d / 'db'}", "--user=root",
          "--auth-root-authentication-method=normal", "--skip-test-db"], d / "mariadb-install.log")
    _start(slurm, "mariadbd", ["mariadbd", "--no-defaults", f"--datadir={d / 'db'}", "--user=root",
                               f"--socket={d / 'mysql.sock'}", f"--port={slurm.db_port}", "--bind-address=127.0.0.1",
                               "--skip-grant-tables", "--skip-name-resolve", f"--pid-file={d / 'mysql.pid'}",
                               "--innodb-buffer-pool-size=16M"],
           ready=lambda: _listens("127.0.0.1", slurm.db_port))
    _start(slurm, "slurmdbd", ["slurmdbd", "-D"], ready=lambda: _listens("127.0.0.1", slurm.dbd_port))
    _run(["sacctmgr", "-i", "add", "cluster", slurm.name], d / "sacctmgr.log", env=env)
    _start(slurm, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(slurm.conf)],
           ready=lambda: _listens(slurm.network.address, slurm.ctl_port))
    for node in slurm.network.nodes:
        (d / "spool" / f"n{node.index}").mkdir()
        # nsenter, not `ip netns exec`: that mounts a sysfs of the namespace's own over /sys, without
        # the cgroup file systems slurmd insists on finding.
        _start(slurm, f"slurmd-n{node.index}", ["nsenter", f"--net=/run/netns/{node.netns}", "slurmd", "-D", "-N",
                                                f"n{node.index}", "-f", str(slurm.conf)],
               ready=lambda: True, mark=str(node.index))
    _wait(slurm, "the nodes to be idle in `sinfo`", lambda: _idle(slurm))


def _start(slurm: DevSlurm, name: str, command: list[str], ready: Callable[[], bool], mark: str = "ctl") -> None:
    env = {**slurm.env(), NODE_MARK_ENV: f"{slurm.name}:{mark}"}
    try:
        proc = start_logged(command, slurm.dir / f"{name}.out", lambda _: ready(), f"dev Slurm {slurm.name}: {name}",
                            _START_TIMEOUT_S, env=env, cwd=slurm.dir, new_session=True)
    except ClusterError as exc:
        raise ClusterError(f"{exc}\n{_daemon_logs(slurm)}") from None
    slurm.pids[name] = proc.pid
    slurm.save()


def _wait(slurm: DevSlurm, what: str, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    raise ClusterError(f"dev Slurm {slurm.name}: timed out after {_START_TIMEOUT_S:.0f}s waiting for {what}\n"
                       f"{_daemon_logs(slurm)}")


def _run(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise ClusterError(f"`{' '.join(command)}` failed with code {result.returncode}:\n{tail(log)}")


def _idle(slurm: DevSlurm) -> bool:
    result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=slurm.env(), capture_output=True, text=True,
                            timeout=30)
    states = dict(line.split() for line in result.stdout.splitlines() if len(line.split()) == 2)
    return all(states.get(node) == "idle" for node in slurm.nodes)


def _listens(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _daemon_logs(slurm: DevSlurm) -> str:
    parts = []
    for path in sorted(slurm.dir.glob("*.log")):
        last = tail(path, 8)
        if last:
            parts.append(f"--- {path.name} ---\n{last}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev-slurm.sh", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start a dev Slurm")
    start.add_argument("--nodes", type=int, default=2)
    start.add_argument("--json", action="store_true", help="print what was made as JSON")
    stop = sub.add_parser("down", help="stop a dev Slurm and remove everything it made")
    stop.add_argument("name", nargs="?", help="which (default: every one of this machine)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            if args.nodes < 1:
                parser.error("--nodes must be at least 1")
            slurm = up(args.nodes)
            if args.json:
                print(json.dumps(slurm.summary()))
            else:
                nodes = ", ".join(f"n{n.index} {n.address}" for n in slurm.network.nodes)
                print(f"dev Slurm {slurm.name} is up: {len(slurm.nodes)} node(s) ({nodes}), controller "
                      f"{slurm.network.address}:{slurm.ctl_port}")
                print(f"export SLURM_CONF={slurm.conf}")
                print(f"stop: launch/slurm/dev-slurm.sh down {slurm.name}")
            return 0
        names = [args.name] if args.name else clusters()
        if args.name and args.name not in clusters():
            print(f"dev-slurm: no dev Slurm named {args.name!r} (known: {', '.join(clusters()) or 'none'})",
                  file=sys.stderr)
            return 2
        for name in names:
            killed = down(name)
            print(f"dev Slurm {name} removed: {len(killed)} process(es) stopped, its namespaces, bridge and "
                  "directory deleted")
        if not names:
            print("dev-slurm: no dev Slurm is running")
        return 0
    except ClusterError as exc:
        print(f"dev-slurm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
