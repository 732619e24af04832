"""Run the orchestrator on an MPI allocation: one MPI process per node brings up Ray there.

    mpiexec -n NODES -ppn 1 python launch/mpi_ray.py [--port 6379] [--loopback] -- \\
        launch cluster_configs/gpu_2x8.yaml --run-dir runs/exp1

MPI rank 0 starts the Ray head and broadcasts its address; every other rank joins it as a
Ray worker node. Rank 0 then runs ``orchestrator ARGS`` with ``cluster.ray_address`` and
``cluster.nodes`` set, and broadcasts its exit code; every node stops the Ray it started
(only that one: other Ray sessions on the node are left alone) and exits with that code.

``--loopback`` keeps a single-node Ray on 127.0.0.1 (for trying this on one machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from mpi4py import MPI

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from orchestrator.children import stop  # noqa: E402
from orchestrator.controller.ray_session import NODE_ENV  # noqa: E402

_HEAD_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 20.0


def main() -> int:
    args = _parse(sys.argv[1:])
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    # Token auth (Ray's default for new clusters) must be explicit for workers and the driver to join.
    # Workers at normal priority: Ray's default (15) is inherited by the training processes.
    env = {**os.environ, **NODE_ENV}
    if args.loopback:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_cli = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    common = ["--block", "--include-dashboard=false", "--disable-usage-stats"]

    children: list[subprocess.Popen] = []
    # SIGTERM (Slurm's scancel, mpiexec's own shutdown) reaches our children, then ends us through
    # the `finally` below; without it `ray start --block` kept running on every node.
    signal.signal(signal.SIGTERM, lambda signum, frame: _forward(children, signum))
    try:
        address = None
        if rank == 0:
            ip = "127.0.0.1" if args.loopback else socket.gethostbyname(socket.gethostname())
            address = f"{ip}:{args.port}"
            children.append(subprocess.Popen(
                [ray_cli, "start", "--head", f"--port={args.port}", f"--node-ip-address={ip}", *common], env=env
            ))
            _wait_for_port(ip, args.port, children[0])
        address = comm.bcast(address, root=0)
        if rank != 0:
            children.append(subprocess.Popen([ray_cli, "start", f"--address={address}", *common], env=env))
        comm.Barrier()

        code = 0
        if rank == 0:
            orchestrator = [sys.executable, "-m", "orchestrator", *args.orchestrator_args]
            orchestrator += ["--set", f"cluster.ray_address={address}", "--set", f"cluster.nodes={size}"]
            children.append(subprocess.Popen(orchestrator, env=env))
            code = children[-1].wait()
        code = comm.bcast(code, root=0)
    except BaseException as exc:
        # The other MPI ranks wait in bcast for us: take the whole job down rather than hang it.
        print(f"mpi_ray: rank {rank}: {exc!r}; aborting the MPI job", file=sys.stderr, flush=True)
        for child in reversed(children):
            _stop(child)
        comm.Abort(1)
        raise
    finally:
        for child in reversed(children):
            _stop(child)
    return code


def _forward(children: list[subprocess.Popen], signum: int) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signum)
    raise SystemExit(128 + signum)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=6379, help="Ray head (GCS) port")
    parser.add_argument("--loopback", action="store_true", help="single machine: Ray on 127.0.0.1 only")
    parser.add_argument("orchestrator_args", nargs=argparse.REMAINDER, help="-- then the orchestrator's arguments")
    args = parser.parse_args(argv)
    if args.orchestrator_args[:1] == ["--"]:
        args.orchestrator_args = args.orchestrator_args[1:]
    if not args.orchestrator_args:
        parser.error("give the orchestrator's arguments after --, e.g. -- launch CONFIG")
    return args


def _wait_for_port(host: str, port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + _HEAD_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ray head exited with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"ray head did not listen on {host}:{port} within {_HEAD_TIMEOUT_S:.0f}s")


def _stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM our `ray start --block`, which stops the Ray processes it started."""
    stop(proc, _STOP_TIMEOUT_S)


if __name__ == "__main__":
    sys.exit(main())
